import FaultEngine
import TestSupport
import Testing
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

extension FaultEngineTests {
    /// The default (automatic) configuration on every kind of memory and source it
    /// serves: the strategy it chooses, and every byte right while four threads fault
    /// on the region at once and the populate thread installs it in the background.
    @Suite(.needsUserfaultfd, .serialized, .timeLimit(.minutes(2)))
    struct AutomaticStrategyTests {
        static let pages = 1024
        static let threads = 4

        /// Four threads read every page of `base`, each in its own random order.
        static func touchConcurrently(_ base: UnsafeMutableRawPointer, pages: Int, pageSize: Int = page) {
            let address = UInt(bitPattern: base)
            onThreads(threads) { k in
                let base = UnsafeMutableRawPointer(bitPattern: address)!
                var sum: UInt8 = 0
                for p in permutation(pages, seed: UInt64(31 + k)) {
                    sum &+= (base + p * pageSize + (k * 977) % pageSize).load(as: UInt8.self)
                }
                touchSink &+= sum
            }
        }

        /// Serves `memory` by default, touches it from four threads, checks every byte.
        static func check<S: PageSource>(
            _ source: S, _ memory: borrowing MemoryMapping, features: Userfaultfd.Features,
            mode: Userfaultfd.RegisterMode = .missing, alias: UInt64? = nil, pageSize: Int = page,
            expect expected: FaultServerConfiguration.Strategy
        ) throws {
            var configuration = FaultServerConfiguration.default
            configuration.pageSize = pageSize
            let server = try serve(source, mapping: memory, features: features, mode: mode,
                                   configuration: configuration, alias: alias)
            #expect(server.configuration.strategy == expected, "\(server.strategyChoice)")
            #expect(server.configuration.backgroundPopulate)
            #expect(!server.strategyChoice.reason.isEmpty)
            try server.start()
            touchConcurrently(memory.base, pages: memory.length / pageSize, pageSize: pageSize)
            server.stop()
            #expect(firstMismatch(memory.base, count: memory.length) == nil)
            let statistics = server.statistics
            #expect(statistics.poisonedPages == 0)
            #expect(statistics.sourceErrors == 0)
            #expect(statistics.lastError == nil)
            #expect(statistics.strategy == "\(expected)")
        }

        @Test func anonymousMemoryWithSIGBUSResolvesInTheFaultingThread() throws {
            let memory = try MemoryMapping.anonymous(length: Self.pages * page)
            try Self.check(try imageSource(pages: Self.pages), memory,
                           features: FaultServerConfiguration.automaticFeatures(for: .anonymous), expect: .sigbus(chunkPages: 16))
        }

        @Test func aMovableSourceIsMovedWithoutSIGBUS() throws {
            let memory = try MemoryMapping.anonymous(length: Self.pages * page)
            let source = try imageSource(pages: Self.pages, allowsMoving: true)
            try Self.check(source, memory, features: [.move], expect: .move(chunkPages: 16))
            // Moved, not copied: the source gave its pages up.
            #expect(source.bytes.allSatisfy { $0 == 0 })
        }

        @Test func shmemIsFilledThroughThePageCacheAndContinued() throws {
            let memory = try MemoryMapping(kind: .shmem, length: Self.pages * page, name: "automatic-shmem")
            let alias = try memory.alias()
            try Self.check(try imageSource(pages: Self.pages), memory,
                           features: FaultServerConfiguration.automaticFeatures(for: .shmem), mode: [.missing, .minor], alias: alias.range.start, expect: .minor(chunkPages: 16))
        }

        @Test func withoutFeaturesItCopies() throws {
            let memory = try MemoryMapping.anonymous(length: Self.pages * page)
            try Self.check(try imageSource(pages: Self.pages), memory, features: [], expect: .copy(chunkPages: 16))
        }

        @Test(arguments: FileSource.Access.allCases)
        func aFileIsReadInTheFaultingThread(access: FileSource.Access) throws {
            let file = try ImageFile(pages: Self.pages)
            let memory = try MemoryMapping.anonymous(length: Self.pages * page)
            try Self.check(try FileSource(path: file.path, access: access), memory,
                           features: FaultServerConfiguration.automaticFeatures(for: .anonymous), expect: .sigbus(chunkPages: 16))
        }

        @Test func aFileWithoutSIGBUSIsCopiedAndTheChoiceSaysWhy() throws {
            let file = try ImageFile(pages: Self.pages)
            let memory = try MemoryMapping.anonymous(length: Self.pages * page)
            let source = try FileSource(path: file.path)
            try Self.check(source, memory, features: [.move], expect: .copy(chunkPages: 16))
            let server = try serve(source, mapping: memory, features: [.move], configuration: .default)
            #expect(server.strategyChoice.reason.contains("cannot give its pages up"), "\(server.strategyChoice)")
        }

        @Test func aSourceTheSignalHandlerCannotReadIsServedForTheFaultingThread() throws {
            let memory = try MemoryMapping.anonymous(length: Self.pages * page)
            let source = ClosureSource(length: UInt64(Self.pages * page)) { buffer, offset in
                for i in 0..<buffer.count { buffer[i] = imageByte(Int(offset) + i) }
            }
            try Self.check(source, memory, features: FaultServerConfiguration.automaticFeatures(for: .anonymous),
                           expect: .sigbus(chunkPages: 16))
        }

        @Test(.needsFreeHugePages(4), .usesHugePages) func hugetlbIsFilledThroughThePageCacheAndContinued() throws {
            let huge = 4
            let memory = try MemoryMapping(kind: .hugetlb, length: huge * hugePage, name: "automatic-hugetlb")
            let alias = try memory.alias()
            try Self.check(try imageSource(pages: huge * hugePage / page), memory,
                           features: FaultServerConfiguration.automaticFeatures(for: .hugetlb), mode: [.missing, .minor],
                           alias: alias.range.start, pageSize: hugePage, expect: .minor(chunkPages: 16))
        }

        @Test(.needsFreeHugePages(4), .usesHugePages) func hugetlbWithoutAnAliasIsCopied() throws {
            let huge = 4
            let memory = try MemoryMapping(kind: .hugetlb, length: huge * hugePage, name: "automatic-hugetlb")
            try Self.check(try imageSource(pages: huge * hugePage / page), memory,
                           features: [.missingHugetlbfs], pageSize: hugePage,
                           expect: .copy(chunkPages: 16))
        }

        @Test func aConfiguredStrategyIsKept() throws {
            let memory = try MemoryMapping.anonymous(length: 16 * page)
            let server = try serve(try imageSource(pages: 16), mapping: memory, configuration: .handler4k)
            #expect(server.configuration == .handler4k)
            #expect(server.strategyChoice.reason == "configured")
        }
    }
}
