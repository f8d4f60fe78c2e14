/* tests/fuzz/fuzz_backoff.c — keel_backoff schedules and keel_retry_budget
 * budgets, with the random numbers and the clock taken from the input,
 * against the formulas and the token arithmetic backoff.h states.
 *
 * Input: [kind], then by kind % 2:
 *   0 a schedule: [policy % 6 (5: unknown, bad)][base][cap], base and cap
 *     from a table of edge values (cap 0: none; a cap below the base:
 *     bad), then operations [op][rand]: op % 4 == 3 resets, else one
 *     keel_backoff_next() with the random number `rand` (0, UINT64_MAX,
 *     or a spread of the byte).
 *   1 a budget: [kind % 3 (2: bad)][a][b][c] options from tables (TOKENS:
 *     max_milli, ratio_milli; PERCENT: percent, window, min_per_sec, with
 *     KEEL_BUDGET_NONE and values just past each limit), then operations
 *     [op]: % 8: 0 on_request, 1 success, 2 failure, 3, 4 try_retry,
 *     5 balance, 6 clock step by (op >> 3) tenths of a second, 7 by
 *     (op >> 3) windows / 8.
 *
 * Checks: init and create refuse exactly the bad options; every delay is
 * within its policy's bounds, with e = min(cap, base x 2^n): CONSTANT
 * base, EXPONENTIAL e, FULL_JITTER [0, e], EQUAL_JITTER [e/2, e] (e/2
 * rounded down), DECORRELATED [base, min(cap, max(base, 3 x previous))]
 * (the first previous is base) and never above the cap; a random number
 * 0 gives the low end, UINT64_MAX the high end; keel_backoff_delay() with
 * the same attempt, previous delay and random number is what next()
 * returned; reset starts over. TOKENS: the bucket starts at max, a
 * failure takes 1000 (never below 0), a success gives ratio (never above
 * max), a retry is allowed exactly while the bucket holds more than max /
 * 2 and takes nothing; PERCENT: each request deposits percent x 10
 * milli-tokens, a retry needs a balance of 1000 and withdraws it, both
 * expire with the tenth of the window they fell in ten tenths later, and
 * the reserve is min_per_sec x whole window-seconds x 1000; balance()
 * equals the model's at every step.
 */
#include <keel/backoff.h>

#include "fuzz.h"

#define SECOND_NS 1000000000ull

typedef unsigned __int128 u128;

static const uint64_t edge[] = {0, 1, 2, 3, 7, 1000, 1000000, 1000000000ull, 3000000000ull,
                                (uint64_t)1 << 40, (uint64_t)1 << 62, UINT64_MAX / 3,
                                UINT64_MAX / 2, UINT64_MAX - 1, UINT64_MAX, 123456789};

typedef struct rsrc {
    uint64_t v;
    unsigned calls;
} rsrc;

static uint64_t fixed_rand(void *ud)
{
    rsrc *r = ud;
    r->calls++;
    return r->v;
}

static uint64_t rand_of(uint8_t x)
{
    return x == 0 ? 0 : x == 255 ? UINT64_MAX : x * 0x9e3779b97f4a7c15ull;
}

/* ---- schedules ---- */

static uint64_t expo(uint64_t base, uint64_t cap, uint32_t n)
{
    if (base == 0)
        return 0;
    if (n >= 64)
        return cap;
    u128 e = (u128)base << n;
    return e > cap ? cap : (uint64_t)e;
}

