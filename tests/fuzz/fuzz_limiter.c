/* tests/fuzz/fuzz_limiter.c — keel_limiter in process under a sequence of
 * takes, peeks, refunds and resets over a few keys, on a fake clock,
 * against a model of each algorithm as limiter.h states it.
 *
 * Input: four bytes of options, then operations [op][key][cost][arg], cut
 * short at the end of the input.
 *   [0] algo % 4 (3: unknown).
 *   [1] limit: 0 (bad), 255: 2^32 (bad), 254: 2^32 - 1, under 128: 1 to
 *       16, else 1 to 126.
 *   [2] window: (byte >> 2) ns, ms, s or hours by the low two bits (0:
 *       no window, bad); 255: 2^60 + 1 ns (bad), 254: 2^60.
 *   [3] bits 0-1 burst: 0 (the limit), 1, bits 2-5, 2^32 (bad, refused as
 *       lib/limiter/limiter.c does, though limiter.h does not say so);
 *       bit 6 a name with '"' (bad); bit 7 max_keys 2^32 + 1 (bad).
 * op % 8: 0 take; 1 keel_limiter_take_many() of arg % 3 + 1 such takes; 2 peek; 3 refund (r NULL when arg is odd); 4 reset;
 * 5 clock step by arg; 6 take, then headers into arg bytes; 7 take with r
 * NULL (KEEL_EINVAL).
 *   key % 8: "a", "b", 4096 x's, "a\0", empty, 4097 x's, NULL, "b".
 *   cost: top two bits 0: low three bits; 1: low six bits; 2: the limit
 *   (GCRA: the burst) - 1 + low two bits; 3: UINT64_MAX minus low six bits.
 *   clock step: top two bits: low six bits of ns, 64ths of the window,
 *   ms, windows.
 *
 * Checks: create refuses exactly the bad options; bad keys and a NULL
 * result are KEEL_EINVAL; a cost over the limit is KEEL_ERANGE, rejected,
 * retry_after UINT64_MAX; every take and peek is allowed exactly when the
 * model says (SLIDING_LOG: the units admitted in (now - W, now] plus the
 * cost within the limit; SLIDING_WINDOW: the previous fixed window's count
 * weighted by the part the sliding window covers plus the current one;
 * GCRA: the theoretical arrival time, scaled by the limit), refunds and
 * resets as documented; for SLIDING_LOG no window of length W ever holds
 * more than `limit` admitted units, and a rejection's retry_after is when
 * enough of them leave it; a peek before a take answers as the take;
 * remaining never exceeds the limit and is the most units a peek allows;
 * retry_after is 0 when allowed, > 0 when rejected; a rejected take
 * changes nothing (a peek after it answers the same); headers fit exactly
 * when the size holds them and the NUL, else KEEL_ERANGE with the length
 * needed, never writing past the size.
 */
#include <keel/limiter.h>

#include "fuzz.h"

#define MS 1000000ull
#define SECOND_NS 1000000000ull
#define NKEYS 4    /* "a", "b", the 4096-byte key, "a\0" */
#define MAX_LOG 256 /* admissions modelled per key; more end the input */
#define CLOCK_END ((uint64_t)1 << 62)

typedef unsigned __int128 u128;

typedef struct admission {
    uint64_t t, cost;
} admission;

typedef struct kmodel {
    admission log[MAX_LOG]; /* SLIDING_LOG: admitted, net of refunds */
    size_t n;
    uint64_t win, prev, cur; /* SLIDING_WINDOW: fixed window index + 1, counts */
    u128 tat;                /* GCRA: time x limit */
} kmodel;

typedef struct state {
    const uint8_t *d;
    size_t size, i;
    uint64_t now;
    keel_limiter *l;
    keel_limit_algo algo;
    uint64_t limit, window, burst; /* burst: what a cost may reach */
    kmodel k[NKEYS];
    bool full;
} state;

typedef struct key {
    const void *p;
    size_t len;
    int model; /* -1: a bad key */
} key;

static uint64_t fake_clock(void *ud)
{
    return ((const state *)ud)->now;
}

