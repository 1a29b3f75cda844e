// A helper process for the Userfaultfd tests: checks that need a process of their own.
//
//   uffd-test-helper creation   (as root) drop to uid/gid 65534, re-execute, and check
//                               that every refused creation says why and what to do.
import Glibc
import Userfaultfd

func say(_ text: String) {
    var text = "uffd-test-helper: " + text + "\n"
    text.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
}

/// Runs as uid 65534 without capabilities: every refusal carries its reason, and
/// user-mode-only creation still works. Returns 0, or the number of the failed check.
func checkUnprivilegedCreation() -> Int32 {
    let diagnosis = CreationDiagnosis.current()
    guard !diagnosis.hasPtraceCapability, diagnosis.effectiveUID == 65534 else {
        say("diagnosis after dropping privileges: \(diagnosis)")
        return 3
    }
    if !diagnosis.syscallAllowed {
        let sysctl = diagnosis.unprivilegedSysctl.map(String.init) ?? "unreadable"
        do {
            _ = try Userfaultfd.open(method: .syscall).release()
            say("the syscall worked though the diagnosis said it would not")
            return 4
        } catch {
            guard error.errno == .notPermitted, let hint = error.hint,
                  hint.contains("vm.unprivileged_userfaultfd=1 (it is \(sysctl))"),
                  hint.contains("CAP_SYS_PTRACE"), hint.contains("UFFD_USER_MODE_ONLY")
            else {
                say("syscall refusal without its reason: \(error)")
                return 5
            }
        }
    }
    if diagnosis.deviceExists && !diagnosis.deviceAccessible {
        do {
            _ = try Userfaultfd.open(method: .device).release()
            say("the device opened though the diagnosis said it would not")
            return 6
        } catch {
            guard error.errno == .permissionDenied, let hint = error.hint,
                  hint.contains("\(Userfaultfd.devicePath) is mode 600"), hint.contains("euid 65534")
            else {
                say("device refusal without its reason: \(error)")
                return 7
            }
        }
        if !diagnosis.syscallAllowed {
            do {
                _ = try Userfaultfd.open(method: .automatic).release()
                say("automatic creation worked though neither way should")
                return 8
            } catch {
                let text = error.description
                guard text.contains("vm.unprivileged_userfaultfd"), text.contains("\(Userfaultfd.devicePath) is mode") else {
                    say("automatic refusal without both reasons: \(text)")
                    return 9
                }
            }
        }
    }
    // User-mode-only faults need no privilege at all.
    do {
        let uffd = try Userfaultfd(features: [], method: .syscall, userModeOnly: true)
        if !uffd.handle.fdIoctls.contains(.register) { return 10 }
    } catch {
        say("user-mode-only creation failed: \(error)")
        return 11
    }
    return 0
}

let arguments = CommandLine.arguments
switch arguments.dropFirst().first {
case "creation":
    // setuid keeps no capability across the execve that follows.
    guard setgroups(0, nil) == 0, setgid(65534) == 0, setuid(65534) == 0 else {
        say("cannot drop privileges (errno \(errno))")
        exit(2)
    }
    let argv: [UnsafeMutablePointer<CChar>?] = [strdup(arguments[0]), strdup("creation-unprivileged"), nil]
    execv("/proc/self/exe", argv)
    say("execv failed (errno \(errno))")
    exit(2)
case "creation-unprivileged":
    exit(checkUnprivilegedCreation())
default:
    say("usage: uffd-test-helper creation")
    exit(64)
}
