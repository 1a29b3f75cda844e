import Userfaultfd

/// Served ranges as they were first given, in that order, with one global page index
/// across all of them: region `i`'s page `p` is global page `regions[i].firstGlobal + p`.
///
/// A ``RegionTable`` indexes its bitmaps by these global pages; a peer that names pages
/// by (region, page) translates through the same layout. It never changes: layout
/// events change the table's entries, not the layout.
package struct RegionLayout: Sendable {
    package struct Region: Sendable {
        /// The address of the region's first page.
        package var start: UInt64
        /// The number of pages.
        package var pages: Int
        /// The global index of the region's first page.
        package var firstGlobal: Int
    }

    /// The regions, in the order given.
    package let regions: [Region]
    package let pageSize: Int
    /// The number of pages in all regions.
    package let totalPages: Int

    /// The layout of `ranges` (page-aligned), numbered in the order given.
    package init(_ ranges: [MemoryRange], pageSize: Int) {
        var list: [Region] = []
        var next = 0
        for range in ranges {
            let pages = Int(range.length) / pageSize
            list.append(Region(start: range.start, pages: pages, firstGlobal: next))
            next += pages
        }
        regions = list
        self.pageSize = pageSize
        totalPages = next
    }

    /// The range of region `i`.
    @inline(__always)
    package func range(_ i: Int) -> MemoryRange {
        MemoryRange(start: regions[i].start, length: UInt64(regions[i].pages) &* UInt64(pageSize))
    }

    /// The global page of `count` pages from page `first` of region `region`, or nil
    /// unless the region exists and holds all of them.
    @inline(__always)
    package func globalPage(region: UInt32, first: UInt64, count: UInt64) -> Int? {
        guard Int(region) < regions.count else { return nil }
        let r = regions[Int(region)]
        guard first < UInt64(r.pages), count <= UInt64(r.pages) - first else { return nil }
        return r.firstGlobal + Int(first)
    }

    /// The region holding global page `g` and the page's index within it.
    @inline(__always)
    package func split(_ g: Int) -> (region: Int, page: Int) {
        var i = regions.count - 1
        while regions[i].firstGlobal > g { i -= 1 }
        return (i, g - regions[i].firstGlobal)
    }

    /// The address of global page `g`.
    @inline(__always)
    package func address(_ g: Int) -> UInt64 {
        let (i, page) = split(g)
        return address(region: i, page: UInt64(page))
    }

    /// The address of page `page` of region `region`.
    @inline(__always)
    package func address(region: Int, page: UInt64) -> UInt64 {
        regions[region].start &+ page &* UInt64(pageSize)
    }

    /// Served regions for this layout whose source offsets are their first global
    /// page's bytes: a fault's source offset divided by the page size is its global page.
    package var globallyNumbered: [ServedRegion] {
        regions.indices.map { ServedRegion(range: range($0), sourceOffset: UInt64(regions[$0].firstGlobal * pageSize)) }
    }
}
