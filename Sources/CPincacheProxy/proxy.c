#define _GNU_SOURCE
#include "cpincacheproxy.h"
#include "cshims.h"

#include <p11-kit/pkcs11.h>
/* Shared with the Swift side through CPKCS11, so the two agree on the 3.0 layout. */
#include "../CPKCS11/pkcs11v3.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <stdatomic.h>

/* Implemented in Swift (@_cdecl in Entry.swift). Each takes the type of the header's own
 * declaration, so the table below needs no casts and a wrong entry does not compile. */
extern __typeof__(C_Initialize) pincache_C_Initialize;
extern __typeof__(C_Finalize) pincache_C_Finalize;
extern __typeof__(C_GetInfo) pincache_C_GetInfo;
extern __typeof__(C_GetSlotList) pincache_C_GetSlotList;
extern __typeof__(C_GetSlotInfo) pincache_C_GetSlotInfo;
extern __typeof__(C_GetTokenInfo) pincache_C_GetTokenInfo;
extern __typeof__(C_GetMechanismList) pincache_C_GetMechanismList;
extern __typeof__(C_GetMechanismInfo) pincache_C_GetMechanismInfo;
extern __typeof__(C_InitToken) pincache_C_InitToken;
extern __typeof__(C_InitPIN) pincache_C_InitPIN;
extern __typeof__(C_SetPIN) pincache_C_SetPIN;
extern __typeof__(C_OpenSession) pincache_C_OpenSession;
extern __typeof__(C_CloseSession) pincache_C_CloseSession;
extern __typeof__(C_CloseAllSessions) pincache_C_CloseAllSessions;
extern __typeof__(C_GetSessionInfo) pincache_C_GetSessionInfo;
extern __typeof__(C_GetOperationState) pincache_C_GetOperationState;
extern __typeof__(C_SetOperationState) pincache_C_SetOperationState;
extern __typeof__(C_Login) pincache_C_Login;
extern __typeof__(C_Logout) pincache_C_Logout;
extern __typeof__(C_CreateObject) pincache_C_CreateObject;
extern __typeof__(C_CopyObject) pincache_C_CopyObject;
extern __typeof__(C_DestroyObject) pincache_C_DestroyObject;
extern __typeof__(C_GetObjectSize) pincache_C_GetObjectSize;
extern __typeof__(C_GetAttributeValue) pincache_C_GetAttributeValue;
extern __typeof__(C_SetAttributeValue) pincache_C_SetAttributeValue;
extern __typeof__(C_FindObjectsInit) pincache_C_FindObjectsInit;
extern __typeof__(C_FindObjects) pincache_C_FindObjects;
extern __typeof__(C_FindObjectsFinal) pincache_C_FindObjectsFinal;
extern __typeof__(C_EncryptInit) pincache_C_EncryptInit;
extern __typeof__(C_Encrypt) pincache_C_Encrypt;
extern __typeof__(C_EncryptUpdate) pincache_C_EncryptUpdate;
extern __typeof__(C_EncryptFinal) pincache_C_EncryptFinal;
extern __typeof__(C_DecryptInit) pincache_C_DecryptInit;
extern __typeof__(C_Decrypt) pincache_C_Decrypt;
extern __typeof__(C_DecryptUpdate) pincache_C_DecryptUpdate;
extern __typeof__(C_DecryptFinal) pincache_C_DecryptFinal;
extern __typeof__(C_DigestInit) pincache_C_DigestInit;
extern __typeof__(C_Digest) pincache_C_Digest;
extern __typeof__(C_DigestUpdate) pincache_C_DigestUpdate;
extern __typeof__(C_DigestKey) pincache_C_DigestKey;
extern __typeof__(C_DigestFinal) pincache_C_DigestFinal;
extern __typeof__(C_SignInit) pincache_C_SignInit;
extern __typeof__(C_Sign) pincache_C_Sign;
extern __typeof__(C_SignUpdate) pincache_C_SignUpdate;
extern __typeof__(C_SignFinal) pincache_C_SignFinal;
extern __typeof__(C_SignRecoverInit) pincache_C_SignRecoverInit;
extern __typeof__(C_SignRecover) pincache_C_SignRecover;
extern __typeof__(C_VerifyInit) pincache_C_VerifyInit;
extern __typeof__(C_Verify) pincache_C_Verify;
extern __typeof__(C_VerifyUpdate) pincache_C_VerifyUpdate;
extern __typeof__(C_VerifyFinal) pincache_C_VerifyFinal;
extern __typeof__(C_VerifyRecoverInit) pincache_C_VerifyRecoverInit;
extern __typeof__(C_VerifyRecover) pincache_C_VerifyRecover;
extern __typeof__(C_DigestEncryptUpdate) pincache_C_DigestEncryptUpdate;
extern __typeof__(C_DecryptDigestUpdate) pincache_C_DecryptDigestUpdate;
extern __typeof__(C_SignEncryptUpdate) pincache_C_SignEncryptUpdate;
extern __typeof__(C_DecryptVerifyUpdate) pincache_C_DecryptVerifyUpdate;
extern __typeof__(C_GenerateKey) pincache_C_GenerateKey;
extern __typeof__(C_GenerateKeyPair) pincache_C_GenerateKeyPair;
extern __typeof__(C_WrapKey) pincache_C_WrapKey;
extern __typeof__(C_UnwrapKey) pincache_C_UnwrapKey;
extern __typeof__(C_DeriveKey) pincache_C_DeriveKey;
extern __typeof__(C_SeedRandom) pincache_C_SeedRandom;
extern __typeof__(C_GenerateRandom) pincache_C_GenerateRandom;
extern __typeof__(C_GetFunctionStatus) pincache_C_GetFunctionStatus;
extern __typeof__(C_CancelFunction) pincache_C_CancelFunction;
extern __typeof__(C_WaitForSlotEvent) pincache_C_WaitForSlotEvent;

