import FaultEngine
import Testing
import TestSupport
import Userfaultfd
import _CFaultEngine

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

extension FaultEngineTests {
    /// A quick look at µs per page for each named configuration (not a benchmark:
    /// `uffd bench` is). Runs only with `FAULT_ENGINE_MEASURE=<MiB>`, best in release.
    @Suite(.needsUserfaultfd, .serialized, .timeLimit(.minutes(10)), .enabled(if: getenv("FAULT_ENGINE_MEASURE") != nil, "set FAULT_ENGINE_MEASURE=<MiB> to measure"))
    struct MeasureTests {
        @Test func microsecondsPerPage() throws {
            let mib = getenv("FAULT_ENGINE_MEASURE").flatMap { Int(String(cString: $0)) } ?? 256
            let pages = mib << 20 / page
            let cpus = getenv("FAULT_ENGINE_PIN").flatMap { Int(String(cString: $0)) }
            let source = try imageSource(pages: pages)
            let random = permutation(pages, seed: 42)
            let sequential = Array(0..<pages)
            var configurations: [(String, FaultServerConfiguration, Userfaultfd.Features)] = [
                ("swift-handler-4k", .handler4k, []),
                ("swift-handler-64k", .handler64k, []),
                ("swift-sigbus", .sigbus, [.sigbus]),
                ("swift-adaptive", .adaptive, []),
                ("swift-move-staging", .move, []),
                ("copy-256k", .init(strategy: .copy(chunkPages: 64)), []),
                ("sigbus-256k", .init(strategy: .sigbus(chunkPages: 64)), [.sigbus]),
                ("adaptive-1m-4m", .init(strategy: .copy(chunkPages: 256), prefetch: .adaptive(maxPages: 1024)), []),
            ]
            if let only = getenv("FAULT_ENGINE_MEASURE_ONLY").map({ String(cString: $0) }) {
                configurations = configurations.filter { $0.0 == only }
            }
            if let cpu = cpus {
                for k in configurations.indices { configurations[k].1.handlerCPUs = [cpu] }
                _ = cfe_pin_current_thread(Int32(cpu))
            }
            for round in 0..<3 {
                for (name, configuration, features) in configurations {
                    for (pattern, order) in [("seq", sequential), ("rand", random)] {
                        let memory = try MemoryMapping.anonymous(length: pages * page)
                        let server = try serve(source, mapping: memory, features: features, configuration: configuration)
                        try server.start()
                        let t0 = cfe_now_ns()
                        touch(memory.base, pages: order)
                        let t1 = cfe_now_ns()
                        server.stop()
                        let ok = memcmp(memory.base, source.baseAddress, pages * page) == 0
                        #expect(ok, "\(name) \(pattern) corrupted memory")
                        let us = Double(t1 - t0) / 1000 / Double(pages)
                        print("measure round \(round) \(name) \(pattern) \(us) us/page faults=\(server.statistics.faults) verified=\(ok)")
                    }
                }
            }
        }
    }
}
