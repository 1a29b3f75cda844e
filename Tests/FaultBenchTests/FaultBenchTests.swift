import FaultEngine
import Foundation
import TestSupport
import Testing
import Userfaultfd
@testable import FaultBench

/// The contenders that need neither the engine nor anything but this kernel.
let baselineContenders: [Contender] = Contender.allCases.filter { !$0.usesEngine }
/// Those of them that install bytes from the source (all but kernel-first-touch).
let sourceContenders: [Contender] = baselineContenders.filter { $0 != .kernelFirstTouch }

@Suite("uffd bench", .needsUserfaultfd, .serialized, .sharesProcess, .timeLimit(.minutes(1)))
struct FaultBenchTests {
    @Test("A quick run of every C and kernel contender verifies, on both patterns")
    func quickBaselineRunVerifies() throws {
        let configuration = BenchConfiguration(sizeMiB: 4, repetitions: 2, contenders: baselineContenders)
        let report = try Benchmark.run(configuration)
        #expect(report.notMeasured.isEmpty, "\(report.notMeasured)")
        let expected = baselineContenders.flatMap { c in c.patterns.map { "\(c)/\($0)" } }
        #expect(report.results.map { "\($0.contender)/\($0.pattern)" } == expected)
        for result in report.results {
            #expect(result.verified, "\(result.name) \(result.pattern): \(result.note ?? "")")
            #expect(!result.foundWrongBytes)
            #expect(result.samples.count == 2)
            #expect(result.usPerPage > 0 && result.pagesPerSecond > 0)
        }
    }

    @Test("A corrupted source byte marks every contender that installs it unverified")
    func corruptedSourceByteIsCaught() throws {
        let offset = 5 * systemPageSize + 17
        let engine: [Contender] = [.swiftHandler64k, .swiftMove]
        let configuration = BenchConfiguration(sizeMiB: 1, repetitions: 1, contenders: baselineContenders + engine,
                                               corruption: .sourceByte(offset: offset))
        let report = try Benchmark.run(configuration)
        for contender in sourceContenders + engine where !contender.isScaleRun {
            for pattern in AccessPattern.allCases {
                let result = try #require(report.result(contender, pattern))
                #expect(!result.verified, "\(contender) \(pattern)")
                #expect(result.foundWrongBytes, "\(contender) \(pattern)")
                #expect(result.note?.contains("byte \(offset) ") == true, "\(result.note ?? "no note")")
            }
        }
        // A scale run installs the wrong byte only if it touches a region page p with
        // p % 256 == 5 (region page p holds source page p % 256 of the 1 MiB source).
        for (contender, regionPages) in [(Contender.scaleSigsegv1GiB, Benchmark.pagesIn1GiB),
                                         (.scaleSigsegv1TiB, Benchmark.pagesIn1TiB)] {
            let result = try #require(report.result(contender, .random))
            let touchesPage5 = Workload.scaleOrder(regionPages: regionPages, touches: 256).contains { $0 % 256 == 5 }
            #expect(result.verified == !touchesPage5, "\(contender)")
            #expect(result.foundWrongBytes == touchesPage5, "\(contender)")
        }
        // kernel-first-touch installs no source byte: its check must not be fooled either way.
        for pattern in AccessPattern.allCases {
            let result = try #require(report.result(.kernelFirstTouch, pattern))
            #expect(result.verified)
        }
        #expect(report.targets.allSatisfy { !$0.met })
    }

    @Test("A byte flipped in installed memory marks every contender unverified")
    func corruptedInstalledByteIsCaught() throws {
        let configuration = BenchConfiguration(sizeMiB: 1, repetitions: 1, contenders: baselineContenders,
                                               corruption: .installedByte(offsetInPage: 100))
        let report = try Benchmark.run(configuration)
        #expect(report.results.count == baselineContenders.reduce(0) { $0 + $1.patterns.count })
        for result in report.results {
            #expect(!result.verified, "\(result.name) \(result.pattern)")
            #expect(result.foundWrongBytes, "\(result.name) \(result.pattern)")
        }
    }

    @Test("The SIGSEGV scheme is reported as failed when the process runs out of VMAs",
          .ownsProcess,  // while its VMAs are used up, no other test can map a thread stack
          .enabled(if: maxMapCount().map { $0 <= 200_000 } ?? false,
                   "needs vm.max_map_count ≤ 200000 to exhaust it in a short test"))
    func sigsegvRunsOutOfVMAs() throws {
        let limit = try #require(maxMapCount())
        let workload = try Workload(sizeMiB: 1, corruption: nil)
        // Each isolated page made accessible in a PROT_NONE mapping costs two more VMAs.
        let order = Workload.scaleOrder(regionPages: Benchmark.pagesIn1TiB, touches: limit)
        let outcome = BaselineContenders.sigsegv(workload, regionPages: Benchmark.pagesIn1TiB, order: order)
        guard case .measured(let run) = outcome else {
            Issue.record("the SIGSEGV run did not take place: \(outcome)")
            return
        }
        #expect(!run.verified)
        #expect(run.mismatch == nil, "the pages it did fill must be right")
        #expect(run.failure?.contains("ran out of VMAs") == true, "\(run.failure ?? "no failure")")
        #expect(run.pages > 0 && run.pages < limit)
        // The process has its VMAs back: a fresh mapping works.
        _ = try MemoryMapping.anonymous(length: 1 << 20)
    }

