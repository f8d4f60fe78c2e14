/* lib/limiter/limiter.c — keel_limiter's API: options, the choice of
 * store, the policy when Redis fails, the header fields, statistics.
 * The algorithms are in local.c (in process) and redis_store.c (Lua).
 */
#include <stdio.h>
#include <string.h>

#include <keel/metrics.h>
#include <keel/redis.h>

#include "limiter_int.h"

/* ---- create, destroy ---- */

/* A policy name the RateLimit fields can carry in a quoted string. */
static bool name_ok(const char *s)
{
    for (; *s; s++)
        if (*s < 0x20 || *s > 0x7e || *s == '"' || *s == '\\')
            return false;
    return true;
}

static double m_stat(keel_limiter *l, int which)
{
    keel_limiter_stats st;
    keel_limiter_stats_get(l, &st);
    switch (which) {
    case 0: return (double)st.allowed;
    case 1: return (double)st.rejected;
    case 2: return (double)st.keys;
    case 3: return (double)(st.evicted_idle + st.evicted_active);
    case 4: return (double)st.bytes;
    default: return (double)st.store_errors;
    }
}
static double m_allowed(void *ud) { return m_stat(ud, 0); }
static double m_rejected(void *ud) { return m_stat(ud, 1); }
static double m_keys(void *ud) { return m_stat(ud, 2); }
static double m_evicted(void *ud) { return m_stat(ud, 3); }
static double m_bytes(void *ud) { return m_stat(ud, 4); }
static double m_errors(void *ud) { return m_stat(ud, 5); }

KEEL_API int keel_limiter_create(keel_limiter **out, const keel_limiter_opts *o)
{
    if (out)
        *out = NULL;
    if (!out || !o || o->algo > KEEL_LIMIT_GCRA || o->limit == 0 || o->limit > UINT32_MAX ||
        o->window_ns == 0 || o->window_ns > (UINT64_C(1) << 60) || o->burst > UINT32_MAX ||
        o->on_store_error > KEEL_LIMIT_FALL_BACK || o->max_keys > (UINT64_C(1) << 32))
        return KEEL_EINVAL;
    const char *name = o->name ? o->name : "default";
    const char *prefix = o->prefix ? o->prefix : "keel:rl:";
    if (strlen(name) >= sizeof ((keel_limiter *)0)->name || !name_ok(name) || strchr(prefix, '{') ||
        strlen(prefix) > 256)
        return KEEL_EINVAL;
    /* Redis counts microseconds in doubles: exact while the window's
     * comparisons (up to 3 x limit x window) and GCRA's bucket (burst x
     * window / limit, its longest reset) stay under 2^53; the window is
     * sent rounded up to whole microseconds */
    double w_us = (double)((o->window_ns + 999) / 1000), burst = (double)(o->burst ? o->burst : o->limit);
    if (o->redis && (o->window_ns < 1000000 || 3.0 * (double)o->limit * w_us >= 9007199254740992.0 ||
                     (o->algo == KEEL_LIMIT_GCRA && burst * w_us / (double)o->limit >= 9007199254740992.0)))
        return KEEL_EINVAL;
    keel_limiter *l = keel__calloc(1, sizeof *l);
    if (!l)
        return KEEL_ENOMEM;
    l->cfg = (lcfg){o->algo, o->limit, o->window_ns, o->burst ? o->burst : o->limit};
    if (o->algo != KEEL_LIMIT_GCRA)
        l->cfg.burst = o->limit;
    snprintf(l->name, sizeof l->name, "%s", name);
    l->clock = (keel__clock){o->clock, o->clock_ud};
    l->on_error = o->on_store_error;
    l->metrics = o->metrics;
    int rc = 0;
    if (!o->redis || o->on_store_error == KEEL_LIMIT_FALL_BACK)
        rc = keel__lstore_create(&l->local, &l->cfg, o->max_keys ? o->max_keys : 1000000, &l->clock);
    if (rc == 0 && o->redis)
        rc = keel__rstore_create(&l->remote, &l->cfg, o->redis, prefix, l->name);
    if (rc == 0 && l->metrics) {
        keel__mfunc fs[] = {
            {0, "keel_limiter_allowed_total", "Requests allowed.", NULL, NULL, m_allowed},
            {0, "keel_limiter_rejected_total", "Requests rejected.", NULL, NULL, m_rejected},
            {1, "keel_limiter_keys", "Keys held in process.", NULL, NULL, m_keys},
            {1, "keel_limiter_bytes", "Memory held in process for keys and logs.", NULL, NULL, m_bytes},
            {0, "keel_limiter_evictions_total", "Keys dropped at max_keys.", NULL, NULL, m_evicted},
            {0, "keel_limiter_store_errors_total", "Redis failures handled by the policy.", NULL,
             NULL, m_errors},
        };
        rc = keel__metrics_funcs(l->metrics, "limiter", o->metrics_name, fs, sizeof fs / sizeof fs[0], l);
    }
    if (rc) {
        l->metrics = NULL;
        keel_limiter_destroy(l);
        return rc;
    }
    *out = l;
    return 0;
}

