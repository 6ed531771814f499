#define _GNU_SOURCE
#include "cshims.h"
#include <malloc.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <time.h>
#include <sys/eventfd.h>
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

int pincache_default_crash_signals(void) {
    /* The Swift runtime's backtracer handles these: it prints registers with the memory
       they point at to stderr, and on a SIGSEGV sent with kill the process carries on. */
    static const int crash[] = { SIGQUIT, SIGABRT, SIGBUS, SIGFPE, SIGILL, SIGSEGV, SIGTRAP };
    for (size_t i = 0; i < sizeof crash / sizeof crash[0]; i++) {
        if (signal(crash[i], SIG_DFL) == SIG_ERR) return -1;
    }
    return 0;
}

#ifndef __has_feature
#define __has_feature(x) 0
#endif

int pincache_wipe_freed_memory(void) {
#if defined(__SANITIZE_ADDRESS__) || __has_feature(address_sanitizer)
    /* An AddressSanitizer build replaces glibc's allocator (mallopt is refused); its own
       quarantine holds freed chunks back and ASAN_OPTIONS=max_free_fill_size fills them. */
    return 0;
#else
    /* glibc then fills every freed chunk with 0xff (and new ones with 0x00), except chunks
       kept in the per-thread cache (at most 1032 bytes). mallopt returns 1 on success. */
    return mallopt(M_PERTURB, 0xff) == 1 ? 0 : -1;
#endif
}

int pincache_wake_eventfd(void)
{
    return eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
}

int pincache_join_within(unsigned long thread, unsigned int milliseconds)
{
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += milliseconds / 1000;
    deadline.tv_nsec += (long)(milliseconds % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec += 1;
        deadline.tv_nsec -= 1000000000L;
    }
    return pthread_timedjoin_np((pthread_t)thread, NULL, &deadline);
}

void pincache_name_this_thread(const char *name)
{
    pthread_setname_np(pthread_self(), name);
}

/* Capabilities by raw system call: libcap is not worth a dependency for two calls. */
#include <linux/capability.h>
#include <sys/syscall.h>
#include <unistd.h>

static int pincache_capabilities(struct __user_cap_data_struct data[2])
{
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    return (int)syscall(SYS_capget, &header, data);
}

int pincache_has_capability(int capability)
{
    struct __user_cap_data_struct data[2] = {{0}};
    if (capability < 0 || capability > 63 || pincache_capabilities(data) != 0) return 0;
    return (data[capability / 32].effective & (1u << (capability % 32))) != 0;
}

int pincache_keep_only_capability(int capability)
{
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2] = {{0}};
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0) return -1;
    if (capability >= 0 && capability <= 63) {
        data[capability / 32].effective = 1u << (capability % 32);
        data[capability / 32].permitted = 1u << (capability % 32);
    }
    return (int)syscall(SYS_capset, &header, data);
}

int pincache_die_with_parent(void)
{
    return prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
}

/* ---- the fork gate (see cshims.h) ---- */

#include <stdatomic.h>

static atomic_int gate_enabled;
static pthread_rwlock_t gate_lock;
static pthread_once_t gate_once = PTHREAD_ONCE_INIT;
/* How deep the calling thread is inside the gate (0: outside). */
static __thread unsigned gate_depth;
/* Whether the forking thread took the gate in prepare (it cannot wait for itself). */
static __thread int gate_held_for_fork;

static void gate_lock_init(void) {
    pthread_rwlockattr_t attributes;
    pthread_rwlockattr_init(&attributes);
    /* A waiting fork keeps new entries out, or a busy host would starve it. */
    pthread_rwlockattr_setkind_np(&attributes, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&gate_lock, &attributes);
    pthread_rwlockattr_destroy(&attributes);
}

static void gate_init(void) {
    gate_lock_init();
    atomic_store(&gate_enabled, 1);
}

void pincache_fork_gate_enable(void) { pthread_once(&gate_once, gate_init); }

void pincache_fork_gate_enter(void) {
    if (!atomic_load_explicit(&gate_enabled, memory_order_acquire)) return;
    if (gate_depth++ == 0) pthread_rwlock_rdlock(&gate_lock);
}

void pincache_fork_gate_leave(void) {
    if (!atomic_load_explicit(&gate_enabled, memory_order_acquire) || gate_depth == 0) return;
    if (--gate_depth == 0) pthread_rwlock_unlock(&gate_lock);
}

unsigned pincache_fork_gate_suspend(void) {
    unsigned depth = gate_depth;
    if (depth > 0 && atomic_load_explicit(&gate_enabled, memory_order_acquire)) {
        gate_depth = 0;
        pthread_rwlock_unlock(&gate_lock);
    }
    return depth;
}

void pincache_fork_gate_resume(unsigned token) {
    if (token > 0 && atomic_load_explicit(&gate_enabled, memory_order_acquire)) {
        pthread_rwlock_rdlock(&gate_lock);
        gate_depth = token;
    }
}

void pincache_fork_gate_prepare(void) {
    gate_held_for_fork = 0;
    /* A fork from inside the gate (never ours; a host callback at worst) cannot wait for
       itself: it goes ahead unguarded, as it would without the gate. */
    if (!atomic_load_explicit(&gate_enabled, memory_order_acquire) || gate_depth > 0) return;
    pthread_rwlock_wrlock(&gate_lock);
    gate_held_for_fork = 1;
}

void pincache_fork_gate_parent(void) {
    if (gate_held_for_fork) pthread_rwlock_unlock(&gate_lock);
    gate_held_for_fork = 0;
}

void pincache_fork_gate_child(void) {
    /* The child has only this thread, so nobody else is inside. The lock is made afresh
       rather than unlocked: glibc knows its writer by thread id, which fork changed. */
    if (atomic_load_explicit(&gate_enabled, memory_order_acquire)) gate_lock_init();
    gate_held_for_fork = 0;
    gate_depth = 0;
}

unsigned pincache_fork_gate_hand_over(void) {
    unsigned depth = gate_depth;
    gate_depth = 0;
    return depth;
}

void pincache_fork_gate_adopt(unsigned token) { gate_depth = token; }

int pincache_poll_outside_fork_gate(struct pollfd *fds, unsigned long count, int timeout) {
    unsigned gate = pincache_fork_gate_suspend();
    int ready = poll(fds, (nfds_t)count, timeout);
    int saved = errno;
    pincache_fork_gate_resume(gate);
    errno = saved;
    return ready;
}

int pincache_cond_timedwait_outside_fork_gate(pthread_cond_t *condition, pthread_mutex_t *mutex,
                                              const struct timespec *deadline) {
    unsigned gate = pincache_fork_gate_suspend();
    int result = pthread_cond_timedwait(condition, mutex, deadline);
    if (gate > 0) {
        pthread_mutex_unlock(mutex);
        pincache_fork_gate_resume(gate);
        pthread_mutex_lock(mutex);
    }
    return result;
}
