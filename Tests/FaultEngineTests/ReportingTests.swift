import FaultEngine
import Foundation
import Testing

extension FaultEngineTests {
    /// The one median, number format and JSON encoding every report uses.
    @Suite struct ReportingTests {
        @Test func medianIsTheMiddleOrTheMeanOfTheMiddleTwo() {
            #expect(Reporting.median([3.0, 1, 2]) == 2)
            #expect(Reporting.median([4.0, 1, 3, 2]) == 2.5)
            #expect(Reporting.median([Double]()) == nil)
            #expect(Reporting.median([UInt64(7_026_311), 691_791, 7_838_127]) == 7_026_311)
            #expect(Reporting.median([UInt64(10), 21]) == 16)   // 15.5, rounded
            #expect(Reporting.median([UInt64]()) == 0)
        }

        @Test func numbersAreWrittenWithTheirDecimalsAndGroups() {
            #expect(Reporting.fixed(2.5, 2) == "2.50")
            #expect(Reporting.fixed(-1.25, 1) == "-1.3")
            #expect(Reporting.fixed(-0.001, 2) == "0.00")
            #expect(Reporting.fixed(12.0, 0) == "12")
            #expect(Reporting.fixed(.infinity, 2) == "inf")
            #expect(Reporting.grouped(1_234_567.4) == "1 234 567")
            #expect(Reporting.grouped(-1234) == "-1 234")
            #expect(Reporting.grouped(999) == "999")
        }

        struct Sample: Codable, Equatable {
            var ratio: Double
            var note: String?
        }

        @Test func jsonLeavesOutAbsentValuesAndKeepsNonFiniteOnes() throws {
            let text = Reporting.json(Sample(ratio: 1.5, note: nil))
            #expect(!text.contains("note"))
            #expect(try JSONDecoder().decode(Sample.self, from: Data(text.utf8)) == Sample(ratio: 1.5, note: nil))
            #expect(Reporting.json(Sample(ratio: .nan, note: "a/b")).contains("\"nan\""))
            #expect(Reporting.json(Sample(ratio: 0, note: "a/b")).contains("\"a/b\""))
        }
    }
}
