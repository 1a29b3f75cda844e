// Touch loops and content checks shared by every contender of `uffd bench`.
#include "_CBenchReference.h"

#ifdef __linux__

#include <string.h>
#include <time.h>

uint64_t cbench_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t cbench_touch_read(const void *base, const uint64_t *pages, size_t count,
                           size_t page_size, uint64_t *sink) {
    const volatile uint8_t *bytes = (const volatile uint8_t *)base;
    uint64_t sum = 0;
    uint64_t start = cbench_now_ns();
    for (size_t i = 0; i < count; i++) {
        sum += bytes[pages[i] * page_size];
    }
    uint64_t elapsed = cbench_now_ns() - start;
    *sink = sum;
    return elapsed;
}

uint64_t cbench_touch_write(void *base, const uint64_t *pages, size_t count,
                            size_t page_size, uint8_t value) {
    volatile uint8_t *bytes = (volatile uint8_t *)base;
    uint64_t start = cbench_now_ns();
    for (size_t i = 0; i < count; i++) {
        bytes[pages[i] * page_size] = value;
    }
    return cbench_now_ns() - start;
}

uint64_t cbench_copy_pages(void *base, const void *source, size_t source_pages,
                           const uint64_t *pages, size_t count, size_t page_size) {
    uint8_t *dst = (uint8_t *)base;
    const uint8_t *src = (const uint8_t *)source;
    uint64_t start = cbench_now_ns();
    for (size_t i = 0; i < count; i++) {
        memcpy(dst + pages[i] * page_size, src + (pages[i] % source_pages) * page_size, page_size);
    }
    return cbench_now_ns() - start;
}

/// Word `word` of pattern page `page`.
static inline uint64_t pattern_word(uint64_t page, uint64_t word) {
    uint64_t x = ((page << 16) | word) + 1;
    x *= 0x9E3779B97F4A7C15ull;
    return x ^ (x >> 31);
}

void cbench_fill_pattern(void *destination, uint64_t first_page, size_t pages, size_t page_size) {
    uint64_t *words = (uint64_t *)destination;
    size_t per_page = page_size / sizeof(uint64_t);
    for (size_t p = 0; p < pages; p++) {
        for (size_t w = 0; w < per_page; w++) {
            words[p * per_page + w] = pattern_word(first_page + p, w);
        }
    }
}

/// The offset of the first byte of `word` that differs from `expected`.
static inline size_t first_differing_byte(uint64_t word, uint64_t expected) {
    uint8_t a[8], b[8];
    memcpy(a, &word, 8);
    memcpy(b, &expected, 8);
    size_t i = 0;
    while (i < 7 && a[i] == b[i]) i++;
    return i;
}

int64_t cbench_verify_pattern(const void *base, size_t source_pages, const uint64_t *pages,
                              size_t count, size_t page_size) {
    size_t per_page = page_size / sizeof(uint64_t);
    for (size_t i = 0; i < count; i++) {
        const uint64_t *words = (const uint64_t *)((const uint8_t *)base + pages[i] * page_size);
        uint64_t source_page = pages[i] % source_pages;
        for (size_t w = 0; w < per_page; w++) {
            uint64_t expected = pattern_word(source_page, w);
            if (words[w] != expected) {
                return (int64_t)(pages[i] * page_size + w * 8 + first_differing_byte(words[w], expected));
            }
        }
    }
    return -1;
}

int64_t cbench_verify_touched_zero(const void *base, const uint64_t *pages, size_t count,
                                   size_t page_size, uint8_t value) {
    for (size_t i = 0; i < count; i++) {
        const uint8_t *page = (const uint8_t *)base + pages[i] * page_size;
        int64_t offset = (int64_t)(pages[i] * page_size);
        if (page[0] != value) return offset;
        for (size_t b = 1; b < page_size; b++) {
            if (page[b] != 0) return offset + (int64_t)b;
        }
    }
    return -1;
}

#endif // __linux__
