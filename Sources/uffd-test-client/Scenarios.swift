import FaultManager
import Synchronization
import SystemPackage
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Creates the guest, registers it, hands it over and runs the scenario.
func runClient(_ options: Options) -> Never {
    if let user = options.asUser { become(user) }
    if options.memory == .hugetlb { page = HugePages.size }
    let guest = Guest(imagePath: options.image, length: options.length, hugetlb: options.memory == .hugetlb)
    let privileged = geteuid() == 0
    var features: Userfaultfd.Features = [.eventRemap, .eventRemove, .eventUnmap]
    if privileged { features.insert(.eventFork) }
    let uffd: Userfaultfd
    do {
        uffd = try Userfaultfd(features: features, userModeOnly: !privileged)
        for r in guest.regions { try uffd.handle.register(MemoryRange(r.base, length: r.length), mode: .missing) }
    } catch {
        fail(2, "\(error)")
    }
    // The working-set pass is timed from the hand-over on, with its page list ready before.
    let chosen = options.scenario == "workingset" ? workingSetPages(guest, options) : []
    let handOverStarted = MonotonicClock.nanoseconds()
    var keepAlive: FileDescriptor? = nil
    switch options.handshake {
    case .firecracker:
        do {
            keepAlive = try ManagerClient.handOverLikeFirecracker(uffd, regions: guest.clientRegions, to: options.socket)
        } catch {
            fail(2, "\(error)")
        }
    case .native:
        var backing = ManagerClient.Backing.memoryFile
        if options.backing == .attached { backing = .file(FileDescriptor(rawValue: guest.image)) }
        do {
            let id = try ManagerClient.handOver(uffd, regions: guest.clientRegions, backing: backing,
                                                to: options.socket, name: options.name)
            say("CLIENT \(id)")
        } catch {
            if case .system = error { fail(2, "\(error)") }
            fail(3, "\(error)")
        }
    }
    // The daemon holds the uffd now; this process keeps its copy open until it exits.
    say("READY")
    switch options.scenario {
    case "verify": verify(guest)
    case "fork": fork(guest)
    case "remap": remap(guest)
    case "remove": remove(guest)
    case "unmap": unmap(guest)
    case "layout": layout(guest)
    case "slow": slow(guest)
    case "workingset": workingSet(guest, chosen, since: handOverStarted)
    case "restore": restore(guest, write: options.pass == "write", since: handOverStarted)
    default: fail(2, "unknown scenario \(options.scenario)")
    }
    _ = keepAlive
    _ = uffd
    exit(0)
}

/// Every byte of both regions, then writes into faulting pages.
func verify(_ guest: Guest) {
    guest.expect(0, "first read")
    guest.expect(1, "first read")
    // Write faults: the page arrives from the image, then the write lands on it.
    let pages = guest.regions[1].length / page
    let written = guest.regions[1].base
    for p in stride(from: 0, to: pages, by: 7) { written.storeBytes(of: 0xA5A5_0000_0000_0000 | UInt64(p), toByteOffset: p * page + 64, as: UInt64.self) }
    for p in stride(from: 0, to: pages, by: 7) {
        if written.load(fromByteOffset: p * page + 64, as: UInt64.self) != 0xA5A5_0000_0000_0000 | UInt64(p) { fail(1, "write lost on page \(p)") }
    }
    say("OK verify \(guest.regions.map { $0.length }.reduce(0, +) / page) pages")
}

/// Half of the memory is present before `fork`, half is not: the child must see the
/// image everywhere (the missing half through its own uffd, served by the daemon).
func fork(_ guest: Guest) {
    let halves = guest.regions.map { $0.length / page / 2 }
    for r in 0..<2 { guest.expect(r, pages: 0, count: halves[r], "before fork") }
    let child = Glibc.fork()
    if child < 0 { fail(2, "fork: errno \(errno)") }
    if child == 0 {
        // Only async-signal-safe calls here: pread, memcmp, _exit.
        let bad = guest.mismatch(0) != nil || guest.mismatch(1) != nil
        guest.regions[0].base.storeBytes(of: 0xDEAD_BEEF, as: UInt64.self)
        _exit(bad ? 1 : 0)
    }
    var status: Int32 = 0
    _ = retryOnInterrupt { waitpid(child, &status, 0) }
    if status != 0 { fail(1, "the forked child saw wrong bytes (wait status \(status))") }
    guest.expect(0, "parent after fork")
    guest.expect(1, "parent after fork")
    say("OK fork")
}

/// Half of region 1 present, then `mremap` it elsewhere: the rest faults at the new
/// address and must still get the same image bytes.
func remap(_ guest: Guest) {
    let half = guest.regions[1].length / page / 2
    guest.expect(1, pages: 0, count: half, "before mremap")
    guest.remap(1)
    guest.expect(1, "after mremap")
    guest.expect(0, "other region after mremap")
    say("OK remap")
}

