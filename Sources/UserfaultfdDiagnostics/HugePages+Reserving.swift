import SystemPackage
import Userfaultfd

extension HugePages {
    /// Makes sure at least `count` huge pages are available to a new mapping (free and
    /// not reserved by another one), reserving more if needed (root only).
    ///
    /// - Parameter count: How many 2 MiB pages a new mapping needs.
    /// - Returns: Whether `count` pages are available afterwards.
    @discardableResult
    public static func ensureFree(_ count: Int) -> Bool {
        let have = available
        if have >= count { return true }
        setTotal(total + (count - have))
        return available >= count
    }

    /// Asks the kernel to keep `count` huge pages reserved (root only).
    ///
    /// - Parameter count: The number of 2 MiB pages the kernel should hold in all.
    /// - Returns: Whether the kernel now holds exactly that many.
    ///
    /// The corresponding file is `/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages`.
    @discardableResult
    public static func setTotal(_ count: Int) -> Bool {
        guard let fd = try? FileDescriptor.open(FilePath(sysfs + "nr_hugepages"), .writeOnly, options: .closeOnExec) else {
            return false
        }
        _ = try? fd.closeAfter { try fd.writeAll(Array("\(count)\n".utf8)) }
        return total == count
    }
}
