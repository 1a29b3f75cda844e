import SystemPackage
import _CUserfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// `PAGEMAP_SCAN` over a process's pagemap: which pages were written, and
/// write-protect them again in the same call (dirty tracking with WP_ASYNC).
///
/// ```swift
/// let scanner = try PagemapScanner()
/// let dirty = try scanner.scan(region, flags: .writeProtectMatching,
///                              required: .written, returning: .written)
/// ```
public final class PagemapScanner: @unchecked Sendable {
    /// Page categories, as `PAGEMAP_SCAN` reports and matches them.
    public struct Categories: OptionSet, Hashable, Sendable {
        /// The bits as the kernel reads and writes them.
        public var rawValue: UInt64
        /// The set with these bits; bits without a name here are kept.
        ///
        /// - Parameter rawValue: The bits as the kernel reads and writes them.
        public init(rawValue: UInt64) { self.rawValue = rawValue }
        /// Registered with userfaultfd WP (async).
        ///
        /// The corresponding C constant is `PAGE_IS_WPALLOWED`.
        public static let writeProtectAllowed = Categories(rawValue: UInt64(PAGE_IS_WPALLOWED))
        /// Written since last write-protected.
        ///
        /// The corresponding C constant is `PAGE_IS_WRITTEN`.
        public static let written = Categories(rawValue: UInt64(PAGE_IS_WRITTEN))
        /// File-backed.
        ///
        /// The corresponding C constant is `PAGE_IS_FILE`.
        public static let file = Categories(rawValue: UInt64(PAGE_IS_FILE))
        /// Present in memory.
        ///
        /// The corresponding C constant is `PAGE_IS_PRESENT`.
        public static let present = Categories(rawValue: UInt64(PAGE_IS_PRESENT))
        /// Swapped out.
        ///
        /// The corresponding C constant is `PAGE_IS_SWAPPED`.
        public static let swapped = Categories(rawValue: UInt64(PAGE_IS_SWAPPED))
        /// Maps the zero page.
        ///
        /// The corresponding C constant is `PAGE_IS_PFNZERO`.
        public static let pfnZero = Categories(rawValue: UInt64(PAGE_IS_PFNZERO))
        /// Part of a huge page.
        ///
        /// The corresponding C constant is `PAGE_IS_HUGE`.
        public static let huge = Categories(rawValue: UInt64(PAGE_IS_HUGE))
        /// Soft-dirty.
        ///
        /// The corresponding C constant is `PAGE_IS_SOFT_DIRTY`.
        public static let softDirty = Categories(rawValue: UInt64(PAGE_IS_SOFT_DIRTY))
        /// A guard region.
        ///
        /// The corresponding C constant is `PAGE_IS_GUARD`.
        public static let guardRegion = Categories(rawValue: UInt64(PAGE_IS_GUARD))
    }

    /// Flags of one scan.
    public struct Flags: OptionSet, Hashable, Sendable {
        /// The bits as the kernel reads and writes them.
        public var rawValue: UInt64
        /// The set with these bits; bits without a name here are kept.
        ///
        /// - Parameter rawValue: The bits as the kernel reads and writes them.
        public init(rawValue: UInt64) { self.rawValue = rawValue }
        /// Write-protect the matched pages.
        ///
        /// The corresponding C constant is `PM_SCAN_WP_MATCHING`.
        public static let writeProtectMatching = Flags(rawValue: UInt64(PM_SCAN_WP_MATCHING))
        /// Fail when a page is not WP_ASYNC-registered.
        ///
        /// The corresponding C constant is `PM_SCAN_CHECK_WPASYNC`.
        public static let checkWPAsync = Flags(rawValue: UInt64(PM_SCAN_CHECK_WPASYNC))
    }

    /// A run of pages with the same categories.
    public struct Region: Hashable, Sendable {
        /// The pages of the run.
        public var range: MemoryRange
        /// Their categories, limited to those the scan asked to return.
        public var categories: Categories
    }

