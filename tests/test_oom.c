/* tests/test_oom.c — out-of-memory sweeps, as SQLite does them: each
 * in-process scenario runs again and again with the 1st, 2nd, 3rd...
 * allocation failing, until a run gets through without reaching the
 * failing one; then once more with every later allocation of the failing
 * call failing too. Every run must not crash; the call that met the
 * failure must say so (KEEL_ENOMEM, or what its page documents); the
 * handles must still work (the call is made again, and must succeed,
 * since the failure is over by then); and once everything is destroyed,
 * nothing the run allocated may be left. Threads of the modules allocate
 * too, and meet failures: what they accept must still arrive. Last, a
 * thread's first lock-free read, which allocates, fails. The allocator
 * and the sweep are tests/oom.c's, which tests/test_oom_servers.c shares
 * for the paths that need the servers. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <keel/alert.h>
#include <keel/batch.h>
#include <keel/breaker.h>
#include <keel/bus.h>
#include <keel/cache.h>
#include <keel/cqrs.h>
#include <keel/lb.h>
#include <keel/limiter.h>
#include <keel/metrics.h>
#include <keel/pool.h>
#include <keel/ring.h>

#include "harness.h"
#include "oom.h"
#include "rcu.h"

/* ---- metrics, as the modules report them ---- */

typedef struct series_count {
    const char *name;
    size_t n;
} series_count;

static void count_series(const keel_metrics_sample *smp, void *ud)
{
    series_count *c = ud;
    c->n += strcmp(smp->name, c->name) == 0;
}

/* How many series a family has now (visiting may meet the failure too). */
static size_t series(keel_metrics *m, const char *family)
{
    series_count c = {family, 0};
    CALL(0, (c.n = 0, keel_metrics_visit(m, count_series, &c)));
    return c.n;
}

/* ---- keel_pool ---- */

static atomic_int inits, finis;
static int count_init(void *obj, void *ud)
{
    (void)obj, (void)ud;
    atomic_fetch_add(&inits, 1);
    return 0;
}
static void count_fini(void *obj, void *ud)
{
    (void)obj, (void)ud;
    atomic_fetch_add(&finis, 1);
}

/* Acquires and releases more objects than a magazine holds, so that
 * magazines go to the depot and slabs are added. */
static void *pool_churn(void *arg)
{
    keel_pool *p = arg;
    void *objs[40];
    for (int i = 0; i < 40; i++)
        CALL_COPES(0, keel_pool_acquire_timeout(p, 0, &objs[i]));
    for (int i = 0; i < 40; i++)
        ck_assert_int_eq(keel_pool_release(p, objs[i]), 0);
    return NULL;
}

/* A bounded pool in debug mode, with its statistics in a registry: the
 * other paths. */
static void pool_debug_scenario(void)
{
    keel_metrics *m = registry(true);
    keel_pool *p = NULL;
    keel_pool_opts o = {.obj_size = 100, .capacity = 6, .prealloc = 2, .debug = 1,
                        .init = count_init, .fini = count_fini, .metrics = m};
    CALL(0, keel_pool_create(&p, &o));
    void *objs[6];
    for (int i = 0; i < 6; i++)
        CALL(0, keel_pool_acquire_timeout(p, 0, &objs[i]));
    void *none;
    CALL(KEEL_ETIMEDOUT, keel_pool_acquire_timeout(p, 0, &none));
    ck_assert_int_eq(keel_pool_discard(p, objs[5]), 0);
    CALL(0, keel_pool_acquire_timeout(p, 0, &objs[5])); /* the discarded one's room */
    for (int i = 0; i < 6; i++)
        ck_assert_int_eq(keel_pool_release(p, objs[i]), 0);
    /* (a release without memory for a magazine finalises its object) */
    keel_pool_trim(p);
    keel_pool_stats st;
    keel_pool_stats_get(p, &st);
    oom_assert(st.created == 0 && st.live == 0, "%llu objects left after trim, %llu out",
               (unsigned long long)st.created, (unsigned long long)st.live);
    keel_pool_destroy(p);
    keel_metrics_destroy(m);
}

static void pool_scenario(void)
{
    atomic_store(&inits, 0);
    atomic_store(&finis, 0);
    pool_debug_scenario();
    keel_pool *p = NULL;
    keel_pool_opts o = {.obj_size = 48, .prealloc = 20, .magazine_size = 8,
                        .init = count_init, .fini = count_fini};
    CALL(0, keel_pool_create(&p, &o));
    void *obj;
    CALL_COPES(0, PTR_RC(obj, keel_pool_acquire(p)));
    ck_assert_int_eq(keel_pool_release(p, obj), 0);
    pool_churn(p);
    /* another thread's magazines, handed back when it exits */
    pthread_t t;
    ck_assert_int_eq(pthread_create(&t, NULL, pool_churn, p), 0);
    ck_assert_int_eq(pthread_join(t, NULL), 0);
    keel_pool_destroy(p);
    oom_assert(atomic_load(&inits) == atomic_load(&finis), "%d objects initialised, %d finalised",
               atomic_load(&inits), atomic_load(&finis));
}

START_TEST(a_pool_survives_every_failed_allocation)
{
    sweep("pool", pool_scenario);
}
END_TEST

/* ---- keel_ring ---- */

static void count_node(const keel_ring_node *node, double share, void *ud)
{
    (void)node, (void)share;
    ++*(size_t *)ud;
}

static void ring_scenario_algo(keel_ring_algo algo, keel_metrics *m)
{
    keel_ring *r = NULL;
    keel_ring_opts o = {.algo = algo, .points_per_weight = 8, .maglev_size = 101, .metrics = m};
    CALL(0, keel_ring_create(&r, &o));
    static const char *const names[] = {"alpha", "beta", "gamma", "delta"};
    for (size_t i = 0; i < 3; i++) /* a failed add leaves the ring as it was */
        CALL_THEN(0, keel_ring_add(r, names[i], strlen(names[i]), (uint32_t)(i + 1), (void *)names[i]),
                  oom_assert(keel_ring_count(r) == i, "%zu nodes after a failed add", keel_ring_count(r)));
    keel_ring_node_spec more[] = {{"delta", 5, 2, (void *)names[3]}, {"eps", 3, 1, NULL}};
    CALL_THEN(0, keel_ring_add_many(r, more, 2),
              oom_assert(keel_ring_count(r) == 3, "%zu nodes after a failed add", keel_ring_count(r)));
    oom_assert(keel_ring_count(r) == 5, "%zu nodes, not 5", keel_ring_count(r));
    keel_ring_node nd, set[3];
    size_t found;
    CALL(0, keel_ring_lookup(r, "key", 3, &nd));
    CALL(0, keel_ring_lookup_n(r, "key", 3, 3, set, &found));
    oom_assert(found == 3, "%zu replicas, not 3", found);
    CALL(0, keel_ring_assign(r, "key", 3, &nd));
    CALL(0, keel_ring_unassign(r, &nd));
    size_t visited;
    CALL(0, (visited = 0, keel_ring_nodes(r, count_node, &visited)));
    oom_assert(visited == 5, "visited %zu nodes", visited);
    CALL_THEN(0, keel_ring_remove(r, "eps", 3),
              oom_assert(keel_ring_count(r) == 5, "%zu nodes after a failed remove", keel_ring_count(r)));
    if (algo != KEEL_RING_JUMP) /* jump removes only the node added last */
        CALL(0, keel_ring_remove(r, "beta", 4));
    CALL(0, keel_ring_add(r, "eps", 3, 3, NULL));
    CALL(0, keel_ring_lookup(r, "other key", 9, &nd));
    oom_assert(keel_ring_count(r) == (algo == KEEL_RING_JUMP ? 5u : 4u), "%zu nodes at the end",
               keel_ring_count(r));
    keel_ring_destroy(r);
}

