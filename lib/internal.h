/* lib/internal.h — helpers shared by libkeel's sources. Never installed.
 *
 * Internal names that are not static carry the keel__ prefix; they are
 * hidden by -fvisibility=hidden and checked by `make check-symbols`.
 */
#ifndef KEEL_INTERNAL_H
#define KEEL_INTERNAL_H

#include <sched.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdatomic.h>
#include <stdint.h>

#include <keel/common.h>

#define KEEL__CACHELINE 64
/* Internal globals shared between files: hidden, so that code built with
 * -fPIC reaches them without going through the GOT. */
#define KEEL__HIDDEN __attribute__((visibility("hidden")))

#if defined(__GNUC__) || defined(__clang__)
#define KEEL__LIKELY(x) __builtin_expect(!!(x), 1)
#define KEEL__UNLIKELY(x) __builtin_expect(!!(x), 0)
#define KEEL__COLD __attribute__((cold, noinline)) /* a slow path, kept out of its caller */
#define KEEL__PRINTF(f, a) __attribute__((format(printf, f, a)))
#else
#define KEEL__LIKELY(x) (x)
#define KEEL__UNLIKELY(x) (x)
#define KEEL__COLD
#define KEEL__PRINTF(f, a)
#endif

/* ---- memory (through the hooks of keel_set_allocator) ---- */
void *keel__malloc(size_t size);
void *keel__calloc(size_t n, size_t size);
void *keel__realloc(void *ptr, size_t size);
void keel__free(void *ptr);
/* A copy of a NUL-terminated string through the hooks; NULL if no memory. */
char *keel__strdup(const char *s);
/* Memory aligned to `align` (a power of two), freed with
 * keel__aligned_free. Built on the hooks by over-allocating. */
void *keel__aligned_alloc(size_t align, size_t size);
void keel__aligned_free(void *ptr);
/* *out = a * b, false on overflow. */
static inline bool keel__mul_ok(size_t a, size_t b, size_t *out)
{
    return !__builtin_mul_overflow(a, b, out);
}
/* a * b, UINT64_MAX when it overflows (times: "never" stays never). */
static inline uint64_t keel__sat_mul(uint64_t a, uint64_t b)
{
    uint64_t r;
    return __builtin_mul_overflow(a, b, &r) ? UINT64_MAX : r;
}
/* a + b, UINT64_MAX when it overflows (a deadline "never" stays never). */
static inline uint64_t keel__sat_add(uint64_t a, uint64_t b)
{
    uint64_t r;
    return __builtin_add_overflow(a, b, &r) ? UINT64_MAX : r;
}

/* ---- logging ---- */
/* true when a message at `level` would reach a hook: lets callers skip
 * formatting. */
bool keel__log_enabled(keel_log_level level);
void keel__log(keel_log_level level, const char *module, const char *fmt, ...)
    KEEL__PRINTF(3, 4);

/* ---- clock ---- */
/* A clock and its argument as the options give them; NULL = keel_now_ns. */
typedef struct keel__clock {
    keel_clock_fn fn;
    void *ud;
} keel__clock;

static inline uint64_t keel__clock_now(const keel__clock *c)
{
    return c->fn ? c->fn(c->ud) : keel_now_ns();
}

/* CLOCK_MONOTONIC_COARSE: CLOCK_MONOTONIC as of the last kernel tick, so
 * behind it by less than a tick (1 to 10 ms). Four times cheaper, and no
 * serializing TSC read: loads after it need not wait. */
uint64_t keel__coarse_now_ns(void);

/* The CLOCK_MONOTONIC time (keel_now_ns's clock) `ns` from now, for
 * pthread_cond_timedwait on a condition variable set to that clock.
 * Saturated, and at most 2^31 s after boot: a wait of any length ends in
 * the future, never in the past (the caller loops on what it waits for). */
struct timespec;
void keel__abstime_in(uint64_t ns, struct timespec *ts);

/* For checks on a hot path that may run late by a tick (an expiry): the
 * coarse clock, unless a clock was injected, which is used as it is. */
static inline uint64_t keel__clock_coarse(const keel__clock *c)
{
    return c->fn ? c->fn(c->ud) : keel__coarse_now_ns();
}

/* ---- striped counters ----
 * Counters that every call bumps (hits, deliveries) are kept KEEL__STRIPES
 * times over, a cache line each, and summed when read, so that threads on
 * different cores do not write the same line. On its first use a thread
 * takes a stripe of its own, process-wide, and gives it back when it
 * exits; it bumps its counters with a plain load and store (no locked
 * instruction: a locked one is a full barrier that stops the next call's
 * cache misses from overlapping this one's). Once KEEL__STRIPES - 1
 * threads hold one, the others share the last stripe and add atomically
 * (in a child of fork(), the stripes of the parent's other threads stay
 * taken: its new threads share).
 * A stripe is a struct of the module's counters aligned to
 * KEEL__CACHELINE; the owner must be allocated with keel__aligned_alloc.
 * Only the thread that called keel__stripe() may bump that stripe. */
#define KEEL__STRIPES 16
extern KEEL__HIDDEN __thread unsigned keel__stripe_tl __attribute__((tls_model("initial-exec")));
unsigned keel__stripe_take(void);
static inline unsigned keel__stripe(void)
{
    unsigned s = keel__stripe_tl; /* 1 + the stripe; 0: none yet */
    return KEEL__LIKELY(s) ? s - 1 : keel__stripe_take();
}

