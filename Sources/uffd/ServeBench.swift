import ArgumentParser
import FaultManager
import ManagerBench

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// `uffd serve-bench`: the daemon's two targets, measured against baselines of the same
/// run (``ServeBenchmark``), with `uffd-test-client` processes found next to this executable.
struct ServeBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve-bench",
        abstract: "Measure the manager daemon: working-set replay speed-up, per-client latency under concurrency, and whole-image restore against MAP_PRIVATE.",
        discussion: """
            Needs uffd-test-client next to this executable (`swift build -c release` builds both). \
            Ratios are against baselines measured in the same run: restore without --replay, \
            one client served alone, and the image file mapped MAP_PRIVATE (page-cached). \
            The restore measurement runs 2 MiB pages too where free huge pages can be reserved.
            """)

    @Option(parsing: .upToNextOption, help: ArgumentHelp("Take only these measurements (replay, isolation, restore).", valueName: "part"))
    var only: [ServeBenchResult.Part] = []

    @Option(name: .long, help: "Size of the image for the replay measurement, in MiB.")
    var imageMib: Int = 1024

    @Option(name: .long, help: "Percentage of the image's pages the restored client touches.")
    var touchPercent: Int = 15

    @Option(name: .long, help: "Runs of each replay contender (medians are reported).")
    var repetitions: Int = 5

    @Option(name: .long, help: "Concurrent clients in the isolation measurement.")
    var clients: Int = 16

    @Option(name: .long, help: "Memory of each client in the isolation measurement, in MiB.")
    var clientMib: Int = 64

    @Option(name: .long, help: "SCHED_FIFO priority of the handler threads, as `uffd serve` (0: time-shared only).")
    var handlerPriority: Int = 1

    @Flag(name: .long, help: "Serve with background populate (every page installed ahead of the faults), to compare with the daemon's default.")
    var backgroundPopulate = false

    @Option(name: .long, help: "Where to create the image and sockets (a fresh directory is made inside).")
    var directory: String = "/tmp"

    @Option(name: .long, help: "The test client executable (default: uffd-test-client next to this executable).")
    var clientExecutable: String?

    @Flag(name: .long, help: "Print the results as JSON.")
    var json = false

    func validate() throws {
        if imageMib < 4 { throw ValidationError("--image-mib must be at least 4") }
        if !(1...100).contains(touchPercent) { throw ValidationError("--touch-percent must be between 1 and 100") }
        if repetitions < 1 { throw ValidationError("--repetitions must be at least 1") }
        if !(1...256).contains(clients) { throw ValidationError("--clients must be between 1 and 256") }
        try Serve.validate(handlerPriority: handlerPriority)
        if clientMib < 4 || clientMib > imageMib { throw ValidationError("--client-mib must be at least 4 and at most --image-mib") }
    }

    func run() throws {
        let client = try clientExecutable ?? siblingExecutable("uffd-test-client")
        guard access(client, X_OK) == 0 else {
            throw ValidationError("no test client at \(client): build it with `swift build -c release` (or pass --client-executable)")
        }
        var configuration = ServeBenchConfiguration(server: Serve.serverConfiguration(handlerPriority: handlerPriority),
                                                    clientExecutable: client)
        configuration.server.backgroundPopulate = backgroundPopulate
        configuration.imageMiB = imageMib
        configuration.touchPercent = touchPercent
        configuration.repetitions = repetitions
        configuration.clients = clients
        configuration.clientMiB = clientMib
        configuration.directory = directory
        if !only.isEmpty { configuration.parts = Set(only) }
        let quiet = json
        let result = try ServeBenchmark.run(configuration, logger: ServeRunner.standardErrorLogger(level: .warning)) { text in
            if quiet { return }
            let line = Array("serve-bench: \(text)\n".utf8)
            _ = line.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
        }
        print(json ? result.json : result.table, terminator: json ? "" : "\n")
    }
}

extension ServeBenchResult.Part: ExpressibleByArgument {}

/// The path of an executable in the same directory as this one.
func siblingExecutable(_ name: String) throws -> String {
    var buffer = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    guard n > 0 else { throw ServeBenchError("cannot read /proc/self/exe: errno \(errno)") }
    let me = String(decoding: buffer.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    return String(me[..<(me.lastIndex(of: "/") ?? me.startIndex)]) + "/" + name
}
