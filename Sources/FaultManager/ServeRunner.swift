import Logging
import Synchronization
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The write end of the pipe the signal handler reports to (-1: none).
private let signalPipe = Atomic<Int32>(-1)

/// Runs a ``Manager`` in the foreground until SIGINT or SIGTERM, the way `uffd serve` does.
public enum ServeRunner {
    /// Sends log lines to standard error at `level` (once per process) and returns the daemon's logger.
    public static func standardErrorLogger(level: Logger.Level) -> Logger {
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        return Logger(label: "uffd.serve")
    }

    /// Starts `manager`, prints statistics on SIGUSR1, and stops on SIGINT/SIGTERM.
    ///
    /// - Parameters:
    ///   - manager: the manager to run.
    ///   - json: print statistics as JSON (on SIGUSR1 and on exit) instead of a table.
    ///   - output: where statistics go (a line-oriented writer, standard output by default).
    public static func run(_ manager: Manager, json: Bool,
                           output: @Sendable (String) -> Void = { writeStandardOutput($0) }) throws(UserfaultfdError) {
        let signals = try makeSignalPipe()
        defer {
            signalPipe.store(-1, ordering: .sequentiallyConsistent)
            close(signals.read)
            close(signals.write)
        }
        installSignalHandlers(writingTo: signals.write)
        try manager.start()
        waitForStop(signals.read) { output(report(manager, json: json)) }
        manager.stop()
        output(report(manager, json: json))
    }

    /// Writes `line` and a newline to standard output at once: statistics asked for with
    /// SIGUSR1 must not sit in a buffer.
    @usableFromInline
    static func writeStandardOutput(_ line: String) {
        let bytes = Array((line + "\n").utf8)
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { raw in retryOnInterrupt { write(1, raw.baseAddress! + done, raw.count - done) } }
            if n <= 0 { break }
            done += n
        }
    }

    /// A non-blocking, close-on-exec pipe for the signal handler.
    private static func makeSignalPipe() throws(UserfaultfdError) -> (read: Int32, write: Int32) {
        var fds: [Int32] = [-1, -1]
        if pipe(&fds) != 0 { throw UserfaultfdError(operation: "pipe", errno: .init(rawValue: errno)) }
        for fd in fds {
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            _ = fcntl(fd, F_SETFL, O_NONBLOCK)
        }
        return (fds[0], fds[1])
    }

    /// SIGINT, SIGTERM and SIGUSR1 write their number to `fd` (async-signal-safe).
    private static func installSignalHandlers(writingTo fd: Int32) {
        signalPipe.store(fd, ordering: .sequentiallyConsistent)
        for sig in [SIGINT, SIGTERM, SIGUSR1] {
            var action = sigaction()
            action.__sigaction_handler.sa_handler = { sig in
                let fd = signalPipe.load(ordering: .relaxed)
                if fd >= 0 {
                    var byte = UInt8(truncatingIfNeeded: sig)
                    _ = write(fd, &byte, 1)
                }
            }
            action.sa_flags = SA_RESTART
            sigemptyset(&action.sa_mask)
            sigaction(sig, &action, nil)
        }
    }

    /// Waits for SIGINT or SIGTERM, calling `onReport` for every SIGUSR1 meanwhile.
    private static func waitForStop(_ fd: Int32, onReport: () -> Void) {
        while true {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            _ = retryOnInterrupt { poll(&p, 1, -1) }
            var byte: UInt8 = 0
            while read(fd, &byte, 1) == 1 {
                if Int32(byte) != SIGUSR1 { return }
                onReport()
            }
        }
    }

    /// The statistics of every client, as JSON or as a table.
    public static func report(_ manager: Manager, json: Bool) -> String {
        if json { return manager.statisticsJSON() }
        var lines = ["client  pid      uid    handshake    state    faults  pages     bytes        p50 ns    p99 ns    max ns"]
        for c in manager.clients {
            let s = c.statistics
            func pad(_ v: Any, _ w: Int) -> String {
                let t = "\(v)"
                return t.count >= w ? t + " " : t + String(repeating: " ", count: w - t.count)
            }
            lines.append(pad(c.id, 8) + pad(c.pid, 9) + pad(c.uid, 7) + pad(c.handshake, 13) + pad(c.serving ? "serving" : "ended", 9)
                         + pad(s.faults, 8) + pad(s.pagesInstalled, 10) + pad(c.bytesServed, 13)
                         + pad(s.latencyP50, 10) + pad(s.latencyP99, 10) + pad(s.latencyMax, 10))
        }
        lines.append("refused handshakes: \(manager.refusedCount)")
        return lines.joined(separator: "\n")
    }
}
