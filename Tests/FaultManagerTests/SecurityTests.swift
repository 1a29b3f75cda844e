import FaultManager
import SystemPackage
import TestSupport
import Testing
import Userfaultfd

#if canImport(Glibc)
import Glibc
#endif

extension ManagerTests {
    /// A malformed handshake, sent from this process.
    struct Malformed: Sendable, CustomTestStringConvertible {
        var name: String
        var body: String
        /// Descriptors attached: "uffd", "file".
        var attach: [String]
        var reason: String
        var testDescription: String { name }
    }

    /// The system's page size, which the regions of these handshakes use.
    static let page = UInt64(systemPageSize)

    static let malformed: [Malformed] = [
        Malformed(name: "no descriptor", body: region(0, page), attach: [], reason: "expected exactly one descriptor (the userfaultfd), received 0"),
        Malformed(name: "two descriptors", body: region(0, page), attach: ["uffd", "uffd"], reason: "expected exactly one descriptor (the userfaultfd), received 2"),
        Malformed(name: "invalid JSON", body: "[{\"base_host_virt_addr\":}]", attach: ["uffd"], reason: "invalid handshake: not a JSON array"),
        Malformed(name: "overlapping regions", body: "[" + regionObject(1 << 30, 1 << 16, 0) + "," + regionObject((1 << 30) + page, page, 0) + "]", attach: ["uffd"], reason: "overlap"),
        Malformed(name: "beyond the memory file", body: region(0, 16 << 20), attach: ["uffd"], reason: "reaches beyond the memory file's 8388608 bytes"),
        Malformed(name: "page size 64 KiB", body: region(0, 1 << 20, pageSize: 65536), attach: ["uffd"], reason: "page size 65536"),
        Malformed(name: "2 MiB pages at a base-page offset", body: region(page, 2 << 20, pageSize: 2 << 20), attach: ["uffd"], reason: "backing offset \(page), not a multiple of its page size 2097152"),
        Malformed(name: "not a userfaultfd", body: region(0, page), attach: ["file"], reason: "not a userfaultfd"),
        Malformed(name: "native version 9", body: #"{"protocol":"swift-userfaultfd-manager","version":9}"#, attach: ["uffd"], reason: "unsupported native handshake version 9"),
    ]

    static func regionObject(_ start: UInt64, _ size: UInt64, _ offset: UInt64, pageSize: UInt64 = page) -> String {
        "{\"base_host_virt_addr\":\(start),\"size\":\(size),\"offset\":\(offset),\"page_size\":\(pageSize),\"page_size_kib\":\(pageSize)}"
    }

    static func region(_ offset: UInt64, _ size: UInt64, pageSize: UInt64 = page) -> String {
        "[" + regionObject(1 << 30, size, offset, pageSize: pageSize) + "]"
    }

    @Test(.ownsProcess, .needsUserfaultfd, arguments: malformed)
    func malformedHandshakeIsRefusedAndLogged(_ bad: Malformed) throws {
        let fixture = try Fixture()
        let baseline = openDescriptors()
        do {
            let uffd = try Userfaultfd(features: [])
            let file = try FileDescriptor.open(fixture.imagePath, .readOnly)
            defer { try? file.close() }
            let socket = try connect(fixture.socketPath)
            defer { try? socket.close() }
            let fds = bad.attach.map { $0 == "uffd" ? uffd.fileDescriptor : file }
            try DescriptorPassing.send(descriptors: fds, payload: Array(bad.body.utf8), over: socket)
            // The daemon closes the connection (answering a native client first).
            var byte: UInt8 = 0
            while read(socket.rawValue, &byte, 1) > 0 {}
        }
        #expect(fixture.wait { fixture.manager.refusedCount == 1 })
        #expect(fixture.log.contains("refused handshake from pid \(getpid()) uid \(geteuid())", bad.reason), "log: \(fixture.log.all)")
        #expect(fixture.manager.clients.isEmpty)
        // Every descriptor the daemon received was closed.
        #expect(fixture.wait { openedSince(baseline).isEmpty }, "still open: \(openedSince(baseline).sorted())")
        // The daemon keeps serving.
        let client = try fixture.client(["--handshake", "firecracker", "--scenario", "verify"])
        #expect(client.waitForExit() == 0, "client said: \(client.text)")
    }

    @Test func silentPeerTimesOutWithoutBlockingOthers() throws {
        let fixture = try Fixture { $0.handshakeTimeout = 1 }
        let silent = try connect(fixture.socketPath)
        defer { try? silent.close() }
        let client = try fixture.client(["--handshake", "native", "--scenario", "verify"])
        #expect(client.waitForExit() == 0, "client said: \(client.text)")
        #expect(fixture.wait { fixture.manager.refusedCount == 1 })
        #expect(fixture.log.contains("refused handshake from pid \(getpid())", "no handshake arrived in time"))
    }

    @Test(.enabled(if: geteuid() == 0, "running the client as another user needs root"))
    func unauthorisedUIDIsRefused() throws {
        let fixture = try Fixture()
        let client = try fixture.client(["--handshake", "native", "--scenario", "verify", "--as-user", "65534"])
        #expect(client.waitForExit() == 3, "client said: \(client.text)")
        #expect(client.text.contains("uid 65534 is not allowed"))
        #expect(fixture.log.contains("refused handshake from pid \(client.pid) uid 65534"))
        #expect(fixture.manager.clients.isEmpty)
    }

    @Test(.enabled(if: geteuid() == 0, "running the client as another user needs root"))
    func allowListedUIDIsServed() throws {
        let fixture = try Fixture { $0.allowedUIDs = [65534] }
        let client = try fixture.client(["--handshake", "firecracker", "--scenario", "verify", "--as-user", "65534"])
        #expect(client.waitForExit() == 0, "client said: \(client.text)")
        #expect(fixture.wait { fixture.manager.clients.first?.serving == false })
        #expect(fixture.manager.clients.first?.uid == 65534)
    }

    func connect(_ path: String) throws -> FileDescriptor {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: Array(path.utf8) + [0]) }
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if rc != 0 { throw UserfaultfdError(operation: "connect", errno: .init(rawValue: errno)) }
        return FileDescriptor(rawValue: fd)
    }
}
