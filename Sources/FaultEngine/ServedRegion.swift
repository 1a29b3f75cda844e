import Synchronization
import SystemPackage
import Userfaultfd
import _CFaultEngine

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// One registered range and where its bytes live in the source.
public struct ServedRegion: Sendable, Hashable {
    /// Page-aligned addresses, already registered on the uffd by whoever owns the memory.
    public var range: MemoryRange
    /// The byte offset in the source of `range.start` (page-aligned).
    public var sourceOffset: UInt64
    /// For the MINOR strategy: the address of a second, unregistered mapping of the
    /// same shmem pages (at the offset of `range.start`), through which the server
    /// fills the page cache before `UFFDIO_CONTINUE`. Nil otherwise.
    public var pageCacheAlias: UInt64?

    public init(range: MemoryRange, sourceOffset: UInt64 = 0, pageCacheAlias: UInt64? = nil) {
        self.range = range
        self.sourceOffset = sourceOffset
        self.pageCacheAlias = pageCacheAlias
    }
}

/// A served range as the handlers see it: plain values and raw bitmap pointers, so
/// copying one out of the table costs no reference counting.
struct RegionEntry {
    var range: MemoryRange
    var sourceOffset: UInt64
    /// One bit per page: installed (or claimed) by this server.
    var resident: UnsafeMutablePointer<UInt64>
    /// One bit per page: released by a REMOVE, so the next fault installs zeros.
    var zeroed: UnsafeMutablePointer<UInt64>
    /// One bit per page: poisoned because the source failed (a later fault there is
    /// passed on as a real SIGBUS).
    var poisoned: UnsafeMutablePointer<UInt64>
    /// The bit of `range.start` in the bitmaps (its global page in the table's layout).
    var firstBit: UInt64
    /// The page-cache alias of `range.start`, or 0.
    var alias: UInt64

    @inline(__always) func isResident(_ page: UInt64) -> Bool { cfe_bit_test(resident, firstBit &+ page) }
    @inline(__always) func isZeroed(_ page: UInt64) -> Bool { cfe_bit_test(zeroed, firstBit &+ page) }
    @inline(__always) func markResident(_ page: UInt64, count: UInt64) { cfe_bits_set(resident, firstBit &+ page, count) }
    @inline(__always) func claim(_ page: UInt64) -> Bool { !cfe_bit_test_and_set(resident, firstBit &+ page) }
    @inline(__always) func markPoisoned(_ page: UInt64) { cfe_bits_set(poisoned, firstBit &+ page, 1) }
    @inline(__always) func clearZeroed(_ page: UInt64, count: UInt64) { cfe_bits_clear(zeroed, firstBit &+ page, count) }
}

/// The served ranges. Only server threads (handlers, prefetcher) take its lock, never
/// code that faults on the ranges; events (REMOVE, UNMAP, REMAP) change it.
///
/// Its bitmaps hold one bit per global page of ``layout``; each entry addresses them
/// from its first page's bit, so a piece cut out or moved by an event keeps its bits.
final class RegionTable: @unchecked Sendable {
    private let entries: Mutex<[RegionEntry]>
    /// The regions as first served, in the order given.
    let layout: RegionLayout
    /// Installed (or claimed) by this server.
    let resident: PageBitmap
    /// Released by a REMOVE, so the next fault installs zeros.
    let zeroed: PageBitmap
    /// Poisoned because the source failed.
    let poisoned: PageBitmap
    let pageSize: UInt64
    /// The number of pages in all regions at creation.
    let totalPages: UInt64

    init(_ regions: [ServedRegion], pageSize: Int) throws(UserfaultfdError) {
        self.pageSize = UInt64(pageSize)
        let layout = RegionLayout(regions.map(\.range), pageSize: pageSize)
        self.layout = layout
        resident = try PageBitmap(count: layout.totalPages)
        zeroed = try PageBitmap(count: layout.totalPages)
        poisoned = try PageBitmap(count: layout.totalPages)
        var list: [RegionEntry] = []
        for (region, r) in zip(regions, layout.regions) {
            list.append(RegionEntry(
                range: region.range, sourceOffset: region.sourceOffset,
                resident: resident.words, zeroed: zeroed.words, poisoned: poisoned.words,
                firstBit: UInt64(r.firstGlobal), alias: region.pageCacheAlias ?? 0))
        }
        list.sort { $0.range.start < $1.range.start }
        entries = Mutex(list)
        totalPages = UInt64(layout.totalPages)
    }

