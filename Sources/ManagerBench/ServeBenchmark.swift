import FaultEngine
import FaultManager
import Logging

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// What `uffd serve-bench` measures, and with what.
public struct ServeBenchConfiguration: Sendable {
    /// Size of the image for the replay measurement, in MiB.
    public var imageMiB = 1024
    /// Percentage of the image's pages the restored client touches.
    public var touchPercent = 15
    /// Runs of each replay contender (medians are reported).
    public var repetitions = 5
    /// Concurrent clients in the isolation measurement.
    public var clients = 16
    /// Memory of each client in the isolation measurement, in MiB.
    public var clientMiB = 64
    /// How each client's faults are served, as `uffd serve` serves them; the isolation
    /// measurement runs with time-shared handlers and, if this asks for them, with
    /// real-time ones.
    public var server: FaultServerConfiguration
    /// Where to create the image and sockets (a fresh directory is made inside).
    public var directory = "/tmp"
    /// The `uffd-test-client` executable.
    public var clientExecutable: String
    /// What to measure.
    public var parts = Set(ServeBenchResult.Part.allCases)

    public init(server: FaultServerConfiguration, clientExecutable: String) {
        self.server = server
        self.clientExecutable = clientExecutable
    }
}

/// An error of the benchmark itself (a client that failed, a file that could not be made).
public struct ServeBenchError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// The daemon's targets, measured against baselines of the same run.
///
/// It runs `uffd-test-client` processes against managers started in this process,
/// over a temporary image file:
/// - restore with and without `--replay`: the time from the hand-over to the end of the
///   first pass over a working set, medians of alternating runs, and their ratio;
/// - isolation: per-client p99 fault latency of N concurrent clients against the p99
///   of one client alone on the same image, with time-shared handler threads and with
///   the daemon's real-time ones;
/// - restore: a Firecracker-style client restoring the whole image through the daemon
///   (4 KiB pages, and 2 MiB hugetlb pages where free huge pages can be reserved)
///   against the same client mapping the page-cached file `MAP_PRIVATE`, a write pass
///   and a read pass, alternating contenders, medians and ratios to `MAP_PRIVATE`.
/// Every client checks every byte it touched against the image; a client that finds
/// a wrong byte fails the benchmark.
public enum ServeBenchmark {
    /// Runs the measurements of ``ServeBenchConfiguration/parts``.
    ///
    /// - Parameters:
    ///   - configuration: what to measure.
    ///   - logger: the managers' logger.
    ///   - progress: called with a line before each step.
    /// - Returns: every run of each measurement, with medians and ratios.
    /// - Throws: ``ServeBenchError`` or the manager's error if a run cannot take place.
    public static func run(
        _ configuration: ServeBenchConfiguration, logger: Logger, progress: (String) -> Void = { _ in }
    ) throws -> ServeBenchResult {
        let work = try BenchDirectory(inside: configuration.directory)
        defer { work.remove() }
        let image = work.path + "/image.bin"
        progress("writing a \(configuration.imageMiB) MiB image")
        try writeImage(image, bytes: configuration.imageMiB << 20)
        let bench = ManagedClients(client: configuration.clientExecutable, image: image, work: work, logger: logger)
        let parts = configuration.parts
        let replay = parts.contains(.replay) ? try measureReplay(configuration, bench, progress: progress) : nil
        let isolation = parts.contains(.isolation) ? try measureIsolation(configuration, bench, progress: progress) : nil
        let restore = parts.contains(.restore) ? try RestoreBenchmark.measure(configuration, bench, progress: progress) : nil
        return ServeBenchResult(replay: replay, isolation: isolation, restore: restore)
    }

    /// Records the working set once, then alternates cold and replayed restores.
    static func measureReplay(
        _ c: ServeBenchConfiguration, _ bench: ManagedClients, progress: (String) -> Void
    ) throws -> ServeBenchResult.Replay {
        let workingSet = bench.work.path + "/ws"
        let arguments = ["--image", bench.image, "--handshake", "firecracker", "--scenario", "workingset",
                         "--touch-percent", "\(c.touchPercent)"]
        progress("recording the working set")
        _ = try bench.serve(record: workingSet, replay: nil, clients: [arguments], server: c.server)
        var cold: [UInt64] = []
        var warm: [UInt64] = []
        for r in 0..<c.repetitions {
            progress("restore \(r + 1) of \(c.repetitions)")
            for replay in [false, true] {
                let outcome = try bench.serve(record: nil, replay: replay ? workingSet : nil, clients: [arguments], server: c.server)
                guard let t = outcome.outputs[0].value(after: "TIME_NS ") else {
                    throw ServeBenchError("the workingset client printed no time: \(outcome.outputs[0].text)")
                }
                if replay { warm.append(t) } else { cold.append(t) }
            }
        }
        return ServeBenchResult.Replay(imageMiB: c.imageMiB, touchPercent: c.touchPercent, repetitions: c.repetitions,
                                       coldNanoseconds: cold, replayNanoseconds: warm)
    }

    /// One client alone (three runs), then `clients` at once, on the first `clientMiB` of
    /// the image; with time-shared handlers, then with the configuration's real-time ones.
    static func measureIsolation(
        _ c: ServeBenchConfiguration, _ bench: ManagedClients, progress: (String) -> Void
    ) throws -> ServeBenchResult.Isolation {
        let verify = ["--image", bench.image, "--scenario", "verify", "--length", "\(c.clientMiB << 20)"]
        var runs: [ServeBenchResult.IsolationRun] = []
        for priority in c.server.handlerPriority == 0 ? [0] : [0, c.server.handlerPriority] {
            var server = c.server
            server.handlerPriority = priority
            let policy = ServeBenchResult.IsolationRun.policy(priority)
            var alone: [UInt64] = []
            for r in 0..<3 {
                progress("one client alone, \(policy), run \(r + 1) of 3")
                let outcome = try bench.serve(record: nil, replay: nil, clients: [verify + ["--handshake", "native"]], server: server)
                alone.append(outcome.reports[0].statistics.latencyP99)
            }
            progress("\(c.clients) concurrent clients, \(policy)")
            let many = (0..<c.clients).map { verify + ["--handshake", $0 % 2 == 0 ? "native" : "firecracker"] }
            let outcome = try bench.serve(record: nil, replay: nil, clients: many, server: server)
            let refused = outcome.reports.compactMap(\.statistics.lastError).first { $0.contains("SCHED_FIFO") }
            runs.append(ServeBenchResult.IsolationRun(
                handlerPriority: priority, realTimeRefused: refused,
                aloneP99Nanoseconds: alone, concurrentP99Nanoseconds: outcome.reports.map(\.statistics.latencyP99)))
        }
        return ServeBenchResult.Isolation(clients: c.clients, clientMiB: c.clientMiB,
                                          cpus: Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))), runs: runs)
    }
}
