import Foundation

/// What a migration did and how long it took, as a value and as JSON (the same figures
/// `uffd migrate` shows in its table).
public struct MigrationStatistics: Sendable, Equatable, Codable {
    /// How memory moved.
    public enum Mode: String, Sendable, CaseIterable, Codable {
        /// The workload stops at once and resumes on the destination, which pulls pages on demand.
        case postcopy
        /// Rounds of precopy while the workload runs, then postcopy for what was dirtied last.
        case precopyPostcopy = "precopy+postcopy"
        /// Rounds of precopy, then everything left is copied while the workload is stopped.
        case stopAndCopy = "stop-and-copy"
    }

    /// Remote-fault latency: from the fault being read to its page installed, in microseconds.
    public struct Latency: Sendable, Equatable, Codable {
        /// Remote faults measured.
        public var count: Int = 0
        public var p50: Double = 0
        public var p90: Double = 0
        public var p99: Double = 0
        public var max: Double = 0
    }

    public var mode: Mode = .postcopy
    /// Bytes in all regions.
    public var regionBytes: Int = 0
    /// Connect to last page acknowledged, in seconds.
    public var totalSeconds: Double = 0
    /// Precopy rounds run (the first sends everything).
    public var precopyRounds: Int = 0
    /// Bytes of page data sent during precopy (zero pages travel as markers and count nothing).
    public var precopyBytes: Int = 0
    /// Pages sent during precopy that kept changing and were forgotten before the pause
    /// (pulled again after the switchover).
    public var discardedPages: Int = 0
    /// Source stop to destination resume, in microseconds (includes the final dirty scan and, for
    /// stop-and-copy, every page left).
    public var switchoverPauseMicroseconds: Double = 0
    /// Pages sent during the pause (stop-and-copy only).
    public var pausePages: Int = 0
    /// Faults served by asking the source (one request per page, deduplicated).
    public var postcopyFaults: Int = 0
    /// Faults on pages known to be zero, served on the destination without a request.
    public var localZeroFaults: Int = 0
    /// Remote-fault latency.
    public var latency = Latency()
    /// Total time threads spent blocked on remote faults, in microseconds (sum of latencies).
    public var blocktimeMicroseconds: Double = 0
    /// Page data bytes sent by the background stream after switchover.
    public var streamBytes: Int = 0
    /// Pages the background stream sent as zero markers (no data on the wire).
    public var streamZeroPages: Int = 0
    /// Page data bytes sent in answer to requests.
    public var requestBytes: Int = 0
    /// Pages that travelled as zero markers.
    public var zeroPages: Int = 0
    /// Pages answered on the urgent channel.
    public var requestedPages: Int = 0
    /// Pages sent on the urgent channel right after a requested page, unasked
    /// (``MigrationSource/Options/pagesAfterRequest``); their bytes count in ``requestBytes``.
    public var pagesSentAfterRequests: Int = 0
    /// Pages that arrived after their fault was served and were dropped.
    public var duplicatesDropped: Int = 0
    /// Connections re-established after a drop.
    public var reconnects: Int = 0
    /// Duration of the postcopy background stream, in seconds.
    public var streamSeconds: Double = 0
    /// Page data bytes the source sent in all phases (precopy, pause, stream, requests).
    public var pageBytesSent: Int = 0
    /// CPU time of the source's migration threads (sending and answering requests), in
    /// seconds. The workload's own threads are not counted.
    public var sourceCPUSeconds: Double = 0
    /// CPU time of the destination's migration threads (receiving, installing, serving
    /// faults), in seconds. The workload's own threads are not counted.
    public var destinationCPUSeconds: Double = 0
    /// Stream connections the source used (``MigrationSource/Options/streamConnections``).
    public var streamConnections: Int = 1
    /// Frames the source sent with `MSG_ZEROCOPY` (``MigrationSource/Options/zeroCopy``).
    public var zeroCopySends: Int = 0
    /// Of those, frames the kernel copied after all (over loopback, all of them).
    public var zeroCopyCopiedSends: Int = 0

    public init() {}

    /// Background stream throughput: page data bytes sent per second. Zero markers carry
    /// no data and count nothing (``streamZeroPages`` says how many there were).
    public var streamBytesPerSecond: Double {
        streamSeconds > 0 ? Double(streamBytes) / streamSeconds : 0
    }

    /// Page data bytes per second sent after the switchover on both connections (stream
    /// and answers to requests, with the pages sent along), over the stream's duration.
    public var postcopyBytesPerSecond: Double {
        streamSeconds > 0 ? Double(streamBytes + requestBytes) / streamSeconds : 0
    }

