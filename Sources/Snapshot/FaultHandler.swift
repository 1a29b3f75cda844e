import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The capture's fault handler: a writer that touches a protected page is held in
/// the kernel until this thread has copied the page's chunk (its bytes at the
/// snapshot instant) into the staging ring and cleared the protection.
///
/// It never writes registered memory (it only reads pages still protected) and its
/// only lock is the capture's monitor, which the caller's threads never take.
final class FaultHandler: @unchecked Sendable {
    let job: CaptureJob
    private let claimed: UnsafeMutablePointer<Int>

    init(job: CaptureJob) {
        self.job = job
        claimed = .allocate(capacity: job.faultChunkPages)
    }

    deinit { claimed.deallocate() }

    /// Serves faults until the job's stop signal is raised.
    func run() {
        if job.handlerPriority > 0 { DedicatedThread.makeCurrentThreadRealTime(priority: job.handlerPriority) }
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
                if case .pageFault(let fault) = event { handle(fault.address) }
            }
        }
    }

    private func handle(_ address: UInt64) {
        guard let (region, page) = job.locate(address) else { return }
        let r = job.layout[region]
        let inRegion = page - r.firstPage
        let first = r.firstPage + inRegion / job.faultChunkPages * job.faultChunkPages
        let end = min(first + job.faultChunkPages, r.firstPage + r.pages)
        var n = 0
        var slot = 0
        var faultingState = PageState.pending
        var cancelled = false
        job.monitor.withLock {
            job.faults += 1
            faultingState = job.state[page]
            for p in first..<end where job.state[p] == PageState.pending {
                job.state[p] = PageState.saving
                claimed[n] = p
                n += 1
            }
            if n == 0 { return }
            job.inFlight += n
            if job.reserved + n - job.consumed > job.capacity { job.stagingWaits += 1 }
            while !job.cancelled && job.reserved + n - job.consumed > job.capacity { job.monitor.wait(milliseconds: 50) }
            cancelled = job.cancelled
            if cancelled { return }
            slot = job.reserved
            job.reserved += n
        }
        // A late message for a page already in the image: let its writer go first.
        let settled = faultingState == PageState.saved || faultingState == PageState.done
        if settled && !job.tracking {
            do { try job.unprotect(region: region, first: page, pages: 1) } catch { job.fail(error) }
        }
        if n > 0 && !cancelled {
            // The faulting page is copied and released first: its writer waits for one
            // page's copy, not the chunk's, and the rest follows.
            var held = -1
            for i in 0..<n where claimed[i] == page { held = i }
            if held >= 0 {
                copy(held, to: slot, region: region)
                do { try job.unprotect(region: region, first: page, pages: 1) } catch { job.fail(error) }
            }
            for i in 0..<n where i != held { copy(i, to: slot, region: region) }
            publish(count: n, from: slot)
            // Clear protection on the rest, in runs; a page the writer is streaming is
            // cleared (and its writers woken) by the writer.
            var i = 0
            while i < n {
                if i == held { i += 1; continue }
                var run = 1
                while i + run < n && i + run != held && claimed[i + run] == claimed[i] + run { run += 1 }
                do { try job.unprotect(region: region, first: claimed[i], pages: run) } catch { job.fail(error) }
                i += run
            }
        }
        if settled && job.tracking { releaseWritten(region: region, first: first, end: end) }
    }

    /// When tracking: a write to a page already in the image. Notes the chunk's settled
    /// pages as written since the instant and clears their protection.
    private func releaseWritten(region: Int, first: Int, end: Int) {
        var runs: [(Int, Int)] = []
        job.monitor.withLock {
            var p = first
            while p < end {
                let s = job.state[p]
                guard s == PageState.saved || s == PageState.done else { p += 1; continue }
                var q = p
                while q < end && (job.state[q] == PageState.saved || job.state[q] == PageState.done) {
                    job.nextDirty[q] = 1
                    q += 1
                }
                runs.append((p, q - p))
                p = q
            }
        }
        for (p, n) in runs {
            do { try job.unprotect(region: region, first: p, pages: n) } catch { job.fail(error) }
        }
    }

    /// Copies claimed page `i` into ring slot `slot + i`.
    @inline(__always)
    private func copy(_ i: Int, to slot: Int, region: Int) {
        let s = (slot + i) % job.capacity
        let source = UnsafeRawPointer(bitPattern: UInt(job.address(of: claimed[i], in: region)))!
        memcpy(job.slots + s * job.pageSize, source, job.pageSize)
        job.slotPages[s] = claimed[i]
    }

    /// Publishes the `count` claimed pages copied into ring slots `slot ..< slot + count`.
    private func publish(count: Int, from slot: Int) {
        job.monitor.withLock {
            for i in 0..<count {
                job.state[claimed[i]] = PageState.saved
                if job.tracking { job.nextDirty[claimed[i]] = 1 }
            }
            job.published = slot + count
            job.inFlight -= count
            job.savedPages += count
            job.peakStaged = max(job.peakStaged, job.published - job.consumed)
            job.monitor.broadcast()
        }
    }
}
