import FaultManager
import TestSupport
import Testing
import Userfaultfd

#if canImport(Glibc)
import Glibc
#endif

/// Every test here runs real client processes against an in-process manager.
@Suite(.serialized, .sharesProcess, .timeLimit(.minutes(1)))
struct ManagerTests {
    @Test(.ownsProcess, arguments: ["firecracker", "native"])
    func clientIsServedByteForByte(handshake: String) throws {
        let fixture = try Fixture()
        let client = try fixture.client(["--handshake", handshake, "--scenario", "verify"])
        // Counted with the client's output pipe open, before its uffd can have arrived.
        let baseline = openDescriptors()
        #expect(client.waitForExit() == 0, "client said: \(client.text)")
        #expect(client.text.contains("OK verify 2048 pages"))
        #expect(fixture.wait { fixture.manager.clients.first?.serving == false })
        let report = try #require(fixture.manager.clients.first)
        #expect(report.handshake == handshake)
        #expect(report.pid == client.pid)
        #expect(report.uid == geteuid())
        #expect(report.statistics.pagesInstalled == 2048)
        #expect(report.bytesServed == UInt64(fixture.imageLength))
        #expect(report.statistics.faultsOutsideRegions == 0)
        #expect(report.endReason == "the process exited")
        #expect(fixture.log.contains("client \(report.id) ended", "2048 pages"))
        // The uffd and everything opened to serve it are closed once the client ended.
        #expect(fixture.wait { openedSince(baseline).isEmpty }, "still open: \(openedSince(baseline).sorted())")
    }

    @Test func nativeClientWithItsOwnBackingFile() throws {
        let fixture = try Fixture(memoryFile: false)
        let client = try fixture.client(["--handshake", "native", "--backing", "attached", "--scenario", "verify"])
        #expect(client.waitForExit() == 0, "client said: \(client.text)")
        #expect(client.text.contains("CLIENT 1"))
        // Without a memory file, a client that sends no backing is refused with the reason.
        let refused = try fixture.client(["--handshake", "native", "--scenario", "verify"])
        #expect(refused.waitForExit() == 3)
        #expect(refused.text.contains("started without a memory file"))
    }

    @Test(arguments: ["remap", "remove", "unmap"])
    func layoutChangesWhileFaulting(scenario: String) throws {
        try checkLayoutChanges(scenario: scenario)
    }

    /// The scenarios that fork: the child is served only through EVENT_FORK.
    @Test(.enabled(if: geteuid() == 0, "the test client asks for EVENT_FORK only as root"), arguments: ["fork", "layout"])
    func layoutChangesThatForkWhileFaulting(scenario: String) throws {
        try checkLayoutChanges(scenario: scenario)
    }

    private func checkLayoutChanges(scenario: String) throws {
        let fixture = try Fixture(imageLength: 16 << 20)
        for handshake in ["firecracker", "native"] {
            let client = try fixture.client(["--handshake", handshake, "--scenario", scenario])
            #expect(client.waitForExit() == 0, "\(handshake) \(scenario): \(client.text)")
            #expect(client.text.contains("OK \(scenario)"))
        }
        #expect(fixture.wait { fixture.manager.clients.allSatisfy { !$0.serving } })
        let clients = fixture.manager.clients
        #expect(clients.allSatisfy { $0.statistics.faultsOutsideRegions == 0 })
        if scenario == "fork" || scenario == "layout" {
            // Each client's forked child was adopted as a client of its own.
            #expect(clients.filter { $0.handshake == "fork" }.count == 2)
        }
        if scenario == "remove" {
            #expect(clients.allSatisfy { $0.statistics.removeEvents > 0 && $0.statistics.zeroPages > 0 })
        }
    }

    @Test func clientKilledMidFaultLeavesTheDaemonServing() throws {
        let fixture = try Fixture()
        let victim = try fixture.client(["--handshake", "native", "--scenario", "slow"])
        #expect(victim.waitForOutput("FAULTING"))
        kill(victim.pid, SIGKILL)
        #expect(victim.waitForExit() == 128 + SIGKILL)
        #expect(fixture.wait { fixture.manager.clients.first?.serving == false })
        let report = try #require(fixture.manager.clients.first)
        #expect(report.endReason == "the process exited")
        #expect(report.statistics.faults > 0)
        #expect(fixture.log.contains("client \(report.id) ended"))
        // The daemon goes on serving others.
        let next = try fixture.client(["--handshake", "firecracker", "--scenario", "verify"])
        #expect(next.waitForExit() == 0, "client said: \(next.text)")
    }

