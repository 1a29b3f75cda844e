import FaultEngine
import Snapshot
import Testing
import Userfaultfd
import _CSnapshot

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A snapshot of `pages` pages: every page written at version `p % 5` (0: never touched).
func smallSnapshot(pages: Int = 512, name: String) throws -> (file: TemporaryPath, log: [UInt64], memory: TestMemory) {
    let memory = try TestMemory(kind: .anonymous, length: pages * page)
    var log = [UInt64](repeating: 0, count: pages)
    for p in 0..<pages where p % 5 != 0 {
        log[p] = UInt64(p % 5)
        memory.write(page: p, version: log[p])
    }
    let file = TemporaryPath(name)
    try Snapshotter(regions: [memory.range]).capture(to: file.path).wait()
    return (file, log, memory)
}

func readAll(_ path: String) -> [UInt8] {
    let fd = open(path, O_RDONLY)
    defer { close(fd) }
    var bytes = [UInt8](repeating: 0, count: Int(lseek(fd, 0, SEEK_END)))
    _ = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
    return bytes
}

func writeAll(_ path: String, _ bytes: [UInt8]) {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
    defer { close(fd) }
    _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
}

extension SnapshotTests {
    @Suite(.serialized, .timeLimit(.minutes(2)), .enabled(if: captureSupported, "needs WP_UNPOPULATED and WP on shmem"))
    struct FileTests {
        /// The interleaved instruction path against the table-only one, over lengths
        /// and alignments around the lane boundaries, continued from nonzero states.
        @Test func theChecksumAgreesWithTheTablePath() {
            let bytes = (0..<40_000).map { UInt8(truncatingIfNeeded: $0 &* 2_654_435_761 >> 7) }
            var state: UInt64 = 7
            var wrong: [(Int, Int)] = []
            bytes.withUnsafeBytes { b in
                for length in [0, 1, 7, 8, 3071, 3072, 3073, 4096, 6144, 9216, 12_288, 32_768] + (0..<200).map({ _ in Int.random(in: 0..<39_000) }) {
                    state = state &* 6_364_136_223_846_793_005 &+ 1
                    let offset = Int(state >> 60)
                    let piece = UnsafeRawBufferPointer(rebasing: b[offset..<(offset + length)])
                    let seed = UInt32(truncatingIfNeeded: state >> 20)
                    if CRC32C.checksum(piece, continuing: seed) != csnap_crc32c_portable(seed, piece.baseAddress!, length) {
                        wrong.append((offset, length))
                    }
                }
            }
            let check = Array("123456789".utf8).withUnsafeBytes { CRC32C.checksum($0) }
            #expect(check == 0xE306_9283, "the CRC32C check value")
            #expect(wrong.isEmpty, "\(wrong.count) lengths differ, first \(wrong.prefix(3))")
        }

        @Test func aFileReadsBackWithItsKinds() throws {
            let (file, log, _) = try smallSnapshot(name: "kinds")
            let snapshot = try SnapshotFile(path: file.path)
            #expect(snapshot.pageCount == 512)
            #expect(snapshot.pageSize == page)
            #expect(!snapshot.isDelta)
            let counts = snapshot.kindCounts()
            #expect(counts[.data] == log.filter { $0 != 0 }.count)
            #expect((counts[.hole] ?? 0) + (counts[.zero] ?? 0) == log.filter { $0 == 0 }.count)
            try snapshot.verifyAll()
            let chain = try SnapshotChain([snapshot])
            #expect(try mismatches(log) { p, b in try chain.readPage(p, into: b) }.isEmpty)
        }

        @Test func truncatedFilesAreRefused() throws {
            let (file, _, _) = try smallSnapshot(name: "truncate")
            let bytes = readAll(file.path)
            let cut = TemporaryPath("cut")
            for length in [0, 10, 64, 100, bytes.count / 2, bytes.count - 48, bytes.count - 1] {
                writeAll(cut.path, Array(bytes[0..<length]))
                #expect(throws: SnapshotError.self, "cut to \(length) of \(bytes.count) bytes") { try SnapshotFile(path: cut.path) }
            }
        }

        @Test func corruptedFilesAreRefused() throws {
            let (file, _, _) = try smallSnapshot(name: "corrupt")
            let bytes = readAll(file.path)
            let bad = TemporaryPath("bad")
            // A flipped bit in the header, the region table, the index or the footer: refused on open.
            for offset in [0, 12, 70, bytes.count - 100, bytes.count - 10] {
                var copy = bytes
                copy[offset] ^= 0x10
                writeAll(bad.path, copy)
                #expect(throws: SnapshotError.self, "byte \(offset) flipped") { try SnapshotFile(path: bad.path) }
            }
            // A flipped bit in page data: the file opens, but that record is never read.
            let snapshot = try SnapshotFile(path: file.path)
            let record = snapshot.chunks[1]
            var copy = bytes
            copy[Int(record.offset) + 24 + 100] ^= 0x01
            writeAll(bad.path, copy)
            let damaged = try SnapshotFile(path: bad.path)
            #expect {
                try damaged.verifyAll()
            } throws: { error in
                guard let e = error as? SnapshotError, case .corrupted(let why) = e.kind else { return false }
                return why.contains("checksum")
            }
            let buffer = UnsafeMutableRawPointer.allocate(byteCount: page, alignment: page)
            defer { buffer.deallocate() }
            #expect(throws: SnapshotError.self) { try damaged.readPage(record.firstPage, into: buffer) }
            #expect(throws: SnapshotError.self) { try SnapshotChain([damaged]).flatten(to: bad.path + ".raw") }
            unlink(bad.path + ".raw")
        }

        @Test func aFullSnapshotIsNotADeltasParent() throws {
            let (a, _, _) = try smallSnapshot(name: "a")
            let (b, _, _) = try smallSnapshot(name: "b")
            #expect {
                _ = try SnapshotChain(paths: [a.path, b.path])
            } throws: { error in
                guard let e = error as? SnapshotError, case .wrongParent = e.kind else { return false }
                return true
            }
        }

        @Test func restoreThroughAFaultServerIsByteForByte() throws {
            let (file, log, _) = try smallSnapshot(name: "restore")
            let chain = try SnapshotChain(paths: [file.path])
            let target = try MemoryMapping.anonymous(length: chain.pageCount * page)
            let uffd = try Userfaultfd(features: [])
            try uffd.handle.register(target.range, mode: .missing)
            let server = try FaultServer(userfaultfd: uffd, regions: [ServedRegion(range: target.range)], source: SnapshotSource(chain))
            try server.start()
            let bad = mismatches(log) { p, b in memcpy(b, target.base + p * page, page) }
            server.stop()
            #expect(bad.isEmpty, "\(bad.count) pages differ")
            #expect(server.statistics.pagesInstalled > 0)
        }

        @Test func flattenWritesTheRawImage() throws {
            let (file, log, _) = try smallSnapshot(name: "flatten")
            let chain = try SnapshotChain(paths: [file.path])
            let raw = TemporaryPath("raw")
            let written = try chain.flatten(to: raw.path)
            #expect(written == UInt64(log.filter { $0 != 0 }.count * page))
            let bytes = readAll(raw.path)
            #expect(bytes.count == chain.pageCount * page)
            let bad = bytes.withUnsafeBytes { b in mismatches(log) { p, dst in memcpy(dst, b.baseAddress! + p * page, page) } }
            #expect(bad.isEmpty)
        }
    }
}
