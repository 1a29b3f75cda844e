import TestSupport
import Foundation
import MapBench
import PagedMemory
import SystemPackage
import Testing
import Userfaultfd

/// A file store whose writes take `delay` microseconds each, or fail with EIO at the
/// listed offsets. Reads go to the file (and may be made in the faulting thread).
final class SlowOrFailingWrites: PageStore, @unchecked Sendable {
    let inner: FileStore
    let delay: UInt32
    let failing: Set<Int>
    var size: Int { inner.size }
    var signalReadableDescriptor: Int32? { inner.signalReadableDescriptor }

    init(_ inner: FileStore, delay: UInt32 = 0, failing: Set<Int> = []) {
        self.inner = inner
        self.delay = delay
        self.failing = failing
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws(Errno) {
        try inner.read(into: buffer, at: offset)
    }

    func write(_ buffer: UnsafeRawBufferPointer, at offset: Int) throws(Errno) {
        if failing.contains(offset) { throw .ioError }
        if delay > 0 { usleep(delay) }
        try inner.write(buffer, at: offset)
    }

    func synchronize() throws(Errno) { try inner.synchronize() }
}

@Suite(.sharesProcess, .serialized, .enabled(if: canUseUserfaultfd, "this process cannot create a userfaultfd"))
struct LimitTests {
    func pager(_ buffer: Int, _ resolution: FaultResolution) throws -> Pager {
        try makePager(buffer: buffer, resolution: resolution)
    }

    @Test("with the buffer full of dirty pages that write back slowly, four writers wait for room and lose nothing",
          .timeLimit(.minutes(3)), arguments: FaultResolution.allCases)
    func bufferFullWaits(resolution: FaultResolution) throws {
        let file = try PatternFile(size: 4 << 20)
        let buffer = 256 << 10
        let pager = try pager(buffer, resolution)
        let mapping = try pager.map(SlowOrFailingWrites(try FileStore(path: file.path), delay: 2_000))
        #expect(mapping.resolution == resolution)
        let pages = file.size / pageBytes
        let base = UInt(bitPattern: mapping.base)
        let threads = (0..<4).map { t in
            DedicatedThread(name: "writer-\(t)") {
                let p = UnsafeMutableRawPointer(bitPattern: base)!
                // Thread t writes every fourth page: each write dirties a new page.
                for page in stride(from: t, to: pages, by: 4) {
                    p.storeBytes(of: ~UInt64(page), toByteOffset: page * pageBytes + 8 * t, as: UInt64.self)
                }
            }
        }
        for t in threads { t.join() }
        let stats = pager.statistics
        #expect(stats.spaceWaits > 0, "1,024 dirty pages through a 64-page buffer written back at 2 ms a page must wait for room")
        #expect(stats.peakResidentBytes <= buffer)
        #expect(mapping.errors.isEmpty)
        try mapping.unmap()
        let words = file.words()
        var wrong = 0
        for page in 0..<pages {
            for w in 0..<pageWords {
                let i = page * pageWords + w
                let expected = w == page % 4 ? ~UInt64(page) : PatternFile.pattern(i)
                if words[i] != expected { wrong += 1 }
            }
        }
        #expect(wrong == 0)
    }

    @Test("a failing write-back is reported, the page keeps its data, flush and unmap throw, nothing hangs",
          .timeLimit(.minutes(2)), arguments: FaultResolution.allCases)
    func writeBackErrorKeepsThePage(resolution: FaultResolution) throws {
        let file = try PatternFile(size: 2 << 20)
        let failing: Set<Int> = [5 * pageBytes, 77 * pageBytes]
        let pager = try pager(256 << 10, resolution)
        let mapping = try pager.map(SlowOrFailingWrites(try FileStore(path: file.path), failing: failing))
        #expect(mapping.resolution == resolution)
        let pages = file.size / pageBytes
        for page in 0..<pages { mapping.base.storeBytes(of: UInt64(page) | 1 << 62, toByteOffset: page * pageBytes, as: UInt64.self) }
        // Read everything again: pages come and go through the 64-page buffer; the two
        // failing pages cannot leave and must still hold what was written.
        var wrong = 0
        for page in 0..<pages where mapping.base.load(fromByteOffset: page * pageBytes, as: UInt64.self) != UInt64(page) | 1 << 62 {
            wrong += 1
        }
        #expect(wrong == 0)
        let failedOffsets = Set(mapping.errors.compactMap { e -> Int? in
            if case .writeFailed(errno: EIO) = e.kind { return e.offset }
            return nil
        })
        #expect(failedOffsets == failing, "\(mapping.errors)")
        #expect(pager.statistics.pagesEvicted > 0)
        var flushError: PagedMappingError?
        do { try mapping.flush() } catch { flushError = error }
        #expect(flushError.map { failing.contains($0.offset) && $0.kind == .writeFailed(errno: EIO) } == true)
        var unmapError: PagedMappingError?
        do { try mapping.unmap() } catch { unmapError = error }
        #expect(unmapError != nil)
        let words = file.words()
        for page in 0..<pages {
            let expected = failing.contains(page * pageBytes) ? PatternFile.pattern(page * pageWords) : UInt64(page) | 1 << 62
            #expect(words[page * pageWords] == expected)
        }
    }

    @Test("resident memory stays within the buffer inside a memory cgroup four times smaller than the file",
          .timeLimit(.minutes(3)), arguments: FaultResolution.allCases)
    func boundedInMemoryCgroup(resolution: FaultResolution) throws {
        guard getuid() == 0 else {
            print("skipped: creating a memory cgroup needs root")
            return
        }
        let limit = 32 << 20
        let cgroup: MemoryCgroup
        do {
            cgroup = try MemoryCgroup(name: "paged-memory-test-\(getpid())-\(resolution.rawValue)", limit: limit)
        } catch {
            print("skipped: \(error)")
            return
        }
        defer { cgroup.remove() }
        let file = try PatternFile(size: 4 * limit, name: "cgroup")
        let buffer = 16 << 20
        let run = try runHelper(["cgroup", cgroup.path, file.path, String(buffer), resolution.rawValue])
        #expect(run.reason == .exit && run.status == 0, "the helper must not be killed by the cgroup's OOM killer: \(run.output)")
        #expect(run.output.contains("wrong 0"), "\(run.output)")
        #expect(run.output.contains("resolution \(resolution.rawValue)"), "\(run.output)")
        let numbers = Dictionary(uniqueKeysWithValues: run.output.split(separator: "\n").compactMap { line -> (String, Int)? in
            let parts = line.split(separator: " ")
            guard parts.count == 2, let n = Int(parts[1]) else { return nil }
            return (String(parts[0]), n)
        })
        let peak = try #require(numbers["peak"])
        let evicted = try #require(numbers["evicted"])
        let rssAnon = try #require(numbers["rss-anon-kib"])
        #expect(peak <= buffer + buffer / 20, "the pager's peak resident bytes")
        #expect(evicted > 0)
        // Anonymous memory is what the cgroup cannot reclaim without swap: the buffer,
        // plus the process's own heap and code (8 MiB is ample for this helper).
        #expect(rssAnon * 1024 <= buffer + (8 << 20), "RssAnon \(rssAnon) KiB")
    }
}