static void schedules(const uint8_t *d, size_t size)
{
    if (size < 4)
        return;
    rsrc r = {0, 0}, r2 = {0, 0};
    keel_backoff_opts o = {(keel_backoff_policy)(d[1] % 6), edge[d[2] % 16], edge[d[3] % 16],
                           fixed_rand, &r};
    bool bad = o.policy > KEEL_BACKOFF_DECORRELATED || (o.cap_ns && o.cap_ns < o.base_ns);
    keel_backoff b;
    int rc = keel_backoff_init(&b, &o);
    KF_CHECK((rc == 0) == !bad, "policy %d base %llu cap %llu: init returned %d", (int)o.policy,
             (unsigned long long)o.base_ns, (unsigned long long)o.cap_ns, rc);
    KF_CHECK(keel_backoff_init(NULL, &o) == KEEL_EINVAL && keel_backoff_init(&b, NULL) == KEEL_EINVAL,
             "init with NULL");
    if (bad)
        return;
    rc = keel_backoff_init(&b, &o);
    uint64_t base = o.base_ns, cap = o.cap_ns ? o.cap_ns : UINT64_MAX;
    keel_backoff_opts o2 = o;
    o2.rand_ud = &r2;
    uint32_t n = 0;
    uint64_t prev = 0;
    for (size_t i = 4; i + 2 <= size; i += 2) {
        if (d[i] % 4 == 3) {
            keel_backoff_reset(&b);
            n = 0;
            prev = 0;
            continue;
        }
        r.v = r2.v = rand_of(d[i + 1]);
        uint64_t got = keel_backoff_next(&b);
        uint64_t again = keel_backoff_delay(&o2, n, prev);
        KF_CHECK(got == again, "attempt %u: next %llu, delay() %llu", n, (unsigned long long)got,
                 (unsigned long long)again);
        uint64_t e = expo(base, cap, n), lo = 0, hi = 0;
        switch (o.policy) {
        case KEEL_BACKOFF_CONSTANT:
            lo = hi = base;
            break;
        case KEEL_BACKOFF_EXPONENTIAL:
            lo = hi = e;
            break;
        case KEEL_BACKOFF_FULL_JITTER:
            lo = 0, hi = e;
            break;
        case KEEL_BACKOFF_EQUAL_JITTER:
            lo = e - e / 2, hi = e; /* ceil(e/2): e = 1 never gives 0 */
            break;
        default: { /* DECORRELATED */
            uint64_t p = prev ? prev : base;
            u128 h = (u128)p * 3;
            uint64_t h3 = h > UINT64_MAX ? UINT64_MAX : (uint64_t)h;
            lo = base < cap ? base : cap;
            hi = h3 > base ? h3 : base;
            hi = hi < cap ? hi : cap;
            break;
        }
        }
        KF_CHECK(got >= lo && got <= hi, "policy %d base %llu cap %llu attempt %u prev %llu: %llu not in [%llu, %llu]",
                 (int)o.policy, (unsigned long long)base, (unsigned long long)cap, n,
                 (unsigned long long)prev, (unsigned long long)got, (unsigned long long)lo,
                 (unsigned long long)hi);
        KF_CHECK(got <= cap, "over the cap");
        if (o.policy >= KEEL_BACKOFF_FULL_JITTER && r.v == 0)
            KF_CHECK(got == lo, "random 0 gives %llu, not the low end %llu", (unsigned long long)got,
                     (unsigned long long)lo);
        if (o.policy >= KEEL_BACKOFF_FULL_JITTER && r.v == UINT64_MAX)
            KF_CHECK(got == hi, "random max gives %llu, not the high end %llu", (unsigned long long)got,
                     (unsigned long long)hi);
        n++;
        prev = got;
    }
    KF_CHECK(keel_backoff_delay(NULL, 0, 0) == 0 && keel_backoff_next(NULL) == 0, "NULL");
    keel_backoff_reset(NULL);
}

/* ---- budgets ---- */

static const uint32_t max_t[] = {0, 999, 1000, 1001, 10000, 1000000, 1000001, 2500};
static const uint32_t ratio_t[] = {0, 1, 100, 999, 1000, 1001, 1000000, 1000001};
static const uint32_t pct_t[] = {0, 1, 20, 33, 1000, 1001, KEEL_BUDGET_NONE, 100};
static const uint64_t win_t[] = {0, 999999999, SECOND_NS, 1500000000, 10 * SECOND_NS,
                                 3600 * SECOND_NS, 3600 * SECOND_NS + 1, 2 * SECOND_NS + 7};
static const uint32_t mps_t[] = {0, 1, 10, 1000000, 1000001, KEEL_BUDGET_NONE, 2, 3};

typedef struct slot {
    uint64_t epoch;
    int64_t sum;
} slot;

typedef struct budget_model {
    int64_t tokens, max, ratio;                 /* TOKENS */
    int64_t deposit, reserve;                   /* PERCENT */
    uint64_t tenth;
    slot s[16];
    size_t ns;
} budget_model;

static uint64_t clock_now;

static uint64_t fake_clock(void *ud)
{
    (void)ud;
    return clock_now;
}

static int64_t pm_balance(budget_model *m)
{
    uint64_t epoch = clock_now / m->tenth;
    size_t k = 0;
    int64_t sum = m->reserve;
    for (size_t i = 0; i < m->ns; i++)
        if (m->s[i].epoch + 10 > epoch) { /* still inside the window */
            sum += m->s[i].sum;
            m->s[k++] = m->s[i];
        }
    m->ns = k;
    return sum;
}

