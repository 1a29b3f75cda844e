import Glibc
import TestSupport
import Testing
import Userfaultfd

extension Matrix {
    /// `wp`, `wp-unpopulated`: write-protect faults and their resolution.
    @Suite("wp", .needsUserfaultfd) struct WriteProtect {
        @Test("a write to a protected page faults with the WP flag; unprotect wakes the writer", arguments: MemoryKind.ordinary)
        func protect(_ kind: MemoryKind) throws { try checkWriteProtect(kind) }

        @Test("WP faults on hugetlb", .needsFreeHugePages(8))
        func protectHugetlb() throws { try checkWriteProtect(.hugetlb) }

        @Test("MISSING+WP: copy write-protected, then the write faults again", arguments: MemoryKind.ordinary)
        func missingAndProtect(_ kind: MemoryKind) throws { try checkMissingWriteProtect(kind) }

        @Test("MISSING+WP on hugetlb", .needsFreeHugePages(8))
        func missingAndProtectHugetlb() throws { try checkMissingWriteProtect(.hugetlb) }

        @Test("wp-unpopulated: protecting a page never touched")
        func unpopulated() throws {
            let session = try Session(features: [.pagefaultFlagWP, .wpUnpopulated])
            let ps = systemPageSize
            let m = try MemoryMapping.anonymous(length: 4 * ps)
            let uffd = session.handle
            try uffd.register(m.range, mode: .writeProtect)
            let page0 = MemoryRange(start: m.range.start, length: UInt64(ps))
            let page1 = MemoryRange(start: m.range.start + UInt64(ps), length: UInt64(ps))

            // A marker on an unpopulated page, cleared by unprotect and by DONTNEED.
            try uffd.writeProtect(page0, mode: .writeProtect)
            #expect(try isWriteProtected(page0.start))
            try uffd.writeProtect(page0, mode: [])
            #expect(try !isWriteProtected(page0.start))
            try uffd.writeProtect(page0, mode: .writeProtect)
            #expect(madvise(page0.pointer, ps, MADV_DONTNEED) == 0)
            #expect(try !isWriteProtected(page0.start))

            let server = try FaultServer(uffd) { fault, handle in
                let page = MemoryRange(start: fault.address & ~UInt64(ps - 1), length: UInt64(ps))
                try requireCompleted(handle.writeProtect(page, mode: []), ps, "unprotect")
            }
            // Without a marker the write does not fault.
            _ = runFaulting(session: session, server: server) { page0.pointer.storeBytes(of: 1, as: UInt8.self) }
            #expect(server.writeProtect == 0)
            #expect(try !isWriteProtected(page0.start))
            // Reading a protected, unpopulated page does not fault either.
            try uffd.writeProtect(page1, mode: .writeProtect)
            let read = runFaulting(session: session, server: server) { page1.pointer.load(as: UInt8.self) }
            #expect(read == 0)
            #expect(server.writeProtect == 0)
            // Writing it does: that is what WP_UNPOPULATED adds.
            try uffd.writeProtect(page1, mode: .writeProtect)
            _ = runFaulting(session: session, server: server) { page1.pointer.storeBytes(of: 7, as: UInt8.self) }
            server.stop()
            #expect(server.failures == [])
            #expect(server.writeProtect == 1)
            #expect(server.missing == 0)
            #expect(page1.pointer.load(as: UInt8.self) == 7)
            #expect(try !isWriteProtected(page1.start))
        }
    }
}

/// Resolves WP faults by unprotecting the page; anything else is a failure.
func unprotectingServer(_ session: Session, pageSize ps: Int, copyFrom src: PageSource? = nil, base: UInt64 = 0) throws -> FaultServer {
    try FaultServer(session.handle) { fault, uffd in
        let start = fault.address & ~UInt64(ps - 1)
        if fault.flags.contains(.writeProtect) {
            if !fault.flags.contains(.write) { throw Failure("a WP fault without the WRITE flag") }
            try requireCompleted(uffd.writeProtect(MemoryRange(start: start, length: UInt64(ps)), mode: []), ps, "unprotect")
        } else if let src {
            let page = Int(start - base) / ps
            try requireCompleted(uffd.copy(to: start, from: src.page(page), length: ps, mode: .writeProtect), ps, "UFFDIO_COPY WP")
        } else {
            throw Failure("unexpected fault \(fault)")
        }
    }
}

func checkWriteProtect(_ kind: MemoryKind) throws {
    let session = try Session(features: kind.writeProtectFeatures)
    let m = try kind.map()
    let ps = kind.pageSize, n = kind.pageCount
    let src = PageSource(pageSize: ps, count: n)
    memcpy(m.base, src.base, n * ps)
    try session.handle.register(m.range, mode: .writeProtect, requiring: .writeProtect)
    #expect(try session.handle.writeProtect(m.range, mode: .writeProtect) == .completed(n * ps))
    #expect(try isWriteProtected(m.range.start + UInt64((n - 1) * ps)))
    let server = try unprotectingServer(session, pageSize: ps)
    let range = m.range
    _ = runFaulting(session: session, server: server) {
        for i in 0..<n { range.pointer.storeBytes(of: 0xA5, toByteOffset: i * ps + 1, as: UInt8.self) }
    }
    server.stop()
    #expect(server.failures == [])
    #expect(server.writeProtect == n)
    #expect(server.missing == 0)
    for i in 0..<n {
        #expect(m.base.load(fromByteOffset: i * ps + 1, as: UInt8.self) == 0xA5)
        #expect(firstDifference(m.base + i * ps + 2, src.page(i) + 2, ps - 2) == nil, "page \(i) lost its contents")
        #expect(try !isWriteProtected(m.range.start + UInt64(i * ps)))
    }
}

func checkMissingWriteProtect(_ kind: MemoryKind) throws {
    let session = try Session(features: kind.writeProtectFeatures)
    let m = try kind.map()
    let ps = kind.pageSize, n = kind.pageCount
    let src = PageSource(pageSize: ps, count: n)
    let ioctls = try session.handle.register(m.range, mode: [.missing, .writeProtect])
    #expect(ioctls.isSuperset(of: [.copy, .writeProtect]))
    let server = try unprotectingServer(session, pageSize: ps, copyFrom: src, base: m.range.start)
    let range = m.range
    _ = runFaulting(session: session, server: server) {
        for i in 0..<n { range.pointer.storeBytes(of: 0xA5, toByteOffset: i * ps + 1, as: UInt8.self) }
    }
    server.stop()
    #expect(server.failures == [])
    // Each write: a MISSING fault (with WRITE), copied in protected, then a WP fault.
    #expect(server.missing == n)
    #expect(server.writeProtect == n)
    #expect(server.writes == 2 * n)
    for i in 0..<n {
        #expect(m.base.load(fromByteOffset: i * ps + 1, as: UInt8.self) == 0xA5)
        #expect(firstDifference(m.base + i * ps + 2, src.page(i) + 2, ps - 2) == nil, "page \(i) differs from its source")
    }
}
