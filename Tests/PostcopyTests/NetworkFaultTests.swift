import TestSupport
import Synchronization
import Testing
import Userfaultfd
@testable import Postcopy

#if canImport(Glibc)
import Glibc
#endif

/// Where a test keeps the relay it put in front of a destination.
final class RelaySlot: Sendable {
    let value = Mutex<FaultyRelay?>(nil)
}

/// Seconds of the long form (random faults, one migration after another); 0: the short form only.
let networkSoakSeconds = getenv("UFFD_POSTCOPY_NETWORK_SOAK_SECONDS").flatMap { Double(String(cString: $0)) } ?? 0

/// Postcopy over a real network path: a destination in one network namespace, the source
/// in another, a veth pair between them, and faults on the way (the link going down and
/// up, a relay that delays, stalls and resets). The migration must recover with every
/// page right, or fail with a clear error within its timeouts.
@Suite(.needsUserfaultfd, .sharesProcess, .serialized, .timeLimit(.minutes(5)),
       .enabled(if: NetworkPair.available, "needs root, ip from iproute2 and setns to make network namespaces"))
struct NetworkFaultTests {
    /// What one migration across the pair gave.
    struct Outcome: Sendable {
        var source: Result<MigrationStatistics, MigrationError>?
        var destination: Result<MigrationStatistics, MigrationError>?
        var acceptError: MigrationError?
        var differingPages = -1
        var wrongReads = 0
        var reads = 0
    }

    /// Migrates `bytes` (postcopy) from the source namespace to a destination listening in
    /// the other one; the source connects to `via` (default: the destination itself).
    /// `disturb` runs on its own thread once postcopy has begun.
    func migrate(
        _ network: NetworkPair, bytes: Int, timeouts: Int32, workload: Bool = true,
        via: ((MigrationEndpoint) throws -> MigrationEndpoint)? = nil,
        disturb: @escaping @Sendable (MigrationSource) -> Void
    ) throws -> Outcome {
        let memory = try MemoryMapping.anonymous(length: bytes)
        fill(memory)
        let listener = try network.inside(network.destinationNamespace) {
            try MigrationListener(.tcp(host: network.destinationAddress, port: 0))
        }
        let reads = Atomic<Int>(0), wrong = Atomic<Int>(0)
        let readers = Mutex<[DedicatedThread]>([])
        let run = DestinationRun(listener: listener, options: {
            $0.stallTimeoutMilliseconds = timeouts
            $0.recoveryTimeoutMilliseconds = 4 * timeouts
        }, onResume: { d in
            guard workload else { return }
            let range = d.regions[0]
            readers.withLock { $0.append(DedicatedThread(name: "test-reader") {
                let (bad, read) = readDown(range, from: Int(range.length) / systemPageSize - 1, by: 37)
                wrong.add(bad, ordering: .relaxed)
                reads.add(read, ordering: .relaxed)
            }) }
        })
        let endpoint = try via?(listener.endpoint) ?? listener.endpoint
        var options = MigrationSource.Options(token: token, mode: .postcopy)
        options.stallTimeoutMilliseconds = timeouts
        options.recoveryTimeoutMilliseconds = 4 * timeouts
        let source = try MigrationSource(regions: [memory.range], options: options)
        let sourceResult = Mutex<Result<MigrationStatistics, MigrationError>?>(nil)
        let migration = network.start(in: network.sourceNamespace) {
            let r = Result { () throws(MigrationError) in try source.migrate(to: endpoint) {} }
            sourceResult.withLock { $0 = r }
        }
        let disturber = DedicatedThread(name: "test-disturb") {
            while source.progress.phase != .postcopy && source.progress.phase != .failed && source.progress.phase != .finished {
                usleep(500)
            }
            if source.progress.phase == .postcopy { disturb(source) }
        }
        migration.join()
        disturber.join()
        run.wait()
        for t in readers.withLock({ $0 }) { t.join() }
        var outcome = Outcome(source: sourceResult.withLock { $0 }, destination: run.result, acceptError: run.acceptError)
        if case .success = run.result, let d = run.destination {
            outcome.differingPages = differingPages(memory.range, d.regions[0])
        }
        outcome.reads = reads.load(ordering: .relaxed)
        outcome.wrongReads = wrong.load(ordering: .relaxed)
        return outcome
    }

    /// Puts a relay in the source's namespace (on its loopback) in front of the destination.
    func relayed(_ network: NetworkPair, into relay: RelaySlot) -> (MigrationEndpoint) throws -> MigrationEndpoint {
        { upstream in
            let listener = try network.inside(network.sourceNamespace) { try MigrationListener(.tcp(host: "127.0.0.1", port: 0)) }
            let r = FaultyRelay(listener: listener, upstream: upstream, network: network, namespace: network.sourceNamespace)
            relay.value.withLock { $0 = r }
            return listener.endpoint
        }
    }

    /// Expects a finished migration with every page right.
    func expectVerified(_ o: Outcome, _ what: String) {
        #expect(o.acceptError == nil, "\(what): \(String(describing: o.acceptError))")
        guard case .success(let stats)? = o.source, case .success? = o.destination else {
            Issue.record("\(what): source \(String(describing: o.source)), destination \(String(describing: o.destination))")
            return
        }
        #expect(o.differingPages == 0, "\(what): \(o.differingPages) pages differ")
        #expect(o.wrongReads == 0, "\(what): \(o.wrongReads) of \(o.reads) reads on the destination were wrong")
        #expect(stats.streamBytes + stats.requestBytes >= stats.regionBytes / 4 * 3, "\(what)")
    }

