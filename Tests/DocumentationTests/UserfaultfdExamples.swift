import TestSupport
import Glibc
import SystemPackage
import Testing
import Userfaultfd
import UserfaultfdDiagnostics

// The examples of the Userfaultfd and UserfaultfdDiagnostics documentation, each in a
// context that gives it the names it uses. The cheap, self-contained ones also run.

/// GettingStarted.md, in order, and `Userfaultfd.Options`.
func gettingStarted() throws {
    let support = try Userfaultfd.probe()
    print(support.features)   // [PAGEFAULT_FLAG_WP, EVENT_FORK, …, MOVE]

    let uffd = try Userfaultfd(.init().requiring(.threadID).preferring(.move))
    let memory = try MemoryMapping.anonymous(length: 16 * systemPageSize)
    let ioctls = try uffd.handle.register(memory.range, mode: .missing, requiring: .copy)
    print(ioctls)   // [WAKE, COPY, ZEROPAGE, MOVE, POISON] on anonymous memory

    let handle = uffd.handle
    let buffer = Userfaultfd.EventBuffer(capacity: 16)
    if try handle.wait(stop: nil, timeoutMilliseconds: 1000) == .ready {
        try handle.readEvents(into: buffer)
        for case .pageFault(let fault) in buffer.events {
            let page = [UInt8](repeating: 0x2A, count: systemPageSize)
            let pageStart = fault.address & ~UInt64(systemPageSize - 1)
            switch try handle.copy(to: pageStart, from: page.span.bytes) {
            case .completed, .alreadyPresent: break           // the thread runs again
            case .partial: break                               // copy the rest
            case .retryAfterEvents: try handle.readEvents(into: buffer)  // then retry
            }
        }
    }

    let stale = uffd.handle
    try uffd.close()
    assert(!stale.isOpen)   // stale.register(…) now throws EBADF
}

/// ResolvingFaults.md.
func startHandler(for handle: Userfaultfd.Handle, stop: StopSignal,
                  page: @escaping @Sendable (UInt64) -> [UInt8]) -> DedicatedThread {
    DedicatedThread(name: "uffd-handler") {
        let buffer = Userfaultfd.EventBuffer(capacity: 64)
        do {
            while try handle.wait(stop: stop) == .ready {
                try handle.readEvents(into: buffer)
                for event in buffer.events {
                    guard case .pageFault(let fault) = event else { continue }
                    let start = fault.address & ~UInt64(systemPageSize - 1)
                    let bytes = page(start)
                    _ = try handle.copy(to: start, from: bytes.span.bytes)
                }
            }
        } catch {
            print("handler stopped: \(error)")
        }
    }
}

func stoppingTheHandler(_ uffd: borrowing Userfaultfd) throws {
    let stop = try StopSignal()
    let handler = startHandler(for: uffd.handle, stop: stop) { _ in
        [UInt8](repeating: 0, count: systemPageSize)
    }
    // … the program runs and faults …
    stop.raise()
    handler.join()
}

func serve(_ handle: Userfaultfd.Handle, socket: FileDescriptor, stop: StopSignal) throws {
    let buffer = Userfaultfd.EventBuffer(capacity: 64)
    while true {
        let readiness = try handle.wait(stop: stop, watching: [socket])
        if readiness.stopped || readiness.hangUp { return }
        if readiness.watched.contains(0) { /* read a request from the socket */ }
        if readiness.messages { try handle.readEvents(into: buffer) /* and resolve */ }
    }
}

/// ResolvingFaults.md and `Handle.writeProtect(_:mode:)`.
func protecting(_ handle: Userfaultfd.Handle, _ range: MemoryRange) throws {
    try handle.writeProtect(range, mode: .writeProtect)   // protect
    try handle.writeProtect(range, mode: [])              // unprotect and wake the writers
}

/// `Handle.copy(to:from:mode:)`, both overloads.
func copyExamples(_ handle: Userfaultfd.Handle, _ fault: Userfaultfd.PageFault) throws -> [Userfaultfd.Outcome] {
    var outcomes: [Userfaultfd.Outcome] = []
    do {
        let page = [UInt8](repeating: 0x2A, count: systemPageSize)
        let outcome = try page.withUnsafeBytes { bytes in
            try handle.copy(to: fault.address, from: bytes)
        }
        outcomes.append(outcome)
    }
    do {
        let page = [UInt8](repeating: 0x2A, count: systemPageSize)
        let outcome = try handle.copy(to: fault.address, from: page.span.bytes)
        outcomes.append(outcome)
    }
    return outcomes
}

