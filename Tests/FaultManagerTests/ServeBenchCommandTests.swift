import FaultManager
import Foundation
import ManagerBench
import Testing

#if canImport(Glibc)
import Glibc
#endif

extension ManagerTests {
    // The restore measurement reserves huge pages (as root) for its 2 MiB contender.
    @Test(.enabled(if: access(ManagerTests.uffdPath, X_OK) == 0, "the uffd executable is built next to the tests"), .usesHugePages)
    func serveBenchReportsEveryRunOfBothMeasurements() throws {
        let fixture = try Fixture()
        let bench = try ClientProcess(["serve-bench", "--image-mib", "8", "--client-mib", "4", "--repetitions", "2",
                                       "--clients", "3", "--directory", fixture.directory, "--json"],
                                      executable: Self.uffdPath)
        #expect(bench.waitForExit(seconds: 120) == 0, "serve-bench said: \(bench.text)")
        let decoded = try JSONDecoder().decode(ServeBenchResult.self, from: Data(bench.text.utf8))
        let result = (replay: try #require(decoded.replay), isolation: try #require(decoded.isolation))
        // Two restores of each kind, three runs alone, one p99 per concurrent client; all measured.
        #expect(result.replay.coldNanoseconds.count == 2)
        #expect(result.replay.replayNanoseconds.count == 2)
        #expect((result.replay.coldNanoseconds + result.replay.replayNanoseconds).allSatisfy { $0 > 0 })
        #expect(result.replay.speedup == Double(result.replay.coldMedian) / Double(result.replay.replayMedian))
        // Isolation with time-shared handlers, then with the daemon's real-time ones.
        #expect(result.isolation.runs.map(\.handlerPriority) == [0, 1])
        for run in result.isolation.runs {
            #expect(run.aloneP99Nanoseconds.count == 3)
            #expect(run.concurrentP99Nanoseconds.count == 3)
            #expect(run.concurrentP99Nanoseconds.allSatisfy { $0 > 0 })
            // The ratio the table shows is in the JSON.
            #expect(run.worstOverAlone == Double(run.concurrentWorst) / Double(run.aloneMedian))
        }
        // Its temporary directory is gone.
        var entries = 0
        if let d = opendir(fixture.directory) {
            while let e = readdir(d) {
                let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                if name.hasPrefix("uffd-serve-bench") { entries += 1 }
            }
            closedir(d)
        }
        #expect(entries == 0, "the benchmark's directory was left behind")
        // The whole-image restore: every contender has both passes, each run checked byte for byte by its client.
        let restore = try #require(decoded.restore)
        #expect(restore.rows.map(\.pass) == Array(repeating: "write", count: restore.rows.count / 2) + Array(repeating: "read", count: restore.rows.count / 2))
        #expect(restore.rows.first?.contender == "MAP_PRIVATE of the page-cached file")
        #expect(restore.rows.contains { $0.contender == "uffd serve, 4 KiB pages" })
        // 2 MiB pages ran, or their absence is explained.
        #expect(restore.rows.contains { $0.pageSize == 2 << 20 } != (restore.skipped.count == 1))
        for row in restore.rows {
            #expect(row.nanoseconds.count == 2 && row.nanoseconds.allSatisfy { $0 > 0 })
            #expect(row.bytes == 8 << 20)
            let baseline = try #require(restore.rows.first { $0.pass == row.pass })
            #expect(row.speedOverMapPrivate == Double(baseline.median) / Double(row.median))
            #expect((row.target != nil) == (row.pass == "write" && row.contender.hasPrefix("uffd")))
            // Through the daemon, the row says how it was served; MAP_PRIVATE has no daemon.
            #expect((row.daemonStrategy != nil) == row.contender.hasPrefix("uffd"))
            if let faults = row.daemonFaults { #expect(faults > 0) }
        }
    }

    @Test(.enabled(if: access(ManagerTests.uffdPath, X_OK) == 0, "the uffd executable is built next to the tests"), .usesHugePages)
    func serveBenchTakesOnlyThePartsAskedFor() throws {
        let fixture = try Fixture()
        let bench = try ClientProcess(["serve-bench", "--image-mib", "8", "--client-mib", "4", "--repetitions", "1",
                                       "--only", "restore", "--directory", fixture.directory, "--json"],
                                      executable: Self.uffdPath)
        #expect(bench.waitForExit(seconds: 120) == 0, "serve-bench said: \(bench.text)")
        let result = try JSONDecoder().decode(ServeBenchResult.self, from: Data(bench.text.utf8))
        #expect(result.replay == nil && result.isolation == nil)
        #expect(try #require(result.restore).rows.allSatisfy { $0.nanoseconds.count == 1 })
    }

    @Test(.enabled(if: access(ManagerTests.uffdPath, X_OK) == 0, "the uffd executable is built next to the tests"))
    func serveBenchRefusesBadOptions() throws {
        // Usage errors exit with 64 (EX_USAGE); a directory that cannot be made, with 1.
        let cases: [([String], Int32)] = [
            (["--touch-percent", "0"], 64), (["--clients", "0"], 64), (["--client-mib", "16"], 64),
            (["--client-executable", "/nonexistent/client"], 64), (["--only", "everything"], 64), (["--handler-priority", "100"], 64), (["--directory", "/nonexistent/dir"], 1),
        ]
        for (arguments, expected) in cases {
            let bench = try ClientProcess(["serve-bench", "--image-mib", "8", "--client-mib", "4", "--repetitions", "1"] + arguments,
                                          executable: Self.uffdPath)
            #expect(bench.waitForExit(seconds: 60) == expected, "\(arguments)")
            #expect(!bench.text.contains("speed"), "\(arguments) ran the benchmark")
        }
    }
}
