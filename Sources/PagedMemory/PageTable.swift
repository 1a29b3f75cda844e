import Userfaultfd

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
///
/// One flag byte per page: the ``PageState`` (bits 0–2), dirty (bit 3), kept in the
/// private scratch file (bit 4) and the replacement credit (bits 5–6). One history
/// byte per page counts the times it was filled (saturating).
final class PageTable: @unchecked Sendable {
    let base: UInt64
    let length: Int
    let pageSize: Int
    let pageCount: Int
    let store: any PageStore
    let isPrivate: Bool
    let slot: Int
    let generation: UInt32
    /// Dirty pages of a private mapping that were evicted (created on first need).
    var scratch: FileStore?
    var flags: UnsafeMutablePointer<UInt8>
    var history: UnsafeMutablePointer<UInt8>
    /// Pages in a transient state (filling, evicting, cleaning): unmapping waits for none.
    var busyPages = 0
    var residentPages = 0
    var closing = false
    /// Sequential read-ahead: the last page a fault asked for and the current window.
    var lastFaultPage = -2
    var readAheadWindow = 1
    var errors: [PagedMappingError] = []
    var droppedErrors = 0

    static let stateMask: UInt8 = 0x07
    static let dirtyBit: UInt8 = 0x08
    static let scratchBit: UInt8 = 0x10
    static let creditShift: UInt8 = 5
    static let maxCredit: UInt8 = 3

    init(base: UInt64, length: Int, pageSize: Int, store: any PageStore, isPrivate: Bool, slot: Int, generation: UInt32) {
        self.base = base
        self.length = length
        self.pageSize = pageSize
        self.pageCount = length / pageSize
        self.store = store
        self.isPrivate = isPrivate
        self.slot = slot
        self.generation = generation
        flags = .allocate(capacity: pageCount)
        flags.initialize(repeating: 0, count: pageCount)
        history = .allocate(capacity: pageCount)
        history.initialize(repeating: 0, count: pageCount)
        errors.reserveCapacity(Self.errorCapacity)
    }

    deinit {
        flags.deallocate()
        history.deallocate()
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
    @inline(__always) func credit(_ page: Int) -> UInt8 { (flags[page] >> Self.creditShift) & 0x3 }
    @inline(__always) func setCredit(_ page: Int, _ c: UInt8) {
        flags[page] = (flags[page] & 0x9F) | (min(c, Self.maxCredit) << Self.creditShift)
    }

    @inline(__always) func pageIndex(_ address: UInt64) -> Int { Int(address - base) / pageSize }
    @inline(__always) func address(_ page: Int) -> UInt64 { base + UInt64(page * pageSize) }
    @inline(__always) func range(_ page: Int, count: Int = 1) -> MemoryRange {
        MemoryRange(start: address(page), length: UInt64(count * pageSize))
    }
    var end: UInt64 { base + UInt64(length) }

    /// Records `error` (the first ``errorCapacity``; later ones are counted). Allocates nothing.
    func record(_ error: PagedMappingError) {
        if errors.count < Self.errorCapacity { errors.append(error) } else { droppedErrors += 1 }
    }
}
