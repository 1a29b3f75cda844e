import SystemPackage
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A page-aligned buffer a filler reads into (allocated once per thread).
final class StagingBuffer {
    let base: UnsafeMutableRawPointer
    let capacity: Int

    init(capacity: Int) {
        self.capacity = capacity
        var p: UnsafeMutableRawPointer?
        if posix_memalign(&p, 4096, capacity) != 0 || p == nil { p = .allocate(byteCount: capacity, alignment: 4096) }
        base = p!
    }

    deinit { free(base) }
}

extension Pager {
    /// The filler threads' loop: read fault messages, serve each.
    func fillLoop() {
        if configuration.fillerPriority > 0 { DedicatedThread.makeCurrentThreadRealTime(priority: configuration.fillerPriority) }
        // One message per read: the other fillers take the next faults, so slow reads overlap.
        let events = Userfaultfd.EventBuffer(capacity: 1)
        let staging = StagingBuffer(capacity: max(configuration.maxReadAheadBytes, 2 << 20))
        while true {
            guard let ready = try? handle.wait(stop: stopSignal), ready == .ready else { return }
            guard let n = try? handle.readEvents(into: events), n > 0 else { continue }
            for event in events.events {
                if case .pageFault(let fault) = event { serve(fault, staging) }
            }
        }
    }

    /// Serves one fault: a first write to a clean page, or a missing page.
    func serve(_ fault: Userfaultfd.PageFault, _ staging: StagingBuffer) {
        lock.lock()
        guard let t = table(containing: fault.address) else {
            lock.unlock()
            let page = fault.address & ~UInt64(systemPageSize - 1)
            try? handle.wake(MemoryRange(start: page, length: UInt64(systemPageSize)))
            return
        }
        let page = t.pageIndex(fault.address)
        if fault.flags.contains(.writeProtect) {
            serveWrite(t, page)
            return
        }
        if fault.flags.contains(.minor) {
            serveMinor(t, page, write: fault.flags.contains(.write))
            return
        }
        switch t.state(page) {
        case .absent:
            lock.unlock()
            _ = fill(t, page: page, limit: t.pageCount - page, sequential: true, write: fault.flags.contains(.write), staging)
        case .resident, .poisoned:
            lock.unlock()
            try? t.handle.wake(t.range(page))
        case .filling, .evicting, .cleaning:
            // Whoever holds the page wakes its waiters when done.
            lock.unlock()
        }
    }

    /// A touch of a page that is in the memfd but not mapped: a soft-evicted page
    /// (lock held; released here). It is mapped again, write-protected unless dirty,
    /// and earns a credit: the page was re-used while it waited to be dropped. It is
    /// marked filling meanwhile, so that no evictor or flush takes it while a write
    /// may land.
    private func serveMinor(_ t: PageTable, _ page: Int, write: Bool) {
        guard t.state(page) == .resident else {
            // Filling, evicting or cleaning: whoever holds the page wakes its waiters.
            let state = t.state(page)
            lock.unlock()
            if state == .absent || state == .poisoned { try? t.handle.wake(t.range(page)) }
            return
        }
        if t.isSoft(page) {
            // Back into the main queue; its soft-queue entry is skipped when it comes up.
            setSoft(t, page, false)
            lock.shared.pointee.soft_hits += 1
            if configuration.policy == .clock { t.setCredit(page, t.credit(page) + 1) }
            enqueue(t, page)
        }
        let firstWrite = write && !t.isDirty(page)
        if firstWrite { t.setDirty(page, true) }
        let mode: Userfaultfd.ContinueMode = t.isDirty(page) ? [] : Self.continueWriteProtect
        t.setState(page, .filling)
        t.busyPages += 1
        lock.unlock()
        var outcome: Userfaultfd.Outcome?
        repeat {
            outcome = try? t.handle.continueMapping(t.range(page), mode: mode)
        } while outcome == .retryAfterEvents
        lock.withLock {
            t.setState(page, .resident)
            t.busyPages -= 1
            if firstWrite, case .completed = outcome { stats.writeFaults += 1 }
            if outcome == nil { t.record(PagedMappingError(kind: .kernel(errno: 0), offset: page * t.pageSize)) }
            lock.broadcast()
        }
        if outcome == nil || outcome == .alreadyPresent { try? t.handle.wake(t.range(page)) }
    }

