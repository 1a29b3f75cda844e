import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Runs the bench: every workload, its contenders alternating, each run in a child
/// process inside the memory cgroup, with a cold cache before each.
public struct MapBenchRunner {
    public var options: MapBenchOptions
    /// How to start a child: the executable and the arguments before the child's own
    /// (`--workload`, `--contender`, `--options`, `--cgroup`); the child prints one ``RunResult`` as JSON.
    public var childCommand: [String]
    public var progress: (String) -> Void

    public init(options: MapBenchOptions, childCommand: [String], progress: @escaping (String) -> Void) {
        self.options = options
        self.childCommand = childCommand
        self.progress = progress
    }

    public func run() throws -> MapBenchReport {
        var dirty: DirtyTracking.Result?
        if options.dirtyTrackingPages > 0 {
            dirty = try DirtyTracking.measure(pages: options.dirtyTrackingPages, repetitions: max(3, options.repetitions))
            progress(String(format: "dirty tracking: synchronous WP %.0f ns/page, WP_ASYNC + PAGEMAP_SCAN %.0f ns/page",
                            dirty!.synchronousNanosecondsPerPage, dirty!.asyncNanosecondsPerPage))
        }
        try DataFiles.prepare(options, progress: progress)
        var cgroup: MemoryCgroup?
        var cgroupNote: String
        do {
            cgroup = try MemoryCgroup(name: "uffd-map-bench-\(getpid())", limit: options.limitBytes)
            cgroupNote = "\(cgroup!.path) (memory.limit_in_bytes = \(options.limitBytes))"
        } catch {
            cgroupNote = "none: \(error)"
            progress("running without a memory cgroup: \(error)")
        }
        defer { cgroup?.remove() }
        var results: [RunResult] = []
        var cold = ""
        for workload in options.workloads {
            for rep in 0..<options.repetitions {
                // Alternate the order too, so that no contender always goes first.
                let contenders = options.contenders(for: workload)
                let order = rep % 2 == 0 ? contenders : contenders.reversed()
                for contender in order {
                    cold = DataFiles.makeCold(options)
                    cgroup?.resetPeak()
                    var r = try runChild(workload, contender, cgroup: cgroup?.path)
                    r.cgroupPeak = cgroup?.peak
                    progress(String(format: "%@ %@ run %d: %.4g %@%@", workload.rawValue, contender.rawValue, rep + 1,
                                    r.figure, workload.isRate ? "ops/s" : "s", r.verified ? "" : " NOT VERIFIED (\(r.note))"))
                    results.append(r)
                }
            }
        }
        return MapBenchReport(options: options, cgroup: cgroupNote, coldCache: cold, rows: Self.rows(results, options),
                              dirtyTracking: dirty)
    }

