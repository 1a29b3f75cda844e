import Userfaultfd
import _CSnapshot

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

    /// The region as the C resolver sees it.
    func resolverRegion(pageSize: Int) -> csnap_region {
        csnap_region(start: start, length: UInt64(pages * pageSize), first_page: Int64(firstPage))
    }
}

/// Where each page of a capture stands (one byte per page, changed atomically: the
/// writing threads' SIGBUS handler claims pages too).
enum PageState {
    /// Not yet saved: still write-protected.
    static let pending = UInt8(CSNAP_PENDING)
    /// Claimed by the image writer, which unprotects it once written.
    static let streaming = UInt8(CSNAP_STREAMING)
    /// Copied by a resolver into the staging area (and then unprotected by it).
    static let saved = UInt8(CSNAP_SAVED)
    /// Written to the image and unprotected.
    static let done = UInt8(CSNAP_DONE)
    /// Claimed by a resolver, not yet copied: nobody else may unprotect it.
    static let saving = UInt8(CSNAP_SAVING)
}

/// The state a capture's image writer and resolvers share. Page states, the bounded
/// staging ring and the resolvers' counters live in ``core`` (C, atomics only), where
/// the fault handler thread or the writing threads' SIGBUS handler reach them; the
/// image writer's own progress and the outcome are under ``monitor``, which the
/// caller's threads never take.
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
    /// Whether the writing threads save pages themselves (SIGBUS) instead of a handler thread.
    let savesInWritingThread: Bool

    let core: UnsafeMutablePointer<csnap_capture>
    private let regionTable: UnsafeMutablePointer<csnap_region>
    let state: UnsafeMutablePointer<UInt8>
    /// The staging ring: `capacity` page slots and the global page each holds.
    let capacity: Int
    let slots: UnsafeMutableRawPointer
    private let slotsBytes: Int
    let slotPages: UnsafeMutablePointer<Int64>
    var failure: SnapshotError?
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
        faultChunkPages = pageSize > systemPageSize ? 1 : max(1, min(options.faultChunkPages, capacity, Int(CSNAP_MAX_FAULT_CHUNK)))
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
        slotPages.initialize(repeating: -1, count: capacity)
        tracking = options.incremental
        savesInWritingThread = options.savingThread == .writingThread
        nextDirty = .allocate(capacity: max(1, pageCount))
        nextDirty.initialize(repeating: 0, count: max(1, pageCount))
        regionTable = .allocate(capacity: max(1, layout.count))
        for (i, r) in layout.enumerated() {
            regionTable[i] = r.resolverRegion(pageSize: pageSize)
        }
        core = .allocate(capacity: 1)
        core.initialize(to: csnap_capture(
            uffd: handle.fileDescriptor.rawValue, tracking: tracking ? 1 : 0, page_size: UInt64(pageSize),
            fault_chunk_pages: Int64(faultChunkPages), region_count: Int64(layout.count), regions: regionTable,
            state: state, next_dirty: nextDirty, slots: ring.assumingMemoryBound(to: UInt8.self), slot_pages: slotPages,
            capacity: Int64(capacity), reserved: 0, consumed: 0, resolvers: 0, faults: 0, saved_pages: 0,
            staging_waits: 0, peak_staged: 0, cancelled: 0, failure_errno: 0))
    }

    deinit {
        core.deallocate()
        regionTable.deallocate()
        state.deallocate()
        munmap(slots, slotsBytes)
        slotPages.deallocate()
        nextDirty.deallocate()
    }

    /// One of the resolvers' counters in ``core``.
    func counter(_ field: KeyPath<csnap_capture, Int64>) -> Int { Int(csnap_load(core.pointer(to: field)!)) }

    /// Stores one of ``core``'s counters (only while no resolver runs).
    func setCounter(_ field: WritableKeyPath<csnap_capture, Int64>, _ value: Int) { csnap_store(core.pointer(to: field)!, Int64(value)) }

    /// Whether the capture was cancelled or failed (also by a resolver).
    var isCancelled: Bool { csnap_load_int(core.pointer(to: \.cancelled)!) != 0 }

    /// The first failure: the image writer's, or a resolver's failed unprotect.
    var firstFailure: SnapshotError? {
        if let failure = monitor.withLock({ failure }) { return failure }
        let e = csnap_load_int(core.pointer(to: \.failure_errno)!)
        return e != 0 ? SnapshotError.system("UFFDIO_WRITEPROTECT (clear)", e) : nil
    }

    /// Stops the capture unless it has finished; resolvers waiting for room give up.
    func cancel() {
        monitor.withLock {
            if !finished { csnap_store_int(core.pointer(to: \.cancelled)!, 1) }
            monitor.broadcast()
        }
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
            csnap_store_int(core.pointer(to: \.cancelled)!, 1)
            monitor.broadcast()
        }
    }
}
