/*
 * FaultShim: forwards every PKCS#11 call to a target module, except that C_Login,
 * C_GetTokenInfo, C_SignInit and C_Sign consult a control directory first, so tests can
 * make a token reject a PIN, report PIN-counter flags, fail to report itself, or be slow.
 * See README.md.
 *
 * Thread-safe: the only shared state is set once under pthread_once; control files are
 * re-read on every call and the log is written with one O_APPEND write per line.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

#include "faultshim.h"
#include "internal.h"

static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static CK_FUNCTION_LIST_PTR target;   /* NULL if the target could not be loaded */
static CK_FUNCTION_LIST shim_list;
static char control_dir[4096];        /* empty: pure pass-through */

/* Reads a small control file into buf (NUL-terminated, trailing newlines stripped).
 * Returns the length, or -1 if there is no control directory or no such file. */
static ssize_t read_control(const char *name, char *buf, size_t size)
{
	char path[sizeof control_dir + 64];
	ssize_t n, total = 0;
	int fd;

	if (control_dir[0] == '\0' || size == 0)
		return -1;
	snprintf(path, sizeof path, "%s/%s", control_dir, name);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	while ((size_t)total < size - 1) {
		n = read(fd, buf + total, size - 1 - (size_t)total);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		total += n;
	}
	close(fd);
	while (total > 0 && (buf[total - 1] == '\n' || buf[total - 1] == '\r'))
		total--;
	buf[total] = '\0';
	return total;
}

int faultshim_control_exists(const char *name)
{
	char buf[8];

	return read_control(name, buf, sizeof buf) >= 0;
}

static int read_control_ulong(const char *name, unsigned long *value)
{
	char buf[64], *end;

	if (read_control(name, buf, sizeof buf) <= 0)
		return 0;
	errno = 0;
	*value = strtoul(buf, &end, 0);
	return errno == 0 && end != buf;
}

