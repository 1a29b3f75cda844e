/// One run of one contender on one pattern.
struct Run: Sendable {
    /// Time spent touching.
    var nanoseconds: UInt64
    /// Pages touched in that time.
    var pages: Int
    /// The first wrong byte found by the verification, if any.
    var mismatch: String?
    /// Why the run stopped early or misbehaved (its figure does not count), if it did.
    var failure: String?
    /// Which install path the run took, where the contender counts it (not a failure).
    var paths: String? = nil

    /// Whether the figure counts: the run completed and every touched byte was right.
    var verified: Bool { mismatch == nil && failure == nil }
}

/// What one run of one contender on one pattern gave.
enum RunOutcome: Sendable {
    /// The run took place.
    case measured(Run)
    /// The run could not take place (missing engine configuration, setup failure).
    case notMeasured(String)

    /// Microseconds per page, if measured.
    var microsecondsPerPage: Double? {
        guard case .measured(let run) = self, run.pages > 0 else { return nil }
        return Double(run.nanoseconds) / 1000 / Double(run.pages)
    }
}

/// The median of several repetitions of one contender on one pattern.
public struct BenchResult: Sendable, Equatable {
    /// Who ran.
    public var contender: Contender
    /// The touch order.
    public var pattern: AccessPattern
    /// Median microseconds per page over the measured repetitions.
    public var usPerPage: Double
    /// Pages per second at the median.
    public var pagesPerSecond: Double { usPerPage > 0 ? 1_000_000 / usPerPage : 0 }
    /// Whether every repetition installed exactly the right bytes in every touched page.
    /// A figure counts only if this is true.
    public var verified: Bool
    /// Microseconds per page of each measured repetition, in run order.
    public var samples: [Double]
    /// What went wrong or what the reader must know about this figure, if anything.
    public var note: String?
    /// What the reader must know about this contender whatever happened (for example
    /// that it consumes its source), if anything.
    public var remark: String? = nil
    /// Whether a repetition found a wrong byte (as opposed to stopping early, or not
    /// being verified for another reason).
    public var foundWrongBytes: Bool

    /// The result name (``Contender/rawValue``).
    public var name: String { contender.rawValue }
}

/// A contender and pattern that gave no figure, and why.
public struct NotMeasured: Sendable, Equatable {
    /// Who could not run.
    public var contender: Contender
    /// On which touch order.
    public var pattern: AccessPattern
    /// Why, for example `not available: FaultEngine has no MOVE strategy`.
    public var reason: String
}
