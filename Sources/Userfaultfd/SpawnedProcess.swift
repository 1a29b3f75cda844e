import SystemPackage

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A process started with `posix_spawn` whose standard output (and, if asked, its
/// standard error) goes into a pipe that this process reads: the one spawner of the
/// benchmarks, the command-line tool and the tests.
///
/// Both ends of the pipe are close-on-exec, so neither leaks into processes spawned
/// later (a read of the output would never see its end).
package struct SpawnedProcess: Sendable {
    /// The child's process id.
    package let pid: pid_t
    /// The read end of the child's output pipe; whoever holds this value closes it.
    package let output: Int32

    /// Starts `executable` with `arguments`.
    ///
    /// - Parameters:
    ///   - executable: the path of the program.
    ///   - arguments: its arguments, without the program name.
    ///   - name: the program name the child sees (`argv[0]`); by default `executable`.
    ///   - standardError: whether standard error goes into the pipe too (otherwise it
    ///     is this process's own).
    ///   - environment: `NAME=value` entries; by default this process's environment.
    /// - Throws: the failed `pipe` or `posix_spawn` and its errno.
    package init(
        _ executable: String, _ arguments: [String], name: String? = nil,
        standardError: Bool = false, environment: [String]? = nil
    ) throws(UserfaultfdError) {
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else { throw UserfaultfdError(operation: "pipe", errno: Errno(rawValue: errno)) }
        for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, fds[1], 1)
        if standardError { posix_spawn_file_actions_adddup2(&actions, fds[1], 2) }
        let argv = ([name ?? executable] + arguments).map { strdup($0) } + [nil]
        let envp = environment.map { $0.map { strdup($0) } + [nil] }
        defer { for p in argv + (envp ?? []) { free(p) } }
        var child: pid_t = 0
        let rc = if let envp {
            posix_spawn(&child, executable, &actions, nil, argv, envp)
        } else {
            posix_spawn(&child, executable, &actions, nil, argv, environ)
        }
        close(fds[1])
        guard rc == 0 else {
            close(fds[0])
            throw UserfaultfdError(operation: "posix_spawn \(executable)", errno: Errno(rawValue: rc))
        }
        pid = child
        output = fds[0]
    }

    /// Reads the output until its end (blocking), without closing it.
    package func readToEnd() -> [UInt8] {
        var collected: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = retryOnInterrupt { chunk.withUnsafeMutableBytes { read(output, $0.baseAddress, $0.count) } }
            if n <= 0 { return collected }
            collected.append(contentsOf: chunk[0..<n])
        }
    }

    /// Waits for the child to exit and reaps it: its wait status, as `waitpid` gives it.
    package func waitStatus() -> Int32 {
        var status: Int32 = 0
        _ = retryOnInterrupt { waitpid(pid, &status, 0) }
        return status
    }

    /// A wait status as one exit code: the exit status, or 128 + the signal that ended it.
    package static func exitCode(waitStatus status: Int32) -> Int32 {
        status & 0x7f == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
    }
}
