#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Everything about userfaultfd on this machine, as `uffd probe` shows it.
public struct SystemProbe: Sendable {
    /// The kernel release (`uname -r`).
    public var kernelRelease: String
    /// Why this process can or cannot create a uffd.
    public var creation: CreationDiagnosis
    /// Which creation methods worked here, by name.
    public var methods: [(method: Userfaultfd.CreationMethod, userModeOnly: Bool, error: String?)]
    /// What the kernel answered to a handshake (nil if no uffd could be created).
    public var support: Userfaultfd.Support?
    /// Per memory type, per register mode: the ioctls the range offers, or the error.
    public var memoryTypes: [MemoryTypeProbe]
    /// Free and total 2 MiB huge pages.
    public var hugePagesFree: Int
    public var hugePagesTotal: Int

    /// One memory type's registration results.
    public struct MemoryTypeProbe: Sendable {
        public var kind: MemoryMapping.Kind
        /// Why the memory could not be mapped (for hugetlb: no huge page reserved).
        public var unavailable: String?
        /// For each register mode tried: the ioctls, or the error text.
        public var modes: [(mode: Userfaultfd.RegisterMode, ioctls: Userfaultfd.Ioctls?, error: String?)]
    }

    /// Every non-empty combination of MISSING, WP and MINOR.
    public static let allModes: [Userfaultfd.RegisterMode] = (1...7).map { Userfaultfd.RegisterMode(rawValue: UInt64($0)) }

    /// Probes this machine: creation methods, features, and the ioctls of a small
    /// anonymous, shmem and hugetlb range registered in every mode.
    public static func run() -> SystemProbe {
        var u = utsname()
        uname(&u)
        let release = withUnsafeBytes(of: &u.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        var methods: [(Userfaultfd.CreationMethod, Bool, String?)] = []
        for method in [Userfaultfd.CreationMethod.syscall, .device] {
            for userMode in [false, true] {
                do {
                    _ = try Userfaultfd.open(method: method, userModeOnly: userMode)
                    methods.append((method, userMode, nil))
                } catch {
                    methods.append((method, userMode, error.description))
                }
            }
        }
        let support = try? Userfaultfd.probe()
        var types: [MemoryTypeProbe] = []
        for kind in MemoryMapping.Kind.allCases {
            types.append(probe(kind, features: support?.features ?? []))
        }
        return SystemProbe(
            kernelRelease: release, creation: .current(), methods: methods, support: support,
            memoryTypes: types, hugePagesFree: HugePages.free, hugePagesTotal: HugePages.total)
    }

    private static func probe(_ kind: MemoryMapping.Kind, features: Userfaultfd.Features) -> MemoryTypeProbe {
        let length = kind == .hugetlb ? HugePages.size : 4 * systemPageSize
        let mapping: MemoryMapping
        do {
            mapping = try MemoryMapping(kind: kind, length: length)
        } catch {
            return MemoryTypeProbe(kind: kind, unavailable: error.description, modes: [])
        }
        var modes: [(Userfaultfd.RegisterMode, Userfaultfd.Ioctls?, String?)] = []
        // WP on shmem/hugetlb needs WP_HUGETLBFS_SHMEM; ask for everything that does not
        // change fault delivery (not SIGBUS, not WP_ASYNC).
        let wanted = features.subtracting([.sigbus, .wpAsync])
        for mode in allModes {
            let (ioctls, why) = tryRegister(mapping.range, mode: mode, features: wanted)
            modes.append((mode, ioctls, why))
        }
        return MemoryTypeProbe(kind: kind, unavailable: nil, modes: modes)
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
