import Synchronization

/// A fixed-size bitmap of pages that threads set, clear and test without locks.
final class PageBitmap: @unchecked Sendable {
    let count: Int
    private let words: UnsafeMutablePointer<Atomic<UInt64>>
    private let wordCount: Int

    init(count: Int, set: Bool = false) {
        self.count = count
        wordCount = (count + 63) / 64
        words = .allocate(capacity: wordCount)
        for i in 0..<wordCount {
            var value: UInt64 = set ? ~0 : 0
            if set && i == wordCount - 1 && count % 64 != 0 { value = (1 << UInt64(count % 64)) - 1 }
            (words + i).initialize(to: Atomic(value))
        }
    }

    deinit {
        words.deinitialize(count: wordCount)
        words.deallocate()
    }

    @inline(__always)
    func test(_ i: Int) -> Bool {
        words[i >> 6].load(ordering: .acquiring) & (1 << UInt64(i & 63)) != 0
    }

    /// Sets bit `i`; returns whether it was set before.
    @inline(__always)
    @discardableResult
    func testAndSet(_ i: Int) -> Bool {
        let mask: UInt64 = 1 << UInt64(i & 63)
        return words[i >> 6].bitwiseOr(mask, ordering: .acquiringAndReleasing).oldValue & mask != 0
    }

    /// Clears bit `i`; returns whether it was set before.
    @inline(__always)
    @discardableResult
    func testAndClear(_ i: Int) -> Bool {
        let mask: UInt64 = 1 << UInt64(i & 63)
        return words[i >> 6].bitwiseAnd(~mask, ordering: .acquiringAndReleasing).oldValue & mask != 0
    }

    /// Bits `64 * i ..< 64 * i + 64`.
    @inline(__always)
    func word(_ i: Int) -> UInt64 { words[i].load(ordering: .relaxed) }

    /// The first set bit at or after `start`, or nil.
    func nextSet(from start: Int) -> Int? {
        if start >= count { return nil }
        var w = start >> 6
        var word = words[w].load(ordering: .relaxed) & (~0 << UInt64(start & 63))
        while true {
            if word != 0 {
                let i = w << 6 + word.trailingZeroBitCount
                return i < count ? i : nil
            }
            w += 1
            if w >= wordCount { return nil }
            word = words[w].load(ordering: .relaxed)
        }
    }

    /// The number of set bits.
    var population: Int {
        var n = 0
        for i in 0..<wordCount { n += words[i].load(ordering: .relaxed).nonzeroBitCount }
        return n
    }

    /// The bits as bytes, bit i in byte i/8 (least significant first).
    func bytes(from first: Int, count n: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: (n + 7) / 8)
        for i in 0..<n where test(first + i) { out[i >> 3] |= 1 << UInt8(i & 7) }
        return out
    }
}
