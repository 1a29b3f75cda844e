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

    @Test("both dirty-tracking schemes find every written page")
    func dirtyTracking() throws {
        let r = try DirtyTracking.measure(pages: 512, repetitions: 1)
        #expect(r.synchronousFoundAll && r.asyncFoundAll)
        #expect(r.synchronousNanosecondsPerPage > 0 && r.asyncNanosecondsPerPage > 0)
    }
}
