import SystemPackage
import _CUserfaultfd

// MARK: - Outcomes and modes

extension Userfaultfd {
    /// What a resolving ioctl did, where the caller must branch on it.
    public enum Outcome: Equatable, Sendable {
        /// All requested bytes were installed.
        case completed(Int)
        /// Only this many bytes were installed (and woken); retry the rest.
        case partial(Int)
        /// The page was already there (`EEXIST`): another resolver won. Nothing was woken.
        case alreadyPresent
        /// The address space is changing (`EAGAIN`): read pending events, then retry.
        case retryAfterEvents

        /// Decodes a failed resolving ioctl from its result field and `errno`.
        /// Returns nil when the call should simply be repeated (`EINTR`).
        @inline(__always)
        static func decode(_ operation: String, done: Int64) throws(UserfaultfdError) -> Outcome? {
            if done > 0 { return .partial(Int(done)) }
            let e = currentErrno()
            switch e {
            case .interrupted: return nil
            case .fileExists: return .alreadyPresent
            case .resourceTemporarilyUnavailable: return .retryAfterEvents
            default: throw UserfaultfdError(operation: operation, errno: e)
            }
        }
    }

    /// Modes of `UFFDIO_COPY`.
    public struct CopyMode: OptionSet, Hashable, Sendable {
        /// The bits as the kernel reads and writes them.
        public var rawValue: UInt64
        /// The set with these bits; bits without a name here are kept.
        ///
        /// - Parameter rawValue: The bits as the kernel reads and writes them.
        public init(rawValue: UInt64) { self.rawValue = rawValue }
        /// Do not wake the faulting threads; call ``Handle/wake(_:)`` later.
        ///
        /// The corresponding C constant is `UFFDIO_COPY_MODE_DONTWAKE`.
        public static let dontWake = CopyMode(rawValue: UInt64(UFFDIO_COPY_MODE_DONTWAKE))
        /// Install the pages write-protected.
        ///
        /// The corresponding C constant is `UFFDIO_COPY_MODE_WP`.
        public static let writeProtect = CopyMode(rawValue: UInt64(UFFDIO_COPY_MODE_WP))
    }

    /// Modes of `UFFDIO_ZEROPAGE`.
    public struct ZeropageMode: OptionSet, Hashable, Sendable {
        /// The bits as the kernel reads and writes them.
        public var rawValue: UInt64
        /// The set with these bits; bits without a name here are kept.
        ///
        /// - Parameter rawValue: The bits as the kernel reads and writes them.
        public init(rawValue: UInt64) { self.rawValue = rawValue }
        /// Do not wake the waiting threads; call ``Handle/wake(_:)`` later.
        ///
        /// The corresponding C constant is `UFFDIO_ZEROPAGE_MODE_DONTWAKE`.
        public static let dontWake = ZeropageMode(rawValue: UInt64(UFFDIO_ZEROPAGE_MODE_DONTWAKE))
    }

    /// Modes of `UFFDIO_CONTINUE`.
    public struct ContinueMode: OptionSet, Hashable, Sendable {
        /// The bits as the kernel reads and writes them.
        public var rawValue: UInt64
        /// The set with these bits; bits without a name here are kept.
        ///
        /// - Parameter rawValue: The bits as the kernel reads and writes them.
        public init(rawValue: UInt64) { self.rawValue = rawValue }
        /// Do not wake the waiting threads; call ``Handle/wake(_:)`` later.
        ///
        /// The corresponding C constant is `UFFDIO_CONTINUE_MODE_DONTWAKE`.
        public static let dontWake = ContinueMode(rawValue: UInt64(UFFDIO_CONTINUE_MODE_DONTWAKE))
        /// Map the pages write-protected.
        ///
        /// The corresponding C constant is `UFFDIO_CONTINUE_MODE_WP`.
        public static let writeProtect = ContinueMode(rawValue: UInt64(UFFDIO_CONTINUE_MODE_WP))
    }

    /// Modes of `UFFDIO_MOVE`.
    public struct MoveMode: OptionSet, Hashable, Sendable {
        /// The bits as the kernel reads and writes them.
        public var rawValue: UInt64
        /// The set with these bits; bits without a name here are kept.
        ///
        /// - Parameter rawValue: The bits as the kernel reads and writes them.
        public init(rawValue: UInt64) { self.rawValue = rawValue }
        /// Do not wake the waiting threads; call ``Handle/wake(_:)`` later.
        ///
        /// The corresponding C constant is `UFFDIO_MOVE_MODE_DONTWAKE`.
        public static let dontWake = MoveMode(rawValue: UInt64(UFFDIO_MOVE_MODE_DONTWAKE))
        /// Skip holes in the source instead of failing with `ENOENT`.
        ///
        /// The corresponding C constant is `UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES`.
        public static let allowSourceHoles = MoveMode(rawValue: UInt64(UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES))
    }

    /// Modes of `UFFDIO_WRITEPROTECT`.
    public struct WriteProtectMode: OptionSet, Hashable, Sendable {
        /// The bits as the kernel reads and writes them.
        public var rawValue: UInt64
        /// The set with these bits; bits without a name here are kept.
        ///
        /// - Parameter rawValue: The bits as the kernel reads and writes them.
        public init(rawValue: UInt64) { self.rawValue = rawValue }
        /// Set write protection; without it the call clears write protection.
        ///
        /// The corresponding C constant is `UFFDIO_WRITEPROTECT_MODE_WP`.
        public static let writeProtect = WriteProtectMode(rawValue: UInt64(UFFDIO_WRITEPROTECT_MODE_WP))
        /// When clearing, do not wake the threads blocked on WP faults; call ``Handle/wake(_:)`` later.
        ///
        /// The corresponding C constant is `UFFDIO_WRITEPROTECT_MODE_DONTWAKE`.
        public static let dontWake = WriteProtectMode(rawValue: UInt64(UFFDIO_WRITEPROTECT_MODE_DONTWAKE))
    }

    /// Modes of `UFFDIO_POISON`.
    public struct PoisonMode: OptionSet, Hashable, Sendable {
        /// The bits as the kernel reads and writes them.
        public var rawValue: UInt64
        /// The set with these bits; bits without a name here are kept.
        ///
        /// - Parameter rawValue: The bits as the kernel reads and writes them.
        public init(rawValue: UInt64) { self.rawValue = rawValue }
        /// Do not wake the waiting threads; call ``Handle/wake(_:)`` later.
        ///
        /// The corresponding C constant is `UFFDIO_POISON_MODE_DONTWAKE`.
        public static let dontWake = PoisonMode(rawValue: UInt64(UFFDIO_POISON_MODE_DONTWAKE))
    }
}
