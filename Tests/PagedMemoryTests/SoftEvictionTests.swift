import TestSupport
import Foundation
import PagedMemory
import SystemPackage
import Testing
import Userfaultfd

@Suite(.sharesProcess, .serialized, .enabled(if: canUseUserfaultfd, "this process cannot create a userfaultfd"))
struct SoftEvictionTests {
    static let buffer = 1 << 20

    func pager(_ resolution: FaultResolution) throws -> Pager {
        try makePager(buffer: Self.buffer, resolution: resolution, softEviction: true)
    }

    @Test("a hot set touched between cold reads comes back through minor faults, with the file's bytes, within the buffer",
          .timeLimit(.minutes(2)), arguments: FaultResolution.allCases)
    func hotSetIsReused(resolution: FaultResolution) throws {
        let file = try PatternFile(size: 16 << 20)
        let pager = try pager(resolution)
        let mapping = try pager.map(FileStore(path: file.path))
        #expect(mapping.resolution == resolution)
        let pages = file.size / 4096
        var rng = SplitMix(seed: 5)
        var wrong = 0
        var maxResident = 0
        for round in 0..<64 {
            for h in 0..<32 {
                let w = h * 7 * 512 + round % 512
                if mapping.base.load(fromByteOffset: w * 8, as: UInt64.self) != PatternFile.pattern(w) { wrong += 1 }
            }
            for _ in 0..<64 {
                let w = Int.random(in: 256 * 512 ..< pages * 512, using: &rng)
                if mapping.base.load(fromByteOffset: w * 8, as: UInt64.self) != PatternFile.pattern(w) { wrong += 1 }
            }
            maxResident = max(maxResident, pager.residentSize)
        }
        #expect(wrong == 0)
        #expect(maxResident <= Self.buffer)
        let stats = pager.statistics
        #expect(stats.peakResidentBytes <= Self.buffer)
        #expect(stats.pagesSoftEvicted > 0, "4,096 random pages through a 256-page buffer must unmap some")
        #expect(stats.pagesEvicted > 0)
        #expect(stats.softHits > 0, "the hot pages are touched every round, so some must come back without a read")
        try mapping.unmap()
    }

    @Test("dirty pages unmapped, written again and dropped reach the file; a private mapping's stay out of it",
          .timeLimit(.minutes(2)), arguments: [PagedMapping.Sharing.shared, .private], FaultResolution.allCases)
    func dirtyPagesSurvive(sharing: PagedMapping.Sharing, resolution: FaultResolution) throws {
        let file = try PatternFile(size: 8 << 20)
        let before = file.words()
        let pager = try pager(resolution)
        let mapping = try pager.map(FileStore(path: file.path, writable: sharing == .shared), sharing: sharing)
        let pages = file.size / 4096
        // Two passes: the second writes pages that were unmapped or dropped after the first.
        for pass in 1...2 {
            for p in 0..<pages {
                mapping.base.storeBytes(of: UInt64(p) | UInt64(pass) << 60, toByteOffset: p * 4096 + pass * 8, as: UInt64.self)
            }
        }
        for p in 0..<pages {
            #expect(mapping.base.load(fromByteOffset: p * 4096 + 8, as: UInt64.self) == UInt64(p) | 1 << 60)
            #expect(mapping.base.load(fromByteOffset: p * 4096 + 16, as: UInt64.self) == UInt64(p) | 2 << 60)
            #expect(mapping.base.load(fromByteOffset: p * 4096 + 24, as: UInt64.self) == PatternFile.pattern(p * 512 + 3))
        }
        #expect(pager.statistics.pagesSoftEvicted > 0)
        try mapping.flush()
        if sharing == .shared {
            for p in 0..<pages {
                #expect(file.word(p * 512 + 1) == UInt64(p) | 1 << 60)
                #expect(file.word(p * 512 + 2) == UInt64(p) | 2 << 60)
            }
        } else {
            #expect(file.words() == before)
        }
        try mapping.unmap()
    }
}
