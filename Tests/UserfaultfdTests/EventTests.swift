import Glibc
import Synchronization
import TestSupport
import Testing
import Userfaultfd
import _CUserfaultfd

extension Matrix {
    /// `events`, `events-wp`: a forked child faults, mremaps and releases its memory
    /// while the parent serves it through the FORK event's userfaultfd.
    // They fork this process (see `.ownsProcess`).
    @Suite("events", .ownsProcess, .needsUserfaultfd) struct Events {
        @Test("FORK, REMAP and REMOVE reach the manager; released memory reads zero", arguments: [MemoryKind.shmem])
        func events(_ kind: MemoryKind) throws { try checkEvents(kind, writeProtect: false) }

        @Test("events+wp", arguments: [MemoryKind.shmem])
        func eventsWriteProtect(_ kind: MemoryKind) throws { try checkEvents(kind, writeProtect: true) }

        @Test("events on anonymous memory")
        func eventsAnonymous() throws { try checkEvents(.anonymous, writeProtect: false) }

        @Test("events+wp on anonymous memory")
        func eventsWriteProtectAnonymous() throws { try checkEvents(.anonymous, writeProtect: true) }

        @Test("events on hugetlb", .needsFreeHugePages(8))
        func eventsHugetlb() throws { try checkEvents(.hugetlb, writeProtect: false) }

        @Test("events+wp on hugetlb", .needsFreeHugePages(8))
        func eventsWriteProtectHugetlb() throws { try checkEvents(.hugetlb, writeProtect: true) }
    }
}

/// The child of the events case. It may only touch memory and make system calls.
/// Returns 0, or the number of the step that went wrong.
func eventsChild(base: UInt, target: UInt, pageSize ps: Int, pages n: Int, expected: UnsafeRawPointer, zeros: UnsafeRawPointer, release: Int32) -> Int32 {
    let split = (n + 1) / 2
    let area = UnsafeMutableRawPointer(bitPattern: base)!
    for p in 0..<split {
        if memcmp(area + p * ps, expected + p * ps, ps) != 0 { return 10 }
        // Writing the same byte back raises the WP fault, if there is one.
        area.storeBytes(of: area.load(fromByteOffset: p * ps, as: UInt8.self), toByteOffset: p * ps, as: UInt8.self)
    }
    guard let moved = cuffd_mremap(area, n * ps, n * ps, cuffd_MREMAP_MAYMOVE | cuffd_MREMAP_FIXED, UnsafeMutableRawPointer(bitPattern: target)!),
          moved != MAP_FAILED, UInt(bitPattern: moved) == target
    else { return 11 }
    for p in split..<n {
        if memcmp(moved + p * ps, expected + p * ps, ps) != 0 { return 12 }
        moved.storeBytes(of: moved.load(fromByteOffset: p * ps, as: UInt8.self), toByteOffset: p * ps, as: UInt8.self)
    }
    if madvise(moved, n * ps, release) != 0 { return 13 }
    for p in 0..<n where memcmp(moved + p * ps, zeros, ps) != 0 { return 14 }
    return 0
}

