import Synchronization
import Userfaultfd
import _CSnapshot

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Takes consistent snapshots of regions of the calling process while its threads
/// keep running, with userfaultfd write protection.
///
/// The regions are registered for write protection once, when the snapshotter is
/// made, and stay registered for every capture. A capture protects every page
/// (with WP_UNPOPULATED, pages never touched too) and returns: that is the
/// snapshot's instant. A writer thread then streams the pages in address order
/// into the image, clearing protection a chunk at a time, while a fault handler
/// saves any page a thread writes first (copy before write) into a bounded
/// staging area.
///
/// ```swift
/// let snapshotter = try Snapshotter(regions: [heap.range])
/// let capture = try snapshotter.capture(to: "heap.snap")
/// let result = try capture.wait()
/// ```
public final class Snapshotter: @unchecked Sendable {
    /// How captures run.
    public struct Options: Sendable {
        /// The most bytes of pages saved before a write that may wait to be written
        /// (rounded down to whole pages); a writer faulting when it is full waits.
        public var stagingBytes = 64 << 20
        /// The bytes the image writer streams, and unprotects with one call, at a time.
        public var streamChunkBytes = 2 << 20
        /// The pages saved around a faulting page (aligned to the region), at most 512
        /// and the staging capacity; 512 base pages are one transparent huge page.
        /// The faulting page is copied and unprotected first. A handler thread lets its
        /// writer go then and copies the rest; a writing thread saving it copies the
        /// rest before its write goes on. Writers that touch pages at random hit a
        /// protected page once per chunk, so a larger chunk means fewer held writes:
        /// measured on a 2 GiB heap under random updates, 512 pages held under 1 % of
        /// them (write p99 under 1 µs) where 64 pages held several percent (p99 of
        /// 100 µs and more), and the capture ended sooner. Fewer writes wait, each for
        /// longer. Hugetlb memory saves the faulting huge page alone.
        public var faultChunkPages = 512
        /// Track writes after each capture (WP_ASYNC + PAGEMAP_SCAN) so the next capture
        /// is a delta holding only the pages written since. Captures then need a quiesce
        /// hook: it is also called once more at the end of each capture, to hand the
        /// regions over to tracking without missing a write. A delta whose pages fit
        /// the staging area is copied there while the writers are held.
        public var incremental = false
        /// SCHED_FIFO priority of the fault handler (0: time-shared). A held writer
        /// waits for the handler; on a busy host a time-shared handler first waits
        /// for a time slice. Without CAP_SYS_NICE it stays time-shared.
        public var handlerPriority: Int32 = 1
        /// Which thread saves a page before its first write.
        public var savingThread = SavingThread.handlerThread

        public init() {}
    }

    /// Which thread saves a page a writer touches before the image writer reached it.
    public enum SavingThread: String, Sendable, Codable, CaseIterable {
        /// A fault handler thread; the writer is held in the kernel meanwhile. Writes by
        /// the kernel into the regions (`read(2)` into a buffer there) are held the
        /// same way, so any memory can be captured.
        case handlerThread = "handler-thread"
        /// The writing thread itself, in a SIGBUS handler (FEATURE_SIGBUS): no wake-up
        /// of another CPU per fault, so a write waits for one page's copy only. The
        /// kernel cannot raise a signal for its own writes: a system call writing into
        /// a protected page fails with EFAULT instead. Use it for memory that only
        /// user-space code writes, such as a heap, while a capture runs.
        case writingThread = "writing-thread"
    }

    /// A hook around the arm: `pause` stops the caller's writers, `resume` lets them go.
    public struct Quiesce: Sendable {
        public var pause: @Sendable () -> Void
        public var resume: @Sendable () -> Void

        public init(pause: @escaping @Sendable () -> Void, resume: @escaping @Sendable () -> Void) {
            self.pause = pause
            self.resume = resume
        }
    }

    /// The regions, in the order their pages are numbered.
    public let regions: [SnapshotFormat.Region]
    /// The options captures run with.
    public let options: Options
    /// The regions' page size, the page size of every file captured: the base page,
    /// or the huge page size for hugetlb regions.
    public let pageSize: Int
    let layout: [RegionLayout]
    let uffd: Userfaultfd
    /// The WP_ASYNC userfaultfd that tracks writes between captures (incremental only).
    let asyncHandle: Userfaultfd.Handle?
    let tracking = Mutex(TrackingState())
    private let busy = Atomic<Bool>(false)
    /// The SIGBUS handler's slot for these regions when the writing threads save pages (else -1).
    private let signalSlot: Int32

