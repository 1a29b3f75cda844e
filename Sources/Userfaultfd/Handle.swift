import SystemPackage
import _CUserfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

extension Userfaultfd {
    /// A borrowed userfaultfd: a plain value that threads share to register ranges,
    /// resolve faults and read events. It does not own the descriptor.
    ///
    /// Every call is a single ioctl through a non-variadic C wrapper; nothing here
    /// allocates or locks, so handler threads can use it on the fault path.
    public struct Handle: Sendable {
        /// The userfaultfd.
        public let fileDescriptor: FileDescriptor
        /// The features enabled by the handshake.
        public internal(set) var features: Features
        /// The ioctls valid on the fd itself, from the handshake.
        public internal(set) var fdIoctls: Ioctls = []

        public init(fileDescriptor: FileDescriptor, features: Features) {
            self.fileDescriptor = fileDescriptor
            self.features = features
        }

        @inline(__always) var fd: Int32 { fileDescriptor.rawValue }

        // MARK: Registering

        /// Registers `range` for the faults `mode` names.
        ///
        /// - Parameters:
        ///   - range: page-aligned (huge-page-aligned for hugetlbfs) addresses of existing mappings.
        ///   - mode: any non-empty combination of MISSING, WP and MINOR.
        ///   - required: ioctls the range must support; if one is missing, the range is
        ///     unregistered again and the call throws ``UserfaultfdError/Kind/unsupportedIoctls(_:)``.
        /// - Returns: the ioctls valid for this range, which depend on its memory type.
        /// The corresponding C call is `ioctl(fd, UFFDIO_REGISTER, &uffdio_register)`.
        @discardableResult
        public func register(_ range: MemoryRange, mode: RegisterMode, requiring required: Ioctls = []) throws(UserfaultfdError) -> Ioctls {
            if mode.isEmpty {
                throw UserfaultfdError(operation: "UFFDIO_REGISTER", kind: .invalidArgument("no register mode given (MISSING, WP or MINOR)"))
            }
            if !range.isAligned(to: UInt64(systemPageSize)) || range.length == 0 {
                throw UserfaultfdError(operation: "UFFDIO_REGISTER", kind: .invalidArgument("range \(range) is empty or not page-aligned"))
            }
            var arg = uffdio_register(range: uffdio_range(start: range.start, len: range.length), mode: mode.rawValue, ioctls: 0)
            do {
                _ = try retryOnInterrupt("UFFDIO_REGISTER") { cuffd_register(fd, &arg) }
            } catch {
                var error = error
                if error.errno == .invalidArgument {
                    error.hint = "mode \(mode) is not supported on \(range): MINOR needs shmem or hugetlbfs memory, "
                        + "hugetlbfs ranges must be huge-page aligned, and the range must be mapped"
                }
                throw error
            }
            let ioctls = Ioctls(rawValue: arg.ioctls)
            let missing = required.subtracting(ioctls)
            if !missing.isEmpty {
                try? unregister(range)
                throw UserfaultfdError(operation: "UFFDIO_REGISTER", kind: .unsupportedIoctls(missing),
                                       hint: "the range \(range) offers \(ioctls)")
            }
            return ioctls
        }

        /// Unregisters `range`; faults there are handled by the kernel again.
        ///
        /// The kernel wakes the threads waiting on faults in `range` before it changes
        /// the mapping, and a fault taken under the per-VMA lock can queue itself in
        /// between: its message is read later and that thread is not woken by anyone.
        /// A resolver that gets `ENOENT` for a fault (the range is no longer registered)
        /// must therefore ``wake(_:)`` the page.
        ///
        /// The corresponding C call is `ioctl(fd, UFFDIO_UNREGISTER, &uffdio_range)`.
        public func unregister(_ range: MemoryRange) throws(UserfaultfdError) {
            var arg = uffdio_range(start: range.start, len: range.length)
            _ = try retryOnInterrupt("UFFDIO_UNREGISTER") { cuffd_unregister(fd, &arg) }
        }

        // MARK: Resolving

