// The classic userland paging scheme without userfaultfd: map the region
// PROT_NONE, and in a SIGSEGV handler mprotect the faulting page and copy its
// contents in. Every resolved page that is not next to another one costs a VMA,
// so random access over a large region runs into `vm.max_map_count`.
#include "_CBenchReference.h"

#ifdef __linux__

#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>

static atomic_int run_in_progress;

// State of the one run in progress, read by the signal handler.
static uint8_t *run_region;
static size_t run_region_length;
static const uint8_t *run_source;
static size_t run_source_pages;
static size_t run_page_size;
static volatile int run_error;
static sigjmp_buf run_escape;
static struct sigaction previous_action;

static void on_sigsegv(int signal, siginfo_t *info, void *context) {
    uint8_t *address = info->si_addr;
    if (address < run_region || (size_t)(address - run_region) >= run_region_length) {
        // Not ours: give the fault back to whoever handled it before.
        sigaction(SIGSEGV, &previous_action, NULL);
        return;
    }
    size_t page = (size_t)(address - run_region) / run_page_size;
    uint8_t *page_start = run_region + page * run_page_size;
    if (mprotect(page_start, run_page_size, PROT_READ | PROT_WRITE) != 0) {
        run_error = errno;
        siglongjmp(run_escape, 1);
    }
    memcpy(page_start, run_source + (page % run_source_pages) * run_page_size, run_page_size);
    (void)signal;
    (void)context;
}

int cbench_sigsegv_run(void *region, size_t region_length, const void *source,
                       size_t source_pages, const uint64_t *pages, size_t count,
                       size_t page_size, struct cbench_sigsegv_result *result) {
    int expected = 0;
    if (!atomic_compare_exchange_strong(&run_in_progress, &expected, 1)) return EBUSY;
    run_region = region;
    run_region_length = region_length;
    run_source = source;
    run_source_pages = source_pages;
    run_page_size = page_size;
    run_error = 0;

    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_sigaction = on_sigsegv;
    action.sa_flags = SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGSEGV, &action, &previous_action) != 0) {
        int error = errno;
        atomic_store(&run_in_progress, 0);
        return error;
    }

    const volatile uint8_t *bytes = (const volatile uint8_t *)region;
    // volatile: modified between sigsetjmp and siglongjmp.
    volatile size_t done = 0;
    volatile uint64_t sum = 0;
    uint64_t start = cbench_now_ns();
    if (sigsetjmp(run_escape, 1) == 0) {
        for (size_t i = 0; i < count; i++) {
            sum += bytes[pages[i] * page_size];
            done = i + 1;
        }
    }
    uint64_t elapsed = cbench_now_ns() - start;

    sigaction(SIGSEGV, &previous_action, NULL);
    result->elapsed_ns = elapsed;
    result->pages_done = done;
    result->error = run_error;
    (void)sum;
    atomic_store(&run_in_progress, 0);
    return 0;
}

#endif // __linux__
