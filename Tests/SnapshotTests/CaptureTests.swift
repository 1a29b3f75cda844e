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
    @Suite(.serialized, .timeLimit(.minutes(2)), .enabled(if: captureSupported, "needs WP_UNPOPULATED and WP on shmem"))
    struct CaptureTests {
        /// Captures `memory` under `threads` writers; returns the file, the version log and the result.
        static func captureUnderWriters(_ memory: TestMemory, threads: Int = 2, options: Snapshotter.Options = .init(),
                                        file: TemporaryPath) throws -> (log: [UInt64], result: Capture.Result) {
            let workload = Workload(memory: memory, threads: threads)
            workload.populate(stride: 3)
            let snapshotter = try Snapshotter(regions: [memory.range], options: options)
            workload.start(seed: 42)
            while workload.operations.load(ordering: .relaxed) < 2000 { sched_yield() }
            let log = VersionLog()
            let capture = try snapshotter.capture(to: file.path, quiesce: workload.quiesce(into: log))
            let result = try capture.wait()
            let during = workload.operations.load(ordering: .relaxed)
            workload.stop()
            #expect(during > 2000, "the writers ran")
            #expect(protectedPages(memory.range) == 0, "no page is left protected")
            return (log.versions, result)
        }

        @Test(arguments: TestMemoryKind.allCases, Snapshotter.SavingThread.allCases)
        func everyPageHoldsItsVersionAtTheInstant(kind: TestMemoryKind, savingThread: Snapshotter.SavingThread) throws {
            let memory = try TestMemory(kind: kind, length: 16 << 20)
            let file = TemporaryPath("consistency-\(kind)")
            var options = Snapshotter.Options()
            options.savingThread = savingThread
            let (log, result) = try Self.captureUnderWriters(memory, options: options, file: file)
            #expect(log.contains(where: { $0 > 1 }), "some pages were written before the instant")
            #expect(result.streamedPages + result.savedBeforeWritePages == memory.pages)
            let chain = try SnapshotChain(paths: [file.path])
            let bad = try mismatches(log) { p, buffer in try chain.readPage(p, into: buffer) }
            #expect(bad.isEmpty, "pages differing from their version at the instant: \(bad.prefix(10)) of \(bad.count)")
            let kinds = chain.files[0].kindCounts()
            if kind != .memfd {
                #expect((kinds[.hole] ?? 0) + (kinds[.zero] ?? 0) > 0, "never-touched pages are holes or zero: \(kinds)")
            }
        }

        @Test(arguments: Snapshotter.SavingThread.allCases)
        func stagingBoundHoldsUnderAWriteStorm(savingThread: Snapshotter.SavingThread) throws {
            let memory = try TestMemory(kind: .anonymous, length: 32 << 20)
            var options = Snapshotter.Options()
            options.savingThread = savingThread
            options.stagingBytes = 64 * page
            options.faultChunkPages = 16
            options.streamChunkBytes = 256 << 10
            let file = TemporaryPath("storm")
            let (log, result) = try Self.captureUnderWriters(memory, threads: 2, options: options, file: file)
            #expect(result.peakStagedPages <= 64, "peak \(result.peakStagedPages) pages staged, bound 64")
            #expect(result.stagingBytes == 64 * page)
            #expect(result.savedBeforeWritePages > 0, "writers hit protected pages: \(result)")
            let chain = try SnapshotChain(paths: [file.path])
            let bad = try mismatches(log) { p, buffer in try chain.readPage(p, into: buffer) }
            let buffer = UnsafeMutableRawPointer.allocate(byteCount: page, alignment: page)
            defer { buffer.deallocate() }
            let described: [String] = try bad.prefix(6).map { p in
                try chain.readPage(p, into: buffer)
                let w0 = buffer.load(as: UInt64.self)
                let found = (0..<UInt64(1000)).first { word(page: p, version: $0, index: 0) == w0 }
                return "page \(p) kind \(chain.files[0].kind(of: p)) logged v\(log[p]) found v\(found.map(String.init) ?? "?")"
            }
            #expect(bad.isEmpty, "\(bad.count) pages wrong: \(described)")
        }

        @Test(arguments: Snapshotter.SavingThread.allCases)
        func cancelLeavesNothingProtectedAndNoWriterHeld(savingThread: Snapshotter.SavingThread) throws {
            let memory = try TestMemory(kind: .anonymous, length: 32 << 20)
            let workload = Workload(memory: memory, threads: 2)
            workload.populate(stride: 1)
            var options = Snapshotter.Options()
            options.savingThread = savingThread
            options.streamChunkBytes = 64 << 10
            let snapshotter = try Snapshotter(regions: [memory.range], options: options)
            let file = TemporaryPath("cancel")
            workload.start(seed: 7)
            let capture = try snapshotter.capture(to: file.path, quiesce: workload.quiesce(into: VersionLog()))
            capture.cancel()
            #expect(throws: SnapshotError.self) { try capture.wait() }
            #expect(protectedPages(memory.range) == 0, "no page is left protected")
            // The writers go on, and every page can be written: a protected one would hold
            // this thread forever.
            let before = workload.operations.load(ordering: .relaxed)
            while workload.operations.load(ordering: .relaxed) < before + 1000 { sched_yield() }
            workload.stop()
            for p in 0..<memory.pages { memory.write(page: p, version: 99) }
            #expect(throws: SnapshotError.self) { try SnapshotFile(path: file.path) }
            // The snapshotter takes another capture after a cancel.
            let again = TemporaryPath("after-cancel")
            try snapshotter.capture(to: again.path).wait()
            let chain = try SnapshotChain(paths: [again.path])
            let bad = try mismatches([UInt64](repeating: 99, count: memory.pages)) { p, b in try chain.readPage(p, into: b) }
            #expect(bad.isEmpty, "\(bad.count) pages wrong, first \(bad.prefix(5))")
        }

        /// Saving in the writing thread, the kernel's own write into a protected page
        /// cannot be held: `read(2)` fails with EFAULT, as the documentation says, and
        /// the image keeps the page's bytes at the instant.
        @Test func aSystemCallWritingAProtectedPageFailsWhenWritersSaveThemselves() throws {
            let memory = try TestMemory(kind: .anonymous, length: 256 << 20)
            let last = memory.pages - 1
            memory.write(page: last, version: 3)
            var options = Snapshotter.Options()
            options.savingThread = .writingThread
            options.streamChunkBytes = 64 << 10
            let snapshotter = try Snapshotter(regions: [memory.range], options: options)
            var fds: [Int32] = [0, 0]
            try #require(pipe(&fds) == 0)
            defer { close(fds[0]); close(fds[1]) }
            #expect(Glibc.write(fds[1], "abcdefgh", 8) == 8)
            let file = TemporaryPath("efault")
            let capture = try snapshotter.capture(to: file.path)
            // The image writer streams in address order: the last page is still protected.
            let n = read(fds[0], memory.base + last * page, 8)
            let e = errno
            try capture.wait()
            #expect(n == -1 && e == EFAULT, "read returned \(n), errno \(e)")
            #expect(read(fds[0], memory.base + last * page, 8) == 8, "after the capture the same read works")
            let chain = try SnapshotChain(paths: [file.path])
            let bad = try mismatches(Array(repeating: 0, count: last) + [3]) { p, b in try chain.readPage(p, into: b) }
            #expect(bad.isEmpty, "\(bad.count) pages differ from the instant")
        }

        @Test(.enabled(if: getuid() == 0, "mounts a small tmpfs (needs root)"))
        func anImageWriterDyingMidCaptureLeavesNothingProtected() throws {
            // A 1 MiB tmpfs: the image writer fails with ENOSPC part way through 8 MiB.
            let dir = TemporaryPath("full-dir")
            try #require(mkdir(dir.path, 0o700) == 0)
            defer { rmdir(dir.path) }
            if mount("none", dir.path, "tmpfs", 0, "size=1m") != 0 {
                let reason = String(cString: strerror(errno))
                try Test.cancel("mounting a 1 MiB tmpfs was refused (\(reason)): no file system to fill here")
            }
            defer { umount2(dir.path, Int32(MNT_DETACH)) }
            let memory = try TestMemory(kind: .anonymous, length: 8 << 20)
            let workload = Workload(memory: memory, threads: 2)
            workload.populate(stride: 1)
            let snapshotter = try Snapshotter(regions: [memory.range])
            workload.start(seed: 9)
            let capture = try snapshotter.capture(to: dir.path + "/image", quiesce: workload.quiesce(into: VersionLog()))
            #expect {
                try capture.wait()
            } throws: { error in
                guard let e = error as? SnapshotError, case .system(_, let errno) = e.kind else { return false }
                return errno == ENOSPC
            }
            #expect(protectedPages(memory.range) == 0)
            let before = workload.operations.load(ordering: .relaxed)
            while workload.operations.load(ordering: .relaxed) < before + 1000 { sched_yield() }
            workload.stop()
            for p in 0..<memory.pages { memory.write(page: p, version: 5) }
            #expect(throws: SnapshotError.self) { try SnapshotFile(path: dir.path + "/image") }
            unlink(dir.path + "/image")
        }

        /// Shared hugetlb memory captured through a second mapping of its memfd: pages in
        /// the file but not mapped there are read through the file, holes read as zeros,
        /// and a page written after the instant holds its bytes from the instant.
        @Test(.needsFreeHugePages(3), .usesHugePages,
              .enabled(if: geteuid() == 0, "the file is read through /proc/self/map_files, which needs CAP_SYS_ADMIN"))
        func sharedHugetlbPagesNotMappedHereComeFromTheFile() throws {
            let huge = HugePages.size
            let memory = try MemoryMapping(kind: .hugetlb, length: 4 * huge)
            // Through the first mapping: huge pages 0 and 2 hold a pattern, 1 and 3 are holes.
            for h in [0, 2] { memset(memory.base + h * huge, Int32(0x40 + h), huge) }
            let memfd = memory.memfd
            let fd = try #require(memfd).rawValue
            let second = try #require(mmap(nil, 4 * huge, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0))
            try #require(second != MAP_FAILED, "mmap errno \(errno)")
            defer { munmap(second, 4 * huge) }
            let snapshotter = try Snapshotter(regions: [MemoryRange(second, length: 4 * huge)])
            #expect(snapshotter.pageSize == huge)
            let file = TemporaryPath("shared-hugetlb")
            let capture = try snapshotter.capture(to: file.path)
            // After the instant, through the captured mapping (copy before write).
            memset(second + 2 * huge, 0x7f, huge)
            let result = try capture.wait()
            #expect(result.streamedPages + result.savedBeforeWritePages == 4)
            let chain = try SnapshotChain(paths: [file.path])
            #expect(chain.regions.map(\.kind) == [.hugetlb])
            let buffer = UnsafeMutableRawPointer.allocate(byteCount: huge, alignment: 4096)
            defer { buffer.deallocate() }
            for h in 0..<4 {
                try chain.readPage(h, into: buffer)
                let expected: UInt8 = h % 2 == 0 ? UInt8(0x40 + h) : 0
                let bytes = UnsafeRawBufferPointer(start: buffer, count: huge)
                #expect(bytes.allSatisfy { $0 == expected }, "huge page \(h) holds \(bytes[0]), expected \(expected)")
                #expect(chain.files[0].kind(of: h) == (h % 2 == 0 ? .data : .zero), "huge page \(h)")
            }
            #expect(UnsafeRawBufferPointer(start: second + 2 * huge, count: huge).allSatisfy { $0 == 0x7f }, "the write went through")
        }
    }
}