static void ring_scenario(void)
{
    keel_metrics *m = registry(true);
    for (keel_ring_algo a = KEEL_RING_CONTINUUM; a <= KEEL_RING_MAGLEV; a++)
        ring_scenario_algo(a, a == KEEL_RING_MAGLEV ? m : NULL); /* one reports its gauges */
    keel_metrics_destroy(m);
}

START_TEST(a_ring_survives_every_failed_allocation)
{
    sweep("ring", ring_scenario);
}
END_TEST

/* ---- keel_lb ---- */

static uint64_t fixed_clock(void *ud) { return *(uint64_t *)ud; }

/* A failed add or remove leaves the peers, and their series, as they were. */
static void lb_unchanged(keel_lb *lb, keel_metrics *m, size_t peers)
{
    oom_assert(keel_lb_count(lb) == peers, "%zu peers, not %zu", keel_lb_count(lb), peers);
    if (m)
        oom_assert(series(m, "keel_lb_peer_in_flight") == peers, "%zu peers in the registry, not %zu",
                   series(m, "keel_lb_peer_in_flight"), peers);
}

static void lb_scenario_policy(keel_lb_policy policy, keel_metrics *m)
{
    static uint64_t now = 1000000000;
    keel_lb *lb = NULL;
    keel_lb_opts o = {.policy = policy, .eject_consecutive = 2, .clock = fixed_clock, .clock_ud = &now,
                      .metrics = m, .metrics_name = "up"};
    CALL(0, keel_lb_create(&lb, &o));
    keel_lb_peer *peers[4];
    static const char *const names[] = {"a", "b", "c", "d"};
    for (int i = 0; i < 4; i++) {
        keel_lb_peer_opts po = {.name = names[i], .weight = (uint32_t)(i + 1),
                                .flags = i == 3 ? KEEL_LB_BACKUP : 0};
        CALL_THEN(0, keel_lb_add(lb, &po, &peers[i]), lb_unchanged(lb, m, (size_t)i));
    }
    for (int i = 0; i < 8; i++) {
        keel_lb_tried tried = {0};
        keel_lb_peer *p;
        CALL(0, keel_lb_pick(lb, &tried, &p));
        CALL(0, keel_lb_done(lb, p, i % 3 != 0, 1000));
    }
    CALL_THEN(0, keel_lb_set_down(lb, peers[0], 1), lb_unchanged(lb, m, 4));
    CALL_THEN(0, keel_lb_remove(lb, peers[1]), lb_unchanged(lb, m, 4));
    keel_lb_peer *p;
    CALL(0, keel_lb_pick(lb, NULL, &p));
    oom_assert(p != peers[0] && p != peers[1], "picked %s", keel_lb_peer_name(p));
    CALL(0, keel_lb_done(lb, p, 1, 1000));
    lb_unchanged(lb, m, 3);
    keel_lb_destroy(lb);
}

static void lb_scenario_with(bool with_metrics)
{
    keel_metrics *m = registry(with_metrics);
    for (keel_lb_policy pol = KEEL_LB_ROUND_ROBIN; pol <= KEEL_LB_PEAK_EWMA; pol++)
        lb_scenario_policy(pol, m);
    keel_metrics_destroy(m);
}

static void lb_scenario(void) { lb_scenario_with(false); }
static void lb_metrics_scenario(void) { lb_scenario_with(true); }

START_TEST(an_lb_survives_every_failed_allocation)
{
    sweep("lb", lb_scenario);
    sweep("lb with metrics", lb_metrics_scenario);
}
END_TEST

/* ---- keel_breaker ---- */

static void breaker_scenario_window(keel_breaker_window w, keel_metrics *m)
{
    keel_breaker *b = NULL;
    keel_breaker_opts o = {.window = w, .window_size = 10, .minimum_calls = 4, .wait_open_ns = 1000,
                           .permitted_in_half_open = 2, .metrics = m,
                           .metrics_name = w == KEEL_BREAKER_COUNT ? "count" : "time"};
    CALL(0, keel_breaker_create(&b, &o));
    uint64_t now = 1;
    for (int i = 0; i < 4; i++, now += 10) {
        CALL(0, keel_breaker_try_acquire(b, now));
        keel_breaker_on_result(b, now, 5, 1);
    }
    oom_assert(keel_breaker_state_get(b) == KEEL_BREAKER_OPEN, "not open after 4 failures");
    CALL(KEEL_EUNAVAIL, keel_breaker_try_acquire(b, now));
    now += 2000;
    for (int i = 0; i < 2; i++) {
        CALL(0, keel_breaker_try_acquire(b, now));
        keel_breaker_on_result(b, now, 5, 0);
    }
    oom_assert(keel_breaker_state_get(b) == KEEL_BREAKER_CLOSED, "not closed after the trials");
    CALL(0, keel_breaker_force(b, KEEL_BREAKER_FORCED_OPEN, now));
    if (m)
        oom_assert(series(m, "keel_breaker_state") == 5, "%zu state series, not 5",
                   series(m, "keel_breaker_state"));
    keel_breaker_destroy(b);
}

static void breaker_scenario(void)
{
    keel_metrics *m = registry(true);
    breaker_scenario_window(KEEL_BREAKER_COUNT, m);
    breaker_scenario_window(KEEL_BREAKER_TIME, m);
    keel_metrics_destroy(m);
}

START_TEST(a_breaker_survives_every_failed_allocation)
{
    sweep("breaker", breaker_scenario);
}
END_TEST

/* ---- keel_metrics ---- */

typedef struct hot {
    keel_counter_child *c;
    keel_histogram_child *h;
    int lost; /* updates that met the failure: the thread's first, which
                 allocates its slots, is then dropped */
} hot;

static void *hot_path(void *arg)
{
    hot *x = arg;
    for (int i = 0; i < 3; i++) {
        long seen = failures_here;
        keel_counter_inc(x->c);
        x->lost += failures_here != seen;
    }
    keel_histogram_observe(x->h, 0.2); /* allocates nothing: the counter made the chunk */
    return NULL;
}

typedef struct sample_sum {
    const char *name, *label;
    double value;
} sample_sum;

