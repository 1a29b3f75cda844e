/// The regions being migrated, as both sides index them: region-relative page runs on
/// the wire, one global page index for the bitmaps.
struct RegionTable: Sendable {
    struct Region: Sendable {
        var start: UInt64
        var pages: Int
        /// The global index of this region's first page.
        var firstGlobal: Int
    }

    let regions: [Region]
    let pageSize: Int
    let totalPages: Int

    init(starts: [UInt64], lengths: [UInt64], pageSize: Int) {
        var list: [Region] = []
        var next = 0
        for (start, length) in zip(starts, lengths) {
            let pages = Int(length) / pageSize
            list.append(Region(start: start, pages: pages, firstGlobal: next))
            next += pages
        }
        regions = list
        self.pageSize = pageSize
        totalPages = next
    }

    /// Checks a run named by a frame against the regions; returns its first global page.
    @inline(__always)
    func check(region: UInt32, first: UInt64, count: UInt64) throws(MigrationError) -> Int {
        guard Int(region) < regions.count else {
            throw MigrationError(.outOfRange("region \(region) does not exist (\(regions.count) described)"))
        }
        let r = regions[Int(region)]
        guard first < UInt64(r.pages), count <= UInt64(r.pages) - first else {
            throw MigrationError(.outOfRange("pages \(first)..<\(first &+ count) lie outside region \(region) (\(r.pages) pages)"))
        }
        return r.firstGlobal + Int(first)
    }

    /// The region and global page of an address, if it lies in a region.
    @inline(__always)
    func locate(_ address: UInt64) -> (region: Int, global: Int)? {
        for i in 0..<regions.count {
            let r = regions[i]
            if address >= r.start && address < r.start + UInt64(r.pages * pageSize) {
                return (i, r.firstGlobal + Int((address - r.start) / UInt64(pageSize)))
            }
        }
        return nil
    }

    /// The region holding global page `g` and the page's index within it.
    @inline(__always)
    func split(_ g: Int) -> (region: Int, page: Int) {
        var i = regions.count - 1
        while regions[i].firstGlobal > g { i -= 1 }
        return (i, g - regions[i].firstGlobal)
    }

    @inline(__always)
    func address(_ g: Int) -> UInt64 {
        let (i, page) = split(g)
        return regions[i].start + UInt64(page * pageSize)
    }

    /// Runs of global pages set in both bitmaps, never crossing a region; skips 64 clear
    /// pages at a time.
    func runs(setInBoth a: PageBitmap, _ b: PageBitmap) -> [Wire.PageRun] {
        let include = { (g: Int) in a.test(g) && b.test(g) }
        var out: [Wire.PageRun] = []
        for (index, r) in regions.enumerated() {
            var p = 0
            while p < r.pages {
                let g = r.firstGlobal + p
                if g & 63 == 0 && p + 64 <= r.pages && a.word(g >> 6) & b.word(g >> 6) == 0 {
                    p += 64
                    continue
                }
                if !include(g) { p += 1; continue }
                let start = p
                while p < r.pages && include(r.firstGlobal + p) { p += 1 }
                out.append(Wire.PageRun(region: UInt32(index), first: UInt64(start), count: UInt64(p - start)))
            }
        }
        return out
    }

    /// Runs of global pages for which `include` holds, never crossing a region.
    func runs(where include: (Int) -> Bool) -> [Wire.PageRun] {
        var out: [Wire.PageRun] = []
        for (index, r) in regions.enumerated() {
            var p = 0
            while p < r.pages {
                if !include(r.firstGlobal + p) { p += 1; continue }
                let start = p
                while p < r.pages && include(r.firstGlobal + p) { p += 1 }
                out.append(Wire.PageRun(region: UInt32(index), first: UInt64(start), count: UInt64(p - start)))
            }
        }
        return out
    }
}

/// Whether a page holds only zero bytes.
@inline(__always)
func isZeroPage(_ p: UnsafeRawPointer, _ pageSize: Int) -> Bool {
    let words = p.assumingMemoryBound(to: UInt64.self)
    var i = 0
    let n = pageSize / 8
    while i < n {
        if words[i] | words[i + 1] | words[i + 2] | words[i + 3] != 0 { return false }
        i += 4
    }
    return true
}
