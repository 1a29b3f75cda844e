import SystemPackage
import Userfaultfd
import _CPagedMemory

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A store mapped at an address range by a ``Pager``.
///
/// Touch ``base`` like any memory: pages fault in from the store on first access and
/// leave again when the pager needs room. Unmapped by ``unmap()`` or when the value
/// goes away; a shared mapping first writes its dirty pages back.
public final class PagedMapping: @unchecked Sendable {
    /// Whether writes reach the store.
    public enum Sharing: String, Sendable, Codable, CaseIterable {
        /// Writes reach the store (on eviction, ``PagedMapping/flush()`` and unmap).
        case shared
        /// Writes stay in this process (dirty pages evicted go to a scratch file); the
        /// store is never written.
        case `private`
    }

    /// The first byte of the mapping.
    public let base: UnsafeMutableRawPointer
    /// The mapped bytes: the store's size rounded up to whole pages.
    public let length: Int
    /// The unit of faulting, reading and eviction.
    public let pageSize: Int
    /// Whether writes reach the store.
    public let sharing: Sharing
    /// The pager serving this mapping.
    public let pager: Pager
    let table: PageTable
    private var unmapped = false

    init(pager: Pager, table: PageTable, sharing: Sharing) {
        self.pager = pager
        self.table = table
        self.base = UnsafeMutableRawPointer(bitPattern: UInt(table.base))!
        self.length = table.length
        self.pageSize = table.pageSize
        self.sharing = sharing
    }

    deinit { try? unmap() }

    /// Where this mapping's faults are resolved: in the faulting thread when the pager
    /// asked for it and the store and page size allow it, else by the filler threads.
    public var resolution: FaultResolution { table.inThread ? .faultingThread : .handlerThreads }

    /// The bytes of the mapping.
    public var bytes: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: base, count: length) }

    /// The errors the pager recorded for this mapping, oldest first (at most 64 are kept).
    public var errors: [PagedMappingError] {
        pager.lock.withLock {
            table.collectResolverErrors()
            return table.errors
        }
    }

    /// Pages of this mapping in memory now.
    public var residentPages: Int {
        pager.lock.withLock { table.residentPages }
    }

    /// Reads the pages covering `[offset, offset + count)` that are not in memory,
    /// several per store read, and returns when they are in.
    ///
    /// Pages beyond the buffer's room are not read (a prefetch never evicts what it
    /// just brought in).
    /// - Returns: the pages read.
    @discardableResult
    public func prefetch(offset: Int, count: Int) -> Int {
        if unmapped || offset < 0 || count <= 0 || offset >= length { return 0 }
        return pager.prefetch(table, firstPage: offset / pageSize, lastPage: (min(length, offset + count) - 1) / pageSize)
    }

    /// Writes every dirty page back and makes the store durable (`fsync`). Pages stay in memory.
    ///
    /// Does nothing for a private mapping.
    /// - Throws: the first ``PagedMappingError`` of a write that failed (the page stays
    ///   dirty), or `writeFailed` with the `Errno` of `fsync`.
    public func flush() throws(PagedMappingError) {
        if unmapped || sharing == .private { return }
        try pager.flush(table)
    }

    /// Writes dirty pages back (shared mappings), releases the pages and unmaps the range.
    ///
    /// No thread may touch the mapping during or after this call.
    /// - Throws: the first error of writing back; the range is unmapped all the same.
    public func unmap() throws(PagedMappingError) {
        if unmapped { return }
        unmapped = true
        var failure: PagedMappingError?
        pager.lock.withLock { table.closing = true }
        if sharing == .shared {
            do { try pager.flush(table) } catch { failure = error }
        }
        pager.retire(table)
        munmap(base, length)
        if table.alias != 0 { munmap(UnsafeMutableRawPointer(bitPattern: UInt(table.alias)), length) }
        if table.memfd >= 0 { close(table.memfd) }
        if let failure { throw failure }
    }
}

