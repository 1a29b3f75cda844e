import Foundation
import PagedMemory

#if canImport(Glibc)
import Glibc
#endif

/// One contender's run of one workload, in a process of its own (inside the memory cgroup).
public enum ChildRun {
    /// Joins `cgroup` (if any), runs the workload, and returns what it measured.
    public static func run(_ workload: Workload, _ contender: Contender, options o: MapBenchOptions, cgroup: String?) throws -> RunResult {
        if let cgroup { try MemoryCgroup.join(cgroup) }
        let mapper = try Mapper(contender, options: o, bufferBytes: o.bufferBytes(for: workload))
        var result = RunResult(workload: workload, contender: contender, seconds: 0, operations: 0, verified: false,
                               note: "", bytesRead: 0, bytesWritten: 0, peakRSS: 0)
        let io0 = ProcessIO.current()
        let faults0 = ProcessIO.majorFaults()
        let start = Date()
        switch workload {
        case .randomRead1, .randomRead4, .zipfRead:
            let base = try mapper.map(DataFiles.dataPath(o), pageSize: o.pageSize)
            let threads = workload == .randomRead4 ? 4 : 1
            let (ops, ok) = RandomWorkloads.read(base, bytes: o.fileBytes, threads: threads, seconds: o.seconds, zipf: workload == .zipfRead)
            result.operations = ops
            result.verified = ok
        case .readModifyWrite:
            let base = try mapper.map(DataFiles.dataPath(o), pageSize: o.pageSize)
            let (ops, touched) = RandomWorkloads.readModifyWrite(base, bytes: o.fileBytes, seconds: o.seconds)
            try mapper.sync()
            result.operations = ops
            result.seconds = Date().timeIntervalSince(start)
            try mapper.close()
            result.verified = RandomWorkloads.verifyAndRestore(path: DataFiles.dataPath(o), touched: touched)
        case .scan:
            let base = try mapper.map(DataFiles.dataPath(o), pageSize: o.bulkPageSize)
            result.verified = RandomWorkloads.scan(base, bytes: o.fileBytes)
        case .sort:
            let input = try mapper.map(DataFiles.dataPath(o), pageSize: o.bulkPageSize).assumingMemoryBound(to: UInt64.self)
            let scratch = try mapper.map(DataFiles.scratchPath(o), pageSize: o.bulkPageSize).assumingMemoryBound(to: UInt64.self)
            let runKeys = max(1 << 16, o.limitBytes / 4 / 8)
            result.verified = OutOfCore.sort(input: input, temporary: scratch, output: scratch + o.sortKeys,
                                             keys: o.sortKeys, runKeys: runKeys)
            try mapper.sync()
        case .bfs:
            guard let meta = GraphMeta.load(DataFiles.graphPath(o)) else { throw MapBenchError("no graph metadata") }
            let base = try mapper.map(DataFiles.graphPath(o), pageSize: o.graphPageSize)
            result.verified = OutOfCore.bfs(base, meta: meta)
        }
        if workload != .readModifyWrite { result.seconds = Date().timeIntervalSince(start) }
        let io1 = ProcessIO.current()
        result.bytesRead = io1.read - io0.read
        result.bytesWritten = io1.written - io0.written
        result.pager = mapper.statistics
        result.peakRSS = ProcessIO.peakRSS()
        result.majorFaults = ProcessIO.majorFaults() - faults0
        if workload != .readModifyWrite { try mapper.close() }
        return result
    }
}

/// A failure of the bench itself.
public struct MapBenchError: Error, CustomStringConvertible {
    public var description: String
    public init(_ d: String) { description = d }
}

/// Storage I/O and peak memory of this process, from `/proc/self`.
enum ProcessIO {
    static func current() -> (read: Int, written: Int) {
        let text = (try? String(contentsOfFile: "/proc/self/io", encoding: .utf8)) ?? ""
        func field(_ name: String) -> Int {
            text.split(separator: "\n").first { $0.hasPrefix(name + ":") }
                .flatMap { Int($0.split(separator: " ").last ?? "") } ?? 0
        }
        return (field("read_bytes"), field("write_bytes"))
    }

    static func majorFaults() -> Int {
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        return usage.ru_majflt
    }

    static func peakRSS() -> Int {
        let text = (try? String(contentsOfFile: "/proc/self/status", encoding: .utf8)) ?? ""
        let line = text.split(separator: "\n").first { $0.hasPrefix("VmHWM:") } ?? ""
        return (Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0) * 1024
    }
}
