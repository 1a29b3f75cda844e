import SystemPackage
import Userfaultfd
import _CFaultEngine

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A fault handed to a ``DeferredPageSource``: the page to produce.
public struct DeferredFault: Sendable, Hashable {
    /// The faulting page's address (aligned to the server's page size).
    public var address: UInt64
    /// The page's byte offset in the source.
    public var sourceOffset: UInt64

    public init(address: UInt64, sourceOffset: UInt64) {
        self.address = address
        self.sourceOffset = sourceOffset
    }
}

/// A source whose pages arrive later, from elsewhere (a network peer): the handler
/// thread hands each fault to it and installs nothing; whoever receives the page
/// installs it with ``FaultServer/install(_:at:pages:byMove:onInstalled:)``, which
/// wakes the waiting threads.
///
/// The server still owns the presence bitmap and the region table: a fault on a page
/// already present (or being installed) is not handed over, and a page marked zero
/// (``FaultServer/markPresent(at:zero:)``, or released by a REMOVE) is installed by the
/// handler itself. If the pages can no longer come, ``FaultServer/poisonMissing()``
/// makes every waiting and later access raise SIGBUS instead of waiting forever.
///
/// A deferred source needs the copy or move strategy without background population
/// or replay; ``PageSource/fill(_:at:)`` is never called.
public protocol DeferredPageSource: PageSource {
    /// Asks for the page of `fault`. Called on a handler thread for every fault on a
    /// page that is neither present nor being installed, so possibly more than once per
    /// page (deduplicate here). Must return promptly, never wait for the page, and
    /// never touch memory registered on the uffd.
    func request(_ fault: DeferredFault)

    /// Called on a handler thread after it installed zeros for a fault on a page marked
    /// zero. The default does nothing.
    func resolvedWithZeros(_ fault: DeferredFault)
}

extension DeferredPageSource {
    public func resolvedWithZeros(_ fault: DeferredFault) {}

    /// Never called for a deferred source (its handler installs nothing from it).
    public func fill(_ destination: UnsafeMutableRawBufferPointer, at sourceOffset: UInt64) throws(PageSourceError) {
        throw PageSourceError(.failed("a deferred source's pages are installed by its receiver"),
                              sourceOffset: sourceOffset, length: destination.count)
    }
}

/// What ``FaultServer/install(_:at:pages:byMove:onInstalled:)`` did.
public struct ExternalInstallResult: Sendable, Hashable {
    /// Pages this call installed.
    public var installed = 0
    /// Pages that were present already (or being installed by another thread) and were skipped.
    public var alreadyPresent = 0

    public init() {}
}

/// What a page was before ``FaultServer/markPresent(at:zero:)`` marked it.
public enum PagePresence: Sendable, Hashable {
    /// Not present.
    case missing
    /// Present with data.
    case present
    /// Present, known to be zero (a fault installs zeros).
    case zero
}

extension FaultServer {
    /// The uffd the server serves, for registering ranges on it before ``start()``.
    /// It is closed when the server stops.
    public var userfaultfdHandle: Userfaultfd.Handle { handle }

    /// The regions as first served, numbered by global page (the presence bitmap's
    /// index), for a receiver that names pages by region and page.
    package var regionLayout: RegionLayout { table.layout }

    /// Refuses configurations a deferred source cannot serve.
    static func checkDeferral(_ source: Source, _ configuration: Configuration) throws(UserfaultfdError) {
        guard source is any DeferredPageSource else { return }
        func bad(_ why: String) -> UserfaultfdError {
            UserfaultfdError(operation: "FaultServer", kind: .invalidArgument(why))
        }
        switch configuration.strategy {
        case .copy, .move: break
        default: throw bad("a deferred source needs the copy or move strategy (not \(configuration.strategy))")
        }
        if configuration.backgroundPopulate { throw bad("a deferred source cannot be populated in the background") }
        if case .replay = configuration.prefetch { throw bad("a deferred source cannot replay a working set") }
    }

    /// The entry holding `address`: without a lock while the regions cannot change,
    /// so that a receiving thread never waits for a handler (or a handler for it).
    @inline(__always)
    func lookupEntry(_ address: UInt64) -> RegionEntry? {
        guard let fixed = fixedRegions else { return table.lookup(address) }
        for e in fixed where address >= e.range.start && address - e.range.start < e.range.length { return e }
        return nil
    }

