#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The package's one clock for durations, deadlines and reports: `CLOCK_MONOTONIC`.
/// (The engine's fault-path trace reads the same clock from C, `cfe_now_ns`.)
package enum MonotonicClock {
    /// Now, in nanoseconds since an arbitrary fixed point.
    @inline(__always)
    package static func nanoseconds() -> UInt64 {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
    }

    /// Now, in whole milliseconds.
    package static func milliseconds() -> Int {
        Int(nanoseconds() / 1_000_000)
    }

    /// Now, in seconds.
    package static func seconds() -> Double {
        Double(nanoseconds()) / 1e9
    }
}
