import FaultEngine
import Foundation
import Synchronization
import TestSupport
import Testing
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

extension FaultEngineTests {
    @Suite(.needsUserfaultfd, .serialized, .timeLimit(.minutes(1)))
    struct LifecycleTests {
        @Test(.ownsProcess) func stopIsIdempotentAndLeaksNoDescriptor() throws {
            let before = openDescriptorCount()
            do {
                let memory = try MemoryMapping.anonymous(length: 16 * page)
                var configuration = FaultServerConfiguration.handler64k
                configuration.handlerThreads = 3
                let server = try serve(try imageSource(pages: 16), mapping: memory, configuration: configuration)
                try server.start()
                touch(memory.base, pages: [0, 15])
                #expect(serverThreadNames().count == 3)
                server.stop()
                server.stop()
                server.waitUntilStopped()
                // A joined thread can stay listed in /proc/self/task for a moment while
                // the kernel releases it: wait for that, a bounded time.
                var left = serverThreadNames()
                for _ in 0..<200 where !left.isEmpty {
                    usleep(10_000)
                    left = serverThreadNames()
                }
                #expect(left.isEmpty, "server threads left after stop: \(left)")
                #expect(!server.isRunning)
                #expect(throws: UserfaultfdError.self) { try server.start() }
            }
            #expect(openDescriptorCount() == before)
        }

        @Test(.ownsProcess) func serverNeverStartedReleasesEverything() throws {
            let before = openDescriptorCount()
            do {
                let memory = try MemoryMapping.anonymous(length: 4 * page)
                _ = try serve(ZeroSource(), mapping: memory, configuration: .handler4k)
            }
            #expect(openDescriptorCount() == before)
        }

        @Test func shutdownUnderLoadNeverHangs() throws {
            let pages = 4096
            let memory = try MemoryMapping.anonymous(length: pages * page)
            let source = ClosureSource(length: UInt64(pages * page)) { buffer, offset in
                usleep(200)   // a slow source keeps faults in flight
                for i in 0..<buffer.count { buffer[i] = imageByte(Int(offset) + i) }
            }
            var configuration = FaultServerConfiguration.handler4k
            configuration.handlerThreads = 2
            let server = try serve(source, mapping: memory, configuration: configuration)
            try server.start()
            let base = UInt(bitPattern: memory.base)
            let done = Atomic<Int>(0)
            let workers = (0..<3).map { t in
                DedicatedThread(name: "load-\(t)") {
                    touch(UnsafeMutableRawPointer(bitPattern: base)!, pages: permutation(pages, seed: UInt64(t + 20)))
                    done.wrappingAdd(1, ordering: .relaxed)
                }
            }
            usleep(50_000)
            server.stop()
            // The uffd is closed: faulting threads are released and finish on ordinary memory.
            for w in workers { w.join() }
            #expect(done.load(ordering: .relaxed) == 3)
            // Every page holds the image (served) or zeros (touched after the stop).
            for p in 0..<pages {
                let served = firstMismatch(memory.base + p * page, count: page, sourceOffset: p * page) == nil
                let zero = (0..<page).allSatisfy { memory.base.load(fromByteOffset: p * page + $0, as: UInt8.self) == 0 }
                #expect(served || zero, "page \(p) holds neither the image nor zeros")
                if !(served || zero) { break }
            }
            #expect(server.statistics.pagesInstalled > 0)
        }

        @Test func namedConfigurationsAreReachableThroughTheServerType() {
            let named: [FaultServerConfiguration] = [
                FaultServer<ZeroSource>.Configuration.handler4k, .handler64k, .sigbus, .move, .minor, .adaptive,
                .replay("/tmp/ws"), .automatic, .default,
            ]
            #expect(named[0].strategy == .copy(chunkPages: 1) && named[0].handlerThreads == 1)
            #expect(named[1].strategy == .copy(chunkPages: 16) && named[1].handlerThreads == 1)
            #expect(named[6].prefetch == .replay(path: "/tmp/ws"))
            #expect(Set(named).count == named.count - 1)   // .default is one of the others
            #expect(named.last == .automatic)
        }

        @Test func statisticsAsJSON() throws {
            let memory = try MemoryMapping.anonymous(length: 8 * page)
            let server = try serve(try imageSource(pages: 8), mapping: memory, configuration: .handler4k)
            try server.start()
            touch(memory.base, pages: [1, 2, 3])
            server.stop()
            let statistics = server.statistics
            let json = statistics.jsonString()
            // The one Codable shape: it decodes back to the same statistics.
            let decoded = try JSONDecoder().decode(FaultStatistics.self, from: Data(json.utf8))
            #expect(decoded == statistics)
            #expect(decoded.missingFaults == 3 && decoded.pagesInstalled == 3 && decoded.latencyCount == 3)
            #expect(decoded.lastError == nil)
        }

        @Test func badConfigurationsAndRegionsAreRefusedByName() throws {
            func refusal(_ configuration: FaultServerConfiguration, regions: [ServedRegion]? = nil) -> String? {
                do {
                    let memory = try MemoryMapping.anonymous(length: 8 * page)
                    let uffd = try Userfaultfd(features: [])
                    try uffd.handle.register(memory.range, mode: .missing)
                    _ = try FaultServer(userfaultfd: uffd, regions: regions ?? [ServedRegion(range: memory.range)],
                                        source: ZeroSource(), configuration: configuration)
                    return nil
                } catch {
                    return error.description
                }
            }
            var c = FaultServerConfiguration.handler4k
            c.strategy = .copy(chunkPages: 0)
            #expect(refusal(c)?.contains("chunkPages 0") == true)
            c = .handler4k
            c.handlerThreads = 0
            #expect(refusal(c)?.contains("handlerThreads 0") == true)
            #expect(refusal(.handler4k, regions: [])?.contains("no region") == true)
            let a = MemoryRange(start: 0x7000_0000_0000, length: UInt64(4 * page))
            let b = MemoryRange(start: 0x7000_0000_0000 + UInt64(2 * page), length: UInt64(4 * page))
            #expect(refusal(.handler4k, regions: [ServedRegion(range: a), ServedRegion(range: b)])?.contains("overlap") == true)
            let odd = MemoryRange(start: 0x7000_0000_0001, length: UInt64(page))
            #expect(refusal(.handler4k, regions: [ServedRegion(range: odd)])?.contains("not page-aligned") == true)
            #expect(refusal(.sigbus)?.contains("FEATURE_SIGBUS") == true)
            #expect(refusal(.minor)?.contains("pageCacheAlias") == true)
        }
    }
}
