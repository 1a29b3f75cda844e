import FaultEngine
import Histogram
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// The destination's receive threads, one per connection.
extension MigrationDestination {
    /// Receives frames from one connection; `extra`: a stream connection past the first,
    /// which carries pages and flushes only.
    func receiveLoop(_ connection: Connection, channel: Wire.Channel, extra: Bool = false) {
        // The stream is silent from the welcome to a pure postcopy switchover, and this
        // thread's wake-up for it then lies inside the source's pause: on a busy machine a
        // time-shared wake-up waits milliseconds. The first stream connection may preempt
        // busy threads until its first frame arrives and shares the CPU like any bulk
        // receiver from then on; the urgent channel keeps the preference.
        var waking = channel == .stream && !extra
        if channel == .urgent || waking { preferLowLatencyScheduling() }
        let cpuStart = ThreadCPU.current()
        defer { receiverCPU.add(ThreadCPU.current() - cpuStart, ordering: .releasing) }
        // Its own mapping, so that UFFDIO_MOVE can take pages out of it.
        guard let bufferMapping = try? RegionMemory(length: Wire.maxRunPages * table.pageSize) else {
            failure.withLock { if $0 == nil { $0 = MigrationError(.system("cannot map a receive buffer")) } }
            return
        }
        _ = madvise(bufferMapping.base, bufferMapping.length, MADV_NOHUGEPAGE)
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: Wire.headerSize, alignment: 8)
        var histogram = Histogram<UInt64>(highestTrackableValue: 600_000_000_000, numberOfSignificantValueDigits: .three)
        var blocktime: UInt64 = 0
        defer {
            withExtendedLifetime(bufferMapping) {}
            scratch.deallocate()
            latency.withLock { state in
                state.0.add(histogram)
                state.1 += blocktime
            }
        }
        do throws(MigrationError) {
            // The urgent channel is quiet while nothing faults; the stream never is for long.
            while true {
                let header = try connection.receiveHeader(scratch: scratch, pageSize: table.pageSize, quietAllowed: channel == .urgent)
                if waking {
                    // Before the workload's threads start from here: they would inherit the policy.
                    waking = false
                    shareCPUScheduling()
                }
                let more = try handle(header, on: connection, channel: channel, extra: extra, buffer: bufferMapping.base,
                                      histogram: &histogram, blocktime: &blocktime)
                if !more { return }
            }
        } catch {
            if case .connectionLost(let why) = error.kind {
                lostReason.withLock { if $0 == nil { $0 = "\(channel) channel: \(why)" } }
                disconnected.store(true, ordering: .releasing)
            } else {
                failure.withLock { if $0 == nil { $0 = error } }
            }
        }
    }

    /// Acts on one frame from `channel`; false once the stream is complete.
    private func handle(
        _ header: Wire.Header, on connection: Connection, channel: Wire.Channel, extra: Bool, buffer: UnsafeMutableRawPointer,
        histogram: inout Histogram<UInt64>, blocktime: inout UInt64
    ) throws(MigrationError) -> Bool {
        switch header.type {
        case .pages, .zeros:
            let g = try table.check(region: header.region, first: header.first, count: UInt64(header.count))
            let data: UnsafeMutableRawPointer? = header.type == .pages ? buffer : nil
            if let data { try connection.receive(into: data, Int(header.payloadLength)) }
            try install(g, count: Int(header.count), region: Int(header.region), first: header.first,
                        data: data, channel: channel, histogram: &histogram, blocktime: &blocktime)
        case .flush where extra:
            // Every frame before it on this connection is installed: the source may now
            // send what depends on them (a discard, the switchover) on the first stream.
            try connection.send(.flushed)
        case .switchover where channel == .stream && !extra:
            let runs = try Wire.decodeRuns(connection.receivePayload(Int(header.payloadLength)))
            try switchover(invalidating: runs, final: header.count == 1, connection: connection)
        case .discard where channel == .stream && !extra:
            if registered.load(ordering: .acquiring) || resumed.load(ordering: .acquiring) {
                throw MigrationError(.malformedFrame("a discard frame after the switchover"))
            }
            try forget(Wire.decodeRuns(connection.receivePayload(Int(header.payloadLength))))
            try connection.send(.discarded)
        case .complete where channel == .stream && !extra:
            completeSeen.store(true, ordering: .releasing)
            return false
        case .error:
            throw MigrationError.fromWire(try connection.receivePayload(Int(header.payloadLength)))
        default:
            throw MigrationError(.malformedFrame("unexpected \(header.type) frame on the \(channel) channel"))
        }
        return true
    }

    /// Installs a run of pages (`data` nil: zero pages), skipping pages already there.
    func install(
        _ g0: Int, count: Int, region: Int, first: UInt64, data: UnsafeRawPointer?, channel: Wire.Channel,
        histogram: inout Histogram<UInt64>, blocktime: inout UInt64
    ) throws(MigrationError) {
        let base = table.address(region: region, page: first)
        guard registered.load(ordering: .acquiring) else {
            try installBeforeSwitchover(g0, count: count, base: base, data: data, channel: channel)
            return
        }
        let result: ExternalInstallResult
        do {
            result = try server.install(data, at: base, pages: count, byMove: options.installByMove) { i, n in
                receivedCount.add(n, ordering: .releasing)
                let now = MonotonicClock.nanoseconds()
                for g in (g0 + i)..<(g0 + i + n) where requests.requested.test(g) {
                    let waited = now &- requests.requestTime[g]
                    _ = histogram.record(waited)
                    blocktime &+= waited
                }
            }
        } catch {
            throw MigrationError(error)
        }
        if result.alreadyPresent > 0 { duplicates.add(result.alreadyPresent, ordering: .relaxed) }
    }

    /// Precopy: the workload is not running here and the range is not registered yet,
    /// so pages are written directly.
    private func installBeforeSwitchover(_ g0: Int, count: Int, base: UInt64, data: UnsafeRawPointer?,
                                         channel: Wire.Channel) throws(MigrationError) {
        let pageSize = table.pageSize
        precopySeen.store(true, ordering: .relaxed)
        if resumed.load(ordering: .acquiring) {
            throw MigrationError(.malformedFrame("a page after the stop-and-copy switchover, with the workload running"))
        }
        if channel != .stream { throw MigrationError(.malformedFrame("a page on the urgent channel before the switchover")) }
        for i in 0..<count {
            let address = base + UInt64(i * pageSize)
            let target = UnsafeMutableRawPointer(bitPattern: UInt(address))!
            let before: PagePresence
            do {
                before = try server.markPresent(at: address, zero: data == nil)
            } catch {
                throw MigrationError(error)
            }
            if before == .missing { receivedCount.add(1, ordering: .relaxed) }
            if let data {
                target.copyMemory(from: data + i * pageSize, byteCount: pageSize)
            } else if before == .present {
                memset(target, 0, pageSize)
            }
        }
    }

    /// Switches to postcopy (or, for stop-and-copy, just resumes): forgets pages the
    /// source dirtied after sending them, registers the regions (the fault server serves them from then on),
    /// lets the workload go and tells the source.
    func switchover(invalidating runs: [Wire.PageRun], final: Bool, connection: Connection) throws(MigrationError) {
        // The workload runs here from the first switchover on: a second one would start it again.
        if resumed.load(ordering: .acquiring) { throw MigrationError(.malformedFrame("a second switchover frame")) }
        try forget(runs)
        if !final && !registered.load(ordering: .acquiring) {
            do {
                for r in regions { try handle.register(r, mode: .missing, requiring: [.copy, .zeropage]) }
            } catch {
                throw MigrationError(error)
            }
            registered.store(true, ordering: .releasing)
        }
        resumed.store(true, ordering: .releasing)
        onResume?()
        try connection.send(.resumed)
    }

    /// Drops pages the source sent and then saw change: they are missing again.
    func forget(_ runs: [Wire.PageRun]) throws(MigrationError) {
        for run in runs {
            _ = try table.check(region: run.region, first: run.first, count: run.count)
            let start = table.address(region: Int(run.region), page: run.first)
            do {
                let present = try server.forget(at: start, pages: Int(run.count))
                receivedCount.subtract(present, ordering: .relaxed)
            } catch {
                throw MigrationError(error)
            }
        }
    }
}

/// Returns the calling thread to time-shared scheduling (after `preferLowLatencyScheduling()`).
private func shareCPUScheduling() {
    var parameters = sched_param()
    parameters.sched_priority = 0
    _ = pthread_setschedparam(pthread_self(), SCHED_OTHER, &parameters)
}
