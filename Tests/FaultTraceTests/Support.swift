import FaultEngine
import FaultTrace
import Userfaultfd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

let page = systemPageSize

/// A fresh path under /tmp for this test process.
func temporaryPath(_ name: String) -> String {
    "/tmp/uffd-trace-test-\(getpid())-\(name)"
}

/// One attribute-bearing element of an SVG: its name and attributes.
struct SVGElement {
    var name: String
    var attributes: [String: String]

    func int(_ key: String) -> Int? { attributes[key].flatMap { Int($0) } }
}

/// The `<name ...>` elements in `svg`, with their attributes (a parser for the
/// renderer's own output: double-quoted attributes, no nesting inside a tag).
func elements(_ name: String, in svg: String) -> [SVGElement] {
    var found: [SVGElement] = []
    var rest = Substring(svg)
    while let open = rest.range(of: "<" + name + " ") {
        guard let close = rest[open.upperBound...].firstIndex(of: ">") else { break }
        var attributes: [String: String] = [:]
        var text = rest[open.upperBound..<close]
        while let eq = text.firstIndex(of: "=") {
            let key = text[..<eq].trimmingCharacters(in: " /\n")
            let afterQuote = text.index(eq, offsetBy: 2)
            guard afterQuote <= text.endIndex, let end = text[afterQuote...].firstIndex(of: "\"") else { break }
            attributes[key] = String(text[afterQuote..<end])
            text = text[text.index(after: end)...]
        }
        found.append(SVGElement(name: name, attributes: attributes))
        rest = rest[close...]
    }
    return found
}

extension Substring {
    func trimmingCharacters(in set: String) -> String {
        var s = self
        while let c = s.first, set.contains(c) { s.removeFirst() }
        while let c = s.last, set.contains(c) { s.removeLast() }
        return String(s)
    }
}

/// A trace of known shape: region 0 (64 pages) swept one page per millisecond, and
/// region 1 (32 pages) whose pages 8..<16 are written in every 1 ms sample.
func knownTrace() -> Trace {
    let ms: UInt64 = 1_000_000
    let sweep = TraceRegion(space: 0, start: 0x10_0000, length: UInt64(64 * page), label: "sweep")
    let hot = TraceRegion(space: 0, start: 0x20_0000, length: UInt64(32 * page), writeTracked: true, label: "hot")
    let touches = (0..<64).map { i in
        TraceTouch(space: 0, time: UInt64(i) * ms + ms / 2, address: sweep.start + UInt64(i * page), latency: 1000 + UInt64(i))
    }
    let samples = (1...64).map { k in
        WriteSample(region: 1, time: UInt64(k) * ms, interval: ms, bucketPages: 1,
                    written: (0..<32).map { (8..<16).contains($0) ? 1 : 0 })
    }
    return Trace(pageSize: page, startedAt: 1_700_000_000_000_000_000, duration: 64 * ms, regions: [sweep, hot],
                 touches: touches, writeSamples: samples, dropped: 0)
}