/* PKCS#11 3.0 (Optional.swift); their prototypes are pkcs11v3.h's. */
extern CK_RV pincache_C_LoginUser(CK_SESSION_HANDLE session, CK_USER_TYPE user_type, unsigned char *pin,
                                  unsigned long pin_len, unsigned char *username, unsigned long username_len);
extern CK_RV pincache_C_SessionCancel(CK_SESSION_HANDLE session, CK_FLAGS flags);

static void enter(void);
static void on_trampoline(void (*thunk)(void *), void *call);
/* Set, in a forked child, on the thread that called fork(): see on_trampoline. */
static __thread int stale_thread;
/* The trampoline's state (see on_trampoline). */
static pthread_mutex_t tramp_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t tramp_cond = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t tramp_callers = PTHREAD_MUTEX_INITIALIZER;
static int tramp_running;
static void (*tramp_thunk)(void *);
static void *tramp_call;
static unsigned tramp_gate;
static int tramp_done;

/* Every entry point runs its Swift code inside the fork gate (CShims, issue 13 §12): a host
 * thread that forks waits until no thread of ours is inside the Swift runtime, so the
 * child never inherits a runtime lock held by a thread it does not have. */
#include "gates.h"

/* The 2.40 functions, in both interfaces. */
#define PINCACHE_FUNCTIONS_2_40 \
    .C_Initialize = gated_C_Initialize, \
    .C_Finalize = gated_C_Finalize, \
    .C_GetInfo = gated_C_GetInfo, \
    .C_GetFunctionList = C_GetFunctionList, \
    .C_GetSlotList = gated_C_GetSlotList, \
    .C_GetSlotInfo = gated_C_GetSlotInfo, \
    .C_GetTokenInfo = gated_C_GetTokenInfo, \
    .C_GetMechanismList = gated_C_GetMechanismList, \
    .C_GetMechanismInfo = gated_C_GetMechanismInfo, \
    .C_InitToken = gated_C_InitToken, \
    .C_InitPIN = gated_C_InitPIN, \
    .C_SetPIN = gated_C_SetPIN, \
    .C_OpenSession = gated_C_OpenSession, \
    .C_CloseSession = gated_C_CloseSession, \
    .C_CloseAllSessions = gated_C_CloseAllSessions, \
    .C_GetSessionInfo = gated_C_GetSessionInfo, \
    .C_GetOperationState = gated_C_GetOperationState, \
    .C_SetOperationState = gated_C_SetOperationState, \
    .C_Login = gated_C_Login, \
    .C_Logout = gated_C_Logout, \
    .C_CreateObject = gated_C_CreateObject, \
    .C_CopyObject = gated_C_CopyObject, \
    .C_DestroyObject = gated_C_DestroyObject, \
    .C_GetObjectSize = gated_C_GetObjectSize, \
    .C_GetAttributeValue = gated_C_GetAttributeValue, \
    .C_SetAttributeValue = gated_C_SetAttributeValue, \
    .C_FindObjectsInit = gated_C_FindObjectsInit, \
    .C_FindObjects = gated_C_FindObjects, \
    .C_FindObjectsFinal = gated_C_FindObjectsFinal, \
    .C_EncryptInit = gated_C_EncryptInit, \
    .C_Encrypt = gated_C_Encrypt, \
    .C_EncryptUpdate = gated_C_EncryptUpdate, \
    .C_EncryptFinal = gated_C_EncryptFinal, \
    .C_DecryptInit = gated_C_DecryptInit, \
    .C_Decrypt = gated_C_Decrypt, \
    .C_DecryptUpdate = gated_C_DecryptUpdate, \
    .C_DecryptFinal = gated_C_DecryptFinal, \
    .C_DigestInit = gated_C_DigestInit, \
    .C_Digest = gated_C_Digest, \
    .C_DigestUpdate = gated_C_DigestUpdate, \
    .C_DigestKey = gated_C_DigestKey, \
    .C_DigestFinal = gated_C_DigestFinal, \
    .C_SignInit = gated_C_SignInit, \
    .C_Sign = gated_C_Sign, \
    .C_SignUpdate = gated_C_SignUpdate, \
    .C_SignFinal = gated_C_SignFinal, \
    .C_SignRecoverInit = gated_C_SignRecoverInit, \
    .C_SignRecover = gated_C_SignRecover, \
    .C_VerifyInit = gated_C_VerifyInit, \
    .C_Verify = gated_C_Verify, \
    .C_VerifyUpdate = gated_C_VerifyUpdate, \
    .C_VerifyFinal = gated_C_VerifyFinal, \
    .C_VerifyRecoverInit = gated_C_VerifyRecoverInit, \
    .C_VerifyRecover = gated_C_VerifyRecover, \
    .C_DigestEncryptUpdate = gated_C_DigestEncryptUpdate, \
    .C_DecryptDigestUpdate = gated_C_DecryptDigestUpdate, \
    .C_SignEncryptUpdate = gated_C_SignEncryptUpdate, \
    .C_DecryptVerifyUpdate = gated_C_DecryptVerifyUpdate, \
    .C_GenerateKey = gated_C_GenerateKey, \
    .C_GenerateKeyPair = gated_C_GenerateKeyPair, \
    .C_WrapKey = gated_C_WrapKey, \
    .C_UnwrapKey = gated_C_UnwrapKey, \
    .C_DeriveKey = gated_C_DeriveKey, \
    .C_SeedRandom = gated_C_SeedRandom, \
    .C_GenerateRandom = gated_C_GenerateRandom, \
    .C_GetFunctionStatus = gated_C_GetFunctionStatus, \
    .C_CancelFunction = gated_C_CancelFunction, \
    .C_WaitForSlotEvent = gated_C_WaitForSlotEvent,

