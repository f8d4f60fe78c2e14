/* tests/fuzz/fuzz_breaker.c — keel_breaker under a sequence of acquires,
 * results, releases, clock steps and forced states, against a model of the
 * state machine breaker.h and keel_breaker(3) describe.
 *
 * Input: ten bytes of options, then operations [op][arg].
 *   [0] window % 3: COUNT, TIME, 2 (unknown: bad).
 *   [1] window_size: 255 over the limit (bad), 254 the largest (TIME only;
 *       a count window of 1,000,000 is too slow to clear), else % 12
 *       (0: the default).
 *   [2] minimum_calls % 8 (0: 100, clamped to a count window).
 *   [3] failure_rate % 102, [4] slow_call_rate % 102 (101: bad).
 *   [5] slow_call_ns: % 8 tenths of a second (0: 60 s).
 *   [6] permitted_in_half_open: 255: 8192 (bad), 254: 8191, else % 6.
 *   [7] wait_open_ns: % 8 seconds (0: 60 s).
 *   [8] bit 0 an open_backoff: policy (bits 1-3) % 6 (5: bad), base
 *       (bits 4-5) seconds (0: bad), cap (bits 6-7) x base (0: bad; 3:
 *       base - 1, below base: bad).
 *   [9] max_half_open_ns: % 4 seconds (0: none).
 * op % 8: 0 try_acquire; 1 a success, 2 a failure for a permit held (arg:
 *   the duration); 3 release a permit held; 4 clock step by arg x 37 ms
 *   (x 1 s with bit 7); 5 to the end of the open wait or the half-open
 *   limit, or one ns before (arg & 1); 6 force state arg % 6 (5: bad);
 *   7 a whole call: try_acquire, then its result (failed: arg & 1).
 *
 * Checks: create refuses exactly the bad options; after every operation
 * the state, the answer of try_acquire, the window counts, the totals, the
 * open count and the on_state calls (from, to, in order) equal the
 * model's: CLOSED trips only once the window holds minimum_calls and a
 * rate is at or above its threshold; OPEN refuses until its wait (the
 * backoff's n-th delay) ends, then the first try_acquire goes HALF_OPEN;
 * HALF_OPEN lets exactly the permitted trials through, releases give
 * them back, and the first result that brings the trial results to
 * min(minimum_calls, permitted) decides; DISABLED passes and
 * records nothing, FORCED_OPEN refuses everything.
 */
#include <keel/breaker.h>

#include "fuzz.h"

#define SECOND_NS 1000000000ull
#define MS 1000000ull
#define MAX_WIN 3600
#define MAX_LOG 8

typedef struct model {
    keel_breaker_state state;
    uint64_t until; /* OPEN: end of the wait; HALF_OPEN: give-up time */
    uint32_t permits, tcalls, tfailed, tslow; /* HALF_OPEN */
    /* the window */
    uint8_t ring[MAX_WIN]; /* COUNT: outcomes, bit 0 failed, bit 1 slow */
    uint64_t pos;
    uint64_t bsec[MAX_WIN]; /* TIME: second + 1 of each bucket, 0 none */
    uint32_t bcalls[MAX_WIN], bfailed[MAX_WIN], bslow[MAX_WIN];
    uint64_t wcalls, wfailed, wslow; /* as of the last result */
    uint64_t failed, slow, rejected, transitions;
    uint32_t open_count;
    uint64_t prev_wait;
    uint64_t rand_i;
} model;

typedef struct state {
    const uint8_t *d;
    size_t size;
    uint64_t now, rand_i;
    keel_breaker *b;
    /* effective options */
    keel_breaker_window kind;
    uint32_t wsize, min_calls, fr, sr, permitted, half_min;
    uint64_t slow_ns, wait_ns, mho_ns;
    bool has_backoff;
    keel_backoff_opts bo, model_bo;
    model m;
    /* on_state calls, and the model's, in this operation */
    keel_breaker_state got[MAX_LOG][2], want[MAX_LOG][2];
    size_t ngot, nwant;
    size_t held; /* permits taken and not yet settled */
} state;

