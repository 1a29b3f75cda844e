import FaultEngine
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
            fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
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
            fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
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
        // it is queued, short (accepted sockets inherit this): with 1 MiB the remote-fault
        // p99 was 2–3 ms, with 4 MiB 5–11 ms, for no gain in throughput.
        var receiveBuffer: Int32 = 256 << 10
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &receiveBuffer, socklen_t(MemoryLayout<Int32>.size))
        if listen(fd, 16) != 0 { let e = systemError("listen"); _ = close(fd); throw e }
        return (fd, bound)
    }

    deinit {
        _ = close(fd)
        if case .unix(let path) = endpoint { _ = unlink(path) }
    }

    /// Accepts one pending connection without waiting (the listener is non-blocking);
    /// nil when none is pending.
    func acceptNow() throws(MigrationError) -> Connection? {
        let c = retryOnInterrupt { Glibc.accept(fd, nil, nil) }
        if c >= 0 {
            // Accepted sockets inherit neither O_NONBLOCK nor FD_CLOEXEC on Linux.
            _ = fcntl(c, F_SETFD, FD_CLOEXEC)
            var one: Int32 = 1
            _ = setsockopt(c, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
            return Connection(fd: c)
        }
        switch errno {
        // A connection that was reset before it was accepted, or none pending.
        case EAGAIN, ECONNABORTED, EPROTO: return nil
        // Out of descriptors or memory: refuse, keep listening.
        case EMFILE, ENFILE, ENOBUFS, ENOMEM: return nil
        default: throw systemError("accept")
        }
    }
}

func systemError(_ operation: String) -> MigrationError {
    MigrationError(.system("\(operation) failed: \(String(cString: strerror(errno))) (errno \(errno))"))
}

func ipv4(host: String, port: UInt16) throws(MigrationError) -> sockaddr_in {
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = port.bigEndian
    let name = host == "localhost" || host.isEmpty ? "127.0.0.1" : host
    if inet_pton(AF_INET, name, &address.sin_addr) != 1 {
        throw MigrationError(.invalidArgument("'\(host)' is not an IPv4 address"))
    }
    return address
}

func unixAddress(_ path: String) throws(MigrationError) -> sockaddr_un {
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

/// Lets the calling thread preempt busy ones when it wakes (SCHED_FIFO, low priority).
///
/// The threads on a remote fault's path (the fault server's handler, both urgent-channel threads) block
/// almost all the time; on a machine whose cores are busy with the workload and the
/// stream, waiting for a time slice would otherwise dominate the fault latency.
/// Without the privilege to do so, nothing changes.
func preferLowLatencyScheduling() {
    DedicatedThread.makeCurrentThreadRealTime(priority: 1)
}
