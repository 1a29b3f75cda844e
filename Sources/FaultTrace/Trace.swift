import FaultEngine

/// A recorded trace: the regions watched, the first touches the engine served, and
/// the pages written per sampling interval.
///
/// Times are nanoseconds since the trace began. A trace is written and read with
/// ``TraceWriter`` and ``TraceFile``.
public struct Trace: Sendable, Equatable {
    /// The size of the pages the addresses and counts refer to, in bytes.
    public var pageSize: Int
    /// When the trace began, in nanoseconds since the Unix epoch (for display only).
    public var startedAt: UInt64
    /// How long the trace ran, in nanoseconds.
    public var duration: UInt64
    /// The regions, in the order they were first seen.
    public var regions: [TraceRegion]
    /// First touches in the order they were collected (per handler thread in time order).
    public var touches: [TraceTouch]
    /// Write samples, in the order they were taken.
    public var writeSamples: [WriteSample]
    /// Fault records lost because a handler's buffer was full.
    public var dropped: UInt64

    public init(pageSize: Int, startedAt: UInt64 = 0, duration: UInt64 = 0, regions: [TraceRegion] = [],
                touches: [TraceTouch] = [], writeSamples: [WriteSample] = [], dropped: UInt64 = 0) {
        self.pageSize = pageSize
        self.startedAt = startedAt
        self.duration = duration
        self.regions = regions
        self.touches = touches
        self.writeSamples = writeSamples
        self.dropped = dropped
    }

    /// The index of the region of `space` holding `address`, if any.
    public func regionIndex(space: Int, address: UInt64) -> Int? {
        regions.firstIndex { $0.space == space && address >= $0.start && address - $0.start < $0.length }
    }
}

/// One range of memory a trace covers.
public struct TraceRegion: Sendable, Equatable, Codable {
    /// The address space it lies in: a `FaultTraceSink` space (one per server), or the
    /// number a write sampler was given.
    public var space: Int
    /// The first address.
    public var start: UInt64
    /// The length in bytes.
    public var length: UInt64
    /// Where the region's bytes start in the server's source (what a replay prefetches).
    public var sourceOffset: UInt64
    /// Whether writes to it were sampled.
    public var writeTracked: Bool
    /// A name to show (at most ``TraceRegion/maxLabelBytes`` bytes of UTF-8).
    public var label: String

    /// The longest label kept, in bytes.
    public static let maxLabelBytes = 64

    public init(space: Int, start: UInt64, length: UInt64, sourceOffset: UInt64 = 0, writeTracked: Bool = false,
                label: String = "") {
        self.space = space
        self.start = start
        self.length = length
        self.sourceOffset = sourceOffset
        self.writeTracked = writeTracked
        self.label = String(decoding: label.utf8.prefix(Self.maxLabelBytes), as: UTF8.self)
    }

    /// The address just past the region.
    public var end: UInt64 { start &+ length }
}

/// A fault the engine resolved: the first touch of a page (or a write-protect fault).
public struct TraceTouch: Sendable, Equatable {
    /// The address space (``TraceRegion/space``).
    public var space: Int
    /// Nanoseconds since the trace began.
    public var time: UInt64
    /// The page's address.
    public var address: UInt64
    /// From reading the fault to resolving it, in nanoseconds.
    public var latency: UInt64
    /// How the fault was resolved.
    public var kind: TracedFaultKind

    public init(space: Int, time: UInt64, address: UInt64, latency: UInt64, kind: TracedFaultKind = .missing) {
        self.space = space
        self.time = time
        self.address = address
        self.latency = latency
        self.kind = kind
    }
}

/// The pages of one region written during one sampling interval, per bucket of pages.
public struct WriteSample: Sendable, Equatable {
    /// The region's index in ``Trace/regions``.
    public var region: Int
    /// The end of the interval, in nanoseconds since the trace began.
    public var time: UInt64
    /// The interval's length in nanoseconds.
    public var interval: UInt64
    /// Pages per bucket.
    public var bucketPages: Int
    /// Pages written in each bucket, from the region's start.
    public var written: [UInt32]

    public init(region: Int, time: UInt64, interval: UInt64, bucketPages: Int, written: [UInt32]) {
        self.region = region
        self.time = time
        self.interval = interval
        self.bucketPages = bucketPages
        self.written = written
    }

    /// Pages written in the interval.
    public var total: Int { written.reduce(0) { $0 + Int($1) } }
}

/// A trace file that cannot be read or written, with a message saying why.
public struct TraceError: Error, Sendable, Equatable, CustomStringConvertible {
    /// What went wrong.
    public var message: String

    public init(_ message: String) { self.message = message }

    public var description: String { message }
}
