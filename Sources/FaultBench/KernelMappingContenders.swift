import Userfaultfd
import _CBenchReference

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The kernel's own paths that the engine competes with beyond anonymous first touch:
/// a private mapping of the image file, and first touch on the scale runs' layout.
enum KernelMappingContenders {
    /// `kernel-file-mmap…`: a `MAP_PRIVATE` mapping of the image file (the source
    /// written to a temporary file once per bench), its pages touched in `pattern`'s
    /// order: read (the kernel maps the page-cache page), or written (the kernel copies
    /// it into a private page).
    ///
    /// - Parameters:
    ///   - cold: drop the file's pages from the page cache first (`fsync`, then
    ///     `POSIX_FADV_DONTNEED`: only this file, not the whole machine's cache), so
    ///     every touched page is read from the disk. The run is marked failed if pages
    ///     stay cached.
    ///   - write: write one byte per page (the byte the image holds there) instead of
    ///     reading it.
    static func fileMapping(_ workload: Workload, _ pattern: AccessPattern, cold: Bool, write: Bool) -> RunOutcome {
        let order = workload.order(pattern)
        let fd: Int32
        do {
            fd = try workload.imageFile()
        } catch {
            return .notMeasured("\(error)")
        }
        let length = workload.sourceLength
        var stillCached = 0
        var notCached = 0
        if !cold {
            // Page-cached means all of it: earlier cold runs dropped it, memory pressure may have.
            readWholeFile(fd, length: length)
            notCached = length / workload.pageSize - cachedPages(fd, length: length)
        } else {
            if fsync(fd) != 0 { return .notMeasured("fsync of the image file failed: errno \(errno)") }
            let rc = posix_fadvise(fd, 0, off_t(length), POSIX_FADV_DONTNEED)
            if rc != 0 { return .notMeasured("posix_fadvise(DONTNEED) of the image file failed: errno \(rc)") }
            stillCached = cachedPages(fd, length: length)
        }
        // Writable in both passes (private: nothing reaches the file), so a deliberate
        // corruption can be applied before the verification.
        guard let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0), p != MAP_FAILED else {
            return .notMeasured("mmap of the image file failed: errno \(errno)")
        }
        defer { munmap(p, length) }
        _ = madvise(p, length, MADV_NOHUGEPAGE)
        let started = cbench_now_ns()
        if write {
            writeImageBytes(p, source: UnsafeRawPointer(workload.source.baseAddress), order: order, pageSize: workload.pageSize)
        } else {
            var sink: UInt64 = 0
            _ = order.withUnsafeBufferPointer {
                cbench_touch_read(p, $0.baseAddress, $0.count, workload.pageSize, &sink)
            }
        }
        let ns = cbench_now_ns() - started
        let problem = workload.verify(region: p, order: order)
        var failure: String? = nil
        if stillCached > 0 {
            failure = "\(stillCached) of \(length / workload.pageSize) file pages stayed in the page cache after POSIX_FADV_DONTNEED"
        } else if notCached > 0 {
            failure = "\(notCached) of \(length / workload.pageSize) file pages were not in the page cache after reading the file"
        }
        return .measured(Run(nanoseconds: ns, pages: order.count, mismatch: problem, failure: failure))
    }

    /// Writes, for each page in `order`, the image's first byte of that page into it:
    /// one write fault per page, leaving the bytes as the image holds them.
    @inline(never)
    static func writeImageBytes(_ base: UnsafeMutableRawPointer, source: UnsafeRawPointer, order: [UInt64], pageSize: Int) {
        order.withUnsafeBufferPointer { pages in
            for page in pages {
                let offset = Int(page) &* pageSize
                (base + offset).storeBytes(of: source.load(fromByteOffset: offset, as: UInt8.self), as: UInt8.self)
            }
        }
    }

    /// Reads the file's first `length` bytes once (untimed), so they are in the page cache.
    static func readWholeFile(_ fd: Int32, length: Int) {
        let chunk = 1 << 20
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: systemPageSize)
        defer { buffer.deallocate() }
        var done = 0
        while done < length {
            let n = retryOnInterrupt { pread(fd, buffer, min(chunk, length - done), off_t(done)) }
            if n <= 0 { return }
            done += n
        }
    }

    /// How many of the file's first `length` bytes' pages are in the page cache.
    static func cachedPages(_ fd: Int32, length: Int) -> Int {
        guard let p = mmap(nil, length, PROT_READ, MAP_SHARED, fd, 0), p != MAP_FAILED else { return 0 }
        defer { munmap(p, length) }
        var vector = [UInt8](repeating: 0, count: length / systemPageSize)
        guard mincore(p, length, &vector) == 0 else { return 0 }
        return vector.count { $0 & 1 != 0 }
    }

    /// `kernel-first-touch-1gib` / `-1tib`: the kernel's own zero-fill fault on the
    /// scale runs' layout (a region of `regionPages` pages written at the pages of
    /// `order`), so that the engine's share of the scale cost can be told from the
    /// kernel's (page-table allocation over a sparse region is the kernel's cost too).
    static func firstTouch(_ workload: Workload, regionPages: UInt64, order: [UInt64]) -> RunOutcome {
        BaselineContenders.withAnonymousRegion(length: Int(regionPages) * workload.pageSize) { region in
            let base = region.base
            _ = madvise(base, region.length, MADV_NOHUGEPAGE)
            let ns = order.withUnsafeBufferPointer {
                cbench_touch_write(base, $0.baseAddress, $0.count, workload.pageSize, BaselineContenders.touchMarker)
            }
            let problem = workload.verify(region: base, order: order, zeroFilledWithMarker: BaselineContenders.touchMarker)
            return .measured(Run(nanoseconds: ns, pages: order.count, mismatch: problem))
        }
    }
}

extension Workload {
    /// The image file (the source's bytes), written on first use and removed with the
    /// workload. Returns its descriptor (owned by the workload).
    func imageFile() throws(BenchError) -> Int32 {
        if let image = imageFileDescriptor { return image }
        var template = Array("/tmp/uffd-bench-image-XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        if fd < 0 { throw BenchError("cannot create the image file in /tmp: errno \(errno)") }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        let path = String(decoding: template.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self)
        unlink(path)   // open descriptors keep it; nothing is left behind
        var done = 0
        let base = UnsafeRawPointer(source.baseAddress)
        while done < sourceLength {
            let n = retryOnInterrupt { Glibc.write(fd, base + done, sourceLength - done) }
            if n <= 0 {
                let e = errno
                close(fd)
                throw BenchError("cannot write the \(sourceLength)-byte image file: errno \(e)")
            }
            done += n
        }
        imageFileDescriptor = fd
        return fd
    }
}
