import FaultEngine
import Snapshot
import TestSupport
import Testing
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

extension SnapshotTests {
    /// Private hugetlb memory: protection, copy before write, holes and the index per 2 MiB page.
    @Suite(.serialized, .timeLimit(.minutes(2)), .enabled(if: captureSupported, "needs WP_UNPOPULATED and WP on hugetlbfs/shmem"))
    struct HugetlbTests {
        static let huge = HugePages.size
        static let subpages = huge / page

        /// The base pages of huge page `h` (read into `buffer`) that do not hold their logged version.
        static func mismatches(_ log: [UInt64], hugePage h: Int, in buffer: UnsafeMutableRawPointer) -> [Int] {
            var bad: [Int] = []
            for s in 0..<subpages {
                let p = h * subpages + s
                let words = (buffer + s * page).assumingMemoryBound(to: UInt64.self)
                for w in 0..<(page / 8) where words[w] != word(page: p, version: log[p], index: w) {
                    bad.append(p)
                    break
                }
            }
            return bad
        }

        @Test(.needsFreeHugePages(8), .usesHugePages, arguments: Snapshotter.SavingThread.allCases)
        func writtenDuringCaptureEqualsTheInstantAndRestores(savingThread: Snapshotter.SavingThread) throws {
            // Eight huge pages: writers update the first four, the last four are never touched.
            let memory = try TestMemory(hugetlbLength: 8 * Self.huge)
            let workload = Workload(memory: memory, threads: 2)
            workload.hotPages = 4 * Self.subpages
            for p in stride(from: 0, to: workload.hotPages, by: 3) {
                workload.versions[p] = 1
                memory.write(page: p, version: 1)
            }
            var options = Snapshotter.Options()
            options.savingThread = savingThread
            let snapshotter = try Snapshotter(regions: [memory.range], options: options)
            #expect(snapshotter.pageSize == Self.huge)
            workload.start(seed: 11)
            while workload.operations.load(ordering: .relaxed) < 2000 { sched_yield() }
            let log = VersionLog()
            let file = TemporaryPath("hugetlb")
            let capture = try snapshotter.capture(to: file.path, quiesce: workload.quiesce(into: log))
            let result = try capture.wait()
            let during = workload.operations.load(ordering: .relaxed)
            workload.stop()
            #expect(during > 2000, "the writers ran")
            #expect(protectedPages(memory.range) == 0, "no page is left protected")
            #expect(result.streamedPages + result.savedBeforeWritePages == 8)
            let instant = log.versions
            #expect(instant.contains(where: { $0 > 1 }), "some pages were written before the instant")

            let chain = try SnapshotChain(paths: [file.path])
            #expect(chain.pageSize == Self.huge)
            #expect(chain.pageCount == 8)
            #expect(chain.regions.map(\.kind) == [.hugetlb])
            let kinds = chain.files[0].kindCounts()
            #expect(kinds[.data] == 4 && kinds[.hole] == 4, "four written huge pages, four holes: \(kinds)")
            for h in 4..<8 { #expect(chain.files[0].kind(of: h) == .hole, "huge page \(h)") }

            let buffer = UnsafeMutableRawPointer.allocate(byteCount: Self.huge, alignment: page)
            defer { buffer.deallocate() }
            var bad: [Int] = []
            for h in 0..<8 {
                try chain.readPage(h, into: buffer)
                bad += Self.mismatches(instant, hugePage: h, in: buffer)
            }
            #expect(bad.isEmpty, "pages differing from their version at the instant: \(bad.prefix(10)) of \(bad.count)")

            // The page source a FaultServer reads, a huge page per fill.
            let source = SnapshotSource(chain)
            bad = []
            for h in 0..<8 {
                memset(buffer, 0xA5, Self.huge)
                try source.fill(UnsafeMutableRawBufferPointer(start: buffer, count: Self.huge), at: UInt64(h * Self.huge))
                bad += Self.mismatches(instant, hugePage: h, in: buffer)
            }
            #expect(bad.isEmpty, "source: \(bad.prefix(10)) of \(bad.count)")

            // The flattened raw image.
            let raw = TemporaryPath("hugetlb-raw")
            #expect(try chain.flatten(to: raw.path) == UInt64(4 * Self.huge), "the four data huge pages are written")
            let fd = open(raw.path, O_RDONLY | O_CLOEXEC)
            try #require(fd >= 0)
            defer { close(fd) }
            #expect(lseek(fd, 0, SEEK_END) == off_t(8 * Self.huge))
            bad = []
            for h in 0..<8 {
                memset(buffer, 0xA5, Self.huge)
                #expect(pread(fd, buffer, Self.huge, off_t(h * Self.huge)) == Self.huge)
                bad += Self.mismatches(instant, hugePage: h, in: buffer)
            }
            #expect(bad.isEmpty, "flattened: \(bad.prefix(10)) of \(bad.count)")

            // Restored lazily into 4 KiB anonymous memory through a FaultServer, whose
            // fills are parts of the chain's huge pages.
            let target = try MemoryMapping.anonymous(length: chain.pageCount * Self.huge)
            let uffd = try Userfaultfd(features: [])
            try uffd.handle.register(target.range, mode: .missing)
            let server = try FaultServer(userfaultfd: uffd, regions: [ServedRegion(range: target.range)], source: source)
            try server.start()
            bad = []
            for h in 0..<8 {
                memcpy(buffer, target.base + h * Self.huge, Self.huge)
                bad += Self.mismatches(instant, hugePage: h, in: buffer)
            }
            server.stop()
            #expect(bad.isEmpty, "restored through a FaultServer: \(bad.prefix(10)) of \(bad.count)")
        }

        @Test(.needsFreeHugePages(2), .usesHugePages)
        func neverTouchedHugetlbIsHoles() throws {
            let memory = try TestMemory(hugetlbLength: 2 * Self.huge)
            let snapshotter = try Snapshotter(regions: [memory.range])
            let file = TemporaryPath("hugetlb-holes")
            let result = try snapshotter.capture(to: file.path).wait()
            #expect(result.savedBeforeWritePages == 0)
            #expect(protectedPages(memory.range) == 0)
            let chain = try SnapshotChain(paths: [file.path])
            #expect(chain.files[0].kindCounts() == [.hole: 2])
            // Capturing allocated no huge page: nothing of the region is resident.
            var residency = [UInt8](repeating: 1, count: 2 * Self.subpages)
            #expect(mincore(memory.base, memory.length, &residency) == 0)
            #expect(residency.allSatisfy { $0 & 1 == 0 })
            let buffer = UnsafeMutableRawPointer.allocate(byteCount: Self.huge, alignment: page)
            defer { buffer.deallocate() }
            memset(buffer, 0xA5, Self.huge)
            try chain.readPage(1, into: buffer)
            #expect(UnsafeRawBufferPointer(start: buffer, count: Self.huge).allSatisfy { $0 == 0 })
        }

        @Test(.needsFreeHugePages(1), .usesHugePages)
        func mixingPageSizesIsRefusedByName() throws {
            let memory = try TestMemory(hugetlbLength: Self.huge)
            let small = try TestMemory(kind: .anonymous, length: 16 * page)
            #expect {
                _ = try Snapshotter(regions: [small.range, memory.range])
            } throws: { error in
                guard let e = error as? SnapshotError, case .unsupported(let why) = e.kind else { return false }
                return why.contains("one page size")
            }
        }
    }
}

