import TestSupport
import Snapshot
import Synchronization
import Testing
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Every suite that write-protects runs inside this one, one test at a time.
@Suite(.sharesProcess, .serialized)
struct SnapshotTests {}

let page = systemPageSize

/// The 8-byte word `w` of page `p` at version `v` (0: never written, all zeros).
@inline(__always)
func word(page p: Int, version v: UInt64, index w: Int) -> UInt64 {
    v == 0 ? 0 : (UInt64(p) << 32 | v) &* 0x9E37_79B9_7F4A_7C15 ^ UInt64(w)
}

/// Memory the tests snapshot: anonymous (4 KiB pages or transparent huge pages) or memfd.
enum TestMemoryKind: String, CaseIterable, Sendable, CustomStringConvertible {
    case anonymous, transparentHuge, memfd
    var description: String { rawValue }
}

/// A mapping for a test, aligned to 2 MiB; unmapped when this value goes away.
final class TestMemory: @unchecked Sendable {
    let base: UnsafeMutableRawPointer
    let length: Int
    private let mapped: UnsafeMutableRawPointer
    private let mappedLength: Int
    private let memfd: Int32

    init(kind: TestMemoryKind, length: Int) throws {
        let huge = 2 << 20
        mappedLength = length + huge
        if kind == .memfd {
            let shared = try MemoryMapping.shared(length: length, hugetlb: false, name: "snapshot-test")
            memfd = dup(shared.memfd!.rawValue)
            // Map the memfd again at a 2 MiB-aligned address inside a reservation.
            let reserve = mmap(nil, mappedLength, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
            let aligned = (UInt(bitPattern: reserve) + UInt(huge - 1)) & ~UInt(huge - 1)
            let p = mmap(UnsafeMutableRawPointer(bitPattern: aligned), length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, memfd, 0)
            try #require(p != MAP_FAILED)
            mapped = reserve
            base = p!
        } else {
            memfd = -1
            let p = mmap(nil, mappedLength, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
            try #require(p != MAP_FAILED)
            mapped = p!
            base = UnsafeMutableRawPointer(bitPattern: (UInt(bitPattern: p!) + UInt(huge - 1)) & ~UInt(huge - 1))!
            _ = madvise(base, length, kind == .transparentHuge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE)
        }
        self.length = length
    }

    /// Private hugetlb memory (MAP_PRIVATE | MAP_HUGETLB, 2 MiB pages, reserved at map time).
    init(hugetlbLength length: Int) throws {
        let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0)
        try #require(p != MAP_FAILED, "mmap MAP_HUGETLB \(length) bytes: \(String(cString: strerror(errno)))")
        memfd = -1
        mapped = p!
        mappedLength = length
        base = p!
        self.length = length
    }

    deinit {
        munmap(mapped, mappedLength)
        if memfd >= 0 { close(memfd) }
    }

    var range: MemoryRange { MemoryRange(base, length: length) }
    var pages: Int { length / page }

    /// Writes page `p` at version `v`, word by word.
    @inline(__always)
    func write(page p: Int, version v: UInt64) {
        let words = (base + p * page).assumingMemoryBound(to: UInt64.self)
        for w in 0..<(page / 8) { words[w] = word(page: p, version: v, index: w) }
    }
}

/// Writer threads doing random page updates, each thread owning the pages `p % threads == t`,
/// and a quiesce hook that parks them between updates and logs every page's version.
final class Workload: @unchecked Sendable {
    let memory: TestMemory
    let threads: Int
    let versions: UnsafeMutablePointer<UInt64>
    let pauseRequested = Atomic<Bool>(false)
    let parked = Atomic<Int>(0)
    let stopRequested = Atomic<Bool>(false)
    let operations = Atomic<Int>(0)
    /// Writers update only pages below this (all pages by default).
    var hotPages: Int
    private var running: [DedicatedThread] = []

    init(memory: TestMemory, threads: Int) {
        self.memory = memory
        self.threads = threads
        hotPages = memory.pages
        versions = .allocate(capacity: memory.pages)
        versions.initialize(repeating: 0, count: memory.pages)
    }

    deinit { versions.deallocate() }

    /// Writes every page whose index is a multiple of `stride` once (the rest stay never-touched).
    func populate(stride: Int) {
        for p in Swift.stride(from: 0, to: memory.pages, by: stride) {
            versions[p] = 1
            memory.write(page: p, version: 1)
        }
    }

    func start(seed: UInt64) {
        for t in 0..<threads {
            running.append(DedicatedThread(name: "snap-test-w\(t)") { [self] in run(thread: t, seed: seed &+ UInt64(t)) })
        }
    }

