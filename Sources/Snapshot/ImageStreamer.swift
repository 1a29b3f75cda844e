import Userfaultfd
import _CSnapshot

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The capture's image writer: walks the regions in address order a chunk at a
/// time (2 MiB by default), writes the pages nobody saved yet straight from the
/// still-protected memory, and clears protection on the whole chunk with one ioctl.
/// Between chunks it drains the staging ring into the image.
final class ImageStreamer: @unchecked Sendable {
    let job: CaptureJob
    private let scanner: PagemapScanner
    private let mine: UnsafeMutablePointer<Bool>
    private let residency: UnsafeMutablePointer<UInt8>
    /// One page read from a shared hugetlb file.
    private var bounce: UnsafeMutableRawPointer?

    init(job: CaptureJob) throws(SnapshotError) {
        self.job = job
        do { scanner = try PagemapScanner(regionCapacity: job.streamChunkPages + 1) } catch {
            throw SnapshotError.system("open /proc/self/pagemap", error.errno?.rawValue ?? EIO)
        }
        mine = .allocate(capacity: job.streamChunkPages)
        // mincore answers per base page, also for hugetlb.
        residency = .allocate(capacity: job.streamChunkPages * max(1, job.pageSize / systemPageSize))
    }

    deinit {
        mine.deallocate()
        residency.deallocate()
        bounce?.deallocate()
    }

    /// Streams everything, waits for the staged pages, finishes the file. On failure or
    /// cancel it clears every protection instead. Either way it raises the stop signal.
    func run() {
        do throws(SnapshotError) {
            for (i, r) in job.layout.enumerated() {
                var first = r.firstPage
                while first < r.firstPage + r.pages {
                    if job.isCancelled { throw job.firstFailure ?? SnapshotError(.cancelled) }
                    try drain()
                    let end = min(first + job.streamChunkPages, r.firstPage + r.pages)
                    try stream(region: i, first: first, end: end)
                    first = end
                }
            }
            try drainUntilSettled()
            try job.writer.finish()
            try job.onFinish?()
            job.monitor.withLock { job.finished = true }
        } catch {
            job.fail(error)
            job.unprotectAll()
        }
        let cpu = threadCPUNanoseconds()
        job.monitor.withLock {
            job.endNanoseconds = MonotonicClock.nanoseconds()
            job.writerCPUNanoseconds = cpu
        }
        job.stop.raise()
    }

    /// Writes the chunk's pages still pending, then clears protection on the chunk
    /// (unless tracking writes for a delta).
    private func stream(region: Int, first: Int, end: Int) throws(SnapshotError) {
        var any = false
        for p in first..<end {
            let claimed = csnap_claim(job.core, Int64(p), PageState.pending, PageState.streaming) != 0
            mine[p - first] = claimed
            any = any || claimed
        }
        var p = first
        while any && p < end {
            guard mine[p - first] else { p += 1; continue }
            var q = p + 1
            while q < end && mine[q - first] { q += 1 }
            try write(region: region, first: p, end: q)
            p = q
        }
        if !job.tracking {
            try unprotectChunk(region: region, first: first, end: end)
        }
        for p in first..<end where mine[p - first] { csnap_set_state(job.core, Int64(p), PageState.done) }
        let streamed = (first..<end).reduce(0) { $0 + (mine[$1 - first] ? 1 : 0) }
        job.monitor.withLock { job.streamedPages += streamed }
        // When tracking, clean pages stay protected; a writer held on one of them is
        // woken to fault again, and the handler then notes it written.
        if job.tracking && any { try job.wake(region: region, first: first, pages: end - first) }
    }

    /// Clears protection on the chunk, in one call unless the fault handler is still
    /// copying some of its pages (those it clears itself once copied).
    private func unprotectChunk(region: Int, first: Int, end: Int) throws(SnapshotError) {
        func saving(_ p: Int) -> Bool { csnap_state(job.core, Int64(p)) == PageState.saving }
        var p = first
        while p < end {
            if saving(p) { p += 1; continue }
            var q = p + 1
            while q < end && !saving(q) { q += 1 }
            try job.unprotect(region: region, first: p, pages: q - p)
            p = q
        }
    }

