/*
 * The functions PKCS#11 lets a module leave out, which SoftHSM and OpenSC both leave out:
 * with the control file `optional_functions` present the shim implements them on top of the
 * target, so a proxy's forwarding of them can be tested against a module that has them.
 *
 * - C_SignRecover with CKM_RSA_PKCS: PKCS #1 v1.5 signing with recovery gives the same
 *   signature as C_Sign, so it is the target's C_SignInit and C_Sign (the key must allow
 *   CKA_SIGN_RECOVER as well).
 * - C_VerifyRecover with CKM_RSA_PKCS: the target's raw RSA public operation (C_Encrypt with
 *   CKM_RSA_X_509, so the public key needs CKA_ENCRYPT) and the padding removed here.
 * - The dual-function updates: the two updates, the cipher's first.
 * - C_GetOperationState: CKR_STATE_UNSAVEABLE; C_SetOperationState: CKR_SAVED_STATE_INVALID.
 *
 * - Operations of different kinds at once in one session, as a token with
 *   CKF_DUAL_CRYPTO_OPERATIONS allows (the dual functions need it; SoftHSM runs one operation
 *   per session): each kind runs in a companion session of the target, opened on the same
 *   slot when first needed and closed with the session. SoftHSM's logins are the token's, so
 *   companions share the session's login, and they see its session objects.
 *
 * Sign and sign-recover share the signing companion, verify and verify-recover (the target's
 * C_Encrypt) the verifying one, so each pair excludes the other as PKCS#11 means.
 */
#include <pthread.h>
#include <string.h>

#include "faultshim.h"
#include "internal.h"

static CK_FUNCTION_LIST *target;
static CK_C_GetTokenInfo next_get_token_info;

/* Companion sessions: per session, one per operation kind, opened when first needed. */
enum { MAX_SESSIONS = 256 };
static struct companions {
	CK_SESSION_HANDLE session;
	CK_SLOT_ID slot;
	CK_SESSION_HANDLE of[FAULTSHIM_KINDS];
} sessions[MAX_SESSIONS];
static pthread_mutex_t sessions_lock = PTHREAD_MUTEX_INITIALIZER;

/* The recovering operations in progress, per session; C_VerifyRecover keeps its answer
 * between a length query and the call that takes it. */
enum { MAX_OPS = 64 };
static struct op {
	CK_SESSION_HANDLE session;
	int kind; /* 0 free, 1 sign-recover, 2 verify-recover */
	int answered;
	unsigned char data[1024];
	CK_ULONG len;
} ops[MAX_OPS];
static pthread_mutex_t ops_lock = PTHREAD_MUTEX_INITIALIZER;

static int enabled(void)
{
	return faultshim_control_exists(FAULTSHIM_FILE_OPTIONAL_FUNCTIONS);
}

CK_SESSION_HANDLE faultshim_route(CK_SESSION_HANDLE session, int kind)
{
	CK_SESSION_HANDLE routed = session;
	CK_SESSION_INFO info;
	struct companions *c = NULL, *free_entry = NULL;

	if (!enabled() || target->C_GetSessionInfo(session, &info) != CKR_OK)
		return session;
	pthread_mutex_lock(&sessions_lock);
	for (int i = 0; i < MAX_SESSIONS && c == NULL; i++) {
		if (sessions[i].session == session && sessions[i].slot == info.slotID)
			c = &sessions[i];
		else if (sessions[i].session == 0 && free_entry == NULL)
			free_entry = &sessions[i];
	}
	if (c == NULL && free_entry != NULL) {
		c = free_entry;
		memset(c, 0, sizeof *c);
		c->session = session;
		c->slot = info.slotID;
	}
	if (c != NULL) {
		if (c->of[kind] == 0 &&
		    target->C_OpenSession(info.slotID, info.flags, NULL, NULL, &c->of[kind]) != CKR_OK)
			c->of[kind] = 0;
		if (c->of[kind] != 0)
			routed = c->of[kind];
	}
	pthread_mutex_unlock(&sessions_lock);
	return routed;
}

