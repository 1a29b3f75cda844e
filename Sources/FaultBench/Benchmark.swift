import FaultEngine
import Userfaultfd

/// What to measure.
public struct BenchConfiguration: Sendable, Equatable {
    /// The region size in MiB (the source and every non-scale region).
    public var sizeMiB: Int
    /// How many times each contender runs on each pattern; figures are medians.
    public var repetitions: Int
    /// The contenders to run, in this order within each repetition.
    public var contenders: [Contender]
    /// A deliberate fault, to check the verification (tests only).
    public var corruption: Corruption?

    /// - Parameters:
    ///   - sizeMiB: the region size in MiB (default 1 GiB).
    ///   - repetitions: runs per contender and pattern (default 3).
    ///   - contenders: who runs (default all).
    ///   - corruption: a fault to inject, or nil.
    public init(sizeMiB: Int = 1024, repetitions: Int = 3, contenders: [Contender] = Contender.allCases,
                corruption: Corruption? = nil) {
        self.sizeMiB = sizeMiB
        self.repetitions = repetitions
        self.contenders = contenders
        self.corruption = corruption
    }

    /// A smoke test for CI: 4 MiB, one repetition, every contender.
    public static var quick: BenchConfiguration { BenchConfiguration(sizeMiB: 4, repetitions: 1) }

    /// The largest `sizeMiB` accepted (the source and one region must fit in memory).
    public static let maximumSizeMiB = 16 * 1024

    /// Checks the values, naming the first one that is wrong.
    public func validate() throws(BenchError) {
        if sizeMiB < 1 || sizeMiB > Self.maximumSizeMiB {
            throw BenchError("size \(sizeMiB) MiB is out of range: give 1 to \(Self.maximumSizeMiB) MiB")
        }
        if repetitions < 1 || repetitions > 100 {
            throw BenchError("repetitions \(repetitions) is out of range: give 1 to 100")
        }
        if contenders.isEmpty {
            throw BenchError("no contender to run")
        }
    }

    /// Pages touched by each scale run: those of the bench size, at most those of 1 GiB.
    var scaleTouches: Int { min(sizeMiB, 1024) << 20 / systemPageSize }
}

/// Where a bench run is.
public struct BenchProgress: Sendable {
    /// Runs finished so far, including this one.
    public var completed: Int
    /// Runs in all.
    public var total: Int
    /// The contender of the run that just finished.
    public var contender: Contender
    /// Its touch order.
    public var pattern: AccessPattern
    /// 1-based.
    public var repetition: Int
    /// Microseconds per page of this run, if it was measured.
    public var usPerPage: Double?
    /// Whether its bytes were right.
    public var verified: Bool
    /// Why it gave no figure or what went wrong, if anything.
    public var note: String?
}

/// `uffd bench`: every contender, interleaved, over the same source and touch orders.
public enum Benchmark {
    /// Runs the bench: for each repetition, every contender on every pattern in turn
    /// (A, B, C, then C, B, A, …), each run verified byte for byte.
    ///
    /// - Parameters:
    ///   - configuration: what to measure.
    ///   - progress: called after every run, on the calling thread.
    /// - Returns: the medians, with ratios and targets.
    /// - Throws: ``BenchError`` for bad configuration values or a source that cannot be built.
    ///   A contender that cannot run gives a ``NotMeasured`` entry instead.
    public static func run(
        _ configuration: BenchConfiguration,
        progress: (BenchProgress) -> Void = { _ in }
    ) throws(BenchError) -> BenchReport {
        try configuration.validate()
        let workload = try Workload(sizeMiB: configuration.sizeMiB, corruption: configuration.corruption)
        let plan = configuration.contenders.flatMap { c in c.patterns.map { (c, $0) } }
        let outcomes = runInterleaved(plan, workload, configuration, progress: progress)
        var results: [BenchResult] = []
        var notMeasured: [NotMeasured] = []
        for (index, (contender, pattern)) in plan.enumerated() {
            switch summarize(contender, pattern, outcomes[index]) {
            case .measured(let result): results.append(result)
            case .notMeasured(let missing): notMeasured.append(missing)
            }
        }
        return BenchReport(sizeMiB: configuration.sizeMiB, pageSize: workload.pageSize,
                           repetitions: configuration.repetitions, scaleTouches: configuration.scaleTouches,
                           results: results, notMeasured: notMeasured)
    }

    /// Runs every entry of `plan` once per repetition, alternating (A, B, C, then
    /// C, B, A, …); returns the outcomes of each entry in repetition order.
    static func runInterleaved(
        _ plan: [(Contender, AccessPattern)], _ workload: Workload, _ configuration: BenchConfiguration,
        progress: (BenchProgress) -> Void
    ) -> [[RunOutcome]] {
        var outcomes: [[RunOutcome]] = Array(repeating: [], count: plan.count)
        let total = plan.count * configuration.repetitions
        var completed = 0
        for repetition in 1...configuration.repetitions {
            // Odd repetitions run the plan forwards, even ones backwards (A, B, C, then
            // C, B, A): whatever running first or second does to a figure falls on
            // every contender alike.
            let order = repetition % 2 == 1 ? Array(plan.indices) : plan.indices.reversed()
            for index in order {
                let (contender, pattern) = plan[index]
                let outcome = runOnce(contender, pattern, workload, configuration)
                outcomes[index].append(outcome)
                completed += 1
                var step = BenchProgress(completed: completed, total: total, contender: contender, pattern: pattern,
                                         repetition: repetition, usPerPage: outcome.microsecondsPerPage,
                                         verified: false, note: nil)
                switch outcome {
                case .measured(let run):
                    step.verified = run.verified
                    step.note = [run.failure, run.mismatch].compactMap { $0 }.first
                case .notMeasured(let reason):
                    step.note = reason
                }
                progress(step)
            }
        }
        return outcomes
    }