    /// `UFFDIO_CONTINUE_MODE_WP`: map the page write-protected.
    static let continueWriteProtect = Userfaultfd.ContinueMode(rawValue: 1 << 1)

    /// A write to a write-protected page (lock held; released here).
    private func serveWrite(_ t: PageTable, _ page: Int) {
        switch t.state(page) {
        case .resident:
            t.setDirty(page, true)
            if t.isSoft(page) {
                setSoft(t, page, false)
                enqueue(t, page)
            }
            if configuration.policy == .clock { t.setCredit(page, t.credit(page) + 1) }
            stats.writeFaults += 1
            do {
                try t.handle.writeProtect(t.range(page), mode: [])
            } catch {
                t.record(PagedMappingError(kind: .kernel(errno: error.errno?.rawValue ?? 0), offset: page * t.pageSize))
            }
            lock.unlock()
        case .cleaning:
            // The flush unprotects it when its write is done.
            t.setDirty(page, true)
            lock.unlock()
        case .evicting:
            lock.unlock()
        case .absent, .filling, .poisoned:
            lock.unlock()
            try? t.handle.wake(t.range(page))
        }
    }

    /// Fills `page` and, when `sequential`, the read-ahead window after it; the pages
    /// must be absent. Takes and releases the lock.
    ///
    /// - Parameters:
    ///   - limit: the most pages to fill.
    ///   - sequential: apply the mapping's sequential read-ahead (faults); prefetch passes false and its own limit.
    ///   - write: the fault was a write: the first page is installed writable and dirty.
    /// - Returns: the pages filled.
    func fill(_ t: PageTable, page: Int, limit: Int, sequential: Bool, write: Bool, _ staging: StagingBuffer) -> Int {
        lock.lock()
        if t.state(page) != .absent { lock.unlock(); return 0 }
        let count = reserveWindow(t, page: page, limit: limit, sequential: sequential, staging)
        if count == 0 {
            lock.unlock()
            return 0
        }
        // Dirty before the page is installed writable: a flush that starts after the
        // faulting thread's write has landed then waits for this fill and saves it.
        if write { t.setDirty(page, true) }
        if !waitForRoom(bytes: count * t.pageSize) {
            failFill(t, page: page, count: count, kind: .bufferExhausted)
            return 0
        }
        lock.unlock()
        let bytes = count * t.pageSize
        let buffer = UnsafeMutableRawBufferPointer(start: staging.base, count: bytes)
        do {
            if t.inScratch(page), let scratch = t.scratch {
                try scratch.read(into: buffer, at: page * t.pageSize)
            } else {
                try t.store.read(into: buffer, at: page * t.pageSize)
            }
        } catch {
            lock.lock()
            failFill(t, page: page, count: count, kind: .readFailed(errno: error.rawValue))
            return 0
        }
        let installed = install(t, page: page, count: count, write: write, staging.base)
        settleFill(t, page: page, count: count, installed: installed, sequential: sequential)
        if installed < count { try? t.handle.wake(t.range(page, count: count)) }
        return installed
    }

    /// Marks the first `installed` pages of a filled window resident and queues them;
    /// the rest become absent again. Takes and releases the lock.
    private func settleFill(_ t: PageTable, page: Int, count: Int, installed: Int, sequential: Bool) {
        lock.withLock {
            for p in page..<page + count {
                if p < page + installed {
                    t.setState(p, .resident)
                    t.history[p] = t.history[p] == 255 ? 255 : t.history[p] + 1
                    let credit = configuration.policy == .clock ? UInt8(min(Int(t.history[p]) - 1, 3)) : 0
                    t.setCredit(p, credit)
                    enqueue(t, p)
                } else {
                    t.setState(p, .absent)
                    t.setDirty(p, false)
                    residentBytes -= t.pageSize
                    t.residentPages -= 1
                }
            }
            t.busyPages -= count
            stats.faults += sequential ? 1 : 0
            stats.pagesFilled += installed
            stats.pagesReadAhead += sequential ? max(0, installed - 1) : 0
            stats.bytesRead += count * t.pageSize
            lock.broadcast()
        }
    }

