import Snapshot
import Testing
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// An executable built next to the tests, by name.
func builtExecutable(_ name: String) -> String {
    var buffer = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    var directory = String(decoding: buffer[0..<max(n, 0)].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    while let slash = directory.lastIndex(of: "/") {
        directory = String(directory[..<slash])
        if access(directory + "/" + name, X_OK) == 0 { return directory + "/" + name }
    }
    return name
}

/// Starts `executable` with `arguments`, its output to `log`.
func spawn(_ executable: String, _ arguments: [String], log: String) throws -> pid_t {
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 1, log, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
    posix_spawn_file_actions_adddup2(&actions, 1, 2)
    let argv = ([executable] + arguments).map { strdup($0) } + [nil]
    defer { for p in argv { free(p) } }
    var pid: pid_t = 0
    let rc = posix_spawn(&pid, executable, &actions, nil, argv, environ)
    try #require(rc == 0, "posix_spawn \(executable): \(rc)")
    return pid
}

/// Waits up to `seconds` for `pid` to exit; its exit status, or nil (then it is killed).
func exitStatus(_ pid: pid_t, seconds: Double = 60) -> Int32? {
    for _ in 0..<Int(seconds * 100) {
        var status: Int32 = 0
        if waitpid(pid, &status, WNOHANG) == pid { return status & 0x7f == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f) }
        usleep(10_000)
    }
    kill(pid, SIGKILL)
    var status: Int32 = 0
    waitpid(pid, &status, 0)
    return nil
}

/// Runs `uffd` with `arguments` to the end; its exit status and output.
func runUffd(_ arguments: [String]) throws -> (status: Int32?, output: String) {
    let log = TemporaryPath("uffd-log")
    let status = exitStatus(try spawn(builtExecutable("uffd"), arguments, log: log.path))
    return (status, String(decoding: readAll(log.path), as: UTF8.self))
}

let commandsBuilt = access(builtExecutable("uffd"), X_OK) == 0 && access(builtExecutable("uffd-test-client"), X_OK) == 0

extension SnapshotTests {
    @Suite(.serialized, .timeLimit(.minutes(3)),
           .enabled(if: captureSupported && commandsBuilt, "needs uffd and uffd-test-client built, WP_UNPOPULATED"))
    struct CommandTests {
        @Test func inspectShowsAFileAndRefusesADamagedOne() throws {
            let (file, log, _) = try smallSnapshot(name: "inspect")
            let (status, output) = try runUffd(["snapshot", "inspect", file.path])
            #expect(status == 0, "\(output)")
            #expect(output.contains("data \(log.filter { $0 != 0 }.count)"), "\(output)")
            #expect(output.contains("checksums: all"))
            var bytes = readAll(file.path)
            bytes[bytes.count - 20] ^= 1
            writeAll(file.path, bytes)
            let refused = try runUffd(["snapshot", "inspect", file.path])
            #expect(refused.status != 0 && refused.output.contains("corrupted"), "\(refused.output)")
        }

        @Test func flattenThenServeRestoresByteForByte() throws {
            let (file, log, _) = try smallSnapshot(pages: 2048, name: "serve")
            let raw = TemporaryPath("serve-raw")
            let flattened = try runUffd(["snapshot", "flatten", file.path, "--output", raw.path])
            #expect(flattened.status == 0, "\(flattened.output)")
            let bytes = readAll(raw.path)
            let bad = bytes.withUnsafeBytes { b in mismatches(log) { p, dst in memcpy(dst, b.baseAddress! + p * page, page) } }
            #expect(bytes.count == 2048 * page && bad.isEmpty, "the flattened image holds the snapshot")
            // `uffd serve` serves the image to a guest-like client, which checks every byte it faults in.
            let socket = TemporaryPath("serve-sock")
            let serveLog = TemporaryPath("serve-log")
            let serve = try spawn(builtExecutable("uffd"), ["serve", "--socket", socket.path, "--memory-file", raw.path], log: serveLog.path)
            defer { kill(serve, SIGKILL); _ = exitStatus(serve, seconds: 10) }
            var waited = 0
            while access(socket.path, F_OK) != 0 && waited < 1000 { usleep(10_000); waited += 1 }
            let clientLog = TemporaryPath("client-log")
            let client = try spawn(builtExecutable("uffd-test-client"),
                                   ["--socket", socket.path, "--image", raw.path, "--handshake", "firecracker", "--scenario", "verify"],
                                   log: clientLog.path)
            let status = exitStatus(client)
            #expect(status == 0, "client said: \(String(decoding: readAll(clientLog.path), as: UTF8.self))")
            kill(serve, SIGTERM)
            #expect(exitStatus(serve, seconds: 10) == 0)
        }
    }
}
