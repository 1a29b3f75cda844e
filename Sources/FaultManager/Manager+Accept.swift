import SystemPackage
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Accepting connections: credentials first, caps next, then one bounded handshake thread.
///
/// Nothing is spent on a connection before its credentials pass: an unauthorised peer
/// is refused on the accept thread, without a thread or a buffer of its own. Over the
/// caps on connections in handshake, a connection is refused at once, not queued.
extension Manager {
    func acceptLoop(_ listener: FileDescriptor) {
        while waitForConnection(on: listener) {
            let connection: FileDescriptor?
            do {
                connection = try UnixSocket.accept(listener)
            } catch {
                logger.error("\(error)")
                // EMFILE and the like: back off instead of spinning.
                usleep(100_000)
                continue
            }
            if let connection { admit(connection) }
        }
    }

    /// Waits until a connection is pending; false once the manager stops (or poll fails).
    private func waitForConnection(on listener: FileDescriptor) -> Bool {
        var fds = (
            pollfd(fd: listener.rawValue, events: Int16(POLLIN), revents: 0),
            pollfd(fd: stopSignal.fileDescriptor.rawValue, events: Int16(POLLIN), revents: 0)
        )
        let n = retryOnInterrupt {
            withUnsafeMutableBytes(of: &fds) { raw in
                poll(raw.baseAddress!.assumingMemoryBound(to: pollfd.self), 2, -1)
            }
        }
        if n < 0 {
            logger.error("poll on the listening socket failed: errno \(errno)")
            return false
        }
        return fds.1.revents == 0
    }

    /// Checks a new connection's credentials and the caps, then starts its handshake.
    func admit(_ connection: FileDescriptor) {
        let deadline = ContinuousClock.now + .milliseconds(Int64(configuration.handshakeTimeout * 1000))
        let peer: DescriptorPassing.PeerCredentials
        do {
            peer = try DescriptorPassing.peerCredentials(of: connection)
        } catch {
            refuse(pid: 0, uid: UInt32.max, reason: "cannot read its credentials: \(error)", replyNative: nil)
            try? connection.close()
            return
        }
        if peer.uid != ownUID && !configuration.allowedUIDs.contains(peer.uid) {
            refuseAtOnce(connection, peer: peer, reason: "\(HandshakeError.unauthorized(uid: peer.uid))")
            return
        }
        let overCap = state.withLock {
            $0.admission.admit(uid: peer.uid, maxTotal: configuration.maxPendingHandshakes,
                               maxPerUID: configuration.maxPendingHandshakesPerUID)
        }
        if let overCap {
            refuseAtOnce(connection, peer: peer, reason: overCap)
            return
        }
        startHandshake(on: connection, peer: peer, deadline: deadline)
    }

    /// Refuses a connection without reading from it: a native client finds the reason
    /// waiting (sent without blocking), a Firecracker client sees the connection close.
    private func refuseAtOnce(_ connection: FileDescriptor, peer: DescriptorPassing.PeerCredentials, reason: String) {
        refuse(pid: peer.pid, uid: peer.uid, reason: reason, replyNative: nil)
        UnixSocket.sendWithoutBlocking(NativeReply(accepted: false, reason: reason).encoded(), over: connection)
        try? connection.close()
    }

    /// Runs one admitted connection's handshake on its own short-lived thread, so that
    /// a slow or silent peer never holds up the others. If no thread can be created,
    /// the connection is refused and the daemon keeps serving.
    private func startHandshake(on connection: FileDescriptor, peer: DescriptorPassing.PeerCredentials,
                                deadline: ContinuousClock.Instant) {
        let key = state.withLock { s -> Int in
            s.nextHandshake += 1
            s.pendingSockets[s.nextHandshake] = connection
            return s.nextHandshake
        }
        let done: @Sendable () -> Void = { [self] in
            // A finished handshake leaves the tables (its thread detaches itself).
            self.state.withLock { s in
                s.pendingSockets[key] = nil
                s.handshakes[key] = nil
                s.admission.release(uid: peer.uid)
            }
        }
        let thread: DedicatedThread
        do {
            thread = try DedicatedThread.start(name: "uffd-handshake") { [self] in
                self.handshake(on: connection, peer: peer, deadline: deadline)
                // Out of the tables first, so that stop() never shuts down a reused number.
                done()
                try? connection.close()
            }
        } catch {
            done()
            refuseAtOnce(connection, peer: peer, reason: "cannot start a thread for its handshake: \(error)")
            return
        }
        state.withLock { s in
            // Unless it already finished (then it removed nothing and must not be added).
            if s.pendingSockets[key] != nil { s.handshakes[key] = thread }
        }
    }
}
