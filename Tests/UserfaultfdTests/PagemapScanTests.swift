import Glibc
import TestSupport
import Testing
import Userfaultfd

extension Matrix {
    /// Dirty tracking: WP_ASYNC lets the kernel resolve WP faults; PAGEMAP_SCAN finds the written pages.
    @Suite("dirty tracking", .needsUserfaultfd) struct DirtyTracking {
        @Test("PAGEMAP_SCAN finds exactly the written pages and re-protects them", arguments: MemoryKind.ordinary)
        func scan(_ kind: MemoryKind) throws { try checkDirtyTracking(kind) }

        @Test("dirty tracking on hugetlb", .needsFreeHugePages(8))
        func scanHugetlb() throws { try checkDirtyTracking(.hugetlb) }
    }
}

func checkDirtyTracking(_ kind: MemoryKind) throws {
    let session = try Session(features: kind.writeProtectFeatures.union(.wpAsync))
    #expect(session.handle.features.contains(.wpUnpopulated), "WP_ASYNC brings WP_UNPOPULATED")
    let m = try kind.map()
    let ps = kind.pageSize, n = kind.pageCount
    try session.handle.register(m.range, mode: .writeProtect)
    try session.handle.writeProtect(m.range, mode: .writeProtect)
    let scanner = try PagemapScanner()
    func dirtyPages(maxPages: Int = 0) throws -> [Int] {
        let result = try scanner.scan(m.range, flags: .writeProtectMatching, required: .written, maxPages: maxPages)
        var pages: [Int] = []
        for region in result.regions {
            #expect(region.categories == .written)
            pages += (Int(region.range.start - m.range.start) / ps)..<(Int(region.range.end - m.range.start) / ps)
        }
        return pages
    }
    #expect(try dirtyPages() == [])

    // No resolver runs: the kernel resolves these WP faults itself (a hang would time out).
    let range = m.range
    func write(_ pages: [Int]) {
        _ = runFaulting(session: session) { for p in pages { range.pointer.storeBytes(of: 0x77, toByteOffset: p * ps, as: UInt8.self) } }
    }
    write([1, 3])
    #expect(try dirtyPages() == [1, 3])
    #expect(try dirtyPages() == [], "the scan write-protected what it found")
    #expect(m.base.load(fromByteOffset: 3 * ps, as: UInt8.self) == 0x77)

    if kind != .hugetlb {
        // max_pages stops the walk; the next scan goes on from where it stopped.
        write([0, 1, 2])
        let first = try scanner.scan(m.range, flags: .writeProtectMatching, required: .written, maxPages: 2)
        #expect(first.pageCount == 2)
        #expect(first.walkEnd == m.range.start + UInt64(2 * ps))
        let rest = try scanner.scan(MemoryRange(start: first.walkEnd, end: m.range.end), flags: .writeProtectMatching, required: .written)
        #expect(rest.regions.map(\.range) == [MemoryRange(start: m.range.start + UInt64(2 * ps), length: UInt64(ps))])
        _ = n
    }
    // Without WP matching the scan only reports; PM_SCAN_CHECK_WPASYNC passes on a WP_ASYNC range.
    write([2])
    let look = try scanner.scan(m.range, flags: .checkWPAsync, required: .written)
    #expect(look.regions.count == 1)
    #expect(try dirtyPages() == [2])
}
