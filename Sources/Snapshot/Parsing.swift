#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The checked structure of a snapshot file: everything but the page data.
struct Parsed {
    var version: UInt32 = 0
    var pageSize = 0
    var regions: [SnapshotFormat.Region] = []
    var id: [UInt8] = []
    var parentID: [UInt8]?
    var chunks: [SnapshotFile.Chunk] = []
    var pageCount = 0
    var fileSize: UInt64 = 0
    var index: [UInt64] = []

    init(fd: Int32, path: String) throws(SnapshotError) {
        var st = stat()
        if fstat(fd, &st) != 0 { throw SnapshotError.system("fstat", path: path) }
        fileSize = UInt64(st.st_size)
        let minimum = UInt64(SnapshotFormat.headerSize + SnapshotFormat.footerSize)
        if fileSize < minimum {
            throw SnapshotError(.truncated("\(fileSize) bytes, shorter than a header and a footer (\(minimum))"), path: path)
        }
        let regionEnd = try parseHeader(fd: fd, path: path)
        let records = try parseFooter(fd: fd, path: path)
        try checkLayout(dataStart: regionEnd, dataEnd: records, path: path)
    }

    private func bytes(_ fd: Int32, _ count: Int, at offset: UInt64, path: String) throws(SnapshotError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        let result: Result<Void, SnapshotError> = out.withUnsafeMutableBytes { b in
            guard count > 0 else { return .success(()) }
            do throws(SnapshotError) { try readExactly(fd, b.baseAddress!, count, at: offset, path: path); return .success(()) } catch { return .failure(error) }
        }
        try result.get()
        return out
    }

    /// Reads header and regions; returns where the records begin.
    private mutating func parseHeader(fd: Int32, path: String) throws(SnapshotError) -> UInt64 {
        var r = ByteReader(try bytes(fd, SnapshotFormat.headerSize, at: 0, path: path))
        guard r.u64() == SnapshotFormat.headerMagic else {
            throw SnapshotError(.corrupted("not a snapshot file (bad magic)"), path: path)
        }
        version = r.u32()!
        guard version == SnapshotFormat.version else {
            throw SnapshotError(.unsupported("format version \(version); this build reads version \(SnapshotFormat.version)"), path: path)
        }
        pageSize = Int(r.u32()!)
        let regionCount = Int(r.u32()!)
        let flags = r.u32()!
        id = r.raw(16)!
        let parent = r.raw(16)!
        let crc = r.u32()!
        guard pageSize >= 4096, pageSize <= 1 << 30, pageSize & (pageSize - 1) == 0 else {
            throw SnapshotError(.corrupted("page size \(pageSize) is not a power of two between 4 KiB and 1 GiB"), path: path)
        }
        guard regionCount > 0, regionCount <= SnapshotFormat.maxRegions else {
            throw SnapshotError(.corrupted("\(regionCount) regions (1...\(SnapshotFormat.maxRegions) allowed)"), path: path)
        }
        let tableOffset = UInt64(SnapshotFormat.headerSize)
        let table = try bytes(fd, regionCount * SnapshotFormat.regionSize, at: tableOffset, path: path)
        var check = ByteWriter()
        check.raw(Array(r.bytes[0..<56]))
        check.raw(table)
        guard check.crc == crc else { throw SnapshotError(.corrupted("header checksum does not match"), path: path) }
        parentID = flags & 1 != 0 ? parent : nil
        var t = ByteReader(table)
        for i in 0..<regionCount {
            let start = t.u64()!, length = t.u64()!, kindRaw = t.u32()!
            _ = t.u32()
            guard let kind = SnapshotFormat.MemoryKind(rawValue: kindRaw) else {
                throw SnapshotError(.corrupted("region \(i) has unknown memory kind \(kindRaw)"), path: path)
            }
            guard length > 0, length % UInt64(pageSize) == 0, start % UInt64(pageSize) == 0, start <= UInt64.max - length else {
                throw SnapshotError(.corrupted("region \(i) (start 0x\(String(start, radix: 16)), \(length) bytes) is not page-aligned"), path: path)
            }
            guard length <= SnapshotFormat.maxBytes, UInt64(pageCount) * UInt64(pageSize) + length <= SnapshotFormat.maxBytes else {
                throw SnapshotError(.corrupted("regions total more than \(SnapshotFormat.maxBytes >> 40) TiB"), path: path)
            }
            regions.append(SnapshotFormat.Region(start: start, length: length, kind: kind))
            pageCount += Int(length / UInt64(pageSize))
        }
        return tableOffset + UInt64(table.count)
    }

