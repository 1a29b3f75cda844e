import Dispatch
import Synchronization
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Between incremental captures: which snapshot the next delta builds on, and the
/// pages written during the last capture (after its instant).
struct TrackingState: Sendable {
    /// Whether the regions are registered on the WP_ASYNC userfaultfd, tracking writes.
    var active = false
    /// The last finished capture's identifier.
    var parentID: [UInt8]?
    /// One byte per page: written after the last instant, while that capture ran.
    var carried: [UInt8] = []
}

extension Snapshotter {
    /// Protects every page: the snapshot's instant. For a delta, first reads which
    /// pages were written since the last instant (PAGEMAP_SCAN on the tracking
    /// userfaultfd, plus those noted during the last capture), leaves the others out of
    /// the capture, and moves the regions back to the copy-before-write userfaultfd.
    /// Called with the caller's writers paused.
    func arm(_ job: CaptureJob) throws(SnapshotError) {
        let state = tracking.withLock { $0 }
        if job.writer.isDelta, state.active {
            // The scan protects again what it reports written: from here on the
            // tracking userfaultfd sees every later write.
            let written = try scanWritten(reprotect: true)
            var dirty = 0
            for p in 0..<job.pageCount {
                if written[p] == 0 && state.carried[p] == 0 { job.state[p] = PageState.done } else { dirty += 1 }
            }
            if dirty <= job.capacity {
                copyWritten(job)
                return
            }
            try moveToCopyBeforeWrite()
        }
        try protectAll()
    }

    /// Write-protects every region. The regions are cut into 16 pieces; when the first
    /// one shows that the rest would take over 2 ms (base pages: a page-table entry
    /// each), the rest is protected by two threads at once, as the writers are held
    /// and their CPUs idle. Huge pages take microseconds and stay on this thread.
    func protectAll() throws(SnapshotError) {
        let pieces = Self.pieces(of: regions.map { MemoryRange(start: $0.start, length: $0.length) }, count: 16, alignment: UInt64(pageSize))
        let handle = uffd.handle
        let failure = Mutex<Int32?>(nil)
        let protect: @Sendable (MemoryRange) -> Void = { range in
            do throws(UserfaultfdError) {
                try handle.writeProtect(range, mode: .writeProtect)
            } catch {
                failure.withLock { if $0 == nil { $0 = error.errno?.rawValue ?? EIO } }
            }
        }
        let start = MonotonicClock.nanoseconds()
        protect(pieces[0])
        let first = MonotonicClock.nanoseconds() - start
        let rest = Array(pieces.dropFirst())
        if first * UInt64(rest.count) > 2_000_000 && sysconf(Int32(_SC_NPROCESSORS_ONLN)) > 1 {
            DispatchQueue.concurrentPerform(iterations: 2) { worker in
                for i in stride(from: worker, to: rest.count, by: 2) { protect(rest[i]) }
            }
        } else {
            for piece in rest { protect(piece) }
        }
        if let e = failure.withLock({ $0 }) { throw SnapshotError.system("UFFDIO_WRITEPROTECT (set)", e) }
    }

    /// `ranges` cut into about `count` pieces of equal length (multiples of `alignment`).
    static func pieces(of ranges: [MemoryRange], count: Int, alignment: UInt64) -> [MemoryRange] {
        let total = ranges.reduce(UInt64(0)) { $0 + $1.length }
        let size = max(alignment, (total / UInt64(count) + alignment - 1) / alignment * alignment)
        var out: [MemoryRange] = []
        for r in ranges {
            var start = r.start
            while start < r.start + r.length {
                let length = min(size, r.start + r.length - start)
                out.append(MemoryRange(start: start, length: length))
                start += length
            }
        }
        return out
    }

