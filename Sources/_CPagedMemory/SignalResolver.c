// The pager's in-thread fault resolver. A mapping whose store is a file is
// registered on a uffd with UFFD_FEATURE_SIGBUS: a missing page or a first write to
// a write-protected one raises SIGBUS (BUS_ADRERR) in the faulting thread, and this
// handler serves it right there (pread into a stack buffer, UFFDIO_COPY, or
// UFFDIO_WRITEPROTECT) with the same state machine as the pager's filler threads.
// No wake-up of another thread is needed, which is what a fault costs most here.
//
// Calls made: pthread_mutex_lock/unlock, pthread_cond_timedwait/broadcast, ioctl,
// pread, clock_gettime, sigaction. The mutex is the pager's lock; see the header for
// why taking it here cannot deadlock. No allocation.
#include "CPagedMemory.h"
#include "CUserfaultfd.h"
#include "CUserfaultfdSignal.h"

#ifdef __linux__
#include <errno.h>
#include <linux/userfaultfd.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#define SLOTS 16
static struct cpaged_shared *slots[SLOTS];
/// Faulting threads inside the resolver for each slot (counted before the slot is read).
static int active[SLOTS];
static struct sigaction previous_action;
static int handler_installed;

struct cpaged_shared *cpaged_shared_create(int64_t pending_capacity) {
    struct cpaged_shared *s = calloc(1, sizeof(*s));
    if (!s) return NULL;
    s->pending = calloc((size_t)pending_capacity, sizeof(uint64_t));
    if (!s->pending) { free(s); return NULL; }
    s->pending_capacity = pending_capacity;
    pthread_mutex_init(&s->mutex, NULL);
    pthread_condattr_t attributes;
    pthread_condattr_init(&attributes);
    pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC);
    pthread_cond_init(&s->cond, &attributes);
    pthread_condattr_destroy(&attributes);
    return s;
}

void cpaged_shared_destroy(struct cpaged_shared *s) {
    if (!s) return;
    pthread_cond_destroy(&s->cond);
    pthread_mutex_destroy(&s->mutex);
    free(s->regions);
    free(s->pending);
    free(s);
}

void cpaged_wait(struct cpaged_shared *s, int64_t milliseconds) {
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    int64_t ns = deadline.tv_nsec + (milliseconds % 1000) * 1000000;
    deadline.tv_sec += milliseconds / 1000 + ns / 1000000000;
    deadline.tv_nsec = ns % 1000000000;
    pthread_cond_timedwait(&s->cond, &s->mutex, &deadline);
}

static int64_t now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

int cpaged_insert_region(struct cpaged_shared *s, struct cpaged_region *r) {
    if (s->region_count == s->region_capacity) {
        int64_t capacity = s->region_capacity ? s->region_capacity * 2 : 16;
        struct cpaged_region **grown = realloc(s->regions, (size_t)capacity * sizeof(*grown));
        if (!grown) return -1;
        s->regions = grown;
        s->region_capacity = capacity;
    }
    int64_t i = s->region_count;
    while (i > 0 && s->regions[i - 1]->base > r->base) { s->regions[i] = s->regions[i - 1]; i--; }
    s->regions[i] = r;
    s->region_count++;
    return 0;
}

void cpaged_remove_region(struct cpaged_shared *s, struct cpaged_region *r) {
    for (int64_t i = 0; i < s->region_count; i++) {
        if (s->regions[i] != r) continue;
        memmove(&s->regions[i], &s->regions[i + 1], (size_t)(s->region_count - i - 1) * sizeof(*s->regions));
        s->region_count--;
        return;
    }
}

static struct cpaged_region *find(const struct cpaged_shared *s, uint64_t address) {
    int64_t low = 0, high = s->region_count;
    while (low < high) {
        int64_t mid = (low + high) / 2;
        if (s->regions[mid]->base + s->regions[mid]->length <= address) low = mid + 1; else high = mid;
    }
    if (low < s->region_count && s->regions[low]->base <= address) return s->regions[low];
    return NULL;
}

