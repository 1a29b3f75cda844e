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
        guard let mappings = kernelPageSizes(pid: pid) else { return }
        for r in regions {
            for m in mappings where m.range.overlaps(r.range) && m.pageSize != r.pageSize {
                throw .invalidRegion("region \(r.range) is declared with \(r.pageSize)-byte pages, "
                    + "but the process maps \(m.range) there with \(m.pageSize)-byte pages")
            }
        }
    }

    /// Every mapping of process `pid` with its kernel page size, or nil if its smaps
    /// cannot be read.
    static func kernelPageSizes(pid: Int32) -> [(range: MemoryRange, pageSize: UInt64)]? {
        let fd = open("/proc/\(pid)/smaps", O_RDONLY | O_CLOEXEC)
        if fd < 0 { return nil }
        defer { close(fd) }
        var text: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = retryOnInterrupt { chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) } }
            if n < 0 { return nil }
            if n == 0 { break }
            text += chunk.prefix(n)
        }
        var result: [(range: MemoryRange, pageSize: UInt64)] = []
        var current: MemoryRange?
        for line in String(decoding: text, as: UTF8.self).split(separator: "\n") {
            if let dash = line.firstIndex(of: "-"), let space = line.firstIndex(of: " "), dash < space,
               let start = UInt64(line[..<dash], radix: 16),
               let end = UInt64(line[line.index(after: dash)..<space], radix: 16), end > start {
                current = MemoryRange(start: start, length: end - start)
            } else if line.hasPrefix("KernelPageSize:"), let range = current {
                let fields = line.split(separator: " ")
                if fields.count >= 3, let kib = UInt64(fields[1]), fields[2] == "kB" {
                    result.append((range, kib * 1024))
                }
                current = nil
            }
        }
        return result
    }
}
