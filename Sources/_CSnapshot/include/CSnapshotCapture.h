// A capture's copy before write, shared by the image writer (Swift), the fault
// handler thread and, with FEATURE_SIGBUS, a SIGBUS handler in the writing threads.
// Everything here is async-signal-safe: atomics, ioctl, memcpy, nanosleep.
#ifndef C_SNAPSHOT_CAPTURE_H
#define C_SNAPSHOT_CAPTURE_H

#ifdef __linux__

#include <stddef.h>
#include <stdint.h>

/// Page states (one byte per page, changed with atomic compare-and-swap).
enum {
    /// Not yet saved: still write-protected.
    CSNAP_PENDING = 0,
    /// Claimed by the image writer, which clears protection once the page is written.
    CSNAP_STREAMING = 1,
    /// Copied into the staging ring (protection cleared by whoever copied it).
    CSNAP_SAVED = 2,
    /// Written to the image, protection cleared (or, when tracking, left set).
    CSNAP_DONE = 3,
    /// Claimed by a resolver and not yet copied: nobody else may clear its protection.
    CSNAP_SAVING = 4,
};

/// The most pages a resolver saves around one faulting page.
#define CSNAP_MAX_FAULT_CHUNK 512

/// One region of a capture.
struct csnap_region {
    uint64_t start;
    uint64_t length;
    int64_t first_page;
};

/// A capture's shared state. The fields up to `capacity` are set before the arm and
/// not changed while the capture runs; the rest are read and written atomically.
struct csnap_capture {
    int uffd;
    /// Whether written pages stay protected and are noted in `next_dirty` (deltas).
    int tracking;
    uint64_t page_size;
    int64_t fault_chunk_pages;
    int64_t region_count;
    const struct csnap_region *regions;
    uint8_t *state;
    uint8_t *next_dirty;
    /// The staging ring: `capacity` page slots, and the global page each holds
    /// (-1 while the slot is free or its copy is not finished).
    uint8_t *slots;
    int64_t *slot_pages;
    int64_t capacity;

    /// Ring positions (monotonic): reserved by resolvers, consumed by the image writer.
    int64_t reserved;
    int64_t consumed;
    /// Resolvers between their first claim and their last publication.
    int64_t resolvers;
    int64_t faults;
    int64_t saved_pages;
    int64_t staging_waits;
    int64_t peak_staged;
    int cancelled;
    /// The errno of a failed UFFDIO_WRITEPROTECT in a resolver (0: none).
    int failure_errno;
};

/// Resolves a write-protect fault at `address`: saves the page (and the pending pages
/// of its chunk) into the staging ring, then clears their protection. With
/// `in_writing_thread` (the SIGBUS handler) the call returns only once the faulting
/// page is writable or the capture is cancelled; otherwise the writer is held in the
/// kernel and woken by whoever clears the protection.
/// Returns 1 if the address lies in the capture's regions, 0 if not.
int csnap_resolve(struct csnap_capture *c, uint64_t address, int in_writing_thread);

/// Clears write protection on [start, start + length) and wakes the writers held there.
/// Returns 0 or an errno value.
int csnap_unprotect(int uffd, uint64_t start, uint64_t length);

/// Atomically moves page `page` from state `from` to `to`; returns whether it did.
int csnap_claim(struct csnap_capture *c, int64_t page, uint8_t from, uint8_t to);
uint8_t csnap_state(const struct csnap_capture *c, int64_t page);
void csnap_set_state(struct csnap_capture *c, int64_t page, uint8_t state);

/// The page held by ring position `position`, or -1 if it is not ready.
int64_t csnap_slot_page(const struct csnap_capture *c, int64_t position);
/// Frees ring positions [consumed, to) (their bytes are in the file).
void csnap_release_slots(struct csnap_capture *c, int64_t to);

int64_t csnap_load(const int64_t *value);
void csnap_store(int64_t *value, int64_t new_value);
int csnap_load_int(const int *value);
void csnap_store_int(int *value, int new_value);

/// Serves write-protect SIGBUS signals for the writing threads of a snapshotter whose
/// userfaultfd has FEATURE_SIGBUS: `regions` (at most 64, copied) of `page_size` pages
/// on `uffd`. Installs the handler the first time. Returns a slot, or -1 if every
/// slot is taken or there are too many regions.
int csnap_sigbus_attach(int uffd, uint64_t page_size, const struct csnap_region *regions, int64_t count);
/// Points the slot at a running capture, or at none (NULL). When it is NULL, a
/// SIGBUS in the regions clears the page's protection. Returns once no writing thread
/// still uses the capture set before.
void csnap_sigbus_set_capture(int slot, struct csnap_capture *capture);
/// Frees the slot; returns once no writing thread still uses it.
void csnap_sigbus_detach(int slot);

#endif // __linux__
#endif // C_SNAPSHOT_CAPTURE_H