static inline int state(const struct cpaged_region *r, int64_t p) { return r->flags[p] & CPAGED_STATE_MASK; }
static inline void set_state(struct cpaged_region *r, int64_t p, int st) {
    r->flags[p] = (uint8_t)((r->flags[p] & ~CPAGED_STATE_MASK) | st);
}
static inline void set_dirty(struct cpaged_region *r, int64_t p, int dirty) {
    r->flags[p] = (uint8_t)(dirty ? r->flags[p] | CPAGED_DIRTY : r->flags[p] & ~CPAGED_DIRTY);
}
static inline int credit(const struct cpaged_region *r, int64_t p) { return (r->flags[p] >> CPAGED_CREDIT_SHIFT) & 3; }
static inline void set_credit(struct cpaged_region *r, int64_t p, int c) {
    if (c > 3) c = 3;
    r->flags[p] = (uint8_t)((r->flags[p] & 0x9F) | (c << CPAGED_CREDIT_SHIFT));
}

static void record(struct cpaged_shared *s, struct cpaged_region *r, int kind, int error_number, int64_t page) {
    s->errors++;
    if (r->error_count >= CPAGED_REGION_ERRORS) { r->errors_dropped++; return; }
    r->errors[r->error_count++] = (struct cpaged_error){ kind, error_number, page * r->page_size };
}

/// The victim-queue entry of a page (VictimQueue.entry).
static inline uint64_t entry(const struct cpaged_region *r, int64_t page) {
    return (uint64_t)(r->slot & 0xFFFFF) << 44 | (uint64_t)(r->generation & 0xFFF) << 32 | (uint32_t)page;
}

/// Marks the window at `page` filling and counts it resident (mutex held); the same
/// rules as the filler's reserveWindow. Returns the pages in the window.
static int64_t reserve_window(struct cpaged_shared *s, struct cpaged_region *r, int64_t page) {
    int64_t window = CPAGED_SIGNAL_CHUNK / r->page_size;
    if (page == r->last_fault_page + 1 || (page > r->last_fault_page && page <= r->last_fault_page + r->read_ahead_window)) {
        int64_t grown = r->read_ahead_window * 2 < 2 ? 2 : r->read_ahead_window * 2;
        int64_t cap = s->max_read_ahead_pages < 1 ? 1 : s->max_read_ahead_pages;
        r->read_ahead_window = grown < cap ? grown : cap;
    } else {
        r->read_ahead_window = 1;
    }
    r->last_fault_page = page;
    if (r->read_ahead_window < window) window = r->read_ahead_window;
    int64_t by_bytes = s->max_read_ahead_bytes / r->page_size;
    if (by_bytes < 1) by_bytes = 1;
    if (by_bytes < window) window = by_bytes;
    if (window < 1) window = 1;
    int scratch = (r->flags[page] & CPAGED_SCRATCH) != 0;
    int64_t count = 0;
    while (count < window && page + count < r->page_count && state(r, page + count) == CPAGED_ABSENT) {
        // Pages kept in the private scratch file are read one by one.
        if (count > 0 && (scratch || (r->flags[page + count] & CPAGED_SCRATCH))) break;
        count++;
    }
    for (int64_t p = page; p < page + count; p++) set_state(r, p, CPAGED_FILLING);
    r->busy_pages += count;
    r->resident_pages += count;
    s->resident_bytes += count * r->page_size;
    return count;
}

/// Waits (mutex held) until the resident bytes fit the buffer. Returns 0 on time-out or stop.
static int wait_for_room(struct cpaged_shared *s) {
    if (s->resident_bytes > s->capacity_bytes) {
        s->space_waits++;
        int64_t deadline = now_ms() + s->space_wait_ms;
        while (s->resident_bytes > s->capacity_bytes) {
            if (s->stopping || now_ms() >= deadline) return 0;
            pthread_cond_broadcast(&s->cond);
            cpaged_wait(s, 5);
        }
    }
    if (s->resident_bytes > s->peak_resident_bytes) s->peak_resident_bytes = s->resident_bytes;
    return 1;
}

