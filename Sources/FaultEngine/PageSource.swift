import SystemPackage
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Where page contents come from.
///
/// A ``FaultServer`` is generic over its source, so filling a page is a direct
/// call, never an existential dispatch. Sources are called on handler threads and
/// must not touch memory registered on the userfaultfd they serve (a handler that
/// faults on its own range waits for itself).
public protocol PageSource: Sendable {
    /// Fills `destination` (a multiple of the page size, except at the end of a source
    /// whose length is not) with the bytes at `sourceOffset`.
    ///
    /// - Parameters:
    ///   - destination: a staging buffer owned by the calling handler thread.
    ///   - sourceOffset: the byte offset in the source of `destination`'s first byte.
    /// - Throws: ``PageSourceError`` when the bytes cannot be produced; the server
    ///   then poisons the faulting page (its thread gets SIGBUS) and reports the error.
    func fill(_ destination: UnsafeMutableRawBufferPointer, at sourceOffset: UInt64) throws(PageSourceError)

    /// Total bytes available, if known. The server refuses regions that reach beyond
    /// the page that holds the last byte; the rest of that page is served as zeros
    /// (``fill(_:at:)`` is then asked for the bytes up to `length` only).
    var length: UInt64? { get }

    /// Pages the server may move (not copy) into place with `UFFDIO_MOVE`, if the
    /// source keeps its bytes in private anonymous memory it is willing to give up.
    ///
    /// Moving consumes the source: the bytes leave it. The default is nil (copy).
    /// - Returns: the address of `length` bytes at `sourceOffset`, page-aligned, or nil.
    func movablePages(at sourceOffset: UInt64, length: Int) -> UnsafeMutableRawPointer?

    /// The source's bytes at `sourceOffset` if they already lie in this process's
    /// memory, so COPY can read them in place instead of through a staging buffer.
    /// The default is nil.
    func contiguousBytes(at sourceOffset: UInt64, length: Int) -> UnsafeRawPointer?

    /// Where an async-signal-safe resolver can read the bytes itself, without calling
    /// Swift: memory (a pointer) or a file (descriptor and offset). The default is nil:
    /// faults are then served by a handler thread.
    var signalSafeBacking: SignalSafeBacking? { get }
}

extension PageSource {
    public func movablePages(at sourceOffset: UInt64, length: Int) -> UnsafeMutableRawPointer? { nil }
    public func contiguousBytes(at sourceOffset: UInt64, length: Int) -> UnsafeRawPointer? { nil }
    public var signalSafeBacking: SignalSafeBacking? { nil }
}

/// Bytes a signal handler can read without calling back into Swift.
public enum SignalSafeBacking: Sendable, Hashable {
    /// `length` bytes at `address` in this process, never freed while served. When
    /// `length` ends inside a page, the rest of that page must be readable zeros (as
    /// in an anonymous or file mapping).
    case memory(address: UInt, length: UInt64)
    /// A file descriptor read with `pread`, starting at `offset`.
    case file(descriptor: Int32, offset: UInt64, length: UInt64)
}

/// Why a source could not produce bytes.
public struct PageSourceError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What kind of failure this is.
    public enum Kind: Sendable, Hashable {
        /// Reading the backing store failed with this error.
        case system(Errno)
        /// The requested bytes lie beyond the end of the source.
        case outOfBounds
        /// The source produced fewer bytes than asked (a file shorter than expected).
        case shortRead
        /// A source-specific failure.
        case failed(String)
    }

    /// What went wrong.
    public var kind: Kind
    /// The source offset of the request.
    public var sourceOffset: UInt64
    /// The number of bytes asked for.
    public var length: Int

    public init(_ kind: Kind, sourceOffset: UInt64, length: Int) {
        self.kind = kind
        self.sourceOffset = sourceOffset
        self.length = length
    }

    public var description: String {
        let what: String
        switch kind {
        case .system(let e): what = systemCallFailure("read", e.rawValue)
        case .outOfBounds: what = "out of bounds"
        case .shortRead: what = "short read"
        case .failed(let why): what = why
        }
        return "page source at offset \(sourceOffset) (\(length) bytes): \(what)"
    }
}

/// A source of zero bytes, of unlimited length.
public struct ZeroSource: PageSource {
    public init() {}

    @inline(__always)
    public func fill(_ destination: UnsafeMutableRawBufferPointer, at sourceOffset: UInt64) throws(PageSourceError) {
        if let base = destination.baseAddress { memset(base, 0, destination.count) }
    }

    public var length: UInt64? { nil }
}

/// A source that asks a closure for the bytes.
///
/// The closure runs on handler threads; it must not touch registered memory.
public struct ClosureSource: PageSource {
    /// The closure's signature: fill the buffer with the bytes at the offset, or throw.
    public typealias Fill = @Sendable (UnsafeMutableRawBufferPointer, UInt64) throws(PageSourceError) -> Void

    private let body: Fill
    public let length: UInt64?

    /// A source of `length` bytes (nil: unknown) produced by `fill`.
    public init(length: UInt64? = nil, _ fill: @escaping Fill) {
        self.body = fill
        self.length = length
    }

    @inline(__always)
    public func fill(_ destination: UnsafeMutableRawBufferPointer, at sourceOffset: UInt64) throws(PageSourceError) {
        try body(destination, sourceOffset)
    }
}
