import Snapshot
import Testing

extension SnapshotTests {
    @Suite(.serialized, .timeLimit(.minutes(3)), .enabled(if: captureSupported, "needs WP_UNPOPULATED and WP on shmem"))
    struct DemoTests {
        @Test func aSmallDemoVerifiesEveryImageAndFindsEveryWrittenPage() throws {
            var c = SnapshotDemo.Configuration()
            c.heapBytes = 8 << 20
            c.rounds = 1
            c.transparentHugePages = [false]
            c.steadySeconds = 0.05
            c.stagingBytes = 1 << 20
            c.directory = "/tmp"
            c.trackingBytes = 4 << 20
            c.trackingPages = 256
            c.trackingRounds = 1
            var lines: [String] = []
            let report = try SnapshotDemo(c).run { lines.append($0) }
            #expect(Set(report.runs.map(\.method)) == Set(DemoMethod.allCases))
            #expect(report.runs.allSatisfy { $0.mismatchedPages == 0 && $0.imageBytes > 0 }, "\(report.runs)")
            #expect(report.incremental.count == 1 && report.incremental[0].mismatchedPages == 0)
            #expect(report.incremental[0].deltaImageBytes < report.runs.first { $0.method == .uffdWP }!.imageBytes)
            #expect(report.tracking.count == TrackingMethod.allCases.count)
            #expect(report.tracking.allSatisfy { $0.pagesFound == 256 }, "every method finds exactly the written pages: \(report.tracking)")
            #expect(report.targets.contains { $0.name.hasPrefix("every image") && $0.met })
            #expect(lines.contains { $0.contains("uffd-wp") })
            #expect(report.table().contains("stop-and-copy"))
        }
    }
}
