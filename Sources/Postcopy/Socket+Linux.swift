import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Where a migration destination listens and a source connects.
public enum MigrationEndpoint: Sendable, Equatable, CustomStringConvertible {
    /// TCP over IPv4: a dotted address (or `localhost`) and a port (0 on a listener: any free port).
    case tcp(host: String, port: UInt16)
    /// A unix stream socket at a path.
    case unix(path: String)

    /// Parses `host:port`, `tcp:host:port` or `unix:/path`.
    public init?(parsing text: String) {
        if text.hasPrefix("unix:") {
            self = .unix(path: String(text.dropFirst(5)))
            return
        }
        let rest = text.hasPrefix("tcp:") ? String(text.dropFirst(4)) : text
        guard let colon = rest.lastIndex(of: ":"), let port = UInt16(rest[rest.index(after: colon)...]) else { return nil }
        self = .tcp(host: String(rest[..<colon]), port: port)
    }

    public var description: String {
        switch self {
        case .tcp(let host, let port): return "tcp:\(host):\(port)"
        case .unix(let path): return "unix:\(path)"
        }
    }
}

/// A connected stream socket, closed when this object goes away.
final class Connection: @unchecked Sendable {
    let fd: Int32

    init(fd: Int32) { self.fd = fd }
    deinit { _ = close(fd) }

    static func connect(to endpoint: MigrationEndpoint) throws(MigrationError) -> Connection {
        let fd: Int32
        switch endpoint {
        case .tcp(let host, let port):
            fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            if fd < 0 { throw systemError("socket") }
            var address = try ipv4(host: host, port: port)
            let rc = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            if rc != 0 {
                let error = systemError("connect \(endpoint)")
                _ = close(fd)
                throw MigrationError(.connectionLost(error.description))
            }
            var one: Int32 = 1
            _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        case .unix(let path):
            fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            if fd < 0 { throw systemError("socket") }
            var address = try unixAddress(path)
            let rc = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            if rc != 0 {
                let error = systemError("connect \(endpoint)")
                _ = close(fd)
                throw MigrationError(.connectionLost(error.description))
            }
        }
        return Connection(fd: fd)
    }

    /// Sends all of `count` bytes at `p`.
    func send(_ p: UnsafeRawPointer, _ count: Int) throws(MigrationError) {
        var done = 0
        while done < count {
            let n = Glibc.send(fd, p + done, count - done, Int32(MSG_NOSIGNAL))
            if n < 0 {
                if errno == EINTR { continue }
                throw MigrationError(.connectionLost("send: \(String(cString: strerror(errno)))"))
            }
            done += n
        }
    }

    /// Sends a header and its payload (which may live anywhere, e.g. in migrated memory) with one `sendmsg`.
    func send(header: Wire.Header, payload: UnsafeRawPointer?, scratch: UnsafeMutableRawPointer) throws(MigrationError) {
        header.encode(into: scratch)
        let length = Int(header.payloadLength)
        var iov = (iovec(iov_base: scratch, iov_len: Wire.headerSize),
                   iovec(iov_base: UnsafeMutableRawPointer(mutating: payload), iov_len: length))
        var sent = 0
        let total = Wire.headerSize + length
        while sent < total {
            let n: Int = withUnsafeMutableBytes(of: &iov) { raw in
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
                return Glibc.sendmsg(fd, &msg, Int32(MSG_NOSIGNAL))
            }
            if n < 0 {
                if errno == EINTR { continue }
                throw MigrationError(.connectionLost("send: \(String(cString: strerror(errno)))"))
            }
            sent += n
        }
    }

    /// Sends a frame whose payload is a byte array (control frames).
    func send(_ type: Wire.FrameType, payload: [UInt8] = [], count: UInt32 = 0) throws(MigrationError) {
        let total = Wire.headerSize + payload.count
        let frame = UnsafeMutableRawPointer.allocate(byteCount: total, alignment: 8)
        defer { frame.deallocate() }
        Wire.Header(type: type, payloadLength: UInt32(payload.count), count: count).encode(into: frame)
        if !payload.isEmpty { payload.withUnsafeBytes { (frame + Wire.headerSize).copyMemory(from: $0.baseAddress!, byteCount: $0.count) } }
        try send(frame, total)
    }

    /// Receives exactly `count` bytes; throws `connectionLost` at end of stream.
    func receive(into p: UnsafeMutableRawPointer, _ count: Int) throws(MigrationError) {
        var done = 0
        while done < count {
            let n = recv(fd, p + done, count - done, 0)
            if n < 0 {
                if errno == EINTR { continue }
                throw MigrationError(.connectionLost("recv: \(String(cString: strerror(errno)))"))
            }
            if n == 0 {
                // A frame cut short is what a dropped connection looks like: recoverable, not malformed.
                throw MigrationError(.connectionLost(done == 0 ? "the peer closed the connection"
                                                     : "truncated frame: the connection closed after \(done) of \(count) bytes"))
            }
            done += n
        }
    }

    /// Receives one header (validated) into `scratch`.
    func receiveHeader(scratch: UnsafeMutableRawPointer, pageSize: Int) throws(MigrationError) -> Wire.Header {
        try receive(into: scratch, Wire.headerSize)
        return try Wire.Header.decode(scratch, pageSize: pageSize)
    }

