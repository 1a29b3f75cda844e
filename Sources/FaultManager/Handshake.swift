import FoundationEssentials
import Userfaultfd

/// One region of a client's memory as a handshake describes it.
public struct ClientRegion: Sendable, Hashable, Codable, CustomStringConvertible {
    /// The region's first address in the client's address space.
    public var start: UInt64
    /// The length in bytes.
    public var length: UInt64
    /// The byte offset of `start`'s contents in the backing file.
    public var backingOffset: UInt64
    /// The page size of the memory: 4096 or 2 MiB.
    public var pageSize: UInt64

    public init(start: UInt64, length: UInt64, backingOffset: UInt64, pageSize: UInt64 = 4096) {
        self.start = start
        self.length = length
        self.backingOffset = backingOffset
        self.pageSize = pageSize
    }

    /// The addresses of the region.
    public var range: MemoryRange { MemoryRange(start: start, length: length) }

    public var description: String {
        "\(range) at backing offset \(backingOffset), page size \(pageSize)"
    }
}

/// The two handshakes a client may open a connection with.
public enum Handshake: Sendable, Hashable {
    /// Firecracker's: a JSON array of `GuestRegionUffdMapping`, served from the daemon's memory file.
    case firecracker([ClientRegion])
    /// The project's own, versioned.
    case native(NativeHandshake)

    /// The regions the client hands over.
    public var regions: [ClientRegion] {
        switch self {
        case .firecracker(let regions): return regions
        case .native(let header): return header.regions
        }
    }

    /// The descriptors the message must carry: the uffd, and the backing file if attached.
    public var descriptorCount: Int {
        switch self {
        case .firecracker: return 1
        case .native(let header): return header.descriptorCount
        }
    }

    /// The uffd features the client says it enabled (none for Firecracker's handshake).
    public var features: Userfaultfd.Features {
        switch self {
        case .firecracker: return []
        case .native(let header): return Userfaultfd.Features(rawValue: header.features)
        }
    }

    /// The name the client gave for log lines, if any.
    public var name: String? {
        switch self {
        case .firecracker: return nil
        case .native(let header): return header.name
        }
    }

    /// The handshake's name in log lines.
    public var kind: String {
        switch self {
        case .firecracker: return "firecracker"
        case .native: return "native"
        }
    }

    /// Decodes the body of a handshake message: a JSON array is Firecracker's, a
    /// JSON object the native one.
    ///
    /// - Throws: ``HandshakeError`` saying what is wrong with the bytes.
    public static func decode(_ body: [UInt8]) throws(HandshakeError) -> Handshake {
        guard let first = body.first(where: { !($0 == 0x20 || $0 == 0x0A || $0 == 0x0D || $0 == 0x09) }) else {
            throw .invalidMessage("the message is empty")
        }
        switch first {
        case UInt8(ascii: "["):
            return .firecracker(try FirecrackerRegion.decodeRegions(body))
        case UInt8(ascii: "{"):
            return .native(try NativeHandshake.decode(body))
        default:
            throw .invalidMessage("the message is neither a JSON array (Firecracker) nor a JSON object (native handshake)")
        }
    }
}

/// Why a handshake was refused. The description is the reason in the daemon's log.
public enum HandshakeError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The peer's uid is not allowed to hand over a userfaultfd.
    case unauthorized(uid: UInt32)
    /// The message did not carry exactly one userfaultfd (or uffd and backing, natively).
    case descriptors(String)
    /// The body is not a valid handshake.
    case invalidMessage(String)
    /// A region is unusable: misaligned, overlapping, beyond the backing file, bad page size.
    case invalidRegion(String)
    /// The native handshake asks for a version this daemon does not speak.
    case unsupportedVersion(Int)
    /// Nothing arrived in time, or the connection failed.
    case connection(String)
    /// Serving could not start.
    case serving(String)

    public var description: String {
        switch self {
        case .unauthorized(let uid): return "uid \(uid) is not allowed to hand over a userfaultfd"
        case .descriptors(let why): return "bad descriptors: \(why)"
        case .invalidMessage(let why): return "invalid handshake: \(why)"
        case .invalidRegion(let why): return "invalid region: \(why)"
        case .unsupportedVersion(let v): return "unsupported native handshake version \(v) (this daemon speaks \(NativeHandshake.currentVersion))"
        case .connection(let why): return "connection: \(why)"
        case .serving(let why): return "cannot serve: \(why)"
        }
    }
}

