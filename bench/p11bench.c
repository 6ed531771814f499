/*
 * p11bench: signature latency of one PKCS#11 module, single thread.
 *
 * Loads a module with dlopen, finds the token by label and the private key by
 * CKA_ID, warms up, then times N signatures. Each sample is measured with
 * CLOCK_MONOTONIC around exactly the calls the mode names:
 *   steady  C_SignInit + C_Sign, in one session logged in once beforehand
 *           (--length-query: C_SignInit + C_Sign(NULL) + C_Sign)
 *   cold    C_OpenSession + C_Login + key search + C_SignInit + C_Sign +
 *           C_Logout + C_CloseSession (the module stays initialised: this is a
 *           cold session, not a cold process; init_us reports the process start)
 *   cycle   C_Login + key search + C_SignInit + C_Sign + C_Logout in one open
 *           session: what a caching-mode signature amounts to on the token
 * The result is one line of key=value pairs on stdout, prefixed "RESULT", for the
 * driver (bench/run.py) to parse. Diagnostics go to stderr; the exit status is 0
 * only if every signature succeeded.
 *
 * Build: cc -O2 $(pkg-config --cflags p11-kit-1) -o p11bench p11bench.c -ldl
 */
#define _POSIX_C_SOURCE 200809L
#include <dlfcn.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

enum mech_kind { MECH_ECDSA, MECH_RSA };
enum run_mode { MODE_STEADY, MODE_COLD, MODE_CYCLE };

struct options {
    const char *module;
    const char *token_label;
    const char *pin;
    const char *name;
    unsigned char key_id[64];
    size_t key_id_len;
    enum mech_kind mech;
    enum run_mode mode;
    long count;
    long warmup;
    int length_query;
};

static CK_FUNCTION_LIST_PTR p11;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: p11bench --module PATH --token LABEL --pin PIN --key-id HEX\n"
            "                --mech ecdsa|rsa [--mode steady|cold|cycle] [--count N]\n"
            "                [--warmup N] [--name NAME] [--length-query]\n"
            "The PIN may also come from the environment variable P11BENCH_PIN.\n"
            "P11BENCH_PAUSE_US=N sleeps N microseconds between samples (not timed): a client\n"
            "that signs now and then, as the reliability flood test's healthy client does.\n"
            "P11BENCH_STOP_FILE=PATH ends the measured loop early once PATH exists.\n"
            "P11BENCH_BARRIER=PATH waits, after the warm-up, until PATH exists (clients\n"
            "started together measure together); P11BENCH_SAMPLES=PATH writes every\n"
            "sample (us, one per line) for a driver that merges several processes.\n");
}

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

static int parse_hex(const char *s, unsigned char *out, size_t cap, size_t *len)
{
    size_t n = strlen(s);
    if (n == 0 || n % 2 != 0 || n / 2 > cap)
        return -1;
    for (size_t i = 0; i < n / 2; i++) {
        unsigned int byte;
        if (sscanf(s + 2 * i, "%2x", &byte) != 1)
            return -1;
        out[i] = (unsigned char)byte;
    }
    *len = n / 2;
    return 0;
}

static long parse_count(const char *s, const char *what)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno != 0 || *end != '\0' || v < 0 || v > 100000000) {
        fprintf(stderr, "p11bench: bad %s: %s\n", what, s);
        exit(2);
    }
    return v;
}

