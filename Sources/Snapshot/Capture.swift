import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A running capture: the image is fixed; its pages are being written.
public final class Capture: @unchecked Sendable {
    /// What a finished capture did.
    public struct Result: Sendable, Codable, Hashable {
        /// Pages across the regions.
        public var pages: Int
        /// Pages written from memory by the image writer.
        public var streamedPages: Int
        /// Pages saved before a write by the fault handler.
        public var savedBeforeWritePages: Int
        /// Pages of a delta copied to the staging area while the writers were held
        /// (a delta that fits the staging area is taken that way; 0 otherwise).
        public var heldCopyPages: Int
        /// Write-protect faults taken by the caller's threads.
        public var faults: Int
        /// Times a fault waited for room in the staging area.
        public var stagingWaits: Int
        /// The most pages staged at once.
        public var peakStagedPages: Int
        /// The staging area's size in bytes.
        public var stagingBytes: Int
        /// Memory the capture held besides the caller's: staging, page states, index.
        public var extraBytes: Int
        /// Bytes of the image file.
        public var imageBytes: UInt64
        /// Bytes of page data in the image.
        public var dataBytes: UInt64
        /// Nanoseconds from the start of the arm to the instant (all pages protected).
        public var armNanoseconds: UInt64
        /// Nanoseconds the caller's writers were held (quiesce hook included).
        public var pauseNanoseconds: UInt64
        /// Nanoseconds from the start of the arm to the image's last byte.
        public var totalNanoseconds: UInt64
        /// CPU nanoseconds the image writer thread used (the CPU cost of the image,
        /// which unlike the total does not depend on what else the machine runs).
        public var writerCPUNanoseconds: UInt64 = 0
        /// CPU nanoseconds the fault handler thread used (saving pages before writes).
        public var handlerCPUNanoseconds: UInt64 = 0
    }

    private let snapshotter: Snapshotter
    let job: CaptureJob
    private let fd: Int32
    private let handler: DedicatedThread?
    private let streamer: DedicatedThread
    private var joined = false
    /// Nanoseconds from the start of the arm to the instant.
    public let armNanoseconds: UInt64
    /// Nanoseconds the writers were held, quiesce hook included.
    public let pauseNanoseconds: UInt64
    let startNanoseconds: UInt64

    init(snapshotter: Snapshotter, job: CaptureJob, fd: Int32, quiesce: Quiesce?) throws(SnapshotError) {
        self.snapshotter = snapshotter
        self.job = job
        self.fd = fd
        let handlerBody = FaultHandler(job: job)
        let streamerBody = try ImageStreamer(job: job)
        // Saving in the writing threads, no fault reaches a handler thread.
        handler = job.savesInWritingThread ? nil : DedicatedThread(name: "snap-fault") { handlerBody.run() }
        snapshotter.attach(job)
        if handler != nil { while !handlerBody.running.load(ordering: .acquiring) { sched_yield() } }
        let pauseStart = MonotonicClock.nanoseconds()
        quiesce?.pause()
        let armStart = MonotonicClock.nanoseconds()
        var armError: SnapshotError?
        do { try snapshotter.arm(job) } catch { armError = error }
        let armEnd = MonotonicClock.nanoseconds()
        if let armError {
            job.unprotectAll()
            quiesce?.resume()
            job.stop.raise()
            handler?.join()
            snapshotter.captureEnded(finished: false)
            throw armError
        }
        quiesce?.resume()
        startNanoseconds = armStart
        armNanoseconds = armEnd - armStart
        pauseNanoseconds = MonotonicClock.nanoseconds() - pauseStart
        streamer = DedicatedThread(name: "snap-writer") { streamerBody.run() }
    }

    typealias Quiesce = Snapshotter.Quiesce

    deinit {
        cancel()
        _ = try? wait()
    }

    /// Pages settled so far (written or staged), for progress.
    public var settledPages: Int { job.monitor.withLock { job.streamedPages } + job.counter(\.saved_pages) }

    /// Stops the capture: every page is unprotected and no writer stays held. The file
    /// is left without a footer, so it is refused when read. Does nothing once finished.
    public func cancel() { job.cancel() }

    /// Waits for the capture to end.
    ///
    /// - Returns: what it did.
    /// - Throws: ``SnapshotError`` if it failed or was cancelled (nothing is protected then).
    @discardableResult
    public func wait() throws(SnapshotError) -> Result {
        if !joined {
            joined = true
            streamer.join()
            handler?.join()
            if fd >= 0 { close(fd) }
            snapshotter.captureEnded(finished: job.monitor.withLock { job.finished })
        }
        let failure = job.firstFailure
        let saved = job.counter(\.saved_pages)
        let outcome: Swift.Result<Result, SnapshotError> = job.monitor.withLock {
            if !job.finished { return .failure(failure ?? SnapshotError(.cancelled)) }
            return .success(Result(
                pages: job.pageCount, streamedPages: job.streamedPages, savedBeforeWritePages: saved,
                heldCopyPages: job.stayedOnTracking ? saved : 0,
                faults: job.counter(\.faults), stagingWaits: job.counter(\.staging_waits), peakStagedPages: job.counter(\.peak_staged),
                stagingBytes: job.capacity * job.pageSize, extraBytes: job.extraBytes,
                imageBytes: job.writer.position, dataBytes: job.writer.dataBytes,
                armNanoseconds: armNanoseconds, pauseNanoseconds: pauseNanoseconds,
                totalNanoseconds: job.endNanoseconds - startNanoseconds,
                writerCPUNanoseconds: job.writerCPUNanoseconds, handlerCPUNanoseconds: job.handlerCPUNanoseconds))
        }
        return try outcome.get()
    }
}
