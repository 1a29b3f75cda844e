import Glibc
import Synchronization
import SystemPackage
import Testing
import Userfaultfd
import UserfaultfdDiagnostics

/// The memory types of the matrix.
enum MemoryKind: String, Codable, Sendable, CaseIterable, CustomTestStringConvertible {
    case anonymous, shmem, hugetlb

    /// The kinds that need nothing reserved; hugetlb cases are separate tests with a condition.
    static let ordinary: [MemoryKind] = [.anonymous, .shmem]

    var testDescription: String { rawValue }
    var mappingKind: MemoryMapping.Kind {
        switch self {
        case .anonymous: .anonymous
        case .shmem: .shmem
        case .hugetlb: .hugetlb
        }
    }
    var pageSize: Int { self == .hugetlb ? HugePages.size : systemPageSize }
    /// Pages per test area: 16 base pages, or 4 huge pages (8 MiB).
    var pageCount: Int { self == .hugetlb ? 4 : 16 }
    var isShared: Bool { self != .anonymous }

    /// Features that write-protect mode needs on this memory.
    var writeProtectFeatures: Userfaultfd.Features {
        isShared ? [.pagefaultFlagWP, .wpHugetlbfsShmem] : [.pagefaultFlagWP]
    }
    /// The feature that minor mode needs on this memory.
    var minorFeature: Userfaultfd.Features { self == .hugetlb ? .minorHugetlbfs : .minorShmem }
    /// How pages are given back so that the next access finds none (as the selftests do).
    var releaseAdvice: Int32 { isShared ? MADV_REMOVE : MADV_DONTNEED }

    /// Maps `pages` pages (default ``pageCount``) of this memory.
    func map(pages: Int? = nil) throws -> MemoryMapping {
        let count = pages ?? pageCount
        if self == .hugetlb { HugePages.ensureFree(count) }
        return try MemoryMapping(kind: mappingKind, length: count * pageSize)
    }
}

/// The features the running kernel offers (none if it cannot be asked). A process that may
/// not create a full userfaultfd asks through a USER_MODE_ONLY one, which any user may create.
let kernelFeatures: Userfaultfd.Features =
    (try? Userfaultfd.probe().features) ?? (try? Userfaultfd.probe(userModeOnly: true).features) ?? []

extension Trait where Self == ConditionTrait {
    /// Runs the test only where the running kernel offers `features`.
    static func needsKernel(_ features: Userfaultfd.Features) -> Self {
        .enabled(if: kernelFeatures.isSuperset(of: features),
                 "the running kernel does not offer \(features.subtracting(kernelFeatures))")
    }

    /// Runs the test only where this process may open /dev/userfaultfd (mode 0600 root).
    static var needsDevice: Self {
        .enabled(if: access("/dev/userfaultfd", R_OK | W_OK) == 0, "/dev/userfaultfd cannot be opened by this user")
    }
}

/// A userfaultfd a test owns and can close early, which wakes any thread blocked on
/// one of its faults (the fault is then handled as if nothing were registered).
final class Session: @unchecked Sendable {
    private var owner: Userfaultfd?
    let handle: Userfaultfd.Handle

    init(features: Userfaultfd.Features) throws {
        let uffd = try Userfaultfd(features: features)
        handle = uffd.handle
        owner = consume uffd
    }

    init(adopting uffd: consuming Userfaultfd) {
        handle = uffd.handle
        owner = consume uffd
    }

    /// Closes the userfaultfd now (it is also closed when the session goes away).
    func close() { owner = nil }
}

/// Pages of known contents to copy from: page `i` is filled with `byte(i)`.
final class PageSource: @unchecked Sendable {
    let base: UnsafeMutableRawPointer
    let pageSize: Int
    let count: Int

    init(pageSize: Int, count: Int, byte: (Int) -> UInt8) {
        self.pageSize = pageSize
        self.count = count
        base = .allocate(byteCount: pageSize * count, alignment: systemPageSize)
        for i in 0..<count { memset(base + i * pageSize, Int32(byte(i)), pageSize) }
    }

    /// The usual pattern: no page is zero and neighbours differ.
    convenience init(pageSize: Int, count: Int) {
        self.init(pageSize: pageSize, count: count) { UInt8(truncatingIfNeeded: $0 &* 37 &+ 11) | 1 }
    }

    func page(_ i: Int) -> UnsafeRawPointer { UnsafeRawPointer(base + i * pageSize) }
    deinit { base.deallocate() }
}

/// A failure met on a thread where `#expect` cannot run.
struct Failure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// Throws unless a resolving ioctl installed everything asked for.
func requireCompleted(_ outcome: Userfaultfd.Outcome, _ length: Int, _ what: String) throws {
    if outcome != .completed(length) { throw Failure("\(what): \(outcome), expected completed(\(length))") }
}

