import FaultEngine
import Synchronization
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Installs a recorded working set into a client's memory before its faults are served
/// (REAP-style): the whole set, in recorded order, in runs of consecutive pages.
///
/// The engine's own replay runs beside the handler threads and yields to them, so a
/// client that faults at full speed starves it. Done here, before the fault server
/// starts, the client's first faults simply wait for the set, which arrives at
/// `UFFDIO_COPY` speed instead of one fault round trip per page.
enum WorkingSetPreload {
    /// What a preload did.
    struct Result: Sendable, Equatable {
        var pagesInstalled = 0
        var pagesAlreadyPresent = 0
        var copies = 0
        /// Why it stopped early, if it did (the rest is left to the fault server).
        var stoppedEarly: String?
    }

    /// Installs the pages at `offsets` (source offsets, in order) that `regions` map.
    ///
    /// Offsets outside every region are skipped. Stops early, leaving the rest to the
    /// fault server, when the address space is changing (`EAGAIN`), the process is
    /// gone, or the source fails.
    ///
    /// - Parameters:
    ///   - pageSize: the regions' page size; offsets are aligned down to it and runs
    ///     are made of whole pages of this size.
    ///   - maxRunPages: the longest run copied at once, in base pages (at least one
    ///     page of `pageSize`).
    ///   - threads: how many threads copy at once, each a contiguous share of `offsets`
    ///     (a share keeps the recorded order). Copies into one address space run in
    ///     parallel in the kernel; the client waits for all of them.
    static func install<Source: PageSource>(
        _ offsets: [UInt64], regions: [ClientRegion], source: Source, uffd: Userfaultfd.Handle,
        pageSize: UInt64 = UInt64(systemPageSize), maxRunPages basePages: Int = 256, threads: Int = 1
    ) -> Result {
        // Below a few thousand pages a thread costs more than it saves.
        let count = max(1, min(threads, offsets.count / 2048))
        if count == 1 {
            return installShare(offsets[...], regions: regions, source: source, uffd: uffd, pageSize: pageSize, maxRunPages: basePages)
        }
        let share = (offsets.count + count - 1) / count
        let results = Mutex<[Result]>([])
        let helpers = (1..<count).map { k in
            let slice = offsets[(k * share)..<min(offsets.count, (k + 1) * share)]
            return DedicatedThread(name: "uffd-preload-\(k)") {
                let r = installShare(slice, regions: regions, source: source, uffd: uffd, pageSize: pageSize, maxRunPages: basePages)
                results.withLock { $0.append(r) }
            }
        }
        var total = installShare(offsets[0..<min(offsets.count, share)], regions: regions, source: source, uffd: uffd,
                                 pageSize: pageSize, maxRunPages: basePages)
        for h in helpers { h.join() }
        for r in results.withLock({ $0 }) {
            total.pagesInstalled += r.pagesInstalled
            total.pagesAlreadyPresent += r.pagesAlreadyPresent
            total.copies += r.copies
            total.stoppedEarly = total.stoppedEarly ?? r.stoppedEarly
        }
        return total
    }

    /// Installs one share of the offsets, in order, on the calling thread.
    private static func installShare<Source: PageSource>(
        _ offsets: ArraySlice<UInt64>, regions: [ClientRegion], source: Source, uffd: Userfaultfd.Handle,
        pageSize: UInt64, maxRunPages basePages: Int
    ) -> Result {
        let page = pageSize
        let maxRunPages = max(1, basePages * systemPageSize / Int(page))
        let sorted = regions.sorted { $0.backingOffset < $1.backingOffset }
        func address(of offset: UInt64) -> UInt64? {
            for r in sorted where offset >= r.backingOffset && offset - r.backingOffset < r.length {
                return r.start + (offset - r.backingOffset)
            }
            return nil
        }
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: maxRunPages * Int(page), alignment: Int(page))
        defer { buffer.deallocate() }
        var result = Result()
        var i = offsets.startIndex
        while i < offsets.endIndex {
            let first = offsets[i] & ~(page - 1)
            guard let start = address(of: first) else {
                i += 1
                continue
            }
            // Extend the run while the next recorded page follows in both file and memory.
            var pages = 1
            while i + pages < offsets.endIndex && pages < maxRunPages {
                let next = offsets[i + pages] & ~(page - 1)
                guard next == first + UInt64(pages) * page, address(of: next) == start + UInt64(pages) * page else { break }
                pages += 1
            }
            i += pages
            let bytes = pages * Int(page)
            let from: UnsafeRawPointer
            if case .memory(let base, let length)? = source.signalSafeBacking, first + UInt64(bytes) <= length {
                // The source's bytes are mapped here: copy from them without staging.
                from = UnsafeRawPointer(bitPattern: base)! + Int(first)
            } else {
                do {
                    try source.fill(UnsafeMutableRawBufferPointer(start: buffer, count: bytes), at: first)
                } catch {
                    result.stoppedEarly = "\(error)"
                    return result
                }
                from = UnsafeRawPointer(buffer)
            }
            var done = 0
            while done < bytes {
                result.copies += 1
                let outcome: Userfaultfd.Outcome
                do {
                    outcome = try uffd.copy(to: start + UInt64(done), from: from + done, length: bytes - done)
                } catch {
                    result.stoppedEarly = "\(error)"
                    return result
                }
                switch outcome {
                case .completed(let n):
                    result.pagesInstalled += n / Int(page)
                    done = bytes
                case .partial(let n):
                    result.pagesInstalled += n / Int(page)
                    done += n
                case .alreadyPresent:
                    // Somewhere in the run a page is present: install the rest page by page.
                    result.pagesAlreadyPresent += 1
                    done += Int(page)
                case .retryAfterEvents:
                    result.stoppedEarly = "the address space is changing"
                    return result
                }
            }
        }
        return result
    }
}
