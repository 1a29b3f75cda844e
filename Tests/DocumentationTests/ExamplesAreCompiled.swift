import TestSupport
import Foundation
import Testing

/// Every ```swift block in a doc comment under Sources and in a DocC article must appear,
/// line for line, in one of the files of this target: that is what compiles it.
@Suite("documentation examples", .sharesProcess)
struct ExamplesAreCompiled {
    /// The package root, from this file's path.
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// The swift code blocks of one file: from `///` doc comments in a `.swift` file, or
    /// from the Markdown of a `.md` article. Lines are trimmed, empty ones dropped.
    static func blocks(in path: URL) throws -> [[String]] {
        let isSwift = path.pathExtension == "swift"
        var blocks: [[String]] = []
        var current: [String]?
        for raw in try String(contentsOf: path, encoding: .utf8).split(separator: "\n", omittingEmptySubsequences: false) {
            var line = raw.trimmingCharacters(in: .whitespaces)
            if isSwift {
                guard line.hasPrefix("///") else { current = nil; continue }
                line = String(line.dropFirst(3)).trimmingCharacters(in: .whitespaces)
            }
            if current == nil, line == "```swift" {
                current = []
            } else if current != nil, line == "```" {
                blocks.append(current!)
                current = nil
            } else if !line.isEmpty {
                current?.append(line)
            }
        }
        return blocks
    }

    /// The files under `folder` whose name ends with `suffix`.
    static func files(under folder: String, suffix: String) -> [URL] {
        let base = root.appendingPathComponent(folder)
        guard let walker = FileManager.default.enumerator(at: base, includingPropertiesForKeys: nil) else { return [] }
        return walker.compactMap { $0 as? URL }.filter { $0.lastPathComponent.hasSuffix(suffix) }
            .sorted { $0.path < $1.path }
    }

    /// The trimmed, non-empty lines of this target's sources, file by file.
    static func heldLines() throws -> [[String]] {
        try files(under: "Tests/DocumentationTests", suffix: ".swift").map { file in
            try String(contentsOf: file, encoding: .utf8).split(separator: "\n")
                .map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        }
    }

    static func contains(_ haystack: [String], _ needle: [String]) -> Bool {
        guard !needle.isEmpty, needle.count <= haystack.count else { return needle.isEmpty }
        return (0...(haystack.count - needle.count)).contains { start in
            haystack[start..<start + needle.count].elementsEqual(needle)
        }
    }

    @Test("every swift example in doc comments and articles is held by this target")
    func everyExampleIsHeld() throws {
        let held = try Self.heldLines()
        let sources = Self.files(under: "Sources", suffix: ".swift") + Self.files(under: "Sources", suffix: ".md")
        var checked = 0
        for file in sources {
            for block in try Self.blocks(in: file) {
                checked += 1
                let where_ = file.path.replacingOccurrences(of: Self.root.path + "/", with: "")
                #expect(held.contains { Self.contains($0, block) },
                        "an example in \(where_) is not compiled here:\n\(block.joined(separator: "\n"))")
            }
        }
        #expect(checked >= 15, "found only \(checked) examples: is the package root \(Self.root.path)?")
    }

    @Test("the check sees a block that no file holds")
    func checkCanFail() throws {
        let held = try Self.heldLines()
        let invented = ["let neverWritten = try Userfaultfd.inventedForThisCheck()"]
        #expect(!held.contains { Self.contains($0, invented) })
        #expect(held.contains { Self.contains($0, ["let scanner = try PagemapScanner()"]) })
    }
}
