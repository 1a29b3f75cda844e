import TestSupport
import Foundation
import PagedMemory
import Testing

@Suite(.sharesProcess, .serialized, .enabled(if: canUseUserfaultfd, "this process cannot create a userfaultfd"))
struct ProcessTests {
    @Test("flush is durable: another process reads the written bytes after the writer exits without unmapping", .timeLimit(.minutes(2)))
    func flushIsDurable() throws {
        let file = try PatternFile(size: 4 << 20)
        let run = try runHelper(["flush", file.path, "7"])
        #expect(run.status == 0 && run.output.contains("flushed"), "\(run.output)")
        let words = file.words()
        var wrong = 0
        for (i, w) in words.enumerated() where w != (i % 512 == 0 ? UInt64(i) &* 7 : PatternFile.pattern(i)) { wrong += 1 }
        #expect(wrong == 0)
    }

    @Test("a store read error gives the faulting thread SIGBUS and is reported on the mapping", .timeLimit(.minutes(1)))
    func storeErrorGivesSIGBUS() throws {
        let run = try runHelper(["sigbus"])
        #expect(run.status == 0, "\(run.output)")
        #expect(run.output.contains("good 90"), "the page before the failing range reads the store's bytes: \(run.output)")
        #expect(run.output.contains("signalled 1"), "the toucher got SIGBUS: \(run.output)")
        // The toucher reads 40 KiB into the mapping: the error names its page's offset.
        let failingPage = (40 << 10) / pageBytes * pageBytes
        #expect(run.output.contains("reading the page at offset \(failingPage) failed: errno 5"), "\(run.output)")
        #expect(!run.output.contains("read "), "the failing load never returned: \(run.output)")
    }
}
