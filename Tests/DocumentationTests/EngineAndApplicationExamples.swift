import TestSupport
import FaultEngine
import FaultManager
import Logging
import Postcopy
import Testing
import Userfaultfd

// The examples of the FaultEngine, Postcopy and FaultManager documentation, compiled in
// contexts that give them the names they use. They need files, sockets or peers, so
// only the in-memory engine example runs.

/// `FaultServer` and ServingFaults.md.
func servingFromAFile() throws {
    let memory = try MemoryMapping.anonymous(length: 64 << 20)
    let uffd = try Userfaultfd(features: [.eventRemove, .eventUnmap, .eventRemap])
    try uffd.handle.register(memory.range, mode: .missing)
    let server = try FaultServer(userfaultfd: uffd,
                                 regions: [ServedRegion(range: memory.range)],
                                 source: try FileSource(path: "snapshot.bin"))
    try server.start()
    // ... touch memory: pages come from the file ...
    server.stop()
    print(server.statistics.jsonString())
}

/// ServingFaults.md: serving from memory.
func servingFromMemory() throws -> UInt8 {
    let pages = try MemorySource([UInt8](repeating: 7, count: 16 * systemPageSize))
    let region = try MemoryMapping.anonymous(length: 16 * systemPageSize)
    let owner = try Userfaultfd(features: [])
    try owner.handle.register(region.range, mode: .missing)
    let server = try FaultServer(userfaultfd: owner, regions: [ServedRegion(range: region.range)],
                                 source: pages, configuration: .handler64k)
    try server.start()
    let first = region.bytes[0]   // 7, installed by the server
    server.stop()
    return first
}

/// What the migrated program would start on the destination's copy of its memory.
func startWorkload(on regions: [MemoryRange]) {}

/// `MigrationDestination` and PostcopyMigration.md.
func destination(token: [UInt8]) throws -> MigrationStatistics {
    let listener = try MigrationListener(.tcp(host: "127.0.0.1", port: 7070))
    let destination = try MigrationDestination.accept(on: listener, options: .init(token: token))
    let stats = try destination.run { startWorkload(on: destination.regions) }
    return stats
}

/// `MigrationSource` and PostcopyMigration.md.
func source(range: MemoryRange, token: [UInt8], workload: DemoWorkload) throws -> MigrationStatistics {
    let source = try MigrationSource(regions: [range], options: .init(token: token, mode: .precopyPostcopy))
    let stats = try source.migrate(to: .tcp(host: "127.0.0.1", port: 7070)) { workload.pause() }
    return stats
}

/// `Manager` and ManagerDaemon.md.
func daemon() throws {
    let manager = try Manager(ManagerConfiguration(socketPath: "/run/uffd.sock", memoryFile: "mem.snap"),
                              logger: Logger(label: "uffd.serve"))
    try manager.start()
    // ... clients hand over their uffds ...
    manager.stop()
    print(manager.statisticsJSON())
}

/// `ManagerClient` and ManagerDaemon.md.
func client() throws {
    let memory = try MemoryMapping.anonymous(length: 64 << 20)
    let uffd = try Userfaultfd(features: [.eventFork, .eventRemap, .eventRemove, .eventUnmap])
    try uffd.handle.register(memory.range, mode: .missing)
    let client = try ManagerClient.handOver(
        uffd, regions: [ClientRegion(start: memory.range.start, length: memory.range.length, backingOffset: 0)],
        backing: .memoryFile, to: "/run/uffd.sock")
    // memory now reads the daemon's memory file
    _ = client
}

@Suite("engine examples run", .needsUserfaultfd, .sharesProcess, .serialized, .timeLimit(.minutes(1)))
struct EngineExamplesRun {
    @Test("the in-memory serving example reads the source's byte")
    func fromMemory() throws {
        #expect(try servingFromMemory() == 7)
    }
}
