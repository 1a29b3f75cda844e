import SystemPackage

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A failed userfaultfd operation: which operation, and the error the kernel gave.
///
/// Errors name the operation (`UFFDIO_COPY`, `UFFDIO_REGISTER`, `open /dev/userfaultfd`…)
/// so a log line tells what went wrong without a stack trace.
public struct UserfaultfdError: Error, Equatable, Sendable, CustomStringConvertible {
    /// What kind of failure this is.
    public enum Kind: Equatable, Sendable {
        /// A system call or ioctl failed with `errno`.
        case system(Errno)
        /// The kernel does not offer features the caller required.
        case unsupportedFeatures(Userfaultfd.Features)
        /// The kernel does not offer ioctls the caller required.
        case unsupportedIoctls(Userfaultfd.Ioctls)
        /// An argument was rejected before reaching the kernel.
        case invalidArgument(String)
        /// Data from a peer or the kernel did not have the expected shape.
        case malformed(String)
    }

    /// The operation that failed, for example `"UFFDIO_COPY"`.
    public var operation: String
    /// What went wrong.
    public var kind: Kind
    /// Extra guidance for the user: why it failed and what to do about it.
    public var hint: String?

    /// An error for `operation` failing as `kind` says.
    ///
    /// - Parameters:
    ///   - operation: What failed, for example `"UFFDIO_COPY"`.
    ///   - kind: What went wrong.
    ///   - hint: Why, and what to do about it.
    public init(operation: String, kind: Kind, hint: String? = nil) {
        self.operation = operation
        self.kind = kind
        self.hint = hint
    }

    /// An error for `operation` failing with `errno`.
    ///
    /// - Parameters:
    ///   - operation: What failed, for example `"UFFDIO_COPY"`.
    ///   - errno: The error the system call returned.
    ///   - hint: Why, and what to do about it.
    public init(operation: String, errno: Errno, hint: String? = nil) {
        self.init(operation: operation, kind: .system(errno), hint: hint)
    }

    /// The `errno` of a failed system call, if this error is one.
    public var errno: Errno? {
        if case .system(let e) = kind { return e }
        return nil
    }

    /// `OPERATION failed: …`, followed by the hint.
    public var description: String {
        var text: String
        switch kind {
        case .system(let e):
            text = systemCallFailure(operation, e.rawValue)
        case .unsupportedFeatures(let missing):
            text = "\(operation): the running kernel does not offer the required features \(missing)"
        case .unsupportedIoctls(let missing):
            text = "\(operation): the required ioctls \(missing) are not available"
        case .invalidArgument(let why):
            text = "\(operation): invalid argument: \(why)"
        case .malformed(let why):
            text = "\(operation): malformed data: \(why)"
        }
        if let hint { text += ". \(hint)" }
        return text
    }
}

/// `OPERATION failed: <the system's text for errno> (errno N)`: how every error of the
/// package words a failed system call.
package func systemCallFailure(_ operation: String, _ code: Int32) -> String {
    "\(operation) failed: \(Errno(rawValue: code)) (errno \(code))"
}

/// The current thread's `errno` as an `Errno`.
@inline(__always)
package func currentErrno() -> Errno {
    Errno(rawValue: errno)
}

/// Runs `body` until it returns something other than -1 with `EINTR`.
///
/// The one place of this package that retries a system call interrupted by a signal.
///
/// - Parameters:
///   - operation: What `body` does, for the error (for example `"UFFDIO_REGISTER"`).
///   - body: A system call wrapper that returns -1 and sets `errno` on failure.
/// - Returns: The result of `body` when it is not -1.
/// - Throws: `UserfaultfdError` naming `operation` with the `errno` of the failure.
@inline(__always)
package func retryOnInterrupt<R: FixedWidthInteger>(
    _ operation: String,
    _ body: () -> R
) throws(UserfaultfdError) -> R {
    while true {
        let result = body()
        if result != -1 { return result }
        let e = currentErrno()
        if e == .interrupted { continue }
        throw UserfaultfdError(operation: operation, errno: e)
    }
}

/// Runs `body` until it returns something other than -1 with `EINTR`, for callers
/// that read `errno` themselves.
///
/// - Parameter body: A system call wrapper that returns -1 (or any negative value)
///   and sets `errno` on failure.
/// - Returns: The first result of `body` that is not a failure with `EINTR`; on any
///   other failure `errno` still holds its error.
@inline(__always)
package func retryOnInterrupt<R: FixedWidthInteger>(_ body: () -> R) -> R {
    while true {
        let result = body()
        if result < 0 && errno == EINTR { continue }
        return result
    }
}
