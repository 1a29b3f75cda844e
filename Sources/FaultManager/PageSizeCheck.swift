import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

extension ClientRegion {
    /// Checks each region's declared page size against the memory the client really
    /// has there, as `/proc/<pid>/smaps` reports it (`KernelPageSize` of every mapping
    /// the region overlaps).
    ///
    /// A wrong page size cannot be served: hugetlb memory declared as 4 KiB pages makes
    /// every 4 KiB `UFFDIO_COPY` fail with `EINVAL`, and the faulting thread would fault
    /// again forever. When the client's smaps cannot be read (another pid namespace, no
    /// permission, the process is gone), nothing is checked.
    ///
    /// - Throws: ``HandshakeError/invalidRegion(_:)`` naming the region, the page size
    ///   declared and the one found.
    public static func checkPageSizes(_ regions: [ClientRegion], pid: Int32) throws(HandshakeError) {
        guard let mappings = ProcessMapping.all(pid: "\(pid)") else { return }
        for r in regions {
            for m in mappings where m.range.overlaps(r.range) && UInt64(m.pageSize) != r.pageSize {
                throw .invalidRegion("region \(r.range) is declared with \(r.pageSize)-byte pages, "
                    + "but the process maps \(m.range) there with \(m.pageSize)-byte pages")
            }
        }
    }
}