    /// The source's CPU seconds per GB (10⁹ bytes) of page data moved.
    public var sourceCPUSecondsPerGB: Double {
        pageBytesSent > 0 ? sourceCPUSeconds / (Double(pageBytesSent) / 1e9) : 0
    }

    /// The destination's CPU seconds per GB (10⁹ bytes) of page data moved.
    public var destinationCPUSecondsPerGB: Double {
        pageBytesSent > 0 ? destinationCPUSeconds / (Double(pageBytesSent) / 1e9) : 0
    }

    private enum CodingKeys: String, CodingKey {
        case mode, regionBytes, totalSeconds, precopyRounds, precopyBytes, discardedPages
        case switchoverPauseMicroseconds, pausePages, postcopyFaults, localZeroFaults
        case latency = "latencyMicroseconds"
        case blocktimeMicroseconds, streamBytes, streamZeroPages, requestBytes, zeroPages, requestedPages
        case duplicatesDropped, reconnects, streamSeconds, streamBytesPerSecond
        case pagesSentAfterRequests, pageBytesSent, sourceCPUSeconds, destinationCPUSeconds, sourceCPUSecondsPerGB, destinationCPUSecondsPerGB
        case postcopyBytesPerSecond
        case streamConnections, zeroCopySends, zeroCopyCopiedSends
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(mode, forKey: .mode)
        try c.encode(regionBytes, forKey: .regionBytes)
        try c.encode(totalSeconds, forKey: .totalSeconds)
        try c.encode(precopyRounds, forKey: .precopyRounds)
        try c.encode(precopyBytes, forKey: .precopyBytes)
        try c.encode(discardedPages, forKey: .discardedPages)
        try c.encode(switchoverPauseMicroseconds, forKey: .switchoverPauseMicroseconds)
        try c.encode(pausePages, forKey: .pausePages)
        try c.encode(postcopyFaults, forKey: .postcopyFaults)
        try c.encode(localZeroFaults, forKey: .localZeroFaults)
        try c.encode(latency, forKey: .latency)
        try c.encode(blocktimeMicroseconds, forKey: .blocktimeMicroseconds)
        try c.encode(streamBytes, forKey: .streamBytes)
        try c.encode(streamZeroPages, forKey: .streamZeroPages)
        try c.encode(requestBytes, forKey: .requestBytes)
        try c.encode(zeroPages, forKey: .zeroPages)
        try c.encode(requestedPages, forKey: .requestedPages)
        try c.encode(duplicatesDropped, forKey: .duplicatesDropped)
        try c.encode(reconnects, forKey: .reconnects)
        try c.encode(streamSeconds, forKey: .streamSeconds)
        try c.encode(pagesSentAfterRequests, forKey: .pagesSentAfterRequests)
        try c.encode(pageBytesSent, forKey: .pageBytesSent)
        try c.encode(sourceCPUSeconds, forKey: .sourceCPUSeconds)
        try c.encode(destinationCPUSeconds, forKey: .destinationCPUSeconds)
        try c.encode(streamConnections, forKey: .streamConnections)
        try c.encode(zeroCopySends, forKey: .zeroCopySends)
        try c.encode(zeroCopyCopiedSends, forKey: .zeroCopyCopiedSends)
        // Derived, written for readers of the JSON; ignored when decoding.
        try c.encode(streamBytesPerSecond, forKey: .streamBytesPerSecond)
        try c.encode(postcopyBytesPerSecond, forKey: .postcopyBytesPerSecond)
        try c.encode(sourceCPUSecondsPerGB, forKey: .sourceCPUSecondsPerGB)
        try c.encode(destinationCPUSecondsPerGB, forKey: .destinationCPUSecondsPerGB)
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        mode = try c.decode(Mode.self, forKey: .mode)
        regionBytes = try c.decode(Int.self, forKey: .regionBytes)
        totalSeconds = try c.decode(Double.self, forKey: .totalSeconds)
        precopyRounds = try c.decode(Int.self, forKey: .precopyRounds)
        precopyBytes = try c.decode(Int.self, forKey: .precopyBytes)
        discardedPages = try c.decode(Int.self, forKey: .discardedPages)
        switchoverPauseMicroseconds = try c.decode(Double.self, forKey: .switchoverPauseMicroseconds)
        pausePages = try c.decode(Int.self, forKey: .pausePages)
        postcopyFaults = try c.decode(Int.self, forKey: .postcopyFaults)
        localZeroFaults = try c.decode(Int.self, forKey: .localZeroFaults)
        latency = try c.decode(Latency.self, forKey: .latency)
        blocktimeMicroseconds = try c.decode(Double.self, forKey: .blocktimeMicroseconds)
        streamBytes = try c.decode(Int.self, forKey: .streamBytes)
        streamZeroPages = try c.decode(Int.self, forKey: .streamZeroPages)
        requestBytes = try c.decode(Int.self, forKey: .requestBytes)
        zeroPages = try c.decode(Int.self, forKey: .zeroPages)
        requestedPages = try c.decode(Int.self, forKey: .requestedPages)
        duplicatesDropped = try c.decode(Int.self, forKey: .duplicatesDropped)
        reconnects = try c.decode(Int.self, forKey: .reconnects)
        streamSeconds = try c.decode(Double.self, forKey: .streamSeconds)
        // Absent from reports written before CPU time was measured.
        pagesSentAfterRequests = try c.decodeIfPresent(Int.self, forKey: .pagesSentAfterRequests) ?? 0
        pageBytesSent = try c.decodeIfPresent(Int.self, forKey: .pageBytesSent) ?? 0
        sourceCPUSeconds = try c.decodeIfPresent(Double.self, forKey: .sourceCPUSeconds) ?? 0
        destinationCPUSeconds = try c.decodeIfPresent(Double.self, forKey: .destinationCPUSeconds) ?? 0
        streamConnections = try c.decodeIfPresent(Int.self, forKey: .streamConnections) ?? 1
        zeroCopySends = try c.decodeIfPresent(Int.self, forKey: .zeroCopySends) ?? 0
        zeroCopyCopiedSends = try c.decodeIfPresent(Int.self, forKey: .zeroCopyCopiedSends) ?? 0
    }

