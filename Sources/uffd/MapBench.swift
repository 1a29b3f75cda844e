import ArgumentParser
import Foundation
import MapBench
import PagedMemory

/// `uffd map bench`: out-of-core workloads over the kernel's mmap and PagedMemory,
/// alternating, each run in a child process inside a memory cgroup the bench creates.
struct MapBenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Compare PagedMemory with the kernel's mmap on data larger than a memory cgroup's limit.",
        discussion: """
            Workloads: random 4 KiB reads (1 and 4 threads, uniform; 1 thread Zipf), random read-modify-write, \
            a sequential scan, an out-of-core sort of 64-bit keys and BFS over an R-MAT graph in CSR form. \
            Each run is a child process in a cgroup v1 memory cgroup (memory.limit_in_bytes = --limit-mib), \
            started with a cold page cache. Ratios are of medians from the same run; above 1 the library is faster.
            """)

    @Option(name: .long, help: "Data file size in MiB (at least 4x the limit).")
    var fileMib: Int = 1024
    @Option(name: .long, help: "Memory cgroup limit in MiB; the pager's buffer is this minus --reserve-mib.")
    var limitMib: Int = 256
    @Option(name: .long, help: "MiB of the limit left to the process itself (0: the workload's own arrays, the pager's bookkeeping and 2 MiB).")
    var reserveMib: Int = 0
    @Option(name: .long, help: "Seconds per random-access run.")
    var seconds: Double = 6
    @Option(name: .long, help: "Runs of every contender per workload (medians are reported).")
    var repetitions: Int = 3
    @Option(name: .long, help: "Pager page size in KiB for the random workloads.")
    var pageKib: Int = 4
    @Option(name: .long, help: "Pager page size in KiB for the scan and the sort.")
    var bulkPageKib: Int = 64
    @Option(name: .long, help: "Pager page size in KiB for BFS.")
    var bfsPageKib: Int = 4
    @Option(name: .long, help: "Pager eviction starts above this share of the buffer.")
    var highWater: Double = 0.9
    @Option(name: .long, help: "Pager eviction stops at this share of the buffer.")
    var lowWater: Double = 0.7
    @Option(name: .long, help: "Share of the buffer pager-soft keeps soft-evicted (unmapped, still in memory).")
    var softFraction: Double = 0.25
    @Option(name: .long, parsing: .upToNextOption, help: "Contenders to run (default: each workload's own).")
    var contenders: [String] = []
    @Option(name: .long, help: "Pager store I/O: direct (O_DIRECT) or buffered.")
    var store: String = "direct"
    @Option(name: .long, help: "Pager filler threads.")
    var fillers: Int = 4
    @Option(name: .long, help: "SCHED_FIFO priority of the pager's filler threads (0: time-shared).")
    var fillerPriority: Int32 = 0
    @Option(name: .long, help: "Keys to sort, in millions (2^20).")
    var sortMegakeys: Int = 64
    @Option(name: .long, help: "R-MAT scale (2^scale vertices).")
    var graphScale: Int = 22
    @Option(name: .long, help: "R-MAT edges per vertex.")
    var edgeFactor: Int = 64
    @Option(name: .long, parsing: .upToNextOption, help: "Workloads to run (default: all; `none` for the dirty-tracking comparison alone).")
    var workloads: [String] = []
    @Option(name: .long, help: "Pages of the dirty-tracking comparison (0: skip it).")
    var dirtyTrackingPages: Int = 16_384
    @Option(name: .long, help: "Directory for the data files (reused between runs).")
    var directory: String = "/var/tmp/uffd-map-bench"
    @Flag(name: .long, help: "Print the report as JSON.")
    var json = false

    func validate() throws {
        if fileMib < 4 * limitMib { throw ValidationError("--file-mib must be at least 4x --limit-mib") }
        if reserveMib >= limitMib { throw ValidationError("--reserve-mib must be below --limit-mib") }
        for c in contenders where Contender(rawValue: c) == nil {
            throw ValidationError("unknown contender \(c); known: \(Contender.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        if FileStore.IOMode(rawValue: store) == nil { throw ValidationError("--store is direct or buffered") }
        for w in workloads where Workload(rawValue: w) == nil && workloads != ["none"] {
            throw ValidationError("unknown workload \(w); known: \(Workload.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        if !(0 < lowWater && lowWater < highWater && highWater <= 1) { throw ValidationError("need 0 < --low-water < --high-water <= 1") }
        if repetitions < 1 || seconds <= 0 || fillers < 1 { throw ValidationError("repetitions, seconds and fillers must be positive") }
    }

    func run() throws {
        var o = MapBenchOptions()
        o.fileBytes = fileMib << 20
        o.limitBytes = limitMib << 20
        o.reserveBytes = reserveMib << 20
        o.seconds = seconds
        o.repetitions = repetitions
        o.pageSize = pageKib << 10
        o.bulkPageSize = bulkPageKib << 10
        o.graphPageSize = bfsPageKib << 10
        o.softEvictionFraction = softFraction
        o.highWater = highWater
        o.lowWater = lowWater
        o.contenders = contenders.compactMap(Contender.init(rawValue:))
        o.storeMode = FileStore.IOMode(rawValue: store) ?? .direct
        o.fillers = fillers
        o.fillerPriority = fillerPriority
        o.sortKeys = sortMegakeys << 20
        o.graphScale = graphScale
        o.edgeFactor = edgeFactor
        o.directory = directory
        o.dirtyTrackingPages = dirtyTrackingPages
        if workloads == ["none"] {
            o.workloads = []
        } else if !workloads.isEmpty {
            o.workloads = workloads.compactMap(Workload.init(rawValue:))
        }
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        let runner = MapBenchRunner(options: o, childCommand: [exe, "map", "bench-child"]) { line in
            FileHandle.standardError.write(Data((line + "\n").utf8))
        }
        let report = try runner.run()
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            // A run that failed (its child died or was stopped) has no figure: "nan".
            encoder.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
            print(String(decoding: try encoder.encode(report), as: UTF8.self))
        } else {
            print(report.table)
        }
    }
}

/// One run of `uffd map bench`, in its own process (started by the bench).
struct MapBenchChild: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "bench-child", shouldDisplay: false)

    @Option var workload: String
    @Option var contender: String
    @Option var options: String
    @Option var cgroup: String?

    func run() throws {
        guard let w = Workload(rawValue: workload), let c = Contender(rawValue: contender) else {
            throw ValidationError("unknown workload or contender")
        }
        let o = try JSONDecoder().decode(MapBenchOptions.self, from: Data(options.utf8))
        let result = try ChildRun.run(w, c, options: o, cgroup: cgroup)
        print(String(decoding: try JSONEncoder().encode(result), as: UTF8.self))
    }
}
