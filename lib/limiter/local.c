/* lib/limiter/local.c — the in-process store and the three algorithms.
 *
 * Keys live in shards (the top bits of their hash choose one), each an
 * open-addressing table with linear probing, backward-shift deletion and
 * a spinlock held only for one decision (tens of nanoseconds). A slot is
 * 48 bytes: the hash, two words of state and the key (inline up to 16
 * bytes); tables grow by doubling when 3/4 full, so they are 3/8 to 3/4
 * full and hold 64 to 128 bytes a key, up to what the shard's share of
 * max_keys needs. A batch prefetches each key's home slot before taking
 * the lock (keel__lstore_hash()): the table and its mask are read there
 * without the lock, so they are stored atomically.
 *
 * At max_keys, a new key takes the place of an old one: of a sample of
 * slots, one whose state is that of a fresh key (GCRA: bucket full;
 * window: no count that still weighs; log: every entry expired) —
 * dropping it loses nothing, since the key would start from the same
 * state — else the one least recently active (counted: it may then get
 * more than its due).
 *
 * Keys come from clients, and the hash chooses both the shard and the
 * home slot: with a seed known to all, keys found offline would all land
 * in one shard and one run of slots, each decision walking that run under
 * the shard's lock. So each store hashes with its own random seed.
 *
 * Exactness: GCRA keeps its theoretical arrival time scaled by the limit
 * (time x limit, 128 bits), so an emission interval of window / limit is
 * exact; the window compares limit x window with the weighted counts, also
 * in 128 bits. No rounding anywhere decides a request.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <string.h>

#include "../hash.h"
#include "limiter_int.h"

typedef unsigned __int128 u128;

typedef struct lslot {
    uint64_t hash; /* 0: empty */
    uint64_t a, b; /* the algorithm's state */
    uint32_t len;
    uint32_t unused;
    union {
        char in[16];
        char *out;
    } k;
} lslot;

/* A sliding log: admissions oldest first, in a ring, each with its time
 * and the running total of units through it (mod 2^64; differences, at
 * most the limit, are exact), so that the entries a rejection waits for
 * are found by bisection. base is the total before the oldest entry, tot
 * through the newest: the log holds tot - base units. */
typedef struct llog {
    uint32_t cap, head, n;
    uint64_t base, tot;
    struct {
        uint64_t t, cum;
    } e[];
} llog;

typedef struct lshard {
    _Alignas(KEEL__CACHELINE) atomic_int lock;
    uint32_t mask, count, cap, rotor;
    lslot *slots;
    uint64_t bytes;
    uint64_t allowed, rejected, evicted_idle, evicted_active;
} lshard;

struct lstore {
    lcfg cfg;
    ldivisor by_limit, by_window;
    keel__clock clock;
    lshard *shards;
    unsigned shift;
    size_t nshards;
    uint64_t seed; /* the hash's: keys come from clients */
};

/* ---- locking ---- */

static void lock(lshard *sh)
{
    int spins = 0;
    while (atomic_exchange_explicit(&sh->lock, 1, memory_order_acquire)) {
        while (atomic_load_explicit(&sh->lock, memory_order_relaxed)) {
            if (++spins < 64)
                keel__cpu_relax();
            else
                sched_yield(); /* the holder may not be running */
        }
    }
}

static void unlock(lshard *sh)
{
    atomic_store_explicit(&sh->lock, 0, memory_order_release);
}

/* ---- slots ---- */

static const char *slot_key(const lslot *s)
{
    return s->len <= sizeof s->k.in ? s->k.in : s->k.out;
}

static size_t log_bytes(const llog *g)
{
    return g ? sizeof *g + g->cap * sizeof g->e[0] : 0;
}

/* Frees what the slot owns outside the table. */
static void slot_free(const lstore *st, lshard *sh, lslot *s)
{
    if (s->len > sizeof s->k.in) {
        keel__free(s->k.out);
        sh->bytes -= s->len;
    }
    if (st->cfg.algo == KEEL_LIMIT_SLIDING_LOG) {
        llog *g = (llog *)(uintptr_t)s->a;
        sh->bytes -= log_bytes(g);
        keel__free(g);
    }
}

