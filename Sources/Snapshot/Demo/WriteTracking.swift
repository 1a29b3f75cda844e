import Synchronization
import Userfaultfd
import _CSnapshot

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Ways to learn which pages a workload wrote.
public enum TrackingMethod: String, Sendable, Codable, CaseIterable {
    /// WP_ASYNC: the kernel resolves the write fault itself; PAGEMAP_SCAN collects
    /// the written pages and protects them again.
    case wpAsync = "wp-async+pagemap-scan"
    /// Synchronous uffd-wp: each first write faults to a handler thread, which notes
    /// the page and clears its protection.
    case syncWP = "sync uffd-wp"
    /// mprotect read-only; a SIGSEGV handler notes the page and makes it writable.
    case sigsegv = "mprotect+sigsegv"
}

/// One measurement of a tracking method on the shared write pattern.
public struct TrackingRun: Sendable, Codable, Hashable {
    public var method: TrackingMethod
    public var round: Int
    public var dirtiedPages: Int
    /// Pages the method reported written (must equal `dirtiedPages`).
    public var pagesFound: Int
    /// Nanoseconds of the writes plus collection, minus the same writes untracked.
    public var overheadNanoseconds: UInt64
    public var nanosecondsPerPage: Double
}

/// Measures the three tracking methods in alternation on the same random pattern:
/// `dirty` distinct pages of a `bytes` region, each written once.
struct TrackingBenchmark {
    let bytes: Int
    let dirty: Int
    let pattern: [UInt64]

    init(bytes: Int, dirty: Int) {
        self.bytes = bytes
        let pages = bytes / systemPageSize
        var order = Array(0..<pages)
        var state: UInt64 = 0x5DEECE66D
        for i in stride(from: pages - 1, to: 0, by: -1) {
            state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            order.swapAt(i, Int((state >> 33) % UInt64(i + 1)))
        }
        self.dirty = min(dirty, pages)
        pattern = order.prefix(self.dirty).map(UInt64.init)
    }

    func populated() throws(SnapshotError) -> UnsafeMutableRawPointer {
        guard let p = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), p != MAP_FAILED else {
            throw SnapshotError.system("mmap")
        }
        _ = madvise(p, bytes, MADV_NOHUGEPAGE)
        memset(p, 1, bytes)
        return p
    }

    func touch(_ base: UnsafeMutableRawPointer) -> UInt64 {
        pattern.withUnsafeBufferPointer { csnap_touch_write(base, $0.baseAddress, $0.count, systemPageSize) }
    }

    func run(rounds: Int) throws(SnapshotError) -> [TrackingRun] {
        let plain = try populated(), asyncRegion = try populated(), syncRegion = try populated(), segvRegion = try populated()
        defer { for p in [plain, asyncRegion, syncRegion, segvRegion] { munmap(p, bytes) } }
        let range = { (p: UnsafeMutableRawPointer) in MemoryRange(p, length: bytes) }
        func make(_ features: Userfaultfd.Features) throws(SnapshotError) -> Userfaultfd {
            do { return try Userfaultfd(features: features) } catch { throw SnapshotError(.unsupported("write tracking: \(error)")) }
        }
        let asyncUffd = try make([.wpAsync, .wpUnpopulated])
        let syncUffd = try make([])
        let scanner: PagemapScanner
        do {
            try asyncUffd.handle.register(range(asyncRegion), mode: .writeProtect)
            try syncUffd.handle.register(range(syncRegion), mode: .writeProtect)
            scanner = try PagemapScanner(regionCapacity: dirty + 1)
        } catch {
            throw SnapshotError(.unsupported("write tracking: \(error)"))
        }
        var runs: [TrackingRun] = []
        for round in 0..<rounds {
            let baseline = touch(plain)
            for method in TrackingMethod.allCases {
                var found = 0
                var elapsed: UInt64 = 0
                switch method {
                case .wpAsync:
                    _ = try? asyncUffd.handle.writeProtect(range(asyncRegion), mode: .writeProtect)
                    let start = MonotonicClock.nanoseconds()
                    _ = touch(asyncRegion)
                    let result = try? scanner.scan(range(asyncRegion), flags: .writeProtectMatching, required: .written, returning: .written)
                    elapsed = MonotonicClock.nanoseconds() - start
                    found = result?.pageCount ?? 0
                case .syncWP:
                    _ = try? syncUffd.handle.writeProtect(range(syncRegion), mode: .writeProtect)
                    let handler = SyncTracker(handle: syncUffd.handle, pages: bytes / systemPageSize)
                    elapsed = touch(syncRegion)
                    found = handler.finish()
                case .sigsegv:
                    var written = [UInt8](repeating: 0, count: bytes / systemPageSize)
                    elapsed = pattern.withUnsafeBufferPointer { p in
                        written.withUnsafeMutableBufferPointer {
                            csnap_sigsegv_track(segvRegion, bytes, p.baseAddress, p.count, systemPageSize, $0.baseAddress)
                        }
                    }
                    if elapsed == 0 { throw SnapshotError.system("mprotect + SIGSEGV tracking") }
                    found = written.reduce(0) { $0 + Int($1) }
                }
                let overhead = elapsed > baseline ? elapsed - baseline : 0
                runs.append(TrackingRun(method: method, round: round, dirtiedPages: dirty, pagesFound: found,
                                        overheadNanoseconds: overhead, nanosecondsPerPage: Double(overhead) / Double(dirty)))
            }
        }
        try? asyncUffd.handle.unregister(range(asyncRegion))
        try? syncUffd.handle.unregister(range(syncRegion))
        return runs
    }
}

/// A handler thread for synchronous write tracking: notes each faulting page and
/// clears its protection.
final class SyncTracker: @unchecked Sendable {
    private let stop: StopSignal?
    private var thread: DedicatedThread?
    private let counted = Atomic<Int>(0)

    init(handle: Userfaultfd.Handle, pages: Int) {
        stop = try? StopSignal()
        let page = UInt64(systemPageSize)
        thread = DedicatedThread(name: "demo-wp-track") { [self] in
            let buffer = Userfaultfd.EventBuffer(capacity: 64)
            while let result = try? handle.wait(stop: stop), result == .ready || result == .timedOut {
                guard (try? handle.readEvents(into: buffer)) != nil else { return }
                for case .pageFault(let f) in buffer.events {
                    counted.add(1, ordering: .relaxed)
                    _ = try? handle.writeProtect(MemoryRange(start: f.address & ~(page - 1), length: page), mode: [])
                }
            }
        }
    }

    /// Stops the thread; returns the pages it saw.
    func finish() -> Int {
        stop?.raise()
        thread?.join()
        return counted.load(ordering: .acquiring)
    }
}
