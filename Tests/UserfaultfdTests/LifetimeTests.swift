import Glibc
import Synchronization
import SystemPackage
import TestSupport
import Testing
import Userfaultfd

extension Matrix {
    /// Owners and the handles they lend: close, release, use after close.
    @Suite("lifetimes") struct LifetimeTests {
        @Test("a handle used after close() fails with EBADF, even when its number names a new uffd", .needsUserfaultfd)
        func handleAfterClose() throws {
            let uffd = try Userfaultfd(features: [])
            let stale = uffd.handle
            let number = uffd.fileDescriptor.rawValue
            #expect(stale.isOpen)
            try uffd.close()
            #expect(!stale.isOpen)
            // The lowest free number is usually reused at once; whether or not it is,
            // the stale handle must not reach the new descriptor.
            let successor = try Userfaultfd(features: [])
            let m = try MemoryMapping.anonymous(length: systemPageSize)
            let e = error { try stale.register(m.range, mode: .missing) }
            #expect(e?.errno == .badFileDescriptor)
            #expect(e?.hint?.contains("outlive its owner") == true)
            if successor.fileDescriptor.rawValue == number {
                // Nothing was registered on the successor through the stale number.
                #expect(try successor.handle.register(m.range, mode: .missing).contains(.copy))
            }
            let waited = error { _ = try stale.wait(stop: nil, timeoutMilliseconds: 0) }
            #expect(waited?.errno == .badFileDescriptor)
        }

        @Test("a handle stops working when its owner goes out of scope", .needsUserfaultfd)
        func handleAfterDeinit() throws {
            var stale: Userfaultfd.Handle?
            do {
                let uffd = try Userfaultfd(features: [])
                stale = uffd.handle
                #expect(stale?.isOpen == true)
            }
            let handle = try #require(stale)
            #expect(!handle.isOpen)
            let e = error { try handle.wake(MemoryRange(start: 0x10000, length: UInt64(systemPageSize))) }
            #expect(e?.errno == .badFileDescriptor)
        }

        @Test("handles taken before release() keep working; the caller owns the descriptor", .needsUserfaultfd)
        func release() throws {
            let uffd = try Userfaultfd(features: [.threadID])
            let handle = uffd.handle
            let fd = uffd.release()
            defer { try? fd.close() }
            #expect(handle.isOpen)
            let m = try MemoryMapping.anonymous(length: systemPageSize)
            #expect(try handle.register(m.range, mode: .missing).contains(.copy))
            #expect(fcntl(fd.rawValue, F_GETFD) >= 0)
        }

        @Test("a handle made from a raw descriptor cannot know its owner and reports open", .needsUserfaultfd)
        func borrowedHandle() throws {
            let uffd = try Userfaultfd(features: [])
            let borrowed = Userfaultfd.Handle(fileDescriptor: uffd.fileDescriptor, features: [])
            #expect(borrowed.isOpen)
        }

        @Test("EBUSY from REGISTER says the range belongs to another userfaultfd", .needsUserfaultfd)
        func busyHint() throws {
            let m = try MemoryMapping.anonymous(length: 2 * systemPageSize)
            let first = try Userfaultfd(features: [])
            try first.handle.register(m.range, mode: .missing)
            let second = try Userfaultfd(features: [])
            let e = error { try second.handle.register(m.range, mode: .missing) }
            #expect(e?.errno == .resourceBusy)
            #expect(e?.hint?.contains("already registered on another userfaultfd") == true)
            #expect(e?.description.contains(m.range.description) == true)
        }

        @Test("concurrent joins of one DedicatedThread join it once and all return")
        func concurrentJoin() throws {
            let runs = Atomic<Int>(0)
            let worker = DedicatedThread(name: "join-target") {
                usleep(20_000)
                runs.add(1, ordering: .relaxed)
            }
            let joiners = (0..<4).map { i in DedicatedThread(name: "joiner-\(i)") { worker.join() } }
            for joiner in joiners { joiner.join() }
            worker.join()
            #expect(runs.load(ordering: .relaxed) == 1)
        }
    }
}
