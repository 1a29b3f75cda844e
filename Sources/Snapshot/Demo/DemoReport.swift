#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Everything `uffd snapshot demo` measured, for the table and `--json`.
public struct SnapshotDemoReport: Sendable, Codable {
    /// Medians over the rounds of one method on one heap.
    public struct MethodSummary: Sendable, Codable, Hashable {
        public var method: DemoMethod
        public var transparentHugePages: Bool
        public var pauseNanoseconds: UInt64
        public var freezeNanoseconds: UInt64
        public var totalNanoseconds: UInt64
        /// CPU the snapshot used (fork: the child; uffd-wp: its two threads).
        public var cpuNanoseconds: UInt64
        public var bytesPerSecond: Double
        public var peakExtraBytes: Int64
        public var declaredExtraBytes: Int?
        public var dirtiedFraction: Double
        public var imageBytes: UInt64
        public var mismatchedPages: Int
        /// Write latency while this method's snapshots ran, and in steady state on the same heap.
        public var during: LatencySummary
        public var steady: LatencySummary
    }

    /// A full capture and a delta after `dirtiedPages` pages were written.
    public struct IncrementalRun: Sendable, Codable, Hashable {
        public var transparentHugePages: Bool
        public var fullNanoseconds: UInt64
        public var deltaNanoseconds: UInt64
        /// The delta's arm: the scan, and the copy of its pages when they fit the staging area.
        public var deltaPauseNanoseconds: UInt64
        /// Pages of the delta copied while the writers were held (0: copy before write).
        public var deltaHeldCopyPages: Int
        public var dirtiedPages: Int
        public var deltaImageBytes: UInt64
        public var mismatchedPages: Int
        public var ratio: Double
    }

    /// One of the issue's targets, with the figures it was judged on.
    public struct Target: Sendable, Codable, Hashable {
        public var name: String
        public var figures: String
        public var met: Bool
    }

    public var heapBytes: Int
    public var writers: Int
    public var rounds: Int
    public var stagingBytes: Int
    public var imageDirectory: String
    public var crc32cBytesPerSecond: Double
    public var crc32cHardware: Bool
    /// AnonHugePages of the process once each heap was populated, by THP setting ("on"/"off"):
    /// whether the kernel really backed the heap with huge pages.
    public var anonHugePagesBytes: [String: Int64] = [:]
    public var runs: [DemoRun] = []
    public var summaries: [MethodSummary] = []
    public var incremental: [IncrementalRun] = []
    public var tracking: [TrackingRun] = []
    /// Median overhead per dirtied page of each tracking method.
    public var trackingNanosecondsPerPage: [String: Double] = [:]
    public var targets: [Target] = []

    func summary(_ m: DemoMethod, thp: Bool) -> MethodSummary? {
        summaries.first { $0.method == m && $0.transparentHugePages == thp }
    }