    /// Marks the window starting at `page` as filling and counts it resident (lock held).
    /// - Returns: the pages in the window (0 if none fit).
    private func reserveWindow(_ t: PageTable, page: Int, limit: Int, sequential: Bool, _ staging: StagingBuffer) -> Int {
        var window = min(limit, staging.capacity / t.pageSize)
        if sequential {
            if page == t.lastFaultPage + 1 || (page > t.lastFaultPage && page <= t.lastFaultPage + t.readAheadWindow) {
                t.readAheadWindow = min(max(t.readAheadWindow * 2, 2), max(1, configuration.maxReadAheadPages))
            } else {
                t.readAheadWindow = 1
            }
            t.lastFaultPage = page
            window = min(window, t.readAheadWindow, max(1, readAheadLimitBytes / t.pageSize))
        }
        var count = 0
        while count < max(1, window) && page + count < t.pageCount && t.state(page + count) == .absent {
            // Pages kept in the private scratch file are read one by one.
            if count > 0 && t.inScratch(page + count) != t.inScratch(page) { break }
            if count > 0 && t.inScratch(page) { break }
            count += 1
        }
        for p in page..<page + count { t.setState(p, .filling) }
        t.busyPages += count
        t.residentPages += count
        residentBytes += count * t.pageSize
        return count
    }

    /// Waits (lock held) until the resident bytes, which already include `bytes`, fit the buffer.
    /// - Returns: false if the evictors made no room in time.
    private func waitForRoom(bytes: Int) -> Bool {
        if residentBytes > capacityBytes {
            stats.spaceWaits += 1
            let deadline = MonotonicClock.milliseconds() + configuration.spaceWaitMilliseconds
            while residentBytes > capacityBytes {
                if isStopping || MonotonicClock.milliseconds() >= deadline { return false }
                lock.broadcast()
                lock.wait(milliseconds: 5)
            }
        }
        stats.peakResidentBytes = max(stats.peakResidentBytes, residentBytes)
        return true
    }

    /// Gives up the window (lock held; released here): the first page is poisoned so
    /// its faulting thread gets SIGBUS, the others become absent again.
    private func failFill(_ t: PageTable, page: Int, count: Int, kind: PagedMappingError.Kind) {
        t.record(PagedMappingError(kind: kind, offset: page * t.pageSize))
        stats.errors += 1
        t.setState(page, .poisoned)
        t.setDirty(page, false)
        for p in page + 1 ..< page + count { t.setState(p, .absent) }
        t.busyPages -= count
        t.residentPages -= count
        residentBytes -= count * t.pageSize
        lock.broadcast()
        lock.unlock()
        if (try? t.handle.poison(t.range(page))) == nil {
            try? t.handle.wake(t.range(page))
        }
        if count > 1 { try? t.handle.wake(t.range(page + 1, count: count - 1)) }
    }

    /// Copies `count` pages from `source` into the mapping at `page`, write-protected
    /// except the first when `write`. Pages already present are skipped.
    /// - Returns: how many leading pages are now in place.
    private func install(_ t: PageTable, page: Int, count: Int, write: Bool, _ source: UnsafeRawPointer) -> Int {
        var done = 0
        var onePageAtATime = false
        while done < count {
            let writable = write && done == 0
            let n = writable || onePageAtATime ? 1 : count - done
            let outcome: Userfaultfd.Outcome
            do {
                outcome = try t.handle.copy(to: t.address(page + done), from: source + done * t.pageSize,
                                          length: n * t.pageSize, mode: writable ? [] : .writeProtect)
            } catch {
                return done
            }
            switch outcome {
            case .completed:
                done += n
            case .partial(let bytes):
                if bytes <= 0 || bytes % t.pageSize != 0 { return done }
                done += bytes / t.pageSize
            case .alreadyPresent:
                // Somebody else's page is there (it should not be): go page by page and keep theirs.
                if n == 1 { done += 1 } else { onePageAtATime = true }
            case .retryAfterEvents:
                continue
            }
        }
        return done
    }
}

