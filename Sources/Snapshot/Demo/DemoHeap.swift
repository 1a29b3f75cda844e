import Histogram
import Synchronization
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The demo's key-value-store-like heap: every page is a record stamped with its
/// page number and version; writer threads update random records, each update's
/// latency recorded as steady-state or during-snapshot.
///
/// A page holds its version in words 0 and last, its page number in word 1, and a
/// fill derived from its page number elsewhere (written once).
final class DemoHeap: @unchecked Sendable {
    let base: UnsafeMutableRawPointer
    let length: Int
    let pages: Int
    let transparentHugePages: Bool
    private let mapped: UnsafeMutableRawPointer
    private let mappedLength: Int
    /// Each page's version, kept outside the heap; updated after the page.
    let versions: UnsafeMutablePointer<UInt64>
    /// The versions at the last snapshot's instant, copied while the writers are held
    /// (allocated and touched once, so the copy is a plain memcpy in every method's pause).
    private let instantVersions: UnsafeMutablePointer<UInt64>
    let pauseRequested = Atomic<Bool>(false)
    let parked = Atomic<Int>(0)
    /// Where parked writers sleep, and the pausing thread waits for them.
    private let parking = ConditionLock()
    let stopRequested = Atomic<Bool>(false)
    let operations = Atomic<Int>(0)
    /// What is running: 0 nothing (steady state), else a ``DemoMethod``'s phase; each
    /// writer records latency per phase.
    let phase = Atomic<Int>(0)
    static let phases = DemoMethod.allCases.count + 1
    let latencies: Mutex<[Histogram<UInt64>]>
    private var threads: [DedicatedThread] = []
    let writerCount: Int

