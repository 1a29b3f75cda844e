import FaultEngine
import Synchronization
import TestSupport
import Testing
import Userfaultfd
import _CFaultEngine

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

extension FaultEngineTests {
    @Suite(.needsUserfaultfd, .serialized, .timeLimit(.minutes(1)))
    struct EventTests {
        @Test func removeThenFaultGivesZeros() throws {
            let pages = 32
            let memory = try MemoryMapping.anonymous(length: pages * page)
            let server = try serve(try imageSource(pages: pages), mapping: memory, configuration: .handler64k)
            try server.start()
            touch(memory.base, pages: Array(0..<pages))
            #expect(firstMismatch(memory.base, count: pages * page) == nil)
            // Release pages 4..<12; they must read as zeros, the rest keep the image.
            #expect(madvise(memory.base + 4 * page, 8 * page, MADV_DONTNEED) == 0)
            touch(memory.base, pages: Array(0..<pages))
            server.stop()
            #expect((4 * page..<12 * page).allSatisfy { memory.base.load(fromByteOffset: $0, as: UInt8.self) == 0 })
            #expect(firstMismatch(memory.base, count: 4 * page) == nil)
            #expect(firstMismatch(memory.base + 12 * page, count: 20 * page, sourceOffset: 12 * page) == nil)
            let stats = server.statistics
            #expect(stats.removeEvents == 1)
            #expect(stats.zeroPages == 8)
        }

        @Test func unmapDropsTheRange() throws {
            let pages = 32
            let memory = try MemoryMapping.anonymous(length: pages * page)
            let log = EventLog()
            let server = try serve(try imageSource(pages: pages), mapping: memory, configuration: .handler4k)
            server.onEvent = log.callback()
            try server.start()
            touch(memory.base, pages: [0])
            // Unmap the middle; the mapping's owner unmaps it all again later (harmless).
            #expect(munmap(memory.base + 8 * page, 8 * page) == 0)
            touch(memory.base, pages: [1, 20])
            let regions = server.regions.map(\.range)
            server.stop()
            #expect(server.statistics.unmapEvents == 1)
            #expect(regions == [
                MemoryRange(start: memory.range.start, length: UInt64(8 * page)),
                MemoryRange(start: memory.range.start + UInt64(16 * page), length: UInt64(16 * page)),
            ])
            #expect(firstMismatch(memory.base + 20 * page, count: page, sourceOffset: 20 * page) == nil)
            #expect(log.all.contains { $0.hasPrefix("unmap") })
            // Map the hole again so the mapping's own munmap stays well-defined.
            _ = mmap(memory.base + 8 * page, 8 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0)
        }

        @Test func remapMovesTheRangeAndKeepsItsSourceBytes() throws {
            let pages = 16
            let memory = try MemoryMapping.anonymous(length: pages * page)
            let server = try serve(try imageSource(pages: pages), mapping: memory, configuration: .handler4k)
            try server.start()
            touch(memory.base, pages: [0])
            // Move the last 8 pages somewhere else; they keep their source offsets.
            let target = mmap(nil, 8 * page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
            let moved = cfe_mremap_fixed(memory.base + 8 * page, 8 * page, target)!
            #expect(moved == target)
            touch(moved, pages: Array(0..<8))
            server.stop()
            #expect(firstMismatch(moved, count: 8 * page, sourceOffset: 8 * page) == nil)
            #expect(server.statistics.remapEvents == 1)
            munmap(moved, 8 * page)
            _ = mmap(memory.base + 8 * page, 8 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0)
        }

        @Test(.ownsProcess) func forkIsReportedWithTheChildsUffd() throws {
            let pages = 8
            let memory = try MemoryMapping.anonymous(length: pages * page)
            let log = EventLog()
            let server = try serve(try imageSource(pages: pages), mapping: memory,
                                   features: [.eventFork, .eventRemove, .eventUnmap, .eventRemap], configuration: .handler4k)
            server.onEvent = log.callback()
            try server.start()
            touch(memory.base, pages: [0])
            let child = fork()
            if child == 0 { _exit(0) }
            #expect(child > 0)
            var status: Int32 = 0
            waitpid(child, &status, 0)
            server.stop()
            #expect(server.statistics.forkEvents == 1)
            let forks = log.forks.withLock { $0 }
            #expect(forks.count == 1)
            // The child's uffd can be taken (and is closed with it).
            var taken = false
            if let uffd = forks.first?.take() {
                taken = true
                _ = consume uffd
            }
            #expect(taken)
        }
    
        @Test(.ownsProcess) func childExitEndsTheServerOfItsUffd() throws {
            let pages = 64
            let memory = try MemoryMapping.anonymous(length: pages * page)
            let log = EventLog()
            let parent = try serve(try imageSource(pages: pages), mapping: memory,
                                   features: [.eventFork, .eventRemove, .eventUnmap, .eventRemap], configuration: .handler4k)
            parent.onEvent = log.callback()
            try parent.start()
            touch(memory.base, pages: [0])
            let child = fork()
            if child == 0 { _exit(0) }
            var status: Int32 = 0
            waitpid(child, &status, 0)
            guard let forked = log.forks.withLock({ $0.first }) else {
                Issue.record("no fork reported; events: \(log.all)")
                parent.stop()
                return
            }
            guard let childUffd = forked.take() else {
                Issue.record("the child's uffd was already taken")
                return
            }
            // Serve the (now gone) child: the first install finds no process.
            var configuration = FaultServerConfiguration.handler64k
            configuration.backgroundPopulate = true
            let childLog = EventLog()
            let server = try FaultServer(userfaultfd: childUffd, regions: parent.regions,
                                         source: try imageSource(pages: pages), configuration: configuration)
            server.onEvent = childLog.callback()
            try server.start()
            server.waitUntilStopped()
            parent.stop()
            #expect(childLog.all.contains("process exited"))
            #expect(!server.isRunning)
        }

        @Test func writeProtectFaultIsResolvedByUnprotecting() throws {
            let pages = 4
            let memory = try MemoryMapping.anonymous(length: pages * page)
            let uffd = try Userfaultfd(features: [.pagefaultFlagWP])
            try uffd.handle.register(memory.range, mode: [.missing, .writeProtect])
            let handle = uffd.handle   // borrowed; the server owns the fd until it stops
            let server = try FaultServer(userfaultfd: uffd, regions: [ServedRegion(range: memory.range)],
                                         source: try imageSource(pages: pages), configuration: .handler4k)
            try server.start()
            touch(memory.base, pages: [1])
            try handle.writeProtect(MemoryRange(start: memory.range.start + UInt64(page), length: UInt64(page)), mode: .writeProtect)
            (memory.base + page).storeBytes(of: 0x77, as: UInt8.self)   // WP fault, then the write lands
            server.stop()
            #expect((memory.base + page).load(as: UInt8.self) == 0x77)
            #expect(firstMismatch(memory.base + page + 1, count: page - 1, sourceOffset: page + 1) == nil)
            #expect(server.statistics.writeProtectFaults == 1)
        }
}
}
