import Glibc
import SystemPackage
import TestSupport
import Testing
import Userfaultfd

extension Matrix {
    /// Handing a uffd to another process: SCM_RIGHTS with exactly one descriptor.
    @Suite("fd passing") struct DescriptorPassingTests {
        @Test("one fd arrives close-on-exec and is the same userfaultfd", .needsUserfaultfd)
        func oneDescriptor() throws {
            let (a, b) = try DescriptorPassing.socketPair()
            defer { try? a.close(); try? b.close() }
            let uffd = try Userfaultfd(features: [.threadID])
            try DescriptorPassing.send(uffd.fileDescriptor, payload: Array("hello".utf8), over: a)
            let (payload, fd) = try DescriptorPassing.receive(from: b)
            defer { try? fd.close() }
            #expect(payload == Array("hello".utf8))
            #expect(fd != uffd.fileDescriptor)
            #expect(fcntl(fd.rawValue, F_GETFD) & FD_CLOEXEC != 0)
            #expect(linkTarget(fd.rawValue) == "anon_inode:[userfaultfd]")
            // The same open file: a range registered through the received fd faults on the original.
            let received = Userfaultfd.Handle(fileDescriptor: fd, features: [.threadID])
            let m = try MemoryMapping.anonymous(length: systemPageSize)
            try received.register(m.range, mode: .missing)
            let other = try Userfaultfd(features: [])
            let e = error { _ = try other.handle.register(m.range, mode: .missing) }
            #expect(e?.errno == .resourceBusy, "registered through the received fd, busy for another uffd")
            let credentials = try DescriptorPassing.peerCredentials(of: b)
            #expect(credentials.pid == getpid())
            #expect(credentials.uid == geteuid())
            #expect(credentials.gid == getegid())
        }

        @Test("zero fds is refused")
        func zeroDescriptors() throws {
            let (a, b) = try DescriptorPassing.socketPair()
            defer { try? a.close(); try? b.close() }
            try DescriptorPassing.send(descriptors: [], payload: [1, 2, 3], over: a)
            expectMalformed(try DescriptorPassing.receive(from: b), "received 0")
        }

        @Test("two fds are refused and both are closed")
        func twoDescriptors() throws {
            let (a, b) = try DescriptorPassing.socketPair()
            defer { try? a.close(); try? b.close() }
            let pipe = try nonblockingPipe()
            defer { try? pipe.readEnd.close() }
            try DescriptorPassing.send(descriptors: [pipe.writeEnd, pipe.writeEnd], payload: [9], over: a)
            try pipe.writeEnd.close()
            expectMalformed(try DescriptorPassing.receive(from: b), "received 2")
            #expect(allWriteEndsClosed(pipe.readEnd), "a received descriptor was left open")
        }

        @Test("a stream message longer than the payload buffer is refused as truncated", .needsUserfaultfd)
        func streamTruncated() throws {
            let (a, b) = try DescriptorPassing.socketPair()
            defer { try? a.close(); try? b.close() }
            var type: Int32 = 0
            var size = socklen_t(MemoryLayout<Int32>.size)
            #expect(getsockopt(b.rawValue, SOL_SOCKET, SO_TYPE, &type, &size) == 0 && type == Int32(SOCK_STREAM.rawValue))
            try expectTruncatedRefusal(from: a, to: b)
            // Exactly as long as the buffer, with nothing after it: accepted.
            let uffd = try Userfaultfd(features: [])
            try DescriptorPassing.send(uffd.fileDescriptor, payload: Array(repeating: 7, count: 8), over: a)
            // The 56 bytes left from the refused message are still queued: drain them first.
            var rest = [UInt8](repeating: 0, count: 56)
            #expect(read(b.rawValue, &rest, 56) == 56)
            let (payload, fd) = try DescriptorPassing.receive(from: b, maxPayload: 8)
            try fd.close()
            #expect(payload == Array(repeating: 7, count: 8))
        }

        @Test("garbage: a truncated message, an empty payload, a closed peer")
        func garbage() throws {
            // Message boundaries need a datagram-like socket.
            var fds: [Int32] = [-1, -1]
            #expect(socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0)
            let a = FileDescriptor(rawValue: fds[0]), b = FileDescriptor(rawValue: fds[1])
            defer { try? b.close() }
            try expectTruncatedRefusal(from: a, to: b)
            // Nothing to send with a descriptor.
            let e = error { try DescriptorPassing.send(descriptors: [b], payload: [], over: a) }
            guard case .invalidArgument? = e?.kind else {
                Issue.record("an empty payload gave \(String(describing: e))")
                return
            }
            try a.close()
            expectMalformed(try DescriptorPassing.receive(from: b), "closed the connection")
        }
    }
}

/// Sends 64 bytes with a descriptor from `a` and receives them at `b` into 8 bytes:
/// refused as truncated, and the descriptor received is closed.
func expectTruncatedRefusal(from a: FileDescriptor, to b: FileDescriptor, sourceLocation: SourceLocation = #_sourceLocation) throws {
    let pipe = try nonblockingPipe()
    defer { try? pipe.readEnd.close() }
    try DescriptorPassing.send(descriptors: [pipe.writeEnd], payload: Array(repeating: 0xEE, count: 64), over: a)
    try pipe.writeEnd.close()
    expectMalformed(try DescriptorPassing.receive(from: b, maxPayload: 8), "truncated", sourceLocation: sourceLocation)
    #expect(allWriteEndsClosed(pipe.readEnd), "a received descriptor was left open", sourceLocation: sourceLocation)
}

func expectMalformed<T>(_ body: @autoclosure () throws -> T, _ words: String, sourceLocation: SourceLocation = #_sourceLocation) {
    do {
        _ = try body()
        Issue.record("accepted; expected a malformed-message error mentioning \"\(words)\"", sourceLocation: sourceLocation)
    } catch let error as UserfaultfdError {
        guard case .malformed(let why) = error.kind, why.contains(words) else {
            Issue.record("\(error); expected a malformed-message error mentioning \"\(words)\"", sourceLocation: sourceLocation)
            return
        }
    } catch {
        Issue.record("\(error)", sourceLocation: sourceLocation)
    }
}

func linkTarget(_ fd: Int32) -> String {
    var link = [CChar](repeating: 0, count: 128)
    let n = readlink("/proc/self/fd/\(fd)", &link, 127)
    return n > 0 ? String(decoding: link.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self) : ""
}

/// A pipe whose read end does not block.
func nonblockingPipe() throws -> (readEnd: FileDescriptor, writeEnd: FileDescriptor) {
    let pipe = try FileDescriptor.pipe()
    _ = fcntl(pipe.readEnd.rawValue, F_SETFL, O_NONBLOCK)
    return pipe
}

/// Whether every write end of the pipe is closed: a read sees end of file rather than EAGAIN.
func allWriteEndsClosed(_ readEnd: FileDescriptor) -> Bool {
    var byte: UInt8 = 0
    return read(readEnd.rawValue, &byte, 1) == 0
}
