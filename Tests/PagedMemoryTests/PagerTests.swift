import TestSupport
import Foundation
import PagedMemory
import SystemPackage
import Testing
import Userfaultfd

@Suite(.sharesProcess, .serialized, .enabled(if: canUseUserfaultfd, "this process cannot create a userfaultfd"))
struct PagerTests {
    static let buffer = 1 << 20

    func pager(_ buffer: Int = PagerTests.buffer, policy: ReplacementPolicy = .clock,
               resolution: FaultResolution = .handlerThreads) throws -> Pager {
        try makePager(buffer: buffer, policy: policy, resolution: resolution)
    }

    @Test("random reads see the file's bytes while resident memory stays within the buffer", .timeLimit(.minutes(2)),
          arguments: FaultResolution.allCases)
    func boundedRandomReads(resolution: FaultResolution) throws {
        let file = try PatternFile(size: 16 << 20)
        let pager = try pager(resolution: resolution)
        let mapping = try pager.map(FileStore(path: file.path))
        #expect(mapping.resolution == resolution)
        var rng = SplitMix(seed: 1)
        var wrong = 0
        var maxResident = 0
        for step in 0..<20_000 {
            let w = Int.random(in: 0..<file.size / 8, using: &rng)
            if mapping.base.load(fromByteOffset: w * 8, as: UInt64.self) != PatternFile.pattern(w) { wrong += 1 }
            if step % 64 == 0 { maxResident = max(maxResident, pager.residentSize) }
        }
        #expect(wrong == 0)
        #expect(maxResident <= PagerTests.buffer)
        let stats = pager.statistics
        #expect(stats.peakResidentBytes <= PagerTests.buffer)
        #expect(stats.pagesEvicted > 0, "16 MiB of random reads through a 1 MiB buffer must evict")
        try mapping.unmap()
    }

