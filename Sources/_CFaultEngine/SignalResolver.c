// The async-signal-safe SIGBUS resolver. With UFFD_FEATURE_SIGBUS, a fault on a
// registered page that is missing raises SIGBUS (BUS_ADRERR) in the faulting thread
// instead of queueing a message; this handler installs the page right there with
// UFFDIO_COPY and returns, and the faulting instruction runs again.
//
// Only async-signal-safe calls: ioctl, pread, write, syscall(futex), sigaction.
// No allocation, no locks: tables are published whole through atomic pointers.
#include "_CFaultEngine.h"
#include "CUserfaultfd.h"
#include "CUserfaultfdSignal.h"

#ifdef __linux__
#include <errno.h>
#include <linux/futex.h>
#include <linux/userfaultfd.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define CFE_SLOTS 64
/// The largest chunk read from a file on the faulting thread's stack.
#define CFE_STACK_CHUNK (64 * 1024)

static struct cfe_table *slots[CFE_SLOTS];
static int slot_taken[CFE_SLOTS];
/// Faulting threads inside the resolver for each slot: counted from before they read
/// the slot's table until they are done with it (and with its uffd number).
static int slot_active[CFE_SLOTS];
/// Set while the slot's server stops: threads waiting for its handler give up.
static int slot_closing[CFE_SLOTS];

/// Ranges of stopped servers. A SIGBUS the kernel raised while their uffd was still
/// open can reach its thread after the server has left: such an access only needs
/// to run again (the kernel serves the range now). Each entry allows a bounded number
/// of retries, so an address that faults for another reason still gets its SIGBUS.
#define CFE_RETIRED 256
#define CFE_RETIRED_RETRIES 1024
struct cfe_retired {
    uint64_t start;
    uint64_t length;
    int retries_left;
};
static struct cfe_retired retired[CFE_RETIRED];
static unsigned retired_next;
static struct sigaction previous_action;
static int handler_installed;

struct cfe_table *cfe_table_allocate(size_t count) {
    size_t size = sizeof(struct cfe_table) + count * sizeof(struct cfe_region);
    struct cfe_table *t = calloc(1, size);
    if (t) t->count = count;
    return t;
}

void cfe_table_free(struct cfe_table *table) { free(table); }

