import FaultEngine
import Testing
import Userfaultfd

extension FaultEngineTests {
    /// The page bitmap and the region layout that the fault server and postcopy migration share.
    @Suite struct PageBitmapTests {
        @Test func bitsSetClearAndSearchAcrossWords() throws {
            let bits = try PageBitmap(count: 130)
            #expect(bits.population == 0)
            #expect(bits.nextSet(from: 0) == nil)
            #expect(!bits.testAndSet(64))
            #expect(bits.testAndSet(64))
            bits.set(120, count: 10)
            #expect(bits.population == 11)
            #expect(bits.nextSet(from: 0) == 64)
            #expect(bits.nextSet(from: 65) == 120)
            #expect(bits.nextSet(from: 130) == nil)
            #expect(bits.testAndClear(129))
            #expect(!bits.testAndClear(129))
            bits.clear(60, count: 64)
            #expect(bits.population == 5)
            #expect(bits.nextSet(from: 0) == 124)
            #expect(bits.bytes(from: 120, count: 10) == [0xF0, 0x01])
            #expect(bits.word(1) == 0xF000_0000_0000_0000)
        }

        @Test func aFullBitmapHasExactlyItsCountSet() throws {
            let bits = try PageBitmap(count: 70, set: true)
            #expect(bits.population == 70)
            #expect(bits.word(1) == 0x3F)
            #expect(bits.nextSet(from: 69) == 69)
            #expect(bits.nextSet(from: 70) == nil)
        }

        @Test func layoutNumbersPagesGloballyInTheGivenOrder() {
            let ps = 4096
            // The second region lies below the first: numbering follows the order given.
            let layout = RegionLayout([MemoryRange(start: 0x20_0000, length: UInt64(3 * ps)),
                                       MemoryRange(start: 0x10_0000, length: UInt64(2 * ps))], pageSize: ps)
            #expect(layout.totalPages == 5)
            #expect(layout.regions.map(\.firstGlobal) == [0, 3])
            #expect(layout.globalPage(region: 1, first: 1, count: 1) == 4)
            #expect(layout.globalPage(region: 0, first: 0, count: 3) == 0)
            #expect(layout.globalPage(region: 0, first: 1, count: 3) == nil)
            #expect(layout.globalPage(region: 0, first: 3, count: 0) == nil)
            #expect(layout.globalPage(region: 2, first: 0, count: 1) == nil)
            #expect(layout.split(3) == (1, 0))
            #expect(layout.split(2) == (0, 2))
            #expect(layout.address(4) == 0x10_0000 + UInt64(ps))
            #expect(layout.globallyNumbered.map(\.sourceOffset) == [0, UInt64(3 * ps)])
            #expect(layout.globallyNumbered[1].range == MemoryRange(start: 0x10_0000, length: UInt64(2 * ps)))
        }
    }
}