static lslot *find(lshard *sh, uint64_t h, const void *key, size_t len, size_t *pos)
{
    if (!sh->slots)
        return NULL;
    for (size_t i = h & sh->mask;; i = (i + 1) & sh->mask) {
        lslot *s = &sh->slots[i];
        if (!s->hash) {
            *pos = i;
            return NULL;
        }
        if (s->hash == h && s->len == len && memcmp(slot_key(s), key, len) == 0)
            return s;
    }
}

/* Backward-shift deletion: later slots of the same run move up, so that
 * probing never meets a hole before the key it looks for. */
static void remove_at(const lstore *st, lshard *sh, size_t i)
{
    slot_free(st, sh, &sh->slots[i]);
    for (size_t j = (i + 1) & sh->mask; sh->slots[j].hash; j = (j + 1) & sh->mask) {
        size_t home = sh->slots[j].hash & sh->mask;
        /* j may move to i unless its home lies cyclically in (i, j] */
        bool stays = i < j ? (home > i && home <= j) : (home > i || home <= j);
        if (!stays) {
            sh->slots[i] = sh->slots[j];
            i = j;
        }
    }
    memset(&sh->slots[i], 0, sizeof sh->slots[i]);
    sh->count--;
}

static int grow(lshard *sh)
{
    size_t n = sh->slots ? (size_t)sh->mask + 1 : 0, m = n ? n * 2 : 16;
    lslot *t = keel__calloc(m, sizeof *t);
    if (!t)
        return KEEL_ENOMEM;
    for (size_t i = 0; i < n; i++) {
        lslot *s = &sh->slots[i];
        if (!s->hash)
            continue;
        size_t j = s->hash & (m - 1);
        while (t[j].hash)
            j = (j + 1) & (m - 1);
        t[j] = *s;
    }
    keel__free(sh->slots);
    /* atomic for keel__lstore_hash(), which reads them without the lock */
    __atomic_store_n(&sh->slots, t, __ATOMIC_RELAXED);
    __atomic_store_n(&sh->mask, (uint32_t)(m - 1), __ATOMIC_RELAXED);
    sh->bytes += (m - n) * sizeof *t;
    return 0;
}

/* ---- arithmetic ---- */

ldivisor keel__ldivisor(uint64_t d)
{
    ldivisor v = {d, 0, 0};
    if (d > 1) {
        unsigned l = 64 - (unsigned)__builtin_clzll(d - 1);
        /* 2^l - d < d, so the quotient fits in 64 bits */
        v.m = (uint64_t)(((((u128)1 << l) - d) << 64) / d) + 1;
        v.shift = l - 1;
    }
    return v;
}

static inline uint64_t ldivide(const ldivisor *v, uint64_t n)
{
    if (v->d == 1)
        return n;
    uint64_t t = (uint64_t)(((u128)v->m * n) >> 64);
    return (t + ((n - t) >> 1)) >> v->shift;
}

uint64_t keel__ldivide(const ldivisor *v, uint64_t n) { return ldivide(v, n); }

/* a / the divisor, saturated to 64 bits: the operands nearly always fit
 * in 64 bits (a 128-bit division is a library call). */
static inline uint64_t divf(u128 a, const ldivisor *v)
{
    if (!(a >> 64))
        return ldivide(v, (uint64_t)a);
    u128 q = a / v->d;
    return q >> 64 ? UINT64_MAX : (uint64_t)q;
}

static inline uint64_t divf_up(u128 a, const ldivisor *v)
{
    if (!a)
        return 0;
    uint64_t q = divf(a - 1, v);
    return q + (q != UINT64_MAX);
}

/* a / b, saturated to 64 bits, for a divisor known only now. */
static inline uint64_t div64(u128 a, uint64_t b)
{
    if (!(a >> 64))
        return (uint64_t)a / b;
    u128 q = a / b;
    return q >> 64 ? UINT64_MAX : (uint64_t)q;
}

/* ---- idleness, for eviction ---- */

/* Whether the key's state is that of a fresh key; and how recently it was
 * active (larger: more recent). */
