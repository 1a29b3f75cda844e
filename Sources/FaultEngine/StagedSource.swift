import Synchronization
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A source whose pages are staged ahead of the faults, so the move strategy installs
/// them with `UFFDIO_MOVE` instead of allocating a page per fault.
///
/// Fill threads map fresh anonymous staging memory laid out like the source, populate
/// it (`MADV_POPULATE_WRITE`, so the pages are allocated in one call and not faulted in
/// one by one) and copy the base source's bytes into it, in chunks that grow from
/// 64 KiB up to 2 MiB while the fill runs on in order. A filled block is published
/// with one atomic store; the server's handler asks ``movablePages(at:length:)``, which
/// reads those flags and hands the staged pages over without allocating or locking.
/// Pages not staged yet are copied in place from the base source (`UFFDIO_COPY`), and
/// the fill thread skips ahead past them, so it keeps ahead of sequential faults.
///
/// Serve it with ``FaultServerConfiguration/Strategy/move(chunkPages:)`` on private
/// anonymous memory and a uffd with FEATURE_MOVE, and call ``start()`` together with
/// the server. The pool only pays where a CPU is free for the fill threads: the
/// populate and copy cost as much as the kernel's own `UFFDIO_COPY`, plus the MOVE.
public final class StagedSource<Base: PageSource>: PageSource, @unchecked Sendable {
    /// What the pool did: the path each run took, and why.
    public struct Statistics: Sendable, Hashable, CustomStringConvertible {
        /// Pages filled into staging memory.
        public var pagesStaged: UInt64
        /// Pages handed to the server to install with `UFFDIO_MOVE`.
        public var pagesMoved: UInt64
        /// Runs asked for before they were staged (the server copied them in place).
        public var runsNotStaged: UInt64
        /// Pages in those runs.
        public var pagesNotStaged: UInt64
        /// Chunks whose populate failed (their pages were faulted in by the copy instead).
        public var populateFailures: UInt64
        /// Chunks the base source failed to fill (never handed over; the server
        /// asks the base source itself for them and reports its error).
        public var fillFailures: UInt64

        public var description: String {
            "MOVE from the staging pool: \(pagesMoved) pages; COPY in place, not staged yet: \(pagesNotStaged) pages "
                + "in \(runsNotStaged) runs; staged \(pagesStaged) pages; populate failures \(populateFailures), "
                + "fill failures \(fillFailures)"
        }
    }

    private let pool: Pool

    /// A pool over `base`, whose length must be known.
    ///
    /// - Parameters:
    ///   - base: where the bytes come from (filled on the fill threads).
    ///   - fillThreads: threads filling the pool (at least 1).
    ///   - window: how far, in bytes, the fill may run ahead of the furthest page asked for.
    /// - Throws: `UserfaultfdError` when the base source has no length or the staging
    ///   memory cannot be reserved.
    public init(_ base: Base, fillThreads: Int = 1, window: Int = 64 << 20) throws(UserfaultfdError) {
        guard let length = base.length, length > 0 else {
            throw UserfaultfdError(operation: "StagedSource", kind: .invalidArgument("the base source's length must be known and positive"))
        }
        if fillThreads < 1 || fillThreads > 16 {
            throw UserfaultfdError(operation: "StagedSource", kind: .invalidArgument("fillThreads \(fillThreads) must lie in 1...16"))
        }
        pool = try Pool(base: base, length: length, fillThreads: fillThreads, window: UInt64(max(window, Pool.blockBytes)))
    }

    deinit { pool.stop() }

    /// Starts the fill threads (once; later calls do nothing).
    public func start() throws(UserfaultfdError) { try pool.start() }

    /// Stops the fill threads and waits for them.
    public func stop() { pool.stop() }

    /// What the pool did so far.
    public var statistics: Statistics { pool.statistics }

    public var length: UInt64? { pool.length }

    @inline(__always)
    public func fill(_ destination: UnsafeMutableRawBufferPointer, at sourceOffset: UInt64) throws(PageSourceError) {
        try pool.base.fill(destination, at: sourceOffset)
    }

