import Glibc
import Synchronization
import TestSupport
import Testing
import Userfaultfd

extension Matrix {
    /// `copy`: faults resolved with UFFDIO_COPY, partial copies, EEXIST, DONTWAKE.
    @Suite("copy", .needsUserfaultfd) struct Copy {
        @Test("contents byte for byte, one fault per page, EEXIST once present", arguments: MemoryKind.ordinary)
        func contents(_ kind: MemoryKind) throws { try checkCopy(kind) }

        @Test("contents byte for byte on hugetlb", .needsFreeHugePages(8))
        func contentsHugetlb() throws { try checkCopy(.hugetlb) }

        @Test("a copy over a present page stops there: partial", arguments: MemoryKind.ordinary)
        func partial(_ kind: MemoryKind) throws { try checkPartialCopy(kind) }

        @Test("partial copy on hugetlb", .needsFreeHugePages(8))
        func partialHugetlb() throws { try checkPartialCopy(.hugetlb) }

        @Test("DONTWAKE leaves the faulting thread asleep until WAKE", arguments: MemoryKind.ordinary)
        func dontWake(_ kind: MemoryKind) throws {
            let session = try Session(features: [])
            let m = try kind.map(pages: 4)
            let ps = kind.pageSize
            let src = PageSource(pageSize: ps, count: 4)
            try session.handle.register(m.range, mode: .missing, requiring: [.copy, .wake])
            let base = m.range.start
            let pagesRead = Atomic<Int>(0)
            let asleepUntilWake = Atomic<Int>(0)
            let server = try FaultServer(session.handle) { fault, uffd in
                let page = Int(fault.address - base) / ps
                let target = MemoryRange(start: base + UInt64(page * ps), length: UInt64(ps))
                try requireCompleted(uffd.copy(to: target.start, from: src.page(page), length: ps, mode: .dontWake), ps, "UFFDIO_COPY")
                usleep(50_000)
                if pagesRead.load(ordering: .sequentiallyConsistent) == page { asleepUntilWake.add(1, ordering: .sequentiallyConsistent) }
                try uffd.wake(target)
            }
            let range = m.range
            let bad = runFaulting(session: session, server: server) { () -> Int? in
                for i in 0..<4 {
                    if firstDifference(range.pointer + i * ps, src.page(i), ps) != nil { return i }
                    pagesRead.add(1, ordering: .sequentiallyConsistent)
                }
                return nil
            }
            server.stop()
            #expect(server.failures == [])
            #expect(bad == .some(nil))
            #expect(server.missing == 4)
            #expect(asleepUntilWake.load(ordering: .sequentiallyConsistent) == 4)
        }
    }
}

func checkCopy(_ kind: MemoryKind) throws {
    let session = try Session(features: [.threadID])
    let m = try kind.map()
    let ps = kind.pageSize, n = kind.pageCount
    let src = PageSource(pageSize: ps, count: n)
    try session.handle.register(m.range, mode: .missing, requiring: .copy)
    let base = m.range.start
    let server = try FaultServer(session.handle) { fault, uffd in
        let page = Int(fault.address - base) / ps
        try requireCompleted(uffd.copy(to: base + UInt64(page * ps), from: src.page(page), length: ps), ps, "UFFDIO_COPY")
    }
    let range = m.range
    let result = runFaulting(session: session, server: server) { () -> (tid: Int32, bad: Int?) in
        for i in 0..<n where firstDifference(range.pointer + i * ps, src.page(i), ps) != nil { return (currentThreadID(), i) }
        return (currentThreadID(), nil)
    }
    server.stop()
    #expect(server.failures == [])
    let r = try #require(result)
    #expect(r.bad == nil, "page \(r.bad ?? -1) differs from its source")
    #expect(server.missing == n)
    #expect(server.writes == 0)
    // THREAD_ID: every message names the thread that faulted.
    #expect(server.threadIDs == Array(repeating: r.tid, count: n))
    // The page is there now: another copy is EEXIST and changes nothing.
    let other = PageSource(pageSize: ps, count: 1) { _ in 0xEE }
    #expect(try session.handle.copy(to: base, from: other.page(0), length: ps) == .alreadyPresent)
    #expect(firstDifference(m.base, src.page(0), ps) == nil)
}

func checkPartialCopy(_ kind: MemoryKind) throws {
    let session = try Session(features: [])
    let m = try kind.map(pages: 4)
    let ps = kind.pageSize
    let src = PageSource(pageSize: ps, count: 4)
    let lone = PageSource(pageSize: ps, count: 1) { _ in 0xEE }
    try session.handle.register(m.range, mode: .missing)
    let base = m.range.start
    #expect(try session.handle.copy(to: base + UInt64(2 * ps), from: lone.page(0), length: ps) == .completed(ps))
    // Pages 0 and 1 are installed; page 2 is present, so the copy stops there.
    #expect(try session.handle.copy(to: base, from: src.page(0), length: 4 * ps) == .partial(2 * ps))
    #expect(try session.handle.copy(to: base + UInt64(3 * ps), from: src.page(3), length: ps) == .completed(ps))
    // Nothing may fault from here on: read with the range unregistered.
    try session.handle.unregister(m.range)
    for page in [0, 1, 3] {
        #expect(firstDifference(m.base + page * ps, src.page(page), ps) == nil, "page \(page)")
    }
    #expect(firstDifference(m.base + 2 * ps, lone.page(0), ps) == nil, "the present page was overwritten")
}

extension Matrix {
    /// `zeropage`: UFFDIO_ZEROPAGE where the range offers it, EEXIST through the alias.
    @Suite("zeropage", .needsUserfaultfd) struct Zeropage {
        @Test("reads zeros, EEXIST through the alias", arguments: MemoryKind.ordinary)
        func zeropage(_ kind: MemoryKind) throws { try checkZeropage(kind) }

        @Test("hugetlb offers no ZEROPAGE and refuses it", .needsFreeHugePages(8))
        func zeropageHugetlb() throws { try checkZeropage(.hugetlb) }
    }
}

func checkZeropage(_ kind: MemoryKind) throws {
    let uffd = try Userfaultfd(features: [])
    let m = try kind.map(pages: 1)
    // Fill the page cache behind the mapping first where there is one, so zeros are news.
    let alias = kind.isShared ? Mapped(try m.alias()) : nil
    let page = MemoryRange(start: m.range.start, length: UInt64(kind.pageSize))
    let ioctls = try uffd.handle.register(page, mode: .missing)
    if let alias { try uffd.handle.register(alias.range, mode: .missing) }
    if kind == .hugetlb {
        #expect(!ioctls.contains(.zeropage))
        let e = error { _ = try uffd.handle.zeropage(page) }
        #expect(e?.errno == .invalidArgument)
        #expect(e?.operation == "UFFDIO_ZEROPAGE")
        return
    }
    #expect(ioctls.contains(.zeropage))
    #expect(try uffd.handle.zeropage(page) == .completed(kind.pageSize))
    // The same page through the other mapping (anonymous memory: the same address) exists now.
    let again = MemoryRange(start: alias?.range.start ?? page.start, length: page.length)
    #expect(try uffd.handle.zeropage(again) == .alreadyPresent)
    try uffd.handle.unregister(page)
    if let alias { try uffd.handle.unregister(alias.range) }
    #expect(firstDifference(m.base, zeros.page(0), kind.pageSize) == nil)
    if let alias { #expect(firstDifference(alias.base, zeros.page(0), kind.pageSize) == nil) }
}
