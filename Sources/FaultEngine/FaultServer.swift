import Synchronization
import SystemPackage
import Userfaultfd
import _CFaultEngine

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// What a ``FaultServer`` reports through ``FaultServer/onEvent``.
public enum FaultServerEvent: Sendable, CustomStringConvertible {
    /// The process forked: its child's ranges report to this new uffd. Take it
    /// (`Userfaultfd.ForkedUserfaultfd.take()`) and serve it with a new server over a
    /// copy of ``FaultServer/regions``; if nobody takes it, it is closed.
    case fork(Userfaultfd.ForkedUserfaultfd)
    /// The faulting process is gone (`ESRCH`/`ENOSPC`, or the uffd hung up): the
    /// server stopped serving. ``FaultServer/waitUntilStopped()`` returns.
    case processExited
    /// The source failed for the page at `address`; the page was poisoned, so the
    /// thread touching it gets SIGBUS instead of waiting forever.
    case sourceFailed(address: UInt64, error: PageSourceError)
    /// A fault at an address no served region contains (registered on the uffd but
    /// not given to the server): nothing was installed, the page was poisoned so the
    /// thread gets SIGBUS instead of faulting there forever.
    case faultOutsideRegions(address: UInt64)
    /// Installing failed for a reason other than the process going away.
    case resolutionFailed(address: UInt64, error: UserfaultfdError)
    /// Already handled by the server; reported for logs: pages released (next faults get zeros).
    case removed(MemoryRange)
    /// Already handled by the server; reported for logs: the range is no longer served.
    case unmapped(MemoryRange)
    /// Already handled by the server; reported for logs: the range moved, same source bytes.
    case remapped(from: UInt64, to: UInt64, length: UInt64)
    /// A message the server does not know.
    case unknown(code: UInt8)

    public var description: String {
        switch self {
        case .fork(let child): return "fork (child uffd \(child.rawDescriptor))"
        case .processExited: return "process exited"
        case .sourceFailed(let address, let error): return "source failed at 0x\(String(address, radix: 16)): \(error)"
        case .faultOutsideRegions(let address): return "fault outside served regions at 0x\(String(address, radix: 16))"
        case .resolutionFailed(let address, let error): return "resolving 0x\(String(address, radix: 16)) failed: \(error)"
        case .removed(let r): return "remove \(r)"
        case .unmapped(let r): return "unmap \(r)"
        case .remapped(let from, let to, let length):
            return "remap 0x\(String(from, radix: 16)) -> 0x\(String(to, radix: 16)) (\(length) bytes)"
        case .unknown(let code): return "unknown event 0x\(String(code, radix: 16))"
        }
    }
}

/// Serves the page faults of one userfaultfd from a page source.
///
/// Dedicated handler threads poll the uffd and a stop signal, read messages in
/// batches into preallocated buffers and install pages as the configured strategy
/// says. The fault path allocates nothing, takes no lock that faulting code could
/// hold, and calls the source directly (it is a generic parameter, not an existential).
///
/// ```swift
/// let memory = try MemoryMapping.anonymous(length: 64 << 20)
/// let uffd = try Userfaultfd(features: [.eventRemove, .eventUnmap, .eventRemap])
/// try uffd.handle.register(memory.range, mode: .missing)
/// let server = try FaultServer(userfaultfd: uffd,
///                              regions: [ServedRegion(range: memory.range)],
///                              source: try FileSource(path: "snapshot.bin"))
/// try server.start()
/// // ... touch memory: pages come from the file ...
/// server.stop()
/// print(server.statistics.jsonString())
/// ```
public final class FaultServer<Source: PageSource>: @unchecked Sendable {
    /// How the server resolves faults.
    public typealias Configuration = FaultServerConfiguration