/// Firecracker's description of one guest memory region (`GuestRegionUffdMapping`),
/// exactly as Firecracker serializes it.
///
/// ```json
/// [{"base_host_virt_addr":140180235575296,"size":134217728,"offset":0,"page_size":4096,"page_size_kib":4096}]
/// ```
/// `page_size_kib` is deprecated: Firecracker has always put the page size in bytes
/// there. It is tolerated, and used only when `page_size` is absent (older releases).
public struct FirecrackerRegion: Sendable, Hashable, Codable {
    /// The region's first address in Firecracker's address space.
    public var base_host_virt_addr: UInt64
    /// The region's length in bytes.
    public var size: UInt64
    /// The byte offset of the region's contents in the memory snapshot file.
    public var offset: UInt64
    /// The page size in bytes (absent before Firecracker 1.5).
    public var page_size: UInt64?
    /// Deprecated duplicate of `page_size` (Firecracker writes bytes here too).
    public var page_size_kib: UInt64?

    public init(base_host_virt_addr: UInt64, size: UInt64, offset: UInt64, page_size: UInt64?, page_size_kib: UInt64?) {
        self.base_host_virt_addr = base_host_virt_addr
        self.size = size
        self.offset = offset
        self.page_size = page_size
        self.page_size_kib = page_size_kib
    }

    /// The page size in bytes, from `page_size` or else from the deprecated field.
    public func pageSizeInBytes() throws(HandshakeError) -> UInt64 {
        if let page_size { return page_size }
        guard let legacy = page_size_kib else {
            throw .invalidMessage("region at 0x\(String(base_host_virt_addr, radix: 16)) has neither page_size nor page_size_kib")
        }
        // Released Firecracker versions wrote bytes into this field despite its name;
        // accept either reading.
        return legacy == 4 || legacy == 2048 ? legacy * 1024 : legacy
    }

    /// Decodes a Firecracker handshake body into regions.
    public static func decodeRegions(_ body: [UInt8]) throws(HandshakeError) -> [ClientRegion] {
        let decoded: [FirecrackerRegion]
        do {
            decoded = try JSONDecoder().decode([FirecrackerRegion].self, from: Data(body))
        } catch {
            throw .invalidMessage("not a JSON array of Firecracker regions: \(describe(error))")
        }
        if decoded.isEmpty { throw .invalidMessage("the region array is empty") }
        var regions: [ClientRegion] = []
        for r in decoded {
            regions.append(ClientRegion(start: r.base_host_virt_addr, length: r.size, backingOffset: r.offset,
                                        pageSize: try r.pageSizeInBytes()))
        }
        return regions
    }

    /// Encodes regions the way Firecracker does (field order and all).
    public static func encode(_ regions: [ClientRegion]) -> [UInt8] {
        var text = "["
        for (i, r) in regions.enumerated() {
            if i > 0 { text += "," }
            text += "{\"base_host_virt_addr\":\(r.start),\"size\":\(r.length),\"offset\":\(r.backingOffset),"
                + "\"page_size\":\(r.pageSize),\"page_size_kib\":\(r.pageSize)}"
        }
        text += "]"
        return Array(text.utf8)
    }
}

/// The project's own handshake: a JSON object, with the userfaultfd attached and,
/// optionally, the backing file as a second descriptor.
public struct NativeHandshake: Sendable, Hashable, Codable {
    /// The version this daemon speaks.
    public static let currentVersion = 1
    /// The protocol's name, so stray JSON objects are told apart.
    public static let protocolName = "swift-userfaultfd-manager"