KEEL_API void keel_limiter_destroy(keel_limiter *l)
{
    if (!l)
        return;
    if (l->metrics)
        keel_metrics_func_remove(l->metrics, l);
    keel__lstore_destroy(l->local);
    keel__rstore_destroy(l->remote);
    keel__free(l);
}

/* ---- decisions ---- */

static bool key_ok(const void *key, size_t len)
{
    return key && len > 0 && len <= LIM_MAX_KEY;
}

/* Costs over the limit are all the same to the algorithms (never), and
 * clamping keeps their arithmetic far from overflow. */
static uint64_t clamp_cost(const keel_limiter *l, uint64_t cost)
{
    if (cost == 0)
        return 1;
    return cost > l->cfg.burst + 1 ? l->cfg.burst + 1 : cost;
}

/* The answer when Redis failed (rc), as the policy says. */
static int on_failure(keel_limiter *l, keel_limit_req *q, lop op)
{
    uint64_t n = atomic_fetch_add_explicit(&l->store_errors, 1, memory_order_relaxed) + 1;
    if ((n & (n - 1)) == 0) /* the 1st, 2nd, 4th, 8th...: an outage does not flood the log */
        keel__log(KEEL_LOG_WARN, "limiter", "%s: store failed (%s), %llu time(s): %s", l->name,
                  keel_strerror(q->rc), (unsigned long long)n,
                  l->on_error == KEEL_LIMIT_FAIL_OPEN     ? "allowing"
                  : l->on_error == KEEL_LIMIT_FAIL_CLOSED ? "rejecting"
                                                          : "deciding in process");
    keel_limit_result *r = &q->result;
    if (l->on_error == KEEL_LIMIT_FALL_BACK) {
        int rc = keel__lstore_decide(l->local, q->key, q->len, keel__lstore_hash(l->local, q->key, q->len, false),
                                     keel__lstore_now(l->local), q->cost, op, r);
        r->source = KEEL_LIMIT_SRC_FALLBACK;
        return rc;
    }
    memset(r, 0, sizeof *r);
    r->now_ns = keel__clock_now(&l->clock);
    r->limit = l->cfg.burst; /* the limit, or GCRA's burst */
    if (q->cost > r->limit && op != OP_REFUND) { /* never passes, whatever the policy */
        r->source = l->on_error == KEEL_LIMIT_FAIL_OPEN ? KEEL_LIMIT_SRC_OPEN : KEEL_LIMIT_SRC_CLOSED;
        r->retry_after_ns = UINT64_MAX;
        return KEEL_ERANGE;
    }
    if (l->on_error == KEEL_LIMIT_FAIL_OPEN) {
        r->allowed = 1;
        r->source = KEEL_LIMIT_SRC_OPEN;
        r->remaining = r->limit; /* unknown: nothing to hold the client back */
    } else {
        r->source = KEEL_LIMIT_SRC_CLOSED;
        r->retry_after_ns = r->reset_ns = l->cfg.window; /* unknown: try again a window later */
    }
    return 0;
}

