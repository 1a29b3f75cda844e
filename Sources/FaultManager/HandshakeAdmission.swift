/// The connections in handshake, in all and per uid, against their caps.
///
/// A connection is counted from the moment its credentials pass until its handshake
/// thread ends; over a cap it is refused at once instead of queued.
struct HandshakeAdmission: Sendable {
    /// Connections in handshake now.
    private(set) var total = 0
    /// Connections in handshake now, by the peer's uid.
    private(set) var perUID: [UInt32: Int] = [:]

    /// Counts a connection of `uid` in, unless a cap is reached.
    ///
    /// - Returns: nil if admitted, else why not (for the refusal's log line).
    mutating func admit(uid: UInt32, maxTotal: Int, maxPerUID: Int) -> String? {
        if total >= maxTotal {
            return "too many connections in handshake (\(total), the limit is \(maxTotal))"
        }
        let mine = perUID[uid, default: 0]
        if mine >= maxPerUID {
            return "too many connections in handshake from uid \(uid) (\(mine), the limit per uid is \(maxPerUID))"
        }
        total += 1
        perUID[uid] = mine + 1
        return nil
    }

    /// Counts an admitted connection of `uid` out.
    mutating func release(uid: UInt32) {
        total = max(0, total - 1)
        let left = perUID[uid, default: 0] - 1
        perUID[uid] = left > 0 ? left : nil
    }
}

/// At most so many log lines per second: a flood of refused connections must not
/// become a flood of log lines. The next line that passes says how many were dropped.
struct LogRateLimit: Sendable {
    let linesPerSecond: Int
    private var windowStart: ContinuousClock.Instant?
    private var inWindow = 0
    private var suppressed = 0

    init(linesPerSecond: Int) { self.linesPerSecond = linesPerSecond }

    /// Whether a line may be written now.
    ///
    /// - Returns: nil to drop the line, else how many lines were dropped since the last one written.
    mutating func admit(now: ContinuousClock.Instant) -> Int? {
        if let start = windowStart, now - start < .seconds(1) {
            if inWindow >= linesPerSecond {
                suppressed += 1
                return nil
            }
        } else {
            windowStart = now
            inWindow = 0
        }
        inWindow += 1
        defer { suppressed = 0 }
        return suppressed
    }
}
