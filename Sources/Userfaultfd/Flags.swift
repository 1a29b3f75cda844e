import _CUserfaultfd

extension Userfaultfd {
    /// Features negotiated with `UFFDIO_API`.
    ///
    /// Bits this library has no name for are kept as they came from the kernel.
    public struct Features: OptionSet, Hashable, Sendable, CustomStringConvertible {
        /// The bits as the kernel reads and writes them.
        public var rawValue: UInt64
        /// The set with these bits; bits without a name here are kept.
        ///
        /// - Parameter rawValue: The bits as the kernel reads and writes them.
        public init(rawValue: UInt64) { self.rawValue = rawValue }

        /// Page faults on write-protected ranges are reported with the WP flag.
        ///
        /// The corresponding C constant is `UFFD_FEATURE_PAGEFAULT_FLAG_WP`.
        public static let pagefaultFlagWP = Features(rawValue: UInt64(UFFD_FEATURE_PAGEFAULT_FLAG_WP))
        /// `fork()` of a process with registered ranges delivers a FORK event with a new uffd.
        ///
        /// The corresponding C constant is `UFFD_FEATURE_EVENT_FORK`.
        public static let eventFork = Features(rawValue: UInt64(UFFD_FEATURE_EVENT_FORK))
        /// `mremap()` of a registered range delivers a REMAP event.
        ///
        /// The corresponding C constant is `UFFD_FEATURE_EVENT_REMAP`.
        public static let eventRemap = Features(rawValue: UInt64(UFFD_FEATURE_EVENT_REMAP))
        /// `madvise(MADV_DONTNEED/REMOVE)` of a registered range delivers a REMOVE event.
        ///
        /// The corresponding C constant is `UFFD_FEATURE_EVENT_REMOVE`.
        public static let eventRemove = Features(rawValue: UInt64(UFFD_FEATURE_EVENT_REMOVE))
        /// MISSING faults on hugetlbfs memory.
        ///
        /// The corresponding C constant is `UFFD_FEATURE_MISSING_HUGETLBFS`.
        public static let missingHugetlbfs = Features(rawValue: UInt64(UFFD_FEATURE_MISSING_HUGETLBFS))
        /// MISSING faults on shmem memory.
        ///
        /// The corresponding C constant is `UFFD_FEATURE_MISSING_SHMEM`.
        public static let missingShmem = Features(rawValue: UInt64(UFFD_FEATURE_MISSING_SHMEM))
        /// `munmap()` of a registered range delivers an UNMAP event.
        ///
        /// The corresponding C constant is `UFFD_FEATURE_EVENT_UNMAP`.
        public static let eventUnmap = Features(rawValue: UInt64(UFFD_FEATURE_EVENT_UNMAP))
        /// Faults raise SIGBUS in the faulting thread instead of being queued.
        ///
        /// The corresponding C constant is `UFFD_FEATURE_SIGBUS`.
        public static let sigbus = Features(rawValue: UInt64(UFFD_FEATURE_SIGBUS))
        /// Page-fault messages carry the faulting thread's id.
        ///
        /// The corresponding C constant is `UFFD_FEATURE_THREAD_ID`.
        public static let threadID = Features(rawValue: UInt64(UFFD_FEATURE_THREAD_ID))
        /// MINOR faults on hugetlbfs memory.
        ///
        /// The corresponding C constant is `UFFD_FEATURE_MINOR_HUGETLBFS`.
        public static let minorHugetlbfs = Features(rawValue: UInt64(UFFD_FEATURE_MINOR_HUGETLBFS))
        /// MINOR faults on shmem memory.
        ///
        /// The corresponding C constant is `UFFD_FEATURE_MINOR_SHMEM`.
        public static let minorShmem = Features(rawValue: UInt64(UFFD_FEATURE_MINOR_SHMEM))
        /// Fault addresses are reported exactly, not rounded down to the page.
        ///
        /// The corresponding C constant is `UFFD_FEATURE_EXACT_ADDRESS`.
        public static let exactAddress = Features(rawValue: UInt64(UFFD_FEATURE_EXACT_ADDRESS))
        /// Write-protect mode on hugetlbfs and shmem memory.
        ///
        /// The corresponding C constant is `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`.
        public static let wpHugetlbfsShmem = Features(rawValue: UInt64(UFFD_FEATURE_WP_HUGETLBFS_SHMEM))
        /// Write protection also applies to pages not yet populated.
        ///
        /// The corresponding C constant is `UFFD_FEATURE_WP_UNPOPULATED`.
        public static let wpUnpopulated = Features(rawValue: UInt64(UFFD_FEATURE_WP_UNPOPULATED))
        /// `UFFDIO_POISON` is available.
        ///
        /// The corresponding C constant is `UFFD_FEATURE_POISON`.
        public static let poison = Features(rawValue: UInt64(UFFD_FEATURE_POISON))
        /// The kernel resolves write-protect faults itself (for dirty tracking).
        ///
        /// The corresponding C constant is `UFFD_FEATURE_WP_ASYNC`.
        public static let wpAsync = Features(rawValue: UInt64(UFFD_FEATURE_WP_ASYNC))
        /// `UFFDIO_MOVE` is available.
        ///
        /// The corresponding C constant is `UFFD_FEATURE_MOVE`.
        public static let move = Features(rawValue: UInt64(UFFD_FEATURE_MOVE))