    /// The report as a table.
    public func table() -> String {
        var out: [String] = []
        out.append("heap \(heapBytes >> 20) MiB, \(writers) writer(s), \(rounds) round(s), staging \(stagingBytes >> 20) MiB, images in \(imageDirectory); "
            + "CRC32C \(String(format1(crc32cBytesPerSecond / 1e9))) GB/s (\(crc32cHardware ? "SSE4.2" : "table"))")
        for (k, v) in anonHugePagesBytes.sorted(by: { $0.key < $1.key }) {
            out.append("THP \(k): \(v >> 20) MiB of the heap in transparent huge pages after populating")
        }
        out.append("")
        out.append(row(["method", "THP", "pause ms", "freeze ms", "total ms", "CPU ms", "GB/s", "extra MiB", "dirtied", "p50/p99/p99.9/max µs during", "p50/p99/p99.9/max µs steady", "verified"]))
        for s in summaries {
            let extra = s.declaredExtraBytes.map { "\(format1(Double(s.peakExtraBytes) / 1048576)) (\(format1(Double($0) / 1048576)))" }
                ?? format1(Double(s.peakExtraBytes) / 1048576)
            out.append(row([s.method.rawValue, s.transparentHugePages ? "on" : "off", format3(Double(s.pauseNanoseconds) / 1e6),
                            format3(Double(s.freezeNanoseconds) / 1e6),
                            format1(Double(s.totalNanoseconds) / 1e6), format1(Double(s.cpuNanoseconds) / 1e6),
                            format3(s.bytesPerSecond / 1e9), extra,
                            "\(Int(s.dirtiedFraction * 100))%", latency(s.during), latency(s.steady),
                            s.mismatchedPages == 0 ? "yes" : "NO (\(s.mismatchedPages) pages)"]))
        }
        out.append("  (pause: writers held, parking them included, the demo's copy of its version log left out (see --json);")
        out.append("   freeze: fork(), the write-protect ioctls, or the copy;")
        out.append("   CPU: the snapshot's own, the forked child's or the capture's threads' (image writer, fault handler), apart from the load on the machine)")
        out.append("  (medians over rounds; extra = peak Pss growth of the process(es), in brackets what the capture declares: staging + metadata)")
        if !incremental.isEmpty {
            out.append("")
            out.append(row(["incremental", "THP", "full ms", "delta ms", "ratio", "delta pause ms", "held-copy pages", "dirtied pages", "delta MiB", "verified"]))
            for i in incremental {
                out.append(row(["uffd-wp", i.transparentHugePages ? "on" : "off", format1(Double(i.fullNanoseconds) / 1e6),
                                format1(Double(i.deltaNanoseconds) / 1e6), format3(i.ratio), format3(Double(i.deltaPauseNanoseconds) / 1e6),
                                "\(i.deltaHeldCopyPages)", "\(i.dirtiedPages)",
                                format1(Double(i.deltaImageBytes) / 1048576), i.mismatchedPages == 0 ? "yes" : "NO"]))
            }
        }
        if !trackingNanosecondsPerPage.isEmpty {
            out.append("")
            out.append("write tracking, overhead per dirtied page (median of \(rounds > 0 ? tracking.count / max(1, TrackingMethod.allCases.count) : 0) rounds):")
            for m in TrackingMethod.allCases {
                if let ns = trackingNanosecondsPerPage[m.rawValue] { out.append("  \(pad(m.rawValue, 24)) \(format1(ns)) ns") }
            }
        }
        out.append("")
        out.append("targets:")
        for t in targets { out.append("  [\(t.met ? "met" : "NOT met")] \(t.name): \(t.figures)") }
        return out.joined(separator: "\n")
    }

    private func latency(_ l: LatencySummary) -> String {
        "\(format1(Double(l.p50Nanoseconds) / 1000))/\(format1(Double(l.p99Nanoseconds) / 1000))/\(format1(Double(l.p999Nanoseconds) / 1000))/\(format1(Double(l.maxNanoseconds) / 1000))"
    }

    private func row(_ cells: [String]) -> String {
        let widths = [18, 4, 9, 9, 9, 9, 7, 18, 8, 28, 28, 10]
        return cells.enumerated().map { i, c in pad(c, i < widths.count ? widths[i] : 10) }
            .joined(separator: " ")
    }
}

func pad(_ s: String, _ width: Int) -> String { s.count >= width ? s : s + String(repeating: " ", count: width - s.count) }

func format1(_ x: Double) -> String { formatFixed(x, 1) }
func format3(_ x: Double) -> String { formatFixed(x, 3) }

func formatFixed(_ x: Double, _ digits: Int) -> String {
    guard x.isFinite else { return "-" }
    var scale = 1.0
    for _ in 0..<digits { scale *= 10 }
    let r = (abs(x) * scale).rounded()
    let whole = Int(r / scale)
    var frac = String(Int(r.truncatingRemainder(dividingBy: scale)))
    while frac.count < digits { frac = "0" + frac }
    return (x < 0 ? "-" : "") + "\(whole)" + (digits > 0 ? "." + frac : "")
}

func median<T: Comparable>(_ values: [T]) -> T? {
    guard !values.isEmpty else { return nil }
    return values.sorted()[values.count / 2]
}
