/* lib/common.c — error codes, allocator hooks, clocks, logging, fences. */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/membarrier.h>
#include <locale.h>
#include <pthread.h>
#include <stdarg.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <keel/version.h>

#include "internal.h"

/* ---- version ---- */

KEEL_API const char *keel_version(void) { return KEEL_VERSION_STRING; }
KEEL_API unsigned keel_version_num(void) { return KEEL_VERSION_NUM; }

/* ---- errors ---- */

KEEL_API const char *keel_strerror(int code)
{
    switch (code) {
    case 0:
        return "success";
#define KEEL__ERR_MSG(name, val, msg)                                          \
    case val:                                                                  \
        return msg;
        KEEL_ERRNO_MAP(KEEL__ERR_MSG)
#undef KEEL__ERR_MSG
    default:
        return "unknown error";
    }
}

KEEL_API const char *keel_err_name(int code)
{
    switch (code) {
    case 0:
        return "KEEL_OK";
#define KEEL__ERR_NAME(name, val, msg)                                         \
    case val:                                                                  \
        return "KEEL_" #name;
        KEEL_ERRNO_MAP(KEEL__ERR_NAME)
#undef KEEL__ERR_NAME
    default:
        return "KEEL_EUNKNOWN";
    }
}

/* ---- allocator ---- */

static keel_allocator keel__alloc = {malloc, calloc, realloc, free};

KEEL_API int keel_set_allocator(const keel_allocator *a)
{
    if (a == NULL) {
        keel__alloc = (keel_allocator){malloc, calloc, realloc, free};
        return 0;
    }
    if (!a->malloc_fn || !a->calloc_fn || !a->realloc_fn || !a->free_fn)
        return KEEL_EINVAL;
    keel__alloc = *a;
    return 0;
}

void *keel__malloc(size_t size) { return keel__alloc.malloc_fn(size ? size : 1); }

void *keel__calloc(size_t n, size_t size)
{
    return keel__alloc.calloc_fn(n ? n : 1, size ? size : 1);
}

void *keel__realloc(void *ptr, size_t size)
{
    return keel__alloc.realloc_fn(ptr, size ? size : 1);
}

void keel__free(void *ptr)
{
    if (ptr)
        keel__alloc.free_fn(ptr);
}

KEEL_API void keel_free(void *ptr) { keel__free(ptr); }

char *keel__strdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = keel__malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

/* The hooks promise max_align_t alignment only, so larger alignments
 * over-allocate and keep the original pointer just below the block. */
void *keel__aligned_alloc(size_t align, size_t size)
{
    size_t total;
    if (align < sizeof(void *))
        align = sizeof(void *);
    if (__builtin_add_overflow(size, align + sizeof(void *), &total))
        return NULL;
    char *raw = keel__malloc(total);
    if (raw == NULL)
        return NULL;
    uintptr_t p = ((uintptr_t)raw + sizeof(void *) + align - 1) & ~(uintptr_t)(align - 1);
    ((void **)p)[-1] = raw;
    return (void *)p;
}

void keel__aligned_free(void *ptr)
{
    if (ptr)
        keel__free(((void **)ptr)[-1]);
}

/* ---- random numbers ---- */

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

/* Moved on in a forked child, whose thread would otherwise go on with the
 * parent's sequence (the same jitter, the same ids in both): a thread
 * seeded in an older generation seeds again. */
static _Atomic unsigned fork_gen = 1;
static pthread_once_t fork_watch = PTHREAD_ONCE_INIT;
static void forked(void) { atomic_fetch_add_explicit(&fork_gen, 1, memory_order_relaxed); }
static void watch_forks(void) { pthread_atfork(NULL, NULL, forked); }

