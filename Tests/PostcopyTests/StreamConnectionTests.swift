import Synchronization
import TestSupport
import Testing
import Userfaultfd
@testable import Postcopy

#if canImport(Glibc)
import Glibc
#endif

/// The background stream spread over several connections, and sent with `MSG_ZEROCOPY`.
@Suite(.needsUserfaultfd, .serialized, .sharesProcess, .timeLimit(.minutes(2)))
struct StreamConnectionTests {
    /// Migrates `testBytes` with `configure`d options; while precopy runs, a thread keeps
    /// rewriting pages of the source (stopped by the pause). `dense`: no zero page, so
    /// that every frame carries 64 pages. Returns the statistics, how many pages differ at
    /// the end, and how many source pages were not zero.
    func migrate(mode: MigrationStatistics.Mode, dense: Bool = false, configure: (inout MigrationSource.Options) -> Void)
        throws -> (MigrationStatistics, differing: Int, nonzero: Int)
    {
        let source = try MemoryMapping.anonymous(length: testBytes)
        fill(source)
        if dense {
            for i in stride(from: 3, to: testBytes / systemPageSize, by: 4) {
                (source.base + i * systemPageSize).storeBytes(of: UInt64(i), toByteOffset: 16, as: UInt64.self)
            }
        }
        let run = try DestinationRun()
        var options = MigrationSource.Options(token: token, mode: mode)
        configure(&options)
        let stop = Atomic<Bool>(false)
        let range = source.range
        let writer = DedicatedThread(name: "test-writer") {
            let pages = Int(range.length) / systemPageSize
            var i = 0
            var round: UInt64 = 1
            while !stop.load(ordering: .acquiring) {
                // Every seventh page, page by page: each precopy round finds some dirty again.
                let p = range.pointer + (i * 7 % pages) * systemPageSize
                p.storeBytes(of: round, toByteOffset: 8, as: UInt64.self)
                i += 1
                if i % 1000 == 0 { round += 1; usleep(100) }
            }
        }
        let stats: MigrationStatistics
        do {
            stats = try MigrationSource(regions: [range], options: options).migrate(to: run.listener.endpoint) {
                stop.store(true, ordering: .releasing)
                writer.join()
            }
        } catch {
            stop.store(true, ordering: .releasing)
            writer.join()
            run.wait()
            throw error
        }
        run.wait()
        let destination = try #require(run.destination)
        _ = try #require(try run.result?.get())
        let zero = [UInt8](repeating: 0, count: systemPageSize)
        let nonzero = stride(from: 0, to: testBytes, by: systemPageSize).count { memcmp(range.pointer + $0, zero, systemPageSize) != 0 }
        return (stats, differingPages(range, destination.regions[0]), nonzero)
    }

    @Test(arguments: [MigrationStatistics.Mode.postcopy, .precopyPostcopy, .stopAndCopy], [2, Wire.maxStreams])
    func severalStreamConnectionsDeliverEveryByte(mode: MigrationStatistics.Mode, connections: Int) throws {
        let (stats, differing, nonzero) = try migrate(mode: mode) { $0.streamConnections = connections }
        #expect(differing == 0)
        #expect(stats.streamConnections == connections)
        #expect(stats.duplicatesDropped == 0)
        if mode == .postcopy {
            // Each page once, whichever connection took it.
            #expect(stats.streamBytes + stats.requestBytes == nonzero * systemPageSize)
            #expect(stats.zeroPages == testBytes / systemPageSize - nonzero)
        }
    }

    @Test(arguments: [MigrationStatistics.Mode.postcopy, .precopyPostcopy], [1, 3])
    func zeroCopySendingDeliversEveryByteAndWaitsForEveryCompletion(mode: MigrationStatistics.Mode, connections: Int) throws {
        let (stats, differing, _) = try migrate(mode: mode, dense: true) {
            $0.zeroCopy = true
            $0.streamConnections = connections
        }
        #expect(differing == 0)
        // Frames of 64 pages go zero-copy; every one was completed before migrate returned
        // (the kernel may say it copied them: over loopback it does).
        #expect(stats.zeroCopySends > 0)
        #expect(stats.zeroCopyCopiedSends <= stats.zeroCopySends)
    }

