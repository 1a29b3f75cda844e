import Synchronization
import SystemPackage
import _CUserfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

extension Userfaultfd {
    /// One message read from a userfaultfd.
    public enum Event: Sendable, CustomStringConvertible {
        /// A thread faulted on a registered range and waits for it to be resolved.
        case pageFault(PageFault)
        /// The process forked; the child's ranges report to this new userfaultfd.
        case fork(ForkedUserfaultfd)
        /// A registered range moved with `mremap`: the pages of `from` are now at `to`.
        ///
        /// Both ranges have the length the kernel reports (the old length); the
        /// registration moved with the pages.
        case remap(from: MemoryRange, to: MemoryRange)
        /// Pages were released with `madvise(MADV_DONTNEED/REMOVE)`; the range stays registered.
        case remove(MemoryRange)
        /// A registered range was unmapped.
        case unmap(MemoryRange)
        /// A message this library does not know, kept with its code.
        case unknown(code: UInt8)

        /// The event in one line, addresses in hex.
        public var description: String {
            switch self {
            case .pageFault(let f): return "pagefault \(f)"
            case .fork(let child): return "fork (uffd \(child.rawDescriptor))"
            case .remap(let from, let to):
                return "remap 0x\(String(from.start, radix: 16)) -> 0x\(String(to.start, radix: 16)) (\(from.length) bytes)"
            case .remove(let r): return "remove \(r)"
            case .unmap(let r): return "unmap \(r)"
            case .unknown(let code): return "unknown event 0x\(String(code, radix: 16))"
            }
        }
    }
}

extension Userfaultfd.Event {
    /// The REMAP event from raw addresses.
    ///
    /// - Parameters:
    ///   - from: The old start address.
    ///   - to: The new start address.
    ///   - length: The length of the moved range.
    /// - Returns: ``remap(from:to:)`` with the two ranges.
    @available(*, deprecated, message: "build remap(from:to:) with MemoryRange values")
    public static func remap(from: UInt64, to: UInt64, length: UInt64) -> Self {
        .remap(from: MemoryRange(start: from, length: length), to: MemoryRange(start: to, length: length))
    }
}

extension Userfaultfd {
    /// A page fault message.
    public struct PageFault: Sendable, Equatable, CustomStringConvertible {
        /// Why the thread faulted.
        public struct Flags: OptionSet, Hashable, Sendable {
            /// The bits as the kernel reads and writes them.
            public var rawValue: UInt64
            /// The set with these bits; bits without a name here are kept.
            ///
            /// - Parameter rawValue: The bits as the kernel reads and writes them.
            public init(rawValue: UInt64) { self.rawValue = rawValue }
            /// A write access.
            ///
            /// The corresponding C constant is `UFFD_PAGEFAULT_FLAG_WRITE`.
            public static let write = Flags(rawValue: UInt64(UFFD_PAGEFAULT_FLAG_WRITE))
            /// A write to a write-protected page.
            ///
            /// The corresponding C constant is `UFFD_PAGEFAULT_FLAG_WP`.
            public static let writeProtect = Flags(rawValue: UInt64(UFFD_PAGEFAULT_FLAG_WP))
            /// A minor fault: the page is in the page cache but not mapped.
            ///
            /// The corresponding C constant is `UFFD_PAGEFAULT_FLAG_MINOR`.
            public static let minor = Flags(rawValue: UInt64(UFFD_PAGEFAULT_FLAG_MINOR))
        }

        /// The faulting address (page-aligned unless EXACT_ADDRESS was negotiated).
        public var address: UInt64
        /// Why it faulted.
        public var flags: Flags
        /// The faulting thread's id, with the THREAD_ID feature.
        public var threadID: Int32?

        /// A page fault as the kernel reports it.
        ///
        /// - Parameters:
        ///   - address: The faulting address.
        ///   - flags: Why it faulted.
        ///   - threadID: The faulting thread's id, where THREAD_ID was negotiated.
        public init(address: UInt64, flags: Flags, threadID: Int32? = nil) {
            self.address = address
            self.flags = flags
            self.threadID = threadID
        }

        /// `missing write at 0x… by tid …` and the like.
        public var description: String {
            var kind = flags.contains(.minor) ? "minor" : flags.contains(.writeProtect) ? "wp" : "missing"
            if flags.contains(.write) { kind += " write" }
            return "\(kind) at 0x\(String(address, radix: 16))" + (threadID.map { " by tid \($0)" } ?? "")
        }
    }

    /// The userfaultfd of a forked child, owned by whoever holds this object.
    ///
    /// Take it with ``take()`` to serve the child; if nobody does, it is closed when
    /// the last reference goes away, so a FORK event never leaks a descriptor.
    public final class ForkedUserfaultfd: Sendable {
        private let descriptor: Mutex<Int32>
        /// The features the child's uffd has (the parent's).
        public let features: Features
        /// The descriptor number as received (valid until taken and closed).
        public let rawDescriptor: Int32

