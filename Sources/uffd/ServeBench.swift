import ArgumentParser
import FaultEngine
import FaultManager
import Logging
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// `uffd serve-bench`: the daemon's two targets, measured against baselines of the same run.
///
/// It runs `uffd-test-client` processes (found next to this executable) against
/// managers started in this process, over a temporary image file:
/// - restore with and without `--replay`: the time from the hand-over to the end of the
///   first pass over a working set, medians of alternating runs, and their ratio;
/// - isolation: per-client p99 fault latency of N concurrent clients against the p99
///   of one client alone on the same image, with time-shared handler threads and with
///   the daemon's real-time ones.
/// Every client checks every byte it touched against the image; a client that finds
/// a wrong byte fails the benchmark.
struct ServeBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve-bench",
        abstract: "Measure the manager daemon: working-set replay speed-up and per-client latency under concurrency.",
        discussion: """
            Needs uffd-test-client next to this executable (`swift build -c release` builds both). \
            Ratios are against baselines measured in the same run: restore without --replay, and \
            one client served alone.
            """)

    @Option(name: .long, help: "Size of the image for the replay measurement, in MiB.")
    var imageMib: Int = 1024

    @Option(name: .long, help: "Percentage of the image's pages the restored client touches.")
    var touchPercent: Int = 15

    @Option(name: .long, help: "Runs of each replay contender (medians are reported).")
    var repetitions: Int = 5

    @Option(name: .long, help: "Concurrent clients in the isolation measurement.")
    var clients: Int = 16

    @Option(name: .long, help: "Memory of each client in the isolation measurement, in MiB.")
    var clientMib: Int = 64

    @Option(name: .long, help: "SCHED_FIFO priority of the handler threads, as `uffd serve` (0: time-shared only).")
    var handlerPriority: Int = 1

    @Option(name: .long, help: "Where to create the image and sockets (a fresh directory is made inside).")
    var directory: String = "/tmp"

    @Option(name: .long, help: "The test client executable (default: uffd-test-client next to this executable).")
    var clientExecutable: String?

    @Flag(name: .long, help: "Print the results as JSON.")
    var json = false

    func validate() throws {
        if imageMib < 4 { throw ValidationError("--image-mib must be at least 4") }
        if !(1...100).contains(touchPercent) { throw ValidationError("--touch-percent must be between 1 and 100") }
        if repetitions < 1 { throw ValidationError("--repetitions must be at least 1") }
        if !(1...256).contains(clients) { throw ValidationError("--clients must be between 1 and 256") }
        try Serve.validate(handlerPriority: handlerPriority)
        if clientMib < 4 || clientMib > imageMib { throw ValidationError("--client-mib must be at least 4 and at most --image-mib") }
    }

    func run() throws {
        let client = try clientExecutable ?? siblingExecutable("uffd-test-client")
        guard access(client, X_OK) == 0 else {
            throw ValidationError("no test client at \(client): build it with `swift build -c release` (or pass --client-executable)")
        }
        let logger = ServeRunner.standardErrorLogger(level: .warning)
        let work = try BenchDirectory(inside: directory)
        defer { work.remove() }
        let image = work.path + "/image.bin"
        note("writing a \(imageMib) MiB image")
        try writeImage(image, bytes: imageMib << 20)
        let bench = ServeBenchRun(client: client, image: image, work: work, logger: logger)

        // Replay: record once, then alternate cold and replayed restores.
        let workingSet = work.path + "/ws"
        let clientArguments = ["--image", image, "--handshake", "firecracker", "--scenario", "workingset",
                               "--touch-percent", "\(touchPercent)"]
        note("recording the working set")
        _ = try bench.serve(record: workingSet, replay: nil, clients: [clientArguments], handlerPriority: handlerPriority)
        var cold: [UInt64] = []
        var warm: [UInt64] = []
        for r in 0..<repetitions {
            note("restore \(r + 1) of \(repetitions)")
            for replay in [false, true] {
                let outcome = try bench.serve(record: nil, replay: replay ? workingSet : nil, clients: [clientArguments],
                                              handlerPriority: handlerPriority)
                guard let t = outcome.outputs[0].value(after: "TIME_NS ") else {
                    throw ServeBenchError("the workingset client printed no time: \(outcome.outputs[0])")
                }
                if replay { warm.append(t) } else { cold.append(t) }
            }
        }

        // Isolation: one client alone, then N at once, on the first clientMib of the image;
        // with time-shared handlers, then with the daemon's real-time ones.
        let verify = ["--image", image, "--scenario", "verify", "--length", "\(clientMib << 20)"]
        var isolation: [IsolationResult] = []
        for priority in handlerPriority == 0 ? [0] : [0, handlerPriority] {
            let policy = IsolationResult.policy(priority)
            var alone: [UInt64] = []
            for r in 0..<3 {
                note("one client alone, \(policy), run \(r + 1) of 3")
                let outcome = try bench.serve(record: nil, replay: nil, clients: [verify + ["--handshake", "native"]], handlerPriority: priority)
                alone.append(outcome.reports[0].statistics.latencyP99)
            }
            note("\(clients) concurrent clients, \(policy)")
            let many = (0..<clients).map { verify + ["--handshake", $0 % 2 == 0 ? "native" : "firecracker"] }
            let outcome = try bench.serve(record: nil, replay: nil, clients: many, handlerPriority: priority)
            let refused = outcome.reports.compactMap(\.statistics.lastError).first { $0.contains("SCHED_FIFO") }
            isolation.append(IsolationResult(handlerPriority: priority, realTimeRefused: refused,
                                             aloneP99Nanoseconds: alone, concurrentP99Nanoseconds: outcome.reports.map(\.statistics.latencyP99)))
        }

        let result = ServeBenchResult(
            imageMiB: imageMib, touchPercent: touchPercent, repetitions: repetitions,
            coldNanoseconds: cold, replayNanoseconds: warm,
            clients: clients, clientMiB: clientMib, cpus: Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))),
            isolation: isolation)
        print(json ? result.json : result.table)
    }

    private func note(_ text: String) {
        if json { return }
        let line = Array("serve-bench: \(text)\n".utf8)
        _ = line.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
    }
}

