import SystemPackage
import Userfaultfd
import _CPagedMemory

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Maps stores larger than memory into the process through one userfaultfd and a
/// bounded buffer of resident pages shared by all of its mappings.
///
/// Filler threads read fault messages and fill pages from the stores (several at
/// once, with sequential read-ahead). Pages arrive write-protected; the first write
/// to a page faults once and marks it dirty. Above the high-water mark the evictors
/// take victims (``ReplacementPolicy``), write the dirty ones back, drop them with
/// `MADV_DONTNEED` (the range stays registered, so the next access faults again) and
/// stop at the low-water mark. A failed read poisons the page: the faulting thread
/// gets SIGBUS and the mapping records the error. With
/// ``FaultResolution/faultingThread``, file-backed mappings are served inside the
/// faulting thread instead (a SIGBUS handler does what a filler would).
///
/// ```swift
/// let pager = try Pager(PagerConfiguration(bufferBytes: 256 << 20))
/// let mapping = try pager.map(FileStore(path: "data.bin"), pageSize: 64 << 10)
/// mapping.base.storeBytes(of: 42, toByteOffset: 8 << 30, as: UInt64.self)
/// try mapping.flush()
/// ```
public final class Pager: @unchecked Sendable {
    /// How this pager runs.
    public let configuration: PagerConfiguration
    let uffd: Userfaultfd
    let handle: Userfaultfd.Handle
    let stopSignal: StopSignal
    let lock: PagerLock
    /// The userfaultfd with FEATURE_SIGBUS for mappings resolved in the faulting thread.
    private let inThreadUffd: Userfaultfd?
    let inThreadHandle: Userfaultfd.Handle?
    /// The resolver's slot for this pager (-1: none).
    private var resolverSlot: Int32 = -1
    private var threads: [DedicatedThread] = []
    private var stopped = false

    // Guarded by `lock`.
    var tables: [PageTable?] = []
    var generations: [UInt32] = []
    var freeSlots: [Int] = []
    /// Live tables sorted by base address, for the fault lookup.
    var sorted: [PageTable] = []
    var queue: VictimQueue
    /// Soft-evicted pages, oldest first: where victims of soft-evicting tables come from.
    var softQueue: VictimQueue
    /// Pages soft-evicted now, and how many the evictors keep so (``PagerConfiguration/softEvictionFraction``).
    var softPages: Int {
        get { Int(lock.shared.pointee.soft_pages) }
        set { lock.shared.pointee.soft_pages = Int64(newValue) }
    }
    var softTargetPages: Int { Int(Double(configuration.bufferBytes / 4096) * configuration.softEvictionFraction) }
    /// The bytes counted resident (kept with the in-thread resolver's state).
    var residentBytes: Int {
        get { Int(lock.shared.pointee.resident_bytes) }
        set { lock.shared.pointee.resident_bytes = Int64(newValue) }
    }
    var stats = PagerStatistics()
    var isStopping = false

    var capacityBytes: Int { configuration.bufferBytes }
    var highWaterBytes: Int { Int(Double(configuration.bufferBytes) * configuration.highWater) }
    /// The most bytes one sequential fault reads: the configured limit, and at most an
    /// eighth of the buffer. A window near the buffer's size could never fit: the
    /// evictors stop at the low-water mark, and pages whose write-back fails stay.
    var readAheadLimitBytes: Int { min(configuration.maxReadAheadBytes, configuration.bufferBytes / 8) }
    var lowWaterBytes: Int { Int(Double(configuration.bufferBytes) * configuration.lowWater) }

    /// Creates the userfaultfd and starts the filler and evictor threads.
    ///
    /// - Parameter configuration: the buffer size, thread counts and policy.
    /// - Throws: `UserfaultfdError` if the userfaultfd cannot be created, or
    ///   `UserfaultfdError.Kind.invalidArgument` for a buffer under 64 KiB or bad marks.
    public init(_ configuration: PagerConfiguration) throws(UserfaultfdError) {
        let c = configuration
        if c.bufferBytes < 64 << 10 || !(0 < c.lowWater && c.lowWater < c.highWater && c.highWater <= 1)
            || c.fillers < 1 || c.evictors < 1 {
            throw UserfaultfdError(operation: "Pager", kind: .invalidArgument(
                "need a buffer of at least 64 KiB, 0 < lowWater < highWater <= 1, and at least one filler and evictor"))
        }
        self.configuration = c
        let fd = try Userfaultfd()
        handle = fd.handle
        uffd = fd
        stopSignal = try StopSignal()
        queue = VictimQueue(capacity: c.bufferBytes / 4096 + 1024)
        softQueue = VictimQueue(capacity: c.softEviction ? c.bufferBytes / 4096 + 1024 : 16)
        guard let lock = PagerLock(pendingCapacity: c.bufferBytes / 4096 + 1024) else {
            throw UserfaultfdError(operation: "Pager", errno: .noMemory)
        }
        self.lock = lock
        if c.resolution == .faultingThread {
            let signalling = try Userfaultfd(features: [.sigbus])
            inThreadHandle = signalling.handle
            inThreadUffd = .some(consume signalling)
        } else {
            inThreadHandle = nil
            inThreadUffd = nil
        }
        let shared = lock.shared
        shared.pointee.capacity_bytes = Int64(c.bufferBytes)
        shared.pointee.space_wait_ms = Int64(c.spaceWaitMilliseconds)
        shared.pointee.max_read_ahead_pages = Int64(c.maxReadAheadPages)
        shared.pointee.max_read_ahead_bytes = Int64(readAheadLimitBytes)
        shared.pointee.clock_policy = c.policy == .clock ? 1 : 0
        if inThreadHandle != nil {
            resolverSlot = cpaged_resolver_publish(shared)
            if resolverSlot < 0 {
                throw UserfaultfdError(operation: "Pager", kind: .invalidArgument("over 16 pagers resolve faults in the faulting thread"))
            }
        }
        for i in 0..<c.fillers {
            threads.append(DedicatedThread(name: "pager-fill-\(i)") { [unowned self] in self.fillLoop() })
        }
        for i in 0..<c.evictors {
            threads.append(DedicatedThread(name: "pager-evict-\(i)") { [unowned self] in self.evictLoop() })
        }
    }

