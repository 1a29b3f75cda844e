import FaultEngine
import SystemPackage
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// One connection's handshake: credentials, the message, its checks, and the start of serving.
extension Manager {
    /// Reads, checks and serves one admitted connection's handshake (on its own thread).
    func handshake(on connection: FileDescriptor, peer: DescriptorPassing.PeerCredentials, deadline: ContinuousClock.Instant) {
        // Only the reply is written with a timeout; reads wait on the deadline.
        UnixSocket.setTimeout(connection, seconds: configuration.handshakeTimeout)
        let message: HandshakeReader.Message
        do {
            message = try HandshakeReader(limit: configuration.maxHandshakeBytes, deadline: deadline).read(from: connection)
        } catch {
            refuse(pid: peer.pid, uid: peer.uid, reason: "\(error)", replyNative: nil)
            return
        }
        var descriptors = message.descriptors
        defer { for fd in descriptors { try? fd.close() } }
        let looksNative = message.body.first == UInt8(ascii: "{")
        let reply = looksNative ? connection : nil
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

    /// Counts and logs a refusal (the reason escaped and capped: it may quote the peer),
    /// and answers a native client.
    func refuse(pid: Int32, uid: UInt32, reason: String, replyNative: FileDescriptor?) {
        let suppressed = state.withLock { s -> Int? in
            s.refusals += 1
            return s.refusalLines.admit(now: ContinuousClock.now)
        }
        if let suppressed {
            let more = suppressed > 0 ? " (\(suppressed) refusal lines suppressed before this one)" : ""
            logger.warning("refused handshake from pid \(pid) uid \(uid): \(UntrustedText(reason, limit: Self.logReasonLimit))\(more)",
                           metadata: ["pid": "\(pid)", "uid": "\(uid)"])
        }
        if let replyNative {
            UnixSocket.sendAll(NativeReply(accepted: false, reason: reason).encoded(), over: replyNative)
        }
    }

    /// The most bytes of a refusal's reason in a log line.
    static let logReasonLimit = 1000

    /// Checks a decoded handshake and starts serving it. On success the uffd descriptor
    /// is taken out of `descriptors` (the server owns it).
    func accept(_ handshake: Handshake, descriptors: inout [FileDescriptor],
                peer: DescriptorPassing.PeerCredentials) throws(HandshakeError) -> Int {
        let (source, fromMemoryFile) = try checkedSource(handshake, descriptors: descriptors)
        let regions = handshake.regions
        try ClientRegion.validate(regions, backingLength: source.length)
        // One page size per client (Firecracker backs all guest memory alike): a fault
        // server installs pages of one size.
        let pageSize = regions[0].pageSize
        if let other = regions.first(where: { $0.pageSize != pageSize }) {
            throw .serving("mixed page sizes: region \(regions[0].range) has \(pageSize)-byte pages, region \(other.range) "
                + "\(other.pageSize)-byte pages; one page size per client is served")
        }
        try ClientRegion.checkPageSizes(regions, pid: peer.pid)
        var serverConfiguration = configuration(forPageSize: pageSize, peer: peer)
        let preload = fromMemoryFile ? workingSet(recordingInto: &serverConfiguration) : []
        let probe = fcntl(descriptors[0].rawValue, F_DUPFD_CLOEXEC, 0)
        if probe < 0 { throw .serving("dup of the userfaultfd failed: errno \(errno)") }
        let uffdDescriptor = descriptors.removeFirst()
        let features = handshake.features
        if !preload.isEmpty {
            replay(preload, regions: regions, source: source, uffd: Userfaultfd.Handle(fileDescriptor: uffdDescriptor, features: features),
                   pageSize: pageSize, peer: peer)
        }
        let served = regions.map { ServedRegion(range: $0.range, sourceOffset: $0.backingOffset) }
        let id = nextClient.wrappingAdd(1, ordering: .relaxed).oldValue
        do {
            try startSession(
                id: id, parent: nil, pid: peer.pid, uid: peer.uid, handshake: handshake.kind, name: handshake.name,
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

    /// Checks the descriptors a handshake came with and picks where its pages come from.
    ///
    /// - Returns: the source, and whether it is the daemon's memory file.
    private func checkedSource(_ handshake: Handshake, descriptors: [FileDescriptor]) throws(HandshakeError) -> (FileSource, Bool) {
        let expected = handshake.descriptorCount
        if descriptors.count != expected {
            throw .descriptors("expected \(expected == 1 ? "exactly one descriptor (the userfaultfd)" : "two descriptors (the userfaultfd and the backing file)"), received \(descriptors.count)")
        }
        try ReceivedUserfaultfd.check(descriptors[0])
        if case .native(let header) = handshake, header.backing == .attached {
            do {
                return (try FileSource(descriptor: descriptors[1]), false)
            } catch {
                throw .serving("the attached backing file cannot be read: \(error)")
            }
        }
        guard let memorySource else {
            throw .serving("the daemon was started without a memory file, and the client sent no backing")
        }
        return (memorySource, true)
    }

    /// The daemon's server configuration, adapted to the client's page size.
    private func configuration(forPageSize pageSize: UInt64, peer: DescriptorPassing.PeerCredentials) -> FaultServerConfiguration {
        var serverConfiguration = configuration.server
        serverConfiguration.pageSize = Int(pageSize)
        let strategy = serverConfiguration.strategy
        if Int(pageSize) != systemPageSize, strategy != .copy(chunkPages: strategy.chunkPages) {
            // Huge pages are installed with COPY only (hugetlb has no MOVE; MINOR and
            // SIGBUS are not served there): same chunk, other strategy.
            serverConfiguration.strategy = .copy(chunkPages: strategy.chunkPages)
            logger.info("pid \(peer.pid): \(pageSize)-byte pages are served with the copy strategy, not \(strategy)",
                        metadata: ["pid": "\(peer.pid)", "uid": "\(peer.uid)"])
        }
        return serverConfiguration
    }

    /// For a client of the memory file: the working set to replay, and the recording
    /// set up in `serverConfiguration` if this is the first such client.
    private func workingSet(recordingInto serverConfiguration: inout FaultServerConfiguration) -> [UInt64] {
        var preload: [UInt64] = []
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
        return preload
    }

    /// Installs a recorded working set before serving starts, and logs how it went.
    private func replay(_ preload: [UInt64], regions: [ClientRegion], source: FileSource, uffd: Userfaultfd.Handle,
                        pageSize: UInt64, peer: DescriptorPassing.PeerCredentials) {
        let started = ContinuousClock.now
        let done = WorkingSetPreload.install(preload, regions: regions, source: source, uffd: uffd, pageSize: pageSize, threads: Self.preloadThreads)
        let early = done.stoppedEarly.map { ", stopped early: \($0)" } ?? ""
        logger.info("pid \(peer.pid): replayed the working set: \(done.pagesInstalled) pages in \(done.copies) copies, \(Self.microseconds(ContinuousClock.now - started)) µs\(early)",
                    metadata: ["pid": "\(peer.pid)", "uid": "\(peer.uid)"])
    }

    /// Threads that install a replayed working set: one per CPU, at most four.
    static let preloadThreads = max(1, min(4, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))))

    static func microseconds(_ d: Duration) -> Int64 {
        d.components.seconds * 1_000_000 + d.components.attoseconds / 1_000_000_000_000
    }
}
