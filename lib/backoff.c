/* lib/backoff.c — retry schedules and retry budgets. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>

#include <keel/backoff.h>
#include <keel/metrics.h>

#include "internal.h"

/* ---- schedules ---- */

static uint64_t expo(const keel_backoff_opts *o, uint32_t attempt)
{
    uint64_t cap = o->cap_ns ? o->cap_ns : UINT64_MAX;
    if (o->base_ns == 0)
        return 0;
    if (attempt >= 64 || o->base_ns > (cap >> attempt))
        return cap; /* base * 2^attempt would pass the cap (or overflow) */
    return o->base_ns << attempt;
}

KEEL_API uint64_t keel_backoff_delay(const keel_backoff_opts *o, uint32_t attempt, uint64_t prev_ns)
{
    if (!o)
        return 0;
    keel__rand rnd = {o->rand, o->rand_ud};
    uint64_t cap = o->cap_ns ? o->cap_ns : UINT64_MAX, e;
    switch (o->policy) {
    case KEEL_BACKOFF_CONSTANT:
        return o->base_ns < cap ? o->base_ns : cap;
    case KEEL_BACKOFF_EXPONENTIAL:
        return expo(o, attempt);
    case KEEL_BACKOFF_FULL_JITTER:
        return keel__rand_upto(&rnd, expo(o, attempt));
    case KEEL_BACKOFF_EQUAL_JITTER:
        /* e/2 + U(0, e/2) in integers: the half rounded up, plus up to
         * the half rounded down, so [ceil(e/2), e] (1 never gives 0) */
        e = expo(o, attempt);
        return (e - e / 2) + keel__rand_upto(&rnd, e / 2);
    case KEEL_BACKOFF_DECORRELATED: {
        uint64_t prev = prev_ns ? prev_ns : o->base_ns;
        uint64_t hi = prev > UINT64_MAX / 3 ? UINT64_MAX : prev * 3;
        if (hi < o->base_ns)
            hi = o->base_ns;
        uint64_t d = o->base_ns + keel__rand_upto(&rnd, hi - o->base_ns);
        return d < cap ? d : cap;
    }
    }
    return 0;
}

KEEL_API int keel_backoff_init(keel_backoff *b, const keel_backoff_opts *opts)
{
    if (!b || !opts || (unsigned)opts->policy > KEEL_BACKOFF_DECORRELATED ||
        (opts->cap_ns && opts->cap_ns < opts->base_ns))
        return KEEL_EINVAL;
    b->opts = *opts;
    b->attempt = 0;
    b->prev_ns = 0;
    return 0;
}

KEEL_API uint64_t keel_backoff_next(keel_backoff *b)
{
    if (!b)
        return 0;
    uint64_t d = keel_backoff_delay(&b->opts, b->attempt, b->prev_ns);
    if (b->attempt < UINT32_MAX)
        b->attempt++;
    b->prev_ns = d;
    return d;
}

KEEL_API void keel_backoff_reset(keel_backoff *b)
{
    if (b) {
        b->attempt = 0;
        b->prev_ns = 0;
    }
}

/* ---- retry budgets ---- */

#define SLOTS 10 /* the PERCENT window in tenths */
#define MILLI 1000

struct keel_retry_budget {
    keel_budget_kind kind;
    /* TOKENS */
    _Atomic int64_t tokens;
    int64_t max, ratio;
    /* PERCENT */
    pthread_mutex_t mu;
    int64_t deposit, reserve;
    uint64_t slot_ns;
    uint64_t slot_epoch[SLOTS]; /* which tenth each slot holds */
    int64_t slot_sum[SLOTS];
    keel__clock clock;
    keel_metrics *metrics;
};

static double m_tokens(void *ud) { return (double)keel_retry_budget_balance(ud) / MILLI; }

static const keel__mfunc budget_metrics[] = {
    {1, "keel_retry_budget_tokens", "Retries the budget holds now.", NULL, NULL, m_tokens},
};