    /// The region entry holding `pages` pages from `address`, and the first page's index in it.
    private func entry(at address: UInt64, pages: Int, _ operation: String) throws(UserfaultfdError) -> (RegionEntry, UInt64) {
        let ps = UInt64(pageSize)
        guard address % ps == 0, let e = lookupEntry(address),
            UInt64(pages) <= (e.range.end - address) / ps
        else {
            throw UserfaultfdError(operation: operation, kind: .invalidArgument(
                "\(pages) pages at 0x\(String(address, radix: 16)) are not page-aligned within one served region"))
        }
        return (e, (address - e.range.start) / ps)
    }

    /// Installs `pages` pages at `address` (within one served region) from `bytes`
    /// (nil: zeros), skipping pages already present, and wakes the threads waiting on
    /// them. Call it from any thread but the served process's faulting code paths; it
    /// takes the region table's lock.
    ///
    /// Pages are claimed in the presence bitmap before the ioctl, so a fault on them
    /// meanwhile is not handed to the source again and two installers never race.
    ///
    /// - Parameters:
    ///   - bytes: the pages' contents (`pages` pages), or nil for zero pages.
    ///   - address: the first page's address, page-aligned.
    ///   - pages: how many pages, all in the served region holding `address`.
    ///   - byMove: `UFFDIO_MOVE` the pages out of `bytes` (private anonymous memory,
    ///     the MOVE feature) instead of copying them.
    ///   - onInstalled: called after each run this call claimed and installed, with the
    ///     run's first page (counted from `address`) and its length.
    /// - Throws: `UserfaultfdError` for a range outside the regions or a failed ioctl
    ///   (the pages not installed are marked missing again).
    @discardableResult
    public func install(
        _ bytes: UnsafeRawPointer?, at address: UInt64, pages: Int, byMove: Bool = false,
        onInstalled: (_ firstPage: Int, _ count: Int) -> Void = { _, _ in }
    ) throws(UserfaultfdError) -> ExternalInstallResult {
        var result = ExternalInstallResult()
        guard pages > 0 else { return result }
        let (e, first) = try entry(at: address, pages: pages, "FaultServer.install")
        let ps = pageSize
        var i = 0
        while i < pages {
            if !e.claim(first &+ UInt64(i)) {
                result.alreadyPresent += 1
                i += 1
                continue
            }
            var j = i + 1
            while j < pages && e.claim(first &+ UInt64(j)) { j += 1 }
            let destination = address &+ UInt64(i * ps)
            let length = (j - i) * ps
            var done = 0
            while done < length {
                let outcome: Userfaultfd.Outcome
                do {
                    if let bytes, byMove {
                        outcome = try handle.move(to: destination &+ UInt64(done),
                                                  from: UInt64(UInt(bitPattern: bytes + i * ps + done)), length: length - done)
                    } else if let bytes {
                        outcome = try handle.copy(to: destination &+ UInt64(done), from: bytes + i * ps + done, length: length - done)
                    } else {
                        outcome = try handle.zeropage(MemoryRange(start: destination &+ UInt64(done), length: UInt64(length - done)))
                    }
                } catch {
                    // What was not installed is missing again (poisonMissing() finds it).
                    let from = first &+ UInt64(i) &+ UInt64(done / ps)
                    cfe_bits_clear(e.resident, e.firstBit &+ from, UInt64((length - done) / ps))
                    throw error
                }
                switch outcome {
                case .completed: done = length
                case .partial(let n): done += n
                case .alreadyPresent:
                    result.alreadyPresent += 1
                    done += ps
                case .retryAfterEvents:
                    // A handler thread reads the pending layout event.
                    sched_yield()
                }
            }
            let n = UInt64(j - i)
            StatisticsCounters.add(counters.installed, n)
            if bytes == nil { StatisticsCounters.add(counters.zero, n) }
            result.installed += j - i
            onInstalled(i, j - i)
            if j < pages { result.alreadyPresent += 1 }
            i = j + 1
        }
        return result
    }

    /// Marks the page at `address` present without installing it: its bytes were
    /// written before the range was registered, or (`zero`) it is known to be zero and
    /// a fault on it installs zeros. Returns what it was before.
    @discardableResult
    public func markPresent(at address: UInt64, zero: Bool = false) throws(UserfaultfdError) -> PagePresence {
        let (e, page) = try entry(at: address, pages: 1, "FaultServer.markPresent")
        let wasZero = e.isZeroed(page)
        let wasPresent = !e.claim(page)
        if zero {
            cfe_bits_set(e.zeroed, e.firstBit &+ page, 1)
        } else {
            e.clearZeroed(page, count: 1)
        }
        return !wasPresent ? .missing : wasZero ? .zero : .present
    }

