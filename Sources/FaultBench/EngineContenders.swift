import FaultEngine
import Synchronization
import Userfaultfd
import _CBenchReference

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The contenders served by the engine (module `FaultEngine`), each with one of its
/// named configurations, over the same source, regions and touch loop as the C ones.
enum EngineContenders {
    /// Runs an engine contender on a region of the bench size.
    static func run(_ contender: Contender, _ workload: Workload, _ pattern: AccessPattern) -> RunOutcome {
        let order = workload.order(pattern)
        let pages = UInt64(workload.pageCount)
        switch contender {
        case .swiftHandler4k:
            return serve(workload, source: workload.source, .handler4k, regionPages: pages, order: order)
        case .swiftHandler64k:
            return serve(workload, source: workload.source, .handler64k, regionPages: pages, order: order)
        case .swiftSigbus:
            return serve(workload, source: workload.source, .sigbus, features: [.sigbus], regionPages: pages, order: order)
        case .swiftMove:
            return move(workload, order: order)
        case .swiftMinor:
            return serve(workload, source: workload.source, .minor, features: [.minorShmem, .missingShmem],
                         memory: .shmem, regionPages: pages, order: order)
        case .swiftAdaptive:
            return serve(workload, source: workload.source, .adaptive, regionPages: pages, order: order)
        case .swiftReplay:
            return replay(workload, pattern, order: order)
        case .swiftBest:
            return serve(workload, source: workload.source, .default,
                         preferredFeatures: FaultServerConfiguration.automaticFeatures(for: .anonymous),
                         regionPages: pages, order: order)
        case .swiftFileCopy, .swiftFileMove:
            return file(workload, move: contender == .swiftFileMove, order: order)
        case .swiftStagedMove:
            return stagedMove(workload, order: order)
        default:
            return .notMeasured("\(contender) is not an engine contender")
        }
    }

    /// A scale run: the engine serving a region of `regionPages` pages (region page
    /// `p` holds source page `p % pageCount`), touched at the pages of `order`.
    ///
    /// One page per fault (`.handler4k`): the 1 GiB run touches every page of its
    /// region and the 1 TiB run one page in 1024, so a chunked configuration would
    /// install pages the 1 TiB run never reads and the figures would compare
    /// read-ahead, not region size.
    static func scale(_ workload: Workload, regionPages: UInt64, order: [UInt64]) -> RunOutcome {
        serve(workload, source: WrappingSource(workload.source), .handler4k, regionPages: regionPages, order: order)
    }

    /// What a reader must know about a contender's figure.
    static func remark(_ contender: Contender) -> String? {
        switch contender {
        case .swiftMove:
            return "MOVE consumes its source: each run moves pages out of its own copy of the source, made before the timed part"
        case .swiftMinor:
            return "shmem region: the page cache is filled through a second mapping, then UFFDIO_CONTINUE"
        case .swiftReplay:
            return "working set recorded by an untimed run in the same order, then replayed"
        case .swiftBest:
            return "the default (automatic) configuration on a uffd handshaken preferring FEATURE_SIGBUS and MOVE"
        case .swiftFileCopy:
            return "the default (automatic) configuration over the image file read with pread, uffd with MOVE and without SIGBUS"
        case .swiftFileMove:
            return "as swift-file-copy, but each chunk read into the staging buffer is installed with UFFDIO_MOVE"
        case .swiftStagedMove:
            return "one fill thread stages the source ahead of the faults (started with the server, timed); "
                + "MOVE of 256 KiB chunks growing to 2 MiB from the pool, COPY in place where not staged yet"
        case .scale1GiB, .scale1TiB:
            return "served by the engine with one page per fault (.handler4k), so that only the region size differs"
        case .swiftHandler4kTraced:
            return "every fault recorded into a ring holding the run, written to the trace file after the timed part"
        default:
            return nil
        }
    }

    /// `swift-file-copy` / `swift-file-move`: the image file as a `pread` source on a uffd
    /// with MOVE and without SIGBUS; the default configuration (which copies, since a
    /// file cannot give its pages up), or the same read-ahead and populate installing
    /// with MOVE from the staging buffer.
    static func file(_ workload: Workload, move: Bool, order: [UInt64]) -> RunOutcome {
        let source: FileSource
        do {
            // The image file is unlinked: open it again through its descriptor.
            source = try FileSource(path: "/proc/self/fd/\(try workload.imageFile())")
        } catch {
            return .notMeasured("cannot open the image file as a source: \(error)")
        }
        var configuration = FaultServerConfiguration.default
        if move {
            configuration = FaultServerConfiguration(
                strategy: .move(chunkPages: FaultServerConfiguration.Strategy.automatic.chunkPages),
                prefetch: .adaptive(maxPages: 512), backgroundPopulate: true)
        }
        return serve(workload, source: source, configuration, features: [.move],
                     regionPages: UInt64(workload.pageCount), order: order)
    }

