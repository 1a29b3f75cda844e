import FaultEngine

// Pages as frames name them: region-relative runs, checked against the regions'
// layout and found in bitmaps indexed by global page.
extension RegionLayout {
    /// Checks a run named by a frame against the regions; returns its first global page.
    @inline(__always)
    func check(region: UInt32, first: UInt64, count: UInt64) throws(MigrationError) -> Int {
        if let g = globalPage(region: region, first: first, count: count) { return g }
        guard Int(region) < regions.count else {
            throw MigrationError(.outOfRange("region \(region) does not exist (\(regions.count) described)"))
        }
        throw MigrationError(.outOfRange(
            "pages \(first)..<\(first &+ count) lie outside region \(region) (\(regions[Int(region)].pages) pages)"))
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
