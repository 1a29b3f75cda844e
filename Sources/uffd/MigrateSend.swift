import ArgumentParser
import Postcopy
import Userfaultfd

/// `uffd migrate send`: the source. Runs the demo workload here, then migrates it,
/// still running, to a destination started with `uffd migrate receive`.
struct MigrateSend: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "send",
        abstract: "Run a workload here and migrate it, while it runs, to `uffd migrate receive`.")

    @Option(help: "The destination: host:port, tcp:host:port or unix:/path.")
    var to: String

    @OptionGroup var migration: MigrationModeOptions
    @OptionGroup var workload: WorkloadOptions
    @OptionGroup var common: MigrateCommonOptions

    func run() throws {
        guard let endpoint = MigrationEndpoint(parsing: to) else {
            throw ValidationError("--to '\(to)' is not host:port, tcp:host:port or unix:/path")
        }
        if workload.zeroCopy, case .unix = endpoint { throw ValidationError("--zero-copy needs a TCP destination, not \(to)") }
        let result = try SourceRun.run(to: endpoint, token: common.resolvedToken(), workload: workload, migration: migration,
                                       connectTimeoutSeconds: 0, showProgress: !common.json)
        if common.json {
            print(result.stats.json)
        } else {
            printTable("source", statisticsRows(result.stats) + [("workload ops here", "\(result.operationsOnSource)")])
        }
    }
}
