import FaultManager
import Testing

#if canImport(Glibc)
import Glibc
#endif

extension ManagerTests {
    /// The `uffd` executable, built next to the test client.
    static var uffdPath: String {
        String(testClientPath.dropLast("uffd-test-client".count)) + "uffd"
    }

    @Test(.enabled(if: access(ManagerTests.uffdPath, X_OK) == 0, "the uffd executable is built next to the tests"))
    func serveCommandPrintsStatisticsOnSIGUSR1AndExitsOnSIGTERM() throws {
        // The fixture's own manager is not used; the command serves the same image on another socket.
        let fixture = try Fixture()
        let socket = fixture.directory + "/serve.sock"
        defer { unlink(socket) }
        let serve = try ClientProcess(["serve", "--socket", socket, "--memory-file", fixture.imagePath, "--json"],
                                      executable: Self.uffdPath)
        #expect(fixture.wait { access(socket, F_OK) == 0 })
        let client = try ClientProcess(["--socket", socket, "--image", fixture.imagePath, "--handshake", "firecracker", "--scenario", "verify"])
        #expect(client.waitForExit() == 0, "client said: \(client.text)")
        // Statistics on SIGUSR1 arrive while the daemon keeps running.
        #expect(fixture.wait {
            kill(serve.pid, SIGUSR1)
            usleep(100_000)
            return serve.text.contains("\"serving\" : false")
        })
        #expect(serve.text.contains("\"handshake\" : \"firecracker\""))
        #expect(serve.text.contains("\"pagesInstalled\" : 2048"))
        kill(serve.pid, SIGTERM)
        #expect(serve.waitForExit(seconds: 10) == 0)
        #expect(access(socket, F_OK) != 0, "the socket file is removed on exit")
    }
}
