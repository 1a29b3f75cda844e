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
///
/// The value follows its memory: after ``unmap(_:)`` of a head or tail,
/// ``split(at:)`` or ``remap(length:to:)``, ``base`` and ``length`` describe what is
/// mapped now, and going away unmaps exactly that.
public struct MemoryMapping: ~Copyable {
    /// The kind of memory.
    public enum Kind: String, Sendable, CaseIterable {
        /// Private anonymous memory.
        case anonymous
        /// A shared mapping of a memfd (shmem).
        case shmem
        /// A shared mapping of a memfd with huge pages (hugetlbfs).
        case hugetlb
    }

    /// The first byte.
    public private(set) var base: UnsafeMutableRawPointer
    /// The length in bytes.
    public private(set) var length: Int
    /// The kind of memory.
    public let kind: Kind
    /// The memfd backing a shmem or hugetlb mapping (owned).
    public let memfd: FileDescriptor?
    /// Where in the memfd the mapping starts (0 for anonymous memory).
    public private(set) var fileOffset: Int

    /// The mapped addresses.
    public var range: MemoryRange { MemoryRange(base, length: length) }
    /// The mapped bytes.
    public var bytes: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: base, count: length) }
    /// The page size of this memory: 2 MiB for hugetlb, the base page otherwise.
    public var pageSize: Int { kind == .hugetlb ? HugePages.size : systemPageSize }

    private init(base: UnsafeMutableRawPointer, length: Int, kind: Kind, memfd: FileDescriptor?, fileOffset: Int = 0) {
        self.base = base
        self.length = length
        self.kind = kind
        self.memfd = memfd
        self.fileOffset = fileOffset
    }

    /// Maps `length` bytes of `kind` memory, read-write, not populated.
    ///
    /// - Parameters:
    ///   - kind: Anonymous, shmem or hugetlb memory.
    ///   - length: A positive multiple of the kind's page size.
    ///   - name: The memfd's name, as `/proc/PID/maps` shows it (shmem and hugetlb).
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
    ///
    /// - Parameter length: A positive multiple of the page size.
    /// - Returns: The mapping, not populated.
    /// - Throws: `UserfaultfdError` for `mmap`.
    ///
    /// The corresponding C call is `mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)`.
    public static func anonymous(length: Int) throws(UserfaultfdError) -> MemoryMapping {
        try checkLength(length, pageSize: systemPageSize)
        let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let p, p != MAP_FAILED else { throw UserfaultfdError(operation: "mmap anonymous \(length) bytes", errno: currentErrno()) }
        return MemoryMapping(base: p, length: length, kind: .anonymous, memfd: nil)
    }

    /// Maps a new memfd of `length` bytes, shared (shmem, or hugetlbfs if `hugetlb`).
    ///
    /// - Parameters:
    ///   - length: A positive multiple of the page size (2 MiB for hugetlb).
    ///   - hugetlb: Back the memfd with huge pages.
    ///   - name: The memfd's name.
    /// - Returns: The mapping, not populated.
    /// - Throws: `UserfaultfdError` for `memfd_create`, `ftruncate` or `mmap`, with a
    ///   hint on reserving huge pages for hugetlb.
    ///
    /// The corresponding C calls are `memfd_create`, `ftruncate` and `mmap(…, MAP_SHARED, memfd, 0)`.
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
            return try map(fd: FileDescriptor(rawValue: fd), length: length, kind: kind, offset: 0)
        } catch {
            _ = Glibc.close(fd)
            throw error
        }
    }

    private static func map(fd: FileDescriptor, length: Int, kind: Kind, offset: Int) throws(UserfaultfdError) -> MemoryMapping {
        let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd.rawValue, off_t(offset))
        guard let p, p != MAP_FAILED else {
            throw UserfaultfdError(operation: "mmap memfd (\(kind)) \(length) bytes", errno: currentErrno(),
                                   hint: kind == .hugetlb ? HugePages.advice(needed: length / HugePages.size) : nil)
        }
        return MemoryMapping(base: p, length: length, kind: kind, memfd: fd, fileOffset: offset)
    }

    private static func checkLength(_ length: Int, pageSize: Int) throws(UserfaultfdError) {
        if length <= 0 || length % pageSize != 0 {
            throw UserfaultfdError(operation: "mmap", kind: .invalidArgument("length \(length) is not a positive multiple of the page size \(pageSize)"))
        }
    }

    /// Maps the same memfd a second time: both mappings see the same pages.
    ///
    /// - Returns: A mapping of the same file range, owning a duplicate of the memfd.
    /// - Throws: ``UserfaultfdError/Kind/invalidArgument(_:)`` for anonymous memory, which
    ///   has no alias, else `UserfaultfdError` for `dup` or `mmap`.
    public func alias() throws(UserfaultfdError) -> MemoryMapping {
        guard let copy = try duplicateMemfd(for: "alias mapping") else {
            throw UserfaultfdError(operation: "alias mapping", kind: .invalidArgument("anonymous memory has no second mapping"))
        }
        do throws(UserfaultfdError) {
            return try MemoryMapping.map(fd: copy, length: length, kind: kind, offset: fileOffset)
        } catch {
            try? copy.close()
            throw error
        }
    }

    /// A duplicate of the memfd for a second owner; nil for anonymous memory.
    private func duplicateMemfd(for operation: String) throws(UserfaultfdError) -> FileDescriptor? {
        guard let memfd else { return nil }
        do {
            return try memfd.duplicate()
        } catch {
            throw UserfaultfdError(operation: "\(operation): dup memfd", errno: error as? Errno ?? .ioError)
        }
    }

    /// The address of byte `offset`.
    ///
    /// - Parameter offset: A byte offset from ``base``.
    /// - Returns: ``base`` plus `offset`, as an address.
    @inline(__always)
    public func address(at offset: Int) -> UInt64 { UInt64(UInt(bitPattern: base)) + UInt64(offset) }

    deinit {
        munmap(base, length)
        if let memfd { try? memfd.close() }
    }
}

