/// The queue the evictors take victims from: every resident page once, oldest
/// first. An entry names a mapping slot, its generation and a page; entries of
/// mappings that are gone are dropped when they come up. Guarded by the pager's lock;
/// its storage is allocated once.
struct VictimQueue: ~Copyable {
    private let storage: UnsafeMutablePointer<UInt64>
    let capacity: Int
    private var head = 0
    private(set) var count = 0

    init(capacity: Int) {
        self.capacity = max(capacity, 16)
        storage = .allocate(capacity: self.capacity)
    }

    deinit { storage.deallocate() }

    @inline(__always)
    static func entry(slot: Int, generation: UInt32, page: Int) -> UInt64 {
        UInt64(slot & 0xFFFFF) << 44 | UInt64(generation & 0xFFF) << 32 | UInt64(UInt32(truncatingIfNeeded: page))
    }

    @inline(__always)
    static func decode(_ e: UInt64) -> (slot: Int, generation: UInt32, page: Int) {
        (Int(e >> 44), UInt32((e >> 32) & 0xFFF), Int(e & 0xFFFF_FFFF))
    }

    /// Appends an entry; when full, first drops the entries `isLive` rejects.
    /// - Returns: false if the queue is full of live entries.
    mutating func push(_ e: UInt64, isLive: (UInt64) -> Bool) -> Bool {
        if count == capacity { compact(isLive) }
        if count == capacity { return false }
        storage[(head + count) % capacity] = e
        count += 1
        return true
    }

    mutating func pop() -> UInt64? {
        if count == 0 { return nil }
        let e = storage[head]
        head = (head + 1) % capacity
        count -= 1
        return e
    }

    private mutating func compact(_ isLive: (UInt64) -> Bool) {
        var kept = 0
        for i in 0..<count {
            let e = storage[(head + i) % capacity]
            if isLive(e) {
                storage[(head + kept) % capacity] = e
                kept += 1
            }
        }
        count = kept
    }
}
