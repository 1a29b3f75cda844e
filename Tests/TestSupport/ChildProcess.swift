import Userfaultfd
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Seconds on the monotonic clock, for test deadlines.
public func monotonicSeconds() -> Double {
    MonotonicClock.seconds()
}

/// The path of `name` in the directory of the test bundle (or one above it), where
/// `swift build` puts the package's executables; nil if there is none.
public func builtExecutable(_ name: String) -> String? {
    var buffer = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    guard n > 0 else { return nil }
    var directory = String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    while let slash = directory.lastIndex(of: "/") {
        directory = String(directory[..<slash])
        let candidate = directory + "/" + name
        if access(candidate, X_OK) == 0 { return candidate }
        if directory.isEmpty { break }
    }
    return nil
}

/// An executable run by a test, its standard output and error collected through one pipe.
/// A process still running when this value goes away is killed and reaped.
public final class ChildProcess {
    /// The child's process id.
    public let pid: pid_t
    private let output: Int32
    private var collected: [UInt8] = []
    private var status: Int32?

    /// Starts `executable` with `arguments`.
    ///
    /// - Parameters:
    ///   - executable: the path of the program.
    ///   - arguments: its arguments (without the program name).
    ///   - standardError: whether its standard error is collected too (otherwise it is
    ///     the test's own).
    /// - Throws: ``SpawnError`` if the pipe or the process cannot be made.
    public init(_ executable: String, _ arguments: [String], standardError: Bool = true) throws {
        let spawned: SpawnedProcess
        do {
            spawned = try SpawnedProcess(executable, arguments, standardError: standardError)
        } catch {
            throw SpawnError(operation: error.operation, code: error.errno?.rawValue ?? EINVAL)
        }
        pid = spawned.pid
        output = spawned.output
        _ = fcntl(output, F_SETFL, O_NONBLOCK)
    }

    deinit {
        if status == nil {
            kill(pid, SIGKILL)
            _ = waitForExit(seconds: 5)
        }
        close(output)
    }

    /// Everything the child printed so far.
    public var text: String {
        drain()
        return String(decoding: collected, as: UTF8.self)
    }

    /// Waits until the child printed `line`.
    ///
    /// - Parameter seconds: how long to wait.
    /// - Returns: whether it did (false if it exited or the time ran out first).
    public func waitForOutput(_ line: String, seconds: Double = 20) -> Bool {
        let deadline = monotonicSeconds() + seconds
        while monotonicSeconds() < deadline {
            if text.contains(line) { return true }
            if status != nil || reaped() { return text.contains(line) }
            usleep(10_000)
        }
        return false
    }

    /// Waits for the child to exit.
    ///
    /// - Parameter seconds: how long to wait.
    /// - Returns: its exit status (128 + the signal if a signal ended it), or nil if it
    ///   was still running when the time was up.
    public func waitForExit(seconds: Double = 60) -> Int32? {
        let deadline = monotonicSeconds() + seconds
        while status == nil {
            if reaped() { break }
            if monotonicSeconds() > deadline { return nil }
            drain()
            usleep(5_000)
        }
        drain()
        return status.map { SpawnedProcess.exitCode(waitStatus: $0) }
    }

    /// Whether the child has exited (and is reaped now).
    private func reaped() -> Bool {
        var st: Int32 = 0
        guard waitpid(pid, &st, WNOHANG) == pid else { return false }
        status = st
        return true
    }

    private func drain() {
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(output, $0.baseAddress, $0.count) }
            if n <= 0 { return }
            collected.append(contentsOf: chunk[0..<n])
        }
    }
}

/// A child process that could not be started.
public struct SpawnError: Error, CustomStringConvertible {
    public var operation: String
    public var code: Int32
    public var description: String { "\(operation) failed: \(String(cString: strerror(code)))" }
}
