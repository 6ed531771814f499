/* Between the shim's two files; not part of its control interface. */
#ifndef PINCACHE_FAULTSHIM_INTERNAL_H
#define PINCACHE_FAULTSHIM_INTERNAL_H

#include <p11-kit/pkcs11.h>

/* Whether the control directory holds a file of this name (read on every call). */
int faultshim_control_exists(const char *name);

/* Operation kinds, each in a companion session of its own while `optional_functions` is
 * present (optional.c); otherwise routing gives back the session it is given. */
enum { FAULTSHIM_ENCRYPT, FAULTSHIM_DECRYPT, FAULTSHIM_DIGEST, FAULTSHIM_SIGN, FAULTSHIM_VERIFY, FAULTSHIM_KINDS };
CK_SESSION_HANDLE faultshim_route(CK_SESSION_HANDLE session, int kind);

/* Puts the optional functions (optional.c) into `list`, forwarding to `target`. */
void faultshim_install_optional(CK_FUNCTION_LIST *list, CK_FUNCTION_LIST *target);

#endif
