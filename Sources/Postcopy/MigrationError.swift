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
        case .recoveryTimedOut(let n): return "the connection dropped and was not recovered in time; \(n) pages that can never arrive were poisoned"
        case .peer(let why): return "the peer gave up: \(why)"
        case .system(let why): return why
        case .invalidArgument(let why): return "invalid argument: \(why)"
        }
    }
}
