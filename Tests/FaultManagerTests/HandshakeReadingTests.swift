@testable import FaultManager
import TestSupport
import SystemPackage
import Testing
import Userfaultfd

#if canImport(Glibc)
import Glibc
#endif

/// Reading a handshake off a socket: complete, over the limit, late; the caps; the uffd's state.
@Suite(.sharesProcess, .timeLimit(.minutes(1)))
struct HandshakeReadingTests {
    @Test func framingFindsTheEndOfTheOutermostValue() {
        #expect(HandshakeFraming.scan(Array("  [{\"a\":[1,2]}]".utf8)) == .complete(length: 15))
        #expect(HandshakeFraming.scan(Array("{\"p\":\"]}\\\"}\"}xyz".utf8)) == .complete(length: 13))
        #expect(HandshakeFraming.scan(Array("[{\"base\":".utf8)) == .incomplete)
        #expect(HandshakeFraming.scan(Array("{\"p\":\"\\".utf8)) == .incomplete)
        #expect(HandshakeFraming.scan(Array("GET / HTTP/1.0".utf8)) == .notJSON)
        #expect(HandshakeFraming.scan(Array("".utf8)) == .incomplete)
    }

    func pair(_ type: Int32) throws -> (FileDescriptor, FileDescriptor) {
        var fds: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, type | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
            throw UserfaultfdError(operation: "socketpair", errno: Errno(rawValue: errno))
        }
        return (FileDescriptor(rawValue: fds[0]), FileDescriptor(rawValue: fds[1]))
    }

    func reader(limit: Int = 1 << 20, seconds: Int64 = 10) -> HandshakeReader {
        HandshakeReader(limit: limit, deadline: .now + .seconds(seconds))
    }

    static let big: [UInt8] = Array(("[\"" + String(repeating: "x", count: 400_000) + "\"]").utf8)

    @Test(.needsUserfaultfd, arguments: ["stream", "seqpacket"])
    func aMessageLargerThanOneReceiveArrivesWhole(kind: String) throws {
        let (a, b) = try pair(Int32(kind == "stream" ? SOCK_STREAM.rawValue : SOCK_SEQPACKET.rawValue))
        defer { try? a.close(); try? b.close() }
        var size: Int32 = 1 << 20
        _ = setsockopt(a.rawValue, SOL_SOCKET, SO_SNDBUF, &size, socklen_t(4))
        let uffd = try Userfaultfd(features: [])
        let descriptor = uffd.fileDescriptor
        let sender = try DedicatedThread.start(name: "test-sender") { [a] in
            try? DescriptorPassing.send(descriptor, payload: Self.big, over: a)
        }
        let message = try reader().read(from: b)
        sender.join()
        defer { for fd in message.descriptors { try? fd.close() } }
        #expect(message.body == Self.big)
        #expect(message.descriptors.count == 1)
    }

    @Test(.needsUserfaultfd) func aStreamSplitOverWritesIsJoined() throws {
        let (a, b) = try pair(Int32(SOCK_STREAM.rawValue))
        defer { try? a.close(); try? b.close() }
        let body = Array("[{\"base_host_virt_addr\":1,\"size\":2}]".utf8)
        let uffd = try Userfaultfd(features: [])
        try DescriptorPassing.send(uffd.fileDescriptor, payload: Array(body[..<5]), over: a)
        _ = try a.writeAll(body[5...])
        let message = try reader().read(from: b)
        defer { for fd in message.descriptors { try? fd.close() } }
        #expect(message.body == body)
        #expect(message.descriptors.count == 1)
    }

    @Test(.needsUserfaultfd) func anIncompleteMessageEndsAtTheDeadlineAndItsDescriptorsAreClosed() throws {
        let (a, b) = try pair(Int32(SOCK_STREAM.rawValue))
        defer { try? a.close(); try? b.close() }
        let memory = try MemoryMapping.anonymous(length: systemPageSize)
        do {
            let uffd = try Userfaultfd(features: [])
            try uffd.handle.register(memory.range, mode: .missing)
            try DescriptorPassing.send(uffd.fileDescriptor, payload: Array("[{\"base".utf8), over: a)
        }
        #expect(throws: HandshakeError.connection("the handshake was incomplete when its time ran out (7 bytes received)")) {
            _ = try reader(seconds: 1).read(from: b)
        }
        // Every copy of that uffd is closed: the range is free for another one.
        let other = try Userfaultfd(features: [])
        #expect(throws: Never.self) { try other.handle.register(memory.range, mode: .missing) }
    }

    @Test(arguments: ["stream", "seqpacket"])
    func aMessageOverTheLimitIsRefused(kind: String) throws {
        let (a, b) = try pair(Int32(kind == "stream" ? SOCK_STREAM.rawValue : SOCK_SEQPACKET.rawValue))
        defer { try? a.close(); try? b.close() }
        _ = try a.writeAll(Array(repeating: UInt8(ascii: "["), count: 5000))
        #expect(throws: HandshakeError.self) { _ = try reader(limit: 4096).read(from: b) }
    }

    @Test func aPeerThatClosesEarlyIsToldApartFromASilentOne() throws {
        let (a, b) = try pair(Int32(SOCK_STREAM.rawValue))
        defer { try? b.close() }
        _ = try a.writeAll(Array("[1,".utf8))
        try a.close()
        #expect(throws: HandshakeError.connection("the peer closed the connection after 3 bytes of an incomplete handshake")) {
            _ = try reader().read(from: b)
        }
    }

    @Test func admissionCapsInAllAndPerUID() {
        var admission = HandshakeAdmission()
        #expect(admission.admit(uid: 1, maxTotal: 3, maxPerUID: 2) == nil)
        #expect(admission.admit(uid: 1, maxTotal: 3, maxPerUID: 2) == nil)
        #expect(admission.admit(uid: 1, maxTotal: 3, maxPerUID: 2)?.contains("from uid 1 (2, the limit per uid is 2)") == true)
        #expect(admission.admit(uid: 2, maxTotal: 3, maxPerUID: 2) == nil)
        #expect(admission.admit(uid: 3, maxTotal: 3, maxPerUID: 2)?.contains("(3, the limit is 3)") == true)
        admission.release(uid: 1)
        #expect(admission.admit(uid: 3, maxTotal: 3, maxPerUID: 2) == nil)
        for uid: UInt32 in [1, 2, 3] { admission.release(uid: uid) }
        #expect(admission.total == 0)
        #expect(admission.perUID.isEmpty)
    }

    @Test(.needsUserfaultfd) func theUserfaultfdStateIsReadWithoutChangingIt() throws {
        let fresh = try Userfaultfd.open()
        #expect(ReceivedUserfaultfd.inspect(fresh.fileDescriptor) == .noHandshake)
        // Still without a handshake after the look: the client's own UFFDIO_API would still work.
        #expect(ReceivedUserfaultfd.inspect(fresh.fileDescriptor) == .noHandshake)
        let ready = try Userfaultfd(features: [.eventRemove])
        #expect(ReceivedUserfaultfd.inspect(ready.fileDescriptor) == .ready(features: Userfaultfd.Features.eventRemove.rawValue))
        let file = try FileDescriptor.open("/proc/self/stat", .readOnly)
        defer { try? file.close() }
        #expect(ReceivedUserfaultfd.inspect(file) == .notUserfaultfd)
        #expect(ReceivedUserfaultfd.parse(fdinfo: "pos:\t0\nAPI:\taa:80000002:80000000000001ff\n") == .ready(features: 2))
        #expect(ReceivedUserfaultfd.parse(fdinfo: "API:\taa:0:80000000000001ff\n") == .noHandshake)
        #expect(ReceivedUserfaultfd.parse(fdinfo: "pos:\t0\n") == .unknown)
    }
}

extension HandshakeReadingTests {
    @Test func refusalLinesAreRateLimitedAndSayWhatWasDropped() {
        var limit = LogRateLimit(linesPerSecond: 2)
        let start = ContinuousClock.now
        #expect(limit.admit(now: start) == 0)
        #expect(limit.admit(now: start + .milliseconds(10)) == 0)
        #expect(limit.admit(now: start + .milliseconds(20)) == nil)
        #expect(limit.admit(now: start + .milliseconds(30)) == nil)
        #expect(limit.admit(now: start + .milliseconds(1100)) == 2)
        #expect(limit.admit(now: start + .milliseconds(1200)) == 0)
    }
}