int cfe_resolver_claim_slot(void) {
    for (int i = 0; i < CFE_SLOTS; i++) {
        int expected = 0;
        if (__atomic_compare_exchange_n(&slot_taken[i], &expected, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) return i;
    }
    return -1;
}

void cfe_resolver_release_slot(int slot) {
    if (slot < 0 || slot >= CFE_SLOTS) return;
    __atomic_store_n(&slot_closing[slot], 0, __ATOMIC_RELEASE);
    __atomic_store_n(&slot_taken[slot], 0, __ATOMIC_RELEASE);
}

void cfe_resolver_begin_closing(int slot) {
    if (slot >= 0 && slot < CFE_SLOTS) __atomic_store_n(&slot_closing[slot], 1, __ATOMIC_SEQ_CST);
}

void cfe_resolver_retire(int slot) {
    if (slot < 0 || slot >= CFE_SLOTS) return;
    struct cfe_table *t = __atomic_load_n(&slots[slot], __ATOMIC_SEQ_CST);
    if (!t) return;
    for (size_t k = 0; k < t->count; k++) {
        struct cfe_retired *e = &retired[__atomic_fetch_add(&retired_next, 1, __ATOMIC_RELAXED) % CFE_RETIRED];
        __atomic_store_n(&e->length, 0, __ATOMIC_SEQ_CST);
        __atomic_store_n(&e->start, t->regions[k].start, __ATOMIC_SEQ_CST);
        __atomic_store_n(&e->retries_left, CFE_RETIRED_RETRIES, __ATOMIC_SEQ_CST);
        __atomic_store_n(&e->length, t->regions[k].length, __ATOMIC_SEQ_CST);
    }
}

/// Whether `address` lies in a retired range that may still be retried (and uses one retry).
static int retry_retired(uint64_t address) {
    for (int i = 0; i < CFE_RETIRED; i++) {
        struct cfe_retired *e = &retired[i];
        uint64_t length = __atomic_load_n(&e->length, __ATOMIC_SEQ_CST);
        uint64_t start = __atomic_load_n(&e->start, __ATOMIC_SEQ_CST);
        if (length == 0 || address < start || address - start >= length) continue;
        if (__atomic_sub_fetch(&e->retries_left, 1, __ATOMIC_SEQ_CST) >= 0) return 1;
    }
    return 0;
}

void cfe_resolver_quiesce(int slot) {
    if (slot < 0 || slot >= CFE_SLOTS) return;
    struct timespec pause = { .tv_sec = 0, .tv_nsec = 20 * 1000 };
    while (__atomic_load_n(&slot_active[slot], __ATOMIC_SEQ_CST) != 0) nanosleep(&pause, NULL);
}

void cfe_generation_bump(uint32_t *generation) {
    __atomic_fetch_add(generation, 1, __ATOMIC_ACQ_REL);
    syscall(SYS_futex, generation, FUTEX_WAKE, 0x7fffffff, NULL, NULL, 0);
}

/// Installs `len` bytes at `dst` with UFFDIO_COPY from `src`, or with UFFDIO_ZEROPAGE
/// when `src` is NULL, marking what was installed (or already there) resident.
/// Returns 0 or the errno that stopped it.
static int install_run(int uffd, uint64_t dst, const void *src, uint64_t len, const struct cfe_region *r,
                       uint64_t first_page, uint64_t page_size, uint64_t fault_page, int *fault_done) {
    uint64_t off = 0;
    while (off < len) {
        long rc;
        int64_t field;
        if (src) {
            struct uffdio_copy c = { .dst = dst + off, .src = (uint64_t)(uintptr_t)src + off, .len = len - off, .mode = 0, .copy = 0 };
            rc = ioctl(uffd, UFFDIO_COPY, &c);
            field = c.copy;
        } else {
            struct uffdio_zeropage z = { .range = { .start = dst + off, .len = len - off }, .mode = 0, .zeropage = 0 };
            rc = ioctl(uffd, UFFDIO_ZEROPAGE, &z);
            field = z.zeropage;
        }
        int64_t done = rc == 0 ? (int64_t)(len - off) : field;
        if (done > 0) {
            uint64_t p = first_page + off / page_size;
            uint64_t n = (uint64_t)done / page_size;
            cfe_bits_set(r->resident, r->first_bit + p, n);
            if (fault_page >= p && fault_page < p + n) *fault_done = 1;
            off += (uint64_t)done;
            continue;
        }
        int e = rc == 0 ? 0 : errno;
        if (e == EINTR) continue;
        if (e == EEXIST || done == -EEXIST) {
            uint64_t p = first_page + off / page_size;
            cfe_bits_set(r->resident, r->first_bit + p, 1);
            if (p == fault_page) *fault_done = 1;
            off += page_size;
            continue;
        }
        return e ? e : (int)-done;
    }
    return 0;
}

/// Poisons the faulting page so every thread touching it gets SIGBUS, and marks it.
static void poison_page(const struct cfe_table *t, const struct cfe_region *r, uint64_t page) {
    struct uffdio_poison p = { .range = { .start = r->start + page * t->page_size, .len = t->page_size }, .mode = 0, .updated = 0 };
    if (ioctl(t->uffd, UFFDIO_POISON, &p) == 0 && t->poisoned) __atomic_fetch_add(t->poisoned, 1, __ATOMIC_RELAXED);
    cfe_bits_set(r->poisoned, r->first_bit + page, 1);
    cfe_bits_set(r->resident, r->first_bit + page, 1);
}

/// Asks the handler thread for the page and waits until it is installed (or poisoned).
static void ask_handler(int slot, const struct cfe_table *t, const struct cfe_region *r, uint64_t page, uint64_t address) {
    for (;;) {
        if (__atomic_load_n(&slot_closing[slot], __ATOMIC_SEQ_CST)) return;
        uint32_t seen = __atomic_load_n(t->generation, __ATOMIC_ACQUIRE);
        if (cfe_bit_test(r->resident, r->first_bit + page)) return;
        ssize_t n = write(t->request_fd, &address, sizeof(address));
        if (n < 0 && errno != EINTR && errno != EAGAIN) return;
        struct timespec timeout = { .tv_sec = 0, .tv_nsec = 20 * 1000 * 1000 };
        if (!cfe_bit_test(r->resident, r->first_bit + page)) {
            syscall(SYS_futex, t->generation, FUTEX_WAIT, seen, &timeout, NULL, 0);
        }
        if (cfe_bit_test(r->resident, r->first_bit + page)) return;
    }
}

/// Reads `len` bytes of the file backing at source offset `src_off` into `buffer`.
/// The end of the file may fall inside the last page: the rest of that page is
/// zeros. Returns 0 or the errno that stopped it (EIO for a file cut shorter).
static int read_file_run(const struct cfe_table *t, uint8_t *buffer, uint64_t src_off, uint64_t len) {
    uint64_t done = 0;
    while (done < len) {
        ssize_t n = pread(t->file_fd, buffer + done, len - done, (off_t)(t->file_offset + src_off + done));
        if (n > 0) { done += (uint64_t)n; continue; }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return errno;
        // End of file: the tail of its last page reads as zeros, anything further is lost.
        uint64_t tail_end = (t->file_length + t->page_size - 1) / t->page_size * t->page_size;
        if (src_off + done < t->file_length || src_off + len > tail_end) return EIO;
        memset(buffer + done, 0, len - done);
        return 0;
    }
    return 0;
}

/// Installs pages `i ..< j` of `r` (all zeroed after a REMOVE, or all from the
/// backing). Returns 0 or the errno that stopped it.
static int install_pages(const struct cfe_table *t, const struct cfe_region *r, uint64_t i, uint64_t j, int zero,
                         uint64_t page, int *fault_done) {
    uint64_t ps = t->page_size;
    uint64_t dst = r->start + i * ps;
    uint64_t len = (j - i) * ps;
    uint64_t src_off = r->source_offset + i * ps;
    if (zero) return install_run(t->uffd, dst, NULL, len, r, i, ps, page, fault_done);
    if (t->backing_kind == CFE_BACKING_MEMORY) {
        // memory_length counts whole pages: the tail of the last one is readable zeros.
        if (src_off + len > t->memory_length) return EFAULT;
        return install_run(t->uffd, dst, t->memory + src_off, len, r, i, ps, page, fault_done);
    }
    // Read and install in pieces that fit a buffer on the faulting thread's stack.
    uint8_t buffer[CFE_STACK_CHUNK] __attribute__((aligned(4096)));
    uint64_t piece = CFE_STACK_CHUNK / ps * ps;
    if (piece == 0) return EINVAL;
    for (uint64_t off = 0; off < len; off += piece) {
        uint64_t n = len - off < piece ? len - off : piece;
        int rc = read_file_run(t, buffer, src_off + off, n);
        if (rc == 0) rc = install_run(t->uffd, dst + off, buffer, n, r, i + off / ps, ps, page, fault_done);
        if (rc != 0) return rc;
    }
    return 0;
}

/// Where the calling thread's last in-thread resolution ended, and its window in
/// pages. Initial-exec TLS: reading it takes no lock and calls nothing, so it is
/// safe in a signal handler.
static __thread uint64_t thread_last_end __attribute__((tls_model("initial-exec")));
static __thread uint64_t thread_window __attribute__((tls_model("initial-exec")));

/// The pages to install for a fault on `page` of `r`: the aligned chunk around it, or,
/// while this thread faults where its last resolution ended, a window growing forward
/// from the fault (doubling up to `max_chunk_pages`). A fault elsewhere starts over.
static void chunk_around(const struct cfe_table *t, const struct cfe_region *r, uint64_t page,
                         uint64_t *first, uint64_t *end) {
    uint64_t ps = t->page_size;
    uint64_t pages = r->length / ps;
    uint64_t chunk = t->chunk_pages ? t->chunk_pages : 1;
    uint64_t max = t->max_chunk_pages > chunk ? t->max_chunk_pages : chunk;
    uint64_t address = r->start + page * ps;
    if (max > chunk && address == thread_last_end) {
        uint64_t window = thread_window * 2;
        if (window < chunk) window = chunk;
        if (window > max) window = max;
        thread_window = window;
        *first = page;
        *end = page + window;
    } else {
        thread_window = chunk;
        *first = page / chunk * chunk;
        *end = *first + chunk;
    }
    if (*end > pages) *end = pages;
    thread_last_end = r->start + *end * ps;
}

/// Resolves a fault at `address` in `r` of `t`. Returns 1 if the access can run
/// again, 0 if the page is poisoned (the SIGBUS is then a real one).
static int resolve(int slot, const struct cfe_table *t, const struct cfe_region *r, uint64_t address) {
    uint64_t ps = t->page_size;
    uint64_t page = (address - r->start) / ps;
    if (cfe_bit_test(r->poisoned, r->first_bit + page)) return 0;
    if (t->record && !cfe_bit_test(r->resident, r->first_bit + page)) {
        cfe_record_append(t->record, t->record_capacity, r->source_offset + page * ps);
    }
    if (t->backing_kind == CFE_BACKING_HANDLER) {
        ask_handler(slot, t, r, page, r->start + page * ps);
        return !cfe_bit_test(r->poisoned, r->first_bit + page);
    }
    uint64_t first, end;
    chunk_around(t, r, page, &first, &end);
    int fault_done = 0;
    uint64_t i = first;
    while (i < end) {
        if (i != page && cfe_bit_test(r->resident, r->first_bit + i)) { i++; continue; }
        int zero = cfe_bit_test(r->zeroed, r->first_bit + i);
        uint64_t j = i + 1;
        while (j < end && (j == page || !cfe_bit_test(r->resident, r->first_bit + j))
               && cfe_bit_test(r->zeroed, r->first_bit + j) == zero) j++;
        int rc = install_pages(t, r, i, j, zero, page, &fault_done);
        if (rc == EBADF || rc == ENOTTY) {
            // The server closed the uffd while this ran (its number may now name
            // /dev/null until the resolver is withdrawn): the kernel serves the range now.
            return 1;
        }
        if (rc == EAGAIN) {
            // A layout event is pending; the handler thread reads it. Let the access
            // fault again (and land here again) once it has.
            syscall(SYS_sched_yield);
            return 1;
        }
        if (rc != 0) {
            if (i <= page && page < j && !fault_done) {
                poison_page(t, r, page);
                return 0;
            }
            return 1;
        }
        i = j;
    }
    if (t->resolved) __atomic_fetch_add(t->resolved, 1, __ATOMIC_RELAXED);
    return 1;
}

static void on_sigbus(int sig, siginfo_t *info, void *context) {
    int saved = errno;
    if (info->si_code == BUS_ADRERR) {
        uint64_t address = (uint64_t)(uintptr_t)info->si_addr;
        for (int s = 0; s < CFE_SLOTS; s++) {
            // Counted before the table is read, so that a stopping server waits for
            // this thread before it frees the table or lets the uffd go.
            __atomic_add_fetch(&slot_active[s], 1, __ATOMIC_SEQ_CST);
            struct cfe_table *t = __atomic_load_n(&slots[s], __ATOMIC_SEQ_CST);
            const struct cfe_region *hit = NULL;
            if (t) {
                for (size_t k = 0; k < t->count; k++) {
                    const struct cfe_region *r = &t->regions[k];
                    if (address >= r->start && address - r->start < r->length) {
                        hit = r;
                        break;
                    }
                }
            }
            if (!hit) {
                __atomic_sub_fetch(&slot_active[s], 1, __ATOMIC_SEQ_CST);
                continue;
            }
            int again = resolve(s, t, hit, address & ~(t->page_size - 1));
            __atomic_sub_fetch(&slot_active[s], 1, __ATOMIC_SEQ_CST);
            errno = saved;
            if (!again) cuffd_sigbus_chain(&previous_action, sig, info, context);
            return;
        }
        if (retry_retired(address)) {
            errno = saved;
            return;
        }
    }
    errno = saved;
    cuffd_sigbus_chain(&previous_action, sig, info, context);
}

struct cfe_table *cfe_resolver_publish(int slot, struct cfe_table *table) {
    if (slot < 0 || slot >= CFE_SLOTS) return NULL;
    if (table) cuffd_sigbus_install_once(&handler_installed, on_sigbus, &previous_action);
    return __atomic_exchange_n(&slots[slot], table, __ATOMIC_ACQ_REL);
}

#endif