/// Copies one page in as a resolver must: EEXIST means another resolver (or an
/// earlier message for the same page) won, and the faulting thread still needs a WAKE.
func copyPage(_ uffd: Userfaultfd.Handle, to start: UInt64, from source: UnsafeRawPointer, pageSize ps: Int, mode: Userfaultfd.CopyMode = []) throws {
    switch try uffd.copy(to: start, from: source, length: ps, mode: mode) {
    case .completed(ps): return
    case .alreadyPresent: try uffd.wake(MemoryRange(start: start, length: UInt64(ps)))
    case let other: throw Failure("UFFDIO_COPY at 0x\(String(start, radix: 16)): \(other)")
    }
}

/// The `UserfaultfdError` that `body` threw, or nil (an error of another type is recorded).
func error(of body: () throws -> Void) -> UserfaultfdError? {
    do {
        try body()
        return nil
    } catch let error as UserfaultfdError {
        return error
    } catch {
        Issue.record("unexpected error \(error)")
        return nil
    }
}

/// What a ``FaultServer`` saw besides page faults.
enum SeenEvent: Equatable, Sendable {
    case fork
    case remap(from: MemoryRange, to: MemoryRange)
    case remove(MemoryRange)
    case unmap(MemoryRange)
}

/// A resolver on a dedicated thread, the way a user serves faults with the module:
/// wait, read a batch, resolve each fault with `resolve`, count them by kind.
///
/// With `followForks`, a FORK event hands the child's userfaultfd over and the server
/// serves it from then on (as the kernel selftests do).
final class FaultServer: @unchecked Sendable {
    typealias Resolve = @Sendable (Userfaultfd.PageFault, Userfaultfd.Handle) throws -> Void
    typealias OnEvent = @Sendable (Userfaultfd.Event) -> Void

    let missingFaults = Atomic<Int>(0)
    let writeProtectFaults = Atomic<Int>(0)
    let minorFaults = Atomic<Int>(0)
    private let stopRequested = Atomic<Bool>(false)
    private let state = Mutex<(failures: [String], events: [SeenEvent], threadIDs: [Int32], writes: Int)>(([], [], [], 0))
    private let children = Mutex<[Session]>([])
    private let stopSignal: StopSignal
    private var thread: DedicatedThread?

    init(
        _ handle: Userfaultfd.Handle,
        followForks: Bool = false,
        unregisterRemoved: Bool = false,
        onEvent: OnEvent? = nil,
        resolve: @escaping Resolve
    ) throws {
        stopSignal = try StopSignal()
        let ready = try StopSignal()
        thread = start(handle, ready: ready, followForks: followForks, unregisterRemoved: unregisterRemoved, onEvent: onEvent, resolve: resolve)
        // A fork with EVENT_FORK holds malloc's locks until its FORK message is read: the
        // thread must be past its own allocations before anyone forks.
        if !waitReadable(ready.fileDescriptor, milliseconds: 10_000) { throw Failure("the resolver thread did not start") }
    }

    private func start(
        _ handle: Userfaultfd.Handle, ready: StopSignal, followForks: Bool, unregisterRemoved: Bool,
        onEvent: OnEvent?, resolve: @escaping Resolve
    ) -> DedicatedThread {
        DedicatedThread(name: "uffd-test-srv") { [self] in
            let buffer = Userfaultfd.EventBuffer(capacity: 16)
            var current = handle
            ready.raise()
            while true {
                do {
                    switch try current.wait(stop: stopSignal, timeoutMilliseconds: 200) {
                    case .stopped:
                        if !stopRequested.load(ordering: .sequentiallyConsistent) {
                            var link = [CChar](repeating: 0, count: 128)
                            let n = readlink("/proc/self/fd/\(stopSignal.fileDescriptor.rawValue)", &link, 127)
                            let target = n > 0 ? String(decoding: link.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self) : "closed"
                            fail("stopped unasked: fd \(stopSignal.fileDescriptor.rawValue) is now \(target)")
                        }
                        return
                    case .timedOut: continue
                    case .hangUp:
                        fail("the userfaultfd hung up")
                        return
                    case .ready: break
                    }
                    try current.readEvents(into: buffer)
                } catch {
                    fail("\(error)")
                    return
                }
                for event in buffer.events {
                    onEvent?(event)
                    switch event {
                    case .pageFault(let fault):
                        if fault.flags.contains(.minor) {
                            minorFaults.add(1, ordering: .sequentiallyConsistent)
                        } else if fault.flags.contains(.writeProtect) {
                            writeProtectFaults.add(1, ordering: .sequentiallyConsistent)
                        } else {
                            missingFaults.add(1, ordering: .sequentiallyConsistent)
                        }
                        state.withLock {
                            if let tid = fault.threadID { $0.threadIDs.append(tid) }
                            if fault.flags.contains(.write) { $0.writes += 1 }
                        }
                        do { try resolve(fault, current) } catch { fail("resolving \(fault): \(error)") }
                    case .fork(let child):
                        state.withLock { $0.events.append(.fork) }
                        if followForks, let uffd = child.take() {
                            let session = Session(adopting: uffd)
                            children.withLock { $0.append(session) }
                            current = session.handle
                        }
                    case .remap(let from, let to):
                        state.withLock { $0.events.append(.remap(from: from, to: to)) }
                    case .remove(let range):
                        state.withLock { $0.events.append(.remove(range)) }
                        if unregisterRemoved {
                            do { try current.unregister(range) } catch { fail("unregister after REMOVE: \(error)") }
                        }
                    case .unmap(let range):
                        state.withLock { $0.events.append(.unmap(range)) }
                    case .unknown(let code):
                        fail("unknown event 0x\(String(code, radix: 16))")
                    }
                }
            }
        }
    }

