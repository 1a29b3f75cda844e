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
    let table: RegionTable
    let counters: StatisticsCounters
    let onEvent: (@Sendable (FaultServerEvent) -> Void)?
    let recorder: WorkingSetRecorder?
    /// The handler's number; -1 for the prefetch thread.
    let index: Int
    let ps: UInt64
    let chunkPages: UInt64
    let adaptiveMax: UInt64
    let kind: Kind
    /// Page-aligned private anonymous memory: where pages are filled before COPY or MOVE.
    let staging: UnsafeMutableRawPointer
    let stagingBytes: Int
    /// `mincore` answers for the MINOR strategy.
    let residency: UnsafeMutablePointer<UInt8>
    let buffer: Userfaultfd.EventBuffer
    let drainBuffer: Userfaultfd.EventBuffer
    /// Faults read while draining events, served after the batch.
    var deferred: [(fault: Userfaultfd.PageFault, readAt: UInt64)] = []
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
        self.table = server.table
        self.counters = server.counters
        self.onEvent = onEvent
        self.recorder = server.recorder
        self.index = index
        self.ps = UInt64(server.pageSize)
        let configuration = server.configuration
        self.chunkPages = UInt64(configuration.strategy.chunkPages)
        if case .adaptive(let maxPages) = configuration.prefetch {
            adaptiveMax = UInt64(maxPages)
        } else {
            adaptiveMax = 0
        }
        switch configuration.strategy {
        case .copy, .sigbus: kind = .copy
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

    deinit {
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
        let cpus = server.configuration.handlerCPUs
        if !cpus.isEmpty { _ = cfe_pin_current_thread(Int32(cpus[index % cpus.count])) }
        loop: while !gone {
            let waited: Userfaultfd.Handle.WaitResult
            do {
                if let requests = server.signalResolver?.requestPipe {
                    waited = try waitForMessagesOrRequests(requests.read)
                    if waited == .timedOut {
                        serveSignalRequests(requests.read)
                        continue loop
                    }
                } else {
                    waited = try handle.wait(stop: server.stopSignal)
                }
            } catch {
                record(failure: error, at: 0)
                break loop
            }
            switch waited {
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
            if n == 0 { continue }
            server.busyHandlers.wrappingAdd(1, ordering: .relaxed)
            let readAt = cfe_now_ns()
            for i in 0..<n {
                dispatch(buffer.events[i], readAt: readAt)
                if gone { break }
            }
            serveDeferred()
            flushLatencies()
            if forkSeen {
                forkSeen = false
                warmAllocatorCache()
            }
            server.busyHandlers.wrappingSubtract(1, ordering: .relaxed)
        }
        flushLatencies()
        if gone { reportProcessGone() }
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
            let n = withUnsafeMutableBytes(of: &fds) { raw in
                Glibc.poll(raw.baseAddress!.assumingMemoryBound(to: pollfd.self), 3, -1)
            }
            if n < 0 {
                if errno == EINTR { continue }
                throw UserfaultfdError(operation: "poll", errno: Errno(rawValue: errno))
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
        guard let resolver = server.signalResolver else { return }
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
            table.remove(range)
            server.signalResolver?.update(table.snapshot)
            report(.removed(range))
        case .unmap(let range):
            StatisticsCounters.add(counters.unmaps, 1)
            table.unmap(range)
            server.signalResolver?.update(table.snapshot)
            report(.unmapped(range))
        case .remap(let from, let to, let length):
            StatisticsCounters.add(counters.remaps, 1)
            table.remap(from: from, to: to, length: length)
            server.signalResolver?.update(table.snapshot)
            report(.remapped(from: from, to: to, length: length))
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
        let n: Int
        do {
            n = try handle.readEvents(into: drainBuffer)
        } catch {
            if isProcessGone(error) { gone = true }
            return false
        }
        if n == 0 {
            // Another handler thread holds the event; let it finish.
            if server.stopRequested.load(ordering: .relaxed) { return false }
            sched_yield()
            return true
        }
        for i in 0..<n {
            handleLayoutEvent(drainBuffer.events[i])
        }
        return true
    }

    // MARK: - One fault

    @inline(__always)
    func serve(_ fault: Userfaultfd.PageFault, readAt: UInt64) {
        let address = fault.address & ~(ps &- 1)
        if fault.flags.contains(.writeProtect) {
            StatisticsCounters.add(counters.writeProtect, 1)
            resolveWriteProtect(address)
            recordLatency(since: readAt)
            return
        }
        let minorFault = fault.flags.contains(.minor)
        if minorFault {
            StatisticsCounters.add(counters.minor, 1)
        } else {
            StatisticsCounters.add(counters.missing, 1)
        }
        var first = true
        while !gone {
            guard let entry = table.lookup(address) else {
                StatisticsCounters.add(counters.outside, 1)
                report(.faultOutsideRegions(address: address))
                try? handle.wake(MemoryRange(start: address, length: ps))
                return
            }
            let page = (address &- entry.range.start) / ps
            let pages = entry.range.length / ps
            if first {
                first = false
                if let recorder, !entry.isResident(page) { recorder.record(entry.sourceOffset &+ page &* ps) }
            }
            var start: UInt64
            var end: UInt64
            if adaptiveMax > 0 {
                if address == lastEnd {
                    // Sequential: read further ahead, forward from the fault.
                    window = min(window &* 2, adaptiveMax)
                    start = page
                    end = min(page &+ window, pages)
                } else {
                    // Elsewhere: back to the aligned chunk around the fault.
                    window = chunkPages
                    start = page / chunkPages &* chunkPages
                    end = min(start &+ chunkPages, pages)
                }
                lastEnd = entry.range.start &+ end &* ps
            } else {
                start = page / chunkPages &* chunkPages
                end = min(start &+ chunkPages, pages)
            }
            switch installChunk(entry, from: start, to: end, faultPage: page, minorFault: minorFault) {
            case .done:
                recordLatency(since: readAt)
                return
            case .retry:
                if !drainEvents() { return }
            case .gone:
                gone = true
                return
            }
        }
    }

    func resolveWriteProtect(_ address: UInt64) {
        while true {
            do {
                if try handle.writeProtect(MemoryRange(start: address, length: ps), protect: false) == .retryAfterEvents {
                    if drainEvents() { continue }
                }
            } catch {
                if isProcessGone(error) { gone = true } else { record(failure: error, at: address) }
            }
            return
        }
    }

    /// Installs the pages of `from ..< to` (page indices in `entry`) that are not
    /// resident, and always the faulting page. `faultPage` is `.max` for prefetching.
    @inline(__always)
    func installChunk(_ entry: RegionEntry, from start: UInt64, to end: UInt64, faultPage: UInt64, minorFault: Bool) -> InstallResult {
        var i = start
        while i < end {
            if i != faultPage && entry.isResident(i) {
                i &+= 1
                continue
            }
            var j = i &+ 1
            while j < end && (j == faultPage || !entry.isResident(j)) { j &+= 1 }
            let result = installRun(entry, from: i, to: j, faultPage: faultPage, minorFault: minorFault)
            if case .done = result {} else { return result }
            i = j
        }
        return .done
    }

    // MARK: - Installing a run of missing pages

    @inline(__always)
    func installRun(_ entry: RegionEntry, from i: UInt64, to j: UInt64, faultPage: UInt64, minorFault: Bool) -> InstallResult {
        let count = j &- i
        let bytes = Int(count &* ps)
        let destination = entry.range.start &+ i &* ps
        let sourceOffset = entry.sourceOffset &+ i &* ps
        var zeroed: UInt64 = 0
        for p in i..<j where entry.isZeroed(p) { zeroed &+= 1 }
        if kind == .minor {
            return installMinor(entry, from: i, to: j, faultPage: faultPage, minorFault: minorFault, zeroed: zeroed)
        }
        if zeroed == count {
            return install(entry, from: i, to: j, faultPage: faultPage, zero: true) { (off: Int) throws(UserfaultfdError) in
                try handle.zeropage(MemoryRange(start: destination &+ UInt64(off), length: UInt64(bytes - off)))
            }
        }
        if kind == .move && zeroed == 0 && moveFromSourceWorks,
            let pages = source.movablePages(at: sourceOffset, length: bytes)
        {
            return moveFromSource(entry, from: i, to: j, faultPage: faultPage, pages: pages)
        }
        if kind == .copy && zeroed == 0, let bytesInPlace = source.contiguousBytes(at: sourceOffset, length: bytes) {
            // The bytes are in memory already: COPY reads them in place.
            return install(entry, from: i, to: j, faultPage: faultPage, zero: false) { (off: Int) throws(UserfaultfdError) in
                try handle.copy(to: destination &+ UInt64(off), from: bytesInPlace + off, length: bytes - off)
            }
        }
        do {
            try fill(staging, entry: entry, from: i, to: j, zeroed: zeroed)
        } catch {
            return sourceFailed(entry, from: i, to: j, faultPage: faultPage, minorFault: minorFault, error: error)
        }
        let stagingAddress = UInt64(UInt(bitPattern: staging))
        progress = 0
        if kind == .move && moveFromStagingWorks {
            let result = install(entry, from: i, to: j, faultPage: faultPage, zero: false, fallible: true) { (off: Int) throws(UserfaultfdError) in
                try handle.move(to: destination &+ UInt64(off), from: stagingAddress &+ UInt64(off), length: bytes - off)
            }
            if let result { return result }
            // MOVE is refused here (not private anonymous memory): copy from now on,
            // starting where MOVE stopped (the staging area still holds those pages).
            moveFromStagingWorks = false
        }
        let staged = staging
        let start = kind == .move ? progress : 0
        if start >= bytes { return .done }
        let first = i &+ UInt64(start) / ps
        return install(entry, from: first, to: j, faultPage: faultPage, zero: false) { (off: Int) throws(UserfaultfdError) in
            try handle.copy(to: destination &+ UInt64(start + off), from: staged + start + off, length: bytes - start - off)
        }
    }

    /// Fills `buffer` with the bytes of pages `i ..< j`: zeros where a REMOVE released
    /// them, the source's bytes elsewhere.
    @inline(__always)
    func fill(_ buffer: UnsafeMutableRawPointer, entry: RegionEntry, from i: UInt64, to j: UInt64, zeroed: UInt64) throws(PageSourceError) {
        if zeroed == 0 {
            try source.fill(UnsafeMutableRawBufferPointer(start: buffer, count: Int((j &- i) &* ps)), at: entry.sourceOffset &+ i &* ps)
            return
        }
        var p = i
        while p < j {
            let z = entry.isZeroed(p)
            var q = p &+ 1
            while q < j && entry.isZeroed(q) == z { q &+= 1 }
            let region = UnsafeMutableRawBufferPointer(start: buffer + Int((p &- i) &* ps), count: Int((q &- p) &* ps))
            if z {
                memset(region.baseAddress!, 0, region.count)
            } else {
                try source.fill(region, at: entry.sourceOffset &+ p &* ps)
            }
            p = q
        }
    }

    /// Runs a resolving ioctl over the run until every page is installed or found
    /// present, marking pages resident and counting them.
    ///
    /// With `fallible`, a failure other than the process going away returns nil
    /// (the caller falls back to another ioctl from ``progress`` on) instead of
    /// giving up on the run.
    @inline(__always)
    func install(
        _ entry: RegionEntry, from i: UInt64, to j: UInt64, faultPage: UInt64, zero: Bool, fallible: Bool = false,
        _ operation: (Int) throws(UserfaultfdError) -> Userfaultfd.Outcome
    ) -> InstallResult? {
        let bytes = Int((j &- i) &* ps)
        var off = 0
        var installed: UInt64 = 0
        var faultInstalled = false
        defer {
            progress = off
            account(installed: installed, faultInstalled: faultInstalled, zero: zero)
        }
        while off < bytes {
            let outcome: Userfaultfd.Outcome
            do {
                outcome = try operation(off)
            } catch {
                if isProcessGone(error) { return .gone }
                if fallible { return nil }
                record(failure: error, at: entry.range.start &+ i &* ps &+ UInt64(off))
                if faultPage >= i && faultPage < j {
                    try? handle.wake(MemoryRange(start: entry.range.start &+ faultPage &* ps, length: ps))
                }
                return .done
            }
            switch outcome {
            case .completed(let n), .partial(let n):
                let first = i &+ UInt64(off) / ps
                let pages = UInt64(n) / ps
                entry.markResident(first, count: pages)
                installed &+= pages
                if faultPage >= first && faultPage < first &+ pages { faultInstalled = true }
                off += n
            case .alreadyPresent:
                let page = i &+ UInt64(off) / ps
                entry.markResident(page, count: 1)
                StatisticsCounters.add(counters.alreadyPresent, 1)
                if page == faultPage {
                    try? handle.wake(MemoryRange(start: entry.range.start &+ page &* ps, length: ps))
                }
                off += Int(ps)
            case .retryAfterEvents:
                return .retry
            }
        }
        return .done
    }

    @inline(__always)
    func install(
        _ entry: RegionEntry, from i: UInt64, to j: UInt64, faultPage: UInt64, zero: Bool,
        _ operation: (Int) throws(UserfaultfdError) -> Userfaultfd.Outcome
    ) -> InstallResult {
        install(entry, from: i, to: j, faultPage: faultPage, zero: zero, fallible: false, operation)!
    }

    @inline(__always)
    func account(installed: UInt64, faultInstalled: Bool, zero: Bool) {
        guard installed > 0 else { return }
        StatisticsCounters.add(counters.installed, installed)
        StatisticsCounters.add(counters.prefetched, installed &- (faultInstalled ? 1 : 0))
        if zero { StatisticsCounters.add(counters.zero, installed) }
    }

    // MARK: - Failures

    /// The source failed for pages `i ..< j`: retry the faulting page alone, and if
    /// that fails too, poison it so its thread gets SIGBUS instead of waiting forever.
    func sourceFailed(_ entry: RegionEntry, from i: UInt64, to j: UInt64, faultPage: UInt64, minorFault: Bool, error: PageSourceError) -> InstallResult {
        let containsFault = faultPage >= i && faultPage < j
        StatisticsCounters.add(counters.sourceErrors, 1)
        counters.lastError.withLock { $0 = error.description }
        if containsFault && j &- i > 1 {
            return installRun(entry, from: faultPage, to: faultPage &+ 1, faultPage: faultPage, minorFault: minorFault)
        }
        guard containsFault else { return .done }
        let address = entry.range.start &+ faultPage &* ps
        report(.sourceFailed(address: address, error: error))
        do {
            switch try handle.poison(MemoryRange(start: address, length: ps)) {
            case .completed, .partial:
                StatisticsCounters.add(counters.poisoned, 1)
                entry.markPoisoned(faultPage)
                entry.markResident(faultPage, count: 1)
            case .alreadyPresent:
                try? handle.wake(MemoryRange(start: address, length: ps))
            case .retryAfterEvents:
                return .retry
            }
        } catch {
            if isProcessGone(error) { return .gone }
            record(failure: error, at: address)
            try? handle.wake(MemoryRange(start: address, length: ps))
        }
        return .done
    }

    @inline(__always)
    func isProcessGone(_ error: UserfaultfdError) -> Bool {
        error.errno == .noSuchProcess || error.errno == .noSpace
    }

    func record(failure error: UserfaultfdError, at address: UInt64) {
        counters.lastError.withLock { $0 = error.description }
        report(.resolutionFailed(address: address, error: error))
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
                record.blockTime &+= values[k]
            }
        }
        latencyCount = 0
    }
}