static uint64_t rand_at(const state *st, uint64_t i)
{
    uint64_t v = st->d[i % st->size];
    if (v == 0)
        return 0;
    if (v == 255)
        return UINT64_MAX;
    return (v * 0x9e3779b97f4a7c15ull) ^ (i * 0xbf58476d1ce4e5b9ull);
}

static uint64_t lib_rand(void *ud)
{
    state *st = ud;
    return rand_at(st, st->rand_i++);
}

static uint64_t model_rand(void *ud)
{
    state *st = ud;
    return rand_at(st, st->m.rand_i++);
}

static void on_state(keel_breaker *b, keel_breaker_state from, keel_breaker_state to, void *ud)
{
    state *st = ud;
    KF_CHECK(b == st->b, "on_state for another breaker");
    KF_CHECK(keel_breaker_state_get(b) == to, "on_state to %d, state_get %d", (int)to,
             (int)keel_breaker_state_get(b));
    KF_CHECK(st->ngot < MAX_LOG, "too many transitions in one operation");
    st->got[st->ngot][0] = from;
    st->got[st->ngot++][1] = to;
}

/* ---- the model ---- */

static void m_clear(state *st)
{
    model *m = &st->m;
    memset(m->ring, 0, sizeof m->ring);
    memset(m->bsec, 0, sizeof m->bsec);
    m->pos = 0;
    m->wcalls = m->wfailed = m->wslow = 0;
}

static uint64_t sat_add(uint64_t a, uint64_t b) { return a > UINT64_MAX - b ? UINT64_MAX : a + b; }

static void m_to(state *st, keel_breaker_state to)
{
    model *m = &st->m;
    KF_CHECK(st->nwant < MAX_LOG, "model: too many transitions");
    st->want[st->nwant][0] = m->state;
    st->want[st->nwant++][1] = to;
    m->until = UINT64_MAX;
    m->permits = 0;
    switch (to) {
    case KEEL_BREAKER_OPEN: {
        /* the n-th consecutive opening waits the schedule's delay n - 1 */
        uint64_t wait = st->has_backoff ? keel_backoff_delay(&st->model_bo, m->open_count, m->prev_wait)
                                        : st->wait_ns;
        m->open_count++;
        m->prev_wait = wait;
        m->until = sat_add(st->now, wait);
        break;
    }
    case KEEL_BREAKER_HALF_OPEN:
        m->permits = st->permitted;
        m->tcalls = m->tfailed = m->tslow = 0;
        if (st->mho_ns)
            m->until = sat_add(st->now, st->mho_ns);
        break;
    case KEEL_BREAKER_CLOSED:
        m_clear(st);
        m->open_count = 0;
        m->prev_wait = 0;
        break;
    default:
        break;
    }
    m->state = to;
    m->transitions++;
}

static bool over(const state *st, uint64_t calls, uint64_t failed, uint64_t slow)
{
    /* "at or above": failed / calls >= fr / 100, exactly */
    return failed * 100 >= (uint64_t)st->fr * calls || slow * 100 >= (uint64_t)st->sr * calls;
}

static int m_acquire(state *st)
{
    model *m = &st->m;
    for (;;) {
        switch (m->state) {
        case KEEL_BREAKER_CLOSED:
        case KEEL_BREAKER_DISABLED:
            return 0;
        case KEEL_BREAKER_FORCED_OPEN:
            m->rejected++;
            return KEEL_EUNAVAIL;
        case KEEL_BREAKER_OPEN:
            if (st->now < m->until) {
                m->rejected++;
                return KEEL_EUNAVAIL;
            }
            m_to(st, KEEL_BREAKER_HALF_OPEN);
            continue;
        default: /* HALF_OPEN */
            if (st->now >= m->until) {
                m_to(st, KEEL_BREAKER_OPEN);
                continue;
            }
            if (m->permits == 0) {
                m->rejected++;
                return KEEL_EUNAVAIL;
            }
            m->permits--;
            return 0;
        }
    }
}