    /// The result of one scan.
    public struct Result: Sendable {
        /// The matching regions, in address order.
        public var regions: [Region]
        /// Where the walk stopped: the end of the scanned range, or earlier if the
        /// output buffer or `maxPages` ran out (scan again from here).
        public var walkEnd: UInt64
        /// The pages in all regions.
        public var pageCount: Int { regions.reduce(0) { $0 + Int($1.range.length) / systemPageSize } }
    }

    private let fd: FileDescriptor
    private let capacity: Int
    private let vector: UnsafeMutablePointer<page_region>

    /// Opens `/proc/<pid>/pagemap` (`self` by default).
    ///
    /// - Parameters:
    ///   - pid: The process whose pages to scan; nil for this process.
    ///   - regionCapacity: The most regions one scan returns.
    /// - Throws: `UserfaultfdError` for `open`.
    public init(pid: Int32? = nil, regionCapacity: Int = 4096) throws(UserfaultfdError) {
        let path = "/proc/\(pid.map(String.init) ?? "self")/pagemap"
        let raw = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        if raw < 0 { throw UserfaultfdError(operation: "open \(path)", errno: currentErrno()) }
        fd = FileDescriptor(rawValue: raw)
        capacity = max(1, regionCapacity)
        vector = .allocate(capacity: capacity)
    }

    deinit {
        vector.deallocate()
        try? fd.close()
    }

    /// Scans `range` and returns the regions whose categories match.
    ///
    /// A page matches when `(categories ^ inverted) & required == required` and, if
    /// `anyOf` is non-empty, `(categories ^ inverted) & anyOf != 0`.
    /// - Parameters:
    ///   - range: page-aligned addresses to scan.
    ///   - flags: write-protect what matched, and/or insist on WP_ASYNC registration.
    ///   - required: categories every matching page has (`category_mask`).
    ///   - anyOf: categories of which a matching page has one (`category_anyof_mask`).
    ///   - inverted: categories whose sense is inverted (`category_inverted`).
    ///   - returning: the categories reported per region (`return_mask`); defaults to `required ∪ anyOf`.
    ///   - maxPages: stop after this many matching pages (0: no limit).
    /// - Returns: The matching regions and where the walk stopped.
    /// - Throws: ``UserfaultfdError/Kind/invalidArgument(_:)`` for an unaligned range,
    ///   else `UserfaultfdError` for `PAGEMAP_SCAN` (`EINVAL` on kernels without it).
    ///
    /// The corresponding C call is `ioctl(pagemap_fd, PAGEMAP_SCAN, &pm_scan_arg)`.
    public func scan(
        _ range: MemoryRange,
        flags: Flags = [],
        required: Categories = [],
        anyOf: Categories = [],
        inverted: Categories = [],
        returning: Categories? = nil,
        maxPages: Int = 0
    ) throws(UserfaultfdError) -> Result {
        if !range.isAligned(to: UInt64(systemPageSize)) {
            throw UserfaultfdError(operation: "PAGEMAP_SCAN", kind: .invalidArgument("range \(range) is not page-aligned"))
        }
        var arg = pm_scan_arg()
        arg.size = UInt64(MemoryLayout<pm_scan_arg>.size)
        arg.flags = flags.rawValue
        arg.start = range.start
        arg.end = range.end
        arg.vec = UInt64(UInt(bitPattern: vector))
        arg.vec_len = UInt64(capacity)
        arg.max_pages = UInt64(maxPages)
        arg.category_inverted = inverted.rawValue
        arg.category_mask = required.rawValue
        arg.category_anyof_mask = anyOf.rawValue
        arg.return_mask = (returning ?? required.union(anyOf)).rawValue
        let raw = fd.rawValue
        let n = try retryOnInterrupt("PAGEMAP_SCAN") { cuffd_pagemap_scan(raw, &arg) }
        var regions: [Region] = []
        regions.reserveCapacity(Int(n))
        for i in 0..<Int(n) {
            let r = vector[i]
            regions.append(Region(range: MemoryRange(start: r.start, end: r.end), categories: Categories(rawValue: r.categories)))
        }
        return Result(regions: regions, walkEnd: arg.walk_end)
    }
}
