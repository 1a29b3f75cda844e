import FaultEngine

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The pictures of a trace, as SVG text: heat map, working-set curve, latency
/// histogram and first-touch order.
///
/// Every heat-map cell that saw a touch or a write is a `rect` of class `cell` carrying
/// `data-region`, `data-row`, `data-bin`, `data-touches` and `data-writes`, so that the
/// picture can be checked by its structure.
public enum TraceSVG {
    static let cellWidth = 6
    static let cellHeight = 4
    static let left = 150
    static let regionGap = 14

    /// The heat map: time across, address down, regions stacked, cells coloured by
    /// first touches plus page writes.
    public static func heatMap(_ report: TraceReport) -> String {
        let map = report.heatMap
        let width = left + map.timeBins * cellWidth + 20
        let rowsTotal = map.regions.reduce(0) { $0 + $1.touches.count }
        let height = 20 + rowsTotal * cellHeight + map.regions.count * regionGap + 40
        var svg = open(width: width, height: height, label: "heat map")
        var y = 20
        for heat in map.regions {
            let region = report.regions[heat.region]
            let rows = heat.touches.count
            svg += "<text x=\"\(left - 6)\" y=\"\(y + 10)\" text-anchor=\"end\" class=\"lbl\">\(escape(name(region)))</text>\n"
            svg += "<text x=\"\(left - 6)\" y=\"\(y + 22)\" text-anchor=\"end\" class=\"sub\">\(hex(region.start)) · \(pagesText(region.pages, report.pageSize))</text>\n"
            svg += "<rect class=\"region\" data-region=\"\(heat.region)\" x=\"\(left)\" y=\"\(y)\" width=\"\(map.timeBins * cellWidth)\" height=\"\(rows * cellHeight)\" fill=\"#f1f1f1\"/>\n"
            for row in 0..<rows {
                for bin in 0..<map.timeBins {
                    let touches = heat.touches[row][bin]
                    let writes = heat.writes[row][bin]
                    if touches + writes == 0 { continue }
                    svg += "<rect class=\"cell\" data-region=\"\(heat.region)\" data-row=\"\(row)\" data-bin=\"\(bin)\" "
                        + "data-touches=\"\(touches)\" data-writes=\"\(writes)\" x=\"\(left + bin * cellWidth)\" "
                        + "y=\"\(y + row * cellHeight)\" width=\"\(cellWidth)\" height=\"\(cellHeight)\" "
                        + "fill=\"\(colour(touches + writes, max: map.maxCell))\"/>\n"
                }
            }
            y += rows * cellHeight + regionGap
        }
        svg += timeAxis(x: left, y: y, width: map.timeBins * cellWidth, duration: report.workingSet.last?.timeNanoseconds ?? 0)
        svg += "</svg>\n"
        return svg
    }

    /// Distinct pages touched over time (line) and page writes per bin (bars).
    public static func workingSet(_ report: TraceReport) -> String {
        let points = report.workingSet
        let w = 600, h = 220, x0 = 70, y0 = 190
        let maxPages = max(1, points.map(\.pages).max() ?? 0)
        let maxWrites = max(1, points.map(\.pageWrites).max() ?? 0)
        var svg = open(width: w + x0 + 20, height: h + 40, label: "working set")
        let step = Double(w) / Double(max(1, points.count))
        for (i, p) in points.enumerated() where p.pageWrites > 0 {
            let bh = Double(p.pageWrites) / Double(maxWrites) * Double(y0 - 20)
            svg += "<rect class=\"writes\" data-bin=\"\(i)\" data-writes=\"\(p.pageWrites)\" x=\"\(fmt(Double(x0) + Double(i) * step))\" y=\"\(fmt(Double(y0) - bh))\" width=\"\(fmt(max(1, step - 1)))\" height=\"\(fmt(bh))\" fill=\"#f4a261\" opacity=\"0.6\"/>\n"
        }
        var path = "M\(x0),\(y0)"
        for (i, p) in points.enumerated() {
            let x = Double(x0) + Double(i + 1) * step
            let y = Double(y0) - Double(p.pages) / Double(maxPages) * Double(y0 - 20)
            path += " L\(fmt(x)),\(fmt(y))"
        }
        svg += "<path class=\"curve\" d=\"\(path)\" fill=\"none\" stroke=\"#1d3557\" stroke-width=\"2\"/>\n"
        svg += axes(x0: x0, y0: y0, width: w, top: 20, yMax: "\(maxPages) pages")
        svg += "<text x=\"\(x0 + w)\" y=\"14\" text-anchor=\"end\" class=\"sub\">bars: page writes per bin (max \(maxWrites))</text>\n"
        svg += timeAxis(x: x0, y: y0, width: w, duration: points.last?.timeNanoseconds ?? 0)
        svg += "</svg>\n"
        return svg
    }

