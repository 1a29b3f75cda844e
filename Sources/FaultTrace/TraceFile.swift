import FaultEngine
import SystemPackage
import Userfaultfd

/// The trace file: a 32-byte header, then chunks, the last of which is the end chunk.
///
/// All integers are little-endian.
/// - Header: magic `"UFTRACE\0"`, version `u16` (1), header size `u16` (32), page size
///   `u32`, start time `u64` (ns since the epoch), reserved `u64`.
/// - Chunk: tag `u32`, payload length `u32`, payload.
///   - region (1): index `u32`, space `u32`, start `u64`, length `u64`, source offset
///     `u64`, flags `u32` (1: writes sampled), label length `u32`, label (UTF-8, ≤ 64).
///   - touches (2): space `u32`, count `u32`, then 24-byte records: time `u64`,
///     address `u64`, latency `u32` (ns, saturated), kind `u8`, 3 bytes zero.
///   - write sample (3): region `u32`, bucket pages `u32`, time `u64`, interval `u64`,
///     count `u32`, reserved `u32`, then `count` × `u32` pages written per bucket.
///   - end (0x7fff_ffff): duration `u64`, dropped records `u64`.
///
/// A file without its end chunk was cut short (the recorder did not finish) and is refused.
public enum TraceFile {
    static let magic: [UInt8] = Array("UFTRACE".utf8) + [0]
    /// The format version this code writes and reads.
    public static let version: UInt16 = 1
    static let headerBytes = 32
    static let touchBytes = 24
    /// The largest file read, in bytes.
    public static let maxFileBytes = 1 << 30
    /// The most regions a file may describe.
    public static let maxRegions = 1024

    enum Tag: UInt32 {
        case region = 1
        case touches = 2
        case writeSample = 3
        case end = 0x7fff_ffff
    }

    /// Reads the trace at `path`.
    ///
    /// - Throws: ``TraceError`` naming the file and what is wrong with it: not a trace
    ///   file, a version this code does not read, cut short, or inconsistent.
    public static func read(_ path: String) throws(TraceError) -> Trace {
        let bytes: [UInt8]
        do {
            let fd = try FileDescriptor.open(path, .readOnly, options: .closeOnExec)
            defer { try? fd.close() }
            let size = try fd.seek(offset: 0, from: .end)
            _ = try fd.seek(offset: 0, from: .start)
            if size > maxFileBytes { throw TraceError("\(path): \(size) bytes, more than the \(maxFileBytes) read") }
            var buffer = [UInt8](repeating: 0, count: Int(size))
            let n = try buffer.withUnsafeMutableBytes { try fd.read(fromAbsoluteOffset: 0, into: $0) }
            buffer.removeSubrange(n...)
            bytes = buffer
        } catch let error as TraceError {
            throw error
        } catch {
            throw TraceError("\(path): cannot read: \(error)")
        }
        do {
            return try decode(bytes)
        } catch {
            throw TraceError("\(path): \(error.message)")
        }
    }

