import SystemPackage
import _CUserfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

extension Userfaultfd {
    /// The userfaultfd device node.
    public static let devicePath = "/dev/userfaultfd"

    /// Creates a userfaultfd without the handshake: always non-blocking and close-on-exec.
    ///
    /// - Parameters:
    ///   - method: The syscall, the device, or the syscall then the device.
    ///   - userModeOnly: Pass `UFFD_USER_MODE_ONLY`: trap only faults from user mode.
    /// - Returns: The new userfaultfd; call ``handshake(features:api:)`` before using it.
    /// - Throws: `UserfaultfdError` whose hint says why creation was refused here
    ///   (the `vm.unprivileged_userfaultfd` value, device permissions, CAP_SYS_PTRACE) and what to do.
    ///
    /// The corresponding C calls are `syscall(SYS_userfaultfd, flags)` and
    /// `ioctl(open("/dev/userfaultfd"), USERFAULTFD_IOC_NEW, flags)`.
    public static func open(method: CreationMethod = .automatic, userModeOnly: Bool = false) throws(UserfaultfdError) -> Userfaultfd {
        let flags = O_CLOEXEC | O_NONBLOCK | (userModeOnly ? Int32(UFFD_USER_MODE_ONLY) : 0)
        switch method {
        case .syscall:
            return try viaSyscall(flags: flags)
        case .device:
            return try viaDevice(flags: flags)
        case .automatic:
            do {
                return try viaSyscall(flags: flags)
            } catch let syscallError {
                guard syscallError.errno == .notPermitted || syscallError.errno == .noSys else { throw syscallError }
                do {
                    return try viaDevice(flags: flags)
                } catch let deviceError {
                    var combined = deviceError
                    combined.operation = "userfaultfd (syscall, then \(devicePath))"
                    combined.hint = CreationDiagnosis.current(userModeOnly: userModeOnly).advice
                    throw combined
                }
            }
        }
    }

    private static func viaSyscall(flags: Int32) throws(UserfaultfdError) -> Userfaultfd {
        let fd = cuffd_userfaultfd(flags)
        if fd < 0 {
            let e = currentErrno()
            throw UserfaultfdError(
                operation: "userfaultfd(2)", errno: e,
                hint: e == .notPermitted ? CreationDiagnosis.current(userModeOnly: flags & Int32(UFFD_USER_MODE_ONLY) != 0).advice : nil)
        }
        return Userfaultfd(adopting: FileDescriptor(rawValue: fd))
    }

    private static func viaDevice(flags: Int32) throws(UserfaultfdError) -> Userfaultfd {
        let device = Glibc.open(devicePath, O_RDWR | O_CLOEXEC)
        if device < 0 {
            let e = currentErrno()
            throw UserfaultfdError(
                operation: "open \(devicePath)", errno: e,
                hint: CreationDiagnosis.current(userModeOnly: flags & Int32(UFFD_USER_MODE_ONLY) != 0).advice)
        }
        defer { _ = Glibc.close(device) }
        let fd = cuffd_new_from_device(device, flags)
        if fd < 0 {
            throw UserfaultfdError(operation: "USERFAULTFD_IOC_NEW", errno: currentErrno())
        }
        return Userfaultfd(adopting: FileDescriptor(rawValue: fd))
    }
}

extension Errno {
    /// `ENOSYS`: the kernel was built without userfaultfd.
    static var noSys: Errno { Errno(rawValue: Glibc.ENOSYS) }
}

/// Why this process can or cannot create a userfaultfd, read from the system.
public struct CreationDiagnosis: Sendable, Equatable {
    /// `vm.unprivileged_userfaultfd` (nil if it cannot be read).
    public var unprivilegedSysctl: Int?
    /// Whether the process has CAP_SYS_PTRACE in its effective set.
    public var hasPtraceCapability: Bool
    /// The effective uid.
    public var effectiveUID: UInt32
    /// Whether `/dev/userfaultfd` exists.
    public var deviceExists: Bool
    /// Whether this process may open `/dev/userfaultfd` for reading and writing.
    public var deviceAccessible: Bool
    /// The device's mode bits, owner and group (nil if it does not exist).
    public var deviceMode: (mode: UInt32, uid: UInt32, gid: UInt32)?
    /// Whether user-mode-only was asked for.
    public var userModeOnly: Bool

