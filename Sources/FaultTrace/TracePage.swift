import FaultEngine

/// The rendered forms of a trace: one self-contained HTML page and a terminal summary.
public enum TracePage {
    /// The HTML page: summary, heat map, working-set curve, latency histogram and
    /// first-touch order, all inline (no script, no outside resource).
    public static func html(_ trace: Trace, report: TraceReport, title: String = "uffd trace") -> String {
        let ordered = TraceReport.firstTouchOrder(TraceReport.place(trace).touches)
        let e = TraceSVG.escape
        var page = """
            <!DOCTYPE html>
            <html lang="en"><head><meta charset="utf-8"><title>\(e(title))</title>
            <style>
            body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
            h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; }
            table { border-collapse: collapse; } td, th { padding: 2px 10px; text-align: right; border-bottom: 1px solid #ddd; }
            th:first-child, td:first-child { text-align: left; }
            .lbl { font: 12px sans-serif; fill: #222; } .sub { font: 10px sans-serif; fill: #555; }
            p.note { color: #555; max-width: 900px; } pre { white-space: pre-wrap; }
            </style></head><body>
            <h1>\(e(title))</h1>

            """
        page += "<pre>\(e(summary(report)))</pre>\n"
        page += "<h2>Heat map</h2>\n<p class=\"note\">Time across, address down, regions stacked. "
            + "Each cell is \(TraceSVG.durationText(report.heatMap.binNanoseconds)) by a bucket of pages, coloured by first touches "
            + "plus page writes (logarithmic, light to dark; busiest cell: \(report.heatMap.maxCell)).</p>\n"
        page += TraceSVG.heatMap(report)
        page += "<h2>Working set</h2>\n<p class=\"note\">Distinct pages touched so far (line); pages written per bin (bars).</p>\n"
        page += TraceSVG.workingSet(report)
        page += "<h2>Fault latency</h2>\n<p class=\"note\">From reading the fault to resolving it, power-of-two buckets.</p>\n"
        page += TraceSVG.latency(report)
        page += "<h2>First-touch order</h2>\n<p class=\"note\">The order a replay (<code>--replay</code>) would prefetch the pages in.</p>\n"
        page += TraceSVG.firstTouchOrder(report, ordered)
        page += orderTable(report)
        page += "</body></html>\n"
        return page
    }

    static func orderTable(_ report: TraceReport) -> String {
        var s = "<table><tr><th>#</th><th>region</th><th>page</th><th>address</th><th>source offset</th><th>time</th></tr>\n"
        for o in report.firstTouchOrder {
            s += "<tr><td>\(o.order)</td><td>\(TraceSVG.escape(TraceSVG.name(report.regions[o.region])))</td><td>\(o.page)</td>"
                + "<td>\(TraceSVG.hex(o.address))</td><td>\(o.sourceOffset)</td><td>\(TraceSVG.durationText(o.timeNanoseconds))</td></tr>\n"
        }
        return s + "</table>\n"
    }

    /// The terminal summary: the same numbers as `--json`, as text.
    public static func summary(_ report: TraceReport) -> String {
        let d = TraceSVG.durationText
        var lines: [String] = []
        lines.append("trace: \(report.regions.count) region(s), \(report.pageSize)-byte pages, \(d(report.durationNanoseconds)); "
            + "\(report.faults) fault(s), \(report.distinctPages) distinct page(s), \(report.pageWrites) page write(s) "
            + "in \(report.writeSamples) sample(s); \(report.droppedRecords) record(s) dropped, "
            + "\(report.faultsOutsideRegions) fault(s) outside the regions")
        let header = ["region", "label", "start", "pages", "touched", "writes"]
        var rows = [header]
        for r in report.regions {
            rows.append(["\(r.index)", r.label.isEmpty ? "-" : r.label, TraceSVG.hex(r.start), "\(r.pages)", "\(r.touchedPages)",
                         r.writeTracked ? "\(r.pageWrites)" : "-"])
        }
        lines.append(contentsOf: table(rows))
        let final = report.workingSet.last?.pages ?? 0
        var marks: [String] = []
        for share in [25, 50, 75, 100] where final > 0 {
            if let p = report.workingSet.first(where: { $0.pages * 100 >= final * share }) {
                marks.append("\(share)% by \(d(p.timeNanoseconds))")
            }
        }
        lines.append("working set: \(final) page(s)" + (marks.isEmpty ? "" : "; " + marks.joined(separator: ", ")))
        let l = report.latency
        lines.append("latency: \(l.count) fault(s); p50 \(d(l.p50Nanoseconds)), p90 \(d(l.p90Nanoseconds)), "
            + "p99 \(d(l.p99Nanoseconds)), max \(d(l.maxNanoseconds))")
        let first = report.firstTouchOrder.prefix(8).map { o in
            "\(TraceSVG.name(report.regions[o.region]))+\(o.page)"
        }
        lines.append("first-touch order: \(report.firstTouchOrderLength) page(s)"
            + (first.isEmpty ? "" : ", starting " + first.joined(separator: ", ")))
        return lines.joined(separator: "\n") + "\n"
    }

    static func table(_ rows: [[String]]) -> [String] {
        guard let width = rows.first?.count else { return [] }
        let widths = (0..<width).map { c in rows.map { $0[c].count }.max() ?? 0 }
        return rows.map { row in
            row.enumerated().map { c, cell in
                let pad = String(repeating: " ", count: widths[c] - cell.count)
                return c <= 1 ? cell + pad : pad + cell
            }.joined(separator: "  ")
        }
    }
}

extension TracePage {
    /// Writes `page` to `path` (replaced).
    public static func write(_ page: String, to path: String) throws(TraceError) {
        let writer = try TraceWriter(creating: path)
        try writer.append(Array(page.utf8))
        try writer.close()
    }
}