    private func run(thread t: Int, seed: UInt64) {
        var state = seed | 1
        let owned = max(1, (hotPages - t + threads - 1) / threads)
        while !stopRequested.load(ordering: .acquiring) {
            if pauseRequested.load(ordering: .acquiring) {
                parked.add(1, ordering: .acquiringAndReleasing)
                while pauseRequested.load(ordering: .acquiring) { sched_yield() }
                parked.subtract(1, ordering: .acquiringAndReleasing)
                continue
            }
            state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            let p = Int((state >> 33) % UInt64(owned)) * threads + t
            let v = versions[p] + 1
            memory.write(page: p, version: v)
            versions[p] = v
            operations.add(1, ordering: .relaxed)
        }
    }

    func stop() {
        stopRequested.store(true, ordering: .releasing)
        for t in running { t.join() }
        running = []
    }

    /// The hook: parks the writers, copies the versions into `log`, then lets them go.
    func quiesce(into log: VersionLog) -> Snapshotter.Quiesce {
        Snapshotter.Quiesce(
            pause: { [self] in
                pauseRequested.store(true, ordering: .releasing)
                while parked.load(ordering: .acquiring) < threads { sched_yield() }
                log.record(versions, count: memory.pages)
            },
            resume: { [self] in pauseRequested.store(false, ordering: .releasing) })
    }
}

/// The versions of every page at a snapshot's instant: the first pause of the hook
/// (an incremental capture pauses the writers once more at its end).
final class VersionLog: @unchecked Sendable {
    var versions: [UInt64] = []
    var pauses = 0
    func record(_ v: UnsafeMutablePointer<UInt64>, count: Int) {
        pauses += 1
        if pauses == 1 { versions = Array(UnsafeBufferPointer(start: v, count: count)) }
    }
}

/// The pages of `bytes(page)` (each `page` bytes) that do not hold their logged version.
func mismatches(_ log: [UInt64], pageBytes: (Int, UnsafeMutableRawPointer) throws -> Void) rethrows -> [Int] {
    let buffer = UnsafeMutableRawPointer.allocate(byteCount: page, alignment: page)
    defer { buffer.deallocate() }
    var bad: [Int] = []
    for p in log.indices {
        try pageBytes(p, buffer)
        let words = buffer.assumingMemoryBound(to: UInt64.self)
        for w in 0..<(page / 8) where words[w] != word(page: p, version: log[p], index: w) {
            bad.append(p)
            break
        }
    }
    return bad
}

/// Captures `count` snapshots in a row while `workload` runs, each after at least 3000
/// more of its operations: the files, the versions at each instant, and the results.
func captureSeries(_ snapshotter: Snapshotter, _ workload: Workload, count: Int, name: String) throws
    -> (files: [TemporaryPath], logs: [[UInt64]], results: [Capture.Result])
{
    var files: [TemporaryPath] = []
    var logs: [[UInt64]] = []
    var results: [Capture.Result] = []
    for i in 0..<count {
        let before = workload.operations.load(ordering: .relaxed)
        while workload.operations.load(ordering: .relaxed) < before + 3000 { sched_yield() }
        let file = TemporaryPath("\(name)-\(i)")
        let log = VersionLog()
        results.append(try snapshotter.capture(to: file.path, quiesce: workload.quiesce(into: log)).wait())
        files.append(file)
        logs.append(log.versions)
    }
    return (files, logs, results)
}

/// A temporary file path, removed when this value goes away.
final class TemporaryPath: @unchecked Sendable {
    let path: String
    init(_ name: String) {
        path = "/tmp/snapshot-test-\(getpid())-\(name)-\(UInt32.random(in: 0...UInt32.max))"
    }
    deinit { unlink(path) }
}

/// Whether `/proc/self/pagemap` marks any page of `range` uffd-wp write-protected (bit 57).
func protectedPages(_ range: MemoryRange) -> Int {
    let fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return -1 }
    defer { close(fd) }
    let pages = Int(range.length) / page
    var entries = [UInt64](repeating: 0, count: pages)
    let n = entries.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, off_t(range.start / UInt64(page) * 8)) }
    guard n == pages * 8 else { return -1 }
    return entries.reduce(0) { $0 + (($1 >> 57) & 1 == 1 ? 1 : 0) }
}

/// Whether the kernel offers what a capture needs (WP_UNPOPULATED, WP on shmem).
let captureSupported: Bool = {
    guard let s = try? Userfaultfd.probe() else { return false }
    return s.features.isSuperset(of: [.wpUnpopulated, .wpHugetlbfsShmem])
}()