static void m_window_record(state *st, bool failed, bool slow)
{
    model *m = &st->m;
    if (st->kind == KEEL_BREAKER_COUNT) {
        m->ring[m->pos++ % st->wsize] = (uint8_t)(failed | slow << 1);
        uint64_t n = m->pos < st->wsize ? m->pos : st->wsize;
        m->wcalls = n;
        m->wfailed = m->wslow = 0;
        for (uint64_t i = 0; i < n; i++) {
            m->wfailed += m->ring[i] & 1;
            m->wslow += m->ring[i] >> 1 & 1;
        }
        return;
    }
    uint64_t sec1 = st->now / SECOND_NS + 1;
    size_t k = (size_t)((sec1 - 1) % st->wsize);
    if (m->bsec[k] != sec1) {
        m->bsec[k] = sec1;
        m->bcalls[k] = m->bfailed[k] = m->bslow[k] = 0;
    }
    m->bcalls[k]++;
    m->bfailed[k] += failed;
    m->bslow[k] += slow;
    m->wcalls = m->wfailed = m->wslow = 0;
    for (size_t i = 0; i < st->wsize; i++)
        if (m->bsec[i] && m->bsec[i] + st->wsize > sec1) { /* the last wsize seconds */
            m->wcalls += m->bcalls[i];
            m->wfailed += m->bfailed[i];
            m->wslow += m->bslow[i];
        }
}

static void m_result(state *st, uint64_t dur, bool failed)
{
    model *m = &st->m;
    if (m->state != KEEL_BREAKER_CLOSED && m->state != KEEL_BREAKER_HALF_OPEN)
        return;
    bool slow = dur > st->slow_ns; /* resilience4j: strictly longer */
    m->failed += failed;
    m->slow += slow;
    if (m->state == KEEL_BREAKER_HALF_OPEN) {
        if (m->tcalls >= st->permitted)
            return;
        m->tcalls++;
        m->tfailed += failed;
        m->tslow += slow;
        if (m->tcalls >= st->half_min)
            m_to(st, over(st, m->tcalls, m->tfailed, m->tslow) ? KEEL_BREAKER_OPEN
                                                                 : KEEL_BREAKER_CLOSED);
        return;
    }
    m_window_record(st, failed, slow);
    if (m->wcalls >= st->min_calls && over(st, m->wcalls, m->wfailed, m->wslow))
        m_to(st, KEEL_BREAKER_OPEN);
}

static void m_release(state *st)
{
    if (st->m.state == KEEL_BREAKER_HALF_OPEN && st->m.permits < st->permitted)
        st->m.permits++;
}

/* ---- comparing ---- */

static void compare(state *st, const char *op)
{
    const model *m = &st->m;
    KF_CHECK(st->ngot == st->nwant, "%s: %zu on_state calls, model %zu", op, st->ngot, st->nwant);
    for (size_t i = 0; i < st->ngot; i++)
        KF_CHECK(st->got[i][0] == st->want[i][0] && st->got[i][1] == st->want[i][1],
                 "%s: on_state %s -> %s, model %s -> %s", op, keel_breaker_state_name(st->got[i][0]),
                 keel_breaker_state_name(st->got[i][1]), keel_breaker_state_name(st->want[i][0]),
                 keel_breaker_state_name(st->want[i][1]));
    st->ngot = st->nwant = 0;
    keel_breaker_stats s;
    keel_breaker_stats_get(st->b, &s);
    KF_CHECK(s.state == m->state && keel_breaker_state_get(st->b) == m->state, "%s: state %s, model %s",
             op, keel_breaker_state_name(s.state), keel_breaker_state_name(m->state));
    uint64_t wc = m->wcalls, wf = m->wfailed, ws = m->wslow;
    if (m->state == KEEL_BREAKER_HALF_OPEN)
        wc = m->tcalls, wf = m->tfailed, ws = m->tslow;
    KF_CHECK(s.window_calls == wc && s.window_failed == wf && s.window_slow == ws,
             "%s: window %u/%u/%u, model %llu/%llu/%llu", op, s.window_calls, s.window_failed,
             s.window_slow, (unsigned long long)wc, (unsigned long long)wf, (unsigned long long)ws);
    KF_CHECK(s.failed == m->failed && s.slow == m->slow && s.rejected == m->rejected &&
                 s.transitions == m->transitions && s.open_count == m->open_count,
             "%s: totals %llu/%llu/%llu/%llu/%u, model %llu/%llu/%llu/%llu/%u", op,
             (unsigned long long)s.failed, (unsigned long long)s.slow, (unsigned long long)s.rejected,
             (unsigned long long)s.transitions, s.open_count, (unsigned long long)m->failed,
             (unsigned long long)m->slow, (unsigned long long)m->rejected,
             (unsigned long long)m->transitions, m->open_count);
}

