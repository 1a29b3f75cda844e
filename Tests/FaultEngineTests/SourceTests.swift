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
    struct SourceTests {
        @Test func zeroSourceServesZeros() throws {
            let pages = 40
            let memory = try MemoryMapping.anonymous(length: pages * page)
            let server = try serve(ZeroSource(), mapping: memory, configuration: .handler64k)
            try server.start()
            touch(memory.base, pages: permutation(pages, seed: 3))
            server.stop()
            #expect(memory.bytes.allSatisfy { $0 == 0 })
            #expect(server.statistics.pagesInstalled == UInt64(pages))
        }

        @Test(arguments: FileSource.Access.allCases)
        func fileSourceServesTheFileFromAnOffset(access: FileSource.Access) throws {
            let pages = 64
            let file = try ImageFile(pages: pages + 8)
            // The region starts 8 pages into the file.
            let source = try FileSource(path: file.path, offset: UInt64(8 * page), access: access)
            #expect(source.length == UInt64(pages * page))
            let memory = try MemoryMapping.anonymous(length: pages * page)
            let server = try serve(source, mapping: memory, configuration: .handler64k)
            try server.start()
            touch(memory.base, pages: permutation(pages, seed: 5))
            server.stop()
            #expect(firstMismatch(memory.base, count: pages * page, sourceOffset: 8 * page) == nil)
        }

        @Test func fileSourceRejectsAnOffsetBeyondTheFile() throws {
            let file = try ImageFile(pages: 2)
            #expect {
                _ = try FileSource(path: file.path, offset: UInt64(3 * page))
            } throws: { error in
                guard let error = error as? UserfaultfdError, case .invalidArgument(let why) = error.kind else { return false }
                return why.contains("beyond the end")
            }
            #expect(throws: UserfaultfdError.self) { _ = try FileSource(path: "/nonexistent/image") }
        }

        @Test func closureSourceIsAskedForTheFaultingChunk() throws {
            let pages = 32
            let memory = try MemoryMapping.anonymous(length: pages * page)
            let source = ClosureSource(length: UInt64(pages * page)) { buffer, offset in
                for i in 0..<buffer.count { buffer[i] = imageByte(Int(offset) + i) }
            }
            let server = try serve(source, mapping: memory, configuration: .handler4k)
            try server.start()
            touch(memory.base, pages: permutation(pages, seed: 9))
            server.stop()
            #expect(firstMismatch(memory.base, count: pages * page) == nil)
            #expect(server.statistics.missingFaults == UInt64(pages))
        }

        @Test func regionBeyondTheSourceIsRefused() throws {
            let memory = try MemoryMapping.anonymous(length: 8 * page)
            #expect {
                _ = try serve(try imageSource(pages: 4), mapping: memory, configuration: .handler4k)
            } throws: { error in
                guard let error = error as? UserfaultfdError, case .invalidArgument(let why) = error.kind else { return false }
                return why.contains("beyond the source")
            }
        }

        @Test func failingSourceGivesSIGBUSNotAHang() async {
            await #expect(processExitsWith: .signal(SIGBUS)) {
                let memory = try MemoryMapping.anonymous(length: 4 * systemPageSize)
                let source = ClosureSource(length: UInt64(4 * systemPageSize)) { (buffer, offset) throws(PageSourceError) in
                    throw PageSourceError(.failed("disk on fire"), sourceOffset: offset, length: buffer.count)
                }
                let uffd = try Userfaultfd(features: [])
                try uffd.handle.register(memory.range, mode: .missing)
                let server = try FaultServer(userfaultfd: uffd, regions: [ServedRegion(range: memory.range)],
                                             source: source, configuration: .handler4k)
                try server.start()
                _ = memory.base.load(as: UInt8.self)   // SIGBUS here
                server.stop()
            }
        }

        @Test func faultOutsideTheServedRegionsGivesSIGBUS() async {
            await #expect(processExitsWith: .signal(SIGBUS)) {
                let ps = systemPageSize
                let memory = try MemoryMapping.anonymous(length: 8 * ps)
                let uffd = try Userfaultfd(features: [])
                try uffd.handle.register(memory.range, mode: .missing)
                // Only the first half is served.
                let served = MemoryRange(start: memory.range.start, length: UInt64(4 * ps))
                let server = try FaultServer(userfaultfd: uffd, regions: [ServedRegion(range: served)],
                                             source: ZeroSource(), configuration: .handler64k)
                try server.start()
                _ = memory.base.load(fromByteOffset: 0, as: UInt8.self)        // served
                _ = memory.base.load(fromByteOffset: 6 * ps, as: UInt8.self)   // SIGBUS here
                server.stop()
            }
        }

        @Test func failingSourceIsReportedAndOnlyTheFaultingPageIsLost() throws {
            let pages = 16
            let memory = try MemoryMapping.anonymous(length: pages * page)
            let bad = UInt64(5 * page)
            let source = ClosureSource(length: UInt64(pages * page)) { (buffer, offset) throws(PageSourceError) in
                if offset <= bad && bad < offset + UInt64(buffer.count) {
                    throw PageSourceError(.failed("bad sector"), sourceOffset: offset, length: buffer.count)
                }
                for i in 0..<buffer.count { buffer[i] = imageByte(Int(offset) + i) }
            }
            let log = EventLog()
            let server = try serve(source, mapping: memory, configuration: .handler64k)
            server.onEvent = log.callback()
            try server.start()
            // Page 2's chunk holds the bad page 5: page 2 is still served (alone).
            touch(memory.base, pages: [2])
            server.stop()
            #expect(firstMismatch(memory.base + 2 * page, count: page, sourceOffset: 2 * page) == nil)
            let stats = server.statistics
            #expect(stats.sourceErrors == 1)
            #expect(stats.poisonedPages == 0)
            #expect(stats.lastError?.contains("bad sector") == true)
        }
    }
}