static CK_FUNCTION_LIST function_list = { .version = { 2, 40 }, PINCACHE_FUNCTIONS_2_40 };

/* The message-based functions of PKCS#11 3.0: no module pincache loads has them (OpenSC
 * 0.23 answers CKR_FUNCTION_NOT_SUPPORTED to each, SoftHSM 2.6 has no 3.0 interface), and
 * the daemon does not forward them. */
static CK_RV message_init(CK_SESSION_HANDLE s, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k)
{
    (void)s, (void)m, (void)k;
    return CKR_FUNCTION_NOT_SUPPORTED;
}
static CK_RV crypt_message(CK_SESSION_HANDLE s, void *p, CK_ULONG pl, CK_BYTE_PTR a, CK_ULONG al, CK_BYTE_PTR i,
                           CK_ULONG il, CK_BYTE_PTR o, CK_ULONG_PTR ol)
{
    (void)s, (void)p, (void)pl, (void)a, (void)al, (void)i, (void)il, (void)o, (void)ol;
    return CKR_FUNCTION_NOT_SUPPORTED;
}
static CK_RV crypt_message_begin(CK_SESSION_HANDLE s, void *p, CK_ULONG pl, CK_BYTE_PTR a, CK_ULONG al)
{
    (void)s, (void)p, (void)pl, (void)a, (void)al;
    return CKR_FUNCTION_NOT_SUPPORTED;
}
static CK_RV crypt_message_next(CK_SESSION_HANDLE s, void *p, CK_ULONG pl, CK_BYTE_PTR i, CK_ULONG il, CK_BYTE_PTR o,
                                CK_ULONG_PTR ol, CK_FLAGS f)
{
    (void)s, (void)p, (void)pl, (void)i, (void)il, (void)o, (void)ol, (void)f;
    return CKR_FUNCTION_NOT_SUPPORTED;
}
static CK_RV message_final(CK_SESSION_HANDLE s)
{
    (void)s;
    return CKR_FUNCTION_NOT_SUPPORTED;
}
static CK_RV sign_message(CK_SESSION_HANDLE s, void *p, CK_ULONG pl, CK_BYTE_PTR d, CK_ULONG dl, CK_BYTE_PTR o,
                          CK_ULONG_PTR ol)
{
    (void)s, (void)p, (void)pl, (void)d, (void)dl, (void)o, (void)ol;
    return CKR_FUNCTION_NOT_SUPPORTED;
}
static CK_RV sign_message_begin(CK_SESSION_HANDLE s, void *p, CK_ULONG pl)
{
    (void)s, (void)p, (void)pl;
    return CKR_FUNCTION_NOT_SUPPORTED;
}
static CK_RV verify_message(CK_SESSION_HANDLE s, void *p, CK_ULONG pl, CK_BYTE_PTR d, CK_ULONG dl, CK_BYTE_PTR g,
                            CK_ULONG gl)
{
    (void)s, (void)p, (void)pl, (void)d, (void)dl, (void)g, (void)gl;
    return CKR_FUNCTION_NOT_SUPPORTED;
}

