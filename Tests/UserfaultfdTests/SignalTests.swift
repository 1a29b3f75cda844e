import Glibc
import TestSupport
import Testing
import Userfaultfd

extension Matrix {
    /// `sigbus`, `sigbus-wp`: with FEATURE_SIGBUS a fault raises SIGBUS in the faulting
    /// thread instead of queuing a message; a forked child inherits that. Each case runs
    /// in a process of its own (it installs a SIGBUS handler); the exit code says how it went.
    @Suite("sigbus", .needsUserfaultfd) struct Sigbus {
        @Test("every fault is a SIGBUS, resolved in the handler; a forked child gets them too",
              arguments: MemoryKind.ordinary, [false, true])
        func sigbus(_ kind: MemoryKind, writeProtect: Bool) async { await expectSigbusCase(kind, writeProtect) }

        @Test("sigbus on hugetlb", .needsFreeHugePages(8), arguments: [false, true])
        func sigbusHugetlb(writeProtect: Bool) async { await expectSigbusCase(.hugetlb, writeProtect) }
    }

    /// `poison`: UFFDIO_POISON on every other page; each poisoned page raises one SIGBUS.
    @Suite("poison", .needsKernel(.poison), .needsUserfaultfd) struct Poison {
        @Test("exactly half the pages poisoned give exactly that many SIGBUS", arguments: MemoryKind.ordinary)
        func poison(_ kind: MemoryKind) async { await expectPoisonCase(kind) }

        @Test("poison on hugetlb", .needsFreeHugePages(8))
        func poisonHugetlb() async { await expectPoisonCase(.hugetlb) }
    }
}

func expectSigbusCase(_ kind: MemoryKind, _ writeProtect: Bool) async {
    let result = await #expect(processExitsWith: .success, observing: [\.standardErrorContent]) { [kind, writeProtect] in
        exit(sigbusCase(kind, writeProtect: writeProtect))
    }
    if result == nil { Issue.record("sigbus case failed (exit code = step; messages follow)") }
}

func expectPoisonCase(_ kind: MemoryKind) async {
    // The process exits with the number of SIGBUS it took.
    await #expect(processExitsWith: .exitCode(Int32(kind.pageCount / 2))) { [kind] in
        exit(poisonCase(kind))
    }
}

// MARK: - The SIGBUS handler of these processes

/// What the handler does with a SIGBUS in the test area.
enum SigbusMode {
    /// Resolve it: the first signal on a page copies it in (write-protected with WP),
    /// the second (a WP fault) unprotects it.
    case resolve
    /// Count it and map fresh zeroed memory over the page so the access can go on.
    case replace
}

/// The handler's state, set before it is installed; only the faulting thread changes it after.
struct SigbusContext {
    var mode = SigbusMode.replace
    var handle: Userfaultfd.Handle?
    var base: UInt64 = 0
    var pageSize = systemPageSize
    var pages = 0
    var source: UnsafeRawPointer?
    var pageState: UnsafeMutablePointer<UInt8>?
    var writeProtect = false
    var missingSignals = 0
    var writeProtectSignals = 0
    var replaced = 0
    var strays = 0
}

nonisolated(unsafe) var sigbusContext = SigbusContext()

private func replacePage(_ start: UInt64) {
    let ps = sigbusContext.pageSize
    _ = mmap(UnsafeMutableRawPointer(bitPattern: UInt(start)), ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0)
}

private func onSigbus(_ number: Int32, _ info: UnsafeMutablePointer<siginfo_t>?, _ context: UnsafeMutableRawPointer?) {
    let address = UInt64(UInt(bitPattern: info?.pointee._sifields._sigfault.si_addr))
    let ps = UInt64(sigbusContext.pageSize)
    let base = sigbusContext.base
    guard address >= base, address < base + UInt64(sigbusContext.pages) * ps else {
        // Not ours: let the default action kill the process.
        signal(SIGBUS, SIG_DFL)
        return
    }
    let page = Int((address - base) / ps)
    let start = base + UInt64(page) * ps
    switch sigbusContext.mode {
    case .replace:
        sigbusContext.replaced += 1
        replacePage(start)
    case .resolve:
        guard let handle = sigbusContext.handle, let state = sigbusContext.pageState, let source = sigbusContext.source else { return }
        if state[page] == 0 {
            state[page] = 1
            let outcome = try? handle.copy(to: start, from: source + page * Int(ps), length: Int(ps),
                                           mode: sigbusContext.writeProtect ? .writeProtect : [])
            if outcome == .completed(Int(ps)) { sigbusContext.missingSignals += 1 } else { sigbusContext.strays += 1; replacePage(start) }
        } else if state[page] == 1 && sigbusContext.writeProtect {
            state[page] = 2
            let outcome = try? handle.writeProtect(MemoryRange(start: start, length: ps), mode: [])
            if outcome == .completed(Int(ps)) { sigbusContext.writeProtectSignals += 1 } else { sigbusContext.strays += 1; replacePage(start) }
        } else {
            sigbusContext.strays += 1
            replacePage(start)
        }
    }
}

