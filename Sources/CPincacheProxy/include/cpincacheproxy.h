#ifndef CPINCACHEPROXY_H
#define CPINCACHEPROXY_H

/* The few things the proxy does in C: the static CK_FUNCTION_LIST (whose entries are
 * the Swift functions exported as pincache_C_*, see proxy.c), the process-wide lock that
 * survives fork, and the fork generation counter. No PKCS#11 types here: Swift sees
 * those through CPKCS11 only, so they are never imported twice. */

/* The process-wide lock guarding "which library instance is current". Held only for a
 * few instructions, never across a bus call; pthread_atfork keeps it consistent. */
void pincache_global_lock(void);
void pincache_global_unlock(void);

/* Incremented in a forked child (pthread_atfork child handler). An instance created in
 * an earlier generation belongs to the parent and must never be touched. */
unsigned long pincache_fork_generation(void);

/* secure_getenv("PINCACHE_BUS_ADDRESS"): NULL when unset, empty, or the process is
 * set-uid/set-gid (a D-Bus address chosen by an unprivileged user must not steer a
 * privileged program's PINs). */
const char *pincache_bus_address(void);

/* C_GetFunctionList under another name, for in-process tests that link the proxy beside a
 * module exporting its own (not exported from the shared object). `list` receives a
 * CK_FUNCTION_LIST pointer; the result is a CK_RV. */
unsigned long pincache_get_function_list(void **list);

#endif
