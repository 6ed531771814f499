/* A plain C PKCS#11 host for the proxy tests: dlopens a module (the proxy or SoftHSM
 * itself) the way any application does and drives it.
 *
 *   proxy_host MODULE list                       slots and token labels
 *   proxy_host MODULE token SLOT_ID              C_GetTokenInfo right after C_Initialize
 *   proxy_host MODULE badargs                    NULL pointers, bad lengths, init rules
 *   proxy_host MODULE conformance LABEL PIN      fixed checks; output compared across modules
 *   proxy_host MODULE threads LABEL PIN N ITER   N threads signing at once
 *   proxy_host MODULE fork LABEL PIN             a forked child re-initialises
 *   proxy_host MODULE repl LABEL                 commands on stdin, one answer line each
 *
 * Every line printed is "name rv-name [details]" so tests can compare runs as text.
 * Exit status 0 unless the harness itself failed (dlopen, missing token).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <p11-kit/pkcs11.h>
/* PKCS#11 3.0 types, as the proxy and the daemon see them. */
#include "../../Sources/CPKCS11/pkcs11v3.h"
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static CK_FUNCTION_LIST *f;

static const char *rvname(CK_RV rv)
{
    static char buf[32];
    switch (rv) {
#define N(x) case x: return #x;
    N(CKR_OK) N(CKR_ARGUMENTS_BAD) N(CKR_BUFFER_TOO_SMALL) N(CKR_CRYPTOKI_NOT_INITIALIZED)
    N(CKR_CRYPTOKI_ALREADY_INITIALIZED) N(CKR_SLOT_ID_INVALID) N(CKR_SESSION_HANDLE_INVALID)
    N(CKR_SESSION_PARALLEL_NOT_SUPPORTED) N(CKR_OPERATION_ACTIVE) N(CKR_OPERATION_NOT_INITIALIZED)
    N(CKR_PIN_INCORRECT) N(CKR_USER_ALREADY_LOGGED_IN) N(CKR_USER_NOT_LOGGED_IN)
    N(CKR_ATTRIBUTE_SENSITIVE) N(CKR_ATTRIBUTE_TYPE_INVALID) N(CKR_MECHANISM_INVALID)
    N(CKR_FUNCTION_NOT_SUPPORTED) N(CKR_DEVICE_REMOVED) N(CKR_NO_EVENT) N(CKR_CANT_LOCK)
    N(CKR_USER_ANOTHER_ALREADY_LOGGED_IN) N(CKR_SIGNATURE_INVALID) N(CKR_KEY_HANDLE_INVALID)
    N(CKR_FUNCTION_FAILED) N(CKR_TOKEN_NOT_PRESENT) N(CKR_USER_TYPE_INVALID) N(CKR_DATA_LEN_RANGE)
    N(CKR_FUNCTION_NOT_PARALLEL) N(CKR_PIN_LEN_RANGE) N(CKR_GENERAL_ERROR) N(CKR_DEVICE_ERROR)
    N(CKR_FUNCTION_REJECTED) N(CKR_OBJECT_HANDLE_INVALID) N(CKR_SESSION_READ_ONLY)
    N(CKR_STATE_UNSAVEABLE) N(CKR_SAVED_STATE_INVALID) N(CKR_OPERATION_CANCEL_FAILED) N(CKR_KEY_FUNCTION_NOT_PERMITTED) N(CKR_SIGNATURE_LEN_RANGE)
#undef N
    default: snprintf(buf, sizeof buf, "0x%lx", rv); return buf;
    }
}

static void out(const char *name, CK_RV rv, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
#include <stdarg.h>
static void out(const char *name, CK_RV rv, const char *fmt, ...)
{
    printf("%s %s", name, rvname(rv));
    if (fmt && *fmt) {
        va_list ap;
        va_start(ap, fmt);
        putchar(' ');
        vprintf(fmt, ap);
        va_end(ap);
    }
    putchar('\n');
    fflush(stdout);
}

static void *module_handle;

static void load(const char *path)
{
    void *h = module_handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) { fprintf(stderr, "dlopen: %s\n", dlerror()); exit(2); }
    CK_C_GetFunctionList get = (CK_C_GetFunctionList)dlsym(h, "C_GetFunctionList");
    if (!get) { fprintf(stderr, "no C_GetFunctionList\n"); exit(2); }
    if (get(&f) != CKR_OK || !f) { fprintf(stderr, "C_GetFunctionList failed\n"); exit(2); }
}

static CK_RV init_os_locking(void)
{
    CK_C_INITIALIZE_ARGS args = { .flags = CKF_OS_LOCKING_OK };
    return f->C_Initialize(&args);
}

static void hex(const unsigned char *p, size_t n, char *dst)
{
    for (size_t i = 0; i < n; i++) sprintf(dst + 2 * i, "%02x", p[i]);
    dst[2 * n] = 0;
}

static size_t unhex(const char *s, unsigned char *dst, size_t max)
{
    size_t n = 0;
    while (s[0] && s[1] && n < max) {
        unsigned v;
        if (sscanf(s, "%2x", &v) != 1) break;
        dst[n++] = (unsigned char)v;
        s += 2;
    }
    return n;
}

/* The slot whose token label (blank-padded) is `label`. */
static int find_slot(const char *label, CK_SLOT_ID *slot)
{
    CK_ULONG n = 0;
    if (f->C_GetSlotList(CK_TRUE, NULL, &n) != CKR_OK) return 0;
    CK_SLOT_ID *ids = calloc(n + 1, sizeof *ids);
    if (f->C_GetSlotList(CK_TRUE, ids, &n) != CKR_OK) { free(ids); return 0; }
    char want[32];
    memset(want, ' ', 32);
    memcpy(want, label, strlen(label) < 32 ? strlen(label) : 32);
    for (CK_ULONG i = 0; i < n; i++) {
        CK_TOKEN_INFO ti;
        if (f->C_GetTokenInfo(ids[i], &ti) == CKR_OK && memcmp(ti.label, want, 32) == 0) {
            *slot = ids[i];
            free(ids);
            return 1;
        }
    }
    free(ids);
    return 0;
}

static CK_RV find_key(CK_SESSION_HANDLE s, CK_OBJECT_CLASS cls, unsigned char id, CK_OBJECT_HANDLE *key)
{
    CK_ATTRIBUTE t[] = { { CKA_CLASS, &cls, sizeof cls }, { CKA_ID, &id, 1 } };
    CK_RV rv = f->C_FindObjectsInit(s, t, 2);
    if (rv != CKR_OK) return rv;
    CK_ULONG n = 0;
    rv = f->C_FindObjects(s, key, 1, &n);
    f->C_FindObjectsFinal(s);
    if (rv == CKR_OK && n != 1) rv = CKR_KEY_HANDLE_INVALID;
    return rv;
}

static int mechanism_by_name(const char *name, CK_MECHANISM *m)
{
    static CK_RSA_PKCS_PSS_PARAMS pss = { CKM_SHA256, CKG_MGF1_SHA256, 32 };
    memset(m, 0, sizeof *m);
    if (!strcmp(name, "ECDSA")) m->mechanism = CKM_ECDSA;
    else if (!strcmp(name, "ECDSA-SHA256")) m->mechanism = CKM_ECDSA_SHA256;
    else if (!strcmp(name, "SHA256-RSA-PKCS")) m->mechanism = CKM_SHA256_RSA_PKCS;
    else if (!strcmp(name, "RSA-PSS-SHA256")) {
        m->mechanism = CKM_SHA256_RSA_PKCS_PSS;
        m->pParameter = &pss;
        m->ulParameterLen = sizeof pss;
    } else return 0;
    return 1;
}

/* SignInit + length query + Sign with `key`; `ctx_pin` non-NULL logs in
 * CKU_CONTEXT_SPECIFIC in between. */
static CK_RV sign_with(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key, const char *mech, const unsigned char *data,
                       size_t len, const char *ctx_pin, unsigned char *sig, CK_ULONG *siglen)
{
    CK_MECHANISM m;
    CK_RV rv;
    if (!mechanism_by_name(mech, &m)) return CKR_MECHANISM_INVALID;
    if ((rv = f->C_SignInit(s, &m, key)) != CKR_OK) return rv;
    if (ctx_pin && (rv = f->C_Login(s, CKU_CONTEXT_SPECIFIC, (CK_UTF8CHAR *)ctx_pin, strlen(ctx_pin))) != CKR_OK) {
        CK_ULONG dummy = *siglen;
        f->C_Sign(s, (CK_BYTE *)data, len, sig, &dummy); /* ends the operation */
        return rv;
    }
    CK_ULONG need = 0;
    if ((rv = f->C_Sign(s, (CK_BYTE *)data, len, NULL, &need)) != CKR_OK) return rv;
    if (need > *siglen) return CKR_BUFFER_TOO_SMALL;
    *siglen = need;
    return f->C_Sign(s, (CK_BYTE *)data, len, sig, siglen);
}

/* The same with the private key whose CKA_ID is `id`. */
static CK_RV sign(CK_SESSION_HANDLE s, unsigned char id, const char *mech, const unsigned char *data, size_t len,
                  const char *ctx_pin, unsigned char *sig, CK_ULONG *siglen)
{
    CK_OBJECT_HANDLE key;
    CK_RV rv = find_key(s, CKO_PRIVATE_KEY, id, &key);
    if (rv != CKR_OK) return rv;
    return sign_with(s, key, mech, data, len, ctx_pin, sig, siglen);
}

/* ------------------------------------------------------------------ list */

static int cmd_list(void)
{
    CK_RV rv = init_os_locking();
    out("C_Initialize", rv, NULL);
    if (rv != CKR_OK) return 1;
    CK_ULONG n = 0;
    rv = f->C_GetSlotList(CK_FALSE, NULL, &n);
    out("C_GetSlotList", rv, "%lu", n);
    CK_SLOT_ID ids[64];
    if (n > 64) n = 64;
    rv = f->C_GetSlotList(CK_FALSE, ids, &n);
    for (CK_ULONG i = 0; i < n; i++) {
        CK_SLOT_INFO si;
        CK_TOKEN_INFO ti;
        CK_RV r1 = f->C_GetSlotInfo(ids[i], &si);
        CK_RV r2 = f->C_GetTokenInfo(ids[i], &ti);
        out("slot", r1, "%lu present=%d token=%s label=%.32s", ids[i], (int)!!(si.flags & CKF_TOKEN_PRESENT),
            rvname(r2), r2 == CKR_OK ? (char *)ti.label : "-");
    }
    out("C_Finalize", f->C_Finalize(NULL), NULL);
    return 0;
}

/* A slot ID kept from another process: valid without C_GetSlotList first. */
static int cmd_token(const char *slot)
{
    CK_RV rv = init_os_locking();
    out("C_Initialize", rv, NULL);
    if (rv != CKR_OK) return 1;
    CK_TOKEN_INFO ti;
    rv = f->C_GetTokenInfo((CK_SLOT_ID)strtoull(slot, NULL, 0), &ti);
    out("C_GetTokenInfo", rv, "label=%.32s", rv == CKR_OK ? (char *)ti.label : "-");
    out("C_Finalize", f->C_Finalize(NULL), NULL);
    return 0;
}

/* --------------------------------------------------------------- badargs */

static CK_RV dummy_mutex(void **m) { (void)m; return CKR_OK; }
static CK_RV dummy_mutex1(void *m) { (void)m; return CKR_OK; }

static int cmd_badargs(void)
{
    CK_ULONG n;
    CK_INFO info;
    out("before-init C_GetInfo", f->C_GetInfo(&info), NULL);
    out("before-init C_GetSlotList", f->C_GetSlotList(CK_FALSE, NULL, &n), NULL);
    out("before-init C_Finalize", f->C_Finalize(NULL), NULL);
    CK_C_INITIALIZE_ARGS partial = { .CreateMutex = dummy_mutex, .flags = CKF_OS_LOCKING_OK };
    out("init partial-mutexes", f->C_Initialize(&partial), NULL);
    CK_C_INITIALIZE_ARGS reserved = { .flags = CKF_OS_LOCKING_OK, .pReserved = &n };
    out("init reserved", f->C_Initialize(&reserved), NULL);
    CK_C_INITIALIZE_ARGS app_only = { dummy_mutex, dummy_mutex1, dummy_mutex1, dummy_mutex1, 0, NULL };
    CK_RV rv = f->C_Initialize(&app_only);
    out("init app-mutexes-only", rv, NULL);
    if (rv == CKR_OK) f->C_Finalize(NULL);
    out("init", init_os_locking(), NULL);
    out("init again", init_os_locking(), NULL);
    out("C_GetInfo NULL", f->C_GetInfo(NULL), NULL);
    out("C_GetSlotList NULL count", f->C_GetSlotList(CK_FALSE, NULL, NULL), NULL);
    CK_SLOT_ID all[64] = {0};
    n = 64;
    f->C_GetSlotList(CK_FALSE, all, &n);
    CK_SLOT_ID first = all[0];
    out("C_GetSlotInfo NULL", f->C_GetSlotInfo(first, NULL), NULL);
    out("C_GetTokenInfo bad slot", f->C_GetTokenInfo(0xdeadbeef, &(CK_TOKEN_INFO){0}), NULL);
    out("C_GetMechanismList bad slot", f->C_GetMechanismList(0xdeadbeef, NULL, &n), NULL);
    CK_SESSION_HANDLE h;
    out("C_OpenSession bad slot", f->C_OpenSession(0xdeadbeef, CKF_SERIAL_SESSION, NULL, NULL, &h), NULL);
    out("C_CloseSession bad", f->C_CloseSession(0xdeadbeef), NULL);
    out("C_GetSessionInfo bad", f->C_GetSessionInfo(0xdeadbeef, &(CK_SESSION_INFO){0}), NULL);
    out("C_SignInit bad session", f->C_SignInit(0xdeadbeef, &(CK_MECHANISM){CKM_ECDSA, NULL, 0}, 1), NULL);
    out("C_Login bad session", f->C_Login(0xdeadbeef, CKU_USER, (CK_UTF8CHAR *)"1", 1), NULL);
    out("C_WaitForSlotEvent NULL slot", f->C_WaitForSlotEvent(CKF_DONT_BLOCK, NULL, NULL), NULL);
    CK_SLOT_ID slot;
    out("C_WaitForSlotEvent reserved", f->C_WaitForSlotEvent(CKF_DONT_BLOCK, &slot, &n), NULL);
    out("C_GetFunctionStatus", f->C_GetFunctionStatus(0), NULL);
    out("C_Finalize reserved", f->C_Finalize(&n), NULL);
    out("C_Finalize", f->C_Finalize(NULL), NULL);
    out("after-finalize C_GetSlotList", f->C_GetSlotList(CK_FALSE, NULL, &n), NULL);
    CK_C_INITIALIZE_ARGS nothreads = { .flags = CKF_OS_LOCKING_OK | CKF_LIBRARY_CANT_CREATE_OS_THREADS };
    out("init no-threads", f->C_Initialize(&nothreads), NULL);
    out("no-threads C_GetSlotList", f->C_GetSlotList(CK_FALSE, NULL, &n), NULL);
    out("C_Finalize", f->C_Finalize(NULL), NULL);
    return 0;
}

/* ----------------------------------------------------------- conformance */

/* Every mechanism the token lists, with its info; every digest mechanism on the same input
 * (issue 13: the differential suite covers the mechanisms SoftHSM lists). */
/* One signature with `m` and `key` on fixed data, then its verification with `pub`: the
 * signature itself where the mechanism gives the same one twice, else its length. */
static void conformance_sign(CK_SESSION_HANDLE s, CK_MECHANISM_TYPE type, const char *what, CK_OBJECT_HANDLE key,
                             CK_OBJECT_HANDLE pub)
{
    /* The PSS mechanisms take their hash's parameters (the raw one SHA-256's). */
    CK_RSA_PKCS_PSS_PARAMS pss = { CKM_SHA256, CKG_MGF1_SHA256, 32 };
    if (type == CKM_SHA1_RSA_PKCS_PSS) pss = (CK_RSA_PKCS_PSS_PARAMS){ CKM_SHA_1, CKG_MGF1_SHA1, 20 };
    if (type == CKM_SHA224_RSA_PKCS_PSS) pss = (CK_RSA_PKCS_PSS_PARAMS){ CKM_SHA224, CKG_MGF1_SHA224, 28 };
    if (type == CKM_SHA384_RSA_PKCS_PSS) pss = (CK_RSA_PKCS_PSS_PARAMS){ CKM_SHA384, CKG_MGF1_SHA384, 48 };
    if (type == CKM_SHA512_RSA_PKCS_PSS) pss = (CK_RSA_PKCS_PSS_PARAMS){ CKM_SHA512, CKG_MGF1_SHA512, 64 };
    int is_pss = type == CKM_RSA_PKCS_PSS || type == CKM_SHA1_RSA_PKCS_PSS || type == CKM_SHA224_RSA_PKCS_PSS ||
                 type == CKM_SHA256_RSA_PKCS_PSS || type == CKM_SHA384_RSA_PKCS_PSS || type == CKM_SHA512_RSA_PKCS_PSS;
    CK_MECHANISM m = { type, is_pss ? &pss : NULL, is_pss ? sizeof pss : 0 };
    unsigned char data[32], sig[2][1024];
    CK_ULONG len[2] = { sizeof sig[0], sizeof sig[1] };
    char name[96], hx[2 * 1024 + 1];
    CK_RV rv = CKR_OK;
    memset(data, 0x3c, sizeof data);
    for (int i = 0; i < 2; i++) {
        snprintf(name, sizeof name, "C_SignInit 0x%lx %s", type, what);
        rv = f->C_SignInit(s, &m, key);
        if (i == 0) out(name, rv, NULL);
        /* C_Sign is called whatever Init said, so both lines exist in every run. */
        CK_RV sign = f->C_Sign(s, data, sizeof data, sig[i], &len[i]);
        if (rv == CKR_OK) rv = sign;
        else rv = sign == CKR_OK ? CKR_GENERAL_ERROR : sign;
        if (rv != CKR_OK) break;
    }
    snprintf(name, sizeof name, "C_Sign 0x%lx %s", type, what);
    if (rv != CKR_OK) {
        out(name, rv, NULL);
        return;
    }
    int same = len[0] == len[1] && !memcmp(sig[0], sig[1], len[0]);
    hex(sig[0], same ? len[0] : 0, hx);
    out(name, rv, "%s", same ? hx : "random");
    snprintf(name, sizeof name, "C_Verify 0x%lx %s", type, what);
    rv = f->C_VerifyInit(s, &m, pub);
    if (rv == CKR_OK) rv = f->C_Verify(s, data, sizeof data, sig[0], len[0]);
    out(name, rv, "%lu", len[0]);
}