    @Test(arguments: [true, false])
    func aConnectionDroppedAmongSeveralIsRecoveredWithoutLosingAPage(onlyOne: Bool) throws {
        let source = try MemoryMapping.anonymous(length: testBytes)
        fill(source)
        let run = try DestinationRun()
        var options = MigrationSource.Options(token: token, mode: .postcopy)
        options.streamConnections = 3
        options._dropConnectionsAfterPages = 3000
        // One connection of three (whichever sends the 3000th page), or all of them.
        options._dropOnlyOneConnection = onlyOne
        let stats = try MigrationSource(regions: [source.range], options: options).migrate(to: run.listener.endpoint) {}
        run.wait()
        let destinationStats = try #require(try run.result?.get())
        let destination = try #require(run.destination)
        #expect(stats.reconnects == 1)
        #expect(destinationStats.reconnects == 1)
        #expect(stats.streamConnections == 3)
        #expect(differingPages(source.range, destination.regions[0]) == 0)
        // Only what was missing was sent again: at most the frames in flight on three connections.
        #expect(stats.streamBytes + stats.requestBytes < testBytes / 4 * 3 + (24 << 20))
    }

    @Test(arguments: [0, -1, Wire.maxStreams + 1])
    func aStreamConnectionCountOutOfRangeIsRefused(count: Int) throws {
        let source = try MemoryMapping.anonymous(length: 1 << 20)
        var options = MigrationSource.Options(token: token)
        options.streamConnections = count
        let error = #expect(throws: MigrationError.self) { try MigrationSource(regions: [source.range], options: options) }
        guard case .invalidArgument(let why)? = error?.kind else {
            Issue.record("expected invalidArgument, got \(String(describing: error))")
            return
        }
        #expect(why.contains("stream connections"))
    }

