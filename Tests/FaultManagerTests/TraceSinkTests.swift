import FaultEngine
import FaultManager
import TestSupport
import Testing
import Userfaultfd

extension ManagerTests {
    /// `uffd serve --trace`: every client's server hands its faults to the configured sink.
    @Suite(.serialized, .timeLimit(.minutes(1)))
    struct TraceSinkTests {
        @Test(.needsUserfaultfd) func eachServedFaultReachesTheTraceSinkInOrder() throws {
            let sink = FaultTraceSink()
            let fixture = try Fixture(imageLength: 1 << 20) {
                $0.server = FaultServerConfiguration(strategy: .copy(chunkPages: 1))
                $0.traceSink = sink
            }
            let pages = 16
            let memory = try MemoryMapping.anonymous(length: pages * systemPageSize)
            let uffd = try Userfaultfd(features: [])
            try uffd.handle.register(memory.range, mode: .missing)
            let regions = [ClientRegion(start: memory.range.start, length: memory.range.length, backingOffset: 0,
                                        pageSize: UInt64(systemPageSize))]
            try ManagerClient.handOver(uffd, regions: regions, to: fixture.socketPath)
            let order = [3, 0, 15, 7, 8, 1]
            for p in order { _ = (memory.base + p * systemPageSize).load(as: UInt8.self) }
            // A fault is recorded just after its page is installed: the last may come a moment later.
            var traced: [Int] = []
            _ = fixture.wait {
                sink.drain { _, fault in traced.append(Int((fault.address - memory.range.start) / UInt64(systemPageSize))) }
                return traced.count >= order.count
            }
            #expect(traced == order)
            #expect(sink.spaces.count == 1)
            #expect(sink.spaces.first?.regions.map(\.range) == [memory.range])
        }
    }
}
