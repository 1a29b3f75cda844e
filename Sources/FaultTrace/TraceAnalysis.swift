import FaultEngine

/// A first touch placed in its region: the analysis's working form.
struct PlacedTouch {
    var region: Int
    var page: Int
    var time: UInt64
}

/// The row layout of the heat map: which rows each region gets.
struct RowLayout {
    /// Per region: pages per row and number of rows.
    var pagesPerRow: [Int]
    var rows: [Int]

    init(_ regions: [TraceRegion], pageSize: Int, budget: Int) {
        let pages = regions.map { max(1, Int($0.length / UInt64(pageSize))) }
        let total = max(1, pages.reduce(0, +))
        pagesPerRow = []
        rows = []
        for p in pages {
            let share = max(4, Int((Double(budget) * Double(p) / Double(total)).rounded()))
            let perRow = max(1, (p + min(p, share) - 1) / min(p, share))
            pagesPerRow.append(perRow)
            rows.append((p + perRow - 1) / perRow)
        }
    }
}

extension TraceReport {
    /// Analyses `trace`.
    public init(_ trace: Trace, options: Options = Options()) {
        let ps = UInt64(trace.pageSize)
        let placed = Self.place(trace)
        let lastTime = max(placed.touches.map(\.time).max() ?? 0, trace.writeSamples.map(\.time).max() ?? 0)
        let duration = max(trace.duration, lastTime == .max ? .max : lastTime + 1)
        let bins = options.timeBins
        let binNs = max(1, duration / UInt64(bins) + (duration % UInt64(bins) == 0 ? 0 : 1))
        func bin(_ t: UInt64) -> Int { min(bins - 1, Int(t / binNs)) }

        // The first-touch order: distinct pages by time.
        let ordered = Self.firstTouchOrder(placed.touches)
        var curve = [Int](repeating: 0, count: bins)
        for t in ordered { curve[bin(t.time)] += 1 }
        var writesPerBin = [Int](repeating: 0, count: bins)
        for s in trace.writeSamples { writesPerBin[bin(s.time > 0 ? s.time - 1 : 0)] += s.total }
        var running = 0
        workingSet = (0..<bins).map { b in
            running += curve[b]
            let end = UInt64(b + 1).multipliedReportingOverflow(by: binNs)
            return CurvePoint(timeNanoseconds: end.overflow ? .max : end.partialValue, pages: running, pageWrites: writesPerBin[b])
        }

        heatMap = Self.heatMap(trace, placed.touches, bins: bins, binNs: binNs, budget: options.addressRows)
        latency = Self.latency(trace.touches.map(\.latency))
        var touched = [Int](repeating: 0, count: trace.regions.count)
        for t in ordered { touched[t.region] += 1 }
        var written = [Int](repeating: 0, count: trace.regions.count)
        for s in trace.writeSamples { written[s.region] += s.total }
        regions = trace.regions.enumerated().map { i, r in
            Region(index: i, label: r.label, space: r.space, start: r.start, pages: Int(r.length / ps),
                   writeTracked: r.writeTracked, touchedPages: touched[i], pageWrites: written[i])
        }
        firstTouchOrderLength = ordered.count
        firstTouchOrder = ordered.prefix(options.orderEntries).enumerated().map { k, t in
            let r = trace.regions[t.region]
            return OrderEntry(order: k, region: t.region, page: t.page, address: r.start + UInt64(t.page) * ps,
                              sourceOffset: r.sourceOffset &+ UInt64(t.page) * ps, timeNanoseconds: t.time)
        }
        pageSize = trace.pageSize
        durationNanoseconds = duration
        faults = trace.touches.count
        distinctPages = ordered.count
        pageWrites = written.reduce(0, +)
        writeSamples = trace.writeSamples.count
        droppedRecords = trace.dropped
        faultsOutsideRegions = placed.outside
    }

