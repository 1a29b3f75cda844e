/// The contenders served by the engine (module `FaultEngine`).
enum EngineContenders {
    /// Runs an engine contender on a region of the bench size.
    static func run(_ contender: Contender, _ workload: Workload, _ pattern: AccessPattern) -> RunOutcome {
        .notMeasured("not available: FaultEngine does not provide the configuration for \(contender) yet")
    }

    /// A scale run: the engine's default configuration serving a region of
    /// `regionPages` pages, touched at the pages of `order`.
    static func scale(_ workload: Workload, regionPages: UInt64, order: [UInt64]) -> RunOutcome {
        .notMeasured("not available: FaultEngine does not provide its default configuration yet")
    }

    /// What a reader must know about a contender's figure (for example that it consumes its source).
    static func remark(_ contender: Contender) -> String? { nil }
}
