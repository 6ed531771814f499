/* A plain C PKCS#11 host for the rel-hygiene tests (issue 6 item 9).
 *
 *   hygiene_host MODULE forkcheck LABEL PIN   a forked child that does not C_Initialize
 *                                             calls everything; the parent carries on
 *   hygiene_host MODULE probe LABEL           which daemon does this process reach?
 *
 * One line per result: "name rv-hex [details]". Exit status 0 unless the harness failed.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <p11-kit/pkcs11.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static CK_FUNCTION_LIST *f;

static void out(const char *name, CK_RV rv, const char *details)
{
    printf("%s 0x%lx%s%s\n", name, (unsigned long)rv, details ? " " : "", details ? details : "");
    fflush(stdout);
}

static void load(const char *path)
{
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) { fprintf(stderr, "dlopen: %s\n", dlerror()); exit(2); }
    CK_C_GetFunctionList get = (CK_C_GetFunctionList)dlsym(h, "C_GetFunctionList");
    if (!get || get(&f) != CKR_OK || !f) { fprintf(stderr, "no function list\n"); exit(2); }
}

static CK_RV init(void)
{
    CK_C_INITIALIZE_ARGS args = { .flags = CKF_OS_LOCKING_OK };
    return f->C_Initialize(&args);
}

/* The slot whose token label (blank-padded) starts with label. */
static int find_slot(const char *label, CK_SLOT_ID *slot, int *count)
{
    CK_SLOT_ID slots[64];
    CK_ULONG n = 64;
    *count = 0;
    if (f->C_GetSlotList(CK_TRUE, slots, &n) != CKR_OK) return 0;
    *count = (int)n;
    for (CK_ULONG i = 0; i < n; i++) {
        CK_TOKEN_INFO info;
        if (f->C_GetTokenInfo(slots[i], &info) != CKR_OK) continue;
        size_t len = strlen(label);
        if (len <= sizeof info.label && !memcmp(info.label, label, len)
            && (len == sizeof info.label || info.label[len] == ' ')) {
            *slot = slots[i];
            return 1;
        }
    }
    return 0;
}

static CK_RV sign_once(CK_SESSION_HANDLE s, unsigned char seed)
{
    CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
    unsigned char id = 1;
    CK_ATTRIBUTE t[] = { { CKA_CLASS, &cls, sizeof cls }, { CKA_ID, &id, 1 } };
    CK_OBJECT_HANDLE key;
    CK_ULONG found = 0;
    CK_RV rv = f->C_FindObjectsInit(s, t, 2);
    if (rv != CKR_OK) return rv;
    rv = f->C_FindObjects(s, &key, 1, &found);
    f->C_FindObjectsFinal(s);
    if (rv != CKR_OK) return rv;
    if (found != 1) return CKR_KEY_HANDLE_INVALID;
    CK_MECHANISM m = { CKM_ECDSA, NULL, 0 };
    rv = f->C_SignInit(s, &m, key);
    if (rv != CKR_OK) return rv;
    unsigned char digest[32], sig[256];
    memset(digest, seed, sizeof digest);
    CK_ULONG len = sizeof sig;
    return f->C_Sign(s, digest, sizeof digest, sig, &len);
}

static int cmd_forkcheck(const char *label, const char *pin)
{
    out("parent C_Initialize", init(), NULL);
    CK_SLOT_ID slot;
    int count;
    if (!find_slot(label, &slot, &count)) { out("parent find_slot", CKR_SLOT_ID_INVALID, NULL); return 2; }
    CK_SESSION_HANDLE s;
    out("parent C_OpenSession", f->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s), NULL);
    out("parent C_Login", f->C_Login(s, CKU_USER, (CK_UTF8CHAR *)pin, strlen(pin)), NULL);
    out("parent sign", sign_once(s, 1), NULL);
    pid_t child = fork();
    if (child == 0) {
        /* Everything the child inherited is the parent's: none of it may be used. */
        CK_INFO info;
        CK_SLOT_ID slots[8];
        CK_ULONG n = 8;
        CK_SLOT_INFO si;
        CK_TOKEN_INFO ti;
        CK_SESSION_INFO ss;
        CK_SESSION_HANDLE cs;
        CK_MECHANISM m = { CKM_ECDSA, NULL, 0 };
        unsigned char data[32] = { 0 }, sig[256];
        CK_ULONG siglen = sizeof sig;
        CK_SLOT_ID ev;
        out("child C_GetInfo", f->C_GetInfo(&info), NULL);
        out("child C_GetSlotList", f->C_GetSlotList(CK_TRUE, slots, &n), NULL);
        out("child C_GetSlotInfo", f->C_GetSlotInfo(slot, &si), NULL);
        out("child C_GetTokenInfo", f->C_GetTokenInfo(slot, &ti), NULL);
        out("child C_OpenSession", f->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &cs), NULL);
        out("child C_GetSessionInfo", f->C_GetSessionInfo(s, &ss), NULL);
        out("child C_Login", f->C_Login(s, CKU_USER, (CK_UTF8CHAR *)pin, strlen(pin)), NULL);
        out("child C_SignInit", f->C_SignInit(s, &m, 1), NULL);
        out("child C_Sign", f->C_Sign(s, data, sizeof data, sig, &siglen), NULL);
        out("child C_Logout", f->C_Logout(s), NULL);
        out("child C_CloseSession", f->C_CloseSession(s), NULL);
        out("child C_WaitForSlotEvent", f->C_WaitForSlotEvent(CKF_DONT_BLOCK, &ev, NULL), NULL);
        out("child C_Finalize", f->C_Finalize(NULL), NULL);
        _exit(0);
    }
    int status = 0;
    waitpid(child, &status, 0);
    char detail[32];
    snprintf(detail, sizeof detail, "%d", WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    out("parent child-exit", CKR_OK, detail);
    out("parent sign-after", sign_once(s, 2), NULL);
    out("parent C_Finalize", f->C_Finalize(NULL), NULL);
    return 0;
}

static int cmd_probe(const char *label)
{
    char ids[64];
    snprintf(ids, sizeof ids, "uid=%d euid=%d", (int)getuid(), (int)geteuid());
    out("ids", CKR_OK, ids);
    CK_RV rv = init();
    out("C_Initialize", rv, NULL);
    if (rv != CKR_OK) return 0;
    CK_SLOT_ID slot;
    int count = 0;
    int found = find_slot(label, &slot, &count);
    char detail[32];
    snprintf(detail, sizeof detail, "%d", count);
    out("slots", CKR_OK, detail);
    out("found", found ? CKR_OK : CKR_SLOT_ID_INVALID, found ? "yes" : "no");
    out("C_Finalize", f->C_Finalize(NULL), NULL);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 3) { fprintf(stderr, "usage: %s MODULE COMMAND ...\n", argv[0]); return 2; }
    setvbuf(stdout, NULL, _IOLBF, 0);
    load(argv[1]);
    if (!strcmp(argv[2], "forkcheck") && argc == 5) return cmd_forkcheck(argv[3], argv[4]);
    if (!strcmp(argv[2], "probe") && argc == 4) return cmd_probe(argv[3]);
    fprintf(stderr, "bad command\n");
    return 2;
}
