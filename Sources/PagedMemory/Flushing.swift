import SystemPackage
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

extension Pager {
    /// The most pages one flush round takes out of circulation.
    static let flushBatch = 256

    /// Writes every dirty page of `t` back, then `fsync`s its store.
    ///
    /// A page being written is write-protected and marked cleaning: a write to it
    /// waits, marks it dirty again, and is let through when its write-back is done.
    func flush(_ t: PageTable) throws(PagedMappingError) {
        var firstError: PagedMappingError?
        var next = 0
        var taken: [TakenPage] = []
        taken.reserveCapacity(Self.flushBatch)
        while next < t.pageCount {
            taken.removeAll(keepingCapacity: true)
            next = takeDirty(t, from: next, into: &taken)
            for v in taken {
                let errno = writeBack(v)
                lock.withLock {
                    if let errno {
                        let error = PagedMappingError(kind: .writeFailed(errno: errno.rawValue), offset: v.page * t.pageSize)
                        t.record(error)
                        stats.errors += 1
                        if firstError == nil { firstError = error }
                        t.setDirty(v.page, true)
                    } else {
                        stats.pagesWrittenBack += 1
                    }
                    t.setState(v.page, .resident)
                    t.busyPages -= 1
                    if t.isDirty(v.page) {
                        // Written meanwhile (or not saved): let the writer through.
                        _ = try? t.handle.writeProtect(t.range(v.page), mode: [])
                    }
                    lock.broadcast()
                }
                try? t.handle.wake(t.range(v.page))
            }
        }
        if let firstError { throw firstError }
        do {
            try t.store.synchronize()
        } catch {
            throw PagedMappingError(kind: .writeFailed(errno: error.rawValue), offset: 0)
        }
    }

    /// Takes the dirty resident pages of `t` from page `start` on, up to a batch, and
    /// write-protects them (lock taken here). - Returns: the page to continue from.
    private func takeDirty(_ t: PageTable, from start: Int, into taken: inout [TakenPage]) -> Int {
        lock.withLock {
            var p = start
            while p < t.pageCount && taken.count < Self.flushBatch {
                // A page written while it was being filled: wait until it is in.
                while t.state(p) == .filling && t.isDirty(p) { lock.wait(milliseconds: 1) }
                // A page the evictor is writing back: wait until it is written (then the
                // fsync below covers it) or its write failed (then it is dirty again and
                // this flush reports it).
                while t.state(p) == .evicting { lock.wait(milliseconds: 1) }
                if t.state(p) == .resident && t.isDirty(p),
                   (try? t.handle.writeProtect(t.range(p), mode: .writeProtect)) != nil {
                    t.setDirty(p, false)
                    t.setState(p, .cleaning)
                    t.busyPages += 1
                    taken.append(TakenPage(table: t, page: p, dirty: true))
                }
                p += 1
            }
            return p
        }
    }

    /// Fills the absent pages from `firstPage` through `lastPage` of `t`, several per
    /// read, while the buffer has room below its high-water mark.
    /// - Returns: the pages filled.
    func prefetch(_ t: PageTable, firstPage: Int, lastPage: Int) -> Int {
        let staging = StagingBuffer(capacity: max(configuration.maxReadAheadBytes, t.pageSize))
        var filled = 0
        var p = firstPage
        while p <= lastPage {
            let room = lock.withLock { highWaterBytes - residentBytes }
            if room < t.pageSize { break }
            let limit = min(lastPage - p + 1, room / t.pageSize)
            let n = fill(t, page: p, limit: limit, sequential: false, write: false, staging)
            filled += n
            p += max(n, 1)
        }
        return filled
    }
}