    @Test func theLinkGoingDownAndUpMidPostcopyIsRecovered() throws {
        let network = try NetworkPair()
        defer { network.remove() }
        let cut = Atomic<Bool>(false)
        // 512 MiB: over two stream connections, postcopy of 256 MiB could end before `ip`
        // had taken the link down.
        let outcome = try migrate(network, bytes: 512 << 20, timeouts: 1_000) { source in
            guard (try? network.setLink(up: false)) != nil else { return }
            cut.store(source.progress.phase == .postcopy, ordering: .relaxed)
            usleep(1_500_000)
            try? network.setLink(up: true)
        }
        let wentDownInPostcopy = cut.load(ordering: .relaxed)
        #expect(wentDownInPostcopy, "the link did not go down during postcopy")
        expectVerified(outcome, "link down 1.5 s")
    }

    @Test func aRelayThatDelaysStallsAndResetsIsRecovered() throws {
        let network = try NetworkPair()
        defer { network.remove() }
        let relay = RelaySlot()
        defer { relay.value.withLock { $0?.stop() } }
        let stalledThrough = Atomic<Bool>(false)
        let outcome = try migrate(network, bytes: 256 << 20, timeouts: 1_000, via: relayed(network, into: relay)) { source in
            guard let r = relay.value.withLock({ $0 }) else { return }
            r.delayMicroseconds.store(300, ordering: .relaxed)
            usleep(300_000)
            r.delayMicroseconds.store(0, ordering: .relaxed)
            // Longer than the stall limit: both sides must give the connections up and reconnect.
            r.stalled.store(true, ordering: .releasing)
            usleep(2_500_000)
            stalledThrough.store(source.progress.phase == .postcopy, ordering: .relaxed)
            r.stalled.store(false, ordering: .releasing)
            usleep(200_000)
            r.resetAll()
        }
        expectVerified(outcome, "delay, stall 2.5 s, reset")
        let inPostcopyThroughout = stalledThrough.load(ordering: .relaxed)
        #expect(inPostcopyThroughout, "the migration was not in postcopy throughout the stall")
        if case .success(let stats)? = outcome.source {
            #expect(stats.reconnects >= 1)
            let relayed = relay.value.withLock { $0?.connections.load(ordering: .relaxed) } ?? 0
            #expect(relayed >= 4)
        }
    }

    @Test func aCutLongerThanTheRecoveryTimeoutFailsClearly() throws {
        let network = try NetworkPair()
        defer { network.remove() }
        let started = MonotonicClock.nanoseconds()
        // No workload here: the pages that never arrive are poisoned and must not be touched.
        let outcome = try migrate(network, bytes: 256 << 20, timeouts: 500, workload: false) { _ in
            try? network.setLink(up: false)
        }
        // Stall limit plus recovery timeout on each side; the bound only says "not stuck".
        #expect(MonotonicClock.nanoseconds() - started < 30_000_000_000)
        guard case .failure(let error)? = outcome.destination, case .recoveryTimedOut(let poisoned) = error.kind else {
            Issue.record("expected recoveryTimedOut on the destination, got \(String(describing: outcome.destination))")
            return
        }
        #expect(poisoned > 0)
        guard case .failure(let sourceError)? = outcome.source, case .connectionLost = sourceError.kind else {
            Issue.record("expected connectionLost on the source, got \(String(describing: outcome.source))")
            return
        }
    }

    @Test(.enabled(if: networkSoakSeconds > 0, "the long form runs with UFFD_POSTCOPY_NETWORK_SOAK_SECONDS set"),
          .timeLimit(.minutes(60)))
    func soakWithRandomFaults() throws {
        let end = MonotonicClock.nanoseconds() + UInt64(networkSoakSeconds * 1e9)
        var migrations = 0, reconnects = 0
        while MonotonicClock.nanoseconds() < end {
            let network = try NetworkPair()
            defer { network.remove() }
            let relay = RelaySlot()
            defer { relay.value.withLock { $0?.stop() } }
            let outcome = try migrate(network, bytes: 512 << 20, timeouts: 1_000, via: relayed(network, into: relay)) { source in
                guard let r = relay.value.withLock({ $0 }) else { return }
                while source.progress.phase == .postcopy {
                    switch Int.random(in: 0..<4) {
                    case 0: r.delayMicroseconds.store(Int.random(in: 0...500), ordering: .relaxed)
                    case 1: r.stalled.store(true, ordering: .releasing); usleep(UInt32.random(in: 100_000...2_000_000))
                            r.stalled.store(false, ordering: .releasing)
                    case 2: r.resetAll()
                    default: try? network.setLink(up: false); usleep(UInt32.random(in: 100_000...1_500_000))
                             try? network.setLink(up: true)
                    }
                    usleep(UInt32.random(in: 50_000...500_000))
                }
                r.delayMicroseconds.store(0, ordering: .relaxed)
            }
            expectVerified(outcome, "soak migration \(migrations)")
            if case .success(let stats)? = outcome.source { reconnects += stats.reconnects }
            migrations += 1
        }
        #expect(migrations > 0)
        print("network soak: \(migrations) migrations of 512 MiB verified, \(reconnects) reconnects")
    }
}
