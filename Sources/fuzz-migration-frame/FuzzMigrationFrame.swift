// libFuzzer target for the migration frame decoder (frame header, hello, switchover
// list), which reads what any network peer sends. Scripts/fuzz.sh builds it with
// `-sanitize=fuzzer -D FUZZING` in a debug build (the decoder is internal to Postcopy).
#if FUZZING
@testable import Postcopy

#if canImport(Glibc)
import Glibc
#endif

@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<CInt>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>,
    _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt) -> CInt

/// One input through every decoder a peer's bytes reach first.
func fuzzFrame(_ bytes: [UInt8]) {
    if bytes.count >= Wire.headerSize {
        _ = bytes.withUnsafeBytes { try? Wire.Header.decode($0.baseAddress!, pageSize: 4096) }
    }
    _ = try? Wire.Hello.decode(bytes)
    _ = try? Wire.decodeRuns(bytes)
}

/// The input callback libFuzzer's own main looks for (linked in with `-sanitize=fuzzer`).
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    fuzzFrame(data.map { Array(UnsafeBufferPointer(start: $0, count: size)) } ?? [])
    return 0
}

@main
enum FuzzMigrationFrame {
    static func main() {
        var argc = CommandLine.argc
        var argv = CommandLine.unsafeArgv
        exit(LLVMFuzzerRunDriver(&argc, &argv) { fuzzOne($0, $1) })
    }
}
#else
@main
enum FuzzMigrationFrame {
    static func main() {
        print("a libFuzzer harness: build and run it with Scripts/fuzz.sh")
    }
}
#endif
