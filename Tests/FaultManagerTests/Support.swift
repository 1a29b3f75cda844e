import FaultManager
import Logging
import Synchronization
import Testing
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Log lines kept in memory, so tests can check what the daemon said.
final class LogCapture: Sendable {
    private let lines = Mutex<[String]>([])

    var all: [String] { lines.withLock { $0 } }

    func append(_ line: String) { lines.withLock { $0.append(line) } }

    func contains(_ fragments: String...) -> Bool {
        all.contains { line in fragments.allSatisfy { line.contains($0) } }
    }

    var logger: Logger {
        Logger(label: "test.manager") { _ in CapturingHandler(capture: self) }
    }

    struct CapturingHandler: LogHandler {
        let capture: LogCapture
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .debug
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(event: LogEvent) {
            capture.append("\(event.level) \(event.message)")
        }
    }
}

/// A temporary directory (world-readable, so a client under another uid can use it),
/// an image file of random bytes, and a running manager on a socket in it.
final class Fixture {
    let directory: String
    let imagePath: String
    let imageLength: Int
    let socketPath: String
    let log = LogCapture()
    let manager: Manager

    init(imageLength: Int = 8 << 20, memoryFile: Bool = true, configure: (inout ManagerConfiguration) -> Void = { _ in }) throws {
        var template = Array("/tmp/uffd-manager-XXXXXX".utf8CString)
        guard let dir = mkdtemp(&template) else { throw UserfaultfdError(operation: "mkdtemp", errno: .init(rawValue: errno)) }
        directory = String(cString: dir)
        chmod(directory, 0o755)
        imagePath = directory + "/image.bin"
        self.imageLength = imageLength
        try Fixture.writeRandomImage(imagePath, length: imageLength)
        socketPath = directory + "/manager.sock"
        var configuration = ManagerConfiguration(socketPath: socketPath, memoryFile: memoryFile ? imagePath : nil)
        configuration.livenessPollMilliseconds = 50
        configure(&configuration)
        manager = try Manager(configuration, logger: log.logger)
        try manager.start()
    }

    deinit {
        manager.stop()
        for name in ["image.bin", "manager.sock", "workingset"] { unlink(directory + "/" + name) }
        rmdir(directory)
    }

    static func writeRandomImage(_ path: String, length: Int) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        if fd < 0 { throw UserfaultfdError(operation: "create \(path)", errno: .init(rawValue: errno)) }
        defer { close(fd) }
        var state: UInt64 = 0x1234_5678
        var chunk = [UInt64](repeating: 0, count: 8192)
        var written = 0
        while written < length {
            for i in chunk.indices {
                state &+= 0x9E37_79B9_7F4A_7C15
                var z = state
                z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
                chunk[i] = z ^ (z >> 27)
            }
            let n = min(chunk.count * 8, length - written)
            _ = chunk.withUnsafeBytes { write(fd, $0.baseAddress, n) }
            written += n
        }
    }

    /// Runs the test client against this fixture's socket and image.
    func client(_ arguments: [String]) throws -> ClientProcess {
        try ClientProcess(["--socket", socketPath, "--image", imagePath] + arguments)
    }

    /// Waits until `condition` holds, up to `seconds`.
    func wait(seconds: Double = 10, until condition: () -> Bool) -> Bool {
        let deadline = monotonicSeconds() + seconds
        while monotonicSeconds() < deadline {
            if condition() { return true }
            usleep(20_000)
        }
        return condition()
    }
}

func monotonicSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// The descriptors this process has open, as "number target" (so a number reused
/// for another file counts as new).
///
/// Suites of other modules run in parallel and open descriptors of their own: a
/// test checks that every descriptor opened since its baseline is closed again
/// (`openedSince(baseline).isEmpty` within a wait), not that the count is equal.
func openDescriptors() -> Set<String> {
    guard let dir = opendir("/proc/self/fd") else { return [] }
    defer { closedir(dir) }
    var open: Set<String> = []
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        if name == "." || name == ".." { continue }
        var target = [CChar](repeating: 0, count: 256)
        let n = readlink("/proc/self/fd/" + name, &target, target.count - 1)
        let link = n > 0 ? String(decoding: target[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : "?"
        open.insert(name + " " + link)
    }
    return open
}

/// Descriptors open now that were not open at `baseline` (the listing's own
/// directory descriptor excluded).
func openedSince(_ baseline: Set<String>) -> Set<String> {
    openDescriptors().subtracting(baseline).filter { !$0.hasSuffix("/fd") }
}

/// The `uffd-test-client` executable, built next to the test bundle.
let testClientPath: String = {
    var buffer = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    let exe = String(decoding: buffer[0..<max(n, 0)].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    var directory = exe
    while let slash = directory.lastIndex(of: "/") {
        directory = String(directory[..<slash])
        let candidate = directory + "/uffd-test-client"
        if access(candidate, X_OK) == 0 { return candidate }
        if directory.isEmpty { break }
    }
    return "uffd-test-client"
}()

/// A running `uffd-test-client`, its output collected through a pipe.
final class ClientProcess {
    let pid: pid_t
    private let output: Int32
    private var collected: [UInt8] = []
    private(set) var status: Int32?

    init(_ arguments: [String], executable: String = testClientPath) throws {
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else { throw UserfaultfdError(operation: "pipe", errno: .init(rawValue: errno)) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, fds[1], 1)
        posix_spawn_file_actions_addclose(&actions, fds[0])
        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        defer { for p in argv { free(p) } }
        var child: pid_t = 0
        let rc = posix_spawn(&child, executable, &actions, nil, argv, environ)
        close(fds[1])
        if rc != 0 {
            close(fds[0])
            throw UserfaultfdError(operation: "posix_spawn \(executable)", errno: .init(rawValue: rc))
        }
        pid = child
        output = fds[0]
        _ = fcntl(output, F_SETFL, O_NONBLOCK)
    }

    deinit {
        if status == nil {
            kill(pid, SIGKILL)
            _ = waitForExit(seconds: 5)
        }
        close(output)
    }

    private func drain() {
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(output, $0.baseAddress, $0.count) }
            if n <= 0 { return }
            collected.append(contentsOf: chunk[0..<n])
        }
    }

    /// Everything the client printed so far.
    var text: String {
        drain()
        return String(decoding: collected, as: UTF8.self)
    }

    /// Waits until the client printed `line`, up to `seconds`.
    func waitForOutput(_ line: String, seconds: Double = 20) -> Bool {
        let deadline = monotonicSeconds() + seconds
        while monotonicSeconds() < deadline {
            if text.contains(line) { return true }
            if status != nil || exited() { return text.contains(line) }
            usleep(10_000)
        }
        return false
    }

    private func exited() -> Bool {
        var st: Int32 = 0
        let r = waitpid(pid, &st, WNOHANG)
        if r == pid { status = st }
        return r == pid
    }

    /// Waits for the client to exit; returns its exit status (or 128 + signal), nil on timeout.
    func waitForExit(seconds: Double = 60) -> Int32? {
        let deadline = monotonicSeconds() + seconds
        while status == nil {
            if exited() { break }
            if monotonicSeconds() > deadline { return nil }
            drain()
            usleep(5_000)
        }
        drain()
        guard let st = status else { return nil }
        if st & 0x7f == 0 { return (st >> 8) & 0xff }
        return 128 + (st & 0x7f)
    }
}
