import Synchronization
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
    ///
    /// A handle taken from a ``Userfaultfd`` knows whether its owner has closed the
    /// descriptor: every call then throws `EBADF` with a hint rather than reaching
    /// whatever file the same descriptor number names by then. A handle made with
    /// ``init(fileDescriptor:features:)`` from a raw descriptor cannot know that.
    public struct Handle: Sendable {
        /// Shared between an owner and the handles taken from it: whether the owner closed the descriptor.
        final class Lifetime: Sendable {
            private let closed = Atomic<Bool>(false)
            @inline(__always) var isClosed: Bool { closed.load(ordering: .acquiring) }
            func markClosed() { closed.store(true, ordering: .releasing) }
        }

        /// The userfaultfd.
        public let fileDescriptor: FileDescriptor
        /// The features enabled by the handshake.
        public internal(set) var features: Features
        /// The ioctls valid on the fd itself, from the handshake.
        public internal(set) var fdIoctls: Ioctls = []
        let lifetime: Lifetime?

        /// A handle over a descriptor that someone else owns.
        ///
        /// - Parameters:
        ///   - fileDescriptor: An open userfaultfd that stays open as long as this handle is used.
        ///   - features: The features negotiated on it.
        public init(fileDescriptor: FileDescriptor, features: Features) {
            self.fileDescriptor = fileDescriptor
            self.features = features
            self.lifetime = nil
        }

        init(fileDescriptor: FileDescriptor, features: Features, fdIoctls: Ioctls, lifetime: Lifetime) {
            self.fileDescriptor = fileDescriptor
            self.features = features
            self.fdIoctls = fdIoctls
            self.lifetime = lifetime
        }

        /// Whether the descriptor is still open: false once the owning ``Userfaultfd``
        /// closed it. Always true for a handle made from a raw descriptor.
        public var isOpen: Bool { !(lifetime?.isClosed ?? false) }

        @inline(__always) var fd: Int32 { fileDescriptor.rawValue }

        /// Throws `EBADF` naming `operation` if the owner has closed the descriptor.
        @inline(__always)
        func checkOpen(_ operation: @autoclosure () -> String) throws(UserfaultfdError) {
            if let lifetime, lifetime.isClosed {
                throw UserfaultfdError(
                    operation: operation(), errno: .badFileDescriptor,
                    hint: "the Userfaultfd that owns this handle was closed; a handle must not outlive its owner")
            }
        }

        // MARK: Registering

        /// Registers `range` for the faults `mode` names.
        ///
        /// - Parameters:
        ///   - range: Page-aligned (huge-page-aligned for hugetlbfs) addresses of existing mappings.
        ///   - mode: Any non-empty combination of MISSING, WP and MINOR.
        ///   - required: Ioctls the range must support; if one is missing, the range is
        ///     unregistered again and the call throws ``UserfaultfdError/Kind/unsupportedIoctls(_:)``.
        /// - Returns: The ioctls valid for this range, which depend on its memory type.
        /// - Throws: `UserfaultfdError` for `UFFDIO_REGISTER`, with a hint for `EINVAL`
        ///   (mode or alignment) and `EBUSY` (the range belongs to another userfaultfd).
        ///
        /// The corresponding C call is `ioctl(fd, UFFDIO_REGISTER, &uffdio_register)`.
        @discardableResult
        public func register(_ range: MemoryRange, mode: RegisterMode, requiring required: Ioctls = []) throws(UserfaultfdError) -> Ioctls {
            try checkOpen("UFFDIO_REGISTER")
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
                throw Self.explainRegisterFailure(error, range: range, mode: mode)
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

        /// `error` with a hint saying what its errno means for a registration.
        static func explainRegisterFailure(_ error: UserfaultfdError, range: MemoryRange, mode: RegisterMode) -> UserfaultfdError {
            var error = error
            switch error.errno {
            case .invalidArgument?:
                error.hint = "mode \(mode) is not supported on \(range): MINOR needs shmem or hugetlbfs memory, "
                    + "hugetlbfs ranges must be huge-page aligned, and the range must be mapped"
            case .resourceBusy?:
                error.hint = "part of \(range) is already registered on another userfaultfd (a range belongs to one "
                    + "userfaultfd at a time): unregister it there first, or serve it through that userfaultfd"
            default:
                break
            }
            return error
        }

        /// Unregisters `range`; faults there are handled by the kernel again.
        ///
        /// The kernel wakes the threads waiting on faults in `range` before it changes
        /// the mapping, and a fault taken under the per-VMA lock can queue itself in
        /// between: its message is read later and that thread is not woken by anyone.
        /// A resolver that gets `ENOENT` for a fault (the range is no longer registered)
        /// must therefore ``wake(_:)`` the page.
        ///
        /// - Parameter range: Page-aligned addresses registered with this userfaultfd.
        /// - Throws: `UserfaultfdError` for `UFFDIO_UNREGISTER`.
        ///
        /// The corresponding C call is `ioctl(fd, UFFDIO_UNREGISTER, &uffdio_range)`.
        public func unregister(_ range: MemoryRange) throws(UserfaultfdError) {
            try checkOpen("UFFDIO_UNREGISTER")
            var arg = uffdio_range(start: range.start, len: range.length)
            _ = try retryOnInterrupt("UFFDIO_UNREGISTER") { cuffd_unregister(fd, &arg) }
        }

        // MARK: Resolving

        /// Atomically copies `length` bytes from `source` into the registered range at
        /// `destination` and wakes the threads waiting there.
        ///
        /// ``copy(to:from:mode:)-(_,UnsafeRawBufferPointer,_)`` takes a buffer instead of a pointer and a length.
        ///
        /// - Parameters:
        ///   - destination: The page-aligned first address to fill, in a range registered MISSING.
        ///   - source: At least `length` readable bytes of this process.
        ///   - length: A multiple of the range's page size.
        ///   - mode: ``CopyMode/dontWake`` and/or ``CopyMode/writeProtect``.
        /// - Returns: ``Outcome/completed(_:)``, ``Outcome/partial(_:)`` (the rest must be
        ///   retried), ``Outcome/alreadyPresent`` (`EEXIST`) or ``Outcome/retryAfterEvents``
        ///   (`EAGAIN`: read pending events, then retry).
        /// - Throws: `UserfaultfdError` for `UFFDIO_COPY` on any other failure
        ///   (`ENOENT`: layout changed; `ESRCH`/`ENOSPC`: the process is gone).
        ///
        /// The corresponding C call is `ioctl(fd, UFFDIO_COPY, &uffdio_copy)`.
        @inline(__always)
        public func copy(to destination: UInt64, from source: UnsafeRawPointer, length: Int, mode: CopyMode = []) throws(UserfaultfdError) -> Outcome {
            try checkOpen("UFFDIO_COPY")
            var arg = uffdio_copy(dst: destination, src: UInt64(UInt(bitPattern: source)), len: UInt64(length), mode: mode.rawValue, copy: 0)
            while true {
                if cuffd_copy(fd, &arg) == 0 { return .completed(length) }
                if let outcome = try Outcome.decode("UFFDIO_COPY", done: arg.copy) { return outcome }
            }
        }

        /// Maps the zero page (or zeroed pages) over `range` and wakes waiters.
        ///
        /// - Parameters:
        ///   - range: Page-aligned addresses in a range registered MISSING (not hugetlbfs).
        ///   - mode: ``ZeropageMode/dontWake`` to leave the waiters asleep.
        /// - Returns: ``Outcome/completed(_:)``, ``Outcome/partial(_:)``,
        ///   ``Outcome/alreadyPresent`` or ``Outcome/retryAfterEvents``.
        /// - Throws: `UserfaultfdError` for `UFFDIO_ZEROPAGE` on any other failure.
        ///
        /// The corresponding C call is `ioctl(fd, UFFDIO_ZEROPAGE, &uffdio_zeropage)`.
        @inline(__always)
        public func zeropage(_ range: MemoryRange, mode: ZeropageMode = []) throws(UserfaultfdError) -> Outcome {
            try checkOpen("UFFDIO_ZEROPAGE")
            var arg = uffdio_zeropage(range: uffdio_range(start: range.start, len: range.length), mode: mode.rawValue, zeropage: 0)
            while true {
                if cuffd_zeropage(fd, &arg) == 0 { return .completed(Int(range.length)) }
                if let outcome = try Outcome.decode("UFFDIO_ZEROPAGE", done: arg.zeropage) { return outcome }
            }
        }

        /// Maps pages already in the page cache over `range` (resolves MINOR faults).
        ///
        /// - Parameters:
        ///   - range: Page-aligned addresses in a shmem or hugetlbfs range registered MINOR.
        ///   - mode: ``ContinueMode/dontWake`` and/or ``ContinueMode/writeProtect``.
        /// - Returns: ``Outcome/completed(_:)``, ``Outcome/partial(_:)``,
        ///   ``Outcome/alreadyPresent`` or ``Outcome/retryAfterEvents``.
        /// - Throws: `UserfaultfdError` for `UFFDIO_CONTINUE` on any other failure
        ///   (`EFAULT`: no page in the page cache there).
        ///
        /// The corresponding C call is `ioctl(fd, UFFDIO_CONTINUE, &uffdio_continue)`.
        @inline(__always)
        public func continueMapping(_ range: MemoryRange, mode: ContinueMode = []) throws(UserfaultfdError) -> Outcome {
            try checkOpen("UFFDIO_CONTINUE")
            var arg = uffdio_continue(range: uffdio_range(start: range.start, len: range.length), mode: mode.rawValue, mapped: 0)
            while true {
                if cuffd_continue(fd, &arg) == 0 { return .completed(Int(range.length)) }
                if let outcome = try Outcome.decode("UFFDIO_CONTINUE", done: arg.mapped) { return outcome }
            }
        }

        /// Moves `length` bytes of pages from `source` (same process) to `destination`
        /// without copying; the source range is left unmapped.
        ///
        /// - Parameters:
        ///   - destination: The page-aligned first address, in an anonymous range registered MISSING.
        ///   - source: The page-aligned first address of private anonymous pages to take.
        ///   - length: A multiple of the page size.
        ///   - mode: ``MoveMode/dontWake`` and/or ``MoveMode/allowSourceHoles``.
        /// - Returns: ``Outcome/completed(_:)``, ``Outcome/partial(_:)``,
        ///   ``Outcome/alreadyPresent`` or ``Outcome/retryAfterEvents``.
        /// - Throws: `UserfaultfdError` for `UFFDIO_MOVE` on any other failure
        ///   (`ENOENT`: a hole in the source without ``MoveMode/allowSourceHoles``;
        ///   `EBUSY`: a source page is shared, for example after a fork).
        ///
        /// The corresponding C call is `ioctl(fd, UFFDIO_MOVE, &uffdio_move)`.
        @inline(__always)
        public func move(to destination: UInt64, from source: UInt64, length: Int, mode: MoveMode = []) throws(UserfaultfdError) -> Outcome {
            try checkOpen("UFFDIO_MOVE")
            var arg = uffdio_move(dst: destination, src: source, len: UInt64(length), mode: mode.rawValue, move: 0)
            while true {
                if cuffd_move(fd, &arg) == 0 { return .completed(length) }
                if let outcome = try Outcome.decode("UFFDIO_MOVE", done: arg.move) { return outcome }
            }
        }

        /// Marks `range` poisoned: a later access raises SIGBUS. Wakes waiters.
        ///
        /// - Parameters:
        ///   - range: Page-aligned addresses in a range registered MISSING.
        ///   - mode: ``PoisonMode/dontWake`` to leave the waiters asleep.
        /// - Returns: ``Outcome/completed(_:)``, ``Outcome/partial(_:)``,
        ///   ``Outcome/alreadyPresent`` or ``Outcome/retryAfterEvents``.
        /// - Throws: `UserfaultfdError` for `UFFDIO_POISON` on any other failure.
        ///
        /// The corresponding C call is `ioctl(fd, UFFDIO_POISON, &uffdio_poison)`.
        @inline(__always)
        public func poison(_ range: MemoryRange, mode: PoisonMode = []) throws(UserfaultfdError) -> Outcome {
            try checkOpen("UFFDIO_POISON")
            var arg = uffdio_poison(range: uffdio_range(start: range.start, len: range.length), mode: mode.rawValue, updated: 0)
            while true {
                if cuffd_poison(fd, &arg) == 0 { return .completed(Int(range.length)) }
                if let outcome = try Outcome.decode("UFFDIO_POISON", done: arg.updated) { return outcome }
            }
        }

        /// Wakes threads waiting on faults in `range` (after resolving with `dontWake`).
        ///
        /// - Parameter range: Page-aligned addresses registered with this userfaultfd.
        /// - Throws: `UserfaultfdError` for `UFFDIO_WAKE`.
        ///
        /// The corresponding C call is `ioctl(fd, UFFDIO_WAKE, &uffdio_range)`.
        public func wake(_ range: MemoryRange) throws(UserfaultfdError) {
            try checkOpen("UFFDIO_WAKE")
            var arg = uffdio_range(start: range.start, len: range.length)
            _ = try retryOnInterrupt("UFFDIO_WAKE") { cuffd_wake(fd, &arg) }
        }

        /// Sets write protection on `range` when `mode` contains
        /// ``WriteProtectMode/writeProtect``, and clears it otherwise.
        ///
        /// Clearing it wakes the threads blocked on WP faults there unless `mode`
        /// contains ``WriteProtectMode/dontWake``.
        ///
        /// ```swift
        /// try handle.writeProtect(range, mode: .writeProtect)   // protect
        /// try handle.writeProtect(range, mode: [])              // unprotect and wake the writers
        /// ```
        ///
        /// - Parameters:
        ///   - range: Page-aligned addresses in a range registered WP.
        ///   - mode: ``WriteProtectMode/writeProtect`` to protect, and/or ``WriteProtectMode/dontWake``.
        /// - Returns: ``Outcome/completed(_:)`` or ``Outcome/retryAfterEvents`` (`EAGAIN`).
        /// - Throws: `UserfaultfdError` for `UFFDIO_WRITEPROTECT` on any other failure.
        ///
        /// The corresponding C call is `ioctl(fd, UFFDIO_WRITEPROTECT, &uffdio_writeprotect)`.
        @discardableResult
        public func writeProtect(_ range: MemoryRange, mode: WriteProtectMode) throws(UserfaultfdError) -> Outcome {
            try checkOpen("UFFDIO_WRITEPROTECT")
            var arg = uffdio_writeprotect(range: uffdio_range(start: range.start, len: range.length), mode: mode.rawValue)
            if retryOnInterrupt({ cuffd_writeprotect(fd, &arg) }) == 0 { return .completed(Int(range.length)) }
            let e = currentErrno()
            if e == .resourceTemporarilyUnavailable { return .retryAfterEvents }
            throw UserfaultfdError(operation: "UFFDIO_WRITEPROTECT", errno: e)
        }

        /// Sets or clears write protection on `range` (registered with WP).
        ///
        /// - Parameters:
        ///   - range: Page-aligned addresses in a range registered WP.
        ///   - protect: Whether to set (true) or clear (false) the protection.
        ///   - dontWake: Leave the threads blocked on WP faults asleep after clearing.
        /// - Returns: ``Outcome/completed(_:)`` or ``Outcome/retryAfterEvents``.
        /// - Throws: `UserfaultfdError` for `UFFDIO_WRITEPROTECT`.
        ///
        /// The corresponding C call is `ioctl(fd, UFFDIO_WRITEPROTECT, &uffdio_writeprotect)`.
        @available(*, deprecated, message: "use writeProtect(_:mode:), which takes a mode set like the other resolving calls")
        @discardableResult
        public func writeProtect(_ range: MemoryRange, protect: Bool, dontWake: Bool = false) throws(UserfaultfdError) -> Outcome {
            var mode: WriteProtectMode = protect ? .writeProtect : []
            if dontWake { mode.insert(.dontWake) }
            return try writeProtect(range, mode: mode)
        }
    }
}