    /// The entry containing `address`, if any.
    @inline(__always)
    func lookup(_ address: UInt64) -> RegionEntry? {
        entries.withLock { list -> RegionEntry? in
            var lo = 0
            var hi = list.count
            while lo < hi {
                let mid = (lo + hi) >> 1
                let e = list[mid]
                if address < e.range.start {
                    hi = mid
                } else if address - e.range.start >= e.range.length {
                    lo = mid + 1
                } else {
                    return e
                }
            }
            return nil
        }
    }

    /// The entry holding source offset `offset`, and the address it maps to.
    func lookup(sourceOffset offset: UInt64) -> (RegionEntry, UInt64)? {
        entries.withLock { list -> (RegionEntry, UInt64)? in
            for e in list where offset >= e.sourceOffset && offset - e.sourceOffset < e.range.length {
                return (e, e.range.start + (offset - e.sourceOffset))
            }
            return nil
        }
    }

    /// A copy of every entry.
    var snapshot: [RegionEntry] { entries.withLock { $0 } }

    /// The served ranges now.
    var ranges: [ServedRegion] {
        entries.withLock { list in
            list.map { ServedRegion(range: $0.range, sourceOffset: $0.sourceOffset, pageCacheAlias: $0.alias == 0 ? nil : $0.alias) }
        }
    }

    /// REMOVE: pages in `range` are gone; the next fault there installs zeros.
    func remove(_ range: MemoryRange) {
        entries.withLock { list in
            for e in list where e.range.overlaps(range) {
                let start = max(e.range.start, range.start)
                let end = min(e.range.end, range.end)
                let first = (start - e.range.start + pageSize - 1) / pageSize
                let last = (end - e.range.start) / pageSize
                if last > first {
                    cfe_bits_clear(e.resident, e.firstBit + first, last - first)
                    cfe_bits_clear(e.poisoned, e.firstBit + first, last - first)
                    cfe_bits_set(e.zeroed, e.firstBit + first, last - first)
                }
            }
        }
    }

    /// Cuts `range` out of every entry and returns the pieces cut out.
    private func cut(_ range: MemoryRange, from list: inout [RegionEntry]) -> [RegionEntry] {
        var kept: [RegionEntry] = []
        var removed: [RegionEntry] = []
        for e in list {
            guard e.range.overlaps(range) else {
                kept.append(e)
                continue
            }
            let start = max(e.range.start, range.start)
            let end = min(e.range.end, range.end)
            if e.range.start < start {
                var head = e
                head.range = MemoryRange(start: e.range.start, end: start)
                kept.append(head)
            }
            var middle = e
            middle.range = MemoryRange(start: start, end: end)
            middle.sourceOffset = e.sourceOffset + (start - e.range.start)
            middle.firstBit = e.firstBit + (start - e.range.start) / pageSize
            if e.alias != 0 { middle.alias = e.alias + (start - e.range.start) }
            removed.append(middle)
            if end < e.range.end {
                var tail = e
                tail.range = MemoryRange(start: end, end: e.range.end)
                tail.sourceOffset = e.sourceOffset + (end - e.range.start)
                tail.firstBit = e.firstBit + (end - e.range.start) / pageSize
                if e.alias != 0 { tail.alias = e.alias + (end - e.range.start) }
                kept.append(tail)
            }
        }
        list = kept
        return removed
    }

    /// UNMAP: `range` is no longer served.
    func unmap(_ range: MemoryRange) {
        entries.withLock { list in
            _ = cut(range, from: &list)
        }
    }

    /// REMAP: the pages at `from ..< from + length` now live at `to`, same source bytes.
    func remap(from: UInt64, to: UInt64, length: UInt64) {
        entries.withLock { list in
            let moved = cut(MemoryRange(start: from, length: length), from: &list)
            // Whatever was served at the destination is replaced.
            _ = cut(MemoryRange(start: to, length: length), from: &list)
            for var piece in moved {
                piece.range.start = to + (piece.range.start - from)
                list.append(piece)
            }
            list.sort { $0.range.start < $1.range.start }
        }
    }
}
