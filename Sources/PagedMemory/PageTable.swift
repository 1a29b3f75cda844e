import Userfaultfd
import _CPagedMemory

/// The state of one page of a mapping, in the low three bits of its flag byte.
enum PageState: UInt8 {
    /// Not in memory: the next access faults.
    case absent = 0
    /// A filler is reading it.
    case filling = 1
    /// In memory.
    case resident = 2
    /// An evictor is writing it back or dropping it.
    case evicting = 3
    /// A flush is writing it back; it stays in memory.
    case cleaning = 4
    /// Its read failed: the page is poisoned and every access gets SIGBUS.
    case poisoned = 5
}

/// One mapping's pages and bookkeeping. Every field is guarded by the pager's lock.
/// The fields the in-thread resolver also uses live in a C `cpaged_region`.
///
/// One flag byte per page: the ``PageState`` (bits 0–2), dirty (bit 3), kept in the
/// private scratch file (bit 4), the replacement credit (bits 5–6) and soft-evicted
/// (bit 7: unmapped but kept in the memfd, see ``PagerConfiguration/softEviction``).
/// One history byte per page counts the times it was filled (saturating).
final class PageTable: @unchecked Sendable {
    let base: UInt64
    let length: Int
    let pageSize: Int
    let pageCount: Int
    let store: any PageStore
    let isPrivate: Bool
    let slot: Int
    let generation: UInt32
    /// The userfaultfd the range is registered on (the filler threads' one, or the in-thread one).
    let handle: Userfaultfd.Handle
    /// Whether faults are resolved in the faulting thread (SIGBUS) rather than by the fillers.
    let inThread: Bool
    /// The bookkeeping shared with the in-thread resolver.
    let c: UnsafeMutablePointer<cpaged_region>
    /// Dirty pages of a private mapping that were evicted (created on first need).
    var scratch: FileStore?
    var flags: UnsafeMutablePointer<UInt8>
    var history: UnsafeMutablePointer<UInt8>
    /// Pages in a transient state (filling, evicting, cleaning): unmapping waits for none.
    var busyPages: Int {
        get { Int(c.pointee.busy_pages) }
        set { c.pointee.busy_pages = Int64(newValue) }
    }
    var residentPages: Int {
        get { Int(c.pointee.resident_pages) }
        set { c.pointee.resident_pages = Int64(newValue) }
    }
    var closing = false
    /// Pages soft-evicted now (kept with the in-thread resolver's state).
    var softPages: Int {
        get { Int(c.pointee.soft_pages) }
        set { c.pointee.soft_pages = Int64(newValue) }
    }
    /// The memfd holding the pages of a soft-evicting table (-1: anonymous memory).
    let memfd: Int32
    /// A second, unregistered mapping of the memfd: write-back reads pages there, so
    /// that it never faults on a soft-evicted page (0: none).
    let alias: UInt64
    /// Whether the table's pages are soft-evicted before they are dropped.
    var softEvicts: Bool { memfd >= 0 }
    /// Sequential read-ahead: the last page a fault asked for and the current window.
    var lastFaultPage: Int {
        get { Int(c.pointee.last_fault_page) }
        set { c.pointee.last_fault_page = Int64(newValue) }
    }
    var readAheadWindow: Int {
        get { Int(c.pointee.read_ahead_window) }
        set { c.pointee.read_ahead_window = Int64(newValue) }
    }
    var errors: [PagedMappingError] = []
    var droppedErrors = 0

    static let stateMask: UInt8 = 0x07
    static let dirtyBit: UInt8 = 0x08
    static let scratchBit: UInt8 = 0x10
    static let softBit: UInt8 = 0x80
    static let creditShift: UInt8 = 5
    static let maxCredit: UInt8 = 3

