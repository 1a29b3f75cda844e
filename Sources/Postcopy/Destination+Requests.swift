import FaultEngine
import Userfaultfd
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The destination's page source: the fault server hands it every fault on a missing
/// page, and it asks the source for the page on the urgent channel (once per page).
/// The receive threads install what arrives through the server.
final class PageRequests: DeferredPageSource, @unchecked Sendable {
    let table: RegionLayout
    /// Pages asked for, by global page (a page is asked for once; again after a reconnect).
    let requested: PageBitmap
    /// When each requested page was asked for.
    let requestTime: UnsafeMutablePointer<UInt64>
    /// The urgent channel's socket.
    let urgentFD: Atomic<Int32>
    let faults = Atomic<Int>(0)
    let localZero = Atomic<Int>(0)
    /// The handler thread's CPU-time clock, once it served a fault (`Int.min`: none yet).
    let handlerClock = Atomic<Int>(Int.min)

    init(table: RegionLayout, urgentFD: Int32) throws(UserfaultfdError) {
        self.table = table
        requested = try PageBitmap(count: table.totalPages)
        requestTime = .allocate(capacity: max(1, table.totalPages))
        self.urgentFD = Atomic(urgentFD)
    }

    deinit { requestTime.deallocate() }

    var length: UInt64? { nil }

    /// Regions are served with their first global page's byte offset as source offset.
    @inline(__always)
    func globalPage(_ fault: DeferredFault) -> Int { Int(fault.sourceOffset / UInt64(table.pageSize)) }

    func request(_ fault: DeferredFault) {
        if handlerClock.load(ordering: .relaxed) == Int.min, let clock = ThreadCPU.clockOfCurrentThread() {
            handlerClock.store(Int(clock), ordering: .releasing)
        }
        let g = globalPage(fault)
        if requested.testAndSet(g) { return }
        requestTime[g] = MonotonicClock.nanoseconds()
        faults.add(1, ordering: .relaxed)
        send(g, fd: urgentFD.load(ordering: .acquiring))
    }

    func resolvedWithZeros(_ fault: DeferredFault) {
        localZero.add(1, ordering: .relaxed)
    }

    /// Sends one page request; a failure is ignored (the request is repeated after a reconnect).
    func send(_ g: Int, fd: Int32) {
        let (region, page) = table.split(g)
        withUnsafeTemporaryAllocation(byteCount: Wire.headerSize, alignment: 8) { frame in
            Wire.Header(type: .request, count: 1, region: UInt32(region), first: UInt64(page)).encode(into: frame.baseAddress!)
            // Never blocks the handler thread: a request that does not fit a stalled channel
            // is asked again after the reconnect that the stall leads to.
            _ = Glibc.send(fd, frame.baseAddress!, Wire.headerSize, Int32(MSG_NOSIGNAL | MSG_DONTWAIT))
        }
    }
}
