// mremap for code that moves registered ranges (REMAP events): the C call is
// variadic and a GNU extension, so Swift needs a fixed-signature wrapper.
#ifndef C_USERFAULTFD_REMAP_H
#define C_USERFAULTFD_REMAP_H

#ifdef __linux__

#include <stddef.h>

/// `MREMAP_MAYMOVE` (linux/mman.h).
static const int cuffd_MREMAP_MAYMOVE = 1;
/// `MREMAP_FIXED` (linux/mman.h).
static const int cuffd_MREMAP_FIXED = 2;

/// `mremap(old, oldLength, newLength, flags, newAddress)`; returns `MAP_FAILED` with errno on failure.
void *cuffd_mremap(void *old, size_t oldLength, size_t newLength, int flags, void *newAddress);

#endif // __linux__
#endif // C_USERFAULTFD_REMAP_H
