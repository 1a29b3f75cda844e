#ifndef C_PAGED_MEMORY_H
#define C_PAGED_MEMORY_H
#ifdef __linux__
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <fcntl.h>

/* Linux values (x86_64 and aarch64 differ for O_DIRECT) where the headers hide them. */
#ifndef O_DIRECT
#if defined(__aarch64__)
#define O_DIRECT 0200000
#else
#define O_DIRECT 040000
#endif
#endif
#ifndef O_TMPFILE
#define O_TMPFILE (020000000 | O_DIRECTORY)
#endif

/* Open flags Swift's Glibc module does not import (they need _GNU_SOURCE). */
static const int cpaged_O_DIRECT = O_DIRECT;
static const int cpaged_O_TMPFILE = O_TMPFILE;

/* memfd_create and fallocate's hole punching, which also need _GNU_SOURCE. */
#include <sys/mman.h>
#include <linux/falloc.h>
#include <stdint.h>
static inline int cpaged_memfd_create(const char *name) { return memfd_create(name, MFD_CLOEXEC); }
static inline int cpaged_punch_hole(int fd, int64_t offset, int64_t length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
}


#include <pthread.h>
#include <stdint.h>
#include <stddef.h>

/* ---- State shared by the pager (Swift) and the in-thread SIGBUS resolver (C). ----
 * Every field below is guarded by `mutex` of the owning cpaged_shared; the resolver
 * takes it too. That is safe because SIGBUS from a pager mapping is synchronous: it
 * is raised by the thread's own access to mapped memory, and no thread touches
 * mapped memory while it holds the pager's lock (the pager's rule since its start).
 */

/* Page states and flag bits: the same as PageTable's (PageTable.swift). */
#define CPAGED_ABSENT 0
#define CPAGED_FILLING 1
#define CPAGED_RESIDENT 2
#define CPAGED_EVICTING 3
#define CPAGED_CLEANING 4
#define CPAGED_POISONED 5
#define CPAGED_STATE_MASK 0x07
#define CPAGED_DIRTY 0x08
#define CPAGED_SCRATCH 0x10
#define CPAGED_CREDIT_SHIFT 5
/* Soft-evicted: unmapped, the page kept in the mapping's memfd (PagerConfiguration.softEviction). */
#define CPAGED_SOFT 0x80

/* Error kinds recorded by the resolver (PagedMappingError.Kind). */
#define CPAGED_ERROR_READ 1
#define CPAGED_ERROR_BUFFER 2
#define CPAGED_ERROR_KERNEL 3
#define CPAGED_REGION_ERRORS 16

/* The largest window the resolver reads on the faulting thread's stack. */
#define CPAGED_SIGNAL_CHUNK (64 * 1024)

struct cpaged_error {
    int32_t kind;
    int32_t error_number;
    int64_t offset;
};

/* One mapping's bookkeeping. */
struct cpaged_region {
    uint64_t base;
    uint64_t length;
    int64_t page_size;
    int64_t page_count;
    uint8_t *flags;
    uint8_t *history;
    uint32_t slot;
    uint32_t generation;
    /* Resolved in the faulting thread: its uffd, the store's file and size. */
    int32_t uffd;
    int32_t file_fd;
    int64_t file_size;
    /* Private mappings: the scratch file of evicted dirty pages (-1 until created). */
    int32_t scratch_fd;
    int32_t in_thread;
    int64_t resident_pages;
    int64_t busy_pages;
    int64_t last_fault_page;
    int64_t read_ahead_window;
    /* Pages soft-evicted now; 1 if the region's pages live in a memfd and are soft-evicted. */
    int64_t soft_pages;
    int32_t soft_evicts;
    int32_t reserved;
    /* Errors the resolver saw, for the pager to move into the mapping's list. */
    int32_t error_count;
    int32_t errors_dropped;
    struct cpaged_error errors[CPAGED_REGION_ERRORS];
};

/* One pager's lock, budget, counters and the regions resolved in the faulting thread. */
struct cpaged_shared {
    pthread_mutex_t mutex;
    pthread_cond_t cond;
    int64_t resident_bytes;
    int64_t capacity_bytes;
    int64_t peak_resident_bytes;
    int64_t space_wait_ms;
    int64_t max_read_ahead_pages;
    int64_t max_read_ahead_bytes;
    int32_t clock_policy;
    int32_t stopping;
    /* Counters of what the resolver did. */
    int64_t faults;
    int64_t write_faults;
    int64_t pages_filled;
    int64_t pages_read_ahead;
    int64_t bytes_read;
    int64_t errors;
    int64_t space_waits;
    int64_t soft_hits;
    /* Pages soft-evicted now, over all regions. */
    int64_t soft_pages;
    /* In-thread regions sorted by base. */
    struct cpaged_region **regions;
    int64_t region_count;
    int64_t region_capacity;
    /* Victim-queue entries of pages the resolver filled, for the evictor to queue. */
    uint64_t *pending;
    int64_t pending_count;
    int64_t pending_capacity;
};

/* Creates the lock (monotonic condition clock) and the pending list; NULL on failure. */
struct cpaged_shared *cpaged_shared_create(int64_t pending_capacity);
void cpaged_shared_destroy(struct cpaged_shared *shared);
/* Waits on the condition for at most `milliseconds` (mutex held). */
void cpaged_wait(struct cpaged_shared *shared, int64_t milliseconds);
/* Adds or removes an in-thread region (mutex held). Returns 0, or -1 when out of memory. */
int cpaged_insert_region(struct cpaged_shared *shared, struct cpaged_region *region);
void cpaged_remove_region(struct cpaged_shared *shared, struct cpaged_region *region);

/* Publishes `shared` to the SIGBUS resolver (installing the handler once).
 * Returns its slot, or -1 when every slot is taken. */
int cpaged_resolver_publish(struct cpaged_shared *shared);
/* Withdraws the slot and waits until no faulting thread is inside the resolver for it. */
void cpaged_resolver_withdraw(int slot);

#endif
#endif
