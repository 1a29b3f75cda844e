// poll() over a userfaultfd and a stop descriptor without Swift-side pollfd values:
// the first use of a C struct's type metadata allocates in Swift, and a waiter must
// not allocate (a fork with EVENT_FORK holds the allocator's locks until it is read).
#ifndef C_USERFAULTFD_POLL_H
#define C_USERFAULTFD_POLL_H

#ifdef __linux__

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

#endif // __linux__
#endif // C_USERFAULTFD_POLL_H