    /// The base source's bytes in place, for the runs the server copies: the pool
    /// stops staging the whole blocks among them (they are installed now).
    @inline(__always)
    public func contiguousBytes(at sourceOffset: UInt64, length: Int) -> UnsafeRawPointer? {
        pool.copied(at: sourceOffset, length: UInt64(length))
        return pool.base.contiguousBytes(at: sourceOffset, length: length)
    }

    /// The staged pages of `length` bytes at `sourceOffset`, if every one is staged;
    /// otherwise nil, and the fill threads skip ahead past them.
    @inline(__always)
    public func movablePages(at sourceOffset: UInt64, length: Int) -> UnsafeMutableRawPointer? {
        pool.take(at: sourceOffset, length: UInt64(length))
    }
}

/// Sources whose pages are either moved (staged) or copied in place: the move strategy
/// copies their unstaged runs with `UFFDIO_COPY` from the source's own memory instead
/// of filling its staging buffer and moving that, and splits a run where staging ends.
protocol CopiesInPlaceWhenNotMovable: AnyObject {
    /// The bytes from `sourceOffset` on (at most `length`) that are all staged or all not.
    func uniformBytes(at sourceOffset: UInt64, length: Int) -> Int
}

extension StagedSource: CopiesInPlaceWhenNotMovable {
    @inline(__always)
    func uniformBytes(at sourceOffset: UInt64, length: Int) -> Int { pool.uniformBytes(at: sourceOffset, length: length) }
}

extension StagedSource {
    /// The staging memory, its block flags and the fill threads (which hold the pool,
    /// not the source, so the source's deinit can stop them).
    final class Pool: @unchecked Sendable {
        static var blockBytes: Int { StagingLayout.blockBytes }
        static var maxChunkBlocks: UInt64 { StagingLayout.maxChunkBlocks }
        static var empty: UInt8 { StagingLayout.empty }
        static var filling: UInt8 { StagingLayout.filling }
        static var staged: UInt8 { StagingLayout.staged }
        static var failed: UInt8 { StagingLayout.failed }
        static var copied: UInt8 { StagingLayout.copied }
        static var leadBlocks: UInt64 { StagingLayout.leadBlocks }
        static var populateWrite: Int32 { StagingLayout.populateWrite }

        let base: Base
        let length: UInt64
        let staging: UnsafeMutableRawPointer
        let mappedLength: Int
        let blocks: UInt64
        let state: UnsafeMutablePointer<Atomic<UInt8>>
        let fillThreads: Int
        let window: UInt64
        /// The furthest byte asked for (the fill stays within `window` of it).
        let frontier = Atomic<UInt64>(0)
        /// 1 + the block a fill thread should stage next (0: none).
        let hint = Atomic<UInt64>(0)
        let stopping = Atomic<Bool>(false)
        let pagesStaged = Atomic<UInt64>(0), pagesMoved = Atomic<UInt64>(0)
        let runsNotStaged = Atomic<UInt64>(0), pagesNotStaged = Atomic<UInt64>(0)
        let populateFailures = Atomic<UInt64>(0), fillFailures = Atomic<UInt64>(0)
        private let threads = Mutex<[DedicatedThread]?>(nil)