        /// Atomically copies `length` bytes from `source` into the registered range at
        /// `destination` and wakes the threads waiting there.
        ///
        /// - Returns: ``Outcome/completed(_:)``, ``Outcome/partial(_:)`` (the rest must be
        ///   retried), ``Outcome/alreadyPresent`` (`EEXIST`) or ``Outcome/retryAfterEvents``
        ///   (`EAGAIN`: read pending events, then retry).
        /// - Throws: `UserfaultfdError` for `UFFDIO_COPY` on any other failure
        ///   (`ENOENT`: layout changed; `ESRCH`/`ENOSPC`: the process is gone).
        /// The corresponding C call is `ioctl(fd, UFFDIO_COPY, &uffdio_copy)`.
        @inline(__always)
        public func copy(to destination: UInt64, from source: UnsafeRawPointer, length: Int, mode: CopyMode = []) throws(UserfaultfdError) -> Outcome {
            var arg = uffdio_copy(dst: destination, src: UInt64(UInt(bitPattern: source)), len: UInt64(length), mode: mode.rawValue, copy: 0)
            while true {
                if cuffd_copy(fd, &arg) == 0 { return .completed(length) }
                if let outcome = try Outcome.decode("UFFDIO_COPY", done: arg.copy) { return outcome }
            }
        }

        /// Maps the zero page (or zeroed pages) over `range` and wakes waiters.
        /// The corresponding C call is `ioctl(fd, UFFDIO_ZEROPAGE, &uffdio_zeropage)`.
        @inline(__always)
        public func zeropage(_ range: MemoryRange, mode: ZeropageMode = []) throws(UserfaultfdError) -> Outcome {
            var arg = uffdio_zeropage(range: uffdio_range(start: range.start, len: range.length), mode: mode.rawValue, zeropage: 0)
            while true {
                if cuffd_zeropage(fd, &arg) == 0 { return .completed(Int(range.length)) }
                if let outcome = try Outcome.decode("UFFDIO_ZEROPAGE", done: arg.zeropage) { return outcome }
            }
        }

        /// Maps pages already in the page cache over `range` (resolves MINOR faults).
        /// The corresponding C call is `ioctl(fd, UFFDIO_CONTINUE, &uffdio_continue)`.
        @inline(__always)
        public func continueMapping(_ range: MemoryRange, mode: ContinueMode = []) throws(UserfaultfdError) -> Outcome {
            var arg = uffdio_continue(range: uffdio_range(start: range.start, len: range.length), mode: mode.rawValue, mapped: 0)
            while true {
                if cuffd_continue(fd, &arg) == 0 { return .completed(Int(range.length)) }
                if let outcome = try Outcome.decode("UFFDIO_CONTINUE", done: arg.mapped) { return outcome }
            }
        }

        /// Moves `length` bytes of pages from `source` (same process) to `destination`
        /// without copying; the source range is left unmapped.
        /// The corresponding C call is `ioctl(fd, UFFDIO_MOVE, &uffdio_move)`.
        @inline(__always)
        public func move(to destination: UInt64, from source: UInt64, length: Int, mode: MoveMode = []) throws(UserfaultfdError) -> Outcome {
            var arg = uffdio_move(dst: destination, src: source, len: UInt64(length), mode: mode.rawValue, move: 0)
            while true {
                if cuffd_move(fd, &arg) == 0 { return .completed(length) }
                if let outcome = try Outcome.decode("UFFDIO_MOVE", done: arg.move) { return outcome }
            }
        }

        /// Marks `range` poisoned: a later access raises SIGBUS. Wakes waiters.
        /// The corresponding C call is `ioctl(fd, UFFDIO_POISON, &uffdio_poison)`.
        @inline(__always)
        public func poison(_ range: MemoryRange, mode: PoisonMode = []) throws(UserfaultfdError) -> Outcome {
            var arg = uffdio_poison(range: uffdio_range(start: range.start, len: range.length), mode: mode.rawValue, updated: 0)
            while true {
                if cuffd_poison(fd, &arg) == 0 { return .completed(Int(range.length)) }
                if let outcome = try Outcome.decode("UFFDIO_POISON", done: arg.updated) { return outcome }
            }
        }

        /// Wakes threads waiting on faults in `range` (after resolving with `dontWake`).
        /// The corresponding C call is `ioctl(fd, UFFDIO_WAKE, &uffdio_range)`.
        public func wake(_ range: MemoryRange) throws(UserfaultfdError) {
            var arg = uffdio_range(start: range.start, len: range.length)
            _ = try retryOnInterrupt("UFFDIO_WAKE") { cuffd_wake(fd, &arg) }
        }

