/* lib/breaker.c — circuit breaker (resilience4j's state machine).
 *
 * One 64-bit word holds the state, a generation that changes with every
 * transition, and the HALF_OPEN trial permits left, so the CLOSED path is
 * one atomic load and a HALF_OPEN permit one compare-and-swap. Transitions
 * are rare and serialise on a mutex; they write what the new state needs
 * (the end of the open wait, an empty window) before publishing the word.
 *
 * The count window is a ring of outcome bytes plus running failure and
 * slow counts, updated by exchanging the byte of the slot a call lands in,
 * so concurrent recorders need no lock. The time window is one bucket per
 * second plus running totals; when time reaches a new second, the buckets
 * of the seconds that left the window are taken off the totals and reused,
 * under the mutex, once per second at most. HALF_OPEN results go to one word packing
 * the generation with three 13-bit counters, so results from another
 * generation can never be mixed in.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <string.h>

#include <keel/breaker.h>
#include <keel/metrics.h>

#include "internal.h"

#define NS 1000000000ull
#define GEN_MASK ((UINT64_C(1) << 29) - 1)
#define MAX_PERMITS 8191 /* 13 bits */

enum { OUT_PRESENT = 1, OUT_FAILED = 2, OUT_SLOW = 4 };

typedef struct bucket {
    _Atomic uint64_t sec; /* second + 1; 0 = never used */
    _Atomic uint32_t calls, failed, slow;
} bucket;

struct keel_breaker {
    /* configuration */
    keel_breaker_window kind;
    uint32_t size, min_calls, fr, sr, permitted;
    uint32_t half_min; /* HALF_OPEN results that decide: min(minimum_calls, permitted) */
    uint64_t slow_ns, wait_ns, max_half_open_ns;
    keel_backoff_opts backoff;
    bool has_backoff;
    keel_breaker_state_fn on_state;
    void *ud;
    keel_metrics *metrics;

    alignas(KEEL__CACHELINE) _Atomic uint64_t word; /* state | gen << 3 | permits << 32 */
    _Atomic uint64_t until; /* OPEN: end of the wait; HALF_OPEN: give-up time */
    _Atomic uint64_t hwin;  /* HALF_OPEN results: gen24 | slow13 | failed13 | calls13 */

    alignas(KEEL__CACHELINE) _Atomic uint64_t pos; /* COUNT: calls recorded */
    _Atomic int64_t wfailed, wslow;
    _Atomic uint8_t *ring;
    bucket *buckets; /* TIME */
    _Atomic uint64_t head; /* TIME: the newest second seen + 1 */
    _Atomic int64_t tcalls, tfailed, tslow; /* TIME: sums over the buckets */

    alignas(KEEL__CACHELINE) pthread_mutex_t mu; /* transitions, bucket roll-over */
    uint32_t open_count;
    uint64_t prev_wait;
    _Atomic uint64_t failed, slow, rejected, transitions;
};

static inline keel_breaker_state st_of(uint64_t w) { return (keel_breaker_state)(w & 7); }
static inline uint64_t gen_of(uint64_t w) { return (w >> 3) & GEN_MASK; }
static inline uint32_t permits_of(uint64_t w) { return (uint32_t)(w >> 32); }
static inline uint64_t mkword(keel_breaker_state s, uint64_t gen, uint32_t permits)
{
    return (uint64_t)s | (gen & GEN_MASK) << 3 | (uint64_t)permits << 32;
}

/* ---- the window ---- */

typedef struct tally {
    uint64_t calls, failed, slow;
} tally;