static void sum_series(const keel_metrics_sample *smp, void *ud)
{
    sample_sum *x = ud;
    if (strcmp(smp->name, x->name) == 0 && (!smp->nlabels || strcmp(smp->label_values[0], x->label) == 0))
        x->value += smp->type == KEEL_METRIC_HISTOGRAM ? (double)smp->count : smp->value;
}

static double value_of(keel_metrics *m, const char *family, const char *label)
{
    sample_sum x = {family, label, 0};
    CALL(0, (x.value = 0, keel_metrics_visit(m, sum_series, &x)));
    return x.value;
}

static int discard(const char *buf, size_t len, void *ud)
{
    *(size_t *)ud += len;
    (void)buf;
    return 0;
}

static double forty_two(void *ud) { return (void)ud, 42; }
static uint64_t epoch(void *ud) { return (void)ud, 1700000000000000000ull; }

static void metrics_scenario(void)
{
    keel_metrics *m = NULL;
    keel_metrics_opts mo = {.wall_clock = epoch};
    CALL(0, keel_metrics_create(&m, &mo));
    keel_counter *req;
    keel_gauge *g;
    keel_histogram *lat;
    static const char *const two[] = {"method", "code"};
    static const double bounds[] = {0.1, 0.5, 1};
    CALL_THEN(0, keel_metrics_counter(m, "http_requests_total", "Requests.", two, 2, &req),
              oom_assert(series(m, "http_requests_total") == 0, "a failed family left series"));
    CALL(0, keel_metrics_gauge(m, "queue_depth", "Queued \"items\".", (const char *[]){"queue"}, 1, &g));
    CALL(0, keel_metrics_histogram(m, "latency_seconds", NULL, (const char *[]){"route"}, 1, bounds, 3,
                                   &lat));
    keel_counter_child *get200, *post500;
    keel_gauge_child *q;
    keel_histogram_child *root;
    CALL(0, keel_counter_get(req, (const char *[]){"GET", "200"}, 2, &get200));
    CALL_THEN(0, PTR_RC(post500, keel_counter_with(req, "POST", "500")),
              oom_assert(series(m, "http_requests_total") == 1, "a failed child left a series"));
    CALL(0, PTR_RC(q, keel_gauge_with(g, "in\nbox")));
    CALL(0, keel_histogram_get(lat, (const char *[]){"/"}, 1, &root));
    CALL(0, keel_metrics_func(m, KEEL_METRIC_GAUGE, "answer", "Computed.", NULL, NULL, 0, forty_two, m));

    int lost = 0;
    for (int i = 0; i < 2; i++) { /* the main thread's first update allocates too */
        long seen = failures_here;
        keel_counter_inc(get200);
        lost += failures_here != seen;
    }
    keel_counter_add(post500, 5);
    keel_gauge_set(q, 7);
    keel_histogram_observe(root, 0.3);
    hot x = {get200, root, 0};
    pthread_t t;
    ck_assert_int_eq(pthread_create(&t, NULL, hot_path, &x), 0);
    ck_assert_int_eq(pthread_join(t, NULL), 0); /* its values are folded in as it exits */
    double got = value_of(m, "http_requests_total", "GET");
    oom_assert(got == 5 - lost - x.lost, "GET counts %g, not 5 - %d lost", got, lost + x.lost);

    /* a removed child's slots go to the next child of the same shape */
    CALL_THEN(0, keel_counter_remove(req, (const char *[]){"POST", "500"}, 2),
              oom_assert(series(m, "http_requests_total") == 2, "a failed remove took the series"));
    keel_counter_child *put201;
    CALL(0, keel_counter_get(req, (const char *[]){"PUT", "201"}, 2, &put201));
    keel_counter_inc(put201);
    got = value_of(m, "http_requests_total", "PUT");
    oom_assert(got == 1, "a reused child counts %g, not 1", got);

    for (keel_metrics_format f = KEEL_METRICS_PROMETHEUS; f <= KEEL_METRICS_OPENMETRICS; f++) {
        size_t n = 0;
        CALL(0, (n = 0, keel_metrics_render(m, f, discard, &n)));
        char *text;
        size_t len;
        CALL(0, keel_metrics_render_buf(m, f, &text, &len));
        oom_assert(len == n && strstr(text, "answer 42") && strstr(text, "latency_seconds_bucket"),
                   "rendered %zu bytes, then %zu:\n%s", n, len, text);
        keel_free(text);
    }
    keel_metrics_func_remove(m, m);
    keel_metrics_destroy(m);
}

START_TEST(metrics_survive_every_failed_allocation)
{
    sweep("metrics", metrics_scenario);
}
END_TEST

/* ---- keel_alert ---- */

static void count_alert(const keel_alert_info *in, void *ud)
{
    *(keel_alert_state *)ud = in->state;
}

static keel_alert_state alert_state(keel_alerts *a, const char *name)
{
    keel_alert_state st = KEEL_ALERT_INACTIVE;
    CALL(0, keel_alerts_get(a, name, count_alert, &st));
    return st;
}

static void alert_scenario(void)
{
    static kt_clock mono;
    atomic_store(&mono.ns, 1000 * KT_S);
    keel_metrics *m = registry(true);
    keel_counter *errs, *reqs;
    keel_histogram *lat;
    keel_gauge *depth;
    CALL(0, keel_metrics_counter(m, "errors_total", "", (const char *[]){"route"}, 1, &errs));
    CALL(0, keel_metrics_gauge(m, "queue_depth", "", NULL, 0, &depth));
    CALL(0, keel_metrics_counter(m, "requests_total", "", NULL, 0, &reqs));
    CALL(0, keel_metrics_histogram(m, "latency_seconds", "", NULL, 0, NULL, 0, &lat));
    keel_counter_child *e, *r;
    keel_histogram_child *h;
    CALL(0, keel_counter_get(errs, (const char *[]){"/a"}, 1, &e));
    CALL(0, keel_counter_get(reqs, NULL, 0, &r));
    CALL(0, keel_histogram_get(lat, NULL, 0, &h));
    keel_gauge_child *d;
    CALL(0, keel_gauge_get(depth, NULL, 0, &d));
    keel_gauge_set(d, 5);

    keel_alerts *a = NULL;
    keel_alerts_opts o = {.metrics = m, .eval_interval_ns = 10 * KT_S, .generator_url = "http://x/",
                          .clock = kt_clock_now, .wall_clock = kt_clock_now, .clock_ud = &mono};
    CALL(0, keel_alerts_create(&a, &o));
    static const char *const labels[] = {"severity", "page"};
    static const char *const notes[] = {"summary", "Too \"many\" errors"};
    CALL(0, keel_alerts_add(a, "errors",
                            "ratio(rate(errors_total{route=\"/a\"}[1m]), rate(requests_total[1m])) > 0.1",
                            labels, 1, notes, 1, NULL));
    CALL(0, keel_alerts_add(a, "slow", "quantile(0.9, latency_seconds[1m]) > 0.5 and "
                                       "max(queue_depth[1m]) > 1 for 10s", NULL, 0, NULL, 0, NULL));
    for (int i = 0; i < 4; i++) {
        keel_counter_add(r, 10);
        keel_counter_add(e, 5);
        keel_histogram_observe(h, 2);
        CALL(1, keel_alerts_tick(a));
        kt_clock_advance(&mono, 10 * KT_S);
    }
    oom_assert(alert_state(a, "errors") == KEEL_ALERT_FIRING, "errors is not firing");
    oom_assert(alert_state(a, "slow") == KEEL_ALERT_FIRING, "slow is not firing");
    oom_assert(series(m, "keel_alerts") == 2, "%zu alert series, not 2", series(m, "keel_alerts"));
    char *json;
    size_t len;
    CALL(0, keel_alerts_to_send(a, &json, &len));
    oom_assert(strstr(json, "\"alertname\":\"errors\"") && strstr(json, "\"alertname\":\"slow\""),
               "not both alerts sent: %s", json);
    keel_free(json);
    CALL(0, keel_alerts_to_send(a, &json, &len));
    oom_assert(strcmp(json, "[]") == 0, "sent twice: %s", json);
    keel_free(json);
    keel_alerts_destroy(a);
    oom_assert(series(m, "keel_alerts") == 0, "alert series outlive their rules");
    keel_metrics_destroy(m);
}

