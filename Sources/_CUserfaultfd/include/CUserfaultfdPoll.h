// poll() over a userfaultfd and a stop descriptor without Swift-side pollfd values:
// the first use of a C struct's type metadata allocates in Swift, and a waiter must
// not allocate (a fork with EVENT_FORK holds the allocator's locks until it is read).
#ifndef C_USERFAULTFD_POLL_H
#define C_USERFAULTFD_POLL_H

#ifdef __linux__

#include <errno.h>
#include <poll.h>

/// `poll` on `uffd` and, if `stopfd >= 0`, on `stopfd`, both for `POLLIN`.
/// Returns poll's result and stores each descriptor's `revents`.
static inline int cuffd_poll_pair(int uffd, int stopfd, int timeout, short *uffdEvents, short *stopEvents) {
    struct pollfd fds[2] = { { .fd = uffd, .events = POLLIN }, { .fd = stopfd, .events = POLLIN } };
    int n = poll(fds, stopfd >= 0 ? 2 : 1, timeout);
    *uffdEvents = fds[0].revents;
    *stopEvents = stopfd >= 0 ? fds[1].revents : 0;
    return n;
}

/// The most extra descriptors `cuffd_poll_set` watches.
#define CUFFD_POLL_SET_MAX 64

/// `poll` for `POLLIN` on `uffd`, on `stopfd` if `>= 0`, and on the `count` descriptors
/// of `others` (at most `CUFFD_POLL_SET_MAX`, else -1 with `EINVAL`). Returns poll's
/// result and stores the `revents` of each descriptor.
static inline int cuffd_poll_set(int uffd, int stopfd, const int *others, int count, int timeout,
                                 short *uffdEvents, short *stopEvents, short *otherEvents) {
    if (count < 0 || count > CUFFD_POLL_SET_MAX) {
        errno = EINVAL;
        return -1;
    }
    struct pollfd fds[CUFFD_POLL_SET_MAX + 2];
    fds[0] = (struct pollfd){ .fd = uffd, .events = POLLIN };
    fds[1] = (struct pollfd){ .fd = stopfd, .events = POLLIN };  // poll ignores a negative fd
    for (int i = 0; i < count; i++) fds[2 + i] = (struct pollfd){ .fd = others[i], .events = POLLIN };
    int n = poll(fds, (nfds_t)(2 + count), timeout);
    *uffdEvents = fds[0].revents;
    *stopEvents = fds[1].revents;
    for (int i = 0; i < count; i++) otherEvents[i] = fds[2 + i].revents;
    return n;
}

#endif // __linux__
#endif // C_USERFAULTFD_POLL_H