private func installSigbusHandler() {
    var action = sigaction()
    action.__sigaction_handler.sa_sigaction = onSigbus
    action.sa_flags = SA_SIGINFO | SA_NODEFER
    sigaction(SIGBUS, &action, nil)
}

// MARK: - The cases, run in processes of their own

/// Returns 0, or the number of the step that failed (with a message on stderr).
func sigbusCase(_ kind: MemoryKind, writeProtect: Bool) -> Int32 {
    alarm(40)  // a hang ends as SIGALRM
    do {
        var features: Userfaultfd.Features = [.sigbus, .eventFork]
        if writeProtect { features.formUnion(kind.writeProtectFeatures) }
        let session = try Session(features: features)
        let m = try kind.map()
        let ps = kind.pageSize, n = kind.pageCount, split = (n + 1) / 2
        let src = PageSource(pageSize: ps, count: n)
        try session.handle.register(m.range, mode: writeProtect ? [.missing, .writeProtect] : .missing)
        let state = UnsafeMutablePointer<UInt8>.allocate(capacity: n)
        state.initialize(repeating: 0, count: n)
        sigbusContext = SigbusContext(
            mode: .resolve, handle: session.handle, base: m.range.start, pageSize: ps, pages: n,
            source: UnsafeRawPointer(src.base), pageState: state, writeProtect: writeProtect)
        installSigbusHandler()

        // 1. Faults in this process: one SIGBUS per page (two with WP), resolved in the handler.
        for p in 0..<split {
            if firstDifference(m.base + p * ps, src.page(p), ps) != nil { say("page \(p) differs"); return 2 }
            m.base.storeBytes(of: m.base.load(fromByteOffset: p * ps, as: UInt8.self), toByteOffset: p * ps, as: UInt8.self)
        }
        let c = sigbusContext
        if c.missingSignals != split || c.writeProtectSignals != (writeProtect ? split : 0) || c.strays != 0 {
            say("signals: missing \(c.missingSignals) wp \(c.writeProtectSignals) stray \(c.strays), expected \(split) each")
            return 3
        }

        // 2. A forked child (EVENT_FORK) faults on released pages: SIGBUS there too, no message here.
        if madvise(m.base, n * ps, kind.releaseAdvice) != 0 { say("release: errno \(errno)"); return 4 }
        let server = try FaultServer(session.handle, followForks: true) { fault, _ in throw Failure("a message for \(fault)") }
        sigbusContext.mode = .replace
        sigbusContext.replaced = 0
        let base = m.range.start
        let end = runFaulting("fork", seconds: 30, session: session, server: server) { () -> ChildEnd? in
            let pid = forkChild {
                let area = UnsafeMutableRawPointer(bitPattern: UInt(base))!
                for p in 0..<split where memcmp(area + p * ps, zeros.page(0), ps) != 0 { return 100 }
                return sigbusContext.replaced == split ? 0 : Int32(1 + sigbusContext.replaced)
            }
            return pid > 0 ? waitChild(pid, seconds: 20) : nil
        }
        server.stop()
        if end != .exited(0) { say("child: \(String(describing: end))"); return 5 }
        if server.events != [.fork] || server.missing + server.writeProtect + server.minor != 0 || !server.failures.isEmpty {
            say("server saw \(server.events), faults \(server.missing)/\(server.writeProtect)/\(server.minor), \(server.failures)")
            return 6
        }
        return 0
    } catch {
        say("\(error)")
        return 1
    }
}

/// Returns the number of SIGBUS taken, or 100+ for a failed step.
func poisonCase(_ kind: MemoryKind) -> Int32 {
    alarm(40)
    do {
        let session = try Session(features: [.poison])
        let m = try kind.map()
        let ps = kind.pageSize, n = kind.pageCount
        try session.handle.register(m.range, mode: .missing, requiring: [.copy, .poison])
        let base = m.range.start
        // Odd pages get a zeroed page, even pages are poisoned.
        let server = try FaultServer(session.handle) { fault, uffd in
            let page = Int(fault.address - base) / ps
            let start = base + UInt64(page * ps)
            if page % 2 == 1 {
                try requireCompleted(uffd.copy(to: start, from: zeros.page(0), length: ps), ps, "UFFDIO_COPY")
            } else {
                try requireCompleted(uffd.poison(MemoryRange(start: start, length: UInt64(ps))), ps, "UFFDIO_POISON")
            }
        }
        sigbusContext = SigbusContext(mode: .replace, base: base, pageSize: ps, pages: n)
        installSigbusHandler()
        for p in 0..<n where firstDifference(m.base + p * ps, zeros.page(0), ps) != nil {
            say("page \(p) is not zero")
            return 101
        }
        server.stop()
        if server.missing != n || !server.failures.isEmpty {
            say("faults \(server.missing), failures \(server.failures)")
            return 102
        }
        return Int32(sigbusContext.replaced)
    } catch {
        say("\(error)")
        return 100
    }
}
