import FaultEngine
import Userfaultfd

/// What `uffd serve-bench` measured: one model, from which both the table and `--json`
/// are written, carrying exactly the figures and ratios the table shows.
public struct ServeBenchResult: Codable, Sendable, Equatable {
    /// Restore with and without `--replay` (nil when not measured).
    public var replay: Replay?
    /// Per-client latency of concurrent clients against one client alone (nil when not measured).
    public var isolation: Isolation?
    /// A restore of the whole image through the daemon against `MAP_PRIVATE` of the
    /// file (nil when not measured).
    public var restore: Restore?

    /// The measurements `uffd serve-bench` can take.
    public enum Part: String, CaseIterable, Codable, Sendable {
        case replay, isolation, restore
    }

    /// A Firecracker-style restore: every 4 KiB of the image touched once after the
    /// hand-over, through the daemon with 4 KiB and 2 MiB pages, and through a
    /// `MAP_PRIVATE` mapping of the page-cached image file, the baseline.
    public struct Restore: Codable, Sendable, Equatable {
        public var imageMiB: Int
        public var repetitions: Int
        /// Every contender for the write pass, then for the read pass; the baseline first.
        public var rows: [RestoreRow]
        /// Contenders left out, with the reason (2 MiB pages without free huge pages).
        public var skipped: [String]
    }

    /// One contender's restores, for one pass.
    public struct RestoreRow: Codable, Sendable, Equatable {
        public var contender: String
        /// The guest's page size in bytes (`MAP_PRIVATE` of a file: base pages).
        public var pageSize: Int
        /// `write` (a word stored per 4 KiB) or `read` (a word loaded per 4 KiB).
        public var pass: String
        /// Bytes restored per run.
        public var bytes: Int
        /// Each run, in run order: from the start of the hand-over (or the file's
        /// opening) to the end of the pass.
        public var nanoseconds: [UInt64]
        public var median: UInt64
        /// `median` scaled to one GiB, in seconds.
        public var secondsPerGiB: Double
        /// The baseline's median over this one's: above 1, faster than `MAP_PRIVATE`.
        public var speedOverMapPrivate: Double
        /// The target this row is held to, in words (write passes through the daemon).
        public var target: String?
        /// Whether the median meets ``target``.
        public var met: Bool?
        /// Through the daemon: the strategy it served the client with, and the faults
        /// that reached it in the last run (the rest were installed ahead of them).
        public var daemonStrategy: String?
        public var daemonFaults: UInt64?

        public init(contender: String, pageSize: Int, pass: String, bytes: Int, nanoseconds: [UInt64], mapPrivateMedian: UInt64) {
            self.contender = contender
            self.pageSize = pageSize
            self.pass = pass
            self.bytes = bytes
            self.nanoseconds = nanoseconds
            median = Reporting.median(nanoseconds)
            secondsPerGiB = Double(median) / 1e9 * Double(1 << 30) / Double(max(bytes, 1))
            speedOverMapPrivate = Double(mapPrivateMedian) / Double(max(median, 1))
            if pass == "write" && contender.hasPrefix("uffd") {
                if pageSize == systemPageSize {
                    target = "no slower than MAP_PRIVATE (>= 1.00x)"
                    met = speedOverMapPrivate >= 1
                } else {
                    target = "<= 0.50 s per GiB"
                    met = secondsPerGiB <= 0.5
                }
            }
        }
    }

    /// The time from the hand-over to the end of the first pass over a working set.
    public struct Replay: Codable, Sendable, Equatable {
        public var imageMiB: Int
        public var touchPercent: Int
        public var repetitions: Int
        /// Each restore without `--replay`, in run order.
        public var coldNanoseconds: [UInt64]
        /// Each restore with `--replay`, in run order (alternating with the cold ones).
        public var replayNanoseconds: [UInt64]
        public var coldMedian: UInt64
        public var replayMedian: UInt64
        /// `coldMedian / replayMedian`.
        public var speedup: Double
        /// The speed-up the daemon is held to.
        public var speedupTarget: Double

        public init(imageMiB: Int, touchPercent: Int, repetitions: Int,
                    coldNanoseconds: [UInt64], replayNanoseconds: [UInt64]) {
            self.imageMiB = imageMiB
            self.touchPercent = touchPercent
            self.repetitions = repetitions
            self.coldNanoseconds = coldNanoseconds
            self.replayNanoseconds = replayNanoseconds
            coldMedian = Reporting.median(coldNanoseconds)
            replayMedian = Reporting.median(replayNanoseconds)
            speedup = Double(coldMedian) / Double(max(replayMedian, 1))
            speedupTarget = 3
        }
    }

    /// The isolation measurements, one per handler scheduling policy.
    public struct Isolation: Codable, Sendable, Equatable {
        public var clients: Int
        public var clientMiB: Int
        public var cpus: Int
        public var runs: [IsolationRun]
    }

