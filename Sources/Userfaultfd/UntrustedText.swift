/// Text another process sent, made safe for a log line or a terminal.
///
/// A peer's bytes never reach a log raw: a newline would forge a log line, an escape
/// sequence would drive the reader's terminal, and a megabyte would flood both.
/// Printable ASCII is kept; a backslash, a double quote, every control byte and every
/// byte above 0x7E becomes an escape (`\n`, `\t`, `\r`, `\\`, `\"`, `\xNN`); past the
/// limit the text is cut and the number of bytes left out is said.
///
/// ```swift
/// logger.warning("bad protocol \"\(UntrustedText(peerBytes))\"")
/// ```
public struct UntrustedText: Sendable, Hashable, CustomStringConvertible {
    /// The most bytes of the original kept by default.
    public static let defaultLimit = 200

    /// The escaped, capped text: printable ASCII only.
    public let description: String

    /// Escapes and caps `bytes`.
    ///
    /// - Parameters:
    ///   - bytes: what the peer sent.
    ///   - limit: the most bytes of `bytes` kept before the text is cut.
    public init(_ bytes: some Collection<UInt8>, limit: Int = UntrustedText.defaultLimit) {
        var out: [UInt8] = []
        out.reserveCapacity(min(bytes.count, max(0, limit)) + 16)
        var kept = 0
        for byte in bytes {
            if kept == max(0, limit) { break }
            kept += 1
            Self.append(byte, to: &out)
        }
        var text = String(decoding: out, as: UTF8.self)
        if kept < bytes.count { text += "...(\(bytes.count - kept) more bytes)" }
        description = text
    }

    /// Escapes and caps a string (its UTF-8 bytes).
    public init(_ text: String, limit: Int = UntrustedText.defaultLimit) {
        self.init(Array(text.utf8), limit: limit)
    }

    private static func append(_ byte: UInt8, to out: inout [UInt8]) {
        let backslash = UInt8(ascii: "\\")
        switch byte {
        case UInt8(ascii: "\n"): out += [backslash, UInt8(ascii: "n")]
        case UInt8(ascii: "\r"): out += [backslash, UInt8(ascii: "r")]
        case UInt8(ascii: "\t"): out += [backslash, UInt8(ascii: "t")]
        case backslash, UInt8(ascii: "\""): out += [backslash, byte]
        case 0x20...0x7E: out.append(byte)
        default:
            let digits = Array("0123456789abcdef".utf8)
            out += [backslash, UInt8(ascii: "x"), digits[Int(byte >> 4)], digits[Int(byte & 0xF)]]
        }
    }
}