static key key_of(uint8_t sel)
{
    static char big[4097];
    if (!big[0])
        memset(big, 'x', sizeof big);
    switch (sel % 8) {
    case 0: return (key){"a", 1, 0};
    case 1:
    case 7: return (key){"b", 1, 1};
    case 2: return (key){big, 4096, 2};
    case 3: return (key){"a\0", 2, 3};
    case 4: return (key){"", 0, -1};
    case 5: return (key){big, 4097, -1};
    default: return (key){NULL, 1, -1};
    }
}

static keel_limiter *limiter_create(state *st)
{
    static const uint64_t unit[] = {1, MS, SECOND_NS, 3600 * SECOND_NS};
    const uint8_t *d = st->d;
    keel_limiter_opts o = {.algo = (keel_limit_algo)(d[0] % 4), .clock = fake_clock, .clock_ud = st};
    o.limit = d[1] == 0 ? 0 : d[1] == 255 ? (uint64_t)1 << 32 : d[1] == 254 ? UINT32_MAX
              : d[1] < 128 ? d[1] % 16u + 1 : d[1] - 127u;
    o.window_ns = d[2] == 255 ? ((uint64_t)1 << 60) + 1 : d[2] == 254 ? (uint64_t)1 << 60 : (d[2] >> 2) * unit[d[2] & 3];
    uint64_t bursts[] = {0, 1, (d[3] >> 2) & 15u, (uint64_t)1 << 32};
    o.burst = bursts[d[3] & 3];
    o.name = (d[3] & 0x40) ? "a\"b" : (d[3] & 8) ? "api" : NULL;
    o.max_keys = (d[3] & 0x80) ? ((size_t)1 << 32) + 1 : 0;
    bool bad = o.algo > KEEL_LIMIT_GCRA || o.limit == 0 || o.limit > UINT32_MAX || o.window_ns == 0 ||
               o.window_ns > (uint64_t)1 << 60 || o.burst > UINT32_MAX || (d[3] & 0xc0);
    keel_limiter *l = NULL;
    int rc = keel_limiter_create(&l, &o);
    KF_CHECK(rc == (bad ? KEEL_EINVAL : 0), "algo %d, limit %llu, window %llu, burst %llu, [3] %#x: create %d",
             (int)o.algo, (unsigned long long)o.limit, (unsigned long long)o.window_ns,
             (unsigned long long)o.burst, d[3], rc);
    KF_CHECK(bad || l != NULL, "create said 0 without a limiter");
    st->algo = o.algo;
    st->limit = o.limit;
    st->window = o.window_ns;
    st->burst = o.algo == KEEL_LIMIT_GCRA && o.burst ? o.burst : o.limit;
    return l;
}

static uint64_t cost_of(const state *st, uint8_t c)
{
    switch (c >> 6) {
    case 0: return c & 7;
    case 1: return c & 63;
    case 2: return st->burst - 1 + (c & 3);
    default: return UINT64_MAX - (c & 63);
    }
}

/* ---- the models: whether a cost passes now, and what passing does ---- */

/* SLIDING_LOG: the units admitted in (now - W, now]. */
static uint64_t log_sum(const state *st, const kmodel *m)
{
    uint64_t sum = 0;
    for (size_t j = 0; j < m->n; j++)
        if (m->log[j].t + st->window > st->now)
            sum += m->log[j].cost;
    return sum;
}

/* SLIDING_WINDOW: rolls the counts to now's fixed window; *f its offset. */
static void window_roll(const state *st, kmodel *m, uint64_t *f)
{
    uint64_t k = st->now / st->window;
    *f = st->now % st->window;
    if (m->win == k) { /* the previous window */
        m->prev = m->cur;
        m->cur = 0;
    } else if (m->win != k + 1) {
        m->prev = m->cur = 0;
    }
    m->win = k + 1;
}

static bool model_allows(const state *st, kmodel *m, uint64_t cost)
{
    u128 W = st->window, L = st->limit, f64;
    uint64_t f;
    switch (st->algo) {
    case KEEL_LIMIT_SLIDING_LOG: return log_sum(st, m) + cost <= st->limit;
    case KEEL_LIMIT_SLIDING_WINDOW:
        window_roll(st, m, &f);
        f64 = f;
        return (u128)m->prev * (W - f64) + ((u128)m->cur + cost) * W <= L * W;
    default: {
        u128 nows = (u128)st->now * L, tat = m->tat > nows ? m->tat : nows;
        return tat + (u128)cost * W - nows <= (u128)st->burst * W;
    }
    }
}