extension Pager {
    /// Maps `store` at a new address range.
    ///
    /// - Parameters:
    ///   - store: where the pages live.
    ///   - pageSize: a multiple of 4 KiB from 4 KiB to 2 MiB: the unit of faulting,
    ///     reading and eviction (larger pages mean fewer, larger reads).
    ///   - sharing: whether writes reach the store.
    /// - Returns: the mapping.
    /// - Throws: `UserfaultfdError` for a bad page size, an empty store, a page larger
    ///   than the buffer, or a failing `mmap` / `UFFDIO_REGISTER`.
    public func map(_ store: any PageStore, pageSize: Int = 4096, sharing: PagedMapping.Sharing = .shared) throws(UserfaultfdError) -> PagedMapping {
        if pageSize < 4096 || pageSize > 2 << 20 || pageSize % 4096 != 0 || pageSize * 4 > configuration.bufferBytes {
            throw UserfaultfdError(operation: "Pager.map", kind: .invalidArgument(
                "page size \(pageSize) must be a multiple of 4 KiB from 4 KiB to 2 MiB and at most a quarter of the buffer"))
        }
        if store.size <= 0 {
            throw UserfaultfdError(operation: "Pager.map", kind: .invalidArgument("the store is empty"))
        }
        let length = (store.size + pageSize - 1) / pageSize * pageSize
        // In the faulting thread where the store reads with one pread onto the handler's stack.
        let inThreadHandle = store.signalReadableDescriptor != nil && pageSize <= Int(CPAGED_SIGNAL_CHUNK) ? self.inThreadHandle : nil
        let serving = inThreadHandle ?? handle
        let memory = try Memory(length: length, memfd: configuration.softEviction)
        let range = MemoryRange(memory.base, length: length)
        do {
            if memory.memfd >= 0 {
                try serving.register(range, mode: [.missing, .writeProtect, .minor], requiring: [.copy, .writeProtect, .wake, .continue])
            } else {
                try serving.register(range, mode: [.missing, .writeProtect], requiring: [.copy, .writeProtect, .wake])
            }
        } catch {
            memory.release()
            throw error
        }
        let table: PageTable? = lock.withLock {
            guard let (slot, generation) = takeSlot() else { return nil }
            let t = PageTable(base: range.start, length: length, pageSize: pageSize, store: store,
                              isPrivate: sharing == .private, slot: slot, generation: generation,
                              handle: serving, inThread: inThreadHandle != nil, memfd: memory.memfd,
                              alias: memory.alias.map { UInt64(UInt(bitPattern: $0)) } ?? 0)
            if !insert(t) {
                freeSlots.append(slot)
                return nil
            }
            return t
        }
        guard let table else {
            memory.release()
            throw UserfaultfdError(operation: "Pager.map", kind: .invalidArgument("over 1,048,576 mappings, or no memory for the lookup table"))
        }
        return PagedMapping(pager: self, table: table, sharing: sharing)
    }

    /// Waits until no page of `t` is in transit, then forgets it (its range is unmapped next).
    func retire(_ t: PageTable) {
        lock.withLock {
            while t.busyPages > 0 { lock.wait(milliseconds: 1) }
            remove(t)
        }
    }
}

/// The memory behind a mapping: private anonymous, or a memfd mapped twice (the
/// registered range and an unregistered alias for write-back).
private struct Memory {
    let base: UnsafeMutableRawPointer
    let length: Int
    var memfd: Int32 = -1
    var alias: UnsafeMutableRawPointer?

    init(length: Int, memfd useMemfd: Bool) throws(UserfaultfdError) {
        self.length = length
        if !useMemfd {
            guard let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
                  p != MAP_FAILED else {
                throw UserfaultfdError(operation: "mmap", errno: Errno(rawValue: errno))
            }
            _ = madvise(p, length, MADV_NOHUGEPAGE)
            base = p
            return
        }
        let fd = cpaged_memfd_create("paged-memory")
        if fd < 0 { throw UserfaultfdError(operation: "memfd_create", errno: Errno(rawValue: errno)) }
        if ftruncate(fd, off_t(length)) != 0 {
            let e = errno
            close(fd)
            throw UserfaultfdError(operation: "ftruncate", errno: Errno(rawValue: e))
        }
        guard let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0), p != MAP_FAILED else {
            let e = errno
            close(fd)
            throw UserfaultfdError(operation: "mmap", errno: Errno(rawValue: e))
        }
        guard let a = mmap(nil, length, PROT_READ, MAP_SHARED | MAP_NORESERVE, fd, 0), a != MAP_FAILED else {
            let e = errno
            munmap(p, length)
            close(fd)
            throw UserfaultfdError(operation: "mmap", errno: Errno(rawValue: e))
        }
        _ = madvise(p, length, MADV_NOHUGEPAGE)
        _ = madvise(a, length, MADV_NOHUGEPAGE)
        base = p
        memfd = fd
        alias = a
    }

    func release() {
        munmap(base, length)
        if let alias { munmap(alias, length) }
        if memfd >= 0 { close(memfd) }
    }
}
