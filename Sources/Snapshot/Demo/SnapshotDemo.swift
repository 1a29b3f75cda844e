import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The demo behind `uffd snapshot demo`: a heap under random updates, snapshotted in
/// alternation by fork, uffd-wp (a handler thread saving pages, then the writing
/// threads themselves) and stop-and-copy, with and without transparent huge
/// pages, every image verified against the workload's log; then an incremental
/// capture and the cost of three ways to track writes.
public struct SnapshotDemo: Sendable {
    public struct Configuration: Sendable {
        public var heapBytes = 2 << 30
        public var writers = 2
        public var rounds = 2
        public var transparentHugePages: [Bool] = [true, false]
        /// The methods compared, in the first round's order.
        public var methods: [DemoMethod] = DemoMethod.allCases
        public var stagingBytes = 64 << 20
        /// Pages the fault handler saves around a faulting page (``Snapshotter/Options/faultChunkPages``).
        public var faultChunkPages = Snapshotter.Options().faultChunkPages
        /// Where images go (tmpfs, so that fork and uffd-wp write to the same kind of file).
        public var directory = "/dev/shm"
        /// Seconds of steady state before the snapshots (latency baseline).
        public var steadySeconds = 1.0
        /// The share of the heap written before the delta capture.
        public var incrementalFraction = 0.01
        public var trackingBytes = 64 << 20
        public var trackingPages = 8192
        public var trackingRounds = 5
        public init() {}
    }

    public let configuration: Configuration
    public init(_ configuration: Configuration) { self.configuration = configuration }

    /// Runs everything; `progress` receives a line per step.
    public func run(progress: (String) -> Void) throws(SnapshotError) -> SnapshotDemoReport {
        let c = configuration
        var report = SnapshotDemoReport(heapBytes: c.heapBytes, writers: c.writers, rounds: c.rounds, stagingBytes: c.stagingBytes,
                                        imageDirectory: c.directory, crc32cBytesPerSecond: Self.crcSpeed(), crc32cHardware: CRC32C.isHardware)
        for thp in c.transparentHugePages {
            try runHeap(thp: thp, into: &report, progress: progress)
        }
        progress("write tracking: \(c.trackingPages) random pages of \(c.trackingBytes >> 20) MiB, \(c.trackingRounds) rounds")
        report.tracking = try TrackingBenchmark(bytes: c.trackingBytes, dirty: c.trackingPages).run(rounds: c.trackingRounds)
        for m in TrackingMethod.allCases {
            report.trackingNanosecondsPerPage[m.rawValue] = median(report.tracking.filter { $0.method == m }.map(\.nanosecondsPerPage))
        }
        report.targets = Self.targets(report)
        return report
    }

    private func path(_ name: String) -> String { "\(configuration.directory)/uffd-snapshot-demo-\(getpid())-\(name)" }