static void model_take(state *st, kmodel *m, uint64_t cost)
{
    u128 nows = (u128)st->now * st->limit;
    switch (st->algo) {
    case KEEL_LIMIT_SLIDING_LOG: {
        size_t kept = 0; /* only the window matters from now on */
        for (size_t j = 0; j < m->n; j++)
            if (m->log[j].t + st->window > st->now)
                m->log[kept++] = m->log[j];
        m->n = kept;
        if (m->n == MAX_LOG) {
            st->full = true; /* ends the input: the model forgets nothing */
            return;
        }
        m->log[m->n++] = (admission){st->now, cost};
        KF_CHECK(log_sum(st, m) <= st->limit, "%llu units admitted in one window of %llu",
                 (unsigned long long)log_sum(st, m), (unsigned long long)st->limit);
        break;
    }
    case KEEL_LIMIT_SLIDING_WINDOW: m->cur += cost; break;
    default: m->tat = (m->tat > nows ? m->tat : nows) + (u128)cost * st->window; break;
    }
}

/* A refund: the newest admissions of the window first; never more than
 * the key holds. */
static void model_refund(state *st, kmodel *m, uint64_t cost)
{
    uint64_t f;
    u128 nows = (u128)st->now * st->limit, back = (u128)cost * st->window;
    switch (st->algo) {
    case KEEL_LIMIT_SLIDING_LOG:
        while (m->n && cost && m->log[m->n - 1].t + st->window > st->now) {
            uint64_t take = m->log[m->n - 1].cost < cost ? m->log[m->n - 1].cost : cost;
            m->log[m->n - 1].cost -= take;
            cost -= take;
            m->n -= m->log[m->n - 1].cost == 0;
        }
        break;
    case KEEL_LIMIT_SLIDING_WINDOW:
        window_roll(st, m, &f);
        m->cur -= cost < m->cur ? cost : m->cur;
        break;
    default:
        if (m->tat > nows)
            m->tat = m->tat - nows > back ? m->tat - back : nows;
        break;
    }
}

/* SLIDING_LOG: when a rejected cost could pass, as limiter.h says. */
static uint64_t log_retry(const state *st, const kmodel *m, uint64_t cost)
{
    uint64_t need = log_sum(st, m) + cost - st->limit, freed = 0;
    for (size_t j = 0; j < m->n; j++) {
        if (m->log[j].t + st->window <= st->now)
            continue;
        freed += m->log[j].cost;
        if (freed >= need)
            return m->log[j].t + st->window - st->now;
    }
    return UINT64_MAX;
}

/* ---- checks on the limiter's answers ---- */

static void check_result(const state *st, const keel_limit_result *r, int rc, uint64_t cost)
{
    KF_CHECK(r->limit == st->burst, "limit %llu, want %llu", (unsigned long long)r->limit,
             (unsigned long long)st->burst);
    KF_CHECK(r->remaining <= r->limit, "remaining %llu over the limit", (unsigned long long)r->remaining);
    KF_CHECK(r->now_ns == st->now && r->source == KEEL_LIMIT_SRC_LOCAL, "now %llu, source %d",
             (unsigned long long)r->now_ns, (int)r->source);
    if (cost > st->burst) {
        KF_CHECK(rc == KEEL_ERANGE && !r->allowed && r->retry_after_ns == UINT64_MAX,
                 "cost %llu over the limit: rc %d, allowed %d", (unsigned long long)cost, rc, r->allowed);
        return;
    }
    KF_CHECK(rc == 0, "cost %llu: rc %d", (unsigned long long)cost, rc);
    KF_CHECK(r->allowed ? r->retry_after_ns == 0 : r->retry_after_ns > 0, "allowed %d, retry_after %llu",
             r->allowed, (unsigned long long)r->retry_after_ns);
}