    let handle: Userfaultfd.Handle
    /// The uffd, owned until the server retires it.
    private let owner: UserfaultfdOwner
    let source: Source
    /// The configuration the server runs with (an ``FaultServerConfiguration/Strategy/automatic``
    /// strategy resolved to a concrete one).
    public let configuration: Configuration
    /// The configuration the server runs with and why it was chosen.
    public let strategyChoice: StrategyChoice
    let table: RegionTable
    /// The regions, when no event can change them (the uffd reports no UNMAP or REMAP),
    /// for installs from outside the server without taking the table's lock.
    let fixedRegions: [RegionEntry]?
    let counters: StatisticsCounters
    let stopSignal: StopSignal
    let finishedSignal: StopSignal
    /// The size of the pages the server installs, in bytes (``FaultServerConfiguration/pageSize``).
    public let pageSize: Int
    let recorder: WorkingSetRecorder?
    let replayOffsets: [UInt64]
    /// Handler threads busy with a batch (the prefetcher yields to them).
    let busyHandlers = Atomic<Int>(0)
    let runningThreads = Atomic<Int>(0)
    /// Threads that finished setting up (start() returns once all have).
    let readyThreads = Atomic<Int>(0)
    let stopRequested = Atomic<Bool>(false)
    /// Set by the first thread that finds the process gone (it reports it, once).
    let processGone = Atomic<Bool>(false)
    /// Set once by ``start()`` (before any thread of the server runs), read from any thread.
    private let resolverSlot = Mutex<SignalResolverRegistration?>(nil)
    var signalResolver: SignalResolverRegistration? { resolverSlot.withLock { $0 } }

    private struct State {
        var started = false
        var stopped = false
        var threads: [DedicatedThread] = []
        var threadIDs: [pthread_t] = []
    }
    private let state = Mutex(State())
    private let eventCallback = Mutex<(@Sendable (FaultServerEvent) -> Void)?>(nil)

    /// Creates a server; it serves nothing until ``start()``.
    ///
    /// - Parameters:
    ///   - userfaultfd: the uffd, handshaken, with `regions` registered on it. The server
    ///     owns it from now on and closes it when it stops.
    ///   - regions: the ranges to serve: aligned to the configuration's page size,
    ///     non-empty, not overlapping, each within the source's length, with a source
    ///     offset aligned to the page size.
    ///   - source: where page contents come from.
    ///   - requested: strategy, prefetch and threads (an automatic strategy is resolved here).
    /// - Throws: `UserfaultfdError` (`.invalidArgument`) naming
    ///   the region or setting that is wrong, the feature the strategy needs, or the
    ///   strategy that huge pages do not support.
    public init(
        userfaultfd: consuming Userfaultfd,
        regions: [ServedRegion],
        source: Source,
        configuration requested: Configuration = .default
    ) throws(UserfaultfdError) {
        try requested.validate()
        let handle = userfaultfd.handle
        let choice = requested.resolved(
            features: handle.features, regions: regions,
            sourceIsMovable: source.movablePages(at: regions.first?.sourceOffset ?? 0, length: requested.pageSize) != nil,
            sourceIsSignalSafe: source.signalSafeBacking != nil)
        let configuration = choice.configuration
        try configuration.validate()
        let page = configuration.pageSize
        try Self.validate(regions, source: source, configuration: configuration, pageSize: page)
        try Self.checkFeatures(handle.features, for: configuration)
        try Self.checkDeferral(source, configuration)
        var replay: [UInt64] = []
        if case .replay(let path) = configuration.prefetch {
            replay = try WorkingSetFile.read(path)
        }
        let table = try RegionTable(regions, pageSize: page)
        let stopSignal = try StopSignal()
        let finishedSignal = try StopSignal()
        let recorder = try configuration.recordWorkingSet.map { _ throws(UserfaultfdError) in
            try WorkingSetRecorder(capacity: table.totalPages)
        }
        // Nothing can fail from here on: take ownership of the descriptor.
        self.handle = handle
        self.owner = UserfaultfdOwner(userfaultfd)
        self.source = source
        self.configuration = configuration
        self.strategyChoice = choice
        self.pageSize = page
        self.table = table
        self.fixedRegions = handle.features.isDisjoint(with: [.eventUnmap, .eventRemap]) ? table.snapshot : nil
        self.counters = StatisticsCounters(handlers: configuration.handlerThreads)
        self.stopSignal = stopSignal
        self.finishedSignal = finishedSignal
        self.recorder = recorder
        self.replayOffsets = replay
    }