/* Adds n to a counter of the calling thread's stripe. */
static inline void keel__stripe_add(_Atomic uint64_t *c, uint64_t n)
{
    if (KEEL__LIKELY(keel__stripe_tl != KEEL__STRIPES))
        atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + n, memory_order_relaxed);
    else
        atomic_fetch_add_explicit(c, n, memory_order_relaxed);
}

/* ---- module statistics as metrics ---- */
typedef struct keel__mfunc {
    int type;          /* KEEL_METRIC_COUNTER or KEEL_METRIC_GAUGE */
    const char *name, *help;
    const char *label, *value; /* a second label, or NULL */
    double (*fn)(void *ud);
} keel__mfunc;

/* A keel__mfunc callback reading one field of a module's stats struct:
 * static double fn(void *ud) { stats_get(ud, &st); return st.field; }. */
#define KEEL__STAT_FN(fn, stats_type, stats_get, field)                                            \
    static double fn(void *ud)                                                                     \
    {                                                                                              \
        stats_type st;                                                                             \
        stats_get(ud, &st);                                                                        \
        return (double)st.field;                                                                   \
    }

/* Registers series computed by fn(ud), each labelled inst_label=inst_value
 * (plus its own label). All or nothing: on failure the ones added are
 * removed. m NULL: nothing to do. Returns 0 or the registry's error. */
int keel__metrics_funcs(keel_metrics *m, const char *inst_label, const char *inst_value,
                        const keel__mfunc *fs, size_t n, void *ud);

/* A gauge family several instances share: created by the first, found by
 * the others (same type and labels, else KEEL_EEXIST). */
struct keel_gauge;
int keel__metrics_gauge_shared(keel_metrics *m, const char *name, const char *help,
                               const char *const *labels, size_t nlabels, struct keel_gauge **out);
/* Sets a gauge's series (made if new) in one step, under the registry
 * lock: in a shared family another instance may remove the series, and
 * free the child keel_gauge_with() returned, before a keel_gauge_set() on
 * it. Returns 0 or the registry's error. */
int keel__gauge_put(struct keel_gauge *g, const char *const *values, size_t n, double v);

/* The type (a keel_metric_type) of the family named name, or -1 when the
 * registry has none. Takes the registry lock. */
int keel__metrics_type(keel_metrics *m, const char *name);

/* ---- text ---- */

/* Whether s is well-formed UTF-8 (no overlong forms, no surrogates,
 * nothing past U+10FFFF). */
bool keel__utf8_ok(const char *s);

/* The value of one hex digit, or -1. */
static inline int keel__hex_digit(char c)
{
    return c >= '0' && c <= '9'   ? c - '0'
           : c >= 'a' && c <= 'f' ? c - 'a' + 10
           : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                  : -1;
}

/* ---- numbers in text ---- */

/* strtod and snprintf in the C locale, whatever LC_NUMERIC the host
 * program chose: a decimal comma would corrupt the exposition formats
 * and misread alert rules. */
double keel__strtod(const char *s, char **end);
int keel__snprintf_c(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* ---- random numbers ---- */
typedef struct keel__rand {
    keel_rand_fn fn;
    void *ud;
} keel__rand;

static inline uint64_t keel__rand_next(const keel__rand *r)
{
    return r->fn ? r->fn(r->ud) : keel_rand_u64(NULL);
}

/* Uniform in [0, n] (inclusive), n < 2^64 - 1; Lemire's multiply-shift,
 * whose bias below 2^-64 per value is irrelevant here. */
static inline uint64_t keel__rand_upto(const keel__rand *r, uint64_t n)
{
    if (n == UINT64_MAX)
        return keel__rand_next(r);
    return (uint64_t)(((unsigned __int128)keel__rand_next(r) * (n + 1)) >> 64);
}

/* A spin-wait hint: lets the sibling hyperthread run, saves power. */
static inline void keel__cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

/* Step i of a wait that spins before it sleeps: a pause for the first
 * KEEL__SPIN_PAUSES steps, a yield of the CPU after them. With more
 * runnable threads than cores (a publisher and two workers on two), a
 * waiter that only paused would hold the core that the thread it waits
 * for needs. */
#define KEEL__SPIN_PAUSES 100
static inline void keel__spin(int i)
{
    if (i < KEEL__SPIN_PAUSES)
        keel__cpu_relax();
    else
        sched_yield();
}

/* ---- asymmetric fences ----
 *
 * For protocols where one side (an owner thread's fast path) runs often and
 * the other (a thief) rarely: the fast side only needs a compiler barrier,
 * the slow side calls keel__heavy_fence(), which makes every thread of the
 * process execute a full barrier (Linux membarrier). When membarrier is not
 * available, keel__light_fence() becomes a real full fence instead.
 */
extern KEEL__HIDDEN bool keel__membarrier_ok;
/* A full fence. GCC's ThreadSanitizer does not model fences and refuses
 * them, so under it a locked read-modify-write (a full barrier on x86)
 * stands in. */
#if defined(__SANITIZE_THREAD__)
extern KEEL__HIDDEN int keel__fence_word;
#define KEEL__FULL_FENCE() ((void)__atomic_fetch_add(&keel__fence_word, 0, __ATOMIC_SEQ_CST))
#else
#define KEEL__FULL_FENCE() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#endif
void keel__heavy_fence(void);
static inline void keel__light_fence(void)
{
    if (KEEL__LIKELY(__atomic_load_n(&keel__membarrier_ok, __ATOMIC_RELAXED)))
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
    else
        KEEL__FULL_FENCE();
}
/* Must be called (once is enough, any thread) before a protocol that relies
 * on the pair is used; registers with membarrier. Thread-safe. */
void keel__fences_init(void);

#endif /* KEEL_INTERNAL_H */
