/// The 2 MiB huge pages that hugetlb mappings need: their size and how many a new
/// mapping can get.
///
/// Reserving huge pages is administration; it lives in `UserfaultfdDiagnostics`
/// (`HugePages.ensureFree(_:)`, `HugePages.setTotal(_:)`).
public enum HugePages {
    /// The huge page size used here: 2 MiB.
    public static let size = 2 << 20
    package static let sysfs = "/sys/kernel/mm/hugepages/hugepages-2048kB/"

    /// Huge pages reserved and not in use.
    public static var free: Int { readCount("free_hugepages") }
    /// Free huge pages that no mapping has claimed yet: what a new mapping can get.
    ///
    /// `free` still counts pages that existing hugetlb mappings have reserved but not
    /// touched; a new mapping cannot have those.
    public static var available: Int { max(0, free - readCount("resv_hugepages")) }
    /// Huge pages reserved in all.
    public static var total: Int { readCount("nr_hugepages") }

    private static func readCount(_ name: String) -> Int {
        readSmallFile(sysfs + name).flatMap { Int($0.trimmingCharacters(in: " \n")) } ?? 0
    }

    /// What to do when a hugetlb mapping of `needed` pages fails, for an error's hint.
    static func advice(needed: Int) -> String {
        "hugetlb memory needs \(needed) free 2 MiB pages, \(available) are free and unclaimed; reserve them as root with "
            + "`echo N > /proc/sys/vm/nr_hugepages`"
    }
}
