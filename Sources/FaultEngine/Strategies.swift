import Userfaultfd
import _CFaultEngine

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

extension HandlerLoop {
    /// MOVE straight out of the source's own memory (zero-copy; consumes the source).
    ///
    /// Each page is claimed in the residency bitmap first, so no source page is moved
    /// twice; a page claimed by another thread is left to it (its MOVE wakes our waiter).
    func moveFromSource(_ entry: RegionEntry, from i: UInt64, to j: UInt64, faultPage: UInt64, pages: UnsafeMutableRawPointer) -> InstallResult {
        var p = i
        while p < j {
            guard entry.claim(p) else {
                if p == faultPage { try? handle.wake(MemoryRange(start: entry.range.start &+ p &* ps, length: ps)) }
                p &+= 1
                continue
            }
            var q = p &+ 1
            while q < j && entry.claim(q) { q &+= 1 }
            let destination = entry.range.start &+ p &* ps
            let source = UInt64(UInt(bitPattern: pages)) &+ (p &- i) &* ps
            let bytes = Int((q &- p) &* ps)
            let result = install(entry, from: p, to: q, faultPage: faultPage, zero: false, fallible: true) { (off: Int) throws(UserfaultfdError) in
                try handle.move(to: destination &+ UInt64(off), from: source &+ UInt64(off), length: bytes - off)
            }
            switch result {
            case .done?:
                break
            case .gone?:
                return .gone
            case .retry?:
                // Give back the claims of pages not moved yet; the fault is served again.
                let reached = p &+ UInt64(progress) / ps
                cfe_bits_clear(entry.resident, entry.firstBit &+ reached, q &- reached)
                return .retry
            case nil:
                // MOVE refused (shared or unusual source pages): give back the claims of
                // the pages not moved and copy them instead, from now on.
                let reached = p &+ UInt64(progress) / ps
                cfe_bits_clear(entry.resident, entry.firstBit &+ reached, q &- reached)
                moveFromSourceWorks = false
                return installChunk(entry, from: reached, to: j, faultPage: faultPage, minorFault: false)
            }
            p = q
        }
        return .done
    }

    /// MINOR strategy: write the pages missing from the page cache through the alias
    /// mapping (zeros after a REMOVE, the source's bytes otherwise), then CONTINUE.
    ///
    /// Pages already in the page cache (a MINOR fault, or data kept across
    /// `MADV_DONTNEED` of shared memory) are mapped as they are, never overwritten.
    func installMinor(_ entry: RegionEntry, from i: UInt64, to j: UInt64, faultPage: UInt64, minorFault: Bool, zeroed: UInt64) -> InstallResult {
        let count = j &- i
        let alias = UnsafeMutableRawPointer(bitPattern: UInt(entry.alias &+ i &* ps))!
        let bytes = Int(count &* ps)
        if !(count == 1 && minorFault) {
            readPageCacheResidency(alias, count: Int(count))
            var p: UInt64 = 0
            while p < count {
                if residency[Int(p)] & 1 != 0 {
                    p &+= 1
                    continue
                }
                var q = p &+ 1
                while q < count && residency[Int(q)] & 1 == 0 { q &+= 1 }
                do {
                    try fill(alias + Int(p &* ps), entry: entry, from: i &+ p, to: i &+ q, zeroed: zeroed == 0 ? 0 : 1)
                } catch {
                    return sourceFailed(entry, from: i &+ p, to: i &+ q, faultPage: faultPage, minorFault: minorFault, error: error)
                }
                p = q
            }
        }
        let destination = entry.range.start &+ i &* ps
        return install(entry, from: i, to: j, faultPage: faultPage, zero: false) { (off: Int) throws(UserfaultfdError) in
            try handle.continueMapping(MemoryRange(start: destination &+ UInt64(off), length: UInt64(bytes - off)))
        }
    }
}

extension HandlerLoop {
    /// Fills ``residency`` with whether each of the `count` pages at `alias` is in the
    /// page cache (bit 0). `mincore` answers per base page, so a huge page is asked
    /// about through its first base page. If it cannot tell, every page counts as missing.
    func readPageCacheResidency(_ alias: UnsafeMutableRawPointer, count: Int) {
        if Int(ps) == systemPageSize {
            if mincore(alias, count * systemPageSize, residency) != 0 { memset(residency, 0, count) }
            return
        }
        for k in 0..<count where mincore(alias + k * Int(ps), systemPageSize, residency + k) != 0 {
            residency[k] = 0
        }
    }
}

extension InstallResult: Equatable {}
