// Copy before write, in C because the writing threads run it inside a SIGBUS
// handler: no allocation, no lock, only atomics, memcpy, ioctl and nanosleep.
#include "CSnapshotCapture.h"
#include "CUserfaultfd.h"
#include "CUserfaultfdSignal.h"

#ifdef __linux__
#include <errno.h>
#include <linux/userfaultfd.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <time.h>

#define LOAD(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)
#define ADD(p, v) __atomic_fetch_add((p), (v), __ATOMIC_SEQ_CST)

int64_t csnap_load(const int64_t *value) { return LOAD(value); }
void csnap_store(int64_t *value, int64_t new_value) { STORE(value, new_value); }
int csnap_load_int(const int *value) { return LOAD(value); }
void csnap_store_int(int *value, int new_value) { STORE(value, new_value); }

int csnap_claim(struct csnap_capture *c, int64_t page, uint8_t from, uint8_t to) {
    uint8_t expected = from;
    return __atomic_compare_exchange_n(&c->state[page], &expected, to, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

uint8_t csnap_state(const struct csnap_capture *c, int64_t page) { return LOAD(&c->state[page]); }
void csnap_set_state(struct csnap_capture *c, int64_t page, uint8_t state) { STORE(&c->state[page], state); }

int64_t csnap_slot_page(const struct csnap_capture *c, int64_t position) {
    return __atomic_load_n(&c->slot_pages[position % c->capacity], __ATOMIC_ACQUIRE);
}

void csnap_release_slots(struct csnap_capture *c, int64_t to) {
    for (int64_t i = LOAD(&c->consumed); i < to; i++) __atomic_store_n(&c->slot_pages[i % c->capacity], -1, __ATOMIC_RELAXED);
    STORE(&c->consumed, to);
}

int csnap_unprotect(int uffd, uint64_t start, uint64_t length) {
    struct uffdio_writeprotect wp = {.range = {.start = start, .len = length}, .mode = 0};
    for (;;) {
        if (cuffd_writeprotect(uffd, &wp) == 0) return 0;
        // EAGAIN: the mm is changing (a fork or mremap in progress); try again.
        if (errno != EAGAIN && errno != EINTR) return errno;
    }
}

static void pause_briefly(long nanoseconds) {
    struct timespec t = {0, nanoseconds};
    nanosleep(&t, NULL);
}

/// Records a failed unprotect and cancels: the image writer then clears everything.
static void unprotect_or_fail(struct csnap_capture *c, uint64_t start, uint64_t length) {
    int e = csnap_unprotect(c->uffd, start, length);
    if (e == 0) return;
    int none = 0;
    __atomic_compare_exchange_n(&c->failure_errno, &none, e, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    STORE(&c->cancelled, 1);
}

static uint64_t address_of(const struct csnap_capture *c, const struct csnap_region *r, int64_t page) {
    return r->start + (uint64_t)(page - r->first_page) * c->page_size;
}

/// When tracking: a write to a page already in the image. Notes the chunk's settled
/// pages as written since the instant and clears their protection, in runs.
static void release_written(struct csnap_capture *c, const struct csnap_region *r, int64_t first, int64_t end) {
    int64_t p = first;
    while (p < end) {
        uint8_t s = LOAD(&c->state[p]);
        if (s != CSNAP_SAVED && s != CSNAP_DONE) { p++; continue; }
        int64_t q = p;
        while (q < end && ((s = LOAD(&c->state[q])) == CSNAP_SAVED || s == CSNAP_DONE)) {
            __atomic_store_n(&c->next_dirty[q], 1, __ATOMIC_RELAXED);
            q++;
        }
        unprotect_or_fail(c, address_of(c, r, p), (uint64_t)(q - p) * c->page_size);
        p = q;
    }
}

/// Reserves `n` consecutive ring positions, waiting for the image writer while the
/// ring is full. Returns the first position, or -1 if the capture was cancelled.
static int64_t reserve(struct csnap_capture *c, int64_t n) {
    int waited = 0;
    for (;;) {
        int64_t r = LOAD(&c->reserved);
        if (r + n - LOAD(&c->consumed) <= c->capacity) {
            if (__atomic_compare_exchange_n(&c->reserved, &r, r + n, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) return r;
            continue;
        }
        if (!waited) { ADD(&c->staging_waits, 1); waited = 1; }
        if (LOAD(&c->cancelled)) return -1;
        pause_briefly(20000);
    }
}

/// Copies page `page` into ring position `position` and publishes it.
static void save(struct csnap_capture *c, const struct csnap_region *r, int64_t page, int64_t position) {
    int64_t slot = position % c->capacity;
    memcpy(c->slots + slot * c->page_size, (const void *)(uintptr_t)address_of(c, r, page), c->page_size);
    if (c->tracking) __atomic_store_n(&c->next_dirty[page], 1, __ATOMIC_RELAXED);
    __atomic_store_n(&c->slot_pages[slot], page, __ATOMIC_RELEASE);
    STORE(&c->state[page], CSNAP_SAVED);
}

static void note_peak(struct csnap_capture *c) {
    int64_t staged = LOAD(&c->reserved) - LOAD(&c->consumed);
    int64_t peak = LOAD(&c->peak_staged);
    while (staged > peak && !__atomic_compare_exchange_n(&c->peak_staged, &peak, staged, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {}
}

/// Claims the faulting page and the pending pages of its chunk, saves them (the
/// faulting one first, and lets its writer go), then clears protection on the rest.
/// Returns 0 if the faulting page was no longer pending (nothing claimed).
static int save_chunk(struct csnap_capture *c, const struct csnap_region *r, int64_t page, int64_t first, int64_t end) {
    if (!csnap_claim(c, page, CSNAP_PENDING, CSNAP_SAVING)) return 0;
    uint64_t claimed[CSNAP_MAX_FAULT_CHUNK / 64] = {0};
    int64_t n = 1;
    for (int64_t q = first; q < end; q++) {
        if (q != page && csnap_claim(c, q, CSNAP_PENDING, CSNAP_SAVING)) {
            claimed[(q - first) / 64] |= 1ull << ((q - first) % 64);
            n++;
        }
    }
    int64_t position = reserve(c, n);
    // Cancelled: the pages stay claimed; the image writer clears every protection.
    if (position < 0) return 1;
    save(c, r, page, position);
    unprotect_or_fail(c, address_of(c, r, page), c->page_size);
    int64_t next = position + 1;
    for (int64_t q = first; q < end; q++) {
        if (claimed[(q - first) / 64] & (1ull << ((q - first) % 64))) save(c, r, q, next++);
    }
    ADD(&c->saved_pages, n);
    note_peak(c);
    int64_t q = first;
    while (q < end) {
        if (!(claimed[(q - first) / 64] & (1ull << ((q - first) % 64)))) { q++; continue; }
        int64_t run = 1;
        while (q + run < end && (claimed[(q + run - first) / 64] & (1ull << ((q + run - first) % 64)))) run++;
        unprotect_or_fail(c, address_of(c, r, q), (uint64_t)run * c->page_size);
        q += run;
    }
    return 1;
}

int csnap_resolve(struct csnap_capture *c, uint64_t address, int in_writing_thread) {
    const struct csnap_region *r = NULL;
    for (int64_t i = 0; i < c->region_count; i++) {
        if (address - c->regions[i].start < c->regions[i].length) { r = &c->regions[i]; break; }
    }
    if (!r) return 0;
    ADD(&c->faults, 1);
    // Counted before any claim, so the image writer, once it has walked every page,
    // knows no claim is still on its way while this is 0.
    ADD(&c->resolvers, 1);
    int64_t page = r->first_page + (int64_t)((address - r->start) / c->page_size);
    int64_t chunk = c->fault_chunk_pages;
    int64_t first = r->first_page + (page - r->first_page) / chunk * chunk;
    int64_t end = first + chunk;
    int64_t region_end = r->first_page + (int64_t)(r->length / c->page_size);
    if (end > region_end) end = region_end;
    for (;;) {
        uint8_t s = LOAD(&c->state[page]);
        if (s == CSNAP_PENDING) {
            if (save_chunk(c, r, page, first, end)) break;
            continue;
        }
        if (s == CSNAP_SAVED || s == CSNAP_DONE) {
            // In the image already: a write since the instant (tracking), or a fault
            // that raced with the clearing of its page.
            if (c->tracking) release_written(c, r, first, end);
            else unprotect_or_fail(c, address_of(c, r, page), c->page_size);
            break;
        }
        // Streaming or saving: whoever holds the page clears its protection (and
        // wakes a writer held in the kernel). A writing thread waits for that here.
        if (!in_writing_thread || LOAD(&c->cancelled)) break;
        sched_yield();
    }
    ADD(&c->resolvers, -1);
    return 1;
}

// MARK: - The SIGBUS handler

#define CSNAP_SLOTS 16

struct csnap_owner {
    int uffd;
    uint64_t page_size;
    int64_t count;
    struct csnap_region regions[64];
    struct csnap_capture *capture;
};

static struct csnap_owner owners[CSNAP_SLOTS];
static int owner_taken[CSNAP_SLOTS];
static int owner_live[CSNAP_SLOTS];
/// Writing threads inside the handler for each slot.
static int owner_active[CSNAP_SLOTS];
static struct sigaction previous_action;
static int handler_installed;

/// The same address faulting again and again without a pause (a SIGBUS that is not a
/// write-protect fault, in a region whose page is settled) is passed on after this long.
#define CSNAP_REPEAT_LIMIT_NS 2000000000ull
static _Thread_local uint64_t repeat_address;
static _Thread_local uint64_t repeat_since;
static _Thread_local uint64_t repeat_last;

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static int owns(const struct csnap_owner *o, uint64_t address) {
    for (int64_t i = 0; i < o->count; i++) {
        if (address - o->regions[i].start < o->regions[i].length) return 1;
    }
    return 0;
}

static void handle_sigbus(int sig, siginfo_t *info, void *context) {
    int saved_errno = errno;
    uint64_t address = (uint64_t)(uintptr_t)info->si_addr;
    int handled = 0;
    if (info->si_code == BUS_ADRERR) {
        uint64_t now = now_ns();
        // A run of faults at one address, each within 50 ms of the last.
        if (address != repeat_address || now - repeat_last > 50000000ull) {
            repeat_address = address;
            repeat_since = now;
        }
        repeat_last = now;
        for (int i = 0; i < CSNAP_SLOTS && !handled; i++) {
            ADD(&owner_active[i], 1);
            if (LOAD(&owner_live[i]) && now - repeat_since < CSNAP_REPEAT_LIMIT_NS) {
                // A running capture has the same regions: its resolver tells whether the address is ours.
                struct csnap_capture *c = LOAD(&owners[i].capture);
                if (c) {
                    handled = csnap_resolve(c, address, 1);
                } else if (owns(&owners[i], address)) {
                    // Between captures nothing should be protected: a late signal.
                    uint64_t ps = owners[i].page_size;
                    handled = csnap_unprotect(owners[i].uffd, address / ps * ps, ps) == 0;
                }
            }
            ADD(&owner_active[i], -1);
        }
    }
    if (!handled) {
        repeat_address = 0;
        cuffd_sigbus_chain(&previous_action, sig, info, context);
    }
    errno = saved_errno;
}

static void wait_unused(int slot) {
    while (LOAD(&owner_active[slot]) != 0) pause_briefly(10000);
}

int csnap_sigbus_attach(int uffd, uint64_t page_size, const struct csnap_region *regions, int64_t count) {
    if (count <= 0 || count > 64) return -1;
    cuffd_sigbus_install_once(&handler_installed, handle_sigbus, &previous_action);
    for (int i = 0; i < CSNAP_SLOTS; i++) {
        int expected = 0;
        if (!__atomic_compare_exchange_n(&owner_taken[i], &expected, 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) continue;
        owners[i].uffd = uffd;
        owners[i].page_size = page_size;
        owners[i].count = count;
        memcpy(owners[i].regions, regions, (size_t)count * sizeof(*regions));
        STORE(&owners[i].capture, NULL);
        STORE(&owner_live[i], 1);
        return i;
    }
    return -1;
}

void csnap_sigbus_set_capture(int slot, struct csnap_capture *capture) {
    if (slot < 0 || slot >= CSNAP_SLOTS) return;
    STORE(&owners[slot].capture, capture);
    wait_unused(slot);
}

void csnap_sigbus_detach(int slot) {
    if (slot < 0 || slot >= CSNAP_SLOTS) return;
    STORE(&owner_live[slot], 0);
    wait_unused(slot);
    STORE(&owners[slot].capture, NULL);
    STORE(&owner_taken[slot], 0);
}

#endif // __linux__
