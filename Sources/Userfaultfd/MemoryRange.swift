#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A range of virtual addresses: `start ..< start + length`.
public struct MemoryRange: Hashable, Sendable, CustomStringConvertible {
    /// The first address.
    public var start: UInt64
    /// The length in bytes.
    public var length: UInt64

    public init(start: UInt64, length: UInt64) {
        self.start = start
        self.length = length
    }

    public init(start: UInt64, end: UInt64) {
        self.start = start
        self.length = end &- start
    }

    public init(_ buffer: UnsafeMutableRawBufferPointer) {
        self.start = UInt64(UInt(bitPattern: buffer.baseAddress))
        self.length = UInt64(buffer.count)
    }

    public init(_ pointer: UnsafeMutableRawPointer, length: Int) {
        self.start = UInt64(UInt(bitPattern: pointer))
        self.length = UInt64(length)
    }

    /// One past the last address.
    public var end: UInt64 { start &+ length }

    /// Whether `address` lies in the range.
    @inline(__always)
    public func contains(_ address: UInt64) -> Bool { address >= start && address - start < length }

    /// Whether `other` lies wholly in this range.
    public func contains(_ other: MemoryRange) -> Bool {
        other.start >= start && other.end <= end && other.end >= other.start
    }

    /// Whether the two ranges share at least one byte.
    public func overlaps(_ other: MemoryRange) -> Bool {
        start < other.end && other.start < end
    }

    /// Whether start and length are multiples of `alignment` (a power of two).
    public func isAligned(to alignment: UInt64) -> Bool {
        (start | length) & (alignment - 1) == 0
    }

    /// The start as a pointer.
    public var pointer: UnsafeMutableRawPointer {
        UnsafeMutableRawPointer(bitPattern: UInt(start))!
    }

    public var description: String {
        "0x\(String(start, radix: 16))..<0x\(String(end, radix: 16)) (\(length) bytes)"
    }
}

/// The system's base page size.
public let systemPageSize: Int = Int(sysconf(Int32(_SC_PAGESIZE)))
