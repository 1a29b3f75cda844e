import Synchronization
import Testing
import Userfaultfd
@testable import Postcopy

#if canImport(Glibc)
import Glibc
#endif

/// Two network namespaces joined by a veth pair, made for one test and deleted after it
/// (deleting a namespace deletes its end of the pair). Only addresses inside these
/// namespaces are used: 10.213.0.1 on the destination's side, 10.213.0.2 on the source's.
final class NetworkPair: @unchecked Sendable {
    let destinationNamespace: String
    let sourceNamespace: String
    let destinationLink: String
    let destinationAddress = "10.213.0.1"

    /// Whether this process can make namespaces: root and `ip` from iproute2.
    static let available: Bool = geteuid() == 0 && ipPath != nil && setnsFunction != nil
    static let ipPath: String? = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"].first { access($0, X_OK) == 0 }
    private static let counter = Atomic<Int>(0)

    init() throws {
        Self.removeStale()
        let id = "\(getpid())x\(Self.counter.add(1, ordering: .relaxed).newValue)"
        destinationNamespace = "uffdpc-d\(id)"
        sourceNamespace = "uffdpc-s\(id)"
        destinationLink = "pcd\(id)"
        let sourceLink = "pcs\(id)"
        do {
            try Self.ip(["netns", "add", destinationNamespace])
            try Self.ip(["netns", "add", sourceNamespace])
            try Self.ip(["link", "add", destinationLink, "type", "veth", "peer", "name", sourceLink])
            try Self.ip(["link", "set", destinationLink, "netns", destinationNamespace])
            try Self.ip(["link", "set", sourceLink, "netns", sourceNamespace])
            try Self.ip(["-n", destinationNamespace, "addr", "add", "\(destinationAddress)/24", "dev", destinationLink])
            try Self.ip(["-n", sourceNamespace, "addr", "add", "10.213.0.2/24", "dev", sourceLink])
            for (ns, link) in [(destinationNamespace, destinationLink), (sourceNamespace, sourceLink)] {
                try Self.ip(["-n", ns, "link", "set", link, "up"])
                try Self.ip(["-n", ns, "link", "set", "lo", "up"])
            }
        } catch {
            remove()
            throw error
        }
    }

    deinit { remove() }

    /// Deletes both namespaces (and with them the veth pair); safe to call twice.
    func remove() {
        for ns in [destinationNamespace, sourceNamespace] { try? Self.ip(["netns", "delete", ns], quiet: true) }
    }

    /// Deletes namespaces this suite made in a test process that no longer exists (one
    /// killed by a signal cannot run its clean-up).
    static func removeStale() {
        guard let dir = opendir("/var/run/netns") else { return }
        defer { closedir(dir) }
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            guard name.hasPrefix("uffdpc-"), name.count > 8,
                  let pid = Int32(name.dropFirst(8).prefix { $0 != "x" }) else { continue }
            if kill(pid, 0) != 0 && errno == ESRCH { try? ip(["netns", "delete", name], quiet: true) }
        }
    }

    /// Sets the destination's end of the link down or up.
    func setLink(up: Bool) throws {
        try Self.ip(["-n", destinationNamespace, "link", "set", destinationLink, up ? "up" : "down"])
    }

    /// Runs `body` on a thread of its own that entered `namespace` (sockets it creates stay there).
    func inside<T: Sendable>(_ namespace: String, _ body: @escaping @Sendable () throws -> T) throws -> T {
        let result = Mutex<Result<T, any Error>?>(nil)
        let thread = DedicatedThread(name: "test-netns") {
            do {
                try Self.enter(namespace)
                let value = try body()
                result.withLock { $0 = .success(value) }
            } catch {
                result.withLock { $0 = .failure(error) }
            }
        }
        thread.join()
        return try #require(result.withLock { $0 }).get()
    }

    /// Starts `body` on a thread inside `namespace`; join the thread to wait for it.
    func start(in namespace: String, _ body: @escaping @Sendable () -> Void) -> DedicatedThread {
        DedicatedThread(name: "test-netns") {
            guard (try? Self.enter(namespace)) != nil else { return }
            body()
        }
    }

    private typealias Setns = @convention(c) (Int32, Int32) -> Int32
    private static let setnsFunction: Setns? = {
        guard let symbol = dlsym(dlopen(nil, RTLD_NOW), "setns") else { return nil }
        return unsafeBitCast(symbol, to: Setns.self)
    }()

    /// Moves the calling thread into a named network namespace.
    static func enter(_ namespace: String) throws {
        let fd = open("/var/run/netns/\(namespace)", O_RDONLY | O_CLOEXEC)
        try #require(fd >= 0, "open netns \(namespace): errno \(errno)")
        defer { close(fd) }
        let setns = try #require(setnsFunction)
        try #require(setns(fd, 0x4000_0000 /* CLONE_NEWNET */) == 0, "setns \(namespace): errno \(errno)")
    }

    /// Runs `ip` with `arguments`; throws unless it exits with status 0.
    static func ip(_ arguments: [String], quiet: Bool = false) throws {
        let path = try #require(ipPath, "ip (iproute2) is not installed")
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        if quiet { posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0) }
        let argv = ([path] + arguments).map { strdup($0) } + [nil]
        defer { for a in argv { free(a) } }
        var pid: pid_t = 0
        guard posix_spawn(&pid, path, &actions, nil, argv, environ) == 0 else {
            throw MigrationError(.system("cannot run ip"))
        }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        if status != 0 && !quiet {
            throw MigrationError(.system("ip \(arguments.joined(separator: " ")) failed with wait status \(status)"))
        }
    }
}
