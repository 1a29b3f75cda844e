import TestSupport
import FaultEngine
import FaultTrace
import Foundation
import Testing

/// Renders a page in headless Chromium (Debian package `chromium`) and checks the
/// screenshot. Set UFFD_TRACE_BROWSER=1 to run it (`.ci/run` then installs Chromium).
let browserTestEnabled = ProcessInfo.processInfo.environment["UFFD_TRACE_BROWSER"] == "1"

@Suite(.sharesProcess, .serialized, .timeLimit(.minutes(3)))
struct BrowserTests {
    /// Decodes an 8-bit RGB(A) PNG (zlib + the five row filters) and prints
    /// "width height non-white-pixels distinct-colours".
    static let pngStatistics = #"""
        import struct, sys, zlib
        data = open(sys.argv[1], 'rb').read()
        assert data[:8] == b'\x89PNG\r\n\x1a\n', 'not a PNG'
        pos, idat = 8, b''
        while pos < len(data):
            n, kind = struct.unpack('>I4s', data[pos:pos + 8])
            body = data[pos + 8:pos + 8 + n]
            if kind == b'IHDR': w, h, depth, colour = struct.unpack('>IIBB', body[:10])
            if kind == b'IDAT': idat += body
            pos += 12 + n
        assert depth == 8 and colour in (2, 6), (depth, colour)
        bpp = 3 if colour == 2 else 4
        raw, stride = zlib.decompress(idat), w * bpp
        prev, rows, i = bytearray(stride), [], 0
        for _ in range(h):
            f, line = raw[i], bytearray(raw[i + 1:i + 1 + stride]); i += 1 + stride
            for x in range(stride):
                a = line[x - bpp] if x >= bpp else 0
                b = prev[x]; c = prev[x - bpp] if x >= bpp else 0
                if f == 1: line[x] = (line[x] + a) & 255
                elif f == 2: line[x] = (line[x] + b) & 255
                elif f == 3: line[x] = (line[x] + (a + b) // 2) & 255
                elif f == 4:
                    p = a + b - c; pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            rows.append(line); prev = line
        colours, ink = set(), 0
        for line in rows:
            for x in range(0, stride, bpp):
                px = tuple(line[x:x + 3]); colours.add(px)
                if min(px) < 235: ink += 1
        print(w, h, ink, len(colours))
        """#

    @Test(.enabled(if: browserTestEnabled, "set UFFD_TRACE_BROWSER=1 (needs Debian's chromium and python3)"))
    func thePageRendersInChromiumAndIsNotBlank() throws {
        let html = temporaryPath("browser.html")
        let png = temporaryPath("browser.png")
        defer {
            unlink(html)
            if ProcessInfo.processInfo.environment["UFFD_TRACE_KEEP_SCREENSHOT"] == nil { unlink(png) }
        }
        let trace = knownTrace()
        let report = TraceReport(trace, options: TraceReport.Options(timeBins: 64))
        try TracePage.write(TracePage.html(trace, report: report), to: html)
        let chromium = try run("/usr/bin/chromium", ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                                     "--window-size=1000,1400", "--screenshot=\(png)", "file://\(html)"])
        #expect(chromium.status == 0, "chromium: \(chromium.output)")
        let stats = try run("/usr/bin/env", ["python3", "-c", Self.pngStatistics, png])
        #expect(stats.status == 0, "\(stats.output)")
        let numbers = stats.output.split(whereSeparator: { $0 == " " || $0 == "\n" }).compactMap { Int($0) }
        try #require(numbers.count == 4, "\(stats.output)")
        let (width, height, ink, colours) = (numbers[0], numbers[1], numbers[2], numbers[3])
        #expect(width == 1000 && height == 1400)
        // Text, axes and the coloured cells: a blank page has no ink and one colour.
        #expect(ink > width * height / 100, "only \(ink) non-white pixels")
        #expect(colours > 20, "only \(colours) colours")
    }

    func run(_ executable: String, _ arguments: [String]) throws -> (status: Int32, output: String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = FileHandle.nullDevice
        try process.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: data, as: UTF8.self))
    }
}
