import Userfaultfd
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// A source's connections: connecting, resuming after a drop, and the control
// frames it waits for.
extension MigrationSource {
    /// A source's connections: the stream connections (the first carries the control
    /// frames) and the urgent channel.
    struct Channels {
        var streams: [Connection]
        var urgent: Connection
        var stream: Connection { streams[0] }
        var all: [Connection] { streams + [urgent] }
    }

    func connectAll(_ endpoint: MigrationEndpoint, id: UInt64, resume: Bool,
                    until deadline: UInt64) throws(MigrationError) -> Channels {
        let count = options.streamConnections
        func hello(_ channel: Wire.Channel, _ index: Int) -> [UInt8] {
            Wire.Hello(channel: channel, resume: resume, pageSize: table.pageSize, migrationID: id,
                       regionLengths: regions.map(\.length), token: options.token,
                       streamIndex: index, streamCount: count).encode()
        }
        var streams: [Connection] = []
        for i in 0..<count {
            let stream = try Connection.connect(to: endpoint, deadline: deadline)
            // The bytes queued ahead of a requested page the stream already took are the
            // sum over the connections: split the budget between them.
            stream.limitSendBuffer(max(16 << 10, options.streamBufferBytes / count))
            if options.zeroCopy { try stream.enableZeroCopy() }
            try stream.send(.hello, payload: hello(.stream, i))
            streams.append(stream)
        }
        let urgent = try Connection.connect(to: endpoint, deadline: deadline)
        try urgent.send(.hello, payload: hello(.urgent, 0))
        let bitmap = try expect(.welcome, on: streams[0])
        for c in streams.dropFirst() + [urgent] { try expect(.welcome, on: c) }
        if resume { try adoptBitmap(bitmap) }
        let channels = Channels(streams: streams, urgent: urgent)
        for c in channels.all {
            c.deadline = .max
            c.stallNanoseconds = UInt64(max(1, options.stallTimeoutMilliseconds)) * 1_000_000
        }
        return channels
    }

    /// Reconnects after a drop, within the recovery timeout.
    func reconnect(_ endpoint: MigrationEndpoint, id: UInt64) throws(MigrationError) -> Channels {
        let deadline = MonotonicClock.nanoseconds() + UInt64(max(0, options.recoveryTimeoutMilliseconds)) * 1_000_000
        var last = MigrationError(.connectionLost("no attempt to reconnect was made"))
        while MonotonicClock.nanoseconds() < deadline {
            do throws(MigrationError) {
                return try connectAll(endpoint, id: id, resume: true, until: deadline)
            } catch {
                switch error.kind {
                // The destination may refuse a hello that a stalled path delivered late
                // (the reason comes as a peer error): try again while time remains.
                case .connectionLost, .peer: last = error
                default: throw error
                }
            }
            usleep(20_000)
        }
        throw MigrationError(.connectionLost("could not resume within \(options.recoveryTimeoutMilliseconds) ms: \(last)"))
    }

    /// Rebuilds the missing bitmap from what the destination says it has.
    private func adoptBitmap(_ bitmap: [UInt8]) throws(MigrationError) {
        let expected = table.regions.reduce(0) { $0 + ($1.pages + 7) / 8 }
        if bitmap.count != expected {
            throw MigrationError(.malformedFrame("the received bitmap has \(bitmap.count) bytes, not \(expected)"))
        }
        var offset = 0
        for r in table.regions {
            for p in 0..<r.pages {
                if bitmap[offset + p >> 3] & (1 << UInt8(p & 7)) != 0 {
                    missing.testAndClear(r.firstGlobal + p)
                } else {
                    missing.testAndSet(r.firstGlobal + p)
                }
            }
            offset += (r.pages + 7) / 8
        }
    }

    /// Receives the control frame the protocol expects next; its payload.
    @discardableResult
    func expect(_ type: Wire.FrameType, on connection: Connection) throws(MigrationError) -> [UInt8] {
        let (header, payload) = try connection.receiveControl(pageSize: table.pageSize)
        if header.type != type { throw MigrationError(.malformedFrame("expected \(type), got \(header.type)")) }
        return payload
    }
}