/* One single-part encryption with `type` (its parameter chosen for it) and `key`, twice, then
 * the decryption of the first with `priv`: the ciphertext where it is the same both times,
 * else "random", and the plaintext. */
static void conformance_cipher(CK_SESSION_HANDLE s, CK_MECHANISM_TYPE type, const char *what, CK_OBJECT_HANDLE key,
                               CK_OBJECT_HANDLE priv)
{
    unsigned char iv[16], data[32], sealed[2][512], opened[512];
    memset(iv, 0x11, sizeof iv);
    memset(data, 0x22, sizeof data);
    CK_AES_CTR_PARAMS ctr = { 128, { 0 } };
    memcpy(ctr.cb, iv, sizeof iv);
    CK_GCM_PARAMS gcm = { iv, 12, 96, NULL, 0, 128 };
    CK_RSA_PKCS_OAEP_PARAMS oaep = { CKM_SHA_1, CKG_MGF1_SHA1, CKZ_DATA_SPECIFIED, NULL, 0 };
    CK_MECHANISM m = { type, NULL, 0 };
    if (type == CKM_AES_CBC || type == CKM_AES_CBC_PAD) { m.pParameter = iv; m.ulParameterLen = sizeof iv; }
    if (type == CKM_DES_CBC || type == CKM_DES_CBC_PAD || type == CKM_DES3_CBC || type == CKM_DES3_CBC_PAD) {
        m.pParameter = iv;
        m.ulParameterLen = 8;
    }
    if (type == CKM_AES_CTR) { m.pParameter = &ctr; m.ulParameterLen = sizeof ctr; }
    if (type == CKM_AES_GCM) { m.pParameter = &gcm; m.ulParameterLen = sizeof gcm; }
    if (type == CKM_RSA_PKCS_OAEP) { m.pParameter = &oaep; m.ulParameterLen = sizeof oaep; }
    CK_ULONG len[2] = { sizeof sealed[0], sizeof sealed[1] }, n = sizeof opened;
    char name[96], hx[2 * 512 + 1];
    CK_RV rv = CKR_OK;
    for (int i = 0; i < 2 && rv == CKR_OK; i++) {
        rv = f->C_EncryptInit(s, &m, key);
        CK_RV enc = f->C_Encrypt(s, data, sizeof data, sealed[i], &len[i]);
        if (rv == CKR_OK) rv = enc;
    }
    snprintf(name, sizeof name, "C_Encrypt 0x%lx %s", type, what);
    int same = rv == CKR_OK && len[0] == len[1] && !memcmp(sealed[0], sealed[1], len[0]);
    hex(sealed[0], same ? len[0] : 0, hx);
    out(name, rv, "%s", rv != CKR_OK ? "" : same ? hx : "random");
    if (rv != CKR_OK) return;
    snprintf(name, sizeof name, "C_Decrypt 0x%lx %s", type, what);
    rv = f->C_DecryptInit(s, &m, priv);
    CK_RV dec = f->C_Decrypt(s, sealed[0], len[0], opened, &n);
    if (rv == CKR_OK) rv = dec;
    hex(opened, rv == CKR_OK ? n : 0, hx);
    out(name, rv, "%s", hx);
}

/* One multi-part encryption with `m` and `key` as an application streams it (issue 13 §10):
 * a length query, parts of awkward sizes, a buffer too small, the final call's query; then
 * the ciphertext decrypted in other parts. Every part's verdict, length and output. */
static void conformance_cipher_parts(CK_SESSION_HANDLE s, CK_MECHANISM *m, const char *what, CK_OBJECT_HANDLE key)
{
    unsigned char data[61], sealed[256], opened[256], tiny[1];
    char name[96], hx[2 * 256 + 1];
    for (size_t i = 0; i < sizeof data; i++) data[i] = (unsigned char)(i * 7 + 1);
    static const CK_ULONG cuts[] = { 20, 13, 0, 28 };
    CK_ULONG total = 0, n;
    snprintf(name, sizeof name, "C_EncryptInit parts %s", what);
    CK_RV rv = f->C_EncryptInit(s, m, key);
    out(name, rv, NULL);
    CK_ULONG at = 0;
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        n = 0;
        rv = f->C_EncryptUpdate(s, data + at, cuts[i], NULL, &n);
        snprintf(name, sizeof name, "C_EncryptUpdate parts %s %zu query", what, i);
        out(name, rv, "%lu", n);
        if (i == 1) {
            n = sizeof tiny;
            rv = f->C_EncryptUpdate(s, data + at, cuts[i], tiny, &n);
            snprintf(name, sizeof name, "C_EncryptUpdate parts %s %zu small", what, i);
            out(name, rv, "%lu", n);
        }
        n = sizeof sealed - total;
        rv = f->C_EncryptUpdate(s, data + at, cuts[i], sealed + total, &n);
        hex(sealed + total, rv == CKR_OK ? n : 0, hx);
        snprintf(name, sizeof name, "C_EncryptUpdate parts %s %zu", what, i);
        out(name, rv, "%lu %s", rv == CKR_OK ? n : 0, hx);
        if (rv != CKR_OK) return;
        total += n;
        at += cuts[i];
    }
    n = 0;
    rv = f->C_EncryptFinal(s, NULL, &n);
    snprintf(name, sizeof name, "C_EncryptFinal parts %s query", what);
    out(name, rv, "%lu", n);
    n = sizeof sealed - total;
    rv = f->C_EncryptFinal(s, sealed + total, &n);
    hex(sealed + total, rv == CKR_OK ? n : 0, hx);
    snprintf(name, sizeof name, "C_EncryptFinal parts %s", what);
    out(name, rv, "%lu %s", rv == CKR_OK ? n : 0, hx);
    if (rv != CKR_OK) return;
    total += n;
    snprintf(name, sizeof name, "C_EncryptUpdate parts %s after final", what);
    n = sizeof tiny;
    out(name, f->C_EncryptUpdate(s, data, 16, tiny, &n), NULL);

    snprintf(name, sizeof name, "C_DecryptInit parts %s", what);
    out(name, f->C_DecryptInit(s, m, key), NULL);
    CK_ULONG got = 0, step = 7;
    for (CK_ULONG off = 0; off < total; off += step) {
        CK_ULONG len = off + step <= total ? step : total - off;
        n = sizeof opened - got;
        rv = f->C_DecryptUpdate(s, sealed + off, len, opened + got, &n);
        snprintf(name, sizeof name, "C_DecryptUpdate parts %s at %lu", what, off);
        out(name, rv, "%lu", rv == CKR_OK ? n : 0);
        if (rv != CKR_OK) return;
        got += n;
    }
    n = sizeof opened - got;
    rv = f->C_DecryptFinal(s, opened + got, &n);
    if (rv == CKR_OK) got += n;
    hex(opened, rv == CKR_OK ? got : 0, hx);
    snprintf(name, sizeof name, "C_DecryptFinal parts %s", what);
    out(name, rv, "%lu %s", got, hx);
    /* A part with no length pointer ends the operation, as a bad argument does. */
    snprintf(name, sizeof name, "C_DecryptUpdate parts %s NULL-length", what);
    f->C_DecryptInit(s, m, key);
    out(name, f->C_DecryptUpdate(s, sealed, 16, opened, NULL), NULL);
    n = sizeof opened;
    snprintf(name, sizeof name, "C_DecryptUpdate parts %s after NULL-length", what);
    out(name, f->C_DecryptUpdate(s, sealed, 16, opened, &n), NULL);
    n = sizeof opened;
    snprintf(name, sizeof name, "C_DecryptFinal parts %s after NULL-length", what);
    out(name, f->C_DecryptFinal(s, opened, &n), NULL);
    n = sizeof opened;
    snprintf(name, sizeof name, "C_DecryptUpdate parts %s after final", what);
    out(name, f->C_DecryptUpdate(s, sealed, 16, opened, &n), NULL);
}

static void conformance_mechanisms(CK_SLOT_ID slot, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE rsakey,
                                   CK_OBJECT_HANDLE rsapub, CK_OBJECT_HANDLE eckey, CK_OBJECT_HANDLE ecpub)
{
    /* A generic secret long enough for every HMAC (SHA-512's wants 64 bytes at least). */
    CK_OBJECT_CLASS secret_class = CKO_SECRET_KEY;
    CK_KEY_TYPE generic = CKK_GENERIC_SECRET;
    CK_BBOOL no = CK_FALSE, yes = CK_TRUE;
    unsigned char value[64];
    memset(value, 0x5c, sizeof value);
    CK_ATTRIBUTE t[] = {
        { CKA_CLASS, &secret_class, sizeof secret_class }, { CKA_KEY_TYPE, &generic, sizeof generic },
        { CKA_TOKEN, &no, 1 }, { CKA_PRIVATE, &no, 1 }, { CKA_SIGN, &yes, 1 }, { CKA_VERIFY, &yes, 1 },
        { CKA_VALUE, value, sizeof value },
    };
    CK_OBJECT_HANDLE hmac_key = 0;
    out("C_CreateObject hmac", f->C_CreateObject(s, t, 7, &hmac_key), NULL);
    CK_KEY_TYPE aes = CKK_AES;
    unsigned char aes_value[16];
    memset(aes_value, 0x6a, sizeof aes_value);
    CK_ATTRIBUTE at[] = {
        { CKA_CLASS, &secret_class, sizeof secret_class }, { CKA_KEY_TYPE, &aes, sizeof aes },
        { CKA_TOKEN, &no, 1 }, { CKA_PRIVATE, &no, 1 }, { CKA_ENCRYPT, &yes, 1 }, { CKA_DECRYPT, &yes, 1 },
        { CKA_SIGN, &yes, 1 }, { CKA_VERIFY, &yes, 1 }, { CKA_VALUE, aes_value, sizeof aes_value },
    };
    CK_OBJECT_HANDLE aes_key = 0;
    out("C_CreateObject aes cipher", f->C_CreateObject(s, at, 9, &aes_key), NULL);
    /* DES and DES3 keys of fixed value (parity bits set) for the DES mechanisms SoftHSM lists. */
    CK_KEY_TYPE des = CKK_DES, des3 = CKK_DES3;
    unsigned char des_value[24];
    memset(des_value, 0x13, sizeof des_value);
    CK_ATTRIBUTE dt[] = {
        { CKA_CLASS, &secret_class, sizeof secret_class }, { CKA_KEY_TYPE, &des, sizeof des },
        { CKA_TOKEN, &no, 1 }, { CKA_PRIVATE, &no, 1 }, { CKA_ENCRYPT, &yes, 1 }, { CKA_DECRYPT, &yes, 1 },
        { CKA_SIGN, &yes, 1 }, { CKA_VERIFY, &yes, 1 }, { CKA_VALUE, des_value, 8 },
    };
    CK_OBJECT_HANDLE des_key = 0, des3_key = 0;
    out("C_CreateObject des", f->C_CreateObject(s, dt, 9, &des_key), NULL);
    dt[1].pValue = &des3;
    dt[8].ulValueLen = 24;
    out("C_CreateObject des3", f->C_CreateObject(s, dt, 9, &des3_key), NULL);
    CK_MECHANISM_TYPE list[1024];
    CK_ULONG n = 1024;
    CK_RV rv = f->C_GetMechanismList(slot, list, &n);
    out("C_GetMechanismList all", rv, "%lu", rv == CKR_OK ? n : 0);
    if (rv != CKR_OK) return;
    for (CK_ULONG i = 0; i < n; i++) {
        /* Zeroed each time: SoftHSM ORs some mechanisms' flags into what the buffer held. */
        CK_MECHANISM_INFO mi;
        memset(&mi, 0, sizeof mi);
        char name[64];
        snprintf(name, sizeof name, "C_GetMechanismInfo 0x%lx", list[i]);
        rv = f->C_GetMechanismInfo(slot, list[i], &mi);
        out(name, rv, "min=%lu max=%lu flags=0x%lx", mi.ulMinKeySize, mi.ulMaxKeySize, mi.flags);
        if (rv == CKR_OK && (mi.flags & CKF_SIGN)) {
            /* Each signing mechanism with the key of its family (a key of another type can
             * crash SoftHSM: test_a_key_of_the_wrong_type_never_reaches_the_module). */
            CK_MECHANISM_TYPE t = list[i];
            if ((t >= 0x211 && t <= 0x272)) conformance_sign(s, t, "secret", hmac_key, hmac_key);
            else if (t == CKM_AES_CMAC || t == CKM_AES_CMAC_GENERAL) conformance_sign(s, t, "aes", aes_key, aes_key);
            else if (t == CKM_DES3_CMAC || t == CKM_DES3_CMAC_GENERAL) conformance_sign(s, t, "des3", des3_key, des3_key);
            else if (t <= 0x47 && t != 0x11 && !(t >= 0x12 && t <= 0x16)) conformance_sign(s, t, "rsa", rsakey, rsapub);
            else if (t >= 0x1041 && t <= 0x1046) conformance_sign(s, t, "ec", eckey, ecpub);
        }
        if (rv == CKR_OK && (mi.flags & CKF_ENCRYPT)) {
            /* Each encryption mechanism with a key of its family, single-part. */
            CK_MECHANISM_TYPE t = list[i];
            if (t >= 0x1081 && t <= 0x1087) conformance_cipher(s, t, "aes", aes_key, aes_key);
            else if (t >= CKM_DES_ECB && t <= CKM_DES_CBC_PAD) conformance_cipher(s, t, "des", des_key, des_key);
            else if (t >= CKM_DES3_ECB && t <= CKM_DES3_CBC_PAD) conformance_cipher(s, t, "des3", des3_key, des3_key);
            else if (t == CKM_RSA_PKCS || t == CKM_RSA_X_509 || t == CKM_RSA_PKCS_OAEP)
                conformance_cipher(s, t, "rsa", rsapub, rsakey);
        }
        if (rv != CKR_OK || !(mi.flags & CKF_DIGEST)) continue;
        CK_MECHANISM m = { list[i], NULL, 0 };
        unsigned char digest[128];
        char hx[257];
        CK_ULONG len = sizeof digest;
        snprintf(name, sizeof name, "C_Digest 0x%lx", list[i]);
        rv = f->C_DigestInit(s, &m);
        if (rv == CKR_OK) rv = f->C_Digest(s, (CK_BYTE *)"abc", 3, digest, &len);
        hex(digest, rv == CKR_OK ? len : 0, hx);
        out(name, rv, "%s", hx);
    }
    unsigned char iv[16];
    memset(iv, 0x42, sizeof iv);
    CK_MECHANISM cbc_pad = { CKM_AES_CBC_PAD, iv, 16 }, cbc = { CKM_AES_CBC, iv, 16 }, ecb = { CKM_AES_ECB, NULL, 0 };
    CK_AES_CTR_PARAMS ctr = { 128, { 0 } };
    CK_MECHANISM ctr_m = { CKM_AES_CTR, &ctr, sizeof ctr }, des3_cbc_pad = { CKM_DES3_CBC_PAD, iv, 8 };
    conformance_cipher_parts(s, &cbc_pad, "aes-cbc-pad", aes_key);
    conformance_cipher_parts(s, &cbc, "aes-cbc", aes_key);
    conformance_cipher_parts(s, &ecb, "aes-ecb", aes_key);
    conformance_cipher_parts(s, &ctr_m, "aes-ctr", aes_key);
    conformance_cipher_parts(s, &des3_cbc_pad, "des3-cbc-pad", des3_key);
    /* Parameters missing or of the wrong size: refused at Init (issue 13 §5), the proxy with
     * PKCS#11's code where SoftHSM has its own (CONFORMANCE_ALLOWED in test_proxy.py). */
    CK_MECHANISM bare_pss = { CKM_SHA256_RSA_PKCS_PSS, NULL, 0 };
    unsigned char sig[512];
    CK_ULONG siglen = sizeof sig;
    out("C_SignInit pss-without-parameter", f->C_SignInit(s, &bare_pss, rsakey), NULL);
    out("C_Sign pss-without-parameter", f->C_Sign(s, (CK_BYTE *)"data", 4, sig, &siglen), NULL);
    CK_RSA_PKCS_PSS_PARAMS pss = { CKM_SHA256, CKG_MGF1_SHA256, 32 };
    CK_MECHANISM short_pss = { CKM_SHA256_RSA_PKCS_PSS, &pss, sizeof pss - 1 };
    out("C_SignInit pss-short-parameter", f->C_SignInit(s, &short_pss, rsakey), NULL);
    siglen = sizeof sig;
    out("C_Sign pss-short-parameter", f->C_Sign(s, (CK_BYTE *)"data", 4, sig, &siglen), NULL);
    CK_MECHANISM bare_cbc = { CKM_AES_CBC_PAD, NULL, 0 }, short_cbc = { CKM_AES_CBC_PAD, iv, 15 };
    out("C_EncryptInit cbc-without-iv", f->C_EncryptInit(s, &bare_cbc, aes_key), NULL);
    out("C_EncryptInit cbc-short-iv", f->C_EncryptInit(s, &short_cbc, aes_key), NULL);
    CK_MECHANISM bare_oaep = { CKM_RSA_PKCS_OAEP, NULL, 0 };
    out("C_EncryptInit oaep-without-parameter", f->C_EncryptInit(s, &bare_oaep, rsapub), NULL);
    out("C_DestroyObject hmac", f->C_DestroyObject(s, hmac_key), NULL);
    out("C_DestroyObject aes cipher", f->C_DestroyObject(s, aes_key), NULL);
    out("C_DestroyObject des", f->C_DestroyObject(s, des_key), NULL);
    out("C_DestroyObject des3", f->C_DestroyObject(s, des3_key), NULL);
}

