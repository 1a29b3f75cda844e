#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The command line of the test client.
struct Options {
    enum HandshakeKind: String { case firecracker, native }
    enum BackingKind: String { case memory, attached }
    enum MemoryKind: String { case anonymous, hugetlb }

    var socket = ""
    var image = ""
    var handshake = HandshakeKind.native
    var backing = BackingKind.memory
    /// Guest memory: base pages, or 2 MiB hugetlb pages.
    var memory = MemoryKind.anonymous
    var scenario = "verify"
    /// Bytes of the image to map (default: all of it, rounded down to pages).
    var length: Int?
    /// Run as this user (name or uid) before creating the uffd.
    var asUser: String?
    var touchPercent = 15
    var seed: UInt64 = 42
    var name: String?
    /// The flood scenario: connections held at once, and what they send.
    var connections = 100
    var flood = "silent"
    /// The restore scenarios' pass: a word stored, or loaded, per 4 KiB.
    var pass = "write"

    static let usage = """
        usage: uffd-test-client --socket PATH --image FILE [--handshake firecracker|native]
                                [--backing memory|attached] [--scenario NAME] [--length BYTES]
                                [--as-user USER] [--touch-percent P] [--seed N] [--name NAME]
                                [--memory anonymous|hugetlb]
                                [--connections N --flood silent|churn] [--pass write|read]
        scenarios: verify, fork, remap, remove, unmap, layout, slow, workingset, handover-only,
                   flood (hostile connections: N held silent, or churning garbage until killed),
                   restore (one timed --pass over all memory through the daemon, then checked),
                   restore-file (the same over the image mapped MAP_PRIVATE; no --socket)
        exit status: 0 every byte matched, 1 a byte did not, 2 setup failed, 3 the daemon refused
        """

    static func parse(_ arguments: [String]) -> Options? {
        var o = Options()
        var i = 1
        func value() -> String? {
            i += 1
            return i < arguments.count ? arguments[i] : nil
        }
        while i < arguments.count {
            let flag = arguments[i]
            guard let v = value() else { return nil }
            switch flag {
            case "--socket": o.socket = v
            case "--image": o.image = v
            case "--handshake": guard let h = HandshakeKind(rawValue: v) else { return nil }; o.handshake = h
            case "--backing": guard let b = BackingKind(rawValue: v) else { return nil }; o.backing = b
            case "--scenario": o.scenario = v
            case "--length": guard let n = Int(v) else { return nil }; o.length = n
            case "--as-user": o.asUser = v
            case "--touch-percent": guard let n = Int(v), (1...100).contains(n) else { return nil }; o.touchPercent = n
            case "--seed": guard let n = UInt64(v) else { return nil }; o.seed = n
            case "--name": o.name = v
            case "--connections": guard let n = Int(v), n > 0 else { return nil }; o.connections = n
            case "--flood": guard ["silent", "churn"].contains(v) else { return nil }; o.flood = v
            case "--pass": guard ["write", "read"].contains(v) else { return nil }; o.pass = v
            case "--memory": guard let m = MemoryKind(rawValue: v) else { return nil }; o.memory = m
            default: return nil
            }
            i += 1
        }
        if (o.socket.isEmpty && o.scenario != "restore-file") || o.image.isEmpty { return nil }
        return o
    }
}

/// Prints a line to standard output at once (the tests read it while the client runs).
func say(_ line: String) {
    let bytes = Array((line + "\n").utf8)
    _ = bytes.withUnsafeBytes { write(1, $0.baseAddress, $0.count) }
}

/// Reports a failure and exits with `status`.
func fail(_ status: Int32, _ why: String) -> Never {
    say("FAIL \(why)")
    exit(status)
}

/// Drops to `user` (a name from /etc/passwd or a numeric uid), group first.
func become(_ user: String) {
    var uid: uid_t
    var gid: gid_t
    if let n = UInt32(user) {
        uid = n
        gid = n
    } else {
        guard let pw = getpwnam(user) else { fail(2, "no user \(user)") }
        uid = pw.pointee.pw_uid
        gid = pw.pointee.pw_gid
    }
    if setgroups(0, nil) != 0 || setgid(gid) != 0 || setuid(uid) != 0 {
        fail(2, "cannot become \(user): errno \(errno)")
    }
}

