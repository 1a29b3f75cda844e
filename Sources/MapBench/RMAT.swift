import Foundation
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// What the graph file holds besides the CSR arrays: its sizes and the reference BFS from vertex 0.
public struct GraphMeta: Codable, Sendable, Equatable {
    public var vertices: Int
    public var edges: Int
    /// Vertices reached from vertex 0.
    public var reached: Int
    /// The sum of their levels.
    public var levelSum: Int
    /// The deepest level.
    public var depth: Int

    static func path(_ graph: String) -> String { graph + ".json" }
    static func load(_ graph: String) -> GraphMeta? {
        guard let data = FileManager.default.contents(atPath: path(graph)) else { return nil }
        return try? JSONDecoder().decode(GraphMeta.self, from: data)
    }
}

/// An R-MAT graph (a = 0.57, b = c = 0.19, d = 0.05) in CSR form: `vertices + 1`
/// 64-bit offsets, then `edges` 32-bit targets, sources in order.
public enum RMAT {
    /// Byte offset of the target array.
    public static func targetsOffset(vertices: Int) -> Int { (vertices + 1) * 8 }

    /// Writes the graph to `path` and its reference BFS to `path.json`.
    public static func generate(path: String, scale: Int, edgeFactor: Int) throws {
        let vertices = 1 << scale
        let edges = vertices * edgeFactor
        let bytes = targetsOffset(vertices: vertices) + edges * 4
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        if fd < 0 || ftruncate(fd, off_t(bytes)) != 0 { throw Errno(rawValue: errno) }
        defer { close(fd) }
        guard let raw = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), raw != MAP_FAILED else {
            throw Errno(rawValue: errno)
        }
        defer { munmap(raw, bytes) }
        let offsets = raw.assumingMemoryBound(to: UInt64.self)
        let targets = (raw + targetsOffset(vertices: vertices)).assumingMemoryBound(to: UInt32.self)
        // Pass 1 counts out-degrees, pass 2 places targets: the same edges, drawn twice.
        var degree = [UInt64](repeating: 0, count: vertices + 1)
        forEachEdge(scale: scale, edges: edges) { s, _ in degree[s + 1] += 1 }
        for v in 0..<vertices { degree[v + 1] += degree[v] }
        for v in 0...vertices { offsets[v] = degree[v] }
        forEachEdge(scale: scale, edges: edges) { s, t in
            targets[Int(degree[s])] = UInt32(t)
            degree[s] += 1
        }
        let meta = referenceBFS(offsets: offsets, targets: targets, vertices: vertices, edges: edges)
        msync(raw, bytes, MS_SYNC)
        try JSONEncoder().encode(meta).write(to: URL(fileURLWithPath: GraphMeta.path(path)))
    }

    /// Draws the edges in a fixed order from a fixed seed.
    private static func forEachEdge(scale: Int, edges: Int, _ body: (Int, Int) -> Void) {
        var state: UInt64 = 0x5EED
        @inline(__always) func next() -> UInt64 {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
        // Quadrant thresholds out of 256: a = 146, a+b = 195, a+b+c = 244.
        for _ in 0..<edges {
            var s = 0, t = 0
            var bits = next()
            var left = 8
            for _ in 0..<scale {
                if left == 0 { bits = next(); left = 8 }
                let r = bits & 0xFF
                bits >>= 8
                left -= 1
                s <<= 1
                t <<= 1
                if r >= 244 { s |= 1; t |= 1 } else if r >= 195 { s |= 1 } else if r >= 146 { t |= 1 }
            }
            body(s, t)
        }
    }

    /// BFS from vertex 0 over CSR arrays in memory.
    public static func referenceBFS(offsets: UnsafePointer<UInt64>, targets: UnsafePointer<UInt32>, vertices: Int, edges: Int) -> GraphMeta {
        var level = [Int32](repeating: -1, count: vertices)
        let result = BFS.run(offsets: offsets, targets: targets, vertices: vertices, level: &level)
        return GraphMeta(vertices: vertices, edges: edges, reached: result.reached, levelSum: result.levelSum, depth: result.depth)
    }
}

/// Level-synchronous BFS from vertex 0, the same code for the reference and every contender.
public enum BFS {
    public static func run(offsets: UnsafePointer<UInt64>, targets: UnsafePointer<UInt32>, vertices: Int,
                           level: inout [Int32]) -> (reached: Int, levelSum: Int, depth: Int) {
        var frontier: [UInt32] = [0]
        var next: [UInt32] = []
        level[0] = 0
        var reached = 1
        var levelSum = 0
        var depth = 0
        while !frontier.isEmpty {
            depth += 1
            next.removeAll(keepingCapacity: true)
            for v in frontier {
                let from = Int(offsets[Int(v)]), to = Int(offsets[Int(v) + 1])
                if from >= to { continue }
                for e in from..<to {
                    let t = Int(targets[e])
                    if level[t] < 0 {
                        level[t] = Int32(depth)
                        reached += 1
                        levelSum += depth
                        next.append(UInt32(t))
                    }
                }
            }
            swap(&frontier, &next)
        }
        return (reached, levelSum, depth - 1)
    }
}
