import _CPagedMemory

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The pager's state lock, and what fillers wait on for buffer space.
///
/// It lives in C memory (`cpaged_shared`) with the budget and the in-thread regions,
/// because the SIGBUS resolver of in-thread mappings takes the same lock. Only pager
/// threads, the pager's own API calls and that resolver take it, and none of them
/// touches mapped memory that could fault while holding it.
final class PagerLock: @unchecked Sendable {
    /// The lock, the resident budget, the resolver's counters and regions.
    let shared: UnsafeMutablePointer<cpaged_shared>

    /// - Parameter pendingCapacity: the most pages the resolver may fill before an evictor queues them.
    init?(pendingCapacity: Int) {
        guard let s = cpaged_shared_create(Int64(pendingCapacity)) else { return nil }
        shared = s
    }

    deinit { cpaged_shared_destroy(shared) }

    /// Takes the lock.
    @inline(__always) func lock() { pthread_mutex_lock(&shared.pointee.mutex) }
    /// Gives the lock back.
    @inline(__always) func unlock() { pthread_mutex_unlock(&shared.pointee.mutex) }

    /// Runs `body` with the lock held.
    @inline(__always)
    func withLock<T>(_ body: () throws -> T) rethrows -> T {
        lock()
        defer { unlock() }
        return try body()
    }

    /// Waits (with the lock held) until ``broadcast()`` or `milliseconds` pass.
    func wait(milliseconds: Int) { cpaged_wait(shared, Int64(milliseconds)) }

    /// Wakes every waiter (call with the lock held).
    func broadcast() { pthread_cond_broadcast(&shared.pointee.cond) }
}
