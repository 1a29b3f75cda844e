// C whose job is to be C: atomic bitmap helpers shared by the Swift handler threads
// and the async-signal-safe SIGBUS resolver, and the resolver itself.
#ifndef C_FAULT_ENGINE_H
#define C_FAULT_ENGINE_H

#ifdef __linux__

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

// MARK: - Atomic bitmaps (one bit per page)

/// Whether bit `index` is set.
static inline bool cfe_bit_test(const uint64_t *words, uint64_t index) {
    return (__atomic_load_n(&words[index >> 6], __ATOMIC_ACQUIRE) >> (index & 63)) & 1;
}

/// Sets bit `index`; returns whether it was already set.
static inline bool cfe_bit_test_and_set(uint64_t *words, uint64_t index) {
    uint64_t mask = (uint64_t)1 << (index & 63);
    return (__atomic_fetch_or(&words[index >> 6], mask, __ATOMIC_ACQ_REL) & mask) != 0;
}

/// Clears bit `index`; returns whether it was set.
static inline bool cfe_bit_test_and_clear(uint64_t *words, uint64_t index) {
    uint64_t mask = (uint64_t)1 << (index & 63);
    return (__atomic_fetch_and(&words[index >> 6], ~mask, __ATOMIC_ACQ_REL) & mask) != 0;
}

/// Bits `64 * index ..< 64 * index + 64`, loaded without ordering.
static inline uint64_t cfe_bits_word(const uint64_t *words, uint64_t index) {
    return __atomic_load_n(&words[index], __ATOMIC_RELAXED);
}

/// Sets (`set`) or clears bits `first ..< first + count`, a word at a time.
static inline void cfe_bits_assign(uint64_t *words, uint64_t first, uint64_t count, bool set) {
    uint64_t end = first + count;
    while (first < end) {
        uint64_t bit = first & 63;
        uint64_t n = 64 - bit;
        if (n > end - first) n = end - first;
        uint64_t mask = (n == 64) ? ~(uint64_t)0 : (((uint64_t)1 << n) - 1) << bit;
        if (set) {
            __atomic_fetch_or(&words[first >> 6], mask, __ATOMIC_ACQ_REL);
        } else {
            __atomic_fetch_and(&words[first >> 6], ~mask, __ATOMIC_ACQ_REL);
        }
        first += n;
    }
}

/// Sets bits `first ..< first + count`.
static inline void cfe_bits_set(uint64_t *words, uint64_t first, uint64_t count) {
    cfe_bits_assign(words, first, count, true);
}

/// Clears bits `first ..< first + count`.
static inline void cfe_bits_clear(uint64_t *words, uint64_t first, uint64_t count) {
    cfe_bits_assign(words, first, count, false);
}

