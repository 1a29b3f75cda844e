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

/// A deferred source that queues what the handler asks for; the test installs.
final class RequestQueue: DeferredPageSource, @unchecked Sendable {
    let pending = Mutex<[DeferredFault]>([])
    let asked = Atomic<Int>(0)
    let zeros = Atomic<Int>(0)
    var length: UInt64? { nil }

    func request(_ fault: DeferredFault) {
        asked.add(1, ordering: .relaxed)
        pending.withLock { $0.append(fault) }
    }

    func resolvedWithZeros(_ fault: DeferredFault) { zeros.add(1, ordering: .relaxed) }

    func take() -> [DeferredFault] { pending.withLock { q in defer { q.removeAll() }; return q } }

    /// Waits until something was asked for and returns it.
    func next() -> [DeferredFault] {
        while true {
            let got = take()
            if !got.isEmpty { return got }
            usleep(100)
        }
    }
}

/// Requests the handler made in an exit test's child (read by its SIGBUS handler).
let deferredChildRequests = Atomic<Int>(0)

final class CountingQueue: DeferredPageSource, @unchecked Sendable {
    var length: UInt64? { nil }
    func request(_ fault: DeferredFault) { deferredChildRequests.add(1, ordering: .relaxed) }
}

/// The test image's bytes, outside any registered memory.
func imageBuffer(pages: Int) -> UnsafeMutableRawPointer {
    let p = UnsafeMutableRawPointer.allocate(byteCount: pages * page, alignment: page)
    for i in 0..<(pages * page) { p.storeBytes(of: imageByte(i), toByteOffset: i, as: UInt8.self) }
    return p
}

extension FaultEngineTests {
    @Suite(.needsUserfaultfd, .serialized, .timeLimit(.minutes(1)))
    struct DeferredSourceTests {
        /// Four threads fault on every page in different orders while a receiver installs
        /// what they ask for and, between requests, streams the pages in order: every
        /// byte matches the source, every page is installed exactly once, and each
        /// request names the source offset of its address.
        @Test func concurrentFaultsGetTheSourcesBytes() throws {
            let pages = 512
            let offsetPages = 16
            let imageBase = imageBuffer(pages: pages + offsetPages)
            defer { imageBase.deallocate() }
            let imageAddress = UInt(bitPattern: imageBase)
            let memory = try MemoryMapping.anonymous(length: pages * page)
            let uffd = try Userfaultfd(features: [.poison])
            try uffd.handle.register(memory.range, mode: .missing)
            let queue = RequestQueue()
            let server = try FaultServer(
                userfaultfd: uffd, regions: [ServedRegion(range: memory.range, sourceOffset: UInt64(offsetPages * page))],
                source: queue, configuration: .handler4k)
            try server.start()
            let base = memory.range.start
            let installed = Atomic<Int>(0)
            let skipped = Atomic<Int>(0)
            let badRequests = Atomic<Int>(0)
            let receiver = DedicatedThread(name: "test-receiver") {
                let image = UnsafeRawPointer(bitPattern: imageAddress)!
                var streamed = 0
                while installed.load(ordering: .relaxed) < pages {
                    for fault in queue.take() {
                        if fault.sourceOffset != fault.address - base + UInt64(offsetPages * page) { badRequests.add(1, ordering: .relaxed) }
                        let r = try! server.install(image + Int(fault.sourceOffset), at: fault.address, pages: 1)
                        installed.add(r.installed, ordering: .relaxed)
                        skipped.add(r.alreadyPresent, ordering: .relaxed)
                    }
                    if streamed < pages {
                        let n = min(4, pages - streamed)
                        let r = try! server.install(image + (offsetPages + streamed) * page,
                                                    at: base + UInt64(streamed * page), pages: n)
                        installed.add(r.installed, ordering: .relaxed)
                        skipped.add(r.alreadyPresent, ordering: .relaxed)
                        streamed += n
                    }
                }
            }
            let mismatches = Atomic<Int>(0)
            let address = UInt(bitPattern: memory.base)
            onThreads(4) { t in
                let pointer = UnsafeRawPointer(bitPattern: address)!
                for p in permutation(pages, seed: UInt64(t + 1)) {
                    if firstMismatch(pointer + p * page, count: page, sourceOffset: (offsetPages + p) * page) != nil {
                        mismatches.add(1, ordering: .relaxed)
                    }
                }
            }
            receiver.join()
            server.stop()
            #expect(mismatches.load(ordering: .relaxed) == 0)
            #expect(installed.load(ordering: .relaxed) == pages)
            #expect(badRequests.load(ordering: .relaxed) == 0)
            #expect(firstMismatch(memory.base, count: pages * page, sourceOffset: offsetPages * page) == nil)
            #expect(server.statistics.pagesInstalled == UInt64(pages))
        }