static bool slot_idle(const lstore *st, const lslot *s, uint64_t now, uint64_t *activity)
{
    const lcfg *c = &st->cfg;
    switch (c->algo) {
    case KEEL_LIMIT_GCRA: {
        u128 tat = (u128)s->a << 64 | s->b;
        *activity = divf(tat, &st->by_limit);
        return tat <= (u128)now * c->limit;
    }
    case KEEL_LIMIT_SLIDING_WINDOW: {
        uint64_t k = ldivide(&st->by_window, now), prev = s->b >> 32, cur = (uint32_t)s->b;
        *activity = s->a;
        if (s->a == 0 || s->a + 1 <= k) /* stored index + 2 <= now's: both windows over */
            return true;
        /* else what still weighs: from the previous window, its current
         * count; from this one (or a later one: the clock went back), both */
        return s->a == k ? cur == 0 : prev == 0 && cur == 0;
    }
    default: {
        const llog *g = (const llog *)(uintptr_t)s->a;
        if (!g || g->n == 0) {
            *activity = 0;
            return true;
        }
        uint64_t newest = g->e[(g->head + g->n - 1) % g->cap].t;
        *activity = newest;
        return now >= newest && now - newest >= c->window; /* newest + window wraps */
    }
    }
}

/* Makes room for one key at max_keys: drops an idle key of a sample, else
 * the least recently active one. */
static void evict_one(lstore *st, lshard *sh, uint64_t now)
{
    size_t n = (size_t)sh->mask + 1, best = SIZE_MAX;
    uint64_t best_act = UINT64_MAX;
    bool idle = false;
    for (size_t k = 0, seen = 0; k < n && seen < 16 && !idle; k++) {
        size_t i = (sh->rotor + k) & sh->mask;
        if (!sh->slots[i].hash)
            continue;
        seen++;
        uint64_t act;
        idle = slot_idle(st, &sh->slots[i], now, &act);
        /* the first one seen too: a GCRA key busy past the clock's end is
         * as active as UINT64_MAX */
        if (idle || best == SIZE_MAX || act < best_act) {
            best = i;
            best_act = act;
        }
    }
    sh->rotor = (uint32_t)((best + 1) & sh->mask);
    if (idle)
        sh->evicted_idle++;
    else
        sh->evicted_active++;
    remove_at(st, sh, best);
}

static lslot *insert(lstore *st, lshard *sh, uint64_t h, const void *key, size_t len, uint64_t now)
{
    char *out = NULL; /* first: no key is evicted for an insert that cannot be made */
    if (len > sizeof ((lslot *)0)->k.in && !(out = keel__malloc(len)))
        return NULL;
    if (sh->count >= sh->cap)
        evict_one(st, sh, now);
    else if (!sh->slots || (sh->count + 1) * 4 > ((size_t)sh->mask + 1) * 3) {
        if (grow(sh) != 0) {
            keel__free(out);
            return NULL;
        }
    }
    size_t pos;
    find(sh, h, key, len, &pos); /* the empty slot that ends its run */
    lslot *s = &sh->slots[pos];
    memset(s, 0, sizeof *s);
    s->hash = h;
    s->len = (uint32_t)len;
    if (out) {
        memcpy(out, key, len);
        s->k.out = out;
        sh->bytes += len;
    } else {
        memcpy(s->k.in, key, len);
    }
    sh->count++;
    return s;
}

/* ---- the algorithms ---- */

static int gcra(const lstore *st, lslot *s, uint64_t now, uint64_t cost, lop op, keel_limit_result *r)
{
    const lcfg *c = &st->cfg;
    u128 L = c->limit, W = c->window, nows = (u128)now * L;
    u128 tat = (u128)s->a << 64 | s->b, cap = (u128)c->burst * W, inc = (u128)cost * W;
    if (tat < nows)
        tat = nows;
    r->allowed = 1;
    if (op == OP_REFUND) {
        tat = tat - nows > inc ? tat - inc : nows;
    } else {
        u128 next = tat + inc;
        r->allowed = next - nows <= cap;
        if (r->allowed && op == OP_TAKE)
            tat = next;
        else if (!r->allowed)
            r->retry_after_ns = cost > c->burst ? UINT64_MAX : divf_up(next - cap - nows, &st->by_limit);
    }
    if (op != OP_PEEK) {
        s->a = (uint64_t)(tat >> 64);
        s->b = (uint64_t)tat;
    }
    r->limit = c->burst;
    /* the clock is read before the shard's lock: another thread may have
     * stored a state from a little later than `now` */
    r->remaining = tat - nows >= cap ? 0 : divf(cap - (tat - nows), &st->by_window);
    r->reset_ns = divf_up(tat - nows, &st->by_limit);
    return cost > c->burst && op != OP_REFUND ? KEEL_ERANGE : 0;
}

