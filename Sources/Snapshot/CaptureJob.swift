import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Nanoseconds of CPU the calling thread has used.
func threadCPUNanoseconds() -> UInt64 {
    var ts = timespec()
    guard clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == 0 else { return 0 }
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// One region as the capture numbers it.
struct RegionLayout: Sendable {
    var start: UInt64
    var pages: Int
    var firstPage: Int
    var kind: SnapshotFormat.MemoryKind
    /// For shared hugetlb memory: the file, open for reading, and the region's offset in it.
    var file: Int32 = -1
    var fileOffset: UInt64 = 0
}

/// Where each page of a capture stands.
enum PageState {
    /// Not yet saved: still write-protected.
    static let pending: UInt8 = 0
    /// Claimed by the image writer, which unprotects it once written.
    static let streaming: UInt8 = 1
    /// Copied by the fault handler into the staging area (and then unprotected by it).
    static let saved: UInt8 = 2
    /// Written to the image and unprotected.
    static let done: UInt8 = 3
    /// Claimed by the fault handler, not yet copied: nobody else may unprotect it.
    static let saving: UInt8 = 4
}

/// The state a capture's fault handler and image writer share: page states, the
/// bounded staging ring of pages saved before a write, counters. Everything under
/// ``monitor``, which only those two threads take.
final class CaptureJob: @unchecked Sendable {
    let layout: [RegionLayout]
    let pageSize: Int
    let pageCount: Int
    let handle: Userfaultfd.Handle
    let writer: SnapshotFileWriter
    let monitor = Monitor()
    let stop: StopSignal
    let streamChunkPages: Int
    let faultChunkPages: Int
    let handlerPriority: Int32

    let state: UnsafeMutablePointer<UInt8>
    /// The staging ring: `capacity` page slots and the global page each holds.
    let capacity: Int
    let slots: UnsafeMutableRawPointer
    private let slotsBytes: Int
    let slotPages: UnsafeMutablePointer<Int>
    /// Ring positions (monotonic): reserved by the handler, published once copied,
    /// consumed once written to the image.
    var reserved = 0
    var published = 0
    var consumed = 0
    /// Pages the handler claimed and has not yet published.
    var inFlight = 0
    var peakStaged = 0
    var stagingWaits = 0
    var cancelled = false
    var failure: SnapshotError?
    var faults = 0
    var savedPages = 0
    var streamedPages = 0
    var finished = false
    /// Whether this delta was copied while the writers were held and the regions
    /// stayed registered on the tracking userfaultfd.
    var stayedOnTracking = false
    var endNanoseconds: UInt64 = 0
    var writerCPUNanoseconds: UInt64 = 0
    var handlerCPUNanoseconds: UInt64 = 0
    /// Whether writes after the instant are tracked for the next (delta) capture: the
    /// image writer then leaves clean pages protected, and every page written during
    /// the capture is noted in ``nextDirty``.
    let tracking: Bool
    /// Pages written (or possibly written) after the instant, when tracking.
    let nextDirty: UnsafeMutablePointer<UInt8>
    /// Runs on the image writer's thread once the file is complete (hand-over to tracking).
    var onFinish: (() throws(SnapshotError) -> Void)?

    init(layout: [RegionLayout], pageSize: Int, handle: Userfaultfd.Handle, writer: SnapshotFileWriter,
         options: Snapshotter.Options) throws(SnapshotError) {
        self.layout = layout
        self.pageSize = pageSize
        self.pageCount = layout.reduce(0) { $0 + $1.pages }
        self.handle = handle
        self.writer = writer
        do { stop = try StopSignal() } catch { throw SnapshotError.system("eventfd", error.errno?.rawValue ?? EIO) }
        capacity = max(1, options.stagingBytes / pageSize)
        streamChunkPages = max(1, options.streamChunkBytes / pageSize)
        faultChunkPages = pageSize > systemPageSize ? 1 : max(1, min(options.faultChunkPages, capacity))
        handlerPriority = options.handlerPriority
        slotsBytes = capacity * pageSize
        // The ring on transparent huge pages: the handler's copies and the writer's
        // reads take few TLB misses, and a first touch faults once per 2 MiB. It is
        // not populated ahead: that would delay the instant and hold the whole ring
        // for captures that save little.
        guard let ring = mmap(nil, slotsBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), ring != MAP_FAILED else {
            throw SnapshotError.system("mmap \(slotsBytes) bytes of staging")
        }
        _ = madvise(ring, slotsBytes, MADV_HUGEPAGE)
        slots = ring
        state = .allocate(capacity: max(1, pageCount))
        state.initialize(repeating: PageState.pending, count: max(1, pageCount))
        slotPages = .allocate(capacity: capacity)
        slotPages.initialize(repeating: 0, count: capacity)
        tracking = options.incremental
        nextDirty = .allocate(capacity: max(1, pageCount))
        nextDirty.initialize(repeating: 0, count: max(1, pageCount))
    }

    deinit {
        state.deallocate()
        munmap(slots, slotsBytes)
        slotPages.deallocate()
        nextDirty.deallocate()
    }

    /// Memory the capture holds besides the caller's: staging, page states, the index.
    var extraBytes: Int { capacity * pageSize + capacity * 8 + pageCount * (tracking ? 2 : 1) + writer.metadataBytes }

    /// The region and global page holding `address`, if any.
    @inline(__always)
    func locate(_ address: UInt64) -> (region: Int, page: Int)? {
        for (i, r) in layout.enumerated() where address >= r.start {
            let offset = address - r.start
            if offset < UInt64(r.pages * pageSize) { return (i, r.firstPage + Int(offset / UInt64(pageSize))) }
        }
        return nil
    }

    @inline(__always)
    func address(of page: Int, in region: Int) -> UInt64 {
        layout[region].start + UInt64((page - layout[region].firstPage) * pageSize)
    }

    /// Clears write protection on `pages` pages from global page `first` and wakes
    /// the writers held there.
    func unprotect(region: Int, first: Int, pages: Int) throws(SnapshotError) {
        let range = MemoryRange(start: address(of: first, in: region), length: UInt64(pages * pageSize))
        while true {
            do {
                if try handle.writeProtect(range, mode: []) == .retryAfterEvents { continue }
                return
            } catch {
                throw SnapshotError.system("UFFDIO_WRITEPROTECT (clear)", error.errno?.rawValue ?? EIO)
            }
        }
    }

    /// Wakes the writers held on `pages` pages from global page `first` without
    /// clearing protection (when tracking: they fault again and are noted dirty).
    func wake(region: Int, first: Int, pages: Int) throws(SnapshotError) {
        let range = MemoryRange(start: address(of: first, in: region), length: UInt64(pages * pageSize))
        do { try handle.wake(range) } catch { throw SnapshotError.system("UFFDIO_WAKE", error.errno?.rawValue ?? EIO) }
    }

    /// Clears write protection everywhere (cancel, failure): no writer stays held.
    func unprotectAll() {
        for (i, r) in layout.enumerated() { try? unprotect(region: i, first: r.firstPage, pages: r.pages) }
    }

    /// Records the first failure and stops the capture.
    func fail(_ error: SnapshotError) {
        monitor.withLock {
            if failure == nil { failure = error }
            cancelled = true
            monitor.broadcast()
        }
    }
}
