import SystemPackage
import Userfaultfd
import _CPagedMemory

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A ``PageStore`` over one file: buffered, or with `O_DIRECT` so that pages are not
/// cached twice (once in the pager's buffer, once in the kernel's page cache).
public final class FileStore: PageStore, @unchecked Sendable {
    /// How the file is read and written.
    public enum IOMode: String, Sendable, CaseIterable, Codable {
        /// Through the page cache.
        case buffered
        /// `O_DIRECT`: straight between the device and the pager's pages.
        case direct
    }

    public let size: Int
    /// How this store does its I/O.
    public let mode: IOMode
    private let fd: FileDescriptor
    /// A buffered descriptor for the unaligned tail of a direct store.
    private let tailFD: FileDescriptor?

    /// Opens `path`.
    ///
    /// - Parameters:
    ///   - path: an existing regular file.
    ///   - mode: buffered or direct I/O.
    ///   - writable: open read-write (needed for shared mappings that are written).
    /// - Throws: the `Errno` of `open` or `fstat` (`EINVAL` if the file system refuses `O_DIRECT`).
    public init(path: String, mode: IOMode = .buffered, writable: Bool = true) throws(Errno) {
        var flags = (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC
        if mode == .direct { flags |= cpaged_O_DIRECT }
        let raw = Glibc.open(path, flags)
        if raw < 0 { throw Errno(rawValue: errno) }
        var st = stat()
        if fstat(raw, &st) != 0 {
            let e = Errno(rawValue: errno)
            Glibc.close(raw)
            throw e
        }
        fd = FileDescriptor(rawValue: raw)
        size = Int(st.st_size)
        self.mode = mode
        if mode == .direct {
            let tail = Glibc.open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC)
            tailFD = tail >= 0 ? FileDescriptor(rawValue: tail) : nil
        } else {
            tailFD = nil
        }
    }

    /// Takes an open descriptor (for example an `O_TMPFILE`) of `size` bytes.
    init(adopting fd: FileDescriptor, size: Int) {
        self.fd = fd
        self.size = size
        self.mode = .buffered
        self.tailFD = nil
    }

    deinit {
        try? fd.close()
        try? tailFD?.close()
    }

    /// The file's descriptor: a page is one `pread` (both modes read page-aligned
    /// buffers of whole pages).
    public var signalReadableDescriptor: Int32? { fd.rawValue }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws(Errno) {
        var done = 0
        while done < buffer.count {
            let n = retryOnInterrupt { pread(fd.rawValue, buffer.baseAddress! + done, buffer.count - done, off_t(offset + done)) }
            if n < 0 { throw Errno(rawValue: errno) }
            if n == 0 { break }
            done += n
        }
        if done < buffer.count {
            (buffer.baseAddress! + done).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - done)
        }
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: Int) throws(Errno) {
        let length = min(buffer.count, max(0, size - offset))
        if length == 0 { return }
        var aligned = length
        if mode == .direct && length % 4096 != 0 {
            aligned = length & ~4095
        }
        try writeAll(fd, buffer.baseAddress!, aligned, offset)
        if aligned < length {
            try writeAll(tailFD ?? fd, buffer.baseAddress! + aligned, length - aligned, offset + aligned)
        }
    }

    public func synchronize() throws(Errno) {
        if fsync(fd.rawValue) != 0 { throw Errno(rawValue: errno) }
    }

    private func writeAll(_ fd: FileDescriptor, _ base: UnsafeRawPointer, _ count: Int, _ offset: Int) throws(Errno) {
        var done = 0
        while done < count {
            let n = retryOnInterrupt { pwrite(fd.rawValue, base + done, count - done, off_t(offset + done)) }
            if n < 0 { throw Errno(rawValue: errno) }
            if n == 0 { throw Errno.ioError }
            done += n
        }
    }

    /// An unnamed scratch file in `directory` (`O_TMPFILE`), gone when the store is.
    static func scratch(size: Int, directory: String) throws(Errno) -> FileStore {
        let raw = Glibc.open(directory, cpaged_O_TMPFILE | O_RDWR | O_CLOEXEC, 0o600)
        if raw < 0 { throw Errno(rawValue: errno) }
        if ftruncate(raw, off_t(size)) != 0 {
            let e = Errno(rawValue: errno)
            Glibc.close(raw)
            throw e
        }
        return FileStore(adopting: FileDescriptor(rawValue: raw), size: size)
    }
}