    init(bytes: Int, transparentHugePages: Bool, writers: Int) throws(SnapshotError) {
        let huge = 2 << 20
        length = (bytes + huge - 1) / huge * huge
        pages = length / systemPageSize
        mappedLength = length + huge
        guard let p = mmap(nil, mappedLength, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
              p != MAP_FAILED else { throw SnapshotError.system("mmap \(length) bytes") }
        mapped = p
        base = UnsafeMutableRawPointer(bitPattern: (UInt(bitPattern: p) + UInt(huge - 1)) & ~UInt(huge - 1))!
        self.transparentHugePages = transparentHugePages
        _ = madvise(base, length, transparentHugePages ? MADV_HUGEPAGE : MADV_NOHUGEPAGE)
        versions = .allocate(capacity: pages)
        versions.initialize(repeating: 1, count: pages)
        instantVersions = .allocate(capacity: pages)
        instantVersions.initialize(repeating: 0, count: pages)
        writerCount = writers
        latencies = Mutex((0..<Self.phases).map { _ in DemoHeap.histogram() })
    }

    deinit {
        stop()
        munmap(mapped, mappedLength)
        versions.deallocate()
        instantVersions.deallocate()
    }

    var range: MemoryRange { MemoryRange(base, length: length) }

    /// Writes every record at version 1.
    func populate() {
        let words = systemPageSize / 8
        for p in 0..<pages {
            let w = (base + p * systemPageSize).assumingMemoryBound(to: UInt64.self)
            w[0] = 1
            w[1] = UInt64(p)
            for i in 2..<(words - 1) { w[i] = UInt64(p) &* 0x9E37_79B9_7F4A_7C15 ^ UInt64(i) }
            w[words - 1] = 1
        }
    }

    /// Whether `page` (one page of bytes) is record `p` at version `v`.
    static func check(_ page: UnsafeRawPointer, record p: Int, version v: UInt64) -> Bool {
        let w = page.assumingMemoryBound(to: UInt64.self)
        let words = systemPageSize / 8
        return w[0] == v && w[1] == UInt64(p) && w[words - 1] == v && w[words / 2] == UInt64(p) &* 0x9E37_79B9_7F4A_7C15 ^ UInt64(words / 2)
    }

    func start() {
        stopRequested.store(false, ordering: .releasing)
        for t in 0..<writerCount {
            threads.append(DedicatedThread(name: "demo-writer\(t)") { [self] in run(t) })
        }
    }

    func stop() {
        stopRequested.store(true, ordering: .releasing)
        for t in threads { t.join() }
        threads = []
    }

    private func run(_ t: Int) {
        var hist = (0..<Self.phases).map { _ in DemoHeap.histogram() }
        var state = UInt64(t + 1) &* 0x2545_F491_4F6C_DD1D
        let owned = (pages - t + writerCount - 1) / writerCount
        let lastWord = systemPageSize / 8 - 1
        var flushed = 0
        while !stopRequested.load(ordering: .acquiring) {
            if pauseRequested.load(ordering: .acquiring) {
                // Parked writers sleep, as a store's writers blocked on a lock would, and
                // leave the CPUs to whatever fixes the image.
                parking.withLock {
                    parked.add(1, ordering: .acquiringAndReleasing)
                    parking.broadcast()
                    while pauseRequested.load(ordering: .acquiring) { parking.wait(milliseconds: 100) }
                    parked.subtract(1, ordering: .acquiringAndReleasing)
                }
                continue
            }
            state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            let p = Int((state >> 33) % UInt64(owned)) * writerCount + t
            let v = versions[p] + 1
            let start = MonotonicClock.nanoseconds()
            let w = (base + p * systemPageSize).assumingMemoryBound(to: UInt64.self)
            w[0] = v
            w[lastWord] = v
            let elapsed = MonotonicClock.nanoseconds() - start
            versions[p] = v
            hist[phase.load(ordering: .relaxed)].record(elapsed)
            flushed += 1
            if flushed & 0xFFF == 0 { operations.add(0x1000, ordering: .relaxed) }
        }
        operations.add(flushed & 0xFFF, ordering: .relaxed)
        latencies.withLock { for i in 0..<Self.phases { $0[i].add(hist[i]) } }
    }

    /// Parks the writers between updates.
    func pause() {
        pauseRequested.store(true, ordering: .releasing)
        parking.withLock {
            while parked.load(ordering: .acquiring) < writerCount { parking.wait(milliseconds: 100) }
        }
    }

    func resume() {
        parking.withLock {
            pauseRequested.store(false, ordering: .releasing)
            parking.broadcast()
        }
    }

    /// The versions now (call with the writers paused).
    func versionLog() -> [UInt64] { Array(UnsafeBufferPointer(start: versions, count: pages)) }

    /// Copies the versions now (call with the writers paused) for ``recordedVersions()``,
    /// and times the copy: it is the demo's own bookkeeping, which the pauses leave out.
    func recordVersions() {
        let start = MonotonicClock.nanoseconds()
        instantVersions.update(from: versions, count: pages)
        versionCopyNanoseconds = MonotonicClock.nanoseconds() - start
    }

    /// How long the last ``recordVersions()`` took (4 MiB per 2 GiB of heap; the array
    /// was last written by the writers on other CPUs, so it is 0.3-1.5 ms here).
    private(set) var versionCopyNanoseconds: UInt64 = 0

    /// The versions ``recordVersions()`` copied.
    func recordedVersions() -> [UInt64] { Array(UnsafeBufferPointer(start: instantVersions, count: pages)) }

    static func histogram() -> Histogram<UInt64> {
        Histogram<UInt64>(lowestDiscernibleValue: 1, highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .two)
    }

    /// The latency percentiles recorded in `phase` (after ``stop()``).
    func latency(phase: Int) -> LatencySummary {
        let h = latencies.withLock { $0[phase] }
        return LatencySummary(count: h.totalCount, p50Nanoseconds: h.valueAtPercentile(50),
                              p99Nanoseconds: h.valueAtPercentile(99), p999Nanoseconds: h.valueAtPercentile(99.9), maxNanoseconds: h.max)
    }
}

/// Percentiles of write latency.
public struct LatencySummary: Sendable, Codable, Hashable {
    public var count: UInt64
    public var p50Nanoseconds: UInt64
    public var p99Nanoseconds: UInt64
    /// The 99.9th percentile: where a method that stalls few writes for longer shows it.
    public var p999Nanoseconds: UInt64
    public var maxNanoseconds: UInt64
}
