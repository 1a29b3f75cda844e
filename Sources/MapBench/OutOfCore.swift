import Foundation

/// The out-of-core workloads: a two-phase sort and BFS, over mapped memory.
enum OutOfCore {
    /// Sorts `keys` 64-bit keys from `input` into `output`: sorted runs of `runKeys`
    /// keys into `temporary`, then one k-way merge. - Returns: whether the output is
    /// in order and holds the input's keys (same count, sum and xor).
    static func sort(input: UnsafePointer<UInt64>, temporary: UnsafeMutablePointer<UInt64>,
                     output: UnsafeMutablePointer<UInt64>, keys: Int, runKeys: Int) -> Bool {
        var sum: UInt64 = 0, xor: UInt64 = 0
        var runs: [(start: Int, end: Int)] = []
        var start = 0
        while start < keys {
            let end = min(keys, start + runKeys)
            for i in start..<end {
                let k = input[i]
                sum &+= k
                xor ^= k
                temporary[i] = k
            }
            var run = UnsafeMutableBufferPointer(start: temporary + start, count: end - start)
            run.sort()
            runs.append((start, end))
            start = end
        }
        var heads = runs.map { $0.start }
        var outSum: UInt64 = 0, outXor: UInt64 = 0
        var previous: UInt64 = 0
        var ordered = true
        for o in 0..<keys {
            var best = -1
            var bestKey = UInt64.max
            for r in 0..<runs.count where heads[r] < runs[r].end {
                let k = temporary[heads[r]]
                if best < 0 || k < bestKey { best = r; bestKey = k }
            }
            heads[best] += 1
            output[o] = bestKey
            if bestKey < previous { ordered = false }
            previous = bestKey
            outSum &+= bestKey
            outXor ^= bestKey
        }
        // Read the output back as a reader would: in order, same keys.
        var checkSum: UInt64 = 0
        for o in 0..<keys {
            if o > 0 && output[o] < output[o - 1] { ordered = false }
            checkSum &+= output[o]
        }
        return ordered && outSum == sum && outXor == xor && checkSum == sum
    }

    /// BFS from vertex 0 over a CSR graph at `base`. - Returns: whether the reached
    /// count, level sum and depth equal the reference.
    static func bfs(_ base: UnsafeMutableRawPointer, meta: GraphMeta) -> Bool {
        let offsets = UnsafePointer(base.assumingMemoryBound(to: UInt64.self))
        let targets = UnsafePointer((base + RMAT.targetsOffset(vertices: meta.vertices)).assumingMemoryBound(to: UInt32.self))
        var level = [Int32](repeating: -1, count: meta.vertices)
        let r = BFS.run(offsets: offsets, targets: targets, vertices: meta.vertices, level: &level)
        return r.reached == meta.reached && r.levelSum == meta.levelSum && r.depth == meta.depth
    }
}
