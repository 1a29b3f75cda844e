import SystemPackage
import _CUserfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Handing a userfaultfd (or any descriptor) to another process over a unix socket.
public enum DescriptorPassing {
    /// The process at the other end of a unix socket, from `SO_PEERCRED`.
    public struct PeerCredentials: Hashable, Sendable, CustomStringConvertible {
        /// The peer's process id.
        public var pid: Int32
        /// The peer's user id.
        public var uid: UInt32
        /// The peer's group id.
        public var gid: UInt32
        /// `pid P uid U gid G`.
        public var description: String { "pid \(pid) uid \(uid) gid \(gid)" }
    }

    /// Sends `payload` with exactly one descriptor attached (`SCM_RIGHTS`), in one `sendmsg`.
    ///
    /// To hand over a userfaultfd with its features, use ``send(_:over:)``.
    ///
    /// - Parameters:
    ///   - descriptor: The descriptor to pass; the sender keeps its own.
    ///   - payload: At least one byte to travel with it.
    ///   - socket: A connected unix socket.
    /// - Throws: `UserfaultfdError` for `sendmsg`, or if the payload is empty (a
    ///   descriptor needs at least one byte of data to travel with).
    ///
    /// The corresponding C call is `sendmsg(socket, &msg, MSG_NOSIGNAL)` with an `SCM_RIGHTS` control message.
    public static func send(_ descriptor: FileDescriptor, payload: [UInt8], over socket: FileDescriptor) throws(UserfaultfdError) {
        try send(descriptors: [descriptor], payload: payload, over: socket)
    }

    /// Sends `payload` with `descriptors` attached (0 to 16 of them), in one `sendmsg`.
    ///
    /// - Parameters:
    ///   - descriptors: The descriptors to pass; the sender keeps its own.
    ///   - payload: At least one byte to travel with them.
    ///   - socket: A connected unix socket.
    /// - Throws: `UserfaultfdError` for `sendmsg` (`EINVAL` for more than 16
    ///   descriptors), or if the payload is empty.
    ///
    /// The corresponding C call is `sendmsg(socket, &msg, MSG_NOSIGNAL)` with an `SCM_RIGHTS` control message.
    public static func send(descriptors: [FileDescriptor], payload: [UInt8], over socket: FileDescriptor) throws(UserfaultfdError) {
        if payload.isEmpty {
            throw UserfaultfdError(operation: "sendmsg SCM_RIGHTS", kind: .invalidArgument("the payload is empty"))
        }
        let fds = descriptors.map(\.rawValue)
        let n = payload.withUnsafeBytes { bytes in
            fds.withUnsafeBufferPointer { list in
                retryOnInterrupt { cuffd_send_fds(socket.rawValue, bytes.baseAddress, bytes.count, list.baseAddress, Int32(list.count)) }
            }
        }
        if n < 0 { throw UserfaultfdError(operation: "sendmsg SCM_RIGHTS", errno: currentErrno()) }
        if n != payload.count {
            throw UserfaultfdError(operation: "sendmsg SCM_RIGHTS", kind: .malformed("sent \(n) of \(payload.count) bytes"))
        }
    }

    /// One message received with the descriptors attached to it.
    public struct ReceivedMessage {
        /// The payload; empty if the peer closed the connection without sending anything.
        public var payload: [UInt8]
        /// The descriptors received (close-on-exec); the caller owns them.
        public var descriptors: [FileDescriptor]
        /// How many descriptors the message carried: more than `descriptors.count` when
        /// it carried more than the receiver takes (those were closed on arrival).
        public var descriptorCount: Int
    }

    /// The most descriptors ``receiveMessage(from:maxPayload:)`` keeps from one message.
    public static let maxDescriptors = 16