    @Test func zeroCopyOverAUnixSocketIsRefused() throws {
        let source = try MemoryMapping.anonymous(length: 1 << 20)
        var options = MigrationSource.Options(token: token)
        options.zeroCopy = true
        let migration = try MigrationSource(regions: [source.range], options: options)
        let error = #expect(throws: MigrationError.self) {
            try migration.migrate(to: .unix(path: "/tmp/uffd-zero-copy-refused-\(getpid()).sock")) {}
        }
        guard case .invalidArgument(let why)? = error?.kind else {
            Issue.record("expected invalidArgument, got \(String(describing: error))")
            return
        }
        #expect(why.contains("TCP"))
    }

    @Test func helloStreamFieldsRoundTripAndBadOnesAreRefused() throws {
        var hello = Wire.Hello(channel: .stream, resume: false, pageSize: systemPageSize, migrationID: 7,
                               regionLengths: [1 << 20], token: token, streamIndex: 2, streamCount: 3)
        #expect(try Wire.Hello.decode(hello.encode()) == hello)
        for (index, count) in [(3, 3), (0, Wire.maxStreams + 1), (5, 2)] {
            hello.streamIndex = index
            hello.streamCount = count
            let error = #expect(throws: MigrationError.self) { try Wire.Hello.decode(hello.encode()) }
            guard case .malformedFrame? = error?.kind else {
                Issue.record("stream \(index) of \(count): expected malformedFrame, got \(String(describing: error))")
                continue
            }
        }
        // The urgent channel is no stream: only index 0.
        let urgent = Wire.Hello(channel: .urgent, resume: false, pageSize: systemPageSize, migrationID: 7,
                                regionLengths: [1 << 20], token: token, streamIndex: 1, streamCount: 2)
        #expect(throws: MigrationError.self) { try Wire.Hello.decode(urgent.encode()) }
    }

    @Test(arguments: [["--stream-connections", "0"], ["--stream-connections", "9"], ["--zero-copy", "--transport", "unix"]])
    func theCommandRefusesBadStreamOptions(arguments: [String]) throws {
        let child = try ChildProcess(try #require(builtExecutable("uffd"), "uffd is built next to the tests"),
                                     ["migrate", "demo", "--size", "1", "--warmup", "0"] + arguments)
        let status = try #require(child.wait(seconds: 30))
        let errors = child.standardError
        #expect((status >> 8) & 0xff == 64, "wait status \(status); stderr: \(errors)")
        #expect(errors.contains(arguments[0]), "\(errors)")
    }

    /// A hello frame of stream connection `index` of `count` (the urgent channel with index 0).
    func hello(_ channel: Wire.Channel, index: Int = 0, count: Int) -> [UInt8] {
        let payload = Wire.Hello(channel: channel, resume: false, pageSize: systemPageSize, migrationID: 42,
                                 regionLengths: [1 << 20], token: token, streamIndex: index, streamCount: count).encode()
        return Peer.frame(.init(type: .hello, payloadLength: UInt32(payload.count))) + payload
    }

    @Test func streamConnectionsThatAnnounceDifferentCountsAreRefused() throws {
        let run = try DestinationRun(options: { $0.handshakeTimeoutMilliseconds = 3_000 })
        let first = try Peer.connect(run.listener.endpoint)
        try Peer.send(first, hello(.stream, index: 0, count: 2))
        let urgent = try Peer.connect(run.listener.endpoint)
        try Peer.send(urgent, hello(.urgent, count: 2))
        let second = try Peer.connect(run.listener.endpoint)
        try Peer.send(second, hello(.stream, index: 1, count: 3))
        run.wait()
        guard case .malformedFrame(let why) = failure(of: run)?.kind else {
            Issue.record("expected malformedFrame, got \(String(describing: failure(of: run)))")
            return
        }
        #expect(why.contains("stream counts"))
    }

    @Test func aControlFrameOnAnExtraStreamIsAProtocolError() throws {
        let run = try DestinationRun(options: { $0.recoveryTimeoutMilliseconds = 300 })
        let first = try Peer.connect(run.listener.endpoint)
        try Peer.send(first, hello(.stream, index: 0, count: 2))
        let second = try Peer.connect(run.listener.endpoint)
        try Peer.send(second, hello(.stream, index: 1, count: 2))
        let urgent = try Peer.connect(run.listener.endpoint)
        try Peer.send(urgent, hello(.urgent, count: 2))
        for c in [first, second, urgent] { _ = try c.receiveControl(pageSize: systemPageSize) }
        // A flush is answered on an extra stream; a switchover there is refused.
        try Peer.send(second, Peer.control(.flush))
        let (flushed, _) = try second.receiveControl(pageSize: systemPageSize)
        #expect(flushed.type == .flushed)
        try Peer.send(second, Peer.control(.switchover, Wire.encodeRuns([])))
        run.wait()
        guard case .malformedFrame(let why) = failure(of: run)?.kind else {
            Issue.record("expected malformedFrame, got \(String(describing: failure(of: run)))")
            return
        }
        #expect(why.contains("switchover"))
    }

    @Test func aBatchCutAnywhereByTheKernelArrivesWholeAndInOrder() throws {
        var fds: [Int32] = [0, 0]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0)
        let sender = Connection(fd: fds[0]), receiver = Connection(fd: fds[1])
        // Non-blocking sends (a deadline) into a small buffer: the kernel takes any part of the batch.
        sender.deadline = MonotonicClock.nanoseconds() + 30_000_000_000
        sender.limitSendBuffer(4096)
        let pageSize = systemPageSize
        let memory = try MemoryMapping.anonymous(length: 64 * pageSize)
        for p in 0..<64 { memset(memory.base + p * pageSize, Int32(p + 1), pageSize) }
        let batch = FrameBatch(byteLimit: 64 * pageSize)
        var expected: [UInt8] = []
        var first = 0
        // Runs of 1, 2, 3, ... pages, and a zero marker between them.
        for n in 1...9 where first + n <= 64 {
            let pages = Wire.Header(type: .pages, payloadLength: UInt32(n * pageSize), count: UInt32(n), first: UInt64(first))
            #expect(!batch.isFull(adding: n * pageSize))
            batch.append(pages, payload: memory.base + first * pageSize)
            expected += Peer.frame(pages) + Array(UnsafeRawBufferPointer(start: memory.base + first * pageSize, count: n * pageSize))
            let zeros = Wire.Header(type: .zeros, count: 1, first: UInt64(first + n))
            batch.append(zeros, payload: nil)
            expected += Peer.frame(zeros)
            first += n + 1
        }
        let received = Mutex<[UInt8]>([])
        let count = expected.count
        let readFD = fds[1]
        let reader = DedicatedThread(name: "test-reader") {
            var chunk = [UInt8](repeating: 0, count: 3000)
            var got: [UInt8] = []
            while got.count < count {
                let n = chunk.withUnsafeMutableBytes { recv(readFD, $0.baseAddress, $0.count, 0) }
                if n <= 0 { break }
                got += chunk[0..<n]
                usleep(200)
            }
            received.withLock { $0 = got }
        }
        try batch.flush(sender)
        reader.join()
        #expect(batch.isEmpty)
        #expect(received.withLock { $0 } == expected)
        _ = receiver
    }
}
