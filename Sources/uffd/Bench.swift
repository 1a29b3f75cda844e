import ArgumentParser
import FaultBench
import FaultEngine

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// `uffd bench`: the engine against the C reference, the kernel and the SIGSEGV scheme.
struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Measure page-fault serving: every contender interleaved in one run, verified byte for byte.",
        discussion: """
            Contenders: \(Contender.allCases.map(\.rawValue).joined(separator: ", ")).
            Each runs with a sequential and a fixed-seed random touch order (scale runs: random only) \
            and its figure counts only if every touched byte was right. Figures are medians of the \
            repetitions; ratios are of pages/s against baselines measured in the same run.
            """)

    @Option(name: .customLong("size-mib"), help: "Region size in MiB (default 1024; 4 with --quick).")
    var sizeMiB: Int?

    @Option(help: "Runs per contender and pattern; figures are medians (default 3; 1 with --quick).")
    var repetitions: Int?

    @Option(parsing: .upToNextOption, help: ArgumentHelp("Run only these contenders.", valueName: "contender"))
    var only: [Contender] = []

    @Flag(help: "A smoke test: 4 MiB, one repetition, unless --size-mib or --repetitions say otherwise.")
    var quick = false

    @Flag(help: "Print the results as JSON instead of a table.")
    var json = false

    @Flag(help: "Print no progress on standard error.")
    var quiet = false

    func validate() throws {
        if let sizeMiB, sizeMiB < 1 || sizeMiB > BenchConfiguration.maximumSizeMiB {
            throw ValidationError("--size-mib \(sizeMiB) is out of range: give 1 to \(BenchConfiguration.maximumSizeMiB)")
        }
        if let repetitions, repetitions < 1 || repetitions > 100 {
            throw ValidationError("--repetitions \(repetitions) is out of range: give 1 to 100")
        }
    }

    func run() throws {
        var configuration = quick ? BenchConfiguration.quick : BenchConfiguration()
        if let sizeMiB { configuration.sizeMiB = sizeMiB }
        if let repetitions { configuration.repetitions = repetitions }
        if !only.isEmpty { configuration.contenders = only.reduce(into: []) { if !$0.contains($1) { $0.append($1) } } }
        let showProgress = !quiet
        let report = try Benchmark.run(configuration) { step in
            guard showProgress else { return }
            let figure = step.usPerPage.map { Reporting.fixed($0, 2) + " µs/page" } ?? "no figure"
            let state = step.usPerPage == nil ? "" : step.verified ? " verified" : " NOT VERIFIED"
            let note = step.note.map { " (\($0))" } ?? ""
            printError("[\(step.completed)/\(step.total)] repetition \(step.repetition): \(step.contender) \(step.pattern): \(figure)\(state)\(note)")
        }
        print(json ? report.json() : report.table(), terminator: "")
        if report.results.contains(where: \.foundWrongBytes) {
            printError("uffd bench: a contender installed wrong bytes (see the notes)")
            throw ExitCode(1)
        }
    }
}

private func printError(_ text: String) {
    var line = text + "\n"
    line.withUTF8 { bytes in _ = write(2, bytes.baseAddress, bytes.count) }
}

/// A contender named on the command line by its ``Contender/rawValue``; ArgumentParser
/// lists the names in its help and in the error for an unknown one.
extension Contender: ExpressibleByArgument {}