/* An output buffer for calls whose output is never produced. */
static unsigned char *buf2_dummy(void)
{
    static unsigned char scratch[4096];
    return scratch;
}

/* A key's CKA_VALUE as hex, or nothing when the call fails. */
static void out_value(const char *name, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key)
{
    unsigned char value[512];
    char hx[2 * sizeof value + 1];
    CK_ATTRIBUTE a[] = { { CKA_VALUE, value, sizeof value } };
    CK_RV rv = f->C_GetAttributeValue(s, key, a, 1);
    hex(value, rv == CKR_OK ? a[0].ulValueLen : 0, hx);
    out(name, rv, "%s", hx);
}

/* Keys derived by encrypting data (CK_KEY_DERIVATION_STRING_DATA, CK_AES/DES_CBC_ENCRYPT_DATA_PARAMS:
 * pointer-carrying parameters) with `aes` and a DES3 key; DH agreement of two fresh key pairs
 * (its parameter a bare byte string). Every derived value is compared. */
static void conformance_derive_data(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE aes, CK_ATTRIBUTE *derive_template)
{
    unsigned char data[32];
    memset(data, 0x3c, sizeof data);
    CK_OBJECT_CLASS secret_class = CKO_SECRET_KEY;
    CK_KEY_TYPE des3 = CKK_DES3;
    CK_BBOOL no = CK_FALSE, yes = CK_TRUE;
    unsigned char des3_value[24];
    memset(des3_value, 0x31, sizeof des3_value);
    CK_ATTRIBUTE dt[] = {
        { CKA_CLASS, &secret_class, sizeof secret_class }, { CKA_KEY_TYPE, &des3, sizeof des3 },
        { CKA_TOKEN, &no, 1 }, { CKA_PRIVATE, &no, 1 }, { CKA_DERIVE, &yes, 1 }, { CKA_VALUE, des3_value, 24 },
    };
    CK_OBJECT_HANDLE des3_key = 0, derived = 0;
    out("C_CreateObject des3 derive", f->C_CreateObject(s, dt, 6, &des3_key), NULL);
    CK_KEY_DERIVATION_STRING_DATA string = { data, sizeof data };
    CK_KEY_DERIVATION_STRING_DATA short_string = { data, 5 };
    CK_AES_CBC_ENCRYPT_DATA_PARAMS aes_cbc = { { 1, 2, 3, 4 }, data, sizeof data };
    CK_DES_CBC_ENCRYPT_DATA_PARAMS des_cbc = { { 5, 6, 7, 8 }, data, sizeof data };
    struct {
        const char *name;
        CK_MECHANISM m;
        CK_OBJECT_HANDLE key;
    } cases[] = {
        { "aes-ecb-data", { CKM_AES_ECB_ENCRYPT_DATA, &string, sizeof string }, aes },
        { "aes-ecb-data short", { CKM_AES_ECB_ENCRYPT_DATA, &short_string, sizeof short_string }, aes },
        { "aes-ecb-data bad-length", { CKM_AES_ECB_ENCRYPT_DATA, &string, sizeof string - 1 }, aes },
        { "aes-ecb-data no-parameter", { CKM_AES_ECB_ENCRYPT_DATA, NULL, 0 }, aes },
        { "aes-cbc-data", { CKM_AES_CBC_ENCRYPT_DATA, &aes_cbc, sizeof aes_cbc }, aes },
        { "aes-cbc-data bad-length", { CKM_AES_CBC_ENCRYPT_DATA, &aes_cbc, sizeof des_cbc }, aes },
        { "des3-ecb-data", { CKM_DES3_ECB_ENCRYPT_DATA, &string, sizeof string }, des3_key },
        { "des3-cbc-data", { CKM_DES3_CBC_ENCRYPT_DATA, &des_cbc, sizeof des_cbc }, des3_key },
        { "des3-ecb-data aes-key", { CKM_DES3_ECB_ENCRYPT_DATA, &string, sizeof string }, aes },
    };
    char name[96];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(name, sizeof name, "C_DeriveKey %s", cases[i].name);
        CK_RV rv = f->C_DeriveKey(s, &cases[i].m, cases[i].key, derive_template, 7, &derived);
        out(name, rv, NULL);
        if (rv != CKR_OK) continue;
        snprintf(name, sizeof name, "C_DeriveKey %s value", cases[i].name);
        out_value(name, s, derived);
        f->C_DestroyObject(s, derived);
    }
    out("C_DestroyObject des3 derive", f->C_DestroyObject(s, des3_key), NULL);

    /* DH: the 1024-bit MODP group of RFC 2409 (any modulus would do for agreement). */
    static const unsigned char prime[] = {
        0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xC9, 0x0F, 0xDA, 0xA2, 0x21, 0x68, 0xC2, 0x34, 0xC4, 0xC6,
        0x62, 0x8B, 0x80, 0xDC, 0x1C, 0xD1, 0x29, 0x02, 0x4E, 0x08, 0x8A, 0x67, 0xCC, 0x74, 0x02, 0x0B, 0xBE, 0xA6,
        0x3B, 0x13, 0x9B, 0x22, 0x51, 0x4A, 0x08, 0x79, 0x8E, 0x34, 0x04, 0xDD, 0xEF, 0x95, 0x19, 0xB3, 0xCD, 0x3A,
        0x43, 0x1B, 0x30, 0x2B, 0x0A, 0x6D, 0xF2, 0x5F, 0x14, 0x37, 0x4F, 0xE1, 0x35, 0x6D, 0x6D, 0x51, 0xC2, 0x45,
        0xE4, 0x85, 0xB5, 0x76, 0x62, 0x5E, 0x7E, 0xC6, 0xF4, 0x4C, 0x42, 0xE9, 0xA6, 0x37, 0xED, 0x6B, 0x0B, 0xFF,
        0x5C, 0xB6, 0xF4, 0x06, 0xB7, 0xED, 0xEE, 0x38, 0x6B, 0xFB, 0x5A, 0x89, 0x9F, 0xA5, 0xAE, 0x9F, 0x24, 0x11,
        0x7C, 0x4B, 0x1F, 0xE6, 0x49, 0x28, 0x66, 0x51, 0xEC, 0xE6, 0x53, 0x81, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
        0xFF, 0xFF,
    };
    static const unsigned char base[] = { 2 };
    CK_MECHANISM dhgen = { CKM_DH_PKCS_KEY_PAIR_GEN, NULL, 0 };
    CK_OBJECT_HANDLE pub[2] = { 0, 0 }, priv[2] = { 0, 0 }, agreed[2] = { 0, 0 };
    unsigned char values[2][160], secrets[2][160];
    CK_ULONG value_len[2] = { 0, 0 }, secret_len[2] = { 0, 0 };
    for (int i = 0; i < 2; i++) {
        CK_ATTRIBUTE pubt[] = { { CKA_PRIME, (void *)prime, sizeof prime }, { CKA_BASE, (void *)base, 1 },
                                { CKA_TOKEN, &no, 1 } };
        CK_ATTRIBUTE privt[] = { { CKA_TOKEN, &no, 1 }, { CKA_PRIVATE, &no, 1 }, { CKA_DERIVE, &yes, 1 } };
        CK_RV rv = f->C_GenerateKeyPair(s, &dhgen, pubt, 3, privt, 3, &pub[i], &priv[i]);
        out("C_GenerateKeyPair dh", rv, NULL);
        CK_ATTRIBUTE vt[] = { { CKA_VALUE, values[i], sizeof values[i] } };
        rv = f->C_GetAttributeValue(s, pub[i], vt, 1);
        value_len[i] = rv == CKR_OK ? vt[0].ulValueLen : 0;
    }
    for (int i = 0; i < 2; i++) {
        CK_MECHANISM agree = { CKM_DH_PKCS_DERIVE, values[1 - i], value_len[1 - i] };
        CK_RV rv = f->C_DeriveKey(s, &agree, priv[i], derive_template, 7, &agreed[i]);
        out("C_DeriveKey dh agreement", rv, NULL);
        CK_ATTRIBUTE v[] = { { CKA_VALUE, secrets[i], sizeof secrets[i] } };
        rv = f->C_GetAttributeValue(s, agreed[i], v, 1);
        secret_len[i] = rv == CKR_OK ? v[0].ulValueLen : 0;
        out("C_DeriveKey dh agreement value", rv, "%lu", secret_len[i]);
    }
    out("C_DeriveKey dh both sides", CKR_OK, "%s",
        secret_len[0] > 0 && secret_len[0] == secret_len[1] && !memcmp(secrets[0], secrets[1], secret_len[0]) ? "agree"
                                                                                                           : "differ");
    for (int i = 0; i < 2; i++) {
        f->C_DestroyObject(s, agreed[i]);
        f->C_DestroyObject(s, pub[i]);
        f->C_DestroyObject(s, priv[i]);
    }
}

/* Array attributes (CKA_WRAP_TEMPLATE, CKA_UNWRAP_TEMPLATE; issue 13 §11): set at creation,
 * read back PKCS#11's ways (the array's size, its entries' types and lengths, their values,
 * an entry's buffer and the array too short), and obeyed by C_WrapKey and C_UnwrapKey. */
static void conformance_array_attributes(CK_SESSION_HANDLE s)
{
    CK_OBJECT_CLASS secret_class = CKO_SECRET_KEY;
    CK_KEY_TYPE aes = CKK_AES, generic = CKK_GENERIC_SECRET;
    CK_BBOOL no = CK_FALSE, yes = CK_TRUE;
    unsigned char kek_value[16], key_value[32], buf[256];
    char hx[2 * 256 + 1];
    memset(kek_value, 0x51, sizeof kek_value);
    memset(key_value, 0x52, sizeof key_value);
    CK_ATTRIBUTE wrap_only_generic[] = { { CKA_KEY_TYPE, &generic, sizeof generic }, { CKA_EXTRACTABLE, &yes, 1 } };
    CK_ATTRIBUTE unwrap_as[] = { { CKA_KEY_TYPE, &generic, sizeof generic }, { CKA_SIGN, &yes, 1 } };
    CK_ATTRIBUTE kt[] = {
        { CKA_CLASS, &secret_class, sizeof secret_class }, { CKA_KEY_TYPE, &aes, sizeof aes },
        { CKA_TOKEN, &no, 1 }, { CKA_PRIVATE, &no, 1 }, { CKA_WRAP, &yes, 1 }, { CKA_UNWRAP, &yes, 1 },
        { CKA_VALUE, kek_value, sizeof kek_value },
        { CKA_WRAP_TEMPLATE, wrap_only_generic, sizeof wrap_only_generic },
        { CKA_UNWRAP_TEMPLATE, unwrap_as, sizeof unwrap_as },
    };
    CK_OBJECT_HANDLE kek = 0, other = 0;
    out("C_CreateObject array-attributes", f->C_CreateObject(s, kt, 9, &kek), NULL);
    kt[7].ulValueLen = sizeof wrap_only_generic - 1;
    out("C_CreateObject array-attribute odd-length", f->C_CreateObject(s, kt, 9, &other), NULL);
    f->C_DestroyObject(s, other);
    kt[7].ulValueLen = sizeof wrap_only_generic;
    kt[7].type = CKA_DERIVE_TEMPLATE;
    out("C_CreateObject derive-template", f->C_CreateObject(s, kt, 9, &other), NULL);
    f->C_DestroyObject(s, other);

    CK_ATTRIBUTE q = { CKA_WRAP_TEMPLATE, NULL, 0 };
    CK_RV rv = f->C_GetAttributeValue(s, kek, &q, 1);
    out("C_GetAttributeValue wrap-template size", rv, "%lu", q.ulValueLen);
    CK_ATTRIBUTE inner[4];
    memset(inner, 0, sizeof inner);
    q.pValue = inner;
    q.ulValueLen = sizeof inner;
    rv = f->C_GetAttributeValue(s, kek, &q, 1);
    out("C_GetAttributeValue wrap-template lengths", rv, "%lu %lx:%lu %lx:%lu", q.ulValueLen, inner[0].type,
        inner[0].ulValueLen, inner[1].type, inner[1].ulValueLen);
    unsigned char v0[16], v1[16];
    inner[0].pValue = v0;
    inner[1].pValue = v1;
    inner[0].ulValueLen = inner[1].ulValueLen = 16;
    q.ulValueLen = 2 * sizeof(CK_ATTRIBUTE);
    rv = f->C_GetAttributeValue(s, kek, &q, 1);
    hex(v0, rv == CKR_OK ? inner[0].ulValueLen : 0, hx);
    out("C_GetAttributeValue wrap-template values", rv, "%lu %s %d", q.ulValueLen, hx, rv == CKR_OK ? v1[0] : -1);
    inner[0].ulValueLen = 1;
    inner[1].ulValueLen = 16;
    rv = f->C_GetAttributeValue(s, kek, &q, 1);
    out("C_GetAttributeValue wrap-template entry too small", rv, "%lu %ld %lu", q.ulValueLen, (long)inner[0].ulValueLen,
        inner[1].ulValueLen);
    q.ulValueLen = sizeof(CK_ATTRIBUTE);
    rv = f->C_GetAttributeValue(s, kek, &q, 1);
    out("C_GetAttributeValue wrap-template array too small", rv, "%ld", (long)q.ulValueLen);
    CK_BBOOL can_wrap = CK_FALSE;
    CK_ATTRIBUTE uq[] = { { CKA_UNWRAP_TEMPLATE, inner, sizeof inner }, { CKA_WRAP, &can_wrap, 1 } };
    memset(inner, 0, sizeof inner);
    rv = f->C_GetAttributeValue(s, kek, uq, 2);
    out("C_GetAttributeValue unwrap-template with another", rv, "%lu %lx:%lu %lx:%lu %d", uq[0].ulValueLen, inner[0].type,
        inner[0].ulValueLen, inner[1].type, inner[1].ulValueLen, can_wrap);

    /* The wrap template admits generic secrets only; the unwrap template makes signing keys. */
    CK_ATTRIBUTE gt[] = {
        { CKA_CLASS, &secret_class, sizeof secret_class }, { CKA_KEY_TYPE, &generic, sizeof generic },
        { CKA_TOKEN, &no, 1 }, { CKA_PRIVATE, &no, 1 }, { CKA_EXTRACTABLE, &yes, 1 }, { CKA_SENSITIVE, &no, 1 },
        { CKA_VALUE, key_value, sizeof key_value },
    };
    CK_OBJECT_HANDLE secret = 0, aes_secret = 0, unwrapped = 0;
    out("C_CreateObject wrappable", f->C_CreateObject(s, gt, 7, &secret), NULL);
    gt[1].pValue = &aes;
    out("C_CreateObject not wrappable", f->C_CreateObject(s, gt, 7, &aes_secret), NULL);
    CK_MECHANISM kw = { CKM_AES_KEY_WRAP, NULL, 0 };
    CK_ULONG n = sizeof buf;
    rv = f->C_WrapKey(s, &kw, kek, secret, buf, &n);
    CK_ULONG wrapped = rv == CKR_OK ? n : 0;
    hex(buf, wrapped, hx);
    out("C_WrapKey by template", rv, "%s", hx);
    unsigned char other_buf[256];
    n = sizeof other_buf;
    out("C_WrapKey against template", f->C_WrapKey(s, &kw, kek, aes_secret, other_buf, &n), NULL);
    CK_ATTRIBUTE ut[] = { { CKA_CLASS, &secret_class, sizeof secret_class }, { CKA_TOKEN, &no, 1 },
                          { CKA_SENSITIVE, &no, 1 }, { CKA_KEY_TYPE, &generic, sizeof generic },
                          { CKA_SIGN, &yes, 1 } };
    rv = f->C_UnwrapKey(s, &kw, kek, buf, wrapped, ut, 5, &unwrapped);
    out("C_UnwrapKey by template", rv, NULL);
    CK_BBOOL can_sign = CK_FALSE;
    CK_KEY_TYPE unwrapped_type = 0;
    CK_ATTRIBUTE ua[] = { { CKA_SIGN, &can_sign, 1 }, { CKA_KEY_TYPE, &unwrapped_type, sizeof unwrapped_type } };
    rv = f->C_GetAttributeValue(s, unwrapped, ua, 2);
    out("C_UnwrapKey by template attributes", rv, "sign=%d type=%lu", can_sign, unwrapped_type);
    f->C_DestroyObject(s, unwrapped);
    CK_ATTRIBUTE against[] = { { CKA_CLASS, &secret_class, sizeof secret_class }, { CKA_TOKEN, &no, 1 },
                               { CKA_KEY_TYPE, &aes, sizeof aes } };
    rv = f->C_UnwrapKey(s, &kw, kek, buf, wrapped, against, 3, &unwrapped);
    out("C_UnwrapKey against template", rv, NULL);
    if (rv == CKR_OK) f->C_DestroyObject(s, unwrapped);
    out("C_DestroyObject wrappable", f->C_DestroyObject(s, secret), NULL);
    out("C_DestroyObject not wrappable", f->C_DestroyObject(s, aes_secret), NULL);
    out("C_DestroyObject array-attributes", f->C_DestroyObject(s, kek), NULL);
}

/* Wrapping, unwrapping, deriving, and pointer-carrying mechanism parameters (issue 13 §11),
 * on session objects of known value: every output is compared, except RSA-PKCS wrapping's
 * (random padding), whose length is. `secret` is a generic secret key (0x42 x 32). */
