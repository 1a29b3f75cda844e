import FaultEngine
import Synchronization
import TestSupport
import Testing
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Every suite that faults runs inside this one, one test at a time: tests also
/// count the process's descriptors and threads, which parallel tests would disturb.
/// Each nested suite carries its own time limit (one minute; the long stress form more).
@Suite(.serialized, .sharesProcess)
struct FaultEngineTests {}

let page = systemPageSize

/// The byte every test image holds at `offset`: varies within and across pages.
@inline(__always)
func imageByte(_ offset: Int) -> UInt8 {
    UInt8(truncatingIfNeeded: (offset &* 2_654_435_761) >> 7 ^ (offset / 4096) &* 31)
}

/// A memory source holding the test image.
func imageSource(pages: Int, allowsMoving: Bool = false) throws -> MemorySource {
    try MemorySource(length: pages * page, allowsMoving: allowsMoving) { bytes in
        for i in 0..<bytes.count { bytes[i] = imageByte(i) }
    }
}

/// A temporary file holding the test image; removed when this value goes away.
final class ImageFile {
    let path: String
    init(pages: Int) throws {
        var template = Array("/tmp/fault-engine-test-XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        precondition(fd >= 0, "mkstemp failed")
        path = String(decoding: template.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self)
        var bytes = [UInt8](repeating: 0, count: pages * page)
        for i in 0..<bytes.count { bytes[i] = imageByte(i) }
        let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        close(fd)
        if written != bytes.count { throw UserfaultfdError(operation: "write test image", kind: .malformed("short write")) }
    }
    deinit { unlink(path) }
}

/// The first offset in `bytes` that does not hold the image at `sourceOffset`, if any.
func firstMismatch(_ base: UnsafeRawPointer, count: Int, sourceOffset: Int = 0) -> Int? {
    for i in 0..<count where base.load(fromByteOffset: i, as: UInt8.self) != imageByte(sourceOffset + i) {
        return i
    }
    return nil
}

/// Where `touch` leaves its sum, so optimised builds cannot drop the reads.
nonisolated(unsafe) var touchSink: UInt8 = 0

/// Reads one byte of every page, in the order given, from registered memory.
@inline(never)
func touch(_ base: UnsafeMutableRawPointer, pages order: [Int]) {
    var sum: UInt8 = 0
    for p in order { sum &+= (base + p * page).load(as: UInt8.self) }
    touchSink &+= sum
}

/// A deterministic permutation of `0..<count`.
func permutation(_ count: Int, seed: UInt64) -> [Int] {
    var generator = SplitMix64(seed: seed)
    return Array(0..<count).shuffled(using: &generator)
}

/// Which pages of `range` are resident (mincore).
func residentPages(_ base: UnsafeMutableRawPointer, pages: Int) -> [Bool] {
    var vec = [UInt8](repeating: 0, count: pages)
    _ = mincore(base, pages * page, &vec)
    return vec.map { $0 & 1 != 0 }
}

/// Runs `body` on `count` dedicated threads at once and joins them.
func onThreads(_ count: Int, _ body: @escaping @Sendable (Int) -> Void) {
    let threads = (0..<count).map { i in DedicatedThread(name: "test-\(i)") { body(i) } }
    for t in threads { t.join() }
}

/// The open file descriptors of this process (a test that compares them owns the process).
func openDescriptorCount() -> Int { openDescriptors().count }

/// The names of this process's threads that belong to fault servers.
func serverThreadNames() -> [String] {
    guard let dir = opendir("/proc/self/task") else { return [] }
    defer { closedir(dir) }
    var names: [String] = []
    while let entry = readdir(dir) {
        let tid = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        guard tid.first?.isNumber == true else { continue }
        let fd = open("/proc/self/task/\(tid)/comm", O_RDONLY)
        guard fd >= 0 else { continue }
        var buffer = [UInt8](repeating: 0, count: 32)
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        close(fd)
        let name = String(decoding: buffer.prefix(max(n, 0)), as: UTF8.self)
        if name.hasPrefix("uffd-handler") || name.hasPrefix("uffd-prefetch") { names.append(name) }
    }
    return names
}

/// Events seen through `onEvent`.
final class EventLog: Sendable {
    let events = Mutex<[String]>([])
    let forks = Mutex<[Userfaultfd.ForkedUserfaultfd]>([])
    init() {
        forks.withLock { $0.reserveCapacity(8) }
    }

    /// Records events; a FORK of this process is kept without allocating (see `onEvent`).
    func callback() -> @Sendable (FaultServerEvent) -> Void {
        { [self] event in
            if case .fork(let child) = event {
                self.forks.withLock { $0.append(child) }
                return
            }
            self.events.withLock { $0.append(event.description) }
        }
    }
    var all: [String] { events.withLock { $0 } }
}

/// Makes anonymous memory, registers it MISSING on a new uffd with the layout events,
/// and serves `served` pages of it (all by default) from `source`.
func serve<S: PageSource>(
    _ source: S, mapping: borrowing MemoryMapping, served: Range<Int>? = nil,
    features: Userfaultfd.Features = [.eventRemove, .eventUnmap, .eventRemap],
    mode: Userfaultfd.RegisterMode = .missing,
    configuration: FaultServerConfiguration, alias: UInt64? = nil
) throws -> FaultServer<S> {
    let uffd = try Userfaultfd(features: features)
    try uffd.handle.register(mapping.range, mode: mode)
    let pages = served ?? 0..<(mapping.length / page)
    let range = MemoryRange(start: mapping.address(at: pages.lowerBound * page), length: UInt64(pages.count * page))
    return try FaultServer(
        userfaultfd: uffd,
        regions: [ServedRegion(range: range, sourceOffset: 0, pageCacheAlias: alias)],
        source: source, configuration: configuration)
}
