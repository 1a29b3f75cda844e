/// Text a peer sent, made safe for a log line or a terminal.
///
/// Printable ASCII stays as it is (backslash doubled); everything else (newlines,
/// escape sequences, other control bytes, any byte above 0x7E) becomes `\xNN`, so
/// the result is one line that cannot move the cursor or forge another log line. At
/// most `limit` bytes of the input are shown; the rest is counted, not copied.
enum UntrustedText {
    /// The most bytes of peer text a log line or error message shows.
    static let defaultLimit = 200

    static func escaped<Bytes: Collection<UInt8>>(_ bytes: Bytes, limit: Int = defaultLimit) -> String {
        var out = ""
        out.reserveCapacity(Swift.min(bytes.count, limit) + 16)
        var shown = 0
        for byte in bytes.prefix(limit) {
            shown += 1
            switch byte {
            case UInt8(ascii: "\\"): out += "\\\\"
            case 0x20...0x7E: out.unicodeScalars.append(Unicode.Scalar(byte))
            default:
                let hex = String(byte, radix: 16)
                out += "\\x" + (hex.count == 1 ? "0" + hex : hex)
            }
        }
        if bytes.count > shown { out += "... (\(bytes.count - shown) more bytes)" }
        return out
    }

}
