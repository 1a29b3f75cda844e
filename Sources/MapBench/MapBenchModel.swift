import PagedMemory

/// What `uffd map bench` runs, and what one contender's run of one workload reports.
public struct MapBenchOptions: Codable, Sendable, Equatable {
    /// The data file's size (random reads, read-modify-write, scan, sort input).
    public var fileBytes: Int = 1 << 30
    /// The memory cgroup's limit, and the budget of every contender.
    public var limitBytes: Int = 256 << 20
    /// Bytes of the limit the pager leaves to the process itself (heap, code, page
    /// tables, the workload's own arrays); 0: ``reserve(for:)`` works it out per workload.
    public var reserveBytes: Int = 0
    /// Where the data files live (created once, reused while their size matches).
    public var directory: String = "/var/tmp/uffd-map-bench"
    /// Seconds each random-access run lasts.
    public var seconds: Double = 6
    /// Runs of every contender on every workload (alternating); medians are reported.
    public var repetitions: Int = 3
    /// The pager's page size for the random workloads.
    public var pageSize: Int = 4096
    /// The pager's page size for the scan and the sort.
    public var bulkPageSize: Int = 64 << 10
    /// The pager's page size for BFS (its reads are scattered: small pages waste less of the buffer).
    public var graphPageSize: Int = 4096
    /// The pager's eviction marks (``PagerConfiguration/highWater``, ``PagerConfiguration/lowWater``).
    public var highWater: Double = 0.9
    public var lowWater: Double = 0.7
    /// The share of the buffer `pager-soft` keeps soft-evicted.
    public var softEvictionFraction: Double = 0.25
    /// Which contenders run (empty: each workload's own list).
    public var contenders: [Contender] = []
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

    /// The pager's page size for `workload`.
    public func pageSize(for workload: Workload) -> Int {
        switch workload {
        case .randomRead1, .randomRead4, .zipfRead, .readModifyWrite: return pageSize
        case .scan, .sort: return bulkPageSize
        case .bfs: return graphPageSize
        }
    }

    /// The bytes of the limit the pager leaves for everything but its buffer: the
    /// workload's own anonymous memory (which every contender pays out of the limit,
    /// the kernel's page cache getting the rest), the pager's own (filler staging as
    /// far as it is touched, and per buffer page 16 bytes of queue and flags), and
    /// 2 MiB for heap, stacks and page tables. ``reserveBytes``, if set, instead.
    /// The table shows the cgroup's peak beside the buffer: the difference is what the
    /// process used besides it.
    public func reserve(for workload: Workload) -> Int {
        if reserveBytes > 0 { return reserveBytes }
        let mib = 1 << 20
        var own = 2 * mib
        switch workload {
        case .bfs:
            // The level array (4 bytes a vertex) and the frontiers (4 bytes a vertex together, at their widest).
            own += 8 << graphScale
        case .sort:
            // Sorting a run allocates a merge buffer of half the run (a run is a quarter of the limit).
            own += limitBytes / 8
        default:
            break
        }
        // Read-ahead touches up to 1 MiB of a filler's staging; single pages only a page.
        let staging = fillers * (workload == .scan || workload == .sort ? mib : pageSize(for: workload))
        return min(limitBytes - 8 * mib, own + staging + (limitBytes / 4096) * 16)
    }

    /// The pager's buffer for `workload`: the limit less ``reserve(for:)``.
    public func bufferBytes(for workload: Workload) -> Int { limitBytes - reserve(for: workload) }

    /// The contenders that run `workload`.
    public func contenders(for workload: Workload) -> [Contender] {
        contenders.isEmpty ? workload.contenders : workload.contenders.filter(contenders.contains) + contenders.filter {
            !workload.contenders.contains($0) && $0.isPager && workload != .zipfRead
        }
    }
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
        switch self {
        case .zipfRead: return [.mmap, .mmapRandom, .pager, .pagerFIFO]
        case .bfs: return [.mmap, .mmapRandom, .pager, .pagerInThread, .pagerInThreadSoft]
        default: return [.mmap, .mmapRandom, .pager, .pagerInThread]
        }
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
    /// PagedMemory with CLOCK and soft eviction (``PagerConfiguration/softEviction``).
    case pagerSoft = "pager-soft"
    /// Soft eviction, faults resolved in the faulting thread.
    case pagerInThreadSoft = "pager-in-thread-soft"

    /// Whether a ``Pager`` serves the pages.
    public var isPager: Bool { self != .mmap && self != .mmapRandom }
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
    /// Major page faults of the measured part (`getrusage`): the kernel's reads for `mmap`.
    public var majorFaults: Int?
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
    /// Median touches of soft-evicted pages served without a read (`pager-soft`).
    public var softHits: Int?
    /// Median major faults (`getrusage`).
    public var majorFaults: Int?
    /// The pager's buffer (pager contenders).
    public var bufferBytes: Int?
    /// The most bytes the pager held resident, over the runs (pager contenders).
    public var pagerPeakResident: Int?
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