    @Test("dirty pages that are evicted reach the file", .timeLimit(.minutes(2)),
          arguments: FaultResolution.allCases)
    func evictedDirtyPagesReachTheFile(resolution: FaultResolution) throws {
        let file = try PatternFile(size: 8 << 20)
        let pager = try pager(resolution: resolution)
        let mapping = try pager.map(FileStore(path: file.path))
        #expect(mapping.resolution == resolution)
        let pages = file.size / pageBytes
        for p in 0..<pages { mapping.base.storeBytes(of: UInt64(p) | 1 << 63, toByteOffset: p * pageBytes, as: UInt64.self) }
        // No flush: only eviction has written anything so far.
        var updated = 0
        for p in 0..<pages {
            let w = file.word(p * pageWords)
            if w == UInt64(p) | 1 << 63 { updated += 1 } else { #expect(w == PatternFile.pattern(p * pageWords)) }
        }
        #expect(updated >= pages - PagerTests.buffer / pageBytes, "pages beyond the buffer must have been written back")
        // The evictor counts a write-back once its write is done: one may be landing in
        // the file while the count above reads it. Give the count a moment to catch up.
        var writtenBack = pager.statistics.pagesWrittenBack
        for _ in 0..<200 where writtenBack < updated {
            usleep(10_000)
            writtenBack = pager.statistics.pagesWrittenBack
        }
        #expect(writtenBack >= updated)
        // Read back through the mapping: evicted pages come back with what was written.
        for p in 0..<pages { #expect(mapping.base.load(fromByteOffset: p * pageBytes, as: UInt64.self) == UInt64(p) | 1 << 63) }
        try mapping.unmap()
    }

    @Test("a private mapping keeps its writes across eviction and never writes the file", .timeLimit(.minutes(2)),
          arguments: FaultResolution.allCases)
    func privateMappingNeverWrites(resolution: FaultResolution) throws {
        let file = try PatternFile(size: 4 << 20)
        let before = file.words()
        let pager = try pager(resolution: resolution)
        let mapping = try pager.map(FileStore(path: file.path, writable: false), sharing: .private)
        #expect(mapping.resolution == resolution)
        let pages = file.size / pageBytes
        for p in 0..<pages { mapping.base.storeBytes(of: UInt64(p) ^ 0xFFFF, toByteOffset: p * pageBytes + 8, as: UInt64.self) }
        var wrong = 0
        for p in 0..<pages {
            if mapping.base.load(fromByteOffset: p * pageBytes + 8, as: UInt64.self) != UInt64(p) ^ 0xFFFF { wrong += 1 }
            if mapping.base.load(fromByteOffset: p * pageBytes, as: UInt64.self) != PatternFile.pattern(p * pageWords) { wrong += 1 }
        }
        #expect(wrong == 0)
        #expect(pager.statistics.pagesEvicted > 0)
        try mapping.flush()
        try mapping.unmap()
        #expect(file.words() == before)
    }

    @Test("four threads reading and writing random pages see their own writes and the file gets them all", .timeLimit(.minutes(3)),
          arguments: FaultResolution.allCases)
    func fourThreads(resolution: FaultResolution) throws {
        let file = try PatternFile(size: 16 << 20)
        let pager = try pager(resolution: resolution)
        let mapping = try pager.map(FileStore(path: file.path))
        #expect(mapping.resolution == resolution)
        let words = file.size / 8
        let perThread = 5_000
        let errorCounts = UnsafeMutablePointer<Int>.allocate(capacity: 4)
        errorCounts.initialize(repeating: 0, count: 4)
        defer { errorCounts.deallocate() }
        let errorsAddress = UInt(bitPattern: errorCounts)
        let base = UInt(bitPattern: mapping.base)
        let threads = (0..<4).map { t in
            DedicatedThread(name: "rw-\(t)") {
                let p = UnsafeMutableRawPointer(bitPattern: base)!
                let errors = UnsafeMutablePointer<Int>(bitPattern: errorsAddress)!
                var rng = SplitMix(seed: UInt64(t + 10))
                for _ in 0..<perThread {
                    // Each thread owns the words w with w % 4 == t.
                    let w = Int.random(in: 0..<words / 4, using: &rng) * 4 + t
                    let old = p.load(fromByteOffset: w * 8, as: UInt64.self)
                    let expected = old == PatternFile.pattern(w) || old >> 56 == 0xC0 + UInt64(t)
                    if !expected { errors[t] += 1 }
                    let value = (0xC0 + UInt64(t)) << 56 | UInt64(w)
                    p.storeBytes(of: value, toByteOffset: w * 8, as: UInt64.self)
                    if p.load(fromByteOffset: w * 8, as: UInt64.self) != value { errors[t] += 1 }
                }
            }
        }
        for t in threads { t.join() }
        #expect((0..<4).map { errorCounts[$0] } == [0, 0, 0, 0])
        try mapping.unmap()
        var wrong = 0
        var written = 0
        for (w, value) in file.words().enumerated() where value != PatternFile.pattern(w) {
            if value == (0xC0 + UInt64(w % 4)) << 56 | UInt64(w) { written += 1 } else { wrong += 1 }
        }
        #expect(wrong == 0)
        #expect(written > 15_000, "20,000 random writes over 2 million words hit over 15,000 distinct words")
    }

    @Test("unmapping writes dirty pages back", .timeLimit(.minutes(1)))
    func unmapWritesBack() throws {
        let file = try PatternFile(size: 512 << 10)
        let pager = try pager(4 << 20)
        let mapping = try pager.map(FileStore(path: file.path), pageSize: 16 << 10)
        for w in stride(from: 0, to: file.size / 8, by: 100) { mapping.base.storeBytes(of: ~UInt64(w), toByteOffset: w * 8, as: UInt64.self) }
        #expect(pager.statistics.pagesEvicted == 0, "the buffer holds the whole file")
        #expect(file.word(100) == PatternFile.pattern(100))
        try mapping.unmap()
        let after = file.words()
        for w in 0..<after.count { #expect(after[w] == (w % 100 == 0 ? ~UInt64(w) : PatternFile.pattern(w))) }
    }

    @Test("page sizes from 4 KiB to 2 MiB, O_DIRECT and a sparse multi-file store give the same bytes", .timeLimit(.minutes(2)),
          arguments: [4 << 10, 12 << 10, 64 << 10, 2 << 20])
    func pageSizesAndStores(pageSize: Int) throws {
        let file = try PatternFile(size: 8 << 20)
        let pager = try pager(8 << 20)
        for store in [try FileStore(path: file.path), try FileStore(path: file.path, mode: .direct)] as [FileStore] {
            let mapping = try pager.map(store, pageSize: pageSize)
            var rng = SplitMix(seed: UInt64(pageSize))
            for _ in 0..<2000 {
                let w = Int.random(in: 0..<file.size / 8, using: &rng)
                #expect(mapping.base.load(fromByteOffset: w * 8, as: UInt64.self) == PatternFile.pattern(w))
            }
            try mapping.unmap()
        }
        let directory = NSTemporaryDirectory() + "/sparse-\(getpid())-\(pageSize)"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let sparse = try SparseFileStore(directory: directory, size: 32 << 20, extentSize: 4 << 20)
        let mapping = try pager.map(sparse, pageSize: pageSize)
        for i in stride(from: 0, to: 32 << 20, by: 5 << 20) { mapping.base.storeBytes(of: UInt64(i) + 1, toByteOffset: i, as: UInt64.self) }
        try mapping.flush()
        try mapping.unmap()
        let files = try FileManager.default.contentsOfDirectory(atPath: directory)
        // A written page lands in every extent it overlaps, and only there.
        var extents = Set<Int>()
        for i in stride(from: 0, to: 32 << 20, by: 5 << 20) {
            let start = i / pageSize * pageSize
            for e in start / (4 << 20) ... (min(start + pageSize, 32 << 20) - 1) / (4 << 20) { extents.insert(e) }
        }
        #expect(Set(files) == Set(extents.map { sparse.path(ofExtent: $0).split(separator: "/").last.map(String.init)! }))
        let again = try pager.map(SparseFileStore(directory: directory, size: 32 << 20, extentSize: 4 << 20), pageSize: pageSize)
        for i in stride(from: 0, to: 32 << 20, by: 5 << 20) { #expect(again.base.load(fromByteOffset: i, as: UInt64.self) == UInt64(i) + 1) }
        #expect(again.base.load(fromByteOffset: 3 << 20, as: UInt64.self) == 0)
        try again.unmap()
    }

    @Test("10,000 mappings on one pager, each read and written", .timeLimit(.minutes(3)))
    func tenThousandMappings() throws {
        let file = try PatternFile(size: 64 << 10)
        let pager = try pager(4 << 20)
        let store = try FileStore(path: file.path, writable: false)
        var mappings: [PagedMapping] = []
        for _ in 0..<10_000 { mappings.append(try pager.map(store, sharing: .private)) }
        #expect(pager.mappingCount == 10_000)
        var wrong = 0
        for (i, m) in mappings.enumerated() {
            let w = i % (file.size / 8)
            if m.base.load(fromByteOffset: w * 8, as: UInt64.self) != PatternFile.pattern(w) { wrong += 1 }
            m.base.storeBytes(of: UInt64(i), toByteOffset: 0, as: UInt64.self)
        }
        for (i, m) in mappings.enumerated() where m.base.load(as: UInt64.self) != UInt64(i) { wrong += 1 }
        #expect(wrong == 0)
        #expect(pager.statistics.peakResidentBytes <= 4 << 20)
        for m in mappings { try m.unmap() }
        #expect(pager.mappingCount == 0)
    }
}
