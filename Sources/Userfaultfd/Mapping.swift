import SystemPackage
import _CUserfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A memory mapping owned by this value: unmapped (and its memfd closed) when it goes away.
///
/// The three kinds of memory userfaultfd treats differently: anonymous, shmem (a
/// memfd) and hugetlbfs (a memfd with huge pages). A shmem or hugetlb mapping can be
/// mapped a second time (``alias()``): the alias sees the same page cache, which is
/// how MINOR faults are served and how tests look behind a registered range.
public struct MemoryMapping: ~Copyable {
    /// The kind of memory.
    public enum Kind: String, Sendable, CaseIterable {
        case anonymous, shmem, hugetlb
    }

    /// The first byte.
    public let base: UnsafeMutableRawPointer
    /// The length in bytes.
    public let length: Int
    /// The kind of memory.
    public let kind: Kind
    /// The memfd backing a shmem or hugetlb mapping (owned).
    public let memfd: FileDescriptor?

    /// The mapped addresses.
    public var range: MemoryRange { MemoryRange(base, length: length) }
    /// The mapped bytes.
    public var bytes: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: base, count: length) }
    /// The page size of this memory: 2 MiB for hugetlb, the base page otherwise.
    public var pageSize: Int { kind == .hugetlb ? HugePages.size : systemPageSize }

    private init(base: UnsafeMutableRawPointer, length: Int, kind: Kind, memfd: FileDescriptor?) {
        self.base = base
        self.length = length
        self.kind = kind
        self.memfd = memfd
    }

    /// Maps `length` bytes of `kind` memory, read-write, not populated.
    ///
    /// - Throws: `UserfaultfdError` for `mmap` or `memfd_create` (hugetlb fails with
    ///   `ENOMEM` when no huge page is reserved: see ``HugePages``).
    public init(kind: Kind, length: Int, name: String = "uffd") throws(UserfaultfdError) {
        switch kind {
        case .anonymous: self = try .anonymous(length: length)
        case .shmem: self = try .shared(length: length, hugetlb: false, name: name)
        case .hugetlb: self = try .shared(length: length, hugetlb: true, name: name)
        }
    }

    /// Maps `length` bytes of private anonymous memory.
    public static func anonymous(length: Int) throws(UserfaultfdError) -> MemoryMapping {
        try checkLength(length, pageSize: systemPageSize)
        let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let p, p != MAP_FAILED else { throw UserfaultfdError(operation: "mmap anonymous \(length) bytes", errno: currentErrno()) }
        return MemoryMapping(base: p, length: length, kind: .anonymous, memfd: nil)
    }

    /// Maps a new memfd of `length` bytes, shared (shmem, or hugetlbfs if `hugetlb`).
    public static func shared(length: Int, hugetlb: Bool, name: String = "uffd") throws(UserfaultfdError) -> MemoryMapping {
        let kind: Kind = hugetlb ? .hugetlb : .shmem
        try checkLength(length, pageSize: hugetlb ? HugePages.size : systemPageSize)
        let fd = cuffd_memfd_create(name, UInt32(MFD_CLOEXEC) | (hugetlb ? UInt32(MFD_HUGETLB) : 0))
        if fd < 0 { throw UserfaultfdError(operation: "memfd_create (\(kind))", errno: currentErrno()) }
        if ftruncate(fd, off_t(length)) != 0 {
            let e = currentErrno()
            _ = Glibc.close(fd)
            throw UserfaultfdError(operation: "ftruncate memfd (\(kind))", errno: e,
                                   hint: hugetlb ? HugePages.advice(needed: length / HugePages.size) : nil)
        }
        do throws(UserfaultfdError) {
            return try map(fd: FileDescriptor(rawValue: fd), length: length, kind: kind)
        } catch {
            _ = Glibc.close(fd)
            throw error
        }
    }

    private static func map(fd: FileDescriptor, length: Int, kind: Kind) throws(UserfaultfdError) -> MemoryMapping {
        let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd.rawValue, 0)
        guard let p, p != MAP_FAILED else {
            throw UserfaultfdError(operation: "mmap memfd (\(kind)) \(length) bytes", errno: currentErrno(),
                                   hint: kind == .hugetlb ? HugePages.advice(needed: length / HugePages.size) : nil)
        }
        return MemoryMapping(base: p, length: length, kind: kind, memfd: fd)
    }

    private static func checkLength(_ length: Int, pageSize: Int) throws(UserfaultfdError) {
        if length <= 0 || length % pageSize != 0 {
            throw UserfaultfdError(operation: "mmap", kind: .invalidArgument("length \(length) is not a positive multiple of the page size \(pageSize)"))
        }
    }

    /// Maps the same memfd a second time: both mappings see the same pages.
    ///
    /// - Throws: ``UserfaultfdError/Kind/invalidArgument(_:)`` for anonymous memory, which has no alias.
    public func alias() throws(UserfaultfdError) -> MemoryMapping {
        guard let memfd else {
            throw UserfaultfdError(operation: "alias mapping", kind: .invalidArgument("anonymous memory has no second mapping"))
        }
        let copy = dup(memfd.rawValue)
        if copy < 0 { throw UserfaultfdError(operation: "dup memfd", errno: currentErrno()) }
        do throws(UserfaultfdError) {
            return try MemoryMapping.map(fd: FileDescriptor(rawValue: copy), length: length, kind: kind)
        } catch {
            _ = Glibc.close(copy)
            throw error
        }
    }

    /// The address of byte `offset`.
    @inline(__always)
    public func address(at offset: Int) -> UInt64 { UInt64(UInt(bitPattern: base)) + UInt64(offset) }

    deinit {
        munmap(base, length)
        if let memfd { try? memfd.close() }
    }
}

/// The 2 MiB huge pages that hugetlb mappings need.
public enum HugePages {
    /// The huge page size used here.
    public static let size = 2 << 20
    private static let sysfs = "/sys/kernel/mm/hugepages/hugepages-2048kB/"

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

    /// Makes sure at least `count` huge pages are available to a new mapping (free and
    /// not reserved by another one), reserving more if needed (root only).
    ///
    /// - Returns: whether `count` pages are available afterwards.
    @discardableResult
    public static func ensureFree(_ count: Int) -> Bool {
        let have = available
        if have >= count { return true }
        setTotal(total + (count - have))
        return available >= count
    }

    /// Asks the kernel to keep `count` huge pages reserved (root only).
    ///
    /// - Returns: whether the kernel now holds exactly that many.
    @discardableResult
    public static func setTotal(_ count: Int) -> Bool {
        let fd = Glibc.open(sysfs + "nr_hugepages", O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        let text = Array("\(count)\n".utf8)
        _ = text.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        _ = Glibc.close(fd)
        return total == count
    }

    static func advice(needed: Int) -> String {
        "hugetlb memory needs \(needed) free 2 MiB pages, \(available) are free and unclaimed; reserve them as root with "
            + "`echo N > /proc/sys/vm/nr_hugepages`"
    }
}
