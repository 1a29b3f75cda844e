import FaultEngine
import Logging
import PagedMemory
import Snapshot
import Userfaultfd

// The examples of the PagedMemory and Snapshot documentation and of `UntrustedText`,
// compiled in contexts that give them the names they use. They need files larger than
// memory, a heap to snapshot or a peer, so none of them runs here.

/// `Pager`.
func pagingAFile() throws {
    let pager = try Pager(PagerConfiguration(bufferBytes: 256 << 20))
    let mapping = try pager.map(FileStore(path: "data.bin"), pageSize: 64 << 10)
    mapping.base.storeBytes(of: 42, toByteOffset: 8 << 30, as: UInt64.self)
    try mapping.flush()
}

/// `Snapshotter`.
func snapshotting(_ heap: borrowing MemoryMapping) throws -> Capture.Result {
    let snapshotter = try Snapshotter(regions: [heap.range])
    let capture = try snapshotter.capture(to: "heap.snap")
    let result = try capture.wait()
    return result
}

/// The PagedMemory article: mapping, tuning, errors and statistics.
func mappingDataLargerThanMemory() throws {
    let pager = try Pager(PagerConfiguration(bufferBytes: 256 << 20))
    let store = try FileStore(path: "keys.bin", mode: .direct)
    let mapping = try pager.map(store, pageSize: 64 << 10, sharing: .shared)
    mapping.prefetch(offset: 0, count: 8 << 20)
    try mapping.flush()
    try mapping.unmap()

    var configuration = PagerConfiguration(bufferBytes: 1 << 30)
    configuration.fillers = 8
    configuration.policy = .fifo
    configuration.maxReadAheadPages = 0
    let tuned = try Pager(configuration)
    tuned.shutdown()

    let sparse = try SparseFileStore(directory: "/var/tmp/store", size: 1 << 40)
    let view = try pager.map(sparse)
    for error in view.errors { print(error) }
    print(pager.statistics.pagesEvicted, pager.residentSize)
}

/// The Snapshot article: a capture with a quiesce hook.
func takingALiveSnapshot(_ heap: borrowing MemoryMapping, pauseWriters: @escaping @Sendable () -> Void,
                         resumeWriters: @escaping @Sendable () -> Void) throws {
    let snapshotter = try Snapshotter(regions: [heap.range])
    let capture = try snapshotter.capture(to: "heap.snap", quiesce: Snapshotter.Quiesce(pause: pauseWriters, resume: resumeWriters))
    let result = try capture.wait()
    print(result.pauseNanoseconds, result.savedBeforeWritePages)
}

/// The Snapshot article: pages saved by the writing threads themselves.
func savingInTheWritingThread(_ heap: borrowing MemoryMapping) throws -> Snapshotter {
    var options = Snapshotter.Options()
    options.savingThread = .writingThread
    let heapSnapshotter = try Snapshotter(regions: [heap.range], options: options)
    return heapSnapshotter
}

/// The Snapshot article: a full snapshot, then a delta.
func takingADelta(_ heap: borrowing MemoryMapping, hook: Snapshotter.Quiesce) throws {
    var options = Snapshotter.Options()
    options.incremental = true
    let tracker = try Snapshotter(regions: [heap.range], options: options)
    try tracker.capture(to: "full.snap", quiesce: hook).wait()
    try tracker.capture(to: "delta.snap", quiesce: hook).wait()
}

/// The Snapshot article: reading a file, flattening a chain, restoring it lazily.
func readingAndRestoringSnapshots() throws -> FaultServer<SnapshotSource> {
    let file = try SnapshotFile(path: "delta.snap")
    try file.verifyAll()
    print(file.isDelta, file.kindCounts()[.data] ?? 0)

    let chain = try SnapshotChain(paths: ["full.snap", "delta.snap"])
    try chain.flatten(to: "memory.raw")
    let memory = try MemoryMapping.anonymous(length: Int(chain.totalBytes))
    let uffd = try Userfaultfd(features: [])
    try uffd.handle.register(memory.range, mode: .missing)
    let server = try FaultServer(userfaultfd: uffd, regions: [ServedRegion(range: memory.range)],
                                 source: SnapshotSource(chain))
    try server.start()
    return server
}

/// `UntrustedText`.
func loggingAPeer(_ logger: Logger, _ peerBytes: [UInt8]) {
    logger.warning("bad protocol \"\(UntrustedText(peerBytes))\"")
}