    @Test("The C reference handler clips its last chunk to a region that is not a whole number of chunks")
    func cHandlerClipsTheLastChunk() throws {
        let workload = try Workload(sizeMiB: 1, corruption: nil)
        // 259 pages: 16 chunks of 16 pages, then 3 pages; region page p holds source page p % 256.
        let order: [UInt64] = [258] + (0..<258).reversed()
        let outcome = BaselineContenders.cHandler(workload, chunk: 65536, regionPages: 259, order: order)
        guard case .measured(let run) = outcome else {
            Issue.record("the C handler did not run: \(outcome)")
            return
        }
        #expect(run.verified, "\(run.mismatch ?? "") \(run.failure ?? "")")
        #expect(run.pages == 259)
    }

    @Test("The JSON is the table's document: the same figures and ratios")
    func jsonCarriesTheTable() throws {
        let configuration = BenchConfiguration(sizeMiB: 1, repetitions: 1,
                                               contenders: [.memcpy, .kernelFirstTouch, .cHandler4k, .swiftHandler4k])
        let report = try Benchmark.run(configuration)
        let decoded = try JSONDecoder().decode(BenchDocument.self, from: Data(report.json().utf8))
        #expect(decoded == report.document)
        #expect(decoded.rows.count == report.results.count + report.notMeasured.count)
        for result in report.results {
            let row = try #require(decoded.rows.first { $0.name == result.name && $0.pattern == result.pattern.rawValue })
            #expect(row.usPerPage == result.usPerPage && row.pagesPerSecond == result.pagesPerSecond)
            #expect(row.verified == result.verified)
        }
        // The ratios the table shows are in the JSON.
        let swift = try #require(decoded.rows.first { $0.name == "swift-handler-4k" && $0.pattern == "random" })
        let twin = try #require(report.ratio(.swiftHandler4k, to: .cHandler4k, .random))
        #expect(swift.vsCTwin == twin)
        #expect(swift.vsKernel == report.ratio(.swiftHandler4k, to: .kernelFirstTouch, .random))
        #expect(swift.vsMemcpy == report.ratio(.swiftHandler4k, to: .memcpy, .random))
        #expect(report.table().contains(Reporting.fixed(twin, 2) + "×"))
        #expect(decoded.targets.map(\.target) == report.targets.map(\.summary))
        #expect(decoded.sizeMiB == 1)
    }

    @Test("The table shows every result, the ratios to the baselines and the reasons for missing figures")
    func tableContents() throws {
        let report = BenchReport(
            sizeMiB: 1, pageSize: 4096, repetitions: 1, scaleTouches: 256,
            results: [
                BenchResult(contender: .memcpy, pattern: .random, usPerPage: 0.5, verified: true, samples: [0.5], note: nil, foundWrongBytes: false),
                BenchResult(contender: .kernelFirstTouch, pattern: .random, usPerPage: 2, verified: true, samples: [2], note: nil, foundWrongBytes: false),
                BenchResult(contender: .cHandler4k, pattern: .random, usPerPage: 10, verified: true, samples: [10], note: nil, foundWrongBytes: false),
                BenchResult(contender: .swiftHandler4k, pattern: .random, usPerPage: 8, verified: true, samples: [8], note: nil, foundWrongBytes: false),
            ],
            notMeasured: [NotMeasured(contender: .swiftMove, pattern: .random, reason: "not available: no MOVE")])
        let table = report.table()
        #expect(table.contains("1.25×"), "swift-handler-4k is 10/8 = 1.25× its C twin")
        #expect(table.contains("0.25×"), "swift-handler-4k is 2/8 = 0.25× kernel-first-touch")
        #expect(table.contains("not available: no MOVE"))
        #expect(table.contains("swift-handler-4k ≥ 0.95× c-handler-4k pages/s (random): 1.250× — met"))
        #expect(report.ratio(.swiftHandler4k, to: .cHandler4k, .random) == 1.25)
        #expect(report.targets.count == 1)
        // The JSON model holds the same ratios and notes.
        let document = report.document
        let swift = try #require(document.rows.first { $0.name == "swift-handler-4k" })
        #expect(swift.vsCTwin == 1.25 && swift.vsKernel == 0.25 && swift.vsMemcpy == 0.0625)
        let move = try #require(document.rows.first { $0.name == "swift-move" })
        #expect(move.usPerPage == nil && move.notes.map { document.notes[$0 - 1] } == ["swift-move: not available: no MOVE"])
        #expect(document.targets.first?.met == true)
    }

