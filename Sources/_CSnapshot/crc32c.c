#include "_CSnapshot.h"

#include <string.h>

static uint32_t table[8][256];
static int ready;
static int hardware;

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
__attribute__((target("sse4.2")))
static uint32_t instruction(uint32_t c, const uint8_t *p, size_t n) {
    uint64_t c64 = c;
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
