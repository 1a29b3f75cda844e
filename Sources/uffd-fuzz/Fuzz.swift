// libFuzzer targets for what peers send: `uffd serve`'s handshake, and the migration
// frames `uffd migrate receive` decodes. Scripts/fuzz.sh builds this with
// `-sanitize=fuzzer -D FUZZING` and picks the target with UFFD_FUZZ_TARGET
// (`handshake` or `migration-frame`). A plain build replays input files through the
// handshake target (the frame decoder is internal to Postcopy: fuzz builds only).
#if canImport(Glibc)
import Glibc
#endif

/// The target UFFD_FUZZ_TARGET names (the handshake by default).
let fuzzTarget: @Sendable ([UInt8]) -> Void = {
    switch getenv("UFFD_FUZZ_TARGET").map({ String(cString: $0) }) {
    #if FUZZING
    case "migration-frame": return fuzzMigrationFrame
    #endif
    case nil, "handshake": return fuzzHandshake
    case let other?:
        print("unknown UFFD_FUZZ_TARGET \(other) (handshake, migration-frame)")
        exit(2)
    }
}()

/// The input callback libFuzzer's own main looks for (linked in with `-sanitize=fuzzer`).
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    fuzzTarget(data.map { Array(UnsafeBufferPointer(start: $0, count: size)) } ?? [])
    return 0
}

#if FUZZING
/// libFuzzer's entry for a program with a main of its own (SwiftPM names the executable's entry).
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<CInt>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>,
    _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt) -> CInt
#endif

@main
enum Fuzz {
    static func main() {
        #if FUZZING
        var argc = CommandLine.argc
        var argv = CommandLine.unsafeArgv
        exit(LLVMFuzzerRunDriver(&argc, &argv) { fuzzOne($0, $1) })
        #else
        for path in CommandLine.arguments.dropFirst() {
            guard let file = fopen(path, "rb") else { continue }
            var bytes: [UInt8] = []
            var chunk = [UInt8](repeating: 0, count: 65536)
            while case let n = fread(&chunk, 1, chunk.count, file), n > 0 { bytes += chunk[0..<n] }
            fclose(file)
            fuzzTarget(bytes)
        }
        #endif
    }
}