    /// Decodes a whole trace file's bytes.
    public static func decode(_ bytes: [UInt8]) throws(TraceError) -> Trace {
        var r = ByteReader(bytes)
        if bytes.count < headerBytes || Array(bytes[0..<8]) != magic {
            throw TraceError("not a uffd trace file (no UFTRACE magic)")
        }
        r.offset = 8
        let version = try r.u16()
        if version != Self.version {
            throw TraceError("trace format version \(version); this uffd reads version \(Self.version)")
        }
        let header = Int(try r.u16())
        let pageSize = Int(try r.u32())
        let startedAt = try r.u64()
        if header < headerBytes || header > bytes.count { throw TraceError("header size \(header) is wrong") }
        if pageSize < 512 || pageSize > 1 << 30 || pageSize & (pageSize - 1) != 0 {
            throw TraceError("page size \(pageSize) is not a power of two in 512...1 GiB")
        }
        r.offset = header
        var trace = Trace(pageSize: pageSize, startedAt: startedAt)
        while true {
            if r.remaining == 0 {
                throw TraceError("cut short at byte \(r.offset): no end record (the recorder did not finish)")
            }
            let chunkAt = r.offset
            let tag = try r.u32()
            let length = Int(try r.u32())
            if length > r.remaining {
                throw TraceError("cut short: the chunk at byte \(chunkAt) needs \(length) bytes, \(r.remaining) are left")
            }
            var payload = ByteReader(Array(bytes[r.offset..<(r.offset + length)]))
            r.offset += length
            switch Tag(rawValue: tag) {
            case .region:
                if trace.regions.count == maxRegions { throw TraceError("more than \(maxRegions) regions") }
                trace.regions.append(try decodeRegion(&payload, index: trace.regions.count))
            case .touches: trace.touches.append(contentsOf: try decodeTouches(&payload))
            case .writeSample: trace.writeSamples.append(try decodeSample(&payload, regions: trace.regions))
            case .end:
                trace.duration = try payload.u64()
                trace.dropped = try payload.u64()
                if r.remaining != 0 { throw TraceError("\(r.remaining) bytes after the end record") }
                return trace
            case nil:
                throw TraceError("unknown chunk tag \(tag) at byte \(chunkAt)")
            }
        }
    }

    private static func decodeRegion(_ p: inout ByteReader, index: Int) throws(TraceError) -> TraceRegion {
        let stated = Int(try p.u32())
        if stated != index { throw TraceError("region \(stated) found where region \(index) belongs") }
        let space = Int(try p.u32())
        let start = try p.u64()
        let length = try p.u64()
        let sourceOffset = try p.u64()
        let flags = try p.u32()
        let labelLength = Int(try p.u32())
        if labelLength > TraceRegion.maxLabelBytes || labelLength > p.remaining {
            throw TraceError("region \(index): label of \(labelLength) bytes")
        }
        let label = String(decoding: try p.bytes(labelLength), as: UTF8.self)
        if length == 0 || start > UInt64.max - length { throw TraceError("region \(index): empty or wrapping range") }
        return TraceRegion(space: space, start: start, length: length, sourceOffset: sourceOffset,
                           writeTracked: flags & 1 != 0, label: label)
    }

    private static func decodeTouches(_ p: inout ByteReader) throws(TraceError) -> [TraceTouch] {
        let space = Int(try p.u32())
        let count = Int(try p.u32())
        if count * touchBytes != p.remaining {
            throw TraceError("a touches chunk says \(count) records but holds \(p.remaining) bytes")
        }
        var touches: [TraceTouch] = []
        touches.reserveCapacity(count)
        for _ in 0..<count {
            let time = try p.u64()
            let address = try p.u64()
            let latency = UInt64(try p.u32())
            let raw = try p.u32() & 0xff
            guard let kind = TracedFaultKind(rawValue: UInt8(raw)) else { throw TraceError("unknown fault kind \(raw)") }
            touches.append(TraceTouch(space: space, time: time, address: address, latency: latency, kind: kind))
        }
        return touches
    }

    private static func decodeSample(_ p: inout ByteReader, regions: [TraceRegion]) throws(TraceError) -> WriteSample {
        let region = Int(try p.u32())
        let bucketPages = Int(try p.u32())
        let time = try p.u64()
        let interval = try p.u64()
        let count = Int(try p.u32())
        _ = try p.u32()
        guard region < regions.count else { throw TraceError("a write sample names region \(region) before it was described") }
        if bucketPages < 1 || count * 4 != p.remaining {
            throw TraceError("a write sample of region \(region) has \(bucketPages)-page buckets and \(count) counts in \(p.remaining) bytes")
        }
        var written: [UInt32] = []
        written.reserveCapacity(count)
        for _ in 0..<count { written.append(try p.u32()) }
        return WriteSample(region: region, time: time, interval: interval, bucketPages: bucketPages, written: written)
    }