    /// Whether two diagnoses describe the same state.
    ///
    /// - Parameters:
    ///   - a: A diagnosis.
    ///   - b: Another diagnosis.
    /// - Returns: Whether every field, the device's mode included, is equal.
    public static func == (a: Self, b: Self) -> Bool {
        a.unprivilegedSysctl == b.unprivilegedSysctl && a.hasPtraceCapability == b.hasPtraceCapability
            && a.effectiveUID == b.effectiveUID && a.deviceExists == b.deviceExists
            && a.deviceAccessible == b.deviceAccessible && a.userModeOnly == b.userModeOnly
            && a.deviceMode?.mode == b.deviceMode?.mode && a.deviceMode?.uid == b.deviceMode?.uid
            && a.deviceMode?.gid == b.deviceMode?.gid
    }

    /// Reads the current state of the system for this process.
    ///
    /// - Parameter userModeOnly: Whether the creation in question asks for user-mode-only faults.
    /// - Returns: The sysctl, capability, uid and device state read now.
    public static func current(userModeOnly: Bool = false) -> CreationDiagnosis {
        let sysctl = readSmallFile("/proc/sys/vm/unprivileged_userfaultfd").flatMap {
            Int($0.trimmingCharacters(in: " \n"))
        }
        var hasPtrace = false
        if let status = readSmallFile("/proc/self/status") {
            for line in status.split(separator: "\n") where line.hasPrefix("CapEff:") {
                let hex = line.dropFirst("CapEff:".count).trimmingCharacters(in: " \t")
                if let caps = UInt64(hex, radix: 16) { hasPtrace = caps & (1 << 19) != 0 }
            }
        }
        var st = stat()
        let exists = stat(Userfaultfd.devicePath, &st) == 0
        return CreationDiagnosis(
            unprivilegedSysctl: sysctl,
            hasPtraceCapability: hasPtrace,
            effectiveUID: geteuid(),
            deviceExists: exists,
            deviceAccessible: exists && access(Userfaultfd.devicePath, R_OK | W_OK) == 0,
            deviceMode: exists ? (st.st_mode & 0o7777, st.st_uid, st.st_gid) : nil,
            userModeOnly: userModeOnly)
    }

    /// Whether the syscall is expected to work for this process.
    public var syscallAllowed: Bool {
        userModeOnly || hasPtraceCapability || (unprivilegedSysctl ?? 0) >= 1
    }

    /// A sentence on why creation is refused and what to do; empty if nothing is wrong.
    public var advice: String {
        var reasons: [String] = []
        if !syscallAllowed {
            let value = unprivilegedSysctl.map(String.init) ?? "unreadable"
            reasons.append(
                "the userfaultfd syscall needs CAP_SYS_PTRACE (this process, euid \(effectiveUID), lacks it) "
                    + "or vm.unprivileged_userfaultfd=1 (it is \(value)); "
                    + "ask for user-mode-only faults (UFFD_USER_MODE_ONLY), run with CAP_SYS_PTRACE, "
                    + "or set `sysctl vm.unprivileged_userfaultfd=1`")
        }
        if !deviceExists {
            reasons.append("\(Userfaultfd.devicePath) does not exist (kernel older than 6.1 or built without it)")
        } else if !deviceAccessible, let mode = deviceMode {
            reasons.append(
                "\(Userfaultfd.devicePath) is mode \(String(mode.mode, radix: 8)) owned by uid \(mode.uid) gid \(mode.gid), "
                    + "not readable and writable by euid \(effectiveUID): add this user to its group or change its permissions")
        }
        return reasons.joined(separator: "; ")
    }
}

/// Reads a small text file (procfs, sysfs) in one go; nil if it cannot be read.
func readSmallFile(_ path: String) -> String? {
    guard let fd = try? FileDescriptor.open(FilePath(path), .readOnly, options: .closeOnExec) else { return nil }
    defer { try? fd.close() }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 4096)
    while true {
        guard let n = try? chunk.withUnsafeMutableBytes({ try fd.read(into: $0) }) else { return nil }
        if n == 0 { break }
        bytes.append(contentsOf: chunk[0..<n])
    }
    return String(decoding: bytes, as: UTF8.self)
}

extension StringProtocol {
    /// This text without the characters of `set` at either end.
    package func trimmingCharacters(in set: String) -> String {
        let chars = Set(set)
        var s = Substring(self)
        while let c = s.first, chars.contains(c) { s.removeFirst() }
        while let c = s.last, chars.contains(c) { s.removeLast() }
        return String(s)
    }
}
