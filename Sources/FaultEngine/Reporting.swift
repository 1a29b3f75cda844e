#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// What every report of the package (statistics, benchmarks) shares: one JSON
/// encoding, one median, one way to print a number. Not used on the fault path.
public enum Reporting {
    /// Encodes `value` as the package's reports are written: pretty-printed, keys sorted,
    /// an absent optional left out, a number that is not finite written as the string
    /// `"nan"`, `"inf"` or `"-inf"`.
    ///
    /// - Parameter value: a report model.
    /// - Returns: the JSON text, ending in a newline.
    public static func json<T: Encodable>(_ value: T) -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        encoder.nonConformingFloatEncodingStrategy = .convertToString(
            positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
        do {
            return String(decoding: try encoder.encode(value), as: UTF8.self) + "\n"
        } catch {
            // Only a model whose own encode(to:) throws gets here; say so in the output.
            return "{\"encodingError\": \"\(error)\"}\n"
        }
    }

    /// The median of `values`: the middle value, or the mean of the middle two for an
    /// even count; nil when there are none.
    ///
    /// - Parameter values: samples in any order.
    /// - Returns: their median, or nil for an empty array.
    public static func median(_ values: [Double]) -> Double? {
        if values.isEmpty { return nil }
        let sorted = values.sorted()
        let mid = sorted.count / 2
        return sorted.count % 2 == 1 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2
    }

    /// The median of whole numbers (nanoseconds, counts), rounded to the nearest.
    ///
    /// - Parameter values: samples in any order.
    /// - Returns: their median, or 0 for an empty array.
    public static func median(_ values: [UInt64]) -> UInt64 {
        let samples: [Double] = values.map { Double($0) }
        guard let middle: Double = median(samples) else { return 0 }
        return UInt64(middle.rounded())
    }

    /// `value` with exactly `decimals` decimals: `fixed(2.5, 2)` is `"2.50"`.
    ///
    /// - Parameters:
    ///   - value: the number; `nan`, `inf` and `-inf` are written as such.
    ///   - decimals: digits after the point (0 for none).
    /// - Returns: the text.
    public static func fixed(_ value: Double, _ decimals: Int) -> String {
        guard value.isFinite else { return value.isNaN ? "nan" : (value < 0 ? "-inf" : "inf") }
        var scale = 1.0
        for _ in 0..<max(decimals, 0) { scale *= 10 }
        let scaled = (abs(value) * scale).rounded()
        guard scaled < 9e18 else { return String(value) }
        let units = Int64(scaled)
        let whole = units / Int64(scale)
        var text = (value < 0 && units != 0 ? "-" : "") + String(whole)
        if decimals > 0 {
            let fraction = String(units % Int64(scale))
            text += "." + String(repeating: "0", count: decimals - fraction.count) + fraction
        }
        return text
    }

    /// A whole number in groups of three digits: `1 234 567`.
    ///
    /// - Parameter value: the number, rounded to a whole one.
    /// - Returns: the text.
    public static func grouped(_ value: Double) -> String {
        guard value.isFinite, abs(value) < 9e18 else { return fixed(value, 0) }
        let rounded = Int64(value.rounded())
        let digits = Array(String(rounded.magnitude))
        var text = rounded < 0 ? "-" : ""
        for (i, d) in digits.enumerated() {
            if i > 0 && (digits.count - i) % 3 == 0 { text.append(" ") }
            text.append(d)
        }
        return text
    }
}
