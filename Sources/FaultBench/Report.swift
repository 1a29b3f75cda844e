/// The outcome of a bench run: medians, ratios, targets.
public struct BenchReport: Sendable, Equatable {
    /// The region size in MiB.
    public var sizeMiB: Int
    /// The page size in bytes.
    public var pageSize: Int
    /// Runs per contender and pattern.
    public var repetitions: Int
    /// Pages touched by each scale run.
    public var scaleTouches: Int
    /// One entry per contender and pattern that gave a figure, in run order.
    public var results: [BenchResult]
    /// Contenders and patterns that gave no figure, and why.
    public var notMeasured: [NotMeasured]

    /// The result of `contender` on `pattern`, if it was measured.
    public func result(_ contender: Contender, _ pattern: AccessPattern) -> BenchResult? {
        results.first { $0.contender == contender && $0.pattern == pattern }
    }

    /// pages/s of `contender` divided by pages/s of `baseline` on the same pattern.
    public func ratio(_ contender: Contender, to baseline: Contender, _ pattern: AccessPattern) -> Double? {
        guard let a = result(contender, pattern), let b = result(baseline, pattern), a.usPerPage > 0 else { return nil }
        return b.usPerPage / a.usPerPage
    }

    /// The targets the engine is held to, for every pair measured in this run.
    public var targets: [TargetCheck] {
        var checks: [TargetCheck] = []
        func add(_ contender: Contender, _ baseline: Contender, _ pattern: AccessPattern, atLeast required: Double) {
            guard let a = result(contender, pattern), let b = result(baseline, pattern),
                  let value = ratio(contender, to: baseline, pattern) else { return }
            // A baseline that stopped early (the SIGSEGV scheme out of VMAs) but installed
            // only right bytes still gives a per-page cost for the pages it did.
            let partial = !b.verified && !b.foundWrongBytes && b.contender == .sigsegvMprotect
            checks.append(TargetCheck(
                summary: "\(contender) ≥ \(fixed(required, 2))× \(baseline) pages/s", pattern: pattern,
                value: value, required: required, atLeast: true, comparable: a.verified && (b.verified || partial),
                caveat: partial ? "against the figure \(baseline) reached before it stopped" : nil))
        }
        for pattern in AccessPattern.allCases {
            add(.swiftHandler4k, .cHandler4k, pattern, atLeast: 0.95)
            add(.swiftHandler64k, .cHandler64k, pattern, atLeast: 0.95)
            add(.swiftHandler4kTraced, .swiftHandler4k, pattern, atLeast: 0.95)
            add(.swiftBest, .kernelFirstTouch, pattern, atLeast: 2.0)
            add(.swiftBest, .memcpy, pattern, atLeast: 0.5)
        }
        add(.swiftBest, .sigsegvMprotect, .random, atLeast: 1.5)
        if let big = result(.scale1TiB, .random), let small = result(.scale1GiB, .random), small.usPerPage > 0 {
            checks.append(TargetCheck(
                summary: "scale-1tib ≤ 1.10× scale-1gib µs/page", pattern: .random,
                value: big.usPerPage / small.usPerPage, required: 1.1, atLeast: false,
                comparable: big.verified && small.verified))
        }
        return checks
    }
}

/// One target of the engine checked against this run's figures.
public struct TargetCheck: Sendable, Equatable {
    /// The target in words, for example `swift-best ≥ 2.00× kernel-first-touch pages/s`.
    public var summary: String
    /// The touch order both figures were measured with.
    public var pattern: AccessPattern
    /// The measured ratio.
    public var value: Double
    /// The bound it must reach.
    public var required: Double
    /// Whether `value` must be at least (true) or at most (false) `required`.
    public var atLeast: Bool
    /// Whether the comparison counts: the contender's figure is verified, and the
    /// baseline's is verified or (the SIGSEGV scheme out of VMAs) stopped early with right bytes.
    public var comparable: Bool
    /// What limits the comparison, if anything.
    public var caveat: String? = nil

    /// Whether the target is met by verified figures.
    public var met: Bool { comparable && (atLeast ? value >= required : value <= required) }
}

// MARK: - Table