    /// The same figures as a JSON object (keys in a fixed order).
    public var json: String { MigrationJSON.encode(self) }
}

/// The one place migration reports become JSON.
public enum MigrationJSON {
    /// `value` as compact JSON with sorted keys; "{}" if it cannot be encoded.
    public static func encode<T: Encodable>(_ value: T) -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        guard let data = try? encoder.encode(value) else { return "{}" }
        return String(decoding: data, as: UTF8.self)
    }

    /// Decodes a report written by ``encode(_:)``.
    public static func decode<T: Decodable>(_ type: T.Type, from text: String) throws -> T {
        try JSONDecoder().decode(type, from: Data(text.utf8))
    }
}

/// The destination's share of the statistics, carried back to the source in the DONE frame.
struct DestinationReport: Equatable {
    var faults: UInt64 = 0
    var localZeroFaults: UInt64 = 0
    var p50: UInt64 = 0, p90: UInt64 = 0, p99: UInt64 = 0, max: UInt64 = 0
    var blocktimeNanoseconds: UInt64 = 0
    var duplicates: UInt64 = 0
    var latencyCount: UInt64 = 0
    /// CPU time of the destination's migration threads.
    var cpuNanoseconds: UInt64 = 0

    func encode() -> [UInt8] {
        var w = ByteWriter()
        for v in [faults, localZeroFaults, p50, p90, p99, max, blocktimeNanoseconds, duplicates, latencyCount, cpuNanoseconds] { w.u64(v) }
        return w.bytes
    }

    static func decode(_ bytes: [UInt8]) throws(MigrationError) -> DestinationReport {
        var r = ByteReader(bytes)
        var d = DestinationReport()
        d.faults = try r.u64(); d.localZeroFaults = try r.u64()
        d.p50 = try r.u64(); d.p90 = try r.u64(); d.p99 = try r.u64(); d.max = try r.u64()
        d.blocktimeNanoseconds = try r.u64(); d.duplicates = try r.u64(); d.latencyCount = try r.u64()
        d.cpuNanoseconds = try r.u64()
        if !r.atEnd { throw MigrationError(.malformedFrame("\(r.remaining) trailing bytes in done")) }
        return d
    }

    func apply(to s: inout MigrationStatistics) {
        s.postcopyFaults = Int(faults)
        s.localZeroFaults = Int(localZeroFaults)
        s.latency = .init(count: Int(latencyCount), p50: Double(p50) / 1000, p90: Double(p90) / 1000,
                          p99: Double(p99) / 1000, max: Double(max) / 1000)
        s.blocktimeMicroseconds = Double(blocktimeNanoseconds) / 1000
        s.duplicatesDropped = Int(duplicates)
        s.destinationCPUSeconds = Double(cpuNanoseconds) / 1e9
    }
}

/// How far a migration has come, for progress displays.
public struct MigrationProgress: Sendable, Equatable {
    /// The phase the migration is in.
    public enum Phase: UInt8, Sendable {
        case connecting, precopy, switchover, postcopy, finished, failed
    }
    public var phase: Phase
    /// Pages the destination no longer waits for (sent at least once, not dirtied since).
    public var pagesSent: Int
    /// Pages in all regions.
    public var totalPages: Int
    /// The current precopy round (0 outside precopy).
    public var round: Int
}