/* Closes the companions of `session`, or of every session of `slot` (session 0). */
static void close_companions(CK_SESSION_HANDLE session, CK_SLOT_ID slot)
{
	pthread_mutex_lock(&sessions_lock);
	for (int i = 0; i < MAX_SESSIONS; i++) {
		struct companions *c = &sessions[i];
		if (c->session == 0 || (session != 0 ? c->session != session : c->slot != slot))
			continue;
		for (int k = 0; k < FAULTSHIM_KINDS; k++)
			if (c->of[k] != 0)
				target->C_CloseSession(c->of[k]);
		memset(c, 0, sizeof *c);
	}
	pthread_mutex_unlock(&sessions_lock);
}

#define ROUTE1(fn, kind, A) \
	static CK_RV r_##fn(CK_SESSION_HANDLE s, A a) { return target->fn(faultshim_route(s, kind), a); }
#define ROUTE2(fn, kind, A, B) \
	static CK_RV r_##fn(CK_SESSION_HANDLE s, A a, B b) { return target->fn(faultshim_route(s, kind), a, b); }
#define ROUTE4(fn, kind, A, B, C, D) \
	static CK_RV r_##fn(CK_SESSION_HANDLE s, A a, B b, C c, D d) \
	{ return target->fn(faultshim_route(s, kind), a, b, c, d); }

ROUTE2(C_EncryptInit, FAULTSHIM_ENCRYPT, CK_MECHANISM_PTR, CK_OBJECT_HANDLE)
ROUTE4(C_Encrypt, FAULTSHIM_ENCRYPT, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR, CK_ULONG_PTR)
ROUTE4(C_EncryptUpdate, FAULTSHIM_ENCRYPT, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR, CK_ULONG_PTR)
ROUTE2(C_EncryptFinal, FAULTSHIM_ENCRYPT, CK_BYTE_PTR, CK_ULONG_PTR)
ROUTE2(C_DecryptInit, FAULTSHIM_DECRYPT, CK_MECHANISM_PTR, CK_OBJECT_HANDLE)
ROUTE4(C_Decrypt, FAULTSHIM_DECRYPT, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR, CK_ULONG_PTR)
ROUTE4(C_DecryptUpdate, FAULTSHIM_DECRYPT, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR, CK_ULONG_PTR)
ROUTE2(C_DecryptFinal, FAULTSHIM_DECRYPT, CK_BYTE_PTR, CK_ULONG_PTR)
ROUTE1(C_DigestInit, FAULTSHIM_DIGEST, CK_MECHANISM_PTR)
ROUTE4(C_Digest, FAULTSHIM_DIGEST, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR, CK_ULONG_PTR)
ROUTE2(C_DigestUpdate, FAULTSHIM_DIGEST, CK_BYTE_PTR, CK_ULONG)
ROUTE1(C_DigestKey, FAULTSHIM_DIGEST, CK_OBJECT_HANDLE)
ROUTE2(C_DigestFinal, FAULTSHIM_DIGEST, CK_BYTE_PTR, CK_ULONG_PTR)
ROUTE2(C_SignUpdate, FAULTSHIM_SIGN, CK_BYTE_PTR, CK_ULONG)
ROUTE2(C_SignFinal, FAULTSHIM_SIGN, CK_BYTE_PTR, CK_ULONG_PTR)
ROUTE2(C_VerifyInit, FAULTSHIM_VERIFY, CK_MECHANISM_PTR, CK_OBJECT_HANDLE)
ROUTE4(C_Verify, FAULTSHIM_VERIFY, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR, CK_ULONG)
ROUTE2(C_VerifyUpdate, FAULTSHIM_VERIFY, CK_BYTE_PTR, CK_ULONG)
ROUTE2(C_VerifyFinal, FAULTSHIM_VERIFY, CK_BYTE_PTR, CK_ULONG)

static struct op *find_op(CK_SESSION_HANDLE session, int kind)
{
	for (int i = 0; i < MAX_OPS; i++)
		if (ops[i].kind == kind && ops[i].session == session)
			return &ops[i];
	return NULL;
}

static CK_RV begin_op(CK_SESSION_HANDLE session, int kind)
{
	CK_RV rv = CKR_DEVICE_MEMORY;

	pthread_mutex_lock(&ops_lock);
	if (find_op(session, kind) != NULL) {
		rv = CKR_OPERATION_ACTIVE;
	} else {
		for (int i = 0; i < MAX_OPS; i++) {
			if (ops[i].kind == 0) {
				memset(&ops[i], 0, sizeof ops[i]);
				ops[i].session = session;
				ops[i].kind = kind;
				rv = CKR_OK;
				break;
			}
		}
	}
	pthread_mutex_unlock(&ops_lock);
	return rv;
}

