import ArgumentParser
import FaultEngine
import FaultTrace

/// `uffd trace render`: one self-contained HTML page from a trace file.
struct TraceRender: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "render",
        abstract: "Render a trace file as one self-contained HTML page; print a summary (or --json).")

    @Argument(help: "The trace file.")
    var trace: String

    @OptionGroup(title: "Drawing") var drawing: TraceDrawingOptions

    @Option(help: "Also write the first-touch order as a working-set file for --replay.")
    var workingSet: String?

    func run() throws {
        let report = try Self.render(trace, to: drawing.output ?? trace + ".html", options: drawing.reportOptions)
        if let workingSet {
            try WorkingSetFile.write(try TraceFile.read(trace).firstTouchSourceOffsets(), to: workingSet)
            traceNote("wrote \(workingSet)")
        }
        print(drawing.json ? report.json() : TracePage.summary(report), terminator: "")
    }

    /// Reads `path`, writes its page to `html` and returns the numbers.
    static func render(_ path: String, to html: String, options: TraceReport.Options) throws -> TraceReport {
        let trace = try TraceFile.read(path)
        let report = TraceReport(trace, options: options)
        let page = TracePage.html(trace, report: report, title: "uffd trace: \(path)")
        try TracePage.write(page, to: html)
        traceNote("wrote \(html)")
        return report
    }
}

/// How `uffd trace render` and `uffd trace demo` draw a trace and report its numbers.
struct TraceDrawingOptions: ParsableArguments {
    @Option(name: .shortAndLong, help: "The HTML page to write (default: TRACE.html; for `demo`, uffd-trace-demo.html).")
    var output: String?

    @Option(help: "Time bins across the heat map and the working-set curve.")
    var timeBins = 100

    @Option(help: "About how many address rows the heat map has.")
    var rows = 128

    @Flag(help: "Print the numbers as JSON instead of a summary.")
    var json = false

    func validate() throws {
        if !(1...2000).contains(timeBins) { throw ValidationError("--time-bins must lie in 1...2000") }
        if !(1...2000).contains(rows) { throw ValidationError("--rows must lie in 1...2000") }
    }

    var reportOptions: TraceReport.Options { TraceReport.Options(timeBins: timeBins, addressRows: rows) }
}
