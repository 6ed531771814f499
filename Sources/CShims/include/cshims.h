#ifndef PINCACHE_CSHIMS_H
#define PINCACHE_CSHIMS_H
#include <stddef.h>

/* Makes the process non-dumpable (PR_SET_DUMPABLE=0) and sets RLIMIT_CORE to 0.
   Returns 0 on success, -1 with errno set otherwise. */
int pincache_disable_core_dumps(void);

/* Marks [addr, addr+len) MADV_DONTDUMP. Returns 0 or -1 with errno. */
int pincache_madvise_dontdump(void *addr, size_t len);

/* Restores the default action (terminate; a core only where dumps are allowed) of
   SIGQUIT, SIGABRT, SIGBUS, SIGFPE, SIGILL, SIGSEGV and SIGTRAP. Returns 0 or -1 with errno. */
int pincache_default_crash_signals(void);

/* Makes glibc's free() overwrite what it frees (mallopt M_PERTURB). Returns 0 or -1. */
int pincache_wipe_freed_memory(void);

/* eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC): a wake-up counter in one descriptor (a pipe takes
   two). Returns the descriptor or -1 with errno. */
int pincache_wake_eventfd(void);

/* pthread_timedjoin_np with a relative timeout in milliseconds: 0 when the thread was
   joined, an errno value (ETIMEDOUT, ...) otherwise. `thread` is a pthread_t. */
int pincache_join_within(unsigned long thread, unsigned int milliseconds);

/* Names the calling thread (at most 15 bytes shown in ps/top). */
void pincache_name_this_thread(const char *name);

/* Whether `capability` (CAP_* number) is in the calling thread's effective set. */
int pincache_has_capability(int capability);

/* Clears the ambient set and keeps only `capability` (or nothing, for -1) in the effective
   and permitted sets, for good: without CAP_SETPCAP and under NoNewPrivileges nothing brings
   a dropped capability back. Returns 0 or -1 with errno. */
int pincache_keep_only_capability(int capability);

/* PR_SET_PDEATHSIG(SIGKILL): the calling process dies when its parent does. */
int pincache_die_with_parent(void);

#endif