START_TEST(alerts_survive_every_failed_allocation)
{
    sweep("alert", alert_scenario);
}
END_TEST

/* ---- keel_limiter, in process ---- */

static uint64_t limiter_keys(keel_limiter *l)
{
    keel_limiter_stats st;
    keel_limiter_stats_get(l, &st);
    return st.keys;
}

/* What a key has left, looked at without storing anything. */
static uint64_t remaining(keel_limiter *l, const void *key, size_t len)
{
    keel_limit_result r;
    CALL(0, keel_limiter_peek(l, key, len, 1, &r));
    return r.remaining;
}

/* A key longer than a slot holds inline, so that it is allocated apart. */
static const char long_key[] = "a key long enough to need memory of its own: 0123456789abcdef";

static void limiter_scenario_algo(keel_limit_algo algo, keel_metrics *m)
{
    static kt_clock clock;
    atomic_store(&clock.ns, 1000 * KT_S);
    keel_limiter *l = NULL;
    keel_limiter_opts o = {.algo = algo, .limit = 5, .window_ns = KT_S, .max_keys = 4,
                           .clock = kt_clock_now, .clock_ud = &clock, .metrics = m,
                           .metrics_name = algo == KEEL_LIMIT_GCRA ? "gcra" : algo ? "window" : "log"};
    CALL(0, keel_limiter_create(&l, &o));
    keel_limit_result r;
    for (int i = 0; i < 3; i++) { /* a failed take consumes nothing: retried, 3 units in all */
        uint64_t keys = limiter_keys(l);
        /* and answered as a rejection headers can carry: the limit, and a
         * window to wait (not "Retry-After: 0"), as fail-closed does */
        CALL_THEN(0, keel_limiter_take(l, long_key, sizeof long_key, 1, &r),
                  oom_assert(!r.allowed && limiter_keys(l) == keys &&
                                 remaining(l, long_key, sizeof long_key) == 5u - (unsigned)i,
                             "a failed take was kept");
                  oom_assert(r.limit == 5 && r.remaining == 0 && r.retry_after_ns == KT_S && r.reset_ns == KT_S &&
                                 r.source == KEEL_LIMIT_SRC_LOCAL,
                             "failed take: limit %llu, remaining %llu, retry %llu, reset %llu",
                             (unsigned long long)r.limit, (unsigned long long)r.remaining,
                             (unsigned long long)r.retry_after_ns, (unsigned long long)r.reset_ns));
        oom_assert(r.allowed, "take %d refused", i);
        kt_clock_advance(&clock, KT_MS); /* a new entry in the sliding log each time */
    }
    CALL(0, keel_limiter_peek(l, long_key, sizeof long_key, 1, &r));
    oom_assert(r.allowed && r.remaining == 2, "%llu remaining, not 2", (unsigned long long)r.remaining);
    CALL(0, keel_limiter_refund(l, long_key, sizeof long_key, 1, NULL));
    CALL(0, keel_limiter_peek(l, long_key, sizeof long_key, 1, &r));
    oom_assert(r.remaining == 3, "%llu remaining after a refund, not 3", (unsigned long long)r.remaining);

    /* more keys than max_keys, and more requests than one prefetch round */
    keel_limit_req reqs[20];
    char names[20][8];
    for (int i = 0; i < 20; i++) {
        snprintf(names[i], sizeof names[i], "k%d", i % 6);
        reqs[i] = (keel_limit_req){.key = names[i], .len = strlen(names[i]), .cost = 1};
    }
    /* every request gets an answer, the failure too: in its own rc */
    CALL_COPES(0, keel_limiter_take_many(l, reqs, 20));
    for (int i = 0; i < 20; i++)
        if (reqs[i].rc == KEEL_ENOMEM)
            CALL(0, keel_limiter_take(l, reqs[i].key, reqs[i].len, 1, &reqs[i].result));
        else
            oom_assert(reqs[i].rc == 0 && reqs[i].result.allowed, "request %d: %s", i,
                       keel_err_name(reqs[i].rc));
    oom_assert(limiter_keys(l) == 4, "%llu keys, not max_keys", (unsigned long long)limiter_keys(l));
    /* a new key at max_keys evicts one (a failed take may have done so) */
    CALL_THEN(0, keel_limiter_take(l, long_key, sizeof long_key - 1, 1, &r),
              oom_assert(remaining(l, long_key, sizeof long_key - 1) == 5, "a failed take was kept"));
    oom_assert(limiter_keys(l) == 4, "%llu keys, not max_keys", (unsigned long long)limiter_keys(l));
    CALL(0, keel_limiter_reset(l, "k5", 2));
    char h[512];
    size_t hl;
    CALL(0, keel_limiter_headers(l, &r, h, sizeof h, &hl));
    keel_limiter_destroy(l);
}

static void limiter_scenario(void)
{
    keel_metrics *m = registry(true);
    for (keel_limit_algo a = KEEL_LIMIT_SLIDING_LOG; a <= KEEL_LIMIT_GCRA; a++)
        limiter_scenario_algo(a, m);
    keel_metrics_destroy(m);
}

START_TEST(a_limiter_survives_every_failed_allocation)
{
    sweep("limiter", limiter_scenario);
}
END_TEST

/* ---- keel_batch ---- */

#define ITEMS 40 /* 30 from the test's thread, 10 from another */

typedef struct tally {
    atomic_int handled, dead;
    atomic_int seen[ITEMS]; /* successful handlings and dead letters of each */
} tally;

static tally batch_tally;

/* Item 13 always fails (dead letter after its retry); every seventh fails
 * its first attempt only. */
static int batch_handler(void *const *items, size_t n, keel_batch_ctx *ctx, void *ud)
{
    (void)ud;
    for (size_t i = 0; i < n; i++) {
        size_t id = (size_t)(uintptr_t)items[i] - 1;
        if (id == 13 || (id % 7 == 0 && keel_batch_attempt(ctx) == 0)) {
            keel_batch_fail(ctx, i);
            continue;
        }
        atomic_fetch_add(&batch_tally.handled, 1);
        atomic_fetch_add(&batch_tally.seen[id], 1);
    }
    return 0;
}

