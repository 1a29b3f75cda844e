import FaultEngine
import Snapshot
import Testing
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

extension SnapshotTests {
    @Suite(.serialized, .timeLimit(.minutes(2)),
           .enabled(if: captureSupported && ((try? Userfaultfd.probe().features.contains(.wpAsync)) ?? false), "needs WP_ASYNC"))
    struct DeltaTests {
        /// With 64 MiB of staging each delta fits and is copied while the writers are
        /// held; with 256 KiB it does not, and the regions go back to copy before write.
        @Test(arguments: [(TestMemoryKind.anonymous, 64 << 20, Snapshotter.SavingThread.handlerThread),
                          (.anonymous, 256 << 10, .handlerThread), (.memfd, 64 << 20, .handlerThread),
                          (.memfd, 256 << 10, .handlerThread), (.anonymous, 256 << 10, .writingThread),
                          (.memfd, 256 << 10, .writingThread)])
        func aDeltaChainRestoresEachInstantExactly(kind: TestMemoryKind, stagingBytes: Int,
                                                   savingThread: Snapshotter.SavingThread) throws {
            let memory = try TestMemory(kind: kind, length: 16 << 20)
            let workload = Workload(memory: memory, threads: 2)
            workload.hotPages = memory.pages / 8
            workload.populate(stride: 3)
            var options = Snapshotter.Options()
            options.incremental = true
            options.stagingBytes = stagingBytes
            options.savingThread = savingThread
            let snapshotter = try Snapshotter(regions: [memory.range], options: options)
            workload.start(seed: 11)
            let (files, logs, results) = try captureSeries(snapshotter, workload, count: 3, name: "delta-\(kind)")
            workload.stop()
            for i in 0..<3 {
                let chain = try SnapshotChain(paths: files[0...i].map(\.path))
                let bad = try mismatches(logs[i]) { p, b in try chain.readPage(p, into: b) }
                #expect(bad.isEmpty, "chain of \(i + 1): \(bad.count) pages differ, first \(bad.prefix(5))")
            }
            let full = try SnapshotFile(path: files[0].path)
            let delta = try SnapshotFile(path: files[2].path)
            #expect(!full.isDelta && delta.isDelta)
            #expect(delta.parentID == (try SnapshotFile(path: files[1].path)).id)
            let unchanged = delta.kindCounts()[.unchanged] ?? 0
            #expect(unchanged >= memory.pages / 2, "a delta leaves untouched pages to its parent: \(delta.kindCounts())")
            #expect(results[2].streamedPages + results[2].savedBeforeWritePages < memory.pages / 2)
            #expect(results[0].heldCopyPages == 0, "a full capture copies nothing while the writers are held")
            for r in results[1...] {
                if stagingBytes >= memory.range.length / 2 {
                    #expect(r.heldCopyPages > 0 && r.heldCopyPages == r.savedBeforeWritePages && r.faults == 0, "\(r)")
                } else {
                    #expect(r.heldCopyPages == 0, "\(r)")
                }
            }
            // Out of order, or without its parent: refused.
            for paths in [[files[0].path, files[2].path], [files[1].path], [files[1].path, files[0].path]] {
                #expect {
                    _ = try SnapshotChain(paths: paths)
                } throws: { error in
                    guard let e = error as? SnapshotError, case .wrongParent = e.kind else { return false }
                    return true
                }
            }
            // Restored lazily through a FaultServer, the chain gives the last instant byte for byte.
            let chain = try SnapshotChain(paths: files.map(\.path))
            let target = try MemoryMapping.anonymous(length: chain.pageCount * page)
            let uffd = try Userfaultfd(features: [])
            try uffd.handle.register(target.range, mode: .missing)
            let server = try FaultServer(userfaultfd: uffd, regions: [ServedRegion(range: target.range)], source: SnapshotSource(chain))
            try server.start()
            let bad = mismatches(logs[2]) { p, b in memcpy(b, target.base + p * page, page) }
            server.stop()
            #expect(bad.isEmpty, "\(bad.count) restored pages differ")
        }

        @Test func incrementalCapturesNeedAQuiesceHook() throws {
            let memory = try TestMemory(kind: .anonymous, length: 1 << 20)
            var options = Snapshotter.Options()
            options.incremental = true
            let snapshotter = try Snapshotter(regions: [memory.range], options: options)
            let file = TemporaryPath("no-hook")
            #expect(throws: SnapshotError.self) { _ = try snapshotter.capture(to: file.path) }
        }
    }
}
