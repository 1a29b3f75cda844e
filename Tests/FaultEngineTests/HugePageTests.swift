import FaultEngine
import TestSupport
import Testing
import Userfaultfd
import UserfaultfdDiagnostics
import _CFaultEngine

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

let hugePage = HugePages.size

/// The configuration for 2 MiB pages with the given chunk (in base pages) and prefetch.
func hugeConfiguration(chunkPages: Int = 1, prefetch: FaultServerConfiguration.Prefetch = .none) -> FaultServerConfiguration {
    FaultServerConfiguration(strategy: .copy(chunkPages: chunkPages), prefetch: prefetch, pageSize: hugePage)
}

/// Registers `mapping` (hugetlb memory) MISSING on a new uffd with the layout events,
/// and returns a server of 2 MiB pages for all of it over `source`.
func serveHuge<S: PageSource>(
    _ source: S, mapping: borrowing MemoryMapping, configuration: FaultServerConfiguration
) throws -> FaultServer<S> {
    try serve(source, mapping: mapping, features: [.eventRemove, .eventUnmap, .eventRemap, .missingHugetlbfs],
              configuration: configuration)
}

/// Reads one byte of each huge page in `order`, at an offset inside the page (the
/// fault address is not huge-page aligned).
@inline(never)
func touchHuge(_ base: UnsafeMutableRawPointer, pages order: [Int], within offset: Int = 12_345) {
    var sum: UInt8 = 0
    for p in order { sum &+= (base + p * hugePage + offset).load(as: UInt8.self) }
    touchSink &+= sum
}

/// Whether `count` bytes at `base` are all zero.
func allZero(_ base: UnsafeRawPointer, count: Int) -> Bool {
    for i in 0..<count where base.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }
    return true
}

extension FaultEngineTests {
    @Suite(.needsUserfaultfd, .serialized, .usesHugePages, .timeLimit(.minutes(1)))
    struct HugePageTests {
        static let pages = 4

        @Test(.needsFreeHugePages(4))
        func memorySourceServesHugePagesByteForByte() throws {
            let pages = Self.pages
            let memory = try MemoryMapping(kind: .hugetlb, length: pages * hugePage)
            let source = try MemorySource(length: pages * hugePage) { bytes in
                for i in 0..<bytes.count { bytes[i] = imageByte(i) }
            }
            let server = try serveHuge(source, mapping: memory, configuration: hugeConfiguration())
            #expect(server.pageSize == hugePage)
            try server.start()
            touchHuge(memory.base, pages: [2, 0, 3, 1])
            server.stop()
            #expect(firstMismatch(memory.base, count: pages * hugePage) == nil)
            let stats = server.statistics
            #expect(stats.missingFaults == UInt64(pages))
            #expect(stats.pagesInstalled == UInt64(pages))
            #expect(stats.pagesPrefetched == 0)
            #expect(stats.faultsOutsideRegions == 0)
            #expect(stats.lastError == nil)
        }

        @Test(.needsFreeHugePages(4), arguments: FileSource.Access.allCases)
        func fileSourceServesHugePagesInChunks(access: FileSource.Access) throws {
            let pages = Self.pages
            let file = try ImageFile(pages: pages * hugePage / page)
            let memory = try MemoryMapping(kind: .hugetlb, length: pages * hugePage)
            // 1024 base pages: chunks of two whole huge pages, aligned to the region.
            let server = try serveHuge(try FileSource(path: file.path, access: access), mapping: memory,
                                       configuration: hugeConfiguration(chunkPages: 1024))
            try server.start()
            touchHuge(memory.base, pages: [1])
            // The first fault installed huge pages 0 and 1, and nothing beyond.
            let resident = residentPages(memory.base, pages: pages * hugePage / page)
            touchHuge(memory.base, pages: [0, 2, 3])
            server.stop()
            #expect(firstMismatch(memory.base, count: pages * hugePage) == nil)
            let perHuge = hugePage / page
            #expect(resident[0] && resident[perHuge], "huge pages 0 and 1 are not both present")
            #expect(!resident[2 * perHuge] && !resident[3 * perHuge], "a huge page beyond the chunk was installed")
            let stats = server.statistics
            #expect(stats.missingFaults == 2)
            #expect(stats.pagesInstalled == UInt64(pages))
            #expect(stats.pagesPrefetched == 2)
        }