        init(base: Base, length: UInt64, fillThreads: Int, window: UInt64) throws(UserfaultfdError) {
            let page = UInt64(systemPageSize)
            let mapped = (length &+ page &- 1) / page &* page
            guard let p = mmap(nil, Int(mapped), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
                p != MAP_FAILED
            else {
                throw UserfaultfdError(operation: "mmap staging pool \(mapped) bytes", errno: .init(rawValue: errno))
            }
            self.base = base
            self.length = length
            staging = p
            mappedLength = Int(mapped)
            blocks = (mapped &+ UInt64(Self.blockBytes) &- 1) / UInt64(Self.blockBytes)
            state = .allocate(capacity: Int(blocks))
            for k in 0..<Int(blocks) { (state + k).initialize(to: Atomic(Self.empty)) }
            self.fillThreads = fillThreads
            self.window = window
        }

        deinit {
            munmap(staging, mappedLength)
            state.deinitialize(count: Int(blocks))
            state.deallocate()
        }

        var statistics: Statistics {
            Statistics(pagesStaged: pagesStaged.load(ordering: .relaxed), pagesMoved: pagesMoved.load(ordering: .relaxed),
                       runsNotStaged: runsNotStaged.load(ordering: .relaxed), pagesNotStaged: pagesNotStaged.load(ordering: .relaxed),
                       populateFailures: populateFailures.load(ordering: .relaxed), fillFailures: fillFailures.load(ordering: .relaxed))
        }

        func start() throws(UserfaultfdError) {
            try threads.withLock { (list) throws(UserfaultfdError) in
                guard list == nil else { return }
                var started: [DedicatedThread] = []
                for k in 0..<fillThreads {
                    do throws(UserfaultfdError) {
                        started.append(try DedicatedThread.start(name: "uffd-stage-\(k)") { [self] in self.fillLoop() })
                    } catch {
                        stopping.store(true, ordering: .relaxed)
                        for t in started { t.join() }
                        throw error
                    }
                }
                list = started
            }
        }

        func stop() {
            stopping.store(true, ordering: .relaxed)
            let running = threads.withLock { list -> [DedicatedThread] in
                let all = list ?? []
                list = []
                return all
            }
            for t in running { t.join() }
        }

        // MARK: - The hand-over (handler threads)

        @inline(__always)
        func take(at offset: UInt64, length: UInt64) -> UnsafeMutableRawPointer? {
            let page = UInt64(systemPageSize)
            guard length > 0, offset % page == 0, offset <= UInt64(mappedLength), length <= UInt64(mappedLength) &- offset else {
                return nil
            }
            let end = offset &+ length
            advanceFrontier(to: end)
            let first = offset / UInt64(Self.blockBytes)
            let last = (end &- 1) / UInt64(Self.blockBytes)
            var b = first
            while b <= last {
                if state[Int(b)].load(ordering: .acquiring) != Self.staged {
                    runsNotStaged.wrappingAdd(1, ordering: .relaxed)
                    pagesNotStaged.wrappingAdd(length / page, ordering: .relaxed)
                    // These pages are copied now: stage from a little further on.
                    hint.store(min(last &+ 1 &+ Self.leadBlocks, blocks &- 1) &+ 1, ordering: .relaxed)
                    return nil
                }
                b &+= 1
            }
            pagesMoved.wrappingAdd(length / page, ordering: .relaxed)
            return staging + Int(offset)
        }

        @inline(__always)
        func uniformBytes(at offset: UInt64, length: Int) -> Int {
            let block = UInt64(Self.blockBytes)
            let end = offset &+ UInt64(length)
            var b = offset / block
            guard b < blocks else { return length }
            let staged = state[Int(b)].load(ordering: .acquiring) == Self.staged
            b &+= 1
            while b &* block < end && b < blocks && (state[Int(b)].load(ordering: .acquiring) == Self.staged) == staged { b &+= 1 }
            return Int(min(b &* block, end) &- offset)
        }

        /// Marks the empty blocks wholly inside a run being copied, so no fill thread stages them.
        @inline(__always)
        func copied(at offset: UInt64, length: UInt64) {
            let block = UInt64(Self.blockBytes)
            var b = (offset &+ block &- 1) / block
            let end = (offset &+ length) / block
            while b < end && b < blocks {
                _ = state[Int(b)].compareExchange(expected: Self.empty, desired: Self.copied, ordering: .relaxed)
                b &+= 1
            }
        }

        @inline(__always)
        private func advanceFrontier(to end: UInt64) {
            var seen = frontier.load(ordering: .relaxed)
            while seen < end {
                let (exchanged, now) = frontier.weakCompareExchange(expected: seen, desired: end, ordering: .relaxed)
                if exchanged { return }
                seen = now
            }
        }

        // MARK: - Filling (fill threads)

        private var shouldStop: Bool { stopping.load(ordering: .relaxed) }

        private func fillLoop() {
            var cursor: UInt64 = 0
            var chunk: UInt64 = 1
            while !shouldStop {
                let h = hint.exchange(0, ordering: .relaxed)
                if h != 0 && h &- 1 != cursor {
                    // Faults went past the fill: start again ahead of them.
                    cursor = h &- 1
                    chunk = Self.maxChunkBlocks
                }
                guard let start = nextEmpty(from: cursor) else { return }
                if !waitForRoom(at: start) { continue }
                var n: UInt64 = 0
                while n < chunk && start &+ n < blocks
                    && state[Int(start &+ n)].compareExchange(expected: Self.empty, desired: Self.filling, ordering: .relaxed).exchanged
                {
                    n &+= 1
                }
                if n == 0 {
                    cursor = start &+ 1
                    continue
                }
                stage(from: start, count: n)
                cursor = start &+ n
                chunk = min(chunk &* 2, Self.maxChunkBlocks)
            }
        }

        /// The first empty block at or after `cursor`, then from the start; nil when none is left.
        private func nextEmpty(from cursor: UInt64) -> UInt64? {
            var b = cursor
            while b < blocks {
                if state[Int(b)].load(ordering: .relaxed) == Self.empty { return b }
                b &+= 1
            }
            b = 0
            while b < min(cursor, blocks) {
                if state[Int(b)].load(ordering: .relaxed) == Self.empty { return b }
                b &+= 1
            }
            return nil
        }

        /// Waits while block `start` lies more than `window` past the furthest page asked
        /// for; false when a hint arrived meanwhile (or the pool stops).
        private func waitForRoom(at start: UInt64) -> Bool {
            let offset = start &* UInt64(Self.blockBytes)
            while offset > frontier.load(ordering: .relaxed) &+ window {
                if shouldStop || hint.load(ordering: .relaxed) != 0 { return false }
                usleep(50)
            }
            return true
        }

        /// Populates and fills blocks `start ..< start + count` (claimed), then publishes them.
        private func stage(from start: UInt64, count: UInt64) {
            let offset = start &* UInt64(Self.blockBytes)
            let bytes = min(count &* UInt64(Self.blockBytes), UInt64(mappedLength) &- offset)
            let chunk = staging + Int(offset)
            if retryOnInterrupt({ madvise(chunk, Int(bytes), Self.populateWrite) }) != 0 {
                populateFailures.wrappingAdd(1, ordering: .relaxed)
            }
            let available = min(bytes, length &- offset)
            var result = Self.staged
            do {
                try base.fill(UnsafeMutableRawBufferPointer(start: chunk, count: Int(available)), at: offset)
                pagesStaged.wrappingAdd((bytes &+ UInt64(systemPageSize) &- 1) / UInt64(systemPageSize), ordering: .relaxed)
            } catch {
                fillFailures.wrappingAdd(1, ordering: .relaxed)
                result = Self.failed
            }
            for k in 0..<count { state[Int(start &+ k)].store(result, ordering: .releasing) }
        }
    }
}

/// The staging pool's constants (generic types cannot hold static stored properties).
enum StagingLayout {
    /// The unit a block flag covers: 64 KiB.
    static let blockBytes = 64 << 10
    /// The largest chunk a fill thread stages at once: 2 MiB.
    static let maxChunkBlocks: UInt64 = 32
    static let empty: UInt8 = 0, filling: UInt8 = 1, staged: UInt8 = 2, failed: UInt8 = 3, copied: UInt8 = 4
    /// How far past a run copied because it was not staged a fill thread starts
    /// again: 4 MiB, so the faults do not catch up with it at once.
    static let leadBlocks: UInt64 = 64
    /// `MADV_POPULATE_WRITE` (Linux 5.14).
    static let populateWrite: Int32 = 23
}
