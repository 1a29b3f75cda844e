/// What `uffd snapshot inspect` shows about one file.
public struct SnapshotSummary: Sendable, Codable, Hashable {
    public var path: String
    public var version: UInt32
    public var pageSize: Int
    public var regions: [SnapshotFormat.Region]
    public var id: String
    /// The parent's identifier, for a delta.
    public var parent: String?
    public var pages: Int
    public var holePages: Int
    public var zeroPages: Int
    public var dataPages: Int
    public var unchangedPages: Int
    public var records: Int
    public var fileBytes: UInt64
    /// Whether every record's checksum was checked and matched (nil: not checked).
    public var checksumsVerified: Bool?
    /// Why verification failed, if it did.
    public var verificationError: String?

    /// Summarises `file`, checking every record's checksum if `verify`.
    public init(_ file: SnapshotFile, verify: Bool) {
        let counts = file.kindCounts()
        path = file.path
        version = file.version
        pageSize = file.pageSize
        regions = file.regions
        id = hex(file.id)
        parent = file.parentID.map(hex)
        pages = file.pageCount
        holePages = counts[.hole] ?? 0
        zeroPages = counts[.zero] ?? 0
        dataPages = counts[.data] ?? 0
        unchangedPages = counts[.unchanged] ?? 0
        records = file.chunks.count
        fileBytes = file.fileSize
        if verify {
            do {
                try file.verifyAll()
                checksumsVerified = true
            } catch {
                checksumsVerified = false
                verificationError = error.description
            }
        }
    }
}
