import ArgumentParser
import Postcopy
import Userfaultfd

#if canImport(Glibc)
import Glibc
#endif

/// `uffd migrate receive`: the destination. Accepts a migrating workload, lets it continue
/// here while pages arrive, then verifies every page byte for byte.
struct MigrateReceive: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "receive",
        abstract: "Receive a migrating workload, run it here, and verify every page.")

    @Option(help: "Where to listen: host:port, tcp:host:port or unix:/path.")
    var listen = "tcp:127.0.0.1:7070"

    @Option(help: "Worker threads that continue the workload here.")
    var workers = 2

    @Option(help: "Seconds the workload keeps running here once every page has arrived.")
    var runAfter = 1.0

    @Option(help: "Milliseconds to wait for the source to come back after a dropped connection.")
    var recoveryTimeout: Int32 = 5_000

    @Flag(help: "Install pages with UFFDIO_MOVE from the receive buffer instead of UFFDIO_COPY.")
    var installByMove = false

    @OptionGroup var common: MigrateCommonOptions

    func run() throws {
        guard let endpoint = MigrationEndpoint(parsing: listen) else {
            throw ValidationError("--listen '\(listen)' is not host:port, tcp:host:port or unix:/path")
        }
        let result = try ReceiveRun.run(listen: endpoint, token: common.resolvedToken(), workers: workers,
                                        runAfter: runAfter, recoveryTimeout: recoveryTimeout, installByMove: installByMove)
        if common.json {
            print(result.json)
        } else {
            printTable("destination", statisticsRows(result.stats) + result.rows)
        }
        if result.mismatches > 0 || result.readErrors > 0 { throw ExitCode(1) }
    }
}

enum ReceiveRun {
    struct Result {
        var stats: MigrationStatistics
        var verifiedPages: Int
        var mismatches: Int
        var readErrors: Int
        var operations: Int

        var json: String {
            "{\"destination\":\(stats.json),\"verifiedPages\":\(verifiedPages),\"mismatches\":\(mismatches),"
                + "\"readErrors\":\(readErrors),\"operationsOnDestination\":\(operations)}"
        }

        var rows: [(String, String)] {
            [("workload ops here", "\(operations)"),
             ("verified pages", "\(verifiedPages), \(mismatches) wrong, \(readErrors) bad reads")]
        }
    }

    nonisolated static func run(listen: MigrationEndpoint, token: [UInt8], workers: Int, runAfter: Double,
                                recoveryTimeout: Int32, installByMove: Bool) throws -> Result {
        let listener = try MigrationListener(listen)
        var options = MigrationDestination.Options(token: token)
        options.recoveryTimeoutMilliseconds = recoveryTimeout
        options.handshakeTimeoutMilliseconds = 60_000
        options.installByMove = installByMove
        let destination = try MigrationDestination.accept(on: listener, options: options)
        let regions = destination.regions
        guard regions.count == 2,
              Int(regions[1].length) == DemoWorkload.logBytes(forDataBytes: Int(regions[0].length)) else {
            throw ValidationError("the source did not send a demo workload (a data region and its version log)")
        }
        let workload = DemoWorkload(data: regions[0], log: regions[1], workers: workers)
        let stats = try destination.run { workload.start() }
        usleep(UInt32(max(0, runAfter) * 1e6))
        workload.stop()
        let (pages, wrong) = workload.verify()
        return Result(stats: stats, verifiedPages: pages, mismatches: wrong, readErrors: workload.errors,
                      operations: workload.operations)
    }
}