static void parse_args(int argc, char **argv, struct options *o)
{
    memset(o, 0, sizeof *o);
    o->mode = MODE_STEADY;
    o->count = -1;
    o->warmup = -1;
    o->name = "module";
    o->pin = getenv("P11BENCH_PIN");
    int have_mech = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0) {
            usage(stdout);
            exit(0);
        }
        if (strcmp(a, "--length-query") == 0) {
            o->length_query = 1;
            continue;
        }
        if (i + 1 >= argc) {
            usage(stderr);
            exit(2);
        }
        const char *v = argv[++i];
        if (strcmp(a, "--module") == 0) {
            o->module = v;
        } else if (strcmp(a, "--token") == 0) {
            o->token_label = v;
        } else if (strcmp(a, "--pin") == 0) {
            o->pin = v;
        } else if (strcmp(a, "--name") == 0) {
            o->name = v;
        } else if (strcmp(a, "--key-id") == 0) {
            if (parse_hex(v, o->key_id, sizeof o->key_id, &o->key_id_len) != 0) {
                fprintf(stderr, "p11bench: bad --key-id (hex expected): %s\n", v);
                exit(2);
            }
        } else if (strcmp(a, "--mech") == 0) {
            if (strcmp(v, "ecdsa") == 0)
                o->mech = MECH_ECDSA;
            else if (strcmp(v, "rsa") == 0)
                o->mech = MECH_RSA;
            else {
                fprintf(stderr, "p11bench: --mech must be ecdsa or rsa\n");
                exit(2);
            }
            have_mech = 1;
        } else if (strcmp(a, "--mode") == 0) {
            if (strcmp(v, "steady") == 0)
                o->mode = MODE_STEADY;
            else if (strcmp(v, "cold") == 0)
                o->mode = MODE_COLD;
            else if (strcmp(v, "cycle") == 0)
                o->mode = MODE_CYCLE;
            else {
                fprintf(stderr, "p11bench: --mode must be steady, cold or cycle\n");
                exit(2);
            }
        } else if (strcmp(a, "--count") == 0) {
            o->count = parse_count(v, "--count");
        } else if (strcmp(a, "--warmup") == 0) {
            o->warmup = parse_count(v, "--warmup");
        } else {
            usage(stderr);
            exit(2);
        }
    }
    if (!o->module || !o->token_label || !o->pin || !o->key_id_len || !have_mech) {
        usage(stderr);
        exit(2);
    }
    if (o->count < 0)
        o->count = o->mech == MECH_ECDSA ? 2000 : 500;
    if (o->warmup < 0)
        o->warmup = o->count / 20 < 5 ? 5 : o->count / 20;
    if (o->count == 0) {
        fprintf(stderr, "p11bench: --count must be at least 1\n");
        exit(2);
    }
}

#define CHECK(call)                                                            \
    do {                                                                       \
        CK_RV rv_ = (call);                                                    \
        if (rv_ != CKR_OK) {                                                   \
            fprintf(stderr, "p11bench: %s failed: 0x%lx\n", #call,             \
                    (unsigned long)rv_);                                       \
            return rv_;                                                        \
        }                                                                      \
    } while (0)

/* PKCS#11 label fields are space-padded, not NUL-terminated. */
static int label_matches(const CK_UTF8CHAR label[32], const char *want)
{
    size_t n = strlen(want);
    if (n > 32 || memcmp(label, want, n) != 0)
        return 0;
    for (size_t i = n; i < 32; i++)
        if (label[i] != ' ')
            return 0;
    return 1;
}

/* A space-padded PKCS#11 text field as one token for a key=value line: trailing
 * blanks dropped, inner blanks and non-printables as '_'. */
static void fixed_field(char *out, const CK_UTF8CHAR *field, size_t len)
{
    while (len > 0 && (field[len - 1] == ' ' || field[len - 1] == '\0'))
        len--;
    for (size_t i = 0; i < len; i++)
        out[i] = field[i] > ' ' && field[i] < 0x7f && field[i] != '=' ? (char)field[i] : '_';
    out[len] = '\0';
    if (len == 0)
        strcpy(out, "-");
}

