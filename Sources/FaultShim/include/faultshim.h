/*
 * FaultShim: a PKCS#11 module for tests that forwards to another module and injects
 * faults on command. Never installed. See README.md in the parent directory.
 *
 * The only exported symbol is C_GetFunctionList (declared by <p11-kit/pkcs11.h>). These
 * names are the shim's control interface, shared with the tests that drive it.
 */
#ifndef PINCACHE_FAULTSHIM_H
#define PINCACHE_FAULTSHIM_H

/* Environment: module to forward to (default below) and control directory. */
#define FAULTSHIM_ENV_TARGET "PINCACHE_FAULTSHIM_TARGET"
#define FAULTSHIM_ENV_DIR "PINCACHE_FAULTSHIM_DIR"
#define FAULTSHIM_DEFAULT_TARGET "/usr/lib/softhsm/libsofthsm2.so"

/* Files in the control directory, read on every call. */
#define FAULTSHIM_FILE_REJECT_PIN "reject_pin"
#define FAULTSHIM_FILE_TOKEN_FLAGS_ADD "token_flags_add"
#define FAULTSHIM_FILE_DELAY_MS "delay_ms"
#define FAULTSHIM_FILE_TOKEN_INFO_FAIL "token_info_fail"
#define FAULTSHIM_FILE_LOGINS_LOG "logins.log"
#define FAULTSHIM_FILE_LOGOUTS_LOG "logouts.log"
/* Present: the next C_Login first closes the session it is given (then deleted). */
#define FAULTSHIM_FILE_STALE_SESSION_ONCE "stale_session_once"
/* Present: the shim implements the optional functions SoftHSM leaves out (optional.c). */
#define FAULTSHIM_FILE_OPTIONAL_FUNCTIONS "optional_functions"

#endif