        /// Every feature this library has a name for, with its name, in bit order.
        public static let named: [(name: String, feature: Features)] = [
            ("PAGEFAULT_FLAG_WP", .pagefaultFlagWP), ("EVENT_FORK", .eventFork),
            ("EVENT_REMAP", .eventRemap), ("EVENT_REMOVE", .eventRemove),
            ("MISSING_HUGETLBFS", .missingHugetlbfs), ("MISSING_SHMEM", .missingShmem),
            ("EVENT_UNMAP", .eventUnmap), ("SIGBUS", .sigbus), ("THREAD_ID", .threadID),
            ("MINOR_HUGETLBFS", .minorHugetlbfs), ("MINOR_SHMEM", .minorShmem),
            ("EXACT_ADDRESS", .exactAddress), ("WP_HUGETLBFS_SHMEM", .wpHugetlbfsShmem),
            ("WP_UNPOPULATED", .wpUnpopulated), ("POISON", .poison), ("WP_ASYNC", .wpAsync),
            ("MOVE", .move),
        ]

        /// The modes by name, as in `[MISSING, WP]`.
        /// The features by name, unknown bits in hex: `[THREAD_ID, 0x100000]`.
        public var description: String { describeBits(rawValue, names: Self.named.map { ($0.name, $0.feature.rawValue) }) }
    }

    /// Modes of `UFFDIO_REGISTER`: which kinds of faults a range reports.
    public struct RegisterMode: OptionSet, Hashable, Sendable, CustomStringConvertible {
        /// The bits as the kernel reads and writes them.
        public var rawValue: UInt64
        /// The set with these bits; bits without a name here are kept.
        ///
        /// - Parameter rawValue: The bits as the kernel reads and writes them.
        public init(rawValue: UInt64) { self.rawValue = rawValue }

        /// Report faults on pages that are not present.
        ///
        /// The corresponding C constant is `UFFDIO_REGISTER_MODE_MISSING`.
        public static let missing = RegisterMode(rawValue: UInt64(UFFDIO_REGISTER_MODE_MISSING))
        /// Report writes to write-protected pages.
        ///
        /// The corresponding C constant is `UFFDIO_REGISTER_MODE_WP`.
        public static let writeProtect = RegisterMode(rawValue: UInt64(UFFDIO_REGISTER_MODE_WP))
        /// Report faults on pages present in the page cache but not mapped (shmem, hugetlbfs).
        ///
        /// The corresponding C constant is `UFFDIO_REGISTER_MODE_MINOR`.
        public static let minor = RegisterMode(rawValue: UInt64(UFFDIO_REGISTER_MODE_MINOR))

        /// The modes by name, as in `[MISSING, WP]`.
        public var description: String {
            describeBits(rawValue, names: [("MISSING", 1), ("WP", 2), ("MINOR", 4)])
        }
    }

