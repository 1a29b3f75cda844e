import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// The source's urgent channel: answers to page requests, and the pages that follow them.
extension MigrationSource {
    /// The most answered requests whose pages sent along wait for a moment without requests.
    private static let maxFollowUps = 16

    /// Sends the still-missing pages that directly follow a requested one, in one frame:
    /// the next faults nearby then need no request.
    private func sendAfterRequest(_ connection: Connection, region: Int, first: Int, global: Int,
                                  scratch: UnsafeMutableRawPointer) throws(MigrationError) {
        let limit = min(options.pagesAfterRequest, table.regions[region].pages - first, Wire.maxRunPages)
        var n = 0
        while n < limit && missing.testAndClear(global + n) { n += 1 }
        if n == 0 { return }
        try sendRun(connection, region: region, page: first, global: global, count: n, scratch: scratch, phase: .request)
        prefetchedPages.add(n, ordering: .relaxed)
        seek.store(global + n, ordering: .releasing)
    }

    func startUrgent(_ connection: Connection) -> DedicatedThread {
        DedicatedThread(name: "pc-urgent") { [self] in urgentLoop(connection) }
    }

    /// Answers page requests as they come, then sends the pages that follow each
    /// requested one and points the stream past them. Every page is sent once: one the
    /// stream has already taken arrives on the stream.
    private func urgentLoop(_ connection: Connection) {
        preferLowLatencyScheduling()
        let cpuStart = ThreadCPU.current()
        defer { urgentCPU.add(ThreadCPU.current() - cpuStart, ordering: .releasing) }
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: Wire.headerSize, alignment: 8)
        let sendScratch = UnsafeMutableRawPointer.allocate(byteCount: Wire.headerSize, alignment: 8)
        defer {
            scratch.deallocate()
            sendScratch.deallocate()
        }
        // Pages to send after requested ones, newest last: (region, first page, first global page).
        var followUps: [(Int, Int, Int)] = []
        followUps.reserveCapacity(Self.maxFollowUps)
        do throws(MigrationError) {
            while true {
                // Requests first: the pages sent along with earlier ones go out one frame at
                // a time while none waits, the newest first (the workload is there now), so
                // a request waits behind at most one such frame.
                if let (region, first, global) = followUps.last, !connection.waitReadable(milliseconds: 0) {
                    followUps.removeLast()
                    try sendAfterRequest(connection, region: region, first: first, global: global, scratch: sendScratch)
                    continue
                }
                // Quiet while nothing faults on the destination.
                let header = try connection.receiveHeader(scratch: scratch, pageSize: table.pageSize, quietAllowed: true)
                if header.type == .error {
                    throw MigrationError.fromWire(try connection.receivePayload(Int(header.payloadLength)))
                }
                if header.type != .request {
                    throw MigrationError(.malformedFrame("unexpected \(header.type) frame on the urgent channel"))
                }
                let g0 = try table.check(region: header.region, first: header.first, count: UInt64(header.count))
                for k in 0..<Int(header.count) where missing.testAndClear(g0 + k) {
                    try sendRun(connection, region: Int(header.region), page: Int(header.first) + k, global: g0 + k,
                                count: 1, scratch: sendScratch, phase: .request)
                    requestedPages.add(1, ordering: .relaxed)
                }
                seek.store(g0 + Int(header.count), ordering: .releasing)
                if options.pagesAfterRequest > 0 {
                    // The oldest are dropped: the stream reaches them in its own time.
                    if followUps.count == Self.maxFollowUps { followUps.removeFirst() }
                    followUps.append((Int(header.region), Int(header.first) + Int(header.count), g0 + Int(header.count)))
                }
            }
        } catch {
            if case .connectionLost = error.kind {} else {
                failure.withLock { if $0 == nil { $0 = error } }
            }
            linkDown.store(true, ordering: .releasing)
        }
    }
}
