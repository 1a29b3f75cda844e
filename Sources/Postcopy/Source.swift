import FaultEngine
import Synchronization
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The sending side of a migration: owns a bitmap of the pages still missing on the
/// destination and sends each page once.
///
/// The background stream sends missing pages in address order on one connection;
/// a dedicated thread answers page requests on the other at once and makes the stream
/// continue just after the requested page. Zero pages travel as markers.
///
/// ```swift
/// let source = try MigrationSource(regions: [range], options: .init(token: token, mode: .precopyPostcopy))
/// let stats = try source.migrate(to: .tcp(host: "127.0.0.1", port: 7070)) { workload.pause() }
/// ```
public final class MigrationSource: @unchecked Sendable {
    /// How a source migrates.
    public struct Options: Sendable {
        /// The pre-shared token the destination expects.
        public var token: [UInt8]
        /// Postcopy only, precopy then postcopy, or stop-and-copy.
        public var mode: MigrationStatistics.Mode
        /// The most precopy rounds (the first sends every page); ignored for pure postcopy.
        public var precopyRounds: Int = 4
        /// Precopy ends early once a round leaves at most this many dirty pages, and the
        /// discard passes once at most this many pages would be left to forget in the pause.
        public var convergencePages: Int = 256
        /// The kernel send buffer of the stream connections, shared between them. A page claimed by the stream waits
        /// behind everything queued before it, so a requested page that was already queued
        /// arrives no sooner than this many bytes later: smaller keeps remote faults short.
        public var streamBufferBytes: Int = 256 << 10
        /// After precopy, the most passes that have the destination forget pages dirtied
        /// again (outside the pause), so that few remain to forget during it. Each pass
        /// forgets what the last one saw change, so the pause forgets about what changes
        /// during one pass: with the demo workload on a busy machine, 8 passes sometimes
        /// ended with 2,500 pages left to forget (16 ms of the pause).
        public var discardPasses: Int = 16
        /// After answering a request, the most pages that directly follow it, still missing,
        /// to send with it on the urgent channel (0...64): a workload that faults on one page
        /// tends to touch its neighbours next, and each page sent along saves a round trip.
        public var pagesAfterRequest: Int = 64
        /// Whether to reconnect and resume after a connection drops during postcopy.
        public var reconnect: Bool = true
        /// How long to keep trying to reconnect.
        public var recoveryTimeoutMilliseconds: Int32 = 5_000
        /// How long connecting and the destination's answer to the hellos may take.
        public var handshakeTimeoutMilliseconds: Int32 = 10_000
        /// How long the destination may leave a send without progress or an awaited answer
        /// unsent before the connection counts as lost (and, during postcopy, is re-established).
        public var stallTimeoutMilliseconds: Int32 = 10_000
        /// Connections the background stream is spread over (1...8), each sent by its own
        /// thread: for when one thread cannot keep a connection full. Requests keep their
        /// own connection whatever this is. ``streamBufferBytes`` is shared between them.
        /// Two doubled the postcopy rate over loopback on a 2-CPU machine with the
        /// workload running on both CPUs, at the same remote-fault latency.
        public var streamConnections: Int = 2
        /// Sends page data on the stream connections with `MSG_ZEROCOPY` (TCP only): the
        /// kernel sends from the migrated memory itself, and each buffer counts as in use
        /// until its completion arrives on the socket's error queue; ``MigrationSource/migrate(to:pause:)``
        /// returns only once every completion has come. A page the workload writes while the
        /// kernel still holds it (precopy) is dirty to the tracker and sent again, as with
        /// copying sends. Over loopback the kernel copies anyway.
        public var zeroCopy: Bool = false
        /// For tests of recovery: shut the stream connections down once this many pages were
        /// sent after the switchover, as a network failure would.
        public var _dropConnectionsAfterPages: Int?
        /// For tests of recovery: drop only the stream connection that reaches that count.
        public var _dropOnlyOneConnection = false

        public init(token: [UInt8], mode: MigrationStatistics.Mode = .postcopy) {
            self.token = token
            self.mode = mode
        }
    }

