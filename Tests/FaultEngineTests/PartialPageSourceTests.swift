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
    /// A source whose length is not a whole number of pages: its last page is served,
    /// the bytes past the end as zeros, by every strategy and both kinds of source.
    @Suite(.needsUserfaultfd, .serialized, .timeLimit(.minutes(1)))
    struct PartialPageSourceTests {
        static let pages = 6
        static let length = 5 * page + 100

        /// A temporary file holding the first `length` bytes of the test image.
        static func shortImageFile() throws -> ImageFile {
            let file = try ImageFile(pages: pages)
            #expect(truncate(file.path, off_t(length)) == 0)
            return file
        }

        /// The mapping holds the image up to `length`, zeros after it.
        static func expectImageThenZeros(_ memory: borrowing MemoryMapping) {
            #expect(firstMismatch(memory.base, count: length) == nil)
            let tail = UnsafeRawBufferPointer(start: memory.base + length, count: pages * page - length)
            #expect(tail.allSatisfy { $0 == 0 })
        }

        /// Serves fresh memory of `pages` pages from `source`, touches every page, checks it.
        static func serveAndCheck<S: PageSource>(
            _ source: S, features: Userfaultfd.Features, configuration: FaultServerConfiguration
        ) throws {
            let memory = try MemoryMapping.anonymous(length: pages * page)
            let server = try serve(source, mapping: memory, features: features, configuration: configuration)
            try server.start()
            touch(memory.base, pages: permutation(pages, seed: 11))
            server.stop()
            expectImageThenZeros(memory)
            #expect(server.statistics.poisonedPages == 0)
        }

        static let configurations: [(String, FaultServerConfiguration, Userfaultfd.Features)] = [
            ("copy", .handler64k, []), ("copy-4k", .handler4k, []), ("move", .move, []),
            ("adaptive", .adaptive, []), ("sigbus", .sigbus, [.sigbus]),
        ]

        @Test(arguments: 0..<configurations.count, FileSource.Access.allCases)
        func fileWithAPartialLastPage(configuration k: Int, access: FileSource.Access) throws {
            let (_, configuration, features) = Self.configurations[k]
            let file = try Self.shortImageFile()
            let source = try FileSource(path: file.path, access: access)
            #expect(source.length == UInt64(Self.length))
            try Self.serveAndCheck(source, features: features, configuration: configuration)
        }

        @Test(arguments: 0..<configurations.count)
        func memoryWithAPartialLastPage(configuration k: Int) throws {
            let (_, configuration, features) = Self.configurations[k]
            let source = try MemorySource(length: Self.length) { bytes in
                for i in 0..<bytes.count { bytes[i] = imageByte(i) }
            }
            try Self.serveAndCheck(source, features: features, configuration: configuration)
        }

        @Test func aRegionBeyondTheLastPageIsStillRefused() throws {
            let file = try Self.shortImageFile()
            let memory = try MemoryMapping.anonymous(length: (Self.pages + 1) * page)
            #expect(throws: UserfaultfdError.self) {
                _ = try serve(try FileSource(path: file.path), mapping: memory, configuration: .handler4k)
            }
        }

        @Test func preinstallFillsThePartialLastPage() throws {
            let file = try Self.shortImageFile()
            let source = try FileSource(path: file.path)
            let memory = try MemoryMapping.anonymous(length: Self.pages * page)
            let uffd = try Userfaultfd(features: [])
            try uffd.handle.register(memory.range, mode: .missing)
            let offsets = (0..<Self.pages).reversed().map { UInt64($0 * page) }
            let result = WorkingSetPreinstall.install(offsets, regions: [ServedRegion(range: memory.range)],
                                                      source: source, handle: uffd.handle)
            #expect(result.pagesInstalled == Self.pages)
            #expect(result.stoppedEarly == nil)
            Self.expectImageThenZeros(memory)   // every page present: no fault
        }
    }
}
