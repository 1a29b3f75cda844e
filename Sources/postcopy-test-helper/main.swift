// A process the Postcopy tests run when the expected outcome is a signal.
//
// `postcopy-test-helper poisoned-after-failed-recovery`: migrates 4 MiB in-process,
// drops the connection for good after 64 pages, then reads every page on the
// destination. The first page that never arrived must raise SIGBUS (exit by signal);
// exit code 0 would mean a missing page read as something, 2+ a setup failure.
import Postcopy
import Userfaultfd

#if canImport(Glibc)
import Glibc
#endif

nonisolated func poisonedAfterFailedRecovery() -> Int32 {
    let token: [UInt8] = Array("helper".utf8)
    guard let source = try? MemoryMapping.anonymous(length: 4 << 20) else { return 3 }
    for off in stride(from: 0, to: source.length, by: systemPageSize) {
        memset(source.base + off, 0x5A, systemPageSize)
    }
    guard let listener = try? MigrationListener(.tcp(host: "127.0.0.1", port: 0)) else { return 4 }
    var destinationOptions = MigrationDestination.Options(token: token)
    destinationOptions.recoveryTimeoutMilliseconds = 200
    final class Box: @unchecked Sendable { var destination: MigrationDestination? }
    let box = Box()
    let thread = DedicatedThread(name: "helper-dest") { [destinationOptions] in
        guard let d = try? MigrationDestination.accept(on: listener, options: destinationOptions) else { return }
        box.destination = d
        _ = try? d.run {}
    }
    var options = MigrationSource.Options(token: token, mode: .postcopy)
    options.reconnect = false
    options._dropConnectionsAfterPages = 64
    guard let migration = try? MigrationSource(regions: [source.range], options: options) else { return 5 }
    _ = try? migration.migrate(to: listener.endpoint) {}
    thread.join()
    guard let d = box.destination else { return 6 }
    signal(SIGBUS, SIG_DFL)
    var sum: UInt64 = 0
    for off in stride(from: 0, to: Int(d.regions[0].length), by: systemPageSize) {
        sum &+= (d.regions[0].pointer + off).load(as: UInt64.self)
    }
    print(sum)
    return 0
}

let arguments = CommandLine.arguments.dropFirst()
switch arguments.first {
case "poisoned-after-failed-recovery": exit(poisonedAfterFailedRecovery())
default:
    print("usage: postcopy-test-helper poisoned-after-failed-recovery")
    exit(2)
}
