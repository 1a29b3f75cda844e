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
    /// The staging pool: the move strategy takes staged pages with UFFDIO_MOVE and copies
    /// in place what is not staged yet; every byte right while four threads fault at once.
    @Suite(.needsUserfaultfd, .serialized, .timeLimit(.minutes(2)))
    struct StagedSourceTests {
        static let pages = 1024
        static let threads = 4

        /// Four threads read every page: in address order, each starting a quarter further
        /// on, or each in its own random order.
        static func touchConcurrently(_ base: UnsafeMutableRawPointer, pages: Int, random: Bool) {
            let address = UInt(bitPattern: base)
            onThreads(threads) { k in
                let base = UnsafeMutableRawPointer(bitPattern: address)!
                let order = random ? permutation(pages, seed: UInt64(71 + k))
                    : (0..<pages).map { ($0 + k * pages / threads) % pages }
                var sum: UInt8 = 0
                for p in order { sum &+= (base + p * page + (k * 977) % page).load(as: UInt8.self) }
                touchSink &+= sum
            }
        }

        /// Serves a region from a pool over the image (filled first when `staged`),
        /// touches it from four threads and checks every byte; returns what the pool did.
        static func run(random: Bool, staged: Bool) throws -> (StagedSource<MemorySource>.Statistics, FaultStatistics) {
            let image = try imageSource(pages: pages)
            let source = try StagedSource(image)
            if staged {
                try source.start()
                // Wait for the fill thread (untimed): every page staged before any fault.
                while source.statistics.pagesStaged < UInt64(pages) { usleep(200) }
            }
            let memory = try MemoryMapping.anonymous(length: pages * page)
            let server = try serve(source, mapping: memory, features: [.move],
                                   configuration: .init(strategy: .move(chunkPages: 16), prefetch: .adaptive(maxPages: 512)))
            try server.start()
            touchConcurrently(memory.base, pages: pages, random: random)
            server.stop()
            source.stop()
            #expect(firstMismatch(memory.base, count: pages * page) == nil)
            // The pool copied from the image; the image keeps its bytes.
            #expect(firstMismatch(image.baseAddress, count: pages * page) == nil)
            let statistics = server.statistics
            #expect(statistics.pagesInstalled == UInt64(pages))
            #expect(statistics.poisonedPages == 0)
            #expect(statistics.lastError == nil)
            return (source.statistics, statistics)
        }

        @Test(arguments: [false, true])
        func stagedPagesAreMoved(random: Bool) throws {
            let (pool, _) = try Self.run(random: random, staged: true)
            #expect(pool.pagesStaged == UInt64(Self.pages))
            #expect(pool.runsNotStaged == 0, "\(pool)")
            #expect(pool.pagesMoved >= UInt64(Self.pages), "\(pool)")
            #expect(pool.fillFailures == 0)
            #expect(pool.description.hasPrefix("MOVE from the staging pool: \(pool.pagesMoved) pages"))
        }

        @Test(arguments: [false, true])
        func unstagedPagesAreCopiedInPlace(random: Bool) throws {
            let (pool, server) = try Self.run(random: random, staged: false)
            #expect(pool.pagesStaged == 0)
            #expect(pool.pagesMoved == 0, "\(pool)")
            #expect(pool.pagesNotStaged >= server.pagesInstalled, "\(pool)")
            #expect(pool.runsNotStaged > 0)
        }

        /// The fill thread races the faults: each run is moved or copied, never both, never lost.
        @Test(arguments: [false, true])
        func fillRacingTheFaults(random: Bool) throws {
            let image = try imageSource(pages: Self.pages)
            let source = try StagedSource(image, window: 256 << 10)
            let memory = try MemoryMapping.anonymous(length: Self.pages * page)
            let server = try serve(source, mapping: memory, features: [.move],
                                   configuration: .init(strategy: .move(chunkPages: 16), prefetch: .adaptive(maxPages: 512)))
            try server.start()
            try source.start()
            Self.touchConcurrently(memory.base, pages: Self.pages, random: random)
            server.stop()
            source.stop()
            #expect(firstMismatch(memory.base, count: Self.pages * page) == nil)
            let pool = source.statistics
            #expect(server.statistics.pagesInstalled == UInt64(Self.pages))
            #expect(pool.pagesMoved + pool.pagesNotStaged >= UInt64(Self.pages), "\(pool)")
        }

        /// A block the base source cannot fill is never handed over: its pages are served
        /// from the base source (through the server's staging buffer), the rest are moved.
        @Test func aBlockThatFailsToFillIsServedFromTheBase() throws {
            let pages = 64
            let image = try imageSource(pages: pages)
            let bad = UInt64(5 * page)
            let base = ClosureSource(length: UInt64(pages * page)) { (buffer, offset) throws(PageSourceError) in
                if offset <= bad && bad < offset + UInt64(buffer.count) {
                    throw PageSourceError(.failed("page 5 is unreadable"), sourceOffset: offset, length: buffer.count)
                }
                try image.fill(buffer, at: offset)
            }
            let source = try StagedSource(base)
            try source.start()
            let blockPages = UInt64(64 << 10) / UInt64(page)
            while source.statistics.pagesStaged + source.statistics.fillFailures * blockPages < UInt64(pages) { usleep(200) }
            let memory = try MemoryMapping.anonymous(length: pages * page)
            let server = try serve(source, mapping: memory, features: [.move], configuration: .init(strategy: .move(chunkPages: 16)))
            try server.start()
            let readable = (0..<pages).filter { $0 != 5 }
            let address = UInt(bitPattern: memory.base)
            onThreads(Self.threads) { k in
                let base = UnsafeMutableRawPointer(bitPattern: address)!
                var sum: UInt8 = 0
                for p in permutation(pages, seed: UInt64(90 + k)) where p != 5 { sum &+= (base + p * page).load(as: UInt8.self) }
                touchSink &+= sum
            }
            server.stop()
            source.stop()
            for p in readable {
                #expect(firstMismatch(memory.base + p * page, count: page, sourceOffset: p * page) == nil, "page \(p)")
            }
            let pool = source.statistics
            #expect(pool.fillFailures == 1, "\(pool)")
            #expect(pool.pagesStaged == UInt64(pages) - blockPages, "\(pool)")
            #expect(pool.pagesMoved >= UInt64(pages) - blockPages, "\(pool)")
            #expect(pool.runsNotStaged >= 1, "\(pool)")
            #expect(server.statistics.sourceErrors >= 1)
        }

        @Test func aSourceOfUnknownLengthIsRefused() throws {
            #expect(throws: UserfaultfdError.self) { _ = try StagedSource(ZeroSource()) }
            #expect(throws: UserfaultfdError.self) { _ = try StagedSource(try imageSource(pages: 4), fillThreads: 0) }
        }
    }
}