static void conformance_keys(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE secret, CK_OBJECT_HANDLE eckey,
                             CK_OBJECT_HANDLE ecpub, CK_OBJECT_HANDLE rsakey, CK_OBJECT_HANDLE rsapub,
                             CK_OBJECT_HANDLE *kept_private)
{
    unsigned char buf[4096], wrapped[512];
    char hx[2 * 1024 + 1];
    CK_ULONG n, wrapped_len;
    CK_RV rv;
    CK_OBJECT_CLASS secret_class = CKO_SECRET_KEY;
    CK_KEY_TYPE aes = CKK_AES, generic = CKK_GENERIC_SECRET;
    CK_BBOOL no = CK_FALSE, yes = CK_TRUE;
    unsigned char aes_value[16];
    memset(aes_value, 0x24, sizeof aes_value);
    CK_ATTRIBUTE aes_template[] = {
        { CKA_CLASS, &secret_class, sizeof secret_class }, { CKA_KEY_TYPE, &aes, sizeof aes },
        { CKA_TOKEN, &no, 1 }, { CKA_PRIVATE, &no, 1 }, { CKA_SENSITIVE, &no, 1 }, { CKA_EXTRACTABLE, &yes, 1 },
        { CKA_WRAP, &yes, 1 }, { CKA_UNWRAP, &yes, 1 }, { CKA_ENCRYPT, &yes, 1 }, { CKA_DECRYPT, &yes, 1 },
        { CKA_DERIVE, &yes, 1 }, { CKA_VALUE, aes_value, sizeof aes_value },
    };
    CK_ATTRIBUTE unwrap_template[] = {
        { CKA_CLASS, &secret_class, sizeof secret_class }, { CKA_KEY_TYPE, &generic, sizeof generic },
        { CKA_TOKEN, &no, 1 }, { CKA_PRIVATE, &no, 1 }, { CKA_SENSITIVE, &no, 1 }, { CKA_EXTRACTABLE, &yes, 1 },
    };
    CK_OBJECT_HANDLE kek = 0, unwrapped = 0;
    out("C_CreateObject aes", f->C_CreateObject(s, aes_template, 12, &kek), NULL);

    CK_MECHANISM kw = { CKM_AES_KEY_WRAP, NULL, 0 };
    n = 0;
    rv = f->C_WrapKey(s, &kw, kek, secret, NULL, &n);
    out("C_WrapKey query", rv, "%lu", n);
    n = 8;
    rv = f->C_WrapKey(s, &kw, kek, secret, buf, &n);
    out("C_WrapKey small", rv, "%lu", n);
    n = sizeof wrapped;
    rv = f->C_WrapKey(s, &kw, kek, secret, wrapped, &n);
    wrapped_len = rv == CKR_OK ? n : 0;
    hex(wrapped, wrapped_len, hx);
    out("C_WrapKey aes-kw", rv, "%s", hx);
    n = sizeof buf;
    out("C_WrapKey invalid-wrapping-key", f->C_WrapKey(s, &kw, 0x7ffffff0, secret, buf, &n), NULL);
    n = sizeof buf;
    out("C_WrapKey invalid-key", f->C_WrapKey(s, &kw, kek, 0x7ffffff0, buf, &n), NULL);
    out("C_WrapKey NULL-length", f->C_WrapKey(s, &kw, kek, secret, buf, NULL), NULL);
    rv = f->C_UnwrapKey(s, &kw, kek, wrapped, wrapped_len, unwrap_template, 6, &unwrapped);
    out("C_UnwrapKey aes-kw", rv, NULL);
    out_value("C_UnwrapKey aes-kw value", s, unwrapped);
    f->C_DestroyObject(s, unwrapped);
    out("C_UnwrapKey short", f->C_UnwrapKey(s, &kw, kek, wrapped, 12, unwrap_template, 6, &unwrapped), NULL);
    out("C_UnwrapKey invalid-key", f->C_UnwrapKey(s, &kw, 0x7ffffff0, wrapped, wrapped_len, unwrap_template, 6, &unwrapped), NULL);
    out("C_UnwrapKey NULL-handle", f->C_UnwrapKey(s, &kw, kek, wrapped, wrapped_len, unwrap_template, 6, NULL), NULL);

    /* The RSA pair: wrapped with the public key, opened with the private one (S/MIME's way). */
    CK_MECHANISM rsa_pkcs = { CKM_RSA_PKCS, NULL, 0 };
    n = sizeof buf;
    rv = f->C_WrapKey(s, &rsa_pkcs, rsapub, secret, buf, &n);
    out("C_WrapKey rsa", rv, "%lu", rv == CKR_OK ? n : 0);
    CK_ULONG rsa_len = rv == CKR_OK ? n : 0;
    rv = f->C_UnwrapKey(s, &rsa_pkcs, rsakey, buf, rsa_len, unwrap_template, 6, &unwrapped);
    out("C_UnwrapKey rsa", rv, NULL);
    out_value("C_UnwrapKey rsa value", s, unwrapped);
    f->C_DestroyObject(s, unwrapped);

    /* ECDH with the token's EC key and its own public point (raw, from CKA_EC_POINT's DER). */
    unsigned char point[128];
    CK_ATTRIBUTE pa[] = { { CKA_EC_POINT, point, sizeof point } };
    rv = f->C_GetAttributeValue(s, ecpub, pa, 1);
    out("C_GetAttributeValue ec-point", rv, "%lu", pa[0].ulValueLen);
    CK_ECDH1_DERIVE_PARAMS ep = { CKD_NULL, 0, NULL, pa[0].ulValueLen > 2 ? pa[0].ulValueLen - 2 : 0, point + 2 };
    CK_MECHANISM ecdh = { CKM_ECDH1_DERIVE, &ep, sizeof ep };
    CK_ULONG len32 = 32;
    CK_ATTRIBUTE derive_template[] = {
        { CKA_CLASS, &secret_class, sizeof secret_class }, { CKA_KEY_TYPE, &generic, sizeof generic },
        { CKA_TOKEN, &no, 1 }, { CKA_PRIVATE, &no, 1 }, { CKA_SENSITIVE, &no, 1 }, { CKA_EXTRACTABLE, &yes, 1 },
        { CKA_VALUE_LEN, &len32, sizeof len32 },
    };
    CK_OBJECT_HANDLE derived = 0;
    rv = f->C_DeriveKey(s, &ecdh, eckey, derive_template, 7, &derived);
    out("C_DeriveKey ecdh", rv, NULL);
    out_value("C_DeriveKey ecdh value", s, derived);
    f->C_DestroyObject(s, derived);
    out("C_DeriveKey invalid-key", f->C_DeriveKey(s, &ecdh, 0x7ffffff0, derive_template, 7, &derived), NULL);
    /* Two fresh key pairs that may derive, private session objects: each side's secret from
     * the other's point must agree. A caching-mode bracket logs out after each call, and
     * C_Logout destroys private session objects: the daemon keeps them (README). */
    static const unsigned char p256[] = { 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07 };
    CK_MECHANISM ecgen = { CKM_EC_KEY_PAIR_GEN, NULL, 0 };
    CK_OBJECT_HANDLE pub[2] = { 0, 0 }, priv[2] = { 0, 0 }, agreed[2] = { 0, 0 };
    unsigned char points[2][128], secrets[2][64];
    CK_ULONG point_len[2] = { 0, 0 }, secret_len[2] = { 0, 0 };
    for (int i = 0; i < 2; i++) {
        CK_ATTRIBUTE pubt[] = { { CKA_EC_PARAMS, (void *)p256, sizeof p256 }, { CKA_TOKEN, &no, 1 } };
        CK_ATTRIBUTE privt[] = { { CKA_TOKEN, &no, 1 }, { CKA_PRIVATE, &yes, 1 }, { CKA_DERIVE, &yes, 1 },
                                 { CKA_SENSITIVE, &yes, 1 } };
        rv = f->C_GenerateKeyPair(s, &ecgen, pubt, 2, privt, 4, &pub[i], &priv[i]);
        out("C_GenerateKeyPair derive", rv, NULL);
        CK_ATTRIBUTE pt[] = { { CKA_EC_POINT, points[i], sizeof points[i] } };
        rv = f->C_GetAttributeValue(s, pub[i], pt, 1);
        point_len[i] = rv == CKR_OK && pt[0].ulValueLen > 2 ? pt[0].ulValueLen - 2 : 0;
    }
    for (int i = 0; i < 2; i++) {
        CK_ECDH1_DERIVE_PARAMS other = { CKD_NULL, 0, NULL, point_len[1 - i], points[1 - i] + 2 };
        CK_MECHANISM agree = { CKM_ECDH1_DERIVE, &other, sizeof other };
        rv = f->C_DeriveKey(s, &agree, priv[i], derive_template, 7, &agreed[i]);
        out("C_DeriveKey ecdh agreement", rv, NULL);
        CK_ATTRIBUTE v[] = { { CKA_VALUE, secrets[i], sizeof secrets[i] } };
        rv = f->C_GetAttributeValue(s, agreed[i], v, 1);
        secret_len[i] = rv == CKR_OK ? v[0].ulValueLen : 0;
        out("C_DeriveKey ecdh agreement value", rv, "%lu", secret_len[i]);
    }
    out("C_DeriveKey ecdh both sides", CKR_OK, "%s",
        secret_len[0] == 32 && secret_len[1] == 32 && !memcmp(secrets[0], secrets[1], 32) ? "agree" : "differ");
    CK_BBOOL is_private = CK_FALSE;
    CK_ATTRIBUTE pr[] = { { CKA_PRIVATE, &is_private, 1 } };
    rv = f->C_GetAttributeValue(s, priv[0], pr, 1);
    out("C_GetAttributeValue session-key private", rv, "%d", is_private);
    CK_OBJECT_CLASS private_class = CKO_PRIVATE_KEY;
    CK_ATTRIBUTE session_private[] = { { CKA_CLASS, &private_class, sizeof private_class }, { CKA_TOKEN, &no, 1 },
                                       { CKA_PRIVATE, &yes, 1 } };
    CK_ATTRIBUTE session_public[] = { { CKA_CLASS, &private_class, sizeof private_class }, { CKA_TOKEN, &no, 1 },
                                      { CKA_PRIVATE, &no, 1 } };
    CK_OBJECT_HANDLE found[8];
    CK_ULONG nfound = 0;
    out("C_FindObjectsInit session private", f->C_FindObjectsInit(s, session_private, 3), NULL);
    rv = f->C_FindObjects(s, found, 8, &nfound);
    out("C_FindObjects session private", rv, "%lu", nfound);
    f->C_FindObjectsFinal(s);
    out("C_FindObjectsInit session not-private", f->C_FindObjectsInit(s, session_public, 3), NULL);
    rv = f->C_FindObjects(s, found, 8, &nfound);
    out("C_FindObjects session not-private", rv, "%lu", nfound);
    f->C_FindObjectsFinal(s);
    /* Copies of the private session key: into the session (private too, and gone at logout),
     * onto the token (private there: a public token copy would be anyone's key), never public. */
    CK_UTF8CHAR copy_label[] = "copy";
    CK_ATTRIBUTE copy_session[] = { { CKA_LABEL, copy_label, 4 } };
    CK_ATTRIBUTE copy_public[] = { { CKA_PRIVATE, &no, 1 } };
    CK_ATTRIBUTE copy_token[] = { { CKA_TOKEN, &yes, 1 }, { CKA_LABEL, copy_label, 4 } };
    CK_OBJECT_HANDLE copy = 0, token_copy = 0, public_copy = 0;
    out("C_CopyObject private session key", f->C_CopyObject(s, priv[0], copy_session, 1, &copy), NULL);
    is_private = CK_FALSE;
    rv = f->C_GetAttributeValue(s, copy, pr, 1);
    out("C_GetAttributeValue copy private", rv, "%d", is_private);
    out("C_CopyObject private to public", f->C_CopyObject(s, priv[0], copy_public, 1, &public_copy), NULL);
    out("C_CopyObject private to token read-only", f->C_CopyObject(s, priv[0], copy_token, 2, &token_copy), NULL);
    CK_SESSION_INFO si;
    CK_SESSION_HANDLE rw = 0;
    rv = f->C_GetSessionInfo(s, &si);
    if (rv == CKR_OK) rv = f->C_OpenSession(si.slotID, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &rw);
    out("C_OpenSession rw for copy", rv, NULL);
    out("C_CopyObject private to token", f->C_CopyObject(rw, priv[0], copy_token, 2, &token_copy), NULL);
    is_private = CK_FALSE;
    rv = f->C_GetAttributeValue(rw, token_copy, pr, 1);
    out("C_GetAttributeValue token copy private", rv, "%d", is_private);
    out("C_DestroyObject token copy", f->C_DestroyObject(rw, token_copy), NULL);
    out("C_CloseSession rw for copy", f->C_CloseSession(rw), NULL);
    for (int i = 0; i < 2; i++) {
        f->C_DestroyObject(s, agreed[i]);
        f->C_DestroyObject(s, pub[i]);
    }
    out("C_DestroyObject derive-key", f->C_DestroyObject(s, priv[1]), NULL);
    /* priv[0] and its copy stay: C_Logout must take them (checked after the logout). */
    kept_private[0] = priv[0];
    kept_private[1] = copy;
    out("C_DeriveKey NULL-handle", f->C_DeriveKey(s, &ecdh, eckey, derive_template, 7, NULL), NULL);

    /* AES-GCM: IV and AAD behind pointers. */
    unsigned char iv[12], aad[4] = { 'h', 'e', 'a', 'd' };
    memset(iv, 7, sizeof iv);
    CK_GCM_PARAMS gp = { iv, sizeof iv, 96, aad, sizeof aad, 128 };
    CK_MECHANISM gcm = { CKM_AES_GCM, &gp, sizeof gp };
    out("C_EncryptInit gcm", f->C_EncryptInit(s, &gcm, kek), NULL);
    n = sizeof buf;
    rv = f->C_Encrypt(s, (CK_BYTE *)"gcm plaintext", 13, buf, &n);
    CK_ULONG sealed = rv == CKR_OK ? n : 0;
    hex(buf, sealed, hx);
    out("C_Encrypt gcm", rv, "%s", hx);
    unsigned char opened[64];
    out("C_DecryptInit gcm", f->C_DecryptInit(s, &gcm, kek), NULL);
    n = sizeof opened;
    rv = f->C_Decrypt(s, buf, sealed, opened, &n);
    hex(opened, rv == CKR_OK ? n : 0, hx);
    out("C_Decrypt gcm", rv, "%s", hx);
    if (sealed > 0) buf[0] ^= 1;
    out("C_DecryptInit gcm tampered", f->C_DecryptInit(s, &gcm, kek), NULL);
    n = sizeof opened;
    out("C_Decrypt gcm tampered", f->C_Decrypt(s, buf, sealed, opened, &n), NULL);
    conformance_derive_data(s, kek, derive_template);
    out("C_DestroyObject aes", f->C_DestroyObject(s, kek), NULL);

    /* Functions neither SoftHSM nor OpenSC implements: the proxy must say the same. */
    n = sizeof buf;
    out("C_SignRecoverInit", f->C_SignRecoverInit(s, &rsa_pkcs, rsakey), NULL);
    out("C_VerifyRecoverInit", f->C_VerifyRecoverInit(s, &rsa_pkcs, rsapub), NULL);
    out("C_GetOperationState", f->C_GetOperationState(s, NULL, &n), NULL);
    out("C_SetOperationState", f->C_SetOperationState(s, buf, 16, 0, 0), NULL);
    n = sizeof buf;
    out("C_DigestEncryptUpdate", f->C_DigestEncryptUpdate(s, (CK_BYTE *)"abc", 3, buf, &n), NULL);
    n = sizeof buf;
    out("C_DecryptVerifyUpdate", f->C_DecryptVerifyUpdate(s, buf, 16, buf2_dummy(), &n), NULL);

    /* SoftHSM runs one operation at a time in a session, a search included (OpenSC runs one of
     * each kind): a second is CKR_OPERATION_ACTIVE, through the proxy as well. */
    CK_MECHANISM sha = { CKM_SHA256, NULL, 0 };
    out("C_FindObjectsInit one at a time", f->C_FindObjectsInit(s, NULL, 0), NULL);
    out("C_DigestInit during a search", f->C_DigestInit(s, &sha), NULL);
    out("C_FindObjectsFinal one at a time", f->C_FindObjectsFinal(s), NULL);
    out("C_DigestInit one at a time", f->C_DigestInit(s, &sha), NULL);
    out("C_FindObjectsInit during a digest", f->C_FindObjectsInit(s, NULL, 0), NULL);
    out("C_SignInit during a digest", f->C_SignInit(s, &rsa_pkcs, rsakey), NULL);
    out("C_EncryptInit during a digest", f->C_EncryptInit(s, &rsa_pkcs, rsapub), NULL);
    n = sizeof buf;
    rv = f->C_Digest(s, (CK_BYTE *)"abc", 3, buf, &n);
    hex(buf, rv == CKR_OK ? n : 0, hx);
    out("C_Digest one at a time", rv, "%s", hx);
    out("C_SignInit after the digest", f->C_SignInit(s, &rsa_pkcs, rsakey), NULL);
    out("C_DigestInit during a signature", f->C_DigestInit(s, &sha), NULL);
    n = sizeof buf;
    out("C_Sign one at a time", f->C_Sign(s, (CK_BYTE *)"abc", 3, buf, &n), NULL);
}

