import Userfaultfd

/// A failed migration: what went wrong, in words a log line can carry.
public struct MigrationError: Error, Equatable, Sendable, CustomStringConvertible {
    /// What kind of failure this is.
    public enum Kind: Equatable, Sendable {
        /// The peer's token did not match (or none was configured).
        case badToken
        /// The peer speaks a protocol version this side does not.
        case unsupportedVersion(UInt8)
        /// A frame did not have the expected shape: bad magic, unknown type, bad length, truncated.
        case malformedFrame(String)
        /// A frame named an address or length outside the described regions.
        case outOfRange(String)
        /// The handshake described regions this side refuses (size, page size, count).
        case badRegions(String)
        /// The connection closed or failed.
        case connectionLost(String)
        /// A dropped connection was not re-established within the recovery timeout.
        /// Pages that could never arrive were poisoned.
        case recoveryTimedOut(poisonedPages: Int)
        /// The peer reported an error and gave up.
        case peer(String)
        /// A system call failed.
        case system(String)
        /// A bad argument or option.
        case invalidArgument(String)
    }

    /// What went wrong.
    public var kind: Kind

    public init(_ kind: Kind) { self.kind = kind }

    init(_ error: UserfaultfdError) { self.kind = .system(error.description) }

    public var description: String {
        switch kind {
        case .badToken: return "migration refused: the peer's token does not match"
        case .unsupportedVersion(let v): return "migration refused: unsupported protocol version \(v) (this side speaks \(Wire.version))"
        case .malformedFrame(let why): return "malformed frame: \(why)"
        case .outOfRange(let why): return "frame out of range: \(why)"
        case .badRegions(let why): return "regions refused: \(why)"
        case .connectionLost(let why): return "connection lost: \(why)"
        case .recoveryTimedOut(let n):
            return "the connection dropped and was not recovered in time; "
                + (n > 0 ? "\(n) pages that can never arrive were poisoned" : "pages that never arrived are lost")
        case .peer(let why): return "the peer gave up: \(why)"
        case .system(let why): return why
        case .invalidArgument(let why): return "invalid argument: \(why)"
        }
    }
}

extension MigrationError {
    /// An ERROR frame's payload: a kind code, then the text.
    var wirePayload: [UInt8] {
        let code: UInt8
        switch kind {
        case .badToken: code = 1
        case .unsupportedVersion: code = 2
        case .malformedFrame: code = 3
        case .outOfRange: code = 4
        case .badRegions: code = 5
        default: code = 0
        }
        return [code] + Array(description.utf8.prefix(1024))
    }

    /// The error a peer reported in an ERROR frame, as seen from this side. The peer's
    /// text is escaped and shortened: it may end up in a log or on a terminal.
    static func fromWire(_ payload: [UInt8]) -> MigrationError {
        let text = UntrustedText(payload.dropFirst()).description
        switch payload.first {
        case 1: return MigrationError(.badToken)
        case 2: return MigrationError(.peer(text))
        case 3: return MigrationError(.peer(text))
        case 4: return MigrationError(.peer(text))
        case 5: return MigrationError(.badRegions(text))
        default: return MigrationError(.peer(text))
        }
    }
}
