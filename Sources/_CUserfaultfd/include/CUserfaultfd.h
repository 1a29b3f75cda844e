// The C shim under the Userfaultfd module: kernel constants, structs and
// non-variadic wrappers for the calls Swift cannot make itself (variadic
// `ioctl`/`syscall`, `_IOWR` request numbers, CMSG macros). No policy here.
#ifndef C_USERFAULTFD_H
#define C_USERFAULTFD_H

#ifdef __linux__

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>
#include <linux/fs.h>
#include <linux/userfaultfd.h>

// MARK: - Definitions newer than the installed (6.1) headers

#ifndef _UFFDIO_MOVE
#define _UFFDIO_MOVE (0x05)
#endif
#ifndef _UFFDIO_POISON
#define _UFFDIO_POISON (0x08)
#endif

#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)
#endif

#ifndef UFFDIO_CONTINUE_MODE_WP
#define UFFDIO_CONTINUE_MODE_WP ((__u64)1 << 1)
#endif

#ifndef UFFDIO_MOVE
struct uffdio_move {
    __u64 dst;
    __u64 src;
    __u64 len;
#define UFFDIO_MOVE_MODE_DONTWAKE ((__u64)1 << 0)
#define UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES ((__u64)1 << 1)
    __u64 mode;
    __s64 move;
};
#define UFFDIO_MOVE _IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)
#endif

#ifndef UFFDIO_POISON
struct uffdio_poison {
    struct uffdio_range range;
#define UFFDIO_POISON_MODE_DONTWAKE ((__u64)1 << 0)
    __u64 mode;
    __s64 updated;
};
#define UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#endif

#ifndef PAGEMAP_SCAN
struct page_region {
    __u64 start;
    __u64 end;
    __u64 categories;
};
struct pm_scan_arg {
    __u64 size;
    __u64 flags;
    __u64 start;
    __u64 end;
    __u64 walk_end;
    __u64 vec;
    __u64 vec_len;
    __u64 max_pages;
    __u64 category_inverted;
    __u64 category_mask;
    __u64 category_anyof_mask;
    __u64 return_mask;
};
#define PAGE_IS_WPALLOWED (1 << 0)
#define PAGE_IS_WRITTEN (1 << 1)
#define PAGE_IS_FILE (1 << 2)
#define PAGE_IS_PRESENT (1 << 3)
#define PAGE_IS_SWAPPED (1 << 4)
#define PAGE_IS_PFNZERO (1 << 5)
#define PAGE_IS_HUGE (1 << 6)
#define PAGE_IS_SOFT_DIRTY (1 << 7)
#define PM_SCAN_WP_MATCHING (1 << 0)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#endif
#ifndef PAGE_IS_GUARD
#define PAGE_IS_GUARD (1 << 8)
#endif

#ifndef MFD_CLOEXEC
#define MFD_CLOEXEC 0x0001U
#endif
#ifndef MFD_HUGETLB
#define MFD_HUGETLB 0x0004U
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

/// The kernel ABI's size of `struct name`, checked at compile time.
#define CUFFD_ASSERT_SIZE(name, bytes) _Static_assert(sizeof(struct name) == (bytes), #name " is " #bytes " bytes")
CUFFD_ASSERT_SIZE(uffd_msg, 32);
CUFFD_ASSERT_SIZE(uffdio_api, 24);
CUFFD_ASSERT_SIZE(uffdio_range, 16);
CUFFD_ASSERT_SIZE(uffdio_register, 32);
CUFFD_ASSERT_SIZE(uffdio_copy, 40);
CUFFD_ASSERT_SIZE(uffdio_zeropage, 32);
CUFFD_ASSERT_SIZE(uffdio_writeprotect, 24);
CUFFD_ASSERT_SIZE(uffdio_continue, 32);
CUFFD_ASSERT_SIZE(uffdio_move, 40);
CUFFD_ASSERT_SIZE(uffdio_poison, 32);
CUFFD_ASSERT_SIZE(page_region, 24);
CUFFD_ASSERT_SIZE(pm_scan_arg, 96);

// MARK: - Constants Swift cannot import (function-like macros, 64-bit casts)

