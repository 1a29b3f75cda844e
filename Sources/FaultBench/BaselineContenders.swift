import Userfaultfd
import _CBenchReference

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The contenders that do not use the engine: the physical limit, the kernel's own
/// fault path, the SIGSEGV scheme and the C reference handler.
enum BaselineContenders {
    /// `memcpy`: copies the pages, in touch order, into already-populated memory.
    static func memcpy(_ workload: Workload, _ pattern: AccessPattern) -> RunOutcome {
        let order = workload.order(pattern)
        return withAnonymousRegion(length: workload.sourceLength, naming: "the destination") { region in
            let base = region.base
            _ = madvise(base, region.length, MADV_NOHUGEPAGE)
            populate(base, length: region.length)
            let ns = order.withUnsafeBufferPointer {
                cbench_copy_pages(base, workload.source.baseAddress, workload.pageCount, $0.baseAddress, $0.count, workload.pageSize)
            }
            let problem = workload.verify(region: base, order: order)
            return .measured(Run(nanoseconds: ns, pages: order.count, mismatch: problem))
        }
    }

    /// The byte `kernel-first-touch` writes into each page it touches.
    static let touchMarker: UInt8 = 0xA5

    /// `kernel-first-touch`: writes one byte of each page of fresh anonymous memory
    /// (4 KiB pages: transparent huge pages are turned off for the region).
    static func kernelFirstTouch(_ workload: Workload, _ pattern: AccessPattern) -> RunOutcome {
        KernelMappingContenders.firstTouch(workload, regionPages: UInt64(workload.pageCount), order: workload.order(pattern))
    }

    /// Runs `body` over fresh anonymous memory of `length` bytes; `what` names the
    /// memory in the reason it is not measured if it cannot be mapped.
    static func withAnonymousRegion(
        length: Int, naming what: String = "the region", _ body: (borrowing MemoryMapping) -> RunOutcome
    ) -> RunOutcome {
        let region: MemoryMapping
        do {
            region = try MemoryMapping.anonymous(length: length)
        } catch {
            return .notMeasured("cannot map \(what): \(error)")
        }
        return body(region)
    }

    /// `sigsegv-mprotect` (and the SIGSEGV scale runs): a PROT_NONE region of
    /// `regionPages` pages whose pages in `order` are read; a SIGSEGV handler
    /// mprotects each faulting page and copies it in.
    static func sigsegv(_ workload: Workload, regionPages: UInt64, order: [UInt64]) -> RunOutcome {
        let length = Int(regionPages) * workload.pageSize
        return withAnonymousRegion(length: length) { region in
            let base = region.base
            if mprotect(base, length, PROT_NONE) != 0 {
                return .notMeasured("mprotect PROT_NONE of the region failed: errno \(errno)")
            }
            var result = cbench_sigsegv_result()
            let rc = order.withUnsafeBufferPointer {
                cbench_sigsegv_run(base, length, workload.source.baseAddress, workload.pageCount,
                                   $0.baseAddress, $0.count, workload.pageSize, &result)
            }
            if rc != 0 { return .notMeasured("cannot install the SIGSEGV handler: errno \(rc)") }
            let done = Int(result.pages_done)
            let problem = workload.verify(region: region.base, order: Array(order.prefix(done)))
            if result.error != 0 {
                let limit = readMaxMapCount().map { " (vm.max_map_count \($0))" } ?? ""
                let why = result.error == ENOMEM ? "ran out of VMAs\(limit)" : "mprotect failed with errno \(result.error)"
                return .measured(Run(nanoseconds: result.elapsed_ns, pages: done, mismatch: problem,
                                     failure: "failed: \(why) after \(done) of \(order.count) pages; the figure is for those pages"))
            }
            return .measured(Run(nanoseconds: result.elapsed_ns, pages: done, mismatch: problem))
        }
    }

    /// `c-handler-4k` / `c-handler-64k` (and the scale runs without the engine): the C
    /// reference handler thread serving a region of `regionPages` pages with one
    /// UFFDIO_COPY of `chunk` bytes per fault, while this thread reads the pages in `order`.
    static func cHandler(_ workload: Workload, chunk: Int, regionPages: UInt64, order: [UInt64]) -> RunOutcome {
        withAnonymousRegion(length: Int(regionPages) * workload.pageSize) { region in
            let uffd: Userfaultfd
            do {
                uffd = try Userfaultfd(features: [])
            } catch {
                return .notMeasured("cannot create a userfaultfd: \(error)")
            }
            do {
                try uffd.handle.register(region.range, mode: .missing, requiring: [.copy, .wake])
            } catch {
                return .notMeasured("cannot register the region: \(error)")
            }
            var handler: OpaquePointer?
            // Timed from the handler's start, like the engine's servers.
            let started = cbench_now_ns()
            let rc = cbench_handler_start(uffd.fileDescriptor.rawValue, region.range.start, region.range.length,
                                          workload.source.baseAddress, UInt64(workload.sourceLength), UInt64(chunk), &handler)
            guard rc == 0, let handler else { return .notMeasured("cannot start the C reference handler: errno \(rc)") }
            var sink: UInt64 = 0
            let base = region.base
            _ = order.withUnsafeBufferPointer {
                cbench_touch_read(base, $0.baseAddress, $0.count, workload.pageSize, &sink)
            }
            let ns = cbench_now_ns() - started
            let problem = workload.verify(region: region.base, order: order)
            var stats = cbench_handler_stats()
            cbench_handler_stop(handler, &stats)
            let failure = stats.errors == 0 ? nil : "the C handler saw \(stats.errors) error(s), last errno \(stats.last_error)"
            return .measured(Run(nanoseconds: ns, pages: order.count, mismatch: problem, failure: failure))
        }
    }

    /// Populates `length` bytes at `base` for writing, without timing it.
    static func populate(_ base: UnsafeMutableRawPointer, length: Int) {
        let madvPopulateWrite: Int32 = 23
        if madvise(base, length, madvPopulateWrite) != 0 {
            memset(base, 0, length)
        }
    }

    static func readMaxMapCount() -> Int? {
        let fd = open("/proc/sys/vm/max_map_count", O_RDONLY | O_CLOEXEC)
        if fd < 0 { return nil }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 32)
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard n > 0 else { return nil }
        return Int(String(decoding: buffer[0..<n], as: UTF8.self).filter(\.isNumber))
    }
}
