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
    struct StrategyTests {
        @Test func moveTakesPagesOutOfAMovableSource() throws {
            let pages = 200
            let source = try imageSource(pages: pages, allowsMoving: true)
            let memory = try MemoryMapping.anonymous(length: pages * page)
            let server = try serve(source, mapping: memory, configuration: .move)
            try server.start()
            touch(memory.base, pages: permutation(pages, seed: 13))
            server.stop()
            #expect(firstMismatch(memory.base, count: pages * page) == nil)
            #expect(server.statistics.pagesInstalled == UInt64(pages))
            // Moving consumes the source: its pages are gone (they read as zeros now).
            #expect(source.bytes.allSatisfy { $0 == 0 })
        }

        @Test func moveFromStagingLeavesTheSourceIntact() throws {
            let pages = 130
            let source = try imageSource(pages: pages, allowsMoving: false)
            let memory = try MemoryMapping.anonymous(length: pages * page)
            let server = try serve(source, mapping: memory, configuration: .move)
            try server.start()
            touch(memory.base, pages: permutation(pages, seed: 17))
            server.stop()
            #expect(firstMismatch(memory.base, count: pages * page) == nil)
            #expect(firstMismatch(source.baseAddress, count: pages * page) == nil)
            #expect(server.statistics.pagesInstalled == UInt64(pages))
        }

        @Test func moveThenRemoveGivesZeros() throws {
            let pages = 64
            let memory = try MemoryMapping.anonymous(length: pages * page)
            let server = try serve(try imageSource(pages: pages, allowsMoving: true), mapping: memory, configuration: .move)
            try server.start()
            touch(memory.base, pages: [0])
            #expect(madvise(memory.base, pages * page, MADV_DONTNEED) == 0)
            touch(memory.base, pages: Array(0..<pages))
            server.stop()
            #expect(memory.bytes.allSatisfy { $0 == 0 })
        }

        @Test func minorFillsThePageCacheAndContinues() throws {
            let pages = 150
            let memory = try MemoryMapping.shared(length: pages * page, hugetlb: false)
            let alias = try memory.alias()
            let server = try serve(try imageSource(pages: pages), mapping: memory,
                                   features: [.minorShmem, .missingShmem, .eventRemove], mode: [.missing, .minor],
                                   configuration: .minor, alias: alias.range.start)
            // A page already in the page cache (written through the alias) is mapped as it is.
            alias.base.storeBytes(of: 0xAB, toByteOffset: 70 * page, as: UInt8.self)
            try server.start()
            touch(memory.base, pages: [70] + permutation(pages, seed: 19))
            server.stop()
            #expect(memory.base.load(fromByteOffset: 70 * page, as: UInt8.self) == 0xAB)
            #expect(firstMismatch(memory.base, count: 70 * page) == nil)
            #expect(firstMismatch(memory.base + 71 * page, count: 79 * page, sourceOffset: 71 * page) == nil)
            #expect(server.statistics.pagesInstalled == UInt64(pages))
            #expect(server.statistics.minorFaults >= 1)
        }

        @Test func minorKeepsDataAcrossDontneedOfSharedMemory() throws {
            let pages = 64
            let memory = try MemoryMapping.shared(length: pages * page, hugetlb: false)
            let alias = try memory.alias()
            let server = try serve(try imageSource(pages: pages), mapping: memory,
                                   features: [.minorShmem, .missingShmem, .eventRemove], mode: [.missing, .minor],
                                   configuration: .minor, alias: alias.range.start)
            try server.start()
            touch(memory.base, pages: Array(0..<pages))
            memory.base.storeBytes(of: 0xCD, toByteOffset: 3 * page, as: UInt8.self)
            // DONTNEED on shared memory only unmaps: the page cache keeps the data.
            #expect(madvise(memory.base, pages * page, MADV_DONTNEED) == 0)
            touch(memory.base, pages: Array(0..<pages))
            server.stop()
            #expect(memory.base.load(fromByteOffset: 3 * page, as: UInt8.self) == 0xCD)
            #expect(firstMismatch(memory.base + 4 * page, count: 60 * page, sourceOffset: 4 * page) == nil)
        }

        @Test func backgroundPopulateInstallsEverythingWithoutFaults() throws {
            let pages = 1024
            let memory = try MemoryMapping.anonymous(length: pages * page)
            var configuration = FaultServerConfiguration.handler64k
            configuration.backgroundPopulate = true
            let server = try serve(try imageSource(pages: pages), mapping: memory, configuration: configuration)
            try server.start()
            try waitFor { server.statistics.pagesInstalled == UInt64(pages) }
            let faultsBefore = server.statistics.missingFaults
            touch(memory.base, pages: Array(0..<pages))
            server.stop()
            #expect(firstMismatch(memory.base, count: pages * page) == nil)
            #expect(server.statistics.missingFaults == faultsBefore)
        }

        @Test func workingSetIsRecordedInFaultOrderAndReplayedFirst() throws {
            let pages = 256
            let path = "/tmp/fault-engine-ws-\(getpid())"
            defer { unlink(path) }
            let order = Array(permutation(pages, seed: 23).prefix(40))
            do {
                let memory = try MemoryMapping.anonymous(length: pages * page)
                var configuration = FaultServerConfiguration.handler4k
                configuration.recordWorkingSet = path
                let server = try serve(try imageSource(pages: pages), mapping: memory, configuration: configuration)
                try server.start()
                touch(memory.base, pages: order + order)   // second touches are not faults
                server.stop()
            }
            let recorded = try WorkingSetFile.read(path)
            #expect(recorded == order.map { UInt64($0 * page) })

            let memory = try MemoryMapping.anonymous(length: pages * page)
            let server = try serve(try imageSource(pages: pages), mapping: memory, configuration: .replay(path))
            try server.start()
            try waitFor { server.statistics.pagesInstalled >= UInt64(order.count) }
            let resident = residentPages(memory.base, pages: pages)
            touch(memory.base, pages: order)
            server.stop()
            // The replay installed the working set and nothing else.
            #expect(Set((0..<pages).filter { resident[$0] }) == Set(order), "resident before any fault: not the recorded set")
            #expect(server.statistics.missingFaults == 0)
            for p in order {
                #expect(firstMismatch(memory.base + p * page, count: page, sourceOffset: p * page) == nil)
            }
        }

        @Test func malformedWorkingSetFileIsRefused() throws {
            let path = "/tmp/fault-engine-bad-ws-\(getpid())"
            defer { unlink(path) }
            let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
            _ = write(fd, "not a working set", 17)
            close(fd)
            #expect {
                _ = try WorkingSetFile.read(path)
            } throws: { error in
                guard let error = error as? UserfaultfdError, case .malformed = error.kind else { return false }
                return true
            }
        }
    }
}

/// Polls `condition` every millisecond for up to 20 seconds.
func waitFor(_ condition: () -> Bool) throws {
    for _ in 0..<20_000 {
        if condition() { return }
        usleep(1000)
    }
    Issue.record("condition not met within 20 s")
}
