import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Accepts a source's connections and reads their hellos side by side, so that no
/// peer can hold the listener.
///
/// Each connection must deliver a complete hello with the right token within the hello
/// timeout. One that does not (silence, a single byte, garbage, another frame, a bad
/// token) is refused: told why when it still reads, closed, and reported through the
/// refusal callback; listening goes on until the accept window ends. At most
/// ``maxPending`` connections are in their handshake at once; over the cap, the oldest
/// is refused. A hello is read into a buffer sized to what its header announces (a few
/// hundred bytes at most), never a preallocated one.
struct HelloAcceptor {
    /// Connections in their handshake at once: a source's stream connections and urgent
    /// channel may all arrive together, with room for as many strangers beside them.
    static let maxPending = 2 * (Wire.maxStreams + 1)

    private struct Pending {
        let connection: Connection
        let deadline: UInt64
        var bytes: [UInt8] = []
    }

    private enum Progress {
        case more
        case refused(MigrationError)
        case hello(Wire.Hello)
    }

    let listener: MigrationListener
    let token: [UInt8]
    let helloTimeoutNanoseconds: UInt64
    let onRefusal: (@Sendable (String) -> Void)?
    /// Why the last connection was refused (nil: none was).
    private(set) var lastRefusal: MigrationError?
    /// Connections refused so far.
    private(set) var refusals = 0
    private var pending: [Pending] = []

    /// An acceptor on `listener` with a destination's token, hello timeout and refusal callback.
    init(_ listener: MigrationListener, _ options: MigrationDestination.Options) {
        self.listener = listener
        token = options.token
        helloTimeoutNanoseconds = UInt64(max(1, options.helloTimeoutMilliseconds)) * 1_000_000
        onRefusal = options.onRefusedConnection
    }

    /// The connections of one source: the urgent channel and its stream connections
    /// (index 0 first, which carries the control frames).
    struct Accepted {
        var hello: Wire.Hello
        var streams: [Connection]
        var urgent: Connection
    }

    /// Accepts connections until the urgent channel and every stream connection of the
    /// same migration have shaken hands, or `deadline` (monotonic nanoseconds) passes: nil then.
    ///
    /// - Parameter check: whether an authentic hello belongs here; the error it returns
    ///   refuses that connection.
    /// - Throws: when the channels of one migration describe different regions or stream
    ///   counts, or the listener fails.
    mutating func acceptAll(
        until deadline: UInt64, check: (Wire.Hello) -> MigrationError?
    ) throws(MigrationError) -> Accepted? {
        // Keyed by stream index; the urgent channel as -1.
        var slots: [Int: (Wire.Hello, Connection)] = [:]
        defer { pending = [] }
        while true {
            let now = MonotonicClock.nanoseconds()
            if now >= deadline { return nil }
            expire(now)
            var fds = [pollfd(fd: listener.fd, events: Int16(POLLIN), revents: 0)]
                + pending.map { pollfd(fd: $0.connection.fd, events: Int16(POLLIN), revents: 0) }
            let wake = min(deadline, pending.map(\.deadline).min() ?? deadline)
            let n = retryOnInterrupt { poll(&fds, nfds_t(fds.count), Int32(clamping: (wake - now + 999_999) / 1_000_000)) }
            if n < 0 { throw systemError("poll listener") }
            for i in stride(from: pending.count - 1, through: 0, by: -1) where fds[i + 1].revents != 0 {
                switch read(i) {
                case .more: break
                case .refused(let error): refuse(pending.remove(at: i).connection, error)
                case .hello(let hello):
                    let connection = pending.remove(at: i).connection
                    if let error = check(hello) { refuse(connection, error); continue }
                    // A newer migration's hello replaces what an older one left.
                    if slots.values.contains(where: { $0.0.migrationID != hello.migrationID }) { slots = [:] }
                    slots[hello.channel == .urgent ? -1 : hello.streamIndex] = (hello, connection)
                }
            }
            if let u = slots[-1], let s = slots[0], slots.count == s.0.streamCount + 1,
               (0..<s.0.streamCount).allSatisfy({ slots[$0] != nil }) {
                let hellos = slots.values.map(\.0)
                if hellos.contains(where: { $0.regionLengths != s.0.regionLengths || $0.pageSize != s.0.pageSize }) {
                    let error = MigrationError(.badRegions("the channels describe different regions"))
                    s.1.sendError(error)
                    throw error
                }
                if hellos.contains(where: { $0.streamCount != s.0.streamCount }) {
                    let error = MigrationError(.malformedFrame("the channels announce different stream counts"))
                    s.1.sendError(error)
                    throw error
                }
                let streams = (0..<s.0.streamCount).map { slots[$0]!.1 }
                return Accepted(hello: s.0, streams: streams, urgent: u.1)
            }
            if fds[0].revents != 0 { try acceptWaiting() }
        }
    }

