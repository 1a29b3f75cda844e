import TestSupport
import Synchronization
import Testing
import Userfaultfd
@testable import Postcopy

#if canImport(Glibc)
import Glibc
#endif

/// A destination and a source facing peers that misbehave: silent, slow, lying, hostile.
@Suite(.needsUserfaultfd, .sharesProcess, .serialized, .timeLimit(.minutes(1)))
struct HardeningTests {
    func migrateOneMiB(to endpoint: MigrationEndpoint) throws -> MemoryMapping {
        let source = try MemoryMapping.anonymous(length: 1 << 20)
        fill(source)
        let migration = try MigrationSource(regions: [source.range], options: .init(token: token, mode: .postcopy))
        _ = try migration.migrate(to: endpoint) {}
        return source
    }

    @Test func aPeerThatSendsOneByteDoesNotHoldTheListener() throws {
        let run = try DestinationRun(options: {
            $0.helloTimeoutMilliseconds = 300
            $0.handshakeTimeoutMilliseconds = 20_000
        })
        let sloth = try Peer.connect(run.listener.endpoint)
        try Peer.send(sloth, [0x55])
        usleep(50_000)
        let source = try migrateOneMiB(to: run.listener.endpoint)
        run.wait()
        _ = try #require(try run.result?.get())
        let destination = try #require(run.destination)
        #expect(differingPages(source.range, destination.regions[0]) == 0)
        _ = sloth
    }

    @Test func aSourceThatComesLaterThanTheHelloTimeoutGetsItsFullHelloTimeout() throws {
        let run = try DestinationRun(options: { $0.helloTimeoutMilliseconds = 300 })
        // The destination has been waiting longer than one hello timeout when the source connects.
        usleep(800_000)
        let source = try migrateOneMiB(to: run.listener.endpoint)
        run.wait()
        _ = try #require(try run.result?.get())
        #expect(differingPages(source.range, try #require(run.destination).regions[0]) == 0)
    }

    @Test func badPeersAreRefusedAndTheRealSourceStillGetsIn() throws {
        let refusals = Mutex<[String]>([])
        let run = try DestinationRun(options: {
            $0.handshakeTimeoutMilliseconds = 20_000
            $0.onRefusedConnection = { line in refusals.withLock { $0.append(line) } }
        })
        let endpoint = run.listener.endpoint
        let garbage = try Peer.connect(endpoint)
        try Peer.send(garbage, [UInt8](repeating: 0xFF, count: 64))
        let wrongToken = try Peer.connect(endpoint)
        try Peer.send(wrongToken, Peer.hello(.stream, token: Array("guess".utf8)))
        let shouting = try Peer.connect(endpoint)
        try Peer.send(shouting, Peer.control(.error, [0] + Array("EVIL\n2026 forged log line\u{1b}[2J".utf8)))
        usleep(200_000)
        let source = try migrateOneMiB(to: endpoint)
        run.wait()
        _ = try #require(try run.result?.get())
        #expect(differingPages(source.range, try #require(run.destination).regions[0]) == 0)
        let lines = refusals.withLock { $0 }
        #expect(lines.count == 3, "\(lines)")
        #expect(lines.contains { $0.contains("token does not match") })
        for line in lines {
            #expect(!line.contains("EVIL") && !line.contains("\n") && !line.contains("\u{1b}"), "\(line)")
        }
        _ = (garbage, wrongToken, shouting)
    }

    @Test func onlyBadPeersEndTheWindowWithTheLastRefusal() throws {
        let run = try DestinationRun(options: { $0.handshakeTimeoutMilliseconds = 500 })
        let shouting = try Peer.connect(run.listener.endpoint)
        try Peer.send(shouting, Peer.control(.error, [0] + Array("EVIL\n".utf8)))
        run.wait()
        let error = try #require(run.acceptError)
        #expect(!error.description.contains("EVIL"), "\(error)")
        guard case .malformedFrame = error.kind else {
            Issue.record("expected malformedFrame, got \(error)")
            return
        }
        _ = shouting
    }

    @Test func recoveryEndsOnTimeWhateverAConnectingPeerDoes() throws {
        let source = try MemoryMapping.anonymous(length: testBytes)
        fill(source)
        let run = try DestinationRun(options: {
            $0.recoveryTimeoutMilliseconds = 1_000
            // Longer than the recovery window: only the recovery deadline can end the wait.
            $0.helloTimeoutMilliseconds = 30_000
        })
        var options = MigrationSource.Options(token: token, mode: .postcopy)
        options._dropConnectionsAfterPages = 1000
        options.reconnect = false
        let migration = try MigrationSource(regions: [source.range], options: options)
        #expect(throws: MigrationError.self) { try migration.migrate(to: run.listener.endpoint) {} }
        let started = MonotonicClock.nanoseconds()
        // During recovery: a header announcing a hello, one byte of it, then nothing.
        let intruder = try Peer.connect(run.listener.endpoint)
        try Peer.send(intruder, Peer.frame(.init(type: .hello, payloadLength: 100)) + [1])
        run.wait()
        // A hang would be stopped by the time limit; this bound only says "not stuck".
        #expect(MonotonicClock.nanoseconds() - started < 20_000_000_000)
        let error = try #require(failure(of: run))
        guard case .recoveryTimedOut(let poisoned) = error.kind else {
            Issue.record("expected recoveryTimedOut, got \(error)")
            return
        }
        #expect(poisoned > 0)
        _ = intruder
    }