    /// A contender's figure on one pattern, or why it has none.
    enum Summary {
        case measured(BenchResult)
        case notMeasured(NotMeasured)
    }

    /// The median of the repetitions of one contender on one pattern, or why there is
    /// none. Notes keep the first text of each kind, with how many repetitions had one
    /// when not all did.
    static func summarize(_ contender: Contender, _ pattern: AccessPattern,
                          _ runs: [RunOutcome]) -> Summary {
        var kinds: [(first: String, count: Int)] = Array(repeating: ("", 0), count: 4)
        func note(_ kind: Int, _ text: String?) {
            guard let text else { return }
            if kinds[kind].count == 0 { kinds[kind].first = text }
            kinds[kind].count += 1
        }
        var verified = true
        var wrongBytes = false
        for outcome in runs {
            switch outcome {
            case .measured(let run):
                verified = verified && run.verified
                wrongBytes = wrongBytes || run.mismatch != nil
                note(0, run.failure)
                note(1, run.mismatch)
                note(3, run.paths.map { "first repetition: \($0)" })
            case .notMeasured(let reason):
                verified = false
                note(2, reason)
            }
        }
        let notes = kinds.filter { $0.count > 0 }.map { kind in
            kind.count == runs.count ? kind.first : "\(kind.first) (in \(kind.count) of \(runs.count) repetitions)"
        }
        let samples = runs.compactMap(\.microsecondsPerPage)
        guard let median = Reporting.median(samples) else {
            return .notMeasured(NotMeasured(contender: contender, pattern: pattern, reason: notes.joined(separator: "; ")))
        }
        return .measured(BenchResult(contender: contender, pattern: pattern, usPerPage: median,
                                    verified: verified, samples: samples,
                                    note: notes.isEmpty ? nil : notes.joined(separator: "; "),
                                    remark: EngineContenders.remark(contender), foundWrongBytes: wrongBytes))
    }

    /// The region pages of the scale runs.
    static let pagesIn1GiB = UInt64(1 << 30 / systemPageSize)
    static let pagesIn1TiB = UInt64(1 << 40 / systemPageSize)

    static func runOnce(_ contender: Contender, _ pattern: AccessPattern, _ workload: Workload,
                        _ configuration: BenchConfiguration) -> RunOutcome {
        let pages = UInt64(workload.pageCount)
        switch contender {
        case .memcpy:
            return BaselineContenders.memcpy(workload, pattern)
        case .kernelFirstTouch:
            return BaselineContenders.kernelFirstTouch(workload, pattern)
        case .sigsegvMprotect:
            return BaselineContenders.sigsegv(workload, regionPages: pages, order: workload.order(pattern))
        case .cHandler4k:
            return BaselineContenders.cHandler(workload, chunk: 4096, regionPages: pages, order: workload.order(pattern))
        case .cHandler64k:
            return BaselineContenders.cHandler(workload, chunk: 65536, regionPages: pages, order: workload.order(pattern))
        case .scaleSigsegv1GiB, .scaleSigsegv1TiB:
            let regionPages = contender == .scaleSigsegv1GiB ? pagesIn1GiB : pagesIn1TiB
            let order = Workload.scaleOrder(regionPages: regionPages, touches: configuration.scaleTouches)
            return BaselineContenders.sigsegv(workload, regionPages: regionPages, order: order)
        case .kernelFileMmap, .kernelFileMmapWrite, .kernelFileMmapCold, .kernelFileMmapColdWrite:
            return KernelMappingContenders.fileMapping(
                workload, pattern, cold: contender == .kernelFileMmapCold || contender == .kernelFileMmapColdWrite,
                write: contender == .kernelFileMmapWrite || contender == .kernelFileMmapColdWrite)
        case .kernelFirstTouch1GiB, .kernelFirstTouch1TiB:
            let regionPages = contender == .kernelFirstTouch1GiB ? pagesIn1GiB : pagesIn1TiB
            let order = Workload.scaleOrder(regionPages: regionPages, touches: configuration.scaleTouches)
            return KernelMappingContenders.firstTouch(workload, regionPages: regionPages, order: order)
        case .scale1GiB, .scale1TiB:
            let regionPages = contender == .scale1GiB ? pagesIn1GiB : pagesIn1TiB
            let order = Workload.scaleOrder(regionPages: regionPages, touches: configuration.scaleTouches)
            return EngineContenders.scale(workload, regionPages: regionPages, order: order)
        case .swiftHandler4k, .swiftHandler64k, .swiftSigbus, .swiftMove, .swiftMinor,
             .swiftAdaptive, .swiftReplay, .swiftBest, .swiftFileCopy, .swiftFileMove,
             .swiftStagedMove:
            return EngineContenders.run(contender, workload, pattern)
        case .swiftHandler4kTraced:
            return TracedContender.run(workload, pattern)
        }
    }
}
