import FaultEngine

/// What `uffd bench` prints, as one model: the table and `--json` are both written from
/// it, so the JSON carries exactly the figures, ratios, notes and targets the table shows.
///
/// Ratios are of pages/s against baselines of the same run; one that the table shows as
/// `-` (no such baseline, or not measured) is absent from the JSON.
public struct BenchDocument: Codable, Sendable, Equatable {
    /// The region size in MiB.
    public var sizeMiB: Int
    /// The page size in bytes.
    public var pageSize: Int
    /// Runs per contender and pattern; figures are their medians.
    public var repetitions: Int
    /// Pages touched by each scale run.
    public var scaleTouches: Int
    /// One row per contender and pattern, in the table's order.
    public var rows: [Row]
    /// The notes the rows refer to; the table numbers them from 1.
    public var notes: [String]
    /// The targets the engine is held to, for every pair measured in the run.
    public var targets: [Target]

    /// One contender on one touch order.
    public struct Row: Codable, Sendable, Equatable {
        public var name: String
        public var pattern: String
        /// Median microseconds per page; absent when the contender gave no figure.
        public var usPerPage: Double?
        /// Pages per second at the median.
        public var pagesPerSecond: Double?
        /// pages/s against the C handler of the same chunk size.
        public var vsCTwin: Double?
        /// pages/s against `kernel-first-touch`.
        public var vsKernel: Double?
        /// pages/s against `memcpy`.
        public var vsMemcpy: Double?
        /// Whether every repetition installed exactly the right bytes.
        public var verified: Bool
        /// Indexes (from 1) into ``BenchDocument/notes``: why there is no figure, what went
        /// wrong, what the reader must know.
        public var notes: [Int]
    }

    /// One target checked against this run's figures.
    public struct Target: Codable, Sendable, Equatable {
        /// The target in words, for example `swift-best ≥ 2.00× kernel-first-touch pages/s`.
        public var target: String
        public var pattern: String
        /// The measured ratio.
        public var ratio: Double
        /// The bound it must reach.
        public var required: Double
        /// Whether `ratio` must be at least (true) or at most (false) `required`.
        public var atLeast: Bool
        /// Whether both figures count (see ``TargetCheck/comparable``).
        public var comparable: Bool
        /// Whether the target is met by verified figures.
        public var met: Bool
        /// What limits the comparison, if anything.
        public var caveat: String?
    }
}

extension BenchReport {
    /// The report as the table and the JSON show it.
    public var document: BenchDocument {
        var notes: [String] = []
        func mark(_ text: String) -> Int {
            if let index = notes.firstIndex(of: text) { return index + 1 }
            notes.append(text)
            return notes.count
        }
        var rows: [BenchDocument.Row] = []
        for c in Contender.allCases {
            for p in c.patterns {
                if let r = result(c, p) {
                    rows.append(BenchDocument.Row(
                        name: c.rawValue, pattern: p.rawValue, usPerPage: r.usPerPage, pagesPerSecond: r.pagesPerSecond,
                        vsCTwin: c.cTwin.flatMap { ratio(c, to: $0, p) },
                        vsKernel: c.isScaleRun || c == .kernelFirstTouch ? nil : ratio(c, to: .kernelFirstTouch, p),
                        vsMemcpy: c.isScaleRun || c == .memcpy ? nil : ratio(c, to: .memcpy, p),
                        verified: r.verified,
                        notes: [r.note.map { "\(c) \(p): \($0)" }, r.remark.map { "\(c): \($0)" }].compactMap { $0 }.map(mark)))
                } else if let missing = notMeasured.first(where: { $0.contender == c && $0.pattern == p }) {
                    rows.append(BenchDocument.Row(
                        name: c.rawValue, pattern: p.rawValue, verified: false, notes: [mark("\(c): \(missing.reason)")]))
                }
            }
        }
        let checks = targets.map { t in
            BenchDocument.Target(target: t.summary, pattern: t.pattern.rawValue, ratio: t.value, required: t.required,
                                 atLeast: t.atLeast, comparable: t.comparable, met: t.met, caveat: t.caveat)
        }
        return BenchDocument(sizeMiB: sizeMiB, pageSize: pageSize, repetitions: repetitions, scaleTouches: scaleTouches,
                             rows: rows, notes: notes, targets: checks)
    }

    /// The report as JSON: ``document`` encoded by ``Reporting/json(_:)``.
    public func json() -> String { Reporting.json(document) }

    /// A readable table: µs per page, pages/s, ratios (of pages/s) to the C twin, to
    /// `kernel-first-touch` and to `memcpy` on the same pattern, verification, then
    /// the notes and the targets.
    public func table() -> String { document.table() }
}

extension BenchDocument {
    /// The table `uffd bench` prints.
    public func table() -> String {
        var cells: [[String]] = [["contender", "pattern", "µs/page", "pages/s", "vs C twin", "vs kernel", "vs memcpy", "verified"]]
        func ratioText(_ value: Double?) -> String { value.map { Reporting.fixed($0, 2) + "×" } ?? "-" }
        for row in rows {
            let marks = row.notes.map { " [\($0)]" }.joined()
            guard let us = row.usPerPage, let pps = row.pagesPerSecond else {
                cells.append([row.name, row.pattern, "-", "-", "-", "-", "-", "no figure" + marks])
                continue
            }
            cells.append([row.name, row.pattern, Reporting.fixed(us, 2), Reporting.grouped(pps),
                          ratioText(row.vsCTwin), ratioText(row.vsKernel), ratioText(row.vsMemcpy),
                          (row.verified ? "yes" : "NO") + marks])
        }
        var text = "uffd bench: \(sizeMiB) MiB regions (\(sizeMiB << 20 / pageSize) pages of \(pageSize) bytes), "
            + "scale runs touch \(scaleTouches) pages; medians of \(repetitions) repetition(s); ratios are of pages/s\n"
        text += layout(cells, rightAligned: [2, 3, 4, 5, 6])
        if !notes.isEmpty {
            text += "\nnotes:\n"
            for (i, note) in notes.enumerated() { text += "  [\(i + 1)] \(note)\n" }
        }
        if !targets.isEmpty {
            text += "\ntargets:\n"
            for check in targets {
                let status = !check.comparable ? "not comparable (a figure is unverified)" : check.met ? "met" : "NOT met"
                let caveat = check.caveat.map { " (\($0))" } ?? ""
                text += "  \(check.target) (\(check.pattern)): \(Reporting.fixed(check.ratio, 3))× — \(status)\(caveat)\n"
            }
        }
        return text
    }
}

/// Lays out rows as columns separated by two spaces.
func layout(_ rows: [[String]], rightAligned: Set<Int>) -> String {
    guard let width = rows.map(\.count).max() else { return "" }
    var widths = Array(repeating: 0, count: width)
    for row in rows {
        for (i, cell) in row.enumerated() { widths[i] = max(widths[i], cell.count) }
    }
    var text = ""
    for row in rows {
        var line = ""
        for (i, cell) in row.enumerated() {
            let pad = String(repeating: " ", count: widths[i] - cell.count)
            line += i == 0 ? "" : "  "
            line += rightAligned.contains(i) ? pad + cell : cell + (i == row.count - 1 ? "" : pad)
        }
        text += line + "\n"
    }
    return text
}