    /// `swift-move`: MOVE out of a movable copy of the source, which the run consumes.
    static func move(_ workload: Workload, order: [UInt64]) -> RunOutcome {
        let copy: MemorySource
        do {
            copy = try MemorySource(copying: UnsafeRawBufferPointer(workload.source.bytes), allowsMoving: true)
        } catch {
            return .notMeasured("cannot copy the source for MOVE: \(error)")
        }
        var outcome = serve(workload, source: copy, .move, features: [.move],
                            regionPages: UInt64(workload.pageCount), order: order)
        // Zero-copy means the pages left the source: a page still there was copied.
        let moved = order.count { page in
            copy.baseAddress.load(fromByteOffset: Int(page) * workload.pageSize, as: UInt64.self) == 0
        }
        if case .measured(var run) = outcome, moved < order.count {
            let copied = "only \(moved) of \(order.count) touched pages left the source: the others were copied, not moved"
            run.failure = run.failure.map { "\($0); \(copied)" } ?? copied
            outcome = .measured(run)
        }
        return outcome
    }

    /// `swift-staged-move`: the move strategy over a ``StagedSource`` of the bench source,
    /// whose fill thread starts with the server (inside the timed part).
    static func stagedMove(_ workload: Workload, order: [UInt64]) -> RunOutcome {
        let staged: StagedSource<MemorySource>
        do {
            staged = try StagedSource(workload.source)
        } catch {
            return .notMeasured("cannot reserve the staging pool: \(error)")
        }
        defer { staged.stop() }
        let configuration = FaultServerConfiguration(strategy: .move(chunkPages: 64), prefetch: .adaptive(maxPages: 512))
        var startFailure: String? = nil
        var outcome = serve(workload, source: staged, configuration, features: [.move],
                            regionPages: UInt64(workload.pageCount), order: order, onStart: {
            do { try staged.start() } catch { startFailure = "\(error)" }
        })
        if case .measured(var run) = outcome {
            staged.stop()
            run.paths = "\(staged.statistics)"
            if let startFailure { run.failure = "the staging pool's fill thread did not start: \(startFailure)" }
            outcome = .measured(run)
        }
        return outcome
    }

    /// `swift-replay`: records the working set of `order` once per pattern (untimed,
    /// COPY of single pages), then measures a server that replays it first.
    static func replay(_ workload: Workload, _ pattern: AccessPattern, order: [UInt64]) -> RunOutcome {
        let pages = UInt64(workload.pageCount)
        let path: String
        if let recorded = workload.recordedWorkingSets[pattern] {
            path = recorded
        } else {
            path = "/tmp/uffd-bench-working-set-\(getpid())-\(pattern)"
            var recording = FaultServerConfiguration.handler4k
            recording.recordWorkingSet = path
            let outcome = serve(workload, source: workload.source, recording, regionPages: pages, order: order)
            // Wrong bytes in the recording run do not spoil the recorded order.
            guard case .measured(let run) = outcome, run.failure == nil else {
                return .notMeasured("recording the working set failed: \(outcome)")
            }
            workload.recordedWorkingSets[pattern] = path
        }
        return serve(workload, source: workload.source, .replay(path), regionPages: pages, order: order)
    }

    /// Serves a fresh region of `regionPages` pages with a server of `configuration`
    /// over `source`, reads the pages of `order` (timed), verifies them, stops the
    /// server and reports what it saw go wrong.
    static func serve<Source: PageSource>(
        _ workload: Workload, source: Source, _ configuration: FaultServerConfiguration,
        features: Userfaultfd.Features = [], preferredFeatures: Userfaultfd.Features = [],
        memory: MemoryMapping.Kind = .anonymous, regionPages: UInt64, order: [UInt64], traceSink: FaultTraceSink? = nil,
        onStart: () -> Void = {}
    ) -> RunOutcome {
        do {
            return try serveOrThrow(workload, source: source, configuration, features: features, preferred: preferredFeatures,
                                    memory: memory, regionPages: regionPages, order: order, traceSink: traceSink, onStart: onStart)
        } catch {
            if error.operation.hasPrefix("FaultServer"), case .invalidArgument = error.kind {
                return .notMeasured("not available: the engine refuses this configuration: \(error)")
            }
            return .notMeasured("cannot set up the engine: \(error)")
        }
    }

