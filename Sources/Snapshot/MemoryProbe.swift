import Userfaultfd

/// What memory a range of the calling process is, from `/proc/self/smaps`.
enum MemoryProbe {
    /// The kind and page size of every mapping in `range`, which must all be alike, and
    /// for shared hugetlb memory the file behind it.
    ///
    /// - Throws: ``SnapshotError/Kind/unsupported(_:)`` for hugetlb pages other than
    ///   2 MiB, shared hugetlb memory spanning more than one mapping, private file
    ///   mappings, a range not wholly mapped, or a range mixing kinds or page sizes.
    static func kind(of range: MemoryRange) throws(SnapshotError)
        -> (kind: SnapshotFormat.MemoryKind, pageSize: Int, sharedFile: SharedHugetlbFile?)
    {
        var kinds = Set<SnapshotFormat.MemoryKind>()
        var pageSizes = Set<Int>()
        var covered: UInt64 = 0
        var sharedFile: SharedHugetlbFile?
        var sharedMappings = 0
        guard let mappings = ProcessMapping.all() else { throw SnapshotError.system("read /proc/self/smaps") }
        for c in mappings {
            let lo = max(c.range.start, range.start), hi = min(c.range.end, range.end)
            guard lo < hi else { continue }
            covered += hi - lo
            pageSizes.insert(c.pageSize)
            if c.pageSize > systemPageSize {
                // A 1 GiB page would need a 1 GiB staging slot and stream chunk.
                guard c.pageSize == HugePages.size else {
                    throw SnapshotError(.unsupported("hugetlb memory with \(c.pageSize / 1024) KiB pages at \(range): "
                        + "only \(HugePages.size / 1024) KiB huge pages are snapshotted"))
                }
                // A shared hugetlb page may sit in the file's page cache without being
                // mapped here (neither the page table nor mincore tells it from a hole),
                // and reading it through the mapping would allocate a huge page for a
                // hole: the capture reads such pages through the file instead.
                if c.shared {
                    sharedMappings += 1
                    sharedFile = SharedHugetlbFile(path: "/proc/self/map_files/\(String(c.range.start, radix: 16))-\(String(c.range.end, radix: 16))",
                                                   offset: c.offset + (lo - c.range.start))
                }
                kinds.insert(.hugetlb)
                continue
            }
            if c.shared { kinds.insert(.shmem); continue }
            if c.path.isEmpty || c.path.hasPrefix("[") { kinds.insert(.anonymous); continue }
            throw SnapshotError(.unsupported("private file mapping \(c.path) at \(range)"))
        }
        guard covered == range.length else {
            throw SnapshotError(.invalidArgument("\(range) is not wholly mapped"))
        }
        guard kinds.count == 1, let kind = kinds.first else {
            throw SnapshotError(.invalidArgument("\(range) mixes anonymous, shared or hugetlb memory: give each part as its own region"))
        }
        guard pageSizes.count == 1, let pageSize = pageSizes.first else {
            throw SnapshotError(.invalidArgument("\(range) mixes page sizes \(pageSizes.sorted()): give each part as its own region"))
        }
        if sharedFile != nil && (sharedMappings != 1 || kinds.count != 1) {
            throw SnapshotError(.unsupported("shared hugetlb memory at \(range) spans \(sharedMappings) mappings: give each mapping as its own region"))
        }
        return (kind, pageSize, sharedFile)
    }
}

/// The file behind a shared hugetlb region: where the capture reads the pages that are
/// in the file but not mapped in this process.
struct SharedHugetlbFile: Sendable {
    /// `/proc/self/map_files/START-END` of the mapping.
    var path: String
    /// The file offset of the region's first byte.
    var offset: UInt64
}
