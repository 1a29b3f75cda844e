import FaultManager
import Logging
import Synchronization
import TestSupport
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


/// The `uffd-test-client` executable, built next to the test bundle.
let testClientPath: String = builtExecutable("uffd-test-client") ?? "uffd-test-client"

/// A running `uffd-test-client` (or, with `executable`, another program), its standard
/// output collected through a pipe.
typealias ClientProcess = ChildProcess

extension ChildProcess {
    convenience init(_ arguments: [String], executable: String = testClientPath) throws {
        try self.init(executable, arguments, standardError: false)
    }
}
