import SystemPackage
import _CUserfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

extension Userfaultfd.Handle {
    /// What ``wait(stop:timeoutMilliseconds:)`` saw.
    public enum WaitResult: Equatable, Sendable {
        /// Messages are ready to read.
        case ready
        /// The stop signal was raised.
        case stopped
        /// The timeout passed with nothing to read.
        case timedOut
        /// The userfaultfd reports an error or hang-up (for a forked child's uffd: the child is gone).
        case hangUp
    }

    /// Blocks until messages are ready, `stop` is raised, or the timeout passes.
    ///
    /// It allocates nothing, not even on its first call, so it is safe while another
    /// thread forks with EVENT_FORK (which holds the allocator's locks until the FORK
    /// message is read). To watch other descriptors as well (a socket, a pipe), use
    /// ``wait(stop:watching:timeoutMilliseconds:)``.
    ///
    /// - Parameters:
    ///   - stop: A signal another thread raises to end the wait (closing a uffd does not wake `poll`).
    ///   - timeoutMilliseconds: How long to wait; -1 waits forever.
    /// - Returns: ``WaitResult/stopped`` if `stop` was raised, else ``WaitResult/ready``,
    ///   ``WaitResult/hangUp`` or ``WaitResult/timedOut``.
    /// - Throws: `UserfaultfdError` for `poll`.
    ///
    /// The corresponding C function is `poll`.
    public func wait(stop: StopSignal?, timeoutMilliseconds: Int32 = -1) throws(UserfaultfdError) -> WaitResult {
        try checkOpen("poll")
        let stopfd = stop?.fileDescriptor.rawValue ?? -1
        var uffdEvents: Int16 = 0
        var stopEvents: Int16 = 0
        let n = try retryOnInterrupt("poll") { cuffd_poll_pair(fd, stopfd, timeoutMilliseconds, &uffdEvents, &stopEvents) }
        if n == 0 { return .timedOut }
        if stopEvents != 0 { return .stopped }
        if uffdEvents & Int16(POLLIN) != 0 { return .ready }
        return .hangUp
    }

    /// What ``wait(stop:watching:timeoutMilliseconds:)`` saw: everything that is ready at once.
    public struct Readiness: Equatable, Sendable {
        /// Messages are ready to read on the userfaultfd.
        public var messages: Bool
        /// The userfaultfd reports an error or hang-up (for a forked child's uffd: the child is gone).
        public var hangUp: Bool
        /// The stop signal was raised.
        public var stopped: Bool
        /// The watched descriptors that are readable, hung up or in error, by their index.
        public var watched: WatchedSet
        /// Nothing was ready when the timeout passed.
        public var timedOut: Bool { !messages && !hangUp && !stopped && watched.isEmpty }
    }

    /// Indexes of watched descriptors, as a bit set (no allocation).
    public struct WatchedSet: Equatable, Sendable, Sequence {
        /// Bit `i` stands for the descriptor at index `i`.
        public var bits: UInt64
        /// Whether the descriptor at `index` is in the set.
        ///
        /// - Parameter index: An index into the descriptors that were watched.
        /// - Returns: Whether that descriptor is ready.
        public func contains(_ index: Int) -> Bool { index >= 0 && index < 64 && bits & (1 << UInt64(index)) != 0 }
        /// Whether no descriptor is in the set.
        public var isEmpty: Bool { bits == 0 }
        /// The indexes in the set, in increasing order.
        ///
        /// - Returns: An iterator over the indexes.
        public func makeIterator() -> Iterator { Iterator(rest: bits) }

        /// Iterates over the indexes of a ``WatchedSet``.
        public struct Iterator: IteratorProtocol {
            var rest: UInt64
            /// The next index.
            ///
            /// - Returns: The next index, or nil after the last.
            public mutating func next() -> Int? {
                if rest == 0 { return nil }
                let index = rest.trailingZeroBitCount
                rest &= rest - 1
                return index
            }
        }
    }

    /// The most descriptors ``wait(stop:watching:timeoutMilliseconds:)`` watches besides the userfaultfd.
    public static var maxWatched: Int { Int(CUFFD_POLL_SET_MAX) }

