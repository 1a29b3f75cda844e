import Userfaultfd

/// The process-wide SIGBUS resolver's registration of one server's regions.
final class SignalResolverRegistration: @unchecked Sendable {
    init(handle: Userfaultfd.Handle, regions: [RegionEntry], backing: SignalSafeBacking, chunkPages: Int,
         pageSize: Int, recorder: WorkingSetRecorder?) throws(UserfaultfdError) {
        throw UserfaultfdError(operation: "FaultServer.start", kind: .invalidArgument("the sigbus strategy is not available yet"))
    }
    var resolvedFaults: UInt64 { 0 }
    func update(_ regions: [RegionEntry]) {}
    func unregister() {}
}
