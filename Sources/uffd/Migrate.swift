import ArgumentParser
import FaultEngine
import Postcopy
import Userfaultfd

#if canImport(Glibc)
import Glibc
#endif

/// `uffd migrate`: postcopy live migration of a running workload's memory.
struct Migrate: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "migrate",
        abstract: "Migrate a running workload's memory to another process or host (precopy, postcopy).",
        subcommands: [MigrateDemo.self, MigrateSend.self, MigrateReceive.self],
        defaultSubcommand: MigrateDemo.self)
}

/// Options every `uffd migrate` subcommand shares.
struct MigrateCommonOptions: ParsableArguments {
    @Option(help: "A file holding the pre-shared token (mode 600; a trailing newline is ignored). Default: $UFFD_MIGRATE_TOKEN.")
    var tokenFile: String?

    @Option(help: "The pre-shared token. Other local users can read it in /proc/PID/cmdline: prefer --token-file or $UFFD_MIGRATE_TOKEN.")
    var token: String?

    @Flag(help: "Print the results as JSON instead of a table.")
    var json = false

    /// The token from --token-file, --token (with a warning) or the environment.
    func resolvedToken() throws -> [UInt8] {
        let environment = getenv(MigrationToken.environmentVariable).map { String(cString: $0) }
        let resolved = try MigrationToken.resolve(commandLine: token, file: tokenFile, environment: environment)
        for warning in resolved.warnings { writeStandardError(warning + "\n") }
        return resolved.token
    }
}

/// Options of the migrated workload.
struct WorkloadOptions: ParsableArguments {
    @Option(help: "Data region size in MiB (the version log migrates beside it).")
    var size = 1024

    @Option(help: "Worker threads reading and writing the region.")
    var workers = 2

    @Option(help: "Pages after a requested one that the source sends along with it (0...64).")
    var pagesAfterRequest = 64

    @Option(help: "Kernel send buffer of the stream connections together, in KiB (smaller: shorter remote faults).")
    var streamBuffer = 256

    @Option(help: "Connections the background stream is spread over, one sending thread each (1...8).")
    var streamConnections = 2

    @Flag(help: "Send page data with MSG_ZEROCOPY (TCP only; over loopback the kernel copies anyway).")
    var zeroCopy = false

    func validate() throws {
        guard size > 0, size <= 1 << 20 else { throw ValidationError("--size must be 1...1048576 MiB, not \(size)") }
        guard (0...64).contains(pagesAfterRequest) else { throw ValidationError("--pages-after-request must be 0...64, not \(pagesAfterRequest)") }
        guard (1...64).contains(workers) else { throw ValidationError("--workers must be 1...64, not \(workers)") }
        guard (1...8).contains(streamConnections) else {
            throw ValidationError("--stream-connections must be 1...8, not \(streamConnections)")
        }
    }
}

/// How the source migrates: the options `send` and `demo` share.
struct MigrationModeOptions: ParsableArguments {
    @Option(help: "postcopy, precopy+postcopy or stop-and-copy.")
    var mode: MigrationStatistics.Mode = .precopyPostcopy

    @Option(help: "The most precopy rounds (not used by pure postcopy).")
    var precopyRounds = 4

    @Option(help: "Seconds the workload runs in the source before the migration starts.")
    var warmup = 1.0
}

/// How the destination continues the workload: the options `receive` and `demo` share.
struct DestinationOptions: ParsableArguments {
    @Option(help: "Seconds the workload keeps running in the destination once every page has arrived.")
    var runAfter = 1.0

    @Flag(help: "The destination installs pages with UFFDIO_MOVE from its receive buffer instead of UFFDIO_COPY.")
    var installByMove = false

    /// The same options on a `uffd migrate receive` command line.
    var arguments: [String] { ["--run-after", "\(runAfter)"] + (installByMove ? ["--install-by-move"] : []) }
}

extension MigrationStatistics.Mode: ExpressibleByArgument {}

/// The source side shared by `send` and `demo`: build the workload, run it, migrate it.
enum SourceRun {
    struct Result {
        var stats: MigrationStatistics
        var operationsOnSource: Int
        var readErrorsOnSource: Int
    }

    nonisolated static func run(
        to endpoint: MigrationEndpoint, token: [UInt8], workload: WorkloadOptions, migration: MigrationModeOptions,
        connectTimeoutSeconds: Double, showProgress: Bool
    ) throws -> Result {
        let dataBytes = workload.size << 20
        let data = try MemoryMapping.anonymous(length: dataBytes)
        let log = try MemoryMapping.anonymous(length: DemoWorkload.logBytes(forDataBytes: dataBytes))
        let demo = DemoWorkload(data: data.range, log: log.range, workers: workload.workers)
        demo.initialize()
        demo.start()
        usleep(UInt32(max(0, migration.warmup) * 1e6))
        var options = MigrationSource.Options(token: token, mode: migration.mode)
        options.precopyRounds = migration.precopyRounds
        options.streamBufferBytes = workload.streamBuffer << 10
        options.pagesAfterRequest = workload.pagesAfterRequest
        options.streamConnections = workload.streamConnections
        options.zeroCopy = workload.zeroCopy
        let source = try MigrationSource(regions: [data.range, log.range], options: options)
        let progress = showProgress ? ProgressLine(source) : nil
        defer { progress?.finish() }
        let deadline = MonotonicClock.seconds() + connectTimeoutSeconds
        while true {
            do {
                let stats = try source.migrate(to: endpoint) { demo.pause() }
                let result = Result(stats: stats, operationsOnSource: demo.operations, readErrorsOnSource: demo.errors)
                demo.stop()
                return result
            } catch {
                // The destination may still be starting: retry while nothing was sent.
                guard case .connectionLost = error.kind, source.progress.phase == .connecting,
                      MonotonicClock.seconds() < deadline else {
                    demo.stop()
                    throw error
                }
                usleep(50_000)
            }
        }
    }
}

