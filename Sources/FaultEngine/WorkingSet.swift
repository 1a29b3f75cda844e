import SystemPackage
import Userfaultfd
import _CFaultEngine

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Records, without locks or allocation, the source offsets of pages in the order
/// they were first faulted.
final class WorkingSetRecorder: @unchecked Sendable {
    /// Word 0 counts the records; words 1... hold them (shared with the SIGBUS resolver).
    let buffer: UnsafeMutablePointer<UInt64>
    let capacity: UInt64
    private let mappedBytes: Int

    init(capacity pages: UInt64) throws(UserfaultfdError) {
        capacity = max(pages, 1)
        mappedBytes = Int(capacity + 1) * 8
        guard let p = mmap(nil, mappedBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
            p != MAP_FAILED
        else {
            throw UserfaultfdError(operation: "mmap working-set buffer (\(mappedBytes) bytes)", errno: Errno(rawValue: errno))
        }
        buffer = p.assumingMemoryBound(to: UInt64.self)
    }

    deinit { munmap(buffer, mappedBytes) }

    @inline(__always)
    func record(_ sourceOffset: UInt64) {
        cfe_record_append(buffer, capacity, sourceOffset)
    }

    /// The offsets recorded so far, in order.
    var offsets: [UInt64] {
        let n = min(cfe_record_count(buffer), capacity)
        return Array(UnsafeBufferPointer(start: buffer + 1, count: Int(n)))
    }
}

/// The working-set file: "UFWS" v1, a count, then that many little-endian u64
/// source offsets in first-fault order.
public enum WorkingSetFile {
    static let magic: UInt64 = 0x3130_5357_4655 // "UFWS01"

    /// Writes `offsets` to `path` (replacing it).
    public static func write(_ offsets: [UInt64], to path: String) throws(UserfaultfdError) {
        let fd = Glibc.open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        if fd < 0 { throw UserfaultfdError(operation: "open \(path) for writing", errno: Errno(rawValue: errno)) }
        defer { _ = Glibc.close(fd) }
        var words: [UInt64] = [magic.littleEndian, UInt64(offsets.count).littleEndian]
        words.append(contentsOf: offsets.map { $0.littleEndian })
        let failure: Int32 = words.withUnsafeBytes { raw in
            var done = 0
            while done < raw.count {
                let n = retryOnInterrupt { Glibc.write(fd, raw.baseAddress! + done, raw.count - done) }
                if n < 0 { return errno }
                done += n
            }
            return 0
        }
        if failure != 0 { throw UserfaultfdError(operation: "write \(path)", errno: Errno(rawValue: failure)) }
    }

    /// Reads the source offsets recorded in `path`, in order.
    ///
    /// - Throws: `UserfaultfdError` if the file cannot be read or is not a working-set file.
    public static func read(_ path: String) throws(UserfaultfdError) -> [UInt64] {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0 { throw UserfaultfdError(operation: "open working set \(path)", errno: Errno(rawValue: errno)) }
        defer { _ = Glibc.close(fd) }
        func readWords(_ count: Int) throws(UserfaultfdError) -> [UInt64] {
            var words = [UInt64](repeating: 0, count: count)
            let want = count * 8
            var done = 0
            let failure: Int32 = words.withUnsafeMutableBytes { raw in
                while done < want {
                    let n = retryOnInterrupt { Glibc.read(fd, raw.baseAddress! + done, want - done) }
                    if n < 0 { return errno }
                    if n == 0 { break }
                    done += n
                }
                return 0
            }
            if failure != 0 {
                throw UserfaultfdError(operation: "read working set \(path)", errno: Errno(rawValue: failure))
            }
            if done != want {
                throw UserfaultfdError(operation: "read working set \(path)", kind: .malformed("file ends after \(done) of \(want) bytes"))
            }
            return words.map { UInt64(littleEndian: $0) }
        }
        let header = try readWords(2)
        if header[0] != magic {
            throw UserfaultfdError(operation: "read working set \(path)", kind: .malformed("not a working-set file (bad magic)"))
        }
        if header[1] > 1 << 34 {
            throw UserfaultfdError(operation: "read working set \(path)", kind: .malformed("implausible count \(header[1])"))
        }
        return try readWords(Int(header[1]))
    }
}
