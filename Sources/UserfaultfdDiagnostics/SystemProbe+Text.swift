import Foundation

extension SystemProbe {
    /// The report as `uffd probe` prints it: one screen of aligned text.
    public var text: String {
        var out: [String] = []
        out.append("kernel \(kernelRelease), euid \(effectiveUID), CAP_SYS_PTRACE \(hasPtraceCapability ? "yes" : "no"), "
            + "vm.unprivileged_userfaultfd \(unprivilegedUserfaultfd.map(String.init) ?? "?")")
        out.append("\(device.path): " + (device.exists
            ? "mode \(device.mode ?? "?") uid \(device.owner ?? 0) gid \(device.group ?? 0), \(device.accessible ? "usable" : "not usable") by this process"
            : "absent"))
        out.append("")
        out.append("creation")
        for a in creation {
            let label = a.method + (a.userModeOnly ? " (user-mode only)" : "")
            out.append("  " + label.padding(toLength: 28, withPad: " ", startingAt: 0) + (a.works ? "works" : "refused: \(a.error ?? "")"))
        }
        out.append("")
        out.append(contentsOf: featureLines)
        out.append("")
        out.append("ioctls per memory type and register mode")
        for t in memoryTypes {
            if let why = t.unavailable {
                out.append("  \(t.kind): unavailable: \(why)")
                continue
            }
            out.append("  \(t.kind)")
            for m in t.modes {
                out.append("    " + m.mode.padding(toLength: 17, withPad: " ", startingAt: 0)
                    + (m.ioctls.map { $0.joined(separator: " ") } ?? "refused: \(m.error ?? "")"))
            }
        }
        out.append("")
        out.append("huge pages (2 MiB): \(hugePages.free) free of \(hugePages.total) reserved"
            + (hugePages.borrowedForProbe ? " (one was reserved for this probe and released)" : ""))
        return out.joined(separator: "\n")
    }

    /// The features, three to a line, and the fd's ioctls.
    private var featureLines: [String] {
        var out: [String] = []
        let supported = features.filter(\.supported).count
        out.append("features (\(supported) of \(features.count) supported"
            + (featureBits.map { ", kernel answer 0x\(String($0, radix: 16))" } ?? ", no uffd could be created") + ")")
        for row in stride(from: 0, to: features.count, by: 3) {
            let cells = features[row..<min(row + 3, features.count)].map { f in
                ((f.supported ? "+ " : "- ") + f.name).padding(toLength: 24, withPad: " ", startingAt: 0)
            }
            out.append("  " + cells.joined())
        }
        out.append("  fd ioctls: \(fdIoctls.joined(separator: " "))")
        return out
    }
}