    @Test func aSecondSwitchoverIsAProtocolError() throws {
        let resumes = Atomic<Int>(0)
        let run = try DestinationRun(options: { $0.recoveryTimeoutMilliseconds = 300 },
                                     onResume: { _ in resumes.add(1, ordering: .relaxed) })
        let stream = try Peer.connect(run.listener.endpoint)
        try Peer.send(stream, Peer.hello(.stream))
        let urgent = try Peer.connect(run.listener.endpoint)
        try Peer.send(urgent, Peer.hello(.urgent))
        _ = try stream.receiveControl(pageSize: systemPageSize)
        let switchover = Peer.control(.switchover, Wire.encodeRuns([]))
        try Peer.send(stream, switchover)
        let (resumed, _) = try stream.receiveControl(pageSize: systemPageSize)
        #expect(resumed.type == .resumed)
        try Peer.send(stream, switchover)
        run.wait()
        #expect(resumes.load(ordering: .relaxed) == 1)
        guard case .malformedFrame(let why) = failure(of: run)?.kind else {
            Issue.record("expected malformedFrame, got \(String(describing: failure(of: run)))")
            return
        }
        #expect(why.contains("second switchover"))
        _ = urgent
    }
}

/// A source facing a destination that reports errors it should not be trusted with.
@Suite(.needsUserfaultfd, .sharesProcess, .serialized, .timeLimit(.minutes(1)))
struct PeerErrorTextTests {
    /// A fake destination: takes both hellos, then sends `bytes` on the stream channel.
    func fakeDestination(sending bytes: [UInt8]) throws -> (MigrationListener, DedicatedThread) {
        let listener = try MigrationListener(.tcp(host: "127.0.0.1", port: 0))
        let thread = DedicatedThread(name: "test-fake-dest") {
            guard let stream = try? Peer.accept(listener), let urgent = try? Peer.accept(listener) else { return }
            _ = try? stream.receiveControl(pageSize: systemPageSize)
            _ = try? urgent.receiveControl(pageSize: systemPageSize)
            try? Peer.send(stream, bytes)
            usleep(100_000)
        }
        return (listener, thread)
    }

    func sourceError(against endpoint: MigrationEndpoint) throws -> MigrationError? {
        let memory = try MemoryMapping.anonymous(length: 1 << 20)
        var options = MigrationSource.Options(token: token, mode: .postcopy)
        options.stallTimeoutMilliseconds = 2_000
        let migration = try MigrationSource(regions: [memory.range], options: options)
        do throws(MigrationError) {
            _ = try migration.migrate(to: endpoint) {}
            return nil
        } catch {
            return error
        }
    }

    @Test func anErrorTextIsEscapedAndShortened() throws {
        let text = Array("refused\n2026-12-02 forged log line \u{1b}[2J\u{7}".utf8) + [UInt8](repeating: 0x41, count: 3000)
        let (listener, thread) = try fakeDestination(sending: Peer.control(.error, [0] + text))
        let error = try #require(try sourceError(against: listener.endpoint))
        thread.join()
        guard case .peer(let why) = error.kind else {
            Issue.record("expected peer, got \(error)")
            return
        }
        #expect(!why.contains("\n") && !why.contains("\u{1b}") && !why.contains("\u{7}"), "\(why)")
        #expect(why.hasPrefix("refused\\n2026-12-02 forged log line \\x1b[2J\\x07"), "\(why)")
        #expect(error.description.utf8.count < 400)
    }

    @Test func aHugeErrorFrameIsRefusedWithoutReadingIt() throws {
        // Announces 16 MiB of text; only the header and a little of it are sent.
        let bytes = Peer.frame(.init(type: .error, payloadLength: 1 << 24)) + [0] + Array(repeating: UInt8(ascii: "\n"), count: 4096)
        let (listener, thread) = try fakeDestination(sending: bytes)
        let error = try #require(try sourceError(against: listener.endpoint))
        thread.join()
        guard case .malformedFrame = error.kind else {
            Issue.record("expected malformedFrame, got \(error)")
            return
        }
        #expect(!error.description.contains("\n") && error.description.utf8.count < 400)
    }
}