static int window(const lstore *st, lslot *s, uint64_t now, uint64_t cost, lop op, keel_limit_result *r)
{
    const lcfg *c = &st->cfg;
    uint64_t W = c->window, k = ldivide(&st->by_window, now), f = now - k * W, L = c->limit;
    uint64_t prev = s->b >> 32, cur = (uint32_t)s->b;
    if (s->a == 0) {
        prev = cur = 0;
    } else if (s->a - 1 > k) { /* the clock went back: stay in the stored window */
        k = s->a - 1;
        f = 0;
    } else if (s->a - 1 + 1 == k) {
        prev = cur;
        cur = 0;
    } else if (s->a - 1 != k) {
        prev = cur = 0;
    }
    u128 lim = (u128)L * W;
    r->allowed = 1;
    if (op == OP_REFUND) {
        cur -= cost < cur ? cost : cur;
    } else {
        u128 est = (u128)prev * (W - f) + (u128)(cur + cost) * W;
        r->allowed = est <= lim;
        if (r->allowed && op == OP_TAKE) {
            cur += cost;
        } else if (!r->allowed) {
            if (cost > L) {
                r->retry_after_ns = UINT64_MAX;
            } else if (cur + cost <= L) { /* in this window, once prev weighs less */
                uint64_t x = div64((u128)(L - cur - cost) * W, prev);
                r->retry_after_ns = W - x - f;
            } else { /* in the next one, where cur becomes prev */
                uint64_t x = cur ? div64((u128)(L - cost) * W, cur) : W;
                r->retry_after_ns = (W - f) + (x >= W ? 0 : W - x);
            }
        }
    }
    if (op != OP_PEEK) {
        s->a = k + 1;
        s->b = prev << 32 | cur;
    }
    u128 used = (u128)prev * (W - f) + (u128)cur * W;
    r->limit = L;
    r->remaining = used >= lim ? 0 : divf(lim - used, &st->by_window);
    r->reset_ns = cur ? 2 * W - f : prev ? W - f : 0;
    return cost > L && op != OP_REFUND ? KEEL_ERANGE : 0;
}

#define LOG_AT(g, i) ((g)->e[((g)->head + (i)) % (g)->cap])

/* Room for one more entry; NULL if memory ran out. */
static llog *log_reserve(lshard *sh, lslot *s, uint64_t limit)
{
    llog *g = (llog *)(uintptr_t)s->a;
    if (g && g->n < g->cap)
        return g;
    uint64_t cap = g ? (uint64_t)g->cap * 2 : 4;
    if (cap > limit)
        cap = limit < 4 ? 4 : limit;
    llog *ng = keel__malloc(sizeof *ng + cap * sizeof ng->e[0]);
    if (!ng)
        return NULL;
    ng->cap = (uint32_t)cap;
    ng->head = 0;
    ng->n = 0;
    ng->base = ng->tot = 0;
    for (uint32_t i = 0; g && i < g->n; i++)
        ng->e[ng->n++] = LOG_AT(g, i);
    if (g) {
        ng->base = g->base;
        ng->tot = g->tot;
    }
    sh->bytes += log_bytes(ng) - log_bytes(g);
    keel__free(g);
    s->a = (uintptr_t)ng;
    return ng;
}

/* The oldest entry that takes the log's running total to at least need
 * units: O(log n). */
