#define _GNU_SOURCE
#include "cpincacheproxy.h"

#include <p11-kit/pkcs11.h>

#include <pthread.h>
#include <stdlib.h>
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

static CK_FUNCTION_LIST function_list = {
    .version = { 2, 40 },
    .C_Initialize = pincache_C_Initialize,
    .C_Finalize = pincache_C_Finalize,
    .C_GetInfo = pincache_C_GetInfo,
    .C_GetFunctionList = C_GetFunctionList,
    .C_GetSlotList = pincache_C_GetSlotList,
    .C_GetSlotInfo = pincache_C_GetSlotInfo,
    .C_GetTokenInfo = pincache_C_GetTokenInfo,
    .C_GetMechanismList = pincache_C_GetMechanismList,
    .C_GetMechanismInfo = pincache_C_GetMechanismInfo,
    .C_InitToken = pincache_C_InitToken,
    .C_InitPIN = pincache_C_InitPIN,
    .C_SetPIN = pincache_C_SetPIN,
    .C_OpenSession = pincache_C_OpenSession,
    .C_CloseSession = pincache_C_CloseSession,
    .C_CloseAllSessions = pincache_C_CloseAllSessions,
    .C_GetSessionInfo = pincache_C_GetSessionInfo,
    .C_GetOperationState = pincache_C_GetOperationState,
    .C_SetOperationState = pincache_C_SetOperationState,
    .C_Login = pincache_C_Login,
    .C_Logout = pincache_C_Logout,
    .C_CreateObject = pincache_C_CreateObject,
    .C_CopyObject = pincache_C_CopyObject,
    .C_DestroyObject = pincache_C_DestroyObject,
    .C_GetObjectSize = pincache_C_GetObjectSize,
    .C_GetAttributeValue = pincache_C_GetAttributeValue,
    .C_SetAttributeValue = pincache_C_SetAttributeValue,
    .C_FindObjectsInit = pincache_C_FindObjectsInit,
    .C_FindObjects = pincache_C_FindObjects,
    .C_FindObjectsFinal = pincache_C_FindObjectsFinal,
    .C_EncryptInit = pincache_C_EncryptInit,
    .C_Encrypt = pincache_C_Encrypt,
    .C_EncryptUpdate = pincache_C_EncryptUpdate,
    .C_EncryptFinal = pincache_C_EncryptFinal,
    .C_DecryptInit = pincache_C_DecryptInit,
    .C_Decrypt = pincache_C_Decrypt,
    .C_DecryptUpdate = pincache_C_DecryptUpdate,
    .C_DecryptFinal = pincache_C_DecryptFinal,
    .C_DigestInit = pincache_C_DigestInit,
    .C_Digest = pincache_C_Digest,
    .C_DigestUpdate = pincache_C_DigestUpdate,
    .C_DigestKey = pincache_C_DigestKey,
    .C_DigestFinal = pincache_C_DigestFinal,
    .C_SignInit = pincache_C_SignInit,
    .C_Sign = pincache_C_Sign,
    .C_SignUpdate = pincache_C_SignUpdate,
    .C_SignFinal = pincache_C_SignFinal,
    .C_SignRecoverInit = pincache_C_SignRecoverInit,
    .C_SignRecover = pincache_C_SignRecover,
    .C_VerifyInit = pincache_C_VerifyInit,
    .C_Verify = pincache_C_Verify,
    .C_VerifyUpdate = pincache_C_VerifyUpdate,
    .C_VerifyFinal = pincache_C_VerifyFinal,
    .C_VerifyRecoverInit = pincache_C_VerifyRecoverInit,
    .C_VerifyRecover = pincache_C_VerifyRecover,
    .C_DigestEncryptUpdate = pincache_C_DigestEncryptUpdate,
    .C_DecryptDigestUpdate = pincache_C_DecryptDigestUpdate,
    .C_SignEncryptUpdate = pincache_C_SignEncryptUpdate,
    .C_DecryptVerifyUpdate = pincache_C_DecryptVerifyUpdate,
    .C_GenerateKey = pincache_C_GenerateKey,
    .C_GenerateKeyPair = pincache_C_GenerateKeyPair,
    .C_WrapKey = pincache_C_WrapKey,
    .C_UnwrapKey = pincache_C_UnwrapKey,
    .C_DeriveKey = pincache_C_DeriveKey,
    .C_SeedRandom = pincache_C_SeedRandom,
    .C_GenerateRandom = pincache_C_GenerateRandom,
    .C_GetFunctionStatus = pincache_C_GetFunctionStatus,
    .C_CancelFunction = pincache_C_CancelFunction,
    .C_WaitForSlotEvent = pincache_C_WaitForSlotEvent
};

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
 * release: prepare takes it, so it is free (and consistent) on both sides. */
static void before_fork(void) { pthread_mutex_lock(&global_lock); }
static void after_fork_parent(void) { pthread_mutex_unlock(&global_lock); }
static void after_fork_child(void)
{
    atomic_fetch_add(&fork_generation, 1);
    pthread_mutex_unlock(&global_lock);
}

static void install_atfork(void)
{
    pthread_atfork(before_fork, after_fork_parent, after_fork_child);
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
