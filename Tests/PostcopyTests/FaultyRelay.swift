import Synchronization
import Testing
import Userfaultfd
@testable import Postcopy

#if canImport(Glibc)
import Glibc
#endif

/// A TCP relay between a source and a destination that can delay, stall and reset the
/// connections it carries: the network faults that `netem` would give, without it.
final class FaultyRelay: @unchecked Sendable {
    let listener: MigrationListener
    /// Microseconds each forwarded chunk waits.
    let delayMicroseconds = Atomic<Int>(0)
    /// While set, nothing is forwarded (connections stay open).
    let stalled = Atomic<Bool>(false)
    /// Connections relayed so far.
    let connections = Atomic<Int>(0)
    private let stopping = Atomic<Bool>(false)
    private let live = Mutex<[(Connection, Connection)]>([])
    private let forwarders = Mutex<[DedicatedThread]>([])
    private var acceptThread: DedicatedThread?

    /// Listens on `listener` and relays each connection to `upstream`, connecting from a
    /// thread inside `namespace`.
    init(listener: MigrationListener, upstream: MigrationEndpoint, network: NetworkPair, namespace: String) {
        self.listener = listener
        acceptThread = network.start(in: namespace) { [self] in acceptLoop(upstream) }
    }

    private func acceptLoop(_ upstream: MigrationEndpoint) {
        var p = pollfd(fd: listener.fd, events: Int16(POLLIN), revents: 0)
        while !stopping.load(ordering: .acquiring) {
            guard poll(&p, 1, 50) > 0 else { continue }
            let fd = Glibc.accept(listener.fd, nil, nil)
            if fd < 0 { continue }
            let downstream = Connection(fd: fd)
            guard let up = try? Connection.connect(to: upstream, deadline: MonotonicClock.nanoseconds() + 2_000_000_000) else { continue }
            connections.add(1, ordering: .relaxed)
            live.withLock { $0.append((downstream, up)) }
            let threads = [
                DedicatedThread(name: "test-relay-up") { [self] in forward(from: downstream, to: up) },
                DedicatedThread(name: "test-relay-down") { [self] in forward(from: up, to: downstream) },
            ]
            forwarders.withLock { $0 += threads }
        }
    }

    private func forward(from a: Connection, to b: Connection) {
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 64 << 10, alignment: 16)
        defer {
            buffer.deallocate()
            a.shutdown()
            b.shutdown()
        }
        var p = pollfd(fd: a.fd, events: Int16(POLLIN), revents: 0)
        while !stopping.load(ordering: .acquiring) {
            if stalled.load(ordering: .acquiring) { usleep(5_000); continue }
            guard poll(&p, 1, 20) > 0 else { continue }
            if stalled.load(ordering: .acquiring) { continue }
            let n = recv(a.fd, buffer, 64 << 10, Int32(MSG_DONTWAIT))
            if n == 0 { return }
            if n < 0 { if errno == EAGAIN || errno == EINTR { continue } else { return } }
            let delay = delayMicroseconds.load(ordering: .relaxed)
            if delay > 0 { usleep(UInt32(delay)) }
            var sent = 0
            while sent < n {
                let m = Glibc.send(b.fd, buffer + sent, n - sent, Int32(MSG_NOSIGNAL))
                if m < 0 { if errno == EINTR { continue } else { return } }
                sent += m
            }
        }
    }

    /// Resets every live connection (both sides get RST), as a middlebox that drops state would.
    func resetAll() {
        let pairs = live.withLock { pairs in defer { pairs = [] }; return pairs }
        for (a, b) in pairs {
            for c in [a, b] {
                var linger = Glibc.linger(l_onoff: 1, l_linger: 0)
                _ = setsockopt(c.fd, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<Glibc.linger>.size))
                // Closes the socket (RST, with linger 0) and leaves /dev/null in its place, so
                // the forwarders' descriptor numbers stay valid until they notice.
                let null = open("/dev/null", O_RDWR | O_CLOEXEC)
                _ = dup2(null, c.fd)
                close(null)
            }
        }
    }

    /// Stops relaying and joins every thread.
    func stop() {
        stopping.store(true, ordering: .releasing)
        acceptThread?.join()
        acceptThread = nil
        live.withLock { for (a, b) in $0 { a.shutdown(); b.shutdown() } }
        for t in forwarders.withLock({ $0 }) { t.join() }
        forwarders.withLock { $0 = [] }
        live.withLock { $0 = [] }
    }

    deinit { stop() }
}
