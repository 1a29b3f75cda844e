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

/// Sets bits `first ..< first + count`.
static inline void cfe_bits_set(uint64_t *words, uint64_t first, uint64_t count) {
    uint64_t end = first + count;
    while (first < end) {
        uint64_t bit = first & 63;
        uint64_t n = 64 - bit;
        if (n > end - first) n = end - first;
        uint64_t mask = (n == 64) ? ~(uint64_t)0 : (((uint64_t)1 << n) - 1) << bit;
        __atomic_fetch_or(&words[first >> 6], mask, __ATOMIC_ACQ_REL);
        first += n;
    }
}

/// Clears bits `first ..< first + count`.
static inline void cfe_bits_clear(uint64_t *words, uint64_t first, uint64_t count) {
    uint64_t end = first + count;
    while (first < end) {
        uint64_t bit = first & 63;
        uint64_t n = 64 - bit;
        if (n > end - first) n = end - first;
        uint64_t mask = (n == 64) ? ~(uint64_t)0 : (((uint64_t)1 << n) - 1) << bit;
        __atomic_fetch_and(&words[first >> 6], ~mask, __ATOMIC_ACQ_REL);
        first += n;
    }
}

/// The number of bits set in `first ..< first + count`.
uint64_t cfe_bits_count(const uint64_t *words, uint64_t first, uint64_t count);

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

/// Pins the calling thread to `cpu`. Returns 0 or an errno value.
int cfe_pin_current_thread(int cpu);

/// The CPU the calling thread runs on now (-1 if unknown).
int cfe_current_cpu(void);

#endif // __linux__
#endif // C_FAULT_ENGINE_H
