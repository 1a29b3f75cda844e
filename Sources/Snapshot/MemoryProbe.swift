#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
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
        for c in try mappings() {
            let lo = max(c.start, range.start), hi = min(c.end, range.end)
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
                    sharedFile = SharedHugetlbFile(path: "/proc/self/map_files/\(String(c.start, radix: 16))-\(String(c.end, radix: 16))",
                                                   offset: c.offset + (lo - c.start))
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

    /// One mapping of `/proc/self/smaps`: its range, whether it is shared, its file
    /// offset and path, and its kernel page size.
    struct Mapping {
        var start: UInt64
        var end: UInt64
        var shared: Bool
        var offset: UInt64
        var path: String
        var pageSize: Int
    }

    /// Every mapping of the calling process, in address order.
    static func mappings() throws(SnapshotError) -> [Mapping] {
        guard let f = fopen("/proc/self/smaps", "r") else { throw SnapshotError.system("open /proc/self/smaps") }
        defer { fclose(f) }
        var out: [Mapping] = []
        var current: Mapping?
        var line = [CChar](repeating: 0, count: 4096)
        while fgets(&line, Int32(line.count), f) != nil {
            let text = line.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
            if text.hasPrefix("KernelPageSize:") {
                let kb = Int(text.dropFirst("KernelPageSize:".count).split(separator: " ").first ?? "") ?? 4
                if var c = current {
                    c.pageSize = kb * 1024
                    out.append(c)
                    current = nil
                }
                continue
            }
            let fields = text.split(separator: " ", maxSplits: 5, omittingEmptySubsequences: true)
            guard fields.count >= 5, let dash = fields[0].firstIndex(of: "-"),
                  let s = UInt64(fields[0][..<dash], radix: 16),
                  let e = UInt64(fields[0][fields[0].index(after: dash)...], radix: 16) else { continue }
            let perms = fields[1]
            let path = fields.count > 5 ? fields[5].trimmingCharacters() : ""
            current = Mapping(start: s, end: e, shared: perms.count == 4 && perms.last == "s",
                              offset: UInt64(fields[2], radix: 16) ?? 0, path: path, pageSize: systemPageSize)
        }
        if let c = current { out.append(c) }
        return out
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

extension Substring {
    func trimmingCharacters() -> String {
        String(self.drop(while: { $0 == " " }).reversed().drop(while: { $0 == " " || $0 == "\n" }).reversed())
    }
}