    /// The touches that fall in a region, with their region and page; and how many did not.
    static func place(_ trace: Trace) -> (touches: [PlacedTouch], outside: Int) {
        let ps = UInt64(trace.pageSize)
        var out: [PlacedTouch] = []
        out.reserveCapacity(trace.touches.count)
        var outside = 0
        var last: Int? = nil
        for t in trace.touches {
            let r: Int?
            if let l = last, trace.regions[l].space == t.space, t.address >= trace.regions[l].start,
               t.address < trace.regions[l].end {
                r = l
            } else {
                r = trace.regionIndex(space: t.space, address: t.address)
            }
            guard let r else {
                outside += 1
                continue
            }
            last = r
            out.append(PlacedTouch(region: r, page: Int((t.address - trace.regions[r].start) / ps), time: t.time))
        }
        return (out, outside)
    }

    /// Each page once, at its earliest touch, in time order (ties keep record order).
    static func firstTouchOrder(_ touches: [PlacedTouch]) -> [PlacedTouch] {
        let sorted = touches.enumerated().sorted { a, b in
            a.element.time != b.element.time ? a.element.time < b.element.time : a.offset < b.offset
        }
        var seen = Set<Int64>()
        var out: [PlacedTouch] = []
        for (_, t) in sorted where seen.insert(Int64(t.region) << 40 | Int64(t.page)).inserted {
            out.append(t)
        }
        return out
    }

    static func heatMap(_ trace: Trace, _ touches: [PlacedTouch], bins: Int, binNs: UInt64, budget: Int) -> HeatMap {
        let layout = RowLayout(trace.regions, pageSize: trace.pageSize, budget: budget)
        func bin(_ t: UInt64) -> Int { min(bins - 1, Int(t / binNs)) }
        var regions = trace.regions.indices.map { i in
            HeatRegion(region: i, pagesPerRow: layout.pagesPerRow[i],
                       touches: Array(repeating: Array(repeating: 0, count: bins), count: layout.rows[i]),
                       writes: Array(repeating: Array(repeating: 0, count: bins), count: layout.rows[i]))
        }
        for t in touches {
            regions[t.region].touches[t.page / layout.pagesPerRow[t.region]][bin(t.time)] += 1
        }
        for s in trace.writeSamples {
            let perRow = layout.pagesPerRow[s.region]
            let rows = layout.rows[s.region]
            let b = bin(s.time > 0 ? s.time - 1 : 0)
            for (k, n) in s.written.enumerated() where n > 0 {
                let row = min(rows - 1, (k * s.bucketPages + s.bucketPages / 2) / perRow)
                regions[s.region].writes[row][b] += Int(n)
            }
        }
        var maxCell = 0
        for r in regions {
            for (a, b) in zip(r.touches, r.writes) {
                for (x, y) in zip(a, b) { maxCell = max(maxCell, x + y) }
            }
        }
        return HeatMap(timeBins: bins, binNanoseconds: binNs, regions: regions, maxCell: maxCell)
    }

    static func latency(_ values: [UInt64]) -> Latency {
        let sorted = values.sorted()
        func percentile(_ p: Double) -> UInt64 {
            guard !sorted.isEmpty else { return 0 }
            let rank = max(1, Int((Double(sorted.count) * p).rounded(.up)))
            return sorted[min(sorted.count, rank) - 1]
        }
        var buckets: [LatencyBucket] = []
        if let lo = sorted.first, let hi = sorted.last {
            let first = 63 - max(lo, 1).leadingZeroBitCount
            let last = 63 - max(hi, 1).leadingZeroBitCount
            buckets = (first...last).map { k in
                LatencyBucket(fromNanoseconds: k == first ? 0 : 1 << UInt64(k), toNanoseconds: 1 << UInt64(k + 1), count: 0)
            }
            for v in sorted { buckets[(63 - max(v, 1).leadingZeroBitCount) - first].count += 1 }
        }
        return Latency(count: sorted.count, p50Nanoseconds: percentile(0.5), p90Nanoseconds: percentile(0.9),
                       p99Nanoseconds: percentile(0.99), maxNanoseconds: sorted.last ?? 0, buckets: buckets)
    }
}

extension Trace {
    /// The source offsets of the pages in first-touch order, each page once: a working
    /// set that `FaultServerConfiguration.Prefetch.replay` (`--replay`) installs in this order.
    public func firstTouchSourceOffsets() -> [UInt64] {
        let ps = UInt64(pageSize)
        return TraceReport.firstTouchOrder(TraceReport.place(self).touches).map { t in
            regions[t.region].sourceOffset &+ UInt64(t.page) * ps
        }
    }
}
