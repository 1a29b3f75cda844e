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

    @Option(help: "Milliseconds to wait for the source to come back after a dropped connection.")
    var recoveryTimeout: Int32 = 5_000

    @OptionGroup var destination: DestinationOptions

    @OptionGroup var common: MigrateCommonOptions

    func run() throws {
        guard let endpoint = MigrationEndpoint(parsing: listen) else {
            throw ValidationError("--listen '\(listen)' is not host:port, tcp:host:port or unix:/path")
        }
        let report = try ReceiveRun.run(listen: endpoint, token: common.resolvedToken(), workers: workers,
                                        destination: destination, recoveryTimeout: recoveryTimeout)
        if common.json {
            print(MigrationJSON.encode(report))
        } else {
            printTable("destination", statisticsRows(report.destination) + report.rows)
        }
        if report.mismatches > 0 || report.readErrors > 0 { throw ExitCode(1) }
    }
}

/// What `uffd migrate receive` reports: the migration, then the workload's check.
struct ReceiveReport: Codable {
    var destination: MigrationStatistics
    var verifiedPages: Int
    var mismatches: Int
    var readErrors: Int
    var operationsOnDestination: Int

    var rows: [(String, String)] {
        [("workload ops here", "\(operationsOnDestination)"),
         ("verified pages", "\(verifiedPages), \(mismatches) wrong, \(readErrors) bad reads")]
    }
}

enum ReceiveRun {
    nonisolated static func run(listen: MigrationEndpoint, token: [UInt8], workers: Int,
                                destination continuing: DestinationOptions, recoveryTimeout: Int32) throws -> ReceiveReport {
        let listener = try MigrationListener(listen)
        var options = MigrationDestination.Options(token: token)
        options.recoveryTimeoutMilliseconds = recoveryTimeout
        options.handshakeTimeoutMilliseconds = 60_000
        options.installByMove = continuing.installByMove
        // This process ends when the migration fails: no page is poisoned under the workload.
        options.poisonOnFailure = false
        options.onRefusedConnection = { line in writeStandardError(line + "\n") }
        let destination = try MigrationDestination.accept(on: listener, options: options)
        let regions = destination.regions
        guard regions.count == 2,
              Int(regions[1].length) == DemoWorkload.logBytes(forDataBytes: Int(regions[0].length)) else {
            throw ValidationError("the source did not send a demo workload (a data region and its version log)")
        }
        let workload = DemoWorkload(data: regions[0], log: regions[1], workers: workers)
        let stats: MigrationStatistics
        do {
            stats = try destination.run { workload.start() }
        } catch {
            // Workers may wait for pages that will never come: stop the others and end the
            // process here, with the destination and its memory still in place, so that no
            // worker touches a poisoned or unmapped page.
            workload.requestStop()
            withExtendedLifetime(destination) { MigrateReceive.exit(withError: error) }
        }
        usleep(UInt32(max(0, continuing.runAfter) * 1e6))
        workload.stop()
        let (pages, wrong) = workload.verify()
        return ReceiveReport(destination: stats, verifiedPages: pages, mismatches: wrong, readErrors: workload.errors,
                             operationsOnDestination: workload.operations)
    }
}