static void window_clear(keel_breaker *b)
{
    if (b->kind == KEEL_BREAKER_COUNT) {
        /* Take each slot's outcome off the counts rather than zeroing them:
         * a recorder between its exchange and its count update would
         * otherwise leave the counts off for good. */
        for (uint32_t i = 0; i < b->size; i++) {
            unsigned old = atomic_exchange_explicit(&b->ring[i], 0, memory_order_relaxed);
            if (old & OUT_FAILED)
                atomic_fetch_sub(&b->wfailed, 1);
            if (old & OUT_SLOW)
                atomic_fetch_sub(&b->wslow, 1);
        }
        atomic_store(&b->pos, 0);
    } else {
        /* The same for the buckets: a recorder between its bucket and its
         * total update would otherwise leave the totals off for good. */
        for (uint32_t i = 0; i < b->size; i++) {
            bucket *bk = &b->buckets[i];
            atomic_store(&bk->sec, 0);
            atomic_fetch_sub(&b->tcalls, atomic_exchange(&bk->calls, 0));
            atomic_fetch_sub(&b->tfailed, atomic_exchange(&bk->failed, 0));
            atomic_fetch_sub(&b->tslow, atomic_exchange(&bk->slow, 0));
        }
        atomic_store(&b->head, 0);
    }
}

/* Time reached second sec1 - 1 (1-based sec1): the buckets of the seconds
 * that left the window leave the totals and start over for the new
 * seconds. At most `size` buckets, once per second. */
static void window_advance(keel_breaker *b, uint64_t sec1)
{
    pthread_mutex_lock(&b->mu);
    uint64_t h = atomic_load(&b->head);
    if (sec1 > h) {
        uint64_t from = sec1 - h > b->size ? sec1 - b->size + 1 : h + 1;
        for (uint64_t s = from; s <= sec1; s++) {
            bucket *bk = &b->buckets[(s - 1) % b->size];
            atomic_fetch_sub(&b->tcalls, atomic_exchange(&bk->calls, 0));
            atomic_fetch_sub(&b->tfailed, atomic_exchange(&bk->failed, 0));
            atomic_fetch_sub(&b->tslow, atomic_exchange(&bk->slow, 0));
            atomic_store_explicit(&bk->sec, s, memory_order_release);
        }
        atomic_store_explicit(&b->head, sec1, memory_order_release);
    }
    pthread_mutex_unlock(&b->mu);
}

static void window_record(keel_breaker *b, uint64_t now, unsigned out)
{
    if (b->kind == KEEL_BREAKER_COUNT) {
        uint64_t i = atomic_fetch_add_explicit(&b->pos, 1, memory_order_relaxed);
        unsigned old = atomic_exchange_explicit(&b->ring[i % b->size], (uint8_t)out,
                                                memory_order_relaxed);
        int df = !!(out & OUT_FAILED) - !!(old & OUT_FAILED);
        int ds = !!(out & OUT_SLOW) - !!(old & OUT_SLOW);
        if (df)
            atomic_fetch_add_explicit(&b->wfailed, df, memory_order_relaxed);
        if (ds)
            atomic_fetch_add_explicit(&b->wslow, ds, memory_order_relaxed);
        return;
    }
    uint64_t sec1 = now / NS + 1, h = atomic_load_explicit(&b->head, memory_order_acquire);
    if (sec1 > h)
        window_advance(b, sec1);
    else if (sec1 + b->size <= h)
        return; /* a result from a second already out of the window */
    bucket *bk = &b->buckets[(sec1 - 1) % b->size];
    if (atomic_load_explicit(&bk->sec, memory_order_acquire) != sec1)
        return; /* its bucket holds another second (moved on meanwhile) */
    atomic_fetch_add_explicit(&bk->calls, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&b->tcalls, 1, memory_order_relaxed);
    if (out & OUT_FAILED) {
        atomic_fetch_add_explicit(&bk->failed, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&b->tfailed, 1, memory_order_relaxed);
    }
    if (out & OUT_SLOW) {
        atomic_fetch_add_explicit(&bk->slow, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&b->tslow, 1, memory_order_relaxed);
    }
}

/* The window as of the last recorded call. Counts lag by the updates in
 * flight, so never below 0. */