/// Reads `len` bytes at `offset` of `fd`; bytes past `size` read as zero. Returns 0 or an errno.
static int read_pages(int fd, uint8_t *buffer, int64_t offset, int64_t len) {
    int64_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, buffer + done, (size_t)(len - done), (off_t)(offset + done));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return errno;
        if (n == 0) break;
        done += n;
    }
    if (done < len) memset(buffer + done, 0, (size_t)(len - done));
    return 0;
}

/// Copies the window in, write-protected except the first page when `writable`.
/// Returns the leading pages now in place.
static int64_t install(const struct cpaged_region *r, int64_t page, int64_t count, int writable, const uint8_t *source) {
    int64_t ps = r->page_size, done = 0;
    int one_at_a_time = 0;
    while (done < count) {
        int open_page = writable && done == 0;
        int64_t n = open_page || one_at_a_time ? 1 : count - done;
        struct uffdio_copy c = {
            .dst = r->base + (uint64_t)((page + done) * ps), .src = (uint64_t)(uintptr_t)(source + done * ps),
            .len = (uint64_t)(n * ps), .mode = open_page ? 0 : UFFDIO_COPY_MODE_WP, .copy = 0 };
        int rc = ioctl(r->uffd, UFFDIO_COPY, &c);
        int e = rc == 0 ? 0 : errno;
        if (rc == 0) { done += n; continue; }
        if (c.copy > 0 && c.copy % ps == 0) { done += c.copy / ps; continue; }
        if (e == EINTR || e == EAGAIN || c.copy == -EAGAIN) continue;
        if (e == EEXIST || c.copy == -EEXIST) {
            // Somebody else's page is there (it should not be): keep it, page by page.
            if (n == 1) done++; else one_at_a_time = 1;
            continue;
        }
        return done;
    }
    return done;
}

/// Gives the window up after a failure (mutex held): the faulting page is poisoned,
/// the others are absent again.
static void fail_fill(struct cpaged_shared *s, struct cpaged_region *r, int64_t page, int64_t count, int kind, int e) {
    record(s, r, kind, e, page);
    set_state(r, page, CPAGED_POISONED);
    set_dirty(r, page, 0);
    for (int64_t p = page + 1; p < page + count; p++) set_state(r, p, CPAGED_ABSENT);
    r->busy_pages -= count;
    r->resident_pages -= count;
    s->resident_bytes -= count * r->page_size;
    struct uffdio_poison poison = { .range = { .start = r->base + (uint64_t)(page * r->page_size), .len = (uint64_t)r->page_size } };
    ioctl(r->uffd, UFFDIO_POISON, &poison);
    pthread_cond_broadcast(&s->cond);
}

/// Marks the installed pages resident and hands them to the evictor (mutex held).
static void settle(struct cpaged_shared *s, struct cpaged_region *r, int64_t page, int64_t count, int64_t installed) {
    for (int64_t p = page; p < page + count; p++) {
        if (p < page + installed) {
            set_state(r, p, CPAGED_RESIDENT);
            if (r->history[p] < 255) r->history[p]++;
            int c = r->history[p] - 1;
            set_credit(r, p, s->clock_policy ? (c > 3 ? 3 : c) : 0);
            if (s->pending_count < s->pending_capacity) {
                s->pending[s->pending_count++] = entry(r, p);
            } else {
                record(s, r, CPAGED_ERROR_BUFFER, 0, p);
            }
        } else {
            set_state(r, p, CPAGED_ABSENT);
            set_dirty(r, p, 0);
            s->resident_bytes -= r->page_size;
            r->resident_pages--;
        }
    }
    r->busy_pages -= count;
    s->faults++;
    s->pages_filled += installed;
    s->pages_read_ahead += installed > 1 ? installed - 1 : 0;
    s->bytes_read += count * r->page_size;
    pthread_cond_broadcast(&s->cond);
}