static uint32_t log_find(const llog *g, uint64_t need)
{
    uint32_t lo = 0, hi = g->n - 1;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (LOG_AT(g, mid).cum - g->base >= need)
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

static int slog(const lcfg *c, lshard *sh, lslot *s, uint64_t now, uint64_t cost, lop op,
                keel_limit_result *r)
{
    llog *g = (llog *)(uintptr_t)s->a;
    uint64_t W = c->window, L = c->limit;
    /* (now - W, now] only; by difference, as t + W wraps near the
     * clock's end; an entry from a later reading than now stays */
    while (g && g->n && now >= LOG_AT(g, 0).t && now - LOG_AT(g, 0).t >= W) {
        g->base = LOG_AT(g, 0).cum;
        g->head = (g->head + 1) % g->cap;
        g->n--;
    }
    uint64_t sum = g ? g->tot - g->base : 0;
    r->allowed = 1;
    if (op == OP_REFUND) {
        for (uint64_t left = cost; g && g->n && left;) { /* the newest first */
            uint64_t *e = &LOG_AT(g, g->n - 1).cum, prev = g->n > 1 ? LOG_AT(g, g->n - 2).cum : g->base;
            uint64_t units = *e - prev, take = units < left ? units : left;
            *e -= take;
            g->tot -= take;
            left -= take;
            if (*e == prev)
                g->n--;
        }
    } else {
        r->allowed = sum + cost <= L;
        if (r->allowed && op == OP_TAKE) {
            /* the same instant, or an older clock reading (read before
             * the lock) than the newest entry's: joining that entry keeps
             * the log in time order, which the expiry, retry_after_ns and
             * reset_ns rely on, and holds the units no shorter */
            if (g && g->n && LOG_AT(g, g->n - 1).t >= now) {
                LOG_AT(g, g->n - 1).cum += cost;
            } else {
                if (!(g = log_reserve(sh, s, L)))
                    return KEEL_ENOMEM;
                LOG_AT(g, g->n).t = now;
                LOG_AT(g, g->n).cum = g->tot + cost;
                g->n++;
            }
            g->tot += cost;
        } else if (!r->allowed) {
            /* the oldest entries holding sum + cost - L units must go */
            r->retry_after_ns = cost > L ? UINT64_MAX : LOG_AT(g, log_find(g, sum + cost - L)).t + W - now;
        }
    }
    sum = g ? g->tot - g->base : 0;
    r->limit = L;
    r->remaining = L - sum;
    r->reset_ns = g && g->n ? LOG_AT(g, g->n - 1).t + W - now : 0;
    return cost > L && op != OP_REFUND ? KEEL_ERANGE : 0;
}

/* ---- the store ---- */

int keel__lstore_create(lstore **out, const lcfg *cfg, size_t max_keys, const keel__clock *clock)
{
    lstore *st = keel__calloc(1, sizeof *st);
    if (!st)
        return KEEL_ENOMEM;
    st->cfg = *cfg;
    st->by_limit = keel__ldivisor(cfg->limit);
    st->by_window = keel__ldivisor(cfg->window);
    st->clock = *clock;
    st->seed = keel_rand_u64(NULL); /* seeded from getrandom(2) */
    size_t n = 64;
    while (n > 1 && max_keys / n < 64) /* small limiters: fewer, fuller shards */
        n /= 2;
    st->nshards = n;
    st->shift = 64;
    for (size_t m = n; m > 1; m /= 2)
        st->shift--;
    st->shards = keel__aligned_alloc(KEEL__CACHELINE, n * sizeof *st->shards);
    if (!st->shards) {
        keel__free(st);
        return KEEL_ENOMEM;
    }
    memset(st->shards, 0, n * sizeof *st->shards);
    for (size_t i = 0; i < n; i++) { /* max_keys <= 2^32 (checked): no overflow */
        size_t cap = max_keys / n + (i < max_keys % n);
        st->shards[i].cap = (uint32_t)(cap ? cap : 1);
    }
    *out = st;
    return 0;
}

void keel__lstore_destroy(lstore *st)
{
    if (!st)
        return;
    for (size_t i = 0; i < st->nshards; i++) {
        lshard *sh = &st->shards[i];
        for (size_t j = 0; sh->slots && j <= sh->mask; j++)
            if (sh->slots[j].hash)
                slot_free(st, sh, &sh->slots[j]);
        keel__free(sh->slots);
    }
    keel__aligned_free(st->shards);
    keel__free(st);
}

static lshard *shard_of(lstore *st, uint64_t h) { return &st->shards[st->shift == 64 ? 0 : h >> st->shift]; }

uint64_t keel__lstore_hash(lstore *st, const void *key, size_t len, bool prefetch)
{
    uint64_t h = keel__hash64(key, len, st->seed);
    if (h == 0)
        h = 1;
    if (prefetch) { /* a stale table (grown meanwhile) only wastes it */
        lshard *sh = shard_of(st, h);
        lslot *t = __atomic_load_n(&sh->slots, __ATOMIC_RELAXED);
        uint32_t mask = __atomic_load_n(&sh->mask, __ATOMIC_RELAXED);
        if (t) { /* a slot may straddle two lines */
            __builtin_prefetch(&t[h & mask], 1);
            __builtin_prefetch((const char *)&t[h & mask] + sizeof *t - 1, 1);
        }
    }
    return h;
}

uint64_t keel__lstore_now(lstore *st) { return keel__clock_now(&st->clock); }

int keel__lstore_decide(lstore *st, const void *key, size_t len, uint64_t h, uint64_t now, uint64_t cost, lop op,
                        keel_limit_result *r)
{
    memset(r, 0, sizeof *r);
    r->now_ns = now;
    r->source = KEEL_LIMIT_SRC_LOCAL;
    lshard *sh = shard_of(st, h);
    lock(sh);
    size_t pos;
    lslot *s = find(sh, h, key, len, &pos), fresh = {0};
    /* a cost over the limit (burst: the limit but for GCRA) never passes:
     * storing its key could push out one that holds units */
    bool inserted = !s && op == OP_TAKE && cost <= st->cfg.burst;
    if (inserted)
        s = insert(st, sh, h, key, len, now);
    else if (!s)
        s = &fresh; /* a peek, refund or hopeless take of an unknown key stores nothing */
    int rc;
    if (!s) {
        rc = KEEL_ENOMEM;
    } else {
        switch (st->cfg.algo) {
        case KEEL_LIMIT_GCRA: rc = gcra(st, s, now, cost, op, r); break;
        case KEEL_LIMIT_SLIDING_WINDOW: rc = window(st, s, now, cost, op, r); break;
        default: rc = slog(&st->cfg, sh, s, now, cost, op, r); break;
        }
    }
    if (rc == KEEL_ENOMEM) {
        /* a rejection the headers can carry: the limit, and a window to
         * wait (the state is unknown), as fail-closed answers */
        r->allowed = 0;
        r->limit = st->cfg.burst;
        r->remaining = 0;
        r->retry_after_ns = r->reset_ns = st->cfg.window;
        if (inserted && s) /* a new key whose sliding log could not start */
            remove_at(st, sh, (size_t)(s - sh->slots));
    }
    if (op == OP_TAKE) {
        if (r->allowed)
            sh->allowed++;
        else
            sh->rejected++;
    }
    unlock(sh);
    return rc;
}

void keel__lstore_reset(lstore *st, const void *key, size_t len)
{
    uint64_t h = keel__lstore_hash(st, key, len, false);
    lshard *sh = shard_of(st, h);
    lock(sh);
    size_t pos;
    lslot *s = find(sh, h, key, len, &pos);
    if (s)
        remove_at(st, sh, (size_t)(s - sh->slots));
    unlock(sh);
}

void keel__lstore_stats(lstore *st, keel_limiter_stats *out)
{
    out->bytes = sizeof *st + st->nshards * sizeof *st->shards;
    for (size_t i = 0; i < st->nshards; i++) {
        lshard *sh = &st->shards[i];
        lock(sh);
        out->keys += sh->count;
        out->bytes += sh->bytes;
        out->allowed += sh->allowed;
        out->rejected += sh->rejected;
        out->evicted_idle += sh->evicted_idle;
        out->evicted_active += sh->evicted_active;
        unlock(sh);
    }
}
