import FaultEngine

/// How a ``Manager`` listens, whom it serves and how.
public struct ManagerConfiguration: Sendable {
    /// The unix socket clients connect to.
    public var socketPath: String
    /// The memory file Firecracker clients (and native clients asking for it) are served from.
    public var memoryFile: String?
    /// Uids allowed to hand over a uffd besides the daemon's own.
    public var allowedUIDs: Set<UInt32>
    /// How each client's faults are served.
    public var server: FaultServerConfiguration
    /// Write the order of first faults in the memory file here (from the first client served from it).
    ///
    /// That client is served page by page (no chunks, no read-ahead), so that every page
    /// it touches faults and is recorded.
    public var recordWorkingSet: String?
    /// Prefetch the working set recorded in this file first, as soon as a client of the memory file connects.
    public var replayWorkingSet: String?
    /// Seconds a connection may take to send its handshake.
    public var handshakeTimeout: Double
    /// The longest handshake message accepted, in bytes.
    public var maxHandshakeBytes: Int
    /// The most connections in handshake at once; more are refused at once.
    public var maxPendingHandshakes: Int
    /// The most connections in handshake at once from one uid; more are refused at once.
    public var maxPendingHandshakesPerUID: Int
    /// How often each client's watcher checks that its process still exists, in milliseconds.
    public var livenessPollMilliseconds: Int32
    /// Where every client's server hands the faults it resolves (`FaultServer.traceSink`), if anywhere.
    public var traceSink: FaultTraceSink? = nil

    public init(
        socketPath: String,
        memoryFile: String? = nil,
        allowedUIDs: Set<UInt32> = [],
        server: FaultServerConfiguration = .adaptive,
        recordWorkingSet: String? = nil,
        replayWorkingSet: String? = nil,
        handshakeTimeout: Double = 5,
        maxHandshakeBytes: Int = 1 << 20,
        maxPendingHandshakes: Int = 64,
        maxPendingHandshakesPerUID: Int = 16,
        livenessPollMilliseconds: Int32 = 200
    ) {
        self.socketPath = socketPath
        self.memoryFile = memoryFile
        self.allowedUIDs = allowedUIDs
        self.server = server
        self.recordWorkingSet = recordWorkingSet
        self.replayWorkingSet = replayWorkingSet
        self.handshakeTimeout = handshakeTimeout
        self.maxHandshakeBytes = maxHandshakeBytes
        self.maxPendingHandshakes = maxPendingHandshakes
        self.maxPendingHandshakesPerUID = maxPendingHandshakesPerUID
        self.livenessPollMilliseconds = livenessPollMilliseconds
    }
}