static bool store_failure(int rc)
{
    return rc == KEEL_EUNAVAIL || rc == KEEL_ETIMEDOUT || rc == KEEL_EPROTO || rc == KEEL_ENOMEM;
}

/* One request (already checked) in process, straight into r. */
static int decide_local(keel_limiter *l, const void *key, size_t len, uint64_t h, uint64_t now, uint64_t cost,
                        lop op, keel_limit_result *r)
{
    return keel__lstore_decide(l->local, key, len, h, now, clamp_cost(l, cost), op, r);
}

/* Decides every request (already checked), in process or in one pipeline.
 * For Redis, costs are normalised in place and put back after. */
static void decide(keel_limiter *l, keel_limit_req *reqs, size_t n, lop op)
{
    if (!l->remote) {
        /* Each key hashed and its slot prefetched 16 requests ahead, so
         * that the cache misses of 16 keys overlap; the clock read once
         * for 16 decisions. */
        enum { AHEAD = 16 };
        uint64_t h[AHEAD], now = 0;
        for (size_t i = 0; i < n && i < AHEAD; i++)
            h[i] = keel__lstore_hash(l->local, reqs[i].key, reqs[i].len, n > 1);
        for (size_t i = 0; i < n; i++) {
            keel_limit_req *q = &reqs[i];
            uint64_t hq = h[i % AHEAD];
            if (i + AHEAD < n)
                h[i % AHEAD] = keel__lstore_hash(l->local, reqs[i + AHEAD].key, reqs[i + AHEAD].len, true);
            if (i % AHEAD == 0)
                now = keel__lstore_now(l->local);
            q->rc = decide_local(l, q->key, q->len, hq, now, q->cost, op, &q->result);
        }
        return;
    }
    uint64_t one[1], *given = n == 1 ? one : keel__malloc(n * sizeof *given);
    if (!given) { /* the costs could not be put back: decide nothing, and
                   * answer a rejection the headers can carry, as fail-closed */
        for (size_t i = 0; i < n; i++) {
            reqs[i].rc = KEEL_ENOMEM;
            reqs[i].result = (keel_limit_result){.source = KEEL_LIMIT_SRC_REDIS, .limit = l->cfg.burst,
                                                 .retry_after_ns = l->cfg.window, .reset_ns = l->cfg.window};
        }
        if (op == OP_TAKE)
            atomic_fetch_add_explicit(&l->remote_rejected, n, memory_order_relaxed);
        return;
    }
    for (size_t i = 0; i < n; i++)
        given[i] = reqs[i].cost;
    for (size_t i = 0; i < n; i++)
        reqs[i].cost = clamp_cost(l, reqs[i].cost);
    keel__rstore_decide(l->remote, reqs, n, op);
    for (size_t i = 0; i < n; i++) {
        keel_limit_req *q = &reqs[i];
        if (store_failure(q->rc))
            q->rc = on_failure(l, q, op);
        /* the fallback store counts its own; a refusal (KEEL_EBACKEND) is
         * a rejection too, as in process one without memory is */
        if (q->result.source != KEEL_LIMIT_SRC_FALLBACK &&
            (q->rc == 0 || q->rc == KEEL_ERANGE || q->rc == KEEL_EBACKEND) && op == OP_TAKE)
            atomic_fetch_add_explicit(q->result.allowed ? &l->remote_allowed : &l->remote_rejected, 1,
                                      memory_order_relaxed);
    }
    for (size_t i = 0; i < n; i++)
        reqs[i].cost = given[i];
    if (given != one)
        keel__free(given);
}

static int one(keel_limiter *l, const void *key, size_t len, uint64_t cost, lop op,
               keel_limit_result *r)
{
    if (!l || !key_ok(key, len) || (!r && op != OP_REFUND))
        return KEEL_EINVAL;
    if (!l->remote) { /* no request to build: straight into the caller's result */
        keel_limit_result unused;
        return decide_local(l, key, len, keel__lstore_hash(l->local, key, len, false), keel__lstore_now(l->local),
                            cost, op, r ? r : &unused);
    }
    keel_limit_req q = {.key = key, .len = len, .cost = cost};
    decide(l, &q, 1, op);
    if (r)
        *r = q.result;
    return q.rc;
}