        @Test(.needsFreeHugePages(4))
        func hugePagesReleasedByRemoveComeBackAsZeros() throws {
            let pages = Self.pages
            let memory = try MemoryMapping(kind: .hugetlb, length: pages * hugePage)
            let server = try serveHuge(try imageSource(pages: pages * hugePage / page), mapping: memory,
                                       configuration: hugeConfiguration(chunkPages: 16))
            try server.start()
            touchHuge(memory.base, pages: [0, 1, 2, 3])
            // Punch out huge pages 1 and 2 (one of them written to first): the range stays
            // registered and the next faults there must get zeros, not the image.
            memory.base.storeBytes(of: 0x5A, toByteOffset: hugePage + 99, as: UInt8.self)
            #expect(madvise(memory.base + hugePage, 2 * hugePage, MADV_REMOVE) == 0)
            touchHuge(memory.base, pages: [2, 1])
            server.stop()
            #expect(allZero(memory.base + hugePage, count: 2 * hugePage))
            #expect(firstMismatch(memory.base, count: hugePage) == nil)
            #expect(firstMismatch(memory.base + 3 * hugePage, count: hugePage, sourceOffset: 3 * hugePage) == nil)
            let stats = server.statistics
            #expect(stats.removeEvents >= 1)
            #expect(stats.zeroPages == 2)
            #expect(stats.pagesInstalled == UInt64(pages + 2))
            #expect(stats.lastError == nil)
        }

        @Test(.needsFreeHugePages(4))
        func recordedWorkingSetReplaysWholeHugePages() throws {
            let pages = Self.pages
            let path = "/tmp/fault-engine-huge-ws-\(getpid())"
            defer { unlink(path) }
            do {
                let memory = try MemoryMapping(kind: .hugetlb, length: pages * hugePage)
                var c = hugeConfiguration()
                c.recordWorkingSet = path
                let server = try serveHuge(try imageSource(pages: pages * hugePage / page), mapping: memory, configuration: c)
                try server.start()
                touchHuge(memory.base, pages: [3, 1])
                server.stop()
            }
            #expect(try WorkingSetFile.read(path) == [UInt64(3 * hugePage), UInt64(hugePage)])
            let memory = try MemoryMapping(kind: .hugetlb, length: pages * hugePage)
            let server = try serveHuge(try imageSource(pages: pages * hugePage / page), mapping: memory,
                                       configuration: hugeConfiguration(prefetch: .replay(path: path)))
            try server.start()
            try waitFor { server.statistics.pagesInstalled >= 2 }
            // The replayed pages are present: reading them takes no fault.
            touchHuge(memory.base, pages: [1, 3])
            let stats = server.statistics
            server.stop()
            #expect(stats.pagesInstalled == 2)
            #expect(stats.missingFaults == 0)
            #expect(firstMismatch(memory.base + hugePage, count: hugePage, sourceOffset: hugePage) == nil)
            #expect(firstMismatch(memory.base + 3 * hugePage, count: hugePage, sourceOffset: 3 * hugePage) == nil)
        }

        @Test(.needsFreeHugePages(4))
        func adaptiveReadAheadGrowsInWholeHugePages() throws {
            let pages = Self.pages
            let memory = try MemoryMapping(kind: .hugetlb, length: pages * hugePage)
            // Chunk 16 base pages (one huge page), read-ahead up to 1024 (two huge pages).
            let server = try serveHuge(try imageSource(pages: pages * hugePage / page), mapping: memory,
                                       configuration: hugeConfiguration(chunkPages: 16, prefetch: .adaptive(maxPages: 1024)))
            try server.start()
            // 0: one page; 1 (sequential): pages 1 and 2; 2: present; 3: page 3 (clipped).
            touchHuge(memory.base, pages: [0, 1, 2, 3], within: 0)
            server.stop()
            #expect(firstMismatch(memory.base, count: pages * hugePage) == nil)
            let stats = server.statistics
            #expect(stats.missingFaults == 3)
            #expect(stats.pagesInstalled == UInt64(pages))
            #expect(stats.pagesPrefetched == 1)
        }