    private static func checkFeatures(_ features: Userfaultfd.Features, for configuration: Configuration) throws(UserfaultfdError) {
        switch configuration.strategy {
        case .sigbus:
            if !features.contains(.sigbus) {
                throw UserfaultfdError(operation: "FaultServer", kind: .invalidArgument(
                    "the sigbus strategy needs a uffd handshaken with FEATURE_SIGBUS (it has \(features))"))
            }
        case .minor:
            let needed: Userfaultfd.Features = configuration.pageSize == systemPageSize ? .minorShmem : .minorHugetlbfs
            if !features.contains(needed) {
                throw UserfaultfdError(operation: "FaultServer", kind: .invalidArgument(
                    "the minor strategy needs a uffd handshaken with \(needed) (it has \(features))"))
            }
        case .copy, .move, .automatic:
            break
        }
    }

    private static func validate(_ regions: [ServedRegion], source: Source, configuration: Configuration, pageSize: Int) throws(UserfaultfdError) {
        func bad(_ why: String) -> UserfaultfdError {
            UserfaultfdError(operation: "FaultServer regions", kind: .invalidArgument(why))
        }
        if regions.isEmpty { throw bad("no region to serve") }
        let ps = UInt64(pageSize)
        for r in regions {
            if r.range.length == 0 || !r.range.isAligned(to: ps) { throw bad("region \(r.range) is empty or not page-aligned (\(pageSize)-byte pages)") }
            if r.range.end < r.range.start { throw bad("region \(r.range) wraps around the address space") }
            if r.sourceOffset % ps != 0 { throw bad("source offset \(r.sourceOffset) of region \(r.range) is not page-aligned (\(pageSize)-byte pages)") }
            // A source whose length ends inside a page serves that page's tail as zeros.
            if let length = source.length.map({ ($0 &+ ps &- 1) / ps &* ps }),
                r.sourceOffset > length || r.range.length > length - r.sourceOffset
            {
                throw bad("region \(r.range) at source offset \(r.sourceOffset) reaches beyond the source's \(source.length ?? 0) bytes")
            }
            if case .minor = configuration.strategy {
                guard let alias = r.pageCacheAlias, alias % ps == 0 else {
                    throw bad("the minor strategy needs a page-aligned pageCacheAlias for region \(r.range)")
                }
            }
        }
        let sorted = regions.sorted { $0.range.start < $1.range.start }
        for (a, b) in zip(sorted, sorted.dropFirst()) where a.range.overlaps(b.range) {
            throw bad("regions \(a.range) and \(b.range) overlap")
        }
    }

    deinit {
        stop()
        // Released on one of its own threads, stop() only raised the signal: close here.
        closeDescriptor()
        signalResolver?.unregister()
    }

    /// Releases the uffd but keeps its number taken by `/dev/null` (atomically, with
    /// `dup2`). Returns the owner of the number (now the placeholder), which closes it
    /// when the caller drops it; nil if none was open or no placeholder could be made
    /// (then the uffd is closed outright and the resolver sees EBADF).
    private func retireDescriptor() -> Userfaultfd? {
        guard let retired = owner.take() else { return nil }
        let null = Glibc.open("/dev/null", O_RDONLY | O_CLOEXEC)
        defer { if null >= 0 { _ = Glibc.close(null) } }
        if null < 0 || dup2(null, retired.fileDescriptor.rawValue) < 0 { return nil }
        return retired
    }

