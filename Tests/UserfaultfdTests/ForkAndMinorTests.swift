import Glibc
import TestSupport
import Testing
import Userfaultfd

extension Matrix {
    /// `wp-fork`, `wp-fork-with-event`: does a child inherit the write protection?
    // They fork this process (see `.ownsProcess`).
    @Suite("wp-fork", .ownsProcess, .needsUserfaultfd) struct WriteProtectFork {
        @Test("without EVENT_FORK the child's pages lose the WP bit", arguments: MemoryKind.ordinary)
        func withoutEvent(_ kind: MemoryKind) throws { try checkWriteProtectFork(kind, withEvent: false) }

        @Test("with EVENT_FORK the child's pages keep the WP bit", arguments: MemoryKind.ordinary)
        func withEvent(_ kind: MemoryKind) throws { try checkWriteProtectFork(kind, withEvent: true) }

        @Test("without EVENT_FORK on hugetlb", .needsFreeHugePages(8))
        func withoutEventHugetlb() throws { try checkWriteProtectFork(.hugetlb, withEvent: false) }

        @Test("with EVENT_FORK on hugetlb", .needsFreeHugePages(8))
        func withEventHugetlb() throws { try checkWriteProtectFork(.hugetlb, withEvent: true) }
    }

    /// `minor`, `minor-wp`: MINOR faults on shmem and hugetlb, resolved with CONTINUE.
    @Suite("minor", .needsUserfaultfd) struct Minor {
        @Test("exactly one minor fault per page; CONTINUE maps the page cache")
        func minor() throws { try checkMinor(.shmem, writeProtect: false) }

        @Test("minor+wp: CONTINUE maps write-protected")
        func minorWriteProtect() throws { try checkMinor(.shmem, writeProtect: true) }

        @Test("minor on hugetlb", .needsFreeHugePages(8))
        func minorHugetlb() throws { try checkMinor(.hugetlb, writeProtect: false) }

        @Test("minor+wp on hugetlb", .needsFreeHugePages(8))
        func minorWriteProtectHugetlb() throws { try checkMinor(.hugetlb, writeProtect: true) }
    }
}

/// Forks a child that waits on a pipe, reads the WP bit of `address` in the child's
/// pagemap, then lets it exit. Runs on its own thread: with EVENT_FORK, `fork` waits
/// until the event is read, and a lost event must not hang the test.
func childSeesWriteProtect(at address: UInt64, session: Session, server: FaultServer) -> (bit: Bool?, end: ChildEnd?)? {
    runFaulting("fork", session: session, server: server) { () -> (bit: Bool?, end: ChildEnd?) in
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else { return (nil, nil) }
        let readEnd = fds[0], writeEnd = fds[1]
        let pid = forkChild {
            var byte: UInt8 = 0
            close(writeEnd)
            return read(readEnd, &byte, 1) == 1 ? 0 : 1
        }
        close(readEnd)
        defer { close(writeEnd) }
        guard pid > 0 else { return (nil, nil) }
        let bit = try? isWriteProtected(address, pid: pid)
        var go: UInt8 = 1
        _ = write(writeEnd, &go, 1)
        return (bit, waitChild(pid))
    }
}

