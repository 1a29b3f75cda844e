import ArgumentParser
import Postcopy
import Userfaultfd

#if canImport(Glibc)
import Glibc
#endif

/// `uffd migrate demo`: a real two-process migration over loopback. This process runs the
/// workload and migrates it while it runs; a child `uffd migrate receive` continues it
/// and verifies every page byte for byte at the end.
struct MigrateDemo: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo",
        abstract: "Migrate a running 1 GiB workload to a second process over loopback and verify it.")

    @OptionGroup var migration: MigrationModeOptions
    @OptionGroup var destination: DestinationOptions

    @Option(help: "tcp (127.0.0.1) or unix.")
    var transport = "tcp"

    @OptionGroup var workload: WorkloadOptions

    @Flag(help: "Print the results as JSON instead of a table.")
    var json = false

    func validate() throws {
        guard transport == "tcp" || transport == "unix" else { throw ValidationError("--transport must be tcp or unix, not \(transport)") }
        if workload.zeroCopy && transport != "tcp" { throw ValidationError("--zero-copy needs --transport tcp") }
    }

    func run() throws {
        let ok = try DemoRun.run(self)
        if !ok { throw ExitCode(1) }
    }
}

/// What `uffd migrate demo --json` prints.
struct DemoReport: Codable {
    var source: MigrationStatistics
    var destinationProcess: ReceiveReport?
    var operationsOnSource: Int
    var verified: Bool
}

enum DemoRun {
    nonisolated static func run(_ demo: MigrateDemo) throws -> Bool {
        var random = SystemRandomNumberGenerator()
        let token = (0..<16).map { _ in String(random.next() as UInt8, radix: 16) }.joined()
        let listen = demo.transport == "unix" ? "unix:/tmp/uffd-migrate-demo-\(getpid()).sock"
                                              : "tcp:127.0.0.1:\(20_000 + Int(getpid() % 20_000))"
        guard let endpoint = MigrationEndpoint(parsing: listen) else { throw ValidationError("bad endpoint \(listen)") }
        let child = try spawnDestination(demo, listen: listen, token: token)
        if !demo.json {
            writeStandardError("source pid \(getpid()) -> destination pid \(child.pid) over \(listen), \(demo.workload.size) MiB, \(demo.workload.workers) workers, \(demo.migration.mode.rawValue)\n")
        }
        let source: SourceRun.Result
        do {
            source = try SourceRun.run(to: endpoint, token: Array(token.utf8), workload: demo.workload, migration: demo.migration,
                                       connectTimeoutSeconds: 30, showProgress: !demo.json)
        } catch {
            kill(child.pid, SIGTERM)
            _ = finish(child)
            throw error
        }
        let (output, status) = finish(child)
        // The destination's report is its last line of output.
        let last = String(decoding: output, as: UTF8.self).split(separator: "\n").last.map(String.init) ?? ""
        let report = try? MigrationJSON.decode(ReceiveReport.self, from: last)
        let pages = demo.workload.size << 20 / systemPageSize
        let ok = status == 0 && report.map { $0.verifiedPages == pages && $0.mismatches == 0 && $0.readErrors == 0 } == true
            && source.readErrorsOnSource == 0
        if demo.json {
            print(MigrationJSON.encode(DemoReport(source: source.stats, destinationProcess: report,
                                                  operationsOnSource: source.operationsOnSource, verified: ok)))
        } else {
            printTable("migration (source process)", statisticsRows(source.stats))
            printTable("workload", [
                ("ops in source", "\(source.operationsOnSource) (\(source.readErrorsOnSource) bad reads)"),
                ("ops in destination", report.map { "\($0.operationsOnDestination) (\($0.readErrors) bad reads)" } ?? "no report"),
                ("verified byte for byte", report.map { "\($0.verifiedPages) of \(pages) pages, \($0.mismatches) wrong" } ?? "no report"),
                ("result", ok ? "OK" : "FAILED (the destination process \(describe(status: status)))"),
            ])
        }
        return ok
    }

    /// The destination process: this executable, `migrate receive`, its stdout piped here.
    static func spawnDestination(_ demo: MigrateDemo, listen: String, token: String) throws -> SpawnedProcess {
        let arguments = ["migrate", "receive", "--listen", listen, "--workers", "\(demo.workload.workers)",
                         "--json"] + demo.destination.arguments
        // The token travels in the environment, which other users cannot read.
        var environment = ["\(MigrationToken.environmentVariable)=\(token)"]
        var e = environ
        while let entry = e.pointee {
            let s = String(cString: entry)
            if !s.hasPrefix("\(MigrationToken.environmentVariable)=") { environment.append(s) }
            e += 1
        }
        do {
            return try SpawnedProcess("/proc/self/exe", arguments, name: "uffd", environment: environment)
        } catch {
            throw ValidationError("could not start the destination process: \(error)")
        }
    }

    /// Reads the child's output to its end and reaps it: the output and the wait status.
    static func finish(_ child: SpawnedProcess) -> ([UInt8], Int32) {
        let output = child.readToEnd()
        close(child.output)
        return (output, child.waitStatus())
    }

    /// "exited with status 1", "was killed by signal 7 (Bus error)".
    static func describe(status: Int32) -> String {
        let signal = status & 0x7f
        if signal == 0 { return "exited with status \((status >> 8) & 0xff)" }
        return "was killed by signal \(signal) (\(String(cString: strsignal(signal))))"
    }
}
