import TestSupport
import Testing
import Userfaultfd

/// The byte reader and writer file formats and wire protocols share.
@Suite("little-endian bytes", .sharesProcess) struct LittleEndianTests {
    struct CutShort: Error, Equatable {
        var offset: Int
        var needed: Int
        var remaining: Int
    }

    func reader(_ bytes: [UInt8]) -> LittleEndianReader<CutShort> {
        LittleEndianReader(bytes) { CutShort(offset: $0, needed: $1, remaining: $2) }
    }

    @Test("integers are written least significant byte first and read back at any offset")
    func roundTrip() throws {
        var w = LittleEndianWriter()
        w.u8(0xAB)
        w.u16(0x0102)
        w.u32(0x0304_0506)
        w.u64(0x0708_090A_0B0C_0D0E)
        #expect(w.bytes == [0xAB, 0x02, 0x01, 0x06, 0x05, 0x04, 0x03, 0x0E, 0x0D, 0x0C, 0x0B, 0x0A, 0x09, 0x08, 0x07])
        var r = reader(w.bytes)
        #expect(try r.u8() == 0xAB)
        #expect(try r.u16() == 0x0102)   // at offset 1: unaligned
        #expect(try r.u32() == 0x0304_0506)
        #expect(try r.u64() == 0x0708_090A_0B0C_0D0E)
        #expect(r.atEnd && r.remaining == 0)
    }

    @Test("a read past the end fails with where it stood, and reads nothing")
    func cutShort() throws {
        var r = reader([1, 2, 3, 4, 5])
        #expect(try r.u16() == 0x0201)
        #expect(throws: CutShort(offset: 2, needed: 4, remaining: 3)) { try r.u32() }
        #expect(r.offset == 2)
        #expect(throws: CutShort(offset: 2, needed: 4, remaining: 3)) { try r.bytes(4) }
        #expect(Array(try r.bytes(3)) == [3, 4, 5])
        #expect(throws: CutShort(offset: 5, needed: 1, remaining: 0)) { try r.u8() }
        #expect(throws: CutShort(offset: 5, needed: -1, remaining: 0)) { try r.bytes(-1) }
    }
}
