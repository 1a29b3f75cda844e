import _CSnapshot

/// The on-disk layout of a snapshot file (version 1, little-endian).
///
/// ```
/// header   64 bytes   magic "UFFDSNAP", version, page size, region count, flags,
///                     snapshot id, parent id (zero: a full snapshot), CRC32C
/// regions  24 bytes each: start, length, memory kind (covered by the header's CRC)
/// records  each: 24-byte record header (magic "CHNK", page count, first page,
///          CRC32C of the data) and the pages' bytes; written as pages are saved
/// chunks   24 bytes each: record offset, first page, page count, data CRC32C
/// index    8 bytes per page: kind (2 high bits) and record number
/// footer   48 bytes: magic "UFFDSEND", offsets and counts, CRC32C of chunks+index+footer
/// ```
///
/// Pages are numbered across the regions in order ("global" pages). A file without
/// a valid footer (a capture that did not finish) is refused.
public enum SnapshotFormat {
    /// The current version.
    public static let version: UInt32 = 1
    static let headerMagic: UInt64 = 0x50414E53_44464655 // "UFFDSNAP"
    static let footerMagic: UInt64 = 0x444E4553_44464655 // "UFFDSEND"
    static let recordMagic: UInt32 = 0x4B4E4843 // "CHNK"
    static let headerSize = 64
    static let regionSize = 24
    static let recordHeaderSize = 24
    static let chunkEntrySize = 24
    static let footerSize = 48
    /// The most regions a file may declare.
    static let maxRegions = 4096
    /// The most bytes of memory a file may describe (keeps every size computation in range).
    static let maxBytes: UInt64 = 1 << 46

    /// What the index says about one page.
    public enum PageKind: UInt8, Sendable, Codable, CaseIterable {
        /// Never populated at the snapshot instant: reads as zeros.
        case hole = 0
        /// Populated with zeros (the zero page, or saved and found zero).
        case zero = 1
        /// Bytes stored in this file.
        case data = 2
        /// Not written since the parent snapshot: read it there.
        case unchanged = 3
    }

    /// A region as recorded: where it was and what memory it was.
    public struct Region: Sendable, Hashable, Codable {
        /// The first address in the snapshotted process.
        public var start: UInt64
        /// The length in bytes, a multiple of the page size.
        public var length: UInt64
        /// The memory kind.
        public var kind: MemoryKind

        public init(start: UInt64, length: UInt64, kind: MemoryKind) {
            self.start = start
            self.length = length
            self.kind = kind
        }
    }

    /// The memory a region is.
    public enum MemoryKind: UInt32, Sendable, Hashable, Codable {
        /// Private anonymous memory (with or without transparent huge pages).
        case anonymous = 0
        /// Shared memory: shmem or a memfd.
        case shmem = 1
        /// Private hugetlb memory (MAP_HUGETLB); the file's page size is its huge page size.
        case hugetlb = 2
    }

    /// One index entry: kind in the two high bits, record number below.
    @inline(__always)
    static func entry(_ kind: PageKind, record: UInt32 = 0) -> UInt64 {
        UInt64(kind.rawValue) << 62 | UInt64(record)
    }

    @inline(__always)
    static func kind(of entry: UInt64) -> PageKind { PageKind(rawValue: UInt8(entry >> 62))! }

    @inline(__always)
    static func record(of entry: UInt64) -> Int { Int(entry & 0xFFFF_FFFF) }
}

/// CRC32C (Castagnoli), with the CPU's instruction where there is one.
public enum CRC32C {
    /// Continues `crc` over `bytes`.
    @inline(__always)
    public static func checksum(_ bytes: UnsafeRawBufferPointer, continuing crc: UInt32 = 0) -> UInt32 {
        guard let base = bytes.baseAddress else { return crc }
        return csnap_crc32c(crc, base, bytes.count)
    }

    /// Whether the CPU's CRC32 instruction is used.
    public static var isHardware: Bool { csnap_crc32c_is_hardware() != 0 }
}

/// Little-endian encoding into a byte array, for headers and tables.
struct ByteWriter {
    var bytes: [UInt8] = []
    mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    mutating func raw(_ v: [UInt8]) { bytes.append(contentsOf: v) }
    var crc: UInt32 { bytes.withUnsafeBytes { CRC32C.checksum($0) } }
}

/// Little-endian decoding with bounds checks: reading past the end yields nil.
struct ByteReader {
    let bytes: [UInt8]
    var offset = 0
    init(_ bytes: [UInt8]) { self.bytes = bytes }
    mutating func u32() -> UInt32? {
        guard offset + 4 <= bytes.count else { return nil }
        defer { offset += 4 }
        return bytes.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: UInt32.self)) }
    }
    mutating func u64() -> UInt64? {
        guard offset + 8 <= bytes.count else { return nil }
        defer { offset += 8 }
        return bytes.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: UInt64.self)) }
    }
    mutating func raw(_ n: Int) -> [UInt8]? {
        guard offset + n <= bytes.count else { return nil }
        defer { offset += n }
        return Array(bytes[offset..<offset + n])
    }
}
