import FaultEngine
import Foundation
import MapBench
import PagedMemory
import SystemPackage
import Testing
import Userfaultfd

/// The system's page size, which the pager uses by default, and the 8-byte words in one page.
let pageBytes = systemPageSize
let pageWords = pageBytes / 8

/// A pager of `buffer` bytes with the given replacement policy, fault resolution and
/// eviction.
func makePager(buffer: Int, policy: ReplacementPolicy = .clock, resolution: FaultResolution = .handlerThreads,
               softEviction: Bool = false) throws -> Pager {
    var c = PagerConfiguration(bufferBytes: buffer)
    c.policy = policy
    c.resolution = resolution
    c.softEviction = softEviction
    return try Pager(c)
}

/// A temporary file whose 8-byte word `i` holds `pattern(i)`; removed on deinit.
final class PatternFile: @unchecked Sendable {
    let path: String
    let size: Int

    static func pattern(_ i: Int) -> UInt64 { DataFiles.pattern(i) }

    init(size: Int, name: String = "paged") throws {
        path = NSTemporaryDirectory() + "/\(name)-\(getpid())-\(UInt32.random(in: 0 ... .max)).bin"
        self.size = size
        try DataFiles.writeData(path, bytes: size)
    }

    deinit { unlink(path) }

    /// Word `i` as the file holds it now (read with `pread`, not through a mapping).
    func word(_ i: Int) -> UInt64 {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        defer { close(fd) }
        var value: UInt64 = 0
        _ = pread(fd, &value, 8, off_t(i * 8))
        return value
    }

    /// Every word of the file.
    func words() -> [UInt64] {
        var out = [UInt64](repeating: 0, count: size / 8)
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        defer { close(fd) }
        _ = out.withUnsafeMutableBytes { pread(fd, $0.baseAddress, size, 0) }
        return out
    }
}

/// Runs `paged-memory-test-helper` (built next to the test bundle) and returns its exit status and output.
func runHelper(_ arguments: [String]) throws -> (status: Int32, reason: Process.TerminationReason, output: String) {
    let exe = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")
    let path = URL(fileURLWithPath: exe).deletingLastPathComponent().appendingPathComponent("paged-memory-test-helper").path
    let process = Process()
    process.executableURL = URL(fileURLWithPath: path)
    process.arguments = arguments
    let pipe = Pipe()
    process.standardOutput = pipe
    try process.run()
    let data = pipe.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return (process.terminationStatus, process.terminationReason, String(decoding: data, as: UTF8.self))
}

/// Whether this process may create a userfaultfd.
let canUseUserfaultfd: Bool = (try? Userfaultfd.probe()) != nil

/// The tests' generator.
typealias SplitMix = SplitMix64