    private func runChild(_ w: Workload, _ c: Contender, cgroup: String?) throws -> RunResult {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: childCommand[0])
        let optionsJSON = String(decoding: try JSONEncoder().encode(options), as: UTF8.self)
        process.arguments = Array(childCommand.dropFirst()) + ["--workload", w.rawValue, "--contender", c.rawValue,
                                                               "--options", optionsJSON] + (cgroup.map { ["--cgroup", $0] } ?? [])
        let pipe = Pipe()
        process.standardOutput = pipe
        try process.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        if process.terminationReason != .exit || process.terminationStatus != 0 {
            let how = process.terminationReason == .exit ? "exit \(process.terminationStatus)" : "signal \(process.terminationStatus)"
            var r = RunResult(workload: w, contender: c, seconds: 0, operations: 0, verified: false,
                              note: "child failed (\(how)): \(String(decoding: data.prefix(400), as: UTF8.self))",
                              bytesRead: 0, bytesWritten: 0, peakRSS: 0)
            r.seconds = .nan
            return r
        }
        return try JSONDecoder().decode(RunResult.self, from: data)
    }

    static func rows(_ results: [RunResult], _ o: MapBenchOptions) -> [MapBenchRow] {
        var rows: [MapBenchRow] = []
        for w in o.workloads {
            func medianFigure(_ c: Contender) -> Double {
                median(results.filter { $0.workload == w && $0.contender == c }.map(\.figure))
            }
            let mmap = medianFigure(.mmap), mmapRandom = medianFigure(.mmapRandom)
            for c in o.contenders(for: w) {
                let rs = results.filter { $0.workload == w && $0.contender == c }
                let m = median(rs.map(\.figure))
                func ratio(_ base: Double) -> Double { w.isRate ? m / base : base / m }
                rows.append(MapBenchRow(
                    workload: w, contender: c, unit: w.isRate ? "ops/s" : "s", runs: rs.map(\.figure), median: m,
                    ratioToMmap: ratio(mmap), ratioToMmapRandom: ratio(mmapRandom),
                    verified: !rs.isEmpty && rs.allSatisfy(\.verified),
                    bytesRead: Int(median(rs.map { Double($0.bytesRead) })),
                    bytesWritten: Int(median(rs.map { Double($0.bytesWritten) })),
                    peakRSS: rs.map(\.peakRSS).max() ?? 0,
                    cgroupPeak: rs.compactMap(\.cgroupPeak).max(),
                    pagerFaults: rs.first?.pager == nil ? nil : Int(median(rs.compactMap { $0.pager.map { Double($0.faults) } })),
                    softHits: c == .pagerSoft || c == .pagerInThreadSoft ? Int(median(rs.compactMap { $0.pager.map { Double($0.softHits) } })) : nil,
                    majorFaults: rs.allSatisfy { $0.majorFaults == nil } ? nil : Int(median(rs.compactMap { $0.majorFaults.map(Double.init) })),
                    bufferBytes: c.isPager ? o.bufferBytes(for: w) : nil,
                    pagerPeakResident: rs.compactMap { $0.pager?.peakResidentBytes }.max()))
            }
        }
        return rows
    }

    static func median(_ xs: [Double]) -> Double {
        let s = xs.filter { !$0.isNaN }.sorted()
        if s.isEmpty { return .nan }
        return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
    }
}

extension MapBenchReport {
    /// The report as a text table.
    public var table: String {
        func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s + " " : s + String(repeating: " ", count: n - s.count) }
        func mib(_ x: Int?) -> String { x.map { String($0 >> 20) } ?? "-" }
        let header = [("workload", 17), ("contender", 13), ("median", 11), ("unit", 6), ("x mmap", 8), ("x mmap-rnd", 11),
                      ("verified", 9), ("read MiB", 9), ("written MiB", 12), ("peak RSS MiB", 13), ("cgroup peak MiB", 16), ("pager faults", 13), ("soft hits", 10), ("maj faults", 11), ("buffer MiB", 11), ("resident MiB", 12)]
        var lines = ["cgroup: \(cgroup); cold cache: \(coldCache)", header.map { pad($0.0, $0.1) }.joined()]
        for r in rows {
            let cells = [r.workload.rawValue, r.contender.rawValue, String(format: "%.4g", r.median), r.unit,
                         String(format: "%.2f", r.ratioToMmap), String(format: "%.2f", r.ratioToMmapRandom),
                         r.verified ? "yes" : "NO", mib(r.bytesRead), mib(r.bytesWritten), mib(r.peakRSS),
                         mib(r.cgroupPeak), r.pagerFaults.map(String.init) ?? "-",
                         r.softHits.map(String.init) ?? "-", r.majorFaults.map(String.init) ?? "-", mib(r.bufferBytes),
                         r.pagerPeakResident.map { String(format: "%.1f", Double($0) / 1048576) } ?? "-"]
            lines.append(zip(cells, header).map { pad($0, $1.1) }.joined())
        }
        if let d = dirtyTracking {
            lines.append(String(format: "dirty tracking over %d pages: synchronous write protection %.0f ns/page (all found: %@), "
                                + "WP_ASYNC + PAGEMAP_SCAN %.0f ns/page (all found: %@)", d.pages, d.synchronousNanosecondsPerPage,
                                d.synchronousFoundAll ? "yes" : "NO", d.asyncNanosecondsPerPage, d.asyncFoundAll ? "yes" : "NO"))
        }
        return lines.joined(separator: "\n")
    }
}
