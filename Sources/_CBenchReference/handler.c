// The reference userfaultfd handler thread: the plainest fast design in C (poll
// the uffd and a stop eventfd, read a batch of messages, one UFFDIO_COPY per
// fault). The engine's `.handler4k` / `.handler64k` configurations are measured
// against it.
#include "_CBenchReference.h"

#ifdef __linux__

#include <CUserfaultfd.h>
#include <poll.h>
#include <stdlib.h>

enum { batch_capacity = 64 };

struct cbench_handler {
    int uffd;
    int stop_fd;
    uint64_t region;
    uint64_t region_length;
    const uint8_t *source;
    uint64_t source_length;
    uint64_t chunk;
    pthread_t thread;
    struct cbench_handler_stats stats;
    struct uffd_msg messages[batch_capacity];
};

static void note_error(struct cbench_handler *h, int error) {
    h->stats.errors++;
    h->stats.last_error = error;
}

/// Installs the chunk holding `address`. Returns 0, or -1 if the uffd is gone.
static int resolve(struct cbench_handler *h, uint64_t address) {
    if (address < h->region || address - h->region >= h->region_length) {
        note_error(h, EFAULT);
        return 0;
    }
    uint64_t offset = (address - h->region) / h->chunk * h->chunk;
    uint64_t length = h->region_length - offset < h->chunk ? h->region_length - offset : h->chunk;
    struct uffdio_copy copy = {
        .dst = h->region + offset,
        .src = (uint64_t)(uintptr_t)(h->source + offset % h->source_length),
        .len = length,
        .mode = 0,
    };
    for (;;) {
        copy.copy = 0;
        if (cuffd_copy(h->uffd, &copy) == 0) {
            h->stats.copies++;
            return 0;
        }
        if (copy.copy > 0) {
            // Partial: the kernel installed and woke a prefix; retry the rest.
            copy.dst += (uint64_t)copy.copy;
            copy.src += (uint64_t)copy.copy;
            copy.len -= (uint64_t)copy.copy;
            continue;
        }
        switch (errno) {
        case EINTR:
        case EAGAIN:
            // EAGAIN: a layout event is pending; the bench has none, retry.
            continue;
        case EEXIST: {
            // Another copy won; the faulting thread still waits for a wake.
            struct uffdio_range range = { .start = address & ~(uint64_t)4095, .len = 4096 };
            h->stats.already_present++;
            if (cuffd_wake(h->uffd, &range) != 0) note_error(h, errno);
            return 0;
        }
        case ESRCH:
        case ENOSPC:
            note_error(h, errno);
            return -1;
        default:
            note_error(h, errno);
            return 0;
        }
    }
}

static void *handler_main(void *argument) {
    struct cbench_handler *h = argument;
    cuffd_set_thread_name("cbench-handler");
    struct pollfd fds[2] = {
        { .fd = h->uffd, .events = POLLIN },
        { .fd = h->stop_fd, .events = POLLIN },
    };
    for (;;) {
        fds[0].revents = fds[1].revents = 0;
        int ready = poll(fds, 2, -1);
        if (ready < 0) {
            if (errno == EINTR) continue;
            note_error(h, errno);
            return NULL;
        }
        if (fds[1].revents) return NULL;
        if (fds[0].revents & (POLLERR | POLLHUP)) return NULL;
        ssize_t n = read(h->uffd, h->messages, sizeof(h->messages));
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) continue;
            note_error(h, errno);
            return NULL;
        }
        size_t count = (size_t)n / sizeof(struct uffd_msg);
        for (size_t i = 0; i < count; i++) {
            if (h->messages[i].event != UFFD_EVENT_PAGEFAULT) continue;
            h->stats.faults++;
            if (resolve(h, h->messages[i].arg.pagefault.address) != 0) return NULL;
        }
    }
}

int cbench_handler_start(int uffd, uint64_t region, uint64_t region_length,
                         const void *source, uint64_t source_length, uint64_t chunk,
                         struct cbench_handler **out) {
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    if (chunk == 0 || chunk % page || source_length == 0 || source_length % chunk
        || region % page || region_length == 0 || region_length % page) {
        return EINVAL;
    }
    struct cbench_handler *h = calloc(1, sizeof(*h));
    if (!h) return ENOMEM;
    h->uffd = uffd;
    h->region = region;
    h->region_length = region_length;
    h->source = source;
    h->source_length = source_length;
    h->chunk = chunk;
    h->stop_fd = cuffd_eventfd_nonblocking(0);
    if (h->stop_fd < 0) {
        int error = errno;
        free(h);
        return error;
    }
    int error = pthread_create(&h->thread, NULL, handler_main, h);
    if (error) {
        close(h->stop_fd);
        free(h);
        return error;
    }
    *out = h;
    return 0;
}

void cbench_handler_stop(struct cbench_handler *h, struct cbench_handler_stats *stats) {
    uint64_t one = 1;
    while (write(h->stop_fd, &one, sizeof(one)) < 0 && errno == EINTR) {}
    pthread_join(h->thread, NULL);
    close(h->stop_fd);
    if (stats) *stats = h->stats;
    free(h);
}

#endif // __linux__