CK_RV C_GetInterfaceList(CK_INTERFACE_PTR list, CK_ULONG_PTR count);
CK_RV C_GetInterface(CK_UTF8CHAR_PTR name, CK_VERSION_PTR version, CK_INTERFACE_PTR_PTR found, CK_FLAGS flags);

static CK_FUNCTION_LIST_3_0 function_list_3_0 = {
    .v2 = { .version = { 3, 0 }, PINCACHE_FUNCTIONS_2_40 },
    .C_GetInterfaceList = C_GetInterfaceList,
    .C_GetInterface = C_GetInterface,
    .C_LoginUser = gated_C_LoginUser,
    .C_SessionCancel = gated_C_SessionCancel,
    .C_MessageEncryptInit = message_init,
    .C_EncryptMessage = crypt_message,
    .C_EncryptMessageBegin = crypt_message_begin,
    .C_EncryptMessageNext = crypt_message_next,
    .C_MessageEncryptFinal = message_final,
    .C_MessageDecryptInit = message_init,
    .C_DecryptMessage = crypt_message,
    .C_DecryptMessageBegin = crypt_message_begin,
    .C_DecryptMessageNext = crypt_message_next,
    .C_MessageDecryptFinal = message_final,
    .C_MessageSignInit = message_init,
    .C_SignMessage = sign_message,
    .C_SignMessageBegin = sign_message_begin,
    .C_SignMessageNext = sign_message,
    .C_MessageSignFinal = message_final,
    .C_MessageVerifyInit = message_init,
    .C_VerifyMessage = verify_message,
    .C_VerifyMessageBegin = sign_message_begin,
    .C_VerifyMessageNext = verify_message,
    .C_MessageVerifyFinal = message_final,
};

