/* p11-kit ships the OASIS PKCS#11 header with the standard CK_ names. */
#include <p11-kit/pkcs11.h>
