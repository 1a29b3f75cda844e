import Glibc
import TestSupport
import Testing
import Userfaultfd

extension Matrix {
    /// `move`, `move-pmd`: faults resolved by moving pages from another range (anonymous memory only).
    @Suite("move", .needsKernel(.move), .needsUserfaultfd) struct Move {
        @Test("one page per fault")
        func pages() throws { try checkMove(chunk: systemPageSize, hugePageHint: MADV_NOHUGEPAGE) }

        @Test("a 2 MiB THP-sized range per fault")
        func thpRange() throws { try checkMove(chunk: 2 << 20, hugePageHint: MADV_HUGEPAGE) }

        @Test("a hole in the source is ENOENT, or skipped with ALLOW_SRC_HOLES")
        func sourceHoles() throws {
            let uffd = try Userfaultfd(features: [.move])
            let ps = systemPageSize
            let dst = try MemoryMapping.anonymous(length: 2 * ps)
            let src = try MemoryMapping.anonymous(length: 2 * ps)
            try uffd.handle.register(dst.range, mode: .missing, requiring: .move)
            let e = error { _ = try uffd.handle.move(to: dst.range.start, from: src.range.start, length: ps) }
            #expect(e?.errno == .noSuchFileOrDirectory)
            #expect(e?.operation == "UFFDIO_MOVE")
            #expect(try uffd.handle.move(to: dst.range.start, from: src.range.start, length: ps, mode: .allowSourceHoles) == .completed(ps))
            #expect(try pagemapEntry(dst.range.start) & pagemapPresent == 0, "a hole was moved in as a page")
        }
    }
}

/// Anonymous memory aligned to `alignment`, unmapped on deinit.
final class AlignedAnonymous: @unchecked Sendable {
    let mapping: UnsafeMutableRawPointer
    let mappedLength: Int
    let range: MemoryRange

    init(length: Int, alignment: Int) throws {
        mappedLength = length + alignment
        guard let p = mmap(nil, mappedLength, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), p != MAP_FAILED else {
            throw Failure("mmap failed: errno \(errno)")
        }
        mapping = p
        let start = (UInt64(UInt(bitPattern: p)) + UInt64(alignment) - 1) & ~UInt64(alignment - 1)
        range = MemoryRange(start: start, length: UInt64(length))
    }

    deinit { munmap(mapping, mappedLength) }
}

func checkMove(chunk: Int, hugePageHint: Int32) throws {
    let uffd = try Session(features: [.move])
    let ps = systemPageSize
    let chunks = 2
    let length = chunk * chunks
    let src = try AlignedAnonymous(length: length, alignment: chunk)
    let dst = try AlignedAnonymous(length: length, alignment: chunk)
    // The hint goes in before the source is populated, so THPs form there (or do not).
    #expect(madvise(src.range.pointer, length, hugePageHint) == 0)
    #expect(madvise(dst.range.pointer, length, hugePageHint) == 0)
    let expected = PageSource(pageSize: ps, count: length / ps)
    memcpy(src.range.pointer, expected.base, length)
    try uffd.handle.register(dst.range, mode: .missing, requiring: .move)
    let dstBase = dst.range.start, srcBase = src.range.start
    let server = try FaultServer(uffd.handle) { fault, handle in
        if !fault.flags.isEmpty { throw Failure("a read fault carried flags \(fault.flags)") }
        let offset = (fault.address - dstBase) & ~UInt64(chunk - 1)
        try requireCompleted(handle.move(to: dstBase + offset, from: srcBase + offset, length: chunk), chunk, "UFFDIO_MOVE")
    }
    let dstRange = dst.range, srcRange = src.range
    let problem = runFaulting(session: uffd, server: server) { () -> String? in
        for c in 0..<chunks {
            let offset = c * chunk
            if let d = firstDifference(dstRange.pointer + offset, expected.base + offset, chunk) {
                return "destination byte \(offset + d) differs"
            }
            // The pages left the source: it reads as fresh zero memory now.
            for page in stride(from: offset, to: offset + chunk, by: ps)
            where firstDifference(srcRange.pointer + page, zeros.page(0), ps) != nil {
                return "source page at \(page) still has data after the move"
            }
        }
        return nil
    }
    server.stop()
    #expect(server.failures == [])
    #expect(problem == .some(nil))
    #expect(server.missing == chunks, "one fault per \(chunk)-byte chunk")
}