    /// Reads footer, chunk table and index; returns where the records end.
    private mutating func parseFooter(fd: Int32, path: String) throws(SnapshotError) -> UInt64 {
        let footerOffset = fileSize - UInt64(SnapshotFormat.footerSize)
        let footerBytes = try bytes(fd, SnapshotFormat.footerSize, at: footerOffset, path: path)
        var f = ByteReader(footerBytes)
        guard f.u64() == SnapshotFormat.footerMagic else {
            throw SnapshotError(.truncated("no footer: the capture did not finish or the file was cut short"), path: path)
        }
        let chunkTable = f.u64()!, chunkCount = f.u64()!, indexOffset = f.u64()!, pages = f.u64()!, crc = f.u32()!
        guard pages == UInt64(pageCount) else {
            throw SnapshotError(.corrupted("footer counts \(pages) pages, the regions \(pageCount)"), path: path)
        }
        let chunkBytes = chunkCount.multipliedReportingOverflow(by: UInt64(SnapshotFormat.chunkEntrySize))
        guard !chunkBytes.overflow, chunkTable <= footerOffset, chunkBytes.partialValue == indexOffset &- chunkTable,
              indexOffset <= footerOffset, footerOffset - indexOffset == UInt64(pageCount) * 8 else {
            throw SnapshotError(.corrupted("footer offsets do not fit the file (chunk table \(chunkTable), "
                + "\(chunkCount) chunks, index \(indexOffset), footer \(footerOffset))"), path: path)
        }
        let table = try bytes(fd, Int(chunkBytes.partialValue), at: chunkTable, path: path)
        let indexBytes = try bytes(fd, pageCount * 8, at: indexOffset, path: path)
        var check = table.withUnsafeBytes { CRC32C.checksum($0) }
        check = indexBytes.withUnsafeBytes { CRC32C.checksum($0, continuing: check) }
        check = footerBytes.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[0..<40]), continuing: check) }
        guard check == crc else { throw SnapshotError(.corrupted("index or chunk table checksum does not match"), path: path) }
        var t = ByteReader(table)
        for _ in 0..<Int(chunkCount) {
            let offset = t.u64()!, first = t.u64()!, count = t.u32()!, c = t.u32()!
            chunks.append(SnapshotFile.Chunk(offset: offset, firstPage: Int(clamping: first), count: Int(count), crc: c))
        }
        index = indexBytes.withUnsafeBytes { Array($0.bindMemory(to: UInt64.self)) }
        return chunkTable
    }

    /// Every record lies between the regions and the chunk table; every data entry
    /// names a record that holds its page.
    private func checkLayout(dataStart: UInt64, dataEnd: UInt64, path: String) throws(SnapshotError) {
        guard dataStart <= dataEnd else { throw SnapshotError(.corrupted("chunk table overlaps the header"), path: path) }
        for (i, c) in chunks.enumerated() {
            let length = UInt64(c.count) * UInt64(pageSize) + UInt64(SnapshotFormat.recordHeaderSize)
            guard c.count > 0, c.firstPage >= 0, c.firstPage <= pageCount - c.count,
                  c.offset >= dataStart, c.offset <= dataEnd, length <= dataEnd - c.offset else {
                throw SnapshotError(.corrupted("record \(i) (offset \(c.offset), pages \(c.firstPage)+\(c.count)) lies outside the data"), path: path)
            }
        }
        for (page, e) in index.enumerated() {
            switch SnapshotFormat.kind(of: e) {
            case .data:
                let r = SnapshotFormat.record(of: e)
                guard r < chunks.count, chunks[r].firstPage <= page, page < chunks[r].firstPage + chunks[r].count else {
                    throw SnapshotError(.corrupted("page \(page) names record \(r), which does not hold it"), path: path)
                }
            case .unchanged:
                guard parentID != nil else {
                    throw SnapshotError(.corrupted("page \(page) refers to a parent, but this snapshot has none"), path: path)
                }
            case .hole, .zero: break
            }
        }
    }
}
