import Testing

#if canImport(Glibc)
import Glibc
#endif

/// `uffd serve` in a process of its own, so that its threads, descriptors and memory
/// can be counted (and limited) apart from the tests'.
final class DaemonProcess {
    let process: ClientProcess
    let socketPath: String

    /// The `uffd` executable: `UFFD_SERVE_EXECUTABLE` if set (to measure another build), else the one next to the tests.
    static var executable: String {
        if let path = getenv("UFFD_SERVE_EXECUTABLE") { return String(cString: path) }
        return ManagerTests.uffdPath
    }

    static var available: Bool { access(executable, X_OK) == 0 }

    init(_ fixture: Fixture, name: String = "serve.sock", arguments: [String] = []) throws {
        socketPath = fixture.directory + "/" + name
        process = try ClientProcess(["serve", "--socket", socketPath, "--memory-file", fixture.imagePath] + arguments,
                                    executable: Self.executable)
        guard fixture.wait(until: { access(socketPath, F_OK) == 0 }) else {
            throw UserfaultfdTestError("uffd serve did not create its socket: \(process.text)")
        }
    }

    deinit {
        kill(process.pid, SIGTERM)
        _ = process.waitForExit(seconds: 10)
        unlink(socketPath)
    }

    var pid: pid_t { process.pid }

    /// Whether the daemon still runs.
    var isRunning: Bool { kill(pid, 0) == 0 && process.waitForExit(seconds: 0) == nil }

    /// Resident memory, threads and open descriptors of the daemon now.
    struct Usage: CustomStringConvertible {
        var rssKiB: Int
        var threads: Int
        var descriptors: Int
        var description: String { "RSS \(rssKiB) KiB, \(threads) threads, \(descriptors) fds" }
    }

    var usage: Usage {
        var usage = Usage(rssKiB: 0, threads: 0, descriptors: 0)
        if let status = readText("/proc/\(pid)/status") {
            for line in status.split(separator: "\n") {
                let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
                if fields.first == "VmRSS:", fields.count > 1 { usage.rssKiB = Int(fields[1]) ?? 0 }
                if fields.first == "Threads:", fields.count > 1 { usage.threads = Int(fields[1]) ?? 0 }
            }
        }
        if let dir = opendir("/proc/\(pid)/fd") {
            while let entry = readdir(dir) {
                if entry.pointee.d_name.0 != CChar(UInt8(ascii: ".")) { usage.descriptors += 1 }
            }
            closedir(dir)
        }
        return usage
    }
}

struct UserfaultfdTestError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// A small text file's contents (from /proc or /sys); nil if it cannot be read.
func readText(_ path: String) -> String? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    if fd < 0 { return nil }
    defer { close(fd) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n <= 0 { break }
        bytes += chunk[0..<n]
    }
    return String(decoding: bytes, as: UTF8.self)
}

/// Writes `text` to a /proc or /sys file; false if refused.
@discardableResult
func writeText(_ path: String, _ text: String) -> Bool {
    let fd = open(path, O_WRONLY | O_CLOEXEC)
    if fd < 0 { return false }
    defer { close(fd) }
    let bytes = Array(text.utf8)
    return bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) } == bytes.count
}
