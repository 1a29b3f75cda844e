import FaultEngine
import Userfaultfd

/// Tracks pages the workload writes, without a fault round trip: the regions are
/// registered for write protection with WP_ASYNC (the kernel resolves the faults
/// itself), and `PAGEMAP_SCAN` reports the written pages and protects them again.
final class DirtyTracker {
    private let uffd: Userfaultfd
    private let scanner: PagemapScanner
    private let table: RegionLayout

    init(table: RegionLayout) throws(MigrationError) {
        self.table = table
        do {
            uffd = try Userfaultfd(features: [.wpAsync, .wpUnpopulated])
            scanner = try PagemapScanner()
            for i in table.regions.indices {
                let range = table.range(i)
                try uffd.handle.register(range, mode: .writeProtect, requiring: [.writeProtect])
                try uffd.handle.writeProtect(range, mode: .writeProtect)
            }
        } catch {
            throw MigrationError(error)
        }
    }

    /// Reports the pages written since the last scan that protected them again (with
    /// `protectAgain`, this one does) by calling `dirty` with each global page index;
    /// returns how many there were.
    @discardableResult
    func scan(protectAgain: Bool = true, _ dirty: (Int) -> Void) throws(MigrationError) -> Int {
        var count = 0
        for r in table.regions {
            let end = r.start + UInt64(r.pages * table.pageSize)
            var start = r.start
            while start < end {
                let result: PagemapScanner.Result
                do {
                    result = try scanner.scan(MemoryRange(start: start, end: end),
                                              flags: protectAgain ? .writeProtectMatching : [],
                                              required: .written, returning: .written)
                } catch {
                    throw MigrationError(error)
                }
                for region in result.regions {
                    let first = Int((region.range.start - r.start) / UInt64(table.pageSize))
                    let pages = Int(region.range.length) / table.pageSize
                    for p in first..<(first + pages) { dirty(r.firstGlobal + p) }
                    count += pages
                }
                if result.walkEnd >= end || result.walkEnd <= start { break }
                start = result.walkEnd
            }
        }
        return count
    }

    deinit {
        for i in table.regions.indices {
            try? uffd.handle.unregister(table.range(i))
        }
    }
}
