/// One mapping of a process as `/proc/<pid>/smaps` lists it: its range, whether it is
/// shared, its file offset and path, and the kernel's page size there.
package struct ProcessMapping: Sendable {
    package var range: MemoryRange
    package var shared: Bool
    package var offset: UInt64
    /// The file, a `[name]` such as `[heap]`, or empty for anonymous memory.
    package var path: String
    /// `KernelPageSize`: the huge page size for hugetlb memory, else the base page.
    package var pageSize: Int

    /// Every mapping of process `pid` (`"self"` for this one), in address order, or nil
    /// if its smaps cannot be read (no such process, no permission).
    package static func all(pid: String = "self") -> [ProcessMapping]? {
        guard let text = readSmallFile("/proc/\(pid)/smaps") else { return nil }
        var result: [ProcessMapping] = []
        var current: ProcessMapping?
        for line in text.split(separator: "\n") {
            if line.hasPrefix("KernelPageSize:") {
                let fields = line.split(separator: " ")
                if var m = current, fields.count >= 3, let kib = Int(fields[1]), fields[2] == "kB" {
                    m.pageSize = kib * 1024
                    result.append(m)
                }
                current = nil
                continue
            }
            // A mapping's header: start-end perms offset dev inode [path]
            let fields = line.split(separator: " ", maxSplits: 5, omittingEmptySubsequences: true)
            guard fields.count >= 5, let dash = fields[0].firstIndex(of: "-"),
                  let start = UInt64(fields[0][..<dash], radix: 16),
                  let end = UInt64(fields[0][fields[0].index(after: dash)...], radix: 16), end > start
            else { continue }
            let perms = fields[1]
            current = ProcessMapping(
                range: MemoryRange(start: start, length: end - start),
                shared: perms.count == 4 && perms.last == "s",
                offset: UInt64(fields[2], radix: 16) ?? 0,
                path: fields.count > 5 ? fields[5].trimmingCharacters(in: " ") : "",
                pageSize: 0)
        }
        return result
    }
}