static void batch_dead(void *const *items, size_t n, int err, void *ud)
{
    (void)err, (void)ud;
    for (size_t i = 0; i < n; i++) {
        atomic_fetch_add(&batch_tally.dead, 1);
        atomic_fetch_add(&batch_tally.seen[(size_t)(uintptr_t)items[i] - 1], 1);
    }
}

typedef struct adder {
    keel_batch *b;
    int from, to;
} adder;

static void *add_items(void *arg)
{
    adder *a = arg;
    for (int i = a->from; i < a->to; i++)
        CALL(0, keel_batch_add(a->b, (void *)(uintptr_t)(i + 1), 8));
    return NULL;
}

static void batch_scenario_with(size_t workers, keel_metrics *m)
{
    memset(&batch_tally, 0, sizeof batch_tally);
    keel_batch *b = NULL;
    keel_batch_opts o = {.handler = batch_handler, .dead_letter = batch_dead, .max_items = 4,
                         .capacity = 64, .workers = workers, .max_retries = 1,
                         .retry_base_ns = 1000, .retry_max_ns = 1000, .metrics = m,
                         .metrics_name = workers > 1 ? "pool" : "one"};
    CALL(0, keel_batch_create(&b, &o));
    adder mine = {b, 0, 20}, other = {b, 30, ITEMS};
    pthread_t t;
    ck_assert_int_eq(pthread_create(&t, NULL, add_items, &other), 0);
    add_items(&mine);
    CALL(0, keel_batch_flush(b));
    mine = (adder){b, 20, 30};
    add_items(&mine);
    ck_assert_int_eq(pthread_join(t, NULL), 0);
    CALL(0, keel_batch_close(b));
    keel_batch_stats st;
    keel_batch_stats_get(b, &st);
    keel_batch_destroy(b);
    /* every item accepted reached the handler or the dead letter, once */
    oom_assert(st.accepted == ITEMS && st.handled == ITEMS - 1 && st.dead_lettered == 1,
               "%llu accepted, %llu handled, %llu dead", (unsigned long long)st.accepted,
               (unsigned long long)st.handled, (unsigned long long)st.dead_lettered);
    oom_assert(atomic_load(&batch_tally.handled) == ITEMS - 1 && atomic_load(&batch_tally.dead) == 1,
               "%d handled, %d dead letters", atomic_load(&batch_tally.handled),
               atomic_load(&batch_tally.dead));
    for (int i = 0; i < ITEMS; i++)
        oom_assert(atomic_load(&batch_tally.seen[i]) == 1, "item %d seen %d times", i,
                   atomic_load(&batch_tally.seen[i]));
}

static void batch_scenario(void)
{
    keel_metrics *m = registry(true);
    batch_scenario_with(1, m);
    batch_scenario_with(3, m);
    keel_metrics_destroy(m);
}

START_TEST(a_batch_loses_no_item_to_a_failed_allocation)
{
    sweep("batch", batch_scenario);
}
END_TEST

/* ---- keel_bus, in process ---- */

enum { ALL, EU_SYNC, GROUP, AUDIT, NSUBS };
static atomic_int bus_got[NSUBS];
static keel_bus *the_bus;

static int got(const keel_bus_msg *msg, void *ud)
{
    (void)msg;
    atomic_fetch_add(&bus_got[(intptr_t)ud], 1);
    return 0;
}

/* An async handler that publishes in turn, from a worker thread: like any
 * caller it tries again when the publish says memory ran out. */
static int audit(const keel_bus_msg *msg, void *ud)
{
    char subject[64];
    snprintf(subject, sizeof subject, "audit.%.*s", (int)msg->subject_len, msg->subject);
    int rc;
    while ((rc = keel_bus_publish(the_bus, subject, msg->data, msg->len, NULL, 0, NULL)) == KEEL_ENOMEM)
        ;
    ck_assert_int_eq(rc, 0);
    return got(msg, ud);
}

static void bus_scenario(void)
{
    for (int i = 0; i < NSUBS; i++)
        atomic_store(&bus_got[i], 0);
    keel_metrics *m = registry(true);
    keel_bus *bus = NULL;
    keel_bus_opts o = {.workers = 2, .capacity = 64, .metrics = m};
    CALL(0, keel_bus_create(&bus, &o));
    the_bus = bus;
    keel_bus_sub *subs[6];
    keel_bus_sub_opts so[6] = {
        {.pattern = "orders.>", .handler = got, .ud = (void *)ALL, .mode = KEEL_BUS_ASYNC},
        {.pattern = "orders.eu.*", .handler = got, .ud = (void *)EU_SYNC},
        {.pattern = "orders.*.paid", .handler = got, .ud = (void *)GROUP, .group = "billing"},
        {.pattern = "orders.*.paid", .handler = got, .ud = (void *)GROUP, .group = "billing",
         .mode = KEEL_BUS_ASYNC},
        {.pattern = "orders.us.paid", .handler = audit, .ud = (void *)ALL, .mode = KEEL_BUS_ASYNC},
        {.pattern = "audit.>", .handler = got, .ud = (void *)AUDIT},
    };
    for (int i = 0; i < 6; i++) {
        keel_bus_stats st;
        keel_bus_stats_get(bus, &st);
        uint64_t before = st.subscriptions;
        CALL_THEN(0, keel_bus_subscribe(bus, &so[i], &subs[i]), {
            keel_bus_stats_get(bus, &st);
            oom_assert(st.subscriptions == before, "a failed subscribe was counted");
        });
    }
    static char big[2000]; /* over the size the bus keeps in its pool */
    keel_bus_header h[] = {{"trace", "abc"}, {"kind", "test"}};
    static const char *const subjects[] = {"orders.eu.paid", "orders.us.paid", "orders.eu.new",
                                           "orders.eu.paid.late", "users.new"};
    /* (the copies for async deliveries come from a keel_pool, which copes
     * without its thread cache) */
    for (int i = 0; i < 5; i++)
        CALL_COPES(0, keel_bus_publish(bus, subjects[i], big, i == 1 ? sizeof big : 10, h, 2, NULL));
    keel_bus_pub many[2] = {{.subject = "orders.eu.paid", .data = "x", .len = 1},
                            {.subject = "orders.us.new", .data = "y", .len = 1}};
    long seen = failures_here;
    int rc = keel_bus_publish_many(bus, many, 2); /* the first failure, if any */
    oom_assert(rc == (many[0].rc ? many[0].rc : many[1].rc), "publish_many returned %s", keel_err_name(rc));
    for (int i = 0; i < 2; i++) /* each has its answer: only a failed one goes again */
        if (many[i].rc == KEEL_ENOMEM) {
            oom_assert(failures_here != seen, "message %d: KEEL_ENOMEM with no failure", i);
            CALL(0, keel_bus_publish(bus, many[i].subject, many[i].data, many[i].len, NULL, 0, NULL));
        } else {
            oom_assert(many[i].rc == 0, "message %d: %s", i, keel_err_name(many[i].rc));
        }
    CALL(0, keel_bus_drain(bus));
    /* every publish that succeeded was delivered once, and no other */
    static const int want[NSUBS] = {[ALL] = 4 + 2 + 1, [EU_SYNC] = 2 + 1, [GROUP] = 3, [AUDIT] = 1};
    for (int i = 0; i < NSUBS; i++)
        oom_assert(atomic_load(&bus_got[i]) == want[i], "subscriber %d got %d messages, not %d", i,
                   atomic_load(&bus_got[i]), want[i]);
    /* an unsubscribe without memory for the smaller list leaves the
     * subscription in the trie, dead, until destroy */
    for (int i = 0; i < 6; i += 2)
        CALL_COPES(0, keel_bus_unsubscribe(subs[i]));
    for (int i = 0; i < 2; i++) /* the group's round robin comes to each member it holds */
        CALL_COPES(0, keel_bus_publish(bus, "orders.eu.paid", "z", 1, NULL, 0, NULL));
    keel_bus_destroy(bus); /* runs what is queued */
    oom_assert(atomic_load(&bus_got[GROUP]) == 5 && atomic_load(&bus_got[ALL]) == want[ALL],
               "after unsubscribing: %d to the group, %d to all", atomic_load(&bus_got[GROUP]),
               atomic_load(&bus_got[ALL]));
    keel_metrics_destroy(m);
}

