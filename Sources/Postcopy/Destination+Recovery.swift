import FaultEngine
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// How a destination ends a failed migration and waits for a dropped source to return.
extension MigrationDestination {
    /// Gives up: tells the source, stops receiving, poisons what can never arrive.
    func fail(_ error: MigrationError) -> MigrationError {
        stream.sendError(error)
        stopReceivers()
        // The server keeps serving until this destination goes: without poisoning, the
        // threads waiting for a page stay blocked rather than see empty memory.
        let poisoned = options.poisonOnFailure ? poisonMissing() : 0
        if case .recoveryTimedOut = error.kind { return MigrationError(.recoveryTimedOut(poisonedPages: poisoned)) }
        return error
    }

    /// Poisons every page not received (zero-filling those known to be zero); returns how many were poisoned.
    func poisonMissing() -> Int {
        guard registered.load(ordering: .acquiring) else { return 0 }
        return server.poisonMissing()
    }

    /// Waits for the source to come back; nil once it has, the error otherwise. The
    /// recovery timeout holds whatever connecting peers do: each read and send of the
    /// handshake is bounded by it.
    func recover() -> MigrationError? {
        let deadline = MonotonicClock.nanoseconds() + UInt64(max(0, options.recoveryTimeoutMilliseconds)) * 1_000_000
        var acceptor = HelloAcceptor(listener, options)
        while MonotonicClock.nanoseconds() < deadline {
            let accepted: HelloAcceptor.Accepted?
            do {
                accepted = try acceptor.acceptAll(until: deadline, check: refuseUnlessResume)
            } catch {
                usleep(10_000)
                continue
            }
            guard let accepted else { break }
            do { try welcome(accepted, bitmap: receivedBitmap(), until: deadline) } catch { continue }
            adopt(accepted)
            return nil
        }
        return fail(MigrationError(.recoveryTimedOut(poisonedPages: 0)))
    }

    /// After the last page, when the connection dropped instead of closing: the source
    /// may have missed DONE. Within the recovery timeout, take its resume (it finds no
    /// page missing) and answer its COMPLETE again.
    func answerLateResume(_ report: DestinationReport) {
        let deadline = MonotonicClock.nanoseconds() + UInt64(max(0, options.recoveryTimeoutMilliseconds)) * 1_000_000
        var acceptor = HelloAcceptor(listener, options)
        while MonotonicClock.nanoseconds() < deadline {
            guard let accepted = try? acceptor.acceptAll(until: deadline, check: refuseUnlessResume) else { return }
            let s = accepted.streams[0]
            do {
                try welcome(accepted, bitmap: receivedBitmap(), until: deadline)
                let (header, _) = try s.receiveControl(pageSize: table.pageSize)
                if header.type != .complete { continue }
                try s.send(.done, payload: report.encode())
            } catch {
                continue
            }
            reconnects += 1
            if closedByPeer(s) { return }
        }
    }

    /// Whether the peer closed `connection` in order (rather than dropping it) within the stall limit.
    func closedByPeer(_ connection: Connection) -> Bool {
        guard connection.waitReadable(milliseconds: max(1, options.stallTimeoutMilliseconds)) else { return false }
        var byte: UInt8 = 0
        return recv(connection.fd, &byte, 1, Int32(MSG_DONTWAIT)) == 0
    }

    /// Refuses a hello unless it resumes this migration with the same regions.
    func refuseUnlessResume(_ hello: Wire.Hello) -> MigrationError? {
        let lengths = table.regions.map { UInt64($0.pages * table.pageSize) }
        if hello.resume && hello.migrationID == migrationID && hello.regionLengths == lengths
            && hello.streamCount == extraStreams.count + 1 { return nil }
        return MigrationError(.badRegions("not a resume of migration \(migrationID) with the same regions and streams"))
    }

    /// One bit per page, region after region: which pages are here.
    func receivedBitmap() -> [UInt8] {
        var bitmap: [UInt8] = []
        for r in table.regions { bitmap += (try? server.presenceBitmap(at: r.start, pages: r.pages)) ?? [] }
        return bitmap
    }

    /// Switches to the source's new connections and asks again for every page a thread still waits on.
    func adopt(_ accepted: HelloAcceptor.Accepted) {
        retired += [stream, urgent] + extraStreams
        stream = accepted.streams[0]
        extraStreams = Array(accepted.streams.dropFirst())
        let u = accepted.urgent
        urgent = u
        requests.urgentFD.store(u.fd, ordering: .releasing)
        var g = 0
        while let next = requests.requested.nextSet(from: g) {
            if !server.isPresent(table.address(next)) { requests.send(next, fd: u.fd) }
            g = next + 1
        }
        reconnects += 1
    }
}