static CK_RV find_slot(const char *label, CK_SLOT_ID *out)
{
    CK_ULONG n = 0;
    CHECK(p11->C_GetSlotList(CK_TRUE, NULL, &n));
    if (n == 0 || n > 4096) {
        fprintf(stderr, "p11bench: %lu slots with a token\n", (unsigned long)n);
        return CKR_SLOT_ID_INVALID;
    }
    CK_SLOT_ID *slots = calloc(n, sizeof *slots);
    if (!slots)
        return CKR_HOST_MEMORY;
    CK_RV rv = p11->C_GetSlotList(CK_TRUE, slots, &n);
    if (rv != CKR_OK) {
        free(slots);
        fprintf(stderr, "p11bench: C_GetSlotList failed: 0x%lx\n", (unsigned long)rv);
        return rv;
    }
    rv = CKR_TOKEN_NOT_PRESENT;
    for (CK_ULONG i = 0; i < n; i++) {
        CK_TOKEN_INFO info;
        if (p11->C_GetTokenInfo(slots[i], &info) != CKR_OK)
            continue;
        if (label_matches(info.label, label)) {
            *out = slots[i];
            rv = CKR_OK;
            break;
        }
    }
    free(slots);
    if (rv != CKR_OK)
        fprintf(stderr, "p11bench: no token labelled '%s'\n", label);
    return rv;
}

static CK_RV find_key(CK_SESSION_HANDLE s, const struct options *o, CK_OBJECT_HANDLE *key)
{
    CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof cls},
        {CKA_ID, (void *)o->key_id, o->key_id_len},
    };
    CK_ULONG found = 0;
    CHECK(p11->C_FindObjectsInit(s, tmpl, 2));
    CK_RV rv = p11->C_FindObjects(s, key, 1, &found);
    CK_RV rv2 = p11->C_FindObjectsFinal(s);
    if (rv != CKR_OK || rv2 != CKR_OK) {
        fprintf(stderr, "p11bench: key search failed: 0x%lx/0x%lx\n", (unsigned long)rv,
                (unsigned long)rv2);
        return rv != CKR_OK ? rv : rv2;
    }
    if (found != 1) {
        fprintf(stderr, "p11bench: no private key with that CKA_ID\n");
        return CKR_KEY_HANDLE_INVALID;
    }
    return CKR_OK;
}

/* RSA gets a PKCS#1 v1.5 DigestInfo for SHA-256 (what TLS and ssh clients send to a
 * token with CKM_RSA_PKCS); ECDSA gets a bare 32-byte digest. Both keep the module's
 * own hashing out of the measurement. */
static const unsigned char sha256_prefix[] = {0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60,
                                              0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                                              0x01, 0x05, 0x00, 0x04, 0x20};
static unsigned char payload[sizeof sha256_prefix + 32];
static CK_ULONG payload_len;
static CK_MECHANISM mechanism;

static void setup_payload(enum mech_kind k)
{
    unsigned char *digest = payload;
    if (k == MECH_RSA) {
        memcpy(payload, sha256_prefix, sizeof sha256_prefix);
        digest = payload + sizeof sha256_prefix;
        payload_len = sizeof payload;
        mechanism.mechanism = CKM_RSA_PKCS;
    } else {
        payload_len = 32;
        mechanism.mechanism = CKM_ECDSA;
    }
    for (int i = 0; i < 32; i++)
        digest[i] = (unsigned char)(0xa5 ^ (i * 7));
    mechanism.pParameter = NULL;
    mechanism.ulParameterLen = 0;
}

static int length_query;

static CK_RV sign_once(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key)
{
    unsigned char sig[1024];
    CK_ULONG sig_len = sizeof sig;
    CHECK(p11->C_SignInit(s, &mechanism, key));
    /* Many applications (pkcs11-tool, OpenSSL's pkcs11 providers) ask for the length
     * first: a NULL buffer, then the real call. A remoting layer may pay twice. */
    if (length_query) {
        CHECK(p11->C_Sign(s, payload, payload_len, NULL, &sig_len));
        if (sig_len > sizeof sig) {
            fprintf(stderr, "p11bench: signature of %lu bytes\n", (unsigned long)sig_len);
            return CKR_GENERAL_ERROR;
        }
    }
    CHECK(p11->C_Sign(s, payload, payload_len, sig, &sig_len));
    if (sig_len == 0) {
        fprintf(stderr, "p11bench: empty signature\n");
        return CKR_GENERAL_ERROR;
    }
    return CKR_OK;
}