        init(descriptor: Int32, features: Features) {
            self.descriptor = Mutex(descriptor)
            self.features = features
            self.rawDescriptor = descriptor
        }

        /// Takes ownership of the child's userfaultfd.
        ///
        /// - Returns: The child's userfaultfd with the parent's features, or nil if already taken.
        public func take() -> Userfaultfd? {
            let fd = descriptor.withLock { fd -> Int32 in
                let taken = fd
                fd = -1
                return taken
            }
            guard fd >= 0 else { return nil }
            return Userfaultfd(adopting: FileDescriptor(rawValue: fd), features: features)
        }

        deinit {
            let fd = descriptor.withLock { $0 }
            if fd >= 0 { _ = Glibc.close(fd) }
        }
    }

    /// A buffer for reading messages in batches, allocated once.
    ///
    /// ``Handle/readEvents(into:)`` fills it; ``events`` then holds the decoded batch.
    /// Reusing one buffer keeps the fault path free of allocation (page faults decode
    /// without allocating; only a FORK message creates an object).
    public final class EventBuffer: @unchecked Sendable {
        /// The size of one `uffd_msg`.
        public static let messageSize = 32
        /// The most messages one read returns.
        public let capacity: Int
        let raw: UnsafeMutableRawPointer
        /// The messages of the last read, decoded.
        public private(set) var events: [Event]

        /// A buffer for up to `capacity` messages per read.
        ///
        /// - Parameter capacity: The most messages one read returns; at least 1.
        public init(capacity: Int = 64) {
            precondition(capacity > 0, "EventBuffer needs room for at least one message")
            self.capacity = capacity
            self.raw = UnsafeMutableRawPointer.allocate(byteCount: capacity * Self.messageSize, alignment: 8)
            self.events = []
            self.events.reserveCapacity(capacity)
        }

        deinit { raw.deallocate() }

        /// The number of messages in the last read.
        public var count: Int { events.count }

        func decode(count: Int, features: Features) {
            events.removeAll(keepingCapacity: true)
            for i in 0..<count {
                events.append(Self.decode(raw + i * Self.messageSize, features: features))
            }
        }

        @inline(__always)
        static func decode(_ p: UnsafeRawPointer, features: Features) -> Event {
            let code = p.load(as: UInt8.self)
            @inline(__always) func u64(_ offset: Int) -> UInt64 { p.loadUnaligned(fromByteOffset: offset, as: UInt64.self) }
            switch Int32(code) {
            case UFFD_EVENT_PAGEFAULT:
                let tid: Int32? = features.contains(.threadID) ? p.loadUnaligned(fromByteOffset: 24, as: Int32.self) : nil
                return .pageFault(PageFault(address: u64(16), flags: .init(rawValue: u64(8)), threadID: tid))
            case UFFD_EVENT_FORK:
                return .fork(ForkedUserfaultfd(descriptor: p.loadUnaligned(fromByteOffset: 8, as: Int32.self), features: features))
            case UFFD_EVENT_REMAP:
                return .remap(from: MemoryRange(start: u64(8), length: u64(24)), to: MemoryRange(start: u64(16), length: u64(24)))
            case UFFD_EVENT_REMOVE:
                return .remove(MemoryRange(start: u64(8), end: u64(16)))
            case UFFD_EVENT_UNMAP:
                return .unmap(MemoryRange(start: u64(8), end: u64(16)))
            default:
                return .unknown(code: code)
            }
        }
    }
}

extension Userfaultfd.Handle {
    /// Reads the pending messages (up to the buffer's capacity) and decodes them.
    ///
    /// - Parameter buffer: Where the messages go; ``Userfaultfd/EventBuffer/events``
    ///   holds them afterwards.
    /// - Returns: The number of messages read; 0 means none is pending now (`EAGAIN`).
    /// - Throws: `UserfaultfdError` for `read` on any other failure.
    ///
    /// The corresponding C call is `read(fd, msgs, n * sizeof(struct uffd_msg))`.
    @discardableResult
    public func readEvents(into buffer: Userfaultfd.EventBuffer) throws(UserfaultfdError) -> Int {
        try checkOpen("read uffd_msg")
        let n = retryOnInterrupt { Glibc.read(fd, buffer.raw, buffer.capacity * Userfaultfd.EventBuffer.messageSize) }
        if n < 0 {
            let e = currentErrno()
            if e != .resourceTemporarilyUnavailable { throw UserfaultfdError(operation: "read uffd_msg", errno: e) }
            buffer.decode(count: 0, features: features)
            return 0
        }
        if n % Userfaultfd.EventBuffer.messageSize != 0 {
            throw UserfaultfdError(operation: "read uffd_msg", kind: .malformed("read returned \(n) bytes, not a multiple of 32"))
        }
        let count = n / Userfaultfd.EventBuffer.messageSize
        buffer.decode(count: count, features: features)
        return count
    }
}