/* PKCS#11 3.0's way in: the 3.0 interface first (the default), then 2.40's. Neither claims
 * CKF_INTERFACE_FORK_SAFE: a forked child calls C_Initialize again (issue 13 §12). */
static CK_INTERFACE interfaces[] = {
    { (CK_UTF8CHAR *)"PKCS 11", &function_list_3_0, 0 },
    { (CK_UTF8CHAR *)"PKCS 11", &function_list, 0 },
};
enum { INTERFACE_COUNT = sizeof interfaces / sizeof interfaces[0] };

__attribute__((visibility("default")))
CK_RV C_GetInterfaceList(CK_INTERFACE_PTR list, CK_ULONG_PTR count)
{
    if (count == NULL)
        return CKR_ARGUMENTS_BAD;
    if (list == NULL) {
        *count = INTERFACE_COUNT;
        return CKR_OK;
    }
    if (*count < INTERFACE_COUNT) {
        *count = INTERFACE_COUNT;
        return CKR_BUFFER_TOO_SMALL;
    }
    memcpy(list, interfaces, sizeof interfaces);
    *count = INTERFACE_COUNT;
    return CKR_OK;
}

/* The first interface with this name (any, if NULL), version (any, if NULL) and all of
 * `flags`; none is CKR_ARGUMENTS_BAD, as OpenSC answers. */
__attribute__((visibility("default")))
CK_RV C_GetInterface(CK_UTF8CHAR_PTR name, CK_VERSION_PTR version, CK_INTERFACE_PTR_PTR found, CK_FLAGS flags)
{
    if (found == NULL)
        return CKR_ARGUMENTS_BAD;
    for (int i = 0; i < INTERFACE_COUNT; i++) {
        CK_INTERFACE *candidate = &interfaces[i];
        CK_VERSION *offered = candidate->pFunctionList;
        if (name != NULL && strcmp((const char *)name, (const char *)candidate->pInterfaceName) != 0)
            continue;
        if (version != NULL && (version->major != offered->major || version->minor != offered->minor))
            continue;
        if ((candidate->flags & flags) != flags)
            continue;
        *found = candidate;
        return CKR_OK;
    }
    return CKR_ARGUMENTS_BAD;
}

__attribute__((visibility("default")))
CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list)
{
    if (list == NULL)
        return CKR_ARGUMENTS_BAD;
    *list = &function_list;
    return CKR_OK;
}

/* The same table under a name no host resolves by accident: in-process tests link the
 * proxy beside a module that exports C_GetFunctionList too. */
unsigned long pincache_get_function_list(void **list)
{
    return C_GetFunctionList((CK_FUNCTION_LIST_PTR_PTR)list);
}

static pthread_mutex_t global_lock = PTHREAD_MUTEX_INITIALIZER;
static atomic_ulong fork_generation;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

/* fork() while another thread holds the lock would leave the child a lock nobody can
 * release: prepare takes it, so it is free (and consistent) on both sides. The gate comes
 * first: threads inside it may be about to take the lock. */
