import FaultEngine
import FaultManager
import Logging
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Runs managers and client processes for the benchmark.
struct ManagedClients {
    var client: String
    var image: String
    var work: BenchDirectory
    var logger: Logger

    struct Outcome {
        var outputs: [ClientOutput]
        var reports: [ClientReport]
    }

    /// Starts a manager as `uffd serve` would (same defaults), runs the clients at once,
    /// waits for all of them, and returns what they printed and the manager's reports.
    func serve(record: String?, replay: String?, clients arguments: [[String]], server: FaultServerConfiguration) throws -> Outcome {
        let socket = work.path + "/serve.sock"
        unlink(socket)
        let configuration = ManagerConfiguration(
            socketPath: socket, memoryFile: image,
            server: server,
            recordWorkingSet: record, replayWorkingSet: replay)
        let manager = try Manager(configuration, logger: logger)
        try manager.start()
        defer { manager.stop() }
        var processes: [ClientOutput] = []
        for a in arguments { processes.append(try ClientOutput(client, ["--socket", socket] + a)) }
        for p in processes {
            let status = p.wait()
            if status != 0 { throw ServeBenchError("a client exited with status \(status): \(p.text)") }
        }
        // Each client's server ends when its process exits: wait for every report.
        var reports: [ClientReport] = []
        for _ in 0..<1000 {
            reports = manager.clients
            if reports.count == arguments.count && reports.allSatisfy({ !$0.serving }) { break }
            usleep(10_000)
        }
        guard reports.count == arguments.count, reports.allSatisfy({ !$0.serving }) else {
            throw ServeBenchError("the manager did not end all \(arguments.count) clients within 10 s")
        }
        manager.stop()
        if let record, access(record, R_OK) != 0 {
            throw ServeBenchError("no working set was recorded at \(record)")
        }
        return Outcome(outputs: processes, reports: reports)
    }
}

/// A client process whose standard output is collected.
final class ClientOutput {
    let pid: pid_t
    private let output: Int32
    private var collected: [UInt8] = []

    init(_ executable: String, _ arguments: [String]) throws {
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else { throw UserfaultfdError(operation: "pipe", errno: .init(rawValue: errno)) }
        // Neither end may leak into the clients spawned later (a read would never see EOF).
        for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, fds[1], 1)
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
    }

    deinit { close(output) }

    /// Reads the output to its end and waits for the process; returns its exit status
    /// (128 + the signal if a signal ended it).
    func wait() -> Int32 {
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = retryOnInterrupt { chunk.withUnsafeMutableBytes { read(output, $0.baseAddress, $0.count) } }
            if n <= 0 { break }
            collected.append(contentsOf: chunk[0..<n])
        }
        var status: Int32 = 0
        _ = retryOnInterrupt { waitpid(pid, &status, 0) }
        return status & 0x7f == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
    }

    var text: String { String(decoding: collected, as: UTF8.self) }

    /// The number that follows `prefix` on a line of the output.
    func value(after prefix: String) -> UInt64? {
        for line in text.split(separator: "\n") where line.hasPrefix(prefix) {
            return UInt64(line.dropFirst(prefix.count).prefix { $0.isNumber })
        }
        return nil
    }
}

/// A fresh directory for the benchmark's files, removed with everything in it.
struct BenchDirectory {
    let path: String

    init(inside parent: String) throws {
        var template = Array((parent + "/uffd-serve-bench.XXXXXX").utf8CString)
        guard let p = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw ServeBenchError("cannot create a directory in \(parent): errno \(errno)")
        }
        path = String(cString: p)
    }

    func remove() {
        for name in ["image.bin", "ws", "serve.sock"] { unlink(path + "/" + name) }
        rmdir(path)
    }
}

/// Writes `bytes` of a pattern that differs per page and per byte, so a page served
/// from the wrong offset is caught by the clients' checks.
func writeImage(_ path: String, bytes: Int) throws {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
    guard fd >= 0 else { throw ServeBenchError("cannot create \(path): errno \(errno)") }
    defer { close(fd) }
    let chunk = 1 << 20
    var buffer = [UInt8](repeating: 0, count: chunk)
    var offset = 0
    while offset < bytes {
        buffer.withUnsafeMutableBufferPointer { b in
            for i in stride(from: 0, to: chunk, by: 8) {
                let word = UInt64(offset + i) &* 0x9E37_79B9_7F4A_7C15
                (UnsafeMutableRawPointer(b.baseAddress!) + i).storeBytes(of: word, as: UInt64.self)
            }
        }
        var done = 0
        while done < chunk {
            let n = retryOnInterrupt { buffer.withUnsafeBytes { pwrite(fd, $0.baseAddress! + done, chunk - done, off_t(offset + done)) } }
            guard n > 0 else { throw ServeBenchError("cannot write \(path): errno \(errno)") }
            done += n
        }
        offset += chunk
    }
}