    @Test func sixteenConcurrentClientsAreIsolated() throws {
        let fixture = try Fixture(imageLength: 4 << 20)
        var clients: [ClientProcess] = []
        for i in 0..<16 {
            clients.append(try fixture.client(["--handshake", i % 2 == 0 ? "native" : "firecracker", "--scenario", "verify"]))
        }
        for (i, c) in clients.enumerated() {
            #expect(c.waitForExit() == 0, "client \(i): \(c.text)")
            #expect(c.text.contains("OK verify 1024 pages"))
        }
        #expect(fixture.wait { fixture.manager.clients.count == 16 && fixture.manager.clients.allSatisfy { !$0.serving } })
        let reports = fixture.manager.clients
        #expect(reports.count == 16)
        #expect(Set(reports.map(\.pid)) == Set(clients.map(\.pid)))
        // Each client's faults were served from its own uffd and counted for it alone:
        // every one got exactly its 1024 pages, nothing outside its regions, no error,
        // and its own latency figures (serve-bench compares them; a test does not time).
        for r in reports {
            #expect(r.statistics.pagesInstalled == 1024, "client \(r.id)")
            #expect(r.bytesServed == UInt64(fixture.imageLength), "client \(r.id)")
            #expect(r.statistics.faultsOutsideRegions == 0 && r.statistics.lastError == nil, "client \(r.id)")
            #expect(r.statistics.missingFaults > 0 && r.statistics.latencyCount == r.statistics.missingFaults, "client \(r.id)")
            #expect(r.endReason == "the process exited", "client \(r.id)")
        }
    }

    @Test func statisticsAsJSON() throws {
        let fixture = try Fixture()
        let client = try fixture.client(["--handshake", "firecracker", "--scenario", "verify"])
        #expect(client.waitForExit() == 0)
        #expect(fixture.wait { fixture.manager.clients.first?.serving == false })
        let json = fixture.manager.statisticsJSON()
        #expect(json.contains("\"handshake\" : \"firecracker\""))
        #expect(json.contains("\"pagesInstalled\" : 2048"))
        #expect(json.contains("\"refusedHandshakes\" : 0"))
    }

    /// 128 MiB: a working set of 4915 pages, installed by two threads on this machine.
    @Test(arguments: [8 << 20, 128 << 20])
    func recordThenReplayTheWorkingSet(imageLength: Int) throws {
        var template = Array("/tmp/uffd-ws-XXXXXX".utf8CString)
        let dir = String(cString: try #require(mkdtemp(&template)))
        let path = dir + "/ws"
        defer { unlink(path); rmdir(dir) }
        let arguments = ["--handshake", "firecracker", "--scenario", "workingset", "--touch-percent", "15"]
        let recorded: ClientReport
        do {
            let fixture = try Fixture(imageLength: imageLength) { $0.recordWorkingSet = path }
            let client = try fixture.client(arguments)
            #expect(client.waitForExit() == 0, "client said: \(client.text)")
            #expect(fixture.wait { fixture.manager.clients.first?.serving == false })
            recorded = try #require(fixture.manager.clients.first)
        }
        // Served page by page while recording: every touched page faulted once.
        let touched = imageLength / Int(sysconf(Int32(_SC_PAGESIZE))) * 15 / 100
        #expect(recorded.statistics.missingFaults == UInt64(touched))
        var st = stat()
        #expect(stat(path, &st) == 0 && st.st_size == 16 + 8 * touched, "the working set holds every touched page")

        let fixture = try Fixture(imageLength: imageLength) { $0.replayWorkingSet = path }
        let client = try fixture.client(arguments)
        #expect(client.waitForExit() == 0, "client said: \(client.text)")
        #expect(fixture.wait { fixture.manager.clients.first?.serving == false })
        #expect(fixture.log.contains("replayed the working set: \(touched) pages"), "log: \(fixture.log.all)")
        let replayed = try #require(fixture.manager.clients.first)
        // The set was in place before the client's first touch could be served.
        #expect(replayed.statistics.missingFaults <= 1)
    }
}