static void before_fork(void)
{
    pincache_fork_gate_prepare();
    pthread_mutex_lock(&global_lock);
}
static void after_fork_parent(void)
{
    pthread_mutex_unlock(&global_lock);
    pincache_fork_gate_parent();
}
static void after_fork_child(void)
{
    atomic_fetch_add(&fork_generation, 1);
    pthread_mutex_unlock(&global_lock);
    pincache_fork_gate_child();
    /* The parent's trampoline, if any, is not in the child: a new one comes when needed. */
    pthread_mutex_init(&tramp_lock, NULL);
    pthread_mutex_init(&tramp_callers, NULL);
    pthread_cond_init(&tramp_cond, NULL);
    tramp_running = 0;
    tramp_thunk = NULL;
    stale_thread = 1;
}

static void install_atfork(void)
{
    pincache_fork_gate_enable();
    pthread_atfork(before_fork, after_fork_parent, after_fork_child);
}

static void enter(void)
{
    pthread_once(&atfork_once, install_atfork);
    pincache_fork_gate_enter();
}

/* The trampoline. The Swift runtime's locks and Synchronization's Mutex are priority-
 * inheritance futexes that name their owner by thread id, and each thread caches its id
 * the first time it takes one. fork() gives the calling thread a new id in the child but
 * keeps that cache: a lock it then takes carries the parent's thread id, and as soon as
 * another thread of the child waits for that lock, the kernel ties it to the parent's
 * thread and the unlock fails (EPERM) — the child hangs. So, in a forked child, the thread
 * that called fork() runs no Swift code itself: its calls run on this thread, made in the
 * child, with the caller's place in the gate handed over and back. Other threads (made in
 * the child) call directly. */

static void *trampoline_main(void *unused)
{
    (void)unused;
    pthread_mutex_lock(&tramp_lock);
    for (;;) {
        while (tramp_thunk == NULL)
            pthread_cond_wait(&tramp_cond, &tramp_lock);
        void (*thunk)(void *) = tramp_thunk;
        void *call = tramp_call;
        unsigned gate = tramp_gate;
        pthread_mutex_unlock(&tramp_lock);
        pincache_fork_gate_adopt(gate);
        thunk(call);
        gate = pincache_fork_gate_hand_over();
        pthread_mutex_lock(&tramp_lock);
        tramp_gate = gate;
        tramp_thunk = NULL;
        tramp_done = 1;
        pthread_cond_broadcast(&tramp_cond);
    }
    return NULL;
}

static void on_trampoline(void (*thunk)(void *), void *call)
{
    pthread_mutex_lock(&tramp_callers);
    pthread_mutex_lock(&tramp_lock);
    if (!tramp_running) {
        pthread_attr_t attributes;
        pthread_attr_init(&attributes);
        pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
        pthread_t thread;
        tramp_running = pthread_create(&thread, &attributes, trampoline_main, NULL) == 0;
        pthread_attr_destroy(&attributes);
        if (!tramp_running) {
            /* No thread to be had: run here, and hope nobody contends. */
            pthread_mutex_unlock(&tramp_lock);
            pthread_mutex_unlock(&tramp_callers);
            thunk(call);
            return;
        }
    }
    tramp_gate = pincache_fork_gate_hand_over();
    tramp_call = call;
    tramp_done = 0;
    tramp_thunk = thunk;
    pthread_cond_broadcast(&tramp_cond);
    while (!tramp_done)
        pthread_cond_wait(&tramp_cond, &tramp_lock);
    pincache_fork_gate_adopt(tramp_gate);
    pthread_mutex_unlock(&tramp_lock);
    pthread_mutex_unlock(&tramp_callers);
}

void pincache_global_lock(void)
{
    pthread_once(&atfork_once, install_atfork);
    pthread_mutex_lock(&global_lock);
}

void pincache_global_unlock(void)
{
    pthread_mutex_unlock(&global_lock);
}

unsigned long pincache_fork_generation(void)
{
    return atomic_load(&fork_generation);
}

const char *pincache_bus_address(void)
{
    const char *address = secure_getenv("PINCACHE_BUS_ADDRESS");
    return (address != NULL && address[0] != '\0') ? address : NULL;
}
