import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A cgroup v1 memory cgroup the bench creates, confines its runs to and removes.
public final class MemoryCgroup {
    public static let root = "/sys/fs/cgroup/memory"
    public let path: String

    /// Creates `root/name` with `memory.limit_in_bytes = limit`.
    /// - Throws: ``MapBenchError`` saying why (no v1 memory controller, not root).
    public init(name: String, limit: Int) throws {
        var st = stat()
        if stat(Self.root + "/memory.limit_in_bytes", &st) != 0 {
            throw MapBenchError("no cgroup v1 memory controller at \(Self.root)")
        }
        path = Self.root + "/" + name
        if mkdir(path, 0o755) != 0 && errno != EEXIST { throw MapBenchError("mkdir \(path): errno \(errno)") }
        do {
            try Self.write("\(limit)", to: path + "/memory.limit_in_bytes")
        } catch {
            rmdir(path)
            throw error
        }
    }

    deinit { remove() }

    /// Resets the peak usage to the current usage.
    public func resetPeak() { try? Self.write("0", to: path + "/memory.max_usage_in_bytes") }

    /// The peak usage since the last reset (anonymous memory and page cache).
    public var peak: Int? {
        (try? String(contentsOfFile: path + "/memory.max_usage_in_bytes", encoding: .utf8))
            .flatMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
    }

    /// Removes the cgroup (it must be empty: children have exited).
    public func remove() { rmdir(path) }

    /// Moves the calling process into the cgroup at `path`.
    public static func join(_ path: String) throws {
        try write("\(getpid())", to: path + "/cgroup.procs")
    }

    static func write(_ text: String, to file: String) throws {
        let fd = open(file, O_WRONLY | O_CLOEXEC)
        if fd < 0 { throw MapBenchError("open \(file): errno \(errno)") }
        defer { close(fd) }
        let n = text.withCString { Glibc.write(fd, $0, strlen($0)) }
        if n < 0 { throw MapBenchError("write \(file): errno \(errno)") }
    }
}