struct ServeBenchError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// One isolation measurement: a client alone, then many at once.
struct IsolationResult {
    var handlerPriority: Int
    /// Why real-time scheduling did not take effect, if it did not.
    var realTimeRefused: String?
    var aloneP99Nanoseconds: [UInt64]
    var concurrentP99Nanoseconds: [UInt64]

    var aloneMedian: UInt64 { median(aloneP99Nanoseconds) }
    var concurrentMedian: UInt64 { median(concurrentP99Nanoseconds) }
    var concurrentWorst: UInt64 { concurrentP99Nanoseconds.max() ?? 0 }
    var worstOverAlone: Double { Double(concurrentWorst) / Double(max(aloneMedian, 1)) }
    var policy: String { Self.policy(handlerPriority) }
    static func policy(_ priority: Int) -> String { priority == 0 ? "time-shared handlers" : "SCHED_FIFO \(priority) handlers" }
}

/// What `uffd serve-bench` measured.
struct ServeBenchResult {
    var imageMiB: Int
    var touchPercent: Int
    var repetitions: Int
    var coldNanoseconds: [UInt64]
    var replayNanoseconds: [UInt64]
    var clients: Int
    var clientMiB: Int
    var cpus: Int
    var isolation: [IsolationResult]

    var coldMedian: UInt64 { median(coldNanoseconds) }
    var replayMedian: UInt64 { median(replayNanoseconds) }
    var replaySpeedup: Double { Double(coldMedian) / Double(max(replayMedian, 1)) }