static void end_op(CK_SESSION_HANDLE session, int kind)
{
	pthread_mutex_lock(&ops_lock);
	struct op *op = find_op(session, kind);
	if (op != NULL)
		memset(op, 0, sizeof *op);
	pthread_mutex_unlock(&ops_lock);
}

/* CKR_KEY_FUNCTION_NOT_PERMITTED when the key says no to `usage`; anything the target says
 * about the key itself is left to the Init that follows. */
static CK_RV permitted(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE key, CK_ATTRIBUTE_TYPE usage)
{
	CK_BBOOL value = CK_TRUE;
	CK_ATTRIBUTE a = { usage, &value, sizeof value };

	if (target->C_GetAttributeValue(session, key, &a, 1) == CKR_OK && value == CK_FALSE)
		return CKR_KEY_FUNCTION_NOT_PERMITTED;
	return CKR_OK;
}

static CK_RV shim_C_SignRecoverInit(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE key)
{
	CK_RV rv;

	if (!enabled())
		return target->C_SignRecoverInit(session, mechanism, key);
	if (mechanism == NULL)
		return CKR_ARGUMENTS_BAD;
	if (mechanism->mechanism != CKM_RSA_PKCS)
		return CKR_MECHANISM_INVALID;
	if ((rv = permitted(session, key, CKA_SIGN_RECOVER)) != CKR_OK)
		return rv;
	rv = target->C_SignInit(faultshim_route(session, FAULTSHIM_SIGN), mechanism, key);
	if (rv == CKR_OK && begin_op(session, 1) != CKR_OK)
		rv = CKR_GENERAL_ERROR;
	return rv;
}

static CK_RV shim_C_SignRecover(CK_SESSION_HANDLE session, CK_BYTE_PTR data, CK_ULONG data_len,
                                CK_BYTE_PTR signature, CK_ULONG_PTR signature_len)
{
	CK_RV rv;
	int active;

	if (!enabled())
		return target->C_SignRecover(session, data, data_len, signature, signature_len);
	pthread_mutex_lock(&ops_lock);
	active = find_op(session, 1) != NULL;
	pthread_mutex_unlock(&ops_lock);
	if (!active)
		return CKR_OPERATION_NOT_INITIALIZED;
	rv = target->C_Sign(faultshim_route(session, FAULTSHIM_SIGN), data, data_len, signature, signature_len);
	if (rv != CKR_BUFFER_TOO_SMALL && !(rv == CKR_OK && signature == NULL))
		end_op(session, 1);
	return rv;
}

static CK_RV shim_C_VerifyRecoverInit(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE key)
{
	CK_MECHANISM raw = { CKM_RSA_X_509, NULL, 0 };
	CK_RV rv;

	if (!enabled())
		return target->C_VerifyRecoverInit(session, mechanism, key);
	if (mechanism == NULL)
		return CKR_ARGUMENTS_BAD;
	if (mechanism->mechanism != CKM_RSA_PKCS)
		return CKR_MECHANISM_INVALID;
	if ((rv = permitted(session, key, CKA_VERIFY_RECOVER)) != CKR_OK)
		return rv;
	rv = target->C_EncryptInit(faultshim_route(session, FAULTSHIM_VERIFY), &raw, key);
	if (rv == CKR_OK && begin_op(session, 2) != CKR_OK)
		rv = CKR_GENERAL_ERROR;
	return rv;
}

/* EM = 00 01 FF..FF (at least eight) 00 M: the message M, or -1. */
static long unpad(const unsigned char *em, CK_ULONG len)
{
	CK_ULONG i = 2;

	if (len < 11 || em[0] != 0 || em[1] != 1)
		return -1;
	while (i < len && em[i] == 0xff)
		i++;
	if (i < 10 || i >= len || em[i] != 0)
		return -1;
	return (long)(i + 1);
}

