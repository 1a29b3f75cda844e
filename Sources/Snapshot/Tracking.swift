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
        for r in regions {
            do {
                try uffd.handle.writeProtect(MemoryRange(start: r.start, length: r.length), mode: .writeProtect)
            } catch {
                throw SnapshotError.system("UFFDIO_WRITEPROTECT (set)", error.errno?.rawValue ?? 5)
            }
        }
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