    var table: String {
        func ms(_ ns: UInt64) -> String { formatted(Double(ns) / 1e6, 2) + " ms" }
        func us(_ ns: UInt64) -> String { formatted(Double(ns) / 1e3, 0) + " µs" }
        var lines = [
            "replay (\(imageMiB) MiB image, \(touchPercent) % working set, medians of \(repetitions)):",
            "  first pass without --replay  \(ms(coldMedian))   runs: \(coldNanoseconds.map(ms).joined(separator: ", "))",
            "  first pass with --replay     \(ms(replayMedian))   runs: \(replayNanoseconds.map(ms).joined(separator: ", "))",
            "  speed-up                     \(formatted(replaySpeedup, 2))x (target >= 3)",
        ]
        for i in isolation {
            lines += [
                "isolation (\(clients) clients of \(clientMiB) MiB at once, \(cpus) CPUs, \(i.policy)):",
                "  p99 of one client alone      \(us(i.aloneMedian))   runs: \(i.aloneP99Nanoseconds.map(us).joined(separator: ", "))",
                "  per-client p99, concurrent   median \(us(i.concurrentMedian)), worst \(us(i.concurrentWorst))",
                "                               \(i.concurrentP99Nanoseconds.sorted().map(us).joined(separator: ", "))",
                "  worst concurrent / alone     \(formatted(i.worstOverAlone, 1))x",
            ]
            if let why = i.realTimeRefused { lines.append("  note: \(why)") }
        }
        return lines.joined(separator: "\n")
    }

    var json: String {
        func list(_ v: [UInt64]) -> String { "[" + v.map(String.init).joined(separator: ", ") + "]" }
        let runs = isolation.map { i in
            "{\"handlerPriority\": \(i.handlerPriority), \"realTimeRefused\": \(i.realTimeRefused.map(jsonQuoted) ?? "null"), "
                + "\"aloneP99Nanoseconds\": \(list(i.aloneP99Nanoseconds)), \"concurrentP99Nanoseconds\": \(list(i.concurrentP99Nanoseconds)), "
                + "\"aloneMedian\": \(i.aloneMedian), \"concurrentMedian\": \(i.concurrentMedian), \"concurrentWorst\": \(i.concurrentWorst)}"
        }
        return """
            {
              "replay": {"imageMiB": \(imageMiB), "touchPercent": \(touchPercent), "coldNanoseconds": \(list(coldNanoseconds)), \
            "replayNanoseconds": \(list(replayNanoseconds)), "coldMedian": \(coldMedian), "replayMedian": \(replayMedian), \
            "speedup": \(formatted(replaySpeedup, 3))},
              "isolation": {"clients": \(clients), "clientMiB": \(clientMiB), "cpus": \(cpus), "runs": [
                \(runs.joined(separator: ",\n    "))
              ]}
            }
            """
    }
}

private func median(_ values: [UInt64]) -> UInt64 {
    let s = values.sorted()
    return s.isEmpty ? 0 : s[s.count / 2]
}

private func formatted(_ value: Double, _ decimals: Int) -> String {
    var scale = 1.0
    for _ in 0..<decimals { scale *= 10 }
    let scaled = Int((value * scale).rounded())
    if decimals == 0 { return "\(scaled)" }
    let whole = scaled / Int(scale), fraction = "\(abs(scaled) % Int(scale))"
    return "\(whole)." + String(repeating: "0", count: decimals - fraction.count) + fraction
}

/// Runs managers and client processes for the benchmark.
struct ServeBenchRun {
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
    func serve(record: String?, replay: String?, clients arguments: [[String]], handlerPriority: Int) throws -> Outcome {
        let socket = work.path + "/serve.sock"
        unlink(socket)
        let configuration = ManagerConfiguration(
            socketPath: socket, memoryFile: image,
            server: Serve.serverConfiguration(handlerPriority: handlerPriority),
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
            let n = chunk.withUnsafeMutableBytes { read(output, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            collected.append(contentsOf: chunk[0..<n])
        }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
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
            let n = buffer.withUnsafeBytes { pwrite(fd, $0.baseAddress! + done, chunk - done, off_t(offset + done)) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw ServeBenchError("cannot write \(path): errno \(errno)") }
            done += n
        }
        offset += chunk
    }
}

/// The path of an executable in the same directory as this one.
func siblingExecutable(_ name: String) throws -> String {
    var buffer = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    guard n > 0 else { throw ServeBenchError("cannot read /proc/self/exe: errno \(errno)") }
    let me = String(decoding: buffer.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    return String(me[..<(me.lastIndex(of: "/") ?? me.startIndex)]) + "/" + name
}
