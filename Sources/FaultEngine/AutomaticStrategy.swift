import Userfaultfd

/// Which concrete configuration a server runs, and why.
///
/// For the ``FaultServerConfiguration/Strategy/automatic`` strategy the engine chooses
/// when the server is created; for any other the configuration is taken as given.
public struct StrategyChoice: Sendable, Hashable, CustomStringConvertible {
    /// The configuration the server runs (never ``FaultServerConfiguration/Strategy/automatic``).
    public var configuration: FaultServerConfiguration
    /// Why: the memory, features and source facts that decided it.
    public var reason: String

    public var description: String { "\(configuration.strategy): \(reason)" }
}

extension FaultServerConfiguration {
    /// The pages an automatic server's faults start with (64 KiB of base pages).
    static let automaticFaultChunkPages = 16
    /// The largest chunk an automatic server installs at once: 2 MiB of base pages.
    static let automaticMaxChunkPages = 512

    /// The uffd features ``Strategy/automatic`` can use on memory of `kind`: ask for
    /// them as preferred features in the handshake (`Userfaultfd.Options.preferring`).
    ///
    /// For anonymous memory that is FEATURE_SIGBUS (faults resolved in the faulting
    /// thread) and MOVE; enable FEATURE_SIGBUS only on a uffd whose faulting threads are
    /// in this process (a SIGBUS in another process finds no resolver there), and not
    /// where the process handles SIGBUS itself. For shmem and hugetlb memory it is MINOR
    /// (with MISSING) for `UFFDIO_CONTINUE`.
    public static func automaticFeatures(for kind: MemoryMapping.Kind) -> Userfaultfd.Features {
        switch kind {
        case .anonymous: return [.sigbus, .move]
        case .shmem: return [.minorShmem, .missingShmem, .move]
        case .hugetlb: return [.minorHugetlbfs, .missingHugetlbfs]
        }
    }

    /// Resolves ``Strategy/automatic`` for memory served with `features`, `regions` and a
    /// source whose properties are given; any other strategy comes back as it is.
    ///
    /// - Parameters:
    ///   - features: the features the uffd was handshaken with.
    ///   - regions: the regions to serve (a page-cache alias on every one means shmem
    ///     or hugetlb memory whose page cache the server can fill).
    ///   - sourceIsMovable: whether the source gives its pages up to `UFFDIO_MOVE`.
    ///   - sourceIsSignalSafe: whether the SIGBUS resolver can read the source itself.
    func resolved(features: Userfaultfd.Features, regions: [ServedRegion], sourceIsMovable: Bool,
                  sourceIsSignalSafe: Bool) -> StrategyChoice {
        guard strategy == .automatic else { return StrategyChoice(configuration: self, reason: "configured") }
        var chosen = self
        chosen.backgroundPopulate = true
        let maxPages = Self.automaticMaxChunkPages
        if case .none = prefetch { chosen.prefetch = .adaptive(maxPages: maxPages) }
        let huge = pageSize != systemPageSize
        let aliased = !regions.isEmpty && regions.allSatisfy { $0.pageCacheAlias != nil }
        let minorFeature: Userfaultfd.Features = huge ? .minorHugetlbfs : .minorShmem
        let memory = huge ? "hugetlb" : "shmem"
        let start = Self.automaticFaultChunkPages
        if features.contains(.sigbus) {
            // Every fault of this uffd raises SIGBUS: only the in-thread resolver serves it.
            chosen.strategy = .sigbus(chunkPages: start)
            let how = sourceIsSignalSafe ? "the source is readable from a signal handler: faults resolved in the faulting thread (no cross-CPU wake-up)"
                : "the source is not readable from a signal handler: the faulting thread asks a handler thread"
            return StrategyChoice(configuration: chosen, reason:
                "FEATURE_SIGBUS negotiated and \(how); the rest populated in the background with COPY in chunks of up to 2 MiB")
        }
        if aliased && features.contains(minorFeature) {
            chosen.strategy = .minor(chunkPages: start)
            return StrategyChoice(configuration: chosen, reason:
                "\(memory) page cache reachable through an alias and \(minorFeature) negotiated: MINOR + UFFDIO_CONTINUE, "
                + "the page cache populated in the background in chunks of up to 2 MiB")
        }
        let why = aliased ? "\(minorFeature) not negotiated" : "no page-cache alias"
        if huge {
            chosen.strategy = .copy(chunkPages: start)
            return StrategyChoice(configuration: chosen, reason:
                "hugetlb memory, \(why); hugetlb has no UFFDIO_MOVE: COPY of whole 2 MiB pages, populated in the background")
        }
        let inThread = "no FEATURE_SIGBUS"
        if features.contains(.move) && sourceIsMovable && !aliased {
            chosen.strategy = .move(chunkPages: start)
            return StrategyChoice(configuration: chosen, reason:
                "\(inThread); FEATURE_MOVE negotiated and the source gives its pages up: zero-copy UFFDIO_MOVE, "
                + "handler read-ahead and background populate in chunks of up to 2 MiB")
        }
        chosen.strategy = .copy(chunkPages: start)
        let noMove = !features.contains(.move) ? "no FEATURE_MOVE" : aliased ? "shared memory (MOVE needs private anonymous memory)"
            : "the source cannot give its pages up (COPY reads it in place, MOVE would need a staging copy)"
        return StrategyChoice(configuration: chosen, reason:
            "\(inThread); \(noMove)\(aliased ? "; \(why)" : ""): UFFDIO_COPY, handler read-ahead and background populate in chunks of up to 2 MiB")
    }
}