START_TEST(a_bus_survives_every_failed_allocation)
{
    sweep("bus", bus_scenario);
}
END_TEST

/* ---- keel_cqrs, in memory ---- */

/* More events than a command keeps room for on the stack. */
static int deposit_many(keel_cqrs_ctx *x, const void *payload, size_t len, void *ud)
{
    (void)payload, (void)len, (void)ud;
    const keel_cqrs_event *evs;
    size_t n;
    int rc = keel_cqrs_load(x, "acct-1", &evs, &n);
    for (int i = 0; rc == 0 && i < 20; i++)
        rc = keel_cqrs_emit(x, i % 2 ? "acct-1" : "ledger", "money.deposited", &i, sizeof i, NULL, 0);
    return rc;
}

static int balance(keel_cqrs_ctx *x, const void *payload, size_t len, void *ud)
{
    (void)payload, (void)len, (void)ud;
    return keel_cqrs_reply(x, "42", 2);
}

static atomic_int links_run;
static int count_link(keel_cqrs_req *req, void *ud)
{
    (void)ud;
    atomic_fetch_add(&links_run, 1);
    return keel_cqrs_next(req);
}

static atomic_int projected, bus_events;
static int project(keel_cqrs_ctx *x, const keel_cqrs_event *ev, void *ud)
{
    (void)x, (void)ev, (void)ud;
    atomic_fetch_add(&projected, 1);
    return 0;
}

static int on_event(const keel_bus_msg *msg, void *ud)
{
    (void)msg, (void)ud;
    atomic_fetch_add(&bus_events, 1);
    return 0;
}

static void cqrs_scenario(void)
{
    atomic_store(&projected, 0);
    atomic_store(&bus_events, 0);
    keel_metrics *m = registry(true);
    keel_bus *bus = NULL;
    CALL(0, keel_bus_create(&bus, NULL));
    keel_bus_sub *sub;
    CALL(0, keel_bus_subscribe(bus, &(keel_bus_sub_opts){.pattern = "cqrs.>", .handler = on_event}, &sub));
    keel_cqrs *c = NULL;
    keel_cqrs_opts o = {.bus = bus, .metrics = m};
    CALL(0, keel_cqrs_create(&c, &o));
    CALL(0, keel_cqrs_command(c, "open", oom_open_account, NULL));
    CALL(0, keel_cqrs_command(c, "deposit", deposit_many, NULL));
    CALL(0, keel_cqrs_query(c, "balance", balance, NULL));
    CALL(0, keel_cqrs_use(c, KEEL_CQRS_COMMAND | KEEL_CQRS_QUERY, count_link, NULL));
    keel_cqrs_result res = {0};
    CALL(0, keel_cqrs_send(c, "open", "1", 1, "open-1", &res));
    oom_assert(res.position == 1 && !res.repeated && res.len == 6, "first open: position %llu",
               (unsigned long long)res.position);
    keel_cqrs_result_free(&res);
    CALL(0, keel_cqrs_send(c, "open", "1", 1, "open-1", &res)); /* the same key: the first result */
    oom_assert(res.repeated && res.len == 6 && memcmp(res.reply, "acct-1", 6) == 0, "not a repeat");
    keel_cqrs_result_free(&res);
    CALL(KEEL_EEXIST, keel_cqrs_send(c, "open", "1", 1, NULL, &res));
    CALL(0, keel_cqrs_send(c, "deposit", NULL, 0, NULL, &res));
    oom_assert(res.position == 21, "deposits end at %llu, not 21", (unsigned long long)res.position);
    CALL(0, keel_cqrs_ask(c, "balance", NULL, 0, 0, &res));
    oom_assert(res.len == 2, "balance: %zu bytes", res.len);
    keel_cqrs_result_free(&res);

    keel_cqrs_projection *p = NULL;
    keel_cqrs_projection_opts po = {.name = "totals", .handler = project, .batch = 8};
    CALL(0, keel_cqrs_projection_create(c, &po, &p));
    size_t applied = 0, now;
    /* a failed batch applies nothing; the run goes on where it stopped */
    CALL_THEN(0, (now = 0, keel_cqrs_projection_run(p, &now)), applied += now);
    applied += now;
    oom_assert(applied == 21 && keel_cqrs_projection_position(p) == 21 && atomic_load(&projected) == 21,
               "projected %zu (%d calls), position %llu", applied, atomic_load(&projected),
               (unsigned long long)keel_cqrs_projection_position(p));
    keel_cqrs_stats st;
    keel_cqrs_stats_get(c, &st);
    oom_assert(st.appended == 21 && st.published == (uint64_t)atomic_load(&bus_events),
               "%llu appended, %llu published, %d on the bus", (unsigned long long)st.appended,
               (unsigned long long)st.published, atomic_load(&bus_events));
    keel_cqrs_projection_destroy(p);
    keel_cqrs_destroy(c);
    keel_bus_destroy(bus);
    keel_metrics_destroy(m);
}

START_TEST(cqrs_survives_every_failed_allocation)
{
    sweep("cqrs", cqrs_scenario);
}
END_TEST

/* ---- keel_cache, L1 only ---- */