    private func runHeap(thp: Bool, into report: inout SnapshotDemoReport, progress: (String) -> Void) throws(SnapshotError) {
        let c = configuration
        progress("heap \(c.heapBytes >> 20) MiB, THP \(thp ? "on" : "off"): populating")
        let heap = try DemoHeap(bytes: c.heapBytes, transparentHugePages: thp, writers: c.writers)
        heap.populate()
        report.anonHugePagesBytes[thp ? "on" : "off"] = MemorySampler.rollup(getpid(), "AnonHugePages:")
        var options = Snapshotter.Options()
        options.stagingBytes = c.stagingBytes
        options.faultChunkPages = c.faultChunkPages
        heap.start()
        usleep(UInt32(c.steadySeconds * 1e6))
        var runs: [DemoRun] = []
        for round in 0..<c.rounds {
            let order = c.methods.indices.map { c.methods[($0 + round) % c.methods.count] }
            for method in order {
                let image = path(method.rawValue)
                defer { unlink(image) }
                let run = try heap.snapshot(method, round: round, to: image, options: options)
                progress("  round \(round + 1) \(method.rawValue): pause \(format3(Double(run.pauseNanoseconds) / 1e6)) ms "
                    + "(+ \(format3(Double(run.versionCopyNanoseconds) / 1e6)) ms version log copy), total "
                    + "\(format1(Double(run.totalNanoseconds) / 1e6)) ms, extra \(format1(Double(run.peakExtraBytes) / 1048576)) MiB, "
                    + "CPU \(format1(Double(run.cpuNanoseconds) / 1e6)) ms"
                    + (run.handlerCPUNanoseconds.map { " (fault handler \(format1(Double($0) / 1e6)) ms)" } ?? "") + ", "
                    + (run.faults.map { "faults \($0), saved \(run.savedPages ?? 0) pages, staging waits \(run.stagingWaits ?? 0), " } ?? "")
                    + "dirtied \(Int(run.dirtiedFraction * 100))%, THP before \(run.hugePageBytesBefore >> 20) MiB, \(run.mismatchedPages == 0 ? "verified" : "\(run.mismatchedPages) pages WRONG")")
                runs.append(run)
                usleep(UInt32(c.steadySeconds * 0.3e6))
            }
        }
        heap.stop()
        report.runs += runs
        for m in c.methods {
            let mine = runs.filter { $0.method == m }
            guard !mine.isEmpty else { continue }
            report.summaries.append(.init(
                method: m, transparentHugePages: thp, pauseNanoseconds: median(mine.map(\.pauseNanoseconds))!,
                freezeNanoseconds: median(mine.map(\.freezeNanoseconds))!,
                totalNanoseconds: median(mine.map(\.totalNanoseconds))!, cpuNanoseconds: median(mine.map(\.cpuNanoseconds))!,
                bytesPerSecond: median(mine.map(\.bytesPerSecond))!,
                peakExtraBytes: median(mine.map(\.peakExtraBytes))!, declaredExtraBytes: median(mine.compactMap(\.declaredExtraBytes)),
                dirtiedFraction: median(mine.map(\.dirtiedFraction))!, imageBytes: median(mine.map(\.imageBytes))!,
                mismatchedPages: mine.reduce(0) { $0 + $1.mismatchedPages },
                during: heap.latency(phase: m.phase), steady: heap.latency(phase: 0)))
        }
        progress("heap THP \(thp ? "on" : "off"): incremental capture after \(format1(c.incrementalFraction * 100))% of the pages are written")
        report.incremental.append(try incremental(heap))
    }

    /// A full capture, then `incrementalFraction` of the pages written, then a delta.
    private func incremental(_ heap: DemoHeap) throws(SnapshotError) -> SnapshotDemoReport.IncrementalRun {
        var options = Snapshotter.Options()
        options.stagingBytes = configuration.stagingBytes
        options.incremental = true
        let snapshotter = try Snapshotter(regions: [heap.range], options: options)
        let quiesce = Snapshotter.Quiesce(pause: {}, resume: {})
        let full = path("full"), delta = path("delta")
        defer { unlink(full); unlink(delta) }
        let fullResult = try snapshotter.capture(to: full, quiesce: quiesce).wait()
        let count = max(1, Int(Double(heap.pages) * configuration.incrementalFraction))
        var state: UInt64 = 0x9E37_79B9
        let lastWord = systemPageSize / 8 - 1
        for _ in 0..<count {
            state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            let p = Int((state >> 33) % UInt64(heap.pages))
            let v = heap.versions[p] + 1
            let w = (heap.base + p * systemPageSize).assumingMemoryBound(to: UInt64.self)
            w[0] = v
            w[lastWord] = v
            heap.versions[p] = v
        }
        let log = heap.versionLog()
        let deltaResult = try snapshotter.capture(to: delta, quiesce: quiesce).wait()
        let chain = try SnapshotChain(paths: [full, delta])
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: systemPageSize, alignment: 4096)
        defer { buffer.deallocate() }
        var bad = 0
        for p in 0..<heap.pages {
            try chain.readPage(p, into: buffer)
            if !DemoHeap.check(buffer, record: p, version: log[p]) { bad += 1 }
        }
        return .init(transparentHugePages: heap.transparentHugePages, fullNanoseconds: fullResult.totalNanoseconds,
                     deltaNanoseconds: deltaResult.totalNanoseconds, deltaPauseNanoseconds: deltaResult.pauseNanoseconds,
                     deltaHeldCopyPages: deltaResult.heldCopyPages, dirtiedPages: count, deltaImageBytes: deltaResult.imageBytes,
                     mismatchedPages: bad, ratio: Double(deltaResult.totalNanoseconds) / Double(fullResult.totalNanoseconds))
    }

    /// CRC32C bytes per second over 256 MiB.
    static func crcSpeed() -> Double {
        let n = 256 << 20
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: n, alignment: 4096)
        defer { buffer.deallocate() }
        memset(buffer, 0x5a, n)
        let start = MonotonicClock.nanoseconds()
        _ = CRC32C.checksum(UnsafeRawBufferPointer(start: buffer, count: n))
        return Double(n) / (Double(MonotonicClock.nanoseconds() - start) / 1e9)
    }
}
