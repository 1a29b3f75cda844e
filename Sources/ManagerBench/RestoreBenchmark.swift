import FaultEngine
import Userfaultfd
import UserfaultfdDiagnostics

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A Firecracker-style restore of the whole image, through the daemon and through the
/// kernel's own file mapping, alternating contenders.
enum RestoreBenchmark {
    /// One way of restoring the image.
    struct Contender {
        var name: String
        var pageSize: Int
        /// Through the daemon (`--scenario restore`), or `MAP_PRIVATE` of the file.
        var throughDaemon: Bool
    }

    static let mapPrivate = "MAP_PRIVATE of the page-cached file"

    /// The contenders this machine can run, and why any is left out.
    static func contenders(imageMiB: Int) -> ([Contender], [String], restoreHugePages: Int?) {
        var list = [
            Contender(name: mapPrivate, pageSize: systemPageSize, throughDaemon: false),
            Contender(name: "uffd serve, 4 KiB pages", pageSize: systemPageSize, throughDaemon: true),
        ]
        // The guest is two halves, each a whole number of huge pages.
        let needed = imageMiB / 4 * 2
        let before = HugePages.total
        if needed == 0 {
            return (list, ["2 MiB pages: the image is smaller than two huge pages"], nil)
        }
        if HugePages.ensureFree(needed) {
            list.append(Contender(name: "uffd serve, 2 MiB pages", pageSize: HugePages.size, throughDaemon: true))
            return (list, [], HugePages.total != before ? before : nil)
        }
        let available = HugePages.available
        if HugePages.total != before { HugePages.setTotal(before) }
        return (list, ["2 MiB pages: \(needed) free huge pages needed, \(available) available "
                       + "(reserving more needs root and free memory: `echo N > /proc/sys/vm/nr_hugepages`)"], nil)
    }

    /// Runs every contender once untimed, then `repetitions` times per pass (write, then
    /// read), in alternating order, each run a fresh client (and a fresh daemon for the
    /// uffd ones).
    static func measure(
        _ c: ServeBenchConfiguration, _ bench: ManagedClients, progress: (String) -> Void
    ) throws -> ServeBenchResult.Restore {
        let (contenders, skipped, restoreTotal) = contenders(imageMiB: c.imageMiB)
        defer { if let restoreTotal { HugePages.setTotal(restoreTotal) } }
        var times: [String: [UInt64]] = [:]
        var served: [String: Served] = [:]
        func key(_ contender: Contender, _ pass: String) -> String { contender.name + "\u{0}" + pass }
        var bytes = 0
        // One untimed write pass each first: the first use of freshly reserved huge pages,
        // and the first mapping of the image, cost far more than any later run.
        for contender in contenders {
            progress("warm-up, \(contender.name)")
            _ = try run(contender, pass: "write", c, bench)
        }
        for r in 0..<c.repetitions {
            for pass in ["write", "read"] {
                let order = r % 2 == 0 ? contenders : contenders.reversed()
                for contender in order {
                    progress("restore \(r + 1) of \(c.repetitions), \(pass) pass, \(contender.name)")
                    let (t, n, how) = try run(contender, pass: pass, c, bench)
                    times[key(contender, pass), default: []].append(t)
                    if let how { served[key(contender, pass)] = how }
                    bytes = n
                }
            }
        }
        var rows: [ServeBenchResult.RestoreRow] = []
        for pass in ["write", "read"] {
            let baseline = Reporting.median(times[key(contenders[0], pass)] ?? [])
            for contender in contenders {
                var row = ServeBenchResult.RestoreRow(
                    contender: contender.name, pageSize: contender.pageSize, pass: pass, bytes: bytes,
                    nanoseconds: times[key(contender, pass)] ?? [], mapPrivateMedian: baseline)
                let how = served[key(contender, pass)]
                row.daemonStrategy = how?.strategy
                row.daemonFaults = how?.faults
                rows.append(row)
            }
        }
        return ServeBenchResult.Restore(imageMiB: c.imageMiB, repetitions: c.repetitions, rows: rows, skipped: skipped)
    }

    /// How the daemon served a restore: its strategy and the faults that reached it.
    struct Served {
        var strategy: String
        var faults: UInt64
    }

    /// One restore; returns the client's time, the bytes it restored and, through the
    /// daemon, how the daemon served it.
    static func run(_ contender: Contender, pass: String, _ c: ServeBenchConfiguration,
                    _ bench: ManagedClients) throws -> (UInt64, Int, Served?) {
        var arguments = ["--image", bench.image, "--pass", pass]
        let output: ClientOutput
        var served: Served? = nil
        if contender.throughDaemon {
            arguments += ["--scenario", "restore", "--handshake", "firecracker"]
            if contender.pageSize != systemPageSize { arguments += ["--memory", "hugetlb"] }
            let outcome = try bench.serve(record: nil, replay: nil, clients: [arguments], server: c.server)
            output = outcome.outputs[0]
            if let report = outcome.reports.first {
                served = Served(strategy: report.statistics.strategy ?? "unknown", faults: report.statistics.faults)
            }
        } else {
            output = try ClientOutput(bench.client, arguments + ["--scenario", "restore-file"])
            let status = output.wait()
            if status != 0 { throw ServeBenchError("a MAP_PRIVATE client exited with status \(status): \(output.text)") }
        }
        guard let t = output.value(after: "TIME_NS "), let n = output.value(after: "TIME_NS \(t) bytes ") else {
            throw ServeBenchError("the restore client printed no time: \(output.text)")
        }
        return (t, Int(n), served)
    }
}
