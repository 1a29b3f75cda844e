import FaultEngine
import Synchronization
import SystemPackage
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// What the daemon knows about one client: who it is, what it handed over, and how
/// its serving went. Kept after the client ends, with its final statistics.
public struct ClientReport: Sendable, Codable, Hashable {
    /// The client's number in log lines.
    public var id: Int
    /// The client this one was forked from, for the uffd of a forked child.
    public var parent: Int?
    /// The peer's pid from `SO_PEERCRED` (the parent's, for a forked child).
    public var pid: Int32
    /// The peer's uid from `SO_PEERCRED`.
    public var uid: UInt32
    /// `firecracker`, `native` or `fork`.
    public var handshake: String
    /// The name the client gave, if any.
    public var name: String?
    /// The regions handed over.
    public var regions: [ClientRegion]
    /// Whether the daemon still serves it.
    public var serving: Bool
    /// Why serving ended (nil while serving).
    public var endReason: String?
    /// Fault counts by kind, latency, pages installed (final once the client ended).
    public var statistics: FaultStatistics
    /// Bytes installed into the client's memory (pages installed times their size).
    public var bytesServed: UInt64
}

/// One client being served: its fault server, and a watcher thread that notices when
/// the process is gone, stops the server and keeps the final statistics.
final class ClientSession: Sendable {
    let id: Int
    let parent: Int?
    let pid: Int32
    let uid: UInt32
    let handshake: String
    let name: String?
    let regions: [ClientRegion]
    let server: FaultServer<FileSource>
    /// A second descriptor of the uffd, only for the liveness probe (see ``isProcessAlive``).
    private let probeDescriptor: Mutex<Int32>
    private let probeRange: MemoryRange
    private let state = Mutex(State())
    private let stopSignal: StopSignal

    private struct State {
        var watcher: DedicatedThread?
        var endReason: String?
        var finalStatistics: FaultStatistics?
        var stopRequested = false
    }

    init(id: Int, parent: Int?, pid: Int32, uid: UInt32, handshake: String, name: String?,
         regions: [ClientRegion], server: FaultServer<FileSource>, probeDescriptor: Int32) throws(UserfaultfdError) {
        self.id = id
        self.parent = parent
        self.pid = pid
        self.uid = uid
        self.handshake = handshake
        self.name = name
        self.regions = regions
        self.server = server
        self.probeDescriptor = Mutex(probeDescriptor)
        self.probeRange = MemoryRange(start: regions[0].start, length: regions[0].pageSize)
        self.stopSignal = try StopSignal()
    }

    /// Starts the watcher; `onEnd` runs on it once serving ended, with the reason.
    ///
    /// - Throws: `UserfaultfdError` if the thread cannot be created (then nothing watches).
    func startWatching(pollMilliseconds: Int32, onEnd: @escaping @Sendable (ClientSession, String) -> Void) throws(UserfaultfdError) {
        let thread = try DedicatedThread.start(name: "uffd-client-\(id)") { [self] in
            let reason = self.watch(pollMilliseconds: pollMilliseconds)
            self.finish(reason: reason)
            onEnd(self, reason)
        }
        state.withLock { $0.watcher = thread }
    }

    /// Waits until the server stops on its own, the process is gone, or a stop is asked for.
    private func watch(pollMilliseconds: Int32) -> String {
        while true {
            var p = pollfd(fd: stopSignal.fileDescriptor.rawValue, events: Int16(POLLIN), revents: 0)
            _ = Glibc.poll(&p, 1, pollMilliseconds)
            if state.withLock({ $0.stopRequested }) { return "the daemon stopped serving it" }
            if !server.isRunning {
                return "the process exited" + (server.statistics.lastError.map { " (last error: \($0))" } ?? "")
            }
            if !isProcessAlive() { return "the process exited" }
        }
    }

    /// Stops the server, closes the probe descriptor and keeps the final statistics.
    private func finish(reason: String) {
        server.stop()
        let fd = probeDescriptor.withLock { fd -> Int32 in
            let old = fd
            fd = -1
            return old
        }
        if fd >= 0 { _ = Glibc.close(fd) }
        let final = server.statistics
        state.withLock {
            $0.endReason = reason
            $0.finalStatistics = final
        }
    }

    /// Whether the process whose memory this uffd serves still exists.
    ///
    /// The engine learns that a process is gone only from a failing ioctl or a hang-up,
    /// and neither comes if the process exits while no fault is pending. This asks the
    /// kernel with a request that changes nothing: clearing write protection on a page
    /// registered for MISSING faults only, which a live process refuses (`ENOENT`/`EINVAL`)
    /// and a process whose memory is gone answers with `ESRCH`.
    func isProcessAlive() -> Bool {
        let fd = probeDescriptor.withLock { $0 }
        if fd < 0 { return false }
        let handle = Userfaultfd.Handle(fileDescriptor: FileDescriptor(rawValue: fd), features: [])
        do {
            _ = try handle.writeProtect(probeRange, mode: .dontWake)
            return true
        } catch {
            return !(error.errno == .noSuchProcess || error.errno == .noSpace)
        }
    }

    /// Asks the watcher to stop serving and waits until it has.
    func stopAndJoin() {
        state.withLock { $0.stopRequested = true }
        stopSignal.raise()
        joinWatcher()
    }

    /// Waits for the watcher thread to end.
    func joinWatcher() {
        let watcher = state.withLock { $0.watcher }
        watcher?.join()
    }

    /// The report for logs and `--json`.
    var report: ClientReport {
        let (reason, final) = state.withLock { ($0.endReason, $0.finalStatistics) }
        let stats = final ?? server.statistics
        return ClientReport(
            id: id, parent: parent, pid: pid, uid: uid, handshake: handshake, name: name, regions: regions,
            serving: reason == nil, endReason: reason, statistics: stats,
            bytesServed: stats.pagesInstalled &* UInt64(server.pageSize))
    }
}
