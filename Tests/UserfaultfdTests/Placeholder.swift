import Testing
import Userfaultfd
import Glibc

@Test func smokeCopy() throws {
    let uffd = try Userfaultfd(features: [.threadID])
    let m = try MemoryMapping.anonymous(length: 4 * 4096)
    let ioctls = try uffd.handle.register(m.range, mode: .missing)
    #expect(ioctls.contains(.copy))
    let src = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
    memset(src, 0x5a, 4096)
    let out = try uffd.handle.copy(to: m.range.start, from: src, length: 4096)
    #expect(out == .completed(4096))
    #expect(try uffd.handle.copy(to: m.range.start, from: src, length: 4096) == .alreadyPresent)
    #expect(m.base.load(as: UInt8.self) == 0x5a)
    let p = SystemProbe.run()
    print(p.support!.features, p.memoryTypes.map { "\($0.kind) \($0.unavailable ?? "") \($0.modes.map { "\($0.mode)=\($0.ioctls?.description ?? $0.error!)" })" })
}
