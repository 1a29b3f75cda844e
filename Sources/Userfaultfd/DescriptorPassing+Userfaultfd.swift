import SystemPackage

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

extension DescriptorPassing {
    /// The message that carries a userfaultfd: `"uffd"`, a version (1), and the
    /// features negotiated on it, little-endian, 16 bytes in all.
    static let userfaultfdMagic: [UInt8] = Array("uffd".utf8)
    static let userfaultfdVersion: UInt32 = 1
    static let userfaultfdMessageSize = 16

    /// Sends a userfaultfd together with the features negotiated on it, so that the
    /// receiver can adopt it without being told them another way.
    ///
    /// The sender keeps its own descriptor; the receiver gets a new one for the same
    /// userfaultfd (`SCM_RIGHTS`). Receive it with ``receiveUserfaultfd(from:)``.
    ///
    /// ```swift
    /// let (mine, theirs) = try DescriptorPassing.socketPair()
    /// try DescriptorPassing.send(uffd, over: mine)
    /// // in the other process, which holds `theirs`:
    /// let adopted = try DescriptorPassing.receiveUserfaultfd(from: theirs)
    /// ```
    ///
    /// - Parameters:
    ///   - uffd: The userfaultfd to hand over, after its handshake.
    ///   - socket: A connected unix socket.
    /// - Throws: `UserfaultfdError` for `sendmsg`.
    ///
    /// The corresponding C call is `sendmsg` with an `SCM_RIGHTS` control message.
    public static func send(_ uffd: borrowing Userfaultfd, over socket: FileDescriptor) throws(UserfaultfdError) {
        var message = userfaultfdMagic
        withUnsafeBytes(of: userfaultfdVersion.littleEndian) { message.append(contentsOf: $0) }
        withUnsafeBytes(of: uffd.features.rawValue.littleEndian) { message.append(contentsOf: $0) }
        try send(uffd.fileDescriptor, payload: message, over: socket)
    }

    /// Receives a userfaultfd sent with ``send(_:over:)-(Userfaultfd,_)`` and adopts it with its features.
    ///
    /// The message must be exactly that header with exactly one descriptor, and the
    /// descriptor must be a userfaultfd; anything else is refused and every descriptor
    /// received is closed. Where `/proc/self/fdinfo` can be read, the features are the
    /// kernel's (``Userfaultfd/negotiatedFeatures(of:)``), whatever the sender announced.
    ///
    /// - Parameter socket: A connected unix socket.
    /// - Returns: The userfaultfd, owned by the caller, with its features.
    /// - Throws: ``UserfaultfdError/Kind/malformed(_:)`` for a message that is not a
    ///   userfaultfd hand-over, else `UserfaultfdError` for `recvmsg`.
    ///
    /// The corresponding C call is `recvmsg` with `MSG_CMSG_CLOEXEC`.
    public static func receiveUserfaultfd(from socket: FileDescriptor) throws(UserfaultfdError) -> Userfaultfd {
        let (payload, descriptor) = try receive(from: socket, maxPayload: userfaultfdMessageSize)
        do throws(UserfaultfdError) {
            let announced = try decodeUserfaultfdMessage(payload)
            let features = try Userfaultfd.negotiatedFeatures(of: descriptor) ?? announced
            return Userfaultfd(adopting: descriptor, features: features)
        } catch {
            try? descriptor.close()
            throw error
        }
    }

    static func decodeUserfaultfdMessage(_ payload: [UInt8]) throws(UserfaultfdError) -> Userfaultfd.Features {
        guard payload.count == userfaultfdMessageSize, payload.prefix(4).elementsEqual(userfaultfdMagic) else {
            throw UserfaultfdError(operation: "receive userfaultfd", kind: .malformed(
                "expected a \(userfaultfdMessageSize)-byte userfaultfd hand-over, got \(payload.count) bytes"))
        }
        let version = payload.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: 4, as: UInt32.self)) }
        guard version == userfaultfdVersion else {
            throw UserfaultfdError(operation: "receive userfaultfd", kind: .malformed("unknown hand-over version \(version)"))
        }
        return payload.withUnsafeBytes { Userfaultfd.Features(rawValue: UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: 8, as: UInt64.self))) }
    }
}

extension Userfaultfd {
    /// The features negotiated on a userfaultfd this process holds, as the kernel shows
    /// them in `/proc/self/fdinfo`.
    ///
    /// - Parameter descriptor: An open descriptor of this process.
    /// - Returns: The features (empty if the handshake has not happened yet), or nil if
    ///   procfs cannot be read here.
    /// - Throws: ``UserfaultfdError/Kind/malformed(_:)`` if `descriptor` is not a userfaultfd.
    public static func negotiatedFeatures(of descriptor: FileDescriptor) throws(UserfaultfdError) -> Features? {
        let fd = descriptor.rawValue
        var link = [UInt8](repeating: 0, count: 64)
        let n = link.withUnsafeMutableBufferPointer { readlink("/proc/self/fd/\(fd)", $0.baseAddress!, $0.count) }
        guard n > 0, let info = readSmallFile("/proc/self/fdinfo/\(fd)") else { return nil }
        guard String(decoding: link[0..<n], as: UTF8.self) == "anon_inode:[userfaultfd]" else {
            throw UserfaultfdError(operation: "fdinfo", kind: .malformed("descriptor \(fd) is not a userfaultfd"))
        }
        // "API:\taa:<features>:<ioctls>"; the kernel marks a completed handshake with bit 31.
        for line in info.split(separator: "\n") where line.hasPrefix("API:") {
            let fields = line.dropFirst(4).trimmingCharacters(in: " \t").split(separator: ":")
            guard fields.count == 3, let bits = UInt64(fields[1], radix: 16) else { break }
            return Features(rawValue: bits & ~(UInt64(1) << 31))
        }
        throw UserfaultfdError(operation: "fdinfo", kind: .malformed("no API line in the fdinfo of descriptor \(fd)"))
    }
}
