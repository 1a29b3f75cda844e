import TestSupport
import FaultEngine
import FaultTrace
import Testing
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

let writeTrackingAvailable = ((try? Userfaultfd.probe().features) ?? []).isSuperset(of: [.wpAsync, .wpUnpopulated])

@Suite(.sharesProcess, .serialized, .timeLimit(.minutes(1)))
struct RecordingTests {
    @Test(.needsUserfaultfd)
    func theEngineRecordsEveryFirstTouchInOrder() throws {
        let pages = 64
        let memory = try MemoryMapping.anonymous(length: pages * page)
        let source = try MemorySource(length: pages * page) { bytes in
            for p in 0..<pages { bytes.storeBytes(of: UInt64(p + 1), toByteOffset: p * page, as: UInt64.self) }
        }
        let uffd = try Userfaultfd()
        _ = try uffd.handle.register(memory.range, mode: .missing)
        let server = try FaultServer(userfaultfd: uffd, regions: [ServedRegion(range: memory.range, sourceOffset: 0)],
                                     source: source, configuration: .handler4k)
        let path = temporaryPath("engine")
        defer { unlink(path) }
        let recorder = try TraceRecorder(path: path, ringCapacity: 64)
        server.traceSink = recorder.sink
        try server.start()
        var order = Array(0..<pages)
        var seed: UInt64 = 7
        for i in stride(from: pages - 1, to: 0, by: -1) {
            seed = seed &* 6364136223846793005 &+ 1442695040888963407
            order.swapAt(i, Int(seed >> 33) % (i + 1))
        }
        var wrong = 0
        for p in order where (memory.base + p * page).load(as: UInt64.self) != UInt64(p + 1) { wrong += 1 }
        // Touching again faults no more.
        for p in order { _ = (memory.base + p * page).load(as: UInt64.self) }
        server.stop()
        #expect(try recorder.finish() == pages)
        #expect(wrong == 0)
        let trace = try TraceFile.read(path)
        #expect(trace.regions.count == 1)
        #expect(trace.regions.first?.start == memory.range.start)
        #expect(trace.touches.map { Int(($0.address - memory.range.start) / UInt64(page)) } == order)
        #expect(trace.touches.allSatisfy { $0.kind == .missing && $0.latency > 0 })
        #expect(zip(trace.touches, trace.touches.dropFirst()).allSatisfy { $0.time <= $1.time })
        #expect(trace.dropped == 0)
    }

    @Test(.needsUserfaultfd, .enabled(if: writeTrackingAvailable, "needs FEATURE_WP_ASYNC and WP_UNPOPULATED"))
    func theWriteSamplerCountsEachWrittenPageOnce() throws {
        let pages = 64
        let memory = try MemoryMapping.anonymous(length: pages * page)
        let tracking = try WriteSampler.armWriteTracking(memory.range)
        let path = temporaryPath("writes")
        defer { unlink(path) }
        let recorder = try TraceRecorder(path: path)
        // Through /proc/<pid>/pagemap, as for another process.
        let sampler = try WriteSampler(recorder: recorder, ranges: [memory.range], pid: getpid(),
                                       intervalMilliseconds: 5, bucketPages: 1)
        for p in 10..<20 { (memory.base + p * page).storeBytes(of: 1, as: UInt8.self) }
        // Wait for two more samples, so that one scan began after these writes (a busy
        // machine may delay the sampler well past its interval).
        let seen = sampler.sampleCount
        for _ in 0..<2000 where sampler.sampleCount < seen + 2 { usleep(5_000) }
        for p in 40..<42 { (memory.base + p * page).storeBytes(of: 2, as: UInt8.self) }
        // Reading does not count.
        var sum = 0
        for p in 0..<pages { sum += Int((memory.base + p * page).load(as: UInt8.self)) }
        sampler.stop()
        try recorder.finish()
        _ = consume tracking
        #expect(sampler.error == nil)
        #expect(sum == 14)
        let trace = try TraceFile.read(path)
        #expect(trace.regions.count == 1 && trace.regions[0].writeTracked)
        #expect(trace.writeSamples.count >= 2)
        var perPage = [Int](repeating: 0, count: pages)
        for s in trace.writeSamples {
            for (k, n) in s.written.enumerated() { perPage[k] += Int(n) }
        }
        #expect(perPage == (0..<pages).map { (10..<20).contains($0) || (40..<42).contains($0) ? 1 : 0 })
        // The two groups of writes fall in different samples, in order.
        let firstWithLate = trace.writeSamples.firstIndex { $0.written[40] > 0 }
        let firstWithEarly = trace.writeSamples.firstIndex { $0.written[10] > 0 }
        #expect(firstWithEarly != nil && firstWithLate != nil && firstWithEarly! < firstWithLate!)
    }

    @Test(.needsUserfaultfd, .enabled(if: writeTrackingAvailable, "needs FEATURE_WP_ASYNC and WP_UNPOPULATED"))
    func theDemoTracesItsKnownShape() throws {
        var demo = TraceDemo()
        demo.sweepPages = 512
        demo.hotPages = 128
        demo.randomPages = 512
        demo.steps = 30
        demo.stepMilliseconds = 5
        demo.sampleMilliseconds = 5
        let path = temporaryPath("demo")
        defer { unlink(path) }
        let outcome = try demo.run(tracePath: path)
        #expect(outcome.mismatches == 0)
        let trace = try TraceFile.read(path)
        #expect(trace.regions.map(\.label) == ["sequential sweep", "hot band", "random reads"])
        let report = TraceReport(trace)
        #expect(report.regions[0].touchedPages == 512)
        #expect(report.regions[1].touchedPages == demo.hotBand.count)
        #expect(report.regions[2].touchedPages > 0 && report.regions[2].touchedPages <= 30 * demo.randomPerStep)
        // Every written page lies in the band.
        for s in trace.writeSamples {
            for (k, n) in s.written.enumerated() where n > 0 {
                #expect(demo.hotBand.overlaps(k * s.bucketPages..<(k + 1) * s.bucketPages), "bucket \(k) of \(s.bucketPages) pages: \(n) written at \(s.time)")
            }
        }
        #expect(report.pageWrites >= demo.hotBand.count)
    }
}