        /// A fault is handed over and waits until the page is installed from outside;
        /// a second install of it is skipped, and a page marked zero is resolved by the
        /// handler without asking.
        @Test func deferredFaultWaitsUntilInstalled() throws {
            let pages = 16
            let image = imageBuffer(pages: pages)
            defer { image.deallocate() }
            let memory = try MemoryMapping.anonymous(length: pages * page)
            let uffd = try Userfaultfd(features: [.poison])
            try uffd.handle.register(memory.range, mode: .missing)
            let queue = RequestQueue()
            let server = try FaultServer(userfaultfd: uffd, regions: [ServedRegion(range: memory.range)],
                                         source: queue, configuration: .handler4k)
            #expect(try server.markPresent(at: memory.range.start + UInt64(5 * page), zero: true) == .missing)
            try server.start()
            let address = UInt(bitPattern: memory.base)
            let pointer = memory.base
            let done = Atomic<Bool>(false)
            let seen = Atomic<UInt8>(0)
            let toucher = DedicatedThread(name: "test-toucher") {
                seen.store((UnsafeRawPointer(bitPattern: address)! + 3 * page + 7).load(as: UInt8.self), ordering: .relaxed)
                done.store(true, ordering: .releasing)
            }
            let asked = queue.next()
            #expect(asked == [DeferredFault(address: memory.range.start + UInt64(3 * page), sourceOffset: UInt64(3 * page))])
            // Nothing installs the page but the call below: the thread must still wait.
            let finishedEarly = done.load(ordering: .acquiring)
            #expect(!finishedEarly)
            #expect(!server.isPresent(memory.range.start + UInt64(3 * page)))
            let first = try server.install(image + 3 * page, at: memory.range.start + UInt64(3 * page), pages: 1)
            toucher.join()
            #expect(first.installed == 1 && first.alreadyPresent == 0)
            #expect(seen.load(ordering: .relaxed) == imageByte(3 * page + 7))
            let again = try server.install(image + 2 * page, at: memory.range.start + UInt64(2 * page), pages: 2)
            #expect(again.installed == 1 && again.alreadyPresent == 1)

            // Marked zero: zeros, without asking.
            #expect((pointer + 5 * page + 100).load(as: UInt8.self) == 0)
            // The handler reports the zeros after the install woke this thread.
            while queue.zeros.load(ordering: .relaxed) == 0 { usleep(100) }
            #expect(queue.zeros.load(ordering: .relaxed) == 1)
            #expect(queue.asked.load(ordering: .relaxed) == 1)
            #expect(try server.presenceBitmap(at: memory.range.start, pages: pages) == [0b0010_1100, 0])

            // Forgotten pages are missing again and asked for on the next fault.
            #expect(try server.forget(at: memory.range.start + UInt64(2 * page), pages: 2) == 2)
            #expect(!server.isPresent(memory.range.start + UInt64(3 * page)))
            let refault = DedicatedThread(name: "test-refault") {
                seen.store((UnsafeRawPointer(bitPattern: address)! + 3 * page + 9).load(as: UInt8.self), ordering: .relaxed)
            }
            #expect(queue.next().map(\.address) == [memory.range.start + UInt64(3 * page)])
            try server.install(image + 3 * page, at: memory.range.start + UInt64(3 * page), pages: 1)
            refault.join()
            #expect(seen.load(ordering: .relaxed) == imageByte(3 * page + 9))
            #expect(throws: UserfaultfdError.self) {
                try server.install(image, at: memory.range.start + UInt64(15 * page), pages: 2)
            }
            server.stop()
        }