static CK_RV login(CK_SESSION_HANDLE s, const char *pin)
{
    CK_RV rv = p11->C_Login(s, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin));
    if (rv != CKR_OK)
        fprintf(stderr, "p11bench: C_Login failed: 0x%lx\n", (unsigned long)rv);
    return rv;
}

/* A caching-mode signature as the token sees it: the session stays open, the login
 * does not (SoftHSM renumbers private objects at every login, so the key is found
 * again, as pincache's bracket does). */
static CK_RV login_cycle(CK_SESSION_HANDLE s, const struct options *o)
{
    CK_OBJECT_HANDLE key;
    CK_RV rv = login(s, o->pin);
    if (rv != CKR_OK)
        return rv;
    rv = find_key(s, o, &key);
    if (rv == CKR_OK)
        rv = sign_once(s, key);
    CK_RV lo = p11->C_Logout(s);
    if (rv == CKR_OK && lo != CKR_OK) {
        fprintf(stderr, "p11bench: C_Logout failed: 0x%lx\n", (unsigned long)lo);
        rv = lo;
    }
    return rv;
}

/* The same in a session of its own, opened and closed around it. */
static CK_RV cold_cycle(CK_SLOT_ID slot, const struct options *o)
{
    CK_SESSION_HANDLE s;
    CHECK(p11->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s));
    CK_RV rv = login_cycle(s, o);
    CK_RV cl = p11->C_CloseSession(s);
    if (rv == CKR_OK && cl != CKR_OK) {
        fprintf(stderr, "p11bench: C_CloseSession failed: 0x%lx\n", (unsigned long)cl);
        rv = cl;
    }
    return rv;
}