static CK_RV shim_C_VerifyRecover(CK_SESSION_HANDLE session, CK_BYTE_PTR signature, CK_ULONG signature_len,
                                  CK_BYTE_PTR data, CK_ULONG_PTR data_len)
{
	CK_RV rv = CKR_OK;
	struct op *op;

	if (!enabled())
		return target->C_VerifyRecover(session, signature, signature_len, data, data_len);
	if (signature == NULL || data_len == NULL)
		return CKR_ARGUMENTS_BAD;
	pthread_mutex_lock(&ops_lock);
	op = find_op(session, 2);
	if (op == NULL) {
		pthread_mutex_unlock(&ops_lock);
		return CKR_OPERATION_NOT_INITIALIZED;
	}
	if (!op->answered) {
		unsigned char em[1024];
		CK_ULONG n = sizeof em;
		long start;

		rv = target->C_Encrypt(faultshim_route(session, FAULTSHIM_VERIFY), signature, signature_len, em, &n);
		if (rv == CKR_DATA_LEN_RANGE)
			rv = CKR_SIGNATURE_LEN_RANGE;
		if (rv == CKR_OK && (start = unpad(em, n)) < 0)
			rv = CKR_SIGNATURE_INVALID;
		if (rv == CKR_OK) {
			op->len = n - (CK_ULONG)start;
			memcpy(op->data, em + start, op->len);
			op->answered = 1;
		}
	}
	if (rv == CKR_OK) {
		if (data == NULL) {
			*data_len = op->len;
		} else if (*data_len < op->len) {
			*data_len = op->len;
			rv = CKR_BUFFER_TOO_SMALL;
		} else {
			memcpy(data, op->data, op->len);
			*data_len = op->len;
			memset(op, 0, sizeof *op);
		}
	} else {
		memset(op, 0, sizeof *op);
	}
	pthread_mutex_unlock(&ops_lock);
	return rv;
}

/* The cipher's update first: its output (and length query) is the call's; the other
 * operation takes the part (encrypting) or the plaintext (decrypting) once it is out. */
static CK_RV dual(CK_SESSION_HANDLE session, CK_BYTE_PTR part, CK_ULONG part_len, CK_BYTE_PTR out,
                  CK_ULONG_PTR out_len, int decrypt, CK_C_DigestUpdate other, int other_kind)
{
	CK_RV rv = decrypt ? r_C_DecryptUpdate(session, part, part_len, out, out_len)
	                   : r_C_EncryptUpdate(session, part, part_len, out, out_len);
	if (rv != CKR_OK || out == NULL)
		return rv;
	session = faultshim_route(session, other_kind);
	return decrypt ? other(session, out, *out_len) : other(session, part, part_len);
}

static CK_RV shim_C_DigestEncryptUpdate(CK_SESSION_HANDLE s, CK_BYTE_PTR p, CK_ULONG n, CK_BYTE_PTR o, CK_ULONG_PTR on)
{
	if (!enabled())
		return target->C_DigestEncryptUpdate(s, p, n, o, on);
	return dual(s, p, n, o, on, 0, target->C_DigestUpdate, FAULTSHIM_DIGEST);
}

static CK_RV shim_C_DecryptDigestUpdate(CK_SESSION_HANDLE s, CK_BYTE_PTR p, CK_ULONG n, CK_BYTE_PTR o, CK_ULONG_PTR on)
{
	if (!enabled())
		return target->C_DecryptDigestUpdate(s, p, n, o, on);
	return dual(s, p, n, o, on, 1, target->C_DigestUpdate, FAULTSHIM_DIGEST);
}

static CK_RV shim_C_SignEncryptUpdate(CK_SESSION_HANDLE s, CK_BYTE_PTR p, CK_ULONG n, CK_BYTE_PTR o, CK_ULONG_PTR on)
{
	if (!enabled())
		return target->C_SignEncryptUpdate(s, p, n, o, on);
	return dual(s, p, n, o, on, 0, target->C_SignUpdate, FAULTSHIM_SIGN);
}

static CK_RV shim_C_DecryptVerifyUpdate(CK_SESSION_HANDLE s, CK_BYTE_PTR p, CK_ULONG n, CK_BYTE_PTR o, CK_ULONG_PTR on)
{
	if (!enabled())
		return target->C_DecryptVerifyUpdate(s, p, n, o, on);
	return dual(s, p, n, o, on, 1, target->C_VerifyUpdate, FAULTSHIM_VERIFY);
}