    // MARK: - Encoding

    static func header(pageSize: Int, startedAt: UInt64) -> [UInt8] {
        var w = LittleEndianWriter()
        w.bytes.append(contentsOf: magic)
        w.u16(version)
        w.u16(UInt16(headerBytes))
        w.u32(UInt32(pageSize))
        w.u64(startedAt)
        w.u64(0)
        return w.bytes
    }

    static func chunk(_ tag: Tag, _ body: (inout LittleEndianWriter) -> Void) -> [UInt8] {
        var payload = LittleEndianWriter()
        body(&payload)
        var w = LittleEndianWriter()
        w.u32(tag.rawValue)
        w.u32(UInt32(payload.bytes.count))
        w.bytes.append(contentsOf: payload.bytes)
        return w.bytes
    }

    static func encode(region: TraceRegion, index: Int) -> [UInt8] {
        chunk(.region) { w in
            let label = Array(region.label.utf8.prefix(TraceRegion.maxLabelBytes))
            w.u32(UInt32(index))
            w.u32(UInt32(truncatingIfNeeded: region.space))
            w.u64(region.start)
            w.u64(region.length)
            w.u64(region.sourceOffset)
            w.u32(region.writeTracked ? 1 : 0)
            w.u32(UInt32(label.count))
            w.bytes.append(contentsOf: label)
        }
    }

    static func encode(touches: ArraySlice<TraceTouch>, space: Int) -> [UInt8] {
        chunk(.touches) { w in
            w.u32(UInt32(truncatingIfNeeded: space))
            w.u32(UInt32(touches.count))
            for t in touches {
                w.u64(t.time)
                w.u64(t.address)
                w.u32(UInt32(min(t.latency, UInt64(UInt32.max))))
                w.u32(UInt32(t.kind.rawValue))
            }
        }
    }

    static func encode(sample: WriteSample) -> [UInt8] {
        chunk(.writeSample) { w in
            w.u32(UInt32(sample.region))
            w.u32(UInt32(sample.bucketPages))
            w.u64(sample.time)
            w.u64(sample.interval)
            w.u32(UInt32(sample.written.count))
            w.u32(0)
            for c in sample.written { w.u32(c) }
        }
    }

    static func encodeEnd(duration: UInt64, dropped: UInt64) -> [UInt8] {
        chunk(.end) { w in
            w.u64(duration)
            w.u64(dropped)
        }
    }

    /// The whole file for `trace`.
    public static func encode(_ trace: Trace) -> [UInt8] {
        var bytes = header(pageSize: trace.pageSize, startedAt: trace.startedAt)
        for (i, region) in trace.regions.enumerated() { bytes += encode(region: region, index: i) }
        var start = 0
        while start < trace.touches.count {
            // One chunk per run of the same space, at most 4096 records each.
            let space = trace.touches[start].space
            var end = start
            while end < trace.touches.count && end - start < 4096 && trace.touches[end].space == space { end += 1 }
            bytes += encode(touches: trace.touches[start..<end], space: space)
            start = end
        }
        for sample in trace.writeSamples { bytes += encode(sample: sample) }
        bytes += encodeEnd(duration: trace.duration, dropped: trace.dropped)
        return bytes
    }

    /// Writes `trace` to `path` (replacing it).
    public static func write(_ trace: Trace, to path: String) throws(TraceError) {
        let writer = try TraceWriter(path: path, pageSize: trace.pageSize, startedAt: trace.startedAt)
        try writer.append(Array(encode(trace).dropFirst(headerBytes)))
        try writer.close()
    }
}

/// Reads the integers of a trace file; a read past the end is a ``TraceError``.
typealias ByteReader = LittleEndianReader<TraceError>

extension LittleEndianReader where Failure == TraceError {
    init(_ data: [UInt8]) {
        self.init(data) { offset, needed, left in
            TraceError("cut short at byte \(offset): \(needed) bytes needed, \(left) left")
        }
    }
}
