import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The migration wire protocol: fixed 32-byte little-endian headers, an optional
/// payload whose length the header states, and nothing else to parse.
///
/// ```
/// 0  magic   u32  "UFPC"        16 region  u32
/// 4  version u8   1             20 (zero)  u32
/// 5  type    u8                 24 first   u64  first page index in the region
/// 6  (zero)  u16                32 count   ... see below
/// 8  payload u32  bytes after the header
/// 12 count   u32  pages in the run
/// ```
enum Wire {
    static let magic: UInt32 = 0x4350_4655  // "UFPC"
    static let version: UInt8 = 1
    static let headerSize = 32
    /// The most pages one PAGES frame carries.
    static let maxRunPages = 64
    /// The largest non-page payload accepted (handshake, switchover list, error text).
    static let maxControlPayload = 1 << 24
    static let maxTokenLength = 256
    static let maxRegions = 64
    /// The largest hello payload: fixed fields, every region's length, the longest token.
    static let maxHelloPayload = 24 + 8 * maxRegions + maxTokenLength
    /// The largest ERROR payload: a kind code and a short text.
    static let maxErrorPayload = 4096

    enum FrameType: UInt8 {
        case hello = 1
        case welcome = 2
        case pages = 3
        case zeros = 4
        case request = 5
        case switchover = 6
        case resumed = 7
        case complete = 8
        case done = 9
        case error = 10
        /// Precopy: forget these sent pages, they keep changing (and will come again later).
        case discard = 11
        case discarded = 12
        /// On an extra stream connection: answer once every frame before this one is installed.
        case flush = 13
        case flushed = 14
    }

    /// The most stream connections one migration may use.
    static let maxStreams = 8

    enum Channel: UInt8 {
        case stream = 0
        case urgent = 1
    }

    struct Header: Equatable {
        var type: FrameType
        var payloadLength: UInt32 = 0
        var count: UInt32 = 0
        var region: UInt32 = 0
        var first: UInt64 = 0

        func encode(into p: UnsafeMutableRawPointer) {
            p.storeBytes(of: Wire.magic.littleEndian, toByteOffset: 0, as: UInt32.self)
            p.storeBytes(of: Wire.version, toByteOffset: 4, as: UInt8.self)
            p.storeBytes(of: type.rawValue, toByteOffset: 5, as: UInt8.self)
            p.storeBytes(of: UInt16(0), toByteOffset: 6, as: UInt16.self)
            p.storeBytes(of: payloadLength.littleEndian, toByteOffset: 8, as: UInt32.self)
            p.storeBytes(of: count.littleEndian, toByteOffset: 12, as: UInt32.self)
            p.storeBytes(of: region.littleEndian, toByteOffset: 16, as: UInt32.self)
            p.storeBytes(of: UInt32(0), toByteOffset: 20, as: UInt32.self)
            p.storeBytes(of: first.littleEndian, toByteOffset: 24, as: UInt64.self)
        }