/// An atomic load of a shared counter.
static inline uint64_t cfe_atomic_load_u64(const uint64_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

/// Appends `value` to a record buffer: word 0 counts, words 1...capacity hold values.
static inline void cfe_record_append(uint64_t *buffer, uint64_t capacity, uint64_t value) {
    uint64_t i = __atomic_fetch_add(&buffer[0], 1, __ATOMIC_RELAXED);
    if (i < capacity) __atomic_store_n(&buffer[1 + i], value, __ATOMIC_RELEASE);
}

/// The number of values appended to a record buffer (may exceed its capacity).
static inline uint64_t cfe_record_count(const uint64_t *buffer) {
    return __atomic_load_n(&buffer[0], __ATOMIC_ACQUIRE);
}

/// CLOCK_MONOTONIC in nanoseconds.
static inline uint64_t cfe_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/// `mremap(old, size, size, MREMAP_MAYMOVE | MREMAP_FIXED, new)`: `mremap` is
/// variadic and its flags need `_GNU_SOURCE`. Returns the new address or MAP_FAILED.
void *cfe_mremap_fixed(void *old_address, size_t size, void *new_address);

/// `pipe2(fds, O_CLOEXEC | O_NONBLOCK)` (needs `_GNU_SOURCE`). Returns 0 or -1 with errno.
int cfe_pipe_nonblocking(int fds[2]);

/// Pins the calling thread to `cpu`. Returns 0 or an errno value.
int cfe_pin_current_thread(int cpu);

// MARK: - The SIGBUS resolver

/// One served range as the resolver sees it (a copy of the server's entry).
struct cfe_region {
    uint64_t start;
    uint64_t length;
    uint64_t source_offset;
    uint64_t *resident;
    uint64_t *zeroed;
    uint64_t *poisoned;
    uint64_t first_bit;
};

/// Where the resolver reads page contents.
enum cfe_backing_kind {
    /// Bytes in this process's memory.
    CFE_BACKING_MEMORY = 1,
    /// A file read with pread.
    CFE_BACKING_FILE = 2,
    /// Neither: the resolver asks a handler thread through `request_fd` and waits.
    CFE_BACKING_HANDLER = 3,
};

/// Everything the resolver needs for one server. Published whole and never changed:
/// a layout change publishes a new table.
struct cfe_table {
    int uffd;
    int backing_kind;
    const uint8_t *memory;
    uint64_t memory_length;
    int file_fd;
    uint64_t file_offset;
    uint64_t file_length;
    /// Pages installed per fault, and the most a run of sequential faults of one
    /// thread grows to (doubling from `chunk_pages`; at most `chunk_pages`: fixed).
    uint64_t chunk_pages;
    uint64_t max_chunk_pages;
    uint64_t page_size;
    /// Working-set record buffer (word 0 counts), or NULL.
    uint64_t *record;
    uint64_t record_capacity;
    /// Faults resolved in-thread (shared counter, owned by the server).
    uint64_t *resolved;
    /// Pages poisoned because the backing could not be read (shared counter).
    uint64_t *poisoned;
    /// For CFE_BACKING_HANDLER: the write end of the request pipe, and the word the
    /// handler thread bumps (and futex-wakes) after each page it installs.
    int request_fd;
    uint32_t *generation;
    size_t count;
    struct cfe_region regions[];
};

/// Allocates a table for `count` regions (zeroed). Free with `cfe_table_free`.
struct cfe_table *cfe_table_allocate(size_t count);
void cfe_table_free(struct cfe_table *table);

/// The `index`th region of `table`.
static inline struct cfe_region *cfe_table_region(struct cfe_table *table, size_t index) {
    return &table->regions[index];
}

/// Publishes `table` in slot `slot` (replacing what was there) and installs the
/// process-wide SIGBUS handler on first use. Returns the previous table (the caller
/// frees it once no fault can be using it), or NULL.
struct cfe_table *cfe_resolver_publish(int slot, struct cfe_table *table);

/// Takes a free slot; -1 if all are taken.
int cfe_resolver_claim_slot(void);
/// Gives a slot back (after publishing NULL in it).
void cfe_resolver_release_slot(int slot);

/// Marks slot `slot` as closing: a faulting thread waiting there for the handler
/// thread (which is gone or going) stops waiting and lets its access fault again.
void cfe_resolver_begin_closing(int slot);

/// Remembers the ranges published in slot `slot` as those of a stopped server: a
/// SIGBUS raised there before the server's uffd was released, and delivered after
/// the slot was emptied, lets the access run again (a bounded number of times)
/// instead of killing the process. Call it before publishing NULL in the slot.
void cfe_resolver_retire(int slot);

/// Waits until no faulting thread is inside the resolver for slot `slot`: every
/// resolver that had read the slot's table (or its uffd number) before this call has
/// returned. Call it after changing what the slot's threads could reach (the uffd
/// number, or the table published there) and before freeing what they used.
void cfe_resolver_quiesce(int slot);

/// Bumps `*generation` and wakes every thread waiting on it.
void cfe_generation_bump(uint32_t *generation);

#endif // __linux__
#endif // C_FAULT_ENGINE_H