extension BenchReport {
    /// A readable table: µs per page, pages/s, ratios (of pages/s) to the C twin, to
    /// `kernel-first-touch` and to `memcpy` on the same pattern, verification, then
    /// the notes and the targets.
    public func table() -> String {
        var rows: [[String]] = [["contender", "pattern", "µs/page", "pages/s", "vs C twin", "vs kernel", "vs memcpy", "verified"]]
        var notes: [String] = []
        func mark(_ text: String) -> String {
            if let index = notes.firstIndex(of: text) { return " [\(index + 1)]" }
            notes.append(text)
            return " [\(notes.count)]"
        }
        func ratioText(_ value: Double?) -> String { value.map { fixed($0, 2) + "×" } ?? "-" }
        var order: [(Contender, AccessPattern)] = []
        for c in Contender.allCases {
            for p in c.patterns where result(c, p) != nil || notMeasured.contains(where: { $0.contender == c && $0.pattern == p }) {
                order.append((c, p))
            }
        }
        for (c, p) in order {
            if let r = result(c, p) {
                let twin = c.cTwin.flatMap { ratio(c, to: $0, p) }
                let kernel = c.isScaleRun || c == .kernelFirstTouch ? nil : ratio(c, to: .kernelFirstTouch, p)
                let limit = c.isScaleRun || c == .memcpy ? nil : ratio(c, to: .memcpy, p)
                var verified = r.verified ? "yes" : "NO"
                if let note = r.note { verified += mark("\(c) \(p): \(note)") }
                if let remark = r.remark { verified += mark("\(c): \(remark)") }
                rows.append([c.rawValue, p.rawValue, fixed(r.usPerPage, 2), grouped(r.pagesPerSecond),
                             ratioText(twin), ratioText(kernel), ratioText(limit), verified])
            } else if let missing = notMeasured.first(where: { $0.contender == c && $0.pattern == p }) {
                rows.append([c.rawValue, p.rawValue, "-", "-", "-", "-", "-", "no figure" + mark("\(c): \(missing.reason)")])
            }
        }
        var text = "uffd bench: \(sizeMiB) MiB regions (\(sizeMiB << 20 / pageSize) pages of \(pageSize) bytes), "
            + "scale runs touch \(scaleTouches) pages; medians of \(repetitions) repetition(s); ratios are of pages/s\n"
        text += layout(rows, rightAligned: [2, 3, 4, 5, 6])
        if !notes.isEmpty {
            text += "\nnotes:\n"
            for (i, note) in notes.enumerated() { text += "  [\(i + 1)] \(note)\n" }
        }
        let checks = targets
        if !checks.isEmpty {
            text += "\ntargets:\n"
            for check in checks {
                let status = !check.comparable ? "not comparable (a figure is unverified)" : check.met ? "met" : "NOT met"
                let caveat = check.caveat.map { " (\($0))" } ?? ""
                text += "  \(check.summary) (\(check.pattern)): \(fixed(check.value, 3))× — \(status)\(caveat)\n"
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

/// `value` with exactly `decimals` decimals (no Foundation).
func fixed(_ value: Double, _ decimals: Int) -> String {
    guard value.isFinite else { return value.isNaN ? "nan" : (value < 0 ? "-inf" : "inf") }
    var scale = 1.0
    for _ in 0..<decimals { scale *= 10 }
    let negative = value < 0
    let scaled = Int64((abs(value) * scale).rounded())
    let whole = scaled / Int64(scale)
    var text = (negative && scaled != 0 ? "-" : "") + String(whole)
    if decimals > 0 {
        let fraction = String(scaled % Int64(scale))
        text += "." + String(repeating: "0", count: decimals - fraction.count) + fraction
    }
    return text
}

/// A whole number with thin groups of three digits: `1 234 567`.
func grouped(_ value: Double) -> String {
    guard value.isFinite else { return fixed(value, 0) }
    let digits = Array(String(Int64(value.rounded())))
    var text = ""
    for (i, d) in digits.enumerated() {
        if i > 0 && (digits.count - i) % 3 == 0 { text.append(" ") }
        text.append(d)
    }
    return text
}