static int cmd_conformance(const char *label, const char *pin)
{
    char hx[2 * 1024 + 1];
    CK_RV rv;
    CK_ULONG n;
    out("C_Initialize", init_os_locking(), NULL);
    out("C_GetInfo NULL", f->C_GetInfo(NULL), NULL);
    out("C_GetSlotList NULL", f->C_GetSlotList(CK_TRUE, NULL, NULL), NULL);
    rv = f->C_GetSlotList(CK_TRUE, NULL, &n);
    out("C_GetSlotList query", rv, "%s", n > 0 ? "nonzero" : "zero");
    CK_ULONG small = 0;
    CK_SLOT_ID ids[1];
    rv = f->C_GetSlotList(CK_TRUE, ids, &small);
    out("C_GetSlotList small", rv, "%s", small == n ? "count-set" : "count-wrong");
    CK_SLOT_ID slot;
    if (!find_slot(label, &slot)) { fprintf(stderr, "token %s not found\n", label); return 2; }
    CK_TOKEN_INFO ti;
    out("C_GetTokenInfo NULL", f->C_GetTokenInfo(slot, NULL), NULL);
    rv = f->C_GetTokenInfo(slot, &ti);
    out("C_GetTokenInfo", rv, "initialized=%d login-required=%d user-pin=%d", !!(ti.flags & CKF_TOKEN_INITIALIZED),
        !!(ti.flags & CKF_LOGIN_REQUIRED), !!(ti.flags & CKF_USER_PIN_INITIALIZED));
    CK_SLOT_INFO si;
    rv = f->C_GetSlotInfo(slot, &si);
    out("C_GetSlotInfo", rv, "present=%d", !!(si.flags & CKF_TOKEN_PRESENT));
    out("C_GetSlotInfo invalid", f->C_GetSlotInfo(0x7ffffff0, &si), NULL);
    rv = f->C_GetMechanismList(slot, NULL, &n);
    out("C_GetMechanismList", rv, "%s", n > 0 ? "nonzero" : "zero");
    CK_MECHANISM_INFO mi;
    rv = f->C_GetMechanismInfo(slot, CKM_ECDSA, &mi);
    out("C_GetMechanismInfo ECDSA", rv, "sign=%d", !!(mi.flags & CKF_SIGN));
    out("C_GetMechanismInfo bogus", f->C_GetMechanismInfo(slot, 0x7ffffff0, &mi), NULL);

    CK_SESSION_HANDLE s;
    out("C_OpenSession no-serial", f->C_OpenSession(slot, 0, NULL, NULL, &s), NULL);
    out("C_OpenSession NULL", f->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, NULL), NULL);
    out("C_OpenSession", f->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s), NULL);
    CK_SESSION_INFO info;
    out("C_GetSessionInfo NULL", f->C_GetSessionInfo(s, NULL), NULL);
    rv = f->C_GetSessionInfo(s, &info);
    out("C_GetSessionInfo", rv, "state=%lu rw=%d", info.state, !!(info.flags & CKF_RW_SESSION));
    out("C_Login wrong", f->C_Login(s, CKU_USER, (CK_UTF8CHAR *)"0000", 4), NULL);
    out("C_Login bad-type", f->C_Login(s, 77, (CK_UTF8CHAR *)pin, strlen(pin)), NULL);
    out("C_Login", f->C_Login(s, CKU_USER, (CK_UTF8CHAR *)pin, strlen(pin)), NULL);
    out("C_Login again", f->C_Login(s, CKU_USER, (CK_UTF8CHAR *)pin, strlen(pin)), NULL);
    rv = f->C_GetSessionInfo(s, &info);
    out("C_GetSessionInfo logged-in", rv, "state=%lu", info.state);

    CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
    unsigned char id = 1;
    CK_ATTRIBUTE t[] = { { CKA_CLASS, &cls, sizeof cls }, { CKA_ID, &id, 1 } };
    out("C_FindObjectsInit", f->C_FindObjectsInit(s, t, 2), NULL);
    out("C_FindObjectsInit again", f->C_FindObjectsInit(s, t, 2), NULL);
    CK_OBJECT_HANDLE objs[4];
    out("C_FindObjects NULL", f->C_FindObjects(s, NULL, 4, &n), NULL);
    rv = f->C_FindObjects(s, objs, 4, &n);
    out("C_FindObjects", rv, "%lu", n);
    CK_OBJECT_HANDLE eckey = objs[0];
    rv = f->C_FindObjects(s, objs, 4, &n);
    out("C_FindObjects end", rv, "%lu", n);
    out("C_FindObjectsFinal", f->C_FindObjectsFinal(s), NULL);
    out("C_FindObjectsFinal again", f->C_FindObjectsFinal(s), NULL);
    out("C_FindObjects not-init", f->C_FindObjects(s, objs, 4, &n), NULL);
    out("C_FindObjectsInit NULL", f->C_FindObjectsInit(s, NULL, 2), NULL);
    f->C_FindObjectsFinal(s);

    CK_ULONG size = 0;
    rv = f->C_GetObjectSize(s, eckey, &size);
    out("C_GetObjectSize", rv, "%s", size > 0 ? "nonzero" : "zero");
    out("C_GetObjectSize NULL", f->C_GetObjectSize(s, eckey, NULL), NULL);

    CK_KEY_TYPE kt = 0;
    CK_ATTRIBUTE a1[] = { { CKA_KEY_TYPE, NULL, 0 } };
    rv = f->C_GetAttributeValue(s, eckey, a1, 1);
    out("C_GetAttributeValue query", rv, "len=%lu", a1[0].ulValueLen);
    a1[0].pValue = &kt;
    rv = f->C_GetAttributeValue(s, eckey, a1, 1);
    out("C_GetAttributeValue key-type", rv, "len=%lu type=%lu", a1[0].ulValueLen, kt);
    unsigned char buf[4096], buf2[4096];
    CK_ATTRIBUTE a2[] = { { CKA_VALUE, buf, sizeof buf } };
    rv = f->C_GetAttributeValue(s, eckey, a2, 1);
    out("C_GetAttributeValue sensitive", rv, "len=%s", a2[0].ulValueLen == CK_UNAVAILABLE_INFORMATION ? "unavailable" : "set");
    CK_ATTRIBUTE a3[] = { { 0x7fff0001UL, buf, sizeof buf } };
    rv = f->C_GetAttributeValue(s, eckey, a3, 1);
    out("C_GetAttributeValue invalid", rv, "len=%s", a3[0].ulValueLen == CK_UNAVAILABLE_INFORMATION ? "unavailable" : "set");
    CK_ATTRIBUTE a4[] = { { CKA_LABEL, buf, 2 } };
    rv = f->C_GetAttributeValue(s, eckey, a4, 1);
    out("C_GetAttributeValue small", rv, "len=%s", a4[0].ulValueLen == CK_UNAVAILABLE_INFORMATION ? "unavailable" : "set");
    CK_ATTRIBUTE a5[] = { { CKA_LABEL, buf, sizeof buf }, { 0x7fff0001UL, NULL, 0 }, { CKA_ID, buf2, sizeof buf2 } };
    rv = f->C_GetAttributeValue(s, eckey, a5, 3);
    out("C_GetAttributeValue mixed", rv, "label=%.*s id-len=%lu", (int)(a5[0].ulValueLen < 64 ? a5[0].ulValueLen : 0),
        (char *)buf, a5[2].ulValueLen);
    out("C_GetAttributeValue NULL", f->C_GetAttributeValue(s, eckey, NULL, 1), NULL);

    unsigned char digest[32];
    memset(digest, 0x5a, sizeof digest);
    CK_MECHANISM ecdsa = { CKM_ECDSA, NULL, 0 };
    out("C_Sign not-init", f->C_Sign(s, digest, 32, buf, &n), NULL);
    out("C_SignInit NULL", f->C_SignInit(s, NULL, eckey), NULL);
    out("C_SignInit bogus-mech", f->C_SignInit(s, &(CK_MECHANISM){0x7ffffff0, NULL, 0}, eckey), NULL);
    out("C_SignInit", f->C_SignInit(s, &ecdsa, eckey), NULL);
    out("C_SignInit again", f->C_SignInit(s, &ecdsa, eckey), NULL);
    n = 0;
    rv = f->C_Sign(s, digest, 32, NULL, &n);
    out("C_Sign query", rv, "%lu", n);
    n = 10;
    rv = f->C_Sign(s, digest, 32, buf, &n);
    out("C_Sign small", rv, "%lu", n);
    n = sizeof buf;
    rv = f->C_Sign(s, digest, 32, buf, &n);
    out("C_Sign", rv, "%lu", n);
    out("C_Sign ended", f->C_Sign(s, digest, 32, buf, &n), NULL);
    out("C_SignInit 2", f->C_SignInit(s, &ecdsa, eckey), NULL);
    out("C_Sign NULL len", f->C_Sign(s, digest, 32, buf, NULL), NULL);
    out("C_Sign after bad args", f->C_Sign(s, digest, 32, buf, &n), NULL);

    CK_MECHANISM ecdsa256 = { CKM_ECDSA_SHA256, NULL, 0 };
    out("C_SignInit multi", f->C_SignInit(s, &ecdsa256, eckey), NULL);
    out("C_SignUpdate 1", f->C_SignUpdate(s, (CK_BYTE *)"hello ", 6), NULL);
    out("C_SignUpdate 2", f->C_SignUpdate(s, (CK_BYTE *)"world", 5), NULL);
    n = 0;
    rv = f->C_SignFinal(s, NULL, &n);
    out("C_SignFinal query", rv, "%lu", n);
    n = sizeof buf;
    rv = f->C_SignFinal(s, buf, &n);
    out("C_SignFinal", rv, "%lu", n);

    CK_OBJECT_HANDLE rsakey;
    id = 2;
    out("find rsa", find_key(s, CKO_PRIVATE_KEY, 2, &rsakey), NULL);
    CK_MECHANISM rsa = { CKM_SHA256_RSA_PKCS, NULL, 0 };
    out("C_SignInit rsa", f->C_SignInit(s, &rsa, rsakey), NULL);
    n = sizeof buf;
    rv = f->C_Sign(s, (CK_BYTE *)"message", 7, buf, &n);
    hex(buf, rv == CKR_OK ? n : 0, hx);
    out("C_Sign rsa", rv, "%s", hx);
    out("C_SignInit rsa multi", f->C_SignInit(s, &rsa, rsakey), NULL);
    out("C_SignUpdate rsa", f->C_SignUpdate(s, (CK_BYTE *)"mess", 4), NULL);
    out("C_SignUpdate rsa 2", f->C_SignUpdate(s, (CK_BYTE *)"age", 3), NULL);
    n = sizeof buf;
    rv = f->C_SignFinal(s, buf, &n);
    hex(buf, rv == CKR_OK ? n : 0, hx);
    out("C_SignFinal rsa", rv, "%s", hx);
    CK_MECHANISM pss;
    mechanism_by_name("RSA-PSS-SHA256", &pss);
    out("C_SignInit pss", f->C_SignInit(s, &pss, rsakey), NULL);
    n = sizeof buf;
    rv = f->C_Sign(s, (CK_BYTE *)"message", 7, buf, &n);
    out("C_Sign pss", rv, "%lu", n);

    /* Init-time verdicts (issue 13 §5): each of these fails at C_*Init, as on the token. */
    CK_OBJECT_HANDLE ecpub = 0, rsapub = 0;
    out("find ec public", find_key(s, CKO_PUBLIC_KEY, 1, &ecpub), NULL);
    out("find rsa public", find_key(s, CKO_PUBLIC_KEY, 2, &rsapub), NULL);
    out("C_SignInit invalid-handle", f->C_SignInit(s, &ecdsa, 0x7ffffff0), NULL);
    /* A key type that does not suit the mechanism: SoftHSM starts the operation and fails
     * at C_Sign, and so does the proxy (it leaves that verdict to the token). */
    out("C_SignInit public-key", f->C_SignInit(s, &ecdsa, ecpub), NULL);
    out("C_VerifyInit private-key", f->C_VerifyInit(s, &ecdsa, eckey), NULL);
    CK_MECHANISM rsa_pkcs = { CKM_RSA_PKCS, NULL, 0 };
    out("C_DecryptInit ec-key", f->C_DecryptInit(s, &rsa_pkcs, eckey), NULL);
    out("C_EncryptInit private-key", f->C_EncryptInit(s, &rsa_pkcs, rsakey), NULL);
    out("C_VerifyInit ok", f->C_VerifyInit(s, &ecdsa, ecpub), NULL);
    n = sizeof buf;
    out("C_Verify bad-signature", f->C_Verify(s, digest, 32, buf, 64), NULL);

    CK_MECHANISM sha = { CKM_SHA256, NULL, 0 };
    out("C_DigestInit", f->C_DigestInit(s, &sha), NULL);
    n = sizeof buf;
    rv = f->C_Digest(s, (CK_BYTE *)"abc", 3, buf, &n);
    hex(buf, rv == CKR_OK ? n : 0, hx);
    out("C_Digest", rv, "%s", hx);
    out("C_DigestInit multi", f->C_DigestInit(s, &sha), NULL);
    out("C_DigestUpdate", f->C_DigestUpdate(s, (CK_BYTE *)"a", 1), NULL);
    out("C_DigestUpdate 2", f->C_DigestUpdate(s, (CK_BYTE *)"bc", 2), NULL);
    n = 4;
    rv = f->C_DigestFinal(s, buf, &n);
    out("C_DigestFinal small", rv, "%lu", n);
    n = sizeof buf;
    rv = f->C_DigestFinal(s, buf, &n);
    hex(buf, rv == CKR_OK ? n : 0, hx);
    out("C_DigestFinal", rv, "%s", hx);

    /* C_DigestKey (issue 13 §7) on a secret key of known value, between two updates. */
    CK_OBJECT_CLASS secret_class = CKO_SECRET_KEY;
    CK_KEY_TYPE generic = CKK_GENERIC_SECRET;
    CK_BBOOL no = CK_FALSE, yes = CK_TRUE;
    unsigned char secret_value[32];
    memset(secret_value, 0x42, sizeof secret_value);
    CK_ATTRIBUTE secret_template[] = {
        { CKA_CLASS, &secret_class, sizeof secret_class }, { CKA_KEY_TYPE, &generic, sizeof generic },
        { CKA_TOKEN, &no, 1 }, { CKA_PRIVATE, &no, 1 }, { CKA_SENSITIVE, &no, 1 }, { CKA_EXTRACTABLE, &yes, 1 },
        { CKA_VALUE, secret_value, sizeof secret_value },
    };
    CK_OBJECT_HANDLE secret = 0;
    out("C_CreateObject secret", f->C_CreateObject(s, secret_template, 7, &secret), NULL);
    out("C_DigestInit keyed", f->C_DigestInit(s, &sha), NULL);
    out("C_DigestUpdate keyed", f->C_DigestUpdate(s, (CK_BYTE *)"before", 6), NULL);
    out("C_DigestKey", f->C_DigestKey(s, secret), NULL);
    out("C_DigestUpdate keyed 2", f->C_DigestUpdate(s, (CK_BYTE *)"after", 5), NULL);
    n = sizeof buf;
    rv = f->C_DigestFinal(s, buf, &n);
    hex(buf, rv == CKR_OK ? n : 0, hx);
    out("C_DigestFinal keyed", rv, "%s", hx);
    out("C_DigestInit key-first", f->C_DigestInit(s, &sha), NULL);
    out("C_DigestKey first", f->C_DigestKey(s, secret), NULL);
    n = sizeof buf;
    rv = f->C_DigestFinal(s, buf, &n);
    hex(buf, rv == CKR_OK ? n : 0, hx);
    out("C_DigestFinal key-only", rv, "%s", hx);
    out("C_DigestKey not-init", f->C_DigestKey(s, secret), NULL);
    CK_OBJECT_HANDLE session_private_keys[2] = { 0, 0 };
    conformance_keys(s, secret, eckey, ecpub, rsakey, rsapub, session_private_keys);
    conformance_mechanisms(slot, s, rsakey, rsapub, eckey, ecpub);
    conformance_array_attributes(s);
    out("C_DestroyObject secret", f->C_DestroyObject(s, secret), NULL);

    out("C_GenerateRandom NULL", f->C_GenerateRandom(s, NULL, 16), NULL);
    out("C_GenerateRandom", f->C_GenerateRandom(s, buf, 16), NULL);

    out("C_Logout", f->C_Logout(s), NULL);
    /* Not checked: C_Logout when logged out. SoftHSM answers CKR_OK, pincached the
     * CKR_USER_NOT_LOGGED_IN the standard asks for. */
    rv = f->C_GetSessionInfo(s, &info);
    out("C_GetSessionInfo logged-out", rv, "state=%lu", info.state);
    CK_OBJECT_CLASS gone_class = 0;
    CK_ATTRIBUTE gone[] = { { CKA_CLASS, &gone_class, sizeof gone_class } };
    out("C_GetAttributeValue private session key after logout", f->C_GetAttributeValue(s, session_private_keys[0], gone, 1), NULL);
    out("C_GetAttributeValue its copy after logout", f->C_GetAttributeValue(s, session_private_keys[1], gone, 1), NULL);
    /* Not checked: signing with a private key after logout. SoftHSM hides the key
     * (CKR_OBJECT_HANDLE_INVALID at SignInit); pincached keeps handles stable per caller
     * and answers its policy's CKR_USER_NOT_LOGGED_IN (test_proxy.py checks that). */
    out("C_CloseSession", f->C_CloseSession(s), NULL);
    out("C_CloseSession again", f->C_CloseSession(s), NULL);
    out("C_Finalize reserved", f->C_Finalize(&n), NULL);
    out("C_Finalize", f->C_Finalize(NULL), NULL);
    out("C_Finalize again", f->C_Finalize(NULL), NULL);
    return 0;
}

/* The setup of the whole-program commands: OS locking, the token labelled `label`, a session
 * (`flags` beyond CKF_SERIAL_SESSION) and the user's login, whose verdict is printed. */
static int open_logged_in(const char *label, const char *pin, CK_FLAGS flags, CK_SLOT_ID *slot, CK_SESSION_HANDLE *s)
{
    if (init_os_locking() != CKR_OK || !find_slot(label, slot)) return 0;
    if (f->C_OpenSession(*slot, CKF_SERIAL_SESSION | flags, NULL, NULL, s) != CKR_OK) return 0;
    out("C_Login", f->C_Login(*s, CKU_USER, (CK_UTF8CHAR *)pin, strlen(pin)), NULL);
    return 1;
}

/* ----------------------------------------------------------------- sweep */

/* Every mechanism the token lists, in every operation, with every kind of key: a module may
 * trust its caller about key types (SoftHSM crashes on CKM_DSA with any other key), and
 * through the proxy nothing a program asks may take the daemon down. Prints how many calls
 * were made and how many answered CKR_DEVICE_REMOVED or CKR_DEVICE_ERROR (the daemon gone). */