static tally window_tally(keel_breaker *b)
{
    int64_t c, f, s;
    if (b->kind == KEEL_BREAKER_COUNT) {
        uint64_t pos = atomic_load_explicit(&b->pos, memory_order_relaxed);
        c = pos < b->size ? (int64_t)pos : b->size;
        f = atomic_load_explicit(&b->wfailed, memory_order_relaxed);
        s = atomic_load_explicit(&b->wslow, memory_order_relaxed);
    } else {
        c = atomic_load_explicit(&b->tcalls, memory_order_relaxed);
        f = atomic_load_explicit(&b->tfailed, memory_order_relaxed);
        s = atomic_load_explicit(&b->tslow, memory_order_relaxed);
    }
    return (tally){c > 0 ? (uint64_t)c : 0, f > 0 ? (uint64_t)f : 0, s > 0 ? (uint64_t)s : 0};
}

static bool over_threshold(const keel_breaker *b, tally t)
{
    return t.failed * 100 >= (uint64_t)b->fr * t.calls || t.slow * 100 >= (uint64_t)b->sr * t.calls;
}

/* ---- transitions ---- */

/* Moves from the state in `expect` (state and generation; any permits) to
 * `to`, unless another thread changed the state first. */
static void transition(keel_breaker *b, uint64_t expect, keel_breaker_state to, uint64_t now,
                       bool forced)
{
    pthread_mutex_lock(&b->mu);
    uint64_t w = atomic_load(&b->word);
    if (!forced && (w & ((GEN_MASK << 3) | 7)) != (expect & ((GEN_MASK << 3) | 7))) {
        pthread_mutex_unlock(&b->mu);
        return;
    }
    keel_breaker_state from = st_of(w);
    uint32_t permits = 0;
    uint64_t until = UINT64_MAX;
    switch (to) {
    case KEEL_BREAKER_OPEN: {
        uint64_t wait = b->has_backoff ? keel_backoff_delay(&b->backoff, b->open_count, b->prev_wait)
                                       : b->wait_ns;
        b->open_count++;
        b->prev_wait = wait;
        until = keel__sat_add(now, wait);
        break;
    }
    case KEEL_BREAKER_HALF_OPEN:
        permits = b->permitted;
        if (b->max_half_open_ns)
            until = keel__sat_add(now, b->max_half_open_ns);
        /* the trials of this generation start from zero, before anyone can
         * take a permit of it */
        atomic_store(&b->hwin, ((gen_of(w) + 1) & 0xffffff) << 39);
        break;
    case KEEL_BREAKER_CLOSED:
        window_clear(b);
        b->open_count = 0;
        b->prev_wait = 0;
        break;
    default:
        break;
    }
    atomic_store(&b->until, until);
    atomic_store_explicit(&b->word, mkword(to, gen_of(w) + 1, permits), memory_order_release);
    atomic_fetch_add(&b->transitions, 1);
    pthread_mutex_unlock(&b->mu);
    if (b->on_state)
        b->on_state(b, from, to, b->ud);
}

/* ---- calls ---- */

KEEL_API int keel_breaker_try_acquire(keel_breaker *b, uint64_t now)
{
    if (!b)
        return KEEL_EINVAL;
    for (;;) {
        uint64_t w = atomic_load_explicit(&b->word, memory_order_acquire);
        keel_breaker_state s = st_of(w);
        if (KEEL__LIKELY(s == KEEL_BREAKER_CLOSED || s == KEEL_BREAKER_DISABLED))
            return 0;
        if (s == KEEL_BREAKER_FORCED_OPEN)
            break;
        uint64_t until = atomic_load(&b->until);
        if (atomic_load(&b->word) != w)
            continue; /* changed while we read: look again */
        if (s == KEEL_BREAKER_OPEN) {
            if (now < until)
                break;
            transition(b, w, KEEL_BREAKER_HALF_OPEN, now, false);
            continue;
        }
        /* HALF_OPEN; until UINT64_MAX: no time limit (also when one
         * saturated), which now == UINT64_MAX must not take for one that
         * passed, or OPEN and HALF_OPEN would follow each other for ever */
        if (until != UINT64_MAX && now >= until) { /* trial results never came */
            transition(b, w, KEEL_BREAKER_OPEN, now, false);
            continue;
        }
        if (permits_of(w) == 0)
            break;
        if (atomic_compare_exchange_weak(&b->word, &w, w - (UINT64_C(1) << 32)))
            return 0;
    }
    atomic_fetch_add_explicit(&b->rejected, 1, memory_order_relaxed);
    return KEEL_EUNAVAIL;
}

