import FaultEngine
import FoundationEssentials
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
    private let stopSignal: StopSignal
    private let state = Mutex(State())
    private let nextClient = Atomic<Int>(1)
    private let recordClaimed = Atomic<Bool>(false)

    private struct State {
        var listener: FileDescriptor?
        var acceptThread: DedicatedThread?
        var handshakes: [Int: DedicatedThread] = [:]
        var pendingSockets: [Int: FileDescriptor] = [:]
        var nextHandshake = 0
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
        let thread = DedicatedThread(name: "uffd-accept") { [self] in self.acceptLoop(listener) }
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

    /// The statistics of every client as a JSON document.
    public func statisticsJSON() -> String {
        struct Document: Encodable {
            var socket: String
            var memoryFile: String?
            var refusedHandshakes: Int
            var clients: [ClientReport]
        }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .prettyPrinted]
        let doc = Document(socket: configuration.socketPath, memoryFile: configuration.memoryFile,
                           refusedHandshakes: refusedCount, clients: clients)
        return (try? encoder.encode(doc)).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
    }

    // MARK: - Accepting

    private func acceptLoop(_ listener: FileDescriptor) {
        var fds = (
            pollfd(fd: listener.rawValue, events: Int16(POLLIN), revents: 0),
            pollfd(fd: stopSignal.fileDescriptor.rawValue, events: Int16(POLLIN), revents: 0)
        )
        while true {
            let n = withUnsafeMutableBytes(of: &fds) { raw in
                Glibc.poll(raw.baseAddress!.assumingMemoryBound(to: pollfd.self), 2, -1)
            }
            if n < 0 {
                if errno == EINTR { continue }
                logger.error("poll on the listening socket failed: errno \(errno)")
                return
            }
            if fds.1.revents != 0 { return }
            let connection: FileDescriptor?
            do {
                connection = try UnixSocket.accept(listener)
            } catch {
                logger.error("\(error)")
                // EMFILE and the like: back off instead of spinning.
                usleep(100_000)
                continue
            }
            guard let connection else { continue }
            startHandshake(on: connection)
        }
    }

    /// Runs one connection's handshake on its own short-lived thread, so that a slow or
    /// silent peer never holds up the others.
    private func startHandshake(on connection: FileDescriptor) {
        let key = state.withLock { s -> Int in
            s.nextHandshake += 1
            s.pendingSockets[s.nextHandshake] = connection
            return s.nextHandshake
        }
        let thread = DedicatedThread(name: "uffd-handshake") { [self] in
            self.handshake(on: connection)
            try? connection.close()
            // A finished handshake thread detaches itself by leaving the table.
            self.state.withLock { s in
                s.pendingSockets[key] = nil
                s.handshakes[key] = nil
            }
        }
        state.withLock { s in
            // Unless it already finished (then it removed nothing and must not be added).
            if s.pendingSockets[key] != nil { s.handshakes[key] = thread }
        }
    }

    private func handshake(on connection: FileDescriptor) {
        let peer: DescriptorPassing.PeerCredentials
        do {
            peer = try DescriptorPassing.peerCredentials(of: connection)
        } catch {
            refuse(pid: 0, uid: UInt32.max, reason: "cannot read its credentials: \(error)", replyNative: nil)
            return
        }
        UnixSocket.setTimeout(connection, seconds: configuration.handshakeTimeout)
        let message: (body: [UInt8], descriptors: [FileDescriptor])
        do {
            message = try UnixSocket.receiveMessage(from: connection, maxBody: configuration.maxHandshakeBytes)
        } catch {
            refuse(pid: peer.pid, uid: peer.uid, reason: "\(error)", replyNative: nil)
            return
        }
        var descriptors = message.descriptors
        defer { for fd in descriptors { try? fd.close() } }
        let looksNative = message.body.first == UInt8(ascii: "{")
        let reply = looksNative ? connection : nil
        if peer.uid != ownUID && !configuration.allowedUIDs.contains(peer.uid) {
            refuse(pid: peer.pid, uid: peer.uid, reason: "\(HandshakeError.unauthorized(uid: peer.uid))", replyNative: reply)
            return
        }
        do throws(HandshakeError) {
            let handshake = try Handshake.decode(message.body)
            let client = try accept(handshake, descriptors: &descriptors, peer: peer)
            if looksNative {
                UnixSocket.sendAll(NativeReply(accepted: true, client: client).encoded(), over: connection)
            }
        } catch {
            refuse(pid: peer.pid, uid: peer.uid, reason: "\(error)", replyNative: reply)
        }
    }

    private func refuse(pid: Int32, uid: UInt32, reason: String, replyNative: FileDescriptor?) {
        state.withLock { $0.refusals += 1 }
        logger.warning("refused handshake from pid \(pid) uid \(uid): \(reason)",
                       metadata: ["pid": "\(pid)", "uid": "\(uid)"])
        if let replyNative {
            UnixSocket.sendAll(NativeReply(accepted: false, reason: reason).encoded(), over: replyNative)
        }
    }

    /// Checks a decoded handshake and starts serving it. On success the uffd descriptor
    /// is taken out of `descriptors` (the server owns it).
    private func accept(_ handshake: Handshake, descriptors: inout [FileDescriptor],
                        peer: DescriptorPassing.PeerCredentials) throws(HandshakeError) -> Int {
        let expected: Int
        let source: FileSource
        let features: Userfaultfd.Features
        var name: String? = nil
        var fromMemoryFile = false
        switch handshake {
        case .firecracker:
            expected = 1
            features = []
        case .native(let header):
            expected = header.descriptorCount
            features = Userfaultfd.Features(rawValue: header.features)
            name = header.name
        }
        if descriptors.count != expected {
            throw .descriptors("expected \(expected == 1 ? "exactly one descriptor (the userfaultfd)" : "two descriptors (the userfaultfd and the backing file)"), received \(descriptors.count)")
        }
        if !Self.isUserfaultfd(descriptors[0]) {
            throw .descriptors("the first descriptor is not a userfaultfd")
        }
        if case .native(let header) = handshake, header.backing == .attached {
            do {
                source = try FileSource(descriptor: descriptors[1])
            } catch {
                throw .serving("the attached backing file cannot be read: \(error)")
            }
        } else {
            guard let memorySource else {
                throw .serving("the daemon was started without a memory file, and the client sent no backing")
            }
            source = memorySource
            fromMemoryFile = true
        }
        let regions = handshake.regions
        try ClientRegion.validate(regions, backingLength: source.length)
        if let huge = regions.first(where: { $0.pageSize != UInt64(systemPageSize) }) {
            // A valid description, but the engine installs base pages only: refusing is
            // better than leaving the guest hanging on its first fault.
            throw .serving("region \(huge.range) has \(huge.pageSize)-byte pages; only \(systemPageSize)-byte pages are served")
        }

        var serverConfiguration = configuration.server
        // One message per read: the engine applies layout events drained after an EAGAIN
        // before the events still waiting in its current batch, so a REMAP read in a batch
        // could be overtaken by the UNMAP of its old range (the range would be dropped,
        // and faults at its new address never served). With batches of one, no event waits.
        serverConfiguration.batchSize = 1
        var preload: [UInt64] = []
        if fromMemoryFile {
            if let replay = configuration.replayWorkingSet {
                do {
                    preload = try WorkingSetFile.read(replay)
                } catch {
                    logger.warning("working set \(replay) not replayed: \(error)")
                }
            }
            if let record = configuration.recordWorkingSet,
               recordClaimed.compareExchange(expected: false, desired: true, ordering: .relaxed).exchanged {
                serverConfiguration.recordWorkingSet = record
                // Only faults are recorded: pages that came in with a chunk or a read-ahead
                // would be missing from the set. The recording run serves page by page.
                serverConfiguration.strategy = .copy(chunkPages: 1)
                serverConfiguration.prefetch = .none
            }
        }
        let probe = fcntl(descriptors[0].rawValue, F_DUPFD_CLOEXEC, 0)
        if probe < 0 { throw .serving("dup of the userfaultfd failed: errno \(errno)") }
        let uffdDescriptor = descriptors.removeFirst()
        if !preload.isEmpty {
            let handle = Userfaultfd.Handle(fileDescriptor: uffdDescriptor, features: features)
            let started = Self.monotonicNanoseconds()
            let done = WorkingSetPreload.install(preload, regions: regions, source: source, uffd: handle)
            let early = done.stoppedEarly.map { ", stopped early: \($0)" } ?? ""
            logger.info("pid \(peer.pid): replayed the working set: \(done.pagesInstalled) pages in \(done.copies) copies, \((Self.monotonicNanoseconds() - started) / 1000) µs\(early)",
                        metadata: ["pid": "\(peer.pid)", "uid": "\(peer.uid)"])
        }
        let served = regions.map { ServedRegion(range: $0.range, sourceOffset: $0.backingOffset) }
        let id = nextClient.wrappingAdd(1, ordering: .relaxed).oldValue
        do {
            try startSession(
                id: id, parent: nil, pid: peer.pid, uid: peer.uid, handshake: handshake.kind, name: name,
                regions: regions, uffd: Userfaultfd(adopting: uffdDescriptor, features: features),
                served: served, source: source, configuration: serverConfiguration, probe: probe)
        } catch {
            _ = Glibc.close(probe)
            throw .serving("\(error)")
        }
        let bytes = regions.reduce(0) { $0 + $1.length }
        logger.info("client \(id) accepted: pid \(peer.pid) uid \(peer.uid), \(handshake.kind) handshake, \(regions.count) region(s), \(bytes) bytes",
                    metadata: ["client": "\(id)", "pid": "\(peer.pid)", "uid": "\(peer.uid)"])
        return id
    }

    /// Creates, registers and starts one client's server and watcher.
    private func startSession(
        id: Int, parent: Int?, pid: Int32, uid: UInt32, handshake: String, name: String?,
        regions: [ClientRegion], uffd: consuming Userfaultfd, served: [ServedRegion],
        source: FileSource, configuration serverConfiguration: FaultServerConfiguration, probe: Int32
    ) throws(UserfaultfdError) {
        if state.withLock({ $0.stopping }) {
            throw UserfaultfdError(operation: "serve", kind: .invalidArgument("the daemon is stopping"))
        }
        let server = try FaultServer(userfaultfd: uffd, regions: served, source: source, configuration: serverConfiguration)
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
        session.startWatching(pollMilliseconds: configuration.livenessPollMilliseconds) { [weak self] session, reason in
            self?.ended(session, reason: reason)
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
        let regions = served.map { ClientRegion(start: $0.range.start, length: $0.range.length, backingOffset: $0.sourceOffset) }
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

    static func monotonicNanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    /// Whether `fd` is a userfaultfd (its /proc link names the anonymous inode).
    static func isUserfaultfd(_ fd: FileDescriptor) -> Bool {
        var buffer = [CChar](repeating: 0, count: 64)
        let n = readlink("/proc/self/fd/\(fd.rawValue)", &buffer, buffer.count - 1)
        if n <= 0 { return false }
        let target = String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return target == "anon_inode:[userfaultfd]"
    }
}
