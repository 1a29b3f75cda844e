import SystemPackage
import Userfaultfd
import _CFaultEngine

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A small object, the size of a FORK message's, for warming the allocator cache.
final class AllocatorWarmUp {
    var words: (UInt64, UInt64, UInt64) = (0, 0, 0)
}

/// What installing a chunk came to.
enum InstallResult {
    /// Done (installed, already there, or given up on with the thread woken or poisoned).
    case done
    /// The address space is changing (`EAGAIN`): read pending events, then try again.
    case retry
    /// The faulting process is gone.
    case gone
}

/// One handler thread's state and loop: everything it needs is allocated here,
/// before the first fault, and reused.
final class HandlerLoop<Source: PageSource> {
    let server: FaultServer<Source>
    let handle: Userfaultfd.Handle
    let source: Source
    /// The source, if it is a ``DeferredPageSource``: faults are handed to it.
    let deferring: (any DeferredPageSource)?
    /// The source's length, if known (read once: the fault path does not ask again).
    let sourceLength: UInt64?
    let table: RegionTable
    let counters: StatisticsCounters
    let onEvent: (@Sendable (FaultServerEvent) -> Void)?
    let recorder: WorkingSetRecorder?
    /// The server's SIGBUS resolver, if it has one (set before this thread started).
    let signalResolver: SignalResolverRegistration?
    let trace: FaultTraceRing?
    /// The handler's number; -1 for the prefetch thread.
    let index: Int
    let ps: UInt64
    let chunkPages: UInt64
    let adaptiveMax: UInt64
    let kind: Kind
    /// Page-aligned private anonymous memory: where pages are filled before COPY or MOVE.
    let staging: UnsafeMutableRawPointer
    let stagingBytes: Int
    /// One zeroed page of the server's page size, for pages larger than the base page:
    /// hugetlb memory has no `UFFDIO_ZEROPAGE`, so zeros are copied from here. Nil for
    /// base pages.
    let zeroPage: UnsafeMutableRawPointer?
    /// `mincore` answers for the MINOR strategy.
    let residency: UnsafeMutablePointer<UInt8>
    let buffer: Userfaultfd.EventBuffer
    let drainBuffer: Userfaultfd.EventBuffer
    /// Faults read while draining events, served after the batch.
    var deferred: [(fault: Userfaultfd.PageFault, readAt: UInt64)] = []
    /// The next message of the current batch to dispatch, and the batch's size: a
    /// drain after EAGAIN applies the rest of the batch first, in kernel order.
    var batchNext = 0
    var batchCount = 0
    let latencies: UnsafeMutablePointer<UInt64>
    let latencyCapacity = 1024
    var latencyCount = 0
    var gone = false
    var moveFromStagingWorks = true
    var moveFromSourceWorks = true
    /// A FORK was read in this batch: refill the allocator cache after it.
    var forkSeen = false
    /// Bytes of the run the last ``install`` got through before it returned.
    var progress = 0
    /// Adaptive read-ahead: where the last chunk ended, and the current window.
    var lastEnd: UInt64 = 0
    var window: UInt64

    enum Kind { case copy, move, minor }

    init(server: FaultServer<Source>, index: Int, onEvent: (@Sendable (FaultServerEvent) -> Void)?) {
        self.server = server
        self.handle = server.handle
        self.source = server.source
        self.deferring = server.source as? any DeferredPageSource
        self.sourceLength = server.source.length
        self.table = server.table
        self.counters = server.counters
        self.onEvent = onEvent
        self.recorder = server.recorder
        self.signalResolver = server.signalResolver
        self.trace = index < 0 ? nil : server.traceSink?.makeRing(for: server, regions: server.regions, pageSize: server.pageSize)
        self.index = index
        self.ps = UInt64(server.pageSize)
        let configuration = server.configuration
        self.chunkPages = UInt64(configuration.chunkPages)
        self.adaptiveMax = UInt64(configuration.adaptiveMaxPages)
        switch configuration.strategy {
        case .copy, .sigbus, .automatic: kind = .copy
        case .move: kind = .move
        case .minor: kind = .minor
        }
        window = chunkPages
        let maxPages = configuration.maxChunkPages
        stagingBytes = maxPages * server.pageSize
        let p = mmap(nil, stagingBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        if let p, p != MAP_FAILED {
            staging = p
        } else {
            // Out of address space: fall back to the heap (still page-aligned).
            staging = UnsafeMutableRawPointer.allocate(byteCount: stagingBytes, alignment: server.pageSize)
        }
        _ = madvise(staging, stagingBytes, MADV_NOHUGEPAGE)
        // Touch the staging pages once so the first faults do not pay for them.
        memset(staging, 0, stagingBytes)
        zeroPage = server.pageSize > systemPageSize ? Self.allocateZeroPage(server.pageSize) : nil
        residency = .allocate(capacity: maxPages)
        buffer = Userfaultfd.EventBuffer(capacity: configuration.batchSize)
        drainBuffer = Userfaultfd.EventBuffer(capacity: configuration.batchSize)
        deferred.reserveCapacity(4 * configuration.batchSize)
        latencies = .allocate(capacity: latencyCapacity)
        warmAllocatorCache()
    }

    /// Allocates and frees a few small objects so this thread's allocator cache holds
    /// chunks of the size a FORK message needs: reading it must not wait for the
    /// allocator lock that a fork() of this process holds.
    func warmAllocatorCache() {
        var keep: [AllocatorWarmUp] = []
        keep.reserveCapacity(6)
        for _ in 0..<6 { keep.append(AllocatorWarmUp()) }
        keep.removeAll(keepingCapacity: true)
    }

    /// `bytes` of zeros, written once so that copying from them never faults.
    private static func allocateZeroPage(_ bytes: Int) -> UnsafeMutableRawPointer {
        let p = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: systemPageSize)
        memset(p, 0, bytes)
        return p
    }

