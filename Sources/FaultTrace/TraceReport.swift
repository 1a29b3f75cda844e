import FaultEngine

/// What a trace comes to: the numbers behind the rendered page, the terminal summary
/// and `--json` (one model, encoded by `Reporting.json`).
public struct TraceReport: Codable, Sendable, Equatable {
    /// How the numbers are binned.
    public struct Options: Sendable, Equatable {
        /// Time bins across the heat map and the working-set curve.
        public var timeBins: Int
        /// About how many address rows the heat map has, shared among the regions by size.
        public var addressRows: Int
        /// First-touch order entries listed (the order's length is always reported).
        public var orderEntries: Int

        public init(timeBins: Int = 100, addressRows: Int = 128, orderEntries: Int = 64) {
            self.timeBins = max(1, min(timeBins, 2000))
            self.addressRows = max(1, min(addressRows, 2000))
            self.orderEntries = max(0, orderEntries)
        }
    }

    public struct Region: Codable, Sendable, Equatable {
        public var index: Int
        public var label: String
        public var space: Int
        public var start: UInt64
        public var pages: Int
        public var writeTracked: Bool
        /// Distinct pages first touched (served faults).
        public var touchedPages: Int
        /// Page writes counted by the write samples (a page written in n intervals counts n times).
        public var pageWrites: Int
    }

    public struct CurvePoint: Codable, Sendable, Equatable {
        /// The end of the time bin, in nanoseconds since the trace began.
        public var timeNanoseconds: UInt64
        /// Distinct pages touched by then.
        public var pages: Int
        /// Page writes counted in this bin.
        public var pageWrites: Int
    }

    public struct LatencyBucket: Codable, Sendable, Equatable {
        /// Faults with `fromNanoseconds <= latency < toNanoseconds`.
        public var fromNanoseconds: UInt64
        public var toNanoseconds: UInt64
        public var count: Int
    }

    public struct Latency: Codable, Sendable, Equatable {
        public var count: Int
        public var p50Nanoseconds: UInt64
        public var p90Nanoseconds: UInt64
        public var p99Nanoseconds: UInt64
        public var maxNanoseconds: UInt64
        /// Power-of-two buckets from the smallest latency's to the largest's.
        public var buckets: [LatencyBucket]
    }

    public struct OrderEntry: Codable, Sendable, Equatable {
        /// Position in the first-touch order, from 0.
        public var order: Int
        public var region: Int
        /// The page's index in its region.
        public var page: Int
        public var address: UInt64
        /// Where a replay reads it from in the source.
        public var sourceOffset: UInt64
        public var timeNanoseconds: UInt64
    }

    public struct HeatRegion: Codable, Sendable, Equatable {
        public var region: Int
        /// Pages each row covers (the last row may cover fewer).
        public var pagesPerRow: Int
        /// First touches per row and time bin (`touches[row][bin]`).
        public var touches: [[Int]]
        /// Page writes per row and time bin.
        public var writes: [[Int]]
    }

    public struct HeatMap: Codable, Sendable, Equatable {
        public var timeBins: Int
        public var binNanoseconds: UInt64
        public var regions: [HeatRegion]
        /// The largest cell value (touches + writes).
        public var maxCell: Int
    }

    public var pageSize: Int
    public var durationNanoseconds: UInt64
    /// Fault records in the trace (first touches and write-protect faults).
    public var faults: Int
    public var distinctPages: Int
    public var pageWrites: Int
    public var writeSamples: Int
    public var droppedRecords: UInt64
    /// Fault records outside every region (not drawn).
    public var faultsOutsideRegions: Int
    public var regions: [Region]
    public var workingSet: [CurvePoint]
    public var latency: Latency
    /// The pages in first-touch order: what a replay would prefetch, and in what order.
    public var firstTouchOrderLength: Int
    public var firstTouchOrder: [OrderEntry]
    public var heatMap: HeatMap
}

extension TraceReport {
    /// The report as JSON, encoded as every report of the package is (`Reporting.json`).
    public func json() -> String { Reporting.json(self) }
}