static void cache_scenario(void)
{
    static kt_clock clock;
    atomic_store(&clock.ns, 1000 * KT_S);
    keel_metrics *m = registry(true);
    keel_cache *c = NULL;
    /* room for every key in every one of L1's 32 shards: the hash seed is
     * random, so which keys share a shard is too, and an eviction would
     * take a value the scenario reads back */
    keel_cache_opts o = {.l1_max_bytes = 1 << 20, .l1_max_items = 32 * 48, .loader = oom_cache_loader,
                         .clock = kt_clock_now, .clock_ud = &clock, .metrics = m};
    CALL(0, keel_cache_create(&c, &o));
    char buf[128];
    /* a set that fails leaves no value, never the old one; the L1 table
     * may also do without growing */
    for (int round = 0; round < 2; round++)
        for (int i = 0; i < 40; i++) {
            char k[16], v[32];
            snprintf(k, sizeof k, "k%d", i);
            snprintf(v, sizeof v, "v%d.%d", i, round);
            const char *tags[] = {i % 2 ? "odd" : "even", "all"};
            CALL_(true, 0, keel_cache_set(c, k, strlen(k), v, strlen(v), 0, tags, 2), {
                oom_cache_get(c, k, buf, sizeof buf); /* loaded, then: no value of a set */
                oom_assert(strncmp(buf, "v", 1) != 0, "%s kept %s", k, buf);
            });
        }
    oom_assert(oom_cache_get(c, "k3", buf, sizeof buf) == 0 && strcmp(buf, "v3.1") == 0, "k3 is %s", buf);
    oom_assert(oom_cache_get(c, "fresh", buf, sizeof buf) == 0 && strcmp(buf, "loaded:fresh") == 0, "fresh is %s", buf);
    oom_assert(oom_cache_get(c, "absent", buf, sizeof buf) == KEEL_ENOTFOUND, "absent is %s", buf);
    keel_cache_item items[3] = {{"k4", 2, buf, 40}, {"k5", 2, buf + 40, 40}, {"other", 5, buf + 80, 40}};
    long seen = failures_here;
    int rc = keel_cache_get_many(c, items, 3);
    for (int i = 0; i < 3; i++) /* each has its answer: only a failed one goes again */
        if (items[i].rc == KEEL_ENOMEM)
            oom_assert(failures_here != seen && rc == KEEL_ENOMEM, "item %d: KEEL_ENOMEM", i);
        else
            oom_assert(items[i].rc == 0, "item %d: %s", i, keel_err_name(items[i].rc));
    CALL_COPES(0, keel_cache_invalidate_tag(c, "odd")); /* allocates nothing: the tag's entries miss */
    oom_assert(oom_cache_get(c, "k3", buf, sizeof buf) == 0 && strcmp(buf, "loaded:k3") == 0, "k3 after its tag: %s",
               buf);
    CALL(0, keel_cache_invalidate_prefix(c, "k1", 2));
    oom_assert(oom_cache_get(c, "k12", buf, sizeof buf) == 0 && strcmp(buf, "loaded:k12") == 0, "k12: %s", buf);
    CALL(0, keel_cache_del(c, "k4", 2));
    oom_assert(oom_cache_get(c, "k4", buf, sizeof buf) == 0 && strcmp(buf, "loaded:k4") == 0, "k4: %s", buf);
    keel_cache_stats st;
    keel_cache_stats_get(c, &st);
    oom_assert(st.l1_items <= 43, "%llu items, of 43 keys", (unsigned long long)st.l1_items); /* k0..k39, fresh, absent, other */
    keel_cache_destroy(c);
    keel_metrics_destroy(m);
}

START_TEST(a_cache_survives_every_failed_allocation)
{
    sweep("cache", cache_scenario);
}
END_TEST

/* ---- a thread's first read section ----
 *
 * Lock-free readers (ring and lb lookups, bus matching, the cache's L1)
 * get a reader slot on a thread's first read section, reusing one an
 * exited thread left; the sweeps above never see that allocation fail.
 * Here threads that hold every spare slot make a new thread allocate
 * one, and that allocation fails: the thread reads with a slot of the
 * reserve (the ring, with none, under its writers' lock); with the whole
 * reserve held too, it is told so. */

static pthread_mutex_t hold_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t hold_cv = PTHREAD_COND_INITIALIZER;
static int holders_in;
static bool holders_go;

/* Keeps the slot of its first read section; arg: where to say whether it
 * got one (NULL: it must). */
static void *hold_slot(void *arg)
{
    int rc = keel__rcu_read_lock();
    if (rc == 0)
        keel__rcu_read_unlock();
    if (arg)
        *(int *)arg = rc;
    else
        ck_assert_int_eq(rc, 0);
    pthread_mutex_lock(&hold_mu);
    holders_in++;
    pthread_cond_broadcast(&hold_cv);
    while (!holders_go)
        pthread_cond_wait(&hold_cv, &hold_mu);
    pthread_mutex_unlock(&hold_mu);
    return NULL;
}

/* Starts threads that each keep a slot until hold_release(), until one
 * had to allocate its own: then no spare is left. */
static size_t hold_all_slots(pthread_t *t, size_t max)
{
    holders_in = 0;
    holders_go = false;
    for (size_t n = 0; n < max; n++) {
        long before = atomic_load(&allocs);
        ck_assert_int_eq(pthread_create(&t[n], NULL, hold_slot, NULL), 0);
        pthread_mutex_lock(&hold_mu);
        while (holders_in < (int)n + 1)
            pthread_cond_wait(&hold_cv, &hold_mu);
        pthread_mutex_unlock(&hold_mu);
        if (atomic_load(&allocs) != before)
            return n + 1;
    }
    ck_abort_msg("more than %zu spare reader slots", max);
    return 0;
}

static void hold_release(pthread_t *t, size_t n)
{
    pthread_mutex_lock(&hold_mu);
    holders_go = true;
    pthread_cond_broadcast(&hold_cv);
    pthread_mutex_unlock(&hold_mu);
    for (size_t i = 0; i < n; i++)
        ck_assert_int_eq(pthread_join(t[i], NULL), 0);
}

typedef struct first_read {
    keel_ring *ring;
    keel_lb *lb;
    keel_lb_peer *peer; /* picked: count_first fails it */
    keel_bus *bus;
    keel_cache *cache;
} first_read;

/* Each call in a new thread, whose first read section cannot get a slot. */
static void *read_first(void *arg)
{
    first_read *f = arg;
    keel_ring_node nd;
    keel_lb_peer *p;
    char buf[16];
    size_t len;
    atomic_store(&fail_at, atomic_load(&allocs) + 1);
    if (f->ring) { /* without a reader slot it reads under the writers' lock: no failure */
        int rc = keel_ring_lookup(f->ring, "k", 1, &nd);
        oom_assert(rc == 0, "a lookup with no reader slot: %s", keel_err_name(rc));
        oom_assert(keel_ring_load(f->ring, &nd) == 0, "the load of an unassigned node");
        rc = keel_ring_assign(f->ring, "k", 1, &nd);
        oom_assert(rc == 0 && keel_ring_load(f->ring, &nd) == 1, "assign with no reader slot: %s",
                   keel_err_name(rc));
        rc = keel_ring_unassign(f->ring, &nd);
        oom_assert(rc == 0, "unassign with no reader slot: %s", keel_err_name(rc));
        oom_assert(keel_ring_count(f->ring) == 1, "the ring counts %zu nodes", keel_ring_count(f->ring));
    } else if (f->lb) {
        int rc = keel_lb_pick(f->lb, NULL, &p);
        oom_assert(rc == 0, "a pick with a reserve slot: %s", keel_err_name(rc));
        oom_assert(keel_lb_done(f->lb, p, 1, 0) == 0, "done");
    } else if (f->bus) {
        int rc = keel_bus_publish(f->bus, "a.b", "x", 1, NULL, 0, NULL);
        oom_assert(rc == 0, "a publish with a reserve slot: %s", keel_err_name(rc));
    } else {
        int rc = keel_cache_get(f->cache, "k", 1, buf, sizeof buf, &len);
        oom_assert(rc == 0, "a get with a reserve slot: %s", keel_err_name(rc));
    }
    oom_assert(atomic_load(&failures) == 1, "%ld failures", atomic_load(&failures));
    return NULL;
}