    /// Writes pages `first ..< end` (all claimed), classing each as data, zero or hole.
    /// A page with a swap-type entry is either one being migrated (compaction) or
    /// swapped, or a never-touched page carrying the write-protect marker: PAGEMAP_SCAN
    /// does not tell them apart, so such pages are read (which waits for a migration)
    /// and stored as data unless they read as zeros.
    private func write(region: Int, first: Int, end: Int) throws(SnapshotError) {
        let start = job.address(of: first, in: region)
        let ps = job.pageSize
        let count = end - first
        switch job.layout[region].kind {
        case .shmem: return try writeShared(first: first, count: count, from: start)
        case .hugetlb: return try writeHugetlb(region: region, first: first, count: count, from: start)
        case .anonymous: break
        }
        var cursor = first
        var scanFrom = start
        let scanEnd = start + UInt64(count * ps)
        while scanFrom < scanEnd {
            let result: PagemapScanner.Result
            do {
                result = try scanner.scan(MemoryRange(start: scanFrom, end: scanEnd), anyOf: [.present, .swapped],
                                           returning: [.present, .swapped, .pfnZero])
            } catch {
                throw SnapshotError.system("PAGEMAP_SCAN", error.errno?.rawValue ?? EIO)
            }
            for present in result.regions {
                let a = first + Int((present.range.start - start) / UInt64(ps))
                let b = a + Int(present.range.length) / ps
                if a > cursor { job.writer.mark(first: cursor, count: a - cursor, .hole) }
                if present.categories.contains(.pfnZero) {
                    job.writer.mark(first: a, count: b - a, .zero)
                } else if !present.categories.contains(.present) {
                    try writeNonZero(a, b - a, from: start + UInt64((a - first) * ps))
                } else {
                    try record(a, b - a, from: start + UInt64((a - first) * ps))
                }
                cursor = b
            }
            // The walk may stop early (its output full): go on from where it stopped.
            guard result.walkEnd > scanFrom, result.walkEnd < scanEnd else { break }
            let stoppedAt = first + Int((result.walkEnd - start) / UInt64(ps))
            if stoppedAt > cursor { job.writer.mark(first: cursor, count: stoppedAt - cursor, .hole) }
            cursor = max(cursor, stoppedAt)
            scanFrom = result.walkEnd
        }
        if cursor < end { job.writer.mark(first: cursor, count: end - cursor, .hole) }
    }

    /// Writes shared pages: the page cache, not the page table, says what a shared
    /// page holds (mincore: resident or a hole).
    private func writeShared(first: Int, count: Int, from start: UInt64) throws(SnapshotError) {
        let ps = job.pageSize
        if mincore(UnsafeMutableRawPointer(bitPattern: UInt(start)), count * ps, residency) != 0 {
            throw SnapshotError.system("mincore")
        }
        var p = 0
        while p < count {
            var q = p + 1
            let resident = residency[p] & 1 != 0
            while q < count && (residency[q] & 1 != 0) == resident { q += 1 }
            if resident { try record(first + p, q - p, from: start + UInt64(p * ps)) } else { job.writer.mark(first: first + p, count: q - p, .hole) }
            p = q
        }
    }

    /// Writes hugetlb pages. PAGEMAP_SCAN shows a never-touched protected huge
    /// page as swapped, like a page in migration, and reading it would allocate a huge
    /// page; mincore tells them apart (the write-protect marker reads as not resident,
    /// a migration entry as resident), so resident pages are read (zeros stored as
    /// zero) and the others are holes (private memory).
    ///
    /// Shared hugetlb memory: a page not mapped here may still be in the file, so it is
    /// read through the file, which reads a hole as zeros without allocating.
    private func writeHugetlb(region: Int, first: Int, count: Int, from start: UInt64) throws(SnapshotError) {
        let ps = job.pageSize
        let perPage = ps / systemPageSize
        if mincore(UnsafeMutableRawPointer(bitPattern: UInt(start)), count * ps, residency) != 0 {
            throw SnapshotError.system("mincore")
        }
        let file = job.layout[region].file
        var p = 0
        while p < count {
            var q = p + 1
            let resident = residency[p * perPage] & 1 != 0
            while q < count && (residency[q * perPage] & 1 != 0) == resident { q += 1 }
            if resident {
                try writeNonZero(first + p, q - p, from: start + UInt64(p * ps))
            } else if file >= 0 {
                for i in p..<q { try writeFromFile(region: region, page: first + i) }
            } else {
                job.writer.mark(first: first + p, count: q - p, .hole)
            }
            p = q
        }
    }

