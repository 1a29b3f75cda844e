import Synchronization
import Testing
import Userfaultfd
@testable import Postcopy

#if canImport(Glibc)
import Glibc
#endif

/// Raw frames and connections for tests that play a peer, well-behaved or not.
enum Peer {
    static func frame(_ h: Wire.Header) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: Wire.headerSize)
        bytes.withUnsafeMutableBytes { h.encode(into: $0.baseAddress!) }
        return bytes
    }

    static func hello(_ channel: Wire.Channel, token: [UInt8] = token, lengths: [UInt64] = [1 << 20],
                      id: UInt64 = 42, resume: Bool = false) -> [UInt8] {
        let payload = Wire.Hello(channel: channel, resume: resume, pageSize: systemPageSize, migrationID: id,
                                 regionLengths: lengths, token: token).encode()
        return frame(.init(type: .hello, payloadLength: UInt32(payload.count))) + payload
    }

    static func control(_ type: Wire.FrameType, _ payload: [UInt8] = [], count: UInt32 = 0) -> [UInt8] {
        frame(.init(type: type, payloadLength: UInt32(payload.count), count: count)) + payload
    }

    static func send(_ c: Connection, _ bytes: [UInt8]) throws {
        let p = UnsafeMutableRawPointer.allocate(byteCount: max(1, bytes.count), alignment: 8)
        defer { p.deallocate() }
        p.copyMemory(from: bytes, byteCount: bytes.count)
        try c.send(p, bytes.count)
    }

    /// Connects, retrying while nobody listens yet (up to `seconds`).
    static func connect(_ endpoint: MigrationEndpoint, seconds: Double = 10) throws -> Connection {
        let deadline = MonotonicClock.nanoseconds() + UInt64(seconds * 1e9)
        while true {
            do { return try Connection.connect(to: endpoint) } catch {
                if MonotonicClock.nanoseconds() > deadline { throw error }
                usleep(20_000)
            }
        }
    }

    /// Accepts one connection on a listener within `seconds`.
    static func accept(_ listener: MigrationListener, seconds: Double = 10) throws -> Connection {
        var p = pollfd(fd: listener.fd, events: Int16(POLLIN), revents: 0)
        let deadline = MonotonicClock.nanoseconds() + UInt64(seconds * 1e9)
        while MonotonicClock.nanoseconds() < deadline {
            guard poll(&p, 1, 100) > 0 else { continue }
            let fd = Glibc.accept(listener.fd, nil, nil)
            if fd >= 0 { return Connection(fd: fd) }
        }
        throw MigrationError(.connectionLost("no connection to accept"))
    }
}

/// The failure a destination run ended with, if any.
func failure(of run: DestinationRun) -> MigrationError? {
    if let e = run.acceptError { return e }
    if case .failure(let e) = run.result { return e }
    return nil
}

/// A child process with its standard error in a file.
struct ChildProcess {
    let pid: pid_t
    let errorPath: String

    init(_ path: String, _ arguments: [String], environment: [String] = []) throws {
        errorPath = "/tmp/uffd-pc-test-stderr-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 2, errorPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        var env = environment
        var e = environ
        while let entry = e.pointee {
            let s = String(cString: entry)
            if !s.hasPrefix("UFFD_MIGRATE_TOKEN=") { env.append(s) }
            e += 1
        }
        let argv = ([path] + arguments).map { strdup($0) } + [nil]
        let envp = env.map { strdup($0) } + [nil]
        defer { for a in argv + envp { free(a) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, path, &actions, nil, argv, envp)
        try #require(rc == 0, "posix_spawn: \(rc)")
        self.pid = pid
    }

    /// The wait status, or nil if it did not end within `seconds` (it is killed then).
    func wait(seconds: Double) -> Int32? {
        let deadline = MonotonicClock.nanoseconds() + UInt64(seconds * 1e9)
        var status: Int32 = 0
        while MonotonicClock.nanoseconds() < deadline {
            if waitpid(pid, &status, WNOHANG) == pid { return status }
            usleep(20_000)
        }
        kill(pid, SIGKILL)
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        return nil
    }

    var standardError: String {
        guard let f = fopen(errorPath, "r") else { return "" }
        defer { fclose(f); unlink(errorPath) }
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = fread(&buffer, 1, buffer.count, f)
            if n <= 0 { break }
            out += buffer[0..<n]
        }
        return String(decoding: out, as: UTF8.self)
    }
}
