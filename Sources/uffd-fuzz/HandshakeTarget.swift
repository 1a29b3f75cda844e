import FaultManager
import Userfaultfd

#if canImport(Glibc)
import Glibc
#endif

/// One handshake input: frame it, decode it, and escape it for a log line. A crash,
/// trap or sanitizer report is a finding; refusals (thrown errors) are expected.
func fuzzHandshake(_ bytes: [UInt8]) {
    _ = HandshakeFraming.scan(bytes)
    if let handshake = try? Handshake.decode(bytes) {
        // A decoded handshake names at least one region and one or two descriptors.
        if handshake.regions.isEmpty || !(1...2).contains(handshake.descriptorCount) { abort() }
    }
    let text = UntrustedText(bytes).description
    if !text.utf8.allSatisfy({ (0x20...0x7E).contains($0) }) { abort() }
}
