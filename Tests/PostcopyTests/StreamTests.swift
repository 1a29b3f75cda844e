import Foundation
import Synchronization
import TestSupport
import Testing
import Userfaultfd
@testable import Postcopy

#if canImport(Glibc)
import Glibc
#endif

/// The pages a source sends along with a requested one, and the CPU time both sides report.
@Suite(.needsUserfaultfd, .serialized, .sharesProcess, .timeLimit(.minutes(1)))
struct StreamTests {
    /// Migrates `testBytes` while a destination thread touches pages far from where the
    /// stream starts, going down by 97 pages: each fault is a request.
    func migrate(pagesAfterRequest: Int) throws -> (MigrationStatistics, MigrationStatistics, differing: Int, wrong: Int) {
        let source = try MemoryMapping.anonymous(length: testBytes)
        fill(source)
        let wrong = Atomic<Int>(0)
        let workers = Mutex<[DedicatedThread]>([])
        let run = try DestinationRun(onResume: { d in
            let range = d.regions[0]
            let t = DedicatedThread(name: "test-work") {
                wrong.add(readDown(range, from: Int(range.length) / systemPageSize - 200, by: 97).wrong, ordering: .relaxed)
            }
            workers.withLock { $0.append(t) }
        })
        var options = MigrationSource.Options(token: token, mode: .postcopy)
        options.pagesAfterRequest = pagesAfterRequest
        let stats = try MigrationSource(regions: [source.range], options: options).migrate(to: run.listener.endpoint) {}
        run.wait()
        workers.withLock { for t in $0 { t.join() } }
        let destination = try #require(run.destination)
        let destinationStats = try #require(try run.result?.get())
        return (stats, destinationStats, differingPages(source.range, destination.regions[0]), wrong.load(ordering: .relaxed))
    }

    @Test(arguments: [0, 31, 64])
    func pagesSentAlongARequestTravelOnceAndArriveIntact(pagesAfterRequest: Int) throws {
        let (stats, _, differing, wrong) = try migrate(pagesAfterRequest: pagesAfterRequest)
        #expect(differing == 0)
        #expect(wrong == 0)
        // Every page once: no duplicate, and the data bytes are exactly the non-zero pages.
        #expect(stats.duplicatesDropped == 0)
        #expect(stats.streamBytes + stats.requestBytes == testBytes / 4 * 3)
        #expect(stats.zeroPages == testBytes / systemPageSize / 4)
        if pagesAfterRequest == 0 {
            #expect(stats.pagesSentAfterRequests == 0)
        } else if stats.requestedPages >= 2 {
            // After the first request the stream jumps past it, so the pages after the
            // second one (97 pages lower) are still missing and go along with it.
            #expect(stats.pagesSentAfterRequests > 0)
        }
        #expect(stats.pagesSentAfterRequests <= stats.requestedPages * min(pagesAfterRequest, Wire.maxRunPages))
    }

    @Test func bothSidesReportTheirCPUTimePerGBMoved() throws {
        let (stats, destinationStats, differing, _) = try migrate(pagesAfterRequest: 31)
        #expect(differing == 0)
        #expect(stats.pageBytesSent == stats.streamBytes + stats.requestBytes)
        #expect(stats.pageBytesSent == testBytes / 4 * 3)
        // Moving 48 MiB takes some CPU on each side, and less than the whole run on all CPUs.
        #expect(stats.sourceCPUSeconds > 0)
        #expect(stats.destinationCPUSeconds > 0)
        #expect(stats.sourceCPUSeconds < stats.totalSeconds * Double(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
        #expect(stats.destinationCPUSeconds == destinationStats.destinationCPUSeconds)
        #expect(stats.sourceCPUSecondsPerGB == stats.sourceCPUSeconds / (Double(stats.pageBytesSent) / 1e9))
        #expect(stats.destinationCPUSecondsPerGB == stats.destinationCPUSeconds / (Double(stats.pageBytesSent) / 1e9))
    }

    @Test func theDestinationReportCarriesItsCPUTime() throws {
        var report = DestinationReport()
        report.faults = 3
        report.latencyCount = 2
        report.cpuNanoseconds = 1_500_000_000
        let bytes = report.encode()
        #expect(bytes.count == 80)
        #expect(try DestinationReport.decode(bytes) == report)
        #expect(throws: MigrationError.self) { try DestinationReport.decode(Array(bytes.dropLast(8))) }
        var stats = MigrationStatistics()
        report.apply(to: &stats)
        #expect(stats.destinationCPUSeconds == 1.5)
    }

    @Test func cpuFiguresAreInTheJSONAndOlderReportsStillDecode() throws {
        var s = MigrationStatistics()
        s.pageBytesSent = 2_000_000_000
        s.sourceCPUSeconds = 1
        s.destinationCPUSeconds = 3
        s.pagesSentAfterRequests = 7
        s.streamBytes = 1_000_000_000
        s.requestBytes = 500_000_000
        s.streamSeconds = 1
        let json = s.json
        #expect(json.contains("\"sourceCPUSecondsPerGB\":0.5"))
        #expect(json.contains("\"destinationCPUSecondsPerGB\":1.5"))
        #expect(json.contains("\"postcopyBytesPerSecond\":1500000000"))
        #expect(json.contains("\"pagesSentAfterRequests\":7"))
        #expect(try MigrationJSON.decode(MigrationStatistics.self, from: json) == s)
        // A report written before these figures existed.
        var older = MigrationStatistics()
        older.postcopyFaults = 5
        let trimmed = older.json
            .replacingOccurrences(of: ",\"pageBytesSent\":0", with: "")
            .replacingOccurrences(of: ",\"pagesSentAfterRequests\":0", with: "")
            .replacingOccurrences(of: ",\"sourceCPUSeconds\":0", with: "")
            .replacingOccurrences(of: "\"destinationCPUSeconds\":0,", with: "")
        #expect(!trimmed.contains("\"pageBytesSent\""))
        #expect(!trimmed.contains("\"destinationCPUSeconds\""))
        #expect(try MigrationJSON.decode(MigrationStatistics.self, from: trimmed) == older)
    }
}