/* A release names no permit, so one taken in an earlier generation (or
 * while CLOSED) gives the current HALF_OPEN a trial: documented, not
 * guarded. Ignoring releases once this generation's results cover its
 * permits would catch only some; and ignoring a current trial's release
 * in place of a stale one would lose a permit for good, which with no
 * max_half_open_ns could leave HALF_OPEN waiting for ever. */
KEEL_API void keel_breaker_release(keel_breaker *b)
{
    if (!b)
        return;
    uint64_t w = atomic_load(&b->word);
    while (st_of(w) == KEEL_BREAKER_HALF_OPEN && permits_of(w) < b->permitted)
        if (atomic_compare_exchange_weak(&b->word, &w, w + (UINT64_C(1) << 32)))
            return;
}

/* Records a trial result. As resilience4j's HALF_OPEN window (a count
 * window of `permitted` calls), the thresholds are checked after every
 * result once half_min are in, so the first such result decides. */
static void half_open_result(keel_breaker *b, uint64_t w, unsigned out, uint64_t now)
{
    const uint64_t M13 = 0x1fff;
    uint64_t g = gen_of(w) & 0xffffff;
    uint64_t h = atomic_load(&b->hwin), n;
    do {
        if ((h >> 39) != g || (h & M13) >= b->permitted)
            return; /* another generation's tally, or all trials are in */
        n = h + 1 + ((out & OUT_FAILED) ? UINT64_C(1) << 13 : 0) +
            ((out & OUT_SLOW) ? UINT64_C(1) << 26 : 0);
    } while (!atomic_compare_exchange_weak(&b->hwin, &h, n));
    if ((n & M13) < b->half_min)
        return;
    tally t = {n & M13, (n >> 13) & M13, (n >> 26) & M13};
    transition(b, w, over_threshold(b, t) ? KEEL_BREAKER_OPEN : KEEL_BREAKER_CLOSED, now, false);
}

KEEL_API void keel_breaker_on_result(keel_breaker *b, uint64_t now, uint64_t duration, int failed)
{
    if (!b)
        return;
    uint64_t w = atomic_load_explicit(&b->word, memory_order_acquire);
    keel_breaker_state s = st_of(w);
    if (s != KEEL_BREAKER_CLOSED && s != KEEL_BREAKER_HALF_OPEN)
        return; /* DISABLED records nothing; OPEN results are late */
    unsigned out = OUT_PRESENT | (failed ? OUT_FAILED : 0) | (duration > b->slow_ns ? OUT_SLOW : 0);
    if (out & OUT_FAILED)
        atomic_fetch_add_explicit(&b->failed, 1, memory_order_relaxed);
    if (out & OUT_SLOW)
        atomic_fetch_add_explicit(&b->slow, 1, memory_order_relaxed);
    if (s == KEEL_BREAKER_HALF_OPEN) {
        half_open_result(b, w, out, now);
        return;
    }
    window_record(b, now, out);
    tally t = window_tally(b);
    if (t.calls >= b->min_calls && over_threshold(b, t))
        transition(b, w, KEEL_BREAKER_OPEN, now, false);
}

/* ---- the rest ---- */