func checkEvents(_ kind: MemoryKind, writeProtect: Bool) throws {
    var features: Userfaultfd.Features = [.eventFork, .eventRemap, .eventRemove]
    if writeProtect { features.formUnion(kind.writeProtectFeatures) }
    let session = try Session(features: features)
    let m = try kind.map()
    let ps = kind.pageSize, n = kind.pageCount, length = n * ps
    let src = PageSource(pageSize: ps, count: n)
    // Where the child moves its area: reserved here, aligned to the page size.
    let landing = try AlignedAnonymous(length: length, alignment: ps)
    try session.handle.register(m.range, mode: writeProtect ? [.missing, .writeProtect] : .missing, requiring: .copy)
    let areaBase = Atomic<UInt64>(m.range.start)
    // REMOVE completes for the child as soon as the message is read, so the child can
    // fault on the released range before this resolver has unregistered it. Such a
    // fault must get zeros, as a manager serves released memory. If the range is
    // already unregistered (ENOENT), the child must still be woken: UNREGISTER wakes
    // the faults queued when it starts, but a fault taken under the per-VMA lock can
    // queue itself after that wake and before the VMA changes, and then nobody else
    // wakes it (this hung the anonymous cases about one run in three).
    let released = Atomic<Bool>(false)
    let faultsAfterRelease = Atomic<Int>(0)
    let server = try FaultServer(session.handle, followForks: true, unregisterRemoved: true, onEvent: { event in
        if case .remap(_, let to) = event { areaBase.store(to.start, ordering: .sequentiallyConsistent) }
        if case .remove = event { released.store(true, ordering: .sequentiallyConsistent) }
    }) { fault, uffd in
        let start = fault.address & ~UInt64(ps - 1)
        if released.load(ordering: .sequentiallyConsistent) && !fault.flags.contains(.writeProtect) {
            faultsAfterRelease.add(1, ordering: .sequentiallyConsistent)
            do throws(UserfaultfdError) {
                if case .alreadyPresent = try uffd.zeropage(MemoryRange(start: start, length: UInt64(ps))) {
                    try uffd.wake(MemoryRange(start: start, length: UInt64(ps)))
                }
            } catch {
                // ESRCH: the child is gone. UNREGISTER woke its fault, it went on and
                // exited before this stale message was served; nothing is left to wake.
                if error.errno == .noSuchProcess { return }
                if error.errno != .noSuchFileOrDirectory { throw error }
                try uffd.wake(MemoryRange(start: start, length: UInt64(ps)))
            }
            return
        }
        if fault.flags.contains(.writeProtect) {
            try requireCompleted(uffd.writeProtect(MemoryRange(start: start, length: UInt64(ps)), mode: []), ps, "unprotect")
            return
        }
        let page = Int(start - areaBase.load(ordering: .sequentiallyConsistent)) / ps
        guard (0..<n).contains(page) else { throw Failure("fault outside the area: \(fault)") }
        try copyPage(uffd, to: start, from: src.page(page), pageSize: ps, mode: writeProtect ? .writeProtect : [])
    }
    let base = UInt(m.range.start), target = UInt(landing.range.start), release = kind.releaseAdvice
    let end = runFaulting("fork", seconds: 40, session: session, server: server) { () -> ChildEnd? in
        let pid = forkChild {
            eventsChild(base: base, target: target, pageSize: ps, pages: n, expected: src.page(0), zeros: zeros.page(0), release: release)
        }
        return pid > 0 ? waitChild(pid, seconds: 30) : nil
    }
    server.stop()
    #expect(server.failures == [])
    #expect(end == .some(.exited(0)), "the child's exit code names the step that failed")
    #expect(server.events.first == .fork)
    #expect(server.events.contains(.remap(from: m.range, to: MemoryRange(start: landing.range.start, length: UInt64(length)))))
    #expect(server.events.contains(.remove(landing.range)))
    #expect(server.missing - faultsAfterRelease.load(ordering: .sequentiallyConsistent) == n)
    #expect(server.writeProtect == (writeProtect ? n : 0))
}

extension Matrix {
    /// `mmap-changing`: while a REMOVE event is unread, every resolving ioctl asks to retry.
    @Suite("mmap-changing", .needsUserfaultfd) struct MmapChanging {
        @Test("every resolving ioctl returns retryAfterEvents until the REMOVE is read", arguments: MemoryKind.ordinary)
        func retry(_ kind: MemoryKind) throws { try checkMmapChanging(kind) }

        @Test("mmap-changing on hugetlb", .needsFreeHugePages(8))
        func retryHugetlb() throws { try checkMmapChanging(.hugetlb) }
    }
}

func checkMmapChanging(_ kind: MemoryKind) throws {
    var features = Userfaultfd.Features([.eventRemove]).union(kind.writeProtectFeatures)
    features.formUnion(kernelFeatures.intersection(.poison))
    var mode: Userfaultfd.RegisterMode = [.missing, .writeProtect]
    if kind.isShared {
        features.insert(kind.minorFeature)
        mode.insert(.minor)
    } else {
        features.formUnion(kernelFeatures.intersection(.move))
    }
    let session = try Session(features: features)
    let uffd = session.handle
    let ps = kind.pageSize
    let m = try kind.map(pages: 2)
    let ioctls = try uffd.register(m.range, mode: mode)
    let page0 = MemoryRange(start: m.range.start, length: UInt64(ps))
    let page1 = MemoryRange(start: m.range.start + UInt64(ps), length: UInt64(ps))
    let src = PageSource(pageSize: ps, count: 1)
    let moveSource = try MemoryMapping.anonymous(length: systemPageSize)
    moveSource.base.storeBytes(of: 1, as: UInt8.self)

    // The madvise blocks until its REMOVE event is read.
    let release = kind.releaseAdvice
    let madvised = Atomic<Int32>(-2)
    let remover = DedicatedThread(name: "remover") { madvised.store(madvise(page1.pointer, ps, release), ordering: .sequentiallyConsistent) }
    #expect(try uffd.wait(stop: nil, timeoutMilliseconds: 10_000) == .ready)

    var tried: [String] = []
    func expectRetry(_ name: String, _ body: () throws -> Userfaultfd.Outcome) throws {
        tried.append(name)
        #expect(try body() == .retryAfterEvents, "\(name) while a REMOVE is unread")
    }
    try expectRetry("COPY") { try uffd.copy(to: page0.start, from: src.page(0), length: ps) }
    if ioctls.contains(.zeropage) { try expectRetry("ZEROPAGE") { try uffd.zeropage(page0) } }
    if ioctls.contains(.continue) { try expectRetry("CONTINUE") { try uffd.continueMapping(page0) } }
    try expectRetry("WRITEPROTECT") { try uffd.writeProtect(page0, mode: .writeProtect) }
    if ioctls.contains(.poison) { try expectRetry("POISON") { try uffd.poison(page0) } }
    if ioctls.contains(.move) {
        try expectRetry("MOVE") { try uffd.move(to: page0.start, from: moveSource.range.start, length: systemPageSize) }
    }
    // COPY and WRITEPROTECT, and every other resolving ioctl the kernel offers for this range.
    let offered = [Userfaultfd.Ioctls.zeropage, .continue, .poison, .move].filter { ioctls.contains($0) }.count
    #expect(tried.count == 2 + offered, "ioctls tried: \(tried), offered: \(ioctls)")
    #expect(ioctls.isSuperset(of: expectedIoctls(kind, mode)), "\(ioctls)")

    let buffer = Userfaultfd.EventBuffer(capacity: 4)
    #expect(try uffd.readEvents(into: buffer) == 1)
    if case .remove(let range)? = buffer.events.first {
        #expect(range == page1)
    } else {
        Issue.record("expected a REMOVE event, read \(buffer.events)")
    }
    remover.join()
    #expect(madvised.load(ordering: .sequentiallyConsistent) == 0)
    // Events read: the same ioctls work again.
    #expect(try uffd.copy(to: page0.start, from: src.page(0), length: ps) == .completed(ps))
    #expect(try uffd.writeProtect(page0, mode: .writeProtect) == .completed(ps))
    try uffd.unregister(m.range)
    #expect(firstDifference(m.base, src.page(0), ps) == nil)
}