    init(base: UInt64, length: Int, pageSize: Int, store: any PageStore, isPrivate: Bool, slot: Int, generation: UInt32,
         handle: Userfaultfd.Handle, inThread: Bool, memfd: Int32 = -1, alias: UInt64 = 0) {
        self.base = base
        self.memfd = memfd
        self.alias = alias
        self.length = length
        self.pageSize = pageSize
        self.pageCount = length / pageSize
        self.store = store
        self.isPrivate = isPrivate
        self.slot = slot
        self.generation = generation
        self.handle = handle
        self.inThread = inThread
        flags = .allocate(capacity: pageCount)
        flags.initialize(repeating: 0, count: pageCount)
        history = .allocate(capacity: pageCount)
        history.initialize(repeating: 0, count: pageCount)
        errors.reserveCapacity(Self.errorCapacity)
        c = .allocate(capacity: 1)
        c.initialize(to: cpaged_region())
        c.pointee.base = base
        c.pointee.length = UInt64(length)
        c.pointee.page_size = Int64(pageSize)
        c.pointee.page_count = Int64(pageCount)
        c.pointee.flags = flags
        c.pointee.history = history
        c.pointee.slot = UInt32(slot)
        c.pointee.generation = generation
        c.pointee.uffd = handle.fileDescriptor.rawValue
        c.pointee.file_fd = store.signalReadableDescriptor ?? -1
        c.pointee.file_size = Int64(store.size)
        c.pointee.scratch_fd = -1
        c.pointee.in_thread = inThread ? 1 : 0
        c.pointee.last_fault_page = -2
        c.pointee.read_ahead_window = 1
        c.pointee.soft_evicts = memfd >= 0 ? 1 : 0
    }

    deinit {
        flags.deallocate()
        history.deallocate()
        c.deallocate()
    }

    /// Moves the errors the in-thread resolver saw into ``errors`` (lock held).
    func collectResolverErrors() {
        let n = Int(c.pointee.error_count)
        if n == 0 { return }
        withUnsafeBytes(of: c.pointee.errors) { raw in
            for e in raw.bindMemory(to: cpaged_error.self).prefix(n) {
                let kind: PagedMappingError.Kind
                switch e.kind {
                case CPAGED_ERROR_READ: kind = .readFailed(errno: e.error_number)
                case CPAGED_ERROR_BUFFER: kind = .bufferExhausted
                default: kind = .kernel(errno: e.error_number)
                }
                record(PagedMappingError(kind: kind, offset: Int(e.offset)))
            }
        }
        droppedErrors += Int(c.pointee.errors_dropped)
        c.pointee.error_count = 0
        c.pointee.errors_dropped = 0
    }

    static let errorCapacity = 64

    @inline(__always) func state(_ page: Int) -> PageState { PageState(rawValue: flags[page] & Self.stateMask) ?? .absent }
    @inline(__always) func setState(_ page: Int, _ s: PageState) { flags[page] = (flags[page] & ~Self.stateMask) | s.rawValue }
    @inline(__always) func isDirty(_ page: Int) -> Bool { flags[page] & Self.dirtyBit != 0 }
    @inline(__always) func setDirty(_ page: Int, _ dirty: Bool) {
        flags[page] = dirty ? flags[page] | Self.dirtyBit : flags[page] & ~Self.dirtyBit
    }
    @inline(__always) func inScratch(_ page: Int) -> Bool { flags[page] & Self.scratchBit != 0 }
    @inline(__always) func setInScratch(_ page: Int) { flags[page] |= Self.scratchBit }
    @inline(__always) func isSoft(_ page: Int) -> Bool { flags[page] & Self.softBit != 0 }
    @inline(__always) func setSoft(_ page: Int, _ soft: Bool) {
        flags[page] = soft ? flags[page] | Self.softBit : flags[page] & ~Self.softBit
    }
    @inline(__always) func credit(_ page: Int) -> UInt8 { (flags[page] >> Self.creditShift) & 0x3 }
    @inline(__always) func setCredit(_ page: Int, _ c: UInt8) {
        flags[page] = (flags[page] & ~(0x3 << Self.creditShift)) | (min(c, Self.maxCredit) << Self.creditShift)
    }

    @inline(__always) func pageIndex(_ address: UInt64) -> Int { Int(address - base) / pageSize }
    @inline(__always) func address(_ page: Int) -> UInt64 { base + UInt64(page * pageSize) }
    /// Where write-back reads `page`: the alias mapping if there is one.
    @inline(__always) func sourceAddress(_ page: Int) -> UInt64 { (alias != 0 ? alias : base) + UInt64(page * pageSize) }
    @inline(__always) func range(_ page: Int, count: Int = 1) -> MemoryRange {
        MemoryRange(start: address(page), length: UInt64(count * pageSize))
    }
    var end: UInt64 { base + UInt64(length) }

    /// Records `error` (the first ``errorCapacity``; later ones are counted). Allocates nothing.
    func record(_ error: PagedMappingError) {
        if errors.count < Self.errorCapacity { errors.append(error) } else { droppedErrors += 1 }
    }
}
