import FaultEngine

/// What `uffd serve-bench` measured: one model, from which both the table and `--json`
/// are written, carrying exactly the figures and ratios the table shows.
public struct ServeBenchResult: Codable, Sendable, Equatable {
    /// Restore with and without `--replay`.
    public var replay: Replay
    /// Per-client latency of concurrent clients against one client alone.
    public var isolation: Isolation

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
        func ms(_ ns: UInt64) -> String { Reporting.fixed(Double(ns) / 1e6, 2) + " ms" }
        func us(_ ns: UInt64) -> String { Reporting.fixed(Double(ns) / 1e3, 0) + " µs" }
        let r = replay
        var lines = [
            "replay (\(r.imageMiB) MiB image, \(r.touchPercent) % working set, medians of \(r.repetitions)):",
            "  first pass without --replay  \(ms(r.coldMedian))   runs: \(r.coldNanoseconds.map(ms).joined(separator: ", "))",
            "  first pass with --replay     \(ms(r.replayMedian))   runs: \(r.replayNanoseconds.map(ms).joined(separator: ", "))",
            "  speed-up                     \(Reporting.fixed(r.speedup, 2))x (target >= \(Reporting.fixed(r.speedupTarget, 0)))",
        ]
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
        return lines.joined(separator: "\n")
    }
}