    /// Where the pages come from.
    public enum Backing: String, Sendable, Hashable, Codable {
        /// The memory file given to the daemon on its command line.
        case memoryFile
        /// A file the client attached as the second descriptor (opened with the client's rights).
        case attached
    }

    /// Always ``protocolName``.
    public var `protocol`: String
    /// The handshake's version; this daemon speaks ``currentVersion``.
    public var version: Int
    /// The features the client's handshake enabled on the uffd (raw `UFFD_FEATURE_*` bits).
    public var features: UInt64
    /// Where the pages come from.
    public var backing: Backing
    /// The registered regions.
    public var regions: [ClientRegion]
    /// A name for log lines.
    public var name: String?

    public init(features: UInt64, backing: Backing, regions: [ClientRegion], name: String? = nil) {
        self.protocol = Self.protocolName
        self.version = Self.currentVersion
        self.features = features
        self.backing = backing
        self.regions = regions
        self.name = name
    }

    /// The number of descriptors the message carries.
    public var descriptorCount: Int { backing == .attached ? 2 : 1 }

    static func decode(_ body: [UInt8]) throws(HandshakeError) -> NativeHandshake {
        struct Probe: Decodable { var `protocol`: String?; var version: Int? }
        let probe: Probe
        do {
            probe = try JSONDecoder().decode(Probe.self, from: Data(body))
        } catch {
            throw .invalidMessage("not a JSON object: \(describe(error))")
        }
        guard probe.protocol == protocolName else {
            // The peer's text, cut short here; the log escapes it.
            throw .invalidMessage("the object's \"protocol\" is \(probe.protocol.map { "\"\($0.prefix(64))\"" } ?? "missing"), not \"\(protocolName)\"")
        }
        guard let version = probe.version else { throw .invalidMessage("the native handshake has no \"version\"") }
        guard version == currentVersion else { throw .unsupportedVersion(version) }
        let handshake: NativeHandshake
        do {
            handshake = try JSONDecoder().decode(NativeHandshake.self, from: Data(body))
        } catch {
            throw .invalidMessage("native handshake version \(version): \(describe(error))")
        }
        if handshake.regions.isEmpty { throw .invalidMessage("the native handshake's \"regions\" array is empty") }
        return handshake
    }

    /// The message body.
    public func encoded() -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return Array((try? encoder.encode(self)) ?? Data())
    }
}

/// The daemon's one-line answer to a native handshake.
public struct NativeReply: Sendable, Hashable, Codable {
    /// Whether the daemon serves the uffd.
    public var accepted: Bool
    /// The client number in the daemon's logs and statistics.
    public var client: Int?
    /// Why the handshake was refused.
    public var reason: String?

    public init(accepted: Bool, client: Int? = nil, reason: String? = nil) {
        self.accepted = accepted
        self.client = client
        self.reason = reason
    }

    func encoded() -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return Array((try? encoder.encode(self)) ?? Data()) + [0x0A]
    }
}

/// A short description of a decoding error (the path and what was expected).
func describe(_ error: any Error) -> String {
    guard let error = error as? DecodingError else { return "\(error)" }
    func path(_ context: DecodingError.Context) -> String {
        let p = context.codingPath.map { $0.intValue.map { "[\($0)]" } ?? ".\($0.stringValue)" }.joined()
        return p.isEmpty ? "" : " at \(p)"
    }
    switch error {
    case .typeMismatch(let type, let c): return "expected \(type)\(path(c)): \(c.debugDescription)"
    case .valueNotFound(let type, let c): return "missing \(type) value\(path(c))"
    case .keyNotFound(let key, let c): return "missing key \"\(key.stringValue)\"\(path(c))"
    case .dataCorrupted(let c): return "\(c.debugDescription)\(path(c))"
    @unknown default: return "\(error)"
    }
}
