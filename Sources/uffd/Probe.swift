import ArgumentParser
import FaultEngine
import Userfaultfd
import UserfaultfdDiagnostics

struct Probe: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show what userfaultfd offers on this machine: creation, features, ioctls per memory type, huge pages.")

    @Flag(help: "Print the same content as JSON.")
    var json = false

    @Option(help: "Reserve this many 2 MiB huge pages first (root only) so the hugetlb row can be probed.")
    var reserveHugePages: Int = 0

    func run() throws {
        if reserveHugePages > 0 { HugePages.ensureFree(reserveHugePages) }
        let probe = SystemProbe.run()
        if json {
            print(Reporting.json(probe), terminator: "")
        } else {
            print(probe.text)
        }
    }
}