    /// Whether the page at `address` is present (installed, being installed, marked
    /// present or zero, or poisoned). False outside the regions.
    public func isPresent(_ address: UInt64) -> Bool {
        let ps = UInt64(pageSize)
        guard let e = lookupEntry(address) else { return false }
        return e.isResident((address - e.range.start) / ps)
    }

    /// One bit per page of the `pages` pages at `address`, set where present; bit `i`
    /// in byte `i / 8`, least significant first.
    public func presenceBitmap(at address: UInt64, pages: Int) throws(UserfaultfdError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: (pages + 7) / 8)
        guard pages > 0 else { return out }
        let (e, first) = try entry(at: address, pages: pages, "FaultServer.presenceBitmap")
        for i in 0..<pages where e.isResident(first &+ UInt64(i)) { out[i >> 3] |= 1 << UInt8(i & 7) }
        return out
    }

    /// Forgets `pages` pages at `address`: they become missing (their bits are
    /// cleared) and their memory is released with `MADV_DONTNEED`, so the next access
    /// faults again. Returns how many were present.
    @discardableResult
    public func forget(at address: UInt64, pages: Int) throws(UserfaultfdError) -> Int {
        guard pages > 0 else { return 0 }
        let (e, first) = try entry(at: address, pages: pages, "FaultServer.forget")
        var present = 0
        for i in 0..<UInt64(pages) where e.isResident(first &+ i) { present += 1 }
        let bit = e.firstBit &+ first
        cfe_bits_clear(e.resident, bit, UInt64(pages))
        cfe_bits_clear(e.zeroed, bit, UInt64(pages))
        cfe_bits_clear(e.poisoned, bit, UInt64(pages))
        _ = madvise(UnsafeMutableRawPointer(bitPattern: UInt(address)), pages * pageSize, MADV_DONTNEED)
        return present
    }

    /// Poisons every page not present, so that threads waiting on one, and any later
    /// access, get SIGBUS instead of waiting forever; for when the pages can no longer
    /// come. Pages marked zero but not present get zeros. Returns how many were poisoned.
    @discardableResult
    public func poisonMissing() -> Int {
        let ps = UInt64(pageSize)
        var poisoned = 0
        for e in table.snapshot {
            let pages = e.range.length / ps
            var p: UInt64 = 0
            while p < pages {
                // Claim a run of missing pages (an installer may be racing).
                guard e.claim(p) else {
                    p &+= 1
                    continue
                }
                let zero = e.isZeroed(p)
                var q = p &+ 1
                while q < pages && e.isZeroed(q) == zero && e.claim(q) { q &+= 1 }
                let range = MemoryRange(start: e.range.start &+ p &* ps, length: (q &- p) &* ps)
                var outcome: Userfaultfd.Outcome? = nil
                repeat {
                    outcome = try? (zero ? handle.zeropage(range) : handle.poison(range))
                    if outcome == .retryAfterEvents { sched_yield() }
                } while outcome == .retryAfterEvents
                if outcome == nil { try? handle.wake(range) }
                if !zero {
                    cfe_bits_set(e.poisoned, e.firstBit &+ p, q &- p)
                    poisoned += Int(q &- p)
                }
                // A run stopped by a present page skips it.
                p = q
            }
        }
        StatisticsCounters.add(counters.poisoned, UInt64(poisoned))
        return poisoned
    }
}

extension HandlerLoop {
    /// Resolves a fault for a deferred source: zeros if the page is marked zero,
    /// nothing if it is present or being installed (that install wakes the thread),
    /// otherwise the source is asked for it.
    func handOver(_ fault: Userfaultfd.PageFault, to deferring: any DeferredPageSource, readAt: UInt64) {
        let address = fault.address & ~(ps &- 1)
        StatisticsCounters.add(counters.missing, 1)
        var lookups = 0
        while !gone {
            guard let entry = region(holding: address, lookups: &lookups) else { return }
            let page = (address &- entry.range.start) / ps
            let request = DeferredFault(address: address, sourceOffset: entry.sourceOffset &+ page &* ps)
            if entry.isZeroed(page) {
                switch installRun(entry, from: page, to: page &+ 1, faultPage: page, minorFault: false) {
                case .done:
                    recordLatency(since: readAt)
                    deferring.resolvedWithZeros(request)
                    return
                case .retry:
                    if !drainEvents() { return }
                    continue
                case .gone:
                    gone = true
                    return
                }
            }
            if entry.isResident(page) { return }
            deferring.request(request)
            return
        }
    }
}