        /// Poisoning marks every missing page present and counts it; pages installed or
        /// marked zero are left alone, and installing a poisoned page is skipped.
        @Test func poisonMissingCountsWhatNeverArrived() throws {
            let pages = 16
            let image = imageBuffer(pages: pages)
            defer { image.deallocate() }
            let memory = try MemoryMapping.anonymous(length: pages * page)
            let uffd = try Userfaultfd(features: [.poison])
            guard uffd.handle.features.contains(.poison) else { return }
            try uffd.handle.register(memory.range, mode: .missing)
            let server = try FaultServer(userfaultfd: uffd, regions: [ServedRegion(range: memory.range)],
                                         source: RequestQueue(), configuration: .handler4k)
            try server.start()
            try server.install(image, at: memory.range.start, pages: 2)
            try server.markPresent(at: memory.range.start + UInt64(9 * page), zero: true)
            #expect(server.poisonMissing() == pages - 3)
            #expect(try server.presenceBitmap(at: memory.range.start, pages: pages) == [0xFF, 0xFF])
            let late = try server.install(image + 4 * page, at: memory.range.start + UInt64(4 * page), pages: 1)
            #expect(late.installed == 0 && late.alreadyPresent == 1)
            #expect(server.poisonMissing() == 0)
            server.stop()
        }

        /// A thread waiting on a page that can no longer come gets SIGBUS once the
        /// missing pages are poisoned, instead of waiting forever. The child exits with
        /// 100 + the requests made; a thread left waiting is ended by the 10 s alarm.
        @Test func poisoningWakesAWaitingThreadWithSIGBUS() async {
            await #expect(processExitsWith: .exitCode(101)) {
                try waitForAPageThatNeverComes()
            }
        }

        /// Strategies that read the source themselves are refused for a deferred source.
        @Test func deferredSourceNeedsAHandlerStrategy() throws {
            for configuration in [FaultServerConfiguration.sigbus, .init(strategy: .copy(chunkPages: 1), backgroundPopulate: true)] {
                let memory = try MemoryMapping.anonymous(length: 4 * page)
                let uffd = try Userfaultfd(features: [.sigbus])
                try uffd.handle.register(memory.range, mode: .missing)
                var refused = false
                do {
                    _ = try FaultServer(userfaultfd: uffd, regions: [ServedRegion(range: memory.range)],
                                        source: RequestQueue(), configuration: configuration)
                } catch {
                    refused = true
                }
                #expect(refused, "\(configuration) was accepted for a deferred source")
            }
        }
    }
}

private func exitWithRequestCount(_ signal: Int32) {
    _exit(Int32(100 + min(deferredChildRequests.load(ordering: .relaxed), 50)))
}

/// In an exit test's child: touches a page nobody installs; a thread poisons what is
/// missing once the page was asked for.
private func waitForAPageThatNeverComes() throws {
    alarm(10)
    signal(SIGBUS, exitWithRequestCount)
    let memory = try MemoryMapping.anonymous(length: 16 * systemPageSize)
    let uffd = try Userfaultfd(features: [.poison])
    try uffd.handle.register(memory.range, mode: .missing)
    let server = try FaultServer(userfaultfd: uffd, regions: [ServedRegion(range: memory.range)],
                                 source: CountingQueue(), configuration: .handler4k)
    try server.start()
    let poisoner = DedicatedThread(name: "test-poisoner") {
        while deferredChildRequests.load(ordering: .relaxed) == 0 { usleep(100) }
        _ = server.poisonMissing()
    }
    _ = memory.base.load(fromByteOffset: 3 * systemPageSize, as: UInt8.self)   // SIGBUS here
    poisoner.join()
    _exit(99)
}
