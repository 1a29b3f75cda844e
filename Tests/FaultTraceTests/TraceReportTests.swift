import TestSupport
import FaultEngine
import FaultTrace
import Testing

@Suite(.sharesProcess) struct TraceReportTests {
    let options = TraceReport.Options(timeBins: 64, addressRows: 96, orderEntries: 10)

    @Test func theHeatMapShowsTheSweepAsADiagonalAndTheHotBandAsAStripe() throws {
        let report = TraceReport(knownTrace(), options: options)
        let cells = elements("rect", in: TraceSVG.heatMap(report)).filter { $0.attributes["class"] == "cell" }
        let sweep = cells.filter { $0.int("data-region") == 0 }
        let hot = cells.filter { $0.int("data-region") == 1 }
        // One page per row, one row per millisecond bin: a diagonal of single touches.
        #expect(sweep.count == 64)
        #expect(sweep.allSatisfy { $0.int("data-row") == $0.int("data-bin") && $0.int("data-touches") == 1 && $0.int("data-writes") == 0 })
        #expect(Set(sweep.compactMap { $0.int("data-row") }) == Set(0..<64))
        // Rows 8..<16 written in every bin, nothing else.
        #expect(hot.count == 8 * 64)
        #expect(hot.allSatisfy { (8..<16).contains($0.int("data-row") ?? -1) && $0.int("data-writes") == 1 && $0.int("data-touches") == 0 })
        #expect(Set(hot.compactMap { $0.int("data-bin") }) == Set(0..<64))
        // Cells are drawn inside their region's band, which is stacked below the previous one.
        let regions = elements("rect", in: TraceSVG.heatMap(report)).filter { $0.attributes["class"] == "region" }
        #expect(regions.count == 2)
        let top1 = try #require(regions[1].int("y"))
        #expect(hot.allSatisfy { ($0.int("y") ?? 0) >= top1 })
        #expect(sweep.allSatisfy { ($0.int("y") ?? .max) < top1 })
    }

    @Test func theWorkingSetCurveHasTheKnownValues() {
        let ms: UInt64 = 1_000_000
        let region = TraceRegion(space: 0, start: 0x1000_0000, length: UInt64(16 * page))
        func at(_ t: UInt64, _ p: Int) -> TraceTouch {
            TraceTouch(space: 0, time: t * ms, address: region.start + UInt64(p * page), latency: 100)
        }
        // Pages 0, 1, 1 again (a second fault on a page), 2, 3, 4; an address outside the region.
        let touches = [at(5, 0), at(15, 1), at(25, 1), at(26, 2), at(27, 3), at(35, 4),
                       TraceTouch(space: 0, time: 36 * ms, address: 0x10, latency: 1)]
        let sample = WriteSample(region: 0, time: 20 * ms, interval: 10 * ms, bucketPages: 4, written: [3, 0, 1, 0])
        let trace = Trace(pageSize: page, duration: 40 * ms, regions: [region], touches: touches, writeSamples: [sample])
        let report = TraceReport(trace, options: TraceReport.Options(timeBins: 4))
        #expect(report.workingSet.map(\.pages) == [1, 2, 4, 5])
        #expect(report.workingSet.map(\.timeNanoseconds) == [10, 20, 30, 40].map { $0 * ms })
        #expect(report.workingSet.map(\.pageWrites) == [0, 4, 0, 0])
        #expect(report.distinctPages == 5)
        #expect(report.faults == 7)
        #expect(report.faultsOutsideRegions == 1)
        #expect(report.firstTouchOrder.map(\.page) == [0, 1, 2, 3, 4])
        #expect(report.firstTouchOrder.map(\.sourceOffset) == [0, 1, 2, 3, 4].map { UInt64($0 * page) })
        var moved = trace
        moved.regions[0].sourceOffset = 1 << 20
        #expect(moved.firstTouchSourceOffsets() == [0, 1, 2, 3, 4].map { UInt64((1 << 20) + $0 * page) })
    }

    @Test func latencyPercentilesAndBucketsCountEveryFault() {
        let region = TraceRegion(space: 0, start: 0, length: UInt64(8 * page))
        let latencies: [UInt64] = [1000, 1500, 3000, 70_000]
        let touches = latencies.enumerated().map { i, l in
            TraceTouch(space: 0, time: UInt64(i), address: UInt64(i * page), latency: l)
        }
        let report = TraceReport(Trace(pageSize: page, duration: 10, regions: [region], touches: touches))
        #expect(report.latency.p50Nanoseconds == 1500)
        #expect(report.latency.p99Nanoseconds == 70_000)
        #expect(report.latency.maxNanoseconds == 70_000)
        #expect(report.latency.buckets.reduce(0) { $0 + $1.count } == 4)
        // 1000 and 1500 share [512, 2048)... 1000 is in [512,1024), 1500 in [1024,2048).
        #expect(report.latency.buckets.first { $0.toNanoseconds == 1024 }?.count == 1)
        #expect(report.latency.buckets.first { $0.toNanoseconds == 2048 }?.count == 1)
        #expect(report.latency.buckets.first { $0.toNanoseconds == 4096 }?.count == 1)
        #expect(report.latency.buckets.first { $0.toNanoseconds == 131_072 }?.count == 1)
        let bars = elements("rect", in: TraceSVG.latency(report)).filter { $0.attributes["class"] == "bar" }
        #expect(bars.compactMap { $0.int("data-count") }.reduce(0, +) == 4)
    }

    @Test func thePageIsSelfContainedAndEscapesLabels() {
        var trace = knownTrace()
        trace.regions[0].label = "<script>alert(1)</script>"
        let report = TraceReport(trace, options: options)
        let html = TracePage.html(trace, report: report)
        #expect(!html.contains("<script"))
        #expect(html.contains("&lt;script&gt;"))
        let outside = html.replacing("xmlns=\"http://www.w3.org/2000/svg\"", with: "")
        #expect(!outside.contains("http") && !outside.contains("src="), "the page refers to an outside resource")
        #expect(elements("svg", in: html).count == 4)
        let json = report.json()
        #expect(json.contains("\"distinctPages\" : 64"))
        #expect(TracePage.summary(report).contains("64 distinct page(s)"))
    }

    @Test func extremeValuesFromAFileRenderWithoutOverflow() throws {
        let top = UInt64.max - UInt64(8 * page) + 1
        let region = TraceRegion(space: 7, start: top, length: UInt64(4 * page), sourceOffset: .max, writeTracked: true)
        let touches = [TraceTouch(space: 7, time: .max, address: top + UInt64(3 * page), latency: UInt64(UInt32.max)),
                       TraceTouch(space: 7, time: 0, address: top, latency: 0)]
        let sample = WriteSample(region: 0, time: .max, interval: .max, bucketPages: 1 << 30, written: [.max])
        let trace = Trace(pageSize: page, duration: .max, regions: [region], touches: touches, writeSamples: [sample])
        let decoded = try TraceFile.decode(TraceFile.encode(trace))
        let report = TraceReport(decoded, options: TraceReport.Options(timeBins: 7, addressRows: 3))
        #expect(report.distinctPages == 2)
        #expect(report.workingSet.last?.pages == 2)
        #expect(report.pageWrites == Int(UInt32.max))
        #expect(TracePage.html(decoded, report: report).contains("</html>"))
    }
}
