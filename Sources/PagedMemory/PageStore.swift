import SystemPackage

/// Where the pages of a ``PagedMapping`` live: read when a page faults in, written
/// when a dirty page is evicted or flushed.
///
/// Offsets and lengths the pager passes are multiples of the mapping's page size
/// (itself a multiple of 4 KiB), and buffers are page-aligned, so a store may use
/// `O_DIRECT`. Calls come from several threads at once; a store must allow that.
public protocol PageStore: AnyObject, Sendable {
    /// The size of the data in bytes. The mapping covers it, rounded up to whole pages.
    var size: Int { get }

    /// Fills `buffer` with the bytes at `offset`; bytes past ``size`` read as zero.
    ///
    /// - Throws: the `Errno` of the failed read. The pager gives the faulting thread
    ///   SIGBUS and records the error on the mapping.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws(Errno)

    /// Writes `buffer` at `offset`; bytes past ``size`` are dropped.
    func write(_ buffer: UnsafeRawBufferPointer, at offset: Int) throws(Errno)

    /// Makes every completed write durable (`fsync`).
    func synchronize() throws(Errno)

    /// A descriptor that `pread` at the page's offset fills a page from (bytes past
    /// ``size`` reading as zero, short reads at the end), so that a fault can be
    /// resolved inside the faulting thread's signal handler; nil (the default) if reads
    /// need more than that. Such stores keep the descriptor open while they live.
    var signalReadableDescriptor: Int32? { get }
}

extension PageStore {
    public var signalReadableDescriptor: Int32? { nil }
}
