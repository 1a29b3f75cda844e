import Glibc
import TestSupport
import Testing
import Userfaultfd

extension Matrix {
    /// `register-ioctls`: the ioctls UFFDIO_REGISTER returns for every mode on every memory type.
    @Suite("register-ioctls", .needsUserfaultfd) struct Register {
        @Test("all 8 mode combinations", arguments: MemoryKind.ordinary)
        func modes(_ kind: MemoryKind) throws { try checkRegisterModes(kind) }

        @Test("all 8 mode combinations on hugetlb", .needsFreeHugePages(8))
        func modesHugetlb() throws { try checkRegisterModes(.hugetlb) }

        @Test("a required ioctl the range lacks fails and leaves it unregistered", .needsFreeHugePages(8))
        func requiredIoctls() throws {
            let m = try MemoryKind.hugetlb.map(pages: 1)
            let first = try Userfaultfd(features: [.missingHugetlbfs])
            let e = error { try first.handle.register(m.range, mode: .missing, requiring: [.copy, .zeropage]) }
            #expect(e?.kind == .unsupportedIoctls(.zeropage))
            #expect(e?.operation == "UFFDIO_REGISTER")
            // Were the range still registered with `first`, a second uffd would get EBUSY.
            let second = try Userfaultfd(features: [.missingHugetlbfs])
            #expect(try second.handle.register(m.range, mode: .missing).contains(.copy))
        }

        @Test("bad ranges are refused with the reason")
        func badRanges() throws {
            let uffd = try Userfaultfd(features: [])
            let m = try MemoryKind.anonymous.map(pages: 2)
            let unaligned = MemoryRange(start: m.range.start + 1, length: UInt64(systemPageSize))
            let e = error { try uffd.handle.register(unaligned, mode: .missing) }
            guard case .invalidArgument(let why)? = e?.kind else {
                Issue.record("an unaligned range gave \(String(describing: e))")
                return
            }
            #expect(why.contains("not page-aligned"))
            #expect(error { try uffd.handle.register(MemoryRange(start: m.range.start, length: 0), mode: .missing) } != nil)
        }
    }
}

/// What the kernel offers for a range of `kind` registered with `mode`: hugetlb has
/// neither ZEROPAGE nor MOVE; MOVE and POISON where the kernel offers their features
/// (6.7 on); WRITEPROTECT and CONTINUE come with their modes.
func expectedIoctls(_ kind: MemoryKind, _ mode: Userfaultfd.RegisterMode) -> Userfaultfd.Ioctls {
    var ioctls: Userfaultfd.Ioctls = [.wake, .copy]
    if kind != .hugetlb { ioctls.insert(.zeropage) }
    if kind != .hugetlb && kernelFeatures.contains(.move) { ioctls.insert(.move) }
    if kernelFeatures.contains(.poison) { ioctls.insert(.poison) }
    if mode.contains(.writeProtect) { ioctls.insert(.writeProtect) }
    if mode.contains(.minor) { ioctls.insert(.continue) }
    return ioctls
}

func checkRegisterModes(_ kind: MemoryKind) throws {
    let uffd = try Userfaultfd(features: [.missingHugetlbfs, .missingShmem, .pagefaultFlagWP, .wpHugetlbfsShmem, .minorHugetlbfs, .minorShmem])
    let m = try kind.map(pages: 1)
    for raw in UInt64(0)..<8 {
        let mode = Userfaultfd.RegisterMode(rawValue: raw)
        var ioctls: Userfaultfd.Ioctls?
        let e = error { ioctls = try uffd.handle.register(m.range, mode: mode) }
        if mode.isEmpty {
            guard case .invalidArgument? = e?.kind else {
                Issue.record("an empty mode gave \(String(describing: ioctls)) \(String(describing: e))")
                continue
            }
        } else if mode.contains(.minor) && kind == .anonymous {
            #expect(e?.errno == .invalidArgument, "MINOR on anonymous memory, mode \(mode)")
            #expect(e?.hint?.contains("MINOR needs shmem or hugetlbfs") == true)
        } else {
            #expect(e == nil, "mode \(mode)")
            #expect(ioctls == expectedIoctls(kind, mode), "mode \(mode)")
            try uffd.handle.unregister(m.range)
        }
    }
}
