import FaultManager
import TestSupport
import Testing
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

extension ManagerTests {
    /// A handshake whose page size is not the one of the memory behind it is refused:
    /// hugetlb memory served as 4 KiB pages would leave its faulting threads faulting forever.
    @Suite(.serialized, .timeLimit(.minutes(1)))
    struct PageSizeCheckTests {
        static let hugePage = HugePages.size

        /// Hands over `range` declared with `pageSize`-byte pages; returns the refusal reason.
        private func refusal(_ range: MemoryRange, declaring pageSize: Int) throws -> String? {
            let fixture = try Fixture(imageLength: 8 << 20)
            let uffd = try Userfaultfd(features: [])
            try uffd.handle.register(range, mode: .missing)
            let regions = [ClientRegion(start: range.start, length: range.length, backingOffset: 0, pageSize: UInt64(pageSize))]
            do {
                try ManagerClient.handOver(uffd, regions: regions, to: fixture.socketPath)
            } catch {
                guard case .refused(let why) = error else { throw error }
                #expect(fixture.manager.clients.isEmpty)
                #expect(fixture.log.contains("refused handshake", "declared with \(pageSize)-byte pages"))
                return why
            }
            return nil
        }

        @Test(.needsUserfaultfd, .needsFreeHugePages(4), .usesHugePages)
        func hugetlbMemoryDeclaredAsBasePagesIsRefused() throws {
            let memory = try MemoryMapping(kind: .hugetlb, length: Self.hugePage)
            let why = try #require(try refusal(memory.range, declaring: systemPageSize), "accepted")
            #expect(why.contains("declared with \(systemPageSize)-byte pages"), "\(why)")
            #expect(why.contains("with \(Self.hugePage)-byte pages"), "\(why)")
        }

        @Test(.needsUserfaultfd) func baseMemoryDeclaredAsHugePagesIsRefused() throws {
            // 2 MiB of ordinary memory at a 2 MiB-aligned address, so that only the page size is wrong.
            guard let p = mmap(nil, 2 * Self.hugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
                  p != MAP_FAILED else { throw UserfaultfdError(operation: "mmap", errno: .init(rawValue: errno)) }
            defer { munmap(p, 2 * Self.hugePage) }
            let aligned = (UInt64(UInt(bitPattern: p)) + UInt64(Self.hugePage) - 1) & ~(UInt64(Self.hugePage) - 1)
            let why = try #require(try refusal(MemoryRange(start: aligned, length: UInt64(Self.hugePage)), declaring: Self.hugePage), "accepted")
            #expect(why.contains("declared with \(Self.hugePage)-byte pages"), "\(why)")
            #expect(why.contains("with \(systemPageSize)-byte pages"), "\(why)")
        }

        @Test(.needsUserfaultfd) func matchingPageSizeIsAccepted() throws {
            let memory = try MemoryMapping.anonymous(length: 4 * systemPageSize)
            #expect(try refusal(memory.range, declaring: systemPageSize) == nil)
        }
    }
}