/* remaining is the most units a peek allows now. */
static void check_remaining(state *st, key k, uint64_t remaining)
{
    keel_limit_result p;
    if (remaining) {
        KF_CHECK(keel_limiter_peek(st->l, k.p, k.len, remaining, &p) == 0 && p.allowed,
                 "remaining %llu, refused by a peek", (unsigned long long)remaining);
    }
    if (remaining < st->burst) {
        keel_limiter_peek(st->l, k.p, k.len, remaining + 1, &p);
        KF_CHECK(!p.allowed, "remaining %llu, a peek of one more allowed", (unsigned long long)remaining);
    }
}

static bool same_answer(const keel_limit_result *a, const keel_limit_result *b)
{
    return a->allowed == b->allowed && a->retry_after_ns == b->retry_after_ns && a->remaining == b->remaining &&
           a->reset_ns == b->reset_ns;
}

/* A take (or a peek): the model's answer, and what it changes. */
static void op_decide(state *st, key k, uint64_t cost, bool take, keel_limit_result *r)
{
    uint64_t c = cost ? cost : 1;
    kmodel *m = &st->k[k.model];
    keel_limit_result before;
    int prc = keel_limiter_peek(st->l, k.p, k.len, cost, &before);
    int rc = take ? keel_limiter_take(st->l, k.p, k.len, cost, r) : keel_limiter_peek(st->l, k.p, k.len, cost, r);
    check_result(st, r, rc, c);
    KF_CHECK(prc == rc && before.allowed == r->allowed && before.retry_after_ns == r->retry_after_ns,
             "peek said %d/%d, take %d/%d", prc, before.allowed, rc, r->allowed);
    if (c > st->burst)
        return;
    bool want = model_allows(st, m, c);
    KF_CHECK(r->allowed == want, "cost %llu at %llu: allowed %d, the model %d", (unsigned long long)c,
             (unsigned long long)st->now, r->allowed, want);
    if (!want && st->algo == KEEL_LIMIT_SLIDING_LOG)
        KF_CHECK(r->retry_after_ns == log_retry(st, m, c), "retry_after %llu, the log says %llu",
                 (unsigned long long)r->retry_after_ns, (unsigned long long)log_retry(st, m, c));
    if (take && want)
        model_take(st, m, c);
    if (take && !want) { /* changed nothing */
        keel_limit_result after;
        keel_limiter_peek(st->l, k.p, k.len, cost, &after);
        KF_CHECK(same_answer(&before, &after), "a rejected take changed the answer");
    }
    if (!take || want)
        check_remaining(st, k, r->remaining);
}

/* n takes of the key in one keel_limiter_take_many(): each answered as
 * the same takes one after another. */
static void op_many(state *st, key k, uint64_t cost, size_t n)
{
    uint64_t c = cost ? cost : 1;
    keel_limit_req q[3];
    for (size_t i = 0; i < n; i++)
        q[i] = (keel_limit_req){.key = k.p, .len = k.len, .cost = cost};
    KF_CHECK(keel_limiter_take_many(st->l, q, n) == 0, "take_many of %zu", n);
    for (size_t i = 0; i < n && !st->full; i++) {
        check_result(st, &q[i].result, q[i].rc, c);
        if (c > st->burst)
            continue;
        bool want = model_allows(st, &st->k[k.model], c);
        KF_CHECK(q[i].result.allowed == want, "take %zu of %zu, cost %llu at %llu: allowed %d, the model %d", i + 1,
                 n, (unsigned long long)c, (unsigned long long)st->now, q[i].result.allowed, want);
        if (want)
            model_take(st, &st->k[k.model], c);
    }
}

/* Headers of r into size bytes: as a large buffer has them, or
 * KEEL_ERANGE with their length; never past size. */