    deinit { shutdown() }

    /// Stops the threads. Unmap the mappings first: their pages are not written back
    /// after this, and a fault on them is no longer served.
    public func shutdown() {
        if stopped { return }
        stopped = true
        lock.withLock {
            isStopping = true
            lock.shared.pointee.stopping = 1
            lock.broadcast()
        }
        if resolverSlot >= 0 { cpaged_resolver_withdraw(resolverSlot) }
        stopSignal.raise()
        for t in threads { t.join() }
    }

    /// What the pager has done so far.
    public var statistics: PagerStatistics {
        lock.withLock {
            var s = stats
            let c = lock.shared.pointee
            s.faults += Int(c.faults)
            s.writeFaults += Int(c.write_faults)
            s.pagesFilled += Int(c.pages_filled)
            s.pagesReadAhead += Int(c.pages_read_ahead)
            s.bytesRead += Int(c.bytes_read)
            s.errors += Int(c.errors)
            s.spaceWaits += Int(c.space_waits)
            s.softHits += Int(c.soft_hits)
            s.peakResidentBytes = max(s.peakResidentBytes, Int(c.peak_resident_bytes))
            return s
        }
    }

    /// The bytes of mapped pages in memory now.
    public var residentSize: Int {
        lock.withLock { residentBytes }
    }

    /// The mappings alive now.
    public var mappingCount: Int {
        lock.withLock { sorted.count }
    }

    /// The table whose range holds `address` (lock held). Allocates nothing.
    @inline(__always)
    func table(containing address: UInt64) -> PageTable? {
        var low = 0
        var high = sorted.count
        while low < high {
            let mid = (low + high) / 2
            if sorted[mid].end <= address { low = mid + 1 } else { high = mid }
        }
        if low < sorted.count, sorted[low].base <= address { return sorted[low] }
        return nil
    }

    /// The table a queue entry names, if it is still alive (lock held).
    @inline(__always)
    func table(for entry: UInt64) -> (PageTable, Int)? {
        let (slot, generation, page) = VictimQueue.decode(entry)
        guard slot < tables.count, let t = tables[slot], t.generation & 0xFFF == generation, page < t.pageCount else {
            return nil
        }
        return (t, page)
    }

    /// Queues `page` of `t` as resident (lock held).
    func enqueue(_ t: PageTable, _ page: Int) {
        let e = VictimQueue.entry(slot: t.slot, generation: t.generation, page: page)
        let pushed = queue.push(e) { [unowned self] e in
            guard let (t, p) = self.table(for: e) else { return false }
            let s = t.state(p)
            return (s == .resident && !t.isSoft(p)) || s == .cleaning || s == .filling
        }
        if !pushed { t.record(PagedMappingError(kind: .bufferExhausted, offset: page * t.pageSize)) }
    }

    /// Queues the pages the in-thread resolver filled since the last call (lock held).
    func queueResolvedPages() {
        let shared = lock.shared
        let n = Int(shared.pointee.pending_count)
        if n == 0 { return }
        for i in 0..<n {
            let e = shared.pointee.pending[i]
            if let (t, p) = table(for: e), t.state(p) == .resident || t.state(p) == .cleaning { enqueue(t, p) }
        }
        shared.pointee.pending_count = 0
    }

    /// Adds `t` to the lookup structures (lock held).
    /// - Returns: false if the in-thread resolver's table could not grow.
    @discardableResult
    func insert(_ t: PageTable) -> Bool {
        if t.inThread && cpaged_insert_region(lock.shared, t.c) != 0 { return false }
        var low = 0
        var high = sorted.count
        while low < high {
            let mid = (low + high) / 2
            if sorted[mid].base < t.base { low = mid + 1 } else { high = mid }
        }
        sorted.insert(t, at: low)
        tables[t.slot] = t
        return true
    }

    /// Removes `t` from the lookup structures (lock held).
    func remove(_ t: PageTable) {
        if t.inThread { cpaged_remove_region(lock.shared, t.c) }
        if let i = sorted.firstIndex(where: { $0 === t }) { sorted.remove(at: i) }
        tables[t.slot] = nil
        generations[t.slot] = generations[t.slot] &+ 1
        freeSlots.append(t.slot)
        residentBytes -= t.residentPages * t.pageSize
        softPages -= t.softPages
        t.softPages = 0
        lock.broadcast()
    }

    /// Takes a free slot and its generation (lock held).
    func takeSlot() -> (Int, UInt32)? {
        if let s = freeSlots.popLast() { return (s, generations[s]) }
        if tables.count >= 1 << 20 { return nil }
        tables.append(nil)
        generations.append(0)
        return (tables.count - 1, 0)
    }
}
