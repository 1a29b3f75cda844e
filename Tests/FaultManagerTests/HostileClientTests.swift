import FaultManager
import SystemPackage
import TestSupport
import Testing
import Userfaultfd

#if canImport(Glibc)
import Glibc
#endif

/// Peers that try to starve, confuse or crash the daemon.
extension ManagerTests {
    @Test(.enabled(if: geteuid() == 0, "running the flood as uid 65534 needs root"))
    func unauthorisedPeersAreRefusedBeforeTheySendAnything() throws {
        // A handshake timeout far beyond the test's waits: a refusal that waited for it would not come in time.
        let fixture = try Fixture { $0.handshakeTimeout = 300 }
        let flood = try ClientProcess(["--socket", fixture.socketPath, "--image", fixture.imagePath, "--scenario", "flood",
                                       "--flood", "silent", "--connections", "40", "--as-user", "65534"])
        #expect(flood.waitForOutput("FLOODING 40"), "flood said: \(flood.text)")
        // Refused on the accept thread while every connection is still open and silent.
        #expect(fixture.wait(seconds: 60) { fixture.manager.refusedCount == 40 }, "refused \(fixture.manager.refusedCount)")
        #expect(fixture.log.contains("refused handshake from pid \(flood.pid) uid 65534", "uid 65534 is not allowed"))
        let client = try fixture.client(["--handshake", "native", "--scenario", "verify"])
        #expect(client.waitForExit() == 0, "client said: \(client.text)")
    }

    @Test func connectionsOverThePerUIDCapAreRefusedAtOnce() throws {
        // Default caps: 64 connections in handshake, 16 per uid.
        let fixture = try Fixture { $0.handshakeTimeout = 300 }
        var silent: [FileDescriptor] = []
        defer { for fd in silent { try? fd.close() } }
        for _ in 0..<20 { silent.append(try connect(fixture.socketPath)) }
        // The four beyond the cap are answered and closed while the first sixteen wait.
        #expect(fixture.wait(seconds: 60) { fixture.manager.refusedCount == 4 }, "refused \(fixture.manager.refusedCount)")
        let answers = silent.map { readReply($0, seconds: 0.1) }
        let refused = answers.filter { $0?.contains("too many connections in handshake from uid \(geteuid())") == true }
        #expect(refused.count == 4, "answers: \(answers)")
        #expect(fixture.log.contains("refused handshake from pid \(getpid()) uid \(geteuid())", "the limit per uid is 16"))
        // Once the silent ones go, a real client is served.
        for fd in silent { try? fd.close() }
        silent = []
        #expect(fixture.wait(seconds: 60) { fixture.manager.refusedCount == 20 })
        let client = try fixture.client(["--handshake", "firecracker", "--scenario", "verify"])
        #expect(client.waitForExit() == 0, "client said: \(client.text)")
    }

    @Test(.needsUserfaultfd) func handshakeLargerThanOneReceiveIsAccepted() throws {
        let fixture = try Fixture()
        // 300 KB of name: more than one recvmsg takes from a stream socket.
        try withRegisteredMemory { bytes, uffd, regions in
            let id = try ManagerClient.handOver(uffd, regions: regions, to: fixture.socketPath, name: String(repeating: "n", count: 300_000), timeout: 60)
            #expect(id >= 1)
            try expectImage(bytes, fixture)
        }
    }