    deinit {
        zeroPage?.deallocate()
        munmap(staging, stagingBytes)
        residency.deallocate()
        latencies.deallocate()
    }

    @inline(__always)
    func report(_ event: FaultServerEvent) {
        onEvent?(event)
    }

    // MARK: - The loop

    /// Serves faults until the stop signal is raised or the process goes away.
    func run() {
        setUpThread()
        loop: while !gone {
            switch waitForMessages() {
            case .stopped: break loop
            case .hangUp:
                gone = true
                break loop
            case .timedOut: continue loop
            case .ready: break
            }
            let n: Int
            do {
                n = try handle.readEvents(into: buffer)
            } catch {
                if isProcessGone(error) {
                    gone = true
                    break loop
                }
                // Keep serving: a thread waiting on a fault must not be left behind.
                record(failure: error, at: 0)
                usleep(1000)
                continue loop
            }
            if n > 0 { serveBatch(n) }
        }
        flushLatencies()
        if gone { reportProcessGone() }
    }

    /// Pins the thread and sets its scheduling policy, as configured.
    func setUpThread() {
        let cpus = server.configuration.handlerCPUs
        if !cpus.isEmpty { _ = cfe_pin_current_thread(Int32(cpus[index % cpus.count])) }
        let priority = server.configuration.handlerPriority
        if priority > 0 {
            if let refused = DedicatedThread.makeCurrentThreadRealTime(priority: Int32(priority)) {
                counters.lastError.withLock {
                    $0 = "handler threads stay time-shared: SCHED_FIFO priority \(priority) was refused (\(refused))"
                }
            }
        }
    }

    /// Waits for messages on the uffd (and serves SIGBUS requests meanwhile). A failed
    /// wait is recorded and reported as `.stopped`.
    func waitForMessages() -> Userfaultfd.Handle.WaitResult {
        do {
            if let requests = signalResolver?.requestPipe {
                let waited = try waitForMessagesOrRequests(requests.read)
                if waited == .timedOut { serveSignalRequests(requests.read) }
                return waited
            }
            return try handle.wait(stop: server.stopSignal)
        } catch {
            record(failure: error, at: 0)
            return .stopped
        }
    }

    /// Dispatches the `n` messages just read, then the faults deferred meanwhile.
    func serveBatch(_ n: Int) {
        server.busyHandlers.wrappingAdd(1, ordering: .relaxed)
        let readAt = cfe_now_ns()
        batchNext = 0
        batchCount = n
        while batchNext < batchCount && !gone {
            let i = batchNext
            batchNext += 1
            dispatch(buffer.events[i], readAt: readAt)
        }
        batchCount = 0
        serveDeferred()
        flushLatencies()
        if forkSeen {
            forkSeen = false
            warmAllocatorCache()
        }
        server.busyHandlers.wrappingSubtract(1, ordering: .relaxed)
    }

    /// Stops the other threads and tells the owner, once per server.
    func reportProcessGone() {
        server.stopSignal.raise()
        if !server.processGone.exchange(true, ordering: .acquiringAndReleasing) {
            report(.processExited)
        }
    }

    /// Polls the uffd, the stop signal and the SIGBUS request pipe. A readable pipe
    /// is reported as `.timedOut` (the caller then serves the requests).
    func waitForMessagesOrRequests(_ requests: Int32) throws(UserfaultfdError) -> Userfaultfd.Handle.WaitResult {
        var fds = (
            pollfd(fd: handle.fileDescriptor.rawValue, events: Int16(POLLIN), revents: 0),
            pollfd(fd: server.stopSignal.fileDescriptor.rawValue, events: Int16(POLLIN), revents: 0),
            pollfd(fd: requests, events: Int16(POLLIN), revents: 0)
        )
        while true {
            _ = try retryOnInterrupt("poll") {
                withUnsafeMutableBytes(of: &fds) { raw in
                    Glibc.poll(raw.baseAddress!.assumingMemoryBound(to: pollfd.self), 3, -1)
                }
            }
            if fds.1.revents != 0 { return .stopped }
            if fds.0.revents & Int16(POLLIN) != 0 { return .ready }
            if fds.2.revents != 0 { return .timedOut }
            if fds.0.revents != 0 { return .hangUp }
        }
    }

