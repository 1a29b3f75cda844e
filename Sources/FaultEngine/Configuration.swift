import Userfaultfd

/// How a ``FaultServer`` resolves faults: strategy, prefetch, threads.
///
/// Also reachable as `FaultServer<Source>.Configuration`. The named configurations
/// are the ones `uffd bench` measures.
///
/// Chunk sizes (`chunkPages`, adaptive `maxPages`) count base pages of
/// `systemPageSize` bytes. With a larger ``pageSize`` (2 MiB hugetlb memory) a chunk
/// keeps its size in bytes, rounded up to whole pages of that size: 16 base pages
/// become one 2 MiB page.
public struct FaultServerConfiguration: Sendable, Hashable {
    /// How pages are installed.
    public enum Strategy: Sendable, Hashable {
        /// `UFFDIO_COPY` of an aligned chunk of `chunkPages` pages around the fault
        /// (1: the faulting page alone), skipping pages already present.
        ///
        /// With huge pages (``FaultServerConfiguration/pageSize`` above the base page)
        /// zeros after a REMOVE are copied from a zeroed page, since hugetlb memory has
        /// no `UFFDIO_ZEROPAGE`.
        case copy(chunkPages: Int)
        /// Fill a staging area (or take the source's own pages) and `UFFDIO_MOVE` them
        /// into place: zero-copy when the source allows moving, which consumes it.
        case move(chunkPages: Int)
        /// Shmem or hugetlb memory registered MINOR (and MISSING): write the page cache
        /// through a second mapping (``ServedRegion/pageCacheAlias``), then `UFFDIO_CONTINUE`.
        /// Needs FEATURE_MINOR_SHMEM, or FEATURE_MINOR_HUGETLBFS for huge pages.
        case minor(chunkPages: Int)
        /// Faults raise SIGBUS in the faulting thread (the uffd has FEATURE_SIGBUS);
        /// an async-signal-safe C resolver installs `chunkPages` pages there and then,
        /// from memory or file sources. With ``Prefetch/adaptive(maxPages:)``, a thread
        /// that faults where its last resolution ended gets a window doubling up to
        /// `maxPages`, forward from the fault. Other sources are served by the handler thread.
        case sigbus(chunkPages: Int)
        /// The fastest safe strategy for the memory, the uffd's features and the source,
        /// chosen when the server is created (see ``FaultServer/strategyChoice``).
        ///
        /// Every page is installed ahead of the faults by a populate thread in chunks of
        /// up to 2 MiB that yields to faults; the faults that still happen are resolved
        /// in the faulting thread (SIGBUS) where the source allows it, and otherwise by
        /// a handler with a read-ahead window growing up to 2 MiB. Installs with
        /// `UFFDIO_CONTINUE` into shmem or hugetlb page cache reachable through a
        /// ``ServedRegion/pageCacheAlias``, `UFFDIO_MOVE` from a source that gives its
        /// pages up, and `UFFDIO_COPY` where nothing else applies. Handshake the uffd
        /// with ``FaultServerConfiguration/automaticFeatures(for:)`` (preferred, not
        /// required) to let it choose among all of them.
        case automatic

        /// The chunk size in pages (``automatic``: the size its faults start with).
        public var chunkPages: Int {
            switch self {
            case .copy(let n), .move(let n), .minor(let n), .sigbus(let n): return n
            case .automatic: return FaultServerConfiguration.automaticFaultChunkPages
            }
        }
    }

    /// What is installed beyond the faulting chunk.
    public enum Prefetch: Sendable, Hashable {
        /// Nothing.
        case none
        /// Sequential faults grow the chunk (doubling up to `maxPages`) forward from
        /// the fault; a fault elsewhere resets it to the strategy's chunk.
        case adaptive(maxPages: Int)
        /// Install the working set recorded in the file at `path` first, in recorded order,
        /// on a background thread (see ``FaultServerConfiguration/recordWorkingSet``).
        case replay(path: String)
    }

    /// How pages are installed.
    public var strategy: Strategy
    /// What is installed beyond the faulting chunk.
    public var prefetch: Prefetch
    /// Handler threads reading the uffd (at least 1).
    public var handlerThreads: Int
    /// Stream every region's remaining pages in the background, from its last page down
    /// (faults most often come in address order), while faults are served first.
    public var backgroundPopulate: Bool
    /// Write the order in which pages were first faulted to this file when the server stops.
    public var recordWorkingSet: String?
    /// Messages read per `read` (at least 1).
    public var batchSize: Int
    /// CPUs to pin handler thread `i` to (`handlerCPUs[i % count]`); empty: no pinning.
    public var handlerCPUs: [Int]
    /// The size of the pages served, in bytes: `systemPageSize` (the default), or
    /// `HugePages.size` (2 MiB) for hugetlb memory.
    ///
    /// Every region served must be aligned to it, faults are resolved a whole page of
    /// this size at a time, and statistics count pages of this size. Huge pages are
    /// served with the ``Strategy/copy(chunkPages:)`` or ``Strategy/minor(chunkPages:)``
    /// strategy (or ``Strategy/automatic``, which picks one of them): hugetlb memory has
    /// no `UFFDIO_MOVE`, and the SIGBUS strategy is not supported there.
    public var pageSize: Int
    /// The real-time priority of the handler threads (`SCHED_FIFO`, 1...99), or 0 to
    /// leave them time-shared (the default).
    ///
    /// A handler thread spends almost all its time blocked; when a fault wakes it on a
    /// machine whose CPUs are busy, a time-shared thread waits for a time slice, and
    /// that wait dominates the fault's latency. A real-time handler runs at once. The
    /// prefetch thread stays time-shared. Setting the policy needs CAP_SYS_NICE (or an
    /// RLIMIT_RTPRIO that allows it); without it the handlers stay time-shared and
    /// ``FaultStatistics/lastError`` says so.
    public var handlerPriority: Int

