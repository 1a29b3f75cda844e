#include "_CSnapshot.h"

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

uint64_t csnap_touch_write(void *base, const uint64_t *pages, size_t count, size_t page_size) {
    volatile uint8_t *b = base;
    uint64_t start = now_ns();
    for (size_t i = 0; i < count; i++) b[pages[i] * page_size] = (uint8_t)(i + 1);
    return now_ns() - start;
}

static uint8_t *track_region;
static size_t track_length;
static size_t track_page;
static uint8_t *track_written;
static struct sigaction track_previous;

static void on_segv(int sig, siginfo_t *info, void *context) {
    uint8_t *address = info->si_addr;
    if (address >= track_region && address < track_region + track_length) {
        size_t page = (size_t)(address - track_region) / track_page;
        track_written[page] = 1;
        if (mprotect(track_region + page * track_page, track_page, PROT_READ | PROT_WRITE) == 0) return;
    }
    sigaction(SIGSEGV, &track_previous, NULL);
    (void)sig;
    (void)context;
}

uint64_t csnap_sigsegv_track(void *region, size_t region_length, const uint64_t *pages, size_t count,
                             size_t page_size, uint8_t *written) {
    track_region = region;
    track_length = region_length;
    track_page = page_size;
    track_written = written;
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_segv;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGSEGV, &action, &track_previous) != 0) return 0;
    uint64_t elapsed = 0;
    if (mprotect(region, region_length, PROT_READ) == 0) {
        elapsed = csnap_touch_write(region, pages, count, page_size);
        if (elapsed == 0) elapsed = 1;
        mprotect(region, region_length, PROT_READ | PROT_WRITE);
    }
    int saved = errno;
    sigaction(SIGSEGV, &track_previous, NULL);
    errno = saved;
    return elapsed;
}

#include <unistd.h>

int csnap_write_all(int fd, const void *data, size_t length) {
    const uint8_t *p = data;
    while (length > 0) {
        size_t n = length < ((size_t)1 << 30) ? length : ((size_t)1 << 30);
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        if (w == 0) return EIO;
        p += w;
        length -= (size_t)w;
    }
    return 0;
}
