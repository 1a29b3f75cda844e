import ArgumentParser
import Foundation
import Snapshot

struct SnapshotCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot",
        abstract: "Live snapshots of memory with userfaultfd write protection: inspect, flatten, demo.",
        subcommands: [SnapshotInspect.self, SnapshotFlatten.self, SnapshotDemoCommand.self])
}

struct SnapshotInspect: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "inspect",
        abstract: "Show a snapshot file's header, regions and page index; check its checksums.")

    @Argument(help: "The snapshot file.")
    var file: String

    @Flag(help: "Skip reading the page data to check every record's checksum.")
    var noVerify = false

    @Flag(help: "Print the same content as JSON.")
    var json = false

    func run() throws {
        let summary: SnapshotSummary
        do {
            summary = SnapshotSummary(try SnapshotFile(path: file), verify: !noVerify)
        } catch {
            throw ValidationError("refused: \(error)")
        }
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            print(String(decoding: try encoder.encode(summary), as: UTF8.self))
        } else {
            print(render(summary))
        }
        if summary.checksumsVerified == false { throw ExitCode(1) }
    }

    func render(_ s: SnapshotSummary) -> String {
        var out = ["\(s.path): snapshot format \(s.version), \(s.pageSize)-byte pages, \(s.fileBytes) bytes",
                   "  id      \(s.id)",
                   "  parent  \(s.parent ?? "none (a full snapshot)")",
                   "  regions \(s.regions.count)"]
        for r in s.regions {
            out.append("    0x\(String(r.start, radix: 16)) +\(r.length) bytes (\(r.length / UInt64(s.pageSize)) pages, \(r.kind))")
        }
        out.append("  pages   \(s.pages): data \(s.dataPages), zero \(s.zeroPages), hole \(s.holePages), unchanged from parent \(s.unchangedPages)")
        out.append("  records \(s.records)")
        switch s.checksumsVerified {
        case .some(true): out.append("  checksums: all \(s.records) records match")
        case .some(false): out.append("  checksums: FAILED: \(s.verificationError ?? "")")
        case .none: out.append("  checksums: not checked")
        }
        return out.joined(separator: "\n")
    }
}

struct SnapshotFlatten: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "flatten",
        abstract: "Write the memory a snapshot (and its deltas) hold as one raw image, the regions back to back "
            + "(the layout of a Firecracker memory file; serve it with `uffd serve --memory-file`).")

    @Argument(help: "The full snapshot, then its deltas oldest first.")
    var files: [String]

    @Option(name: .shortAndLong, help: "The raw image to write.")
    var output: String

    func run() throws {
        do {
            let chain = try SnapshotChain(paths: files)
            let written = try chain.flatten(to: output)
            print("\(output): \(chain.totalBytes) bytes (\(written) bytes of data, the rest holes) from \(files.count) file(s)")
        } catch {
            throw ValidationError("refused: \(error)")
        }
    }
}