/// Fills the absent `page` and its read-ahead window (mutex held on entry and exit).
/// Returns 1 if the access can run again, 0 if the page is poisoned.
static int fill(struct cpaged_shared *s, struct cpaged_region *r, int64_t page, int is_write) {
    int64_t count = reserve_window(s, r, page);
    if (is_write) set_dirty(r, page, 1);
    if (!wait_for_room(s)) {
        fail_fill(s, r, page, count, CPAGED_ERROR_BUFFER, 0);
        return 0;
    }
    int scratch = (r->flags[page] & CPAGED_SCRATCH) != 0;
    int fd = scratch ? r->scratch_fd : r->file_fd;
    pthread_mutex_unlock(&s->mutex);
    uint8_t buffer[CPAGED_SIGNAL_CHUNK] __attribute__((aligned(4096)));
    int e = fd < 0 ? EBADF : read_pages(fd, buffer, page * r->page_size, count * r->page_size);
    int64_t installed = e ? 0 : install(r, page, count, is_write, buffer);
    int install_error = errno;
    pthread_mutex_lock(&s->mutex);
    if (e || installed == 0) {
        fail_fill(s, r, page, count, e ? CPAGED_ERROR_READ : CPAGED_ERROR_KERNEL, e ? e : install_error);
        return 0;
    }
    settle(s, r, page, count, installed);
    return 1;
}

/// A write to a write-protected resident page: dirty, one credit more, writable (mutex held).
static void open_for_writing(struct cpaged_shared *s, struct cpaged_region *r, int64_t page) {
    set_dirty(r, page, 1);
    if (s->clock_policy) set_credit(r, page, credit(r, page) + 1);
    s->write_faults++;
    struct uffdio_writeprotect wp = { .range = { .start = r->base + (uint64_t)(page * r->page_size), .len = (uint64_t)r->page_size }, .mode = 0 };
    while (ioctl(r->uffd, UFFDIO_WRITEPROTECT, &wp) != 0) {
        if (errno == EINTR || errno == EAGAIN) continue;
        record(s, r, CPAGED_ERROR_KERNEL, errno, page);
        break;
    }
}

#ifndef UFFDIO_CONTINUE_MODE_WP
#define UFFDIO_CONTINUE_MODE_WP ((__u64)1 << 1)
#endif
_Static_assert(sizeof(struct uffdio_continue) == 32, "uffdio_continue");

/// A fault on a resident page of a soft-evicting region (mutex held; released and
/// taken again around the ioctl): a touch of a soft-evicted page (a minor fault) maps
/// it again, write-protected unless dirty, with a credit for the re-use; a page that
/// is mapped already (EEXIST) was a first write, or a fault another thread resolved.
/// The page is marked filling meanwhile, so that no evictor or flush takes it while a
/// write may land.
static void resolve_resident_soft(struct cpaged_shared *s, struct cpaged_region *r, int64_t page, int is_write) {
    if (r->flags[page] & CPAGED_SOFT) {
        r->flags[page] &= (uint8_t)~CPAGED_SOFT;
        r->soft_pages--;
        s->soft_pages--;
        s->soft_hits++;
        if (s->clock_policy) set_credit(r, page, credit(r, page) + 1);
        // Back into the main queue (its soft-queue entry is skipped when it comes up).
        if (s->pending_count < s->pending_capacity) s->pending[s->pending_count++] = entry(r, page);
    }
    int first_write = is_write == 1 && !(r->flags[page] & CPAGED_DIRTY);
    if (first_write) set_dirty(r, page, 1);
    struct uffdio_continue c = {
        .range = { .start = r->base + (uint64_t)(page * r->page_size), .len = (uint64_t)r->page_size },
        .mode = (r->flags[page] & CPAGED_DIRTY) ? 0 : UFFDIO_CONTINUE_MODE_WP, .mapped = 0 };
    set_state(r, page, CPAGED_FILLING);
    r->busy_pages++;
    pthread_mutex_unlock(&s->mutex);
    int rc, e;
    do {
        rc = ioctl(r->uffd, UFFDIO_CONTINUE, &c);
        e = rc == 0 ? 0 : errno;
    } while (rc != 0 && (e == EINTR || e == EAGAIN));
    pthread_mutex_lock(&s->mutex);
    set_state(r, page, CPAGED_RESIDENT);
    r->busy_pages--;
    if (rc == 0) {
        if (first_write) s->write_faults++;
    } else if (e == EEXIST && is_write != 0) {
        open_for_writing(s, r, page);
    } else if (e != EEXIST) {
        record(s, r, CPAGED_ERROR_KERNEL, e, page);
    }
    pthread_cond_broadcast(&s->cond);
}

