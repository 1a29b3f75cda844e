import FaultEngine
import Synchronization
import Testing
import TestSupport
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Errors a server reported in an exit test's child, read by its SIGBUS handler.
let childReportedErrors = Atomic<Int>(0)

extension FaultEngineTests {
    @Suite(.needsUserfaultfd, .serialized, .timeLimit(.minutes(1)))
    struct InstallFailureTests {
        /// A file that shrinks after the server started: COPY from its mapping fails with
        /// EFAULT (the move strategy's pread comes up short). Retrying cannot fix that, so
        /// the faulting thread must get SIGBUS after one reported error, never spin.
        ///
        /// The child exits with 100 + the number of errors reported when its SIGBUS
        /// arrives; a server that retries forever leaves it to the 10 s alarm.
        @Test func shrunkMappedFileGivesSIGBUSAfterOneReportWithCopy() async {
            await #expect(processExitsWith: .exitCode(101)) {
                try touchShrunkFile(configuration: .handler64k)
            }
        }

        @Test func shrunkMappedFileGivesSIGBUSAfterOneReportWithMove() async {
            await #expect(processExitsWith: .exitCode(101)) {
                try touchShrunkFile(configuration: .move)
            }
        }
    }
}

/// Exits with 100 + the errors the server reported (the faulting thread got SIGBUS).
private func exitWithReportCount(_ signal: Int32) {
    _exit(Int32(100 + min(childReportedErrors.load(ordering: .relaxed), 50)))
}

/// In an exit test's child: serves a mapped file, truncates it, touches a page.
private func touchShrunkFile(configuration: FaultServerConfiguration) throws {
    alarm(10)
    signal(SIGBUS, exitWithReportCount)
    let pages = 16
    let file = try ImageFile(pages: pages)
    let source = try FileSource(path: file.path, access: .mapped)
    let memory = try MemoryMapping.anonymous(length: pages * systemPageSize)
    let uffd = try Userfaultfd(features: [])
    try uffd.handle.register(memory.range, mode: .missing)
    let server = try FaultServer(userfaultfd: uffd, regions: [ServedRegion(range: memory.range)],
                                 source: source, configuration: configuration)
    server.onEvent = { event in
        switch event {
        case .resolutionFailed, .sourceFailed: childReportedErrors.add(1, ordering: .relaxed)
        default: break
        }
    }
    try server.start()
    _ = truncate(file.path, 0)
    _ = memory.base.load(fromByteOffset: 3 * systemPageSize, as: UInt8.self)   // SIGBUS here
    _exit(99)
}
