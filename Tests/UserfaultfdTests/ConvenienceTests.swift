import Glibc
import SystemPackage
import TestSupport
import Testing
import Userfaultfd

extension Matrix {
    /// The safe COPY overloads, `wait` over extra descriptors, and handing a uffd over with its features.
    @Suite("convenience", .needsUserfaultfd) struct ConvenienceTests {
        @Test("COPY from a buffer and from a span installs exactly those bytes")
        func copyFromBytes() throws {
            let ps = systemPageSize
            let m = try MemoryMapping.anonymous(length: 2 * ps)
            let uffd = try Userfaultfd(features: [])
            try uffd.handle.register(m.range, mode: .missing)
            let first = (0..<ps).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 1) }
            let second = [UInt8](repeating: 0xA5, count: ps)
            let outcome = try first.withUnsafeBytes { try uffd.handle.copy(to: m.range.start, from: $0) }
            #expect(outcome == .completed(ps))
            #expect(try uffd.handle.copy(to: m.address(at: ps), from: second.span.bytes) == .completed(ps))
            #expect(Array(m.bytes[0..<ps]) == first)
            #expect(Array(m.bytes[ps..<2 * ps]) == second)
            #expect(try second.withUnsafeBytes { try uffd.handle.copy(to: m.range.start, from: $0) } == .alreadyPresent)
            let short = error { _ = try [UInt8](repeating: 1, count: 100).withUnsafeBytes { try uffd.handle.copy(to: m.range.start, from: $0) } }
            guard case .invalidArgument(let why)? = short?.kind else {
                Issue.record("a 100-byte source was not refused: \(String(describing: short))")
                return
            }
            #expect(why.contains("100 bytes"))
        }

        @Test("wait watching a pipe reports the pipe, the stop signal, a timeout and uffd messages")
        func waitWatching() throws {
            let ps = systemPageSize
            let uffd = try Userfaultfd(features: [])
            let handle = uffd.handle
            let (readEnd, writeEnd) = try nonblockingPipe()
            defer { try? readEnd.close(); try? writeEnd.close() }
            let stop = try StopSignal()

            #expect(try handle.wait(stop: stop, watching: [readEnd], timeoutMilliseconds: 0).timedOut)
            _ = try writeEnd.writeAll([UInt8(1)])
            let piped = try handle.wait(stop: stop, watching: [writeEnd, readEnd], timeoutMilliseconds: 1000)
            #expect(Array(piped.watched) == [1])
            #expect(!piped.messages && !piped.stopped && !piped.timedOut)

            let m = try MemoryMapping.anonymous(length: ps)
            try handle.register(m.range, mode: .missing)
            let base = UInt(m.range.start)
            let toucher = DedicatedThread(name: "toucher") {
                UnsafeMutablePointer<UInt8>(bitPattern: base)!.pointee = 1
            }
            try #require(try handle.wait(stop: nil, timeoutMilliseconds: 10_000) == .ready, "the fault did not arrive")
            let faulted = try handle.wait(stop: stop, watching: [readEnd], timeoutMilliseconds: 0)
            #expect(faulted.messages)
            #expect(Array(faulted.watched) == [0], "the pipe is still readable and reported beside the fault")
            let buffer = Userfaultfd.EventBuffer(capacity: 4)
            #expect(try handle.readEvents(into: buffer) == 1)
            _ = try handle.zeropage(m.range)
            toucher.join()

            stop.raise()
            #expect(try handle.wait(stop: stop, watching: [], timeoutMilliseconds: 0).stopped)
            let tooMany = [FileDescriptor](repeating: readEnd, count: Userfaultfd.Handle.maxWatched + 1)
            let e = error { _ = try handle.wait(stop: nil, watching: tooMany, timeoutMilliseconds: 0) }
            guard case .invalidArgument? = e?.kind else {
                Issue.record("\(tooMany.count) descriptors were not refused: \(String(describing: e))")
                return
            }
        }

        @Test("a uffd handed over with its features is adopted with them")
        func handOver() throws {
            let (a, b) = try DescriptorPassing.socketPair()
            defer { try? a.close(); try? b.close() }
            let uffd = try Userfaultfd(features: [.threadID, .eventRemove])
            try DescriptorPassing.send(uffd, over: a)
            let adopted = try DescriptorPassing.receiveUserfaultfd(from: b)
            #expect(adopted.features == [.threadID, .eventRemove])
            #expect(adopted.fileDescriptor != uffd.fileDescriptor)
            #expect(try Userfaultfd.negotiatedFeatures(of: adopted.fileDescriptor) == [.threadID, .eventRemove])
            // The same userfaultfd: a range registered through one is busy for a third.
            let m = try MemoryMapping.anonymous(length: systemPageSize)
            try adopted.handle.register(m.range, mode: .missing)
            #expect(error { try uffd.handle.register(m.range, mode: .missing) } == nil, "same uffd: registering again is allowed")
        }

        @Test("the kernel's features win over what the sender announced")
        func kernelFeaturesWin() throws {
            let (a, b) = try DescriptorPassing.socketPair()
            defer { try? a.close(); try? b.close() }
            let uffd = try Userfaultfd(features: [.threadID])
            let lie = Userfaultfd(adopting: try uffd.fileDescriptor.duplicate(), features: [.move, .threadID])
            try DescriptorPassing.send(lie, over: a)
            let adopted = try DescriptorPassing.receiveUserfaultfd(from: b)
            #expect(adopted.features == [.threadID])
        }

        @Test("a hand-over that is not a userfaultfd is refused and its descriptor closed")
        func handOverRefusals() throws {
            let (a, b) = try DescriptorPassing.socketPair()
            defer { try? a.close(); try? b.close() }
            let (readEnd, writeEnd) = try nonblockingPipe()
            defer { try? readEnd.close() }
            // A good header on a pipe.
            var header = Array("uffd".utf8) + [1, 0, 0, 0]
            header += [UInt8](repeating: 0, count: 8)
            try DescriptorPassing.send(writeEnd, payload: header, over: a)
            try writeEnd.close()
            expectMalformed(try DescriptorPassing.receiveUserfaultfd(from: b).features, "not a userfaultfd")
            #expect(allWriteEndsClosed(readEnd))
            // A bad header on a real uffd.
            let uffd = try Userfaultfd(features: [])
            try DescriptorPassing.send(uffd.fileDescriptor, payload: Array("hello".utf8), over: a)
            expectMalformed(try DescriptorPassing.receiveUserfaultfd(from: b).features, "hand-over")
            var wrongVersion = Array("uffd".utf8) + [9, 0, 0, 0]
            wrongVersion += [UInt8](repeating: 0, count: 8)
            try DescriptorPassing.send(uffd.fileDescriptor, payload: wrongVersion, over: a)
            expectMalformed(try DescriptorPassing.receiveUserfaultfd(from: b).features, "version 9")
        }

        @Test("negotiatedFeatures reads the kernel's view: empty before the handshake, an error for a pipe")
        func negotiatedFeatures() throws {
            let fresh = try Userfaultfd.open()
            #expect(try Userfaultfd.negotiatedFeatures(of: fresh.fileDescriptor) == [])
            let withAsync = try Userfaultfd(features: [.pagefaultFlagWP, .wpAsync])
            #expect(try Userfaultfd.negotiatedFeatures(of: withAsync.fileDescriptor) == withAsync.features)
            let (readEnd, writeEnd) = try nonblockingPipe()
            defer { try? readEnd.close(); try? writeEnd.close() }
            expectMalformed(try Userfaultfd.negotiatedFeatures(of: readEnd), "not a userfaultfd")
        }
    }
}