    /// The values ``handlerPriority`` may take: 0 (time-shared) or a `SCHED_FIFO` priority.
    public static let handlerPriorities: ClosedRange<Int> = 0...99

    public init(
        strategy: Strategy = .copy(chunkPages: 16),
        prefetch: Prefetch = .none,
        handlerThreads: Int = 1,
        backgroundPopulate: Bool = false,
        recordWorkingSet: String? = nil,
        batchSize: Int = 64,
        handlerCPUs: [Int] = [],
        pageSize: Int = systemPageSize,
        handlerPriority: Int = 0
    ) {
        self.strategy = strategy
        self.prefetch = prefetch
        self.handlerThreads = handlerThreads
        self.backgroundPopulate = backgroundPopulate
        self.recordWorkingSet = recordWorkingSet
        self.batchSize = batchSize
        self.handlerCPUs = handlerCPUs
        self.pageSize = pageSize
        self.handlerPriority = handlerPriority
    }

    /// One handler thread, `UFFDIO_COPY` of the faulting 4 KiB page: the plain C loop.
    public static var handler4k: Self { .init(strategy: .copy(chunkPages: 1)) }
    /// One handler thread, `UFFDIO_COPY` of the aligned 64 KiB chunk around the fault.
    public static var handler64k: Self { .init(strategy: .copy(chunkPages: 16)) }
    /// In-thread resolution through FEATURE_SIGBUS, 64 KiB per fault.
    public static var sigbus: Self { .init(strategy: .sigbus(chunkPages: 16)) }
    /// `UFFDIO_MOVE` of 256 KiB chunks (zero-copy from a source that allows moving).
    public static var move: Self { .init(strategy: .move(chunkPages: 64)) }
    /// MINOR faults + `UFFDIO_CONTINUE` of 256 KiB chunks on shmem.
    public static var minor: Self { .init(strategy: .minor(chunkPages: 64)) }
    /// COPY with adaptive read-ahead from 64 KiB up to 1 MiB.
    public static var adaptive: Self { .init(strategy: .copy(chunkPages: 16), prefetch: .adaptive(maxPages: 256)) }
    /// COPY of 64 KiB chunks, replaying the working set recorded at `path` first.
    public static func replay(_ path: String) -> Self {
        .init(strategy: .copy(chunkPages: 16), prefetch: .replay(path: path))
    }
    /// The engine's default: the ``Strategy/automatic`` strategy, which picks the
    /// fastest safe way to serve the memory when the server is created.
    public static var `default`: Self { automatic }
    /// The ``Strategy/automatic`` strategy.
    public static var automatic: Self { .init(strategy: .automatic) }

    /// Checks the configuration, naming what is wrong.
    func validate() throws(UserfaultfdError) {
        func bad(_ why: String) -> UserfaultfdError {
            UserfaultfdError(operation: "FaultServer configuration", kind: .invalidArgument(why))
        }
        let chunk = strategy.chunkPages
        if chunk < 1 || chunk > 1 << 16 { throw bad("chunkPages \(chunk) must lie in 1...65536") }
        if handlerThreads < 1 || handlerThreads > 64 { throw bad("handlerThreads \(handlerThreads) must lie in 1...64") }
        if batchSize < 1 || batchSize > 4096 { throw bad("batchSize \(batchSize) must lie in 1...4096") }
        if case .adaptive(let maxPages) = prefetch, maxPages < chunk || maxPages > 1 << 16 {
            throw bad("adaptive maxPages \(maxPages) must lie in \(chunk)...65536 (at least the chunk)")
        }
        if case .replay(let path) = prefetch, path.isEmpty { throw bad("replay path is empty") }
        if let path = recordWorkingSet, path.isEmpty { throw bad("recordWorkingSet path is empty") }
        if handlerCPUs.contains(where: { $0 < 0 || $0 >= 1024 }) { throw bad("handlerCPUs \(handlerCPUs) must lie in 0..<1024") }
        if !Self.handlerPriorities.contains(handlerPriority) { throw bad("handlerPriority \(handlerPriority) must be 0 (time-shared) or a SCHED_FIFO priority in 1...99") }
        if pageSize != systemPageSize && pageSize != HugePages.size {
            throw bad("pageSize \(pageSize) must be \(systemPageSize) (base pages) or \(HugePages.size) (2 MiB huge pages)")
        }
        if pageSize != systemPageSize {
            switch strategy {
            case .copy, .automatic: break
            case .move:
                throw bad("the move strategy is not supported with \(pageSize)-byte pages: hugetlb memory has no UFFDIO_MOVE; use copy")
            case .minor:
                break
            case .sigbus:
                throw bad("the sigbus strategy is not supported with \(pageSize)-byte pages; use copy")
            }
        }
    }

    /// `basePages` pages of `systemPageSize` bytes as whole pages of ``pageSize`` (at least one).
    func pages(fromBasePages basePages: Int) -> Int {
        max(1, (basePages * systemPageSize + pageSize - 1) / pageSize)
    }

    /// The strategy's chunk, in pages of ``pageSize``.
    var chunkPages: Int { pages(fromBasePages: strategy.chunkPages) }

    /// The adaptive read-ahead's largest window, in pages of ``pageSize`` (0: no read-ahead).
    var adaptiveMaxPages: Int {
        if case .adaptive(let maxPages) = prefetch { return pages(fromBasePages: maxPages) }
        return 0
    }

    /// The largest chunk a handler installs at once, in pages of ``pageSize``.
    var maxChunkPages: Int { max(adaptiveMaxPages, chunkPages) }
}