static void op_headers(const state *st, const keel_limit_result *r, size_t size)
{
    char full[512], *b = kf_malloc(size + 16);
    size_t n = 0, len = 0;
    KF_CHECK(keel_limiter_headers(st->l, r, full, sizeof full, &n) == 0, "headers into 512 bytes");
    KF_CHECK(strlen(full) == n, "headers: length %zu, %zu written", n, strlen(full));
    char want[64];
    snprintf(want, sizeof want, "X-RateLimit-Remaining: %llu\r\n", (unsigned long long)r->remaining);
    KF_CHECK(strstr(full, want) != NULL, "headers without %s", want);
    bool retry = !r->allowed && r->retry_after_ns != UINT64_MAX;
    KF_CHECK((strstr(full, "Retry-After: ") != NULL) == retry, "Retry-After when allowed %d", r->allowed);
    memset(b, 0x5a, size + 16);
    int rc = keel_limiter_headers(st->l, r, size ? b : NULL, size, &len);
    KF_CHECK(len == n, "headers into %zu bytes: length %zu, want %zu", size, len, n);
    KF_CHECK(rc == (n < size ? 0 : KEEL_ERANGE), "headers of %zu bytes into %zu: %d", n, size, rc);
    KF_CHECK(rc != 0 || memcmp(b, full, n + 1) == 0, "headers into %zu bytes differ", size);
    for (size_t j = size; j < size + 16; j++)
        KF_CHECK(b[j] == 0x5a, "headers wrote past %zu bytes", size);
    free(b);
    KF_CHECK(keel_limiter_headers(st->l, r, NULL, 5, &len) == KEEL_EINVAL, "headers into NULL of 5 bytes");
}

static void op_refund(state *st, key k, uint64_t cost, bool null_result)
{
    keel_limit_result r;
    int rc = keel_limiter_refund(st->l, k.p, k.len, cost, null_result ? NULL : &r);
    KF_CHECK(rc == 0, "refund returned %d", rc);
    /* costs are clamped to burst + 1 (lib/limiter/limiter.c): the same here,
     * since no key holds more than the burst */
    model_refund(st, &st->k[k.model], cost == 0 ? 1 : cost > st->burst ? st->burst + 1 : cost);
    if (!null_result) {
        KF_CHECK(r.allowed && r.remaining <= r.limit, "refund: allowed %d, remaining %llu", r.allowed,
                 (unsigned long long)r.remaining);
        check_remaining(st, k, r.remaining);
    }
}

static void op_step(state *st, uint8_t a)
{
    uint64_t n = a & 63, step;
    switch (a >> 6) {
    case 0: step = n; break;
    case 1: step = st->window / 64 * n; break;
    case 2: step = n * MS; break;
    default: step = st->window > CLOCK_END / 64 ? CLOCK_END : st->window * n; break;
    }
    if (step < CLOCK_END - st->now)
        st->now += step;
}

static void run_op(state *st, uint8_t op, key k, uint8_t cb, uint8_t arg)
{
    keel_limit_result r;
    uint64_t cost = cost_of(st, cb);
    int rc;
    if (op % 8 == 5) {
        op_step(st, arg);
        return;
    }
    if (k.model < 0 || op % 8 == 7) { /* refused before anything */
        rc = op % 8 == 4 ? keel_limiter_reset(st->l, k.p, k.len)
           : op % 8 == 3 ? keel_limiter_refund(st->l, k.p, k.len, cost, NULL)
           : keel_limiter_take(st->l, k.p, k.len, cost, op % 8 == 7 ? NULL : &r);
        KF_CHECK(rc == KEEL_EINVAL, "op %d with a %zu-byte key: %d", op % 8, k.len, rc);
        return;
    }
    switch (op % 8) {
    case 0: op_decide(st, k, cost, true, &r); break;
    case 1: op_many(st, k, cost, arg % 3 + 1u); break;
    case 2: op_decide(st, k, cost, false, &r); break;
    case 3: op_refund(st, k, cost, arg & 1); break;
    case 4:
        KF_CHECK(keel_limiter_reset(st->l, k.p, k.len) == 0, "reset");
        memset(&st->k[k.model], 0, sizeof st->k[k.model]);
        break;
    default:
        op_decide(st, k, cost, true, &r);
        op_headers(st, &r, arg);
        break;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *d, size_t size)
{
    if (size < 4)
        return 0;
    state *st = kf_calloc(sizeof *st);
    st->d = d;
    st->size = size;
    st->now = 5 * SECOND_NS;
    st->l = limiter_create(st);
    for (size_t i = 4; st->l && !st->full && i + 4 <= size; i += 4)
        run_op(st, d[i], key_of(d[i + 1]), d[i + 2], d[i + 3]);
    keel_limiter_destroy(st->l);
    keel_limiter_destroy(NULL);
    free(st);
    return 0;
}
