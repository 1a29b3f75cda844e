import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Writes one snapshot file front to back: header and regions, then page records as
/// they come, then the chunk table, the index and the footer.
///
/// Used by one thread at a time (the capture's writer thread).
final class SnapshotFileWriter {
    let fd: Int32
    let path: String?
    let pageSize: Int
    let pageCount: Int
    /// The snapshot's identifier.
    let id: [UInt8]
    /// Whether it is a delta over a parent.
    let isDelta: Bool
    /// One entry per global page (see ``SnapshotFormat/entry(_:record:)``), written
    /// in the machine's byte order (little-endian on the machines this runs on).
    let index: UnsafeMutablePointer<UInt64>
    private(set) var chunks = ByteWriter()
    private(set) var chunkCount = 0
    private(set) var position: UInt64 = 0
    private(set) var dataBytes: UInt64 = 0

    /// Starts a file on `fd` (not owned) at offset 0.
    ///
    /// - Parameter initialKind: the kind every page has until it is written
    ///   (`.hole` for a full snapshot, `.unchanged` for a delta).
    init(fd: Int32, path: String?, regions: [SnapshotFormat.Region], pageSize: Int,
         id: [UInt8], parentID: [UInt8]?, initialKind: SnapshotFormat.PageKind) throws(SnapshotError) {
        self.fd = fd
        self.path = path
        self.pageSize = pageSize
        self.id = id
        self.isDelta = parentID != nil
        self.pageCount = regions.reduce(0) { $0 + Int($1.length) / pageSize }
        index = .allocate(capacity: max(1, pageCount))
        index.initialize(repeating: SnapshotFormat.entry(initialKind), count: max(1, pageCount))
        var header = ByteWriter()
        header.u64(SnapshotFormat.headerMagic)
        header.u32(SnapshotFormat.version)
        header.u32(UInt32(pageSize))
        header.u32(UInt32(regions.count))
        header.u32(parentID == nil ? 0 : 1)
        header.raw(id)
        header.raw(parentID ?? [UInt8](repeating: 0, count: 16))
        var table = ByteWriter()
        for r in regions {
            table.u64(r.start)
            table.u64(r.length)
            table.u32(r.kind.rawValue)
            table.u32(0)
        }
        var crcInput = header
        crcInput.raw(table.bytes)
        header.u32(crcInput.crc)
        header.u32(0)
        header.raw(table.bytes)
        try write(header.bytes)
    }

    deinit {
        index.deallocate()
        batchHeads.deallocate()
        batchVectors.deallocate()
    }

    /// Memory this writer holds besides the page data (index and chunk table).
    var metadataBytes: Int { pageCount * 8 + chunks.bytes.capacity }

    private func write(_ bytes: [UInt8]) throws(SnapshotError) {
        let result: Result<Void, SnapshotError> = bytes.withUnsafeBytes { b in
            do throws(SnapshotError) { try write(b); return .success(()) } catch { return .failure(error) }
        }
        try result.get()
    }

    private func write(_ bytes: UnsafeRawBufferPointer) throws(SnapshotError) {
        try write(bytes, at: position)
        position += UInt64(bytes.count)
    }

