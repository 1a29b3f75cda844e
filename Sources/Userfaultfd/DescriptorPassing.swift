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
    /// Descriptors arrive close-on-exec (`MSG_CMSG_CLOEXEC`); beyond
    /// ``maxDescriptors`` they are closed on arrival and only counted. A message
    /// longer than `maxPayload` (on a stream socket: one that fills the buffer with
    /// more bytes already waiting) is refused and every descriptor received is closed.
    ///
    /// - Parameters:
    ///   - socket: A connected unix socket.
    ///   - maxPayload: The longest message accepted, in bytes.
    /// - Returns: The payload (empty at end of stream) and the descriptors, which the caller owns.
    /// - Throws: The errno of `recvmsg` (`EAGAIN` when a receive timeout expired), or
    ///   ``UserfaultfdError/Kind/malformed(_:)`` for a truncated message.
    ///
    /// The corresponding C call is `recvmsg(socket, &msg, MSG_CMSG_CLOEXEC)`.
    public static func receiveMessage(from socket: FileDescriptor, maxPayload: Int = 65536) throws(UserfaultfdError) -> ReceivedMessage {
        var payload = [UInt8](repeating: 0, count: max(1, maxPayload))
        var fds = [Int32](repeating: -1, count: maxDescriptors)
        var count: Int32 = 0
        var truncated: Int32 = 0
        let n = payload.withUnsafeMutableBytes { bytes in
            fds.withUnsafeMutableBufferPointer {
                cuffd_recv_fds(socket.rawValue, bytes.baseAddress, bytes.count, $0.baseAddress, Int32($0.count), &count, &truncated)
            }
        }
        if n < 0 { throw UserfaultfdError(operation: "recvmsg SCM_RIGHTS", errno: currentErrno()) }
        let received = fds.prefix(min(Int(count), fds.count)).map { FileDescriptor(rawValue: $0) }
        if truncated != 0 {
            for fd in received { try? fd.close() }
            throw UserfaultfdError(operation: "recvmsg SCM_RIGHTS", kind: .malformed(
                "the message was truncated (more than \(maxPayload) bytes or more than \(maxDescriptors) descriptors)"))
        }
        payload.removeSubrange(n...)
        return ReceivedMessage(payload: payload, descriptors: received, descriptorCount: Int(count))
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
