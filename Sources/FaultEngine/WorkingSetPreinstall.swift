import Synchronization
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Installs a recorded working set into memory before its faults are served
/// (REAP-style): the whole set, in recorded order, in runs of consecutive pages.
///
/// A server's own replay (``FaultServerConfiguration/Prefetch/replay(path:)``) runs
/// beside the handler threads and yields to them, so a workload that faults at full
/// speed starves it. Done before the server starts, the first faults simply wait for
/// the set, which arrives at `UFFDIO_COPY` speed instead of one fault round trip per
/// page.
public enum WorkingSetPreinstall {
    /// What a preinstall did.
    public struct Result: Sendable, Equatable {
        /// Pages installed.
        public var pagesInstalled = 0
        /// Pages found already present (`EEXIST`).
        public var pagesAlreadyPresent = 0
        /// `UFFDIO_COPY` calls made.
        public var copies = 0
        /// Why it stopped early, if it did (the rest is left to the fault server).
        public var stoppedEarly: String?

        public init() {}
    }

    /// Installs the pages at `offsets` (source offsets, in order) that `regions` map.
    ///
    /// Offsets outside every region are skipped. Stops early, leaving the rest to the
    /// fault server, when the address space is changing (`EAGAIN`), the process is
    /// gone, or the source fails. Past the end of a source whose length ends inside a
    /// page, that page's tail is installed as zeros.
    ///
    /// - Parameters:
    ///   - offsets: source offsets of the pages, in the order to install them.
    ///   - regions: where the source's bytes go (each region's `sourceOffset` is the
    ///     source offset of its first byte).
    ///   - source: where page contents come from.
    ///   - handle: the uffd the regions are registered on (MISSING).
    ///   - pageSize: the regions' page size; offsets are aligned down to it and runs
    ///     are made of whole pages of this size.
    ///   - maxRunPages: the longest run copied at once, in base pages (at least one
    ///     page of `pageSize`).
    ///   - threads: how many threads copy at once, each a contiguous share of `offsets`
    ///     (a share keeps the recorded order). Copies into one address space run in
    ///     parallel in the kernel; the caller waits for all of them.
    /// - Returns: what was installed, and why it stopped early if it did.
    public static func install<Source: PageSource>(
        _ offsets: [UInt64], regions: [ServedRegion], source: Source, handle: Userfaultfd.Handle,
        pageSize: Int = systemPageSize, maxRunPages: Int = 256, threads: Int = 1
    ) -> Result {
        let sorted = regions.sorted { $0.sourceOffset < $1.sourceOffset }
        let worker = Worker(regions: sorted, source: source, handle: handle, pageSize: UInt64(pageSize),
                            maxRunPages: max(1, maxRunPages * systemPageSize / pageSize))
        // Below a few thousand pages a thread costs more than it saves.
        let count = max(1, min(threads, offsets.count / 2048))
        if count == 1 { return worker.install(offsets[...]) }
        let share = (offsets.count + count - 1) / count
        let results = Mutex<[Result]>([])
        var helpers: [DedicatedThread] = []
        var unstarted: [ArraySlice<UInt64>] = []
        for k in 1..<count {
            let slice = offsets[(k * share)..<min(offsets.count, (k + 1) * share)]
            // A thread that cannot be had (a pids limit) leaves its share to this one.
            if let helper = try? DedicatedThread.start(name: "uffd-preload-\(k)", {
                let r = worker.install(slice)
                results.withLock { $0.append(r) }
            }) {
                helpers.append(helper)
            } else {
                unstarted.append(slice)
            }
        }
        var total = worker.install(offsets[0..<min(offsets.count, share)])
        for slice in unstarted { results.withLock { $0.append(worker.install(slice)) } }
        for h in helpers { h.join() }
        for r in results.withLock({ $0 }) {
            total.pagesInstalled += r.pagesInstalled
            total.pagesAlreadyPresent += r.pagesAlreadyPresent
            total.copies += r.copies
            total.stoppedEarly = total.stoppedEarly ?? r.stoppedEarly
        }
        return total
    }