    /// Writes all of `bytes` at `offset` (retrying short writes and EINTR).
    private func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(SnapshotError) {
        var done = 0
        while done < bytes.count {
            let n = retryOnInterrupt { pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset) + off_t(done)) }
            if n <= 0 { throw SnapshotError.system("write snapshot", n == 0 ? EIO : errno, path: path) }
            done += n
        }
    }

    /// The bytes checksummed and then written at once: small enough that the write
    /// reads them from cache after the checksum pulled them in.
    static let pieceBytes = 256 << 10

    /// Appends `count` pages starting at global page `first`, read from `bytes`.
    ///
    /// The data goes first, a piece at a time, each piece checksummed just before it
    /// is written; the record header, which holds the checksum, goes in front of it last.
    func appendRecord(first: Int, count: Int, bytes: UnsafeRawPointer) throws(SnapshotError) {
        let length = count * pageSize
        let offset = position
        let headerBytes = SnapshotFormat.recordHeaderSize
        var crc: UInt32 = 0
        var done = 0
        while done < length {
            let piece = UnsafeRawBufferPointer(start: bytes + done, count: min(Self.pieceBytes, length - done))
            crc = CRC32C.checksum(piece, continuing: crc)
            try write(piece, at: offset + UInt64(headerBytes + done))
            done += piece.count
        }
        var head = ByteWriter()
        head.u32(SnapshotFormat.recordMagic)
        head.u32(UInt32(count))
        head.u64(UInt64(first))
        head.u32(crc)
        head.u32(0)
        let result: Result<Void, SnapshotError> = head.bytes.withUnsafeBytes { b in
            do throws(SnapshotError) { try write(b, at: offset); return .success(()) } catch { return .failure(error) }
        }
        try result.get()
        position = offset + UInt64(headerBytes + length)
        noteRecord(at: offset, first: first, count: count, crc: crc)
    }

    /// Enters a record written at `offset` in the chunk table and the index.
    private func noteRecord(at offset: UInt64, first: Int, count: Int, crc: UInt32) {
        chunks.u64(offset)
        chunks.u64(UInt64(first))
        chunks.u32(UInt32(count))
        chunks.u32(crc)
        let entry = SnapshotFormat.entry(.data, record: UInt32(chunkCount))
        for p in first..<(first + count) { index[p] = entry }
        chunkCount += 1
        dataBytes += UInt64(count * pageSize)
    }

    /// The most records, and bytes, gathered for one `pwritev`: small enough that the
    /// write reads them from cache after their checksums pulled them in.
    static let batchRecords = 64
    static let batchBytes = 512 << 10
    private let batchHeads = UnsafeMutableRawPointer.allocate(byteCount: batchRecords * SnapshotFormat.recordHeaderSize, alignment: 8)
    private let batchVectors = UnsafeMutablePointer<iovec>.allocate(capacity: 2 * batchRecords)
    private var queued = 0
    private var queuedBytes = 0
    private var batchOffset: UInt64 = 0

    /// Appends a record like ``appendRecord(first:count:bytes:)``, but small records are
    /// gathered and written together by one `pwritev` (at the latest by ``flush()``):
    /// `bytes` must stay unchanged until then.
    func queueRecord(first: Int, count: Int, bytes: UnsafeRawPointer) throws(SnapshotError) {
        let length = count * pageSize
        let headerBytes = SnapshotFormat.recordHeaderSize
        guard headerBytes + length <= Self.batchBytes else {
            try flush()
            return try appendRecord(first: first, count: count, bytes: bytes)
        }
        if queued == Self.batchRecords || queuedBytes + headerBytes + length > Self.batchBytes { try flush() }
        if queued == 0 { batchOffset = position }
        let crc = CRC32C.checksum(UnsafeRawBufferPointer(start: bytes, count: length))
        let head = batchHeads + queued * headerBytes
        head.storeBytes(of: SnapshotFormat.recordMagic.littleEndian, toByteOffset: 0, as: UInt32.self)
        head.storeBytes(of: UInt32(count).littleEndian, toByteOffset: 4, as: UInt32.self)
        head.storeBytes(of: UInt64(first).littleEndian, toByteOffset: 8, as: UInt64.self)
        head.storeBytes(of: crc.littleEndian, toByteOffset: 16, as: UInt32.self)
        head.storeBytes(of: UInt32(0), toByteOffset: 20, as: UInt32.self)
        batchVectors[2 * queued] = iovec(iov_base: head, iov_len: headerBytes)
        batchVectors[2 * queued + 1] = iovec(iov_base: UnsafeMutableRawPointer(mutating: bytes), iov_len: length)
        queued += 1
        queuedBytes += headerBytes + length
        noteRecord(at: position, first: first, count: count, crc: crc)
        position += UInt64(headerBytes + length)
    }

    /// Writes the records gathered by ``queueRecord(first:count:bytes:)``.
    func flush() throws(SnapshotError) {
        guard queued > 0 else { return }
        var vectors = batchVectors
        var vectorCount = 2 * queued
        var offset = batchOffset
        var remaining = queuedBytes
        queued = 0
        queuedBytes = 0
        while remaining > 0 {
            let n = retryOnInterrupt { pwritev(fd, vectors, Int32(vectorCount), off_t(offset)) }
            if n <= 0 { throw SnapshotError.system("write snapshot", n == 0 ? EIO : errno, path: path) }
            remaining -= n
            offset += UInt64(n)
            // A short write: go on from the first byte not written.
            var skip = n
            while vectorCount > 0 && skip >= vectors[0].iov_len {
                skip -= vectors[0].iov_len
                vectors += 1
                vectorCount -= 1
            }
            if skip > 0 {
                vectors[0].iov_base += skip
                vectors[0].iov_len -= skip
            }
        }
    }

    /// Records `count` pages from `first` as `kind` (hole or zero).
    func mark(first: Int, count: Int, _ kind: SnapshotFormat.PageKind) {
        let entry = SnapshotFormat.entry(kind)
        for p in first..<(first + count) { index[p] = entry }
    }

    /// Writes the chunk table, the index and the footer. The file is complete after this.
    func finish() throws(SnapshotError) {
        try flush()
        let chunkTableOffset = position
        let trailer = chunks
        let indexOffset = chunkTableOffset + UInt64(chunks.bytes.count)
        let indexBytes = UnsafeRawBufferPointer(start: index, count: pageCount * 8)
        var footer = ByteWriter()
        footer.u64(SnapshotFormat.footerMagic)
        footer.u64(chunkTableOffset)
        footer.u64(UInt64(chunkCount))
        footer.u64(indexOffset)
        footer.u64(UInt64(pageCount))
        var crc = trailer.crc
        crc = CRC32C.checksum(indexBytes, continuing: crc)
        crc = footer.bytes.withUnsafeBytes { CRC32C.checksum($0, continuing: crc) }
        footer.u32(crc)
        footer.u32(0)
        try write(trailer.bytes)
        try write(indexBytes)
        try write(footer.bytes)
    }
}