    @Test("Bad input gets an error naming what was wrong")
    func badInput() throws {
        do {
            _ = try Benchmark.run(BenchConfiguration(sizeMiB: 0))
            Issue.record("a size of 0 MiB was accepted")
        } catch {
            #expect(error.message.contains("size 0 MiB"))
        }
        do {
            _ = try Benchmark.run(BenchConfiguration(sizeMiB: 1, repetitions: 0))
            Issue.record("0 repetitions were accepted")
        } catch {
            #expect(error.message.contains("repetitions 0"))
        }
    }

    @Test("Scale orders touch distinct pages spread over the whole region, the same in every run")
    func scaleOrder() {
        let order = Workload.scaleOrder(regionPages: Benchmark.pagesIn1TiB, touches: 1000)
        #expect(order.count == 1000)
        #expect(Set(order).count == 1000)
        #expect(order.allSatisfy { $0 < Benchmark.pagesIn1TiB })
        #expect(order.max()! > Benchmark.pagesIn1TiB / 10 * 9, "pages reach the end of the region")
        #expect(order != order.sorted(), "the order is random")
        #expect(order == Workload.scaleOrder(regionPages: Benchmark.pagesIn1TiB, touches: 1000))
        let full = Workload.scaleOrder(regionPages: 256, touches: 256)
        #expect(full.sorted() == Array(0..<256))
    }
}

/// `vm.max_map_count`, if it can be read.
func maxMapCount() -> Int? {
    guard let text = try? String(contentsOfFile: "/proc/sys/vm/max_map_count", encoding: .utf8) else { return nil }
    return Int(text.trimmingCharacters(in: .whitespacesAndNewlines))
}

extension FaultBenchTests {
    @Suite("with the engine", .needsUserfaultfd)
    struct EngineContenderTests {
        @Test("Every engine contender the running kernel supports verifies on a quick run")
        func engineContendersVerify() throws {
            let engine = Contender.allCases.filter(\.usesEngine)
            let offered = try Userfaultfd.probe().features
            let report = try Benchmark.run(BenchConfiguration(sizeMiB: 2, repetitions: 1, contenders: engine))
            for contender in engine {
                let needs = kernelFeatures(contender)
                for pattern in contender.patterns {
                    if offered.isSuperset(of: needs) {
                        let result = report.result(contender, pattern)
                        let why = report.notMeasured.first { $0.contender == contender && $0.pattern == pattern }?.reason
                        #expect(result?.verified == true, "\(contender) \(pattern): \(result?.note ?? why ?? "no figure")")
                    } else {
                        // Without the feature there is no figure, and the reason says so.
                        #expect(report.result(contender, pattern) == nil, "\(contender) ran without \(needs)")
                    }
                }
            }
        }

        @Test("The file contenders serve the image file: copied by default, moved through the staging buffer otherwise",
              .enabled(if: (try? Userfaultfd.probe().features.contains(.move)) == true, "the kernel offers no UFFDIO_MOVE"))
        func fileContendersServeTheImageFile() throws {
            let report = try Benchmark.run(BenchConfiguration(sizeMiB: 2, repetitions: 1, contenders: [.swiftFileCopy, .swiftFileMove]))
            for contender in [Contender.swiftFileCopy, .swiftFileMove] {
                for pattern in AccessPattern.allCases {
                    let result = try #require(report.result(contender, pattern), "\(contender) \(pattern) not measured")
                    #expect(result.verified, "\(contender) \(pattern): \(result.note ?? "")")
                }
            }
            #expect(report.result(.swiftFileCopy, .sequential)?.remark?.contains("pread") == true)
            #expect(report.result(.swiftFileMove, .sequential)?.remark?.contains("UFFDIO_MOVE") == true)
        }

        @Test("swift-move consumes its own copy of the source, never the shared one",
              .enabled(if: (try? Userfaultfd.probe().features.contains(.move)) == true, "the kernel offers no UFFDIO_MOVE"))
        func moveLeavesTheSharedSourceIntact() throws {
            let report = try Benchmark.run(BenchConfiguration(sizeMiB: 1, repetitions: 2, contenders: [.swiftMove, .cHandler4k]))
            let move = try #require(report.result(.swiftMove, .sequential))
            #expect(move.verified, "\(move.note ?? "")")
            #expect(move.remark?.contains("consumes its source") == true)
            // c-handler-4k runs after swift-move in each repetition, from the shared source.
            for pattern in AccessPattern.allCases {
                #expect(report.result(.cHandler4k, pattern)?.verified == true)
            }
        }
    }
}

/// The userfaultfd features an engine contender needs beyond MISSING faults on
/// anonymous memory.
func kernelFeatures(_ contender: Contender) -> Userfaultfd.Features {
    switch contender {
    case .swiftSigbus: return [.sigbus]
    case .swiftMove, .swiftFileCopy, .swiftFileMove: return [.move]
    case .swiftMinor: return [.minorShmem, .missingShmem]
    default: return []
    }
}

