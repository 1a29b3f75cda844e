#include "CUserfaultfdRemap.h"

#ifdef __linux__
#include <sys/mman.h>

_Static_assert(MREMAP_MAYMOVE == 1, "MREMAP_MAYMOVE");
_Static_assert(MREMAP_FIXED == 2, "MREMAP_FIXED");

void *cuffd_mremap(void *old, size_t oldLength, size_t newLength, int flags, void *newAddress) {
    return mremap(old, oldLength, newLength, flags, newAddress);
}
#endif