static const unsigned long cuffd_UFFDIO_API = UFFDIO_API;
static const unsigned long cuffd_UFFDIO_REGISTER = UFFDIO_REGISTER;
static const unsigned long cuffd_UFFDIO_UNREGISTER = UFFDIO_UNREGISTER;
static const unsigned long cuffd_UFFDIO_WAKE = UFFDIO_WAKE;
static const unsigned long cuffd_UFFDIO_COPY = UFFDIO_COPY;
static const unsigned long cuffd_UFFDIO_ZEROPAGE = UFFDIO_ZEROPAGE;
static const unsigned long cuffd_UFFDIO_MOVE = UFFDIO_MOVE;
static const unsigned long cuffd_UFFDIO_WRITEPROTECT = UFFDIO_WRITEPROTECT;
static const unsigned long cuffd_UFFDIO_CONTINUE = UFFDIO_CONTINUE;
static const unsigned long cuffd_UFFDIO_POISON = UFFDIO_POISON;
static const unsigned long cuffd_USERFAULTFD_IOC_NEW = USERFAULTFD_IOC_NEW;
static const unsigned long cuffd_PAGEMAP_SCAN = PAGEMAP_SCAN;
static const uint64_t cuffd_UFFD_API = UFFD_API;

// MARK: - Non-variadic wrappers

/// `syscall(SYS_userfaultfd, flags)`.
static inline int cuffd_userfaultfd(int flags) {
    return (int)syscall(SYS_userfaultfd, flags);
}

static inline int cuffd_api(int fd, struct uffdio_api *arg) { return ioctl(fd, UFFDIO_API, arg); }
static inline int cuffd_register(int fd, struct uffdio_register *arg) { return ioctl(fd, UFFDIO_REGISTER, arg); }
static inline int cuffd_unregister(int fd, struct uffdio_range *arg) { return ioctl(fd, UFFDIO_UNREGISTER, arg); }
static inline int cuffd_wake(int fd, struct uffdio_range *arg) { return ioctl(fd, UFFDIO_WAKE, arg); }
static inline int cuffd_copy(int fd, struct uffdio_copy *arg) { return ioctl(fd, UFFDIO_COPY, arg); }
static inline int cuffd_zeropage(int fd, struct uffdio_zeropage *arg) { return ioctl(fd, UFFDIO_ZEROPAGE, arg); }
static inline int cuffd_move(int fd, struct uffdio_move *arg) { return ioctl(fd, UFFDIO_MOVE, arg); }
static inline int cuffd_writeprotect(int fd, struct uffdio_writeprotect *arg) { return ioctl(fd, UFFDIO_WRITEPROTECT, arg); }
static inline int cuffd_continue(int fd, struct uffdio_continue *arg) { return ioctl(fd, UFFDIO_CONTINUE, arg); }
static inline int cuffd_poison(int fd, struct uffdio_poison *arg) { return ioctl(fd, UFFDIO_POISON, arg); }
static inline int cuffd_pagemap_scan(int fd, struct pm_scan_arg *arg) { return ioctl(fd, PAGEMAP_SCAN, arg); }
static inline int cuffd_new_from_device(int devfd, int flags) {
    return ioctl(devfd, USERFAULTFD_IOC_NEW, (unsigned long)flags);
}

/// `eventfd(initval, EFD_CLOEXEC | EFD_NONBLOCK)`.
static inline int cuffd_eventfd_nonblocking(unsigned int initval) {
    return eventfd(initval, EFD_CLOEXEC | EFD_NONBLOCK);
}

/// `memfd_create(name, flags)`.
int cuffd_memfd_create(const char *name, unsigned int flags);

/// Names the calling thread (at most 15 bytes are kept).
int cuffd_set_thread_name(const char *name);

/// One `sendmsg` of `len` bytes with `nfds` descriptors attached as SCM_RIGHTS.
/// Returns the bytes sent or -1 with errno (`EINTR` included: the caller retries).
ssize_t cuffd_send_fds(int sock, const void *buf, size_t len, const int *fds, int nfds);

/// `recvmsg` of up to `len` bytes with `MSG_CMSG_CLOEXEC | recv_flags`. Every
/// descriptor that arrived (up to `maxfds`) is stored in `fds` and counted in `*nfds`;
/// descriptors beyond `maxfds`, if the kernel passed them, are closed here and counted
/// too. `*msg_flags` receives the message's flags (`MSG_TRUNC`, `MSG_CTRUNC`).
/// Returns the bytes received (0 at end of stream) or -1 with errno.
ssize_t cuffd_recv_fds(int sock, void *buf, size_t len, int *fds, int maxfds, int *nfds, int *msg_flags, int recv_flags);

/// `ioctl(FIONREAD)`: the bytes waiting on a socket (on a datagram or seqpacket
/// socket, the length of the next message). Returns the count or -1 with errno.
int cuffd_socket_pending_bytes(int sock);

/// SO_PEERCRED of a connected unix socket. Returns 0 or -1 with errno.
int cuffd_peer_credentials(int sock, int32_t *pid, uint32_t *uid, uint32_t *gid);

#endif // __linux__
#endif // C_USERFAULTFD_H