        /// Sets or clears write protection on `range` (registered with WP).
        /// Clearing it wakes threads blocked on WP faults there unless `dontWake`.
        /// - Returns: ``Outcome/completed(_:)`` or ``Outcome/retryAfterEvents``.
        /// The corresponding C call is `ioctl(fd, UFFDIO_WRITEPROTECT, &uffdio_writeprotect)`.
        @discardableResult
        public func writeProtect(_ range: MemoryRange, protect: Bool, dontWake: Bool = false) throws(UserfaultfdError) -> Outcome {
            var mode: UInt64 = protect ? UInt64(UFFDIO_WRITEPROTECT_MODE_WP) : 0
            if dontWake { mode |= UInt64(UFFDIO_WRITEPROTECT_MODE_DONTWAKE) }
            var arg = uffdio_writeprotect(range: uffdio_range(start: range.start, len: range.length), mode: mode)
            while true {
                if cuffd_writeprotect(fd, &arg) == 0 { return .completed(Int(range.length)) }
                let e = currentErrno()
                if e == .interrupted { continue }
                if e == .resourceTemporarilyUnavailable { return .retryAfterEvents }
                throw UserfaultfdError(operation: "UFFDIO_WRITEPROTECT", errno: e)
            }
        }
    }
}

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
        public var rawValue: UInt64
        public init(rawValue: UInt64) { self.rawValue = rawValue }
        /// Do not wake the faulting threads; call ``Handle/wake(_:)`` later.
        /// The corresponding C constant is `UFFDIO_COPY_MODE_DONTWAKE`.
        public static let dontWake = CopyMode(rawValue: UInt64(UFFDIO_COPY_MODE_DONTWAKE))
        /// Install the pages write-protected.
        /// The corresponding C constant is `UFFDIO_COPY_MODE_WP`.
        public static let writeProtect = CopyMode(rawValue: UInt64(UFFDIO_COPY_MODE_WP))
    }

    /// Modes of `UFFDIO_ZEROPAGE`.
    public struct ZeropageMode: OptionSet, Hashable, Sendable {
        public var rawValue: UInt64
        public init(rawValue: UInt64) { self.rawValue = rawValue }
        /// The corresponding C constant is `UFFDIO_ZEROPAGE_MODE_DONTWAKE`.
        public static let dontWake = ZeropageMode(rawValue: UInt64(UFFDIO_ZEROPAGE_MODE_DONTWAKE))
    }

    /// Modes of `UFFDIO_CONTINUE`.
    public struct ContinueMode: OptionSet, Hashable, Sendable {
        public var rawValue: UInt64
        public init(rawValue: UInt64) { self.rawValue = rawValue }
        /// The corresponding C constant is `UFFDIO_CONTINUE_MODE_DONTWAKE`.
        public static let dontWake = ContinueMode(rawValue: UInt64(UFFDIO_CONTINUE_MODE_DONTWAKE))
        /// Map the pages write-protected.
        /// The corresponding C constant is `UFFDIO_CONTINUE_MODE_WP`.
        public static let writeProtect = ContinueMode(rawValue: UInt64(UFFDIO_CONTINUE_MODE_WP))
    }

    /// Modes of `UFFDIO_MOVE`.
    public struct MoveMode: OptionSet, Hashable, Sendable {
        public var rawValue: UInt64
        public init(rawValue: UInt64) { self.rawValue = rawValue }
        /// The corresponding C constant is `UFFDIO_MOVE_MODE_DONTWAKE`.
        public static let dontWake = MoveMode(rawValue: UInt64(UFFDIO_MOVE_MODE_DONTWAKE))
        /// Skip holes in the source instead of failing with `ENOENT`.
        /// The corresponding C constant is `UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES`.
        public static let allowSourceHoles = MoveMode(rawValue: UInt64(UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES))
    }

    /// Modes of `UFFDIO_POISON`.
    public struct PoisonMode: OptionSet, Hashable, Sendable {
        public var rawValue: UInt64
        public init(rawValue: UInt64) { self.rawValue = rawValue }
        /// The corresponding C constant is `UFFDIO_POISON_MODE_DONTWAKE`.
        public static let dontWake = PoisonMode(rawValue: UInt64(UFFDIO_POISON_MODE_DONTWAKE))
    }
}
