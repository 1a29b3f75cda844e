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
    }

    func run() throws {
        let ok = try DemoRun.run(self)
        if !ok { throw ExitCode(1) }
    }
}

enum DemoRun {
    nonisolated static func run(_ demo: MigrateDemo) throws -> Bool {
        var random = SystemRandomNumberGenerator()
        let token = (0..<16).map { _ in String(random.next() as UInt8, radix: 16) }.joined()
        let listen = demo.transport == "unix" ? "unix:/tmp/uffd-migrate-demo-\(getpid()).sock"
                                              : "tcp:127.0.0.1:\(20_000 + Int(getpid() % 20_000))"
        guard let endpoint = MigrationEndpoint(parsing: listen) else { throw ValidationError("bad endpoint \(listen)") }

        // The destination process: this executable, `migrate receive`, its stdout piped here.
        var pipeFDs: [Int32] = [0, 0]
        guard pipe(&pipeFDs) == 0 else { throw ValidationError("pipe failed") }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, pipeFDs[1], 1)
        posix_spawn_file_actions_addclose(&actions, pipeFDs[0])
        let exe = "/proc/self/exe"
        let arguments = ["uffd", "migrate", "receive", "--listen", listen, "--workers", "\(demo.workload.workers)",
                         "--run-after", "\(demo.runAfter)", "--json"] + (demo.installByMove ? ["--install-by-move"] : [])
        var environment = ["UFFD_MIGRATE_TOKEN=\(token)"]
        var e = environ
        while let entry = e.pointee {
            let s = String(cString: entry)
            if !s.hasPrefix("UFFD_MIGRATE_TOKEN=") { environment.append(s) }
            e += 1
        }
        let argv = arguments.map { strdup($0) } + [nil]
        let envp = environment.map { strdup($0) } + [nil]
        defer { for p in argv + envp { free(p) } }
        var child: pid_t = 0
        let rc = posix_spawn(&child, exe, &actions, nil, argv, envp)
        close(pipeFDs[1])
        guard rc == 0 else {
            close(pipeFDs[0])
            throw ValidationError("could not start the destination process: errno \(rc)")
        }
        if !demo.json {
            writeStandardError("source pid \(getpid()) -> destination pid \(child) over \(listen), \(demo.workload.size) MiB, \(demo.workload.workers) workers, \(demo.mode.rawValue)\n")
        }

        let source: SourceRun.Result
        do {
            source = try SourceRun.run(to: endpoint, token: Array(token.utf8), workload: demo.workload, mode: demo.mode,
                                       precopyRounds: demo.precopyRounds, warmupSeconds: demo.warmup,
                                       connectTimeoutSeconds: 30, showProgress: !demo.json)
        } catch {
            kill(child, SIGTERM)
            var status: Int32 = 0
            waitpid(child, &status, 0)
            close(pipeFDs[0])
            throw error
        }

        // The destination's report is its last line of output.
        var output: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(pipeFDs[0], $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            output += chunk[0..<n]
        }
        close(pipeFDs[0])
        var status: Int32 = 0
        while waitpid(child, &status, 0) < 0 && errno == EINTR {}
        let text = String(decoding: output, as: UTF8.self)
        let report = text.split(separator: "\n").last.map(String.init) ?? ""
        let verified = number("verifiedPages", in: report) ?? 0
        let mismatches = number("mismatches", in: report) ?? -1
        let readErrors = number("readErrors", in: report) ?? -1
        let opsThere = number("operationsOnDestination", in: report) ?? 0
        let pages = demo.workload.size << 20 / systemPageSize
        let ok = status == 0 && verified == pages && mismatches == 0 && readErrors == 0 && source.readErrorsOnSource == 0

        if demo.json {
            print("{\"source\":\(source.stats.json),\"destinationProcess\":\(report.isEmpty ? "null" : report),"
                  + "\"operationsOnSource\":\(source.operationsOnSource),\"verified\":\(ok)}")
        } else {
            printTable("migration (source process)", statisticsRows(source.stats))
            printTable("workload", [
                ("ops in source", "\(source.operationsOnSource) (\(source.readErrorsOnSource) bad reads)"),
                ("ops in destination", "\(opsThere) (\(readErrors) bad reads)"),
                ("verified byte for byte", "\(verified) of \(pages) pages, \(mismatches) wrong"),
                ("result", ok ? "OK" : "FAILED (destination exit status \(status))"),
            ])
        }
        return ok
    }

    /// The integer after `"key":` in a flat JSON text.
    static func number(_ key: String, in text: String) -> Int? {
        let needle = Array("\"\(key)\":".utf8)
        let bytes = Array(text.utf8)
        guard bytes.count >= needle.count else { return nil }
        for i in 0...(bytes.count - needle.count) where Array(bytes[i..<(i + needle.count)]) == needle {
            let digits = bytes[(i + needle.count)...].prefix { $0 == UInt8(ascii: "-") || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) }
            return Int(String(decoding: digits, as: UTF8.self))
        }
        return nil
    }
}
