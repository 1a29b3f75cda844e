import FaultBench
import Foundation
import TestSupport
import Testing

/// The `uffd` executable built next to the tests, if it is there.
let uffdExecutable = builtExecutable("uffd")

extension FaultBenchTests {
    @Suite("uffd bench command", .needsUserfaultfd, .enabled(if: uffdExecutable != nil, "the uffd executable is built next to the tests"))
    struct BenchCommandTests {
        @Test("--only takes contender names, runs just those, and prints JSON the model decodes")
        func onlyRunsTheNamedContenders() throws {
            let bench = try ChildProcess(try #require(uffdExecutable),
                                         ["bench", "--size-mib", "1", "--repetitions", "1", "--quiet", "--json",
                                          "--only", "memcpy", "c-handler-4k", "memcpy"])
            #expect(bench.waitForExit(seconds: 60) == 0, "uffd bench said: \(bench.text)")
            let document = try JSONDecoder().decode(BenchDocument.self, from: Data(bench.text.utf8))
            #expect(Set(document.rows.map(\.name)) == ["memcpy", "c-handler-4k"])
            #expect(document.rows.count == 4, "two contenders on two patterns, memcpy once")
            #expect(document.rows.allSatisfy { $0.verified && $0.usPerPage != nil })
            #expect(document.rows.filter { $0.name == "c-handler-4k" }.allSatisfy { $0.vsMemcpy != nil })
        }

        @Test("An unknown contender is a usage error that lists the known names")
        func unknownContenderIsRefused() throws {
            let bench = try ChildProcess(try #require(uffdExecutable), ["bench", "--only", "memcpy", "warp-drive"])
            #expect(bench.waitForExit(seconds: 60) == 64)
            #expect(bench.text.contains("warp-drive"))
            for contender in Contender.allCases {
                #expect(bench.text.contains(contender.rawValue), "\(contender) is not listed")
            }
        }
    }
}
