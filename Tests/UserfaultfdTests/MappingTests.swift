import TestSupport
import Glibc
import Testing
import Userfaultfd

/// Whether every page of `length` bytes at `address` is mapped in this process.
func isMapped(_ address: UInt, _ length: Int) -> Bool {
    madvise(UnsafeMutableRawPointer(bitPattern: address), length, MADV_NORMAL) == 0
}

/// `length` bytes of address space reserved with PROT_NONE, for moving a mapping onto.
func reserveAddressSpace(_ length: Int) throws -> UInt {
    let p = mmap(nil, length, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    guard let p, p != MAP_FAILED else { throw Failure("mmap PROT_NONE failed: errno \(errno)") }
    return UInt(bitPattern: p)
}

@Suite("MemoryMapping: partial unmap, split and remap", .sharesProcess)
struct MappingTests {
    let ps = systemPageSize

    // Checks that unmapped addresses stay unmapped: runs alone, like the remap test.
    @Test("unmapping a head or a tail keeps the rest; the middle is refused", .ownsProcess)
    func unmapHeadAndTail() throws {
        var m = try MemoryMapping.anonymous(length: 4 * ps)
        let start = UInt(m.range.start)
        m.bytes[2 * ps] = 42
        try m.unmap(MemoryRange(start: m.range.start, length: UInt64(ps)))
        #expect(UInt(m.range.start) == start + UInt(ps) && m.length == 3 * ps)
        #expect(!isMapped(start, ps))
        try m.unmap(MemoryRange(start: m.address(at: 2 * ps), length: UInt64(ps)))
        #expect(m.length == 2 * ps && !isMapped(start + UInt(3 * ps), ps))
        #expect(m.bytes[ps] == 42, "the byte written at offset 2 pages is now at offset 1 page")
        let middle = error { try m.unmap(MemoryRange(start: m.range.start, length: UInt64(2 * ps))) }
        guard case .invalidArgument? = middle?.kind else {
            Issue.record("unmapping the whole mapping through unmap(_:) was not refused")
            return
        }
        var wide = try MemoryMapping.anonymous(length: 3 * ps)
        let inner = error { try wide.unmap(MemoryRange(start: wide.address(at: ps), length: UInt64(ps))) }
        #expect(inner != nil, "a range in the middle is refused")
        #expect(isMapped(UInt(wide.range.start), 3 * ps))
        let tail = try wide.split(at: ps)
        #expect(wide.length == ps && tail.length == 2 * ps && tail.range.start == wide.range.end)
    }

    @Test("split shmem: each part owns its memfd and aliases see the right file offset")
    func splitShared() throws {
        var m = try MemoryMapping(kind: .shmem, length: 4 * ps)
        for page in 0..<4 { m.bytes[page * ps] = UInt8(page + 1) }
        var tail = try m.split(at: ps)
        #expect(tail.fileOffset == ps && tail.memfd != m.memfd)
        try tail.unmap(MemoryRange(start: tail.range.start, length: UInt64(ps)))
        #expect(tail.fileOffset == 2 * ps)
        let alias = try tail.alias()
        #expect(alias.bytes[0] == 3 && alias.bytes[ps] == 4)
        #expect(try m.alias().bytes[0] == 1)
    }

    // Checks what is mapped at an address: another test mapping memory meanwhile can
    // land on the freed old base, so this one runs alone.
    @Test("remap moves the mapping; going away unmaps the new place, not the old base", .ownsProcess)
    func remapAndDeinit() throws {
        let landing = try reserveAddressSpace(2 * ps)
        let oldBase: UInt
        do {
            var m = try MemoryMapping.anonymous(length: 2 * ps)
            oldBase = UInt(m.range.start)
            m.bytes[ps] = 7
            try m.remap(to: UInt64(landing))
            #expect(UInt(m.range.start) == landing && m.bytes[ps] == 7)
            #expect(!isMapped(oldBase, 2 * ps))
            // Something else now lives at the old base; the mapping must leave it alone.
            let claim = mmap(UnsafeMutableRawPointer(bitPattern: oldBase), 2 * ps, PROT_READ,
                             MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
            try #require(claim == UnsafeMutableRawPointer(bitPattern: oldBase), "the old base could not be claimed again")
        }
        #expect(isMapped(oldBase, 2 * ps), "the old base was unmapped by the moved mapping")
        #expect(!isMapped(landing, 2 * ps))
        munmap(UnsafeMutableRawPointer(bitPattern: oldBase), 2 * ps)
    }

    @Test("remap grows anonymous and shmem memory, the memfd with it")
    func remapGrows() throws {
        var anon = try MemoryMapping.anonymous(length: ps)
        anon.bytes[0] = 9
        try anon.remap(length: 3 * ps)
        #expect(anon.length == 3 * ps && anon.bytes[0] == 9)
        anon.bytes[2 * ps] = 1
        var shared = try MemoryMapping(kind: .shmem, length: ps)
        try shared.remap(length: 2 * ps)
        shared.bytes[ps] = 5
        #expect(try shared.alias().bytes[ps] == 5)
        let bad = error { try shared.remap(length: ps + 1) }
        guard case .invalidArgument? = bad?.kind else {
            Issue.record("a length that is not whole pages was not refused")
            return
        }
    }
}
