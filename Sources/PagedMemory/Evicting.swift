import SystemPackage
import Userfaultfd
import _CPagedMemory

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A page an evictor or a flush took out of circulation.
struct TakenPage {
    let table: PageTable
    let page: Int
    let dirty: Bool
}

extension Pager {
    /// The most pages one eviction round takes.
    static let evictionBatch = 32

    /// The evictor threads' loop: above the high-water mark, evict down to the low one.
    func evictLoop() {
        var victims: [TakenPage] = []
        victims.reserveCapacity(Self.evictionBatch)
        var unmapped: [TakenPage] = []
        unmapped.reserveCapacity(16 * Self.evictionBatch)
        lock.lock()
        while !isStopping {
            queueResolvedPages()
            if residentBytes <= highWaterBytes {
                lock.wait(milliseconds: 50)
                continue
            }
            while residentBytes > lowWaterBytes && !isStopping && queue.count + softQueue.count > 0 {
                victims.removeAll(keepingCapacity: true)
                unmapped.removeAll(keepingCapacity: true)
                takeVictims(&victims, softened: &unmapped)
                lock.unlock()
                // Let fillers in between rounds: a round that only spent credits holds the lock briefly.
                for v in unmapped {
                    _ = madvise(UnsafeMutableRawPointer(bitPattern: UInt(v.table.address(v.page))), v.table.pageSize, MADV_DONTNEED)
                }
                if !victims.isEmpty { evict(victims) }
                lock.lock()
            }
            if residentBytes > highWaterBytes { lock.wait(milliseconds: 5) }
        }
        lock.unlock()
    }

    /// Takes up to a batch of victims from the queue (lock held): pages with credit
    /// go round again with one credit less; dirty victims are write-protected now so
    /// that no write lands after their contents are saved. A victim of a
    /// soft-evicting table goes into `softened` instead (to be unmapped) and joins the
    /// soft queue, while that holds under ``softTargetPages``; victims are then taken
    /// from the soft queue, oldest first, skipping pages touched since (they have
    /// rejoined the main queue).
    private func takeVictims(_ victims: inout [TakenPage], softened: inout [TakenPage]) {
        queueResolvedPages()
        var looked = 0
        let bound = 16 * Self.evictionBatch
        while victims.count < Self.evictionBatch && looked < bound {
            looked += 1
            let fromSoft = softQueue.count > 0 && (softPages >= softTargetPages || queue.count == 0)
            guard let e = fromSoft ? softQueue.pop() : queue.pop() else { break }
            guard let (t, page) = table(for: e) else { continue }
            switch t.state(page) {
            case .resident:
                break
            case .cleaning, .filling:
                requeue(e, soft: fromSoft)
                continue
            default:
                continue
            }
            // A soft page's entry is in the soft queue; a touched one's is back in the main queue.
            if t.softEvicts && t.isSoft(page) != fromSoft { continue }
            if t.closing { requeue(e, soft: fromSoft); continue }
            let credit = t.credit(page)
            if credit > 0 && configuration.policy == .clock && !t.isSoft(page) {
                t.setCredit(page, credit - 1)
                requeue(e)
                continue
            }
            if t.softEvicts && !t.isSoft(page) {
                setSoft(t, page, true)
                stats.pagesSoftEvicted += 1
                softened.append(TakenPage(table: t, page: page, dirty: false))
                _ = softQueue.push(e) { [unowned self] e in
                    guard let (t, p) = self.table(for: e) else { return false }
                    return t.state(p) == .resident && t.isSoft(p)
                }
                continue
            }
            let dirty = t.isDirty(page)
            if dirty {
                if (try? t.handle.writeProtect(t.range(page), mode: .writeProtect)) == nil {
                    requeue(e, soft: t.isSoft(page))
                    continue
                }
            }
            t.setState(page, .evicting)
            t.busyPages += 1
            victims.append(TakenPage(table: t, page: page, dirty: dirty))
        }
    }