    private static func serveOrThrow<Source: PageSource>(
        _ workload: Workload, source: Source, _ configuration: FaultServerConfiguration,
        features: Userfaultfd.Features, preferred: Userfaultfd.Features, memory: MemoryMapping.Kind,
        regionPages: UInt64, order: [UInt64], traceSink: FaultTraceSink?, onStart: () -> Void
    ) throws(UserfaultfdError) -> RunOutcome {
        let length = Int(regionPages) * workload.pageSize
        let region = try MemoryMapping(kind: memory, length: length, name: "uffd-bench")
        // MINOR: a second mapping of the shmem pages, through which the engine fills the page cache.
        var alias: UnsafeMutableRawPointer? = nil
        if let memfd = region.memfd {
            guard let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED, memfd.rawValue, 0), p != MAP_FAILED else {
                throw UserfaultfdError(operation: "mmap page-cache alias", errno: .init(rawValue: errno))
            }
            alias = p
        }
        defer { if let alias { munmap(alias, length) } }
        let uffd = preferred.isEmpty ? try Userfaultfd(features: features)
            : try Userfaultfd(Userfaultfd.Options().requiring(features).preferring(preferred))
        try uffd.handle.register(region.range, mode: memory == .anonymous ? .missing : [.missing, .minor])
        let server = try FaultServer(
            userfaultfd: uffd,
            regions: [ServedRegion(range: region.range, sourceOffset: 0, pageCacheAlias: alias.map { UInt64(UInt(bitPattern: $0)) })],
            source: source, configuration: configuration)
        server.traceSink = traceSink
        let problems = ProblemLog()
        server.onEvent = { event in
            switch event {
            case .sourceFailed, .faultOutsideRegions, .resolutionFailed, .processExited, .unknown:
                problems.add(event.description)
            case .fork, .removed, .unmapped, .remapped:
                break
            }
        }
        // Timed from start(): what a prefetcher does before the first touch is not free.
        let started = cbench_now_ns()
        try server.start()
        onStart()
        var sink: UInt64 = 0
        let base = region.base
        _ = order.withUnsafeBufferPointer {
            cbench_touch_read(base, $0.baseAddress, $0.count, workload.pageSize, &sink)
        }
        let ns = cbench_now_ns() - started
        let mismatch = workload.verify(region: base, order: order)
        server.stop()
        let statistics = server.statistics
        var failures = problems.all
        if statistics.sourceErrors > 0 || statistics.poisonedPages > 0 || statistics.faultsOutsideRegions > 0 {
            failures.append("the engine reports \(statistics.sourceErrors) source error(s), "
                + "\(statistics.poisonedPages) poisoned page(s), \(statistics.faultsOutsideRegions) fault(s) outside regions")
        }
        if let last = statistics.lastError { failures.append("engine error: \(last)") }
        return .measured(Run(nanoseconds: ns, pages: order.count, mismatch: mismatch,
                             failure: failures.isEmpty ? nil : failures.joined(separator: "; ")))
    }
}

/// Problems the server reported through `onEvent`, collected off the fault path.
final class ProblemLog: Sendable {
    private let entries = Mutex<[String]>([])

    func add(_ text: String) {
        entries.withLock { if $0.count < 8 { $0.append(text) } }
    }

    var all: [String] { entries.withLock { $0 } }
}

/// The bench source repeated without end: byte `o` is source byte `o % length`.
/// Serves the scale runs, whose regions are larger than the source.
struct WrappingSource: PageSource, @unchecked Sendable {
    private let memory: MemorySource
    private let base: UnsafeMutableRawPointer
    private let size: UInt64

    init(_ memory: MemorySource) {
        self.memory = memory
        self.base = memory.baseAddress
        self.size = memory.length ?? 0
    }

    var length: UInt64? { nil }

    @inline(__always)
    func fill(_ destination: UnsafeMutableRawBufferPointer, at sourceOffset: UInt64) throws(PageSourceError) {
        guard let target = destination.baseAddress, size > 0 else { return }
        var done = 0
        var offset = sourceOffset % size
        while done < destination.count {
            let n = min(destination.count - done, Int(size - offset))
            memcpy(target + done, base + Int(offset), n)
            done += n
            offset = 0
        }
    }
}
