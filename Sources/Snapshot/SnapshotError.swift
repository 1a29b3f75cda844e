import Userfaultfd

/// Why a snapshot could not be taken, written, read or restored.
public struct SnapshotError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What kind of failure this is.
    public enum Kind: Sendable, Hashable {
        /// The file ends before a structure it declares (a capture that did not finish,
        /// or a file cut short).
        case truncated(String)
        /// A checksum or a structure does not match (the file was damaged).
        case corrupted(String)
        /// A delta's parent is not the file given as its parent, or the layouts differ.
        case wrongParent(String)
        /// Something this version does not handle (another format version, shared hugetlb memory).
        case unsupported(String)
        /// A system call failed with this errno.
        case system(operation: String, errno: Int32)
        /// An argument is out of range.
        case invalidArgument(String)
        /// The capture was cancelled.
        case cancelled
    }

    /// What went wrong.
    public var kind: Kind
    /// The file concerned, if any.
    public var path: String?

    public init(_ kind: Kind, path: String? = nil) {
        self.kind = kind
        self.path = path
    }

    static func system(_ operation: String, _ e: Int32 = currentErrno().rawValue, path: String? = nil) -> SnapshotError {
        SnapshotError(.system(operation: operation, errno: e), path: path)
    }

    public var description: String {
        let what: String
        switch kind {
        case .truncated(let s): what = "truncated: \(s)"
        case .corrupted(let s): what = "corrupted: \(s)"
        case .wrongParent(let s): what = "wrong parent: \(s)"
        case .unsupported(let s): what = "unsupported: \(s)"
        case .system(let op, let e): what = systemCallFailure(op, e)
        case .invalidArgument(let s): what = "invalid argument: \(s)"
        case .cancelled: what = "cancelled"
        }
        return path.map { "\($0): \(what)" } ?? what
    }
}