    /// A set of userfaultfd ioctls, as the kernel reports them (bit n = ioctl number n).
    public struct Ioctls: OptionSet, Hashable, Sendable, CustomStringConvertible {
        /// The bits as the kernel reads and writes them.
        public var rawValue: UInt64
        /// The set with these bits; bits without a name here are kept.
        ///
        /// - Parameter rawValue: The bits as the kernel reads and writes them.
        public init(rawValue: UInt64) { self.rawValue = rawValue }

        /// `UFFDIO_REGISTER`: register a range.
        ///
        /// The corresponding C constant is `_UFFDIO_REGISTER`.
        public static let register = Ioctls(rawValue: 1 << UInt64(_UFFDIO_REGISTER))
        /// `UFFDIO_UNREGISTER`: unregister a range.
        ///
        /// The corresponding C constant is `_UFFDIO_UNREGISTER`.
        public static let unregister = Ioctls(rawValue: 1 << UInt64(_UFFDIO_UNREGISTER))
        /// `UFFDIO_WAKE`: wake the threads waiting on a range.
        ///
        /// The corresponding C constant is `_UFFDIO_WAKE`.
        public static let wake = Ioctls(rawValue: 1 << UInt64(_UFFDIO_WAKE))
        /// `UFFDIO_COPY`: install pages copied from this process.
        ///
        /// The corresponding C constant is `_UFFDIO_COPY`.
        public static let copy = Ioctls(rawValue: 1 << UInt64(_UFFDIO_COPY))
        /// `UFFDIO_ZEROPAGE`: install zero pages.
        ///
        /// The corresponding C constant is `_UFFDIO_ZEROPAGE`.
        public static let zeropage = Ioctls(rawValue: 1 << UInt64(_UFFDIO_ZEROPAGE))
        /// `UFFDIO_MOVE`: move pages of this process without copying.
        ///
        /// The corresponding C constant is `_UFFDIO_MOVE`.
        public static let move = Ioctls(rawValue: 1 << UInt64(_UFFDIO_MOVE))
        /// `UFFDIO_WRITEPROTECT`: set or clear write protection.
        ///
        /// The corresponding C constant is `_UFFDIO_WRITEPROTECT`.
        public static let writeProtect = Ioctls(rawValue: 1 << UInt64(_UFFDIO_WRITEPROTECT))
        /// `UFFDIO_CONTINUE`: map pages already in the page cache.
        ///
        /// The corresponding C constant is `_UFFDIO_CONTINUE`.
        public static let `continue` = Ioctls(rawValue: 1 << UInt64(_UFFDIO_CONTINUE))
        /// `UFFDIO_POISON`: make later accesses raise SIGBUS.
        ///
        /// The corresponding C constant is `_UFFDIO_POISON`.
        public static let poison = Ioctls(rawValue: 1 << UInt64(_UFFDIO_POISON))
        /// `UFFDIO_API`: the handshake.
        ///
        /// The corresponding C constant is `_UFFDIO_API`.
        public static let api = Ioctls(rawValue: 1 << UInt64(_UFFDIO_API))

        /// Every ioctl this library has a name for, with its name.
        public static let named: [(name: String, ioctl: Ioctls)] = [
            ("REGISTER", .register), ("UNREGISTER", .unregister), ("WAKE", .wake),
            ("COPY", .copy), ("ZEROPAGE", .zeropage), ("MOVE", .move),
            ("WRITEPROTECT", .writeProtect), ("CONTINUE", .continue), ("POISON", .poison),
            ("API", .api),
        ]

        /// The modes by name, as in `[MISSING, WP]`.
        /// The ioctls by name, unknown bits in hex: `[WAKE, COPY]`.
        public var description: String { describeBits(rawValue, names: Self.named.map { ($0.name, $0.ioctl.rawValue) }) }
    }
}

/// `[A, B, 0x40]`: the named bits, then any unnamed ones in hex.
internal func describeBits(_ value: UInt64, names: [(String, UInt64)]) -> String {
    var parts: [String] = []
    var rest = value
    for (name, bit) in names where value & bit == bit && bit != 0 {
        parts.append(name)
        rest &= ~bit
    }
    if rest != 0 { parts.append("0x" + String(rest, radix: 16)) }
    return "[" + parts.joined(separator: ", ") + "]"
}
