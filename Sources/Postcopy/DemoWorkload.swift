import Synchronization
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A workload to migrate while it runs: worker threads read and write whole pages of a
/// data region with a skewed pattern (nine accesses in ten go to a hot tenth of the
/// pages) and log each page's version in a second region that migrates with it.
///
/// Page `p` at version `v` holds `p << 32 | v` in its first word and the byte
/// `pattern(p, v)` everywhere else, so ``verify()`` can check every page byte for byte
/// against the log, on whichever side the workload ended. Each worker owns the pages
/// `p ≡ worker (mod workers)`, so no two threads write one page.
public final class DemoWorkload: @unchecked Sendable {
    /// The data pages.
    public let data: MemoryRange
    /// The version log: one `UInt32` per data page.
    public let log: MemoryRange
    public let workers: Int
    private let pages: Int
    private let pageSize = systemPageSize
    private let paused = Atomic<Bool>(false)
    private let parked = Atomic<Int>(0)
    private let stopping = Atomic<Bool>(false)
    private let operationCount = Atomic<Int>(0)
    private let errorCount = Atomic<Int>(0)
    private var threads: [DedicatedThread] = []

    /// The bytes of the version log for `dataBytes` of data, rounded up to whole pages.
    public static func logBytes(forDataBytes dataBytes: Int) -> Int {
        let bytes = dataBytes / systemPageSize * 4
        return (bytes + systemPageSize - 1) / systemPageSize * systemPageSize
    }

    /// A workload over `data` with its version log in `log` (see ``logBytes(forDataBytes:)``).
    public init(data: MemoryRange, log: MemoryRange, workers: Int) {
        self.data = data
        self.log = log
        self.workers = max(1, workers)
        pages = Int(data.length) / systemPageSize
    }

    /// Operations done so far (reads and writes).
    public var operations: Int { operationCount.load(ordering: .relaxed) }
    /// Reads that found a page not matching its log entry.
    public var errors: Int { errorCount.load(ordering: .relaxed) }

    @inline(__always)
    private func pattern(_ p: Int, _ v: UInt32) -> Int32 { Int32((UInt32(truncatingIfNeeded: p) &* 31 &+ v) % 255 + 1) }

    @inline(__always)
    private func version(_ p: Int) -> UnsafeMutablePointer<UInt32> {
        (log.pointer + p * 4).assumingMemoryBound(to: UInt32.self)
    }

    @inline(__always)
    private func write(_ p: Int, version v: UInt32) {
        let page = data.pointer + p * pageSize
        memset(page + 8, pattern(p, v), pageSize - 8)
        page.storeBytes(of: UInt64(p) << 32 | UInt64(v), as: UInt64.self)
        version(p).pointee = v
    }

    @inline(__always)
    private func check(_ p: Int, scratch: UnsafeMutableRawPointer) -> Bool {
        let v = version(p).pointee
        let page = data.pointer + p * pageSize
        if page.load(as: UInt64.self) != UInt64(p) << 32 | UInt64(v) { return false }
        memset(scratch, pattern(p, v), pageSize - 8)
        return memcmp(page + 8, scratch, pageSize - 8) == 0
    }

    /// Writes every page at version 1.
    public func initialize() {
        for p in 0..<pages { write(p, version: 1) }
    }

    /// Starts the worker threads.
    public func start() {
        paused.store(false, ordering: .releasing)
        stopping.store(false, ordering: .releasing)
        for w in 0..<workers {
            threads.append(DedicatedThread(name: "demo-worker-\(w)") { [self] in work(w) })
        }
    }

    /// Stops every worker between two operations and returns once none touches memory.
    public func pause() {
        paused.store(true, ordering: .releasing)
        while parked.load(ordering: .acquiring) < threads.count { usleep(20) }
    }

    /// Tells the workers to stop after their current operation, without waiting for them
    /// (one waiting for a page that never comes would never be joined).
    public func requestStop() {
        stopping.store(true, ordering: .releasing)
        paused.store(false, ordering: .releasing)
    }

    /// Stops and joins the workers.
    public func stop() {
        stopping.store(true, ordering: .releasing)
        paused.store(false, ordering: .releasing)
        for t in threads { t.join() }
        threads = []
        parked.store(0, ordering: .releasing)
    }

    /// Checks every page against its log entry; returns the pages checked and those wrong.
    public func verify() -> (pages: Int, mismatches: Int) {
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: pageSize, alignment: 16)
        defer { scratch.deallocate() }
        var wrong = 0
        for p in 0..<pages where !check(p, scratch: scratch) { wrong += 1 }
        return (pages, wrong)
    }

    private func work(_ w: Int) {
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: pageSize, alignment: 16)
        defer { scratch.deallocate() }
        var state = UInt64(0x9E37_79B9_7F4A_7C15) &* UInt64(w + 1) | 1
        @inline(__always) func next() -> Int {
            state ^= state << 13
            state ^= state >> 7
            state ^= state << 17
            return Int(truncatingIfNeeded: state >> 1)
        }
        let hot = max(workers, pages / 10)
        var isParked = false
        while !stopping.load(ordering: .relaxed) {
            if paused.load(ordering: .acquiring) {
                if !isParked { isParked = true; parked.add(1, ordering: .releasing) }
                usleep(50)
                continue
            }
            if isParked { isParked = false; parked.subtract(1, ordering: .releasing) }
            var p = next() % 10 < 9 ? next() % hot : next() % pages
            p = p - p % workers + w
            if p >= pages { p -= workers }
            if p < 0 { continue }
            if next() & 1 == 0 {
                write(p, version: version(p).pointee &+ 1)
            } else if !check(p, scratch: scratch) {
                errorCount.add(1, ordering: .relaxed)
            }
            operationCount.add(1, ordering: .relaxed)
        }
        if isParked { parked.subtract(1, ordering: .releasing) }
    }
}
