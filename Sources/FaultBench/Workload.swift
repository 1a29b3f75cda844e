import FaultEngine
import Userfaultfd
import _CBenchReference

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A deliberate fault, to check that the bench's verification catches it.
public enum Corruption: Sendable, Equatable {
    /// Flips the byte at this offset of the source every contender serves from,
    /// after the source is filled: every contender that installs source bytes
    /// installs a wrong byte there.
    case sourceByte(offset: Int)
    /// Flips the byte at this offset of the first page each run touched, after
    /// the touch and before the verification.
    case installedByte(offsetInPage: Int)
}

/// The bytes every contender installs and the orders in which pages are touched.
///
/// Page `p` of a region holds pattern page `p % pageCount`; every pattern page
/// differs from every other, so a page installed at the wrong place is caught.
final class Workload {
    let pageSize: Int
    /// Pages of the source (and of every non-scale region).
    let pageCount: Int
    /// The source bytes, `pageCount * pageSize`, read-only once filled. The C
    /// contenders read it directly; the engine serves it as it is.
    let source: MemorySource
    let corruption: Corruption?
    /// 0, 1, 2, …
    let sequential: [UInt64]
    /// A fixed-seed permutation of `sequential`.
    let random: [UInt64]

    /// The seed of every random order, fixed so that runs compare.
    static let seed: UInt64 = 0x5EED_FA17_0000_0001

    init(sizeMiB: Int, corruption: Corruption?) throws(BenchError) {
        pageSize = systemPageSize
        let length = sizeMiB << 20
        pageCount = length / pageSize
        self.corruption = corruption
        if case .sourceByte(let offset) = corruption, offset < 0 || offset >= length {
            throw BenchError("corruption offset \(offset) lies outside the \(length)-byte source")
        }
        let pages = pageCount
        let size = pageSize
        do {
            source = try MemorySource(length: length) { bytes in
                cbench_fill_pattern(bytes.baseAddress, 0, pages, size)
                if case .sourceByte(let offset) = corruption { bytes[offset] ^= 0xFF }
            }
        } catch {
            throw BenchError("cannot map the \(sizeMiB) MiB source: \(error)")
        }
        sequential = (0..<UInt64(pageCount)).map { $0 }
        var order = sequential
        var generator = SplitMix64(seed: Workload.seed)
        order.shuffle(using: &generator)
        random = order
    }

    /// The bytes of the source.
    var sourceLength: Int { pageCount * pageSize }

    /// Working-set files recorded for `swift-replay`, by pattern (removed with the workload).
    var recordedWorkingSets: [AccessPattern: String] = [:]

    /// The image file of the `kernel-file-mmap` contenders (unlinked, open), once written.
    var imageFileDescriptor: Int32?

    deinit {
        for path in recordedWorkingSets.values { unlink(path) }
        if let imageFileDescriptor { close(imageFileDescriptor) }
    }

    /// The touch order of `pattern` over a region of `pageCount` pages.
    func order(_ pattern: AccessPattern) -> [UInt64] {
        pattern == .sequential ? sequential : random
    }

    /// `touches` distinct pages of a region of `regionPages` pages, spread over all of
    /// it, in a fixed-seed random order: the region is cut into `touches` equal slots
    /// and one random page of each slot is taken, slots in random order.
    static func scaleOrder(regionPages: UInt64, touches: Int) -> [UInt64] {
        let slot = regionPages / UInt64(touches)
        var generator = SplitMix64(seed: seed ^ regionPages)
        var slots = (0..<UInt64(touches)).map { $0 }
        slots.shuffle(using: &generator)
        return slots.map { $0 * slot + (slot > 1 ? generator.next() % slot : 0) }
    }

    /// Applies an ``Corruption/installedByte(offsetInPage:)`` corruption to a region
    /// whose pages in `order` were touched, then checks every touched page.
    ///
    /// - Returns: nil if every byte is right, or a sentence naming the first wrong byte.
    func verify(region: UnsafeMutableRawPointer, order: [UInt64], zeroFilledWithMarker marker: UInt8? = nil) -> String? {
        if case .installedByte(let offsetInPage) = corruption, let first = order.first {
            let offset = Int(first) * pageSize + offsetInPage % pageSize
            region.storeBytes(of: region.load(fromByteOffset: offset, as: UInt8.self) ^ 0xFF,
                              toByteOffset: offset, as: UInt8.self)
        }
        let wrong: Int64 = order.withUnsafeBufferPointer { pages in
            if let marker {
                return cbench_verify_touched_zero(region, pages.baseAddress, pages.count, pageSize, marker)
            }
            return cbench_verify_pattern(region, pageCount, pages.baseAddress, pages.count, pageSize)
        }
        if wrong < 0 { return nil }
        return "byte \(wrong) (page \(Int(wrong) / pageSize)) differs from what the page should hold"
    }
}
