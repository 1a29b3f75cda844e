import FaultEngine
import Histogram
import Synchronization
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The receiving side of a migration: maps the regions the source describes, lets a
/// workload run on them, and pulls every page it touches before it arrives.
///
/// A fault server serves the userfaultfd: its handler thread hands each fault on a
/// missing page to the network, which sends one request per page (deduplicated) on the
/// urgent channel; one receive thread per channel validates arriving frames and installs
/// pages through the server with `UFFDIO_COPY` or `UFFDIO_ZEROPAGE`. The server's
/// presence bitmap says which pages are here: a page that arrives after it was
/// installed is dropped.
///
/// ```swift
/// let listener = try MigrationListener(.tcp(host: "127.0.0.1", port: 7070))
/// let destination = try MigrationDestination.accept(on: listener, options: .init(token: token))
/// let stats = try destination.run { startWorkload(on: destination.regions) }
/// ```
public final class MigrationDestination: @unchecked Sendable {
    /// Limits and timeouts of a destination.
    public struct Options: Sendable {
        /// The pre-shared token the source must present.
        public var token: [UInt8]
        /// The most bytes the source may describe.
        public var maxBytes: Int = 64 << 30
        /// How long to wait for the source's two connections and handshakes. Connections
        /// refused in between (bad token, bad hello) do not end the wait.
        public var handshakeTimeoutMilliseconds: Int32 = 10_000
        /// How long one connection may take to deliver its complete hello.
        public var helloTimeoutMilliseconds: Int32 = 2_000
        /// How long to wait for the source to reconnect after a connection drops during
        /// postcopy. Past it, pages that can never arrive are poisoned and the migration fails.
        /// The wait ends on time whatever connecting peers do.
        public var recoveryTimeoutMilliseconds: Int32 = 5_000
        /// How long the source may leave a frame unfinished, or leave the stream silent,
        /// before the connection counts as lost (and recovery starts, after the switchover).
        /// It bounds the source's pause at the switchover too.
        public var stallTimeoutMilliseconds: Int32 = 10_000
        /// Whether a failed migration poisons the pages that can never arrive, so that a
        /// thread touching one gets SIGBUS instead of waiting forever. A process that exits
        /// as soon as ``MigrationDestination/run(onResume:)`` fails may turn this off: its
        /// threads waiting for such a page then stay blocked until it exits (the
        /// destination must stay alive until then), and none of them sees a signal.
        public var poisonOnFailure = true
        /// Called with one line (peer text escaped) for each connection refused during a
        /// handshake: a bad token, a bad or late hello, too many connections at once.
        public var onRefusedConnection: (@Sendable (String) -> Void)?
        /// Install arriving pages with `UFFDIO_MOVE` out of the receive buffer instead of
        /// `UFFDIO_COPY`: no copy, but the buffer's pages are faulted in afresh by the next
        /// receive. Needs the MOVE feature (kernel 6.8+).
        public var installByMove = false

        public init(token: [UInt8]) { self.token = token }
    }

    /// The regions, mapped in this process, in the order the source described them.
    /// They stay mapped as long as this object lives.
    public let regions: [MemoryRange]
    /// The regions numbered by global page: the fault server's own layout.
    let table: RegionLayout
    let options: Options
    let listener: MigrationListener
    let migrationID: UInt64
    let memory: [RegionMemory]
    /// Serves faults by asking for pages; owns the uffd and the presence bitmap.
    let server: FaultServer<PageRequests>
    let requests: PageRequests
    var handle: Userfaultfd.Handle { server.userfaultfdHandle }

    var stream: Connection
    /// Stream connections past the first (which alone carries control frames).
    var extraStreams: [Connection]
    var urgent: Connection
    var retired: [Connection] = []

    let receivedCount = Atomic<Int>(0)
    let duplicates = Atomic<Int>(0)
    /// CPU time of receive threads that have ended.
    let receiverCPU = Atomic<UInt64>(0)
    let registered = Atomic<Bool>(false)
    /// Whether the workload was let go (after which unregistered memory is never written).
    let resumed = Atomic<Bool>(false)
    /// Whether pages arrived before the switchover.
    let precopySeen = Atomic<Bool>(false)
    let completeSeen = Atomic<Bool>(false)
    let disconnected = Atomic<Bool>(false)
    let failure = Mutex<MigrationError?>(nil)
    let lostReason = Mutex<String?>(nil)
    let latency = Mutex<(Histogram<UInt64>, UInt64)>(
        (Histogram<UInt64>(highestTrackableValue: 600_000_000_000, numberOfSignificantValueDigits: .three), 0))
    var receivers: [DedicatedThread] = []
    var onResume: (@Sendable () -> Void)?
    var reconnects = 0

    /// Pages installed so far (or known to be zero).
    public var receivedPages: Int { receivedCount.load(ordering: .relaxed) }
    /// Pages in all regions.
    public var totalPages: Int { table.totalPages }