    /// Marks `page` of `t` soft-evicted or not, keeping the count (lock held).
    func setSoft(_ t: PageTable, _ page: Int, _ soft: Bool) {
        if t.isSoft(page) == soft { return }
        t.setSoft(page, soft)
        t.c.pointee.soft_pages += soft ? 1 : -1
        lock.shared.pointee.soft_pages += soft ? 1 : -1
    }

    private func requeue(_ e: UInt64, soft: Bool = false) {
        if soft { _ = softQueue.push(e) { _ in true } } else { _ = queue.push(e) { _ in true } }
    }

    /// Writes back the dirty victims, drops all of them, wakes anyone who faulted on them.
    private func evict(_ victims: [TakenPage]) {
        var written = 0
        var failed = 0
        for v in victims {
            if v.dirty {
                if let errno = writeBack(v) {
                    failed += 1
                    lock.withLock {
                        v.table.record(PagedMappingError(kind: .writeFailed(errno: errno.rawValue), offset: v.page * v.table.pageSize))
                        stats.errors += 1
                        v.table.setState(v.page, .resident)
                        setSoft(v.table, v.page, false)
                        v.table.setCredit(v.page, PageTable.maxCredit)
                        v.table.busyPages -= 1
                        enqueue(v.table, v.page)
                    }
                    try? v.table.handle.wake(v.table.range(v.page))
                    continue
                }
                written += 1
            }
            drop(v.table, v.page)
        }
        lock.withLock {
            for v in victims where v.table.state(v.page) == .evicting {
                let t = v.table
                if v.dirty && t.isPrivate { t.setInScratch(v.page) }
                t.setDirty(v.page, false)
                setSoft(t, v.page, false)
                t.setState(v.page, .absent)
                t.busyPages -= 1
                t.residentPages -= 1
                residentBytes -= t.pageSize
            }
            stats.pagesEvicted += victims.count - failed
            stats.pagesWrittenBack += written
            lock.broadcast()
        }
        // Threads that faulted on a victim wait in the kernel (filler-served tables) or
        // on the lock's condition, woken above (in-thread tables): only the former need a wake.
        for v in victims where !v.table.inThread { try? v.table.handle.wake(v.table.range(v.page)) }
    }

    /// Frees a victim's memory: `MADV_DONTNEED` on anonymous memory; a memfd's page is
    /// punched out of the file (unmapping alone would keep it).
    private func drop(_ t: PageTable, _ page: Int) {
        if t.memfd >= 0 {
            _ = cpaged_punch_hole(t.memfd, Int64(page * t.pageSize), Int64(t.pageSize))
        } else {
            _ = madvise(UnsafeMutableRawPointer(bitPattern: UInt(t.address(page))), t.pageSize, MADV_DONTNEED)
        }
    }

    /// Writes one page (write-protected, so stable) to its store, or to the scratch
    /// file of a private mapping. - Returns: nil, or the error.
    func writeBack(_ v: TakenPage) -> Errno? {
        let t = v.table
        let source = UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: UInt(t.sourceAddress(v.page))), count: t.pageSize)
        do {
            if t.isPrivate {
                try scratchStore(t).write(source, at: v.page * t.pageSize)
            } else {
                try t.store.write(source, at: v.page * t.pageSize)
            }
        } catch {
            return error
        }
        lock.withLock { stats.bytesWritten += t.pageSize }
        return nil
    }

    /// The scratch file of a private mapping, created on first use.
    private func scratchStore(_ t: PageTable) throws(Errno) -> FileStore {
        if let s = lock.withLock({ t.scratch }) { return s }
        let s = try FileStore.scratch(size: t.length, directory: configuration.scratchDirectory)
        return lock.withLock {
            if let existing = t.scratch { return existing }
            t.scratch = s
            t.c.pointee.scratch_fd = s.signalReadableDescriptor ?? -1
            return s
        }
    }
}
