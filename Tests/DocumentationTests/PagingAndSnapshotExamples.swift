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

/// `UntrustedText`.
func loggingAPeer(_ logger: Logger, _ peerBytes: [UInt8]) {
    logger.warning("bad protocol \"\(UntrustedText(peerBytes))\"")
}
