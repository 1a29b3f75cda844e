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
    private let process: SpawnedProcess
    private var collected: [UInt8] = []

    init(_ executable: String, _ arguments: [String]) throws {
        process = try SpawnedProcess(executable, arguments)
    }

    deinit { close(process.output) }

    /// Reads the output to its end and waits for the process; returns its exit status
    /// (128 + the signal if a signal ended it).
    func wait() -> Int32 {
        collected += process.readToEnd()
        return SpawnedProcess.exitCode(waitStatus: process.waitStatus())
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
