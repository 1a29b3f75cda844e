import FaultManager
import SystemPackage
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The pids cgroup (v1) controller, where a thread limit can be set for one process.
private let pidsCgroup = "/sys/fs/cgroup/pids"

private var canLimitThreads: Bool {
    geteuid() == 0 && access(pidsCgroup + "/cgroup.procs", W_OK) == 0 && DaemonProcess.available
}

extension ManagerTests {
    /// With a pids limit reached (systemd's TasksMax=, a container's pids.max), a
    /// connection whose handshake thread cannot start is refused and the daemon keeps serving.
    @Test(.enabled(if: canLimitThreads, "needs root, the pids cgroup v1 controller and the uffd executable"))
    func threadCreationFailureRefusesTheConnectionAndServingGoesOn() throws {
        let fixture = try Fixture()
        let daemon = try DaemonProcess(fixture, arguments: ["--handshake-timeout", "60"])
        let cgroup = "\(pidsCgroup)/uffd-test-\(getpid())-\(daemon.pid)"
        #expect(mkdir(cgroup, 0o755) == 0, "mkdir \(cgroup): errno \(errno)")
        defer {
            kill(daemon.pid, SIGKILL)
            _ = daemon.process.waitForExit(seconds: 10)
            rmdir(cgroup)
        }
        try #require(writeText(cgroup + "/cgroup.procs", "\(daemon.pid)"))
        let idle = try #require(readText(cgroup + "/pids.current").flatMap { Int($0.split(separator: "\n").first ?? "") })
        // Room for one client's threads (handshake, watcher, handler, prefetcher) and a little more.
        try #require(writeText(cgroup + "/pids.max", "\(idle + 6)"))
        var silent: [FileDescriptor] = []
        defer { for fd in silent { try? fd.close() } }
        for _ in 0..<16 { silent.append(try connect(daemon.socketPath)) }
        let answers = silent.map { readReply($0, seconds: 0.5) }
        let refused = answers.filter { $0?.contains("cannot start a thread for its handshake") == true }
        #expect(refused.count >= 8, "answers: \(answers), daemon said: \(daemon.process.text)")
        #expect(daemon.isRunning, "the daemon died: \(daemon.process.text)")
        // The silent connections go; their threads end; a real client is served under the same limit.
        for fd in silent { try? fd.close() }
        silent = []
        #expect(fixture.wait { readText(cgroup + "/pids.current").flatMap { Int($0.split(separator: "\n").first ?? "") } == idle })
        let client = try fixture.client(["--socket", daemon.socketPath, "--handshake", "native", "--scenario", "verify"])
        #expect(client.waitForExit() == 0, "client said: \(client.text)")
        #expect(daemon.isRunning)
    }
}