extension SnapshotTests.HugetlbTests {
    /// Deltas on hugetlb: written huge pages tracked with WP_ASYNC + PAGEMAP_SCAN, each
    /// chain restoring its instant. With 64 MiB of staging each delta is copied while the
    /// writers are held; with 4 MiB (two huge pages) it does not fit (3000 random writes
    /// over four huge pages) and the regions go back to copy before write.
    @Test(.needsFreeHugePages(8), .usesHugePages, arguments: [64 << 20, 4 << 20])
    func aHugetlbDeltaChainRestoresEachInstant(stagingBytes: Int) throws {
        try #require((try? Userfaultfd.probe().features.contains(.wpAsync)) ?? false, "needs WP_ASYNC")
        let memory = try TestMemory(hugetlbLength: 8 * Self.huge)
        let workload = Workload(memory: memory, threads: 2)
        workload.hotPages = 4 * Self.subpages
        for p in stride(from: 0, to: workload.hotPages, by: 3) {
            workload.versions[p] = 1
            memory.write(page: p, version: 1)
        }
        var options = Snapshotter.Options()
        options.incremental = true
        options.stagingBytes = stagingBytes
        let snapshotter = try Snapshotter(regions: [memory.range], options: options)
        workload.start(seed: 5)
        let (files, logs, results) = try captureSeries(snapshotter, workload, count: 3, name: "hugetlb-delta")
        workload.stop()
        for r in results[1...] {
            if stagingBytes >= memory.length {
                #expect(r.heldCopyPages > 0 && r.heldCopyPages == r.savedBeforeWritePages && r.faults == 0, "\(r)")
            } else {
                #expect(r.heldCopyPages == 0, "\(r)")
            }
        }
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: Self.huge, alignment: page)
        defer { buffer.deallocate() }
        for i in 0..<3 {
            let chain = try SnapshotChain(paths: files[0...i].map(\.path))
            var bad: [Int] = []
            for h in 0..<8 {
                try chain.readPage(h, into: buffer)
                bad += Self.mismatches(logs[i], hugePage: h, in: buffer)
            }
            #expect(bad.isEmpty, "chain of \(i + 1): \(bad.count) pages differ, first \(bad.prefix(5))")
        }
        let delta = try SnapshotFile(path: files[2].path)
        #expect(delta.isDelta)
        #expect(delta.kindCounts()[.unchanged] == 4, "the four never-written huge pages stay with the parent: \(delta.kindCounts())")
    }
}

extension SnapshotTests.HugetlbTests {
    @Test(.needsFreeHugePages(2), .usesHugePages, .enabled(if: commandsBuilt, "needs uffd built"))
    func inspectShowsAHugetlbFile() throws {
        let memory = try TestMemory(hugetlbLength: 2 * Self.huge)
        for p in 0..<Self.subpages { memory.write(page: p, version: 1) }
        let file = TemporaryPath("hugetlb-inspect")
        _ = try Snapshotter(regions: [memory.range]).capture(to: file.path).wait()
        let (status, output) = try runUffd(["snapshot", "inspect", file.path])
        #expect(status == 0, "\(output)")
        #expect(output.contains("\(Self.huge)-byte pages"), "\(output)")
        #expect(output.contains("(2 pages, hugetlb)"), "\(output)")
        #expect(output.contains("data 1"), "\(output)")
        #expect(output.contains("checksums: all"), "\(output)")
    }
}
