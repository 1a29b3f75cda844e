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
    /// FEATURE_SIGBUS: faults are resolved in the faulting thread by the C resolver.
    @Suite(.needsUserfaultfd, .serialized, .timeLimit(.minutes(1)))
    struct SignalStrategyTests {
        static let features: Userfaultfd.Features = [.sigbus, .eventRemove, .eventUnmap, .eventRemap]

        @Test func memorySourceIsResolvedInThread() throws {
            let pages = 300
            let memory = try MemoryMapping.anonymous(length: pages * page)
            let server = try serve(try imageSource(pages: pages), mapping: memory, features: Self.features, configuration: .sigbus)
            try server.start()
            touch(memory.base, pages: permutation(pages, seed: 29))
            server.stop()
            #expect(firstMismatch(memory.base, count: pages * page) == nil)
            let stats = server.statistics
            #expect(stats.inThreadFaults > 0)
            #expect(stats.missingFaults == 0)   // nothing went through the handler thread
            #expect(stats.inThreadFaults <= UInt64((pages + 15) / 16) * 2)
        }

        @Test(arguments: FileSource.Access.allCases)
        func fileSourceIsResolvedInThread(access: FileSource.Access) throws {
            let pages = 100
            let file = try ImageFile(pages: pages)
            let memory = try MemoryMapping.anonymous(length: pages * page)
            let server = try serve(try FileSource(path: file.path, access: access), mapping: memory,
                                   features: Self.features, configuration: .sigbus)
            try server.start()
            touch(memory.base, pages: permutation(pages, seed: 31))
            server.stop()
            #expect(firstMismatch(memory.base, count: pages * page) == nil)
            #expect(server.statistics.inThreadFaults > 0)
        }

        /// Sequential faults of one thread grow the in-thread chunk (doubling from 16
        /// pages up to 2 MiB), from memory and from files alike (a file is read in
        /// pieces that fit the faulting thread's stack); random faults keep it fixed.
        @Test(arguments: ["memory", "pread", "mapped"])
        func sequentialFaultsGrowTheInThreadChunk(backing: String) throws {
            let pages = 4096   // 16 MiB
            let memory = try MemoryMapping.anonymous(length: pages * page)
            let file = backing == "memory" ? nil : try ImageFile(pages: pages)
            let configuration = FaultServerConfiguration(strategy: .sigbus(chunkPages: 16), prefetch: .adaptive(maxPages: 512))
            func run<S: PageSource>(_ source: S) throws -> FaultStatistics {
                let server = try serve(source, mapping: memory, features: Self.features, configuration: configuration)
                try server.start()
                // On a fresh thread: the window is per thread.
                let base = UInt(bitPattern: memory.base)
                onThreads(1) { _ in touch(UnsafeMutableRawPointer(bitPattern: base)!, pages: Array(0..<pages)) }
                server.stop()
                return server.statistics
            }
            let stats = try file.map { try run(FileSource(path: $0.path, access: backing == "mapped" ? .mapped : .pread)) }
                ?? run(try imageSource(pages: pages))
            #expect(firstMismatch(memory.base, count: pages * page) == nil)
            // 16, 32, ..., 512 pages (6 faults, 1008 pages), then 2 MiB at a time (7 faults, the
            // last one short): 13 in all, where fixed 64 KiB chunks take 256.
            #expect(stats.inThreadFaults == 13)
            #expect(stats.missingFaults == 0)
        }

        @Test func randomFaultsKeepTheInThreadChunkFixed() throws {
            let pages = 1024
            let memory = try MemoryMapping.anonymous(length: pages * page)
            let configuration = FaultServerConfiguration(strategy: .sigbus(chunkPages: 16), prefetch: .adaptive(maxPages: 512))
            let server = try serve(try imageSource(pages: pages), mapping: memory, features: Self.features, configuration: configuration)
            try server.start()
            // One page per 64 KiB chunk, chunks in a scrambled order: never where the last one ended.
            let order = permutation(pages / 16, seed: 43).map { $0 * 16 + 3 }
            touch(memory.base, pages: order)
            server.stop()
            for chunk in 0..<(pages / 16) {
                #expect(firstMismatch(memory.base + chunk * 16 * page, count: 16 * page, sourceOffset: chunk * 16 * page) == nil)
            }
            #expect(server.statistics.inThreadFaults == UInt64(pages / 16))
        }

        @Test func otherSourcesFallBackToTheHandlerThread() throws {
            let pages = 64
            let memory = try MemoryMapping.anonymous(length: pages * page)
            let source = ClosureSource(length: UInt64(pages * page)) { buffer, offset in
                for i in 0..<buffer.count { buffer[i] = imageByte(Int(offset) + i) }
            }
            let server = try serve(source, mapping: memory, features: Self.features, configuration: .sigbus)
            try server.start()
            touch(memory.base, pages: permutation(pages, seed: 37))
            server.stop()
            #expect(firstMismatch(memory.base, count: pages * page) == nil)
            #expect(server.statistics.missingFaults > 0)   // served by the handler thread
        }

        @Test func removeThenFaultGivesZerosInThread() throws {
            let pages = 32
            let memory = try MemoryMapping.anonymous(length: pages * page)
            let server = try serve(try imageSource(pages: pages), mapping: memory, features: Self.features, configuration: .sigbus)
            try server.start()
            touch(memory.base, pages: Array(0..<pages))
            #expect(madvise(memory.base + 16 * page, 16 * page, MADV_DONTNEED) == 0)
            // Let the handler thread read the REMOVE event before faulting again.
            try waitFor { server.statistics.removeEvents == 1 }
            touch(memory.base, pages: Array(0..<pages))
            server.stop()
            #expect(firstMismatch(memory.base, count: 16 * page) == nil)
            #expect((16 * page..<32 * page).allSatisfy { memory.base.load(fromByteOffset: $0, as: UInt8.self) == 0 })
        }

        @Test func shutdownWhileFaultingInThreadNeverKills() throws {
            let pages = 8192
            let memory = try MemoryMapping.anonymous(length: pages * page)
            let server = try serve(try imageSource(pages: pages), mapping: memory, features: Self.features,
                                   configuration: .init(strategy: .sigbus(chunkPages: 1)))
            try server.start()
            let base = UInt(bitPattern: memory.base)
            let workers = (0..<2).map { t in
                DedicatedThread(name: "sigbus-load-\(t)") {
                    touch(UnsafeMutableRawPointer(bitPattern: base)!, pages: permutation(pages, seed: UInt64(t + 40)))
                }
            }
            usleep(2000)
            server.stop()
            for w in workers { w.join() }
            // Served pages hold the image; pages touched after the stop hold zeros.
            var bad = 0
            for p in 0..<pages {
                let served = firstMismatch(memory.base + p * page, count: 64, sourceOffset: p * page) == nil
                let zero = (0..<64).allSatisfy { memory.base.load(fromByteOffset: p * page + $0, as: UInt8.self) == 0 }
                if !(served || zero) { bad += 1 }
            }
            #expect(bad == 0)
        }

        @Test func failingFileGivesSIGBUSInThread() async {
            await #expect(processExitsWith: .signal(SIGBUS)) {
                let ps = systemPageSize
                // A file shorter than the region: the resolver's pread comes up short.
                var template = Array("/tmp/fault-engine-short-XXXXXX".utf8CString)
                let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
                _ = ftruncate(fd, off_t(4 * ps))
                let source = try FileSource(descriptor: .init(rawValue: fd))
                _ = ftruncate(fd, 0)
                let memory = try MemoryMapping.anonymous(length: 4 * ps)
                let uffd = try Userfaultfd(features: [.sigbus])
                try uffd.handle.register(memory.range, mode: .missing)
                let server = try FaultServer(userfaultfd: uffd, regions: [ServedRegion(range: memory.range)],
                                             source: source, configuration: .sigbus)
                try server.start()
                _ = memory.base.load(as: UInt8.self)   // SIGBUS here
                server.stop()
            }
        }

        @Test func failingClosureGivesSIGBUSThroughTheHandler() async {
            await #expect(processExitsWith: .signal(SIGBUS)) {
                let ps = systemPageSize
                let source = ClosureSource(length: UInt64(4 * ps)) { (buffer, offset) throws(PageSourceError) in
                    throw PageSourceError(.failed("no bytes"), sourceOffset: offset, length: buffer.count)
                }
                let memory = try MemoryMapping.anonymous(length: 4 * ps)
                let uffd = try Userfaultfd(features: [.sigbus])
                try uffd.handle.register(memory.range, mode: .missing)
                let server = try FaultServer(userfaultfd: uffd, regions: [ServedRegion(range: memory.range)],
                                             source: source, configuration: .sigbus)
                try server.start()
                _ = memory.base.load(as: UInt8.self)   // SIGBUS here
                server.stop()
            }
        }
    }
}