    /// The regions being migrated (memory of this process, which must stay mapped).
    public let regions: [MemoryRange]
    /// The regions, numbered by global page (the bitmaps' index).
    let table: RegionLayout
    let options: Options
    let missing: PageBitmap
    private let sentOnce: PageBitmap
    let seek = Atomic<Int>(-1)
    let linkDown = Atomic<Bool>(false)
    let failure = Mutex<MigrationError?>(nil)
    private let phase = Atomic<UInt8>(MigrationProgress.Phase.connecting.rawValue)
    private let round = Atomic<Int>(0)
    private let precopyBytes = Atomic<Int>(0)
    private let pauseBytes = Atomic<Int>(0)
    private let pausePages = Atomic<Int>(0)
    private let streamBytes = Atomic<Int>(0)
    private let streamZeroPages = Atomic<Int>(0)
    private let requestBytes = Atomic<Int>(0)
    private let zeroPages = Atomic<Int>(0)
    let requestedPages = Atomic<Int>(0)
    let prefetchedPages = Atomic<Int>(0)
    private let postcopySent = Atomic<Int>(0)
    /// CPU time of urgent-channel threads that have ended.
    let urgentCPU = Atomic<UInt64>(0)
    private let dropDone = Atomic<Bool>(false)
    /// CPU time of extra stream threads that have ended.
    let streamCPU = Atomic<UInt64>(0)
    /// Set when one stream thread failed: the others stop.
    private let streamFailed = Atomic<Bool>(false)

    /// Prepares to migrate `regions` (page-aligned, non-empty).
    public init(regions: [MemoryRange], options: Options) throws(MigrationError) {
        if regions.isEmpty || regions.count > Wire.maxRegions {
            throw MigrationError(.invalidArgument("\(regions.count) regions given (1...\(Wire.maxRegions) allowed)"))
        }
        for r in regions where r.length == 0 || !r.isAligned(to: UInt64(systemPageSize)) {
            throw MigrationError(.invalidArgument("region \(r) is empty or not page-aligned"))
        }
        if options.token.isEmpty || options.token.count > Wire.maxTokenLength {
            throw MigrationError(.invalidArgument("a token of 1...\(Wire.maxTokenLength) bytes is required"))
        }
        if !(1...Wire.maxStreams).contains(options.streamConnections) {
            throw MigrationError(.invalidArgument("\(options.streamConnections) stream connections (1...\(Wire.maxStreams) allowed)"))
        }
        self.regions = regions
        self.options = options
        table = RegionLayout(regions, pageSize: systemPageSize)
        do {
            missing = try PageBitmap(count: table.totalPages, set: true)
            sentOnce = try PageBitmap(count: table.totalPages)
        } catch {
            throw MigrationError(error)
        }
    }

    /// How far the migration has come.
    public var progress: MigrationProgress {
        MigrationProgress(
            phase: MigrationProgress.Phase(rawValue: phase.load(ordering: .relaxed)) ?? .connecting,
            pagesSent: table.totalPages - missing.population,
            totalPages: table.totalPages,
            round: round.load(ordering: .relaxed))
    }