static int cmd_sweep(const char *label, const char *pin)
{
    CK_SLOT_ID slot;
    CK_SESSION_HANDLE s;
    if (!open_logged_in(label, pin, CKF_RW_SESSION, &slot, &s)) return 2;
    CK_OBJECT_CLASS c = CKO_SECRET_KEY;
    CK_KEY_TYPE gk = CKK_GENERIC_SECRET, ak = CKK_AES;
    CK_BBOOL no = CK_FALSE, yes = CK_TRUE;
    unsigned char v[32];
    memset(v, 3, sizeof v);
    CK_ATTRIBUTE t[] = {
        { CKA_CLASS, &c, sizeof c }, { CKA_KEY_TYPE, &gk, sizeof gk }, { CKA_TOKEN, &no, 1 },
        { CKA_SIGN, &yes, 1 }, { CKA_VERIFY, &yes, 1 }, { CKA_ENCRYPT, &yes, 1 }, { CKA_DECRYPT, &yes, 1 },
        { CKA_DERIVE, &yes, 1 }, { CKA_WRAP, &yes, 1 }, { CKA_UNWRAP, &yes, 1 }, { CKA_EXTRACTABLE, &yes, 1 },
        { CKA_VALUE, v, 32 },
    };
    CK_OBJECT_HANDLE keys[6] = { 0 };
    out("C_CreateObject generic", f->C_CreateObject(s, t, 12, &keys[0]), NULL);
    t[1].pValue = &ak;
    t[11].ulValueLen = 16;
    out("C_CreateObject aes", f->C_CreateObject(s, t, 12, &keys[1]), NULL);
    out("find rsa", find_key(s, CKO_PRIVATE_KEY, 2, &keys[2]), NULL);
    out("find rsa public", find_key(s, CKO_PUBLIC_KEY, 2, &keys[3]), NULL);
    out("find ec", find_key(s, CKO_PRIVATE_KEY, 1, &keys[4]), NULL);
    out("find ec public", find_key(s, CKO_PUBLIC_KEY, 1, &keys[5]), NULL);
    CK_MECHANISM_TYPE list[1024];
    CK_ULONG n = 1024;
    out("C_GetMechanismList", f->C_GetMechanismList(slot, list, &n), NULL);
    unsigned long calls = 0, gone = 0;
    for (CK_ULONG i = 0; i < n; i++) {
        for (int op = 0; op < 7; op++) {
            for (int k = 0; k < 6; k++) {
                CK_MECHANISM m = { list[i], NULL, 0 };
                unsigned char in[256], buf[4096];
                memset(in, 1, sizeof in);
                CK_ULONG len = sizeof buf;
                CK_OBJECT_HANDLE made = 0;
                CK_ULONG vl = 16;
                CK_ATTRIBUTE nt[] = { { CKA_CLASS, &c, sizeof c }, { CKA_KEY_TYPE, &gk, sizeof gk },
                                      { CKA_TOKEN, &no, 1 }, { CKA_VALUE_LEN, &vl, sizeof vl } };
                CK_RV rv = CKR_OK;
                switch (op) {
                case 0: rv = f->C_SignInit(s, &m, keys[k]); if (rv == CKR_OK) rv = f->C_Sign(s, in, 32, buf, &len); break;
                case 1: rv = f->C_VerifyInit(s, &m, keys[k]); if (rv == CKR_OK) rv = f->C_Verify(s, in, 32, in, 64); break;
                case 2: rv = f->C_EncryptInit(s, &m, keys[k]); if (rv == CKR_OK) rv = f->C_Encrypt(s, in, 32, buf, &len); break;
                case 3: rv = f->C_DecryptInit(s, &m, keys[k]); if (rv == CKR_OK) rv = f->C_Decrypt(s, in, 256, buf, &len); break;
                case 4: rv = f->C_DeriveKey(s, &m, keys[k], nt, 4, &made); break;
                case 5: rv = f->C_WrapKey(s, &m, keys[k], keys[0], buf, &len); break;
                case 6: rv = f->C_UnwrapKey(s, &m, keys[k], in, 40, nt, 3, &made); break;
                }
                if (made) f->C_DestroyObject(s, made);
                calls++;
                if (rv == CKR_DEVICE_REMOVED || rv == CKR_DEVICE_ERROR) {
                    if (gone++ < 5) printf("gone mech=0x%lx op=%d key=%d\n", list[i], op, k);
                }
            }
        }
    }
    CK_SESSION_INFO info;
    out("C_GetSessionInfo after", f->C_GetSessionInfo(s, &info), NULL);
    out("sweep", CKR_OK, "calls=%lu gone=%lu", calls, gone);
    f->C_CloseSession(s);
    f->C_Finalize(NULL);
    return 0;
}

/* --------------------------------------------------------------- threads */

struct worker {
    CK_SLOT_ID slot;
    int iterations;
    int ok;
    CK_RV last;
};

static void *work(void *arg)
{
    struct worker *w = arg;
    CK_SESSION_HANDLE s;
    w->last = f->C_OpenSession(w->slot, CKF_SERIAL_SESSION, NULL, NULL, &s);
    if (w->last != CKR_OK) return NULL;
    unsigned char digest[32], sig[512];
    for (int i = 0; i < w->iterations; i++) {
        memset(digest, i, sizeof digest);
        CK_ULONG n = sizeof sig;
        w->last = sign(s, 1, "ECDSA", digest, 32, NULL, sig, &n);
        if (w->last == CKR_OK && n == 64) w->ok++;
    }
    f->C_CloseSession(s);
    return NULL;
}

static int cmd_threads(const char *label, const char *pin, int nthreads, int iterations)
{
    out("C_Initialize", init_os_locking(), NULL);
    CK_SLOT_ID slot;
    if (!find_slot(label, &slot)) return 2;
    CK_SESSION_HANDLE s;
    out("C_OpenSession", f->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s), NULL);
    out("C_Login", f->C_Login(s, CKU_USER, (CK_UTF8CHAR *)pin, strlen(pin)), NULL);
    pthread_t tids[64];
    struct worker ws[64];
    if (nthreads > 64) nthreads = 64;
    for (int i = 0; i < nthreads; i++) {
        ws[i] = (struct worker){ slot, iterations, 0, 0 };
        pthread_create(&tids[i], NULL, work, &ws[i]);
    }
    int total = 0;
    for (int i = 0; i < nthreads; i++) {
        pthread_join(tids[i], NULL);
        total += ws[i].ok;
        if (ws[i].ok != iterations) out("worker", ws[i].last, "%d ok=%d", i, ws[i].ok);
    }
    out("signatures", CKR_OK, "%d", total);
    f->C_CloseSession(s);
    out("C_Finalize", f->C_Finalize(NULL), NULL);
    return 0;
}

/* ------------------------------------------------------------------ fork */

/* ----------------------------------------------------------------- streams */

/* Multi-part encryption part by part (issue 13 §10): `mib` MiB through AES-CTR with a public
 * session key in 1 MiB parts (more than any one call may carry through the proxy), then
 * decrypted back in other parts. Prints the bytes each direction produced, an FNV-1a hash of
 * the ciphertext (equal directly and through the proxy), and whether the round trip held. */
static int cmd_bigstream(const char *label, const char *pin, int mib)
{
    CK_SLOT_ID slot;
    CK_SESSION_HANDLE s;
    if (!open_logged_in(label, pin, 0, &slot, &s)) return 2;
    CK_OBJECT_CLASS c = CKO_SECRET_KEY;
    CK_KEY_TYPE ak = CKK_AES;
    CK_BBOOL no = CK_FALSE, yes = CK_TRUE;
    unsigned char v[16];
    memset(v, 0x5a, sizeof v);
    CK_ATTRIBUTE t[] = { { CKA_CLASS, &c, sizeof c }, { CKA_KEY_TYPE, &ak, sizeof ak }, { CKA_TOKEN, &no, 1 },
                         { CKA_PRIVATE, &no, 1 }, { CKA_ENCRYPT, &yes, 1 }, { CKA_DECRYPT, &yes, 1 }, { CKA_VALUE, v, 16 } };
    CK_OBJECT_HANDLE key = 0;
    out("C_CreateObject stream key", f->C_CreateObject(s, t, 7, &key), NULL);
    CK_AES_CTR_PARAMS ctr = { 128, { 0 } };
    CK_MECHANISM m = { CKM_AES_CTR, &ctr, sizeof ctr };
    const size_t part = 1 << 20;
    unsigned char *in = malloc(part), *sealed = malloc(part), *opened = malloc(part);
    if (!in || !sealed || !opened) return 2;
    uint64_t hash = 1469598103934665603ULL;
    unsigned long produced = 0, restored = 0, mismatches = 0;
    CK_RV rv = f->C_EncryptInit(s, &m, key);
    for (int i = 0; i < mib && rv == CKR_OK; i++) {
        for (size_t j = 0; j < part; j++) in[j] = (unsigned char)(i * 31 + j * 7);
        CK_ULONG n = part;
        rv = f->C_EncryptUpdate(s, in, part, sealed, &n);
        if (rv != CKR_OK) break;
        produced += n;
        for (CK_ULONG j = 0; j < n; j++) hash = (hash ^ sealed[j]) * 1099511628211ULL;
    }
    CK_ULONG n = part;
    if (rv == CKR_OK) rv = f->C_EncryptFinal(s, sealed, &n);
    out("stream encrypt", rv, "%lu %016llx", produced + (rv == CKR_OK ? n : 0), (unsigned long long)hash);
    /* Encrypting the same parts again in one session while another decrypts each in halves
     * (SoftHSM runs one operation per session), compared with the input part by part. */
    CK_SESSION_HANDLE s2;
    if (f->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s2) != CKR_OK) return 2;
    rv = f->C_EncryptInit(s, &m, key);
    if (rv == CKR_OK) rv = f->C_DecryptInit(s2, &m, key);
    for (int i = 0; i < mib && rv == CKR_OK; i++) {
        for (size_t j = 0; j < part; j++) in[j] = (unsigned char)(i * 31 + j * 7);
        n = part;
        rv = f->C_EncryptUpdate(s, in, part, sealed, &n);
        CK_ULONG half = n / 2, m1 = part, m2 = part;
        if (rv == CKR_OK) rv = f->C_DecryptUpdate(s2, sealed, half, opened, &m1);
        if (rv == CKR_OK) rv = f->C_DecryptUpdate(s2, sealed + half, n - half, opened + m1, &m2);
        if (rv != CKR_OK) break;
        restored += m1 + m2;
        if (m1 + m2 != part || memcmp(in, opened, part)) mismatches++;
    }
    n = part;
    if (rv == CKR_OK) rv = f->C_DecryptFinal(s2, opened, &n);
    n = part;
    CK_RV ended = f->C_EncryptFinal(s, sealed, &n);
    if (rv == CKR_OK) rv = ended;
    out("stream decrypt", rv, "%lu mismatches=%lu", restored, mismatches);

    /* A digest, an HMAC (a public secret key) and its verification over the same parts:
     * streamed once past 1 MiB. */
    CK_KEY_TYPE gk = CKK_GENERIC_SECRET;
    unsigned char mac_value[32];
    memset(mac_value, 0x3c, sizeof mac_value);
    CK_ATTRIBUTE ht[] = { { CKA_CLASS, &c, sizeof c }, { CKA_KEY_TYPE, &gk, sizeof gk }, { CKA_TOKEN, &no, 1 },
                          { CKA_PRIVATE, &no, 1 }, { CKA_SIGN, &yes, 1 }, { CKA_VERIFY, &yes, 1 }, { CKA_VALUE, mac_value, 32 } };
    CK_OBJECT_HANDLE hmac = 0;
    out("C_CreateObject stream hmac key", f->C_CreateObject(s, ht, 7, &hmac), NULL);
    CK_MECHANISM sha = { CKM_SHA256, NULL, 0 }, mac = { CKM_SHA256_HMAC, NULL, 0 };
    unsigned char digest[32], signature[32];
    char hx[65];
    CK_RV d = f->C_DigestInit(s, &sha), g = f->C_SignInit(s2, &mac, hmac);
    for (int i = 0; i < mib && d == CKR_OK && g == CKR_OK; i++) {
        for (size_t j = 0; j < part; j++) in[j] = (unsigned char)(i * 31 + j * 7);
        d = f->C_DigestUpdate(s, in, part);
        g = f->C_SignUpdate(s2, in, part);
    }
    n = sizeof digest;
    if (d == CKR_OK) d = f->C_DigestFinal(s, digest, &n);
    hex(digest, d == CKR_OK ? n : 0, hx);
    out("stream digest", d, "%s", hx);
    n = sizeof signature;
    if (g == CKR_OK) g = f->C_SignFinal(s2, signature, &n);
    hex(signature, g == CKR_OK ? n : 0, hx);
    out("stream hmac", g, "%s", hx);
    CK_RV vr = f->C_VerifyInit(s, &mac, hmac);
    for (int i = 0; i < mib && vr == CKR_OK; i++) {
        for (size_t j = 0; j < part; j++) in[j] = (unsigned char)(i * 31 + j * 7);
        vr = f->C_VerifyUpdate(s, in, part);
    }
    if (vr == CKR_OK) vr = f->C_VerifyFinal(s, signature, 32);
    out("stream verify", vr, NULL);
    signature[0] ^= 1;
    vr = f->C_VerifyInit(s, &mac, hmac);
    for (int i = 0; i < 2 && vr == CKR_OK; i++) vr = f->C_VerifyUpdate(s, in, part);
    if (vr == CKR_OK) vr = f->C_VerifyFinal(s, signature, 32);
    out("stream verify tampered", vr, NULL);
    free(in);
    free(sealed);
    free(opened);
    /* Everything the library holds goes (LeakSanitizer reads what is left at exit). */
    f->C_Finalize(NULL);
    return 0;
}

/* A decryption streamed in a login the caller holds (non-caching mode) ends with that login:
 * after C_Logout its next part finds no operation, and the key's private value is not used
 * past the login that allowed it. (SoftHSM itself keeps such an operation going.) */
static int cmd_logoutstream(const char *label, const char *pin)
{
    CK_SLOT_ID slot;
    CK_SESSION_HANDLE s;
    if (!open_logged_in(label, pin, CKF_RW_SESSION, &slot, &s)) return 2;
    CK_MECHANISM gen = { CKM_AES_KEY_GEN, NULL, 0 };
    CK_BBOOL yes = CK_TRUE;
    CK_ULONG len = 16;
    CK_ATTRIBUTE t[] = { { CKA_TOKEN, &yes, 1 }, { CKA_PRIVATE, &yes, 1 }, { CKA_ENCRYPT, &yes, 1 },
                         { CKA_DECRYPT, &yes, 1 }, { CKA_VALUE_LEN, &len, sizeof len } };
    CK_OBJECT_HANDLE key = 0;
    out("C_GenerateKey token", f->C_GenerateKey(s, &gen, t, 5, &key), NULL);
    unsigned char iv[16] = { 0 }, data[32], buf[64];
    memset(data, 0x44, sizeof data);
    CK_MECHANISM m = { CKM_AES_CBC, iv, 16 };
    CK_ULONG n = sizeof buf;
    CK_RV rv = f->C_DecryptInit(s, &m, key);
    if (rv == CKR_OK) rv = f->C_DecryptUpdate(s, data, sizeof data, buf, &n);
    out("part in the login", rv, "%lu", rv == CKR_OK ? n : 0);
    out("C_Logout", f->C_Logout(s), NULL);
    n = sizeof buf;
    out("part after the logout", f->C_DecryptUpdate(s, data, sizeof data, buf, &n), NULL);
    out("C_Login again", f->C_Login(s, CKU_USER, (CK_UTF8CHAR *)pin, strlen(pin)), NULL);
    n = sizeof buf;
    f->C_DecryptFinal(s, buf, &n);
    out("C_DestroyObject token key", f->C_DestroyObject(s, key), NULL);
    f->C_Finalize(NULL);
    return 0;
}

/* A signature with the token's private RSA key over `mib` MiB in 1 MiB parts: past the first
 * MiB the proxy asks to stream, the daemon declines (a private key's signature keeps to its
 * own path), and the parts are gathered for one signature at the final call. */
static int cmd_bigsign(const char *label, const char *pin, int mib)
{
    CK_SLOT_ID slot;
    CK_SESSION_HANDLE s;
    if (!open_logged_in(label, pin, 0, &slot, &s)) return 2;
    CK_OBJECT_HANDLE key = 0;
    out("find rsa", find_key(s, CKO_PRIVATE_KEY, 2, &key), NULL);
    CK_MECHANISM m = { CKM_SHA256_RSA_PKCS, NULL, 0 };
    const size_t part = 1 << 20;
    unsigned char *in = malloc(part), sig[512];
    char hx[2 * 512 + 1];
    if (!in) return 2;
    memset(in, 0x17, part);
    CK_RV rv = f->C_SignInit(s, &m, key);
    for (int i = 0; i < mib && rv == CKR_OK; i++) rv = f->C_SignUpdate(s, in, part);
    CK_ULONG n = sizeof sig;
    if (rv == CKR_OK) rv = f->C_SignFinal(s, sig, &n);
    hex(sig, rv == CKR_OK ? n : 0, hx);
    out("big sign", rv, "%s", hx);
    free(in);
    f->C_Finalize(NULL);
    return 0;
}

/* A private AES key (CKA_PRIVATE TRUE; on the token, or a session key with `on_token` 0), in a
 * two-part CBC-PAD encryption of 64 bytes:
 * what each update and the final call produced, then the decryption's result. Caching mode
 * gathers such parts for the final call (the key's login lasts one call); a held login and
 * the token itself give each part's blocks as they come. */
