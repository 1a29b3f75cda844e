import Userfaultfd
import _CFaultEngine

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

extension HandlerLoop {
    /// The prefetch thread: installs the replayed working set first, in recorded
    /// order, then (with background populate) every remaining page of every region.
    ///
    /// Faults come first: while a handler thread is busy with a batch, this thread
    /// yields. It never reads the uffd; on `EAGAIN` it waits for the handlers to read
    /// the pending events.
    func prefetch(replay: [UInt64], populate: Bool) {
        defer { if gone { reportProcessGone() } }
        let maxChunk = UInt64(server.configuration.maxChunkPages)
        var k = 0
        while k < replay.count && !shouldStop {
            let offset = replay[k] & ~(ps &- 1)
            var run: UInt64 = 1
            while k + Int(run) < replay.count && run < maxChunk && replay[k + Int(run)] & ~(ps &- 1) == offset &+ run &* ps {
                run &+= 1
            }
            k += Int(run)
            yieldToHandlers()
            guard let (entry, address) = table.lookup(sourceOffset: offset) else { continue }
            let page = (address &- entry.range.start) / ps
            let end = min(page &+ run, entry.range.length / ps)
            installInBackground(at: address, from: page, to: end)
        }
        guard populate else { return }
        // From the last page down: faults most often come in address order, so this
        // thread and a sequential reader work on different ends and meet once, instead
        // of racing for the same chunks on the same page-table locks.
        for region in table.snapshot.reversed() {
            var end = region.range.length / ps
            while end > 0 && !shouldStop {
                let page = end > maxChunk ? end &- maxChunk : 0
                yieldToHandlers()
                installInBackground(at: region.range.start &+ page &* ps, from: page, to: end)
                end = page
            }
        }
    }

    private var shouldStop: Bool {
        gone || server.stopRequested.load(ordering: .relaxed) || server.processGone.load(ordering: .relaxed)
    }

    private func yieldToHandlers() {
        while server.busyHandlers.load(ordering: .relaxed) > 0 && !shouldStop { sched_yield() }
    }

    /// Installs pages `from ..< to` of the region at `address`, retrying while the
    /// layout changes; pages of a region gone meanwhile are skipped.
    private func installInBackground(at address: UInt64, from: UInt64, to: UInt64) {
        var attempts = 0
        while !shouldStop {
            // Look the region up again each time: events may have moved or cut it.
            guard let entry = table.lookup(address) else { return }
            let base = (address &- entry.range.start) / ps
            let end = min(base &+ (to &- from), entry.range.length / ps)
            switch installChunk(entry, from: base, to: end, faultPage: .max, minorFault: false) {
            case .done: return
            case .gone:
                gone = true
                return
            case .retry:
                attempts += 1
                if attempts > 10_000 { return }
                usleep(20)
            }
        }
    }
}
