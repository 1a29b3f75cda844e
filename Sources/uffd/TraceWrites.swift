import ArgumentParser
import FaultTrace
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// `uffd trace writes`: pages a process writes per interval, from its pagemap.
struct TraceWrites: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "writes",
        abstract: "Sample the pages a process writes per interval (PAGEMAP_SCAN) into a trace file.",
        discussion: """
            The ranges must be registered for write-protect, with FEATURE_WP_ASYNC, on a uffd of \
            the process itself (for example by FaultTrace.WriteSampler.armWriteTracking). Each scan \
            counts the pages written since the last one and write-protects them again.
            """)

    @Option(help: "The process to sample.")
    var pid: Int32

    @Option(name: .customLong("range"), help: ArgumentHelp("A range to sample, START-END in hex (repeatable).", valueName: "0xSTART-0xEND"))
    var ranges: [String]

    @Option(help: "Milliseconds between samples.")
    var intervalMs = 10

    @Option(help: "Seconds to sample for.")
    var seconds = 5.0

    @Option(help: "Pages counted together.")
    var bucketPages = 16

    @Option(name: .shortAndLong, help: "The trace file to write.")
    var output: String

    func validate() throws {
        if ranges.isEmpty { throw ValidationError("give at least one --range") }
        if !(0.01...86_400).contains(seconds) { throw ValidationError("--seconds must lie in 0.01...86400") }
        for r in ranges where Self.parse(r) == nil { throw ValidationError("--range \(r) is not 0xSTART-0xEND with START < END") }
    }

    static func parse(_ text: String) -> MemoryRange? {
        let parts = text.split(separator: "-")
        guard parts.count == 2 else { return nil }
        func hex(_ s: Substring) -> UInt64? { UInt64(s.hasPrefix("0x") ? s.dropFirst(2) : s, radix: 16) }
        guard let start = hex(parts[0]), let end = hex(parts[1]), start < end else { return nil }
        return MemoryRange(start: start, end: end)
    }

    func run() throws {
        let recorder = try TraceRecorder(path: output)
        let sampler = try WriteSampler(recorder: recorder, ranges: ranges.compactMap(Self.parse), pid: pid,
                                       intervalMilliseconds: intervalMs, bucketPages: bucketPages)
        var left = seconds
        while left > 0 {
            usleep(UInt32(min(left, 1) * 1_000_000))
            left -= 1
        }
        sampler.stop()
        try recorder.finish()
        if let error = sampler.error { traceNote("uffd trace writes: sampling stopped early: \(error)") }
        traceNote("wrote \(output): \(sampler.sampleCount) sample(s)")
    }
}
