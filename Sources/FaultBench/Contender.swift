/// One way of getting bytes into memory on first touch, measured by the bench.
///
/// The raw value is the name the results carry (`"c-handler-4k"`); the list and
/// the names are fixed so runs can be compared with each other.
public enum Contender: String, CaseIterable, Sendable, CustomStringConvertible {
    /// Copy the same bytes into already-populated memory: the physical limit.
    case memcpy = "memcpy"
    /// Write-touch fresh anonymous memory: the kernel's own zero-fill fault.
    case kernelFirstTouch = "kernel-first-touch"
    /// Read the pages of a `MAP_PRIVATE` mapping of the image file, in the page cache.
    case kernelFileMmap = "kernel-file-mmap"
    /// Write one byte per page of a `MAP_PRIVATE` mapping of the image file, in the page cache.
    case kernelFileMmapWrite = "kernel-file-mmap-write"
    /// ``kernelFileMmap`` after the file's pages were dropped from the page cache.
    case kernelFileMmapCold = "kernel-file-mmap-cold"
    /// ``kernelFileMmapWrite`` after the file's pages were dropped from the page cache.
    case kernelFileMmapColdWrite = "kernel-file-mmap-cold-write"
    /// PROT_NONE region; a SIGSEGV handler mprotects the page and copies it in (C).
    case sigsegvMprotect = "sigsegv-mprotect"
    /// The C reference handler thread, one UFFDIO_COPY of 4 KiB per fault.
    case cHandler4k = "c-handler-4k"
    /// The C reference handler thread, one UFFDIO_COPY of 64 KiB per fault.
    case cHandler64k = "c-handler-64k"
    /// The engine configured like ``cHandler4k``.
    case swiftHandler4k = "swift-handler-4k"
    /// The engine configured like ``cHandler64k``.
    case swiftHandler64k = "swift-handler-64k"
    /// ``swiftHandler4k`` recording every fault to a trace file (module `FaultTrace`).
    case swiftHandler4kTraced = "swift-handler-4k-traced"
    /// The engine resolving in the faulting thread (FEATURE_SIGBUS).
    case swiftSigbus = "swift-sigbus"
    /// The engine installing chunks with UFFDIO_MOVE.
    case swiftMove = "swift-move"
    /// The engine on shmem, MINOR faults resolved with UFFDIO_CONTINUE.
    case swiftMinor = "swift-minor"
    /// The engine with adaptive read-ahead.
    case swiftAdaptive = "swift-adaptive"
    /// The engine replaying a recorded working set.
    case swiftReplay = "swift-replay"
    /// The engine's default configuration.
    case swiftBest = "swift-best"
    /// The default configuration serving the image file (pread) on a uffd without
    /// FEATURE_SIGBUS: the source cannot give its pages up, so it copies.
    case swiftFileCopy = "swift-file-copy"
    /// As ``swiftFileCopy``, but installing with UFFDIO_MOVE from the staging buffer
    /// the file is read into (same chunks, read-ahead and background populate).
    case swiftFileMove = "swift-file-move"
    /// The move strategy over a staging pool that fill threads populate from the
    /// source ahead of the faults (`StagedSource`); COPY where not staged yet.
    case swiftStagedMove = "swift-staged-move"
    /// Scale run: random pages of a 1 GiB region, served by the engine one page per fault.
    case scale1GiB = "scale-1gib"
    /// Scale run: as many random pages of a 1 TiB sparse region, served the same way.
    case scale1TiB = "scale-1tib"
    /// Scale run: the SIGSEGV scheme on the pages of ``scale1GiB``.
    case scaleSigsegv1GiB = "scale-1gib-sigsegv"
    /// Scale run: the SIGSEGV scheme on the pages of ``scale1TiB``.
    case scaleSigsegv1TiB = "scale-1tib-sigsegv"
    /// Scale run: the kernel's own first touch (write) of the pages of ``scale1GiB``.
    case kernelFirstTouch1GiB = "kernel-first-touch-1gib"
    /// Scale run: the kernel's own first touch (write) of the pages of ``scale1TiB``.
    case kernelFirstTouch1TiB = "kernel-first-touch-1tib"

    public var description: String { rawValue }

    /// The access patterns this contender is measured with.
    public var patterns: [AccessPattern] {
        isScaleRun ? [.random] : [.sequential, .random]
    }

    /// Whether this is one of the scale runs (1 GiB against 1 TiB regions).
    public var isScaleRun: Bool {
        switch self {
        case .scale1GiB, .scale1TiB, .scaleSigsegv1GiB, .scaleSigsegv1TiB, .kernelFirstTouch1GiB, .kernelFirstTouch1TiB:
            return true
        default: return false
        }
    }

    /// Whether the engine (module `FaultEngine`) serves this contender.
    public var usesEngine: Bool {
        switch self {
        case .swiftHandler4k, .swiftHandler64k, .swiftSigbus, .swiftMove, .swiftMinor,
             .swiftAdaptive, .swiftReplay, .swiftBest, .scale1GiB, .scale1TiB, .swiftHandler4kTraced,
             .swiftFileCopy, .swiftFileMove, .swiftStagedMove:
            return true
        default:
            return false
        }
    }

    /// The C reference of the same design, for the engine contenders that have one.
    public var cTwin: Contender? {
        switch self {
        case .swiftHandler4k: return .cHandler4k
        case .swiftHandler64k: return .cHandler64k
        default: return nil
        }
    }
}

/// The order in which a contender touches the pages of its region.
public enum AccessPattern: String, CaseIterable, Sendable, CustomStringConvertible {
    /// Page 0, 1, 2, … in address order.
    case sequential
    /// A fixed-seed permutation of the pages: the same order in every run.
    case random

    public var description: String { rawValue }
}

/// Bad bench input or a bench that could not be set up, with a message naming what was wrong.
public struct BenchError: Error, Sendable, CustomStringConvertible, Equatable {
    /// What was wrong.
    public var message: String

    public init(_ message: String) { self.message = message }

    public var description: String { message }
}
