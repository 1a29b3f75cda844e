import Synchronization
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Counts the pages written to some ranges per interval, with `PAGEMAP_SCAN`, and
/// adds them to a ``TraceRecorder`` as write samples.
///
/// The ranges must be registered for write-protect on a uffd handshaken with
/// FEATURE_WP_ASYNC (see ``WriteSampler/armWriteTracking(_:)`` for memory of one's own
/// process), in this process or in the process `pid`, and write-protected once
/// (`UFFDIO_WRITEPROTECT`; with WP_UNPOPULATED this covers pages not yet populated):
/// the first scan counts a page that was never protected as written. Each scan reports the pages
/// written since the previous one and write-protects them again in the same call, so
/// a write costs the writer no fault round trip. A page installed by `UFFDIO_COPY`
/// without its WP mode counts as written in the interval it was installed.
public final class WriteSampler: @unchecked Sendable {
    /// One range sampled, and its region in the trace.
    struct Target {
        var range: MemoryRange
        var region: Int
    }

    private let recorder: TraceRecorder
    private let scanner: PagemapScanner
    private let targets: [Target]
    private let bucketPages: Int
    private let intervalNanoseconds: UInt64
    private let stopSignal: StopSignal
    private var thread: DedicatedThread?
    private let failure = Mutex<String?>(nil)
    private let samples = Atomic<Int>(0)

    /// Starts sampling every `intervalMilliseconds`.
    ///
    /// - Parameters:
    ///   - recorder: the trace the samples go to.
    ///   - ranges: page-aligned ranges registered for WP_ASYNC write-protect.
    ///   - space: the address space the ranges belong to in the trace (the same number
    ///     as the `FaultTraceSink` space of a server over them, if any).
    ///   - pid: the process whose pagemap is scanned (nil: this one).
    ///   - intervalMilliseconds: the sampling interval.
    ///   - bucketPages: pages counted together.
    /// - Throws: ``TraceError`` if the pagemap cannot be opened or an argument is wrong.
    public init(recorder: TraceRecorder, ranges: [MemoryRange], space: Int = 0, pid: Int32? = nil,
                intervalMilliseconds: Int = 10, bucketPages: Int = 16) throws(TraceError) {
        if intervalMilliseconds < 1 || intervalMilliseconds > 60_000 {
            throw TraceError("the sampling interval \(intervalMilliseconds) ms must lie in 1...60000")
        }
        if bucketPages < 1 { throw TraceError("bucketPages \(bucketPages) must be at least 1") }
        let ps = UInt64(systemPageSize)
        if let bad = ranges.first(where: { !$0.isAligned(to: ps) || $0.length == 0 }) {
            throw TraceError("range \(bad) is empty or not page-aligned")
        }
        do {
            scanner = try PagemapScanner(pid: pid)
            stopSignal = try StopSignal()
        } catch {
            throw TraceError("cannot open the pagemap of \(pid.map { "process \($0)" } ?? "this process"): \(error)")
        }
        self.recorder = recorder
        self.bucketPages = bucketPages
        self.intervalNanoseconds = UInt64(intervalMilliseconds) * 1_000_000
        self.targets = ranges.map {
            Target(range: $0, region: recorder.region(space: space, range: $0, writeTracked: true))
        }
        let stop = stopSignal
        thread = DedicatedThread(name: "uffd-trace-writes") { [self] in
            var p = pollfd(fd: stop.fileDescriptor.rawValue, events: Int16(POLLIN), revents: 0)
            // A sample every interval until the stop signal is raised, poll fails or a scan fails.
            while retryOnInterrupt({ Glibc.poll(&p, 1, Int32(intervalMilliseconds)) }) == 0 {
                if !self.sampleOnce() { break }
            }
        }
    }

    deinit { stop() }

    /// Write samples taken so far.
    public var sampleCount: Int { samples.load(ordering: .relaxed) }

    /// Why sampling stopped early, if it did (a scan failed).
    public var error: String? { failure.withLock { $0 } }

    /// Takes a last sample and stops.
    public func stop() {
        guard let thread else { return }
        stopSignal.raise()
        thread.join()
        self.thread = nil
        _ = sampleOnce()
    }

    /// Scans every range once and records one sample per range. Returns false on failure.
    private func sampleOnce() -> Bool {
        let time = recorder.elapsed()
        for target in targets {
            let pages = Int(target.range.length) / systemPageSize
            var written = [UInt32](repeating: 0, count: (pages + bucketPages - 1) / bucketPages)
            var at = target.range.start
            do {
                while at < target.range.end {
                    let result = try scanner.scan(MemoryRange(start: at, end: target.range.end), flags: .writeProtectMatching,
                                                  required: .written, returning: .written)
                    for region in result.regions { count(region.range, in: target.range, into: &written) }
                    if result.walkEnd <= at { break }
                    at = result.walkEnd
                }
            } catch {
                failure.withLock { $0 = "PAGEMAP_SCAN of \(target.range) failed: \(error)" }
                return false
            }
            recorder.add(WriteSample(region: target.region, time: time, interval: intervalNanoseconds,
                                     bucketPages: bucketPages, written: written))
        }
        samples.wrappingAdd(1, ordering: .relaxed)
        return true
    }

    private func count(_ range: MemoryRange, in region: MemoryRange, into written: inout [UInt32]) {
        let ps = UInt64(systemPageSize)
        var page = (max(range.start, region.start) - region.start) / ps
        let end = (min(range.end, region.end) - region.start) / ps
        while page < end {
            written[Int(page) / bucketPages] &+= 1
            page += 1
        }
    }

    /// Registers `range` of this process for asynchronous write-protect and protects it,
    /// so that ``WriteSampler`` can count its writes. Keep the returned uffd open while sampling.
    ///
    /// - Throws: `UserfaultfdError` if the kernel lacks FEATURE_WP_ASYNC or refuses the range.
    public static func armWriteTracking(_ range: MemoryRange) throws(UserfaultfdError) -> Userfaultfd {
        let uffd = try Userfaultfd(features: [.wpAsync, .wpUnpopulated])
        _ = try uffd.handle.register(range, mode: .writeProtect)
        _ = try uffd.handle.writeProtect(range, mode: .writeProtect)
        return uffd
    }
}
