import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Everything about userfaultfd on this machine, as `uffd probe` shows it.
public struct SystemProbe: Sendable, Codable {
    /// The kernel release (`uname -r`).
    public var kernelRelease: String
    /// The effective uid of this process.
    public var effectiveUID: UInt32
    /// Whether this process has CAP_SYS_PTRACE.
    public var hasPtraceCapability: Bool
    /// `vm.unprivileged_userfaultfd`, if readable.
    public var unprivilegedUserfaultfd: Int?
    /// `/dev/userfaultfd`: whether it exists, its mode, and whether this process may use it.
    public var device: Device
    /// Each way of creating a uffd, tried here.
    public var creation: [CreationAttempt]
    /// Every feature this library knows, with whether the kernel offers it
    /// (all false if no uffd could be created).
    public var features: [FeatureSupport]
    /// The raw feature word of the kernel's answer (keeps bits this library has no name for).
    public var featureBits: UInt64?
    /// The ioctls valid on the fd itself.
    public var fdIoctls: [String]
    /// Per memory type, per register mode: the ioctls a range of that type offers.
    public var memoryTypes: [MemoryType]
    /// 2 MiB huge pages: free and reserved.
    public var hugePages: HugePageCount

    /// The userfaultfd device node as this process sees it.
    public struct Device: Sendable, Codable {
        /// `/dev/userfaultfd`.
        public var path: String
        /// Whether it exists.
        public var exists: Bool
        /// Its permission bits in octal, such as `600`.
        public var mode: String?
        /// Its owner's uid.
        public var owner: UInt32?
        /// Its group's gid.
        public var group: UInt32?
        /// Whether this process may open it for reading and writing.
        public var accessible: Bool
    }

    /// One way of creating a userfaultfd, tried.
    public struct CreationAttempt: Sendable, Codable {
        /// `syscall` or `device`.
        public var method: String
        /// Whether `UFFD_USER_MODE_ONLY` was asked for.
        public var userModeOnly: Bool
        /// Whether a userfaultfd was created.
        public var works: Bool
        /// Why not, if it was refused.
        public var error: String?
    }

    /// One feature and whether the kernel offers it.
    public struct FeatureSupport: Sendable, Codable {
        /// The name without the `UFFD_FEATURE_` prefix.
        public var name: String
        /// Its bit number.
        public var bit: Int
        /// Whether the kernel offers it.
        public var supported: Bool
    }

    /// What one kind of memory offers in each register mode.
    public struct MemoryType: Sendable, Codable {
        /// `anonymous`, `shmem` or `hugetlb`.
        public var kind: String
        /// Why the memory could not be mapped (for hugetlb: no huge page reserved).
        public var unavailable: String?
        /// One result per register mode.
        public var modes: [ModeResult]
    }

    /// What registering in one mode gave.
    public struct ModeResult: Sendable, Codable {
        /// For example `MISSING|WP`.
        public var mode: String
        /// The ioctls the range offers in this mode (nil if registration failed).
        public var ioctls: [String]?
        /// The error, if registration failed.
        public var error: String?
    }

    /// The 2 MiB huge pages before the probe.
    public struct HugePageCount: Sendable, Codable {
        /// Reserved and not in use.
        public var free: Int
        /// Reserved in all.
        public var total: Int
        /// Whether one page was reserved just for the probe and given back.
        public var borrowedForProbe = false
    }

    /// Every non-empty combination of MISSING, WP and MINOR.
    public static let allModes: [Userfaultfd.RegisterMode] = (1...7).map { Userfaultfd.RegisterMode(rawValue: UInt64($0)) }