    /// Registers `regions` (anonymous, shmem/memfd or hugetlb memory of this process)
    /// for write protection.
    ///
    /// Hugetlb regions are captured a huge page at a time: protection, copy before
    /// write, holes and the index are per huge page, and the file's page size is the
    /// huge page size. Pages of shared hugetlb memory (a hugetlbfs file or
    /// MFD_HUGETLB memfd) that are in the file but not mapped here are read through
    /// the file (`/proc/self/map_files`, which needs CAP_SYS_ADMIN).
    ///
    /// - Throws: ``SnapshotError`` if a region is unaligned, overlaps another, is a
    ///   private file mapping or shared hugetlb memory whose file does not open, mixes hugetlb with other
    ///   memory (one page size per file), or the kernel lacks WP_UNPOPULATED
    ///   (anonymous) or WP_HUGETLBFS_SHMEM (shmem, hugetlb).
    public init(regions ranges: [MemoryRange], options: Options = Options()) throws(SnapshotError) {
        let (regions, layout, ps) = try Self.checkedLayout(of: ranges)
        let opened = layout.compactMap { $0.file >= 0 ? $0.file : nil }
        func closeFiles() { for fd in opened { close(fd) } }
        guard !regions.isEmpty else { throw SnapshotError(.invalidArgument("no region given")) }
        var features: Userfaultfd.Features = [.wpUnpopulated]
        if regions.contains(where: { $0.kind != .anonymous }) { features.insert(.wpHugetlbfsShmem) }
        if options.savingThread == .writingThread { features.insert(.sigbus) }
        do {
            uffd = try Userfaultfd(.init().requiring(features))
        } catch {
            closeFiles()
            throw SnapshotError(.unsupported("a userfaultfd with \(features): \(error)"))
        }
        for r in regions {
            do {
                try uffd.handle.register(MemoryRange(start: r.start, length: r.length), mode: .writeProtect, requiring: [.writeProtect])
            } catch {
                closeFiles()
                throw SnapshotError(.unsupported("registering 0x\(String(r.start, radix: 16)) for write protection: \(error)"))
            }
        }
        if options.incremental {
            do {
                asyncHandle = Userfaultfd.Handle(
                    fileDescriptor: try Userfaultfd(.init().requiring(features.union([.wpAsync]))).release(),
                    features: features.union([.wpAsync]))
            } catch {
                closeFiles()
                throw SnapshotError(.unsupported("incremental snapshots need a userfaultfd with WP_ASYNC: \(error)"))
            }
        } else {
            asyncHandle = nil
        }
        if options.savingThread == .writingThread {
            let table = layout.map { $0.resolverRegion(pageSize: ps) }
            signalSlot = csnap_sigbus_attach(uffd.handle.fileDescriptor.rawValue, UInt64(ps), table, Int64(table.count))
            if signalSlot < 0 {
                closeFiles()
                try? asyncHandle?.fileDescriptor.close()
                throw SnapshotError(.unsupported("saving in the writing threads serves at most 16 snapshotters of at most 64 regions each"))
            }
        } else {
            signalSlot = -1
        }
        self.regions = regions
        self.layout = layout
        self.options = options
        self.pageSize = ps
    }

    /// Checks `ranges` and lays them out in one page numbering; opens the file behind
    /// shared hugetlb regions (closed again if any range is refused).
    private static func checkedLayout(of ranges: [MemoryRange]) throws(SnapshotError)
        -> (regions: [SnapshotFormat.Region], layout: [RegionLayout], pageSize: Int)
    {
        var regions: [SnapshotFormat.Region] = []
        var layout: [RegionLayout] = []
        var first = 0
        var ps = 0
        do throws(SnapshotError) {
            for range in ranges {
                guard range.length > 0, range.isAligned(to: UInt64(systemPageSize)) else {
                    throw SnapshotError(.invalidArgument("region \(range) is empty or not page-aligned"))
                }
                if let other = regions.first(where: { MemoryRange(start: $0.start, length: $0.length).overlaps(range) }) {
                    throw SnapshotError(.invalidArgument("region \(range) overlaps 0x\(String(other.start, radix: 16))"))
                }
                let (kind, regionPageSize, sharedFile) = try MemoryProbe.kind(of: range)
                // A file has one page size: hugetlb regions are captured apart from the others.
                if ps != 0 && regionPageSize != ps {
                    throw SnapshotError(.unsupported("region \(range) has \(regionPageSize / 1024) KiB pages and another "
                        + "\(ps / 1024) KiB pages: a snapshot file has one page size, so snapshot hugetlb regions with their own Snapshotter"))
                }
                ps = regionPageSize
                guard range.isAligned(to: UInt64(ps)) else {
                    throw SnapshotError(.invalidArgument("region \(range) is not aligned to its \(ps / 1024) KiB pages"))
                }
                var region = RegionLayout(start: range.start, pages: Int(range.length) / ps, firstPage: first, kind: kind)
                if let sharedFile {
                    let fd = open(sharedFile.path, O_RDONLY | O_CLOEXEC)
                    if fd < 0 {
                        let e = errno
                        throw SnapshotError(.unsupported("shared hugetlb memory at \(range) is read through its file, "
                            + "and \(sharedFile.path) does not open (\(String(cString: strerror(e))); it needs CAP_SYS_ADMIN)"))
                    }
                    region.file = fd
                    region.fileOffset = sharedFile.offset
                }
                regions.append(.init(start: range.start, length: range.length, kind: kind))
                layout.append(region)
                first += Int(range.length) / ps
            }
        } catch {
            for l in layout where l.file >= 0 { close(l.file) }
            throw error
        }
        return (regions, layout, ps)
    }

