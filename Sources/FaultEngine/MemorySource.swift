import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A source whose bytes are held in memory: page-aligned private anonymous memory
/// owned by the source and freed when the last copy of it goes away.
///
/// With `allowsMoving`, strategies that move pages (``FaultServerConfiguration/Strategy/move(chunkPages:)``)
/// take them out of this memory instead of copying them: installing is then zero-copy,
/// and the bytes moved are gone from the source (later reads there give zeros).
public struct MemorySource: PageSource, @unchecked Sendable {
    final class Storage: @unchecked Sendable {
        let base: UnsafeMutableRawPointer
        let mappedLength: Int
        init(base: UnsafeMutableRawPointer, mappedLength: Int) {
            self.base = base
            self.mappedLength = mappedLength
        }
        deinit { munmap(base, mappedLength) }
    }

    private let storage: Storage
    /// The first byte of the source.
    public let baseAddress: UnsafeMutableRawPointer
    private let count: Int
    /// Whether pages may be moved out of the source (consuming it).
    public let allowsMoving: Bool

    /// A source of `length` bytes, filled by `initialize` before the source is used.
    ///
    /// - Parameters:
    ///   - length: the number of bytes; the mapping is rounded up to whole pages.
    ///   - allowsMoving: let MOVE take the pages out of this memory.
    ///   - initialize: writes the bytes.
    /// - Throws: `UserfaultfdError` for `mmap` when the memory cannot be mapped.
    public init(
        length: Int, allowsMoving: Bool = false,
        initialize: (UnsafeMutableRawBufferPointer) throws -> Void
    ) throws {
        if length <= 0 {
            throw UserfaultfdError(operation: "MemorySource", kind: .invalidArgument("length \(length) is not positive"))
        }
        let page = systemPageSize
        let mapped = (length + page - 1) / page * page
        guard let p = mmap(nil, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
            p != MAP_FAILED
        else {
            throw UserfaultfdError(operation: "mmap MemorySource \(mapped) bytes", errno: .init(rawValue: errno))
        }
        storage = Storage(base: p, mappedLength: mapped)
        baseAddress = p
        count = length
        self.allowsMoving = allowsMoving
        try initialize(UnsafeMutableRawBufferPointer(start: p, count: length))
    }

    /// A source holding a copy of `bytes`.
    public init(copying bytes: UnsafeRawBufferPointer, allowsMoving: Bool = false) throws {
        try self.init(length: bytes.count, allowsMoving: allowsMoving) { dst in
            dst.copyMemory(from: bytes)
        }
    }

    /// A source holding a copy of `bytes`.
    public init(_ bytes: [UInt8], allowsMoving: Bool = false) throws {
        try self.init(length: bytes.count, allowsMoving: allowsMoving) { dst in
            bytes.withUnsafeBytes { dst.copyMemory(from: $0) }
        }
    }

    /// The source's bytes.
    public var bytes: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: baseAddress, count: count) }

    public var length: UInt64? { UInt64(count) }

    @inline(__always)
    public func fill(_ destination: UnsafeMutableRawBufferPointer, at sourceOffset: UInt64) throws(PageSourceError) {
        let n = destination.count
        guard sourceOffset <= UInt64(count), UInt64(n) <= UInt64(count) - sourceOffset else {
            throw PageSourceError(.outOfBounds, sourceOffset: sourceOffset, length: n)
        }
        if n > 0 { memcpy(destination.baseAddress!, baseAddress + Int(sourceOffset), n) }
    }

    public func movablePages(at sourceOffset: UInt64, length: Int) -> UnsafeMutableRawPointer? {
        guard allowsMoving, sourceOffset % UInt64(systemPageSize) == 0,
            sourceOffset <= UInt64(storage.mappedLength), UInt64(length) <= UInt64(storage.mappedLength) - sourceOffset
        else { return nil }
        return baseAddress + Int(sourceOffset)
    }

    @inline(__always)
    public func contiguousBytes(at sourceOffset: UInt64, length: Int) -> UnsafeRawPointer? {
        guard sourceOffset <= UInt64(count), UInt64(length) <= UInt64(count) - sourceOffset else { return nil }
        return UnsafeRawPointer(baseAddress + Int(sourceOffset))
    }

    public var signalSafeBacking: SignalSafeBacking? {
        allowsMoving ? nil : .memory(address: UInt(bitPattern: baseAddress), length: UInt64(count))
    }
}