KEEL_API keel_breaker_state keel_breaker_state_get(keel_breaker *b)
{
    return b ? st_of(atomic_load(&b->word)) : KEEL_BREAKER_CLOSED;
}

KEEL_API int keel_breaker_force(keel_breaker *b, keel_breaker_state to, uint64_t now)
{
    if (!b || (unsigned)to > KEEL_BREAKER_FORCED_OPEN)
        return KEEL_EINVAL;
    transition(b, 0, to, now, true);
    return 0;
}

KEEL_API void keel_breaker_stats_get(keel_breaker *b, keel_breaker_stats *st)
{
    if (!b || !st)
        return;
    memset(st, 0, sizeof *st);
    uint64_t w = atomic_load(&b->word);
    st->state = st_of(w);
    tally t = {0, 0, 0};
    if (st->state == KEEL_BREAKER_HALF_OPEN) {
        uint64_t h = atomic_load(&b->hwin);
        if ((h >> 39) == (gen_of(w) & 0xffffff))
            t = (tally){h & 0x1fff, (h >> 13) & 0x1fff, (h >> 26) & 0x1fff};
    } else {
        t = window_tally(b);
    }
    st->window_calls = (uint32_t)t.calls;
    st->window_failed = (uint32_t)t.failed;
    st->window_slow = (uint32_t)t.slow;
    st->failed = atomic_load(&b->failed);
    st->slow = atomic_load(&b->slow);
    st->rejected = atomic_load(&b->rejected);
    st->transitions = atomic_load(&b->transitions);
    pthread_mutex_lock(&b->mu);
    st->open_count = b->open_count;
    pthread_mutex_unlock(&b->mu);
}

KEEL_API const char *keel_breaker_state_name(keel_breaker_state s)
{
    switch (s) {
    case KEEL_BREAKER_CLOSED: return "closed";
    case KEEL_BREAKER_OPEN: return "open";
    case KEEL_BREAKER_HALF_OPEN: return "half_open";
    case KEEL_BREAKER_DISABLED: return "disabled";
    case KEEL_BREAKER_FORCED_OPEN: return "forced_open";
    }
    return "unknown";
}

/* ---- metrics ---- */

#define BR_STATE(fn, st)                                                                           \
    static double fn(void *ud) { return keel_breaker_state_get(ud) == (st); }
BR_STATE(m_closed, KEEL_BREAKER_CLOSED)
BR_STATE(m_open, KEEL_BREAKER_OPEN)
BR_STATE(m_half, KEEL_BREAKER_HALF_OPEN)
BR_STATE(m_disabled, KEEL_BREAKER_DISABLED)
BR_STATE(m_forced, KEEL_BREAKER_FORCED_OPEN)
#undef BR_STATE
static double m_failed(void *ud) { return (double)atomic_load(&((keel_breaker *)ud)->failed); }
static double m_slow(void *ud) { return (double)atomic_load(&((keel_breaker *)ud)->slow); }
static double m_rejected(void *ud) { return (double)atomic_load(&((keel_breaker *)ud)->rejected); }
static double m_trans(void *ud) { return (double)atomic_load(&((keel_breaker *)ud)->transitions); }

static const keel__mfunc breaker_metrics[] = {
    {1, "keel_breaker_state", "1 for the state the breaker is in, else 0.", "state", "closed", m_closed},
    {1, "keel_breaker_state", NULL, "state", "open", m_open},
    {1, "keel_breaker_state", NULL, "state", "half_open", m_half},
    {1, "keel_breaker_state", NULL, "state", "disabled", m_disabled},
    {1, "keel_breaker_state", NULL, "state", "forced_open", m_forced},
    {0, "keel_breaker_failed_calls_total", "Calls recorded as failed.", NULL, NULL, m_failed},
    {0, "keel_breaker_slow_calls_total", "Calls recorded as slow.", NULL, NULL, m_slow},
    {0, "keel_breaker_rejected_calls_total", "Calls the breaker refused.", NULL, NULL, m_rejected},
    {0, "keel_breaker_transitions_total", "State changes.", NULL, NULL, m_trans},
};

