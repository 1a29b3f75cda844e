import Synchronization
import SystemPackage
import _CUserfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A joinable OS thread running one closure, outside Swift's cooperative pool.
///
/// Fault handlers run here: a handler on the cooperative pool could be starved by
/// the very tasks that wait on its faults.
public final class DedicatedThread: @unchecked Sendable {
    private var thread: pthread_t
    private let joined = Atomic<Bool>(false)

    /// Starts `body` on a new thread; stops the process if the thread cannot be created.
    ///
    /// For threads the program cannot run without. Where a peer's request starts the
    /// thread, use ``start(name:_:)``, which reports the failure instead.
    ///
    /// - Parameters:
    ///   - name: the thread's name as tools show it (at most 15 bytes are kept).
    ///   - body: what the thread runs.
    public init(name: String, _ body: @escaping @Sendable () -> Void) {
        let started = Self.create(name: name, body)
        guard case .success(let t) = started else {
            preconditionFailure("pthread_create failed: \(started)")
        }
        thread = t
    }

    private init(started: pthread_t) {
        thread = started
    }

    /// Starts `body` on a new thread, or says why none could be created.
    ///
    /// A pids cgroup limit, systemd's `TasksMax=` or `RLIMIT_NPROC` make thread creation
    /// fail with `EAGAIN`; a daemon refuses the one request and keeps serving.
    ///
    /// - Parameters:
    ///   - name: the thread's name as tools show it (at most 15 bytes are kept).
    ///   - body: what the thread runs; it is released unrun if the thread cannot start.
    /// - Returns: the running thread.
    /// - Throws: `UserfaultfdError` with the errno of `pthread_create`.
    ///
    /// The corresponding C function is `pthread_create`.
    public static func start(name: String, _ body: @escaping @Sendable () -> Void) throws(UserfaultfdError) -> DedicatedThread {
        switch create(name: name, body) {
        case .success(let t): return DedicatedThread(started: t)
        case .failure(let e): throw UserfaultfdError(operation: "pthread_create \(name)", errno: e)
        }
    }

    private static func create(name: String, _ body: @escaping @Sendable () -> Void) -> Result<pthread_t, Errno> {
        final class Box { let body: @Sendable () -> Void; let name: String; init(_ b: @escaping @Sendable () -> Void, _ n: String) { body = b; name = n } }
        let box = Unmanaged.passRetained(Box(body, name))
        var t = pthread_t()
        let rc = pthread_create(&t, nil, { raw in
            let box = Unmanaged<AnyObject>.fromOpaque(raw!).takeRetainedValue() as! Box
            _ = cuffd_set_thread_name(box.name)
            box.body()
            return nil
        }, box.toOpaque())
        if rc != 0 {
            box.release()
            return .failure(Errno(rawValue: rc))
        }
        return .success(t)
    }

    /// Waits for the thread to finish. Calling it again, from any thread, does nothing.
    public func join() {
        // Exactly one caller wins the exchange and joins; a pthread is joined at most once.
        guard joined.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged else { return }
        pthread_join(thread, nil)
    }

    deinit {
        if !joined.load(ordering: .acquiring) { pthread_detach(thread) }
    }

    /// Makes the calling thread real-time: `SCHED_FIFO` at `priority` (1...99).
    ///
    /// For threads that block almost all the time and must run as soon as they wake
    /// (fault handlers, a fault's network path): a time-shared thread woken on a busy
    /// machine waits for a time slice first.
    ///
    /// - Parameter priority: The real-time priority, 1 (lowest) to 99.
    /// - Returns: nil, or why the policy was refused (`EPERM` without CAP_SYS_NICE or
    ///   an RLIMIT_RTPRIO that allows it); the thread then stays time-shared.
    @discardableResult
    public static func makeCurrentThreadRealTime(priority: Int32) -> Errno? {
        var parameters = sched_param()
        parameters.sched_priority = priority
        let rc = pthread_setschedparam(pthread_self(), SCHED_FIFO, &parameters)
        return rc == 0 ? nil : Errno(rawValue: rc)
    }
}