/// `madvise(DONTNEED)` over touched and untouched pages: both read zeros afterwards.
func remove(_ guest: Guest) {
    let pages = guest.regions[0].length / page
    guest.expect(0, pages: 0, count: pages / 4, "before madvise")
    guest.remove(0, pages: 0, count: pages / 2)
    guest.expect(0, pages: 0, count: pages / 2, zeros: true, "after madvise")
    guest.expect(0, pages: pages / 2, count: pages - pages / 2, "beyond the madvise")
    guest.expect(1, "other region after madvise")
    say("OK remove")
}

/// `munmap` of a region's tail; the rest still reads the image.
func unmap(_ guest: Guest) {
    let pages = guest.regions[1].length / page
    guest.expect(1, pages: 0, count: pages / 4, "before munmap")
    guest.unmapTail(1, pages: pages / 2)
    guest.expect(1, "after munmap")
    guest.expect(0, "other region after munmap")
    say("OK unmap")
}

/// Layout changes while another thread keeps faulting: region 0 is read page by page
/// on a second thread while region 1 is remapped, partly released, partly unmapped,
/// and the process forks.
func layout(_ guest: Guest) {
    let region0 = guest.regions[0]
    let failure = Atomic<Int>(-1)
    let reader = DedicatedThread(name: "guest-reader") {
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: page, alignment: page)
        defer { scratch.deallocate() }
        for p in 0..<(region0.length / page) {
            if pread(guest.image, scratch, page, off_t(region0.imageOffset + p * page)) != page
                || memcmp(region0.base + p * page, scratch, page) != 0 {
                failure.store(p, ordering: .relaxed)
                return
            }
        }
    }
    let pages = guest.regions[1].length / page
    guest.expect(1, pages: 0, count: pages / 8, "before the layout changes")
    guest.remap(1)
    guest.remove(1, pages: pages / 8, count: pages / 8)
    guest.unmapTail(1, pages: pages / 4)
    reader.join()
    let bad = failure.load(ordering: .relaxed)
    if bad >= 0 { fail(1, "the reader saw wrong bytes on region 0 page \(bad)") }
    guest.expect(1, pages: 0, count: pages / 8, "after mremap")
    guest.expect(1, pages: pages / 8, count: pages / 8, zeros: true, "after madvise")
    guest.expect(1, pages: pages / 4, count: pages - pages / 4 - pages / 4, "after munmap")
    if geteuid() == 0 {
        let child = Glibc.fork()
        if child == 0 { _exit(guest.mismatch(1, pages: pages / 4, count: pages / 2) == nil ? 0 : 1) }
        var status: Int32 = 0
        _ = retryOnInterrupt { waitpid(child, &status, 0) }
        if status != 0 { fail(1, "the forked child saw wrong bytes (wait status \(status))") }
    }
    guest.expect(0, "region 0 at the end")
    say("OK layout")
}

/// Faults forever: every page, then releases everything and starts again. For tests
/// that kill the client while a fault is in flight.
func slow(_ guest: Guest) -> Never {
    var rounds = 0
    while true {
        _ = guest.touch(0)
        _ = guest.touch(1)
        for r in 0..<2 { guest.remove(r, pages: 0, count: guest.regions[r].length / page) }
        rounds += 1
        if rounds == 1 { say("FAULTING") }
    }
}

/// A fixed pseudo-random `touchPercent` of the pages (the same set and order for the
/// same seed), as page numbers across both regions.
func workingSetPages(_ guest: Guest, _ options: Options) -> [Int] {
    var state = options.seed
    func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    let perRegion = guest.regions[0].length / page
    var pages = Array(0..<(2 * perRegion))
    for i in stride(from: pages.count - 1, to: 0, by: -1) { pages.swapAt(i, Int(next() % UInt64(i + 1))) }
    return Array(pages.prefix(max(1, pages.count * options.touchPercent / 100)))
}

/// Touches the chosen pages and reports how long the first full pass took, counted
/// from the start of the hand-over; then checks their bytes.
func workingSet(_ guest: Guest, _ chosen: [Int], since start: UInt64) {
    let perRegion = guest.regions[0].length / page
    var sum: UInt64 = 0
    for p in chosen {
        let r = p / perRegion
        sum &+= UInt64(guest.regions[r].base.load(fromByteOffset: (p % perRegion) * page, as: UInt8.self))
    }
    let elapsed = MonotonicClock.nanoseconds() - start
    for p in chosen { guest.expect(p / perRegion, pages: p % perRegion, count: 1, "working set") }
    say("TIME_NS \(elapsed) pages \(chosen.count) sum \(sum)")
    say("OK workingset")
}