/* ---- create ---- */

static bool breaker_create(state *st)
{
    const uint8_t *d = st->d;
    keel_breaker_opts o = {.window = (keel_breaker_window)(d[0] % 3), .on_state = on_state, .ud = st};
    bool count = o.window == KEEL_BREAKER_COUNT;
    o.window_size = d[1] == 255 ? (count ? 1000001u : 3601u) : d[1] == 254 && !count ? 3600u : d[1] % 12u;
    o.minimum_calls = d[2] % 8u;
    o.failure_rate = d[3] % 102u;
    o.slow_call_rate = d[4] % 102u;
    o.slow_call_ns = (d[5] % 8u) * 100 * MS;
    o.permitted_in_half_open = d[6] == 255 ? 8192u : d[6] == 254 ? 8191u : d[6] % 6u;
    o.wait_open_ns = (d[7] % 8u) * SECOND_NS;
    o.max_half_open_ns = (d[9] % 4u) * SECOND_NS;
    keel_backoff_opts bo = {.policy = (keel_backoff_policy)((d[8] >> 1 & 7) % 6),
                            .base_ns = (d[8] >> 4 & 3) * SECOND_NS, .rand = lib_rand, .rand_ud = st};
    unsigned capx = d[8] >> 6;
    bo.cap_ns = capx == 3 ? (bo.base_ns ? bo.base_ns - 1 : 0) : capx * bo.base_ns;
    if (d[8] & 1)
        o.open_backoff = &bo;
    /* breaker.h: "Needs a base and a cap (> 0)"; a cap below the base is
     * refused as keel_backoff_init() refuses it */
    bool bad_backoff = o.open_backoff && (bo.policy > KEEL_BACKOFF_DECORRELATED || !bo.base_ns ||
                                          !bo.cap_ns || bo.cap_ns < bo.base_ns);
    bool bad = o.window > KEEL_BREAKER_TIME || o.window_size > (count ? 1000000u : 3600u) ||
               o.failure_rate > 100 || o.slow_call_rate > 100 || o.permitted_in_half_open > 8191 ||
               bad_backoff;
    keel_breaker *b = NULL;
    int rc = keel_breaker_create(&b, &o);
    KF_CHECK((rc == 0) == !bad, "window %d size %u rates %u/%u permits %u backoff %d: create returned %d",
             (int)o.window, o.window_size, o.failure_rate, o.slow_call_rate, o.permitted_in_half_open,
             (d[8] & 1) ? (int)bo.policy : -1, rc);
    if (rc)
        return false;
    st->b = b;
    st->kind = o.window;
    st->wsize = o.window_size ? o.window_size : count ? 100 : 60;
    st->min_calls = o.minimum_calls ? o.minimum_calls : 100;
    if (count && st->min_calls > st->wsize)
        st->min_calls = st->wsize;
    st->fr = o.failure_rate ? o.failure_rate : 50;
    st->sr = o.slow_call_rate ? o.slow_call_rate : 100;
    st->permitted = o.permitted_in_half_open ? o.permitted_in_half_open : 10;
    /* resilience4j: min(minimum_calls, permitted), the option unclamped */
    st->half_min = o.minimum_calls ? o.minimum_calls : 100;
    if (st->half_min > st->permitted)
        st->half_min = st->permitted;
    st->slow_ns = o.slow_call_ns ? o.slow_call_ns : 60 * SECOND_NS;
    st->wait_ns = o.wait_open_ns ? o.wait_open_ns : 60 * SECOND_NS;
    st->mho_ns = o.max_half_open_ns;
    st->has_backoff = o.open_backoff != NULL;
    st->bo = bo; /* copied at create: changing ours must not matter */
    st->model_bo = bo;
    st->model_bo.rand = model_rand;
    bo.base_ns = bo.cap_ns = 12345;
    st->m.state = KEEL_BREAKER_CLOSED;
    st->m.until = UINT64_MAX;
    return true;
}