    /// A delta whose pages fit the staging area: copies them there while the writers
    /// are held, so the regions stay on the tracking userfaultfd (no registration
    /// changes, no protection pass over the whole regions) and the image writer only
    /// drains the staging area.
    func copyWritten(_ job: CaptureJob) {
        var n = 0
        for r in layout {
            for p in r.firstPage..<(r.firstPage + r.pages) where job.state[p] == PageState.pending {
                let source = UnsafeRawPointer(bitPattern: UInt(r.start) + UInt((p - r.firstPage) * pageSize))!
                memcpy(job.slots + n * pageSize, source, pageSize)
                job.slotPages[n] = Int64(p)
                job.state[p] = PageState.saved
                n += 1
            }
        }
        // The writers are held and nothing is protected on the copy-before-write
        // userfaultfd: no resolver runs.
        job.setCounter(\.reserved, n)
        job.setCounter(\.saved_pages, n)
        job.setCounter(\.peak_staged, n)
        job.monitor.withLock { job.stayedOnTracking = true }
    }

    /// Moves the regions from the tracking userfaultfd back to the copy-before-write one.
    func moveToCopyBeforeWrite() throws(SnapshotError) {
        guard let asyncHandle else { return }
        for r in regions {
            let range = MemoryRange(start: r.start, length: r.length)
            do {
                try asyncHandle.unregister(range)
                try uffd.handle.register(range, mode: .writeProtect, requiring: [.writeProtect])
            } catch {
                throw SnapshotError.system("moving 0x\(String(r.start, radix: 16)) back from tracking", error.errno?.rawValue ?? 5)
            }
        }
        tracking.withLock { $0.active = false }
    }

    /// One byte per page: written since the tracking userfaultfd last protected it.
    /// With `reprotect`, the same walk protects those pages again.
    func scanWritten(reprotect: Bool = false) throws(SnapshotError) -> [UInt8] {
        var written = [UInt8](repeating: 0, count: pageCount)
        let scanner: PagemapScanner
        do { scanner = try PagemapScanner() } catch { throw SnapshotError.system("open /proc/self/pagemap", error.errno?.rawValue ?? 5) }
        for r in layout {
            let end = r.start + UInt64(r.pages * pageSize)
            var start = r.start
            while start < end {
                let result: PagemapScanner.Result
                do {
                    result = try scanner.scan(MemoryRange(start: start, end: end), flags: reprotect ? [.writeProtectMatching, .checkWPAsync] : [],
                                              required: .written, returning: .written)
                } catch {
                    throw SnapshotError.system("PAGEMAP_SCAN (written)", error.errno?.rawValue ?? 5)
                }
                for region in result.regions {
                    let a = r.firstPage + Int((region.range.start - r.start) / UInt64(pageSize))
                    for p in a..<(a + Int(region.range.length) / pageSize) { written[p] = 1 }
                }
                if result.walkEnd >= end || result.walkEnd <= start { break }
                start = result.walkEnd
            }
        }
        return written
    }

    /// After a capture's last byte: moves the regions to the WP_ASYNC userfaultfd and
    /// protects them there, with the writers paused so no write goes unseen. Pages
    /// written during the capture are carried into the next delta.
    func handOver(_ job: CaptureJob, quiesce: Quiesce) throws(SnapshotError) {
        guard let asyncHandle else { return }
        if job.monitor.withLock({ job.stayedOnTracking }) {
            tracking.withLock { $0 = TrackingState(active: true, parentID: job.writer.id, carried: [UInt8](repeating: 0, count: pageCount)) }
            return
        }
        quiesce.pause()
        defer { quiesce.resume() }
        for r in regions {
            let range = MemoryRange(start: r.start, length: r.length)
            do {
                try uffd.handle.unregister(range)
                try asyncHandle.register(range, mode: .writeProtect, requiring: [.writeProtect])
                try asyncHandle.writeProtect(range, mode: .writeProtect)
            } catch {
                for r in regions {
                    let range = MemoryRange(start: r.start, length: r.length)
                    try? asyncHandle.unregister(range)
                    _ = try? uffd.handle.register(range, mode: .writeProtect)
                }
                throw SnapshotError.system("handing 0x\(String(r.start, radix: 16)) over to write tracking", error.errno?.rawValue ?? 5)
            }
        }
        let carried = Array(UnsafeBufferPointer(start: job.nextDirty, count: job.pageCount))
        tracking.withLock { $0 = TrackingState(active: true, parentID: job.writer.id, carried: carried) }
    }
}
