import Userfaultfd

/// How a ``FaultServer`` resolves faults: strategy, prefetch, threads.
///
/// Also reachable as `FaultServer<Source>.Configuration`. The named configurations
/// are the ones `uffd bench` measures.
public struct FaultServerConfiguration: Sendable, Hashable {
    /// How pages are installed.
    public enum Strategy: Sendable, Hashable {
        /// `UFFDIO_COPY` of an aligned chunk of `chunkPages` pages around the fault
        /// (1: the faulting page alone), skipping pages already present.
        case copy(chunkPages: Int)
        /// Fill a staging area (or take the source's own pages) and `UFFDIO_MOVE` them
        /// into place: zero-copy when the source allows moving, which consumes it.
        case move(chunkPages: Int)
        /// Shmem memory registered MINOR (and MISSING): write the page cache through a
        /// second mapping (``ServedRegion/pageCacheAlias``), then `UFFDIO_CONTINUE`.
        case minor(chunkPages: Int)
        /// Faults raise SIGBUS in the faulting thread (the uffd has FEATURE_SIGBUS);
        /// an async-signal-safe C resolver installs `chunkPages` pages there and then,
        /// from memory or file sources. Other sources are served by the handler thread.
        case sigbus(chunkPages: Int)

        /// The chunk size in pages.
        public var chunkPages: Int {
            switch self {
            case .copy(let n), .move(let n), .minor(let n), .sigbus(let n): return n
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
    /// Stream every region's remaining pages in the background while faults are served first.
    public var backgroundPopulate: Bool
    /// Write the order in which pages were first faulted to this file when the server stops.
    public var recordWorkingSet: String?
    /// Messages read per `read` (at least 1).
    public var batchSize: Int
    /// CPUs to pin handler thread `i` to (`handlerCPUs[i % count]`); empty: no pinning.
    public var handlerCPUs: [Int]

    public init(
        strategy: Strategy = .copy(chunkPages: 16),
        prefetch: Prefetch = .none,
        handlerThreads: Int = 1,
        backgroundPopulate: Bool = false,
        recordWorkingSet: String? = nil,
        batchSize: Int = 64,
        handlerCPUs: [Int] = []
    ) {
        self.strategy = strategy
        self.prefetch = prefetch
        self.handlerThreads = handlerThreads
        self.backgroundPopulate = backgroundPopulate
        self.recordWorkingSet = recordWorkingSet
        self.batchSize = batchSize
        self.handlerCPUs = handlerCPUs
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
    /// The engine's best general configuration: adaptive read-ahead over 64 KiB COPY chunks.
    public static var `default`: Self { adaptive }

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
    }

    /// The largest chunk a handler installs at once, in pages.
    var maxChunkPages: Int {
        if case .adaptive(let maxPages) = prefetch { return max(maxPages, strategy.chunkPages) }
        return strategy.chunkPages
    }
}
