extension SnapshotDemo {
    /// Judges the issue's targets on the medians (reported, never asserted).
    static func targets(_ r: SnapshotDemoReport) -> [SnapshotDemoReport.Target] {
        var out: [SnapshotDemoReport.Target] = []
        for method in DemoMethod.allCases where method.savingThread != nil {
            out += targets(of: method, r)
        }
        for i in r.incremental {
            out.append(.init(name: "delta after \(i.dirtiedPages) pages written (THP \(i.transparentHugePages ? "on" : "off")) <= 10% of a full capture",
                             figures: "delta \(ms(i.deltaNanoseconds)), full \(ms(i.fullNanoseconds)), ratio \(format3(i.ratio)) (heap \(r.heapBytes >> 20) MiB)",
                             met: i.ratio <= 0.1 && i.mismatchedPages == 0))
        }
        if let a = r.trackingNanosecondsPerPage[TrackingMethod.wpAsync.rawValue],
           let s = r.trackingNanosecondsPerPage[TrackingMethod.syncWP.rawValue],
           let g = r.trackingNanosecondsPerPage[TrackingMethod.sigsegv.rawValue] {
            out.append(.init(name: "WP_ASYNC + PAGEMAP_SCAN >= 5x cheaper per page than sync uffd-wp and mprotect+SIGSEGV",
                             figures: "\(format1(a)) ns vs \(format1(s)) ns (x\(format1(s / a))) and \(format1(g)) ns (x\(format1(g / a)))",
                             met: a * 5 <= s && a * 5 <= g))
        }
        let wrong = r.runs.reduce(0) { $0 + $1.mismatchedPages } + r.incremental.reduce(0) { $0 + $1.mismatchedPages }
        out.append(.init(name: "every image equals the workload's log at its instant", figures: "\(wrong) wrong pages in \(r.runs.count + r.incremental.count) images", met: wrong == 0))
        return out
    }

    /// The targets that concern one of the uffd methods, judged against fork.
    private static func targets(of method: DemoMethod, _ r: SnapshotDemoReport) -> [SnapshotDemoReport.Target] {
        var out: [SnapshotDemoReport.Target] = []
        let name = method.rawValue
        if let ours = r.summary(method, thp: true), let fork = r.summary(.fork, thp: true) {
            out.append(.init(name: "\(name): pause with THP <= 1/5 of fork's",
                             figures: "\(name) \(ms(ours.pauseNanoseconds)) (arm \(ms(ours.freezeNanoseconds))), "
                                + "fork \(ms(fork.pauseNanoseconds)) (fork() \(ms(fork.freezeNanoseconds)))",
                             met: ours.pauseNanoseconds * 5 <= fork.pauseNanoseconds))
            out.append(.init(name: "\(name): write p99 during the snapshot with THP <= fork's",
                             figures: "\(name) \(format1(Double(ours.during.p99Nanoseconds) / 1000)) µs, fork \(format1(Double(fork.during.p99Nanoseconds) / 1000)) µs",
                             met: ours.during.p99Nanoseconds <= fork.during.p99Nanoseconds))
        }
        if let ours = r.summary(method, thp: false), let fork = r.summary(.fork, thp: false) {
            out.append(.init(name: "\(name): pause with 4 KiB pages <= fork's",
                             figures: "\(name) \(ms(ours.pauseNanoseconds)) (arm \(ms(ours.freezeNanoseconds))), "
                                + "fork \(ms(fork.pauseNanoseconds)) (fork() \(ms(fork.freezeNanoseconds)))",
                             met: ours.pauseNanoseconds <= fork.pauseNanoseconds))
        }
        for thp in [true, false] {
            guard let ours = r.summary(method, thp: thp), let fork = r.summary(.fork, thp: thp) else { continue }
            let label = thp ? "THP" : "4 KiB"
            let bound = Int64(r.stagingBytes) + Int64(r.heapBytes / 100)
            out.append(.init(name: "\(name): peak extra memory (\(label)) <= staging + 1% of the heap, with >= 50% of the heap dirtied",
                             figures: "\(name) \(format1(Double(ours.peakExtraBytes) / 1048576)) MiB measured "
                                + "(\(format1(Double(ours.declaredExtraBytes ?? 0) / 1048576)) declared), bound \(format1(Double(bound) / 1048576)) MiB, "
                                + "dirtied \(Int(ours.dirtiedFraction * 100))%; fork \(format1(Double(fork.peakExtraBytes) / 1048576)) MiB",
                             met: ours.peakExtraBytes <= bound && ours.dirtiedFraction >= 0.5))
            out.append(.init(name: "\(name): total time (\(label)) <= 2x fork's and >= 1 GB/s",
                             figures: "\(name) \(ms(ours.totalNanoseconds)) (\(format3(ours.bytesPerSecond / 1e9)) GB/s), fork \(ms(fork.totalNanoseconds))",
                             met: ours.totalNanoseconds <= 2 * fork.totalNanoseconds && ours.bytesPerSecond >= 1e9))
        }
        return out
    }
}

/// Nanoseconds as milliseconds, for the targets' figures.
private func ms(_ ns: UInt64) -> String { format3(Double(ns) / 1e6) + " ms" }
