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

    @Option(help: "postcopy, precopy+postcopy or stop-and-copy.")
    var mode: MigrationStatistics.Mode = .precopyPostcopy

    @Option(help: "The most precopy rounds (not used by pure postcopy).")
    var precopyRounds = 4

    @Option(help: "Seconds the workload runs in the source process before the migration starts.")
    var warmup = 1.0

    @Option(help: "Seconds the workload keeps running in the destination once every page has arrived.")
    var runAfter = 1.0

    @Option(help: "tcp (127.0.0.1) or unix.")
    var transport = "tcp"

    @Flag(help: "The destination installs pages with UFFDIO_MOVE instead of UFFDIO_COPY.")
    var installByMove = false

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
    /// The destination process: this executable, `migrate receive`, its stdout piped here.
    struct Child {
        var pid: pid_t
        var output: Int32
    }

    nonisolated static func run(_ demo: MigrateDemo) throws -> Bool {
        var random = SystemRandomNumberGenerator()
        let token = (0..<16).map { _ in String(random.next() as UInt8, radix: 16) }.joined()
        let listen = demo.transport == "unix" ? "unix:/tmp/uffd-migrate-demo-\(getpid()).sock"
                                              : "tcp:127.0.0.1:\(20_000 + Int(getpid() % 20_000))"
        guard let endpoint = MigrationEndpoint(parsing: listen) else { throw ValidationError("bad endpoint \(listen)") }
        let child = try spawnDestination(demo, listen: listen, token: token)
        if !demo.json {
            writeStandardError("source pid \(getpid()) -> destination pid \(child.pid) over \(listen), \(demo.workload.size) MiB, \(demo.workload.workers) workers, \(demo.mode.rawValue)\n")
        }
        let source: SourceRun.Result
        do {
            source = try SourceRun.run(to: endpoint, token: Array(token.utf8), workload: demo.workload, mode: demo.mode,
                                       precopyRounds: demo.precopyRounds, warmupSeconds: demo.warmup,
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

    static func spawnDestination(_ demo: MigrateDemo, listen: String, token: String) throws -> Child {
        var pipeFDs: [Int32] = [0, 0]
        guard pipe(&pipeFDs) == 0 else { throw ValidationError("pipe failed") }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, pipeFDs[1], 1)
        posix_spawn_file_actions_addclose(&actions, pipeFDs[0])
        let arguments = ["uffd", "migrate", "receive", "--listen", listen, "--workers", "\(demo.workload.workers)",
                         "--run-after", "\(demo.runAfter)", "--json"] + (demo.installByMove ? ["--install-by-move"] : [])
        // The token travels in the environment, which other users cannot read.
        var environment = ["\(MigrationToken.environmentVariable)=\(token)"]
        var e = environ
        while let entry = e.pointee {
            let s = String(cString: entry)
            if !s.hasPrefix("\(MigrationToken.environmentVariable)=") { environment.append(s) }
            e += 1
        }
        let argv = arguments.map { strdup($0) } + [nil]
        let envp = environment.map { strdup($0) } + [nil]
        defer { for p in argv + envp { free(p) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, "/proc/self/exe", &actions, nil, argv, envp)
        close(pipeFDs[1])
        guard rc == 0 else {
            close(pipeFDs[0])
            throw ValidationError("could not start the destination process: errno \(rc)")
        }
        return Child(pid: pid, output: pipeFDs[0])
    }

    /// Reads the child's output to its end and reaps it: the output and the wait status.
    static func finish(_ child: Child) -> ([UInt8], Int32) {
        var output: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = retryOnInterrupt { chunk.withUnsafeMutableBytes { read(child.output, $0.baseAddress, $0.count) } }
            if n <= 0 { break }
            output += chunk[0..<n]
        }
        close(child.output)
        var status: Int32 = 0
        _ = retryOnInterrupt { waitpid(child.pid, &status, 0) }
        return (output, status)
    }

    /// "exited with status 1", "was killed by signal 7 (Bus error)".
    static func describe(status: Int32) -> String {
        let signal = status & 0x7f
        if signal == 0 { return "exited with status \((status >> 8) & 0xff)" }
        return "was killed by signal \(signal) (\(String(cString: strsignal(signal))))"
    }
}
