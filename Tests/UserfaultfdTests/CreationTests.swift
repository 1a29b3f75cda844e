import Glibc
import Testing
import Userfaultfd

extension Matrix {
    /// Creation diagnostics: why a uffd cannot be created, read from the system.
    @Suite("creation diagnostics") struct Creation {
        @Test("the diagnosis reads the sysctl, capabilities and device of this process")
        func diagnosisOfThisProcess() throws {
            let diagnosis = CreationDiagnosis.current()
            let sysctl = try #require(readText("/proc/sys/vm/unprivileged_userfaultfd"))
            #expect(diagnosis.unprivilegedSysctl == Int(sysctl))
            #expect(diagnosis.effectiveUID == geteuid())
            var st = stat()
            let exists = stat(Userfaultfd.devicePath, &st) == 0
            #expect(diagnosis.deviceExists == exists)
            if exists { #expect(diagnosis.deviceMode?.mode == st.st_mode & 0o7777) }
            if geteuid() == 0 {
                #expect(diagnosis.hasPtraceCapability)
                #expect(diagnosis.syscallAllowed)
            }
            // Whatever the diagnosis says, it agrees with what creation does.
            let syscallWorks = (try? Userfaultfd.open(method: .syscall)) != nil
            #expect(syscallWorks == diagnosis.syscallAllowed)
        }

        @Test("an unprivileged process is told why and what to do", .enabled(if: geteuid() == 0, "dropping privileges needs root"))
        func unprivileged() throws {
            // The helper drops to uid 65534 and re-executes itself, so no capability survives.
            let end = try runHelper(["creation"])
            #expect(end == .exited(0), "the helper's exit code names the check that failed; its messages are above")
        }
    }
}

func readText(_ path: String) -> String? {
    guard let file = fopen(path, "r") else { return nil }
    defer { fclose(file) }
    var line = [CChar](repeating: 0, count: 256)
    guard fgets(&line, 256, file) != nil else { return nil }
    return String(decoding: line.prefix { $0 != 0 && $0 != 10 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

func readSmallStatus() -> String {
    guard let file = fopen("/proc/self/status", "r") else { return "?" }
    defer { fclose(file) }
    var out = ""
    var line = [CChar](repeating: 0, count: 256)
    while fgets(&line, 256, file) != nil {
        let s = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        if s.hasPrefix("Cap") || s.hasPrefix("Uid") { out += s }
    }
    return out
}
