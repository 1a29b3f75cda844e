import SystemPackage
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Unix stream sockets: listening, accepting, connecting, and receiving a handshake.
enum UnixSocket {
    /// Fills a `sockaddr_un` for `path` and calls `body` with it.
    private static func withAddress<R>(_ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) -> R) throws(UserfaultfdError) -> R {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        if bytes.isEmpty || bytes.count >= capacity {
            throw UserfaultfdError(operation: "socket path", kind: .invalidArgument(
                "\"\(path)\" must be 1 to \(capacity - 1) bytes long"))
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
    }

    private static func newSocket() throws(UserfaultfdError) -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        if fd < 0 { throw UserfaultfdError(operation: "socket AF_UNIX", errno: Errno(rawValue: errno)) }
        return fd
    }

    /// Binds and listens on `path`, replacing a stale socket file there.
    ///
    /// The file is made connectable by every user (mode 0666): who may hand over a
    /// uffd is decided per connection with `SO_PEERCRED`, so that refusals are logged.
    static func listen(at path: String, backlog: Int32 = 64) throws(UserfaultfdError) -> FileDescriptor {
        let fd = try newSocket()
        var st = stat()
        if lstat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFSOCK { unlink(path) }
        let rc = try withAddress(path) { bind(fd, $0, $1) }
        if rc != 0 {
            let e = Errno(rawValue: errno)
            close(fd)
            throw UserfaultfdError(operation: "bind \(path)", errno: e)
        }
        chmod(path, 0o666)
        if Glibc.listen(fd, backlog) != 0 {
            let e = Errno(rawValue: errno)
            close(fd)
            throw UserfaultfdError(operation: "listen \(path)", errno: e)
        }
        return FileDescriptor(rawValue: fd)
    }

    /// Connects to the socket at `path`.
    static func connect(to path: String) throws(UserfaultfdError) -> FileDescriptor {
        let fd = try newSocket()
        let rc: Int32
        do {
            rc = try withAddress(path) { address, length in retryOnInterrupt { Glibc.connect(fd, address, length) } }
        } catch {
            close(fd)
            throw error
        }
        if rc != 0 {
            let e = currentErrno()
            close(fd)
            throw UserfaultfdError(operation: "connect \(path)", errno: e)
        }
        return FileDescriptor(rawValue: fd)
    }

    /// Accepts one connection (close-on-exec); nil if none is pending.
    static func accept(_ listener: FileDescriptor) throws(UserfaultfdError) -> FileDescriptor? {
        let fd = retryOnInterrupt { Glibc.accept(listener.rawValue, nil, nil) }
        if fd >= 0 {
            // accept4 is hidden without _GNU_SOURCE; the daemon never execs, so no fd escapes meanwhile.
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            return FileDescriptor(rawValue: fd)
        }
        let e = currentErrno()
        switch e {
        case .resourceTemporarilyUnavailable, .connectionAbort: return nil
        default: throw UserfaultfdError(operation: "accept", errno: e)
        }
    }

    /// Makes reads and writes on `socket` give up after `seconds`.
    static func setTimeout(_ socket: FileDescriptor, seconds: Double) {
        var tv = timeval(tv_sec: Int(seconds), tv_usec: Int((seconds - Double(Int(seconds))) * 1_000_000))
        _ = setsockopt(socket.rawValue, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        _ = setsockopt(socket.rawValue, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    /// Sends `bytes` if the socket takes them now; never waits, failures are ignored.
    static func sendWithoutBlocking(_ bytes: [UInt8], over socket: FileDescriptor) {
        _ = bytes.withUnsafeBytes { Glibc.send(socket.rawValue, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
    }

    /// Sends all of `bytes`; failures are ignored (the peer may be gone).
    static func sendAll(_ bytes: [UInt8], over socket: FileDescriptor) {
        var offset = 0
        while offset < bytes.count {
            let n = retryOnInterrupt {
                bytes.withUnsafeBytes { Glibc.send(socket.rawValue, $0.baseAddress! + offset, $0.count - offset, Int32(MSG_NOSIGNAL)) }
            }
            if n <= 0 { return }
            offset += n
        }
    }

    /// Reads one line (without its newline), up to `limit` bytes; nil if the peer closed first.
    static func readLine(from socket: FileDescriptor, limit: Int = 65536) throws(UserfaultfdError) -> [UInt8]? {
        var line: [UInt8] = []
        var byte: UInt8 = 0
        while line.count < limit {
            let n = try retryOnInterrupt("read reply") { Glibc.read(socket.rawValue, &byte, 1) }
            if n == 0 { return line.isEmpty ? nil : line }
            if byte == 0x0A { return line }
            line.append(byte)
        }
        return line
    }
}
