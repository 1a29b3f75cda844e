import TestSupport
import FaultManager
import Testing

#if canImport(Glibc)
import Glibc
#endif

private func environmentInt(_ name: String) -> Int? {
    getenv(name).flatMap { Int(String(cString: $0)) }
}

private var canFloodAsAnotherUser: Bool { geteuid() == 0 && DaemonProcess.available }

/// `uffd serve` under load from hostile and dying clients, measured from outside.
///
/// Short by default; `UFFD_FLOOD_CONNECTIONS=500` and `UFFD_SOAK_SECONDS=300` give the
/// long forms, and `UFFD_SERVE_EXECUTABLE` measures another build of `uffd`.
@Suite(.sharesProcess, .serialized, .timeLimit(.minutes(30)))
struct DaemonLoadTests {
    /// The most of `samples` readings of the daemon's usage, taken `interval` apart.
    func peakUsage(_ daemon: DaemonProcess, samples: Int = 10, intervalMicroseconds: UInt32 = 100_000) -> DaemonProcess.Usage {
        var peak = daemon.usage
        for _ in 0..<samples {
            usleep(intervalMicroseconds)
            let now = daemon.usage
            peak = .init(rssKiB: max(peak.rssKiB, now.rssKiB), threads: max(peak.threads, now.threads),
                         descriptors: max(peak.descriptors, now.descriptors))
        }
        return peak
    }

    /// The least of a few readings: an idle baseline without transient threads.
    func lowestUsage(_ daemon: DaemonProcess) -> DaemonProcess.Usage {
        var low = daemon.usage
        for _ in 0..<5 {
            usleep(100_000)
            let now = daemon.usage
            low = .init(rssKiB: min(low.rssKiB, now.rssKiB), threads: min(low.threads, now.threads),
                        descriptors: min(low.descriptors, now.descriptors))
        }
        return low
    }

    @Test(.enabled(if: canFloodAsAnotherUser, "needs root (to flood as uid 65534) and the uffd executable"))
    func floodFromAnUnauthorisedUIDLeavesTheDaemonFlat() throws {
        let connections = environmentInt("UFFD_FLOOD_CONNECTIONS") ?? 100
        let fixture = try Fixture()
        let daemon = try DaemonProcess(fixture)
        usleep(300_000)
        let idle = peakUsage(daemon, samples: 3)
        let flood = try ClientProcess(["--socket", daemon.socketPath, "--image", fixture.imagePath, "--scenario", "flood",
                                       "--flood", "silent", "--connections", "\(connections)", "--as-user", "65534"])
        #expect(flood.waitForOutput("FLOODING", seconds: 60), "flood said: \(flood.text)")
        let loaded = peakUsage(daemon, samples: 20)
        kill(flood.pid, SIGKILL)
        _ = flood.waitForExit(seconds: 10)
        usleep(500_000)
        let after = peakUsage(daemon, samples: 3)
        print("FLOOD \(connections) silent connections from uid 65534 (\(flood.text.split(separator: "\n").first ?? "")): "
              + "idle \(idle); under flood \(loaded); after \(after)")
        #expect(loaded.threads <= idle.threads + 1, "idle \(idle), under flood \(loaded)")
        #expect(loaded.descriptors <= idle.descriptors + 2, "idle \(idle), under flood \(loaded)")
        #expect(loaded.rssKiB < 2 * idle.rssKiB, "idle \(idle), under flood \(loaded)")
        let client = try fixture.client(["--socket", daemon.socketPath, "--handshake", "firecracker", "--scenario", "verify"])
        #expect(client.waitForExit() == 0, "client said: \(client.text)")
    }

    @Test(.enabled(if: canFloodAsAnotherUser, "needs root (to flood as uid 65534) and the uffd executable"))
    func soakWithHostileFloodsAndClientsThatFaultForkAndDie() throws {
        let seconds = Double(environmentInt("UFFD_SOAK_SECONDS") ?? 8)
        let fixture = try Fixture(imageLength: 4 << 20)
        // uid 65533 may hand over a uffd but only sends junk: the per-uid cap keeps it
        // from crowding out the real clients (uid 0); uid 65534 is not allowed at all.
        let daemon = try DaemonProcess(fixture, arguments: ["--handshake-timeout", "1", "--allow-uid", "65533"])
        usleep(300_000)
        let idle = lowestUsage(daemon)
        let floods = try [("65534", 32), ("65533", 32)].map { user, ring in
            try ClientProcess(["--socket", daemon.socketPath, "--image", fixture.imagePath, "--scenario", "flood",
                               "--flood", "churn", "--connections", "\(ring)", "--as-user", user])
        }
        var random = SystemRandomNumberGenerator()
        let scenarios = ["verify", "fork", "remove", "unmap", "layout", "remap"]
        var running: [(ClientProcess, String, killAt: Double?, started: Double)] = []
        var verified = 0, killed = 0, failures: [String] = []
        let end = monotonicSeconds() + seconds
        while monotonicSeconds() < end || !running.isEmpty {
            while running.count < 3 && monotonicSeconds() < end {
                let scenario = scenarios.randomElement(using: &random)!
                let handshake = Bool.random(using: &random) ? "native" : "firecracker"
                let client = try fixture.client(["--socket", daemon.socketPath, "--handshake", handshake, "--scenario", scenario,
                                                 "--seed", "\(UInt64.random(in: 1...1_000_000, using: &random))"])
                let dies = Int.random(in: 0..<4, using: &random) == 0
                let now = monotonicSeconds()
                running.append((client, "\(handshake) \(scenario) pid \(client.pid)", dies ? now + Double.random(in: 0...0.3, using: &random) : nil, now))
            }
            usleep(10_000)
            running.removeAll { client, what, killAt, started in
                if monotonicSeconds() - started > 60 {
                    failures.append("\(what) hung: \(client.text)")
                    return true
                }
                if let killAt, monotonicSeconds() >= killAt {
                    kill(client.pid, SIGKILL)
                    _ = client.waitForExit(seconds: 10)
                    killed += 1
                    return true
                }
                guard let status = client.waitForExit(seconds: 0) else { return false }
                if status == 0 { verified += 1 } else { failures.append("\(what) exited \(status): \(client.text)") }
                return true
            }
        }
        for flood in floods {
            #expect(flood.waitForExit(seconds: 0) == nil, "a flood stopped early: \(flood.text)")
            kill(flood.pid, SIGKILL)
            _ = flood.waitForExit(seconds: 10)
        }
        #expect(failures.isEmpty, "\(failures)")
        #expect(verified > 0)
        #expect(daemon.isRunning, "the daemon died: \(daemon.process.text)")
        // Everything the clients and floods cost is given back.
        var after = daemon.usage
        #expect(fixture.wait(seconds: 15) {
            after = daemon.usage
            return after.threads <= idle.threads && after.descriptors <= idle.descriptors
        }, "idle \(idle), after \(after)")
        #expect(after.rssKiB < 2 * idle.rssKiB, "idle \(idle), after \(after)")
        print("SOAK \(seconds) s: \(verified) clients verified, \(killed) killed mid-run; idle \(idle), after \(after)")
    }
}