/// `Handle.wait(stop:watching:timeoutMilliseconds:)`.
func watching(_ handle: Userfaultfd.Handle, stop: StopSignal, socket: FileDescriptor, buffer: Userfaultfd.EventBuffer) throws {
    let readiness = try handle.wait(stop: stop, watching: [socket])
    if readiness.watched.contains(0) { /* read the socket */ }
    if readiness.messages { try handle.readEvents(into: buffer) }
}

/// `PagemapScanner`.
func scanning(_ region: MemoryRange) throws -> PagemapScanner.Result {
    let scanner = try PagemapScanner()
    let dirty = try scanner.scan(region, flags: .writeProtectMatching,
                                 required: .written, returning: .written)
    return dirty
}

/// HandingOver.md and `DescriptorPassing.send(_:over:)`.
func handingOver(_ uffd: borrowing Userfaultfd) throws -> Userfaultfd.Features {
    let (mine, theirs) = try DescriptorPassing.socketPair()
    try DescriptorPassing.send(uffd, over: mine)
    // in the other process, which holds `theirs`:
    let adopted = try DescriptorPassing.receiveUserfaultfd(from: theirs)
    print(adopted.features)
    try mine.close()
    try theirs.close()
    return adopted.features
}

/// UserfaultfdDiagnostics.md.
func probing() -> String {
    let probe = SystemProbe.run()
    print(probe.text)
    return probe.text
}

@Suite("Userfaultfd examples run", .needsUserfaultfd, .sharesProcess, .serialized)
struct UserfaultfdExamplesRun {
    @Test("the copy examples install the page, then find it present")
    func copies() throws {
        let memory = try MemoryMapping.anonymous(length: systemPageSize)
        let uffd = try Userfaultfd(features: [])
        try uffd.handle.register(memory.range, mode: .missing)
        let outcomes = try copyExamples(uffd.handle, Userfaultfd.PageFault(address: memory.range.start, flags: []))
        #expect(outcomes == [.completed(systemPageSize), .alreadyPresent])
        #expect(memory.bytes.allSatisfy { $0 == 0x2A })
    }

    @Test("the hand-over example keeps the features")
    func handOver() throws {
        let uffd = try Userfaultfd(features: [.threadID])
        #expect(try handingOver(uffd) == [.threadID])
    }

    @Test("the PagemapScanner example finds a written page", .enabled(if: (try? Userfaultfd.probe().features.contains(.wpAsync)) == true, "no WP_ASYNC here"))
    func scan() throws {
        let memory = try MemoryMapping.anonymous(length: 4 * systemPageSize)
        let uffd = try Userfaultfd(features: [.pagefaultFlagWP, .wpAsync])
        try uffd.handle.register(memory.range, mode: .writeProtect)
        try uffd.handle.writeProtect(memory.range, mode: .writeProtect)
        memory.bytes[2 * systemPageSize] = 1
        let result = try scanning(memory.range)
        #expect(result.regions.map(\.range) == [MemoryRange(start: memory.address(at: 2 * systemPageSize), length: UInt64(systemPageSize))])
    }

    @Test("the watching examples see a readable pipe")
    func watchingPipe() throws {
        let uffd = try Userfaultfd(features: [])
        var fds: [Int32] = [-1, -1]
        try #require(pipe(&fds) == 0)
        let (readEnd, writeEnd) = (FileDescriptor(rawValue: fds[0]), FileDescriptor(rawValue: fds[1]))
        defer { try? readEnd.close(); try? writeEnd.close() }
        _ = try writeEnd.writeAll([UInt8(1)])
        let stop = try StopSignal()
        try watching(uffd.handle, stop: stop, socket: readEnd, buffer: Userfaultfd.EventBuffer(capacity: 1))
        stop.raise()
        try serve(uffd.handle, socket: readEnd, stop: stop)   // returns at once: stopped
        try stoppingTheHandler(uffd)
    }

    @Test("the getting-started example runs: no fault arrives, the wait times out, close stops the handle")
    func gettingStartedRuns() throws {
        try gettingStarted()
    }

    @Test("the probe example prints the report")
    func probe() {
        #expect(probing().contains("ioctls per memory type and register mode"))
    }
}
