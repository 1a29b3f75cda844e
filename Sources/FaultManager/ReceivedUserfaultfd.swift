import SystemPackage
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// What a descriptor a client handed over really is, asked of the kernel without
/// changing it.
enum ReceivedUserfaultfd {
    /// The kernel's internal "UFFDIO_API was done" bit in a context's features
    /// (`UFFD_FEATURE_INITIALIZED`, 1 << 31), which `/proc/PID/fdinfo` shows.
    static let initializedBit: UInt64 = 1 << 31

    /// The state of a received descriptor.
    enum State: Equatable {
        /// Not a userfaultfd at all.
        case notUserfaultfd
        /// A userfaultfd that never did its `UFFDIO_API` handshake: nothing can be
        /// registered on it, so no fault will ever come.
        case noHandshake
        /// A handshaken userfaultfd, with the features the client enabled.
        case ready(features: UInt64)
        /// Its fdinfo could not be read or understood.
        case unknown
    }

    /// Refuses anything but a handshaken userfaultfd.
    static func check(_ fd: FileDescriptor) throws(HandshakeError) {
        switch inspect(fd) {
        case .ready: return
        case .notUserfaultfd: throw .descriptors("the first descriptor is not a userfaultfd")
        case .noHandshake:
            throw .descriptors("the userfaultfd never did its UFFDIO_API handshake (do UFFDIO_API and register the regions before handing it over)")
        case .unknown: throw .descriptors("the state of the userfaultfd cannot be read from /proc/self/fdinfo")
        }
    }

    /// Reads the descriptor's /proc link and fdinfo.
    ///
    /// A second `UFFDIO_API` would tell the states apart too, but on a userfaultfd that
    /// never did one it would do the client's handshake for it; the fdinfo's `API:`
    /// line (`aa:<features>:<ioctls>`) only reads the context's features.
    static func inspect(_ fd: FileDescriptor) -> State {
        guard readLink("/proc/self/fd/\(fd.rawValue)") == "anon_inode:[userfaultfd]" else { return .notUserfaultfd }
        guard let info = readSmallFile("/proc/self/fdinfo/\(fd.rawValue)") else { return .unknown }
        return parse(fdinfo: info)
    }

    /// The state named by a userfaultfd's fdinfo text.
    static func parse(fdinfo: String) -> State {
        for line in fdinfo.split(separator: "\n") where line.hasPrefix("API:") {
            let fields = line.dropFirst(4).split(separator: ":").map { $0.trimmingCharacters(in: " \t") }
            guard fields.count >= 2, let features = UInt64(fields[1], radix: 16) else { return .unknown }
            if features & initializedBit == 0 { return .noHandshake }
            return .ready(features: features & ~initializedBit)
        }
        return .unknown
    }

    private static func readLink(_ path: String) -> String? {
        var buffer = [CChar](repeating: 0, count: 64)
        let n = readlink(path, &buffer, buffer.count - 1)
        if n <= 0 { return nil }
        return String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    private static func readSmallFile(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0 { return nil }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 1024)
        let n = buffer.withUnsafeMutableBytes { raw in retryOnInterrupt { read(fd, raw.baseAddress, raw.count) } }
        if n <= 0 { return nil }
        return String(decoding: buffer[0..<n], as: UTF8.self)
    }
}
