import Userfaultfd

extension ClientRegion {
    /// The page sizes a region may have: 4 KiB and 2 MiB.
    public static let supportedPageSizes: [UInt64] = [4096, 2 << 20]

    /// Checks a handshake's regions against each other and the backing file.
    ///
    /// - Parameters:
    ///   - regions: the regions as the client described them.
    ///   - backingLength: the size of the backing file in bytes, if known.
    /// - Throws: ``HandshakeError/invalidRegion(_:)`` naming the first region that is
    ///   empty, misaligned, wraps around, overlaps another, has an unsupported page
    ///   size, or reaches beyond the backing file.
    public static func validate(_ regions: [ClientRegion], backingLength: UInt64?) throws(HandshakeError) {
        if regions.isEmpty { throw .invalidRegion("no region given") }
        for r in regions {
            if !supportedPageSizes.contains(r.pageSize) {
                throw .invalidRegion("region at 0x\(String(r.start, radix: 16)) has page size \(r.pageSize); only 4096 and 2097152 are supported")
            }
            if r.length == 0 { throw .invalidRegion("region at 0x\(String(r.start, radix: 16)) is empty") }
            if r.start &+ r.length < r.start {
                throw .invalidRegion("region at 0x\(String(r.start, radix: 16)) of \(r.length) bytes wraps around the address space")
            }
            if !r.range.isAligned(to: r.pageSize) {
                throw .invalidRegion("region \(r.range) is not aligned to its page size \(r.pageSize)")
            }
            if r.backingOffset % r.pageSize != 0 {
                throw .invalidRegion("region \(r.range) has backing offset \(r.backingOffset), not a multiple of its page size \(r.pageSize)")
            }
            if let backingLength, r.backingOffset > backingLength || r.length > backingLength - r.backingOffset {
                throw .invalidRegion("region \(r.range) at offset \(r.backingOffset) reaches beyond the memory file's \(backingLength) bytes")
            }
        }
        let sorted = regions.sorted { $0.start < $1.start }
        for (a, b) in zip(sorted, sorted.dropFirst()) where a.range.overlaps(b.range) {
            throw .invalidRegion("regions \(a.range) and \(b.range) overlap")
        }
    }
}
