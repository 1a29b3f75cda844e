import FaultEngine
import FaultTrace

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// `swift-handler-4k-traced`: ``Contender/swiftHandler4k`` with a ``TraceRecorder``
/// taking every fault into a trace file, its drain thread running during the timed part.
/// Set beside `swift-handler-4k` in the same run, the ratio is what tracing costs.
enum TracedContender {
    static func run(_ workload: Workload, _ pattern: AccessPattern) -> RunOutcome {
        let path = "/tmp/uffd-bench-trace-\(getpid())-\(pattern)"
        defer { unlink(path) }
        let recorder: TraceRecorder
        do {
            recorder = try TraceRecorder(path: path, pageSize: workload.pageSize)
        } catch {
            return .notMeasured("cannot create the trace file: \(error)")
        }
        let order = workload.order(pattern)
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