func checkWriteProtectFork(_ kind: MemoryKind, withEvent: Bool) throws {
    let session = try Session(features: kind.writeProtectFeatures.union(withEvent ? .eventFork : []))
    let m = try kind.map()
    let ps = kind.pageSize
    try session.handle.register(m.range, mode: .writeProtect)
    // A fork with EVENT_FORK waits until the event is read, so a server runs throughout.
    let server = try unprotectingServer(session, pageSize: ps)
    let page = MemoryRange(start: m.range.start, length: UInt64(ps))
    m.base.storeBytes(of: 1, as: UInt8.self)
    try session.handle.writeProtect(page, mode: .writeProtect)
    #expect(try isWriteProtected(page.start))
    let present = childSeesWriteProtect(at: page.start, session: session, server: server)
    #expect(present?.end == .exited(0))
    #expect(present?.bit == withEvent, "present page")

    // Zap the page table entry (shared memory keeps the page in its file), leaving a marker.
    if kind.isShared {
        #expect(madvise(m.base, ps, MADV_DONTNEED) == 0)
    } else {
        _ = madvise(m.base, ps, MADV_PAGEOUT)  // no swap here: may well leave the page as it is
    }
    #expect(try isWriteProtected(page.start), "the WP bit survives the zap")
    let zapped = childSeesWriteProtect(at: page.start, session: session, server: server)
    #expect(zapped?.end == .exited(0))
    #expect(zapped?.bit == withEvent, "zapped page")

    try session.handle.writeProtect(page, mode: [])
    #expect(try !isWriteProtected(page.start))
    let base = m.range.start
    _ = runFaulting(session: session, server: server) { UnsafeMutableRawPointer(bitPattern: UInt(base))!.storeBytes(of: 2, as: UInt8.self) }
    server.stop()
    #expect(server.failures == [])
    #expect(server.writeProtect == 0, "an unprotected page faulted")
    #expect(m.base.load(as: UInt8.self) == 2)
    #expect(try !isWriteProtected(page.start))
    #expect(server.events == (withEvent ? [.fork, .fork] : []))
    try session.handle.unregister(m.range)
}

func checkMinor(_ kind: MemoryKind, writeProtect: Bool) throws {
    let features = kind.minorFeature.union(writeProtect ? kind.writeProtectFeatures : [])
    let session = try Session(features: features)
    let m = try kind.map()
    let alias = try m.alias()
    let ps = kind.pageSize, n = kind.pageCount
    let mode: Userfaultfd.RegisterMode = writeProtect ? [.minor, .writeProtect] : .minor
    try session.handle.register(alias.range, mode: mode, requiring: .continue)
    // Populating the other, unregistered mapping raises no fault.
    for p in 0..<n { memset(m.base + p * ps, Int32(p % 255), ps) }
    let mBase = m.range.start, aliasBase = alias.range.start
    let server = try FaultServer(session.handle) { fault, uffd in
        let start = fault.address & ~UInt64(ps - 1)
        if fault.flags.contains(.writeProtect) {
            try requireCompleted(uffd.writeProtect(MemoryRange(start: start, length: UInt64(ps)), mode: []), ps, "unprotect")
            return
        }
        guard fault.flags.contains(.minor) else { throw Failure("unexpected fault \(fault)") }
        // Prove the page cache can be changed first: flip every bit through the other mapping.
        let words = UnsafeMutablePointer<UInt64>(bitPattern: UInt(mBase + (start - aliasBase)))!
        for w in 0..<(ps / 8) { words[w] = ~words[w] }
        try requireCompleted(
            uffd.continueMapping(MemoryRange(start: start, length: UInt64(ps)), mode: writeProtect ? .writeProtect : []),
            ps, "UFFDIO_CONTINUE")
    }
    let aliasRange = alias.range
    let bad = runFaulting(session: session, server: server) { () -> Int? in
        for p in 0..<n {
            let want = ~UInt8(p % 255)
            let bytes = UnsafeRawBufferPointer(start: aliasRange.pointer + p * ps, count: ps)
            if bytes.contains(where: { $0 != want }) { return p }
        }
        return nil
    }
    #expect(bad == .some(nil), "a page read through the registered mapping was not the flipped page cache")
    #expect(server.minor == n)
    #expect(server.missing == 0)
    #expect(server.writeProtect == 0)
    if writeProtect {
        #expect(try isWriteProtected(aliasRange.start), "CONTINUE with WP mapped the page writable")
        _ = runFaulting(session: session, server: server) { aliasRange.pointer.storeBytes(of: 0x5A, as: UInt8.self) }
        #expect(server.writeProtect == 1)
        #expect(m.base.load(as: UInt8.self) == 0x5A, "the write did not reach the shared page")
    }
    server.stop()
    #expect(server.failures == [])
}
