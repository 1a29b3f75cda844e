import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// What a connection knows of its zero-copy sends.
///
/// With `MSG_ZEROCOPY` the kernel keeps a reference to the sent pages instead of copying
/// them, and queues a notification on the socket's error queue once it no longer needs
/// them; notifications number the sends 0, 1, 2, … and may cover a range of them. The
/// memory of a send may change or go away only after its notification.
struct ZeroCopyState {
    /// Payloads smaller than this are copied: pinning pages costs more than copying a few
    /// (the kernel's documentation puts the break-even near 10 KiB).
    static let smallestPayload = 16 << 10

    var enabled = false
    /// Sends made with `MSG_ZEROCOPY` that sent bytes (each takes the next notification number).
    var sent = 0
    /// Sends whose notification has arrived.
    var completed = 0
    /// Of those, sends the kernel copied after all (`SO_EE_CODE_ZEROCOPY_COPIED`), as it
    /// does over loopback.
    var copied = 0
}

/// Constants of `<linux/socket.h>`, `<linux/errqueue.h>` and `<asm-generic/socket.h>`.
private let soZeroCopy: Int32 = 60
private let msgZeroCopy: Int32 = 0x400_0000
private let eeOriginZeroCopy: UInt8 = 5
private let eeCodeZeroCopyCopied: UInt8 = 1
private let ipRecvErr: Int32 = 11
private let ipv6RecvErr: Int32 = 25

extension Connection {
    /// Turns zero-copy sending on (`SO_ZEROCOPY`); refused where the socket type cannot.
    func enableZeroCopy() throws(MigrationError) {
        var one: Int32 = 1
        if setsockopt(fd, SOL_SOCKET, soZeroCopy, &one, socklen_t(MemoryLayout<Int32>.size)) != 0 {
            throw MigrationError(.invalidArgument("zero-copy sending is not available on this connection: \(String(cString: strerror(errno)))"))
        }
        zeroCopy.enabled = true
    }

    /// Sends a header (copied, with `MSG_MORE`) and its payload with `MSG_ZEROCOPY`. The
    /// header lives in a scratch buffer reused by the next frame, so it must not be
    /// pinned; the payload is migrated memory, which the migration keeps mapped until
    /// ``awaitZeroCopyCompletions()``.
    func sendZeroCopy(header: UnsafeRawPointer, payload: UnsafeRawPointer, length: Int) throws(MigrationError) {
        try send(header, Wire.headerSize, flags: Int32(MSG_MORE))
        var done = 0
        while done < length {
            let n = retryOnInterrupt { Glibc.send(fd, payload + done, length - done, Int32(MSG_NOSIGNAL) | msgZeroCopy) }
            if n > 0 {
                done += n
                zeroCopy.sent += 1
                continue
            }
            // ENOBUFS: notifications not yet read fill the socket's option memory.
            if n < 0 && errno == ENOBUFS {
                try readCompletions(waiting: true)
                continue
            }
            if n < 0 && errno == EAGAIN {
                throw MigrationError(.connectionLost("send: the peer made no progress for \(stallNanoseconds / 1_000_000) ms"))
            }
            throw MigrationError(.connectionLost("send: \(String(cString: strerror(n < 0 ? errno : EPIPE)))"))
        }
        // Keep the error queue short; never waits.
        try readCompletions(waiting: false)
    }

    /// Sends all of `count` bytes at `p` with extra `flags` (blocking sockets only).
    private func send(_ p: UnsafeRawPointer, _ count: Int, flags: Int32) throws(MigrationError) {
        var done = 0
        while done < count {
            let n = retryOnInterrupt { Glibc.send(fd, p + done, count - done, Int32(MSG_NOSIGNAL) | flags) }
            if n >= 0 { done += n; continue }
            if errno == EAGAIN {
                throw MigrationError(.connectionLost("send: the peer made no progress for \(stallNanoseconds / 1_000_000) ms"))
            }
            throw MigrationError(.connectionLost("send: \(String(cString: strerror(errno)))"))
        }
    }

    /// Returns once every zero-copy send has its notification, within the stall limit:
    /// only then may the memory sent from change or be unmapped.
    func awaitZeroCopyCompletions() throws(MigrationError) {
        while zeroCopy.completed < zeroCopy.sent { try readCompletions(waiting: true) }
    }

    /// Reads the notifications queued on the error queue; with `waiting`, waits (up to
    /// the stall limit) for at least one when none is queued.
    func readCompletions(waiting: Bool) throws(MigrationError) {
        var control = (UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0))
        var gotOne = false
        while true {
            let n: Int = withUnsafeMutableBytes(of: &control) { buffer in
                var message = msghdr()
                message.msg_control = buffer.baseAddress
                message.msg_controllen = buffer.count
                let n = retryOnInterrupt { recvmsg(fd, &message, Int32(MSG_ERRQUEUE) | Int32(MSG_DONTWAIT)) }
                if n < 0 { return -Int(errno) }
                return parseNotification(buffer.baseAddress!, Int(message.msg_controllen)) ? 1 : 0
            }
            if n > 0 { gotOne = true; continue }
            if n == 0 { continue }
            if -n != Int(EAGAIN) {
                throw MigrationError(.connectionLost("reading zero-copy notifications: \(String(cString: strerror(Int32(-n))))"))
            }
            if gotOne || !waiting { return }
            // The error queue signals as POLLERR, whatever events are asked for.
            try wait(0, quietAllowed: false, doing: "waiting for zero-copy notifications")
            gotOne = true
        }
    }

    /// Counts the sends one notification covers; false if the message is no zero-copy notification.
    private func parseNotification(_ control: UnsafeRawPointer, _ length: Int) -> Bool {
        // struct cmsghdr { size_t len; int level; int type; } then struct sock_extended_err
        // { u32 errno; u8 origin, type, code, pad; u32 info; u32 data; }.
        let headerSize = MemoryLayout<Int>.size + 8
        guard length >= headerSize + 16 else { return false }
        let level = control.loadUnaligned(fromByteOffset: MemoryLayout<Int>.size, as: Int32.self)
        let type = control.loadUnaligned(fromByteOffset: MemoryLayout<Int>.size + 4, as: Int32.self)
        guard (level == Int32(IPPROTO_IP) && type == ipRecvErr) || (level == Int32(IPPROTO_IPV6) && type == ipv6RecvErr) else {
            return false
        }
        let e = control + headerSize
        guard e.load(fromByteOffset: 0, as: UInt32.self) == 0, e.load(fromByteOffset: 4, as: UInt8.self) == eeOriginZeroCopy else {
            return false
        }
        let first = e.loadUnaligned(fromByteOffset: 8, as: UInt32.self)
        let last = e.loadUnaligned(fromByteOffset: 12, as: UInt32.self)
        let count = Int(last &- first) + 1
        zeroCopy.completed += count
        if e.load(fromByteOffset: 6, as: UInt8.self) & eeCodeZeroCopyCopied != 0 { zeroCopy.copied += count }
        return true
    }
}