static void maybe_delay(void)
{
	unsigned long ms;
	struct timespec ts;

	if (!read_control_ulong(FAULTSHIM_FILE_DELAY_MS, &ms))
		return;
	ts.tv_sec = (time_t)(ms / 1000);
	ts.tv_nsec = (long)(ms % 1000) * 1000000L;
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

/* Appends one line to a log file of the control directory. */
static void log_line(const char *name, const char *line, int len)
{
	char path[sizeof control_dir + 64];
	int fd;

	if (control_dir[0] == '\0')
		return;
	snprintf(path, sizeof path, "%s/%s", control_dir, name);
	fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
	if (fd < 0)
		return;
	/* A single write() on an O_APPEND descriptor keeps concurrent lines whole. */
	if (write(fd, line, (size_t)len) < 0) {
		/* Nothing to do: the log is best effort and the call's result stands. */
	}
	close(fd);
}

/* One line per login: user type and result, never the PIN. */
static void log_login(CK_USER_TYPE user_type, CK_RV rv)
{
	char line[64];
	int len = snprintf(line, sizeof line, "%lu 0x%lx\n", (unsigned long)user_type, (unsigned long)rv);

	log_line(FAULTSHIM_FILE_LOGINS_LOG, line, len);
}

static CK_RV shim_C_Initialize(CK_VOID_PTR args)
{
	return target->C_Initialize(args);
}

/* "RV [COUNT]": the next COUNT calls (every call without a count) fail with RV. The file
 * is rewritten with the count left, and removed at zero. */
static int token_info_fault(CK_RV *rv)
{
	char buf[64], path[sizeof control_dir + 64], *end;
	unsigned long value, count = 0;
	int has_count, fd, len;

	if (read_control(FAULTSHIM_FILE_TOKEN_INFO_FAIL, buf, sizeof buf) <= 0)
		return 0;
	value = strtoul(buf, &end, 0);
	if (end == buf)
		return 0;
	has_count = sscanf(end, "%lu", &count) == 1;
	if (has_count && count == 0)
		return 0;
	*rv = (CK_RV)value;
	if (has_count) {
		snprintf(path, sizeof path, "%s/%s", control_dir, FAULTSHIM_FILE_TOKEN_INFO_FAIL);
		if (count == 1) {
			unlink(path);
		} else {
			len = snprintf(buf, sizeof buf, "0x%lx %lu\n", value, count - 1);
			fd = open(path, O_WRONLY | O_TRUNC | O_CLOEXEC);
			if (fd >= 0) {
				if (write(fd, buf, (size_t)len) < 0) {
					/* best effort, as the log */
				}
				close(fd);
			}
		}
	}
	return 1;
}

static CK_RV shim_C_GetTokenInfo(CK_SLOT_ID slot, CK_TOKEN_INFO_PTR info)
{
	unsigned long add;
	CK_RV rv;

	if (token_info_fault(&rv))
		return rv;
	rv = target->C_GetTokenInfo(slot, info);

	if (rv == CKR_OK && info != NULL && read_control_ulong(FAULTSHIM_FILE_TOKEN_FLAGS_ADD, &add))
		info->flags |= add;
	return rv;
}

static CK_RV shim_C_Login(CK_SESSION_HANDLE session, CK_USER_TYPE user_type,
                          CK_UTF8CHAR_PTR pin, CK_ULONG pin_len)
{
	char reject[256];
	ssize_t reject_len;
	CK_RV rv;

	maybe_delay();
	if (read_control(FAULTSHIM_FILE_STALE_SESSION_ONCE, reject, sizeof reject) >= 0) {
		/* One shot: the session dies under the caller, as a card reset leaves it. */
		char path[sizeof control_dir + 64];
		snprintf(path, sizeof path, "%s/%s", control_dir, FAULTSHIM_FILE_STALE_SESSION_ONCE);
		unlink(path);
		target->C_CloseSession(session);
	}
	reject_len = read_control(FAULTSHIM_FILE_REJECT_PIN, reject, sizeof reject);
	if (reject_len >= 0 && pin != NULL && (CK_ULONG)reject_len == pin_len &&
	    memcmp(reject, pin, pin_len) == 0)
		rv = CKR_PIN_INCORRECT;
	else
		rv = target->C_Login(session, user_type, pin, pin_len);
	/* The rejected PIN was in our stack buffer: do not leave it there. */
	explicit_bzero(reject, sizeof reject);
	log_login(user_type, rv);
	return rv;
}

static CK_RV shim_C_Logout(CK_SESSION_HANDLE session)
{
	char line[32];
	CK_RV rv = target->C_Logout(session);
	int len = snprintf(line, sizeof line, "0x%lx\n", (unsigned long)rv);

	log_line(FAULTSHIM_FILE_LOGOUTS_LOG, line, len);
	return rv;
}

static CK_RV shim_C_SignInit(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE key)
{
	maybe_delay();
	return target->C_SignInit(faultshim_route(session, FAULTSHIM_SIGN), mechanism, key);
}

static CK_RV shim_C_Sign(CK_SESSION_HANDLE session, CK_BYTE_PTR data, CK_ULONG data_len,
                         CK_BYTE_PTR signature, CK_ULONG_PTR signature_len)
{
	maybe_delay();
	return target->C_Sign(faultshim_route(session, FAULTSHIM_SIGN), data, data_len, signature, signature_len);
}

static void load_target(void)
{
	const char *path = getenv(FAULTSHIM_ENV_TARGET);
	const char *dir = getenv(FAULTSHIM_ENV_DIR);
	CK_C_GetFunctionList get_list;
	CK_FUNCTION_LIST_PTR list = NULL;
	void *handle;

	if (dir != NULL && strlen(dir) < sizeof control_dir)
		strcpy(control_dir, dir);
	if (path == NULL || path[0] == '\0')
		path = FAULTSHIM_DEFAULT_TARGET;
	/* Kept open for the life of the process: the copied pointers point into it. */
	handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	if (handle == NULL) {
		fprintf(stderr, "faultshim: cannot load %s: %s\n", path, dlerror());
		return;
	}
	get_list = (CK_C_GetFunctionList)dlsym(handle, "C_GetFunctionList");
	if (get_list == NULL || get_list(&list) != CKR_OK || list == NULL) {
		fprintf(stderr, "faultshim: %s is not a PKCS#11 module\n", path);
		return;
	}
	shim_list = *list;
	shim_list.C_Initialize = shim_C_Initialize;
	shim_list.C_GetTokenInfo = shim_C_GetTokenInfo;
	shim_list.C_Login = shim_C_Login;
	shim_list.C_Logout = shim_C_Logout;
	shim_list.C_SignInit = shim_C_SignInit;
	shim_list.C_Sign = shim_C_Sign;
	faultshim_install_optional(&shim_list, list);
	target = list;
}

__attribute__((visibility("default")))
CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list)
{
	if (list == NULL)
		return CKR_ARGUMENTS_BAD;
	pthread_once(&load_once, load_target);
	if (target == NULL)
		return CKR_GENERAL_ERROR;
	*list = &shim_list;
	return CKR_OK;
}
