import FaultEngine

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
                summary: "\(contender) ≥ \(Reporting.fixed(required, 2))× \(baseline) pages/s", pattern: pattern,
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
        // The engine's cost of a 1 TiB region over a 1 GiB one, against the kernel's own
        // first-touch ratio on the same sparse layout: what the kernel's page-table
        // allocation adds on a huge region is not the engine's to remove.
        if let big = result(.scale1TiB, .random), let small = result(.scale1GiB, .random), small.usPerPage > 0,
           let kernelBig = result(.kernelFirstTouch1TiB, .random), let kernelSmall = result(.kernelFirstTouch1GiB, .random),
           kernelSmall.usPerPage > 0, kernelBig.usPerPage > 0 {
            let engine = big.usPerPage / small.usPerPage
            let kernel = kernelBig.usPerPage / kernelSmall.usPerPage
            checks.append(TargetCheck(
                summary: "scale-1tib/scale-1gib ≤ 1.10× kernel-first-touch-1tib/-1gib", pattern: .random,
                value: engine / kernel, required: 1.1, atLeast: false,
                comparable: big.verified && small.verified && kernelBig.verified && kernelSmall.verified))
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