    /// Accepts a source's two connections on `listener`, checks its handshake, and maps
    /// the regions it describes.
    ///
    /// Connections that fail the handshake (bad token, malformed or late hello) are
    /// refused one by one (see ``Options/onRefusedConnection``) while listening goes on
    /// for the whole ``Options/handshakeTimeoutMilliseconds``.
    ///
    /// - Throws: ``MigrationError``: `unsupportedVersion`, `malformedFrame` or
    ///   `badRegions` when the authenticated source describes something this side refuses
    ///   (the source is told why); when no source shook hands in time, the reason the last
    ///   connection was refused (`badToken`, for one) or `connectionLost` if none came.
    public static func accept(on listener: MigrationListener, options: Options) throws(MigrationError) -> MigrationDestination {
        let deadline = MonotonicClock.nanoseconds() + UInt64(max(0, options.handshakeTimeoutMilliseconds)) * 1_000_000
        var acceptor = HelloAcceptor(listener, options)
        let accepted = try acceptor.acceptAll(until: deadline) { hello in
            hello.resume ? MigrationError(.malformedFrame("a resume handshake for a migration this destination does not know")) : nil
        }
        guard let accepted else {
            throw acceptor.lastRefusal ?? MigrationError(.connectionLost(
                "no source connected to \(listener.endpoint) within \(options.handshakeTimeoutMilliseconds) ms"))
        }
        let stream = accepted.streams[0]
        do throws(MigrationError) {
            try checkRegions(accepted.hello, options: options)
            let d = try MigrationDestination(hello: accepted.hello, streams: accepted.streams, urgent: accepted.urgent,
                                             listener: listener, options: options)
            // Idle until the switchover registers the regions, but started before the
            // source hears the welcome: a pure postcopy source pauses its workload and
            // sends the switchover right after it, and a handler thread started later
            // (a millisecond or more on a busy machine) would hold the frame unread.
            do {
                try d.server.start()
            } catch {
                throw MigrationError(error)
            }
            try d.welcome(accepted, bitmap: [], until: deadline)
            return d
        } catch {
            stream.sendError(error)
            throw error
        }
    }

    private static func checkRegions(_ hello: Wire.Hello, options: Options) throws(MigrationError) {
        if hello.pageSize != systemPageSize {
            throw MigrationError(.badRegions("page size \(hello.pageSize) differs from this machine's \(systemPageSize)"))
        }
        var total: UInt64 = 0
        for (i, length) in hello.regionLengths.enumerated() {
            if length == 0 || length % UInt64(systemPageSize) != 0 {
                throw MigrationError(.badRegions("region \(i) is \(length) bytes, not a positive multiple of \(systemPageSize)"))
            }
            total &+= length
            if total > UInt64(options.maxBytes) || total < length {
                throw MigrationError(.badRegions("the regions exceed the \(options.maxBytes)-byte limit"))
            }
        }
    }

    /// Answers every channel's hello before `deadline` (the first stream with `bitmap`),
    /// then gives them the stall limit.
    func welcome(_ accepted: HelloAcceptor.Accepted, bitmap: [UInt8], until deadline: UInt64) throws(MigrationError) {
        let all = accepted.streams + [accepted.urgent]
        for c in all { c.deadline = deadline }
        try accepted.streams[0].send(.welcome, payload: bitmap)
        for c in all.dropFirst() { try c.send(.welcome) }
        for c in all {
            c.deadline = .max
            c.stallNanoseconds = UInt64(max(1, options.stallTimeoutMilliseconds)) * 1_000_000
        }
    }

    private init(hello: Wire.Hello, streams: [Connection], urgent: Connection, listener: MigrationListener,
                 options: Options) throws(MigrationError) {
        var maps: [RegionMemory] = []
        for length in hello.regionLengths { maps.append(try RegionMemory(length: Int(length))) }
        memory = maps
        regions = maps.map { MemoryRange(start: $0.start, length: UInt64($0.length)) }
        let layout = RegionLayout(regions, pageSize: hello.pageSize)
        let requests: PageRequests
        do {
            requests = try PageRequests(table: layout, urgentFD: urgent.fd)
            let uffd = try Userfaultfd(features: options.installByMove ? [.poison, .move] : [.poison])
            // Region i is the source's bytes from its first global page on, so a fault's
            // source offset names its global page.
            server = try FaultServer(userfaultfd: uffd, regions: layout.globallyNumbered, source: requests,
                                     configuration: .init(strategy: .copy(chunkPages: 1), handlerPriority: 1))
        } catch {
            throw MigrationError(error)
        }
        table = server.regionLayout
        self.requests = requests
        stream = streams[0]
        extraStreams = Array(streams.dropFirst())
        self.urgent = urgent
        self.listener = listener
        self.options = options
        migrationID = hello.migrationID
    }

    deinit {
        server.stop()
    }

    // MARK: Running

