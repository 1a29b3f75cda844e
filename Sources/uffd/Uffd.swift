import ArgumentParser

@main
struct Uffd: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "uffd",
        abstract: "Paging memory from userland with Linux userfaultfd.",
        subcommands: [Probe.self, Migrate.self, Serve.self, ServeBench.self, Bench.self, TraceCommand.self, SnapshotCommand.self, Map.self])
}
