import FaultEngine

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

    public func fill(_ destination: UnsafeMutableRawBufferPointer, at sourceOffset: UInt64) throws(PageSourceError) {
        let pageSize = chain.pageSize
        guard sourceOffset % UInt64(pageSize) == 0, destination.count % pageSize == 0,
              sourceOffset <= chain.totalBytes, UInt64(destination.count) <= chain.totalBytes - sourceOffset,
              let base = destination.baseAddress else {
            throw PageSourceError(.outOfBounds, sourceOffset: sourceOffset, length: destination.count)
        }
        let first = Int(sourceOffset / UInt64(pageSize))
        for i in 0..<(destination.count / pageSize) {
            do {
                try chain.readPage(first + i, into: base + i * pageSize)
            } catch {
                throw PageSourceError(.failed(error.description), sourceOffset: sourceOffset, length: destination.count)
            }
        }
    }
}
