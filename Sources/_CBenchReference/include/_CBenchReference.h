// The yardsticks `uffd bench` compares the engine against, written in C on
// purpose: a reference userfaultfd handler thread (COPY of a fixed chunk per
// fault), the PROT_NONE + SIGSEGV + mprotect scheme, and the touch loops and
// content checks that every contender shares so that none is timed differently.
#ifndef C_BENCH_REFERENCE_H
#define C_BENCH_REFERENCE_H

#ifdef __linux__

#include <stddef.h>
#include <stdint.h>

// MARK: - Clock and touch loops (shared by every contender)

/// CLOCK_MONOTONIC in nanoseconds.
uint64_t cbench_now_ns(void);

/// Reads the first byte of page `pages[i]` of `base`, for i in 0..<count, in order.
/// Returns the elapsed nanoseconds; `*sink` receives a sum so the loads stay.
uint64_t cbench_touch_read(const void *base, const uint64_t *pages, size_t count,
                           size_t page_size, uint64_t *sink);

/// Writes `value` to the first byte of page `pages[i]` of `base`, in order.
/// Returns the elapsed nanoseconds.
uint64_t cbench_touch_write(void *base, const uint64_t *pages, size_t count,
                            size_t page_size, uint8_t value);

/// Copies page `pages[i] % source_pages` of `source` to page `pages[i]` of `base`,
/// in order. Returns the elapsed nanoseconds.
uint64_t cbench_copy_pages(void *base, const void *source, size_t source_pages,
                           const uint64_t *pages, size_t count, size_t page_size);

// MARK: - Content

/// Fills `pages` pages at `destination` with the bench pattern of pages
/// `first_page ..< first_page + pages`: every page differs from every other.
void cbench_fill_pattern(void *destination, uint64_t first_page, size_t pages, size_t page_size);

/// Checks page `pages[i]` of `base` against pattern page `pages[i] % source_pages`,
/// for i in 0..<count. Returns the byte offset (from `base`) of the first wrong
/// byte, or -1 if every byte is right.
int64_t cbench_verify_pattern(const void *base, size_t source_pages, const uint64_t *pages,
                              size_t count, size_t page_size);

/// Checks that page `pages[i]` of `base` holds zeros except `value` in its first
/// byte (what a write touch of fresh memory leaves). Returns the byte offset of
/// the first wrong byte, or -1.
int64_t cbench_verify_touched_zero(const void *base, const uint64_t *pages, size_t count,
                                   size_t page_size, uint8_t value);

// MARK: - Reference handler thread

/// What a reference handler did.
struct cbench_handler_stats {
    /// Page-fault messages read.
    uint64_t faults;
    /// Successful UFFDIO_COPY calls.
    uint64_t copies;
    /// Faults whose chunk was already there (EEXIST, woken with UFFDIO_WAKE).
    uint64_t already_present;
    /// Failed ioctls or reads.
    uint64_t errors;
    /// errno of the last failure, 0 if none.
    int last_error;
};

/// A running reference handler (opaque).
struct cbench_handler;

/// Starts a thread that serves MISSING faults on `[region, region + region_length)`
/// of `uffd` (already handshaken and registered) with one UFFDIO_COPY of `chunk`
/// bytes per fault: the chunk containing the fault, aligned to `region`, clipped
/// to the region. Region byte `o` gets source byte `o % source_length`.
///
/// `chunk` and `source_length` must be multiples of the page size and
/// `source_length` a multiple of `chunk` (no chunk wraps the source).
/// Returns 0 and the handler in `*out`, or an errno value.
int cbench_handler_start(int uffd, uint64_t region, uint64_t region_length,
                         const void *source, uint64_t source_length, uint64_t chunk,
                         struct cbench_handler **out);

/// Stops the handler thread, joins it, frees it and reports what it did.
/// Does not close `uffd`.
void cbench_handler_stop(struct cbench_handler *handler, struct cbench_handler_stats *stats);

// MARK: - PROT_NONE + SIGSEGV + mprotect

/// What a SIGSEGV run did.
struct cbench_sigsegv_result {
    /// Nanoseconds spent touching.
    uint64_t elapsed_ns;
    /// Pages of the pattern touched (and filled) before the run ended.
    uint64_t pages_done;
    /// 0, or the errno of the mprotect that failed (ENOMEM: out of VMAs).
    int error;
};

/// Touches page `pages[i]` of `region` (mapped PROT_NONE by the caller) in order,
/// reading its first byte; a SIGSEGV handler makes the faulting page readable and
/// writable with mprotect and copies source page `pages[i] % source_pages` into it.
/// If mprotect fails (the process runs out of VMAs, `vm.max_map_count`), the run
/// stops there and `result->error` says why.
///
/// Installs its SIGSEGV handler for the duration of the call and restores the
/// previous one; faults outside `region` go to the previous handler. One run at a
/// time per process. Returns 0, or EBUSY if another run is in progress, or the
/// errno of sigaction.
int cbench_sigsegv_run(void *region, size_t region_length, const void *source,
                       size_t source_pages, const uint64_t *pages, size_t count,
                       size_t page_size, struct cbench_sigsegv_result *result);

#endif // __linux__
#endif // C_BENCH_REFERENCE_H