static uint64_t duration_of(const state *st, uint8_t arg)
{
    switch (arg >> 6) {
    case 0: return st->slow_ns - 1;
    case 1: return st->slow_ns;
    case 2: return (arg & 63) * 10 * MS;
    default: return (arg & 1) ? UINT64_MAX : 0;
    }
}

static void op_result(state *st, uint8_t arg, bool failed)
{
    if (!st->held)
        return;
    st->held--;
    uint64_t dur = duration_of(st, arg);
    keel_breaker_on_result(st->b, st->now, dur, failed);
    m_result(st, dur, failed);
}

static void op_acquire(state *st)
{
    int rc = keel_breaker_try_acquire(st->b, st->now);
    keel_breaker_state before = st->m.state;
    int want = m_acquire(st);
    KF_CHECK(rc == want, "try_acquire in %s at %llu (until %llu): %d, model %d",
             keel_breaker_state_name(before), (unsigned long long)st->now,
             (unsigned long long)st->m.until, rc, want);
    if (rc == 0)
        st->held++;
}

int LLVMFuzzerTestOneInput(const uint8_t *d, size_t size)
{
    if (size < 10)
        return 0;
    state *st = kf_calloc(sizeof *st);
    st->d = d;
    st->size = size;
    st->now = 1000 * SECOND_NS;
    if (!breaker_create(st)) {
        free(st);
        return 0;
    }
    compare(st, "create");
    for (size_t i = 10; i + 2 <= size; i += 2) {
        uint8_t op = d[i] % 8, arg = d[i + 1];
        switch (op) {
        case 0:
            op_acquire(st);
            break;
        case 1:
        case 2:
            op_result(st, arg, op == 2);
            break;
        case 3:
            if (st->held) {
                st->held--;
                keel_breaker_release(st->b);
                m_release(st);
            }
            break;
        case 4:
            st->now += (arg & 0x80) ? (arg & 0x7f) * SECOND_NS : arg * 37 * MS;
            break;
        case 5:
            if (st->m.until != UINT64_MAX && st->m.until - (arg & 1) > st->now)
                st->now = st->m.until - (arg & 1);
            break;
        case 6: {
            keel_breaker_state to = (keel_breaker_state)(arg % 6);
            int rc = keel_breaker_force(st->b, to, st->now);
            KF_CHECK(rc == (to > KEEL_BREAKER_FORCED_OPEN ? KEEL_EINVAL : 0), "force %d: %d", (int)to, rc);
            if (rc == 0)
                m_to(st, to);
            break;
        }
        default: {
            size_t held = st->held;
            op_acquire(st);
            if (st->held > held)
                op_result(st, arg, arg & 1);
            break;
        }
        }
        compare(st, op == 0 ? "try_acquire" : op <= 2 ? "on_result" : op == 3 ? "release" :
                    op <= 5 ? "clock" : op == 6 ? "force" : "call");
    }
    while (st->held--)
        keel_breaker_release(st->b);
    KF_CHECK(strcmp(keel_breaker_state_name((keel_breaker_state)99), "unknown") == 0, "state name");
    KF_CHECK(keel_breaker_try_acquire(NULL, 0) == KEEL_EINVAL, "try_acquire(NULL)");
    KF_CHECK(keel_breaker_force(NULL, KEEL_BREAKER_OPEN, 0) == KEEL_EINVAL, "force(NULL)");
    keel_breaker_destroy(st->b);
    free(st);
    return 0;
}
