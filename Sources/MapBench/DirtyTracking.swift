import Foundation
import Userfaultfd

#if canImport(Glibc)
import Glibc
#endif

/// The two ways to learn which pages were written, measured on the same memory:
/// synchronous write protection (the first write to each page faults to a handler
/// thread that marks it and unprotects it: what PagedMemory does, as UMap does) and
/// WP_ASYNC (the kernel lets the write through and records it; one PAGEMAP_SCAN
/// collects and re-protects the written pages).
public enum DirtyTracking {
    /// Nanoseconds per page for each scheme, and whether each found every page written.
    public struct Result: Codable, Sendable {
        public var pages: Int
        public var synchronousNanosecondsPerPage: Double
        public var asyncNanosecondsPerPage: Double
        public var synchronousFoundAll: Bool
        public var asyncFoundAll: Bool
    }

    /// Measures both schemes `repetitions` times, alternating, on `pages` 4 KiB pages; medians.
    public static func measure(pages: Int = 16_384, repetitions: Int = 5) throws -> Result {
        var sync: [Double] = [], async: [Double] = []
        var syncOK = true, asyncOK = true
        for _ in 0..<repetitions {
            let s = try synchronous(pages: pages)
            sync.append(s.0); syncOK = syncOK && s.1
            let a = try asynchronous(pages: pages)
            async.append(a.0); asyncOK = asyncOK && a.1
        }
        return Result(pages: pages, synchronousNanosecondsPerPage: MapBenchRunner.median(sync),
                      asyncNanosecondsPerPage: MapBenchRunner.median(async), synchronousFoundAll: syncOK, asyncFoundAll: asyncOK)
    }

    /// Populated, write-protected anonymous memory of `pages` pages.
    private static func protectedMemory(_ handle: Userfaultfd.Handle, pages: Int) throws -> MemoryRange {
        let length = pages * 4096
        guard let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), p != MAP_FAILED else {
            throw MapBenchError("mmap failed: errno \(errno)")
        }
        for i in 0..<pages { p.storeBytes(of: 1, toByteOffset: i * 4096, as: UInt8.self) }
        let range = MemoryRange(p, length: length)
        try handle.register(range, mode: .writeProtect)
        try handle.writeProtect(range, mode: .writeProtect)
        return range
    }

    private static func synchronous(pages: Int) throws -> (Double, Bool) {
        let uffd = try Userfaultfd(features: [.pagefaultFlagWP])
        let handle = uffd.handle
        let range = try protectedMemory(handle, pages: pages)
        defer { munmap(range.pointer, Int(range.length)) }
        let stop = try StopSignal()
        let marked = UnsafeMutablePointer<UInt8>.allocate(capacity: pages)
        marked.initialize(repeating: 0, count: pages)
        defer { marked.deallocate() }
        let markedAddress = UInt(bitPattern: marked)
        let start = range.start
        let handler = DedicatedThread(name: "wp-handler") {
            let events = Userfaultfd.EventBuffer(capacity: 16)
            let marks = UnsafeMutablePointer<UInt8>(bitPattern: markedAddress)!
            while let ready = try? handle.wait(stop: stop), ready == .ready {
                guard (try? handle.readEvents(into: events)) != nil else { continue }
                for case .pageFault(let f) in events.events {
                    let page = f.address & ~4095
                    marks[Int(page - start) / 4096] = 1
                    _ = try? handle.writeProtect(MemoryRange(start: page, length: 4096), mode: [])
                }
            }
        }
        let t0 = MonotonicClock.nanoseconds()
        for i in 0..<pages { range.pointer.storeBytes(of: 2, toByteOffset: i * 4096, as: UInt8.self) }
        let t1 = MonotonicClock.nanoseconds()
        stop.raise()
        handler.join()
        let all = (0..<pages).allSatisfy { marked[$0] == 1 }
        return (Double(t1 - t0) / Double(pages), all)
    }

    private static func asynchronous(pages: Int) throws -> (Double, Bool) {
        let uffd = try Userfaultfd(features: [.pagefaultFlagWP, .wpAsync])
        let range = try protectedMemory(uffd.handle, pages: pages)
        defer { munmap(range.pointer, Int(range.length)) }
        let scanner = try PagemapScanner(regionCapacity: 4096)
        let t0 = MonotonicClock.nanoseconds()
        for i in 0..<pages { range.pointer.storeBytes(of: 2, toByteOffset: i * 4096, as: UInt8.self) }
        var found = 0
        var from = range.start
        while from < range.end {
            let r = try scanner.scan(MemoryRange(start: from, end: range.end), flags: .writeProtectMatching, required: .written)
            found += r.pageCount
            if r.walkEnd <= from { break }
            from = r.walkEnd
        }
        let t1 = MonotonicClock.nanoseconds()
        return (Double(t1 - t0) / Double(pages), found == pages)
    }
}
