import Synchronization
import Userfaultfd
import _CSnapshot

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// How the demo snapshots its heap.
public enum DemoMethod: String, Sendable, Codable, CaseIterable {
    /// `fork`, and the child writes the heap to the image (as Redis BGSAVE does).
    case fork
    /// This module's capture: uffd write protection, copy before write by a fault
    /// handler thread (the library's default).
    case uffdWP = "uffd-wp"
    /// The same, the writing threads saving pages themselves in a SIGBUS handler
    /// (``Snapshotter/SavingThread/writingThread``: the demo's heap is written by
    /// user-space code only).
    case uffdWPInThread = "uffd-wp-in-thread"
    /// Writers held while the heap is written out.
    case stopAndCopy = "stop-and-copy"

    var phase: Int { DemoMethod.allCases.firstIndex(of: self)! + 1 }

    /// For the uffd methods, which thread saves a page before its write.
    var savingThread: Snapshotter.SavingThread? {
        switch self {
        case .uffdWP: return .handlerThread
        case .uffdWPInThread: return .writingThread
        case .fork, .stopAndCopy: return nil
        }
    }
}

/// One snapshot the demo took, measured and verified.
public struct DemoRun: Sendable, Codable, Hashable {
    public var method: DemoMethod
    public var transparentHugePages: Bool
    public var round: Int
    /// Nanoseconds the writers were held, parking them included, less the demo's own
    /// copy of its version log (``versionCopyNanoseconds``), which an application
    /// snapshotting its heap would not make.
    public var pauseNanoseconds: UInt64
    /// Nanoseconds the demo spent copying its version log while the writers were held.
    public var versionCopyNanoseconds: UInt64 = 0
    /// Nanoseconds of the step that fixes the image once the writers are parked:
    /// `fork()`, the write-protect ioctls, or the whole copy.
    public var freezeNanoseconds: UInt64
    /// Nanoseconds from holding the writers to the image's last byte.
    public var totalNanoseconds: UInt64
    public var imageBytes: UInt64
    /// Heap bytes per second of total time.
    public var bytesPerSecond: Double
    /// The most the snapshot added to memory: growth of the Pss of this process (and
    /// of the forked child), sampled every 20 ms from /proc.
    public var peakExtraBytes: Int64
    /// For uffd-wp, what the capture holds by design (staging area and metadata).
    public var declaredExtraBytes: Int?
    /// Writer updates during the snapshot, and the share of the heap they dirtied
    /// (estimated as 1 - e^(-updates/pages) for uniform random updates).
    public var updatesDuring: Int
    public var dirtiedFraction: Double
    /// Pages whose image differs from the workload's log at the instant (0 = verified).
    public var mismatchedPages: Int
    /// AnonHugePages of the process just before this snapshot (a fork's copy-on-write
    /// and uffd-wp's partial unprotects split huge pages; THP heaps are collapsed
    /// again with MADV_COLLAPSE before each snapshot).
    public var hugePageBytesBefore: Int64
    /// CPU nanoseconds the snapshot itself used: the forked child's, the copy's, or
    /// the capture's image writer and fault handler threads'.
    public var cpuNanoseconds: UInt64 = 0
    /// For uffd-wp: write-protect faults, pages saved before a write, and waits for
    /// room in the staging area.
    public var faults: Int?
    public var savedPages: Int?
    /// For uffd-wp: the CPU nanoseconds of the fault handler thread (part of ``cpuNanoseconds``).
    public var handlerCPUNanoseconds: UInt64?
    public var stagingWaits: Int?
}

/// Samples the Pss of this process and of one more (a forked child) from /proc.
final class MemorySampler: @unchecked Sendable {
    private let stopFlag = Atomic<Bool>(false)
    let child = Atomic<Int32>(0)
    let peak = Atomic<Int64>(0)
    private var thread: DedicatedThread?

    static func pss(_ pid: Int32) -> Int64 { rollup(pid, "Pss:") }

