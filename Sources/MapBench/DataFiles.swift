import Foundation
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// The bench's data: a file of known words, and an R-MAT graph in CSR form with its
/// reference BFS. Made once in the options' directory and reused while sizes match.
public enum DataFiles {
    /// Word `i` of the data file.
    @inline(__always)
    public static func pattern(_ i: Int) -> UInt64 { UInt64(i) &* 0x9E37_79B9_7F4A_7C15 ^ 0xA5A5 }

    public static func dataPath(_ o: MapBenchOptions) -> String { o.directory + "/data-\(o.fileBytes).bin" }
    public static func scratchPath(_ o: MapBenchOptions) -> String { o.directory + "/sort-scratch-\(o.sortKeys).bin" }
    public static func graphPath(_ o: MapBenchOptions) -> String { o.directory + "/rmat-s\(o.graphScale)-e\(o.edgeFactor).csr" }

    /// The wrapping sum of every word of the data file.
    public static func expectedSum(words: Int) -> UInt64 {
        var sum: UInt64 = 0
        for i in 0..<words { sum &+= pattern(i) }
        return sum
    }

    /// Creates what the options' workloads need. `progress` gets a line per file made.
    public static func prepare(_ o: MapBenchOptions, progress: (String) -> Void) throws {
        try FileManager.default.createDirectory(atPath: o.directory, withIntermediateDirectories: true)
        if fileSize(dataPath(o)) != o.fileBytes {
            progress("writing the \(o.fileBytes >> 20) MiB data file \(dataPath(o))")
            try writeData(dataPath(o), bytes: o.fileBytes)
        }
        if o.workloads.contains(.sort) && fileSize(scratchPath(o)) != o.sortKeys * 16 {
            let fd = open(scratchPath(o), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            if fd < 0 || ftruncate(fd, off_t(o.sortKeys * 16)) != 0 { throw Errno(rawValue: errno) }
            close(fd)
        }
        if o.workloads.contains(.bfs) && (fileSize(graphPath(o)) == nil || GraphMeta.load(graphPath(o)) == nil) {
            progress("generating the R-MAT graph (scale \(o.graphScale), edge factor \(o.edgeFactor)) and its reference BFS")
            try RMAT.generate(path: graphPath(o), scale: o.graphScale, edgeFactor: o.edgeFactor)
        }
    }

    static func fileSize(_ path: String) -> Int? {
        var st = stat()
        return stat(path, &st) == 0 ? Int(st.st_size) : nil
    }

    /// Writes a file of `bytes` whose word `i` is ``pattern(_:)``.
    public static func writeData(_ path: String, bytes: Int) throws {
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        if fd < 0 { throw Errno(rawValue: errno) }
        defer { close(fd) }
        let chunk = 4 << 20
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { buffer.deallocate() }
        var offset = 0
        while offset < bytes {
            let n = min(chunk, bytes - offset)
            for w in 0..<n / 8 { buffer.storeBytes(of: pattern(offset / 8 + w), toByteOffset: w * 8, as: UInt64.self) }
            if pwrite(fd, buffer, n, off_t(offset)) != n { throw Errno(rawValue: errno) }
            offset += n
        }
        fsync(fd)
    }

    /// Drops the files from the page cache: all caches as root, else `POSIX_FADV_DONTNEED` per file.
    /// - Returns: how it was done.
    @discardableResult
    public static func makeCold(_ o: MapBenchOptions) -> String {
        sync()
        if o.dropCaches, let fd = Optional(open("/proc/sys/vm/drop_caches", O_WRONLY | O_CLOEXEC)), fd >= 0 {
            defer { close(fd) }
            if write(fd, "3\n", 2) == 2 { return "drop_caches" }
        }
        for path in [dataPath(o), scratchPath(o), graphPath(o)] {
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            if fd >= 0 { _ = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED); close(fd) }
        }
        return "posix_fadvise(DONTNEED)"
    }
}
