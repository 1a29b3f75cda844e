import ArgumentParser
import FaultTrace

/// `uffd trace demo`: a workload of known shape, traced and rendered in one command.
struct TraceDemoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo",
        abstract: "Run a small workload (sequential sweep, hot band, random reads) under the engine, trace it and render it.")

    @Option(help: "The trace file to write.")
    var trace = "uffd-trace-demo.uftrace"

    @OptionGroup(title: "Drawing") var drawing: TraceDrawingOptions

    func run() throws {
        let demo = TraceDemo()
        let outcome = try demo.run(tracePath: trace)
        traceNote("demo: \(outcome.touches) first touches, \(outcome.writeSamples) write samples traced to \(trace)")
        if let why = outcome.writeTrackingUnavailable { traceNote("demo: writes not sampled: \(why)") }
        let report = try TraceRender.render(trace, to: drawing.output ?? "uffd-trace-demo.html", options: drawing.reportOptions)
        print(drawing.json ? report.json() : TracePage.summary(report), terminator: "")
        if outcome.mismatches > 0 {
            traceNote("demo: \(outcome.mismatches) page(s) read wrong bytes")
            throw ExitCode(1)
        }
    }
}