    private func closeDescriptor() {
        _ = owner.take()
    }

    /// The regions served now (after UNMAP and REMAP events).
    public var regions: [ServedRegion] { table.ranges }

    /// Called on a handler thread for events: FORK (adopt the child's uffd), process
    /// exit, source failures, and notices of the layout changes the server handled.
    /// Set it before ``start()``; it must return quickly and never touch served memory.
    ///
    /// When the process that forks is this one, its `fork()` waits inside the C
    /// library, holding the allocator's locks, until the FORK event is read: the
    /// callback must then not allocate (keep the child's uffd, adopt it afterwards).
    public var onEvent: (@Sendable (FaultServerEvent) -> Void)? {
        get { eventCallback.withLock { $0 } }
        set { eventCallback.withLock { $0 = newValue } }
    }

    /// Where handler threads hand each fault they resolve (see ``FaultTraceSink``); set it before ``start()``.
    public var traceSink: FaultTraceSink? {
        get { traceSinkStore.withLock { $0 } }
        set { traceSinkStore.withLock { $0 = newValue } }
    }
    private let traceSinkStore = Mutex<FaultTraceSink?>(nil)

    /// A snapshot of the statistics.
    public var statistics: FaultStatistics {
        var s = counters.snapshot(inThread: signalResolver?.resolvedFaults ?? 0)
        s.poisonedPages += signalResolver?.poisonedPages ?? 0
        s.strategy = "\(configuration.strategy)"
        s.strategyReason = strategyChoice.reason
        return s
    }

    /// Starts the handler threads (and the prefetch thread, if any).
    ///
    /// - Throws: `UserfaultfdError` if the server was already started or stopped, the
    ///   SIGBUS resolver cannot be installed, or a thread cannot be created (the server is
    ///   then stopped, its uffd closed).
    public func start() throws(UserfaultfdError) {
        let callback = onEvent
        try state.withLock { (s: inout State) throws(UserfaultfdError) in
            if s.started || s.stopped {
                throw UserfaultfdError(operation: "FaultServer.start", kind: .invalidArgument(
                    s.stopped ? "the server was stopped; create a new one" : "the server is already running"))
            }
            s.started = true
        }
        if case .sigbus(let chunk) = configuration.strategy {
            do {
                let resolver = try SignalResolverRegistration(
                    handle: handle, regions: table.snapshot, backing: source.signalSafeBacking, chunkPages: chunk,
                    maxChunkPages: configuration.adaptiveMaxPages, pageSize: pageSize, recorder: recorder)
                resolverSlot.withLock { $0 = resolver }
            } catch {
                state.withLock { $0.started = false }
                throw error
            }
        }
        let threadCount = configuration.handlerThreads
        let needsPrefetcher = configuration.backgroundPopulate || !replayOffsets.isEmpty
        runningThreads.store(threadCount + (needsPrefetcher ? 1 : 0), ordering: .sequentiallyConsistent)
        var threads: [DedicatedThread] = []
        do {
            for i in 0..<threadCount {
                threads.append(try DedicatedThread.start(name: "uffd-handler-\(i)") { [self] in
                    self.registerCurrentThread()
                    let loop = HandlerLoop(server: self, index: i, onEvent: callback)
                    self.readyThreads.wrappingAdd(1, ordering: .releasing)
                    loop.run()
                    self.threadFinished()
                })
            }
            if needsPrefetcher {
                threads.append(try DedicatedThread.start(name: "uffd-prefetch") { [self] in
                    self.registerCurrentThread()
                    let loop = HandlerLoop(server: self, index: -1, onEvent: callback)
                    self.readyThreads.wrappingAdd(1, ordering: .releasing)
                    loop.prefetch(replay: self.replayOffsets, populate: self.configuration.backgroundPopulate)
                    self.threadFinished()
                })
            }
        } catch {
            // No thread could be had (a pids limit, RLIMIT_NPROC): the threads already
            // running are stopped and joined and the uffd is closed, so that its faults
            // fall back to the kernel instead of waiting for a handler that never comes.
            state.withLock { $0.threads = threads }
            stop()
            throw error
        }
        state.withLock { $0.threads = threads }
        // Return only once every thread has allocated what it needs: a fork() of this
        // process holds the allocator's locks until its FORK event has been read.
        while readyThreads.load(ordering: .acquiring) < threads.count { usleep(50) }
    }

