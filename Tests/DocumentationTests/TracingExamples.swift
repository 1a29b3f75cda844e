import FaultEngine
import FaultTrace
import Userfaultfd

// The examples of the FaultTrace documentation, compiled in contexts that give them the
// names they use. They need a running server and a workload, so none of them runs here.

/// The FaultTrace article: recording the faults a server serves.
func tracingAServer(_ server: FaultServer<MemorySource>) throws -> Int {
    let recorder = try TraceRecorder(path: "run.uftrace")
    server.traceSink = recorder.sink
    try server.start()
    // ... the workload runs ...
    server.stop()
    let touches = try recorder.finish()
    return touches
}

/// The FaultTrace article: sampling the pages written to a range of this process.
func samplingWrites(_ recorder: TraceRecorder, _ table: borrowing MemoryMapping) throws {
    let tracking = try WriteSampler.armWriteTracking(table.range)
    let sampler = try WriteSampler(recorder: recorder, ranges: [table.range], intervalMilliseconds: 10)
    // ... the workload writes ...
    sampler.stop()
    try tracking.close()
}

/// The FaultTrace article: reading a trace and drawing it.
func drawingATrace() throws {
    let trace = try TraceFile.read("run.uftrace")
    let report = TraceReport(trace)
    print(TracePage.summary(report))
    try TracePage.write(TracePage.html(trace, report: report), to: "run.html")
}