static int cmd_tokenkeyparts(const char *label, const char *pin, int on_token)
{
    CK_SLOT_ID slot;
    CK_SESSION_HANDLE s;
    if (!open_logged_in(label, pin, CKF_RW_SESSION, &slot, &s)) return 2;
    CK_MECHANISM gen = { CKM_AES_KEY_GEN, NULL, 0 };
    CK_BBOOL yes = CK_TRUE, token = on_token ? CK_TRUE : CK_FALSE;
    CK_ULONG len = 16;
    CK_ATTRIBUTE t[] = { { CKA_TOKEN, &token, 1 }, { CKA_PRIVATE, &yes, 1 }, { CKA_ENCRYPT, &yes, 1 },
                         { CKA_DECRYPT, &yes, 1 }, { CKA_VALUE_LEN, &len, sizeof len } };
    CK_OBJECT_HANDLE key = 0;
    out("C_GenerateKey token", f->C_GenerateKey(s, &gen, t, 5, &key), NULL);
    unsigned char iv[16] = { 0 }, data[64], sealed[128], opened[128];
    memset(data, 0x61, sizeof data);
    CK_MECHANISM m = { CKM_AES_CBC_PAD, iv, 16 };
    CK_ULONG n1 = sizeof sealed, n2, n3, total;
    CK_RV rv = f->C_EncryptInit(s, &m, key);
    /* A length query first, as many programs make: it must consume nothing. */
    if (rv == CKR_OK) rv = f->C_EncryptUpdate(s, data, 40, NULL, &n1);
    n1 = sizeof sealed;
    if (rv == CKR_OK) rv = f->C_EncryptUpdate(s, data, 40, sealed, &n1);
    n2 = sizeof sealed - n1;
    if (rv == CKR_OK) rv = f->C_EncryptUpdate(s, data + 40, 24, sealed + n1, &n2);
    n3 = sizeof sealed - n1 - n2;
    if (rv == CKR_OK) rv = f->C_EncryptFinal(s, sealed + n1 + n2, &n3);
    out("parts", rv, "%lu %lu %lu", n1, n2, n3);
    total = rv == CKR_OK ? n1 + n2 + n3 : 0;
    CK_ULONG d1 = sizeof opened, d2;
    rv = f->C_DecryptInit(s, &m, key);
    if (rv == CKR_OK) rv = f->C_DecryptUpdate(s, sealed, total, opened, &d1);
    d2 = sizeof opened - d1;
    if (rv == CKR_OK) rv = f->C_DecryptFinal(s, opened + d1, &d2);
    out("opened", rv, "%s", rv == CKR_OK && d1 + d2 == sizeof data && !memcmp(opened, data, sizeof data) ? "same" : "differ");
    out("C_DestroyObject token key", f->C_DestroyObject(s, key), NULL);
    f->C_Finalize(NULL);
    return 0;
}

/* ------------------------------------------------------------- optional */

/* The functions PKCS#11 lets a module leave out, on a module that has them (the fault shim
 * with `optional_functions`): sign and verify with recovery, each dual-function update with
 * its length query, and operation state. `private_aes`: the AES key is CKA_PRIVATE. */
static void optional_duals(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE rsakey, CK_OBJECT_HANDLE rsapub, int private_aes)
{
    char hx[2 * 512 + 1];
    CK_MECHANISM gen = { CKM_AES_KEY_GEN, NULL, 0 };
    CK_BBOOL yes = CK_TRUE, priv = private_aes ? CK_TRUE : CK_FALSE;
    CK_ULONG len = 16;
    CK_ATTRIBUTE t[] = { { CKA_PRIVATE, &priv, 1 }, { CKA_ENCRYPT, &yes, 1 }, { CKA_DECRYPT, &yes, 1 },
                         { CKA_VALUE_LEN, &len, sizeof len } };
    CK_OBJECT_HANDLE aes = 0;
    const char *tag = private_aes ? " private" : "";
    char name[96];
    snprintf(name, sizeof name, "C_GenerateKey aes%s", tag);
    out(name, f->C_GenerateKey(s, &gen, t, 4, &aes), NULL);
    unsigned char iv[16] = { 3 }, data[64], sealed[128], opened[128], sig[512];
    for (size_t i = 0; i < sizeof data; i++) data[i] = (unsigned char)i;
    CK_MECHANISM cbc = { CKM_AES_CBC, iv, sizeof iv };
    CK_MECHANISM sha = { CKM_SHA256, NULL, 0 };
    CK_MECHANISM rsasha = { CKM_SHA256_RSA_PKCS, NULL, 0 };
    CK_ULONG n, total = 0, siglen = 0;
    CK_RV rv;

    /* Encrypting duals: a length query, then the parts, then both finals. */
    for (int which = 0; which < 2; which++) {
        const char *fn = which == 0 ? "C_DigestEncryptUpdate" : "C_SignEncryptUpdate";
        CK_C_DigestEncryptUpdate dual = which == 0 ? f->C_DigestEncryptUpdate : f->C_SignEncryptUpdate;
        rv = f->C_EncryptInit(s, &cbc, aes);
        if (rv == CKR_OK) rv = which == 0 ? f->C_DigestInit(s, &sha) : f->C_SignInit(s, &rsasha, rsakey);
        snprintf(name, sizeof name, "%s init%s", fn, tag);
        out(name, rv, NULL);
        n = 0;
        snprintf(name, sizeof name, "%s query%s", fn, tag);
        rv = dual(s, data, 40, NULL, &n);
        out(name, rv, "%lu", n);
        CK_ULONG n1 = sizeof sealed, n2, n3;
        rv = dual(s, data, 40, sealed, &n1);
        n2 = sizeof sealed - n1;
        if (rv == CKR_OK) rv = dual(s, data + 40, 24, sealed + n1, &n2);
        n3 = sizeof sealed - n1 - n2;
        if (rv == CKR_OK) rv = f->C_EncryptFinal(s, sealed + n1 + n2, &n3);
        total = rv == CKR_OK ? n1 + n2 + n3 : 0;
        snprintf(name, sizeof name, "%s parts%s", fn, tag);
        out(name, rv, "%lu %lu %lu", n1, n2, n3);
        unsigned char md[512];
        n = sizeof md;
        rv = which == 0 ? f->C_DigestFinal(s, md, &n) : f->C_SignFinal(s, md, &n);
        if (which == 1 && rv == CKR_OK) { memcpy(sig, md, n); siglen = n; }
        hex(md, rv == CKR_OK ? n : 0, hx);
        snprintf(name, sizeof name, "%s final%s", fn, tag);
        out(name, rv, "%s", hx);
    }
    /* Decrypting duals on that ciphertext: the digest, and the signature's verification. */
    for (int which = 0; which < 2; which++) {
        const char *fn = which == 0 ? "C_DecryptDigestUpdate" : "C_DecryptVerifyUpdate";
        CK_C_DecryptDigestUpdate dual = which == 0 ? f->C_DecryptDigestUpdate : f->C_DecryptVerifyUpdate;
        rv = f->C_DecryptInit(s, &cbc, aes);
        if (rv == CKR_OK) rv = which == 0 ? f->C_DigestInit(s, &sha) : f->C_VerifyInit(s, &rsasha, rsapub);
        snprintf(name, sizeof name, "%s init%s", fn, tag);
        out(name, rv, NULL);
        n = 0;
        snprintf(name, sizeof name, "%s query%s", fn, tag);
        rv = dual(s, sealed, 48, NULL, &n);
        out(name, rv, "%lu", n);
        CK_ULONG d1 = sizeof opened, d2 = 0, d3 = 0;
        rv = dual(s, sealed, 48, opened, &d1);
        if (rv == CKR_OK) { d2 = sizeof opened - d1; rv = dual(s, sealed + 48, total - 48, opened + d1, &d2); }
        d3 = sizeof opened - d1 - d2;
        /* Called after a failed part too, as a program that ends what it started would. */
        CK_RV end = f->C_DecryptFinal(s, opened + d1 + d2, &d3);
        if (rv == CKR_OK) rv = end;
        snprintf(name, sizeof name, "%s parts%s", fn, tag);
        out(name, rv, "%lu %lu %lu %s", d1, d2, d3,
            rv == CKR_OK && d1 + d2 + d3 == sizeof data && !memcmp(opened, data, sizeof data) ? "same" : "differ");
        unsigned char md[64];
        n = sizeof md;
        rv = which == 0 ? f->C_DigestFinal(s, md, &n) : f->C_VerifyFinal(s, sig, siglen);
        hex(md, which == 0 && rv == CKR_OK ? n : 0, hx);
        snprintf(name, sizeof name, "%s final%s", fn, tag);
        out(name, rv, "%s", hx);
    }
    snprintf(name, sizeof name, "C_DestroyObject aes%s", tag);
    out(name, f->C_DestroyObject(s, aes), NULL);
}

static int cmd_optional(const char *label, const char *pin)
{
    char hx[2 * 512 + 1];
    CK_SLOT_ID slot;
    CK_SESSION_HANDLE s;
    if (!open_logged_in(label, pin, CKF_RW_SESSION, &slot, &s)) return 2;
    CK_OBJECT_HANDLE rsakey = 0, rsapub = 0;
    out("find rsa", find_key(s, CKO_PRIVATE_KEY, 2, &rsakey), NULL);
    out("find rsa public", find_key(s, CKO_PUBLIC_KEY, 2, &rsapub), NULL);
    CK_MECHANISM_INFO mi;
    CK_RV rv = f->C_GetMechanismInfo(slot, CKM_RSA_PKCS, &mi);
    out("C_GetMechanismInfo rsa-pkcs", rv, "recover=%d",
        rv == CKR_OK && (mi.flags & (CKF_SIGN_RECOVER | CKF_VERIFY_RECOVER)) == (CKF_SIGN_RECOVER | CKF_VERIFY_RECOVER));

    CK_MECHANISM rsa_pkcs = { CKM_RSA_PKCS, NULL, 0 }, rsasha = { CKM_SHA256_RSA_PKCS, NULL, 0 };
    const unsigned char msg[] = "a message the signature carries";
    unsigned char sig[512], back[512];
    CK_ULONG n;
    out("C_SignRecoverInit sha256-rsa", f->C_SignRecoverInit(s, &rsasha, rsakey), NULL);
    out("C_SignRecoverInit public key", f->C_SignRecoverInit(s, &rsa_pkcs, rsapub), NULL);
    out("C_SignRecover none", f->C_SignRecover(s, (CK_BYTE *)msg, sizeof msg - 1, sig, &n), NULL);
    out("C_SignRecoverInit", f->C_SignRecoverInit(s, &rsa_pkcs, rsakey), NULL);
    out("C_SignRecoverInit again", f->C_SignRecoverInit(s, &rsa_pkcs, rsakey), NULL);
    out("C_SignInit beside it", f->C_SignInit(s, &rsasha, rsakey), NULL);
    n = 0;
    rv = f->C_SignRecover(s, (CK_BYTE *)msg, sizeof msg - 1, NULL, &n);
    out("C_SignRecover query", rv, "%lu", n);
    n = 16;
    rv = f->C_SignRecover(s, (CK_BYTE *)msg, sizeof msg - 1, sig, &n);
    out("C_SignRecover short", rv, "%lu", n);
    n = sizeof sig;
    rv = f->C_SignRecover(s, (CK_BYTE *)msg, sizeof msg - 1, sig, &n);
    CK_ULONG siglen = rv == CKR_OK ? n : 0;
    hex(sig, siglen, hx);
    out("C_SignRecover", rv, "%s", hx);
    n = sizeof sig;
    out("C_SignRecover after", f->C_SignRecover(s, (CK_BYTE *)msg, sizeof msg - 1, sig, &n), NULL);

    out("C_VerifyRecoverInit", f->C_VerifyRecoverInit(s, &rsa_pkcs, rsapub), NULL);
    out("C_VerifyInit beside it", f->C_VerifyInit(s, &rsasha, rsapub), NULL);
    n = 0;
    rv = f->C_VerifyRecover(s, sig, siglen, NULL, &n);
    out("C_VerifyRecover query", rv, "%lu", n);
    n = 4;
    rv = f->C_VerifyRecover(s, sig, siglen, back, &n);
    out("C_VerifyRecover short", rv, "%lu", n);
    n = sizeof back;
    rv = f->C_VerifyRecover(s, sig, siglen, back, &n);
    out("C_VerifyRecover", rv, "%.*s", rv == CKR_OK ? (int)n : 0, (char *)back);
    if (siglen > 0) sig[siglen / 2] ^= 1;
    out("C_VerifyRecoverInit tampered", f->C_VerifyRecoverInit(s, &rsa_pkcs, rsapub), NULL);
    n = sizeof back;
    out("C_VerifyRecover tampered", f->C_VerifyRecover(s, sig, siglen, back, &n), NULL);
    out("C_VerifyRecoverInit short", f->C_VerifyRecoverInit(s, &rsa_pkcs, rsapub), NULL);
    n = sizeof back;
    out("C_VerifyRecover short signature", f->C_VerifyRecover(s, sig, 8, back, &n), NULL);

    n = sizeof back;
    out("C_DigestEncryptUpdate none", f->C_DigestEncryptUpdate(s, (CK_BYTE *)msg, 16, back, &n), NULL);
    optional_duals(s, rsakey, rsapub, 0);
    optional_duals(s, rsakey, rsapub, 1);

    n = 0;
    out("C_GetOperationState", f->C_GetOperationState(s, NULL, &n), NULL);
    out("C_GetOperationState no length", f->C_GetOperationState(s, NULL, NULL), NULL);
    out("C_SetOperationState", f->C_SetOperationState(s, back, 16, 0, 0), NULL);
    out("C_SetOperationState bad session", f->C_SetOperationState(s + 1000, back, 16, 0, 0), NULL);
    f->C_Finalize(NULL);
    return 0;
}

/* ---------------------------------------------------------------- v3 */

/* PKCS#11 3.0's way in and what it adds, through the module's 3.0 interface: its
 * interfaces, C_SessionCancel (a local operation, a search, a digest streamed past 1 MiB),
 * C_LoginUser with and without a user name, and a message-based function. */
static int cmd_v3(const char *label, const char *pin)
{
    CK_C_GetInterfaceList list_interfaces = (CK_C_GetInterfaceList)dlsym(module_handle, "C_GetInterfaceList");
    CK_C_GetInterface get_interface = (CK_C_GetInterface)dlsym(module_handle, "C_GetInterface");
    if (list_interfaces == NULL || get_interface == NULL) {
        printf("no PKCS#11 3.0 interface\n");
        return 0;
    }
    CK_ULONG n = 0;
    CK_RV rv = list_interfaces(NULL, &n);
    out("C_GetInterfaceList query", rv, "%lu", n);
    CK_INTERFACE interfaces[8];
    n = 1;
    rv = list_interfaces(interfaces, &n);
    out("C_GetInterfaceList short", rv, "%lu", n);
    n = 8;
    rv = list_interfaces(interfaces, &n);
    out("C_GetInterfaceList", rv, "%lu", n);
    for (CK_ULONG i = 0; rv == CKR_OK && i < n; i++) {
        CK_VERSION *v = interfaces[i].pFunctionList;
        printf("interface %s %d.%d flags=%lu\n", (char *)interfaces[i].pInterfaceName, v->major, v->minor,
               interfaces[i].flags);
    }
    out("C_GetInterfaceList NULL count", list_interfaces(interfaces, NULL), NULL);
    CK_INTERFACE_PTR found = NULL;
    CK_VERSION v30 = { 3, 0 }, v240 = { 2, 40 }, v99 = { 9, 9 };
    CK_UTF8CHAR name[] = "PKCS 11", other[] = "Vendor";
    rv = get_interface(NULL, NULL, &found, 0);
    out("C_GetInterface default", rv, "%d.%d", rv == CKR_OK ? ((CK_VERSION *)found->pFunctionList)->major : 0,
        rv == CKR_OK ? ((CK_VERSION *)found->pFunctionList)->minor : 0);
    out("C_GetInterface 2.40", get_interface(name, &v240, &found, 0), NULL);
    out("C_GetInterface 9.9", get_interface(name, &v99, &found, 0), NULL);
    out("C_GetInterface vendor", get_interface(other, NULL, &found, 0), NULL);
    out("C_GetInterface NULL", get_interface(name, NULL, NULL, 0), NULL);
    rv = get_interface(name, &v30, &found, 0);
    out("C_GetInterface 3.0", rv, NULL);
    if (rv != CKR_OK) return 0;
    CK_FUNCTION_LIST_3_0 *f3 = found->pFunctionList;
    f = &f3->v2;

    CK_SLOT_ID slot;
    CK_SESSION_HANDLE s;
    out("C_Initialize", init_os_locking(), NULL);
    if (!find_slot(label, &slot)) return 2;
    out("C_OpenSession", f->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s), NULL);
    out("C_SessionCancel nothing", f3->C_SessionCancel(s, 0), NULL);
    out("C_SessionCancel bad session", f3->C_SessionCancel(s + 1000, CKF_DIGEST), NULL);
    CK_MECHANISM sha = { CKM_SHA256, NULL, 0 };
    unsigned char md[64];
    char hx[2 * sizeof md + 1];
    out("C_DigestInit", f->C_DigestInit(s, &sha), NULL);
    out("C_SessionCancel digest", f3->C_SessionCancel(s, CKF_DIGEST), NULL);
    out("C_DigestUpdate cancelled", f->C_DigestUpdate(s, (CK_BYTE *)"abc", 3), NULL);
    /* Past 1 MiB the proxy streams a digest, in a backend session of its own. */
    static unsigned char big[2 << 20];
    out("C_DigestInit streamed", f->C_DigestInit(s, &sha), NULL);
    out("C_DigestUpdate streamed", f->C_DigestUpdate(s, big, sizeof big), NULL);
    out("C_SessionCancel streamed", f3->C_SessionCancel(s, CKF_DIGEST | CKF_SIGN), NULL);
    out("C_DigestUpdate streamed cancelled", f->C_DigestUpdate(s, big, 16), NULL);
    out("C_DigestInit after", f->C_DigestInit(s, &sha), NULL);
    n = sizeof md;
    rv = f->C_Digest(s, (CK_BYTE *)"abc", 3, md, &n);
    hex(md, rv == CKR_OK ? n : 0, hx);
    out("C_Digest after", rv, "%s", hx);
    out("C_FindObjectsInit", f->C_FindObjectsInit(s, NULL, 0), NULL);
    out("C_SessionCancel search", f3->C_SessionCancel(s, CKF_FIND_OBJECTS), NULL);
    CK_OBJECT_HANDLE object;
    out("C_FindObjects cancelled", f->C_FindObjects(s, &object, 1, &n), NULL);
    CK_UTF8CHAR bob[] = "bob";
    out("C_LoginUser named", f3->C_LoginUser(s, CKU_USER, (CK_UTF8CHAR *)pin, strlen(pin), bob, 3), NULL);
    out("C_LoginUser", f3->C_LoginUser(s, CKU_USER, (CK_UTF8CHAR *)pin, strlen(pin), NULL, 0), NULL);
    out("C_Logout", f->C_Logout(s), NULL);
    out("C_MessageEncryptInit", f3->C_MessageEncryptInit(s, &sha, 0), NULL);
    out("C_SignMessageBegin", f3->C_SignMessageBegin(s, NULL, 0), NULL);
    out("C_CloseSession", f->C_CloseSession(s), NULL);
    out("C_Finalize", f->C_Finalize(NULL), NULL);
    return 0;
}

