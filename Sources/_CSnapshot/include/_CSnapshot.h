// C whose job is to be C: the CRC32C instruction (SSE4.2), which Swift cannot
// express, with a table fallback for CPUs without it.
#ifndef C_SNAPSHOT_H
#define C_SNAPSHOT_H

#ifdef __linux__

#include <stddef.h>
#include <stdint.h>

#include "CSnapshotCapture.h"

/// Continues a CRC32C (Castagnoli) over `length` bytes at `data`.
/// Start with 0; the result of one call is the `crc` of the next.
uint32_t csnap_crc32c(uint32_t crc, const void *data, size_t length);

/// The same CRC32C with the byte tables only (the reference the instruction path is
/// checked against).
uint32_t csnap_crc32c_portable(uint32_t crc, const void *data, size_t length);

/// Whether `csnap_crc32c` uses the CPU's instruction (1) or the table (0).
int csnap_crc32c_is_hardware(void);

/// Whether `length` bytes at `data` are all zero.
int csnap_is_zero(const void *data, size_t length);

#endif
#endif

#ifdef __linux__
// MARK: - Write tracking yardsticks (the demo measures them on one write pattern)

/// Writes one byte to page `pages[i]` of `base` for i in 0..<count, in order;
/// returns the elapsed CLOCK_MONOTONIC nanoseconds.
uint64_t csnap_touch_write(void *base, const uint64_t *pages, size_t count, size_t page_size);

/// The mprotect + SIGSEGV way to learn which pages are written: `region` is made
/// read-only, then page `pages[i]` is written in order; a SIGSEGV handler marks
/// the page in `written` (one byte per page) and makes it writable. Returns the
/// elapsed nanoseconds of the writes, or 0 and sets errno if mprotect or sigaction
/// fails (ENOMEM: out of VMAs). One run at a time per process.
uint64_t csnap_sigsegv_track(void *region, size_t region_length, const uint64_t *pages, size_t count,
                             size_t page_size, uint8_t *written);
#endif

#ifdef __linux__
/// Writes `length` bytes at `data` to `fd` (for a forked child: no allocation).
/// Returns 0 or an errno value.
int csnap_write_all(int fd, const void *data, size_t length);
#endif