// MARK: - Changing the mapping

extension MemoryMapping {
    /// Unmaps a head or a tail of this mapping; the value then owns the rest.
    ///
    /// Registered ranges in it are unregistered by the kernel (an UNMAP event with
    /// EVENT_UNMAP). A range in the middle would leave two mappings: take the tail off
    /// with ``split(at:)`` first.
    ///
    /// - Parameter range: Page-aligned addresses that start at ``base`` or end at the
    ///   mapping's end, shorter than the whole mapping (drop the value to unmap it all).
    /// - Throws: ``UserfaultfdError/Kind/invalidArgument(_:)`` for any other range,
    ///   else `UserfaultfdError` for `munmap`.
    ///
    /// The corresponding C function is `munmap`.
    public mutating func unmap(_ range: MemoryRange) throws(UserfaultfdError) {
        let whole = self.range
        let isHead = range.start == whole.start, isTail = range.end == whole.end
        guard whole.contains(range), range.length > 0, range.length < whole.length, isHead || isTail,
              range.isAligned(to: UInt64(pageSize)) else {
            throw UserfaultfdError(operation: "munmap", kind: .invalidArgument(
                "\(range) is not a page-aligned head or tail of the mapping \(whole), shorter than it"))
        }
        if munmap(range.pointer, Int(range.length)) != 0 {
            throw UserfaultfdError(operation: "munmap \(range)", errno: currentErrno())
        }
        length -= Int(range.length)
        if isHead {
            base += Int(range.length)
            fileOffset += Int(range.length)
        }
    }

    /// Splits off the pages from `offset` on into a mapping of their own; this value
    /// keeps the pages before.
    ///
    /// Nothing is unmapped or moved: each value now unmaps only its own part when it
    /// goes away (for shmem and hugetlb, each owns a duplicate of the memfd).
    ///
    /// - Parameter offset: A page-aligned offset strictly inside the mapping.
    /// - Returns: The tail, from `base + offset` to the old end.
    /// - Throws: ``UserfaultfdError/Kind/invalidArgument(_:)`` for an offset that is not
    ///   inside or not aligned, else `UserfaultfdError` for `dup`.
    public mutating func split(at offset: Int) throws(UserfaultfdError) -> MemoryMapping {
        guard offset > 0, offset < length, offset % pageSize == 0 else {
            throw UserfaultfdError(operation: "split mapping", kind: .invalidArgument(
                "offset \(offset) is not a page-aligned offset inside the \(length) bytes of the mapping"))
        }
        let tailFD = try duplicateMemfd(for: "split mapping")
        let tail = MemoryMapping(base: base + offset, length: length - offset, kind: kind, memfd: tailFD,
                                 fileOffset: memfd == nil ? 0 : fileOffset + offset)
        length = offset
        return tail
    }

    /// Resizes and/or moves the mapping with `mremap`; the value then owns the new range.
    ///
    /// Registered ranges move with it (a REMAP event with EVENT_REMAP). Growing a
    /// shmem or hugetlb mapping grows its memfd first if the file is too short.
    ///
    /// - Parameters:
    ///   - newLength: The new length, a positive multiple of the page size (nil: unchanged).
    ///   - newAddress: A page-aligned address to move to. Whatever is mapped there is
    ///     replaced (`MREMAP_FIXED`): name only addresses this process reserved for it.
    ///     Nil lets the kernel move the mapping if it cannot resize it in place.
    /// - Throws: ``UserfaultfdError/Kind/invalidArgument(_:)`` for a bad length or
    ///   address, else `UserfaultfdError` for `ftruncate` or `mremap`.
    ///
    /// The corresponding C call is `mremap(base, length, newLength, MREMAP_MAYMOVE [| MREMAP_FIXED], newAddress)`.
    public mutating func remap(length newLength: Int? = nil, to newAddress: UInt64? = nil) throws(UserfaultfdError) {
        let target = newLength ?? length
        if target <= 0 || target % pageSize != 0 || (newAddress ?? 0) % UInt64(pageSize) != 0 || newAddress == 0 {
            throw UserfaultfdError(operation: "mremap", kind: .invalidArgument(
                "length \(target) or address \(newAddress.map { "0x" + String($0, radix: 16) } ?? "(any)") is not page-aligned and non-zero"))
        }
        if let memfd, target > length { try grow(memfd, to: fileOffset + target) }
        var flags = cuffd_MREMAP_MAYMOVE
        if newAddress != nil { flags |= cuffd_MREMAP_FIXED }
        let moved = cuffd_mremap(base, length, target, flags, newAddress.flatMap { UnsafeMutableRawPointer(bitPattern: UInt($0)) })
        guard let moved, moved != MAP_FAILED else {
            throw UserfaultfdError(operation: "mremap \(range) to \(target) bytes", errno: currentErrno())
        }
        base = moved
        length = target
    }

    private func grow(_ memfd: FileDescriptor, to size: Int) throws(UserfaultfdError) {
        var st = stat()
        if fstat(memfd.rawValue, &st) != 0 { throw UserfaultfdError(operation: "fstat memfd", errno: currentErrno()) }
        if Int(st.st_size) >= size { return }
        if ftruncate(memfd.rawValue, off_t(size)) != 0 {
            throw UserfaultfdError(operation: "ftruncate memfd (\(kind)) to \(size) bytes", errno: currentErrno(),
                                   hint: kind == .hugetlb ? HugePages.advice(needed: size / HugePages.size) : nil)
        }
    }
}
