import FaultEngine
import FaultTrace

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// `swift-handler-4k-traced`: ``Contender/swiftHandler4k`` with a ``TraceRecorder``
/// taking every fault into a trace file. Set beside `swift-handler-4k` in the same run,
/// the ratio is what tracing costs the fault path.
///
/// The handler's ring holds the whole run and is drained into the file after the timed
/// part: a drain thread waking every 20 ms during it made faults faster on these VMs
/// (it shortens the cross-CPU wake-up), which would hide the fault path's own cost.
enum TracedContender {
    static func run(_ workload: Workload, _ pattern: AccessPattern) -> RunOutcome {
        let path = "/tmp/uffd-bench-trace-\(getpid())-\(pattern)"
        defer { unlink(path) }
        let order = workload.order(pattern)
        let recorder: TraceRecorder
        do {
            recorder = try TraceRecorder(path: path, pageSize: workload.pageSize, drainInterval: 600_000,
                                         ringCapacity: order.count)
        } catch {
            return .notMeasured("cannot create the trace file: \(error)")
        }
        var outcome = EngineContenders.serve(workload, source: workload.source, .handler4k,
                                             regionPages: UInt64(workload.pageCount), order: order, traceSink: recorder.sink)
        let recorded: Int
        do {
            recorded = try recorder.finish()
        } catch {
            return .notMeasured("writing the trace failed: \(error)")
        }
        // Every touch faulted once (one page per fault): the trace must hold them all.
        if case .measured(var run) = outcome, recorded != order.count {
            let missing = "the trace holds \(recorded) of \(order.count) faults (\(recorder.sink.dropped) dropped)"
            run.failure = run.failure.map { "\($0); \(missing)" } ?? missing
            outcome = .measured(run)
        }
        return outcome
    }
}