KEEL_API int keel_retry_budget_create(keel_retry_budget **out, const keel_retry_budget_opts *o)
{
    if (!out || !o || (unsigned)o->kind > KEEL_BUDGET_PERCENT)
        return KEEL_EINVAL;
    keel_retry_budget *b = keel__calloc(1, sizeof *b);
    if (!b)
        return KEEL_ENOMEM;
    b->kind = o->kind;
    if (o->kind == KEEL_BUDGET_TOKENS) {
        b->max = o->max_milli ? o->max_milli : 10 * MILLI;
        b->ratio = o->ratio_milli ? o->ratio_milli : 100;
        if (b->max < MILLI || b->max > 1000 * MILLI || b->ratio > b->max) {
            keel__free(b);
            return KEEL_EINVAL;
        }
        atomic_init(&b->tokens, b->max);
    } else {
        uint64_t window = o->window_ns ? o->window_ns : 10 * 1000000000ull;
        uint32_t pct = o->percent == KEEL_BUDGET_NONE ? 0 : o->percent ? o->percent : 20;
        uint32_t mps = o->min_per_sec == KEEL_BUDGET_NONE ? 0 : o->min_per_sec ? o->min_per_sec : 10;
        if (window < 1000000000ull || window > 3600 * 1000000000ull || pct > 1000 ||
            mps > 1000000) {
            keel__free(b);
            return KEEL_EINVAL;
        }
        b->deposit = (int64_t)pct * MILLI / 100;
        b->reserve = (int64_t)mps * MILLI * (int64_t)(window / 1000000000ull);
        b->slot_ns = window / SLOTS;
        b->clock = (keel__clock){o->clock, o->clock_ud};
        pthread_mutex_init(&b->mu, NULL);
        for (int i = 0; i < SLOTS; i++)
            b->slot_epoch[i] = UINT64_MAX;
    }
    int rc = keel__metrics_funcs(o->metrics, "budget", o->metrics_name, budget_metrics, 1, b);
    if (rc) {
        keel_retry_budget_destroy(b);
        return rc;
    }
    b->metrics = o->metrics;
    *out = b;
    return 0;
}

/* Deposits and withdrawals still inside the window, plus the reserve.
 * Caller holds mu. */
static int64_t window_balance(keel_retry_budget *b, uint64_t now)
{
    uint64_t epoch = now / b->slot_ns;
    int64_t sum = b->reserve;
    for (int i = 0; i < SLOTS; i++)
        if (b->slot_epoch[i] != UINT64_MAX && b->slot_epoch[i] + SLOTS > epoch)
            sum += b->slot_sum[i];
    return sum;
}

/* Adds `amount` to the current tenth of the window. Caller holds mu. */
static void window_add(keel_retry_budget *b, uint64_t now, int64_t amount)
{
    uint64_t epoch = now / b->slot_ns;
    int i = (int)(epoch % SLOTS);
    if (b->slot_epoch[i] != epoch) {
        if (b->slot_epoch[i] != UINT64_MAX && b->slot_epoch[i] > epoch)
            return; /* read before a stall of a window or more: its tenth is gone */
        b->slot_epoch[i] = epoch; /* that tenth expired: start it over */
        b->slot_sum[i] = 0;
    }
    b->slot_sum[i] += amount;
}

KEEL_API void keel_retry_budget_on_request(keel_retry_budget *b)
{
    if (!b || b->kind != KEEL_BUDGET_PERCENT || b->deposit == 0)
        return;
    uint64_t now = keel__clock_now(&b->clock);
    pthread_mutex_lock(&b->mu);
    window_add(b, now, b->deposit);
    pthread_mutex_unlock(&b->mu);
}

KEEL_API void keel_retry_budget_on_result(keel_retry_budget *b, int ok)
{
    if (!b || b->kind != KEEL_BUDGET_TOKENS)
        return;
    int64_t t = atomic_load_explicit(&b->tokens, memory_order_relaxed), n;
    do {
        n = ok ? t + b->ratio : t - MILLI;
        if (n > b->max)
            n = b->max;
        if (n < 0)
            n = 0;
    } while (n != t && !atomic_compare_exchange_weak(&b->tokens, &t, n));
}

KEEL_API int keel_retry_budget_try_retry(keel_retry_budget *b)
{
    if (!b)
        return KEEL_EINVAL;
    if (b->kind == KEEL_BUDGET_TOKENS) /* gRPC: throttled at or below half */
        return atomic_load(&b->tokens) > b->max / 2 ? 0 : KEEL_ELIMIT;
    uint64_t now = keel__clock_now(&b->clock);
    int rc = KEEL_ELIMIT;
    pthread_mutex_lock(&b->mu);
    if (window_balance(b, now) >= MILLI) {
        window_add(b, now, -MILLI);
        rc = 0;
    }
    pthread_mutex_unlock(&b->mu);
    return rc;
}

KEEL_API int64_t keel_retry_budget_balance(keel_retry_budget *b)
{
    if (!b)
        return 0;
    if (b->kind == KEEL_BUDGET_TOKENS)
        return atomic_load(&b->tokens);
    uint64_t now = keel__clock_now(&b->clock);
    pthread_mutex_lock(&b->mu);
    int64_t v = window_balance(b, now);
    pthread_mutex_unlock(&b->mu);
    return v;
}

KEEL_API void keel_retry_budget_destroy(keel_retry_budget *b)
{
    if (!b)
        return;
    if (b->metrics)
        keel_metrics_func_remove(b->metrics, b);
    if (b->kind == KEEL_BUDGET_PERCENT)
        pthread_mutex_destroy(&b->mu);
    keel__free(b);
}
