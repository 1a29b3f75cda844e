import ArgumentParser
import Foundation
import Userfaultfd

struct Probe: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show what userfaultfd offers on this machine: creation, features, ioctls per memory type, huge pages.")

    @Flag(help: "Print the same content as JSON.")
    var json = false

    @Option(help: "Reserve this many 2 MiB huge pages first (root only) so the hugetlb row can be probed.")
    var reserveHugePages: Int = 0

    func run() throws {
        if reserveHugePages > 0 { HugePages.ensureFree(reserveHugePages) }
        let probe = SystemProbe.run()
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            print(String(decoding: try encoder.encode(probe), as: UTF8.self))
        } else {
            print(render(probe))
        }
    }

    func render(_ p: SystemProbe) -> String {
        var out: [String] = []
        out.append("kernel \(p.kernelRelease), euid \(p.effectiveUID), CAP_SYS_PTRACE \(p.hasPtraceCapability ? "yes" : "no"), "
            + "vm.unprivileged_userfaultfd \(p.unprivilegedUserfaultfd.map(String.init) ?? "?")")
        let dev = p.device
        out.append("\(dev.path): " + (dev.exists
            ? "mode \(dev.mode ?? "?") uid \(dev.owner ?? 0) gid \(dev.group ?? 0), \(dev.accessible ? "usable" : "not usable") by this process"
            : "absent"))
        out.append("")
        out.append("creation")
        for a in p.creation {
            let label = a.method + (a.userModeOnly ? " (user-mode only)" : "")
            out.append("  " + label.padding(toLength: 28, withPad: " ", startingAt: 0) + (a.works ? "works" : "refused: \(a.error ?? "")"))
        }
        out.append("")
        let supported = p.features.filter(\.supported).count
        out.append("features (\(supported) of \(p.features.count) supported"
            + (p.featureBits.map { ", kernel answer 0x\(String($0, radix: 16))" } ?? ", no uffd could be created") + ")")
        for row in stride(from: 0, to: p.features.count, by: 3) {
            let cells = p.features[row..<min(row + 3, p.features.count)].map { f in
                ((f.supported ? "+ " : "- ") + f.name).padding(toLength: 24, withPad: " ", startingAt: 0)
            }
            out.append("  " + cells.joined())
        }
        out.append("  fd ioctls: \(p.fdIoctls.joined(separator: " "))")
        out.append("")
        out.append("ioctls per memory type and register mode")
        for t in p.memoryTypes {
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
        out.append("huge pages (2 MiB): \(p.hugePages.free) free of \(p.hugePages.total) reserved"
            + (p.hugePages.borrowedForProbe ? " (one was reserved for this probe and released)" : ""))
        return out.joined(separator: "\n")
    }
}
