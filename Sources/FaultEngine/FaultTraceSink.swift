import Synchronization
import _CFaultEngine

/// How a traced fault was resolved.
public enum TracedFaultKind: UInt8, Sendable, Hashable, Codable, CaseIterable {
    /// A missing page, installed from the source.
    case missing = 1
    /// A MINOR fault, resolved with `UFFDIO_CONTINUE`.
    case minor = 2
    /// A write-protect fault, unprotected by the handler.
    case writeProtect = 3
}

/// One fault a handler thread resolved, as a ``FaultTraceSink`` hands it on.
public struct TracedFault: Sendable, Hashable {
    /// When the fault was resolved, in nanoseconds of `CLOCK_MONOTONIC` (``FaultTraceSink/now()``).
    public var time: UInt64
    /// The faulting page's address.
    public var address: UInt64
    /// From reading the fault message to its resolution, in nanoseconds.
    public var latency: UInt64
    /// How it was resolved.
    public var kind: TracedFaultKind

    public init(time: UInt64, address: UInt64, latency: UInt64, kind: TracedFaultKind) {
        self.time = time
        self.address = address
        self.latency = latency
        self.kind = kind
    }
}

/// Where ``FaultServer``s hand the faults they resolve, for a tracer to collect.
///
/// Each handler thread gets a ring of its own, allocated before its first fault; the
/// fault path writes one record into it with no allocation, no lock and no system call
/// beyond reading the clock. A consumer thread calls ``drain(_:)`` now and then. A
/// full ring drops the record and counts it (``dropped``) rather than wait.
///
/// Faults resolved in the faulting thread (the SIGBUS strategy) and pages installed
/// ahead of a fault (chunks, read-ahead, replay) are not seen: to trace every page a
/// workload touches, serve one page per fault with no prefetch.
public final class FaultTraceSink: Sendable {
    /// One server's address space: its regions when it started, and its number in the sink.
    public struct Space: Sendable, Hashable {
        /// The sink's number for the server, from 0 in order of registration.
        public var id: Int
        /// The regions the server served when its first handler started.
        public var regions: [ServedRegion]
        /// The server's page size.
        public var pageSize: Int
    }

    private struct State {
        var rings: [(space: Int, ring: FaultTraceRing)] = []
        var spaces: [Space] = []
        var servers: [ObjectIdentifier] = []
    }

    private let state = Mutex(State())
    private let ringCapacity: Int

    /// Creates a sink whose rings hold `ringCapacity` records each (rounded up to a power of two).
    public init(ringCapacity: Int = 1 << 15) {
        var n = 64
        while n < ringCapacity && n < 1 << 24 { n <<= 1 }
        self.ringCapacity = n
    }

    /// The clock the records' times come from: `CLOCK_MONOTONIC` in nanoseconds.
    public static func now() -> UInt64 { cfe_now_ns() }

    /// The servers seen so far.
    public var spaces: [Space] { state.withLock { $0.spaces } }

    /// Records dropped because a ring was full.
    public var dropped: UInt64 {
        state.withLock { s in s.rings.reduce(0) { $0 &+ $1.ring.dropped.load(ordering: .relaxed) } }
    }

    /// A new ring for one handler thread of `server` (called once per thread, before serving).
    func makeRing(for server: AnyObject, regions: [ServedRegion], pageSize: Int) -> FaultTraceRing {
        let ring = FaultTraceRing(capacity: ringCapacity)
        state.withLock { s in
            let key = ObjectIdentifier(server)
            let space: Int
            if let known = s.servers.firstIndex(of: key) {
                space = known
            } else {
                space = s.spaces.count
                s.servers.append(key)
                s.spaces.append(Space(id: space, regions: regions, pageSize: pageSize))
            }
            s.rings.append((space, ring))
        }
        return ring
    }

    /// Hands every record collected so far to `body`, with its space's number, ring by ring.
    ///
    /// - Returns: the number of records handed on.
    @discardableResult
    public func drain(_ body: (_ space: Int, _ fault: TracedFault) -> Void) -> Int {
        let rings = state.withLock { $0.rings }
        var total = 0
        for (space, ring) in rings {
            total += ring.drain { body(space, $0) }
        }
        return total
    }
}

/// A single-producer, single-consumer ring of fault records, preallocated.
final class FaultTraceRing: @unchecked Sendable {
    /// Three words per record: time, address, latency << 8 | kind.
    private let words: UnsafeMutablePointer<UInt64>
    private let mask: Int
    private let head = Atomic<Int>(0)
    private let tail = Atomic<Int>(0)
    let dropped = Atomic<UInt64>(0)

    init(capacity: Int) {
        mask = capacity - 1
        words = .allocate(capacity: capacity * 3)
        words.initialize(repeating: 0, count: capacity * 3)
    }

    deinit { words.deallocate() }

    /// Records a fault resolved now that was read at `readAt` (``FaultTraceSink/now()``).
    @inline(__always)
    func record(address: UInt64, kind: TracedFaultKind, readAt: UInt64) {
        let now = cfe_now_ns()
        let h = head.load(ordering: .relaxed)
        if h &- tail.load(ordering: .acquiring) > mask {
            dropped.wrappingAdd(1, ordering: .relaxed)
            return
        }
        let slot = words + (h & mask) * 3
        slot[0] = now
        slot[1] = address
        slot[2] = (now &- readAt) << 8 | UInt64(kind.rawValue)
        head.store(h &+ 1, ordering: .releasing)
    }

    func drain(_ body: (TracedFault) -> Void) -> Int {
        let t = tail.load(ordering: .relaxed)
        let h = head.load(ordering: .acquiring)
        var i = t
        while i != h {
            let slot = words + (i & mask) * 3
            let kind = TracedFaultKind(rawValue: UInt8(truncatingIfNeeded: slot[2])) ?? .missing
            body(TracedFault(time: slot[0], address: slot[1], latency: slot[2] >> 8, kind: kind))
            i &+= 1
        }
        tail.store(h, ordering: .releasing)
        return h &- t
    }
}
