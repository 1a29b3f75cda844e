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

    /// The range of `length` bytes from `start`.
    ///
    /// - Parameters:
    ///   - start: The first address.
    ///   - length: The length in bytes.
    public init(start: UInt64, length: UInt64) {
        self.start = start
        self.length = length
    }

    /// The range from `start` up to, not including, `end`.
    ///
    /// - Parameters:
    ///   - start: The first address.
    ///   - end: One past the last address.
    public init(start: UInt64, end: UInt64) {
        self.start = start
        self.length = end &- start
    }

    /// The addresses of `buffer`.
    ///
    /// - Parameter buffer: Memory of this process.
    public init(_ buffer: UnsafeMutableRawBufferPointer) {
        self.start = UInt64(UInt(bitPattern: buffer.baseAddress))
        self.length = UInt64(buffer.count)
    }

    /// The `length` bytes at `pointer`.
    ///
    /// - Parameters:
    ///   - pointer: The first byte.
    ///   - length: The length in bytes.
    public init(_ pointer: UnsafeMutableRawPointer, length: Int) {
        self.start = UInt64(UInt(bitPattern: pointer))
        self.length = UInt64(length)
    }

    /// One past the last address.
    public var end: UInt64 { start &+ length }

    /// Whether `address` lies in the range.
    ///
    /// - Parameter address: Any address.
    /// - Returns: Whether `start <= address < end`.
    @inline(__always)
    public func contains(_ address: UInt64) -> Bool { address >= start && address - start < length }

    /// Whether `other` lies wholly in this range.
    ///
    /// - Parameter other: Another range.
    /// - Returns: Whether every byte of `other` is in this range.
    public func contains(_ other: MemoryRange) -> Bool {
        other.start >= start && other.end <= end && other.end >= other.start
    }

    /// Whether the two ranges share at least one byte.
    ///
    /// - Parameter other: Another range.
    /// - Returns: Whether some byte lies in both.
    public func overlaps(_ other: MemoryRange) -> Bool {
        start < other.end && other.start < end
    }

    /// Whether start and length are multiples of `alignment`.
    ///
    /// - Parameter alignment: A power of two, such as the page size.
    /// - Returns: Whether both `start` and `length` are multiples of it.
    public func isAligned(to alignment: UInt64) -> Bool {
        (start | length) & (alignment - 1) == 0
    }

    /// The start as a pointer.
    public var pointer: UnsafeMutableRawPointer {
        UnsafeMutableRawPointer(bitPattern: UInt(start))!
    }

    /// `0xSTART..<0xEND (N bytes)`.
    public var description: String {
        "0x\(String(start, radix: 16))..<0x\(String(end, radix: 16)) (\(length) bytes)"
    }
}

/// The system's base page size.
public let systemPageSize: Int = Int(sysconf(Int32(_SC_PAGESIZE)))