static void read_first_in_new_thread(first_read f)
{
    pthread_t holders[256], t;
    size_t n = hold_all_slots(holders, 256);
    atomic_store(&failures, 0);
    ck_assert_int_eq(pthread_create(&t, NULL, read_first, &f), 0);
    ck_assert_int_eq(pthread_join(t, NULL), 0);
    atomic_store(&fail_at, 0);
    hold_release(holders, n);
}

static void *count_first(void *arg)
{
    first_read *f = arg;
    atomic_store(&fail_at, atomic_load(&allocs) + 1);
    size_t n = keel_ring_count(f->ring);
    oom_assert(n == 1, "the ring counts %zu nodes", n);
    n = keel_lb_count(f->lb);
    oom_assert(n == 1, "the lb counts %zu peers", n);
    /* a lone peer's failure is not counted (nginx), slot or no slot */
    oom_assert(keel_lb_done(f->lb, f->peer, 0, 0) == 0, "done on the lone peer");
    return NULL;
}

/* With the reserve all held: a pick is told there is no memory. */
static void *pick_past_the_reserve(void *arg)
{
    keel_lb_peer *p;
    atomic_store(&fail_at, atomic_load(&allocs) + 1);
    int rc = keel_lb_pick(arg, NULL, &p);
    oom_assert(rc == KEEL_ENOMEM, "a pick with the reserve all held: %s", keel_err_name(rc));
    return NULL;
}

START_TEST(a_thread_whose_first_read_section_lacks_memory_reads_from_a_reserve)
{
    scenario = "first read section";
    run_n = 0;
    persist = false;
    keel_ring *r;
    ck_assert_int_eq(keel_ring_create(&r, NULL), 0);
    ck_assert_int_eq(keel_ring_add(r, "a", 1, 1, NULL), 0);
    read_first_in_new_thread((first_read){.ring = r});
    keel_lb *lb;
    ck_assert_int_eq(keel_lb_create(&lb, &(keel_lb_opts){0}), 0);
    ck_assert_int_eq(keel_lb_add(lb, &(keel_lb_peer_opts){.name = "a"}, NULL), 0);
    read_first_in_new_thread((first_read){.lb = lb});
    keel_bus *bus;
    ck_assert_int_eq(keel_bus_create(&bus, NULL), 0);
    keel_bus_sub *sub;
    ck_assert_int_eq(keel_bus_subscribe(bus, &(keel_bus_sub_opts){.pattern = "a.*", .handler = got,
                                                                  .ud = (void *)AUDIT}, &sub), 0);
    read_first_in_new_thread((first_read){.bus = bus});
    keel_cache *c;
    ck_assert_int_eq(keel_cache_create(&c, &(keel_cache_opts){.loader = oom_cache_loader}), 0);
    read_first_in_new_thread((first_read){.cache = c});
    /* counts cannot say that they failed: they must not need a slot */
    pthread_t holders[256], t;
    size_t n = hold_all_slots(holders, 256);
    first_read both = {.ring = r, .lb = lb};
    ck_assert_int_eq(keel_lb_pick(lb, NULL, &both.peer), 0);
    ck_assert_int_eq(pthread_create(&t, NULL, count_first, &both), 0);
    ck_assert_int_eq(pthread_join(t, NULL), 0);
    atomic_store(&fail_at, 0);
    hold_release(holders, n);
    keel_lb_peer_stats st;
    ck_assert_int_eq(keel_lb_peer_stats_get(lb, both.peer, &st), 0);
    ck_assert_uint_eq(st.fails, 0);
    /* every spare slot held, then what is left of the reserve, each by a
     * thread whose own allocation failed, until one finds none: the next
     * thread is told */
    pthread_t many[256 + KEEL__RCU_RESERVE + 1];
    int got[256 + KEEL__RCU_RESERVE + 1];
    n = hold_all_slots(many, 256);
    size_t from_reserve = 0;
    for (;;) {
        ck_assert_uint_le(from_reserve, KEEL__RCU_RESERVE);
        atomic_store(&fail_at, atomic_load(&allocs) + 1);
        ck_assert_int_eq(pthread_create(&many[n], NULL, hold_slot, &got[n]), 0);
        pthread_mutex_lock(&hold_mu);
        while (holders_in < (int)n + 1)
            pthread_cond_wait(&hold_cv, &hold_mu);
        pthread_mutex_unlock(&hold_mu);
        if (got[n++])
            break;
        from_reserve++;
    }
    ck_assert_int_eq(got[n - 1], KEEL_ENOMEM);
    ck_assert_uint_gt(from_reserve, 0);
    ck_assert_int_eq(pthread_create(&t, NULL, pick_past_the_reserve, lb), 0);
    ck_assert_int_eq(pthread_join(t, NULL), 0);
    atomic_store(&fail_at, 0);
    hold_release(many, n);
    keel_cache_destroy(c);
    keel_bus_destroy(bus);
    keel_lb_destroy(lb);
    keel_ring_destroy(r);
}
END_TEST

int main(void)
{
    if (oom_install() != 0)
        return 1;
    Suite *s = suite_create("oom");
    TCase *tc = tcase_create("oom");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, a_pool_survives_every_failed_allocation);
    tcase_add_test(tc, a_ring_survives_every_failed_allocation);
    tcase_add_test(tc, an_lb_survives_every_failed_allocation);
    tcase_add_test(tc, a_breaker_survives_every_failed_allocation);
    tcase_add_test(tc, metrics_survive_every_failed_allocation);
    tcase_add_test(tc, alerts_survive_every_failed_allocation);
    tcase_add_test(tc, a_limiter_survives_every_failed_allocation);
    tcase_add_test(tc, a_batch_loses_no_item_to_a_failed_allocation);
    tcase_add_test(tc, a_bus_survives_every_failed_allocation);
    tcase_add_test(tc, cqrs_survives_every_failed_allocation);
    tcase_add_test(tc, a_cache_survives_every_failed_allocation);
    tcase_add_test(tc, a_thread_whose_first_read_section_lacks_memory_reads_from_a_reserve);
    suite_add_tcase(s, tc);
    return kt_run(s);
}