static void pm_add(budget_model *m, int64_t amount)
{
    pm_balance(m); /* drops the expired tenths */
    uint64_t epoch = clock_now / m->tenth;
    if (m->ns && m->s[m->ns - 1].epoch == epoch) {
        m->s[m->ns - 1].sum += amount;
        return;
    }
    KF_CHECK(m->ns < 16, "model: more than ten tenths live");
    m->s[m->ns++] = (slot){epoch, amount};
}

static void budgets(const uint8_t *d, size_t size)
{
    if (size < 5)
        return;
    keel_retry_budget_opts o = {.kind = (keel_budget_kind)(d[1] % 3), .clock = fake_clock};
    budget_model m = {0};
    bool bad;
    if (o.kind == KEEL_BUDGET_TOKENS) {
        o.max_milli = max_t[d[2] % 8];
        o.ratio_milli = ratio_t[d[3] % 8];
        m.max = o.max_milli ? o.max_milli : 10000;
        m.ratio = o.ratio_milli ? o.ratio_milli : 100;
        m.tokens = m.max;
        bad = m.max < 1000 || m.max > 1000000 || m.ratio > m.max;
    } else {
        o.percent = pct_t[d[2] % 8];
        o.window_ns = win_t[d[3] % 8];
        o.min_per_sec = mps_t[d[4] % 8];
        uint64_t w = o.window_ns ? o.window_ns : 10 * SECOND_NS;
        int64_t pct = o.percent == KEEL_BUDGET_NONE ? 0 : o.percent ? o.percent : 20;
        int64_t mps = o.min_per_sec == KEEL_BUDGET_NONE ? 0 : o.min_per_sec ? o.min_per_sec : 10;
        m.deposit = pct * 10; /* pct% of 1000 milli-tokens */
        m.reserve = mps * 1000 * (int64_t)(w / SECOND_NS);
        m.tenth = w / 10;
        bad = o.kind > KEEL_BUDGET_PERCENT || w < SECOND_NS || w > 3600 * SECOND_NS || pct > 1000 ||
              mps > 1000000;
    }
    clock_now = 5 * SECOND_NS;
    keel_retry_budget *b = NULL;
    int rc = keel_retry_budget_create(&b, &o);
    KF_CHECK((rc == 0) == !bad, "kind %d, %u/%u/%u/%u/%llu: create returned %d", (int)o.kind,
             o.max_milli, o.ratio_milli, o.percent, o.min_per_sec, (unsigned long long)o.window_ns, rc);
    if (rc)
        return;
    bool tokens = o.kind == KEEL_BUDGET_TOKENS;
    for (size_t i = 5; i < size; i++) {
        uint8_t op = d[i];
        switch (op % 8) {
        case 0:
            keel_retry_budget_on_request(b);
            if (!tokens && m.deposit)
                pm_add(&m, m.deposit);
            break;
        case 1:
        case 2:
            keel_retry_budget_on_result(b, op % 8 == 1);
            if (tokens) {
                m.tokens += op % 8 == 1 ? m.ratio : -1000;
                m.tokens = m.tokens > m.max ? m.max : m.tokens < 0 ? 0 : m.tokens;
            }
            break;
        case 3:
        case 4: {
            rc = keel_retry_budget_try_retry(b);
            bool allow = tokens ? m.tokens > m.max / 2 : pm_balance(&m) >= 1000;
            KF_CHECK(rc == (allow ? 0 : KEEL_ELIMIT), "try_retry %d, model %s (tokens %lld)", rc,
                     allow ? "allows" : "refuses", (long long)(tokens ? m.tokens : pm_balance(&m)));
            if (allow && !tokens)
                pm_add(&m, -1000);
            break;
        }
        case 5:
            break;
        case 6:
            clock_now += (op >> 3) * (SECOND_NS / 10);
            break;
        default:
            clock_now += (op >> 3) * (tokens ? SECOND_NS : m.tenth * 10 / 8);
            break;
        }
        int64_t bal = keel_retry_budget_balance(b), want = tokens ? m.tokens : pm_balance(&m);
        KF_CHECK(bal == want, "op %d: balance %lld, model %lld", op % 8, (long long)bal, (long long)want);
    }
    KF_CHECK(keel_retry_budget_try_retry(NULL) == KEEL_EINVAL && keel_retry_budget_balance(NULL) == 0,
             "NULL budget");
    keel_retry_budget_destroy(b);
}

int LLVMFuzzerTestOneInput(const uint8_t *d, size_t size)
{
    if (size < 1)
        return 0;
    if (d[0] % 2 == 0)
        schedules(d, size);
    else
        budgets(d, size);
    return 0;
}
