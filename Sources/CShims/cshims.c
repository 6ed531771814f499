#include "cshims.h"
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>

int pincache_disable_core_dumps(void) {
    struct rlimit none = {0, 0};
    if (setrlimit(RLIMIT_CORE, &none) != 0) return -1;
    /* prctl is variadic, which Swift cannot call directly. */
    return prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
}

int pincache_madvise_dontdump(void *addr, size_t len) {
    return madvise(addr, len, MADV_DONTDUMP);
}
