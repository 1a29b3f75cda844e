/// When the bytes of a handshake on a stream socket are a complete message.
///
/// A stream socket has no message boundaries, and neither Firecracker nor the native
/// client ends its handshake with a delimiter: the message is one JSON value, array or
/// object, complete when its outermost bracket closes. This scans for that point,
/// outside strings and escapes, without decoding anything.
package enum HandshakeFraming {
    /// The outcome of scanning the bytes received so far.
    package enum Scan: Equatable {
        /// More bytes are needed.
        case incomplete
        /// The first `length` bytes are one complete JSON value (what follows is not part of it).
        case complete(length: Int)
        /// The bytes cannot begin a handshake: hand them to the decoder for its reason.
        case notJSON
    }

    /// Scans `bytes` for the end of the first top-level JSON array or object.
    package static func scan(_ bytes: some Collection<UInt8>) -> Scan {
        var depth = 0
        var inString = false
        var escaped = false
        var started = false
        var length = 0
        for byte in bytes {
            length += 1
            if inString {
                if escaped {
                    escaped = false
                } else if byte == UInt8(ascii: "\\") {
                    escaped = true
                } else if byte == UInt8(ascii: "\"") {
                    inString = false
                }
                continue
            }
            switch byte {
            case 0x20, 0x0A, 0x0D, 0x09:
                continue
            case UInt8(ascii: "["), UInt8(ascii: "{"):
                started = true
                depth += 1
            case UInt8(ascii: "]"), UInt8(ascii: "}"):
                if !started { return .notJSON }
                depth -= 1
                if depth == 0 { return .complete(length: length) }
            case UInt8(ascii: "\""):
                if !started { return .notJSON }
                inString = true
            default:
                if !started { return .notJSON }
            }
        }
        return .incomplete
    }
}
