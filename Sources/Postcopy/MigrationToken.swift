import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Where the pre-shared migration token comes from: a file, the environment, or (with
/// a warning) the command line.
public enum MigrationToken {
    /// The environment variable a token may come from.
    public static let environmentVariable = "UFFD_MIGRATE_TOKEN"
    /// The largest token file read.
    static let maxFileBytes = 4096

    /// A token and what the user should be told about how it was given.
    public struct Resolved: Sendable, Equatable {
        /// The token's bytes.
        public var token: [UInt8]
        /// Warnings to print (a token on the command line, a file others can read).
        public var warnings: [String]
    }

    /// Picks the token from a file, the command line or the environment.
    ///
    /// - Parameters:
    ///   - commandLine: a token given as an argument. It works, with a warning: every
    ///     local user can read a process's arguments in `/proc/PID/cmdline`.
    ///   - file: a file holding the token (one trailing newline is dropped).
    ///   - environment: the value of ``environmentVariable``, used when neither is given.
    /// - Returns: the token and the warnings to show.
    /// - Throws: ``MigrationError`` with kind `invalidArgument` when both or none are
    ///   given, the file cannot be read, or the token is empty or longer than 256 bytes.
    public static func resolve(commandLine: String?, file: String?, environment: String?) throws(MigrationError) -> Resolved {
        let resolved: Resolved
        switch (commandLine, file) {
        case (.some, .some):
            throw MigrationError(.invalidArgument("give the token either on the command line or in a file, not both"))
        case (.some(let text), nil):
            resolved = Resolved(token: Array(text.utf8), warnings: [
                "warning: a token on the command line is visible to every local user (/proc/PID/cmdline); "
                    + "use --token-file or \(environmentVariable) instead"])
        case (nil, .some(let path)):
            resolved = try readFile(path)
        case (nil, nil):
            guard let text = environment, !text.isEmpty else {
                throw MigrationError(.invalidArgument("no token: use --token-file or set \(environmentVariable) (no token, no migration)"))
            }
            resolved = Resolved(token: Array(text.utf8), warnings: [])
        }
        if resolved.token.isEmpty || resolved.token.count > Wire.maxTokenLength {
            throw MigrationError(.invalidArgument("the token must be 1...\(Wire.maxTokenLength) bytes, not \(resolved.token.count)"))
        }
        return resolved
    }

    /// Reads a token file: at most 4 KiB, one trailing newline dropped; warns when other
    /// users may read it.
    static func readFile(_ path: String) throws(MigrationError) -> Resolved {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0 { throw MigrationError(.invalidArgument("cannot open the token file: \(String(cString: strerror(errno)))")) }
        defer { close(fd) }
        var info = stat()
        if fstat(fd, &info) != 0 || info.st_mode & S_IFMT != S_IFREG {
            throw MigrationError(.invalidArgument("the token file is not a regular file"))
        }
        var bytes = [UInt8](repeating: 0, count: maxFileBytes + 1)
        var count = 0
        while count < bytes.count {
            let n = retryOnInterrupt { bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress! + count, $0.count - count) } }
            if n < 0 { throw MigrationError(.invalidArgument("cannot read the token file: \(String(cString: strerror(errno)))")) }
            if n == 0 { break }
            count += n
        }
        if count > maxFileBytes { throw MigrationError(.invalidArgument("the token file is larger than \(maxFileBytes) bytes")) }
        var token = Array(bytes[0..<count])
        if token.last == UInt8(ascii: "\n") { token.removeLast() }
        if token.last == UInt8(ascii: "\r") { token.removeLast() }
        var warnings: [String] = []
        if info.st_mode & 0o077 != 0 {
            warnings.append("warning: the token file is readable or writable by other users (mode \(String(info.st_mode & 0o777, radix: 8))); chmod 600 it")
        }
        return Resolved(token: token, warnings: warnings)
    }
}