        /// Decodes and checks a header: magic, version, type, reserved bits, and the
        /// payload length each type allows.
        static func decode(_ p: UnsafeRawPointer, pageSize: Int) throws(MigrationError) -> Header {
            let magic = UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 0, as: UInt32.self))
            if magic != Wire.magic {
                throw MigrationError(.malformedFrame("bad magic 0x\(String(magic, radix: 16))"))
            }
            let version = p.load(fromByteOffset: 4, as: UInt8.self)
            if version != Wire.version { throw MigrationError(.unsupportedVersion(version)) }
            let rawType = p.load(fromByteOffset: 5, as: UInt8.self)
            guard let type = FrameType(rawValue: rawType) else {
                throw MigrationError(.malformedFrame("unknown frame type \(rawType)"))
            }
            if p.loadUnaligned(fromByteOffset: 6, as: UInt16.self) != 0 || p.loadUnaligned(fromByteOffset: 20, as: UInt32.self) != 0 {
                throw MigrationError(.malformedFrame("reserved bits set in a \(type) frame"))
            }
            let header = Header(
                type: type,
                payloadLength: UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 8, as: UInt32.self)),
                count: UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 12, as: UInt32.self)),
                region: UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 16, as: UInt32.self)),
                first: UInt64(littleEndian: p.loadUnaligned(fromByteOffset: 24, as: UInt64.self)))
            let length = Int(header.payloadLength)
            switch type {
            case .pages:
                if header.count == 0 || header.count > UInt32(Wire.maxRunPages) {
                    throw MigrationError(.malformedFrame("a pages frame carries \(header.count) pages (1...\(Wire.maxRunPages) allowed)"))
                }
                if length != Int(header.count) * pageSize {
                    throw MigrationError(.malformedFrame("a pages frame of \(header.count) pages has \(length) payload bytes, not \(Int(header.count) * pageSize)"))
                }
            case .zeros, .request:
                if header.count == 0 { throw MigrationError(.malformedFrame("a \(type) frame covers no page")) }
                if length != 0 { throw MigrationError(.malformedFrame("a \(type) frame has a \(length)-byte payload")) }
            case .resumed, .complete, .discarded, .flush, .flushed:
                if length != 0 { throw MigrationError(.malformedFrame("a \(type) frame has a \(length)-byte payload")) }
            case .hello where length > Wire.maxHelloPayload:
                throw MigrationError(.malformedFrame("a hello frame announces \(length) payload bytes (at most \(Wire.maxHelloPayload))"))
            case .error where length > Wire.maxErrorPayload:
                throw MigrationError(.malformedFrame("an error frame announces \(length) payload bytes (at most \(Wire.maxErrorPayload))"))
            case .hello, .welcome, .switchover, .discard, .done, .error:
                if length > Wire.maxControlPayload {
                    throw MigrationError(.malformedFrame("a \(type) frame announces \(length) payload bytes (at most \(Wire.maxControlPayload))"))
                }
            }
            return header
        }
    }

    /// The handshake a source sends on each channel.
    struct Hello: Equatable {
        var channel: Channel
        var resume: Bool
        var pageSize: Int
        var migrationID: UInt64
        var regionLengths: [UInt64]
        var token: [UInt8]
        /// Which of the stream connections this is (0: the one that carries control frames).
        var streamIndex: Int = 0
        /// How many stream connections the migration uses (1...maxStreams).
        var streamCount: Int = 1

        func encode() -> [UInt8] {
            var out = ByteWriter()
            out.u16(UInt16(token.count))
            out.u8(channel.rawValue)
            out.u8(resume ? 1 : 0)
            out.u32(UInt32(pageSize))
            out.u64(migrationID)
            out.u32(UInt32(regionLengths.count))
            out.u32(UInt32(streamIndex & 0xff) | UInt32(streamCount & 0xff) << 8)
            for length in regionLengths { out.u64(length) }
            out.bytes.append(contentsOf: token)
            return out.bytes
        }

        static func decode(_ bytes: [UInt8]) throws(MigrationError) -> Hello {
            var r = ByteReader(bytes)
            let tokenLength = Int(try r.u16())
            guard let channel = Channel(rawValue: try r.u8()) else { throw MigrationError(.malformedFrame("unknown channel in hello")) }
            let flags = try r.u8()
            if flags > 1 { throw MigrationError(.malformedFrame("unknown hello flags 0x\(String(flags, radix: 16))")) }
            let pageSize = Int(try r.u32())
            let id = try r.u64()
            let count = Int(try r.u32())
            let streams = try r.u32()
            // 0 from a peer that predates several stream connections: one.
            let streamIndex = Int(streams & 0xff), streamCount = max(1, Int(streams >> 8 & 0xff))
            if streams >> 16 != 0 || streamCount > Wire.maxStreams || streamIndex >= streamCount
                || (channel == .urgent && streamIndex != 0) {
                throw MigrationError(.malformedFrame("stream \(streamIndex) of \(streamCount) in hello (1...\(Wire.maxStreams) streams allowed)"))
            }
            if count == 0 || count > Wire.maxRegions {
                throw MigrationError(.badRegions("\(count) regions described (1...\(Wire.maxRegions) allowed)"))
            }
            var lengths: [UInt64] = []
            for _ in 0..<count { lengths.append(try r.u64()) }
            if tokenLength == 0 || tokenLength > Wire.maxTokenLength {
                throw MigrationError(.badToken)
            }
            let token = Array(try r.bytes(tokenLength))
            if !r.atEnd { throw MigrationError(.malformedFrame("\(r.remaining) trailing bytes after hello")) }
            return Hello(channel: channel, resume: flags == 1, pageSize: pageSize, migrationID: id, regionLengths: lengths,
                         token: token, streamIndex: streamIndex, streamCount: streamCount)
        }
    }

    /// A page range in a switchover list: region, first page, page count.
    struct PageRun: Equatable {
        var region: UInt32
        var first: UInt64
        var count: UInt64
    }

    static func encodeRuns(_ runs: [PageRun]) -> [UInt8] {
        var out = ByteWriter()
        out.u64(UInt64(runs.count))
        for run in runs {
            out.u32(run.region)
            out.u32(0)
            out.u64(run.first)
            out.u64(run.count)
        }
        return out.bytes
    }

    static func decodeRuns(_ bytes: [UInt8]) throws(MigrationError) -> [PageRun] {
        var r = ByteReader(bytes)
        let count = try r.u64()
        if count > UInt64(bytes.count / 24) { throw MigrationError(.malformedFrame("switchover list claims \(count) runs in \(bytes.count) bytes")) }
        var runs: [PageRun] = []
        for _ in 0..<count {
            let region = try r.u32()
            _ = try r.u32()
            runs.append(PageRun(region: region, first: try r.u64(), count: try r.u64()))
        }
        if !r.atEnd { throw MigrationError(.malformedFrame("\(r.remaining) trailing bytes after the switchover list")) }
        return runs
    }

    /// Compares two tokens in time that depends only on their lengths.
    static func tokensMatch(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        if a.isEmpty || b.isEmpty { return false }
        var difference = UInt8(truncatingIfNeeded: a.count ^ b.count)
        let n = max(a.count, b.count)
        for i in 0..<n {
            let x = i < a.count ? a[i] : 0
            let y = i < b.count ? b[i] : 0
            difference |= x ^ y
        }
        return difference == 0 && a.count == b.count
    }
}

/// Writes the integers of a frame, little-endian.
typealias ByteWriter = LittleEndianWriter

/// Reads the integers of a frame; a read past the end is a malformed frame.
typealias ByteReader = LittleEndianReader<MigrationError>

extension LittleEndianReader where Failure == MigrationError {
    init(_ data: [UInt8]) {
        self.init(data) { _, needed, left in
            MigrationError(.malformedFrame("payload truncated: wanted \(needed) more bytes, \(left) left"))
        }
    }
}
