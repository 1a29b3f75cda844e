import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A full snapshot and the deltas taken after it, oldest first: the state at the
/// newest one's instant.
public struct SnapshotChain: Sendable {
    /// The files, the full snapshot first.
    public let files: [SnapshotFile]

    /// Checks that `files` form a chain.
    ///
    /// - Throws: ``SnapshotError/Kind/wrongParent(_:)`` if the first is a delta, a later
    ///   one is not the child of the one before it, or the layouts differ.
    public init(_ files: [SnapshotFile]) throws(SnapshotError) {
        guard let base = files.first else { throw SnapshotError(.invalidArgument("no snapshot file given")) }
        if base.isDelta {
            throw SnapshotError(.wrongParent("it is a delta; give its full snapshot (and the deltas between) before it"), path: base.path)
        }
        for (parent, child) in zip(files, files.dropFirst()) {
            guard let expected = child.parentID else {
                throw SnapshotError(.wrongParent("it is a full snapshot, not a delta over \(parent.path)"), path: child.path)
            }
            guard expected == parent.id else {
                throw SnapshotError(.wrongParent("its parent is \(hex(expected)), but \(parent.path) is \(hex(parent.id))"), path: child.path)
            }
            guard child.regions == parent.regions, child.pageSize == parent.pageSize else {
                throw SnapshotError(.wrongParent("its regions or page size differ from \(parent.path)'s"), path: child.path)
            }
        }
        self.files = files
    }

    /// Opens the files at `paths`, oldest first, and checks the chain.
    public init(paths: [String]) throws(SnapshotError) {
        var files: [SnapshotFile] = []
        for p in paths { files.append(try SnapshotFile(path: p)) }
        try self.init(files)
    }

    /// The page size.
    public var pageSize: Int { files[0].pageSize }
    /// The regions.
    public var regions: [SnapshotFormat.Region] { files[0].regions }
    /// The number of pages.
    public var pageCount: Int { files[0].pageCount }
    /// The bytes across all regions.
    public var totalBytes: UInt64 { UInt64(pageCount) * UInt64(pageSize) }

    /// The newest file holding page `page`'s bytes, or nil if the page reads as zeros.
    @inline(__always)
    public func holder(of page: Int) -> SnapshotFile? {
        var i = files.count - 1
        while i >= 0 {
            switch files[i].kind(of: page) {
            case .data: return files[i]
            case .hole, .zero: return nil
            case .unchanged: i -= 1
            }
        }
        return nil
    }

    /// Writes page `page`'s bytes at the chain's instant to `destination`.
    @inline(__always)
    public func readPage(_ page: Int, into destination: UnsafeMutableRawPointer) throws(SnapshotError) {
        if let file = holder(of: page) {
            try file.readPage(page, into: destination)
        } else {
            memset(destination, 0, pageSize)
        }
    }

    /// Writes `count` bytes of page `page` at the chain's instant, from byte `offset`
    /// within it, to `destination`.
    @inline(__always)
    public func readPage(_ page: Int, offset: Int, count: Int, into destination: UnsafeMutableRawPointer) throws(SnapshotError) {
        if let file = holder(of: page) {
            try file.readPage(page, offset: offset, count: count, into: destination)
        } else {
            memset(destination, 0, count)
        }
    }

    /// Writes the memory as one raw image: the regions' bytes back to back (the layout
    /// of a Firecracker memory file). Pages that read as zeros are left as file holes.
    ///
    /// - Parameter path: the output; created or truncated.
    /// - Returns: the bytes of data written (not counting holes).
    @discardableResult
    public func flatten(to path: String) throws(SnapshotError) -> UInt64 {
        for f in files { try f.verifyAll() }
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        if fd < 0 { throw SnapshotError.system("open", path: path) }
        defer { close(fd) }
        if ftruncate(fd, off_t(totalBytes)) != 0 { throw SnapshotError.system("ftruncate", path: path) }
        let runPages = 256
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: runPages * pageSize, alignment: 4096)
        defer { buffer.deallocate() }
        var written: UInt64 = 0
        var page = 0
        while page < pageCount {
            guard holder(of: page) != nil else { page += 1; continue }
            var n = 0
            while n < runPages, page + n < pageCount, holder(of: page + n) != nil {
                try readPage(page + n, into: buffer + n * pageSize)
                n += 1
            }
            try writeAll(fd, buffer, n * pageSize, at: UInt64(page) * UInt64(pageSize), path: path)
            written += UInt64(n * pageSize)
            page += n
        }
        return written
    }
}

func writeAll(_ fd: Int32, _ bytes: UnsafeRawPointer, _ count: Int, at offset: UInt64, path: String) throws(SnapshotError) {
    var done = 0
    while done < count {
        let n = retryOnInterrupt { pwrite(fd, bytes + done, count - done, off_t(offset) + off_t(done)) }
        if n > 0 { done += n; continue }
        throw SnapshotError.system("write", n == 0 ? EIO : errno, path: path)
    }
}

func hex(_ bytes: [UInt8]) -> String {
    bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
}
