// Runs the PagedMemory scenarios whose outcome is a signal or a process exit:
//   paged-memory-test-helper sigbus            a failing store read gives the toucher SIGBUS
//   paged-memory-test-helper flush PATH SEED   write every page, flush, exit without unmapping
//   paged-memory-test-helper cgroup CGROUP PATH BUFFER RESOLUTION
//                                              join a memory cgroup, read random pages, report memory
import FaultEngine
import Foundation
import MapBench
import PagedMemory
import SystemPackage
import Userfaultfd

#if canImport(Glibc)
import Glibc
#endif

/// A store whose reads fail with EIO at and past `failFrom`.
final class FailingStore: PageStore, @unchecked Sendable {
    let size: Int
    let failFrom: Int
    init(size: Int, failFrom: Int) { self.size = size; self.failFrom = failFrom }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws(Errno) {
        if offset + buffer.count > failFrom { throw .ioError }
        buffer.initializeMemory(as: UInt8.self, repeating: 0x5A)
    }
    func write(_ buffer: UnsafeRawBufferPointer, at offset: Int) throws(Errno) {}
    func synchronize() throws(Errno) {}
}

nonisolated(unsafe) let signalled = UnsafeMutablePointer<Int32>.allocate(capacity: 1)

func sigbusScenario() -> Int32 {
    signalled.pointee = 0
    var action = sigaction()
    action.__sigaction_handler.sa_handler = { _ in
        signalled.pointee = 1
        while true { pause() }
    }
    sigaction(SIGBUS, &action, nil)
    var configuration = PagerConfiguration(bufferBytes: 1 << 20)
    configuration.maxReadAheadPages = 0
    guard let pager = try? Pager(configuration),
          let mapping = try? pager.map(FailingStore(size: 64 << 10, failFrom: 32 << 10)) else {
        print("setup failed")
        return 2
    }
    let good = mapping.base.load(fromByteOffset: 4096, as: UInt8.self)
    let address = UInt(bitPattern: mapping.base) + UInt(40 << 10)
    _ = DedicatedThread(name: "toucher") {
        let p = UnsafeMutableRawPointer(bitPattern: address)!
        print("read \(p.load(as: UInt8.self))")
    }
    for _ in 0..<1000 where signalled.pointee == 0 { usleep(10_000) }
    print("good \(good)")
    print("signalled \(signalled.pointee)")
    for e in mapping.errors { print("error \(e)") }
    fflush(nil)
    _exit(0)
}

func flushScenario(_ path: String, _ seed: UInt64) -> Int32 {
    guard let pager = try? Pager(PagerConfiguration(bufferBytes: 1 << 20)),
          let store = try? FileStore(path: path),
          let mapping = try? pager.map(store) else {
        print("setup failed")
        return 2
    }
    let words = mapping.length / 8
    for i in stride(from: 0, to: words, by: 512) {
        mapping.base.storeBytes(of: UInt64(i) &* seed, toByteOffset: i * 8, as: UInt64.self)
    }
    do { try mapping.flush() } catch {
        print("flush failed: \(error)")
        return 3
    }
    print("flushed")
    fflush(nil)
    // No unmap, no deinit: only what flush made durable survives.
    _exit(0)
}

/// Anonymous resident memory of this process in KiB (`RssAnon` of /proc/self/status).
func rssAnonKiB() -> Int {
    let status = (try? String(contentsOfFile: "/proc/self/status", encoding: .utf8)) ?? ""
    for line in status.split(separator: "\n") where line.hasPrefix("RssAnon:") {
        return Int(line.split(separator: " ").dropFirst().first ?? "") ?? -1
    }
    return -1
}

func cgroupScenario(_ cgroup: String, _ path: String, _ buffer: Int, _ resolution: FaultResolution) -> Int32 {
    do { try MemoryCgroup.join(cgroup) } catch {
        print("join failed: \(error)")
        return 2
    }
    var configuration = PagerConfiguration(bufferBytes: buffer)
    configuration.resolution = resolution
    guard let pager = try? Pager(configuration),
          let store = try? FileStore(path: path, mode: .direct, writable: false),
          let mapping = try? pager.map(store, sharing: .private) else {
        print("setup failed")
        return 2
    }
    var rng = SplitMix64(seed: 5)
    var wrong = 0
    var rss = 0
    let words = mapping.length / 8
    for step in 0..<60_000 {
        let w = Int(rng.next() % UInt64(words))
        if mapping.base.load(fromByteOffset: w * 8, as: UInt64.self) != DataFiles.pattern(w) { wrong += 1 }
        if step % 8 == 0 { mapping.base.storeBytes(of: DataFiles.pattern(w), toByteOffset: w * 8, as: UInt64.self) }
        if step % 4096 == 0 { rss = max(rss, rssAnonKiB()) }
    }
    rss = max(rss, rssAnonKiB())
    let stats = pager.statistics
    print("resolution \(mapping.resolution.rawValue)")
    print("wrong \(wrong)")
    print("peak \(stats.peakResidentBytes)")
    print("evicted \(stats.pagesEvicted)")
    print("rss-anon-kib \(rss)")
    fflush(nil)
    _exit(0)
}

let arguments = CommandLine.arguments
switch arguments.count > 1 ? arguments[1] : "" {
case "sigbus": exit(sigbusScenario())
case "flush" where arguments.count == 4: exit(flushScenario(arguments[2], UInt64(arguments[3]) ?? 1))
case "cgroup" where arguments.count == 6:
    exit(cgroupScenario(arguments[2], arguments[3], Int(arguments[4]) ?? 0, FaultResolution(rawValue: arguments[5]) ?? .handlerThreads))
default:
    print("usage: paged-memory-test-helper sigbus | flush PATH SEED | cgroup CGROUP PATH BUFFER RESOLUTION")
    exit(64)
}
