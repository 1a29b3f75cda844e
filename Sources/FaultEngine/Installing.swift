import Userfaultfd
import _CFaultEngine

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Serving one fault: the chunk around it, the runs of missing pages in the chunk,
/// the ioctl loop, and what happens when the source fails.
extension HandlerLoop {
    /// The region that holds `address`. While another handler may be applying a REMAP
    /// the lookup is tried again shortly (up to three times per fault, counted in
    /// `lookups`); nil then means the fault is not ours to fill: it is poisoned, so the
    /// thread gets SIGBUS instead of faulting here forever, and reported. Nothing is
    /// installed outside the regions.
    @inline(__always)
    func region(holding address: UInt64, lookups: inout Int) -> RegionEntry? {
        while true {
            if let entry = table.lookup(address) { return entry }
            if lookups >= 3 { break }
            lookups += 1
            sched_yield()
        }
        StatisticsCounters.add(counters.outside, 1)
        report(.faultOutsideRegions(address: address))
        let page = MemoryRange(start: address, length: ps)
        if (try? handle.poison(page)) == nil { try? handle.wake(page) }
        return nil
    }

    // MARK: - One fault

    @inline(__always)
    func serve(_ fault: Userfaultfd.PageFault, readAt: UInt64) {
        if let deferring { return handOver(fault, to: deferring, readAt: readAt) }
        let address = fault.address & ~(ps &- 1)
        if fault.flags.contains(.writeProtect) {
            StatisticsCounters.add(counters.writeProtect, 1)
            resolveWriteProtect(address)
            recordLatency(since: readAt)
            trace?.record(address: address, kind: .writeProtect, readAt: readAt)
            return
        }
        let minorFault = fault.flags.contains(.minor)
        if minorFault {
            StatisticsCounters.add(counters.minor, 1)
        } else {
            StatisticsCounters.add(counters.missing, 1)
        }
        var first = true
        var lookups = 0
        while !gone {
            guard let entry = region(holding: address, lookups: &lookups) else { return }
            let page = (address &- entry.range.start) / ps
            let pages = entry.range.length / ps
            if first {
                first = false
                if let recorder, !entry.isResident(page) { recorder.record(entry.sourceOffset &+ page &* ps) }
            }
            let (start, end) = chunk(around: page, of: pages, at: address, in: entry)
            switch installChunk(entry, from: start, to: end, faultPage: page, minorFault: minorFault) {
            case .done:
                recordLatency(since: readAt)
                trace?.record(address: address, kind: minorFault ? .minor : .missing, readAt: readAt)
                return
            case .retry:
                if !drainEvents() { return }
            case .gone:
                gone = true
                return
            }
        }
    }

    /// The pages to install for a fault on `page` (of `pages`) at `address`: the
    /// aligned chunk around it, or with adaptive read-ahead a window growing forward
    /// from it while faults are sequential.
    @inline(__always)
    func chunk(around page: UInt64, of pages: UInt64, at address: UInt64, in entry: RegionEntry) -> (UInt64, UInt64) {
        guard adaptiveMax > 0 else {
            let start = page / chunkPages &* chunkPages
            return (start, min(start &+ chunkPages, pages))
        }
        let start: UInt64
        let end: UInt64
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
        return (start, end)
    }

