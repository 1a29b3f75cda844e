import TestSupport
import Testing

/// The port of the kernel's userfaultfd selftest matrix (uffd-unit-tests).
///
/// Every case runs serialized: they fault, fork, and share the huge page reservation.
@Suite("userfaultfd selftest matrix", .serialized, .sharesProcess, .usesHugePages, .timeLimit(.minutes(1)))
struct Matrix {}