static CK_RV shim_C_GetOperationState(CK_SESSION_HANDLE s, CK_BYTE_PTR state, CK_ULONG_PTR len)
{
	CK_SESSION_INFO info;
	CK_RV rv;

	if (!enabled())
		return target->C_GetOperationState(s, state, len);
	if ((rv = target->C_GetSessionInfo(s, &info)) != CKR_OK)
		return rv;
	return len == NULL ? CKR_ARGUMENTS_BAD : CKR_STATE_UNSAVEABLE;
}

static CK_RV shim_C_SetOperationState(CK_SESSION_HANDLE s, CK_BYTE_PTR state, CK_ULONG len, CK_OBJECT_HANDLE enc,
                                      CK_OBJECT_HANDLE auth)
{
	CK_SESSION_INFO info;
	CK_RV rv;

	if (!enabled())
		return target->C_SetOperationState(s, state, len, enc, auth);
	if ((rv = target->C_GetSessionInfo(s, &info)) != CKR_OK)
		return rv;
	return state == NULL ? CKR_ARGUMENTS_BAD : CKR_SAVED_STATE_INVALID;
}

/* The recovering mechanism says so in its flags. */
static CK_RV shim_C_GetMechanismInfo(CK_SLOT_ID slot, CK_MECHANISM_TYPE type, CK_MECHANISM_INFO_PTR info)
{
	CK_RV rv = target->C_GetMechanismInfo(slot, type, info);

	if (rv == CKR_OK && info != NULL && type == CKM_RSA_PKCS && enabled())
		info->flags |= CKF_SIGN_RECOVER | CKF_VERIFY_RECOVER;
	return rv;
}

/* A closed session takes its companions and recovering operations with it. */
static CK_RV shim_C_CloseSession(CK_SESSION_HANDLE session)
{
	CK_RV rv = target->C_CloseSession(session);

	close_companions(session, 0);
	end_op(session, 1);
	end_op(session, 2);
	return rv;
}

static CK_RV shim_C_CloseAllSessions(CK_SLOT_ID slot)
{
	CK_RV rv = target->C_CloseAllSessions(slot);

	close_companions(0, slot);
	return rv;
}

/* Companions make the token's sessions run operations of different kinds at once. */
static CK_RV shim_C_GetTokenInfo(CK_SLOT_ID slot, CK_TOKEN_INFO_PTR info)
{
	CK_RV rv = next_get_token_info(slot, info);

	if (rv == CKR_OK && info != NULL && enabled())
		info->flags |= CKF_DUAL_CRYPTO_OPERATIONS;
	return rv;
}

void faultshim_install_optional(CK_FUNCTION_LIST *list, CK_FUNCTION_LIST *forward_to)
{
	target = forward_to;
	list->C_SignRecoverInit = shim_C_SignRecoverInit;
	list->C_SignRecover = shim_C_SignRecover;
	list->C_VerifyRecoverInit = shim_C_VerifyRecoverInit;
	list->C_VerifyRecover = shim_C_VerifyRecover;
	list->C_DigestEncryptUpdate = shim_C_DigestEncryptUpdate;
	list->C_DecryptDigestUpdate = shim_C_DecryptDigestUpdate;
	list->C_SignEncryptUpdate = shim_C_SignEncryptUpdate;
	list->C_DecryptVerifyUpdate = shim_C_DecryptVerifyUpdate;
	list->C_GetOperationState = shim_C_GetOperationState;
	list->C_SetOperationState = shim_C_SetOperationState;
	list->C_GetMechanismInfo = shim_C_GetMechanismInfo;
	list->C_CloseSession = shim_C_CloseSession;
	list->C_CloseAllSessions = shim_C_CloseAllSessions;
	next_get_token_info = list->C_GetTokenInfo;
	list->C_GetTokenInfo = shim_C_GetTokenInfo;
#define SET(fn) list->fn = r_##fn
	SET(C_EncryptInit); SET(C_Encrypt); SET(C_EncryptUpdate); SET(C_EncryptFinal);
	SET(C_DecryptInit); SET(C_Decrypt); SET(C_DecryptUpdate); SET(C_DecryptFinal);
	SET(C_DigestInit); SET(C_Digest); SET(C_DigestUpdate); SET(C_DigestKey); SET(C_DigestFinal);
	SET(C_SignUpdate); SET(C_SignFinal);
	SET(C_VerifyInit); SET(C_Verify); SET(C_VerifyUpdate); SET(C_VerifyFinal);
#undef SET
}
