import Foundation
import PagedMemory
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// Maps the bench's files for one contender: the kernel's `mmap`, or a ``Pager``.
final class Mapper {
    let contender: Contender
    let options: MapBenchOptions
    private var pager: Pager?
    private var kernelMappings: [(UnsafeMutableRawPointer, Int)] = []
    private var pagedMappings: [PagedMapping] = []

    init(_ contender: Contender, options: MapBenchOptions, bufferBytes: Int) throws {
        self.contender = contender
        self.options = options
        if contender.isPager {
            var c = PagerConfiguration(bufferBytes: bufferBytes)
            c.softEviction = contender == .pagerSoft || contender == .pagerInThreadSoft
            c.softEvictionFraction = options.softEvictionFraction
            c.highWater = options.highWater
            c.lowWater = options.lowWater
            c.fillers = options.fillers
            c.fillerPriority = options.fillerPriority
            c.policy = contender == .pagerFIFO ? .fifo : .clock
            c.resolution = contender == .pagerInThread || contender == .pagerInThreadSoft ? .faultingThread : .handlerThreads
            pager = try Pager(c)
        }
    }

    /// Maps `path` whole, readable and writable, with `pageSize` for the pager.
    func map(_ path: String, pageSize: Int) throws -> UnsafeMutableRawPointer {
        if let pager {
            let store = try FileStore(path: path, mode: options.storeMode)
            let m = try pager.map(store, pageSize: pageSize)
            pagedMappings.append(m)
            return m.base
        }
        let fd = open(path, O_RDWR | O_CLOEXEC)
        if fd < 0 { throw Errno(rawValue: errno) }
        defer { Glibc.close(fd) }
        var st = stat()
        fstat(fd, &st)
        let length = Int(st.st_size)
        guard let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), p != MAP_FAILED else {
            throw Errno(rawValue: errno)
        }
        if contender == .mmapRandom { madvise(p, length, MADV_RANDOM) }
        kernelMappings.append((p, length))
        return p
    }

    /// Makes every write durable: `msync(MS_SYNC)` or the pager's flush.
    func sync() throws {
        for (p, n) in kernelMappings where msync(p, n, MS_SYNC) != 0 { throw Errno(rawValue: errno) }
        for m in pagedMappings { try m.flush() }
    }

    /// The pager's statistics, if there is a pager.
    var statistics: PagerStatistics? { pager?.statistics }

    func close() throws {
        for (p, n) in kernelMappings { munmap(p, n) }
        kernelMappings = []
        for m in pagedMappings { try m.unmap() }
        pagedMappings = []
        pager?.shutdown()
    }
}
