import FaultEngine
import Synchronization
import Testing
import TestSupport
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

extension FaultEngineTests {
    @Suite(.needsUserfaultfd, .serialized, .timeLimit(.minutes(1)))
    struct SchedulingTests {
        /// The policy of the thread that fills pages: the handler thread, for the copy strategy.
        private func handlerPolicy(priority: Int) throws -> (policy: Int32, lastError: String?) {
            let pages = 4
            let memory = try MemoryMapping.anonymous(length: pages * page)
            let seen = Atomic<Int32>(-1)
            let source = ClosureSource(length: UInt64(pages * page)) { buffer, offset in
                seen.store(sched_getscheduler(0), ordering: .relaxed)
                for i in 0..<buffer.count { buffer[i] = imageByte(Int(offset) + i) }
            }
            var configuration = FaultServerConfiguration.handler4k
            configuration.handlerPriority = priority
            let server = try serve(source, mapping: memory, configuration: configuration)
            try server.start()
            touch(memory.base, pages: [0])
            server.stop()
            #expect(firstMismatch(memory.base, count: page, sourceOffset: 0) == nil)
            return (seen.load(ordering: .relaxed), server.statistics.lastError)
        }

        @Test func handlersAreTimeSharedByDefault() throws {
            let (policy, lastError) = try handlerPolicy(priority: 0)
            #expect(policy == SCHED_OTHER)
            #expect(lastError == nil)
        }

        @Test func handlerPriorityMakesHandlersRealTimeOrSaysWhyNot() throws {
            let (policy, lastError) = try handlerPolicy(priority: 1)
            var limit = rlimit()
            getrlimit(__rlimit_resource_t(14), &limit)   // RLIMIT_RTPRIO, which Glibc does not import
            if geteuid() == 0 || limit.rlim_cur >= 1 {
                #expect(policy == SCHED_FIFO)
                #expect(lastError == nil)
            } else {
                #expect(policy == SCHED_OTHER)
                #expect(lastError?.contains("SCHED_FIFO priority 1 was refused") == true, "lastError: \(String(describing: lastError))")
            }
        }

        @Test func priorityOutsideTheFIFORangeIsRefusedByName() throws {
            for priority in [-1, 100] {
                let memory = try MemoryMapping.anonymous(length: page)
                var configuration = FaultServerConfiguration.handler4k
                configuration.handlerPriority = priority
                do {
                    _ = try serve(ZeroSource(), mapping: memory, configuration: configuration)
                    Issue.record("handlerPriority \(priority) was accepted")
                } catch {
                    #expect("\(error)".contains("handlerPriority \(priority)"), "\(error)")
                }
            }
        }
    }
}