    private func fail(_ text: String) {
        say("server: \(text)")
        state.withLock { $0.failures.append(text) }
    }

    /// Stops the thread and waits for it. Calling it again does nothing.
    func stop() {
        stopRequested.store(true, ordering: .sequentiallyConsistent)
        stopSignal.raise()
        thread?.join()
    }

    var missing: Int { missingFaults.load(ordering: .sequentiallyConsistent) }
    var writeProtect: Int { writeProtectFaults.load(ordering: .sequentiallyConsistent) }
    var minor: Int { minorFaults.load(ordering: .sequentiallyConsistent) }
    var failures: [String] { state.withLock { $0.failures } }
    var events: [SeenEvent] { state.withLock { $0.events } }
    var threadIDs: [Int32] { state.withLock { $0.threadIDs } }
    /// Page faults that carried the WRITE flag.
    var writes: Int { state.withLock { $0.writes } }

    deinit { stop() }
}

/// Runs `body` (which touches registered memory) on a dedicated thread and waits for
/// it at most `seconds`. On a timeout the server is stopped and the userfaultfd closed,
/// which wakes the blocked thread, so a broken resolver fails the test instead of hanging it.
func runFaulting<T: Sendable>(
    _ name: String = "faulting",
    seconds: Int32 = 20,
    session: Session?,
    server: FaultServer? = nil,
    _ body: @escaping @Sendable () -> T
) -> T? {
    let result = Mutex<T?>(nil)
    guard let done = try? StopSignal() else {
        Issue.record("eventfd failed")
        return nil
    }
    let thread = DedicatedThread(name: name) {
        let value = body()
        result.withLock { $0 = value }
        done.raise()
    }
    if !waitReadable(done.fileDescriptor, milliseconds: seconds * 1000) {
        Issue.record("the \(name) thread did not finish within \(seconds) s: a fault or event was left unresolved")
        server?.stop()
        if let session {
            // Reading completes pending FORK/REMAP/REMOVE events (a fork or madvise waits
            // for that); closing the uffd then wakes threads blocked on page faults.
            let buffer = Userfaultfd.EventBuffer(capacity: 16)
            for _ in 0..<5 where (try? session.handle.readEvents(into: buffer)) != nil { usleep(10_000) }
            session.close()
        }
    }
    thread.join()
    return result.withLock { $0.take() }
}

/// Whether `fd` became readable within the timeout.
func waitReadable(_ fd: FileDescriptor, milliseconds: Int32) -> Bool {
    var p = pollfd(fd: fd.rawValue, events: Int16(POLLIN), revents: 0)
    return retryOnInterrupt { poll(&p, 1, milliseconds) } == 1
}

/// Compares `count` bytes; returns the offset of the first difference, or nil.
func firstDifference(_ a: UnsafeRawPointer, _ b: UnsafeRawPointer, _ count: Int) -> Int? {
    if memcmp(a, b, count) == 0 { return nil }
    for i in 0..<count where a.load(fromByteOffset: i, as: UInt8.self) != b.load(fromByteOffset: i, as: UInt8.self) {
        return i
    }
    return nil
}

/// A page of zeros as large as the largest page.
let zeros = PageSource(pageSize: HugePages.size, count: 1) { _ in 0 }

// MARK: - /proc/<pid>/pagemap

/// The pagemap bit for a uffd write-protected page.
let pagemapWriteProtected: UInt64 = 1 << 57
/// The pagemap bit for a present page.
let pagemapPresent: UInt64 = 1 << 63

/// The pagemap entry of `address` in process `pid` (this process by default).
func pagemapEntry(_ address: UInt64, pid: pid_t? = nil) throws -> UInt64 {
    let path = "/proc/\(pid.map { String($0) } ?? "self")/pagemap"
    let fd = try FileDescriptor.open(path, .readOnly, options: .closeOnExec)
    defer { try? fd.close() }
    var entry: UInt64 = 0
    let n = try withUnsafeMutableBytes(of: &entry) {
        try fd.read(fromAbsoluteOffset: Int64(address / UInt64(systemPageSize) * 8), into: $0)
    }
    if n != 8 { throw Failure("short read of \(path)") }
    return entry
}

