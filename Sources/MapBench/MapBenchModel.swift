import PagedMemory

/// What `uffd map bench` runs, and what one contender's run of one workload reports.
public struct MapBenchOptions: Codable, Sendable, Equatable {
    /// The data file's size (random reads, read-modify-write, scan, sort input).
    public var fileBytes: Int = 1 << 30
    /// The memory cgroup's limit, and the budget of every contender.
    public var limitBytes: Int = 256 << 20
    /// Bytes of the limit the pager leaves to the process itself (heap, code, page tables).
    public var reserveBytes: Int = 40 << 20
    /// Where the data files live (created once, reused while their size matches).
    public var directory: String = "/var/tmp/uffd-map-bench"
    /// Seconds each random-access run lasts.
    public var seconds: Double = 6
    /// Runs of every contender on every workload (alternating); medians are reported.
    public var repetitions: Int = 3
    /// The pager's page size for the random workloads.
    public var pageSize: Int = 4096
    /// The pager's page size for the scan, the sort and BFS.
    public var bulkPageSize: Int = 64 << 10
    /// The pager's store I/O.
    public var storeMode: FileStore.IOMode = .direct
    /// The pager's filler threads.
    public var fillers: Int = 4
    /// `SCHED_FIFO` priority of the pager's fillers (0: time-shared).
    public var fillerPriority: Int32 = 0
    /// Keys the sort sorts (8 bytes each), taken from the start of the data file.
    public var sortKeys: Int = 64 << 20
    /// R-MAT graph: 2^scale vertices, edgeFactor × 2^scale directed edges.
    public var graphScale: Int = 22
    public var edgeFactor: Int = 64
    /// The workloads to run (all by default).
    public var workloads: [Workload] = Workload.allCases
    /// Pages of the dirty-tracking comparison (0: skip it).
    public var dirtyTrackingPages: Int = 16_384
    /// Drop the page cache before every run (needs root); otherwise `POSIX_FADV_DONTNEED` on the files.
    public var dropCaches: Bool = true

    public init() {}
}

/// A workload of the bench.
public enum Workload: String, Codable, Sendable, CaseIterable {
    case randomRead1 = "random-read-1t"
    case randomRead4 = "random-read-4t"
    case zipfRead = "zipf-read"
    case readModifyWrite = "random-rmw"
    case scan = "sequential-scan"
    case sort = "sort"
    case bfs = "bfs"

    /// Whether the figure is operations per second (else seconds).
    public var isRate: Bool { [.randomRead1, .randomRead4, .zipfRead, .readModifyWrite].contains(self) }
    /// The contenders that run it.
    public var contenders: [Contender] {
        self == .zipfRead ? [.mmap, .mmapRandom, .pager, .pagerFIFO] : [.mmap, .mmapRandom, .pager, .pagerInThread]
    }
}

/// Who serves the pages.
public enum Contender: String, Codable, Sendable, CaseIterable {
    /// The kernel: `mmap(MAP_SHARED)` of the file, default read-around.
    case mmap
    /// The kernel with `madvise(MADV_RANDOM)`.
    case mmapRandom = "mmap-random"
    /// PagedMemory with the CLOCK policy.
    case pager
    /// PagedMemory with FIFO replacement (for the policy comparison).
    case pagerFIFO = "pager-fifo"
    /// PagedMemory with CLOCK, faults resolved in the faulting thread (SIGBUS).
    case pagerInThread = "pager-in-thread"
}

/// One contender's run of one workload, as the child process reports it.
public struct RunResult: Codable, Sendable {
    public var workload: Workload
    public var contender: Contender
    /// Seconds the measured part took.
    public var seconds: Double
    /// Operations done (random workloads), else 0.
    public var operations: Int
    /// Whether the result checked out (values read, sort order and checksum, BFS levels).
    public var verified: Bool
    public var note: String
    /// The process's storage reads and writes (`/proc/self/io`).
    public var bytesRead: Int
    public var bytesWritten: Int
    /// The process's peak resident set (`VmHWM`).
    public var peakRSS: Int
    /// The pager's statistics (pager contenders).
    public var pager: PagerStatistics?
    /// The memory cgroup's peak usage (`memory.max_usage_in_bytes`), filled in by the parent.
    public var cgroupPeak: Int?

    /// Operations per second, or seconds.
    public var figure: Double { workload.isRate ? Double(operations) / max(seconds, 1e-9) : seconds }
}

/// One row of the report: a contender on a workload over all repetitions.
public struct MapBenchRow: Codable, Sendable {
    public var workload: Workload
    public var contender: Contender
    /// "ops/s" or "s".
    public var unit: String
    /// The figure of every run, in run order.
    public var runs: [Double]
    public var median: Double
    /// Speed relative to `mmap` and to `mmap-random` (above 1: faster), from the medians.
    public var ratioToMmap: Double
    public var ratioToMmapRandom: Double
    public var verified: Bool
    /// Medians over the runs.
    public var bytesRead: Int
    public var bytesWritten: Int
    /// Maxima over the runs.
    public var peakRSS: Int
    public var cgroupPeak: Int?
    /// Median faults served by the pager (pager contenders).
    public var pagerFaults: Int?
}

/// The whole report: the options, where it ran, and the rows.
public struct MapBenchReport: Codable, Sendable {
    public var options: MapBenchOptions
    /// The memory cgroup the runs were confined to, or why there was none.
    public var cgroup: String
    /// How the cache was made cold before each run.
    public var coldCache: String
    public var rows: [MapBenchRow]
    /// Synchronous write protection against WP_ASYNC + PAGEMAP_SCAN, if measured.
    public var dirtyTracking: DirtyTracking.Result?
}
