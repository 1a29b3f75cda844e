/// Little-endian integers read from bytes a file or a peer gave, never past their end.
///
/// `Failure` is the error of the format being read; `cutShort` makes it when a read
/// needs more bytes than are left.
package struct LittleEndianReader<Failure: Error> {
    /// The bytes read.
    package let data: [UInt8]
    /// Where the next read starts.
    package var offset = 0
    private let cutShort: (_ offset: Int, _ needed: Int, _ remaining: Int) -> Failure

    /// A reader at the start of `data`.
    ///
    /// - Parameters:
    ///   - data: what to read.
    ///   - cutShort: the error for a read at `offset` of `needed` bytes where only `remaining` are left.
    package init(_ data: [UInt8], cutShort: @escaping (_ offset: Int, _ needed: Int, _ remaining: Int) -> Failure) {
        self.data = data
        self.cutShort = cutShort
    }

    /// Bytes not read yet.
    package var remaining: Int { data.count - offset }

    /// Whether every byte has been read.
    package var atEnd: Bool { offset == data.count }

    /// The next `n` bytes.
    package mutating func bytes(_ n: Int) throws(Failure) -> ArraySlice<UInt8> {
        if n < 0 || n > remaining { throw cutShort(offset, n, remaining) }
        defer { offset += n }
        return data[offset..<(offset + n)]
    }

    /// The next integer of type `T`, stored little-endian.
    package mutating func integer<T: FixedWidthInteger>(_: T.Type) throws(Failure) -> T {
        let size = MemoryLayout<T>.size
        if size > remaining { throw cutShort(offset, size, remaining) }
        defer { offset += size }
        return data.withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
    }

    package mutating func u8() throws(Failure) -> UInt8 { try integer(UInt8.self) }
    package mutating func u16() throws(Failure) -> UInt16 { try integer(UInt16.self) }
    package mutating func u32() throws(Failure) -> UInt32 { try integer(UInt32.self) }
    package mutating func u64() throws(Failure) -> UInt64 { try integer(UInt64.self) }
}

/// Little-endian integers appended to a byte array.
package struct LittleEndianWriter {
    /// What has been written.
    package var bytes: [UInt8] = []

    package init() {}

    package mutating func u8(_ v: UInt8) { bytes.append(v) }
    package mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    package mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    package mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
}
