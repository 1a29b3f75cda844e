import FaultEngine
import Testing
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

extension FaultEngineTests {
    /// FEATURE_SIGBUS: faults are resolved in the faulting thread by the C resolver.
    @Suite(.serialized, .timeLimit(.minutes(1)))
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