static CK_RV one_sample(CK_SLOT_ID slot, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key,
                        const struct options *o)
{
    switch (o->mode) {
    case MODE_STEADY:
        return sign_once(s, key);
    case MODE_CYCLE:
        return login_cycle(s, o);
    default:
        return cold_cycle(slot, o);
    }
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile on sorted samples. */
static double percentile(const double *sorted, long n, double p)
{
    long rank = (long)(p / 100.0 * (double)n + 0.999999);
    if (rank < 1)
        rank = 1;
    if (rank > n)
        rank = n;
    return sorted[rank - 1];
}

static CK_RV run(const struct options *o)
{
    double t0 = now_us();
    void *lib = dlopen(o->module, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr, "p11bench: dlopen: %s\n", dlerror());
        return CKR_GENERAL_ERROR;
    }
    CK_C_GetFunctionList get_list;
    /* SAFETY: POSIX guarantees a function pointer round-trips through void * from
     * dlsym; the symbol's type is fixed by the PKCS#11 standard. */
    *(void **)&get_list = dlsym(lib, "C_GetFunctionList");
    if (!get_list) {
        fprintf(stderr, "p11bench: %s exports no C_GetFunctionList\n", o->module);
        return CKR_GENERAL_ERROR;
    }
    CHECK(get_list(&p11));
    CK_C_INITIALIZE_ARGS init = {.flags = CKF_OS_LOCKING_OK};
    CHECK(p11->C_Initialize(&init));
    /* Printed so a table row can be told apart from a stand-in module. */
    CK_INFO info;
    CHECK(p11->C_GetInfo(&info));
    char library[33];
    fixed_field(library, info.manufacturerID, 32);
    CK_SLOT_ID slot;
    CK_RV rv = find_slot(o->token_label, &slot);
    double init_us = now_us() - t0;
    if (rv != CKR_OK)
        return rv;
    setup_payload(o->mech);
    length_query = o->length_query;

    CK_SESSION_HANDLE s = 0;
    CK_OBJECT_HANDLE key = 0;
    if (o->mode == MODE_STEADY) {
        CHECK(p11->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s));
        CHECK(login(s, o->pin));
        CHECK(find_key(s, o, &key));
    } else if (o->mode == MODE_CYCLE) {
        CHECK(p11->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s));
    }

    for (long i = 0; i < o->warmup; i++) {
        rv = one_sample(slot, s, key, o);
        if (rv != CKR_OK)
            return rv;
    }

    double *samples = calloc((size_t)o->count, sizeof *samples);
    if (!samples)
        return CKR_HOST_MEMORY;
    const char *stop_file = getenv("P11BENCH_STOP_FILE");
    const char *pause_env = getenv("P11BENCH_PAUSE_US");
    long pause_us = pause_env ? strtol(pause_env, NULL, 10) : 0;
    double paused = 0;
    const char *barrier = getenv("P11BENCH_BARRIER");
    if (barrier) {
        struct timespec poll_wait = {0, 200 * 1000};
        while (access(barrier, F_OK) != 0)
            nanosleep(&poll_wait, NULL);
    }
    double start = now_us();
    long done = 0;
    for (long i = 0; i < o->count; i++, done++) {
        if (stop_file && access(stop_file, F_OK) == 0)
            break;
        if (pause_us > 0) {
            double p0 = now_us();
            struct timespec pause = {pause_us / 1000000, (pause_us % 1000000) * 1000};
            nanosleep(&pause, NULL);
            paused += now_us() - p0;
        }
        double a = now_us();
        rv = one_sample(slot, s, key, o);
        samples[i] = now_us() - a;
        if (rv != CKR_OK) {
            free(samples);
            return rv;
        }
    }
    double end = now_us();
    double elapsed = end - start - paused;
    if (done == 0) {
        fprintf(stderr, "p11bench: stopped before the first sample\n");
        free(samples);
        return CKR_GENERAL_ERROR;
    }
    const long n = done; /* fewer than --count when P11BENCH_STOP_FILE ended the loop */

    if (o->mode == MODE_STEADY)
        CHECK(p11->C_Logout(s));
    if (o->mode != MODE_COLD)
        CHECK(p11->C_CloseSession(s));
    const char *samples_path = getenv("P11BENCH_SAMPLES");
    if (samples_path) {
        FILE *out = fopen(samples_path, "w");
        if (!out) {
            fprintf(stderr, "p11bench: %s: %s\n", samples_path, strerror(errno));
            free(samples);
            return CKR_GENERAL_ERROR;
        }
        for (long i = 0; i < n; i++)
            fprintf(out, "%.1f\n", samples[i]);
        fclose(out);
    }
    CHECK(p11->C_Finalize(NULL));
    /* The module stays mapped: some modules leave threads behind after C_Finalize. */

    double sum = 0;
    for (long i = 0; i < n; i++)
        sum += samples[i];
    qsort(samples, (size_t)n, sizeof *samples, cmp_double);
    printf("RESULT name=%s mech=%s mode=%s n=%ld warmup=%ld p50_us=%.1f p99_us=%.1f "
           "mean_us=%.1f min_us=%.1f max_us=%.1f ops_per_s=%.1f init_us=%.1f "
           "length_query=%d library=%s start_us=%.1f end_us=%.1f\n",
           o->name, o->mech == MECH_ECDSA ? "ecdsa" : "rsa",
           o->mode == MODE_STEADY ? "steady" : o->mode == MODE_CYCLE ? "cycle" : "cold", n, o->warmup,
           percentile(samples, n, 50), percentile(samples, n, 99),
           sum / (double)n, samples[0], samples[n - 1],
           (double)n / (elapsed / 1e6), init_us, o->length_query, library, start, end);
    free(samples);
    return CKR_OK;
}

int main(int argc, char **argv)
{
    struct options o;
    parse_args(argc, argv, &o);
    return run(&o) == CKR_OK ? 0 : 1;
}
