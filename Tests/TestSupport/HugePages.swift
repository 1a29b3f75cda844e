import Testing
import Userfaultfd
import UserfaultfdDiagnostics

extension Trait where Self == ConditionTrait {
    /// Runs the test only where `count` 2 MiB huge pages are free or can be reserved
    /// (as root, on first use). Such a test also carries `.usesHugePages`, so that no
    /// other test takes them meanwhile.
    ///
    /// - Parameter count: the huge pages the test maps at most at once.
    public static func needsFreeHugePages(_ count: Int) -> Self {
        .enabled(
            if: HugePages.ensureFree(count),
            "\(count) free 2 MiB huge pages are needed: as root, `echo 16 > /proc/sys/vm/nr_hugepages`")
    }
}