    /// Faults per power-of-two latency bucket.
    public static func latency(_ report: TraceReport) -> String {
        let buckets = report.latency.buckets
        let w = 600, x0 = 70, y0 = 190
        var svg = open(width: w + x0 + 20, height: 250, label: "fault latency histogram")
        let maxCount = max(1, buckets.map(\.count).max() ?? 0)
        let step = Double(w) / Double(max(1, buckets.count))
        for (i, b) in buckets.enumerated() {
            let bh = Double(b.count) / Double(maxCount) * Double(y0 - 20)
            let x = Double(x0) + Double(i) * step
            svg += "<rect class=\"bar\" data-from-ns=\"\(b.fromNanoseconds)\" data-to-ns=\"\(b.toNanoseconds)\" data-count=\"\(b.count)\" x=\"\(fmt(x + 1))\" y=\"\(fmt(Double(y0) - bh))\" width=\"\(fmt(max(1, step - 2)))\" height=\"\(fmt(bh))\" fill=\"#457b9d\"/>\n"
            svg += "<text x=\"\(fmt(x + step / 2))\" y=\"\(y0 + 14)\" text-anchor=\"middle\" class=\"sub\">&lt;\(durationText(b.toNanoseconds))</text>\n"
        }
        svg += axes(x0: x0, y0: y0, width: w, top: 20, yMax: "\(maxCount) faults")
        svg += "</svg>\n"
        return svg
    }

    /// Each page at its place in the first-touch order (across) and its address (down).
    static func firstTouchOrder(_ report: TraceReport, _ ordered: [PlacedTouch]) -> String {
        let w = 600, x0 = 150
        let heights = report.heatMap.regions.map { $0.touches.count * cellHeight }
        let height = 20 + heights.reduce(0, +) + heights.count * regionGap + 30
        var svg = open(width: x0 + w + 20, height: height, label: "first-touch order")
        var tops: [Int] = []
        var y = 20
        for (i, heat) in report.heatMap.regions.enumerated() {
            tops.append(y)
            svg += "<text x=\"\(x0 - 6)\" y=\"\(y + 10)\" text-anchor=\"end\" class=\"lbl\">\(escape(name(report.regions[heat.region])))</text>\n"
            svg += "<rect class=\"region\" x=\"\(x0)\" y=\"\(y)\" width=\"\(w)\" height=\"\(heights[i])\" fill=\"#f1f1f1\"/>\n"
            y += heights[i] + regionGap
        }
        let stride = max(1, ordered.count / 4000)
        var k = 0
        while k < ordered.count {
            let t = ordered[k]
            let pages = max(1, report.regions[t.region].pages)
            let x = Double(x0) + Double(k) / Double(max(1, ordered.count)) * Double(w)
            let py = Double(tops[t.region]) + Double(t.page) / Double(pages) * Double(heights[t.region])
            svg += "<circle cx=\"\(fmt(x))\" cy=\"\(fmt(py))\" r=\"1.2\" fill=\"#e63946\"/>\n"
            k += stride
        }
        svg += "<text x=\"\(x0)\" y=\"\(y + 10)\" class=\"sub\">first touched → last (\(ordered.count) pages\(stride > 1 ? ", every \(stride)th shown" : ""))</text>\n"
        svg += "</svg>\n"
        return svg
    }

    // MARK: - Pieces

