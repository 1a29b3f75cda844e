import Testing

// MARK: - The rule for every suite
//
// `swift test` runs the suites of every test target at the same time, in one process.
// Two things in it are shared by all tests, and tests that depend on them say so:
//
// - Process-wide state: the descriptor table (`/proc/self/fd`), the thread list
//   (`/proc/self/task`), the process's mappings (`vm.max_map_count`), its anonymous
//   pages. A test that checks it sees what the tests beside it open and start; a test
//   that exhausts it makes them fail; a test that forks this process shares every
//   anonymous page with the child (UFFDIO_MOVE then refuses them) and sends a FORK event
//   to every uffd registered with EVENT_FORK. Such a test carries `.ownsProcess` and runs alone: it waits until every
//   test that shares the process has finished, and no such test starts until it is done.
//   For this exclusion to be real, every top-level suite of every test target carries
//   `.sharesProcess` (it applies to each test inside, nested suites included). A suite
//   without it runs beside `.ownsProcess` tests and can make them fail.
// - The machine's pool of 2 MiB huge pages: a few are reserved, and two tests taking them
//   at once leave one without (its faults then hang or fail). Every test or suite that
//   maps hugetlb memory carries `.usesHugePages`; such tests run one at a time.
//
// `.ownsProcess` is for the few tests that need it: while one runs, nothing else does.
// Both gates are taken in one order (the process, then the huge pages) by whichever of
// the traits provides its scope first, so they cannot deadlock.

extension Trait where Self == ProcessGateTrait {
    /// Runs each test beside others, but never beside a test that owns the process.
    public static var sharesProcess: Self { ProcessGateTrait(kind: .sharesProcess) }

    /// Runs each test alone in the process (for checks of the descriptor table or threads).
    public static var ownsProcess: Self { ProcessGateTrait(kind: .ownsProcess) }

    /// Runs each test while no other test holds the huge-page pool.
    public static var usesHugePages: Self { ProcessGateTrait(kind: .usesHugePages) }
}

/// Shared or exclusive use of the test process, and of the huge-page pool, taken
/// around each test case.
public struct ProcessGateTrait: TestTrait, SuiteTrait, TestScoping {
    enum Kind { case sharesProcess, ownsProcess, usesHugePages }
    let kind: Kind

    public var isRecursive: Bool { true }

    public func provideScope(
        for test: Test, testCase: Test.Case?,
        performing function: @Sendable () async throws -> Void
    ) async throws {
        let kinds = test.traits.compactMap { ($0 as? ProcessGateTrait)?.kind }
        let ownsProcess = kinds.contains(.ownsProcess)
        let usesHugePages = kinds.contains(.usesHugePages)
        try await ProcessGate.whileHeld(process: ownsProcess, hugePages: usesHugePages) {
            try await function()
        }
    }
}

/// A readers-writer gate for async tests: any number of shared holders, or one
/// exclusive holder. A waiting exclusive holder goes before shared ones that arrive
/// after it, so it waits at most for the tests already running.
actor ProcessGate {
    static let process = ProcessGate()
    static let hugePages = ProcessGate()
    @TaskLocal static var holdsProcess = false
    @TaskLocal static var holdsHugePages = false

    /// Runs `body` holding the process (exclusively or shared) and, if asked, the huge
    /// pages; a gate this task already holds is not taken again.
    static func whileHeld(
        process exclusive: Bool, hugePages: Bool, _ body: @Sendable () async throws -> Void
    ) async throws {
        if !holdsProcess {
            await process.acquire(exclusive: exclusive)
            do {
                try await $holdsProcess.withValue(true) {
                    try await whileHeld(process: exclusive, hugePages: hugePages, body)
                }
            } catch {
                await process.release(exclusive: exclusive)
                throw error
            }
            await process.release(exclusive: exclusive)
        } else if hugePages && !holdsHugePages {
            await ProcessGate.hugePages.acquire(exclusive: true)
            do {
                try await $holdsHugePages.withValue(true) { try await body() }
            } catch {
                await ProcessGate.hugePages.release(exclusive: true)
                throw error
            }
            await ProcessGate.hugePages.release(exclusive: true)
        } else {
            try await body()
        }
    }

    private var sharedHolders = 0
    private var exclusiveHeld = false
    private var waiting: [(exclusive: Bool, resume: CheckedContinuation<Void, Never>)] = []

    func acquire(exclusive: Bool) async {
        if waiting.isEmpty && canEnter(exclusive: exclusive) {
            enter(exclusive: exclusive)
            return
        }
        await withCheckedContinuation { waiting.append((exclusive, $0)) }
    }

    func release(exclusive: Bool) {
        if exclusive { exclusiveHeld = false } else { sharedHolders -= 1 }
        // Admit waiters in arrival order while they fit.
        while let next = waiting.first, canEnter(exclusive: next.exclusive) {
            waiting.removeFirst()
            enter(exclusive: next.exclusive)
            next.resume.resume()
        }
    }

    private func canEnter(exclusive: Bool) -> Bool {
        exclusive ? !exclusiveHeld && sharedHolders == 0 : !exclusiveHeld
    }

    private func enter(exclusive: Bool) {
        if exclusive { exclusiveHeld = true } else { sharedHolders += 1 }
    }
}