    /// Receives the migration until every page is installed.
    ///
    /// - Parameter onResume: called once the switchover is done and the workload may run
    ///   on ``regions`` (faults on missing pages are served from then on). It runs on a
    ///   receive thread and should only start the workload, not run it.
    /// - Returns: the destination's view of the statistics.
    /// - Throws: ``MigrationError``. If a connection dropped during postcopy and the source
    ///   did not return within the recovery timeout, the error is `recoveryTimedOut` and
    ///   every page that can never arrive is poisoned (touching it raises SIGBUS), so no
    ///   faulting thread waits forever. Protocol errors poison the same way.
    public func run(onResume: @escaping @Sendable () -> Void) throws(MigrationError) -> MigrationStatistics {
        self.onResume = onResume
        // The closure may well capture this destination: do not keep it past the run.
        defer { self.onResume = nil }
        let start = MonotonicClock.nanoseconds()
        startReceivers()
        var completeSince: UInt64 = 0
        while true {
            usleep(500)
            if let error = failure.withLock({ $0 }) { throw fail(error) }
            if completeSeen.load(ordering: .acquiring) {
                if receivedCount.load(ordering: .acquiring) == table.totalPages {
                    return finish(start: start)
                }
                if completeSince == 0 { completeSince = MonotonicClock.nanoseconds() }
                if MonotonicClock.nanoseconds() - completeSince > UInt64(options.recoveryTimeoutMilliseconds) * 1_000_000 {
                    throw fail(MigrationError(.malformedFrame(
                        "the source declared the migration complete with \(table.totalPages - receivedPages) pages never sent")))
                }
            }
            if disconnected.load(ordering: .acquiring) {
                stopReceivers()
                if let error = failure.withLock({ $0 }) { throw fail(error) }
                if !registered.load(ordering: .acquiring) {
                    let why = lostReason.withLock { $0 } ?? "no reason given"
                    throw fail(MigrationError(.connectionLost("the source went away before the switchover (\(why))")))
                }
                if let error = recover() { throw error }
                disconnected.store(false, ordering: .releasing)
                lostReason.withLock { $0 = nil }
                startReceivers()
            }
        }
    }

    func startReceivers() {
        let s = stream, u = urgent
        receivers = [
            DedicatedThread(name: "pc-recv-stream") { [self] in receiveLoop(s, channel: .stream) },
            DedicatedThread(name: "pc-recv-urgent") { [self] in receiveLoop(u, channel: .urgent) },
        ]
        for e in extraStreams {
            receivers.append(DedicatedThread(name: "pc-recv-stream") { [self] in receiveLoop(e, channel: .stream, extra: true) })
        }
    }

    func stopReceivers() {
        stream.shutdown()
        urgent.shutdown()
        for e in extraStreams { e.shutdown() }
        for t in receivers { t.join() }
        receivers = []
    }

    func finish(start: UInt64) -> MigrationStatistics {
        // Every page is here: the receive threads are done (the stream one left at COMPLETE)
        // and hand in their latency figures as they exit.
        urgent.shutdown()
        for e in extraStreams { e.shutdown() }
        for t in receivers { t.join() }
        receivers = []
        let report = makeReport()
        try? stream.send(.done, payload: report.encode())
        if registered.load(ordering: .acquiring) {
            for r in regions { try? handle.unregister(r) }
        }
        server.stop()
        // The source closes both connections once it has the report. One that drops
        // instead may have lost it: take the source back and answer its COMPLETE again.
        if !closedByPeer(stream) { answerLateResume(report) }
        stopReceivers()
        var stats = MigrationStatistics()
        stats.regionBytes = table.totalPages * table.pageSize
        stats.totalSeconds = Double(MonotonicClock.nanoseconds() - start) / 1e9
        stats.reconnects = reconnects
        stats.mode = !registered.load(ordering: .relaxed) ? .stopAndCopy : precopySeen.load(ordering: .relaxed) ? .precopyPostcopy : .postcopy
        report.apply(to: &stats)
        return stats
    }

    func makeReport() -> DestinationReport {
        let clock = requests.handlerClock.load(ordering: .acquiring)
        let faultCPU = clock == Int.min ? 0 : ThreadCPU.read(clockid_t(clock))
        let cpu = receiverCPU.load(ordering: .acquiring) + faultCPU
        return latency.withLock { state in
            DestinationReport(
                faults: UInt64(requests.faults.load(ordering: .relaxed)),
                localZeroFaults: UInt64(requests.localZero.load(ordering: .relaxed)),
                p50: state.0.valueAtPercentile(50), p90: state.0.valueAtPercentile(90),
                p99: state.0.valueAtPercentile(99), max: state.0.max,
                blocktimeNanoseconds: state.1,
                duplicates: UInt64(duplicates.load(ordering: .relaxed)),
                latencyCount: state.0.totalCount,
                cpuNanoseconds: cpu)
        }
    }
}

/// An anonymous mapping owned by a destination.
final class RegionMemory: @unchecked Sendable {
    let base: UnsafeMutableRawPointer
    let length: Int
    var start: UInt64 { UInt64(UInt(bitPattern: base)) }

    init(length: Int) throws(MigrationError) {
        let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let p, p != MAP_FAILED else { throw systemError("mmap \(length) bytes") }
        base = p
        self.length = length
    }

    deinit { munmap(base, length) }
}