    /// Receives one control frame; its payload as bytes.
    func receiveControl(pageSize: Int) throws(MigrationError) -> (Wire.Header, [UInt8]) {
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: Wire.headerSize, alignment: 8)
        defer { scratch.deallocate() }
        let header = try receiveHeader(scratch: scratch, pageSize: pageSize)
        let length = Int(header.payloadLength)
        let raw = UnsafeMutableRawPointer.allocate(byteCount: max(length, 1), alignment: 8)
        defer { raw.deallocate() }
        if length > 0 { try receive(into: raw, length) }
        let payload = [UInt8](UnsafeRawBufferPointer(start: raw, count: length))
        if header.type == .error {
            throw MigrationError.fromWire(payload)
        }
        return (header, payload)
    }

    /// Tells the peer why this side gives up (best effort).
    func sendError(_ error: MigrationError) {
        try? send(.error, payload: error.wirePayload)
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
}

/// A listening socket a destination accepts migration connections on.
public final class MigrationListener: @unchecked Sendable {
    let fd: Int32
    /// The endpoint bound, with the real port when port 0 was asked for.
    public let endpoint: MigrationEndpoint

    /// Binds and listens on `endpoint`. A unix path that exists is replaced.
    public init(_ endpoint: MigrationEndpoint) throws(MigrationError) {
        (fd, self.endpoint) = try Self.bindAndListen(endpoint)
    }

    private static func bindAndListen(_ endpoint: MigrationEndpoint) throws(MigrationError) -> (Int32, MigrationEndpoint) {
        let fd: Int32
        var bound = endpoint
        switch endpoint {
        case .tcp(let host, let port):
            fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            if fd < 0 { throw systemError("socket") }
            var one: Int32 = 1
            _ = setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            var address: sockaddr_in
            do { address = try ipv4(host: host, port: port) } catch { _ = close(fd); throw error }
            let rc = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            if rc != 0 { let e = systemError("bind \(endpoint)"); _ = close(fd); throw e }
            var length = socklen_t(MemoryLayout<sockaddr_in>.size)
            _ = withUnsafeMutablePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
            }
            bound = .tcp(host: host, port: UInt16(bigEndian: address.sin_port))
        case .unix(let path):
            fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            if fd < 0 { throw systemError("socket") }
            var address: sockaddr_un
            do { address = try unixAddress(path) } catch { _ = close(fd); throw error }
            _ = unlink(path)
            let rc = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            if rc != 0 { let e = systemError("bind \(endpoint)"); _ = close(fd); throw e }
        }
        // Small receive buffers keep the stream's backlog, which a page cannot overtake once
        // it is queued, short (accepted sockets inherit this).
        var receiveBuffer: Int32 = 256 << 10
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &receiveBuffer, socklen_t(MemoryLayout<Int32>.size))
        if listen(fd, 16) != 0 { let e = systemError("listen"); _ = close(fd); throw e }
        return (fd, bound)
    }

    deinit {
        _ = close(fd)
        if case .unix(let path) = endpoint { _ = unlink(path) }
    }

    /// Accepts one connection, waiting at most `milliseconds` (-1: forever). Nil on timeout.
    func accept(milliseconds: Int32) throws(MigrationError) -> Connection? {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        while true {
            let n = poll(&p, 1, milliseconds)
            if n < 0 { if errno == EINTR { continue }; throw systemError("poll listener") }
            if n == 0 { return nil }
            let c = Glibc.accept(fd, nil, nil)
            if c < 0 { if errno == EINTR || errno == EAGAIN { continue }; throw systemError("accept") }
            _ = fcntl(c, F_SETFD, FD_CLOEXEC)
            var one: Int32 = 1
            _ = setsockopt(c, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
            return Connection(fd: c)
        }
    }
}

func systemError(_ operation: String) -> MigrationError {
    MigrationError(.system("\(operation) failed: \(String(cString: strerror(errno))) (errno \(errno))"))
}

private func ipv4(host: String, port: UInt16) throws(MigrationError) -> sockaddr_in {
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = port.bigEndian
    let name = host == "localhost" || host.isEmpty ? "127.0.0.1" : host
    if inet_pton(AF_INET, name, &address.sin_addr) != 1 {
        throw MigrationError(.invalidArgument("'\(host)' is not an IPv4 address"))
    }
    return address
}

private func unixAddress(_ path: String) throws(MigrationError) -> sockaddr_un {
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(path.utf8)
    if bytes.isEmpty || bytes.count >= MemoryLayout.size(ofValue: address.sun_path) {
        throw MigrationError(.invalidArgument("unix socket path '\(path)' is empty or longer than 107 bytes"))
    }
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
        raw.copyBytes(from: bytes)
    }
    return address
}

/// Monotonic nanoseconds.
@inline(__always)
func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}

/// Lets the calling thread preempt busy ones when it wakes (SCHED_FIFO, low priority).
///
/// The threads on a remote fault's path (fault thread, both urgent-channel threads) block
/// almost all the time; on a machine whose cores are busy with the workload and the
/// stream, waiting for a time slice would otherwise dominate the fault latency.
/// Without the privilege to do so, nothing changes.
func preferLowLatencyScheduling() {
    DedicatedThread.makeCurrentThreadRealTime(priority: 1)
}