        @Test(.needsFreeHugePages(4))
        func backgroundPopulateInstallsEveryHugePageWithoutFaults() throws {
            let pages = Self.pages
            let memory = try MemoryMapping(kind: .hugetlb, length: pages * hugePage)
            var c = hugeConfiguration(chunkPages: 16)
            c.backgroundPopulate = true
            let server = try serveHuge(try imageSource(pages: pages * hugePage / page), mapping: memory, configuration: c)
            try server.start()
            try waitFor { server.statistics.pagesInstalled >= UInt64(pages) }
            touchHuge(memory.base, pages: [3, 2, 1, 0])
            let stats = server.statistics
            server.stop()
            #expect(stats.pagesInstalled == UInt64(pages))
            #expect(stats.missingFaults == 0)
            #expect(firstMismatch(memory.base, count: pages * hugePage) == nil)
        }

        @Test(.needsFreeHugePages(4))
        func failingSourceGivesSIGBUSOnAHugePage() async {
            await #expect(processExitsWith: .signal(SIGBUS)) {
                let memory = try MemoryMapping(kind: .hugetlb, length: 2 * hugePage)
                let source = ClosureSource(length: UInt64(2 * hugePage)) { (buffer, offset) throws(PageSourceError) in
                    throw PageSourceError(.failed("no bytes"), sourceOffset: offset, length: buffer.count)
                }
                let server = try serveHuge(source, mapping: memory, configuration: hugeConfiguration())
                try server.start()
                _ = (memory.base + hugePage + systemPageSize).load(as: UInt8.self)   // SIGBUS here
                server.stop()
            }
        }

        @Test(.needsFreeHugePages(4))
        func hugePageOutsideTheServedRegionGivesSIGBUS() async {
            await #expect(processExitsWith: .signal(SIGBUS)) {
                let memory = try MemoryMapping(kind: .hugetlb, length: 2 * hugePage)
                let uffd = try Userfaultfd(features: [.missingHugetlbfs])
                try uffd.handle.register(memory.range, mode: .missing)
                // Both huge pages registered, only the first served.
                let served = ServedRegion(range: MemoryRange(memory.base, length: hugePage))
                let server = try FaultServer(userfaultfd: uffd, regions: [served], source: try imageSource(pages: hugePage / page),
                                             configuration: hugeConfiguration())
                try server.start()
                _ = (memory.base + hugePage).load(as: UInt8.self)   // SIGBUS here
                server.stop()
            }
        }

        @Test func strategiesHugePagesCannotUseAreRefusedByName() throws {
            // Three huge pages of address space: a 2 MiB-aligned region lies inside.
            let memory = try MemoryMapping.anonymous(length: 3 * hugePage)
            let aligned = (memory.address(at: 0) + UInt64(hugePage) - 1) & ~UInt64(hugePage - 1)
            let region = ServedRegion(range: MemoryRange(start: aligned, length: UInt64(hugePage)))
            func refusal(_ configuration: FaultServerConfiguration, region: ServedRegion) -> String? {
                do {
                    let uffd = try Userfaultfd(features: [])
                    try uffd.handle.register(memory.range, mode: .missing)
                    _ = try FaultServer(userfaultfd: uffd, regions: [region], source: ZeroSource(), configuration: configuration)
                    return nil
                } catch {
                    guard case .invalidArgument(let why) = error.kind else { return "not an invalid argument: \(error)" }
                    return why
                }
            }
            // (MINOR + CONTINUE serves huge pages: AutomaticStrategyTests.)
            for (strategy, name) in [(FaultServerConfiguration.Strategy.move(chunkPages: 16), "move"),
                                     (.sigbus(chunkPages: 16), "sigbus")] {
                var c = hugeConfiguration()
                c.strategy = strategy
                let why = try #require(refusal(c, region: region), "\(name) was accepted with 2 MiB pages")
                #expect(why.contains("the \(name) strategy is not supported with 2097152-byte pages"), "\(why)")
            }
            var odd = hugeConfiguration()
            odd.pageSize = 8192
            #expect(refusal(odd, region: region)?.contains("pageSize 8192") == true)
            // A region aligned to base pages but not to huge pages is refused too.
            let misaligned = ServedRegion(range: MemoryRange(start: aligned + UInt64(page), length: UInt64(hugePage)))
            #expect(refusal(hugeConfiguration(), region: misaligned)?.contains("not page-aligned (2097152-byte pages)") == true)
            #expect(refusal(hugeConfiguration(), region: region) == nil)
        }
    }
}