    /// Probes this machine: creation methods, features, and the ioctls of a small
    /// anonymous, shmem and hugetlb range registered in every mode.
    ///
    /// - Parameter borrowHugePage: when no huge page is free and this process may
    ///   reserve one (root), reserve one for the hugetlb row and give it back after.
    ///   The reported counts are those from before the probe.
    /// - Returns: The report; a step that fails here is reported in it, not thrown.
    public static func run(borrowHugePage: Bool = true) -> SystemProbe {
        let hugeBefore = HugePageCount(free: HugePages.free, total: HugePages.total)
        var u = utsname()
        uname(&u)
        let release = withUnsafeBytes(of: &u.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        let diagnosis = CreationDiagnosis.current()

        var attempts: [CreationAttempt] = []
        for method in [Userfaultfd.CreationMethod.syscall, .device] {
            for userMode in [false, true] {
                var attempt = CreationAttempt(method: method.rawValue, userModeOnly: userMode, works: true, error: nil)
                do {
                    _ = try Userfaultfd.open(method: method, userModeOnly: userMode)
                } catch {
                    attempt.works = false
                    attempt.error = error.description
                }
                attempts.append(attempt)
            }
        }

        let support = try? Userfaultfd.probe()
        let offered = support?.features ?? []
        let features = Userfaultfd.Features.named.map { entry in
            FeatureSupport(name: entry.name, bit: entry.feature.rawValue.trailingZeroBitCount, supported: offered.contains(entry.feature))
        }
        let borrowed = borrowHugePage && hugeBefore.free == 0 && HugePages.setTotal(hugeBefore.total + 1)
        let types = MemoryMapping.Kind.allCases.map { probe($0, features: offered) }
        if borrowed { HugePages.setTotal(hugeBefore.total) }
        return SystemProbe(
            kernelRelease: release,
            effectiveUID: diagnosis.effectiveUID,
            hasPtraceCapability: diagnosis.hasPtraceCapability,
            unprivilegedUserfaultfd: diagnosis.unprivilegedSysctl,
            device: Device(
                path: Userfaultfd.devicePath, exists: diagnosis.deviceExists,
                mode: diagnosis.deviceMode.map { String($0.mode, radix: 8) },
                owner: diagnosis.deviceMode?.uid, group: diagnosis.deviceMode?.gid,
                accessible: diagnosis.deviceAccessible),
            creation: attempts,
            features: features,
            featureBits: support?.features.rawValue,
            fdIoctls: names(of: support?.ioctls ?? []),
            memoryTypes: types,
            hugePages: HugePageCount(free: hugeBefore.free, total: hugeBefore.total, borrowedForProbe: borrowed))
    }

    /// The names of the ioctls in `set`, in ioctl-number order.
    ///
    /// - Parameter set: Ioctls, as a registration or the handshake reports them.
    /// - Returns: Names such as `COPY`, without the `UFFDIO_` prefix.
    public static func names(of set: Userfaultfd.Ioctls) -> [String] {
        Userfaultfd.Ioctls.named.filter { set.contains($0.ioctl) }.map(\.name)
    }

    /// `MISSING|WP|MINOR` style name of a register mode.
    ///
    /// - Parameter mode: A register mode.
    /// - Returns: Its modes joined by `|`.
    public static func name(of mode: Userfaultfd.RegisterMode) -> String {
        [("MISSING", Userfaultfd.RegisterMode.missing), ("WP", .writeProtect), ("MINOR", .minor)]
            .filter { mode.contains($0.1) }.map(\.0).joined(separator: "|")
    }

    private static func probe(_ kind: MemoryMapping.Kind, features: Userfaultfd.Features) -> MemoryType {
        let length = kind == .hugetlb ? HugePages.size : 4 * systemPageSize
        let mapping: MemoryMapping
        do {
            mapping = try MemoryMapping(kind: kind, length: length)
        } catch {
            return MemoryType(kind: kind.rawValue, unavailable: error.description, modes: [])
        }
        // Ask for every feature that does not change how faults are delivered
        // (not SIGBUS, not WP_ASYNC): WP on shmem and hugetlb needs WP_HUGETLBFS_SHMEM.
        let wanted = features.subtracting([.sigbus, .wpAsync])
        var modes: [ModeResult] = []
        for mode in allModes {
            let (ioctls, why) = tryRegister(mapping.range, mode: mode, features: wanted)
            modes.append(ModeResult(mode: name(of: mode), ioctls: ioctls.map(names(of:)), error: why))
        }
        return MemoryType(kind: kind.rawValue, unavailable: nil, modes: modes)
    }

    /// Registers `range` with `mode` on a new uffd: the ioctls offered, or why not.
    ///
    /// Kept out of the loop above: a `do`/`catch` there around a noncopyable
    /// `Userfaultfd` crashes the Swift 6.3.1 optimizer (release builds).
    private static func tryRegister(_ range: MemoryRange, mode: Userfaultfd.RegisterMode, features: Userfaultfd.Features) -> (Userfaultfd.Ioctls?, String?) {
        let uffd: Userfaultfd
        do { uffd = try Userfaultfd(features: features) } catch { return (nil, describe(error)) }
        do { return (try uffd.handle.register(range, mode: mode), nil) } catch { return (nil, describe(error)) }
    }

    private static func describe(_ error: UserfaultfdError) -> String {
        if let e = error.errno { return "\(e)" }
        return error.description
    }
}
