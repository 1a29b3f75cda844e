import SystemPackage
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A ``PageStore`` spread over many files of one extent each in a directory:
/// `extent-000000`, `extent-000001`, … A file that does not exist reads as zeros and
/// is created on its first write, so a large, mostly empty store costs little disk.
public final class SparseFileStore: PageStore, @unchecked Sendable {
    public let size: Int
    /// The bytes each file holds (a multiple of 4 KiB).
    public let extentSize: Int
    /// The directory holding the files.
    public let directory: String
    private var descriptors: [Int32]
    private let lock = ConditionLock()

    /// Opens (creating if needed) a sparse store of `size` bytes in `directory`.
    ///
    /// - Parameters:
    ///   - directory: an existing directory.
    ///   - size: the store's size in bytes.
    ///   - extentSize: the bytes per file; a multiple of 4 KiB.
    /// - Throws: `EINVAL` for a bad extent, or the `Errno` of opening the directory.
    public init(directory: String, size: Int, extentSize: Int = 64 << 20) throws(Errno) {
        if extentSize <= 0 || extentSize % 4096 != 0 || size < 0 { throw .invalidArgument }
        var st = stat()
        if stat(directory, &st) != 0 { throw Errno(rawValue: errno) }
        if st.st_mode & S_IFMT != S_IFDIR { throw .notDirectory }
        self.directory = directory
        self.size = size
        self.extentSize = extentSize
        descriptors = Array(repeating: -1, count: (size + extentSize - 1) / extentSize)
    }

    deinit {
        for fd in descriptors where fd >= 0 { Glibc.close(fd) }
    }

    /// The path of extent `index`.
    public func path(ofExtent index: Int) -> String {
        let digits = String(index)
        return directory + "/extent-" + String(repeating: "0", count: max(0, 6 - digits.count)) + digits
    }

    /// The descriptor of extent `index`, opened on first use; -1 if it does not exist and `create` is false.
    private func descriptor(_ index: Int, create: Bool) throws(Errno) -> Int32 {
        lock.lock()
        defer { lock.unlock() }
        if descriptors[index] >= 0 { return descriptors[index] }
        let fd = Glibc.open(path(ofExtent: index), O_RDWR | O_CLOEXEC | (create ? O_CREAT : 0), 0o644)
        if fd < 0 {
            if errno == ENOENT && !create { return -1 }
            throw Errno(rawValue: errno)
        }
        descriptors[index] = fd
        return fd
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws(Errno) {
        let inside = min(buffer.count, max(0, size - offset))
        if inside < buffer.count {
            (buffer.baseAddress! + inside).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - inside)
        }
        try forEachPiece(offset: offset, count: buffer.count) { (index, inFile, at, length) throws(Errno) in
            let target = buffer.baseAddress! + at
            let fd = try descriptor(index, create: false)
            var done = 0
            while fd >= 0 && done < length {
                let n = retryOnInterrupt { pread(fd, target + done, length - done, off_t(inFile + done)) }
                if n < 0 { throw Errno(rawValue: errno) }
                if n == 0 { break }
                done += n
            }
            if done < length { (target + done).initializeMemory(as: UInt8.self, repeating: 0, count: length - done) }
        }
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: Int) throws(Errno) {
        let count = min(buffer.count, max(0, size - offset))
        try forEachPiece(offset: offset, count: count) { (index, inFile, at, length) throws(Errno) in
            let fd = try descriptor(index, create: true)
            var done = 0
            while done < length {
                let n = retryOnInterrupt { pwrite(fd, buffer.baseAddress! + at + done, length - done, off_t(inFile + done)) }
                if n < 0 { throw Errno(rawValue: errno) }
                done += n
            }
        }
    }

    public func synchronize() throws(Errno) {
        lock.lock()
        let open = descriptors.filter { $0 >= 0 }
        lock.unlock()
        for fd in open where fsync(fd) != 0 { throw Errno(rawValue: errno) }
    }

    /// Splits `[offset, offset + count)` at extent boundaries; bytes past the store read as zeros.
    private func forEachPiece(
        offset: Int, count: Int,
        _ body: (_ extent: Int, _ offsetInFile: Int, _ offsetInBuffer: Int, _ length: Int) throws(Errno) -> Void
    ) throws(Errno) {
        var at = 0
        while at < count {
            let position = offset + at
            let index = position / extentSize
            if index >= descriptors.count { break }
            let inFile = position - index * extentSize
            let length = min(count - at, extentSize - inFile, size - position)
            if length <= 0 { break }
            try body(index, inFile, at, length)
            at += length
        }
    }
}