    /// Installs shares of a working set; one per thread at a time.
    struct Worker<Source: PageSource>: @unchecked Sendable {
        let regions: [ServedRegion]
        let source: Source
        let handle: Userfaultfd.Handle
        let pageSize: UInt64
        let maxRunPages: Int

        /// The address `offset` is mapped at, if a region maps it.
        func address(of offset: UInt64) -> UInt64? {
            for r in regions where offset >= r.sourceOffset && offset - r.sourceOffset < r.range.length {
                return r.range.start + (offset - r.sourceOffset)
            }
            return nil
        }

        /// Installs one share of the offsets, in order, on the calling thread.
        func install(_ offsets: ArraySlice<UInt64>) -> Result {
            let buffer = UnsafeMutableRawPointer.allocate(byteCount: maxRunPages * Int(pageSize), alignment: Int(pageSize))
            defer { buffer.deallocate() }
            var result = Result()
            var i = offsets.startIndex
            while i < offsets.endIndex {
                let first = offsets[i] & ~(pageSize - 1)
                guard let start = address(of: first) else {
                    i += 1
                    continue
                }
                let pages = runLength(offsets, from: i, first: first, start: start)
                i += pages
                let bytes = pages * Int(pageSize)
                let from: UnsafeRawPointer
                do {
                    from = try bytesOfRun(at: first, count: bytes, staging: buffer)
                } catch {
                    result.stoppedEarly = "\(error)"
                    return result
                }
                if let stop = copy(from, to: start, bytes: bytes, into: &result) {
                    result.stoppedEarly = stop
                    return result
                }
            }
            return result
        }

        /// How many recorded pages from `i` on follow one another in both source and memory.
        func runLength(_ offsets: ArraySlice<UInt64>, from i: Int, first: UInt64, start: UInt64) -> Int {
            var pages = 1
            while i + pages < offsets.endIndex && pages < maxRunPages {
                let next = offsets[i + pages] & ~(pageSize - 1)
                guard next == first + UInt64(pages) * pageSize, address(of: next) == start + UInt64(pages) * pageSize else { break }
                pages += 1
            }
            return pages
        }

        /// The source's bytes at `offset`: in place where they are mapped here, otherwise
        /// filled into `staging` (zeros past the source's end).
        func bytesOfRun(at offset: UInt64, count: Int, staging: UnsafeMutableRawPointer) throws(PageSourceError) -> UnsafeRawPointer {
            if case .memory(let base, let length)? = source.signalSafeBacking, offset + UInt64(count) <= length {
                return UnsafeRawPointer(bitPattern: base)! + Int(offset)
            }
            var available = count
            if let length = source.length {
                available = offset >= length ? 0 : Int(min(UInt64(count), length - offset))
            }
            if available > 0 {
                try source.fill(UnsafeMutableRawBufferPointer(start: staging, count: available), at: offset)
            }
            if available < count { memset(staging + available, 0, count - available) }
            return UnsafeRawPointer(staging)
        }

        /// Copies `bytes` from `from` to `start`; returns why it stopped, if it did.
        func copy(_ from: UnsafeRawPointer, to start: UInt64, bytes: Int, into result: inout Result) -> String? {
            var done = 0
            while done < bytes {
                result.copies += 1
                let outcome: Userfaultfd.Outcome
                do {
                    outcome = try handle.copy(to: start + UInt64(done), from: from + done, length: bytes - done)
                } catch {
                    return "\(error)"
                }
                switch outcome {
                case .completed(let n):
                    result.pagesInstalled += n / Int(pageSize)
                    done = bytes
                case .partial(let n):
                    result.pagesInstalled += n / Int(pageSize)
                    done += n
                case .alreadyPresent:
                    // Somewhere in the run a page is present: install the rest page by page.
                    result.pagesAlreadyPresent += 1
                    done += Int(pageSize)
                case .retryAfterEvents:
                    return "the address space is changing"
                }
            }
            return nil
        }
    }
}
