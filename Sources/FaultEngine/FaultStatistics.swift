import Histogram
import Synchronization

/// What a ``FaultServer`` did: faults by kind, pages installed, latency, resolve time.
///
/// Latencies run from the moment a handler read the fault to the moment its page
/// was installed (the faulting thread was woken), in nanoseconds. Faults resolved in
/// the faulting thread itself (SIGBUS strategy) are counted in ``inThreadFaults``
/// and carry no latency.
public struct FaultStatistics: Sendable, Codable, Hashable {
    /// MISSING faults read from the uffd.
    public var missingFaults: UInt64 = 0
    /// Write-protect faults read from the uffd.
    public var writeProtectFaults: UInt64 = 0
    /// MINOR faults read from the uffd.
    public var minorFaults: UInt64 = 0
    /// Faults resolved in the faulting thread by the SIGBUS resolver.
    public var inThreadFaults: UInt64 = 0
    /// Pages installed in all (faulting pages, chunk pages, prefetched, populated).
    public var pagesInstalled: UInt64 = 0
    /// Pages installed ahead of a fault (chunk neighbours, read-ahead, replay, populate).
    public var pagesPrefetched: UInt64 = 0
    /// Pages installed as zeros after a REMOVE.
    public var zeroPages: UInt64 = 0
    /// Pages found already present (`EEXIST`): another resolver won.
    public var alreadyPresent: UInt64 = 0
    /// Resolutions retried after reading pending events (`EAGAIN`).
    public var retriesAfterEvents: UInt64 = 0
    /// Pages poisoned because the source failed (their threads got SIGBUS).
    public var poisonedPages: UInt64 = 0
    /// Source failures.
    public var sourceErrors: UInt64 = 0
    /// Faults at addresses outside every served region (never installed).
    public var faultsOutsideRegions: UInt64 = 0
    /// REMOVE, UNMAP, REMAP and FORK events read.
    public var removeEvents: UInt64 = 0
    public var unmapEvents: UInt64 = 0
    public var remapEvents: UInt64 = 0
    public var forkEvents: UInt64 = 0
    /// Faults with a measured latency.
    public var latencyCount: UInt64 = 0
    /// Latency percentiles and maximum, in nanoseconds.
    public var latencyP50: UInt64 = 0
    public var latencyP90: UInt64 = 0
    public var latencyP99: UInt64 = 0
    public var latencyMax: UInt64 = 0
    /// Sum of all fault latencies, in nanoseconds: how long faulting threads waited
    /// after a handler read their fault. The wait before the read (the wake-up of the
    /// handler thread) is not included: the kernel does not timestamp faults.
    public var resolveTimeNanoseconds: UInt64 = 0
    /// The last source failure, described.
    public var lastError: String?
    /// The strategy the server runs (an automatic one resolved), e.g. `sigbus(chunkPages: 16)`.
    public var strategy: String?
    /// Why the server runs that strategy (see ``FaultServer/strategyChoice``).
    public var strategyReason: String?

    public init() {}

    /// Faults read from the uffd plus those resolved in-thread.
    public var faults: UInt64 { missingFaults + writeProtectFaults + minorFaults + inThreadFaults }

    /// The statistics as JSON, encoded as every report of the package is
    /// (``Reporting/json(_:)``): the same shape wherever statistics appear.
    public func jsonString() -> String { Reporting.json(self) }
}

/// Counters the handler threads update without locks, and the latency histograms.
final class StatisticsCounters: Sendable {
    let missing = Atomic<UInt64>(0)
    let writeProtect = Atomic<UInt64>(0)
    let minor = Atomic<UInt64>(0)
    let installed = Atomic<UInt64>(0)
    let prefetched = Atomic<UInt64>(0)
    let zero = Atomic<UInt64>(0)
    let alreadyPresent = Atomic<UInt64>(0)
    let retries = Atomic<UInt64>(0)
    let poisoned = Atomic<UInt64>(0)
    let sourceErrors = Atomic<UInt64>(0)
    let outside = Atomic<UInt64>(0)
    let removes = Atomic<UInt64>(0)
    let unmaps = Atomic<UInt64>(0)
    let remaps = Atomic<UInt64>(0)
    let forks = Atomic<UInt64>(0)
    let lastError = Mutex<String?>(nil)
    /// One histogram per handler thread, each touched once per batch by its thread.
    let histograms: [LatencyBox]

    final class LatencyBox: Sendable {
        let record = Mutex(LatencyRecord())
        func withLock<R>(_ body: (inout LatencyRecord) -> R) -> R { record.withLock { body(&$0) } }
    }

    struct LatencyRecord {
        var histogram = Histogram<UInt64>(lowestDiscernibleValue: 1, highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .two)
        var resolveTime: UInt64 = 0
    }

    init(handlers: Int) {
        histograms = (0..<max(handlers, 1)).map { _ in LatencyBox() }
    }

    @inline(__always)
    static func add(_ counter: borrowing Atomic<UInt64>, _ n: UInt64) {
        if n != 0 { counter.wrappingAdd(n, ordering: .relaxed) }
    }

    func snapshot(inThread: UInt64) -> FaultStatistics {
        var s = FaultStatistics()
        s.missingFaults = missing.load(ordering: .relaxed)
        s.writeProtectFaults = writeProtect.load(ordering: .relaxed)
        s.minorFaults = minor.load(ordering: .relaxed)
        s.inThreadFaults = inThread
        s.pagesInstalled = installed.load(ordering: .relaxed)
        s.pagesPrefetched = prefetched.load(ordering: .relaxed)
        s.zeroPages = zero.load(ordering: .relaxed)
        s.alreadyPresent = alreadyPresent.load(ordering: .relaxed)
        s.retriesAfterEvents = retries.load(ordering: .relaxed)
        s.poisonedPages = poisoned.load(ordering: .relaxed)
        s.sourceErrors = sourceErrors.load(ordering: .relaxed)
        s.faultsOutsideRegions = outside.load(ordering: .relaxed)
        s.removeEvents = removes.load(ordering: .relaxed)
        s.unmapEvents = unmaps.load(ordering: .relaxed)
        s.remapEvents = remaps.load(ordering: .relaxed)
        s.forkEvents = forks.load(ordering: .relaxed)
        var merged = Histogram<UInt64>(lowestDiscernibleValue: 1, highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .two)
        var block: UInt64 = 0
        for h in histograms {
            h.withLock { record in
                merged.add(record.histogram)
                block &+= record.resolveTime
            }
        }
        s.latencyCount = merged.totalCount
        if merged.totalCount > 0 {
            s.latencyP50 = merged.valueAtPercentile(50)
            s.latencyP90 = merged.valueAtPercentile(90)
            s.latencyP99 = merged.valueAtPercentile(99)
            s.latencyMax = merged.max
        }
        s.resolveTimeNanoseconds = block
        s.lastError = lastError.withLock { $0 }
        return s
    }
}
