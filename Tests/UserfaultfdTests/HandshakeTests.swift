import Glibc
import TestSupport
import Testing
import Userfaultfd

extension Matrix {
    /// `api`: the UFFDIO_API handshake, through the syscall and through the device.
    @Suite("api") struct Handshake {
        @Test("bad api value, unknown bit 63 refused, second handshake fails", .needsUserfaultfd)
        func api() throws { try checkAPI(.syscall) }

        @Test("the same through /dev/userfaultfd", .needsDevice)
        func apiThroughTheDevice() throws { try checkAPI(.device) }

        func checkAPI(_ method: Userfaultfd.CreationMethod) throws {
            var uffd = try Userfaultfd.open(method: method)

            let badAPI = error { try uffd.handshake(features: [], api: 0xab) }
            #expect(badAPI?.errno == .invalidArgument)
            #expect(badAPI?.operation == "UFFDIO_API")

            // Bit 63 reaches the kernel unchanged (the library keeps unknown bits) and is refused there.
            let bit63 = Userfaultfd.Features(rawValue: 1 << 63)
            let unknown = error { try uffd.handshake(features: bit63) }
            #expect(unknown?.errno == .invalidArgument)
            #expect(unknown?.hint?.contains("0x8000000000000000") == true)
            #expect(uffd.features == [])

            let offered = try uffd.handshake(features: [])
            #expect(offered.contains(.pagefaultFlagWP))
            // The descriptor is a userfaultfd, non-blocking (poll on a blocking one fails
            // at once) and closed on exec.
            #expect(linkTarget(uffd.fileDescriptor.rawValue) == "anon_inode:[userfaultfd]")
            #expect(fcntl(uffd.fileDescriptor.rawValue, F_GETFL) & O_NONBLOCK != 0)
            #expect(fcntl(uffd.fileDescriptor.rawValue, F_GETFD) & FD_CLOEXEC != 0)
            #expect(uffd.handle.fdIoctls.isSuperset(of: [.api, .register, .unregister]))

            let second = error { try uffd.handshake(features: .pagefaultFlagWP) }
            #expect(second?.errno == .invalidArgument)
        }

        @Test("the probe reports every feature and each can be enabled", .needsUserfaultfd)
        func probe() throws {
            let support = try Userfaultfd.probe()
            #expect(support.ioctls.isSuperset(of: [.api, .register, .unregister]))
            // Every feature this kernel offers is accepted in one handshake, and is what the fd reports.
            let all = try Userfaultfd(features: support.features)
            #expect(all.features.isSuperset(of: support.features))
            // The names cover bits 0 to 16, one each.
            let bits = Userfaultfd.Features.named.map(\.feature.rawValue)
            #expect(bits == (0..<17).map { UInt64(1) << UInt64($0) })
        }

        @Test("unknown bits are kept and shown")
        func unknownBitsKept() {
            let features = Userfaultfd.Features(rawValue: 1 << 63 | 1 << 40 | 1)
            #expect(features.rawValue == UInt64(1) << 63 | UInt64(1) << 40 | 1)
            #expect(features.description == "[PAGEFAULT_FLAG_WP, 0x8000010000000000]")
            #expect(Userfaultfd.Ioctls(rawValue: 1 << 3 | 1 << 20).description == "[COPY, 0x100000]")
        }

        @Test("required features the kernel lacks fail before any fd is made", .needsUserfaultfd)
        func requiredFeatures() throws {
            let missing = Userfaultfd.Features(rawValue: 1 << 62)
            do {
                _ = try Userfaultfd(.init().requiring([.threadID, missing]))
                Issue.record("creation succeeded without feature bit 62")
            } catch {
                #expect(error.kind == .unsupportedFeatures(missing))
                #expect(error.description.contains("does not offer the required features"))
            }
            let uffd = try Userfaultfd(.init().requiring(.threadID).preferring([.move, missing]))
            #expect(uffd.features.contains([.threadID, .move]))
            #expect(!uffd.features.contains(missing))
        }
    }
}