static int cmd_fork(const char *label, const char *pin)
{
    out("parent C_Initialize", init_os_locking(), NULL);
    CK_SLOT_ID slot;
    if (!find_slot(label, &slot)) return 2;
    CK_SESSION_HANDLE s;
    out("parent C_OpenSession", f->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s), NULL);
    out("parent C_Login", f->C_Login(s, CKU_USER, (CK_UTF8CHAR *)pin, strlen(pin)), NULL);
    fflush(stdout);
    pid_t child = fork();
    if (child == 0) {
        CK_ULONG n;
        out("child C_GetSlotList", f->C_GetSlotList(CK_TRUE, NULL, &n), NULL);
        out("child C_Initialize", init_os_locking(), NULL);
        CK_SLOT_ID cslot;
        if (!find_slot(label, &cslot)) { out("child find_slot", CKR_SLOT_ID_INVALID, NULL); _exit(1); }
        CK_SESSION_HANDLE cs;
        out("child C_OpenSession", f->C_OpenSession(cslot, CKF_SERIAL_SESSION, NULL, NULL, &cs), NULL);
        CK_SESSION_INFO info;
        CK_RV rv = f->C_GetSessionInfo(cs, &info);
        out("child C_GetSessionInfo", rv, "state=%lu", info.state);
        out("child C_Login", f->C_Login(cs, CKU_USER, (CK_UTF8CHAR *)pin, strlen(pin)), NULL);
        unsigned char digest[32] = { 1 }, sig[512];
        CK_ULONG len = sizeof sig;
        rv = sign(cs, 1, "ECDSA", digest, 32, NULL, sig, &len);
        out("child sign", rv, "%lu", len);
        out("child C_Finalize", f->C_Finalize(NULL), NULL);
        fflush(stdout);
        _exit(0);
    }
    int status = 0;
    waitpid(child, &status, 0);
    out("parent child-exit", CKR_OK, "%d", WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    unsigned char digest[32] = { 2 }, sig[512];
    CK_ULONG len = sizeof sig;
    CK_RV rv = sign(s, 1, "ECDSA", digest, 32, NULL, sig, &len);
    out("parent sign", rv, "%lu", len);
    out("parent C_Finalize", f->C_Finalize(NULL), NULL);
    return 0;
}

/* ------------------------------------------------------------- forkstress */

/* Issue 13 §12: `cycles` times, while `nthreads` threads of this process sign through the
 * proxy without pause, fork; the child initialises, logs in, signs and finalises, and has
 * 30 s to do so (a child stuck on a lock a parent thread held at fork dies by SIGALRM).
 * Prints one line per failed cycle and then "forkstress failures=K cycles=N". */
struct busy {
    CK_SLOT_ID slot;
    volatile int stop;
    long ok;
    CK_RV last;
};

static void *busy_work(void *arg)
{
    struct busy *b = arg;
    CK_SESSION_HANDLE s;
    b->last = f->C_OpenSession(b->slot, CKF_SERIAL_SESSION, NULL, NULL, &s);
    if (b->last != CKR_OK) return NULL;
    unsigned char digest[32] = { 7 }, sig[512];
    while (!b->stop) {
        CK_ULONG n = sizeof sig;
        b->last = sign(s, 1, "ECDSA", digest, 32, NULL, sig, &n);
        if (b->last == CKR_OK) b->ok++;
        CK_ULONG count = 0;
        f->C_GetSlotList(CK_TRUE, NULL, &count);
    }
    f->C_CloseSession(s);
    return NULL;
}

static int fork_child(const char *label, const char *pin)
{
    alarm(30);
    CK_RV rv = init_os_locking();
    if (rv != CKR_OK) return 10;
    CK_SLOT_ID slot;
    if (!find_slot(label, &slot)) return 11;
    CK_SESSION_HANDLE s;
    if (f->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s) != CKR_OK) return 12;
    rv = f->C_Login(s, CKU_USER, (CK_UTF8CHAR *)pin, strlen(pin));
    if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) return 13;
    unsigned char digest[32] = { 9 }, sig[512];
    CK_ULONG len = sizeof sig;
    if (sign(s, 1, "ECDSA", digest, 32, NULL, sig, &len) != CKR_OK || len != 64) return 14;
    if (f->C_Finalize(NULL) != CKR_OK) return 15;
    return 0;
}

static int cmd_forkstress(const char *label, const char *pin, int cycles, int nthreads)
{
    CK_RV rv = init_os_locking();
    if (rv != CKR_OK) { out("C_Initialize", rv, NULL); return 2; }
    CK_SLOT_ID slot;
    if (!find_slot(label, &slot)) return 2;
    CK_SESSION_HANDLE s;
    f->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s);
    out("parent C_Login", f->C_Login(s, CKU_USER, (CK_UTF8CHAR *)pin, strlen(pin)), NULL);
    pthread_t tids[16];
    struct busy bs[16];
    if (nthreads > 16) nthreads = 16;
    for (int i = 0; i < nthreads; i++) {
        bs[i] = (struct busy){ slot, 0, 0, 0 };
        pthread_create(&tids[i], NULL, busy_work, &bs[i]);
    }
    fflush(stdout);
    int failures = 0;
    for (int i = 0; i < cycles; i++) {
        pid_t child = fork();
        if (child == 0) _exit(fork_child(label, pin));
        int status = 0;
        waitpid(child, &status, 0);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            failures++;
            printf("cycle %d: child %s %d\n", i, WIFEXITED(status) ? "exit" : "signal",
                   WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
            fflush(stdout);
        }
    }
    long busy_ok = 0;
    for (int i = 0; i < nthreads; i++) {
        bs[i].stop = 1;
        pthread_join(tids[i], NULL);
        busy_ok += bs[i].ok;
    }
    printf("forkstress failures=%d cycles=%d busy_signatures=%ld\n", failures, cycles, busy_ok);
    out("C_Finalize", f->C_Finalize(NULL), NULL);
    return failures == 0 ? 0 : 1;
}

/* ------------------------------------------------------------------ repl */

/* Commands (one answer line each):
 *   init | finalize | slots | open [rw] | close H | state H | login H PIN | login-so H PIN
 *   logout H | sign H KEYID MECH HEXDATA | sign-ctx H KEYID MECH HEXDATA PIN
 *   find H KEYID (private key handle) | signh H HANDLE MECH HEXDATA (sign with a known handle)
 *   attr H KEYID HEXTYPE (private key attribute, value as hex) | wait [nonblock]
 *   waitfin (a thread blocks in C_WaitForSlotEvent, C_Finalize ends it) | quit
 */
static void *blocking_wait(void *arg)
{
    CK_SLOT_ID ev;
    *(CK_RV *)arg = f->C_WaitForSlotEvent(0, &ev, NULL);
    return NULL;
}

static int cmd_repl(const char *label)
{
    char line[4096];
    CK_SLOT_ID slot = (CK_SLOT_ID)-1;
    while (fgets(line, sizeof line, stdin)) {
        char cmd[64] = "", a[1024] = "", b[1024] = "", c[1024] = "", d[2048] = "", e[1024] = "";
        sscanf(line, "%63s %1023s %1023s %1023s %2047s %1023s", cmd, a, b, c, d, e);
        if (!strcmp(cmd, "quit")) break;
        if (!strcmp(cmd, "init")) {
            out("init", init_os_locking(), NULL);
        } else if (!strcmp(cmd, "finalize")) {
            out("finalize", f->C_Finalize(NULL), NULL);
        } else if (!strcmp(cmd, "slots")) {
            int found = find_slot(label, &slot);
            out("slots", found ? CKR_OK : CKR_SLOT_ID_INVALID, "%lu", slot);
        } else if (!strcmp(cmd, "open")) {
            CK_SESSION_HANDLE h = 0;
            if (slot == (CK_SLOT_ID)-1) find_slot(label, &slot);
            CK_FLAGS flags = CKF_SERIAL_SESSION | (!strcmp(a, "rw") ? CKF_RW_SESSION : 0);
            CK_RV rv = f->C_OpenSession(slot, flags, NULL, NULL, &h);
            out("open", rv, "%lu", h);
        } else if (!strcmp(cmd, "close")) {
            out("close", f->C_CloseSession(strtoul(a, NULL, 0)), NULL);
        } else if (!strcmp(cmd, "state")) {
            CK_SESSION_INFO info = { 0 };
            CK_RV rv = f->C_GetSessionInfo(strtoul(a, NULL, 0), &info);
            out("state", rv, "%lu", info.state);
        } else if (!strcmp(cmd, "login") || !strcmp(cmd, "login-so")) {
            CK_USER_TYPE type = !strcmp(cmd, "login") ? CKU_USER : CKU_SO;
            out(cmd, f->C_Login(strtoul(a, NULL, 0), type, (CK_UTF8CHAR *)b, strlen(b)), NULL);
        } else if (!strcmp(cmd, "logout")) {
            out("logout", f->C_Logout(strtoul(a, NULL, 0)), NULL);
        } else if (!strcmp(cmd, "sign") || !strcmp(cmd, "sign-ctx")) {
            unsigned char data[1024], sig[1024];
            char hx[2049];
            size_t len = unhex(d, data, sizeof data);
            CK_ULONG siglen = sizeof sig;
            CK_RV rv = sign(strtoul(a, NULL, 0), (unsigned char)strtoul(b, NULL, 0), c, data, len,
                            !strcmp(cmd, "sign-ctx") ? e : NULL, sig, &siglen);
            hex(sig, rv == CKR_OK ? siglen : 0, hx);
            out(cmd, rv, "%s", hx);
        } else if (!strcmp(cmd, "find")) {
            CK_OBJECT_HANDLE key = 0;
            CK_RV rv = find_key(strtoul(a, NULL, 0), CKO_PRIVATE_KEY, (unsigned char)strtoul(b, NULL, 0), &key);
            out("find", rv, "%lu", key);
        } else if (!strcmp(cmd, "signh")) {
            unsigned char data[1024], sig[1024];
            char hx[2049];
            size_t len = unhex(d, data, sizeof data);
            CK_ULONG siglen = sizeof sig;
            CK_RV rv = sign_with(strtoul(a, NULL, 0), strtoul(b, NULL, 0), c, data, len, NULL, sig, &siglen);
            hex(sig, rv == CKR_OK ? siglen : 0, hx);
            out("signh", rv, "%s", hx);
        } else if (!strcmp(cmd, "attr")) {
            CK_SESSION_HANDLE h = strtoul(a, NULL, 0);
            CK_OBJECT_HANDLE key;
            CK_RV rv = find_key(h, CKO_PRIVATE_KEY, (unsigned char)strtoul(b, NULL, 0), &key);
            unsigned char value[1024];
            char hx[2049] = "";
            if (rv == CKR_OK) {
                CK_ATTRIBUTE t = { strtoul(c, NULL, 16), value, sizeof value };
                rv = f->C_GetAttributeValue(h, key, &t, 1);
                if (rv == CKR_OK) hex(value, t.ulValueLen, hx);
            }
            out("attr", rv, "%s", hx);
        } else if (!strcmp(cmd, "genkey")) {
            /* A private session AES key (CKA_PRIVATE given: TRUE). */
            CK_MECHANISM gen = { CKM_AES_KEY_GEN, NULL, 0 };
            CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
            CK_ULONG len = 32;
            CK_ATTRIBUTE t[] = { { CKA_TOKEN, &no, 1 }, { CKA_PRIVATE, &yes, 1 }, { CKA_ENCRYPT, &yes, 1 },
                                 { CKA_VALUE_LEN, &len, sizeof len } };
            CK_OBJECT_HANDLE key = 0;
            CK_RV rv = f->C_GenerateKey(strtoul(a, NULL, 0), &gen, t, 4, &key);
            out("genkey", rv, "%lu", key);
        } else if (!strcmp(cmd, "secretkeys")) {
            /* How many session secret keys this process sees. */
            CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
            CK_BBOOL no = CK_FALSE;
            CK_ATTRIBUTE t[] = { { CKA_CLASS, &cls, sizeof cls }, { CKA_TOKEN, &no, 1 } };
            CK_SESSION_HANDLE h = strtoul(a, NULL, 0);
            CK_OBJECT_HANDLE found[16];
            CK_ULONG n = 0;
            CK_RV rv = f->C_FindObjectsInit(h, t, 2);
            if (rv == CKR_OK) rv = f->C_FindObjects(h, found, 16, &n);
            f->C_FindObjectsFinal(h);
            out("secretkeys", rv, "%lu", n);
        } else if (!strcmp(cmd, "enc")) {
            /* AES-ECB of one zero block with key handle b. */
            CK_SESSION_HANDLE h = strtoul(a, NULL, 0);
            CK_MECHANISM ecb = { CKM_AES_ECB, NULL, 0 };
            unsigned char block[16] = { 0 }, sealed[64];
            char hx[129] = "";
            CK_ULONG n = sizeof sealed;
            CK_RV rv = f->C_EncryptInit(h, &ecb, strtoul(b, NULL, 0));
            if (rv == CKR_OK) rv = f->C_Encrypt(h, block, 16, sealed, &n);
            if (rv == CKR_OK) hex(sealed, n, hx);
            out("enc", rv, "%s", hx);
        } else if (!strcmp(cmd, "signmech")) {
            /* C_SignInit + C_Sign with mechanism b (no parameter) and key handle c. */
            CK_SESSION_HANDLE h = strtoul(a, NULL, 0);
            CK_MECHANISM m = { strtoul(b, NULL, 0), NULL, 0 };
            unsigned char data[32] = { 0 }, sig[1024];
            CK_ULONG n = sizeof sig;
            CK_RV rv = f->C_SignInit(h, &m, strtoul(c, NULL, 0));
            if (rv == CKR_OK) rv = f->C_Sign(h, data, sizeof data, sig, &n);
            out("signmech", rv, NULL);
        } else if (!strcmp(cmd, "wait")) {
            CK_SLOT_ID ev = 0;
            CK_RV rv = f->C_WaitForSlotEvent(!strcmp(a, "nonblock") ? CKF_DONT_BLOCK : 0, &ev, NULL);
            out("wait", rv, "%lu", ev);
        } else if (!strcmp(cmd, "waitfin")) {
            pthread_t t;
            CK_RV rv = CKR_GENERAL_ERROR;
            pthread_create(&t, NULL, blocking_wait, &rv);
            usleep(500 * 1000);
            f->C_Finalize(NULL);
            pthread_join(t, NULL);
            out("waitfin", rv, NULL);
        } else {
            out("unknown", CKR_ARGUMENTS_BAD, "%s", cmd);
        }
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 3) { fprintf(stderr, "usage: %s MODULE COMMAND ...\n", argv[0]); return 2; }
    setvbuf(stdout, NULL, _IOLBF, 0);
    load(argv[1]);
    const char *cmd = argv[2];
    if (!strcmp(cmd, "list")) return cmd_list();
    if (!strcmp(cmd, "badargs")) return cmd_badargs();
    if (!strcmp(cmd, "token") && argc == 4) return cmd_token(argv[3]);
    if (!strcmp(cmd, "conformance") && argc == 5) return cmd_conformance(argv[3], argv[4]);
    if (!strcmp(cmd, "sweep") && argc == 5) return cmd_sweep(argv[3], argv[4]);
    if (!strcmp(cmd, "threads") && argc == 7) return cmd_threads(argv[3], argv[4], atoi(argv[5]), atoi(argv[6]));
    if (!strcmp(cmd, "fork") && argc == 5) return cmd_fork(argv[3], argv[4]);
    if (!strcmp(cmd, "bigstream") && argc == 6) return cmd_bigstream(argv[3], argv[4], atoi(argv[5]));
    if (!strcmp(cmd, "tokenkeyparts") && argc == 5) return cmd_tokenkeyparts(argv[3], argv[4], 1);
    if (!strcmp(cmd, "sessionkeyparts") && argc == 5) return cmd_tokenkeyparts(argv[3], argv[4], 0);
    if (!strcmp(cmd, "bigsign") && argc == 6) return cmd_bigsign(argv[3], argv[4], atoi(argv[5]));
    if (!strcmp(cmd, "v3") && argc == 5) return cmd_v3(argv[3], argv[4]);
    if (!strcmp(cmd, "optional") && argc == 5) return cmd_optional(argv[3], argv[4]);
    if (!strcmp(cmd, "logoutstream") && argc == 5) return cmd_logoutstream(argv[3], argv[4]);
    if (!strcmp(cmd, "forkstress") && argc == 7) return cmd_forkstress(argv[3], argv[4], atoi(argv[5]), atoi(argv[6]));
    if (!strcmp(cmd, "repl") && argc == 4) return cmd_repl(argv[3]);
    fprintf(stderr, "bad command\n");
    return 2;
}
