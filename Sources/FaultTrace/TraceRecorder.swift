import FaultEngine
import Synchronization
import SystemPackage
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Appends chunks to a trace file; the header is written when it opens.
public final class TraceWriter {
    private let fd: FileDescriptor
    private let path: String
    private var closed = false

    /// Creates (or replaces) the trace file at `path` and writes its header.
    public convenience init(path: String, pageSize: Int, startedAt: UInt64) throws(TraceError) {
        try self.init(creating: path)
        try append(TraceFile.header(pageSize: pageSize, startedAt: startedAt))
    }

    /// Creates (or replaces) the file at `path`, empty.
    init(creating path: String) throws(TraceError) {
        self.path = path
        do {
            fd = try FileDescriptor.open(path, .writeOnly, options: [.create, .truncate, .closeOnExec],
                                         permissions: [.ownerReadWrite, .groupRead, .otherRead])
        } catch {
            throw TraceError("\(path): cannot create: \(error)")
        }
    }

    deinit { if !closed { try? fd.close() } }

    /// Appends encoded bytes.
    public func append(_ bytes: [UInt8]) throws(TraceError) {
        do {
            _ = try bytes.withUnsafeBytes { try fd.writeAll($0) }
        } catch {
            throw TraceError("\(path): cannot write: \(error)")
        }
    }

    /// Closes the file (call after the end chunk).
    public func close() throws(TraceError) {
        if closed { return }
        closed = true
        do { try fd.close() } catch { throw TraceError("\(path): cannot close: \(error)") }
    }
}

/// Records a trace to a file while servers run: give ``sink`` to each `FaultServer`
/// (`FaultServer.traceSink`) before starting it, let a ``WriteSampler`` add write
/// samples, and ``finish()`` when done.
///
/// A background thread drains the handlers' buffers into the file every
/// `drainInterval`; the fault path only writes into its preallocated buffer.
public final class TraceRecorder: @unchecked Sendable {
    /// Where the servers hand their faults.
    public let sink: FaultTraceSink
    /// The `CLOCK_MONOTONIC` time (`FaultTraceSink.now()`) the trace's times count from.
    public let startTime: UInt64

    private struct State {
        var writer: TraceWriter?
        var regions: [TraceRegion] = []
        var labels: [UInt64: String] = [:]
        var spacesDescribed = 0
        var touches = 0
        var error: TraceError?
    }

    private let state: Mutex<State>
    private let stopSignal: StopSignal
    private var thread: DedicatedThread?

    /// Creates the trace file at `path` and starts draining.
    ///
    /// - Parameters:
    ///   - path: the trace file to write (replaced).
    ///   - pageSize: the page size of the memory traced.
    ///   - drainInterval: milliseconds between drains of the handlers' buffers.
    ///   - ringCapacity: records each handler thread can hold between drains.
    public init(path: String, pageSize: Int = systemPageSize, drainInterval: Int32 = 20,
                ringCapacity: Int = 1 << 15) throws(TraceError) {
        sink = FaultTraceSink(ringCapacity: ringCapacity)
        startTime = FaultTraceSink.now()
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let writer = try TraceWriter(path: path, pageSize: pageSize,
                                     startedAt: UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec))
        state = Mutex(State(writer: writer))
        do {
            stopSignal = try StopSignal()
        } catch {
            throw TraceError("cannot create the recorder's stop signal: \(error)")
        }
        let stop = stopSignal
        thread = DedicatedThread(name: "uffd-trace") { [self] in
            var p = pollfd(fd: stop.fileDescriptor.rawValue, events: Int16(POLLIN), revents: 0)
            // A drain every interval until the stop signal is raised (or poll fails).
            while retryOnInterrupt({ Glibc.poll(&p, 1, drainInterval) }) == 0 {
                self.drain()
            }
        }
    }

    deinit { _ = try? finish() }

    /// Gives the region starting at `start` a name to show (before it is first described).
    public func label(start: UInt64, _ label: String) {
        state.withLock { $0.labels[start] = label }
    }

    /// The index of the region `range` of `space`, describing it in the file the first time.
    public func region(space: Int, range: MemoryRange, sourceOffset: UInt64 = 0, writeTracked: Bool = false) -> Int {
        state.withLock { s in Self.region(&s, space: space, range: range, sourceOffset: sourceOffset, writeTracked: writeTracked) }
    }

    private static func region(_ s: inout State, space: Int, range: MemoryRange, sourceOffset: UInt64, writeTracked: Bool) -> Int {
        if let i = s.regions.firstIndex(where: { $0.space == space && $0.start == range.start && $0.length == range.length }) {
            return i
        }
        let region = TraceRegion(space: space, start: range.start, length: range.length, sourceOffset: sourceOffset,
                                 writeTracked: writeTracked, label: s.labels[range.start] ?? "")
        s.regions.append(region)
        write(&s, TraceFile.encode(region: region, index: s.regions.count - 1))
        return s.regions.count - 1
    }

    private static func write(_ s: inout State, _ bytes: [UInt8]) {
        guard s.error == nil, let writer = s.writer else { return }
        do { try writer.append(bytes) } catch { s.error = error }
    }

    /// Appends a write sample (``WriteSampler`` calls this).
    func add(_ sample: WriteSample) {
        state.withLock { s in Self.write(&s, TraceFile.encode(sample: sample)) }
    }

    /// Nanoseconds since the trace began.
    public func elapsed() -> UInt64 {
        let now = FaultTraceSink.now()
        return now > startTime ? now - startTime : 0
    }

    /// Moves what the handlers recorded into the file.
    func drain() {
        var collected: [Int: [TraceTouch]] = [:]
        let start = startTime
        sink.drain { space, fault in
            collected[space, default: []].append(TraceTouch(
                space: space, time: fault.time > start ? fault.time - start : 0, address: fault.address,
                latency: fault.latency, kind: fault.kind))
        }
        let spaces = sink.spaces
        state.withLock { s in
            while s.spacesDescribed < spaces.count {
                let space = spaces[s.spacesDescribed]
                for r in space.regions {
                    _ = Self.region(&s, space: space.id, range: r.range, sourceOffset: r.sourceOffset, writeTracked: false)
                }
                s.spacesDescribed += 1
            }
            for (space, touches) in collected.sorted(by: { $0.key < $1.key }) {
                var i = 0
                while i < touches.count {
                    let end = min(i + 4096, touches.count)
                    Self.write(&s, TraceFile.encode(touches: touches[i..<end], space: space))
                    i = end
                }
                s.touches += touches.count
            }
        }
    }

    /// Stops draining, writes what is left and the end record, and closes the file.
    /// Stop the servers first: faults resolved later are not recorded.
    ///
    /// - Returns: the number of first touches recorded.
    /// - Throws: ``TraceError`` if writing the file failed at any point.
    @discardableResult
    public func finish() throws(TraceError) -> Int {
        stopSignal.raise()
        thread?.join()
        thread = nil
        drain()
        let duration = elapsed()
        let dropped = sink.dropped
        return try state.withLock { (s: inout State) throws(TraceError) -> Int in
            if let writer = s.writer {
                Self.write(&s, TraceFile.encodeEnd(duration: duration, dropped: dropped))
                s.writer = nil
                do throws(TraceError) { try writer.close() } catch { s.error = s.error ?? error }
            }
            if let error = s.error { throw error }
            return s.touches
        }
    }
}
