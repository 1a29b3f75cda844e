import SystemPackage
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A source reading a file, from a byte offset on.
///
/// ``Access/pread`` reads into the handler's staging buffer with `pread`;
/// ``Access/mapped`` maps the file privately once and copies from the mapping.
/// The file's length is taken when the source is created.
public struct FileSource: PageSource, @unchecked Sendable {
    /// How the file is read.
    public enum Access: String, Sendable, Hashable, CaseIterable {
        /// `pread` into the staging buffer.
        case pread
        /// A private read-only mapping of the file, copied from.
        case mapped
    }

    final class Backing: @unchecked Sendable {
        let fd: Int32
        let mapping: UnsafeMutableRawPointer?
        let mappingLength: Int
        init(fd: Int32, mapping: UnsafeMutableRawPointer?, mappingLength: Int) {
            self.fd = fd
            self.mapping = mapping
            self.mappingLength = mappingLength
        }
        deinit {
            if let mapping { munmap(mapping, mappingLength) }
            _ = Glibc.close(fd)
        }
    }

    private let backing: Backing
    /// The file offset of source offset 0.
    public let offset: UInt64
    /// How the file is read.
    public let access: Access
    private let available: UInt64
    private let mappedBase: UnsafeMutableRawPointer?

    /// Opens the file at `path` for reading.
    ///
    /// - Parameters:
    ///   - path: the file.
    ///   - offset: the file offset of source offset 0.
    ///   - access: `pread` or a private mapping.
    /// - Throws: `UserfaultfdError` naming the call that failed, or an invalid offset.
    public init(path: String, offset: UInt64 = 0, access: Access = .pread) throws(UserfaultfdError) {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0 { throw UserfaultfdError(operation: "open \(path)", errno: Errno(rawValue: errno)) }
        try self.init(owning: fd, offset: offset, access: access, name: path)
    }

    /// Reads the file open as `descriptor`, which stays the caller's (it is duplicated).
    public init(descriptor: FileDescriptor, offset: UInt64 = 0, access: Access = .pread) throws(UserfaultfdError) {
        let fd = fcntl(descriptor.rawValue, F_DUPFD_CLOEXEC, 0)
        if fd < 0 { throw UserfaultfdError(operation: "dup file descriptor \(descriptor.rawValue)", errno: Errno(rawValue: errno)) }
        try self.init(owning: fd, offset: offset, access: access, name: "fd \(descriptor.rawValue)")
    }

    private init(owning fd: Int32, offset: UInt64, access: Access, name: String) throws(UserfaultfdError) {
        var st = stat()
        if fstat(fd, &st) != 0 {
            let e = Errno(rawValue: errno)
            _ = Glibc.close(fd)
            throw UserfaultfdError(operation: "fstat \(name)", errno: e)
        }
        let size = UInt64(st.st_size)
        if offset > size {
            _ = Glibc.close(fd)
            throw UserfaultfdError(operation: "FileSource", kind: .invalidArgument("offset \(offset) lies beyond the end of \(name) (\(size) bytes)"))
        }
        var mapping: UnsafeMutableRawPointer? = nil
        var mappingLength = 0
        if access == .mapped && size > 0 {
            mappingLength = Int(size)
            guard let p = mmap(nil, mappingLength, PROT_READ, MAP_PRIVATE, fd, 0), p != MAP_FAILED else {
                let e = Errno(rawValue: errno)
                _ = Glibc.close(fd)
                throw UserfaultfdError(operation: "mmap \(name)", errno: e)
            }
            mapping = p
        }
        self.backing = Backing(fd: fd, mapping: mapping, mappingLength: mappingLength)
        self.offset = offset
        self.access = access
        self.available = size - offset
        self.mappedBase = mapping.map { $0 + Int(offset) }
    }

    public var length: UInt64? { available }

    /// The file descriptor read (owned by the source).
    public var fileDescriptor: FileDescriptor { FileDescriptor(rawValue: backing.fd) }

    @inline(__always)
    public func fill(_ destination: UnsafeMutableRawBufferPointer, at sourceOffset: UInt64) throws(PageSourceError) {
        let n = destination.count
        guard sourceOffset <= available, UInt64(n) <= available - sourceOffset else {
            throw PageSourceError(.outOfBounds, sourceOffset: sourceOffset, length: n)
        }
        // Mapped or not, read with pread: a copy out of the mapping would raise SIGBUS
        // in the handler thread if the file shrank after the source was made.
        var done = 0
        while done < n {
            let r = retryOnInterrupt {
                Glibc.pread(backing.fd, destination.baseAddress! + done, n - done, off_t(offset + sourceOffset) + off_t(done))
            }
            if r > 0 {
                done += r
            } else if r == 0 {
                throw PageSourceError(.shortRead, sourceOffset: sourceOffset, length: n)
            } else {
                throw PageSourceError(.system(Errno(rawValue: errno)), sourceOffset: sourceOffset, length: n)
            }
        }
    }

    @inline(__always)
    public func contiguousBytes(at sourceOffset: UInt64, length: Int) -> UnsafeRawPointer? {
        guard let mappedBase, sourceOffset <= available, UInt64(length) <= available - sourceOffset else { return nil }
        return UnsafeRawPointer(mappedBase + Int(sourceOffset))
    }

    public var signalSafeBacking: SignalSafeBacking? {
        if let mappedBase { return .memory(address: UInt(bitPattern: mappedBase), length: available) }
        return .file(descriptor: backing.fd, offset: offset, length: available)
    }
}