    /// Receives one message of at most `maxPayload` bytes with every descriptor attached.
    ///
    /// Blocks until something arrives (or the socket's `SO_RCVTIMEO` expires), into a
    /// buffer of `maxPayload` bytes. Descriptors arrive close-on-exec
    /// (`MSG_CMSG_CLOEXEC`); beyond ``maxDescriptors`` they are closed on arrival and
    /// only counted. A message longer than `maxPayload` (on a stream socket: one that
    /// fills the buffer with more bytes already waiting) is refused and every
    /// descriptor received is closed. A server facing untrusted peers reads with
    /// ``receiveWaiting(from:upTo:keeping:)`` instead, into buffers sized to what arrived.
    ///
    /// - Parameters:
    ///   - socket: A connected unix socket.
    ///   - maxPayload: The longest message accepted, in bytes.
    /// - Returns: The payload (empty at end of stream) and the descriptors, which the caller owns.
    /// - Throws: the errno of `recvmsg` (`EAGAIN` when a receive timeout expired), or
    ///   ``UserfaultfdError/Kind/malformed(_:)`` for a truncated message.
    ///
    /// The corresponding C call is `recvmsg(socket, &msg, MSG_CMSG_CLOEXEC)`.
    public static func receiveMessage(from socket: FileDescriptor, maxPayload: Int = 65536) throws(UserfaultfdError) -> ReceivedMessage {
        let chunk = try receive(from: socket, capacity: max(1, maxPayload), flags: 0)
        var truncated = chunk.truncated
        // A stream socket has no message boundary and never sets MSG_TRUNC: a full
        // buffer with more bytes already waiting means the sender's message did not fit.
        if !truncated && chunk.bytes.count == maxPayload && socketType(socket) == SOCK_STREAM.rawValue {
            var next: UInt8 = 0
            truncated = recv(socket.rawValue, &next, 1, Int32(MSG_PEEK | MSG_DONTWAIT)) > 0
        }
        if truncated {
            for fd in chunk.descriptors { try? fd.close() }
            throw UserfaultfdError(operation: "recvmsg SCM_RIGHTS", kind: .malformed(
                "the message was truncated (more than \(maxPayload) bytes or more than \(maxDescriptors) descriptors)"))
        }
        return ReceivedMessage(payload: chunk.bytes, descriptors: chunk.descriptors, descriptorCount: chunk.descriptorCount)
    }

    /// What one non-blocking receive brought.
    public struct ReceivedChunk {
        /// The bytes received; empty at the end of the stream.
        public var bytes: [UInt8]
        /// The descriptors received (close-on-exec); the caller owns them.
        public var descriptors: [FileDescriptor]
        /// How many descriptors arrived, those closed on arrival included.
        public var descriptorCount: Int
        /// Whether the kernel cut the message or its descriptors (`MSG_TRUNC`, `MSG_CTRUNC`).
        public var truncated: Bool
    }

    /// Receives what is waiting on `socket` now, up to `maxBytes`, without blocking,
    /// into a buffer sized to what arrived.
    ///
    /// On a seqpacket socket that is the next message (truncated if longer than
    /// `maxBytes`); on a stream socket, the bytes queued so far. Descriptors beyond
    /// `maxDescriptors` are closed on arrival and only counted.
    /// - Parameters:
    ///   - socket: a unix socket.
    ///   - maxBytes: the most bytes taken.
    ///   - maxDescriptors: the most descriptors kept.
    /// - Returns: what arrived (no bytes at the end of the stream), or nil if nothing is waiting.
    /// - Throws: `UserfaultfdError` with the errno of `recvmsg` or `ioctl(FIONREAD)`.
    public static func receiveWaiting(from socket: FileDescriptor, upTo maxBytes: Int,
                                      keeping maxDescriptors: Int = maxDescriptors) throws(UserfaultfdError) -> ReceivedChunk? {
        let pending = cuffd_socket_pending_bytes(socket.rawValue)
        if pending < 0 { throw UserfaultfdError(operation: "ioctl FIONREAD", errno: currentErrno()) }
        let capacity = max(1, min(Int(pending), maxBytes))
        do {
            return try receive(from: socket, capacity: capacity, flags: Int32(MSG_DONTWAIT), maxDescriptors: maxDescriptors)
        } catch {
            if error.errno == .resourceTemporarilyUnavailable { return nil }
            throw error
        }
    }

    /// Bytes waiting to be read on `socket` (on a seqpacket socket, the next message's length).
    ///
    /// The corresponding C request is `FIONREAD`.
    public static func pendingBytes(of socket: FileDescriptor) throws(UserfaultfdError) -> Int {
        let pending = cuffd_socket_pending_bytes(socket.rawValue)
        if pending < 0 { throw UserfaultfdError(operation: "ioctl FIONREAD", errno: currentErrno()) }
        return Int(pending)
    }

    /// The socket's type (`SOCK_STREAM`, `SOCK_SEQPACKET`...), or -1 if unknown.
    public static func socketType(_ socket: FileDescriptor) -> Int32 {
        var type: Int32 = -1
        var size = socklen_t(MemoryLayout<Int32>.size)
        if getsockopt(socket.rawValue, SOL_SOCKET, SO_TYPE, &type, &size) != 0 { return -1 }
        return type
    }

