import ArgumentParser
import Foundation
import Snapshot

struct SnapshotDemoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo",
        abstract: "Snapshot a heap under random updates by fork, uffd-wp (handler thread, writing thread) and stop-and-copy (THP on and off), "
            + "verify every image, and measure incremental capture and write-tracking cost.")

    @Option(name: .customLong("heap-mib"), help: "Heap size in MiB.")
    var heapMiB = 2048

    @Option(help: "Writer threads doing random updates.")
    var writers = 2

    @Option(help: "Snapshots per method and heap (methods alternate; medians are reported).")
    var rounds = 2

    @Option(name: .customLong("staging-mib"), help: "Staging area of uffd-wp captures, in MiB.")
    var stagingMiB = 64

    @Option(name: .customLong("fault-chunk-pages"), help: "Pages uffd-wp saves around a faulting page (at most 512).")
    var faultChunkPages = Snapshotter.Options().faultChunkPages

    @Option(parsing: .upToNextOption, help: "The methods to compare (\(DemoMethod.allCases.map(\.rawValue).joined(separator: ", "))).")
    var methods: [DemoMethod] = DemoMethod.allCases

    @Option(help: "Transparent huge pages: on, off or both.")
    var thp = "both"

    @Option(help: "Directory for the images (tmpfs by default, the same for every method).")
    var directory = "/dev/shm"

    @Option(help: "Percent of the heap written before the incremental (delta) capture.")
    var incrementalPercent = 1.0

    @Option(help: "Rounds of the write-tracking measurement.")
    var trackingRounds = 5

    @Flag(help: "Print the report as JSON (progress still goes to standard error).")
    var json = false

    func run() throws {
        var c = SnapshotDemo.Configuration()
        let limits: [(name: String, value: Double, ok: Bool, rule: String)] = [
            ("--heap-mib", Double(heapMiB), heapMiB >= 2, "at least 2"),
            ("--writers", Double(writers), writers >= 1, "at least 1"),
            ("--rounds", Double(rounds), rounds >= 1, "at least 1"),
            ("--staging-mib", Double(stagingMiB), stagingMiB >= 1, "at least 1"),
            ("--tracking-rounds", Double(trackingRounds), trackingRounds >= 1, "at least 1"),
            ("--fault-chunk-pages", Double(faultChunkPages), (1...Int(512)).contains(faultChunkPages), "from 1 to 512"),
            ("--incremental-percent", incrementalPercent, incrementalPercent > 0 && incrementalPercent <= 100, "above 0 and at most 100"),
        ]
        if let bad = limits.first(where: { !$0.ok }) {
            throw ValidationError("\(bad.name) must be \(bad.rule), not \(bad.value == bad.value.rounded() ? String(Int(bad.value)) : String(bad.value))")
        }
        switch thp {
        case "on": c.transparentHugePages = [true]
        case "off": c.transparentHugePages = [false]
        case "both": c.transparentHugePages = [true, false]
        default: throw ValidationError("--thp is on, off or both")
        }
        c.heapBytes = heapMiB << 20
        c.writers = writers
        c.rounds = rounds
        c.stagingBytes = stagingMiB << 20
        c.faultChunkPages = faultChunkPages
        var seen = Set<DemoMethod>()
        c.methods = methods.filter { seen.insert($0).inserted }
        c.directory = directory
        c.incrementalFraction = incrementalPercent / 100
        c.trackingRounds = trackingRounds
        let report = try SnapshotDemo(c).run { line in
            FileHandle.standardError.write(Data((line + "\n").utf8))
        }
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            print(String(decoding: try encoder.encode(report), as: UTF8.self))
        } else {
            print(report.table())
        }
    }
}

extension DemoMethod: ExpressibleByArgument {}
