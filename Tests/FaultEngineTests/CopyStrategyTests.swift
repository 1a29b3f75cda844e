import FaultEngine
import Testing
import TestSupport
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

extension FaultEngineTests {
    @Suite(.needsUserfaultfd, .serialized, .timeLimit(.minutes(1)))
    struct CopyStrategyTests {
        @Test func singlePageCopyServesEveryByteInRandomOrder() throws {
            let pages = 96
            let memory = try MemoryMapping.anonymous(length: pages * page)
            let server = try serve(try imageSource(pages: pages), mapping: memory, configuration: .handler4k)
            try server.start()
            touch(memory.base, pages: permutation(pages, seed: 7))
            server.stop()
            #expect(firstMismatch(memory.base, count: pages * page) == nil)
            let stats = server.statistics
            #expect(stats.missingFaults == UInt64(pages))
            #expect(stats.pagesInstalled == UInt64(pages))
            #expect(stats.pagesPrefetched == 0)
            #expect(stats.latencyCount == UInt64(pages))
            #expect(stats.latencyMax >= stats.latencyP50 && stats.latencyP50 > 0)
        }

        @Test func chunkedCopyStaysInsideTheRegionAndAlignsToItsBase() throws {
            // 48 pages registered, pages 5..<42 served: 37 pages, not a multiple of 16.
            let memory = try MemoryMapping.anonymous(length: 48 * page)
            let server = try serve(try imageSource(pages: 48), mapping: memory, served: 5..<42, configuration: .handler64k)
            try server.start()
            let base = memory.base + 5 * page
            touch(base, pages: Array(0..<37))
            let resident = residentPages(memory.base, pages: 48)
            server.stop()
            #expect(firstMismatch(base, count: 37 * page) == nil)
            #expect(resident[0..<5].allSatisfy { !$0 }, "a page before the region was installed")
            #expect(resident[42..<48].allSatisfy { !$0 }, "a page after the region was installed")
            let stats = server.statistics
            #expect(stats.missingFaults == 3)   // chunks 0..<16, 16..<32, 32..<37 of the region
            #expect(stats.pagesInstalled == 37)
            #expect(stats.pagesPrefetched == 34)
        }

        @Test func chunkSkipsPagesAlreadyPresent() throws {
            let pages = 32
            let memory = try MemoryMapping.anonymous(length: pages * page)
            let server = try serve(try imageSource(pages: pages), mapping: memory, configuration: .handler4k)
            try server.start()
            touch(memory.base, pages: [3, 9])
            server.stop()
            let chunked = try serve(try imageSource(pages: pages), mapping: memory, configuration: .handler64k)
            // Pages 3 and 9 hold the image already (installed by the first server). Make one
            // of them differ so a second install would show.
            memory.base.storeBytes(of: 0xEE, toByteOffset: 3 * page, as: UInt8.self)
            try chunked.start()
            touch(memory.base, pages: [0, 16])
            chunked.stop()
            #expect(memory.base.load(fromByteOffset: 3 * page, as: UInt8.self) == 0xEE)
            #expect(firstMismatch(memory.base + 4 * page, count: 28 * page, sourceOffset: 4 * page) == nil)
            #expect(chunked.statistics.pagesInstalled == 30)
        }

        @Test func adaptiveReadAheadGrowsOnSequentialFaults() throws {
            let pages = 2048
            let memory = try MemoryMapping.anonymous(length: pages * page)
            let server = try serve(try imageSource(pages: pages), mapping: memory, configuration: .adaptive)
            try server.start()
            touch(memory.base, pages: Array(0..<pages))
            server.stop()
            #expect(firstMismatch(memory.base, count: pages * page) == nil)
            let stats = server.statistics
            // 16 + 32 + 64 + 128 + 256 + 256... pages: far fewer faults than 2048 / 16 = 128.
            #expect(stats.missingFaults < 16)
            #expect(stats.pagesInstalled == UInt64(pages))
        }

        @Test func adaptiveReadAheadResetsOnRandomFaults() throws {
            let pages = 2048
            let memory = try MemoryMapping.anonymous(length: pages * page)
            let server = try serve(try imageSource(pages: pages), mapping: memory, configuration: .adaptive)
            try server.start()
            // Sequential faults grow the window to its maximum: [0,16) [16,48) [48,112)
            // [112,240) [240,496) [496,752).
            touch(memory.base, pages: Array(0..<512))
            #expect(server.statistics.missingFaults == 6)
            var resident = residentPages(memory.base, pages: pages)
            #expect(resident[751] && !resident[752], "the window did not reach 256 pages")
            // A fault elsewhere installs only the aligned 16-page chunk around it...
            touch(memory.base, pages: [1500])
            resident = residentPages(memory.base, pages: pages)
            #expect(resident[1488] && resident[1503] && !resident[1487] && !resident[1504])
            // ...and the window starts again from there: the next sequential fault doubles 16, not 256.
            touch(memory.base, pages: [1504])
            resident = residentPages(memory.base, pages: pages)
            #expect(resident[1535] && !resident[1536], "the window was not reset by the random fault")
            #expect(server.statistics.missingFaults == 8)
            // Random faults over the rest still install every page exactly once, right.
            touch(memory.base, pages: permutation(pages, seed: 11))
            server.stop()
            #expect(firstMismatch(memory.base, count: pages * page) == nil)
            #expect(server.statistics.pagesInstalled == UInt64(pages))
        }

        @Test func severalThreadsFaultingRandomPagesAtOnce() throws {
            let pages = 2048
            let memory = try MemoryMapping.anonymous(length: pages * page)
            var configuration = FaultServerConfiguration.handler4k
            configuration.handlerThreads = 2
            let server = try serve(try imageSource(pages: pages), mapping: memory, configuration: configuration)
            try server.start()
            let base = UInt(bitPattern: memory.base)
            onThreads(4) { t in
                // Every thread touches every page: each page is faulted concurrently.
                touch(UnsafeMutableRawPointer(bitPattern: base)!, pages: permutation(pages, seed: UInt64(t + 1)))
            }
            server.stop()
            #expect(firstMismatch(memory.base, count: pages * page) == nil)
            #expect(server.statistics.pagesInstalled == UInt64(pages))
        }
    }
}
