import FaultEngine
import Logging
import Synchronization
import SystemPackage
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The non-cooperative manager daemon: receives userfaultfds from other processes over
/// a unix socket and serves their faults, each client isolated on its own fault server.
///
/// ```swift
/// let manager = try Manager(ManagerConfiguration(socketPath: "/run/uffd.sock", memoryFile: "mem.snap"),
///                           logger: Logger(label: "uffd.serve"))
/// try manager.start()
/// // ... clients hand over their uffds ...
/// manager.stop()
/// print(manager.statisticsJSON())
/// ```
public final class Manager: Sendable {
    /// The configuration the manager runs with.
    public let configuration: ManagerConfiguration
    let logger: Logger
    let memorySource: FileSource?
    let ownUID: UInt32
    let stopSignal: StopSignal
    let state = Mutex(State())
    let nextClient = Atomic<Int>(1)
    let recordClaimed = Atomic<Bool>(false)

    struct State {
        var listener: FileDescriptor?
        var acceptThread: DedicatedThread?
        var handshakes: [Int: DedicatedThread] = [:]
        var pendingSockets: [Int: FileDescriptor] = [:]
        var nextHandshake = 0
        var admission = HandshakeAdmission()
        var refusalLines = LogRateLimit(linesPerSecond: 20)
        var sessions: [Int: ClientSession] = [:]
        var ended: [Int: ClientReport] = [:]
        var stopping = false
        var refusals = 0
    }

    /// Prepares a manager: opens the memory file and checks the working-set file.
    ///
    /// - Throws: `UserfaultfdError` naming the file that cannot be used.
    public init(_ configuration: ManagerConfiguration, logger: Logger) throws(UserfaultfdError) {
        self.configuration = configuration
        self.logger = logger
        self.memorySource = try configuration.memoryFile.map { path throws(UserfaultfdError) in
            // Mapped: faults and working-set replays copy straight from the page cache.
            try FileSource(path: path, access: .mapped)
        }
        if let replay = configuration.replayWorkingSet {
            _ = try WorkingSetFile.read(replay)
        }
        if case .memory(let address, let length)? = memorySource?.signalSafeBacking, length > 0 {
            // Map the whole file now (MADV_POPULATE_READ), so that neither a fault nor a
            // working-set replay takes a page fault of the daemon's own on the source.
            let start = address & ~UInt(systemPageSize - 1)
            _ = madvise(UnsafeMutableRawPointer(bitPattern: start), Int(length) + Int(address - start), 22)
        }
        self.ownUID = geteuid()
        self.stopSignal = try StopSignal()
    }

    deinit { stop() }

    /// Binds the socket and starts accepting clients.
    public func start() throws(UserfaultfdError) {
        let listener = try UnixSocket.listen(at: configuration.socketPath)
        let thread: DedicatedThread
        do {
            thread = try DedicatedThread.start(name: "uffd-accept") { [self] in self.acceptLoop(listener) }
        } catch {
            try? listener.close()
            unlink(configuration.socketPath)
            throw error
        }
        state.withLock {
            $0.listener = listener
            $0.acceptThread = thread
        }
        logger.info("listening", metadata: [
            "socket": "\(configuration.socketPath)",
            "memoryFile": "\(configuration.memoryFile ?? "none")",
            "allowedUIDs": "\(([ownUID] + configuration.allowedUIDs.sorted()).map(String.init).joined(separator: ","))",
        ])
    }

    /// Stops accepting, stops serving every client, joins every thread and removes the socket.
    ///
    /// Clients still faulting are woken by the kernel when their uffd closes. Idempotent.
    public func stop() {
        let (listener, accept, pending) = state.withLock { s -> (FileDescriptor?, DedicatedThread?, [FileDescriptor]) in
            if s.stopping { return (nil, nil, []) }
            s.stopping = true
            let l = s.listener
            s.listener = nil
            return (l, s.acceptThread, Array(s.pendingSockets.values))
        }
        guard listener != nil || accept != nil else { return }
        stopSignal.raise()
        accept?.join()
        // Wake handshakes waiting for a slow peer.
        for socket in pending { _ = shutdown(socket.rawValue, Int32(SHUT_RDWR)) }
        let handshakes = state.withLock { Array($0.handshakes.values) }
        for t in handshakes { t.join() }
        if let listener {
            try? listener.close()
            unlink(configuration.socketPath)
        }
        // Sessions may add forked children while earlier ones stop: repeat until none is left.
        while true {
            let sessions = state.withLock { Array($0.sessions.values) }
            if sessions.isEmpty { break }
            for session in sessions { session.stopAndJoin() }
        }
        logger.info("stopped", metadata: ["clients": "\(clients.count)"])
    }

    /// Every client served so far, live and ended, by client number.
    public var clients: [ClientReport] {
        let (live, ended) = state.withLock { (Array($0.sessions.values), Array($0.ended.values)) }
        return (ended + live.map(\.report)).sorted { $0.id < $1.id }
    }

    /// Handshakes refused so far.
    public var refusedCount: Int { state.withLock { $0.refusals } }

