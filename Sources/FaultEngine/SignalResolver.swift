import Synchronization
import SystemPackage
import Userfaultfd
import _CFaultEngine

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// One server's place in the process-wide SIGBUS resolver (C, async-signal-safe).
///
/// The resolver reads an immutable table of the server's regions; every layout
/// change publishes a new table. Sources the resolver cannot read itself (neither
/// memory nor a file) are served by the handler thread: the faulting thread writes
/// the address to a pipe and waits on a futex until the page is installed.
final class SignalResolverRegistration: @unchecked Sendable {
    private let slot: Int32
    private let handle: Userfaultfd.Handle
    private let backing: SignalSafeBacking?
    private let chunkPages: Int
    private let maxChunkPages: Int
    private let pageSize: Int
    private let recorder: WorkingSetRecorder?
    /// Word 0: faults resolved in-thread; word 1: pages poisoned there.
    private let counters: UnsafeMutablePointer<UInt64>
    /// Bumped (and futex-woken) after the handler installs a page asked for.
    let generation: UnsafeMutablePointer<UInt32>
    /// The request pipe (read end, write end) when the handler serves the faults.
    let requestPipe: (read: Int32, write: Int32)?
    private let published = Mutex<[UInt]>([])
    private let registered = Atomic<Bool>(true)

    init(handle: Userfaultfd.Handle, regions: [RegionEntry], backing: SignalSafeBacking?, chunkPages: Int,
         maxChunkPages: Int, pageSize: Int, recorder: WorkingSetRecorder?) throws(UserfaultfdError) {
        let slot = cfe_resolver_claim_slot()
        if slot < 0 {
            throw UserfaultfdError(operation: "FaultServer.start", kind: .invalidArgument(
                "too many servers use the SIGBUS resolver at once (64 at most)"))
        }
        var pipe: (Int32, Int32)? = nil
        if backing == nil {
            var fds: [Int32] = [-1, -1]
            if cfe_pipe_nonblocking(&fds) != 0 {
                let e = Errno(rawValue: errno)
                cfe_resolver_release_slot(slot)
                throw UserfaultfdError(operation: "pipe2 (SIGBUS request pipe)", errno: e)
            }
            pipe = (fds[0], fds[1])
        }
        self.slot = slot
        self.handle = handle
        self.backing = backing
        self.chunkPages = chunkPages
        self.maxChunkPages = max(chunkPages, maxChunkPages)
        self.pageSize = pageSize
        self.recorder = recorder
        self.requestPipe = pipe
        counters = .allocate(capacity: 2)
        counters.initialize(repeating: 0, count: 2)
        generation = .allocate(capacity: 1)
        generation.initialize(to: 0)
        update(regions)
    }

    deinit {
        unregister()
        counters.deallocate()
        generation.deallocate()
    }

    /// Faults resolved in the faulting thread.
    var resolvedFaults: UInt64 { cfe_atomic_load_u64(counters) }
    /// Pages poisoned by the resolver because the backing could not be read.
    var poisonedPages: UInt64 { cfe_atomic_load_u64(counters + 1) }

    /// Publishes the regions as they are now.
    func update(_ regions: [RegionEntry]) {
        guard registered.load(ordering: .acquiring) else { return }
        guard let table = cfe_table_allocate(regions.count) else { return }
        table.pointee.uffd = handle.fileDescriptor.rawValue
        table.pointee.chunk_pages = UInt64(chunkPages)
        table.pointee.max_chunk_pages = UInt64(maxChunkPages)
        table.pointee.page_size = UInt64(pageSize)
        switch backing {
        case .memory(let address, let length)?:
            table.pointee.backing_kind = Int32(CFE_BACKING_MEMORY.rawValue)
            table.pointee.memory = UnsafePointer(bitPattern: address)
            // The source's last page is readable whole (its tail reads as zeros).
            table.pointee.memory_length = (length &+ UInt64(pageSize) &- 1) / UInt64(pageSize) &* UInt64(pageSize)
        case .file(let descriptor, let offset, let length)?:
            table.pointee.backing_kind = Int32(CFE_BACKING_FILE.rawValue)
            table.pointee.file_fd = descriptor
            table.pointee.file_offset = offset
            table.pointee.file_length = length
        case nil:
            table.pointee.backing_kind = Int32(CFE_BACKING_HANDLER.rawValue)
            table.pointee.request_fd = requestPipe?.write ?? -1
        }
        if let recorder {
            table.pointee.record = recorder.buffer
            table.pointee.record_capacity = recorder.capacity
        }
        table.pointee.resolved = counters
        table.pointee.poisoned = counters + 1
        table.pointee.generation = generation
        for (k, e) in regions.enumerated() {
            cfe_table_region(table, k).pointee = cfe_region(start: e.range.start, length: e.range.length, source_offset: e.sourceOffset,
                                    resident: e.resident, zeroed: e.zeroed, poisoned: e.poisoned, first_bit: e.firstBit)
        }
        published.withLock { list in
            _ = cfe_resolver_publish(slot, table)
            list.append(UInt(bitPattern: table))
        }
    }

    /// Makes faulting threads stop waiting for the handler thread, and waits until none
    /// is inside the resolver: after that, none still uses the uffd it had read from
    /// the table (a server retires its uffd first, then calls this).
    func drain() {
        cfe_resolver_begin_closing(slot)
        cfe_resolver_quiesce(slot)
    }

    /// Withdraws the regions from the resolver and frees the tables.
    func unregister() {
        guard registered.exchange(false, ordering: .acquiringAndReleasing) else { return }
        let tables = published.withLock { list -> [UInt] in
            cfe_resolver_retire(slot)
            _ = cfe_resolver_publish(slot, nil)
            let all = list
            list = []
            return all
        }
        // No faulting thread can reach the tables any more once those inside are out.
        cfe_resolver_quiesce(slot)
        for t in tables { cfe_table_free(UnsafeMutablePointer(bitPattern: t)) }
        cfe_resolver_release_slot(slot)
        if let requestPipe {
            _ = Glibc.close(requestPipe.read)
            _ = Glibc.close(requestPipe.write)
        }
    }
}