/// Serves a fault at `address` of `r` (mutex held). `is_write`: 1, 0, or -1 when the
/// CPU state does not say. Returns 1 if the access can run again, 0 for a real SIGBUS.
static int resolve(struct cpaged_shared *s, struct cpaged_region *r, uint64_t address, int is_write) {
    int64_t page = (int64_t)(address - r->base) / r->page_size;
    switch (state(r, page)) {
    case CPAGED_ABSENT:
        return fill(s, r, page, is_write == 1);
    case CPAGED_RESIDENT:
        if (r->soft_evicts) { resolve_resident_soft(s, r, page, is_write); return 1; }
        // A first write, or a read that faulted while another thread filled the page.
        if (is_write != 0) open_for_writing(s, r, page);
        return 1;
    case CPAGED_CLEANING:
        // The flush unprotects the page when its write-back is done; the write waits.
        if (is_write != 0) set_dirty(r, page, 1);
        while (state(r, page) == CPAGED_CLEANING && !s->stopping) cpaged_wait(s, 5);
        return 1;
    case CPAGED_FILLING:
    case CPAGED_EVICTING: {
        int was = state(r, page);
        while (state(r, page) == was && !s->stopping) cpaged_wait(s, 5);
        return 1;
    }
    default:
        return 0;
    }
}

/// Whether the faulting access was a write: 1, 0, or -1 when unknown.
static int access_was_write(void *context) {
#if defined(__x86_64__)
    const ucontext_t *uc = context;
    return (uc->uc_mcontext.gregs[REG_ERR] & 2) ? 1 : 0;
#else
    (void)context;
    return -1;
#endif
}

static void on_sigbus(int sig, siginfo_t *info, void *context) {
    int saved = errno;
    if (info->si_code == BUS_ADRERR) {
        uint64_t address = (uint64_t)(uintptr_t)info->si_addr;
        for (int i = 0; i < SLOTS; i++) {
            __atomic_add_fetch(&active[i], 1, __ATOMIC_SEQ_CST);
            struct cpaged_shared *s = __atomic_load_n(&slots[i], __ATOMIC_SEQ_CST);
            if (!s) { __atomic_sub_fetch(&active[i], 1, __ATOMIC_SEQ_CST); continue; }
            pthread_mutex_lock(&s->mutex);
            struct cpaged_region *r = find(s, address);
            int again = r ? resolve(s, r, address, access_was_write(context)) : -1;
            pthread_mutex_unlock(&s->mutex);
            __atomic_sub_fetch(&active[i], 1, __ATOMIC_SEQ_CST);
            if (again < 0) continue;
            errno = saved;
            if (!again) cuffd_sigbus_chain(&previous_action, sig, info, context);
            return;
        }
    }
    errno = saved;
    cuffd_sigbus_chain(&previous_action, sig, info, context);
}

int cpaged_resolver_publish(struct cpaged_shared *shared) {
    cuffd_sigbus_install_once(&handler_installed, on_sigbus, &previous_action);
    for (int i = 0; i < SLOTS; i++) {
        struct cpaged_shared *expected = NULL;
        if (__atomic_compare_exchange_n(&slots[i], &expected, shared, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) return i;
    }
    return -1;
}

void cpaged_resolver_withdraw(int slot) {
    if (slot < 0 || slot >= SLOTS) return;
    __atomic_store_n(&slots[slot], NULL, __ATOMIC_SEQ_CST);
    struct timespec pause = { .tv_sec = 0, .tv_nsec = 20 * 1000 };
    while (__atomic_load_n(&active[slot], __ATOMIC_SEQ_CST) != 0) nanosleep(&pause, NULL);
}

#endif
