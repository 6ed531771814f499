/* p11-kit ships the OASIS PKCS#11 header with the standard CK_ names. */
#include <p11-kit/pkcs11.h>
/* Its 0.24 header stops at 2.40: the 3.0 interface types, where it lacks them. */
#include "pkcs11v3.h"
/* Its module loader: pincached finds its default backends as p11-kit-aware programs do. */
#include <p11-kit/p11-kit.h>