    private func registerCurrentThread() {
        let me = pthread_self()
        state.withLock { $0.threadIDs.append(me) }
    }

    private func threadFinished() {
        if runningThreads.wrappingSubtract(1, ordering: .sequentiallyConsistent).newValue == 0 {
            finishedSignal.raise()
        }
    }

    /// Stops serving: raises the stop signal, joins every thread, writes the recorded
    /// working set, and closes the uffd (threads still waiting on a fault are woken by
    /// the kernel and see ordinary memory from then on).
    ///
    /// Idempotent and never hangs on a fault. Called from a handler thread (for example
    /// in ``onEvent``), it only asks the threads to stop; they are joined later.
    public func stop() {
        stopRequested.store(true, ordering: .sequentiallyConsistent)
        stopSignal.raise()
        let me = pthread_self()
        let onServerThread = state.withLock { s in s.threadIDs.contains { pthread_equal($0, me) != 0 } }
        if onServerThread { return }
        let threads: [DedicatedThread]? = state.withLock { s in
            if s.stopped { return nil }
            s.stopped = true
            let t = s.threads
            s.threads = []
            return t
        }
        guard let threads else { return }
        for t in threads { t.join() }
        if let recorder, let path = configuration.recordWorkingSet {
            let offsets = recorder.offsets
            do {
                try WorkingSetFile.write(offsets, to: path)
            } catch {
                counters.lastError.withLock { $0 = "writing working set \(path): \(error)" }
            }
        }
        // Close the uffd before leaving the SIGBUS resolver: from then on the kernel
        // serves the ranges itself, so no SIGBUS can arrive that nobody resolves.
        // A resolver still running on a faulting thread holds the descriptor's number:
        // while it may, the number stays taken (by /dev/null, ioctls there fail with
        // ENOTTY) so that no file opened meanwhile receives its ioctls. An ioctl in
        // flight keeps the uffd open past the dup2, and its ranges keep raising SIGBUS:
        // the resolver stays until every thread inside it is out (then the last
        // reference is gone, the kernel has unregistered the ranges) and only then
        // leaves.
        if let signalResolver {
            let placeholder = retireDescriptor()
            signalResolver.drain()
            signalResolver.unregister()
            _ = consume placeholder
        } else {
            closeDescriptor()
        }
        finishedSignal.raise()
    }

    /// Waits until the server stopped on its own (the process went away) or was
    /// stopped, then finishes stopping it (joins its threads).
    public func waitUntilStopped() {
        let started = state.withLock { $0.started }
        if started {
            var p = pollfd(fd: finishedSignal.fileDescriptor.rawValue, events: Int16(POLLIN), revents: 0)
            _ = retryOnInterrupt { Glibc.poll(&p, 1, -1) }
        }
        stop()
    }

    /// Whether the server is serving (started, not yet stopped or gone).
    public var isRunning: Bool {
        state.withLock { $0.started && !$0.stopped } && !finishedSignal.isRaised
    }
}

/// Holds a server's uffd until the server gives it up (once, from any thread).
final class UserfaultfdOwner: @unchecked Sendable {
    private let lock = Mutex(())
    /// Accessed only under `lock`.
    private var owned: Userfaultfd?

    init(_ userfaultfd: consuming Userfaultfd) {
        owned = consume userfaultfd
    }

    /// The uffd, now the caller's; nil if it was taken already.
    func take() -> Userfaultfd? {
        lock.withLock { _ in owned.take() }
    }
}
