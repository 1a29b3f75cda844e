// libFuzzer target for the handshake `uffd serve` reads from any local peer.
// Built by Scripts/fuzz.sh with `-sanitize=fuzzer -D FUZZING`; a plain build makes a
// replayer that runs the same checks over the files named on its command line.
import FaultManager
import Userfaultfd

#if canImport(Glibc)
import Glibc
#endif

/// One input: frame it, decode it, and escape it for a log line. Any crash, trap or
/// sanitizer report is a finding; refusals (thrown errors) are expected.
func fuzzHandshake(_ bytes: [UInt8]) {
    _ = HandshakeFraming.scan(bytes)
    if let handshake = try? Handshake.decode(bytes) {
        // A decoded handshake names at least one region and one or two descriptors.
        if handshake.regions.isEmpty || !(1...2).contains(handshake.descriptorCount) { abort() }
    }
    let text = UntrustedText(bytes).description
    if !text.utf8.allSatisfy({ (0x20...0x7E).contains($0) }) { abort() }
}

#if FUZZING
/// libFuzzer's entry for a program with its own main (SwiftPM names the executable's entry).
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<CInt>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>,
    _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt) -> CInt

/// The input callback libFuzzer's own main looks for (linked in with `-sanitize=fuzzer`).
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    fuzzHandshake(data.map { Array(UnsafeBufferPointer(start: $0, count: size)) } ?? [])
    return 0
}

@main
enum FuzzHandshake {
    static func main() {
        var argc = CommandLine.argc
        var argv = CommandLine.unsafeArgv
        exit(LLVMFuzzerRunDriver(&argc, &argv) { fuzzOne($0, $1) })
    }
}
#else
@main
enum ReplayHandshakeInputs {
    static func main() {
        for path in CommandLine.arguments.dropFirst() {
            guard let file = fopen(path, "rb") else { continue }
            var bytes: [UInt8] = []
            var chunk = [UInt8](repeating: 0, count: 65536)
            while case let n = fread(&chunk, 1, chunk.count, file), n > 0 { bytes += chunk[0..<n] }
            fclose(file)
            fuzzHandshake(bytes)
        }
    }
}
#endif