KEEL_API int keel_limiter_take(keel_limiter *l, const void *key, size_t len, uint64_t cost,
                               keel_limit_result *r)
{
    return one(l, key, len, cost, OP_TAKE, r);
}

KEEL_API int keel_limiter_peek(keel_limiter *l, const void *key, size_t len, uint64_t cost,
                               keel_limit_result *r)
{
    return one(l, key, len, cost, OP_PEEK, r);
}

KEEL_API int keel_limiter_refund(keel_limiter *l, const void *key, size_t len, uint64_t cost,
                                 keel_limit_result *r)
{
    return one(l, key, len, cost, OP_REFUND, r);
}

KEEL_API int keel_limiter_take_many(keel_limiter *l, keel_limit_req *reqs, size_t n)
{
    if (!l || (!reqs && n))
        return KEEL_EINVAL;
    for (size_t i = 0; i < n; i++)
        if (!key_ok(reqs[i].key, reqs[i].len))
            return KEEL_EINVAL;
    decide(l, reqs, n, OP_TAKE);
    return 0;
}

KEEL_API int keel_limiter_reset(keel_limiter *l, const void *key, size_t len)
{
    if (!l || !key_ok(key, len))
        return KEEL_EINVAL;
    if (l->local)
        keel__lstore_reset(l->local, key, len);
    return l->remote ? keel__rstore_reset(l->remote, key, len) : 0;
}

/* ---- header fields ---- */

static unsigned long long seconds_up(uint64_t ns)
{
    return (unsigned long long)(ns / 1000000000u + (ns % 1000000000u != 0));
}

KEEL_API int keel_limiter_headers(const keel_limiter *l, const keel_limit_result *r, char *buf,
                                  size_t size, size_t *len)
{
    if (!l || !r || (!buf && size) || !len)
        return KEEL_EINVAL;
    /* the quota is the burst (the limit but for GCRA), earned back in
     * burst x window / limit: so the policy agrees with what remains */
    unsigned __int128 w = ((unsigned __int128)l->cfg.window * l->cfg.burst + l->cfg.limit - 1) / l->cfg.limit;
    unsigned long long reset = seconds_up(r->reset_ns), window = seconds_up(w > UINT64_MAX ? UINT64_MAX : (uint64_t)w);
    char retry[48] = "";
    unsigned long long t = reset;
    if (!r->allowed && r->retry_after_ns != UINT64_MAX) {
        /* the draft: with Retry-After, RateLimit's t SHOULD be the same
         * time; X-RateLimit-Reset stays until all units are back */
        t = seconds_up(r->retry_after_ns);
        snprintf(retry, sizeof retry, "Retry-After: %llu\r\n", t);
    }
    int n = snprintf(buf, size,
                     "X-RateLimit-Limit: %llu\r\n"
                     "X-RateLimit-Remaining: %llu\r\n"
                     "X-RateLimit-Reset: %llu\r\n"
                     "%s"
                     "RateLimit-Policy: \"%s\";q=%llu;w=%llu\r\n"
                     "RateLimit: \"%s\";r=%llu;t=%llu\r\n",
                     (unsigned long long)r->limit, (unsigned long long)r->remaining, reset, retry,
                     l->name, (unsigned long long)l->cfg.burst, window, l->name,
                     (unsigned long long)r->remaining, t);
    *len = (size_t)n;
    return (size_t)n < size ? 0 : KEEL_ERANGE;
}

/* ---- statistics ---- */

KEEL_API void keel_limiter_stats_get(keel_limiter *l, keel_limiter_stats *st)
{
    if (!st)
        return;
    memset(st, 0, sizeof *st);
    if (!l)
        return;
    if (l->local)
        keel__lstore_stats(l->local, st);
    st->allowed += atomic_load(&l->remote_allowed);
    st->rejected += atomic_load(&l->remote_rejected);
    st->store_errors = atomic_load(&l->store_errors);
}
