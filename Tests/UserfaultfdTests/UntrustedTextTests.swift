import TestSupport
import Testing
import Userfaultfd

/// Peer text on its way to a log: escaped and capped.
@Suite("untrusted text", .sharesProcess) struct UntrustedTextTests {
    @Test("printable ASCII is kept as is")
    func printable() {
        #expect(UntrustedText("swift-userfaultfd-manager v1").description == "swift-userfaultfd-manager v1")
    }

    @Test("line breaks, escapes, quotes and non-ASCII bytes are escaped")
    func escapes() {
        let forged = "x\nrefused handshake from pid 1\r\t\u{1B}[2J\"\\é"
        #expect(UntrustedText(forged).description
                == #"x\nrefused handshake from pid 1\r\t\x1b[2J\"\\\xc3\xa9"#)
        #expect(UntrustedText([0, 0x7F, 0xFF]).description == #"\x00\x7f\xff"#)
    }

    @Test("the text is cut at the limit and says how much was left out")
    func capped() {
        let text = UntrustedText([UInt8](repeating: UInt8(ascii: "a"), count: 1 << 20), limit: 8)
        #expect(text.description == "aaaaaaaa...(1048568 more bytes)")
        #expect(UntrustedText("abc", limit: 3).description == "abc")
        #expect(UntrustedText("abc", limit: 0).description == "...(3 more bytes)")
    }

    @Test("the result is printable ASCII whatever the input")
    func printableOnly() {
        let all = UntrustedText((0...255).map { UInt8($0) }, limit: 256).description
        #expect(all.utf8.allSatisfy { (0x20...0x7E).contains($0) })
    }
}