extension FaultEngineTests {
    /// A quick look at serving 16 MiB as 2 MiB pages against 4 KiB pages and the
    /// kernel's own hugetlb fault (not a benchmark). Runs only with
    /// `FAULT_ENGINE_MEASURE_HUGE=<rounds>`; contenders alternate within each round.
    @Suite(.needsUserfaultfd, .serialized, .usesHugePages, .timeLimit(.minutes(5)),
           .enabled(if: getenv("FAULT_ENGINE_MEASURE_HUGE") != nil, "set FAULT_ENGINE_MEASURE_HUGE=<rounds> to measure"))
    struct HugePageMeasureTests {
        @Test(.needsFreeHugePages(4))
        func hugeVersusBasePages() throws {
            let rounds = getenv("FAULT_ENGINE_MEASURE_HUGE").flatMap { Int(String(cString: $0)) } ?? 5
            let bytes = 16 << 20
            #expect(HugePages.ensureFree(bytes / hugePage), "8 free huge pages are needed")
            let source = try imageSource(pages: bytes / page)
            // name, memory kind, configuration (nil: no uffd, the kernel fills zeros)
            let contenders: [(String, MemoryMapping.Kind, FaultServerConfiguration?)] = [
                ("kernel-hugetlb", .hugetlb, nil),
                ("uffd-hugetlb-2m", .hugetlb, hugeConfiguration()),
                ("uffd-anon-4k", .anonymous, .handler4k),
                ("uffd-anon-64k", .anonymous, .handler64k),
            ]
            var perMiB: [String: [Double]] = [:]
            var faultRate: [String: [Double]] = [:]
            for _ in 0..<rounds {
                for (name, kind, configuration) in contenders {
                    let memory = try MemoryMapping(kind: kind, length: bytes)
                    let step = kind == .hugetlb ? hugePage : page
                    var server: FaultServer<MemorySource>? = nil
                    if let configuration {
                        let uffd = try Userfaultfd(features: [.eventRemove, .eventUnmap, .eventRemap])
                        try uffd.handle.register(memory.range, mode: .missing)
                        server = try FaultServer(userfaultfd: uffd, regions: [ServedRegion(range: memory.range)],
                                                 source: source, configuration: configuration)
                        try server?.start()
                    }
                    let faultsBefore = threadPageFaults()
                    let t0 = cfe_now_ns()
                    var sum: UInt8 = 0
                    for offset in stride(from: 0, to: bytes, by: step) { sum &+= (memory.base + offset).load(as: UInt8.self) }
                    let t1 = cfe_now_ns()
                    // Counted by the kernel for every contender alike, the one without a uffd included.
                    let faults = Double(threadPageFaults() - faultsBefore)
                    touchSink &+= sum
                    server?.stop()
                    if server != nil {
                        #expect(memcmp(memory.base, source.baseAddress, bytes) == 0, "\(name) corrupted memory")
                    }
                    let seconds = Double(t1 - t0) / 1e9
                    perMiB[name, default: []].append(seconds * 1e6 / Double(bytes >> 20))
                    faultRate[name, default: []].append(faults / seconds)
                }
            }
            func median(_ v: [Double]?) -> Double { v.flatMap(Reporting.median) ?? .nan }
            let kernel = median(perMiB["kernel-hugetlb"])
            print("measure-huge contender          us/MiB   faults/s   x kernel-hugetlb  (median of \(rounds), 16 MiB)")
            for (name, _, _) in contenders {
                let us = median(perMiB[name])
                let padded = name + String(repeating: " ", count: max(0, 18 - name.count))
                print("measure-huge \(padded) \(Reporting.fixed(us, 0))  \(Reporting.fixed(median(faultRate[name]), 0))  \(Reporting.fixed(us / kernel, 2))")
            }
        }
    }
}

/// Page faults the calling thread has taken so far (minor and major), as the kernel counts them.
func threadPageFaults() -> Int {
    var usage = rusage()
    // RUSAGE_THREAD (1): the headers define it only under _GNU_SOURCE.
    _ = getrusage(__rusage_who_t(1), &usage)
    return usage.ru_minflt + usage.ru_majflt
}

