#if FUZZING
@testable import Postcopy

/// One input through every decoder a migration peer's bytes reach first: the frame
/// header, the hello, the switchover list.
func fuzzMigrationFrame(_ bytes: [UInt8]) {
    if bytes.count >= Wire.headerSize {
        _ = bytes.withUnsafeBytes { try? Wire.Header.decode($0.baseAddress!, pageSize: 4096) }
    }
    _ = try? Wire.Hello.decode(bytes)
    _ = try? Wire.decodeRuns(bytes)
}
#endif