/// A progress bar on standard error, redrawn by its own thread.
final class ProgressLine: @unchecked Sendable {
    private let stop: StopSignal?
    private let thread: DedicatedThread

    nonisolated init(_ source: MigrationSource) {
        let stop = try? StopSignal()
        self.stop = stop
        thread = DedicatedThread(name: "progress") {
            var last = (time: MonotonicClock.seconds(), pages: 0)
            var rate = 0.0
            while !(stop?.isRaised ?? true) {
                usleep(200_000)
                let p = source.progress
                let now = MonotonicClock.seconds()
                if now > last.time { rate = Double(max(0, p.pagesSent - last.pages) * systemPageSize) / (now - last.time) }
                last = (now, p.pagesSent)
                let fraction = p.totalPages > 0 ? Double(p.pagesSent) / Double(p.totalPages) : 0
                let filled = Int(fraction * 30)
                let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: 30 - filled)
                let phase = p.phase == .precopy ? "precopy round \(p.round)" : "\(p.phase)"
                let line = "\r[\(bar)] \(Int(fraction * 100))%  \(phase)  \(Int(rate / 1_048_576)) MiB/s   "
                writeStandardError(line)
            }
        }
    }

    func finish() {
        stop?.raise()
        thread.join()
        writeStandardError("\n")
    }
}


/// Prints rows as a two-column table.
func printTable(_ title: String, _ rows: [(String, String)]) {
    let width = rows.map(\.0.count).max() ?? 0
    print(title)
    for (name, value) in rows {
        print("  " + name + String(repeating: " ", count: width - name.count) + "  " + value)
    }
}

func statisticsRows(_ s: MigrationStatistics) -> [(String, String)] {
    func mib(_ bytes: Int) -> String { String(format1(Double(bytes) / 1_048_576)) + " MiB" }
    return [
        ("mode", s.mode.rawValue),
        ("region", mib(s.regionBytes)),
        ("total time", format1(s.totalSeconds * 1000) + " ms"),
        ("precopy rounds", "\(s.precopyRounds) (\(mib(s.precopyBytes)), \(s.discardedPages) hot pages left for postcopy)"),
        ("switchover pause", format1(s.switchoverPauseMicroseconds / 1000) + " ms" + (s.pausePages > 0 ? " (\(s.pausePages) pages while stopped)" : "")),
        ("postcopy faults", "\(s.postcopyFaults) remote, \(s.localZeroFaults) local zero"),
        ("remote-fault latency", "p50 \(format1(s.latency.p50)) µs  p90 \(format1(s.latency.p90)) µs  p99 \(format1(s.latency.p99)) µs  max \(format1(s.latency.max)) µs  (\(s.latency.count) measured)"),
        ("blocktime", format1(s.blocktimeMicroseconds / 1000) + " ms"),
        ("sent by stream", mib(s.streamBytes) + " of page data in " + format1(s.streamSeconds * 1000) + " ms ("
            + format1(s.streamBytesPerSecond / 1e9) + " GB/s), \(s.streamZeroPages) zero pages as markers"),
        ("sent after switchover", mib(s.streamBytes + s.requestBytes) + " on both connections ("
            + format1(s.postcopyBytesPerSecond / 1e9) + " GB/s)"),
        ("sent by request", mib(s.requestBytes) + " (\(s.requestedPages) pages asked, \(s.pagesSentAfterRequests) sent along)"),
        ("zero pages (markers)", "\(s.zeroPages)"),
        ("duplicates dropped", "\(s.duplicatesDropped)"),
        ("reconnects", "\(s.reconnects)"),
        ("stream connections", "\(s.streamConnections)" + (s.zeroCopySends > 0
            ? ", \(s.zeroCopySends) zero-copy sends (\(s.zeroCopyCopiedSends) copied by the kernel)" : "")),
        ("CPU per GB moved", "source \(Reporting.fixed(s.sourceCPUSecondsPerGB, 2)) s, destination \(Reporting.fixed(s.destinationCPUSecondsPerGB, 2)) s"
            + " (\(Reporting.fixed(s.sourceCPUSeconds, 2)) s and \(Reporting.fixed(s.destinationCPUSeconds, 2)) s for \(mib(s.pageBytesSent)))"),
    ]
}

func format1(_ v: Double) -> String {
    let r = (v * 10).rounded() / 10
    return r == r.rounded() ? String(Int(r)) : String(r)
}

/// Writes text to standard error, unbuffered.
func writeStandardError(_ text: String) {
    var bytes = Array(text.utf8)
    _ = bytes.withUnsafeMutableBytes { write(2, $0.baseAddress, $0.count) }
}
