import SystemPackage
import Userfaultfd
import _CFaultEngine

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A fixed-size bitmap, one bit per page, that threads set, clear and test without
/// locks. Its words are the ones the C bit functions (and the SIGBUS resolver) work
/// on: region entries hold ``words`` directly, so copying an entry costs no
/// reference counting.
package final class PageBitmap: @unchecked Sendable {
    /// The number of bits.
    package let count: Int
    /// The words, bit `i` in word `i / 64`; valid as long as the bitmap lives.
    package let words: UnsafeMutablePointer<UInt64>
    private let byteCount: Int

    /// A bitmap of `count` bits, all clear (or all set).
    ///
    /// - Throws: `UserfaultfdError` if its memory cannot be mapped.
    package init(count: Int, set: Bool = false) throws(UserfaultfdError) {
        self.count = max(0, count)
        let wordCount = (self.count + 63) / 64
        // Mapped, not allocated: zero pages until written, so a bitmap of a large,
        // sparsely touched region costs what is set.
        byteCount = max(wordCount, 1) * 8
        guard let p = mmap(nil, byteCount, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
            p != MAP_FAILED
        else {
            throw UserfaultfdError(operation: "mmap page bitmap (\(max(wordCount, 1) * 8) bytes)", errno: Errno(rawValue: errno))
        }
        words = p.assumingMemoryBound(to: UInt64.self)
        if set { cfe_bits_set(words, 0, UInt64(self.count)) }
    }

    deinit { munmap(words, byteCount) }

    /// Whether bit `i` is set.
    @inline(__always)
    package func test(_ i: Int) -> Bool { cfe_bit_test(words, UInt64(i)) }

    /// Sets bit `i`; returns whether it was set before.
    @inline(__always)
    @discardableResult
    package func testAndSet(_ i: Int) -> Bool { cfe_bit_test_and_set(words, UInt64(i)) }

    /// Clears bit `i`; returns whether it was set before.
    @inline(__always)
    @discardableResult
    package func testAndClear(_ i: Int) -> Bool { cfe_bit_test_and_clear(words, UInt64(i)) }

    /// Sets bits `first ..< first + n`.
    @inline(__always)
    package func set(_ first: Int, count n: Int) { cfe_bits_set(words, UInt64(first), UInt64(n)) }

    /// Clears bits `first ..< first + n`.
    @inline(__always)
    package func clear(_ first: Int, count n: Int) { cfe_bits_clear(words, UInt64(first), UInt64(n)) }

    /// Bits `64 * i ..< 64 * i + 64`.
    @inline(__always)
    package func word(_ i: Int) -> UInt64 { cfe_bits_word(words, UInt64(i)) }

    /// The first set bit at or after `start`, or nil.
    package func nextSet(from start: Int) -> Int? {
        if start >= count { return nil }
        let wordCount = (count + 63) / 64
        var w = start >> 6
        var bits = word(w) & (~0 << UInt64(start & 63))
        while true {
            if bits != 0 {
                let i = w << 6 + bits.trailingZeroBitCount
                return i < count ? i : nil
            }
            w += 1
            if w >= wordCount { return nil }
            bits = word(w)
        }
    }

    /// The number of set bits.
    package var population: Int {
        var n = 0
        for i in 0..<(count + 63) / 64 { n += word(i).nonzeroBitCount }
        return n
    }

    /// Bits `first ..< first + n` as bytes: bit `i` in byte `i / 8`, least significant first.
    package func bytes(from first: Int, count n: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: (n + 7) / 8)
        for i in 0..<n where test(first + i) { out[i >> 3] |= 1 << UInt8(i & 7) }
        return out
    }
}
