// C whose job is to be C: the CRC32C instruction (SSE4.2), which Swift cannot
// express, with a table fallback for CPUs without it.
#ifndef C_SNAPSHOT_H
#define C_SNAPSHOT_H

#ifdef __linux__

#include <stddef.h>
#include <stdint.h>

/// Continues a CRC32C (Castagnoli) over `length` bytes at `data`.
/// Start with 0; the result of one call is the `crc` of the next.
uint32_t csnap_crc32c(uint32_t crc, const void *data, size_t length);

/// Whether `csnap_crc32c` uses the CPU's instruction (1) or the table (0).
int csnap_crc32c_is_hardware(void);

/// Whether `length` bytes at `data` are all zero.
int csnap_is_zero(const void *data, size_t length);

#endif
#endif
