import ArgumentParser
import FaultEngine
import FaultManager
import FaultTrace

/// `uffd serve`: the manager daemon.
struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve the page faults of other processes that hand over their userfaultfd (Firecracker-compatible).",
        discussion: """
            Listens on a unix socket. A client connects and sends its uffd with a description of \
            its regions: Firecracker's JSON array (served from --memory-file), or the native \
            handshake of FaultManager.ManagerClient. Only the daemon's own uid may hand over a uffd \
            unless --allow-uid widens it. SIGUSR1 prints statistics; SIGINT/SIGTERM stop.
            """)

    @Option(name: .long, help: "The unix socket to listen on.")
    var socket: String

    @Option(name: .long, help: "The memory snapshot file Firecracker clients are served from.")
    var memoryFile: String?

    @Option(name: .long, help: "Write the order of first faults in the memory file to this file.")
    var record: String?

    @Option(name: .long, help: "Prefetch the working set recorded in this file first, in order, when a client connects.")
    var replay: String?

    @OptionGroup(title: "Serving faults") var serving: ServingOptions

    @OptionGroup(title: "Facing clients") var admission: AdmissionOptions

    @Option(name: .long, help: "Trace every client's served faults to this file (`uffd trace render` draws it); --chunk-pages 1 --read-ahead 0 traces every page touched.")
    var trace: String?

    @Flag(name: .long, help: "Print statistics as JSON (on SIGUSR1 and on exit).")
    var json = false

    @Flag(name: .long, help: "Log every layout event (debug level).")
    var verbose = false

    func validate() throws {
        if memoryFile == nil && (record != nil || replay != nil) {
            throw ValidationError("--record and --replay need --memory-file: the working set is per memory file")
        }
    }

    /// Refuses a `--handler-priority` the engine would not take (`uffd serve-bench` has the option too).
    static func validate(handlerPriority: Int) throws {
        if !FaultServerConfiguration.handlerPriorities.contains(handlerPriority) {
            throw ValidationError("--handler-priority must be 0 (time-shared) or a SCHED_FIFO priority in 1...99")
        }
    }

    /// How each client's faults are served; `uffd serve-bench` uses the same defaults.
    static func serverConfiguration(chunkPages: Int = 16, readAhead: Int = 256, handlerThreads: Int = 1,
                                    handlerPriority: Int = 1) -> FaultServerConfiguration {
        FaultServerConfiguration(
            strategy: .copy(chunkPages: chunkPages),
            prefetch: readAhead == 0 ? .none : .adaptive(maxPages: readAhead),
            handlerThreads: handlerThreads,
            handlerPriority: handlerPriority)
    }

    func run() throws {
        var configuration = ManagerConfiguration(
            socketPath: socket, memoryFile: memoryFile, server: serving.configuration,
            recordWorkingSet: record, replayWorkingSet: replay)
        admission.apply(to: &configuration)
        let recorder = try trace.map { try TraceRecorder(path: $0) }
        configuration.traceSink = recorder?.sink
        let manager = try Manager(configuration, logger: ServeRunner.standardErrorLogger(level: verbose ? .debug : .info))
        try ServeRunner.run(manager, json: json)
        try recorder?.finish()
    }
}

/// How `uffd serve` serves each client's faults.
struct ServingOptions: ParsableArguments {
    @Option(name: .long, help: "Pages per fault (UFFDIO_COPY chunk), in 4 KiB pages; clients with 2 MiB pages get whole huge pages.")
    var chunkPages: Int = 16

    @Option(name: .long, help: "Adaptive read-ahead up to this many 4 KiB pages (0: none).")
    var readAhead: Int = 256

    @Option(name: .long, help: "Handler threads per client.")
    var handlerThreads: Int = 1

    @Option(name: .long, help: ArgumentHelp(
        "SCHED_FIFO priority of the handler threads (0: time-shared).",
        discussion: "A real-time handler serves a fault at once even when every CPU is busy; without CAP_SYS_NICE the handlers stay time-shared and the statistics' lastError says so."))
    var handlerPriority: Int = 1

    func validate() throws {
        if chunkPages < 1 { throw ValidationError("--chunk-pages must be at least 1") }
        if handlerThreads < 1 { throw ValidationError("--handler-threads must be at least 1") }
        try Serve.validate(handlerPriority: handlerPriority)
        if readAhead != 0 && readAhead < chunkPages { throw ValidationError("--read-ahead must be 0 or at least --chunk-pages") }
    }

    var configuration: FaultServerConfiguration {
        Serve.serverConfiguration(chunkPages: chunkPages, readAhead: readAhead, handlerThreads: handlerThreads,
                                  handlerPriority: handlerPriority)
    }
}

/// Whom `uffd serve` accepts, and how much a connection may cost before its handshake is done.
struct AdmissionOptions: ParsableArguments {
    @Option(name: .customLong("allow-uid"), help: "Also accept clients of this uid (repeatable).")
    var allowUIDs: [UInt32] = []

    @Option(name: .long, help: "Seconds a connection may take to send its whole handshake.")
    var handshakeTimeout: Double = 5

    @Option(name: .long, help: "Connections in handshake at once; more are refused at once.")
    var maxHandshakes: Int = 64

    @Option(name: .long, help: "Connections in handshake at once from one uid; more are refused at once.")
    var maxHandshakesPerUid: Int = 16

    @Option(name: .long, help: "The longest handshake message accepted, in bytes.")
    var maxHandshakeBytes: Int = 1 << 20

    func validate() throws {
        if !(handshakeTimeout > 0 && handshakeTimeout <= 3600) {
            throw ValidationError("--handshake-timeout must be more than 0 and at most 3600 seconds")
        }
        if maxHandshakes < 1 || maxHandshakesPerUid < 1 {
            throw ValidationError("--max-handshakes and --max-handshakes-per-uid must be at least 1")
        }
        if maxHandshakeBytes < 64 { throw ValidationError("--max-handshake-bytes must be at least 64") }
    }

    func apply(to configuration: inout ManagerConfiguration) {
        configuration.allowedUIDs = Set(allowUIDs)
        configuration.handshakeTimeout = handshakeTimeout
        configuration.maxPendingHandshakes = maxHandshakes
        configuration.maxPendingHandshakesPerUID = maxHandshakesPerUid
        configuration.maxHandshakeBytes = maxHandshakeBytes
    }
}
