// A Firecracker-style restore: one pass over all of guest memory, timed, then checked.
import Userfaultfd

#if canImport(Glibc)
import Glibc
#endif

/// The bytes a restore pass touches: one 8-byte word at this offset in every 4 KiB,
/// whatever the guest's page size, so both page sizes do the same work.
let restoreStride = 4096
let restoreWordOffset = 64

/// The word the write pass stores at byte `offset` of a region.
@inline(__always)
func restoreWord(_ offset: Int) -> UInt64 { 0xC0DE_0000_0000_0000 | UInt64(offset) }

/// One pass over every region: stores a word per 4 KiB (`write`) or loads one
/// (`read`); returns a sum so the loads are not optimised away.
func restorePass(_ guest: Guest, write: Bool) -> UInt64 {
    var sum: UInt64 = 0
    for region in guest.regions {
        var offset = 0
        if write {
            while offset < region.length {
                region.base.storeBytes(of: restoreWord(offset), toByteOffset: offset + restoreWordOffset, as: UInt64.self)
                offset += restoreStride
            }
        } else {
            while offset < region.length {
                sum &+= region.base.load(fromByteOffset: offset + restoreWordOffset, as: UInt64.self)
                offset += restoreStride
            }
        }
    }
    return sum
}

/// Checks every byte of every region against the image, with the written words in
/// place after a write pass. Fails the client on the first wrong byte.
func checkRestored(_ guest: Guest, written: Bool) {
    let chunk = 1 << 20
    let expected = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 4096)
    defer { expected.deallocate() }
    for (r, region) in guest.regions.enumerated() {
        var offset = 0
        while offset < region.length {
            let n = min(chunk, region.length - offset)
            var done = 0
            while done < n {
                let got = pread(guest.image, expected + done, n - done, off_t(region.imageOffset + offset + done))
                if got <= 0 { fail(2, "cannot read the image at \(region.imageOffset + offset + done): errno \(errno)") }
                done += got
            }
            if written {
                var w = 0
                while w < n {
                    expected.storeBytes(of: restoreWord(offset + w), toByteOffset: w + restoreWordOffset, as: UInt64.self)
                    w += restoreStride
                }
            }
            if memcmp(region.base + offset, expected, n) != 0 {
                var i = 0
                while (region.base + offset + i).load(as: UInt8.self) == (expected + i).load(as: UInt8.self) { i += 1 }
                fail(1, "restore: region \(r) differs from the \(written ? "written " : "")image at byte \(offset + i)")
            }
            offset += n
        }
    }
}

/// The restore pass through the daemon, timed from the start of the hand-over.
func restore(_ guest: Guest, write: Bool, since start: UInt64) {
    let sum = restorePass(guest, write: write)
    let elapsed = MonotonicClock.nanoseconds() - start
    checkRestored(guest, written: write)
    say("TIME_NS \(elapsed) bytes \(guest.regions.map(\.length).reduce(0, +)) sum \(sum)")
    say("OK restore")
}

/// The kernel's own restore: the image mapped `MAP_PRIVATE` (the same two swapped
/// halves as ``Guest``), then the same pass, timed from opening the image.
func restoreFromFile(_ options: Options, write: Bool) -> Never {
    let start = MonotonicClock.nanoseconds()
    let guest = Guest(imagePath: options.image, length: options.length, hugetlb: false, fileBacked: true)
    let sum = restorePass(guest, write: write)
    let elapsed = MonotonicClock.nanoseconds() - start
    checkRestored(guest, written: write)
    say("TIME_NS \(elapsed) bytes \(guest.regions.map(\.length).reduce(0, +)) sum \(sum)")
    say("OK restore-file")
    exit(0)
}
