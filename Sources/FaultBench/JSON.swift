import FaultEngine
// The `--json` form of a bench report, written without Foundation.

extension BenchReport {
    /// The report as JSON:
    ///
    /// ```json
    /// { "sizeMiB": 1024, "pageSize": 4096, "repetitions": 3, "scaleTouches": 262144,
    ///   "results": [ { "name": "c-handler-4k", "pattern": "random", "usPerPage": 14.2,
    ///                  "pagesPerSecond": 70422.5, "verified": true }, … ],
    ///   "notes": [ { "name": …, "pattern": …, "note": … } ],
    ///   "notMeasured": [ { "name": …, "pattern": …, "reason": … } ],
    ///   "targets": [ { "target": …, "pattern": …, "ratio": …, "required": …, "comparable": …, "met": … } ] }
    /// ```
    ///
    /// `results` holds exactly the five keys shown for every contender and pattern that
    /// gave a figure; a figure counts only where `verified` is true.
    public func json() -> String {
        var out = "{\n"
        out += "  \"sizeMiB\": \(sizeMiB),\n  \"pageSize\": \(pageSize),\n"
        out += "  \"repetitions\": \(repetitions),\n  \"scaleTouches\": \(scaleTouches),\n"
        out += "  \"results\": " + array(results.map { r in
            "    {\"name\": \(quoted(r.name)), \"pattern\": \(quoted(r.pattern.rawValue)), "
                + "\"usPerPage\": \(number(r.usPerPage, 4)), \"pagesPerSecond\": \(number(r.pagesPerSecond, 1)), "
                + "\"verified\": \(r.verified)}"
        }) + ",\n"
        out += "  \"notes\": " + array(results.compactMap { r in
            let text = [r.note, r.remark].compactMap { $0 }.joined(separator: "; ")
            if text.isEmpty { return nil }
            return "    {\"name\": \(quoted(r.name)), \"pattern\": \(quoted(r.pattern.rawValue)), \"note\": \(quoted(text))}"
        }) + ",\n"
        out += "  \"notMeasured\": " + array(notMeasured.map { m in
            "    {\"name\": \(quoted(m.contender.rawValue)), \"pattern\": \(quoted(m.pattern.rawValue)), "
                + "\"reason\": \(quoted(m.reason))}"
        }) + ",\n"
        out += "  \"targets\": " + array(targets.map { t in
            "    {\"target\": \(quoted(t.summary)), \"pattern\": \(quoted(t.pattern.rawValue)), "
                + "\"ratio\": \(number(t.value, 4)), \"required\": \(number(t.required, 2)), "
                + "\"comparable\": \(t.comparable), \"met\": \(t.met)"
                + (t.caveat.map { ", \"caveat\": \(quoted($0))" } ?? "") + "}"
        }) + "\n}\n"
        return out
    }
}

/// A JSON array of already-indented items, one per line (`[]` when empty).
func array(_ items: [String]) -> String {
    items.isEmpty ? "[]" : "[\n" + items.joined(separator: ",\n") + "\n  ]"
}

/// A JSON number rounded to `decimals` decimals; non-finite values become null.
func number(_ value: Double, _ decimals: Int) -> String {
    guard value.isFinite else { return "null" }
    return fixed(value, decimals)
}

/// A JSON string literal.
func quoted(_ text: String) -> String { jsonQuoted(text) }