KEEL_API int keel_breaker_create(keel_breaker **out, const keel_breaker_opts *o)
{
    if (!out || !o || (unsigned)o->window > KEEL_BREAKER_TIME)
        return KEEL_EINVAL;
    uint32_t size = o->window_size ? o->window_size : (o->window == KEEL_BREAKER_COUNT ? 100 : 60);
    uint32_t fr = o->failure_rate ? o->failure_rate : 50;
    uint32_t sr = o->slow_call_rate ? o->slow_call_rate : 100;
    uint32_t permitted = o->permitted_in_half_open ? o->permitted_in_half_open : 10;
    if (size > (o->window == KEEL_BREAKER_COUNT ? 1000000u : 3600u) || fr > 100 || sr > 100 ||
        permitted > MAX_PERMITS)
        return KEEL_EINVAL;
    /* a growing open wait needs a start and a cap, or it could grow to
     * forever (cap 0 means none for a plain schedule) */
    if (o->open_backoff &&
        ((unsigned)o->open_backoff->policy > KEEL_BACKOFF_DECORRELATED || !o->open_backoff->base_ns ||
         !o->open_backoff->cap_ns || o->open_backoff->cap_ns < o->open_backoff->base_ns))
        return KEEL_EINVAL;
    keel_breaker *b = keel__aligned_alloc(KEEL__CACHELINE, sizeof *b);
    if (!b)
        return KEEL_ENOMEM;
    memset(b, 0, sizeof *b);
    b->kind = o->window;
    b->size = size;
    b->min_calls = o->minimum_calls ? o->minimum_calls : 100;
    /* from the option, not clamped to the CLOSED window: resilience4j
     * clamps it to the HALF_OPEN window instead */
    b->half_min = b->min_calls < permitted ? b->min_calls : permitted;
    if (b->kind == KEEL_BREAKER_COUNT && b->min_calls > size)
        b->min_calls = size; /* as resilience4j: never more than the window */
    b->fr = fr;
    b->sr = sr;
    b->permitted = permitted;
    b->slow_ns = o->slow_call_ns ? o->slow_call_ns : 60 * NS;
    b->wait_ns = o->wait_open_ns ? o->wait_open_ns : 60 * NS;
    b->max_half_open_ns = o->max_half_open_ns;
    if ((b->has_backoff = o->open_backoff != NULL))
        b->backoff = *o->open_backoff;
    b->on_state = o->on_state;
    b->ud = o->ud;
    if (b->kind == KEEL_BREAKER_COUNT)
        b->ring = keel__calloc(size, sizeof *b->ring);
    else
        b->buckets = keel__calloc(size, sizeof *b->buckets);
    if (!b->ring && !b->buckets) {
        keel__aligned_free(b);
        return KEEL_ENOMEM;
    }
    pthread_mutex_init(&b->mu, NULL);
    atomic_init(&b->word, mkword(KEEL_BREAKER_CLOSED, 0, 0));
    atomic_init(&b->until, UINT64_MAX);
    int rc = keel__metrics_funcs(o->metrics, "breaker", o->metrics_name, breaker_metrics,
                                 sizeof breaker_metrics / sizeof breaker_metrics[0], b);
    if (rc) {
        keel_breaker_destroy(b);
        return rc;
    }
    b->metrics = o->metrics;
    *out = b;
    return 0;
}

KEEL_API void keel_breaker_destroy(keel_breaker *b)
{
    if (!b)
        return;
    if (b->metrics)
        keel_metrics_func_remove(b->metrics, b);
    keel__free((void *)b->ring);
    keel__free(b->buckets);
    pthread_mutex_destroy(&b->mu);
    keel__aligned_free(b);
}
