#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Frames gathered for one `sendmsg`: a stream of scattered dirty pages is mostly runs of
/// one to four pages, and each frame would otherwise cost a system call (the demo's
/// precopy+postcopy sent 2.1 GB in 143 k frames, 3.7 pages a frame).
///
/// Headers live in the batch; payloads are the migrated memory itself, read when the
/// batch is sent, which is before the stream looks for more pages.
final class FrameBatch {
    /// The most frames in one batch.
    static let maxFrames = 32
    /// A batch is sent once its payloads reach this many bytes.
    let byteLimit: Int
    private let headers: UnsafeMutableRawPointer
    let vectors: UnsafeMutablePointer<iovec>
    private(set) var frames = 0
    private(set) var vectorCount = 0
    private(set) var bytes = 0

    init(byteLimit: Int) {
        self.byteLimit = byteLimit
        headers = .allocate(byteCount: Self.maxFrames * Wire.headerSize, alignment: 8)
        vectors = .allocate(capacity: 2 * Self.maxFrames)
    }

    deinit {
        headers.deallocate()
        vectors.deallocate()
    }

    var isEmpty: Bool { frames == 0 }

    /// Whether a frame with `payloadLength` more bytes must wait for the next batch.
    func isFull(adding payloadLength: Int) -> Bool {
        frames == Self.maxFrames || (frames > 0 && bytes + payloadLength > byteLimit)
    }

    /// Adds a frame (room must have been checked with ``isFull(adding:)``).
    func append(_ header: Wire.Header, payload: UnsafeRawPointer?) {
        let h = headers + frames * Wire.headerSize
        header.encode(into: h)
        vectors[vectorCount] = iovec(iov_base: h, iov_len: Wire.headerSize)
        vectorCount += 1
        let length = Int(header.payloadLength)
        if let payload, length > 0 {
            vectors[vectorCount] = iovec(iov_base: UnsafeMutableRawPointer(mutating: payload), iov_len: length)
            vectorCount += 1
        }
        frames += 1
        bytes += Wire.headerSize + length
    }

    /// Sends the batch on `connection` and empties it.
    func flush(_ connection: Connection) throws(MigrationError) {
        if frames == 0 { return }
        try connection.send(vectors, count: vectorCount, bytes: bytes)
        frames = 0
        vectorCount = 0
        bytes = 0
    }
}
