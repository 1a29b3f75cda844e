import FaultEngine
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A small workload of known shape, served by the engine and traced: a sequential
/// sweep, a hot band written over and over, and random reads.
///
/// Three regions of one anonymous mapping are served one page per fault (so every first
/// touch is a fault), and the hot region is also registered for write-protect with
/// FEATURE_WP_ASYNC so that a ``WriteSampler`` counts its writes. Time is cut into
/// `steps` steps of `stepMilliseconds`; in each step the workload reads the next slice
/// of the sweep region (during the first two thirds), writes every page of the middle
/// quarter of the hot region, and reads `randomPerStep` random pages of the random region.
public struct TraceDemo: Sendable {
    public var sweepPages = 4096
    public var hotPages = 1024
    public var randomPages = 4096
    public var randomPerStep = 24
    public var steps = 120
    public var stepMilliseconds = 10
    public var sampleMilliseconds = 10

    public init() {}

    /// What the demo did.
    public struct Outcome: Sendable {
        /// First touches the recorder wrote.
        public var touches: Int
        /// Write samples taken (0 when the kernel lacks FEATURE_WP_ASYNC).
        public var writeSamples: Int
        /// Why writes were not sampled, if they were not.
        public var writeTrackingUnavailable: String?
        /// Pages whose bytes were not the source's.
        public var mismatches: Int
    }

    /// The middle quarter of the hot region: the band written in every step.
    public var hotBand: Range<Int> { (hotPages * 3 / 8)..<(hotPages * 5 / 8) }

    /// Runs the workload under a traced engine, writing the trace to `path`.
    ///
    /// - Throws: ``TraceError`` if the engine or the trace cannot be set up.
    public func run(tracePath path: String) throws(TraceError) -> Outcome {
        do {
            return try runOrThrow(path)
        } catch let error as TraceError {
            throw error
        } catch {
            throw TraceError("the demo cannot run: \(error)")
        }
    }

    private func runOrThrow(_ path: String) throws -> Outcome {
        let ps = systemPageSize
        let total = (sweepPages + hotPages + randomPages) * ps
        let memory = try MemoryMapping.anonymous(length: total)
        let source = try MemorySource(length: total) { bytes in
            for p in 0..<(total / ps) { bytes.storeBytes(of: UInt64(p) &* 0x9E37_79B9_7F4A_7C15, toByteOffset: p * ps, as: UInt64.self) }
        }
        let sweep = MemoryRange(start: memory.address(at: 0), length: UInt64(sweepPages * ps))
        let hot = MemoryRange(start: sweep.end, length: UInt64(hotPages * ps))
        let random = MemoryRange(start: hot.end, length: UInt64(randomPages * ps))
        let supported = (try? Userfaultfd.probe().features) ?? []
        let wanted: Userfaultfd.Features = [.wpAsync, .wpUnpopulated]
        let tracksWrites = supported.isSuperset(of: wanted)
        let uffd = try Userfaultfd(features: tracksWrites ? wanted : [])
        try Self.register(uffd.handle, sweep: sweep, hot: hot, random: random, tracksWrites: tracksWrites)
        let regions = [sweep, hot, random].map { ServedRegion(range: $0, sourceOffset: $0.start - sweep.start) }
        let server = try FaultServer(userfaultfd: uffd, regions: regions, source: source,
                                     configuration: FaultServerConfiguration(strategy: .copy(chunkPages: 1)))
        let recorder = try TraceRecorder(path: path)
        for (range, label) in [(sweep, "sequential sweep"), (hot, "hot band"), (random, "random reads")] {
            recorder.label(start: range.start, label)
            _ = recorder.region(space: 0, range: range, sourceOffset: range.start - sweep.start, writeTracked: range == hot && tracksWrites)
        }
        server.traceSink = recorder.sink
        try server.start()
        let sampler = tracksWrites
            ? try WriteSampler(recorder: recorder, ranges: [hot], intervalMilliseconds: sampleMilliseconds) : nil
        let mismatches = drive(memory.base)
        sampler?.stop()
        server.stop()
        let touches = try recorder.finish()
        return Outcome(touches: touches, writeSamples: sampler?.sampleCount ?? 0,
                       writeTrackingUnavailable: tracksWrites ? sampler?.error : "the kernel lacks FEATURE_WP_ASYNC or WP_UNPOPULATED",
                       mismatches: mismatches)
    }

    /// Registers the three regions for missing faults, and the hot one for write-protect
    /// too when writes are tracked.
    private static func register(_ handle: Userfaultfd.Handle, sweep: MemoryRange, hot: MemoryRange, random: MemoryRange,
                                 tracksWrites: Bool) throws(UserfaultfdError) {
        _ = try handle.register(sweep, mode: .missing)
        _ = try handle.register(hot, mode: tracksWrites ? [.missing, .writeProtect] : .missing)
        _ = try handle.register(random, mode: .missing)
        // Protect the unpopulated pages too (WP_UNPOPULATED markers): a scan counts a page
        // that was never protected as written.
        if tracksWrites { _ = try handle.writeProtect(hot, mode: .writeProtect) }
    }

    /// Runs the steps of the workload over the mapping at `base`.
    ///
    /// - Returns: the pages read that did not hold the source's bytes.
    private func drive(_ base: UnsafeMutableRawPointer) -> Int {
        let ps = systemPageSize
        var mismatches = 0
        var generator = SplitMix64(seed: 0x2545_F491_4F6C_DD1D)
        let sweepSteps = max(1, steps * 2 / 3)
        let perStep = (sweepPages + sweepSteps - 1) / sweepSteps
        for step in 0..<steps {
            var p = step * perStep
            while p < min(sweepPages, (step + 1) * perStep) {
                mismatches += check(base, page: p)
                p += 1
            }
            for p in hotBand { (base + (sweepPages + p) * ps + 64).storeBytes(of: UInt64(step), as: UInt64.self) }
            for _ in 0..<randomPerStep {
                mismatches += check(base, page: sweepPages + hotPages + Int(generator.next() % UInt64(randomPages)))
            }
            usleep(UInt32(stepMilliseconds * 1000))
        }
        return mismatches
    }

    /// 1 if page `page` of the mapping at `base` does not start with its source word.
    @inline(__always)
    private func check(_ base: UnsafeMutableRawPointer, page: Int) -> Int {
        let word = (base + page * systemPageSize).load(as: UInt64.self)
        return word == UInt64(page) &* 0x9E37_79B9_7F4A_7C15 ? 0 : 1
    }
}
