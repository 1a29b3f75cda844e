#include "_CSnapshot.h"

#include <string.h>

static uint32_t table[8][256];
static int ready;
static int hardware;
#if defined(__x86_64__)
static void build_tables(void);
#endif

__attribute__((constructor)) static void init(void) {
    if (__atomic_load_n(&ready, __ATOMIC_ACQUIRE)) return;
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1)));
        table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++) table[t][i] = (table[t - 1][i] >> 8) ^ table[0][table[t - 1][i] & 0xff];
#if defined(__x86_64__)
    __builtin_cpu_init();
    hardware = __builtin_cpu_supports("sse4.2");
    if (hardware) build_tables();
#endif
    __atomic_store_n(&ready, 1, __ATOMIC_RELEASE);
}

static uint32_t software(uint32_t c, const uint8_t *p, size_t n) {
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= c;
        c = table[7][w & 0xff] ^ table[6][(w >> 8) & 0xff] ^ table[5][(w >> 16) & 0xff] ^ table[4][(w >> 24) & 0xff]
          ^ table[3][(w >> 32) & 0xff] ^ table[2][(w >> 40) & 0xff] ^ table[1][(w >> 48) & 0xff] ^ table[0][w >> 56];
        p += 8;
        n -= 8;
    }
    while (n--) c = (c >> 8) ^ table[0][(c ^ *p++) & 0xff];
    return c;
}

#if defined(__x86_64__)
// The instruction has a latency of three cycles and a throughput of one, so one
// dependent chain runs at a third of its speed: three lanes over adjacent blocks of
// LANE bytes run side by side, and their states are joined with the shift operator
// (the CRC of LANE or 2 * LANE zero bytes, as four byte tables).
enum { LANE = 1024 };
static uint32_t shift1[4][256], shift2[4][256];

__attribute__((target("sse4.2")))
static uint32_t over_zeros(uint32_t c, size_t n) {
    uint64_t c64 = c;
    for (size_t i = 0; i < n; i += 8) c64 = __builtin_ia32_crc32di(c64, 0);
    return (uint32_t)c64;
}

static void build_shift(uint32_t t[4][256], size_t n) {
    uint32_t bit[32];
    for (int i = 0; i < 32; i++) bit[i] = over_zeros(1u << i, n);
    for (int k = 0; k < 4; k++)
        for (uint32_t v = 0; v < 256; v++) {
            uint32_t x = 0;
            for (int j = 0; j < 8; j++)
                if (v & (1u << j)) x ^= bit[8 * k + j];
            t[k][v] = x;
        }
}

static inline uint32_t shifted(uint32_t t[4][256], uint32_t c) {
    return t[0][c & 0xff] ^ t[1][(c >> 8) & 0xff] ^ t[2][(c >> 16) & 0xff] ^ t[3][c >> 24];
}

__attribute__((target("sse4.2")))
static uint32_t instruction(uint32_t c, const uint8_t *p, size_t n) {
    uint64_t c64 = c;
    while (n >= 3 * LANE) {
        uint64_t a = c64, b = 0, d = 0;
        for (size_t i = 0; i < LANE; i += 8) {
            uint64_t x, y, z;
            memcpy(&x, p + i, 8);
            memcpy(&y, p + LANE + i, 8);
            memcpy(&z, p + 2 * LANE + i, 8);
            a = __builtin_ia32_crc32di(a, x);
            b = __builtin_ia32_crc32di(b, y);
            d = __builtin_ia32_crc32di(d, z);
        }
        c64 = shifted(shift2, (uint32_t)a) ^ shifted(shift1, (uint32_t)b) ^ (uint32_t)d;
        p += 3 * LANE;
        n -= 3 * LANE;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c64 = __builtin_ia32_crc32di(c64, w);
        p += 8;
        n -= 8;
    }
    c = (uint32_t)c64;
    while (n--) c = __builtin_ia32_crc32qi(c, *p++);
    return c;
}
#endif

#if defined(__x86_64__)
static void build_tables(void) {
    build_shift(shift1, LANE);
    build_shift(shift2, 2 * LANE);
}
#endif

uint32_t csnap_crc32c_portable(uint32_t crc, const void *data, size_t length) {
    if (!__atomic_load_n(&ready, __ATOMIC_ACQUIRE)) init();
    return ~software(~crc, data, length);
}

uint32_t csnap_crc32c(uint32_t crc, const void *data, size_t length) {
    if (!__atomic_load_n(&ready, __ATOMIC_ACQUIRE)) init();
    uint32_t c = ~crc;
#if defined(__x86_64__)
    if (hardware) return ~instruction(c, data, length);
#endif
    return ~software(c, data, length);
}

int csnap_crc32c_is_hardware(void) {
    if (!__atomic_load_n(&ready, __ATOMIC_ACQUIRE)) init();
    return hardware;
}

int csnap_is_zero(const void *data, size_t length) {
    const uint8_t *p = data;
    uint64_t acc = 0;
    size_t i = 0;
    for (; i + 8 <= length; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        acc |= w;
        if ((i & 511) == 504 && acc) return 0;
    }
    for (; i < length; i++) acc |= p[i];
    return acc == 0;
}
