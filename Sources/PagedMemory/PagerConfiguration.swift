/// How a ``Pager`` runs: its buffer, its threads and its replacement policy.
public struct PagerConfiguration: Sendable, Codable, Equatable {
    /// The most bytes of mapped pages resident at once, over all mappings of the pager.
    public var bufferBytes: Int
    /// Eviction starts when the resident bytes pass this fraction of the buffer.
    public var highWater: Double = 0.9
    /// Eviction stops when the resident bytes fall to this fraction of the buffer.
    public var lowWater: Double = 0.7
    /// Threads that read fault messages and fill pages from the stores, in parallel.
    public var fillers: Int = 4
    /// `SCHED_FIFO` priority of the filler threads (0: time-shared). A fault waits for
    /// a filler to wake; on a busy host a time-shared filler first waits for a time
    /// slice. Fillers block on the userfaultfd or on store reads, never spin. Without
    /// CAP_SYS_NICE they stay time-shared.
    public var fillerPriority: Int32 = 0
    /// Threads that choose victims, write back the dirty ones and drop them.
    public var evictors: Int = 1
    /// How victims are chosen.
    public var policy: ReplacementPolicy = .clock
    /// The most pages one sequential fault reads ahead (doubling from 1 on each
    /// sequential fault); 0 turns read-ahead off.
    public var maxReadAheadPages: Int = 64
    /// The most bytes one read-ahead reads.
    public var maxReadAheadBytes: Int = 1 << 20
    /// How long a filler waits for buffer space before it gives the faulting thread
    /// SIGBUS and records ``PagedMappingError/Kind/bufferExhausted`` (every page dirty
    /// and the store refusing writes, for example).
    public var spaceWaitMilliseconds: Int = 10_000
    /// Where private mappings keep dirty pages they evict (an unnamed file).
    public var scratchDirectory: String = "/tmp"
    /// Where faults are resolved.
    public var resolution: FaultResolution = .handlerThreads
    /// Give a victim a second chance that sees re-use: its pages live in a memfd, and
    /// the evictor first only unmaps a victim (`MADV_DONTNEED` keeps the memfd's page)
    /// and sends it round the queue once more. A touch meanwhile is a minor fault that
    /// maps the page again (`UFFDIO_CONTINUE`, no read) and gives it a credit; a
    /// victim that comes round untouched is written back if dirty and dropped from the
    /// memfd. Soft-evicted pages still count against the buffer. With
    /// ``FaultResolution/faultingThread`` the minor fault is served in the faulting
    /// thread too (a few microseconds, against a round trip to a filler).
    public var softEviction: Bool = false
    /// The share of the buffer's pages the evictors keep soft-evicted (unmapped, still
    /// in memory) with ``softEviction``: the longer a page waits there, the more re-use
    /// it can show, and the more touches pay a minor fault.
    public var softEvictionFraction: Double = 0.25

    /// A configuration with a buffer of `bufferBytes`.
    public init(bufferBytes: Int) {
        self.bufferBytes = bufferBytes
    }
}

/// Where a ``Pager`` resolves faults.
public enum FaultResolution: String, Sendable, Codable, CaseIterable {
    /// Filler threads read fault messages from the userfaultfd and fill the pages.
    /// A fault costs two wake-ups across threads (faulting thread to filler and back).
    case handlerThreads
    /// The faulting thread resolves its own fault: the mapping's userfaultfd raises
    /// SIGBUS instead of queueing a message, and a signal handler reads the page from
    /// the store and installs it, with no wake-up of another thread. Applies to
    /// mappings whose store has a ``PageStore/signalReadableDescriptor`` and whose page
    /// size is at most 64 KiB (the handler reads onto the faulting thread's stack);
    /// other mappings are served by the filler threads. The pager installs a process-wide
    /// SIGBUS handler that passes signals it does not own to the handler before it.
    /// A system call that reads or writes a page not in memory (`write(fd, mapping…)`)
    /// fails with `EFAULT` instead of faulting it in: touch the bytes first.
    case faultingThread
}

/// How the evictor chooses a victim.
public enum ReplacementPolicy: String, Sendable, Codable, CaseIterable {
    /// First in, first out: the page resident longest goes first.
    case fifo
    /// CLOCK (second chance) with credits from the page's history: a page enters the
    /// queue with one credit for every earlier time it was faulted in (up to three)
    /// and one for its first write; the hand spends a credit instead of evicting.
    /// Pages that keep coming back (the hot set of a skewed access pattern) stay;
    /// pages read once (a scan, a cold tail) go first. The pager cannot see accesses
    /// to resident pages (no accessed bit reaches user space), so history is what it has.
    case clock
}

/// What a pager has done so far.
public struct PagerStatistics: Sendable, Codable, Equatable {
    /// Missing-page faults served (each fills at least one page).
    public var faults = 0
    /// First writes to clean pages (write-protect faults).
    public var writeFaults = 0
    /// Pages filled from the stores, by faults, read-ahead and prefetch.
    public var pagesFilled = 0
    /// Of those, pages filled ahead of a fault by sequential read-ahead.
    public var pagesReadAhead = 0
    /// Pages dropped by the evictors.
    public var pagesEvicted = 0
    /// Dirty pages written back (by eviction, flush and unmap).
    public var pagesWrittenBack = 0
    /// Bytes read from the stores.
    public var bytesRead = 0
    /// Bytes written to the stores.
    public var bytesWritten = 0
    /// Times a filler waited for the evictors to make room.
    public var spaceWaits = 0
    /// The most bytes resident at once.
    public var peakResidentBytes = 0
    /// Store errors and poisoned pages.
    public var errors = 0
    /// Pages unmapped for a second chance (``PagerConfiguration/softEviction``).
    public var pagesSoftEvicted = 0
    /// Touches of soft-evicted pages: minor faults served without a read.
    public var softHits = 0
}

/// A failure the pager recorded for a mapping (the faulting thread got SIGBUS, or a
/// write-back failed and the page was kept).
public struct PagedMappingError: Error, Sendable, Equatable, CustomStringConvertible {
    /// What failed.
    public enum Kind: Sendable, Equatable {
        /// Reading the page from the store failed; the page is poisoned (SIGBUS on access).
        case readFailed(errno: Int32)
        /// Writing the page back failed; it stays resident and dirty.
        case writeFailed(errno: Int32)
        /// No buffer space came free in time; the page is poisoned.
        case bufferExhausted
        /// A userfaultfd call failed.
        case kernel(errno: Int32)
    }
    /// What failed.
    public var kind: Kind
    /// The byte offset of the page in the mapping.
    public var offset: Int

    public var description: String {
        switch kind {
        case .readFailed(let e): return "reading the page at offset \(offset) failed: errno \(e)"
        case .writeFailed(let e): return "writing back the page at offset \(offset) failed: errno \(e)"
        case .bufferExhausted: return "no buffer space for the page at offset \(offset)"
        case .kernel(let e): return "a userfaultfd call for the page at offset \(offset) failed: errno \(e)"
        }
    }
}
