#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The descriptors this process has open, as "number target" (so a number reused for
/// another file counts as new). The table is the whole process's: a test that compares
/// it before and after carries `.ownsProcess`.
public func openDescriptors() -> Set<String> {
    guard let dir = opendir("/proc/self/fd") else { return [] }
    defer { closedir(dir) }
    var open: Set<String> = []
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        if name == "." || name == ".." { continue }
        var target = [CChar](repeating: 0, count: 256)
        let n = readlink("/proc/self/fd/" + name, &target, target.count - 1)
        let link = n > 0 ? String(decoding: target[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : "?"
        open.insert(name + " " + link)
    }
    return open
}

/// Descriptors open now that were not open at `baseline` (the listing's own directory
/// descriptor left out).
public func openedSince(_ baseline: Set<String>) -> Set<String> {
    openDescriptors().subtracting(baseline).filter { !$0.hasSuffix("/fd") }
}
