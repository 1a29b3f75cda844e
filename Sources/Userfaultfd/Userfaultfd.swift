import SystemPackage
import _CUserfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// An owned userfaultfd: closed when this value goes away, or by ``close()``.
///
/// Create one with ``init(features:method:userModeOnly:)`` (create and handshake in
/// one step), with ``init(_:)`` (requirements checked first), or with
/// ``open(method:userModeOnly:)`` followed by ``handshake(features:api:)``.
/// Everything that works on the fd lives on ``Handle``, a plain copyable value that
/// handler threads share; ``handle`` lends it out.
///
/// ## Lifetimes
/// A handle does not keep its owner alive: stop every thread that uses a handle
/// before the owner goes away (the engine's `FaultServer` joins its threads first).
/// What the owner does guarantee is that a handle used *after* it closed the
/// descriptor fails with `EBADF` and a hint instead of reaching whatever file the
/// same descriptor number names by then (see ``Handle/isOpen``). Addresses are
/// plain `UInt64`: a stale address is harmless to the kernel's ioctls, which act
/// only on ranges registered with this userfaultfd.
public struct Userfaultfd: ~Copyable {
    // Stored properties stay trivially destroyed so that `release()` and `close()` can
    // `discard self`; the lifetime token is therefore held through `Unmanaged`.
    private let descriptor: FileDescriptor
    private var negotiated: Features
    private var ioctlsOfFD: Ioctls
    private let lifetime: Unmanaged<Handle.Lifetime>

    /// The borrowed, copyable view of this userfaultfd that every operation goes through.
    ///
    /// Copies of it work until this value closes the descriptor; after that every
    /// call on them throws `EBADF` (``Handle/isOpen`` is false).
    public var handle: Handle {
        Handle(fileDescriptor: descriptor, features: negotiated, fdIoctls: ioctlsOfFD, lifetime: lifetime.takeUnretainedValue())
    }

    /// The file descriptor. Owned by this value.
    public var fileDescriptor: FileDescriptor { descriptor }
    /// Features enabled on this fd by the handshake (empty before it).
    public var features: Features { negotiated }

    /// Takes ownership of an existing userfaultfd descriptor.
    ///
    /// - Parameters:
    ///   - fileDescriptor: An open userfaultfd; it is closed when this value goes away.
    ///   - features: The features already negotiated on it (a forked child's uffd has
    ///     its parent's), or empty if the handshake is still to come.
    ///     ``DescriptorPassing/receiveUserfaultfd(from:)`` receives a uffd with its features.
    public init(adopting fileDescriptor: FileDescriptor, features: Features = []) {
        self.descriptor = fileDescriptor
        self.negotiated = features
        self.ioctlsOfFD = []
        self.lifetime = Unmanaged.passRetained(Handle.Lifetime())
    }

    deinit {
        lifetime.takeUnretainedValue().markClosed()
        lifetime.release()
        try? descriptor.close()
    }

    /// Gives up ownership without closing: the caller now owns the descriptor.
    ///
    /// Handles taken before keep working: the descriptor stays open.
    ///
    /// - Returns: The descriptor, which the caller must close.
    public consuming func release() -> FileDescriptor {
        let fd = descriptor
        let token = lifetime
        discard self
        token.release()
        return fd
    }

    /// Closes the userfaultfd now, reporting an error that going out of scope would drop.
    ///
    /// Every handle taken from this value stops working first: their calls throw
    /// `EBADF`. Threads blocked in ``Handle/wait(stop:timeoutMilliseconds:)`` are not
    /// woken by a close: raise their ``StopSignal`` and join them before closing.
    ///
    /// - Throws: `UserfaultfdError` for `close`; the descriptor is released either way.
    ///
    /// The corresponding C function is `close`.
    public consuming func close() throws(UserfaultfdError) {
        let fd = descriptor
        let token = lifetime
        discard self
        token.takeUnretainedValue().markClosed()
        token.release()
        do {
            try fd.close()
        } catch {
            throw UserfaultfdError(operation: "close", errno: error as? Errno ?? .ioError)
        }
    }

