import TestSupport
import Testing
import Userfaultfd
@testable import FaultBench

@Suite("uffd bench: the traced contender", .needsUserfaultfd, .sharesProcess, .serialized, .timeLimit(.minutes(1)))
struct TracedContenderTests {
    @Test("The traced 4 KiB handler verifies, records every fault and is compared with the untraced one")
    func tracedHandlerIsMeasuredBesideTheUntracedOne() throws {
        let configuration = BenchConfiguration(sizeMiB: 2, repetitions: 1, contenders: [.swiftHandler4k, .swiftHandler4kTraced])
        let report = try Benchmark.run(configuration)
        #expect(report.notMeasured.isEmpty, "\(report.notMeasured)")
        for pattern in AccessPattern.allCases {
            let traced = try #require(report.result(.swiftHandler4kTraced, pattern))
            // A trace missing any fault would mark the figure unverified, with the count.
            #expect(traced.verified, "\(pattern): \(traced.note ?? "")")
            let target = report.targets.first { $0.summary.hasPrefix("swift-handler-4k-traced") && $0.pattern == pattern }
            #expect(target?.comparable == true)
            #expect(target?.value == report.ratio(.swiftHandler4kTraced, to: .swiftHandler4k, pattern))
        }
    }
}
