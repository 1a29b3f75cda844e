#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// CPU time a thread has used, for the statistics' CPU seconds per GB moved. Read
/// outside the per-page paths (once when a migration thread starts and once when it ends).
enum ThreadCPU {
    /// Nanoseconds of CPU the calling thread has used so far.
    static func current() -> UInt64 { read(CLOCK_THREAD_CPUTIME_ID) }

    /// The CPU-time clock of the calling thread, which another thread of this process
    /// can read (``read(_:)``) while this one lives.
    static func clockOfCurrentThread() -> clockid_t? {
        var clock = clockid_t()
        return pthread_getcpuclockid(pthread_self(), &clock) == 0 ? clock : nil
    }

    /// Nanoseconds on `clock` (0 if it cannot be read).
    static func read(_ clock: clockid_t) -> UInt64 {
        var ts = timespec()
        guard clock_gettime(clock, &ts) == 0 else { return 0 }
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }
}