    /// Creates a userfaultfd and completes the `UFFDIO_API` handshake.
    ///
    /// - Parameters:
    ///   - features: The features to enable; the kernel refuses the handshake if it lacks any.
    ///   - method: How to create the fd (``CreationMethod/automatic`` tries the syscall, then the device).
    ///   - userModeOnly: Trap only faults from user mode (`UFFD_USER_MODE_ONLY`); lets any user create it.
    /// - Throws: `UserfaultfdError` naming the step that failed, with a hint on permissions.
    ///
    /// The corresponding C calls are `syscall(SYS_userfaultfd, flags)` and `ioctl(fd, UFFDIO_API, &uffdio_api)`.
    public init(
        features: Features = [],
        method: CreationMethod = .automatic,
        userModeOnly: Bool = false
    ) throws(UserfaultfdError) {
        var uffd = try Userfaultfd.open(method: method, userModeOnly: userModeOnly)
        try uffd.handshake(features: features)
        self = uffd
    }

    /// Creates a userfaultfd as `options` describe, checking requirements first.
    ///
    /// Required features the kernel lacks fail with ``UserfaultfdError/Kind/unsupportedFeatures(_:)``
    /// before any fd is created; preferred features are enabled only where supported.
    ///
    /// - Parameter options: The required and preferred features and how to create the fd.
    /// - Throws: `UserfaultfdError`: ``UserfaultfdError/Kind/unsupportedFeatures(_:)`` for
    ///   required features the kernel lacks, else the step of creation that failed.
    public init(_ options: Options) throws(UserfaultfdError) {
        var wanted = options.requiredFeatures
        if !options.preferredFeatures.isEmpty || !options.requiredFeatures.isEmpty {
            let supported = try Userfaultfd.probe(method: options.method, userModeOnly: options.userModeOnly).features
            let missing = options.requiredFeatures.subtracting(supported)
            if !missing.isEmpty {
                throw UserfaultfdError(operation: "UFFDIO_API", kind: .unsupportedFeatures(missing))
            }
            wanted.formUnion(options.preferredFeatures.intersection(supported))
        }
        var uffd = try Userfaultfd.open(method: options.method, userModeOnly: options.userModeOnly)
        try uffd.handshake(features: wanted)
        self = uffd
    }

    /// Performs the `UFFDIO_API` handshake. It succeeds at most once per fd.
    ///
    /// - Parameters:
    ///   - features: The features to enable. Unknown bits are passed to the kernel as they are.
    ///   - api: The API version; only `UFFD_API` (0xAA) is valid. Other values exist for tests.
    /// - Returns: Every feature the kernel supports (its answer), which may exceed `features`.
    /// - Throws: `UserfaultfdError` for `UFFDIO_API` (`EINVAL`: bad api or unsupported
    ///   feature; `EPERM`: features need privileges; a second handshake fails too).
    ///
    /// The corresponding C call is `ioctl(fd, UFFDIO_API, &uffdio_api)`.
    @discardableResult
    public mutating func handshake(features: Features, api: UInt64 = cuffd_UFFD_API) throws(UserfaultfdError) -> Features {
        var arg = uffdio_api(api: api, features: features.rawValue, ioctls: 0)
        let fd = descriptor.rawValue
        do {
            _ = try retryOnInterrupt("UFFDIO_API") { cuffd_api(fd, &arg) }
        } catch {
            var error = error
            if error.errno == .invalidArgument {
                error.hint = "the kernel refused api 0x\(String(api, radix: 16)) with features \(features): "
                    + "a bad api value, a feature it does not know, or a second handshake on this fd"
            }
            throw error
        }
        var enabled = features
        if enabled.contains(.wpAsync) { enabled.insert(.wpUnpopulated) }
        negotiated = enabled
        ioctlsOfFD = Ioctls(rawValue: arg.ioctls)
        return Features(rawValue: arg.features)
    }
}