    /// Serves the addresses faulting threads wrote to the SIGBUS request pipe, then
    /// wakes them (they wait on the resolver's generation word).
    func serveSignalRequests(_ requests: Int32) {
        guard let resolver = signalResolver else { return }
        var addresses: (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0, 0, 0, 0, 0)
        while true {
            let n = withUnsafeMutableBytes(of: &addresses) { Glibc.read(requests, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            let readAt = cfe_now_ns()
            withUnsafeBytes(of: &addresses) { raw in
                for k in 0..<(n / 8) {
                    let address = raw.load(fromByteOffset: k * 8, as: UInt64.self)
                    serve(Userfaultfd.PageFault(address: address, flags: []), readAt: readAt)
                }
            }
            cfe_generation_bump(resolver.generation)
        }
    }

    @inline(__always)
    func dispatch(_ event: Userfaultfd.Event, readAt: UInt64) {
        switch event {
        case .pageFault(let fault):
            serve(fault, readAt: readAt)
        default:
            handleLayoutEvent(event)
        }
    }

    func handleLayoutEvent(_ event: Userfaultfd.Event) {
        switch event {
        case .pageFault(let fault):
            deferred.append((fault, cfe_now_ns()))
        case .remove(let range):
            StatisticsCounters.add(counters.removes, 1)
            table.remove(range)   // bitmaps only: the SIGBUS resolver shares them
            report(.removed(range))
        case .unmap(let range):
            StatisticsCounters.add(counters.unmaps, 1)
            table.unmap(range)
            signalResolver?.update(table.snapshot)
            report(.unmapped(range))
        case .remap(let from, let to):
            StatisticsCounters.add(counters.remaps, 1)
            table.remap(from: from.start, to: to.start, length: from.length)
            signalResolver?.update(table.snapshot)
            report(.remapped(from: from.start, to: to.start, length: from.length))
        case .fork(let child):
            StatisticsCounters.add(counters.forks, 1)
            report(.fork(child))
            forkSeen = true
        case .unknown(let code):
            report(.unknown(code: code))
        }
    }

    func serveDeferred() {
        var k = 0
        while k < deferred.count && !gone {
            let (fault, readAt) = deferred[k]
            serve(fault, readAt: readAt)
            k += 1
        }
        deferred.removeAll(keepingCapacity: true)
    }

    /// Reads pending messages after `EAGAIN`: layout events are applied at once,
    /// faults are kept for after the batch. Returns false if serving must end.
    func drainEvents() -> Bool {
        StatisticsCounters.add(counters.retries, 1)
        // Messages still waiting in the current batch came first: apply their layout
        // changes (and defer their faults) before the newer ones, or an UNMAP could
        // overtake the REMAP it follows.
        while batchNext < batchCount {
            let i = batchNext
            batchNext += 1
            handleLayoutEvent(buffer.events[i])
        }
        let n: Int
        do {
            n = try handle.readEvents(into: drainBuffer)
        } catch {
            if isProcessGone(error) { gone = true }
            return false
        }
        if n == 0 {
            // Another handler thread holds the event, or the kernel has not queued it yet
            // (a fork copies the whole address space first); let it finish. A real-time
            // handler sleeps briefly instead of yielding: yielding would not let a
            // time-shared thread (the forking one) run on this CPU.
            if server.stopRequested.load(ordering: .relaxed) { return false }
            if server.configuration.handlerPriority > 0 { usleep(20) } else { sched_yield() }
            return true
        }
        for i in 0..<n {
            handleLayoutEvent(drainBuffer.events[i])
        }
        return true
    }

    // MARK: - Latency

    @inline(__always)
    func recordLatency(since readAt: UInt64) {
        guard index >= 0 else { return }
        if latencyCount == latencyCapacity { flushLatencies() }
        latencies[latencyCount] = cfe_now_ns() &- readAt
        latencyCount &+= 1
    }

    func flushLatencies() {
        guard latencyCount > 0, index >= 0 else { return }
        let n = latencyCount
        let values = latencies
        counters.histograms[index].withLock { record in
            for k in 0..<n {
                _ = record.histogram.record(max(values[k], 1))
                record.resolveTime &+= values[k]
            }
        }
        latencyCount = 0
    }
}
