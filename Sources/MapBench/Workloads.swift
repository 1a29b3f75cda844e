import FaultEngine
import Foundation
import PagedMemory
import Userfaultfd

#if canImport(Glibc)
import Glibc
#endif

/// The random-access and scan workloads, run in the child process.
enum RandomWorkloads {
    /// Random 8-byte reads at random 4 KiB pages by `threads` threads for `seconds`;
    /// `zipf` skews the page choice (exponent 1). - Returns: operations, and whether every read was right.
    static func read(_ base: UnsafeMutableRawPointer, bytes: Int, threads: Int, seconds: Double, zipf: Bool) -> (Int, Bool) {
        let pages = bytes / 4096
        let address = UInt(bitPattern: base)
        let counts = UnsafeMutablePointer<Int>.allocate(capacity: threads * 2)
        counts.initialize(repeating: 0, count: threads * 2)
        defer { counts.deallocate() }
        let countsAddress = UInt(bitPattern: counts)
        let sampler = zipf ? ZipfSampler(count: pages, exponent: 1.0) : nil
        let deadline = Date().addingTimeInterval(seconds)
        let workers = (0..<threads).map { t in
            DedicatedThread(name: "bench-\(t)") {
                let p = UnsafeMutableRawPointer(bitPattern: address)!
                let c = UnsafeMutablePointer<Int>(bitPattern: countsAddress)!
                var rng = SplitMix64(seed: UInt64(t) &+ 77)
                var ops = 0, wrong = 0
                while true {
                    for _ in 0..<64 {
                        let page = sampler.map { $0.sample(&rng) } ?? Int(rng.next() % UInt64(pages))
                        let w = page * 512 + Int(rng.next() & 511)
                        if p.load(fromByteOffset: w * 8, as: UInt64.self) != DataFiles.pattern(w) { wrong += 1 }
                        ops += 1
                    }
                    if Date() >= deadline { break }
                }
                c[t * 2] = ops
                c[t * 2 + 1] = wrong
            }
        }
        for w in workers { w.join() }
        let ops = (0..<threads).reduce(0) { $0 + counts[$1 * 2] }
        let wrong = (0..<threads).reduce(0) { $0 + counts[$1 * 2 + 1] }
        return (ops, wrong == 0)
    }

    /// Random read-modify-write of one word per random page (XOR with a mask) for
    /// `seconds`. - Returns: operations and the words touched, in order.
    static func readModifyWrite(_ base: UnsafeMutableRawPointer, bytes: Int, seconds: Double) -> (Int, [Int32]) {
        let pages = bytes / 4096
        var rng = SplitMix64(seed: 99)
        var touched: [Int32] = []
        touched.reserveCapacity(1 << 20)
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            for _ in 0..<64 {
                let w = Int(rng.next() % UInt64(pages)) * 512 + Int(rng.next() & 511)
                let v = base.load(fromByteOffset: w * 8, as: UInt64.self)
                base.storeBytes(of: v ^ rmwMask, toByteOffset: w * 8, as: UInt64.self)
                touched.append(Int32(truncatingIfNeeded: w))
            }
        }
        return (touched.count, touched)
    }

    static let rmwMask: UInt64 = 0xFFFF_0000_FFFF_0000

    /// Checks the words `touched` in the file itself (not through the mapping) and
    /// restores them. - Returns: whether each holds its pattern XORed once per touch.
    static func verifyAndRestore(path: String, touched: [Int32]) -> Bool {
        var parity: [Int32: Bool] = [:]
        for w in touched { parity[w, default: false].toggle() }
        let fd = open(path, O_RDWR | O_CLOEXEC)
        defer { close(fd) }
        var ok = true
        for (w, odd) in parity {
            var v: UInt64 = 0
            _ = pread(fd, &v, 8, off_t(Int(w) * 8))
            let expected = DataFiles.pattern(Int(w)) ^ (odd ? rmwMask : 0)
            if v != expected { ok = false }
            var original = DataFiles.pattern(Int(w))
            _ = pwrite(fd, &original, 8, off_t(Int(w) * 8))
        }
        fsync(fd)
        return ok
    }

    /// Sums every word in order. - Returns: whether the sum is the file's.
    static func scan(_ base: UnsafeMutableRawPointer, bytes: Int) -> Bool {
        let words = base.assumingMemoryBound(to: UInt64.self)
        var sum: UInt64 = 0
        for i in 0..<bytes / 8 { sum &+= words[i] }
        return sum == DataFiles.expectedSum(words: bytes / 8)
    }
}

/// Zipf-distributed page numbers by inverse CDF over a table of 4,096 buckets
/// (each bucket a contiguous range of ranks; ranks are scattered over the file).
final class ZipfSampler: @unchecked Sendable {
    private let cdf: [Double]
    private let bucket: Int
    private let count: Int

    init(count: Int, exponent: Double) {
        self.count = count
        let buckets = min(4096, count)
        bucket = count / buckets
        var weights = [Double](repeating: 0, count: buckets)
        for b in 0..<buckets {
            // The weight of ranks b*bucket+1 ... (b+1)*bucket, approximated by the integral.
            let lo = Double(b * bucket + 1), hi = Double((b + 1) * bucket + 1)
            weights[b] = exponent == 1 ? log(hi / lo) : (pow(hi, 1 - exponent) - pow(lo, 1 - exponent)) / (1 - exponent)
        }
        let total = weights.reduce(0, +)
        var running = 0.0
        cdf = weights.map { running += $0 / total; return running }
    }

    @inline(__always)
    func sample(_ rng: inout SplitMix64) -> Int {
        let u = Double(rng.next() >> 11) / Double(1 << 53)
        var lo = 0, hi = cdf.count - 1
        while lo < hi {
            let mid = (lo + hi) / 2
            if cdf[mid] < u { lo = mid + 1 } else { hi = mid }
        }
        let rank = lo * bucket + Int(rng.next() % UInt64(max(bucket, 1)))
        // Scatter ranks over the file so that hot pages are not neighbours.
        return Int((UInt64(rank) &* 0x9E37_79B9_7F4A_7C15) % UInt64(count))
    }
}
