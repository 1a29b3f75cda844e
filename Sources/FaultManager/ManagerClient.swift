import FoundationEssentials
import SystemPackage
import Userfaultfd

/// The client side of `uffd serve`: handing a userfaultfd over to the manager daemon.
///
/// ```swift
/// let memory = try MemoryMapping.anonymous(length: 64 << 20)
/// let uffd = try Userfaultfd(features: [.eventFork, .eventRemap, .eventRemove, .eventUnmap])
/// try uffd.handle.register(memory.range, mode: .missing)
/// let client = try ManagerClient.handOver(
///     uffd, regions: [ClientRegion(start: memory.range.start, length: memory.range.length, backingOffset: 0)],
///     backing: .memoryFile, to: "/run/uffd.sock")
/// // memory now reads the daemon's memory file
/// ```
public enum ManagerClient {
    /// Where the pages of the handed-over memory come from.
    public enum Backing {
        /// The memory file the daemon was started with.
        case memoryFile
        /// This file (sent along, so the daemon reads it with the client's rights).
        case file(FileDescriptor)
    }

    /// Why a hand-over failed.
    public enum HandOverError: Error, Sendable, Equatable, CustomStringConvertible {
        /// The daemon refused the handshake, for this reason.
        case refused(String)
        /// The daemon closed the connection without answering (for example: not allowed).
        case noAnswer
        /// Connecting, sending or reading failed.
        case system(UserfaultfdError)

        public var description: String {
            switch self {
            case .refused(let why): return "the manager refused the userfaultfd: \(why)"
            case .noAnswer: return "the manager closed the connection without answering"
            case .system(let error): return "\(error)"
            }
        }
    }

    /// Hands `uffd` over with the native handshake and waits for the daemon's answer.
    ///
    /// The uffd stays open here too; the caller may close its copy once this returns.
    /// - Parameters:
    ///   - uffd: a handshaken userfaultfd with `regions` registered (MISSING).
    ///   - regions: the registered regions and where their bytes lie in the backing.
    ///   - backing: the daemon's memory file, or a file sent along.
    ///   - socketPath: the daemon's socket.
    ///   - name: a name for the daemon's log lines.
    ///   - timeout: seconds to wait for the answer.
    /// - Returns: the client number the daemon uses in its logs and statistics.
    /// - Throws: ``HandOverError``: ``HandOverError/refused(_:)`` carries the daemon's reason.
    @discardableResult
    public static func handOver(
        _ uffd: borrowing Userfaultfd,
        regions: [ClientRegion],
        backing: Backing = .memoryFile,
        to socketPath: String,
        name: String? = nil,
        timeout: Double = 10
    ) throws(HandOverError) -> Int {
        var descriptors = [uffd.fileDescriptor]
        let kind: NativeHandshake.Backing
        switch backing {
        case .memoryFile: kind = .memoryFile
        case .file(let fd):
            kind = .attached
            descriptors.append(fd)
        }
        let header = NativeHandshake(features: uffd.features.rawValue, backing: kind, regions: regions, name: name)
        let socket: FileDescriptor
        do {
            socket = try UnixSocket.connect(to: socketPath)
        } catch {
            throw .system(error)
        }
        defer { try? socket.close() }
        UnixSocket.setTimeout(socket, seconds: timeout)
        do {
            try DescriptorPassing.send(descriptors: descriptors, payload: header.encoded(), over: socket)
        } catch {
            // A daemon that refuses a peer before reading (uid, caps) may already have
            // answered and closed: its reason is still waiting to be read.
            guard error.errno == .brokenPipe || error.errno == .connectionReset,
                  let line = try? UnixSocket.readLine(from: socket),
                  let reply = try? JSONDecoder().decode(NativeReply.self, from: Data(line)), !reply.accepted else {
                throw .system(error)
            }
            throw .refused(reply.reason ?? "no reason given")
        }
        let line: [UInt8]?
        do {
            line = try UnixSocket.readLine(from: socket)
        } catch {
            if error.errno == .connectionReset { throw .noAnswer }
            throw .system(error)
        }
        guard let line else { throw .noAnswer }
        guard let reply = try? JSONDecoder().decode(NativeReply.self, from: Data(line)) else {
            throw .refused("unreadable answer: \(String(decoding: line, as: UTF8.self))")
        }
        if reply.accepted, let client = reply.client { return client }
        throw .refused(reply.reason ?? "no reason given")
    }

    /// Hands `uffd` over exactly as Firecracker does: one `sendmsg` of the JSON region
    /// array with the uffd attached, and nothing else. No answer comes back.
    ///
    /// - Returns: the connected socket; Firecracker keeps it open while the VM runs.
    public static func handOverLikeFirecracker(
        _ uffd: borrowing Userfaultfd,
        regions: [ClientRegion],
        to socketPath: String
    ) throws(UserfaultfdError) -> FileDescriptor {
        let socket = try UnixSocket.connect(to: socketPath)
        do {
            try DescriptorPassing.send(uffd.fileDescriptor, payload: FirecrackerRegion.encode(regions), over: socket)
        } catch {
            try? socket.close()
            throw error
        }
        return socket
    }
}
