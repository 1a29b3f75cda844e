import FaultManager
import SystemPackage
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The guest's page size: the base page, or 2 MiB with `--memory hugetlb`. Set once,
/// before the guest is made and any thread started.
nonisolated(unsafe) var page = systemPageSize

/// The `mmap` flags of guest memory: private anonymous, with 2 MiB huge pages
/// (`MAP_HUGETLB`, reserved at `mmap`) when `hugetlb`, the way Firecracker maps it.
func guestMappingFlags(hugetlb: Bool) -> Int32 {
    hugetlb ? MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB : MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE
}

/// `mremap` with a fixed destination. Glibc declares it variadic, which Swift cannot
/// call, but implements it as a plain five-argument system call stub.
private let mremapFixed: @convention(c) (UnsafeMutableRawPointer?, Int, Int, Int32, UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? = {
    guard let symbol = dlsym(nil, "mremap") else { fail(2, "mremap not found") }
    return unsafeBitCast(symbol, to: (@convention(c) (UnsafeMutableRawPointer?, Int, Int, Int32, UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer?).self)
}()

/// One region of guest memory: where it is now and which image bytes it holds.
struct GuestRegion: @unchecked Sendable {
    var base: UnsafeMutableRawPointer
    var length: Int
    var imageOffset: Int

    var address: UInt64 { UInt64(UInt(bitPattern: base)) }
}

/// Guest-like memory: two anonymous mappings (of base or 2 MiB huge pages), registered
/// on one uffd, holding the image's two halves swapped (so backing offsets are exercised).
final class Guest: @unchecked Sendable {
    let image: Int32
    let imageLength: Int
    var regions: [GuestRegion]
    /// Whether the memory is hugetlb (2 MiB pages).
    let hugetlb: Bool
    /// A page of scratch space for the expected bytes, allocated once (usable after fork).
    let scratch = UnsafeMutableRawPointer.allocate(byteCount: page, alignment: page)

    /// - Parameter fileBacked: map the image itself `MAP_PRIVATE` (the kernel's own
    ///   restore path) instead of anonymous memory for a uffd.
    init(imagePath: String, length: Int?, hugetlb: Bool, fileBacked: Bool = false) {
        self.hugetlb = hugetlb
        image = open(imagePath, O_RDONLY | O_CLOEXEC)
        if image < 0 { fail(2, "cannot open \(imagePath): errno \(errno)") }
        var st = stat()
        fstat(image, &st)
        imageLength = Int(st.st_size)
        let usable = min(length ?? imageLength, imageLength) / (2 * page) * (2 * page)
        if usable == 0 { fail(2, "the image is smaller than two pages") }
        let half = usable / 2
        regions = []
        for imageOffset in [half, 0] {
            let p = fileBacked
                ? mmap(nil, half, PROT_READ | PROT_WRITE, MAP_PRIVATE, image, off_t(imageOffset))
                : mmap(nil, half, PROT_READ | PROT_WRITE, guestMappingFlags(hugetlb: hugetlb), -1, 0)
            guard let p, p != MAP_FAILED else {
                if hugetlb {
                    fail(2, "mmap \(half) bytes of hugetlb memory: errno \(errno) (\(half / page) free 2 MiB huge pages needed, "
                         + "\(HugePages.available) available; reserve them with `echo N > /proc/sys/vm/nr_hugepages`)")
                }
                fail(2, "mmap \(half) bytes: errno \(errno)")
            }
            regions.append(GuestRegion(base: p, length: half, imageOffset: imageOffset))
        }
    }

    var clientRegions: [ClientRegion] {
        regions.map {
            ClientRegion(start: $0.address, length: UInt64($0.length), backingOffset: UInt64($0.imageOffset), pageSize: UInt64(page))
        }
    }

    /// Compares `count` pages of region `r` from page `first` with the image; returns
    /// the first mismatching byte offset in the region, or nil. Allocates nothing.
    func mismatch(_ r: Int, pages first: Int = 0, count: Int? = nil, zeros: Bool = false) -> Int? {
        let region = regions[r]
        let n = count ?? (region.length / page - first)
        for p in first..<(first + n) {
            let offset = p * page
            if zeros {
                memset(scratch, 0, page)
            } else if pread(image, scratch, page, off_t(region.imageOffset + offset)) != page {
                return offset
            }
            if memcmp(region.base + offset, scratch, page) != 0 {
                var i = 0
                while (region.base + offset + i).load(as: UInt8.self) == (scratch + i).load(as: UInt8.self) { i += 1 }
                return offset + i
            }
        }
        return nil
    }

    /// Fails unless the pages match (the image, or zeros).
    func expect(_ r: Int, pages first: Int = 0, count: Int? = nil, zeros: Bool = false, _ what: String) {
        if let at = mismatch(r, pages: first, count: count, zeros: zeros) {
            fail(1, "\(what): region \(r) differs from the \(zeros ? "zero page" : "image") at byte \(at)")
        }
    }

    /// Moves region `r` to a new address with `mremap`.
    func remap(_ r: Int) {
        let region = regions[r]
        // A hugetlb target (not reserved) is huge-page aligned, as mremap of hugetlb needs.
        let flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | (hugetlb ? MAP_HUGETLB : 0)
        guard let target = mmap(nil, region.length, PROT_NONE, flags, -1, 0), target != MAP_FAILED else {
            fail(2, "mmap remap target: errno \(errno)")
        }
        guard let moved = mremapFixed(region.base, region.length, region.length, 1 | 2 /* MREMAP_MAYMOVE | MREMAP_FIXED */, target),
              moved != MAP_FAILED, moved == target else {
            fail(2, "mremap: errno \(errno)")
        }
        regions[r].base = moved
    }

    /// Releases pages of region `r` with `madvise(MADV_DONTNEED)`.
    func remove(_ r: Int, pages first: Int, count: Int) {
        if madvise(regions[r].base + first * page, count * page, MADV_DONTNEED) != 0 { fail(2, "madvise: errno \(errno)") }
    }

    /// Unmaps the last `count` pages of region `r`.
    func unmapTail(_ r: Int, pages count: Int) {
        let keep = regions[r].length - count * page
        if munmap(regions[r].base + keep, count * page) != 0 { fail(2, "munmap: errno \(errno)") }
        regions[r].length = keep
    }

    /// Reads one byte of every page of region `r` (faulting each in).
    func touch(_ r: Int) -> UInt64 {
        var sum: UInt64 = 0
        for p in 0..<(regions[r].length / page) { sum &+= UInt64(regions[r].base.load(fromByteOffset: p * page, as: UInt8.self)) }
        return sum
    }
}