    static func open(width: Int, height: Int, label: String) -> String {
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(width)\" height=\"\(height)\" viewBox=\"0 0 \(width) \(height)\" role=\"img\" aria-label=\"\(label)\">\n"
    }

    static func axes(x0: Int, y0: Int, width: Int, top: Int, yMax: String) -> String {
        "<line x1=\"\(x0)\" y1=\"\(y0)\" x2=\"\(x0 + width)\" y2=\"\(y0)\" stroke=\"#333\"/>\n"
            + "<line x1=\"\(x0)\" y1=\"\(top)\" x2=\"\(x0)\" y2=\"\(y0)\" stroke=\"#333\"/>\n"
            + "<text x=\"\(x0 - 4)\" y=\"\(top + 4)\" text-anchor=\"end\" class=\"sub\">\(escape(yMax))</text>\n"
            + "<text x=\"\(x0 - 4)\" y=\"\(y0)\" text-anchor=\"end\" class=\"sub\">0</text>\n"
    }

    static func timeAxis(x: Int, y: Int, width: Int, duration: UInt64) -> String {
        var s = ""
        for k in 0...4 {
            let tx = x + width * k / 4
            s += "<line x1=\"\(tx)\" y1=\"\(y)\" x2=\"\(tx)\" y2=\"\(y + 4)\" stroke=\"#333\"/>"
            s += "<text x=\"\(tx)\" y=\"\(y + 16)\" text-anchor=\"middle\" class=\"sub\">\(durationText(duration / 4 * UInt64(k)))</text>\n"
        }
        return s
    }

    /// Light yellow through orange to dark purple, on a logarithmic scale of `value / max`.
    static func colour(_ value: Int, max: Int) -> String {
        let stops: [(Double, Double, Double)] = [(255, 237, 160), (254, 178, 76), (240, 59, 32), (128, 0, 38), (40, 0, 60)]
        let t = max <= 1 ? 1 : log1pRatio(Double(value), Double(max))
        let position = t * Double(stops.count - 1)
        let i = Swift.min(stops.count - 2, Int(position))
        let f = position - Double(i)
        let a = stops[i], b = stops[i + 1]
        func channel(_ x: Double, _ y: Double) -> Int { Int((x + (y - x) * f).rounded()) }
        return "#" + [channel(a.0, b.0), channel(a.1, b.1), channel(a.2, b.2)]
            .map { let h = String($0, radix: 16); return h.count == 1 ? "0" + h : h }.joined()
    }

    /// `ln(1 + v) / ln(1 + max)`, clamped to 0...1.
    static func log1pRatio(_ v: Double, _ max: Double) -> Double {
        Swift.min(1, Swift.max(0, log1p(v) / log1p(max)))
    }

    static func name(_ region: TraceReport.Region) -> String {
        region.label.isEmpty ? "region \(region.index)" : region.label
    }

    /// `v` to one decimal, without it when it is 0: "12", "12.5".
    static func fmt(_ v: Double) -> String {
        let text = Reporting.fixed(v, 1)
        return text.hasSuffix(".0") ? String(text.dropLast(2)) : text
    }

    static func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }

    static func pagesText(_ pages: Int, _ pageSize: Int) -> String {
        let bytes = pages * pageSize
        if bytes >= 1 << 30 { return "\(bytes >> 30) GiB" }
        if bytes >= 1 << 20 { return "\(bytes >> 20) MiB" }
        return "\(bytes >> 10) KiB"
    }

    /// A short duration: "850 ns", "12.3 µs", "4.5 ms", "1.25 s".
    static func durationText(_ ns: UInt64) -> String {
        if ns < 1_000 { return "\(ns) ns" }
        if ns < 1_000_000 { return fmt(Double(ns) / 1e3) + " µs" }
        if ns < 1_000_000_000 { return fmt(Double(ns) / 1e6) + " ms" }
        return fmt(Double(ns) / 1e9) + " s"
    }

    /// Text made safe for XML and HTML content and attributes.
    static func escape(_ text: String) -> String {
        var out = ""
        for c in text {
            switch c {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "\"": out += "&quot;"
            case "'": out += "&#39;"
            default: out.append(c)
            }
        }
        return out
    }
}