    func resolveWriteProtect(_ address: UInt64) {
        while true {
            do {
                if try handle.writeProtect(MemoryRange(start: address, length: ps), mode: []) == .retryAfterEvents {
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
        if zeroed == count, let zeros = zeroPage {
            // Huge pages: no ZEROPAGE on hugetlb, so copy zeros, one page per call.
            let page = Int(ps)
            return install(entry, from: i, to: j, faultPage: faultPage, zero: true) { (off: Int) throws(UserfaultfdError) in
                try handle.copy(to: destination &+ UInt64(off), from: zeros, length: page)
            }
        }
        if zeroed == count {
            return install(entry, from: i, to: j, faultPage: faultPage, zero: true) { (off: Int) throws(UserfaultfdError) in
                try handle.zeropage(MemoryRange(start: destination &+ UInt64(off), length: UInt64(bytes - off)))
            }
        }
        if kind == .move && zeroed == 0 && moveFromSourceWorks, let staged = source as? any CopiesInPlaceWhenNotMovable {
            // Move the staged part, copy the rest: split the run where staging starts or ends.
            let uniform = staged.uniformBytes(at: sourceOffset, length: bytes)
            if uniform < bytes {
                let k = i &+ UInt64(uniform) / ps
                let head = installRun(entry, from: i, to: k, faultPage: faultPage, minorFault: minorFault)
                guard case .done = head else { return head }
                return installRun(entry, from: k, to: j, faultPage: faultPage, minorFault: minorFault)
            }
        }
        if kind == .move && zeroed == 0 && moveFromSourceWorks,
            let pages = source.movablePages(at: sourceOffset, length: bytes)
        {
            return moveFromSource(entry, from: i, to: j, faultPage: faultPage, pages: pages)
        }
        if (kind == .copy || kind == .move && Source.self is any CopiesInPlaceWhenNotMovable.Type) && zeroed == 0,
            let bytesInPlace = source.contiguousBytes(at: sourceOffset, length: bytes)
        {
            // The bytes are in memory already: COPY reads them in place.
            return install(entry, from: i, to: j, faultPage: faultPage, zero: false) { (off: Int) throws(UserfaultfdError) in
                try handle.copy(to: destination &+ UInt64(off), from: bytesInPlace + off, length: bytes - off)
            }
        }
        return installThroughStaging(entry, from: i, to: j, faultPage: faultPage, minorFault: minorFault, zeroed: zeroed)
    }

    /// Installs pages `i ..< j` from the handler's staging buffer, filled from the source
    /// first: MOVE where the memory allows it, COPY otherwise (and from where MOVE stopped).
    @inline(__always)
    func installThroughStaging(_ entry: RegionEntry, from i: UInt64, to j: UInt64, faultPage: UInt64,
                               minorFault: Bool, zeroed: UInt64) -> InstallResult {
        let bytes = Int((j &- i) &* ps)
        let destination = entry.range.start &+ i &* ps
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
            try fillFromSource(UnsafeMutableRawBufferPointer(start: buffer, count: Int((j &- i) &* ps)), at: entry.sourceOffset &+ i &* ps)
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
                try fillFromSource(region, at: entry.sourceOffset &+ p &* ps)
            }
            p = q
        }
    }

    /// Asks the source for `region`'s bytes; past the source's end (inside its last
    /// page, as validation allows) the bytes are zeros.
    @inline(__always)
    func fillFromSource(_ region: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(PageSourceError) {
        let end = offset &+ UInt64(region.count)
        if let length = sourceLength, end > length {
            let available = offset < length ? Int(length &- offset) : 0
            if available > 0 {
                try source.fill(UnsafeMutableRawBufferPointer(start: region.baseAddress, count: available), at: offset)
            }
            memset(region.baseAddress! + available, 0, region.count - available)
            return
        }
        try source.fill(region, at: offset)
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
        var skippedToFault = false
        while off < bytes {
            let outcome: Userfaultfd.Outcome
            do {
                outcome = try operation(off)
            } catch {
                if isProcessGone(error) { return .gone }
                if fallible { return nil }
                let faultOffset = faultPage >= i && faultPage < j ? Int((faultPage &- i) &* ps) : -1
                if !faultInstalled && !skippedToFault && faultOffset > off {
                    // Pages before the faulting one failed: try from the faulting page once.
                    skippedToFault = true
                    off = faultOffset
                    continue
                }
                let failedAt = entry.range.start &+ i &* ps &+ UInt64(off)
                return installFailed(entry, faultPage: faultInstalled ? .max : faultPage, at: failedAt, error: error)
            }
            guard let n = apply(outcome, entry, at: i &+ UInt64(off) / ps, faultPage: faultPage, installed: &installed,
                                faultInstalled: &faultInstalled)
            else { return .retry }
            off += n
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

    /// Marks what a resolving ioctl installed from page `first` on and counts it.
    /// Returns the bytes to advance by, or nil after `EAGAIN` (read events, retry).
    @inline(__always)
    func apply(_ outcome: Userfaultfd.Outcome, _ entry: RegionEntry, at first: UInt64, faultPage: UInt64,
               installed: inout UInt64, faultInstalled: inout Bool) -> Int? {
        switch outcome {
        case .completed(let n), .partial(let n):
            let pages = UInt64(n) / ps
            entry.markResident(first, count: pages)
            installed &+= pages
            if faultPage >= first && faultPage < first &+ pages { faultInstalled = true }
            return n
        case .alreadyPresent:
            entry.markResident(first, count: 1)
            StatisticsCounters.add(counters.alreadyPresent, 1)
            if first == faultPage {
                try? handle.wake(MemoryRange(start: entry.range.start &+ first &* ps, length: ps))
            }
            return Int(ps)
        case .retryAfterEvents:
            return nil
        }
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
        return poison(entry, page: faultPage)
    }

    /// A resolving ioctl failed with an error that retrying cannot fix (EFAULT from a
    /// source that went away, EINVAL, ...): report it once and poison the faulting page
    /// (`faultPage`, `.max` if none is waiting), so that its thread gets SIGBUS instead
    /// of faulting again forever.
    ///
    /// ENOENT is the exception: the range was unregistered under the call, so the
    /// faulting thread is woken and finds ordinary memory.
    func installFailed(_ entry: RegionEntry, faultPage: UInt64, at failedAt: UInt64, error: UserfaultfdError) -> InstallResult {
        record(failure: error, at: failedAt)
        guard faultPage != .max else { return .done }
        let address = entry.range.start &+ faultPage &* ps
        if error.errno == .noSuchFileOrDirectory {
            try? handle.wake(MemoryRange(start: address, length: ps))
            return .done
        }
        return poison(entry, page: faultPage)
    }

    /// Poisons `page` of `entry` (its thread, and any later access, gets SIGBUS).
    func poison(_ entry: RegionEntry, page faultPage: UInt64) -> InstallResult {
        let address = entry.range.start &+ faultPage &* ps
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
}