    /// Blocks until messages are ready, `stop` is raised, one of `others` becomes
    /// readable (or hangs up), or the timeout passes.
    ///
    /// For a resolver that also serves a socket: one `poll` covers everything, and the
    /// result says everything that is ready, so neither side starves the other. It
    /// allocates nothing.
    ///
    /// ```swift
    /// let readiness = try handle.wait(stop: stop, watching: [socket])
    /// if readiness.watched.contains(0) { /* read the socket */ }
    /// if readiness.messages { try handle.readEvents(into: buffer) }
    /// ```
    ///
    /// - Parameters:
    ///   - stop: A signal another thread raises to end the wait, or nil.
    ///   - others: Up to ``maxWatched`` descriptors to watch for `POLLIN`.
    ///   - timeoutMilliseconds: How long to wait; -1 waits forever.
    /// - Returns: What is ready; ``Readiness/timedOut`` when nothing was.
    /// - Throws: ``UserfaultfdError/Kind/invalidArgument(_:)`` for more than
    ///   ``maxWatched`` descriptors, else `UserfaultfdError` for `poll`.
    ///
    /// The corresponding C function is `poll`.
    public func wait(stop: StopSignal?, watching others: [FileDescriptor], timeoutMilliseconds: Int32 = -1) throws(UserfaultfdError) -> Readiness {
        try checkOpen("poll")
        if others.count > Self.maxWatched {
            throw UserfaultfdError(operation: "poll", kind: .invalidArgument("\(others.count) descriptors to watch, at most \(Self.maxWatched)"))
        }
        let stopfd = stop?.fileDescriptor.rawValue ?? -1
        var uffdEvents: Int16 = 0
        var stopEvents: Int16 = 0
        var watched: UInt64 = 0
        try withUnsafeTemporaryAllocation(of: Int16.self, capacity: max(1, others.count)) { (revents) throws(UserfaultfdError) in
            try others.withUnsafeBufferPointer { (descriptors) throws(UserfaultfdError) in
                try descriptors.withMemoryRebound(to: Int32.self) { (raw) throws(UserfaultfdError) in
                    _ = try retryOnInterrupt("poll") {
                        cuffd_poll_set(fd, stopfd, raw.baseAddress, Int32(raw.count), timeoutMilliseconds,
                                       &uffdEvents, &stopEvents, revents.baseAddress)
                    }
                }
            }
            for i in 0..<others.count where revents[i] != 0 { watched |= 1 << UInt64(i) }
        }
        return Readiness(
            messages: uffdEvents & Int16(POLLIN) != 0,
            hangUp: uffdEvents & Int16(POLLERR | POLLHUP | POLLNVAL) != 0,
            stopped: stopEvents != 0,
            watched: WatchedSet(bits: watched))
    }
}

/// A level-triggered stop signal (an eventfd) for waking threads blocked in `poll`.
///
/// Raise it once; every waiter sees it until the signal is closed.
public final class StopSignal: Sendable {
    /// The eventfd.
    public let fileDescriptor: FileDescriptor

    /// Creates an unraised signal.
    ///
    /// - Throws: `UserfaultfdError` for `eventfd`.
    ///
    /// The corresponding C function is `eventfd`.
    public init() throws(UserfaultfdError) {
        let fd = cuffd_eventfd_nonblocking(0)
        if fd < 0 { throw UserfaultfdError(operation: "eventfd", errno: currentErrno()) }
        fileDescriptor = FileDescriptor(rawValue: fd)
    }

    /// Wakes every current and future waiter.
    ///
    /// It allocates nothing.
    public func raise() {
        var one: UInt64 = 1
        let fd = fileDescriptor.rawValue
        _ = withUnsafeBytes(of: &one) { bytes in retryOnInterrupt { Glibc.write(fd, bytes.baseAddress, 8) } }
    }

    /// Whether the signal has been raised.
    public var isRaised: Bool {
        var p = pollfd(fd: fileDescriptor.rawValue, events: Int16(POLLIN), revents: 0)
        return Glibc.poll(&p, 1, 0) == 1
    }

    deinit { try? fileDescriptor.close() }
}