    /// One field of `/proc/PID/smaps_rollup`, in bytes.
    static func rollup(_ pid: Int32, _ field: String) -> Int64 {
        guard let f = fopen("/proc/\(pid)/smaps_rollup", "r") else { return 0 }
        defer { fclose(f) }
        var line = [CChar](repeating: 0, count: 256)
        while fgets(&line, Int32(line.count), f) != nil {
            let text = line.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
            if text.hasPrefix(field) {
                return (Int64(text.dropFirst(field.count).split(separator: " ").first ?? "") ?? 0) * 1024
            }
        }
        return 0
    }

    /// Starts sampling; the peak is the growth over `baseline`.
    func start(baseline: Int64) {
        thread = DedicatedThread(name: "demo-sampler") { [self] in
            while !stopFlag.load(ordering: .acquiring) {
                let c = child.load(ordering: .acquiring)
                let total = Self.pss(getpid()) + (c > 0 ? Self.pss(c) : 0)
                if total - baseline > peak.load(ordering: .relaxed) { peak.store(total - baseline, ordering: .relaxed) }
                usleep(20_000)
            }
        }
    }

    func stop() -> Int64 {
        stopFlag.store(true, ordering: .releasing)
        thread?.join()
        return peak.load(ordering: .acquiring)
    }
}

extension DemoHeap {
    /// Takes one snapshot by `method` into `path`; returns the run, verified.
    func snapshot(_ method: DemoMethod, round: Int, to path: String, options: Snapshotter.Options) throws(SnapshotError) -> DemoRun {
        if transparentHugePages { _ = madvise(base, length, 25 /* MADV_COLLAPSE */) }
        // Registered before the measured part, as a snapshotter is once for many captures.
        var snapshotter: Snapshotter?
        if let saving = method.savingThread {
            var options = options
            options.savingThread = saving
            snapshotter = try Snapshotter(regions: [range], options: options)
        }
        let hugeBefore = MemorySampler.rollup(getpid(), "AnonHugePages:")
        let sampler = MemorySampler()
        sampler.start(baseline: MemorySampler.pss(getpid()))
        let opsBefore = operations.load(ordering: .relaxed)
        let start = MonotonicClock.nanoseconds()
        phase.store(method.phase, ordering: .relaxed)
        var pause: UInt64 = 0
        var freeze: UInt64 = 0
        var declared: Int?
        var cpu: UInt64 = 0
        var captured: Capture.Result?
        switch method {
        case .fork:
            (pause, freeze, cpu) = try forkAndWrite(path: path, sampler: sampler)
        case .stopAndCopy:
            (pause, freeze, cpu) = try stopAndCopy(path: path)
        case .uffdWP, .uffdWPInThread:
            let capture = try snapshotter!.capture(to: path, quiesce: Snapshotter.Quiesce(
                pause: { [self] in self.pause(); recordVersions() },
                resume: { [self] in resume() }))
            pause = capture.pauseNanoseconds
            freeze = capture.armNanoseconds
            let result = try capture.wait()
            declared = result.extraBytes
            cpu = result.writerCPUNanoseconds + result.handlerCPUNanoseconds
            captured = result
        }
        snapshotter = nil
        let log = recordedVersions()
        let total = MonotonicClock.nanoseconds() - start
        phase.store(0, ordering: .relaxed)
        let peak = sampler.stop()
        let updates = operations.load(ordering: .relaxed) - opsBefore
        var st = stat()
        let imageBytes = stat(path, &st) == 0 ? UInt64(st.st_size) : 0
        let bad = try verify(method.savingThread != nil ? .snapshot : .raw, path: path, log: log)
        let logCopy = versionCopyNanoseconds
        return DemoRun(method: method, transparentHugePages: transparentHugePages, round: round,
                       pauseNanoseconds: pause - min(pause, logCopy), versionCopyNanoseconds: logCopy, freezeNanoseconds: freeze, totalNanoseconds: total, imageBytes: imageBytes,
                       bytesPerSecond: Double(length) / (Double(total) / 1e9), peakExtraBytes: peak,
                       declaredExtraBytes: declared, updatesDuring: updates,
                       dirtiedFraction: 1 - exp(-Double(updates) / Double(pages)), mismatchedPages: bad,
                       hugePageBytesBefore: hugeBefore, cpuNanoseconds: cpu, faults: captured?.faults,
                       savedPages: captured?.savedBeforeWritePages, handlerCPUNanoseconds: captured?.handlerCPUNanoseconds,
                       stagingWaits: captured?.stagingWaits)
    }

