#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

extension Userfaultfd.Handle {
    /// The messages of this userfaultfd as an `AsyncSequence`, for code where
    /// convenience matters more than latency.
    ///
    /// A dedicated thread (never the cooperative pool) waits on the fd and yields each
    /// message. The stream ends with an error if reading fails and finishes when the
    /// fd hangs up; cancelling the consuming task, or ending iteration, stops the thread.
    /// The handle must stay open while the stream runs.
    ///
    /// The call returns once the thread is ready to read: a `fork()` with EVENT_FORK
    /// holds the C allocator's locks until its FORK message is read, so a reader that
    /// still had to allocate its buffer then would deadlock with it.
    ///
    /// - Parameter batchSize: The most messages one `read` takes.
    /// - Returns: A stream of every message, in the order the kernel delivered them.
    /// - Throws: `UserfaultfdError` for `eventfd` (the thread's stop and readiness signals).
    public func events(batchSize: Int = 64) throws(UserfaultfdError) -> AsyncThrowingStream<Userfaultfd.Event, any Error> {
        let stop = try StopSignal()
        let ready = try StopSignal()
        let handle = self
        let (stream, continuation) = AsyncThrowingStream<Userfaultfd.Event, any Error>.makeStream()
        let thread = DedicatedThread(name: "uffd-events") {
            let buffer = Userfaultfd.EventBuffer(capacity: batchSize)
            ready.raise()
            do {
                loop: while true {
                    switch try handle.wait(stop: stop) {
                    case .stopped: break loop
                    case .hangUp: break loop
                    case .timedOut: continue
                    case .ready:
                        try handle.readEvents(into: buffer)
                        for event in buffer.events { continuation.yield(event) }
                    }
                }
                continuation.finish()
            } catch {
                continuation.finish(throwing: error)
            }
        }
        // Termination may be reported on the reading thread itself, so it only raises
        // the stop signal; the thread then ends on its own (it is detached when released).
        continuation.onTermination = { _ in
            stop.raise()
            _ = thread
        }
        var readiness = pollfd(fd: ready.fileDescriptor.rawValue, events: Int16(POLLIN), revents: 0)
        _ = retryOnInterrupt { Glibc.poll(&readiness, 1, -1) }
        return stream
    }
}