    private static func receive(from socket: FileDescriptor, capacity: Int, flags: Int32,
                                maxDescriptors: Int = maxDescriptors) throws(UserfaultfdError) -> ReceivedChunk {
        var payload = [UInt8](repeating: 0, count: capacity)
        var fds = [Int32](repeating: -1, count: max(0, maxDescriptors))
        var count: Int32 = 0
        var messageFlags: Int32 = 0
        let n = payload.withUnsafeMutableBytes { bytes in
            fds.withUnsafeMutableBufferPointer {
                cuffd_recv_fds(socket.rawValue, bytes.baseAddress, bytes.count, $0.baseAddress, Int32($0.count),
                               &count, &messageFlags, flags)
            }
        }
        if n < 0 { throw UserfaultfdError(operation: "recvmsg SCM_RIGHTS", errno: currentErrno()) }
        payload.removeSubrange(n...)
        let received = fds.prefix(min(Int(count), fds.count)).map { FileDescriptor(rawValue: $0) }
        let truncated = messageFlags & Int32(MSG_TRUNC | MSG_CTRUNC) != 0
        return ReceivedChunk(bytes: payload, descriptors: received, descriptorCount: Int(count), truncated: truncated)
    }

    /// Receives one message of at most `maxPayload` bytes that must carry exactly one descriptor.
    ///
    /// Descriptors arrive close-on-exec (`MSG_CMSG_CLOEXEC`). If the message carries
    /// no descriptor, several, or was truncated, every descriptor received is closed
    /// and the call throws ``UserfaultfdError/Kind/malformed(_:)`` saying which.
    ///
    /// - Parameters:
    ///   - socket: A connected unix socket.
    ///   - maxPayload: The longest message accepted, in bytes.
    /// - Returns: The payload and the descriptor, which the caller now owns.
    /// - Throws: The errno of `recvmsg`, or ``UserfaultfdError/Kind/malformed(_:)``.
    ///
    /// The corresponding C call is `recvmsg(socket, &msg, MSG_CMSG_CLOEXEC)`.
    public static func receive(from socket: FileDescriptor, maxPayload: Int = 65536) throws(UserfaultfdError) -> (payload: [UInt8], descriptor: FileDescriptor) {
        let message = try receiveMessage(from: socket, maxPayload: maxPayload)
        if message.payload.isEmpty && message.descriptorCount == 0 {
            throw UserfaultfdError(operation: "recvmsg SCM_RIGHTS", kind: .malformed("the peer closed the connection without sending anything"))
        }
        if message.descriptorCount != 1 {
            for fd in message.descriptors { try? fd.close() }
            throw UserfaultfdError(operation: "recvmsg SCM_RIGHTS", kind: .malformed("expected exactly one descriptor, received \(message.descriptorCount)"))
        }
        return (message.payload, message.descriptors[0])
    }

    /// The credentials of the process at the other end of a connected unix socket.
    ///
    /// - Parameter socket: A connected unix socket.
    /// - Returns: The peer's pid, uid and gid as the kernel recorded them at connection time.
    /// - Throws: `UserfaultfdError` for `getsockopt`.
    ///
    /// The corresponding C call is `getsockopt(socket, SOL_SOCKET, SO_PEERCRED, &ucred, &size)`.
    public static func peerCredentials(of socket: FileDescriptor) throws(UserfaultfdError) -> PeerCredentials {
        var pid: Int32 = 0
        var uid: UInt32 = 0
        var gid: UInt32 = 0
        if cuffd_peer_credentials(socket.rawValue, &pid, &uid, &gid) != 0 {
            throw UserfaultfdError(operation: "getsockopt SO_PEERCRED", errno: currentErrno())
        }
        return PeerCredentials(pid: pid, uid: uid, gid: gid)
    }

    /// A connected pair of unix stream sockets (close-on-exec), for tests and for
    /// handing a uffd to a child process.
    ///
    /// - Returns: The two ends; the caller owns both.
    /// - Throws: `UserfaultfdError` for `socketpair`.
    ///
    /// The corresponding C call is `socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds)`.
    public static func socketPair() throws(UserfaultfdError) -> (FileDescriptor, FileDescriptor) {
        var fds: [Int32] = [-1, -1]
        if socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) != 0 {
            throw UserfaultfdError(operation: "socketpair", errno: currentErrno())
        }
        return (FileDescriptor(rawValue: fds[0]), FileDescriptor(rawValue: fds[1]))
    }
}