    deinit {
        if signalSlot >= 0 { csnap_sigbus_detach(signalSlot) }
        for r in regions {
            let range = MemoryRange(start: r.start, length: r.length)
            try? uffd.handle.unregister(range)
            try? asyncHandle?.unregister(range)
        }
        try? asyncHandle?.fileDescriptor.close()
        for l in layout where l.file >= 0 { close(l.file) }
    }

    /// The number of pages across the regions.
    public var pageCount: Int { layout.reduce(0) { $0 + $1.pages } }

    /// Starts a capture into the file at `path` (created or truncated).
    ///
    /// Returns once every page is protected: the image is the memory at that instant.
    /// - Parameters:
    ///   - path: the image file.
    ///   - quiesce: called around the arm, so the instant falls between operations.
    /// - Throws: ``SnapshotError`` if a capture is running, or the file or arm fails.
    public func capture(to path: String, quiesce: Quiesce? = nil) throws(SnapshotError) -> Capture {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        if fd < 0 { throw SnapshotError.system("open", path: path) }
        do {
            return try capture(fd: fd, path: path, ownsDescriptor: true, quiesce: quiesce)
        } catch {
            close(fd)
            throw error
        }
    }

    func capture(fd: Int32, path: String?, ownsDescriptor: Bool, quiesce: Quiesce?) throws(SnapshotError) -> Capture {
        if options.incremental && quiesce == nil {
            throw SnapshotError(.invalidArgument("incremental captures need a quiesce hook (writes are handed over to tracking under it)"))
        }
        guard busy.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged else {
            throw SnapshotError(.invalidArgument("a capture is already running on this snapshotter"))
        }
        do {
            let parent = tracking.withLock { $0.active ? $0.parentID : nil }
            let writer = try SnapshotFileWriter(fd: fd, path: path, regions: regions, pageSize: pageSize,
                                                id: Self.newID(), parentID: parent, initialKind: parent == nil ? .hole : .unchanged)
            let job = try CaptureJob(layout: layout, pageSize: pageSize, handle: uffd.handle, writer: writer, options: options)
            if options.incremental, let quiesce {
                job.onFinish = { [unowned self, unowned job] () throws(SnapshotError) in try self.handOver(job, quiesce: quiesce) }
            }
            return try Capture(snapshotter: self, job: job, fd: ownsDescriptor ? fd : -1, quiesce: quiesce)
        } catch {
            captureEnded(finished: false)
            throw error
        }
    }

    /// Lets the writing threads' SIGBUS handler resolve faults for `job` (from before its arm).
    func attach(_ job: CaptureJob) {
        if signalSlot >= 0 { csnap_sigbus_set_capture(signalSlot, job.core) }
    }

    func captureEnded(finished: Bool) {
        // Every page is unprotected (or on the tracking userfaultfd) and the capture's
        // threads are joined: no writing thread may still use its state after this.
        if signalSlot >= 0 { csnap_sigbus_set_capture(signalSlot, nil) }
        // A capture that did not finish leaves no parent to build a delta on.
        // Regions left on the tracking userfaultfd go back to the copy-before-write one.
        if !finished {
            if tracking.withLock({ $0.active }) { try? moveToCopyBeforeWrite() }
            tracking.withLock { $0 = TrackingState() }
        }
        busy.store(false, ordering: .releasing)
    }

    static func newID() -> [UInt8] {
        var g = SystemRandomNumberGenerator()
        return (0..<16).map { _ in UInt8.random(in: 0...255, using: &g) }
    }
}
