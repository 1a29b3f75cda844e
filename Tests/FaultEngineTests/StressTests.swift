import FaultEngine
import Synchronization
import Testing
import TestSupport
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// One minute for the short form; an hour when `FAULT_ENGINE_STRESS_FAULTS` asks for more.
let stressTimeLimit: TimeLimitTrait.Duration = getenv("FAULT_ENGINE_STRESS_FAULTS") != nil ? .minutes(60) : .minutes(1)

extension FaultEngineTests {
    /// Many faults from several threads at once, every page compared with its source.
    ///
    /// The short form (20 000 faults) runs in CI. `FAULT_ENGINE_STRESS_FAULTS=10000000`
    /// runs the long form (about 10 million faults; minutes in release, longer in debug).
    @Suite(.needsUserfaultfd, .serialized, .timeLimit(stressTimeLimit))
    struct StressTests {
        static var faultTarget: Int {
            guard let text = getenv("FAULT_ENGINE_STRESS_FAULTS") else { return 20_000 }
            return max(Int(String(cString: text)) ?? 20_000, 1)
        }

        @Test func manyConcurrentFaultsAllMatchTheirSource() throws {
            let pages = 4096
            let source = try imageSource(pages: pages)
            let target = Self.faultTarget
            var faults: UInt64 = 0
            var mismatches = 0
            var round = 0
            // Each round faults every page at least once, so this ends after target / pages rounds.
            while faults < UInt64(target) {
                // Alternate the handler-thread and in-thread paths, and the chunk sizes.
                let configuration: FaultServerConfiguration
                var features: Userfaultfd.Features = [.eventRemove]
                switch round % 3 {
                case 0:
                    var c = FaultServerConfiguration.handler4k
                    c.handlerThreads = 2
                    configuration = c
                case 1:
                    features.insert(.sigbus)
                    configuration = .init(strategy: .sigbus(chunkPages: 1))
                default:
                    configuration = .handler64k
                }
                let memory = try MemoryMapping.anonymous(length: pages * page)
                let server = try serve(source, mapping: memory, features: features, configuration: configuration)
                try server.start()
                let base = UInt(bitPattern: memory.base)
                let seed = UInt64(round)
                onThreads(3) { t in
                    touch(UnsafeMutableRawPointer(bitPattern: base)!, pages: permutation(pages, seed: seed &* 7 &+ UInt64(t)))
                }
                server.stop()
                if memcmp(memory.base, source.baseAddress, pages * page) != 0 {
                    for p in 0..<pages where memcmp(memory.base + p * page, source.baseAddress + p * page, page) != 0 {
                        mismatches += 1
                    }
                }
                let stats = server.statistics
                // Three threads fault every page: each page is still installed exactly once
                // (the handler paths count installs; the in-thread path counts its faults).
                if round % 3 != 1 {
                    #expect(stats.pagesInstalled == UInt64(pages), "round \(round): \(stats.pagesInstalled) pages installed")
                } else {
                    #expect(stats.inThreadFaults >= 1 && stats.inThreadFaults <= UInt64(3 * pages), "round \(round): \(stats.inThreadFaults)")
                }
                #expect(stats.sourceErrors == 0 && stats.poisonedPages == 0 && stats.faultsOutsideRegions == 0,
                        "round \(round): \(stats.lastError ?? "")")
                try #require(stats.faults > 0, "round \(round) saw no fault")
                faults += stats.faults
                round += 1
            }
            #expect(mismatches == 0, "\(mismatches) pages differ from the source after \(faults) faults")
        }
    }
}