    /// Writes the heap with the writers held. Returns the pause, the copy's time and its CPU time.
    private func stopAndCopy(path: String) throws(SnapshotError) -> (UInt64, UInt64, UInt64) {
        let start = MonotonicClock.nanoseconds()
        pause()
        recordVersions()
        let copyStart = MonotonicClock.nanoseconds()
        let cpuStart = threadCPUNanoseconds()
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        let e = fd < 0 ? errno : csnap_write_all(fd, base, length)
        if fd >= 0 { close(fd) }
        let cpu = threadCPUNanoseconds() - cpuStart
        let freeze = MonotonicClock.nanoseconds() - copyStart
        resume()
        let paused = MonotonicClock.nanoseconds() - start
        if e != 0 { throw SnapshotError.system("write image", e, path: path) }
        return (paused, freeze, cpu)
    }

    /// Forks with the writers held; the child writes the heap and exits. Returns the
    /// pause, the time of `fork()` itself and the child's CPU time.
    private func forkAndWrite(path: String, sampler: MemorySampler) throws(SnapshotError) -> (UInt64, UInt64, UInt64) {
        let start = MonotonicClock.nanoseconds()
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        if fd < 0 { throw SnapshotError.system("open", path: path) }
        defer { close(fd) }
        pause()
        recordVersions()
        let forkStart = MonotonicClock.nanoseconds()
        let pid = Glibc.fork()
        if pid == 0 { _exit(csnap_write_all(fd, base, length) == 0 ? 0 : 1) }
        let forked = MonotonicClock.nanoseconds() - forkStart
        resume()
        let paused = MonotonicClock.nanoseconds() - start
        if pid < 0 { throw SnapshotError.system("fork") }
        sampler.child.store(pid, ordering: .releasing)
        var status: Int32 = 0
        var usage = rusage()
        _ = retryOnInterrupt { wait4(pid, &status, 0, &usage) }
        sampler.child.store(0, ordering: .releasing)
        if status != 0 { throw SnapshotError.system("the forked child writing the image", EIO, path: path) }
        func ns(_ t: timeval) -> UInt64 { UInt64(t.tv_sec) * 1_000_000_000 + UInt64(t.tv_usec) * 1000 }
        return (paused, forked, ns(usage.ru_utime) + ns(usage.ru_stime))
    }

    enum ImageKind { case raw, snapshot }

    /// Counts the pages of the image that are not the logged version of their record.
    func verify(_ kind: ImageKind, path: String, log: [UInt64]) throws(SnapshotError) -> Int {
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 2 << 20, alignment: 4096)
        defer { buffer.deallocate() }
        let ps = systemPageSize
        var bad = 0
        switch kind {
        case .snapshot:
            let chain = try SnapshotChain(paths: [path])
            guard chain.pageCount == pages else { return pages }
            for p in 0..<pages {
                try chain.readPage(p, into: buffer)
                if !Self.check(buffer, record: p, version: log[p]) { bad += 1 }
            }
        case .raw:
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            if fd < 0 { throw SnapshotError.system("open", path: path) }
            defer { close(fd) }
            let per = (2 << 20) / ps
            for first in stride(from: 0, to: pages, by: per) {
                let n = min(per, pages - first)
                try readExactly(fd, buffer, n * ps, at: UInt64(first * ps), path: path)
                for i in 0..<n where !Self.check(buffer + i * ps, record: first + i, version: log[first + i]) { bad += 1 }
            }
        }
        return bad
    }
}
