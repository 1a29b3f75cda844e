import ArgumentParser

/// `uffd map`: data larger than memory through PagedMemory.
struct Map: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "map",
        abstract: "Map files larger than memory through a bounded page buffer (PagedMemory).",
        subcommands: [MapBenchCommand.self, MapBenchChild.self])
}