    @Test(.needsUserfaultfd) func handshakeSplitOverTwoWritesIsAccepted() throws {
        let fixture = try Fixture()
        try withRegisteredMemory { bytes, uffd, regions in
            let body = NativeHandshake(features: uffd.features.rawValue, backing: .memoryFile, regions: regions).encoded()
            let socket = try connect(fixture.socketPath)
            defer { try? socket.close() }
            try DescriptorPassing.send(uffd.fileDescriptor, payload: Array(body[..<20]), over: socket)
            usleep(200_000)
            _ = body[20...].withUnsafeBytes { send(socket.rawValue, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            let reply = readReply(socket, seconds: 60)
            // Required: touching memory whose uffd nobody serves would wait forever.
            try #require(reply?.contains("\"accepted\":true") == true, "reply: \(reply ?? "none"); log: \(fixture.log.all)")
            try expectImage(bytes, fixture)
        }
    }

    @Test(.needsUserfaultfd) func handshakeOverTheLimitIsRefused() throws {
        let fixture = try Fixture()
        try withRegisteredMemory { _, uffd, regions in
            #expect(throws: ManagerClient.HandOverError.self) {
                try ManagerClient.handOver(uffd, regions: regions, to: fixture.socketPath, name: String(repeating: "n", count: 1 << 20))
            }
        }
        #expect(fixture.wait(seconds: 60) { fixture.log.contains("refused handshake", "longer than the limit of 1048576 bytes") }, "log: \(fixture.log.all)")
    }

    @Test(.needsUserfaultfd) func clientTextReachesTheLogEscaped() throws {
        let fixture = try Fixture()
        let uffd = try Userfaultfd(features: [])
        let socket = try connect(fixture.socketPath)
        defer { try? socket.close() }
        let forged = #"{"protocol":"x\nrefused handshake from pid 1 uid 0: forged \u001b[2J","version":1}"#
        try DescriptorPassing.send(uffd.fileDescriptor, payload: Array(forged.utf8), over: socket)
        #expect(readReply(socket, seconds: 60)?.contains("\"accepted\":false") == true)
        #expect(fixture.wait(seconds: 60) { fixture.manager.refusedCount == 1 })
        let lines = fixture.log.all
        #expect(lines.allSatisfy { !$0.contains("\n") && !$0.contains("\u{1B}") }, "log: \(lines)")
        #expect(fixture.log.contains(#"\"x\nrefused handshake from pid 1 uid 0: forged \x1b[2J\""#), "log: \(lines)")
    }

    @Test(.needsUserfaultfd) func userfaultfdWithoutItsAPIHandshakeIsRefused() throws {
        let fixture = try Fixture()
        let uffd = try Userfaultfd.open()
        let socket = try connect(fixture.socketPath)
        defer { try? socket.close() }
        try DescriptorPassing.send(uffd.fileDescriptor, payload: Array(Self.region(0, Self.page).utf8), over: socket)
        #expect(fixture.wait(seconds: 60) { fixture.manager.refusedCount == 1 }, "log: \(fixture.log.all)")
        #expect(fixture.log.contains("refused handshake from pid \(getpid())", "never did its UFFDIO_API handshake"))
        #expect(fixture.manager.clients.isEmpty)
    }

    /// Anonymous memory of 64 KiB registered on a fresh uffd, and its region at offset 0 of the image.
    func withRegisteredMemory(_ body: (UnsafeMutableRawBufferPointer, borrowing Userfaultfd, [ClientRegion]) throws -> Void) throws {
        let memory = try MemoryMapping.anonymous(length: 16 * systemPageSize)
        let uffd = try Userfaultfd(features: [])
        try uffd.handle.register(memory.range, mode: .missing)
        try body(memory.bytes, uffd, [ClientRegion(start: memory.range.start, length: memory.range.length, backingOffset: 0)])
    }

    /// Every byte of `bytes` equals the image's first bytes (reading faults them in through the daemon).
    func expectImage(_ bytes: UnsafeMutableRawBufferPointer, _ fixture: Fixture) throws {
        let file = try FileDescriptor.open(fixture.imagePath, .readOnly)
        defer { try? file.close() }
        var expected = [UInt8](repeating: 0, count: bytes.count)
        _ = try expected.withUnsafeMutableBytes { try file.read(fromAbsoluteOffset: 0, into: $0) }
        #expect(Array(bytes) == expected)
    }

    /// The first line the daemon wrote on `socket`, waiting up to `seconds`; nil if none came.
    func readReply(_ socket: FileDescriptor, seconds: Double) -> String? {
        var p = pollfd(fd: socket.rawValue, events: Int16(POLLIN), revents: 0)
        guard poll(&p, 1, Int32(seconds * 1000)) > 0 else { return nil }
        var bytes: [UInt8] = []
        var byte: UInt8 = 0
        while bytes.count < 65536, recv(socket.rawValue, &byte, 1, Int32(MSG_DONTWAIT)) == 1, byte != 0x0A { bytes.append(byte) }
        return bytes.isEmpty ? nil : String(decoding: bytes, as: UTF8.self)
    }
}
