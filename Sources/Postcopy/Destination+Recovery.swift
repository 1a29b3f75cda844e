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
        let poisoned = options.poisonOnFailure ? poisonMissing() : 0
        stopFaults.raise()
        faultThread?.join()
        faultThread = nil
        if case .recoveryTimedOut = error.kind { return MigrationError(.recoveryTimedOut(poisonedPages: poisoned)) }
        return error
    }

    /// Poisons every page not received (zero-filling those known to be zero); returns how many were poisoned.
    func poisonMissing() -> Int {
        guard registered.load(ordering: .acquiring) else { return 0 }
        var poisoned = 0
        for run in table.runs(where: { !received.test($0) }) {
            let base = table.regions[Int(run.region)].start
            let g0 = table.regions[Int(run.region)].firstGlobal + Int(run.first)
            var i = 0
            while i < Int(run.count) {
                let zero = zeroKnown.test(g0 + i)
                var j = i + 1
                while j < Int(run.count) && zeroKnown.test(g0 + j) == zero { j += 1 }
                let range = MemoryRange(start: base + (run.first + UInt64(i)) * UInt64(table.pageSize), length: UInt64((j - i) * table.pageSize))
                if zero {
                    _ = try? handle.zeropage(range)
                } else {
                    _ = try? handle.poison(range)
                    poisoned += j - i
                }
                for k in i..<j { received.testAndSet(g0 + k) }
                i = j
            }
        }
        return poisoned
    }

    /// Waits for the source to come back; nil once it has, the error otherwise. The
    /// recovery timeout holds whatever connecting peers do: each read and send of the
    /// handshake is bounded by it.
    func recover() -> MigrationError? {
        let deadline = monotonicNanoseconds() + UInt64(max(0, options.recoveryTimeoutMilliseconds)) * 1_000_000
        var acceptor = HelloAcceptor(listener, options)
        while monotonicNanoseconds() < deadline {
            let pair: (Wire.Hello, Connection, Connection)?
            do {
                pair = try acceptor.acceptPair(until: deadline, check: refuseUnlessResume)
            } catch {
                usleep(10_000)
                continue
            }
            guard let (_, s, u) = pair else { break }
            do { try welcome(s, u, bitmap: receivedBitmap(), until: deadline) } catch { continue }
            adopt(stream: s, urgent: u)
            return nil
        }
        return fail(MigrationError(.recoveryTimedOut(poisonedPages: 0)))
    }

    /// After the last page, when the connection dropped instead of closing: the source
    /// may have missed DONE. Within the recovery timeout, take its resume (it finds no
    /// page missing) and answer its COMPLETE again.
    func answerLateResume(_ report: DestinationReport) {
        let deadline = monotonicNanoseconds() + UInt64(max(0, options.recoveryTimeoutMilliseconds)) * 1_000_000
        var acceptor = HelloAcceptor(listener, options)
        while monotonicNanoseconds() < deadline {
            guard let (_, s, u) = try? acceptor.acceptPair(until: deadline, check: refuseUnlessResume) else { return }
            do {
                try welcome(s, u, bitmap: receivedBitmap(), until: deadline)
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
        if hello.resume && hello.migrationID == migrationID && hello.regionLengths == lengths { return nil }
        return MigrationError(.badRegions("not a resume of migration \(migrationID) with the same regions"))
    }

    /// One bit per page, region after region: which pages are here.
    func receivedBitmap() -> [UInt8] {
        var bitmap: [UInt8] = []
        for r in table.regions { bitmap += received.bytes(from: r.firstGlobal, count: r.pages) }
        return bitmap
    }

    /// Switches to the source's new connections and asks again for every page a thread still waits on.
    func adopt(stream s: Connection, urgent u: Connection) {
        retired += [stream, urgent]
        stream = s
        urgent = u
        urgentFD.store(u.fd, ordering: .releasing)
        let frame = UnsafeMutableRawPointer.allocate(byteCount: Wire.headerSize, alignment: 8)
        defer { frame.deallocate() }
        var g = 0
        while let next = requested.nextSet(from: g) {
            if !received.test(next) { sendRequest(next, frame: frame, fd: u.fd) }
            g = next + 1
        }
        reconnects += 1
    }
}
