import ArgumentParser

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// `uffd trace`: which pages a workload touches, when, and how fast they came.
struct TraceCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "trace",
        abstract: "Record which pages a workload touches and draw them as a page (heat map, working set, latency, order).",
        discussion: """
            Traces come from `uffd serve --trace FILE`, from a program that gives a FaultTrace.TraceRecorder's \
            sink to its FaultServer, or from `uffd trace writes` (pages written per interval of a process \
            whose memory is registered for WP_ASYNC write-protect). `uffd trace demo` shows one in one command.
            """,
        subcommands: [TraceRender.self, TraceDemoCommand.self, TraceWrites.self])
}

/// Writes `text` to standard error, with a newline.
func traceNote(_ text: String) {
    var line = text + "\n"
    line.withUTF8 { bytes in _ = write(2, bytes.baseAddress, bytes.count) }
}
