import FaultEngine
import Userfaultfd

/// A page source reading a snapshot chain, so a `FaultServer` restores
/// the memory lazily: each faulting page is read from the newest file holding it.
///
/// Source offset 0 is the first byte of the first region; the regions follow one
/// another (the same layout as ``SnapshotChain/flatten(to:)``'s image). A record
/// whose checksum fails makes `fill` throw, so the server poisons the page instead of
/// installing damaged bytes.
public struct SnapshotSource: PageSource {
    /// The chain read.
    public let chain: SnapshotChain

    public init(_ chain: SnapshotChain) { self.chain = chain }

    public var length: UInt64? { chain.totalBytes }

    /// Fills whole pages of the chain, or (for a server of smaller pages than the
    /// chain's, such as 4 KiB pages from a hugetlb snapshot) base-page-aligned parts of them.
    public func fill(_ destination: UnsafeMutableRawBufferPointer, at sourceOffset: UInt64) throws(PageSourceError) {
        let pageSize = chain.pageSize
        guard sourceOffset % UInt64(systemPageSize) == 0, destination.count % systemPageSize == 0,
              sourceOffset <= chain.totalBytes, UInt64(destination.count) <= chain.totalBytes - sourceOffset,
              let base = destination.baseAddress else {
            throw PageSourceError(.outOfBounds, sourceOffset: sourceOffset, length: destination.count)
        }
        var done = 0
        while done < destination.count {
            let at = sourceOffset + UInt64(done)
            let page = Int(at / UInt64(pageSize)), within = Int(at % UInt64(pageSize))
            let n = min(pageSize - within, destination.count - done)
            do {
                if within == 0 && n == pageSize {
                    try chain.readPage(page, into: base + done)
                } else {
                    try chain.readPage(page, offset: within, count: n, into: base + done)
                }
            } catch {
                throw PageSourceError(.failed(error.description), sourceOffset: sourceOffset, length: destination.count)
            }
            done += n
        }
    }
}
