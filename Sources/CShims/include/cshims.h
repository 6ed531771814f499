#ifndef PINCACHE_CSHIMS_H
#define PINCACHE_CSHIMS_H
#include <stddef.h>
#include <poll.h>
#include <pthread.h>
#include <time.h>

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

/* The fork gate (issue 13 §12). The Swift runtime is not fork-safe: a fork() while another
   thread is inside it (a swift_once, a metadata cache's lock) leaves the child a lock that
   is never released, and the child hangs at its first Swift call. Code loaded into other
   people's programs (the PKCS#11 proxy) therefore runs its Swift code only inside the
   gate, and fork() (through the proxy's pthread_atfork handlers) waits until no thread is
   inside. A thread about to block for long (a poll, a wait for an event) suspends its
   place in the gate and resumes it afterwards, so a fork never waits for an event.
   Until pincache_fork_gate_enable() every call here does nothing (the daemon). */
void pincache_fork_gate_enable(void);
/* Enter/leave nest per thread; only the outermost takes and releases the gate. */
void pincache_fork_gate_enter(void);
void pincache_fork_gate_leave(void);
/* Releases the calling thread's place (if any) for a blocking wait; returns a token for
   pincache_fork_gate_resume, which takes it back (waiting for a fork in progress). */
unsigned pincache_fork_gate_suspend(void);
void pincache_fork_gate_resume(unsigned token);
/* pthread_atfork's three moments, called by the proxy's own handlers: prepare waits until
   no thread is inside and keeps everyone out; parent and child reopen the gate. */
void pincache_fork_gate_prepare(void);
void pincache_fork_gate_parent(void);
void pincache_fork_gate_child(void);
/* Moves the calling thread's place in the gate to another thread that runs code on its
   behalf: hand_over returns it (the caller is then outside, without releasing anything),
   adopt makes it the calling thread's. */
unsigned pincache_fork_gate_hand_over(void);
void pincache_fork_gate_adopt(unsigned token);
/* The two blocking waits of code inside the gate, done outside it with no Swift code in
   between. poll(2) as is. The timed wait: `mutex` is held on entry and on return, but is
   released before the gate is taken back, so a thread that needs the mutex to leave the
   gate is never waited for while holding it. */
int pincache_poll_outside_fork_gate(struct pollfd *fds, unsigned long count, int timeout);
int pincache_cond_timedwait_outside_fork_gate(pthread_cond_t *condition, pthread_mutex_t *mutex,
                                              const struct timespec *deadline);

#endif
