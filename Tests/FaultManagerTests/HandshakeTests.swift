import FaultManager
import TestSupport
import Testing

/// Decoding the two handshakes, without a daemon.
@Suite(.sharesProcess) struct HandshakeDecodingTests {
    /// Firecracker's message exactly as `serde_json::to_string(&Vec<GuestRegionUffdMapping>)` writes it.
    static let firecrackerBytes = Array(
        #"[{"base_host_virt_addr":140180235575296,"size":134217728,"offset":0,"page_size":4096,"page_size_kib":4096},{"base_host_virt_addr":140180369793024,"size":1048576,"offset":134217728,"page_size":4096,"page_size_kib":4096}]"#.utf8)

    @Test func firecrackerMessageDecodesByteForByte() throws {
        let handshake = try Handshake.decode(Self.firecrackerBytes)
        guard case .firecracker(let regions) = handshake else {
            Issue.record("decoded as \(handshake.kind)")
            return
        }
        #expect(regions == [
            ClientRegion(start: 140_180_235_575_296, length: 134_217_728, backingOffset: 0, pageSize: 4096),
            ClientRegion(start: 140_180_369_793_024, length: 1_048_576, backingOffset: 134_217_728, pageSize: 4096),
        ])
        // What the test client sends is what Firecracker sends.
        #expect(FirecrackerRegion.encode(regions) == Self.firecrackerBytes)
    }

    @Test func firecrackerWithoutPageSizeUsesTheDeprecatedField() throws {
        let legacy = Array(#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size_kib":4}]"#.utf8)
        #expect(try Handshake.decode(legacy).regions.first?.pageSize == 4096)
        let inBytes = Array(#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size_kib":2097152}]"#.utf8)
        #expect(try Handshake.decode(inBytes).regions.first?.pageSize == 2 << 20)
    }

    @Test func nativeHandshakeRoundTrips() throws {
        let header = NativeHandshake(features: 0x4A, backing: .attached,
                                     regions: [ClientRegion(start: 1 << 30, length: 1 << 20, backingOffset: 8192)], name: "vm-7")
        let decoded = try Handshake.decode(header.encoded())
        #expect(decoded == .native(header))
        #expect(header.descriptorCount == 2)
    }

    @Test(arguments: [
        (#"{"protocol":"swift-userfaultfd-manager","version":2,"features":0,"backing":"memoryFile","regions":[]}"#, "unsupported native handshake version 2"),
        (#"{"version":1}"#, "\"protocol\" is missing"),
        (#"[{"base_host_virt_addr":"x","size":1,"offset":0,"page_size":4096}]"#, "not a JSON array of Firecracker regions"),
        (#"[{"size":4096,"offset":0,"page_size":4096}]"#, "missing key \"base_host_virt_addr\""),
        ("[]", "the region array is empty"),
        (#"{"backing":"memoryFile","features":0,"protocol":"swift-userfaultfd-manager","regions":[],"version":1}"#,
         "\"regions\" array is empty"),
        ("hello", "neither a JSON array"),
    ])
    func malformedBodiesNameTheProblem(body: String, reason: String) {
        #expect {
            _ = try Handshake.decode(Array(body.utf8))
        } throws: { error in
            "\(error)".contains(reason)
        }
    }

    @Test func regionValidationRefusesEachBadShape() {
        func reason(_ regions: [ClientRegion], backing: UInt64? = 1 << 20) -> String {
            do {
                try ClientRegion.validate(regions, backingLength: backing)
                return "accepted"
            } catch {
                return "\(error)"
            }
        }
        let ok = ClientRegion(start: 1 << 30, length: 1 << 16, backingOffset: 0)
        #expect(reason([ok]) == "accepted")
        #expect(reason([ok, ClientRegion(start: (1 << 30) + 4096, length: 4096, backingOffset: 0)]).contains("overlap"))
        #expect(reason([ClientRegion(start: 1 << 30, length: 1 << 21, backingOffset: 0)]).contains("beyond the memory file"))
        #expect(reason([ClientRegion(start: 1 << 30, length: 8192, backingOffset: 0, pageSize: 8192)]).contains("page size 8192"))
        #expect(reason([ClientRegion(start: (1 << 30) + 12, length: 4096, backingOffset: 0)]).contains("not aligned"))
        #expect(reason([ClientRegion(start: 1 << 30, length: 0, backingOffset: 0)]).contains("empty"))
        #expect(reason([ClientRegion(start: 1 << 30, length: 1 << 21, backingOffset: 0, pageSize: 1 << 21)], backing: 1 << 22) == "accepted")
    }
}
