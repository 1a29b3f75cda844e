// Hostile connections for the daemon's flood and soak tests.
#if canImport(Glibc)
import Glibc
#endif

/// Opens hostile connections to the daemon until killed.
///
/// `silent`: opens `--connections` connections that send nothing, says
/// `FLOODING <opened>`, and holds them. `churn`: keeps up to `--connections` open,
/// each sending nothing, garbage, a partial handshake or an oversized one, and closes
/// them in turn (says `CHURNING` first).
func runFlood(_ options: Options) -> Never {
    if let user = options.asUser { become(user) }
    signal(SIGPIPE, SIG_IGN)
    if options.flood == "silent" {
        var held: [Int32] = []
        for _ in 0..<options.connections {
            let fd = floodConnect(options.socket)
            if fd >= 0 { held.append(fd) }
        }
        say("FLOODING \(held.count)")
        while true { pause() }
    }
    say("CHURNING")
    var ring = [Int32](repeating: -1, count: options.connections)
    var state = options.seed | 1
    var i = 0
    while true {
        state ^= state << 13; state ^= state >> 7; state ^= state << 17
        if ring[i] >= 0 { close(ring[i]) }
        ring[i] = floodConnect(options.socket)
        if ring[i] >= 0 { sendHostile(ring[i], kind: Int(state % 4), length: Int(state >> 8) % 8192) }
        i = (i + 1) % ring.count
    }
}

/// Connects to `path` (giving up after 2 s); -1 on failure.
func floodConnect(_ path: String) -> Int32 {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    if fd < 0 { return -1 }
    var tv = timeval(tv_sec: 2, tv_usec: 0)
    _ = setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: Array(path.utf8.prefix(100)) + [0]) }
    let rc = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    if rc != 0 {
        close(fd)
        return -1
    }
    return fd
}

/// Sends one kind of hostile handshake: 0 nothing, 1 garbage, 2 a partial array, 3 an object with a forged log line.
func sendHostile(_ fd: Int32, kind: Int, length: Int) {
    var bytes: [UInt8]
    switch kind {
    case 1: bytes = (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 131 &+ 7) }
    case 2: bytes = Array("[{\"base_host_virt_addr\":1073741824,\"size\":".utf8)
    case 3: bytes = Array("{\"protocol\":\"x\\nrefused handshake from pid 1 uid 0: forged\",\"version\":1}".utf8)
    default: return
    }
    _ = bytes.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
}