    private mutating func acceptWaiting() throws(MigrationError) {
        var accepted = 0
        while accepted < Self.maxPending, let connection = try listener.acceptNow() {
            // Its hello timeout runs from now, not from when the wait for it began.
            let now = MonotonicClock.nanoseconds()
            accepted += 1
            if pending.count >= Self.maxPending {
                refuse(pending.removeFirst().connection,
                       MigrationError(.connectionLost("more than \(Self.maxPending) connections in their handshake at once")))
            }
            pending.append(Pending(connection: connection, deadline: now + helloTimeoutNanoseconds))
        }
        // Readable but nothing to accept (out of descriptors, for one): do not spin.
        if accepted == 0 { usleep(10_000) }
    }

    private mutating func expire(_ now: UInt64) {
        for i in stride(from: pending.count - 1, through: 0, by: -1) where pending[i].deadline <= now {
            let p = pending.remove(at: i)
            refuse(p.connection, MigrationError(.connectionLost(
                "no complete hello within \(helloTimeoutNanoseconds / 1_000_000) ms (\(p.bytes.count) bytes arrived)")))
        }
    }

    /// Reads what connection `i` has sent so far, without waiting.
    private mutating func read(_ i: Int) -> Progress {
        let header: Wire.Header?
        do throws(MigrationError) { header = try decodedHeader(pending[i].bytes) } catch { return .refused(error) }
        let wanted = Wire.headerSize + Int(header?.payloadLength ?? 0)
        var chunk = [UInt8](repeating: 0, count: wanted - pending[i].bytes.count)
        let fd = pending[i].connection.fd
        let n = chunk.withUnsafeMutableBytes { raw in retryOnInterrupt { recv(fd, raw.baseAddress, raw.count, Int32(MSG_DONTWAIT)) } }
        if n == 0 {
            return .refused(MigrationError(.connectionLost("closed the connection after \(pending[i].bytes.count) bytes of its hello")))
        }
        if n < 0 {
            if errno == EAGAIN { return .more }
            return .refused(MigrationError(.connectionLost("recv: \(String(cString: strerror(errno)))")))
        }
        pending[i].bytes += chunk[0..<n]
        do throws(MigrationError) {
            guard let header = try decodedHeader(pending[i].bytes) else { return .more }
            if pending[i].bytes.count < Wire.headerSize + Int(header.payloadLength) { return .more }
            let hello = try Wire.Hello.decode(Array(pending[i].bytes[Wire.headerSize...]))
            if !Wire.tokensMatch(hello.token, token) { throw MigrationError(.badToken) }
            return .hello(hello)
        } catch {
            return .refused(error)
        }
    }

    /// The header once its 32 bytes are in; it must be a hello's.
    private func decodedHeader(_ bytes: [UInt8]) throws(MigrationError) -> Wire.Header? {
        if bytes.count < Wire.headerSize { return nil }
        let decoded: Result<Wire.Header, MigrationError> = bytes.withUnsafeBytes { raw in
            Result { () throws(MigrationError) in try Wire.Header.decode(raw.baseAddress!, pageSize: systemPageSize) }
        }
        let header = try decoded.get()
        // The text of an unauthenticated peer's error frame is not worth reading.
        if header.type == .error { throw MigrationError(.malformedFrame("an error frame instead of a hello")) }
        if header.type != .hello { throw MigrationError(.malformedFrame("expected a hello frame, got \(header.type)")) }
        return header
    }

    private mutating func refuse(_ connection: Connection, _ error: MigrationError) {
        connection.sendError(error)
        lastRefusal = error
        refusals += 1
        onRefusal?("refused a connection from \(connection.peerDescription): \(error)")
    }
}
