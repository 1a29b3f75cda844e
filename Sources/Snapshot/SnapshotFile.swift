import Synchronization
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A snapshot file opened for reading: header, regions, chunk table and index are
/// checked when it opens; each record's checksum is checked the first time one of
/// its pages is read (or all at once by ``verifyAll()``).
public final class SnapshotFile: @unchecked Sendable {
    /// One record of page data.
    public struct Chunk: Sendable, Hashable {
        /// The offset of the record's header in the file.
        public var offset: UInt64
        /// The first global page.
        public var firstPage: Int
        /// The number of pages.
        public var count: Int
        /// The CRC32C of the data.
        public var crc: UInt32
    }

    /// The path it was opened from.
    public let path: String
    /// The format version.
    public let version: UInt32
    /// The page size of the snapshotted memory.
    public let pageSize: Int
    /// The regions, in global page order.
    public let regions: [SnapshotFormat.Region]
    /// This snapshot's identifier.
    public let id: [UInt8]
    /// The parent's identifier, for a delta.
    public let parentID: [UInt8]?
    /// The records of page data.
    public let chunks: [Chunk]
    /// The number of pages across all regions.
    public let pageCount: Int
    /// The file's size in bytes.
    public let fileSize: UInt64
    private let index: [UInt64]
    private let fd: Int32
    private let verified: Mutex<[Bool]>

    /// Opens and checks the file at `path`.
    ///
    /// - Throws: ``SnapshotError`` (truncated, corrupted, unsupported, or the system
    ///   call that failed), never a crash, for any content.
    public init(path: String) throws(SnapshotError) {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0 { throw SnapshotError.system("open", path: path) }
        do {
            let parsed = try Parsed(fd: fd, path: path)
            self.path = path
            self.fd = fd
            version = parsed.version
            pageSize = parsed.pageSize
            regions = parsed.regions
            id = parsed.id
            parentID = parsed.parentID
            chunks = parsed.chunks
            pageCount = parsed.pageCount
            fileSize = parsed.fileSize
            index = parsed.index
            verified = Mutex([Bool](repeating: false, count: parsed.chunks.count))
        } catch {
            close(fd)
            throw error
        }
    }

    deinit { close(fd) }

    /// Whether this snapshot is a delta over a parent.
    public var isDelta: Bool { parentID != nil }

    /// The kind the index gives global page `page`.
    @inline(__always)
    public func kind(of page: Int) -> SnapshotFormat.PageKind { SnapshotFormat.kind(of: index[page]) }

    /// How many pages have each kind.
    public func kindCounts() -> [SnapshotFormat.PageKind: Int] {
        var counts: [SnapshotFormat.PageKind: Int] = [:]
        for e in index { counts[SnapshotFormat.kind(of: e), default: 0] += 1 }
        return counts
    }

    /// Reads the stored bytes of data page `page` into `destination` (one page).
    ///
    /// - Throws: ``SnapshotError`` if the page has no data here, its record's checksum
    ///   does not match, or the read fails.
    public func readPage(_ page: Int, into destination: UnsafeMutableRawPointer) throws(SnapshotError) {
        let e = index[page]
        guard SnapshotFormat.kind(of: e) == .data else {
            throw SnapshotError(.invalidArgument("page \(page) has no data in this file"), path: path)
        }
        let r = SnapshotFormat.record(of: e)
        try verify(chunk: r)
        let c = chunks[r]
        let offset = c.offset + UInt64(SnapshotFormat.recordHeaderSize) + UInt64((page - c.firstPage) * pageSize)
        try readExactly(fd, destination, pageSize, at: offset, path: path)
    }

    /// Reads `count` stored bytes of data page `page`, from byte `offset` within it, into
    /// `destination` (part of a huge page, for a server of smaller pages). The whole
    /// record's checksum is checked first, as for ``readPage(_:into:)``.
    public func readPage(_ page: Int, offset: Int, count: Int, into destination: UnsafeMutableRawPointer) throws(SnapshotError) {
        let e = index[page]
        guard SnapshotFormat.kind(of: e) == .data, offset >= 0, count >= 0, offset + count <= pageSize else {
            throw SnapshotError(.invalidArgument("page \(page) has no data in this file, or \(offset)+\(count) is outside it"), path: path)
        }
        let r = SnapshotFormat.record(of: e)
        try verify(chunk: r)
        let c = chunks[r]
        let at = c.offset + UInt64(SnapshotFormat.recordHeaderSize) + UInt64((page - c.firstPage) * pageSize + offset)
        try readExactly(fd, destination, count, at: at, path: path)
    }

    /// Checks record `r`'s checksum once; later calls return at once.
    public func verify(chunk r: Int) throws(SnapshotError) {
        if verified.withLock({ $0[r] }) { return }
        let c = chunks[r]
        let length = c.count * pageSize
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: max(length, SnapshotFormat.recordHeaderSize), alignment: 4096)
        defer { buffer.deallocate() }
        try readExactly(fd, buffer, SnapshotFormat.recordHeaderSize, at: c.offset, path: path)
        var head = ByteReader(Array(UnsafeRawBufferPointer(start: buffer, count: SnapshotFormat.recordHeaderSize)))
        guard head.u32() == SnapshotFormat.recordMagic, head.u32() == UInt32(c.count), head.u64() == UInt64(c.firstPage),
              head.u32() == c.crc else {
            throw SnapshotError(.corrupted("record \(r) at offset \(c.offset): its header does not match the chunk table"), path: path)
        }
        try readExactly(fd, buffer, length, at: c.offset + UInt64(SnapshotFormat.recordHeaderSize), path: path)
        let crc = CRC32C.checksum(UnsafeRawBufferPointer(start: buffer, count: length))
        if crc != c.crc {
            throw SnapshotError(.corrupted("record \(r) (pages \(c.firstPage)..<\(c.firstPage + c.count)): checksum "
                + "0x\(String(crc, radix: 16)) where 0x\(String(c.crc, radix: 16)) was written"), path: path)
        }
        verified.withLock { $0[r] = true }
    }

    /// Checks every record's checksum.
    public func verifyAll() throws(SnapshotError) {
        for r in chunks.indices { try verify(chunk: r) }
    }
}

/// Reads exactly `count` bytes at `offset`, or throws (a short file is truncated).
func readExactly(_ fd: Int32, _ destination: UnsafeMutableRawPointer, _ count: Int, at offset: UInt64, path: String) throws(SnapshotError) {
    var done = 0
    while done < count {
        let n = retryOnInterrupt { pread(fd, destination + done, count - done, off_t(offset) + off_t(done)) }
        if n > 0 { done += n; continue }
        if n == 0 { throw SnapshotError(.truncated("\(count) bytes at offset \(offset) lie past the end of the file"), path: path) }
        throw SnapshotError.system("read", path: path)
    }
}