    /// The statistics of every client as a JSON document, encoded as every report of the
    /// package is (`Reporting.json`), without a final newline.
    public func statisticsJSON() -> String {
        struct Document: Encodable {
            var socket: String
            var memoryFile: String?
            var refusedHandshakes: Int
            var clients: [ClientReport]
        }
        let doc = Document(socket: configuration.socketPath, memoryFile: configuration.memoryFile,
                           refusedHandshakes: refusedCount, clients: clients)
        var text = Reporting.json(doc)
        text.removeLast()
        return text
    }

    /// Creates, registers and starts one client's server and watcher.
    func startSession(
        id: Int, parent: Int?, pid: Int32, uid: UInt32, handshake: String, name: String?,
        regions: [ClientRegion], uffd: consuming Userfaultfd, served: [ServedRegion],
        source: FileSource, configuration serverConfiguration: FaultServerConfiguration, probe: Int32
    ) throws(UserfaultfdError) {
        if state.withLock({ $0.stopping }) {
            throw UserfaultfdError(operation: "serve", kind: .invalidArgument("the daemon is stopping"))
        }
        let server = try FaultServer(userfaultfd: uffd, regions: served, source: source, configuration: serverConfiguration)
        server.traceSink = configuration.traceSink
        let session = try ClientSession(id: id, parent: parent, pid: pid, uid: uid, handshake: handshake, name: name,
                                        regions: regions, server: server, probeDescriptor: probe)
        server.onEvent = { [weak self] event in self?.handle(event, from: id, source: source) }
        state.withLock { $0.sessions[id] = session }
        do {
            try server.start()
        } catch {
            state.withLock { $0.sessions[id] = nil }
            server.stop()
            throw error
        }
        do {
            try session.startWatching(pollMilliseconds: configuration.livenessPollMilliseconds) { [weak self] session, reason in
                self?.ended(session, reason: reason)
            }
        } catch {
            state.withLock { $0.sessions[id] = nil }
            server.stop()
            throw error
        }
    }

    /// Called on a client's handler thread for the events its server does not handle itself.
    private func handle(_ event: FaultServerEvent, from id: Int, source: FileSource) {
        switch event {
        case .fork(let child):
            adoptFork(child, parentID: id, source: source)
        case .processExited:
            logger.debug("client \(id): the process is gone", metadata: ["client": "\(id)"])
        case .sourceFailed, .resolutionFailed, .faultOutsideRegions, .unknown:
            logger.warning("client \(id): \(event)", metadata: ["client": "\(id)"])
        case .removed, .unmapped, .remapped:
            logger.debug("client \(id): \(event)", metadata: ["client": "\(id)"])
        }
    }

    /// Serves a forked child's uffd with a new server over a copy of the parent's ranges.
    private func adoptFork(_ child: Userfaultfd.ForkedUserfaultfd, parentID: Int, source: FileSource) {
        guard let parent = state.withLock({ $0.sessions[parentID] }), let uffd = child.take() else { return }
        let served = parent.server.regions
        if served.isEmpty { return }
        let probe = fcntl(uffd.fileDescriptor.rawValue, F_DUPFD_CLOEXEC, 0)
        if probe < 0 {
            logger.error("client \(parentID): cannot adopt its forked child: dup failed, errno \(errno)")
            return
        }
        let pageSize = UInt64(parent.server.pageSize)
        let regions = served.map {
            ClientRegion(start: $0.range.start, length: $0.range.length, backingOffset: $0.sourceOffset, pageSize: pageSize)
        }
        var childConfiguration = parent.server.configuration
        childConfiguration.recordWorkingSet = nil
        childConfiguration.prefetch = configuration.server.prefetch
        if case .replay = childConfiguration.prefetch { childConfiguration.prefetch = .none }
        let id = nextClient.wrappingAdd(1, ordering: .relaxed).oldValue
        do {
            try startSession(id: id, parent: parentID, pid: parent.pid, uid: parent.uid, handshake: "fork", name: parent.name,
                             regions: regions, uffd: uffd, served: served, source: source,
                             configuration: childConfiguration, probe: probe)
            logger.info("client \(id) accepted: forked child of client \(parentID), \(regions.count) region(s)",
                        metadata: ["client": "\(id)", "parent": "\(parentID)"])
        } catch {
            _ = Glibc.close(probe)
            logger.error("client \(parentID): cannot serve its forked child: \(error)")
        }
    }

    /// Called on a session's watcher thread once it stopped serving.
    private func ended(_ session: ClientSession, reason: String) {
        let report = session.report
        state.withLock {
            $0.sessions[session.id] = nil
            $0.ended[session.id] = report
        }
        let s = report.statistics
        logger.info(
            "client \(report.id) ended (\(reason)): \(s.faults) faults (missing \(s.missingFaults), minor \(s.minorFaults), wp \(s.writeProtectFaults)), \(s.pagesInstalled) pages / \(report.bytesServed) bytes served, \(s.zeroPages) zero pages, p50 \(s.latencyP50) ns, p99 \(s.latencyP99) ns",
            metadata: ["client": "\(report.id)", "pid": "\(report.pid)", "uid": "\(report.uid)"])
    }
}
