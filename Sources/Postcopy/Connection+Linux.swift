import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A connected stream socket, closed when this object goes away.
///
/// Every send and receive waits for at most ``deadline`` (an absolute time) and makes
/// progress at least every ``stallNanoseconds``: a peer that stops reading or writing
/// mid-frame, or sends one byte and nothing more, costs a bounded wait and ends in
/// `connectionLost`. Only the wait for the first byte of a header may be exempted from
/// the stall limit (a channel that is quiet by design), never from the deadline.
final class Connection: @unchecked Sendable {
    let fd: Int32
    /// Monotonic nanoseconds after which every send and receive fails (`.max`: none).
    var deadline: UInt64 = .max
    /// The longest a send or receive may wait without moving a byte (`.max`: forever).
    ///
    /// Without a deadline, sends and receives block in the kernel (the fast path of a
    /// running migration) and this limit is the socket's SO_SNDTIMEO/SO_RCVTIMEO; with a
    /// deadline they poll.
    var stallNanoseconds: UInt64 = .max {
        didSet {
            let limit = stallNanoseconds == .max ? 0 : max(1_000, stallNanoseconds / 1_000)
            var t = timeval(tv_sec: Int(limit / 1_000_000), tv_usec: Int(limit % 1_000_000))
            _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &t, socklen_t(MemoryLayout<timeval>.size))
            _ = setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &t, socklen_t(MemoryLayout<timeval>.size))
        }
    }

    /// Flags for a send or receive: non-blocking when a deadline must be polled for.
    private var waitFlags: Int32 { deadline == .max ? 0 : Int32(MSG_DONTWAIT) }

    /// After EAGAIN: past a blocking call it means the stall limit passed; otherwise poll.
    private func waitAfterAgain(_ events: Int16, quietAllowed: Bool, doing what: String) throws(MigrationError) {
        if deadline != .max { return try wait(events, quietAllowed: quietAllowed, doing: what) }
        if quietAllowed { return }
        throw MigrationError(.connectionLost("\(what): the peer made no progress for \(stallNanoseconds / 1_000_000) ms"))
    }

    /// Zero-copy sending: whether it is on, and its counts (see `ZeroCopy+Linux.swift`).
    var zeroCopy = ZeroCopyState()

    init(fd: Int32) { self.fd = fd }
    deinit { _ = close(fd) }

    /// Connects to `endpoint`, giving up at `deadline` (monotonic nanoseconds).
    static func connect(to endpoint: MigrationEndpoint, deadline: UInt64 = .max) throws(MigrationError) -> Connection {
        let family = { if case .unix = endpoint { return AF_UNIX } else { return AF_INET } }()
        let fd = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        if fd < 0 { throw systemError("socket") }
        let connection = Connection(fd: fd)
        connection.deadline = deadline
        var rc: Int32
        switch endpoint {
        case .tcp(let host, let port):
            var address = try ipv4(host: host, port: port)
            rc = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
        case .unix(let path):
            var address = try unixAddress(path)
            rc = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
        }
        // EAGAIN from a unix socket means its listener's backlog is full: a refusal, to retry.
        if rc != 0 && errno != EINPROGRESS {
            throw MigrationError(.connectionLost("connect \(endpoint): \(String(cString: strerror(errno)))"))
        }
        if rc != 0 {
            try connection.wait(Int16(POLLOUT), quietAllowed: true, doing: "connect \(endpoint)")
            var error: Int32 = 0
            var length = socklen_t(MemoryLayout<Int32>.size)
            _ = getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length)
            if error != 0 { throw MigrationError(.connectionLost("connect \(endpoint): \(String(cString: strerror(error)))")) }
        }
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK)
        if case .tcp = endpoint {
            var one: Int32 = 1
            _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        }
        return connection
    }

    /// Waits until `events` are ready on the socket, within the deadline and (unless
    /// `quietAllowed`) the stall limit.
    func wait(_ events: Int16, quietAllowed: Bool, doing what: @autoclosure () -> String) throws(MigrationError) {
        while true {
            let now = MonotonicClock.nanoseconds()
            if now >= deadline { throw MigrationError(.connectionLost("\(what()): timed out")) }
            let untilDeadline = deadline == .max ? UInt64.max : deadline - now
            let stall = quietAllowed ? UInt64.max : stallNanoseconds
            let limit = min(untilDeadline, stall)
            let milliseconds = limit == .max ? -1 : Int32(clamping: (limit + 999_999) / 1_000_000)
            var p = pollfd(fd: fd, events: events, revents: 0)
            let n = retryOnInterrupt { poll(&p, 1, milliseconds) }
            if n > 0 { return }
            if n < 0 {
                throw MigrationError(.connectionLost("\(what()): poll: \(String(cString: strerror(errno)))"))
            }
            if stall < untilDeadline {
                throw MigrationError(.connectionLost("\(what()): the peer made no progress for \(stall / 1_000_000) ms"))
            }
        }
    }

    /// Sends all of `count` bytes at `p`.
    func send(_ p: UnsafeRawPointer, _ count: Int) throws(MigrationError) {
        var done = 0
        while done < count {
            let n = retryOnInterrupt { Glibc.send(fd, p + done, count - done, Int32(MSG_NOSIGNAL) | waitFlags) }
            if n >= 0 { done += n; continue }
            if errno == EAGAIN { try waitAfterAgain(Int16(POLLOUT), quietAllowed: false, doing: "send"); continue }
            throw MigrationError(.connectionLost("send: \(String(cString: strerror(errno)))"))
        }
    }

    /// Sends a header and its payload (which may live anywhere, e.g. in migrated memory) with one `sendmsg`.
    func send(header: Wire.Header, payload: UnsafeRawPointer?, scratch: UnsafeMutableRawPointer) throws(MigrationError) {
        header.encode(into: scratch)
        let length = Int(header.payloadLength)
        if zeroCopy.enabled && length >= ZeroCopyState.smallestPayload, let payload {
            return try sendZeroCopy(header: scratch, payload: payload, length: length)
        }
        var iov = (iovec(iov_base: scratch, iov_len: Wire.headerSize),
                   iovec(iov_base: UnsafeMutableRawPointer(mutating: payload), iov_len: length))
        var sent = 0
        let total = Wire.headerSize + length
        let flags = waitFlags
        while sent < total {
            let n: Int = retryOnInterrupt {
                withUnsafeMutableBytes(of: &iov) { raw in
                    let v = raw.baseAddress!.assumingMemoryBound(to: iovec.self)
                    var msg = msghdr()
                    if sent < Wire.headerSize {
                        v[0].iov_base = scratch + sent
                        v[0].iov_len = Wire.headerSize - sent
                        msg.msg_iov = v
                        msg.msg_iovlen = length > 0 ? 2 : 1
                    } else {
                        v[1].iov_base = UnsafeMutableRawPointer(mutating: payload!) + (sent - Wire.headerSize)
                        v[1].iov_len = total - sent
                        msg.msg_iov = v + 1
                        msg.msg_iovlen = 1
                    }
                    return Glibc.sendmsg(fd, &msg, Int32(MSG_NOSIGNAL) | flags)
                }
            }
            if n >= 0 { sent += n; continue }
            if errno == EAGAIN { try waitAfterAgain(Int16(POLLOUT), quietAllowed: false, doing: "send"); continue }
            throw MigrationError(.connectionLost("send: \(String(cString: strerror(errno)))"))
        }
    }

    /// Sends `bytes` bytes gathered from `count` vectors (which it may change) with as few
    /// `sendmsg` calls as the kernel allows.
    func send(_ vectors: UnsafeMutablePointer<iovec>, count: Int, bytes: Int) throws(MigrationError) {
        var first = 0
        var left = bytes
        let flags = waitFlags
        while left > 0 {
            var msg = msghdr()
            msg.msg_iov = vectors + first
            msg.msg_iovlen = count - first
            let n = retryOnInterrupt { Glibc.sendmsg(fd, &msg, Int32(MSG_NOSIGNAL) | flags) }
            if n < 0 {
                if errno == EAGAIN { try waitAfterAgain(Int16(POLLOUT), quietAllowed: false, doing: "send"); continue }
                throw MigrationError(.connectionLost("send: \(String(cString: strerror(errno)))"))
            }
            left -= n
            // Skip what went out; the vector cut in the middle starts where the kernel stopped.
            var sent = n
            while first < count && sent >= vectors[first].iov_len {
                sent -= vectors[first].iov_len
                first += 1
            }
            if sent > 0 {
                vectors[first].iov_base += sent
                vectors[first].iov_len -= sent
            }
        }
    }

    /// Sends a frame whose payload is a byte array (control frames).
    func send(_ type: Wire.FrameType, payload: [UInt8] = [], count: UInt32 = 0) throws(MigrationError) {
        let frame = Self.frame(type, payload: payload, count: count)
        let sent: Result<Void, MigrationError> = frame.withUnsafeBytes { raw in
            Result { () throws(MigrationError) in try send(raw.baseAddress!, raw.count) }
        }
        try sent.get()
    }

    static func frame(_ type: Wire.FrameType, payload: [UInt8] = [], count: UInt32 = 0) -> [UInt8] {
        var frame = [UInt8](repeating: 0, count: Wire.headerSize)
        frame.withUnsafeMutableBytes {
            Wire.Header(type: type, payloadLength: UInt32(payload.count), count: count).encode(into: $0.baseAddress!)
        }
        return frame + payload
    }

    /// Receives exactly `count` bytes; throws `connectionLost` at end of stream, past the
    /// deadline, or when the peer stalls. `quietAllowed`: waiting for the first byte is
    /// exempt from the stall limit.
    func receive(into p: UnsafeMutableRawPointer, _ count: Int, quietAllowed: Bool = false) throws(MigrationError) {
        var done = 0
        while done < count {
            // Blocking: one wake-up for the whole frame rather than one per segment.
            let n = retryOnInterrupt { recv(fd, p + done, count - done, waitFlags == 0 ? Int32(MSG_WAITALL) : waitFlags) }
            if n > 0 { done += n; continue }
            if n == 0 {
                // A frame cut short is what a dropped connection looks like: recoverable, not malformed.
                throw MigrationError(.connectionLost(done == 0 ? "the peer closed the connection"
                                                     : "truncated frame: the connection closed after \(done) of \(count) bytes"))
            }
            if errno == EAGAIN {
                try waitAfterAgain(Int16(POLLIN), quietAllowed: quietAllowed && done == 0, doing: "receive")
                continue
            }
            throw MigrationError(.connectionLost("recv: \(String(cString: strerror(errno)))"))
        }
    }

    /// Receives one header (validated) into `scratch`.
    func receiveHeader(scratch: UnsafeMutableRawPointer, pageSize: Int, quietAllowed: Bool = false) throws(MigrationError) -> Wire.Header {
        try receive(into: scratch, Wire.headerSize, quietAllowed: quietAllowed)
        return try Wire.Header.decode(scratch, pageSize: pageSize)
    }

    /// Receives a payload of `length` bytes as an array.
    func receivePayload(_ length: Int) throws(MigrationError) -> [UInt8] {
        var payload = [UInt8](repeating: 0, count: length)
        if length > 0 {
            let received: Result<Void, MigrationError> = payload.withUnsafeMutableBytes { raw in
                Result { () throws(MigrationError) in try receive(into: raw.baseAddress!, length) }
            }
            try received.get()
        }
        return payload
    }

    /// Receives one control frame; its payload as bytes. An ERROR frame is thrown as the
    /// error it reports (its text escaped and shortened).
    func receiveControl(pageSize: Int) throws(MigrationError) -> (Wire.Header, [UInt8]) {
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: Wire.headerSize, alignment: 8)
        defer { scratch.deallocate() }
        let header = try receiveHeader(scratch: scratch, pageSize: pageSize)
        let payload = try receivePayload(Int(header.payloadLength))
        if header.type == .error { throw MigrationError.fromWire(payload) }
        return (header, payload)
    }

    /// Tells the peer why this side gives up: best effort, never blocks (a peer that does
    /// not read does not get it).
    func sendError(_ error: MigrationError) {
        let frame = Self.frame(.error, payload: error.wirePayload)
        _ = frame.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
    }

    /// Caps the kernel's send buffer: bytes queued here delay whatever is sent after them.
    func limitSendBuffer(_ bytes: Int) {
        var value = Int32(clamping: bytes)
        _ = setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &value, socklen_t(MemoryLayout<Int32>.size))
    }

    /// Ends both directions: a thread blocked in `recv` on it returns.
    func shutdown() { _ = Glibc.shutdown(fd, Int32(SHUT_RDWR)) }

    /// Waits until data can be read, up to `milliseconds`.
    func waitReadable(milliseconds: Int32) -> Bool {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        return poll(&p, 1, milliseconds) > 0
    }

    /// The peer's address, for log lines ("10.0.0.2:41234", "unix").
    var peerDescription: String {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let rc = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &length) }
        }
        guard rc == 0 else { return "an unknown peer" }
        if Int32(storage.ss_family) == AF_UNIX { return "a unix socket peer" }
        guard Int32(storage.ss_family) == AF_INET else { return "a peer" }
        return withUnsafePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { a in
                var text = [CChar](repeating: 0, count: Int(INET_ADDRSTRLEN))
                var address = a.pointee.sin_addr
                _ = inet_ntop(AF_INET, &address, &text, socklen_t(text.count))
                let host = String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
                return "\(host):\(UInt16(bigEndian: a.pointee.sin_port))"
            }
        }
    }
}
