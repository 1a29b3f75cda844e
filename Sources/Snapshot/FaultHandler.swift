import Synchronization
import Userfaultfd
import _CSnapshot

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The capture's fault handler thread: a writer that touches a protected page is held
/// in the kernel until this thread has copied the page's chunk (its bytes at the
/// snapshot instant) into the staging ring and cleared the protection. The copy is
/// the same C resolver the writing threads run in their SIGBUS handler when the
/// capture saves pages there instead.
///
/// It never writes registered memory (it only reads pages still protected) and takes
/// no lock.
final class FaultHandler: @unchecked Sendable {
    let job: CaptureJob
    /// Set once the thread runs (at its priority): the capture holds the writers only then,
    /// so a thread starting up does not take a CPU from a writer being parked.
    let running = Atomic<Bool>(false)

    init(job: CaptureJob) {
        self.job = job
    }

    /// Serves faults until the job's stop signal is raised.
    func run() {
        if job.handlerPriority > 0 { DedicatedThread.makeCurrentThreadRealTime(priority: job.handlerPriority) }
        running.store(true, ordering: .releasing)
        let buffer = Userfaultfd.EventBuffer(capacity: 64)
        defer {
            let cpu = threadCPUNanoseconds()
            job.monitor.withLock { job.handlerCPUNanoseconds = cpu }
        }
        while true {
            do {
                switch try job.handle.wait(stop: job.stop) {
                case .stopped, .hangUp: return
                case .timedOut: continue
                case .ready: break
                }
                try job.handle.readEvents(into: buffer)
            } catch {
                job.fail(SnapshotError.system("read userfaultfd", error.errno?.rawValue ?? EIO))
                return
            }
            for event in buffer.events {
                if case .pageFault(let fault) = event { _ = csnap_resolve(job.core, fault.address, 0) }
            }
        }
    }
}