/// Whether the page at `address` is write-protected by userfaultfd, per pagemap.
func isWriteProtected(_ address: UInt64, pid: pid_t? = nil) throws -> Bool {
    try pagemapEntry(address, pid: pid) & pagemapWriteProtected != 0
}

// MARK: - Child processes

/// Forks. The child runs `child`, which may only make system calls and touch memory
/// (the parent has other threads), and exits with its result.
func forkChild(_ child: () -> Int32) -> pid_t {
    let pid = fork()
    if pid == 0 { _exit(child()) }
    return pid
}

/// How a child ended.
enum ChildEnd: Equatable, CustomStringConvertible {
    case exited(Int32)
    case signalled(Int32)
    /// Still running after the time allowed (then killed): where it was, from /proc.
    case timedOut(seconds: Int, where: String)
    var description: String {
        switch self {
        case .exited(let code): "exited with \(code)"
        case .signalled(let signal): "killed by signal \(signal)"
        case .timedOut(let seconds, let place): "still running after \(seconds) s, killed; it was in\n\(place)"
        }
    }
}

/// Waits at most `seconds` for the child; kills it after that and returns
/// ``ChildEnd/timedOut(seconds:where:)`` with its kernel stack, system call and status,
/// which the caller's expectation on the end then shows under the test's name.
func waitChild(_ pid: pid_t, seconds: Int = 30) -> ChildEnd? {
    var status: Int32 = 0
    for _ in 0..<(seconds * 100) {
        let r = waitpid(pid, &status, WNOHANG)
        if r == pid { return decodeStatus(status) }
        if r < 0 && errno != EINTR {
            Issue.record("waitpid: errno \(errno)")
            return nil
        }
        usleep(10_000)
    }
    let state = readProcFile("/proc/\(pid)/status").split(separator: "\n").filter { $0.hasPrefix("State:") }.joined()
    let place = ["stack", "syscall", "wchan"].map { "\($0): \(readProcFile("/proc/\(pid)/\($0)"))" }.joined(separator: "\n") + "\n" + state
    kill(pid, SIGKILL)
    _ = waitpid(pid, &status, 0)
    return .timedOut(seconds: seconds, where: place)
}

/// The text of a small /proc file, or a note saying it could not be read.
func readProcFile(_ path: String) -> String {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    if fd < 0 { return "(cannot open: errno \(errno))" }
    defer { close(fd) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n <= 0 { break }
        bytes += chunk.prefix(n)
    }
    return String(decoding: bytes, as: UTF8.self)
}

private func decodeStatus(_ status: Int32) -> ChildEnd {
    status & 0x7f == 0 ? .exited((status >> 8) & 0xff) : .signalled(status & 0x7f)
}

/// Writes `text` to standard error without buffering (for exit tests and children).
func say(_ text: String) {
    var text = text + "\n"
    text.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
}

/// Runs `uffd-test-helper` (built next to the test bundle) and waits for it.
func runHelper(_ arguments: [String], seconds: Int = 30) throws -> ChildEnd? {
    var exe = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &exe, exe.count - 1)
    if n <= 0 { throw Failure("readlink /proc/self/exe failed") }
    let bundle = String(decoding: exe.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    let path = bundle.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/") + "/uffd-test-helper"
    if access(path, X_OK) != 0 { throw Failure("\(path) is missing: build it with `swift build`") }
    let argv = ([path] + arguments).map { strdup($0) } + [nil]
    defer { for p in argv { free(p) } }
    var pid: pid_t = 0
    let rc = posix_spawn(&pid, path, nil, nil, argv, environ)
    if rc != 0 { throw Failure("posix_spawn \(path): \(rc)") }
    return waitChild(pid, seconds: seconds)
}

/// The kernel's id of the calling thread, from `/proc/thread-self` ("<pid>/task/<tid>").
func currentThreadID() -> Int32 {
    var link = [CChar](repeating: 0, count: 64)
    let n = readlink("/proc/thread-self", &link, link.count - 1)
    guard n > 0 else { return -1 }
    let text = String(decoding: link.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    return text.split(separator: "/").last.flatMap { Int32($0) } ?? -1
}

/// A mapping held by reference, for where an optional one is needed.
final class Mapped: @unchecked Sendable {
    let mapping: MemoryMapping
    init(_ mapping: consuming MemoryMapping) { self.mapping = mapping }
    var range: MemoryRange { mapping.range }
    var base: UnsafeMutableRawPointer { mapping.base }
}