extension Userfaultfd {
    /// How a userfaultfd is created.
    public enum CreationMethod: String, Sendable, CaseIterable {
        /// `syscall(SYS_userfaultfd)`: needs CAP_SYS_PTRACE or `vm.unprivileged_userfaultfd=1`
        /// unless user-mode-only.
        case syscall
        /// `ioctl(open("/dev/userfaultfd"), USERFAULTFD_IOC_NEW)`: the device's permissions decide.
        case device
        /// The syscall, then the device if the syscall is refused.
        case automatic
    }

    /// What to create: required and preferred features, and how.
    ///
    /// ```swift
    /// let uffd = try Userfaultfd(.init().requiring(.threadID).preferring(.move))
    /// ```
    public struct Options: Sendable {
        /// Features that must be enabled; creation fails early if the kernel lacks one.
        public var requiredFeatures: Features = []
        /// Features enabled when the kernel supports them.
        public var preferredFeatures: Features = []
        /// How to create the fd.
        public var method: CreationMethod = .automatic
        /// Trap only user-mode faults (`UFFD_USER_MODE_ONLY`).
        public var userModeOnly = false

        /// No features required or preferred, created the automatic way.
        public init() {}

        /// These options, also requiring `features`.
        ///
        /// - Parameter features: Features creation must fail without.
        /// - Returns: A copy with `features` added to ``requiredFeatures``.
        public func requiring(_ features: Features) -> Options {
            var copy = self
            copy.requiredFeatures.formUnion(features)
            return copy
        }

        /// These options, also preferring `features`.
        ///
        /// - Parameter features: Features to enable where the kernel offers them.
        /// - Returns: A copy with `features` added to ``preferredFeatures``.
        public func preferring(_ features: Features) -> Options {
            var copy = self
            copy.preferredFeatures.formUnion(features)
            return copy
        }

        /// These options, creating the fd with `method`.
        ///
        /// - Parameter method: The syscall, the device, or both in turn.
        /// - Returns: A copy with ``method`` set.
        public func created(by method: CreationMethod) -> Options {
            var copy = self
            copy.method = method
            return copy
        }

        /// These options, trapping user-mode faults only.
        ///
        /// - Parameter value: Whether to pass `UFFD_USER_MODE_ONLY`.
        /// - Returns: A copy with ``userModeOnly`` set.
        public func userModeOnly(_ value: Bool = true) -> Options {
            var copy = self
            copy.userModeOnly = value
            return copy
        }
    }

    /// What the running kernel supports, from a handshake on a throwaway fd.
    public struct Support: Sendable, Equatable {
        /// Every feature the kernel offers.
        public var features: Features
        /// The ioctls valid on the fd itself (API, REGISTER, UNREGISTER).
        public var ioctls: Ioctls
    }

    /// Asks the running kernel what it supports, on a throwaway fd.
    ///
    /// `UFFDIO_API` works once per fd, so this creates one, asks, and closes it.
    ///
    /// - Parameters:
    ///   - method: How to create the throwaway fd.
    ///   - userModeOnly: Create it user-mode-only (any user can).
    /// - Returns: Every feature the kernel offers and the ioctls of the fd itself.
    /// - Throws: `UserfaultfdError` for creation or `UFFDIO_API`.
    ///
    /// The corresponding C call is `ioctl(fd, UFFDIO_API, &uffdio_api)` with no features asked for.
    public static func probe(method: CreationMethod = .automatic, userModeOnly: Bool = false) throws(UserfaultfdError) -> Support {
        let probe = try open(method: method, userModeOnly: userModeOnly)
        var arg = uffdio_api(api: cuffd_UFFD_API, features: 0, ioctls: 0)
        let fd = probe.fileDescriptor.rawValue
        _ = try retryOnInterrupt("UFFDIO_API") { cuffd_api(fd, &arg) }
        return Support(features: Features(rawValue: arg.features), ioctls: Ioctls(rawValue: arg.ioctls))
    }
}
