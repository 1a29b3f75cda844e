import TestSupport
import Testing
import Userfaultfd
@testable import Postcopy

#if canImport(Glibc)
import Glibc
#endif

/// `uffd migrate` as a user runs it: what it prints and how it ends.
@Suite(.needsUserfaultfd, .sharesProcess, .serialized, .timeLimit(.minutes(1)))
struct MigrateCommandTests {
    /// A source that shakes hands for the demo workload (4 MiB and its log), switches
    /// over, lets the destination's workload fault on pages it never sends, then vanishes.
    func vanishingSource(to endpoint: MigrationEndpoint, token: [UInt8]) throws {
        let lengths: [UInt64] = [4 << 20, UInt64(DemoWorkload.logBytes(forDataBytes: 4 << 20))]
        let stream = try Peer.connect(endpoint)
        try Peer.send(stream, Peer.hello(.stream, token: token, lengths: lengths))
        let urgent = try Peer.connect(endpoint)
        try Peer.send(urgent, Peer.hello(.urgent, token: token, lengths: lengths))
        let (welcome, _) = try stream.receiveControl(pageSize: systemPageSize)
        #expect(welcome.type == .welcome)
        try Peer.send(stream, Peer.control(.switchover, Wire.encodeRuns([])))
        let (resumed, _) = try stream.receiveControl(pageSize: systemPageSize)
        #expect(resumed.type == .resumed)
        usleep(300_000)
        stream.shutdown()
        urgent.shutdown()
    }

    @Test func aFailedMigrationEndsReceiveWithAnErrorNotASignal() throws {
        let path = "/tmp/uffd-pc-receive-\(getpid()).sock"
        // The receiver ends by exiting with the error: its socket file stays behind.
        defer { unlink(path) }
        let secret = "cli test token"
        let child = try ChildProcess(try #require(builtExecutable("uffd"), "uffd is built next to the tests"),
                                     ["migrate", "receive", "--listen", "unix:\(path)", "--recovery-timeout", "300",
                                      "--workers", "2", "--run-after", "0"],
                                     environment: ["UFFD_MIGRATE_TOKEN=\(secret)"])
        try vanishingSource(to: .unix(path: path), token: Array(secret.utf8))
        let status = try #require(child.wait(seconds: 30), "uffd migrate receive did not end")
        let errors = child.standardError
        let signal = status & 0x7f
        #expect(signal == 0, "killed by signal \(signal); stderr: \(errors)")
        #expect(signal == 0 && (status >> 8) & 0xff == 1, "wait status \(status); stderr: \(errors)")
        #expect(errors.contains("not recovered in time"), "\(errors)")
    }

    @Test func aTokenOnTheCommandLineWorksButWarns() throws {
        let listener = try MigrationListener(.tcp(host: "127.0.0.1", port: 0))
        let endpoint = listener.endpoint.description
        let child = try ChildProcess(try #require(builtExecutable("uffd"), "uffd is built next to the tests"),
                                     ["migrate", "send", "--to", endpoint, "--token", "s3cr3t-on-argv", "--size", "1",
                                      "--warmup", "0", "--json"])
        // Refuse it: only the warning matters here.
        let stream = try? Peer.accept(listener)
        stream?.shutdown()
        let status = try #require(child.wait(seconds: 30))
        let errors = child.standardError
        #expect(status != 0)
        #expect(errors.contains("visible to every local user"), "\(errors)")
        #expect(errors.contains("--token-file"), "\(errors)")
        #expect(!errors.contains("s3cr3t-on-argv"), "the warning repeats the token: \(errors)")
    }

    @Test func aTokenFileIsReadAndTrimmed() throws {
        let path = "/tmp/uffd-pc-token-\(getpid())"
        defer { unlink(path) }
        for (mode, warns) in [(mode_t(0o600), false), (mode_t(0o644), true)] {
            let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, mode)
            try #require(fd >= 0)
            fchmod(fd, mode)
            _ = write(fd, "s3cret\n", 7)
            close(fd)
            let resolved = try MigrationToken.resolve(commandLine: nil, file: path, environment: "ignored")
            #expect(resolved.token == Array("s3cret".utf8))
            #expect(resolved.warnings.isEmpty == !warns, "\(resolved.warnings)")
        }
    }

    @Test func tokenSourcesArePickedAndChecked() throws {
        let fromEnvironment = try MigrationToken.resolve(commandLine: nil, file: nil, environment: "env token")
        #expect(fromEnvironment == .init(token: Array("env token".utf8), warnings: []))
        let fromCommandLine = try MigrationToken.resolve(commandLine: "cli", file: nil, environment: "env token")
        #expect(fromCommandLine.token == Array("cli".utf8))
        #expect(fromCommandLine.warnings.count == 1)
        #expect(throws: MigrationError.self) { try MigrationToken.resolve(commandLine: nil, file: nil, environment: nil) }
        #expect(throws: MigrationError.self) { try MigrationToken.resolve(commandLine: "a", file: "/dev/null", environment: nil) }
        #expect(throws: MigrationError.self) { try MigrationToken.resolve(commandLine: nil, file: "/nonexistent/token", environment: nil) }
        #expect(throws: MigrationError.self) {
            try MigrationToken.resolve(commandLine: String(repeating: "x", count: 257), file: nil, environment: nil)
        }
    }
}
