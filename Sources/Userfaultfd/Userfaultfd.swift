import SystemPackage
import _CUserfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// An owned userfaultfd: closed when this value goes away.
///
/// Create one with ``init(features:method:userModeOnly:)`` (create and handshake in
/// one step), with ``init(_:)`` (requirements checked first), or with
/// ``open(method:userModeOnly:)`` followed by ``handshake(features:api:)``.
/// Everything that works on the fd lives on ``Handle``, a plain copyable value that
/// handler threads share; ``handle`` lends it out. A handle must not outlive its owner.
public struct Userfaultfd: ~Copyable {
    /// The borrowed, copyable view of this userfaultfd that every operation goes through.
    public private(set) var handle: Handle

    /// The file descriptor. Owned by this value.
    public var fileDescriptor: FileDescriptor { handle.fileDescriptor }
    /// Features enabled on this fd by the handshake (empty before it).
    public var features: Features { handle.features }

    /// Takes ownership of an existing userfaultfd descriptor.
    ///
    /// - Parameters:
    ///   - fileDescriptor: an open userfaultfd; it is closed when this value goes away.
    ///   - features: the features already negotiated on it (a forked child's uffd has
    ///     its parent's), or empty if the handshake is still to come.
    public init(adopting fileDescriptor: FileDescriptor, features: Features = []) {
        self.handle = Handle(fileDescriptor: fileDescriptor, features: features)
    }

    deinit {
        try? handle.fileDescriptor.close()
    }

    /// Gives up ownership without closing: the caller now owns the descriptor.
    public consuming func release() -> FileDescriptor {
        let fd = handle.fileDescriptor
        discard self
        return fd
    }

    /// Creates a userfaultfd and completes the `UFFDIO_API` handshake.
    ///
    /// - Parameters:
    ///   - features: the features to enable; the kernel refuses the handshake if it lacks any.
    ///   - method: how to create the fd (``CreationMethod/automatic`` tries the syscall, then the device).
    ///   - userModeOnly: trap only faults from user mode (`UFFD_USER_MODE_ONLY`); lets any user create it.
    /// - Throws: `UserfaultfdError` naming the step that failed, with a hint on permissions.
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
    ///   - features: the features to enable. Unknown bits are passed to the kernel as they are.
    ///   - api: the API version; only `UFFD_API` (0xAA) is valid. Other values exist for tests.
    /// - Returns: every feature the kernel supports (its answer), which may exceed `features`.
    /// - Throws: `UserfaultfdError` for `UFFDIO_API` (`EINVAL`: bad api or unsupported
    ///   feature; `EPERM`: features need privileges; a second handshake fails too).
    /// The corresponding C call is `ioctl(fd, UFFDIO_API, &uffdio_api)`.
    @discardableResult
    public mutating func handshake(features: Features, api: UInt64 = cuffd_UFFD_API) throws(UserfaultfdError) -> Features {
        var arg = uffdio_api(api: api, features: features.rawValue, ioctls: 0)
        let fd = handle.fileDescriptor.rawValue
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
        handle.features = enabled
        handle.fdIoctls = Ioctls(rawValue: arg.ioctls)
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

        public init() {}

        /// These options, also requiring `features`.
        public func requiring(_ features: Features) -> Options {
            var copy = self
            copy.requiredFeatures.formUnion(features)
            return copy
        }

        /// These options, also preferring `features`.
        public func preferring(_ features: Features) -> Options {
            var copy = self
            copy.preferredFeatures.formUnion(features)
            return copy
        }

        /// These options, creating the fd with `method`.
        public func created(by method: CreationMethod) -> Options {
            var copy = self
            copy.method = method
            return copy
        }

        /// These options, trapping user-mode faults only.
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
    public static func probe(method: CreationMethod = .automatic, userModeOnly: Bool = false) throws(UserfaultfdError) -> Support {
        var probe = try open(method: method, userModeOnly: userModeOnly)
        var arg = uffdio_api(api: cuffd_UFFD_API, features: 0, ioctls: 0)
        let fd = probe.fileDescriptor.rawValue
        _ = try retryOnInterrupt("UFFDIO_API") { cuffd_api(fd, &arg) }
        probe.handle.features = []
        return Support(features: Features(rawValue: arg.features), ioctls: Ioctls(rawValue: arg.ioctls))
    }
}
