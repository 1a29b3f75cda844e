import FaultEngine
import Userfaultfd

/// Installs a recorded working set into a client's memory before its faults are served,
/// with the engine's ``WorkingSetPreinstall`` (see there).
enum WorkingSetPreload {
    typealias Result = WorkingSetPreinstall.Result

    /// Installs the pages at `offsets` (backing-file offsets, in order) that `regions` map.
    ///
    /// - Parameters:
    ///   - pageSize: the regions' page size.
    ///   - maxRunPages: the longest run copied at once, in base pages.
    ///   - threads: how many threads copy at once.
    static func install<Source: PageSource>(
        _ offsets: [UInt64], regions: [ClientRegion], source: Source, uffd: Userfaultfd.Handle,
        pageSize: UInt64 = UInt64(systemPageSize), maxRunPages basePages: Int = 256, threads: Int = 1
    ) -> Result {
        let served = regions.map { ServedRegion(range: $0.range, sourceOffset: $0.backingOffset) }
        return WorkingSetPreinstall.install(offsets, regions: served, source: source, handle: uffd,
                                            pageSize: Int(pageSize), maxRunPages: basePages, threads: threads)
    }
}