    /// Migrates the regions to the destination listening at `endpoint`.
    ///
    /// - Parameters:
    ///   - endpoint: where the destination listens.
    ///   - pause: stops the workload on this side and returns once it no longer writes
    ///     the regions. Called once, at the switchover.
    /// - Returns: the statistics of both sides.
    /// - Throws: ``MigrationError``: `badToken` or `badRegions` if the destination refused,
    ///   `connectionLost` if it could not be reached or a dropped connection could not be
    ///   re-established.
    public func migrate(to endpoint: MigrationEndpoint, pause: @Sendable () -> Void) throws(MigrationError) -> MigrationStatistics {
        let start = MonotonicClock.nanoseconds()
        let cpuStart = ThreadCPU.current()
        var stats = MigrationStatistics()
        stats.mode = options.mode
        stats.regionBytes = table.totalPages * table.pageSize
        let migrationID = UInt64.random(in: 1...UInt64.max)
        if options.zeroCopy, case .unix = endpoint {
            throw MigrationError(.invalidArgument("zero-copy sending needs a TCP endpoint, not \(endpoint)"))
        }
        let deadline = start + UInt64(max(0, options.handshakeTimeoutMilliseconds)) * 1_000_000
        var channels = try connectAll(endpoint, id: migrationID, resume: false, until: deadline)
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: Wire.headerSize, alignment: 8)
        defer { scratch.deallocate() }
        var urgentThread: DedicatedThread?
        defer {
            for c in channels.all { c.shutdown() }
            urgentThread?.join()
        }
        do throws(MigrationError) {
            var tracker = try precopy(channels, scratch: scratch, stats: &stats)
            try switchover(channels, tracker: tracker, scratch: scratch, pause: pause, stats: &stats)
            phase.store(MigrationProgress.Phase.postcopy.rawValue, ordering: .relaxed)
            try postcopy(endpoint, id: migrationID, channels: &channels, urgentThread: &urgentThread,
                         scratch: scratch, stats: &stats)
            // Unregistering takes tens of milliseconds and holds the address space: only
            // once the destination has every page.
            tracker = nil
        } catch {
            phase.store(MigrationProgress.Phase.failed.rawValue, ordering: .relaxed)
            channels.stream.sendError(error)
            throw error
        }
        phase.store(MigrationProgress.Phase.finished.rawValue, ordering: .relaxed)
        // The destination has every page: the urgent thread hands in its CPU time as it ends.
        channels.urgent.shutdown()
        urgentThread?.join()
        urgentThread = nil
        // The kernel may still hold migrated memory for sends it has not finished: only
        // once it says so may the caller change or unmap that memory.
        for c in channels.streams {
            try c.awaitZeroCopyCompletions()
            stats.zeroCopySends += c.zeroCopy.sent
            stats.zeroCopyCopiedSends += c.zeroCopy.copied
        }
        stats.streamConnections = channels.streams.count
        stats.sourceCPUSeconds = Double(ThreadCPU.current() - cpuStart + urgentCPU.load(ordering: .acquiring)
                                        + streamCPU.load(ordering: .acquiring)) / 1e9
        stats.totalSeconds = Double(MonotonicClock.nanoseconds() - start) / 1e9
        stats.precopyBytes = precopyBytes.load(ordering: .relaxed)
        stats.streamBytes = streamBytes.load(ordering: .relaxed)
        stats.streamZeroPages = streamZeroPages.load(ordering: .relaxed)
        stats.requestBytes = requestBytes.load(ordering: .relaxed)
        stats.zeroPages = zeroPages.load(ordering: .relaxed)
        stats.requestedPages = requestedPages.load(ordering: .relaxed)
        stats.pagesSentAfterRequests = prefetchedPages.load(ordering: .relaxed)
        stats.pageBytesSent = stats.precopyBytes + pauseBytes.load(ordering: .relaxed) + stats.streamBytes + stats.requestBytes
        return stats
    }

    // MARK: Phases

    /// Precopy rounds while the workload runs, then passes that have the destination
    /// forget pages that keep changing. Returns the dirty tracker (nil for pure postcopy).
    private func precopy(_ channels: Channels, scratch: UnsafeMutableRawPointer,
                         stats: inout MigrationStatistics) throws(MigrationError) -> DirtyTracker? {
        let stream = channels.stream
        guard options.mode != .postcopy && options.precopyRounds > 0 else { return nil }
        let tracker = try DirtyTracker(table: table)
        phase.store(MigrationProgress.Phase.precopy.rawValue, ordering: .relaxed)
        var previous = Int.max
        for r in 1...options.precopyRounds {
            round.store(r, ordering: .relaxed)
            stats.precopyRounds = r
            try sendMissing(channels, scratch: scratch, phase: .precopy)
            let dirty = try tracker.scan { g in missing.testAndSet(g) }
            if dirty <= options.convergencePages { break }
            // A round that leaves more than three quarters of the last one's dirty pages
            // dirty again is not converging: another would mostly resend the same pages
            // (with the demo workload, rounds 2-4 resent 1.2-1.5 GB for a 1 GiB region).
            // Postcopy sends each of them once.
            if dirty > previous / 4 * 3 { break }
            previous = dirty
        }
        // Pages that keep changing would each cost the destination an madvise while the
        // workload is stopped: have it forget them now, and pull them after the switchover.
        if options.mode == .precopyPostcopy {
            for _ in 0..<options.discardPasses {
                // Only pages sent and dirtied since cost the pause: pages forgotten earlier
                // and dirtied again are merely missing. Judge the passes by those alone, and
                // never leave the last pass's dirty set to the pause unexamined (a pass that
                // found 24,000 dirty pages left 2,500 runs to forget in the pause, 16 ms).
                let hot = table.runs(setInBoth: missing, sentOnce)
                if hot.reduce(0, { $0 + Int($1.count) }) <= options.convergencePages { break }
                for run in hot {
                    let base = table.regions[Int(run.region)].firstGlobal + Int(run.first)
                    for g in base..<(base + Int(run.count)) { sentOnce.testAndClear(g) }
                }
                try stream.send(.discard, payload: Wire.encodeRuns(hot))
                try expect(.discarded, on: stream)
                stats.discardedPages += hot.reduce(0) { $0 + Int($1.count) }
                // A page once written is missing until postcopy sends it, and only pages sent
                // and not yet written matter from here on: written pages need no protection
                // again. Re-protecting them took most of each pass (20 ms for 12,000 hot
                // pages on a busy machine), and what the workload wrote meanwhile was left
                // to the pause.
                try tracker.scan(protectAgain: false) { g in missing.testAndSet(g) }
            }
        }
        round.store(0, ordering: .relaxed)
        return tracker
    }

    /// Pauses the workload, sends what must travel while it is stopped, and waits until
    /// the destination has resumed it.
    private func switchover(_ channels: Channels, tracker: DirtyTracker?, scratch: UnsafeMutableRawPointer,
                            pause: @Sendable () -> Void, stats: inout MigrationStatistics) throws(MigrationError) {
        let stream = channels.stream
        pause()
        let stopped = MonotonicClock.nanoseconds()
        phase.store(MigrationProgress.Phase.switchover.rawValue, ordering: .relaxed)
        if let t = tracker { try t.scan(protectAgain: false) { g in missing.testAndSet(g) } }
        if options.mode == .stopAndCopy {
            try sendMissing(channels, scratch: scratch, phase: .pause)
            try stream.send(.switchover, payload: Wire.encodeRuns([]), count: 1)
        } else {
            try stream.send(.switchover, payload: Wire.encodeRuns(table.runs(setInBoth: missing, sentOnce)))
        }
        try expect(.resumed, on: stream)
        stats.switchoverPauseMicroseconds = Double(MonotonicClock.nanoseconds() - stopped) / 1000
        stats.pausePages = pausePages.load(ordering: .relaxed)
    }

    /// Streams the rest while the urgent thread answers requests; reconnects after a drop.
    private func postcopy(_ endpoint: MigrationEndpoint, id: UInt64, channels: inout Channels,
                          urgentThread: inout DedicatedThread?, scratch: UnsafeMutableRawPointer,
                          stats: inout MigrationStatistics) throws(MigrationError) {
        let streamStart = MonotonicClock.nanoseconds()
        var streamEnd = streamStart
        urgentThread = startUrgent(channels.urgent)
        while true {
            do throws(MigrationError) {
                try sendMissing(channels, scratch: scratch, phase: .stream)
                streamEnd = MonotonicClock.nanoseconds()
                try channels.stream.send(.complete)
                let payload = try expect(.done, on: channels.stream)
                try DestinationReport.decode(payload).apply(to: &stats)
                break
            } catch {
                guard case .connectionLost = error.kind, options.reconnect else { throw error }
                if let f = failure.withLock({ $0 }) { throw f }
                for c in channels.all { c.shutdown() }
                urgentThread?.join()
                channels = try reconnect(endpoint, id: id)
                stats.reconnects += 1
                linkDown.store(false, ordering: .releasing)
                urgentThread = startUrgent(channels.urgent)
            }
        }
        stats.streamSeconds = Double(streamEnd - streamStart) / 1e9
    }

    // MARK: Sending

    enum SendPhase { case precopy, pause, stream, request }

    /// Sends every missing page on the stream connections, one thread each; returns when
    /// none is left. Pages on the connections past the first may overtake frames on it, so
    /// before precopy's discards and the switchover (which must follow the pages they
    /// concern) those connections are flushed: the destination has installed all they carried.
    private func sendMissing(_ channels: Channels, scratch: UnsafeMutableRawPointer, phase: SendPhase) throws(MigrationError) {
        let extra = channels.streams.dropFirst()
        if extra.isEmpty { return try sendMissing(channels.stream, scratch: scratch, phase: phase, from: 0, all: channels.streams) }
        streamFailed.store(false, ordering: .relaxed)
        let errors = Mutex<MigrationError?>(nil)
        let share = max(1, table.totalPages / channels.streams.count)
        let threads = extra.enumerated().map { i, connection in
            DedicatedThread(name: "pc-stream") { [self] in
                let cpuStart = ThreadCPU.current()
                let threadScratch = UnsafeMutableRawPointer.allocate(byteCount: Wire.headerSize, alignment: 8)
                defer {
                    threadScratch.deallocate()
                    streamCPU.add(ThreadCPU.current() - cpuStart, ordering: .releasing)
                }
                do throws(MigrationError) {
                    try sendMissing(connection, scratch: threadScratch, phase: phase, from: (i + 1) * share, all: channels.streams)
                } catch {
                    streamFailed.store(true, ordering: .releasing)
                    errors.withLock { if $0 == nil { $0 = error } }
                }
            }
        }
        do throws(MigrationError) {
            try sendMissing(channels.stream, scratch: scratch, phase: phase, from: 0, all: channels.streams)
        } catch {
            streamFailed.store(true, ordering: .releasing)
            errors.withLock { if $0 == nil { $0 = error } }
        }
        for t in threads { t.join() }
        if let error = errors.withLock({ $0 }) { throw error }
        if phase == .stream { return }
        for c in extra { try c.send(.flush) }
        for c in extra { try expect(.flushed, on: c) }
    }

    /// Streams every missing page in address order from `start` on, following seeks;
    /// returns when none is left. `all`: every stream connection (for the drop of tests).
    private func sendMissing(_ connection: Connection, scratch: UnsafeMutableRawPointer, phase: SendPhase,
                             from start: Int, all: [Connection]) throws(MigrationError) {
        var cursor = start
        // Batched before the switchover only: after it, a requested page the stream has
        // taken would wait for the batch to fill (remote-fault p99 went from 0.25 to 2 ms).
        // Zero-copy sends frame by frame: only whole runs are worth pinning.
        let batch = options.zeroCopy || phase == .stream ? nil : FrameBatch(byteLimit: Wire.maxRunPages * table.pageSize)
        while true {
            if linkDown.load(ordering: .acquiring) {
                if let f = failure.withLock({ $0 }) { throw f }
                throw MigrationError(.connectionLost("the urgent channel failed"))
            }
            if streamFailed.load(ordering: .acquiring) {
                throw MigrationError(.connectionLost("another stream connection failed"))
            }
            let s = seek.exchange(-1, ordering: .acquiringAndReleasing)
            if s >= 0 { cursor = s }
            guard let g = missing.nextSet(from: cursor) ?? missing.nextSet(from: 0) else {
                try batch?.flush(connection)
                return
            }
            let (region, page) = table.split(g)
            let regionPages = table.regions[region].pages
            var n = 0
            while n < Wire.maxRunPages && page + n < regionPages && missing.testAndClear(g + n) { n += 1 }
            cursor = g + max(n, 1)
            if n == 0 { continue }
            try sendRun(connection, region: region, page: page, global: g, count: n, scratch: scratch, phase: phase,
                        batch: batch)
            if phase == .stream, let limit = options._dropConnectionsAfterPages,
               postcopySent.add(n, ordering: .relaxed).newValue >= limit,
               !dropDone.exchange(true, ordering: .relaxed) {
                for c in options._dropOnlyOneConnection ? [connection] : all { c.shutdown() }
            }
        }
    }

    /// Sends `count` pages starting at `page` of `region`: zero runs as markers, the rest as data.
    /// With a `batch`, the frames join it (sent once it fills, so they may leave later).
    func sendRun(_ connection: Connection, region: Int, page: Int, global g: Int, count: Int,
                 scratch: UnsafeMutableRawPointer, phase: SendPhase, batch: FrameBatch? = nil) throws(MigrationError) {
        let pageSize = table.pageSize
        let base = UnsafeRawPointer(bitPattern: UInt(table.regions[region].start) + UInt(page * pageSize))!
        var i = 0
        while i < count {
            let zero = isZeroPage(base + i * pageSize, pageSize)
            var j = i + 1
            while j < count && isZeroPage(base + j * pageSize, pageSize) == zero { j += 1 }
            let n = j - i
            let header = Wire.Header(type: zero ? .zeros : .pages, payloadLength: zero ? 0 : UInt32(n * pageSize),
                                     count: UInt32(n), region: UInt32(region), first: UInt64(page + i))
            if let batch {
                if batch.isFull(adding: Int(header.payloadLength)) { try batch.flush(connection) }
                batch.append(header, payload: zero ? nil : base + i * pageSize)
            } else {
                try connection.send(header: header, payload: zero ? nil : base + i * pageSize, scratch: scratch)
            }
            for k in i..<j { sentOnce.testAndSet(g + k) }
            if zero {
                zeroPages.add(n, ordering: .relaxed)
                if phase == .stream { streamZeroPages.add(n, ordering: .relaxed) }
            } else {
                let bytes = n * pageSize
                switch phase {
                case .precopy: precopyBytes.add(bytes, ordering: .relaxed)
                case .pause: pauseBytes.add(bytes, ordering: .relaxed)
                case .stream: streamBytes.add(bytes, ordering: .relaxed)
                case .request: requestBytes.add(bytes, ordering: .relaxed)
                }
            }
            if phase == .pause { pausePages.add(n, ordering: .relaxed) }
            i = j
        }
    }
}