extension Matrix {
    /// The `AsyncSequence` of events, fed by a dedicated thread.
    @Suite("event stream", .needsUserfaultfd) struct EventStream {
        @Test("page faults arrive as events and are resolved from async code")
        func stream() async throws {
            let session = try Session(features: [.threadID])
            let ps = systemPageSize
            let m = try MemoryMapping.anonymous(length: 2 * ps)
            try session.handle.register(m.range, mode: .missing)
            let src = PageSource(pageSize: ps, count: 2)
            let range = m.range
            let done = try StopSignal()
            let tid = Atomic<Int32>(0)
            let toucher = DedicatedThread(name: "toucher") {
                tid.store(currentThreadID(), ordering: .sequentiallyConsistent)
                let same = (0..<2).allSatisfy { firstDifference(range.pointer + $0 * ps, src.page($0), ps) == nil }
                if same { done.raise() }
            }
            let handle = session.handle
            let faults = try await withThrowingTaskGroup(of: [Userfaultfd.PageFault].self) { group in
                group.addTask {
                    var faults: [Userfaultfd.PageFault] = []
                    for try await event in try handle.events() {
                        guard case .pageFault(let fault) = event else { continue }
                        faults.append(fault)
                        let page = Int(fault.address - range.start) / ps
                        _ = try handle.copy(to: fault.address, from: src.page(page), length: ps)
                        if faults.count == 2 { break }
                    }
                    return faults
                }
                group.addTask {
                    try await Task.sleep(for: .seconds(20))
                    throw Failure("no events within 20 s")
                }
                defer { group.cancelAll() }
                return try await group.next() ?? []
            }
            if !waitReadable(done.fileDescriptor, milliseconds: 10_000) {
                Issue.record("the faulting thread did not finish or read wrong bytes")
                session.close()
            }
            toucher.join()
            #expect(faults.map(\.address) == [range.start, range.start + UInt64(ps)])
            #expect(faults.allSatisfy { $0.threadID == tid.load(ordering: .sequentiallyConsistent) && $0.flags.isEmpty })
        }
    }
}

extension Matrix {
    /// EVENT_UNMAP: munmap of a registered range waits until the manager reads the event.
    @Suite("unmap event", .needsUserfaultfd) struct UnmapEvent {
        @Test("munmap of a registered range delivers UNMAP with the range")
        func unmap() throws {
            let session = try Session(features: [.eventUnmap])
            let ps = systemPageSize
            // Raw memory: the test unmaps it itself.
            guard let p = mmap(nil, 4 * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), p != MAP_FAILED else {
                throw Failure("mmap failed")
            }
            let whole = MemoryRange(p, length: 4 * ps)
            let tail = MemoryRange(start: whole.start + UInt64(2 * ps), length: UInt64(2 * ps))
            try session.handle.register(whole, mode: .missing)
            // The head stays registered: unregister it first, or its munmap would wait for a reader.
            defer {
                try? session.handle.unregister(MemoryRange(p, length: 2 * ps))
                munmap(p, 2 * ps)
            }
            let server = try FaultServer(session.handle) { fault, _ in throw Failure("unexpected \(fault)") }
            let result = runFaulting("munmap", session: session, server: server) { munmap(tail.pointer, Int(tail.length)) }
            server.stop()
            #expect(result == 0)
            #expect(server.events == [.unmap(tail)])
            #expect(server.failures == [])
        }
    }
}
