import FaultEngine
import FaultManager
import TestSupport
import Testing
import Userfaultfd
import UserfaultfdDiagnostics

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

extension ManagerTests {
    /// Clients whose guest memory is hugetlb (2 MiB pages), as Firecracker maps it with
    /// `"page_size": 2097152`.
    @Suite(.serialized, .usesHugePages, .timeLimit(.minutes(1)))
    struct HugePageServingTests {
        static let hugePage = UInt64(HugePages.size)

        @Test(.needsFreeHugePages(4), arguments: ["firecracker", "native"])
        func hugetlbClientIsServedByteForByte(handshake: String) throws {
            // 8 MiB: two regions of two huge pages each.
            let fixture = try Fixture(imageLength: 8 << 20)
            let client = try fixture.client(["--handshake", handshake, "--memory", "hugetlb", "--scenario", "verify"])
            #expect(client.waitForExit() == 0, "client said: \(client.text)")
            #expect(client.text.contains("OK verify 4 pages"))
            #expect(fixture.wait { fixture.manager.clients.first?.serving == false })
            let report = try #require(fixture.manager.clients.first)
            #expect(report.handshake == handshake)
            #expect(report.regions.count == 2)
            #expect(report.regions.allSatisfy { $0.pageSize == Self.hugePage })
            #expect(report.statistics.missingFaults == 4)
            #expect(report.statistics.pagesInstalled == 4)
            #expect(report.bytesServed == UInt64(fixture.imageLength))
            #expect(report.statistics.faultsOutsideRegions == 0)
            #expect(report.statistics.lastError == nil)
            #expect(report.endReason == "the process exited")
        }

        @Test(.needsFreeHugePages(4))
        func releasedHugePagesReadZerosAfterwards() throws {
            let fixture = try Fixture(imageLength: 8 << 20)
            let client = try fixture.client(["--handshake", "firecracker", "--memory", "hugetlb", "--scenario", "remove"])
            #expect(client.waitForExit() == 0, "client said: \(client.text)")
            #expect(client.text.contains("OK remove"))
            #expect(fixture.wait { fixture.manager.clients.first?.serving == false })
            let report = try #require(fixture.manager.clients.first)
            #expect(report.statistics.removeEvents >= 1)
            #expect(report.statistics.zeroPages == 1)
            #expect(report.statistics.lastError == nil)
        }

        // (The "layout" scenario needs eight pages per region: sixteen huge pages, too many here.)
        @Test(.needsFreeHugePages(4), arguments: ["remap", "unmap"])
        func layoutChangesOnHugePages(scenario: String) throws {
            try checkLayoutChanges(scenario: scenario)
        }

        /// The child of a fork is served only through EVENT_FORK.
        @Test(.enabled(if: geteuid() == 0, "the test client asks for EVENT_FORK only as root"), .needsFreeHugePages(4))
        func forkOnHugePages() throws {
            try checkLayoutChanges(scenario: "fork")
        }

        private func checkLayoutChanges(scenario: String) throws {
            let fixture = try Fixture(imageLength: 8 << 20)
            for handshake in ["firecracker", "native"] {
                let client = try fixture.client(["--handshake", handshake, "--memory", "hugetlb", "--scenario", scenario])
                #expect(client.waitForExit() == 0, "\(handshake) \(scenario): \(client.text)")
                #expect(client.text.contains("OK \(scenario)"))
            }
            #expect(fixture.wait { fixture.manager.clients.allSatisfy { !$0.serving } })
            let clients = fixture.manager.clients
            #expect(clients.allSatisfy { $0.statistics.faultsOutsideRegions == 0 && $0.statistics.lastError == nil },
                    "\(clients.map(\.statistics))")
            if scenario == "fork" {
                // Each client's forked child was adopted with the parent's page size.
                #expect(clients.filter { $0.handshake == "fork" }.count == 2)
                #expect(clients.allSatisfy { $0.regions.allSatisfy { $0.pageSize == Self.hugePage } })
            }
        }

        @Test(.needsFreeHugePages(4))
        func workingSetOfHugePagesIsRecordedAndReplayed() throws {
            var template = Array("/tmp/uffd-ws-XXXXXX".utf8CString)
            let dir = String(cString: try #require(mkdtemp(&template)))
            let path = dir + "/ws"
            defer { unlink(path); rmdir(dir) }
            // Half of the four huge pages.
            let arguments = ["--handshake", "firecracker", "--memory", "hugetlb", "--scenario", "workingset", "--touch-percent", "50"]
            do {
                let fixture = try Fixture(imageLength: 8 << 20) { $0.recordWorkingSet = path }
                let client = try fixture.client(arguments)
                #expect(client.waitForExit() == 0, "client said: \(client.text)")
                #expect(fixture.wait { fixture.manager.clients.first?.serving == false })
                let recorded = try #require(fixture.manager.clients.first)
                #expect(recorded.statistics.missingFaults == 2)
                #expect(recorded.statistics.pagesInstalled == 2)
            }
            let offsets = try WorkingSetFile.read(path)
            #expect(offsets.count == 2)
            #expect(offsets.allSatisfy { $0 % Self.hugePage == 0 && $0 < 8 << 20 })

            let fixture = try Fixture(imageLength: 8 << 20) { $0.replayWorkingSet = path }
            let client = try fixture.client(arguments)
            #expect(client.waitForExit() == 0, "client said: \(client.text)")
            #expect(fixture.wait { fixture.manager.clients.first?.serving == false })
            #expect(fixture.log.contains("replayed the working set: 2 pages"), "log: \(fixture.log.all)")
            let replayed = try #require(fixture.manager.clients.first)
            #expect(replayed.statistics.missingFaults <= 1)
        }

        @Test(.needsFreeHugePages(4))
        func daemonConfiguredForAnotherStrategyServesHugePagesWithCopy() throws {
            let fixture = try Fixture(imageLength: 8 << 20) { $0.server.strategy = .move(chunkPages: 16) }
            let client = try fixture.client(["--handshake", "native", "--memory", "hugetlb", "--scenario", "verify"])
            #expect(client.waitForExit() == 0, "client said: \(client.text)")
            #expect(fixture.wait { fixture.manager.clients.first?.serving == false })
            let report = try #require(fixture.manager.clients.first)
            #expect(report.statistics.pagesInstalled == 4)
            #expect(fixture.log.contains("2097152-byte pages are served with the copy strategy, not move"), "log: \(fixture.log.all)")
        }

        @Test(.needsUserfaultfd) func mixedPageSizesAreRefusedWithTheReason() throws {
            let fixture = try Fixture(imageLength: 8 << 20)
            // Refused before anything is registered or served: the addresses need not exist.
            let uffd = try Userfaultfd(features: [])
            let regions = [
                ClientRegion(start: 0x4000_0000, length: UInt64(systemPageSize), backingOffset: 0, pageSize: UInt64(systemPageSize)),
                ClientRegion(start: 0x4020_0000, length: Self.hugePage, backingOffset: Self.hugePage, pageSize: Self.hugePage),
            ]
            do {
                try ManagerClient.handOver(uffd, regions: regions, to: fixture.socketPath)
                Issue.record("a client with 4 KiB and 2 MiB regions was accepted")
            } catch {
                guard case .refused(let why) = error else {
                    Issue.record("not refused: \(error)")
                    return
                }
                #expect(why.contains("mixed page sizes"), "\(why)")
            }
            #expect(fixture.manager.clients.isEmpty)
            #expect(fixture.manager.refusedCount == 1)
            #expect(fixture.log.contains("refused handshake", "mixed page sizes"))
        }
    }
}
