import SystemPackage
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Reads one handshake from a connection: accumulates until the message is complete,
/// the size limit is passed or the deadline expires, on stream and seqpacket sockets.
///
/// Nothing is allocated ahead of what arrived: each read takes what the kernel holds
/// (`FIONREAD`), so a silent or slow peer costs no buffer.
struct HandshakeReader {
    /// The longest message accepted, in bytes.
    var limit: Int
    /// When the whole handshake must have arrived.
    var deadline: ContinuousClock.Instant

    /// The message and the descriptors that came with it (the caller owns them).
    struct Message {
        var body: [UInt8]
        var descriptors: [FileDescriptor]
        /// Descriptors that arrived, those beyond ``DescriptorPassing/maxDescriptors`` (closed) included.
        var descriptorCount: Int
    }

    /// Reads the handshake on `socket`.
    ///
    /// - Throws: ``HandshakeError`` (every descriptor received is closed then).
    func read(from socket: FileDescriptor) throws(HandshakeError) -> Message {
        var message = Message(body: [], descriptors: [], descriptorCount: 0)
        do {
            try accumulate(from: socket, into: &message, seqpacket: DescriptorPassing.socketType(socket) == SOCK_SEQPACKET.rawValue)
        } catch {
            for fd in message.descriptors { try? fd.close() }
            throw error
        }
        return message
    }

    private func accumulate(from socket: FileDescriptor, into message: inout Message, seqpacket: Bool) throws(HandshakeError) {
        while true {
            try waitReadable(socket, received: message.body.count)
            // On a stream, one byte past the limit tells an over-long message from one of exactly the limit.
            let room = seqpacket ? limit : limit - message.body.count + 1
            if seqpacket, let pending = try? DescriptorPassing.pendingBytes(of: socket), pending > limit {
                throw .invalidMessage("the message is \(pending) bytes, longer than the limit of \(limit) bytes")
            }
            let chunk: DescriptorPassing.ReceivedChunk?
            do {
                chunk = try DescriptorPassing.receiveWaiting(
                    from: socket, upTo: room, keeping: DescriptorPassing.maxDescriptors - message.descriptors.count)
            } catch {
                throw .connection("recvmsg failed: \(Self.describe(error))")
            }
            guard let chunk else { continue }
            message.descriptors += chunk.descriptors
            message.descriptorCount += chunk.descriptorCount
            if chunk.truncated {
                throw .invalidMessage("the message was truncated (longer than \(limit) bytes, or more than \(DescriptorPassing.maxDescriptors) descriptors)")
            }
            if chunk.bytes.isEmpty {
                if message.body.isEmpty { throw .connection("the peer closed the connection without sending a handshake") }
                throw .connection("the peer closed the connection after \(message.body.count) bytes of an incomplete handshake")
            }
            message.body += chunk.bytes
            if message.body.count > limit {
                throw .invalidMessage("the message is longer than the limit of \(limit) bytes")
            }
            if seqpacket { return }
            switch HandshakeFraming.scan(message.body) {
            case .incomplete: continue
            case .complete, .notJSON: return
            }
        }
    }

    /// The errno of a failed receive, or the whole error. Kept out of line: inlined into
    /// `accumulate`'s catch block, the release build's ownership verifier rejects it (Swift 6.3.1).
    @inline(never)
    private static func describe(_ error: UserfaultfdError) -> String {
        error.errno.map { "\($0)" } ?? "\(error)"
    }

    /// Waits until `socket` is readable or the deadline passes.
    ///
    /// Its own loop rather than `retryOnInterrupt`: after an interruption the timeout is
    /// recomputed from the deadline, so that signals cannot stretch the wait.
    private func waitReadable(_ socket: FileDescriptor, received: Int) throws(HandshakeError) {
        while true {
            let left = deadline - ContinuousClock.now
            if left <= .zero {
                throw .connection(received == 0 ? "no handshake arrived in time"
                    : "the handshake was incomplete when its time ran out (\(received) bytes received)")
            }
            let ms = Int32(clamping: left.components.seconds * 1000 + left.components.attoseconds / 1_000_000_000_000_000 + 1)
            var p = pollfd(fd: socket.rawValue, events: Int16(POLLIN), revents: 0)
            let n = poll(&p, 1, ms)
            if n > 0 { return }
            if n < 0 && errno != EINTR { throw .connection("poll failed: errno \(errno)") }
        }
    }
}
