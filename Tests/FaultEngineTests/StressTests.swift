import FaultEngine
import Synchronization
import Testing
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
    @Suite(.serialized, .timeLimit(stressTimeLimit))
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
                faults += server.statistics.faults
                round += 1
            }
            #expect(mismatches == 0, "\(mismatches) pages differ from the source after \(faults) faults")
            #expect(faults >= UInt64(target))
        }
    }
}