    /// One client alone (several runs), then `clients` at once, with one scheduling policy.
    public struct IsolationRun: Codable, Sendable, Equatable {
        /// The handler threads' `SCHED_FIFO` priority, 0 for time-shared.
        public var handlerPriority: Int
        /// Why real-time scheduling did not take effect, if it did not.
        public var realTimeRefused: String?
        /// The p99 fault latency of each run of one client alone.
        public var aloneP99Nanoseconds: [UInt64]
        /// The p99 of each concurrent client.
        public var concurrentP99Nanoseconds: [UInt64]
        public var aloneMedian: UInt64
        public var concurrentMedian: UInt64
        public var concurrentWorst: UInt64
        /// `concurrentWorst / aloneMedian`.
        public var worstOverAlone: Double

        public init(handlerPriority: Int, realTimeRefused: String?,
                    aloneP99Nanoseconds: [UInt64], concurrentP99Nanoseconds: [UInt64]) {
            self.handlerPriority = handlerPriority
            self.realTimeRefused = realTimeRefused
            self.aloneP99Nanoseconds = aloneP99Nanoseconds
            self.concurrentP99Nanoseconds = concurrentP99Nanoseconds
            aloneMedian = Reporting.median(aloneP99Nanoseconds)
            concurrentMedian = Reporting.median(concurrentP99Nanoseconds)
            concurrentWorst = concurrentP99Nanoseconds.max() ?? 0
            worstOverAlone = Double(concurrentWorst) / Double(max(aloneMedian, 1))
        }

        /// The policy in words.
        public var policy: String { Self.policy(handlerPriority) }

        static func policy(_ priority: Int) -> String {
            priority == 0 ? "time-shared handlers" : "SCHED_FIFO \(priority) handlers"
        }
    }

    /// The result as JSON (``Reporting/json(_:)``).
    public var json: String { Reporting.json(self) }

    /// The result as the table `uffd serve-bench` prints.
    public var table: String {
        var lines: [String] = []
        if let replay { lines += Self.lines(replay) }
        if let isolation { lines += Self.lines(isolation) }
        if let restore { lines += Self.lines(restore) }
        return lines.joined(separator: "\n")
    }

    static func ms(_ ns: UInt64) -> String { Reporting.fixed(Double(ns) / 1e6, 2) + " ms" }
    static func us(_ ns: UInt64) -> String { Reporting.fixed(Double(ns) / 1e3, 0) + " µs" }

    static func lines(_ r: Restore) -> [String] {
        var lines = ["restore of the whole \(r.imageMiB) MiB image (a word per 4 KiB after the hand-over, medians of \(r.repetitions)):"]
        let width = max(r.rows.map(\.contender.count).max() ?? 0, 10)
        for row in r.rows {
            var line = "  \(row.pass.padding(5)) \(row.contender.padding(width))  \(ms(row.median).leftPadding(11))  "
                + "\(Reporting.fixed(row.secondsPerGiB, 3)) s/GiB  \(Reporting.fixed(row.speedOverMapPrivate, 2))x MAP_PRIVATE"
            if let target = row.target, let met = row.met { line += "  target \(target): \(met ? "met" : "missed")" }
            lines.append(line)
            var runs = "        runs: \(row.nanoseconds.map(ms).joined(separator: ", "))"
            if let strategy = row.daemonStrategy, let faults = row.daemonFaults {
                runs += "; served with \(strategy), \(faults) faults"
            }
            lines.append(runs)
        }
        for why in r.skipped { lines.append("  skipped: \(why)") }
        return lines
    }

    static func lines(_ r: Replay) -> [String] {
        [
            "replay (\(r.imageMiB) MiB image, \(r.touchPercent) % working set, medians of \(r.repetitions)):",
            "  first pass without --replay  \(ms(r.coldMedian))   runs: \(r.coldNanoseconds.map(ms).joined(separator: ", "))",
            "  first pass with --replay     \(ms(r.replayMedian))   runs: \(r.replayNanoseconds.map(ms).joined(separator: ", "))",
            "  speed-up                     \(Reporting.fixed(r.speedup, 2))x (target >= \(Reporting.fixed(r.speedupTarget, 0)))",
        ]
    }

    static func lines(_ isolation: Isolation) -> [String] {
        var lines: [String] = []
        for i in isolation.runs {
            lines += [
                "isolation (\(isolation.clients) clients of \(isolation.clientMiB) MiB at once, \(isolation.cpus) CPUs, \(i.policy)):",
                "  p99 of one client alone      \(us(i.aloneMedian))   runs: \(i.aloneP99Nanoseconds.map(us).joined(separator: ", "))",
                "  per-client p99, concurrent   median \(us(i.concurrentMedian)), worst \(us(i.concurrentWorst))",
                "                               \(i.concurrentP99Nanoseconds.sorted().map(us).joined(separator: ", "))",
                "  worst concurrent / alone     \(Reporting.fixed(i.worstOverAlone, 1))x",
            ]
            if let why = i.realTimeRefused { lines.append("  note: \(why)") }
        }
        return lines
    }
}

extension String {
    fileprivate func padding(_ width: Int) -> String { self + String(repeating: " ", count: max(0, width - count)) }
    fileprivate func leftPadding(_ width: Int) -> String { String(repeating: " ", count: max(0, width - count)) + self }
}