KEEL_API uint64_t keel_rand_u64(void *ud)
{
    static __thread uint64_t s[4];
    static __thread unsigned seeded; /* the fork generation seeded in */
    (void)ud;
    unsigned gen = atomic_load_explicit(&fork_gen, memory_order_relaxed);
    if (KEEL__UNLIKELY(seeded != gen)) {
        pthread_once(&fork_watch, watch_forks);
        uint64_t seed[4] = {0};
        if (getrandom(seed, sizeof seed, 0) != (ssize_t)sizeof seed) {
            /* no kernel entropy: time and address still differ per thread */
            seed[0] = keel_now_ns() ^ (uint64_t)(uintptr_t)&seed;
            seed[1] = keel_wall_ns();
        }
        for (int i = 0; i < 4; i++) { /* splitmix64: never all zero */
            uint64_t z = seed[i] + 0x9e3779b97f4a7c15ull * (uint64_t)(i + 1);
            z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
            z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
            s[i] = z ^ (z >> 31);
        }
        seeded = gen;
    }
    /* xoshiro256** (Blackman & Vigna) */
    uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

/* ---- clocks ---- */

static uint64_t keel__clock_ns(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

KEEL_API uint64_t keel_now_ns(void) { return keel__clock_ns(CLOCK_MONOTONIC); }
KEEL_API uint64_t keel_wall_ns(void) { return keel__clock_ns(CLOCK_REALTIME); }
uint64_t keel__coarse_now_ns(void) { return keel__clock_ns(CLOCK_MONOTONIC_COARSE); }

void keel__abstime_in(uint64_t ns, struct timespec *ts)
{
    uint64_t at = keel__sat_add(keel_now_ns(), ns);
    if (at / 1000000000u > (uint64_t)INT32_MAX)
        at = (uint64_t)INT32_MAX * 1000000000u;
    ts->tv_sec = (time_t)(at / 1000000000u);
    ts->tv_nsec = (long)(at % 1000000000u);
}

/* ---- striped counters ---- */

__thread unsigned keel__stripe_tl __attribute__((tls_model("initial-exec")));

#define SHARED_STRIPE (KEEL__STRIPES - 1)
static _Atomic uint32_t stripes_taken; /* bit s: stripe s has an owner */
static pthread_key_t stripe_key;
static bool stripe_key_ok;
static pthread_once_t stripe_once = PTHREAD_ONCE_INIT;

/* At thread exit. The last plain stores to the stripe happen before the
 * release; the next owner's claim acquires them. Should a later
 * destructor of this thread bump a counter, it does so as a sharer. */
static void stripe_release(void *v)
{
    unsigned s = (unsigned)(uintptr_t)v - 1;
    keel__stripe_tl = SHARED_STRIPE + 1;
    atomic_fetch_and_explicit(&stripes_taken, ~(UINT32_C(1) << s), memory_order_release);
}

static void stripe_key_create(void) { stripe_key_ok = pthread_key_create(&stripe_key, stripe_release) == 0; }

unsigned keel__stripe_take(void)
{
    pthread_once(&stripe_once, stripe_key_create);
    uint32_t t = atomic_load_explicit(&stripes_taken, memory_order_relaxed);
    unsigned s = SHARED_STRIPE;
    while (stripe_key_ok && (~t & ((UINT32_C(1) << SHARED_STRIPE) - 1))) {
        unsigned free = (unsigned)__builtin_ctz(~t);
        if (atomic_compare_exchange_weak_explicit(&stripes_taken, &t, t | UINT32_C(1) << free,
                                                  memory_order_acquire, memory_order_relaxed)) {
            if (pthread_setspecific(stripe_key, (void *)(uintptr_t)(free + 1)) == 0)
                s = free;
            else /* no destructor to give it back: leave it taken, share */
                s = SHARED_STRIPE;
            break;
        }
    }
    keel__stripe_tl = s + 1;
    return s;
}

/* ---- logging ---- */

/* The hook, its level and argument change together under a lock, and are
 * read with one atomic load of the level on the path that logs nothing. */
static pthread_mutex_t keel__log_mu = PTHREAD_MUTEX_INITIALIZER;
static keel_log_fn keel__log_fn;
static void *keel__log_ud;
static atomic_int keel__log_max = -1;

/* A fork while another thread holds the lock would leave it held for good
 * in the child, whose first message would wait for ever. */
static pthread_once_t keel__log_fork_once = PTHREAD_ONCE_INIT;
static void log_before_fork(void) { pthread_mutex_lock(&keel__log_mu); }
static void log_after_fork(void) { pthread_mutex_unlock(&keel__log_mu); }
static void log_watch_forks(void) { pthread_atfork(log_before_fork, log_after_fork, log_after_fork); }

KEEL_API void keel_set_log(keel_log_fn fn, keel_log_level max_level, void *ud)
{
    /* keel__log takes the lock only once a hook is set, so only here */
    pthread_once(&keel__log_fork_once, log_watch_forks);
    pthread_mutex_lock(&keel__log_mu);
    keel__log_fn = fn;
    keel__log_ud = ud;
    atomic_store(&keel__log_max, fn ? (int)max_level : -1);
    pthread_mutex_unlock(&keel__log_mu);
}

KEEL_API const char *keel_log_level_name(keel_log_level level)
{
    switch (level) {
    case KEEL_LOG_ERROR: return "error";
    case KEEL_LOG_WARN: return "warn";
    case KEEL_LOG_INFO: return "info";
    case KEEL_LOG_DEBUG: return "debug";
    }
    return "unknown";
}

KEEL_API void keel_log_stderr(keel_log_level level, const char *module,
                              const char *msg, void *ud)
{
    (void)ud;
    fprintf(stderr, "keel[%s] %s: %s\n", module ? module : "?",
            keel_log_level_name(level), msg ? msg : "");
}

bool keel__log_enabled(keel_log_level level)
{
    return (int)level <= atomic_load_explicit(&keel__log_max, memory_order_relaxed);
}

void keel__log(keel_log_level level, const char *module, const char *fmt, ...)
{
    if (!keel__log_enabled(level))
        return;
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    size_t n = strlen(buf); /* one line, as the hook is promised: servers' texts end in newlines */
    while (n && (buf[n - 1] == '\n' || buf[n - 1] == ' '))
        buf[--n] = '\0';
    for (char *p = buf; (p = strchr(p, '\n')) != NULL;)
        *p = ' ';
    /* The hook may have changed since the check: the one read now must
     * want this level too. */
    pthread_mutex_lock(&keel__log_mu);
    keel_log_fn fn = keel__log_enabled(level) ? keel__log_fn : NULL;
    void *ud = keel__log_ud;
    pthread_mutex_unlock(&keel__log_mu);
    if (fn)
        fn(level, module, buf, ud);
}

/* ---- asymmetric fences ---- */

bool keel__membarrier_ok;
#if defined(__SANITIZE_THREAD__)
int keel__fence_word;
#endif
static pthread_once_t keel__fences_once = PTHREAD_ONCE_INIT;

static void keel__fences_setup(void)
{
    long ok = syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0);
    __atomic_store_n(&keel__membarrier_ok, ok == 0, __ATOMIC_RELAXED);
}

void keel__fences_init(void) { pthread_once(&keel__fences_once, keel__fences_setup); }

void keel__heavy_fence(void)
{
    if (!__atomic_load_n(&keel__membarrier_ok, __ATOMIC_RELAXED)) {
        KEEL__FULL_FENCE(); /* without membarrier the light side is one too */
        return;
    }
    /* Registered, so the other side relies on us: a transient failure is
     * retried, then the slower global command tried; a fence that cannot
     * be had at all would let a thief corrupt a fast path, so that stops
     * the process rather than the data. */
    for (int i = 0; i < 100; i++) {
        if (syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) == 0)
            return;
        sched_yield();
    }
    if (syscall(SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) == 0)
        return;
    keel__log(KEEL_LOG_ERROR, "common", "membarrier failed after registration: aborting");
    abort();
}

/* ---- numbers in text ---- */

static pthread_once_t c_numeric_once = PTHREAD_ONCE_INIT;
static locale_t c_numeric; /* (locale_t)0 if it could not be made */

static void make_c_numeric(void) { c_numeric = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0); }

double keel__strtod(const char *s, char **end)
{
    pthread_once(&c_numeric_once, make_c_numeric);
    return c_numeric ? strtod_l(s, end, c_numeric) : strtod(s, end);
}

int keel__snprintf_c(char *buf, size_t size, const char *fmt, ...)
{
    pthread_once(&c_numeric_once, make_c_numeric);
    locale_t old = c_numeric ? uselocale(c_numeric) : (locale_t)0;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    if (old)
        uselocale(old);
    return n;
}