    /// Reads shared hugetlb page `page` from its file; stores it unless it is zeros.
    private func writeFromFile(region: Int, page: Int) throws(SnapshotError) {
        let r = job.layout[region]
        let ps = job.pageSize
        if bounce == nil { bounce = .allocate(byteCount: ps, alignment: 4096) }
        let buffer = bounce!
        let offset = r.fileOffset + UInt64((page - r.firstPage) * ps)
        var done = 0
        while done < ps {
            let n = retryOnInterrupt { pread(r.file, buffer + done, ps - done, off_t(offset) + off_t(done)) }
            if n < 0 { throw SnapshotError.system("read shared hugetlb file", errno) }
            if n == 0 { memset(buffer + done, 0, ps - done); break }
            done += n
        }
        if csnap_is_zero(buffer, ps) != 0 {
            job.writer.mark(first: page, count: 1, .zero)
        } else {
            try job.writer.appendRecord(first: page, count: 1, bytes: buffer)
        }
    }

    /// Writes the pages that are not all zeros; marks the others zero.
    private func writeNonZero(_ first: Int, _ count: Int, from address: UInt64) throws(SnapshotError) {
        let ps = job.pageSize
        var p = 0
        while p < count {
            let base = UnsafeRawPointer(bitPattern: UInt(address) + UInt(p * ps))!
            if csnap_is_zero(base, ps) != 0 { job.writer.mark(first: first + p, count: 1, .zero); p += 1; continue }
            var q = p + 1
            while q < count && csnap_is_zero(UnsafeRawPointer(bitPattern: UInt(address) + UInt(q * ps))!, ps) == 0 { q += 1 }
            try record(first + p, q - p, from: address + UInt64(p * ps))
            p = q
        }
    }

    private func record(_ first: Int, _ count: Int, from address: UInt64) throws(SnapshotError) {
        try job.writer.appendRecord(first: first, count: count, bytes: UnsafeRawPointer(bitPattern: UInt(address))!)
    }

    /// Writes the staged pages whose copy is finished, in ring order, to the image and
    /// frees their slots.
    private func drain() throws(SnapshotError) {
        let from = job.counter(\.consumed)
        var to = from
        while to - from < job.capacity && csnap_slot_page(job.core, Int64(to)) >= 0 { to += 1 }
        // In batches of about 2 MiB, each handed back once written, so a writer waiting
        // for room waits for one batch, not for the whole ring.
        let batch = max(1, (2 << 20) / job.pageSize)
        var start = from
        while start < to {
            let end = min(start + batch, to)
            try drain(start, end)
            start = end
        }
    }

    /// Writes ring positions `from ..< to` (all ready) and frees them.
    private func drain(_ from: Int, _ to: Int) throws(SnapshotError) {
        var i = from
        let ps = job.pageSize
        while i < to {
            let slot = i % job.capacity
            let page = Int(job.slotPages[slot])
            let base = job.slots + slot * ps
            if csnap_is_zero(base, ps) != 0 {
                job.writer.mark(first: page, count: 1, .zero)
                i += 1
                continue
            }
            var n = 1
            while i + n < to, slot + n < job.capacity, Int(job.slotPages[slot + n]) == page + n,
                  csnap_is_zero(base + n * ps, ps) == 0 { n += 1 }
            try job.writer.queueRecord(first: page, count: n, bytes: base)
            i += n
        }
        // The slots are handed back only once their bytes are in the file.
        try job.writer.flush()
        if to > from { csnap_release_slots(job.core, Int64(to)) }
    }

    /// After the walk, waits until every page a resolver claimed is staged and written.
    /// Every page is claimed by now, so once no resolver is between its claim and its
    /// last copy and every reserved slot is consumed, the image is complete.
    private func drainUntilSettled() throws(SnapshotError) {
        while true {
            try drain()
            if job.isCancelled { throw job.firstFailure ?? SnapshotError(.cancelled) }
            // Resolvers first: one that leaves after this read has reserved what it copied.
            if job.counter(\.resolvers) == 0 && job.counter(\.consumed) == job.counter(\.reserved) { return }
            if csnap_slot_page(job.core, Int64(job.counter(\.consumed))) < 0 { usleep(200) }
        }
    }
}
