import FaultEngine
import TestSupport
import Foundation
@testable import MapBench
import Testing

@Suite(.sharesProcess, .serialized, .enabled(if: canUseUserfaultfd, "this process cannot create a userfaultfd"))
struct MapBenchTests {
    @Test("the out-of-core sort sorts and its check rejects a wrong output")
    func sortChecks() {
        let n = 100_000
        var rng = SplitMix64(seed: 3)
        let input = (0..<n).map { _ in rng.next() }
        var temporary = [UInt64](repeating: 0, count: n)
        var output = [UInt64](repeating: 0, count: n)
        let ok = input.withUnsafeBufferPointer { i in
            temporary.withUnsafeMutableBufferPointer { t in
                output.withUnsafeMutableBufferPointer { o in
                    OutOfCore.sort(input: i.baseAddress!, temporary: t.baseAddress!, output: o.baseAddress!, keys: n, runKeys: 7_000)
                }
            }
        }
        #expect(ok)
        #expect(output == input.sorted())
    }

    @Test("BFS over a generated R-MAT graph matches the reference, and a damaged graph does not")
    func bfsChecks() throws {
        let path = NSTemporaryDirectory() + "/rmat-test-\(getpid()).csr"
        defer { unlink(path); unlink(path + ".json") }
        try RMAT.generate(path: path, scale: 10, edgeFactor: 8)
        let meta = try #require(GraphMeta.load(path))
        #expect(meta.vertices == 1024 && meta.edges == 8192)
        #expect(meta.reached > 1 && meta.depth > 0)
        var data = try Data(contentsOf: URL(fileURLWithPath: path))
        try data.withUnsafeMutableBytes { raw in
            let base = try #require(raw.baseAddress)
            #expect(OutOfCore.bfs(base, meta: meta))
            // Point every edge at vertex 0: nothing beyond the source's neighbours is reached.
            let targets = (base + RMAT.targetsOffset(vertices: meta.vertices)).assumingMemoryBound(to: UInt32.self)
            for e in 0..<meta.edges { targets[e] = 0 }
            #expect(!OutOfCore.bfs(base, meta: meta))
        }
    }

    @Test("the pager's buffer is the limit less the workload's arrays and the pager's bookkeeping; BFS maps 4 KiB pages")
    func bufferPerWorkload() {
        var o = MapBenchOptions()
        o.limitBytes = 48 << 20
        o.graphScale = 20
        o.fillers = 4
        let bookkeeping = (48 << 20) / 4096 * 16
        #expect(o.reserve(for: .bfs) == (2 << 20) + (8 << 20) + 4 * 4096 + bookkeeping)
        #expect(o.reserve(for: .randomRead1) == (2 << 20) + 4 * 4096 + bookkeeping)
        #expect(o.reserve(for: .sort) == (2 << 20) + (6 << 20) + 4 * (1 << 20) + bookkeeping)
        #expect(o.bufferBytes(for: .bfs) == o.limitBytes - o.reserve(for: .bfs))
        #expect(o.pageSize(for: .bfs) == 4096 && o.pageSize(for: .sort) == 64 << 10)
        o.reserveBytes = 40 << 20
        #expect(o.bufferBytes(for: .bfs) == 8 << 20)
        o.contenders = [.mmapRandom, .pagerInThreadSoft]
        #expect(o.contenders(for: .bfs) == [.mmapRandom, .pagerInThreadSoft])
        #expect(o.contenders(for: .randomRead1) == [.mmapRandom, .pagerInThreadSoft])
        #expect(o.contenders(for: .zipfRead) == [.mmapRandom])
    }

    @Test("both dirty-tracking schemes find every written page")
    func dirtyTracking() throws {
        let r = try DirtyTracking.measure(pages: 512, repetitions: 1)
        #expect(r.synchronousFoundAll && r.asyncFoundAll)
        #expect(r.synchronousNanosecondsPerPage > 0 && r.asyncNanosecondsPerPage > 0)
    }
}
