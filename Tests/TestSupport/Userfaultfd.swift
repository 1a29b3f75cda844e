import Testing
import Userfaultfd

/// Why this process cannot create a userfaultfd that also traps kernel-mode faults, or nil
/// if it can. Unprivileged, that takes `vm.unprivileged_userfaultfd=1`, CAP_SYS_PTRACE or
/// access to /dev/userfaultfd; only USER_MODE_ONLY ones are open to every user.
public let userfaultfdRefusal: String? = {
    do {
        _ = try Userfaultfd.open()
        return nil
    } catch {
        return "this process may not create a userfaultfd without USER_MODE_ONLY: \(error)"
    }
}()

extension Trait where Self == ConditionTrait {
    /// Runs the test only where this process may create a userfaultfd without USER_MODE_ONLY
    /// (root, CAP_SYS_PTRACE, `vm.unprivileged_userfaultfd=1` or access to /dev/userfaultfd);
    /// elsewhere it is skipped with the creation error and its advice.
    public static var needsUserfaultfd: Self {
        .enabled(if: userfaultfdRefusal == nil, Comment(rawValue: userfaultfdRefusal ?? ""))
    }
}
