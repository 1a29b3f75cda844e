import TestSupport
import FaultEngine
import FaultTrace
import Testing

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

@Suite(.sharesProcess) struct TraceFileTests {
    @Test func aTraceReadsBackAsWritten() throws {
        let trace = knownTrace()
        let path = temporaryPath("roundtrip")
        defer { unlink(path) }
        try TraceFile.write(trace, to: path)
        #expect(try TraceFile.read(path) == trace)
        // 32-byte header, 24 bytes per touch: compact.
        #expect(TraceFile.encode(trace).count < 32 + 64 * 24 + 64 * (40 + 32 * 4) + 2 * 80 + 64)
    }

    @Test func everyTruncationIsRefusedAsCutShort() throws {
        let bytes = TraceFile.encode(knownTrace())
        for length in Array(stride(from: 32, to: bytes.count, by: 37)) + [bytes.count - 1, bytes.count - 16, 40] {
            let error = #expect(throws: TraceError.self) { try TraceFile.decode(Array(bytes.prefix(length))) }
            #expect(error?.message.contains("cut short") == true, "\(length) bytes: \(error?.message ?? "")")
        }
    }

    @Test func aForeignFileIsRefusedByName() throws {
        let path = temporaryPath("foreign")
        defer { unlink(path) }
        try FaultEngine.WorkingSetFile.write([0, 4096, 8192], to: path)
        let error = #expect(throws: TraceError.self) { try TraceFile.read(path) }
        #expect(error?.message.hasPrefix(path) == true)
        #expect(error?.message.contains("not a uffd trace file") == true, "\(error?.message ?? "")")
        let short = #expect(throws: TraceError.self) { try TraceFile.decode(Array("UFTRACE".utf8)) }
        #expect(short?.message.contains("not a uffd trace file") == true)
    }

    @Test func anotherVersionAndBadChunksAreRefused() throws {
        var bytes = TraceFile.encode(knownTrace())
        bytes[8] = 9
        let version = #expect(throws: TraceError.self) { try TraceFile.decode(bytes) }
        #expect(version?.message.contains("version 9") == true, "\(version?.message ?? "")")
        bytes[8] = 1
        bytes[32] = 0x55   // the first chunk's tag
        let tag = #expect(throws: TraceError.self) { try TraceFile.decode(bytes) }
        #expect(tag?.message.contains("unknown chunk tag") == true, "\(tag?.message ?? "")")
        let junk = TraceFile.encode(knownTrace()) + [0, 0, 0, 0]
        let after = #expect(throws: TraceError.self) { try TraceFile.decode(junk) }
        #expect(after?.message.contains("after the end record") == true, "\(after?.message ?? "")")
    }

    @Test func aMissingFileIsRefusedWithItsName() {
        let error = #expect(throws: TraceError.self) { try TraceFile.read("/nonexistent/trace") }
        #expect(error?.message.contains("/nonexistent/trace") == true)
    }
}
