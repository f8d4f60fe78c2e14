/* tests/test_alert.c — keel_alert: Prometheus's state machine under a fake
 * clock, rate with counter resets, ratio NaN, quantile interpolation, the
 * rule language and its errors, the keel_alerts series, the JSON. */
#define _GNU_SOURCE
#include <ctype.h>
#include <locale.h>
#include <malloc.h>
#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <keel.h>

#include "harness.h"

#define MIN (60 * KT_S)

typedef struct fixture {
    kt_clock clock;
    keel_metrics *m;
    keel_alerts *a;
    int changes;
    keel_alert_state last_from, last_to;
    char last_name[64];
} fixture;

static uint64_t wall(void *ud)
{
    /* 2026-11-26T00:00:00Z plus the fake monotonic time */
    return 1795651200ull * KT_S + kt_clock_now(ud);
}

static void on_change(const keel_alert_info *al, keel_alert_state from, keel_alert_state to, void *ud)
{
    fixture *f = ud;
    f->changes++;
    f->last_from = from;
    f->last_to = to;
    snprintf(f->last_name, sizeof f->last_name, "%s", al->name);
}

/* Alerts evaluated every minute, re-sent every resend_ns (0: the default). */
static void setup_resend(fixture *f, uint64_t resend_ns)
{
    memset(f, 0, sizeof *f);
    keel_metrics_opts mo = {0};
    ck_assert_int_eq(keel_metrics_create(&f->m, &mo), 0);
    keel_alerts_opts o = {.metrics = f->m, .eval_interval_ns = MIN, .resend_delay_ns = resend_ns,
                          .on_change = on_change, .ud = f, .clock = kt_clock_now, .wall_clock = wall,
                          .clock_ud = &f->clock, .generator_url = "http://svc/alerts"};
    ck_assert_int_eq(keel_alerts_create(&f->a, &o), 0);
}

static void setup(fixture *f) { setup_resend(f, 0); }

static void teardown(fixture *f)
{
    keel_alerts_destroy(f->a);
    keel_metrics_destroy(f->m);
}

/* One evaluation, a minute after the previous one. */
static void tick(fixture *f)
{
    ck_assert_int_eq(keel_alerts_tick(f->a), 1);
    kt_clock_advance(&f->clock, MIN);
}

static void read_state(const keel_alert_info *al, void *ud) { *(keel_alert_info *)ud = *al; }

static keel_alert_state state(fixture *f, const char *name)
{
    keel_alert_info in;
    ck_assert_int_eq(keel_alerts_get(f->a, name, read_state, &in), 0);
    return in.state;
}

static double value_of(fixture *f, const char *name)
{
    keel_alert_info in;
    ck_assert_int_eq(keel_alerts_get(f->a, name, read_state, &in), 0);
    return in.value;
}

static keel_gauge_child *gauge(fixture *f, const char *name)
{
    keel_gauge *g;
    ck_assert_int_eq(keel_metrics_gauge(f->m, name, "", NULL, 0, &g), 0);
    return keel_gauge_with(g);
}

/* Runs `promtool test rules` over a rule file and its unit test (the
 * real Prometheus semantics the expectations of a test are checked
 * against); fails, not skips, without promtool. Returns its exit status,
 * and its output in msg. Debian's promtool is 2.42, while keel follows
 * Prometheus 3 (a left-open window, and rate()'s start extrapolation
 * capped at the counter's zero only after the threshold test): the cases
 * checked with it are ones where the two versions agree. */
static int promtool_rules(const char *rules, const char *test, char *msg, size_t len)
{
    char dir[] = "/tmp/keel-alert-XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    char path[2][64];
    const char *text[2] = {rules, test};
    for (int i = 0; i < 2; i++) {
        snprintf(path[i], sizeof path[i], "%s/%s", dir, i ? "test.yml" : "rules.yml");
        FILE *fp = fopen(path[i], "w");
        ck_assert_ptr_nonnull(fp);
        ck_assert(fputs(text[i], fp) >= 0);
        ck_assert_int_eq(fclose(fp), 0);
    }
    char cmd[256];
    snprintf(cmd, sizeof cmd, "cd %s && promtool test rules test.yml 2>&1", dir);
    FILE *pr = popen(cmd, "r");
    ck_assert_ptr_nonnull(pr);
    size_t got = fread(msg, 1, len - 1, pr);
    msg[got] = '\0';
    int st = pclose(pr);
    for (int i = 0; i < 2; i++)
        unlink(path[i]);
    rmdir(dir);
    ck_assert_msg(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) != 127,
                  "promtool not found: install Debian's prometheus package");
    return WEXITSTATUS(st);
}

START_TEST(pending_then_firing_after_for_then_resolved)
{
    fixture f;
    setup(&f);
    keel_gauge_child *mem = gauge(&f, "memory_usage_ratio");
    ck_assert_int_eq(keel_alerts_add(f.a, "MemoryHigh", "last(memory_usage_ratio[1m]) > 0.9 for 2m",
                                     (const char *[]){"severity", "page"}, 1,
                                     (const char *[]){"summary", "memory is \"high\""}, 1, NULL), 0);
    keel_gauge_set(mem, 0.95);
    tick(&f); /* t=0: pending */
    ck_assert_int_eq(state(&f, "MemoryHigh"), KEEL_ALERT_PENDING);
    ck_assert_int_eq(f.last_to, KEEL_ALERT_PENDING);
    tick(&f); /* t=1m: still pending */
    ck_assert_int_eq(state(&f, "MemoryHigh"), KEEL_ALERT_PENDING);
    tick(&f); /* t=2m: true for 2m: firing */
    ck_assert_int_eq(state(&f, "MemoryHigh"), KEEL_ALERT_FIRING);
    ck_assert_int_eq(f.last_from, KEEL_ALERT_PENDING);
    ck_assert_int_eq(f.changes, 2);
    keel_gauge_set(mem, 0.5);
    tick(&f); /* t=3m: resolved */
    ck_assert_int_eq(state(&f, "MemoryHigh"), KEEL_ALERT_RESOLVED);
    ck_assert_int_eq(f.last_to, KEEL_ALERT_RESOLVED);
    for (int i = 0; i < 15; i++) /* kept for 15 minutes ... */
        tick(&f);
    ck_assert_int_eq(state(&f, "MemoryHigh"), KEEL_ALERT_RESOLVED);
    tick(&f); /* ... then gone */
    ck_assert_int_eq(state(&f, "MemoryHigh"), KEEL_ALERT_INACTIVE);
    teardown(&f);
}
END_TEST

/* A host program that chose a decimal comma for its numbers: rules are
 * still read with a point. */
START_TEST(rules_read_a_point_under_a_decimal_comma_locale)
{
    kt_decimal_comma();
    fixture f;
    setup(&f);
    keel_gauge_child *mem = gauge(&f, "memory_usage_ratio");
    ck_assert_int_eq(keel_alerts_add(f.a, "MemoryHigh", "last(memory_usage_ratio[90s]) > 0.9", NULL, 0, NULL, 0,
                                     NULL), 0);
    keel_gauge_set(mem, 0.5); /* over 0 (what a comma reading of 0.9 gives), under 0.9 */
    tick(&f);
    ck_assert_int_eq(state(&f, "MemoryHigh"), KEEL_ALERT_INACTIVE);
    keel_gauge_set(mem, 0.95);
    tick(&f);
    ck_assert_int_eq(state(&f, "MemoryHigh"), KEEL_ALERT_FIRING);
    teardown(&f);
    setlocale(LC_NUMERIC, "C");
}
END_TEST

/* A compound duration adds up its parts: 1h30m is 90 minutes. */
START_TEST(compound_durations_add_up)
{
    fixture f;
    setup(&f);
    keel_gauge_child *g = gauge(&f, "queue_depth");
    ck_assert_int_eq(keel_alerts_add(f.a, "Deep", "last(queue_depth[1m]) > 0 for 1h30m", NULL, 0, NULL, 0,
                                     NULL), 0);
    ck_assert_int_eq(keel_alerts_add(f.a, "Brief", "last(queue_depth[1m]) > 0 for 1m30s", NULL, 0, NULL, 0,
                                     NULL), 0);
    keel_gauge_set(g, 1);
    for (int t = 0; t <= 90; t++) {
        tick(&f);
        ck_assert_msg(state(&f, "Deep") == (t < 90 ? KEEL_ALERT_PENDING : KEEL_ALERT_FIRING), "t=%dm", t);
        ck_assert_msg(state(&f, "Brief") == (t < 2 ? KEEL_ALERT_PENDING : KEEL_ALERT_FIRING), "t=%dm", t);
    }
    teardown(&f);
}
END_TEST

START_TEST(a_condition_that_clears_while_pending_is_dropped_silently)
{
    fixture f;
    setup(&f);
    keel_gauge_child *g = gauge(&f, "queue_depth");
    ck_assert_int_eq(keel_alerts_add(f.a, "Deep", "last(queue_depth[1m]) >= 100 for 5m", NULL, 0,
                                     NULL, 0, NULL), 0);
    keel_gauge_set(g, 150);
    tick(&f);
    tick(&f);
    keel_gauge_set(g, 10);
    tick(&f);
    ck_assert_int_eq(state(&f, "Deep"), KEEL_ALERT_INACTIVE);
    ck_assert_int_eq(f.last_from, KEEL_ALERT_PENDING);
    char *json;
    ck_assert_int_eq(keel_alerts_to_send(f.a, &json, NULL), 0);
    ck_assert_str_eq(json, "[]"); /* never sent */
    keel_free(json);
    teardown(&f);
}
END_TEST

START_TEST(no_for_fires_at_once_and_keep_firing_for_holds_it)
{
    fixture f;
    setup(&f);
    keel_gauge_child *g = gauge(&f, "errors_now");
    ck_assert_int_eq(keel_alerts_add(f.a, "Flappy", "last(errors_now[1m]) > 0 keep_firing_for 3m",
                                     NULL, 0, NULL, 0, NULL), 0);
    keel_gauge_set(g, 1);
    tick(&f);
    ck_assert_int_eq(state(&f, "Flappy"), KEEL_ALERT_FIRING); /* pending and firing in one go */
    ck_assert_int_eq(f.changes, 2);
    keel_gauge_set(g, 0);
    tick(&f); /* false since now: kept */
    tick(&f);
    tick(&f);
    ck_assert_int_eq(state(&f, "Flappy"), KEEL_ALERT_FIRING);
    keel_gauge_set(g, 1); /* true again: the hold starts over */
    tick(&f);
    keel_gauge_set(g, 0);
    tick(&f);
    tick(&f);
    tick(&f);
    ck_assert_int_eq(state(&f, "Flappy"), KEEL_ALERT_FIRING);
    tick(&f); /* 3 minutes false */
    ck_assert_int_eq(state(&f, "Flappy"), KEEL_ALERT_RESOLVED);
    teardown(&f);
}
END_TEST

START_TEST(rate_corrects_counter_resets_and_empty_windows_never_fire)
{
    fixture f;
    setup(&f);
    keel_gauge_child *reqs = gauge(&f, "requests_seen"); /* set as a counter would count */
    ck_assert_int_eq(keel_alerts_add(f.a, "Busy", "rate(requests_seen[5m]) > 1", NULL, 0, NULL, 0,
                                     NULL), 0);
    tick(&f); /* no samples at all */
    ck_assert_int_eq(state(&f, "Busy"), KEEL_ALERT_INACTIVE);
    /* a restart (the counter back to 0) in the middle of the window */
    double values[] = {0, 120, 240, 360, 60, 180, 300};
    keel_alert_info in;
    for (size_t i = 0; i < sizeof values / sizeof values[0]; i++) {
        keel_gauge_set(reqs, values[i]);
        tick(&f);
    }
    ck_assert_int_eq(keel_alerts_get(f.a, "Busy", read_state, &in), 0);
    /* Prometheus's extrapolatedRate on (1m, 6m]: 240 360 60 180 300 is an
     * increase of 60 + 360 (the reset) = 420 over 4 minutes, extrapolated
     * by one more minute to the window start: 525 / 300 s. Without the
     * reset correction it would be 60. */
    ck_assert_double_eq_tol(in.value, 1.75, 1e-9);
    ck_assert_int_eq(in.state, KEEL_ALERT_FIRING);
    teardown(&f);
}
END_TEST

/* Prometheus 3's extrapolatedRate: the gap to the window's start is
 * judged against 1.1 x the average interval first, and only then capped
 * at the counter's zero. x_total = 40, 90, 140 at 0, 1m, 2m; at 2m the
 * window (-3m, 2m] holds all three: an increase of 100 over 120 s, 60 s
 * between samples. 180 s to the start is beyond 66 s, so half an interval
 * (30 s); the zero lies 120 x 40/100 = 48 s back, farther, so 30 s stays;
 * the end is 0 s away. 100 x 150/120 / 300 s = 0.41667. (Prometheus 2,
 * as promtool 2.42, capped first: 48 s, under 66 s, gives 0.46667.) */
START_TEST(rate_extrapolates_as_prometheus_3)
{
    fixture f;
    setup(&f);
    keel_counter *c;
    ck_assert_int_eq(keel_metrics_counter(f.m, "x_total", "", NULL, 0, &c), 0);
    keel_counter_child *x = keel_counter_with(c);
    ck_assert_int_eq(keel_alerts_add(f.a, "R", "rate(x_total[5m]) > 0.45", NULL, 0, NULL, 0, NULL), 0);
    for (int i = 0; i < 3; i++) {
        keel_counter_add(x, i ? 50 : 40);
        tick(&f);
    }
    ck_assert_double_eq_tol(value_of(&f, "R"), 100.0 * 150 / 120 / 300, 1e-12);
    ck_assert_int_eq(state(&f, "R"), KEEL_ALERT_INACTIVE);
    teardown(&f);
}
END_TEST

START_TEST(ratio_of_nothing_is_nan_and_never_fires)
{
    fixture f;
    setup(&f);
    keel_counter *err, *all;
    keel_metrics_counter(f.m, "errors_total", "", NULL, 0, &err);
    keel_metrics_counter(f.m, "requests_total", "", NULL, 0, &all);
    keel_counter_child *e = keel_counter_with(err), *r = keel_counter_with(all);
    ck_assert_int_eq(keel_alerts_add(f.a, "ErrorRatio",
                                     "ratio(rate(errors_total[5m]), rate(requests_total[5m])) > 0.05 for 5m",
                                     NULL, 0, NULL, 0, NULL), 0);
    /* no traffic: 0/0 */
    for (int i = 0; i < 8; i++)
        tick(&f);
    keel_alert_info in;
    keel_alerts_get(f.a, "ErrorRatio", read_state, &in);
    ck_assert(isnan(in.value));
    ck_assert_int_eq(in.state, KEEL_ALERT_INACTIVE);
    /* 10% errors for long enough */
    for (int i = 0; i < 8; i++) {
        keel_counter_add(r, 100);
        keel_counter_add(e, 10);
        tick(&f);
    }
    keel_alerts_get(f.a, "ErrorRatio", read_state, &in);
    ck_assert_double_eq_tol(in.value, 0.1, 1e-9);
    ck_assert_int_eq(in.state, KEEL_ALERT_FIRING);
    teardown(&f);
}
END_TEST

/* A selector adds up the series whose labels match; as in Prometheus, a
 * matcher with an empty value also matches series without that label. */
START_TEST(selectors_add_up_matching_series_and_empty_matches_absent)
{
    fixture f;
    setup(&f);
    keel_gauge *g;
    ck_assert_int_eq(keel_metrics_gauge(f.m, "inflight", "", (const char *[]){"method", "code"}, 2, &g), 0);
    keel_gauge_set(keel_gauge_with(g, "GET", "200"), 1);
    keel_gauge_set(keel_gauge_with(g, "GET", "500"), 10);
    keel_gauge_set(keel_gauge_with(g, "POST", "500"), 100);
    static const struct {
        const char *rule;
        double want; /* NaN: no series matched */
    } cases[] = {
        {"last(inflight[1m]) > 0", 111},
        {"last(inflight{code=\"500\"}[1m]) > 0", 110},
        {"last(inflight{code=\"500\",method=\"GET\"}[1m]) > 0", 10},
        {"last(inflight{region=\"\"}[1m]) > 0", 111},
        {"last(inflight{region=\"\",code=\"200\"}[1m]) > 0", 1},
        {"last(inflight{region=\"eu\"}[1m]) > 0", NAN},
        {"last(inflight{code=\"\"}[1m]) > 0", NAN},
    };
    char name[8];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(name, sizeof name, "R%zu", i);
        ck_assert_int_eq(keel_alerts_add(f.a, name, cases[i].rule, NULL, 0, NULL, 0, NULL), 0);
    }
    tick(&f);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(name, sizeof name, "R%zu", i);
        double v = value_of(&f, name);
        if (isnan(cases[i].want))
            ck_assert_msg(isnan(v), "%s: %g, want NaN", cases[i].rule, v);
        else
            ck_assert_msg(v == cases[i].want, "%s: %g, want %g", cases[i].rule, v, cases[i].want);
    }
    teardown(&f);
}
END_TEST

static double quantile_after(fixture *f, const char *rule, const double *obs, size_t n)
{
    keel_histogram *h;
    keel_metrics_histogram(f->m, "lat_seconds", "", NULL, 0, (const double[]){0.1, 0.5, 1}, 3, &h);
    keel_histogram_child *c = keel_histogram_with(h);
    ck_assert_int_eq(keel_alerts_add(f->a, "Q", rule, NULL, 0, NULL, 0, NULL), 0);
    tick(f);
    for (size_t i = 0; i < n; i++)
        keel_histogram_observe(c, obs[i]);
    tick(f);
    keel_alert_info in;
    keel_alerts_get(f->a, "Q", read_state, &in);
    return in.value;
}

/* A gauge that is NaN all over the window has no minimum and no maximum:
 * min_over_time and max_over_time give NaN, which compares false, so
 * neither alert fires (promtool agrees). */
START_TEST(min_and_max_of_a_window_of_nan_are_nan)
{
    static const char rules[] = "groups:\n"
                                "- name: g\n"
                                "  rules:\n"
                                "  - alert: Low\n"
                                "    expr: min_over_time(ratio_now[3m]) > 0\n"
                                "  - alert: High\n"
                                "    expr: max_over_time(ratio_now[3m]) < 0\n";
    static const char test[] = "rule_files: [rules.yml]\n"
                               "evaluation_interval: 1m\n"
                               "tests:\n"
                               "- interval: 1m\n"
                               "  input_series:\n"
                               "  - series: ratio_now\n"
                               "    values: NaN NaN NaN\n"
                               "  alert_rule_test:\n"
                               "  - {eval_time: 2m, alertname: Low, exp_alerts: []}\n"
                               "  - {eval_time: 2m, alertname: High, exp_alerts: []}\n";
    char msg[4096];
    ck_assert_msg(promtool_rules(rules, test, msg, sizeof msg) == 0, "%s", msg);
    fixture f;
    setup(&f);
    keel_gauge_child *g = gauge(&f, "ratio_now");
    ck_assert_int_eq(keel_alerts_add(f.a, "Low", "min(ratio_now[3m]) > 0", NULL, 0, NULL, 0, NULL), 0);
    ck_assert_int_eq(keel_alerts_add(f.a, "High", "max(ratio_now[3m]) < 0", NULL, 0, NULL, 0, NULL), 0);
    keel_gauge_set(g, NAN);
    for (int i = 0; i < 3; i++)
        tick(&f);
    ck_assert(isnan(value_of(&f, "Low")));
    ck_assert(isnan(value_of(&f, "High")));
    ck_assert_int_eq(state(&f, "Low"), KEEL_ALERT_INACTIVE);
    ck_assert_int_eq(state(&f, "High"), KEEL_ALERT_INACTIVE);
    keel_gauge_set(g, 2); /* one number among NaNs is the minimum and the maximum */
    tick(&f);
    ck_assert_double_eq(value_of(&f, "Low"), 2);
    ck_assert_double_eq(value_of(&f, "High"), 2);
    teardown(&f);
}
END_TEST

START_TEST(quantiles_interpolate_as_prometheus)
{
    fixture f;
    /* 10 observations in (0.1, 0.5]: p50 halfway into that bucket */
    double mid[10];
    for (int i = 0; i < 10; i++)
        mid[i] = 0.3;
    setup(&f);
    ck_assert_double_eq_tol(quantile_after(&f, "quantile(0.5, lat_seconds[5m]) > 0", mid, 10), 0.3, 1e-9);
    teardown(&f);
    /* all in the first bucket: its lower edge is 0 */
    double low[4] = {0.01, 0.02, 0.03, 0.04};
    setup(&f);
    ck_assert_double_eq_tol(quantile_after(&f, "quantile(0.5, lat_seconds[5m]) > 0", low, 4), 0.05, 1e-9);
    teardown(&f);
    /* beyond the last bound: the highest finite bound */
    double high[4] = {5, 6, 7, 8};
    setup(&f);
    ck_assert_double_eq_tol(quantile_after(&f, "quantile(0.95, lat_seconds[5m]) > 0", high, 4), 1.0, 1e-9);
    teardown(&f);
    /* nothing observed: NaN */
    setup(&f);
    ck_assert(isnan(quantile_after(&f, "quantile(0.95, lat_seconds[5m]) > 0", NULL, 0)));
    teardown(&f);
}
END_TEST

/* A selector over a counter family judges resets per series: a child that
 * is removed takes its count out of the sum, and that drop is no reset.
 * Two children at 1000 count 5 a minute each; one is removed. Prometheus's
 * sum(rate(req_total[5m])) is 1/6 just after and 1/12 once the removed one
 * has left the window (promtool agrees, and nothing fires); keel's rate of
 * the total of per-series increases extrapolates that total, not each
 * series: 35 over 4 minutes, 5/4 of it over 300 s, then the same 1/12. */
START_TEST(a_removed_counter_child_is_no_reset)
{
    static const char rules[] = "groups:\n"
                                "- name: g\n"
                                "  rules:\n"
                                "  - alert: Busy\n"
                                "    expr: sum(rate(req_total[5m])) > 1\n";
    static const char test[] = "rule_files: [rules.yml]\n"
                               "evaluation_interval: 1m\n"
                               "tests:\n"
                               "- interval: 1m\n"
                               "  input_series:\n"
                               "  - series: 'req_total{instance=\"a\"}'\n"
                               "    values: 1000+5x8\n"
                               "  - series: 'req_total{instance=\"b\"}'\n"
                               "    values: 1000+5x3 stale\n"
                               "  promql_expr_test:\n"
                               "  - expr: sum(rate(req_total[5m]))\n"
                               "    eval_time: 4m\n"
                               "    exp_samples: [{labels: '{}', value: 0.16666666666666669}]\n"
                               "  - expr: sum(rate(req_total[5m]))\n"
                               "    eval_time: 8m\n"
                               "    exp_samples: [{labels: '{}', value: 0.08333333333333334}]\n"
                               "  alert_rule_test:\n"
                               "  - {eval_time: 4m, alertname: Busy, exp_alerts: []}\n"
                               "  - {eval_time: 8m, alertname: Busy, exp_alerts: []}\n";
    char msg[4096];
    ck_assert_msg(promtool_rules(rules, test, msg, sizeof msg) == 0, "%s", msg);
    fixture f;
    setup(&f);
    keel_counter *c;
    ck_assert_int_eq(keel_metrics_counter(f.m, "req_total", "", (const char *[]){"instance"}, 1, &c), 0);
    keel_counter_child *a = keel_counter_with(c, "a"), *b = keel_counter_with(c, "b");
    keel_counter_add(a, 1000);
    keel_counter_add(b, 1000);
    ck_assert_int_eq(keel_alerts_add(f.a, "Busy", "rate(req_total[5m]) > 1", NULL, 0, NULL, 0, NULL), 0);
    for (int t = 0; t <= 8; t++) {
        if (t) {
            keel_counter_add(a, 5);
            if (t < 4)
                keel_counter_add(b, 5);
        }
        if (t == 4)
            ck_assert_int_eq(keel_counter_remove(c, (const char *[]){"b"}, 1), 0);
        tick(&f);
        if (t == 4)
            ck_assert_double_eq_tol(value_of(&f, "Busy"), 35.0 * 5 / 4 / 300, 1e-9);
        if (t >= 4) {
            double v = value_of(&f, "Busy");
            ck_assert_msg(v > 0.08 && v < 0.17, "t=%dm: rate %g", t, v);
        }
        ck_assert_int_eq(state(&f, "Busy"), KEEL_ALERT_INACTIVE);
    }
    ck_assert_double_eq_tol(value_of(&f, "Busy"), 1.0 / 12, 1e-9);
    /* a child removed and made again counts from 0: its new count is an
     * increase (its own reset), even above the old one */
    ck_assert_int_eq(keel_counter_remove(c, (const char *[]){"a"}, 1), 0);
    a = keel_counter_with(c, "a");
    keel_counter_add(a, 1100);
    tick(&f);
    ck_assert_double_eq_tol(value_of(&f, "Busy"), (1100.0 + 15) * 5 / 4 / 300, 1e-9);
    teardown(&f);
}
END_TEST

/* The same per bucket for histogram_quantile: removing one child's buckets
 * is no reset of the sum's buckets. Everything observed in the window is
 * 0.3 s, the middle of (0.1, 0.5]: the median stays 0.3. */
START_TEST(a_removed_histogram_child_is_no_reset)
{
    fixture f;
    setup(&f);
    keel_histogram *h;
    ck_assert_int_eq(keel_metrics_histogram(f.m, "lat_seconds", "", (const char *[]){"instance"}, 1,
                                            (const double[]){0.1, 0.5, 1}, 3, &h), 0);
    keel_histogram_child *a = keel_histogram_with(h, "a"), *b = keel_histogram_with(h, "b");
    for (int i = 0; i < 1000; i++) {
        keel_histogram_observe(a, 0.05);
        keel_histogram_observe(b, 0.05);
    }
    ck_assert_int_eq(keel_alerts_add(f.a, "Fast", "quantile(0.5, lat_seconds[5m]) < 0.2", NULL, 0,
                                     NULL, 0, NULL), 0);
    for (int t = 0; t <= 8; t++) {
        if (t) {
            for (int i = 0; i < 10; i++) {
                keel_histogram_observe(a, 0.3);
                if (t < 4)
                    keel_histogram_observe(b, 0.3);
            }
        }
        if (t == 4)
            ck_assert_int_eq(keel_histogram_remove(h, (const char *[]){"b"}, 1), 0);
        tick(&f);
        if (t)
            ck_assert_msg(fabs(value_of(&f, "Fast") - 0.3) < 1e-9, "t=%dm: p50 %g", t,
                          value_of(&f, "Fast"));
        ck_assert_int_eq(state(&f, "Fast"), KEEL_ALERT_INACTIVE);
    }
    teardown(&f);
}
END_TEST

/* Gauges are not counters: a selector over them is still the plain sum,
 * and a removed child's value leaves it at once. */
START_TEST(a_removed_gauge_child_leaves_the_sum)
{
    fixture f;
    setup(&f);
    keel_gauge *g;
    ck_assert_int_eq(keel_metrics_gauge(f.m, "queue_depth", "", (const char *[]){"q"}, 1, &g), 0);
    keel_gauge_set(keel_gauge_with(g, "a"), 3);
    keel_gauge_set(keel_gauge_with(g, "b"), 4);
    ck_assert_int_eq(keel_alerts_add(f.a, "Deep", "last(queue_depth[1m]) > 5", NULL, 0, NULL, 0, NULL), 0);
    tick(&f);
    ck_assert_double_eq(value_of(&f, "Deep"), 7);
    ck_assert_int_eq(keel_gauge_remove(g, (const char *[]){"b"}, 1), 0);
    tick(&f);
    ck_assert_double_eq(value_of(&f, "Deep"), 3);
    teardown(&f);
}
END_TEST

/* avg, min, max and last are over a gauge's values: over a counter or a
 * histogram the selector's samples are a running total of increases, not
 * the value (a counter at 100, removed and made again with 5, would read
 * 105 where Prometheus's last_over_time reads 5). A family already
 * registered as one is refused at once, where its selector starts; one
 * registered later makes them NaN, which never fires. */
START_TEST(gauge_functions_refuse_counting_families)
{
    fixture f;
    setup(&f);
    keel_counter *c;
    ck_assert_int_eq(keel_metrics_counter(f.m, "x_total", "", (const char *[]){"k"}, 1, &c), 0);
    keel_histogram *h;
    ck_assert_int_eq(keel_metrics_histogram(f.m, "lat_seconds", "", NULL, 0, NULL, 0, &h), 0);
    static const struct {
        const char *rule;
        size_t pos;
    } bad[] = {
        {"last(x_total[1m]) > 50", 5},
        {"avg(x_total{k=\"a\"}[1m]) > 50", 4},
        {"rate(x_total[5m]) > 1 and min( x_total[1m]) > 50", 31},
        {"ratio(max(lat_seconds[1m]), 2) > 1", 10},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        size_t pos = 99;
        ck_assert_msg(keel_alerts_add(f.a, "R", bad[i].rule, NULL, 0, NULL, 0, &pos) == KEEL_EINVAL,
                      "%s taken", bad[i].rule);
        ck_assert_msg(pos == bad[i].pos, "\"%s\": error at %zu, want %zu", bad[i].rule, pos, bad[i].pos);
    }
    ck_assert_int_eq(keel_alerts_add(f.a, "Rate", "rate(x_total[5m]) >= 0", NULL, 0, NULL, 0, NULL), 0);
    /* made after the rule: known only when evaluated */
    ck_assert_int_eq(keel_alerts_add(f.a, "Late", "last(y_total[1m]) > 50", NULL, 0, NULL, 0, NULL), 0);
    keel_counter *y;
    ck_assert_int_eq(keel_metrics_counter(f.m, "y_total", "", (const char *[]){"k"}, 1, &y), 0);
    keel_counter_add(keel_counter_with(y, "a"), 100);
    tick(&f);
    ck_assert(isnan(value_of(&f, "Late")));
    ck_assert_int_eq(keel_counter_remove(y, (const char *[]){"a"}, 1), 0);
    keel_counter_add(keel_counter_with(y, "a"), 5);
    tick(&f);
    ck_assert(isnan(value_of(&f, "Late")));
    ck_assert_int_eq(state(&f, "Late"), KEEL_ALERT_INACTIVE);
    teardown(&f);
}
END_TEST

/* Bytes libkeel holds, counted by an allocator over malloc. */
static _Atomic long live_bytes;
static void *count_malloc(size_t n)
{
    void *p = malloc(n);
    if (p)
        live_bytes += (long)malloc_usable_size(p);
    return p;
}
static void *count_calloc(size_t n, size_t size)
{
    void *p = calloc(n, size);
    if (p)
        live_bytes += (long)malloc_usable_size(p);
    return p;
}
static void *count_realloc(void *old, size_t n)
{
    long before = old ? (long)malloc_usable_size(old) : 0;
    void *p = realloc(old, n);
    if (p)
        live_bytes += (long)malloc_usable_size(p) - before;
    return p;
}
static void count_free(void *p)
{
    live_bytes -= p ? (long)malloc_usable_size(p) : 0;
    free(p);
}

/* A rule refused after it named a selector another rule has (here with a
 * window of a year) leaves that selector's history as long as it was:
 * otherwise the refused rule would keep a year of samples for good. */
START_TEST(a_refused_rule_keeps_no_history)
{
    static const keel_allocator counting = {count_malloc, count_calloc, count_realloc, count_free};
    ck_assert_int_eq(keel_set_allocator(&counting), 0);
    fixture f;
    setup(&f);
    keel_gauge_child *g = gauge(&f, "load");
    keel_gauge_set(g, 1);
    ck_assert_int_eq(keel_alerts_add(f.a, "Short", "avg(load[2m]) > 1000", NULL, 0, NULL, 0, NULL), 0);
    const char *refused[] = {"avg(load[1y]) > 1 fro 5m", "max(load[1y]) > 1 and last(x_total[1m]) > 1"};
    keel_counter *c;
    ck_assert_int_eq(keel_metrics_counter(f.m, "x_total", "", NULL, 0, &c), 0);
    for (size_t i = 0; i < 2; i++)
        ck_assert_int_eq(keel_alerts_add(f.a, "Refused", refused[i], NULL, 0, NULL, 0, NULL),
                         KEEL_EINVAL);
    for (int i = 0; i < 20; i++)
        tick(&f);
    long settled = live_bytes;
    for (int i = 0; i < 500; i++)
        tick(&f);
    ck_assert_msg(live_bytes <= settled, "%ld bytes more after 500 evaluations", live_bytes - settled);
    teardown(&f);
    ck_assert_int_eq(keel_set_allocator(NULL), 0);
}
END_TEST

/* Matcher values are PromQL strings: Go's escapes, and no others. */
START_TEST(matcher_values_unescape_as_promql)
{
    fixture f;
    setup(&f);
    keel_gauge *g;
    ck_assert_int_eq(keel_metrics_gauge(f.m, "g", "", (const char *[]){"p"}, 1, &g), 0);
    static const struct {
        const char *value, *escaped;
        double v;
    } cases[] = {
        {"a\tb", "a\\tb", 1},          {"atb", "atb", 2},         {"a\rb\x07\v\f\b", "a\\rb\\a\\v\\f\\b", 3},
        {"A\xc3\xa9", "\\x41\\u00e9", 4}, {"A\xf0\x9f\x98\x80", "\\101\\U0001F600", 5}, {"q\"\\", "q\\\"\\\\", 6},
        {"l\nm", "l\\nm", 7},
    };
    size_t n = sizeof cases / sizeof cases[0];
    for (size_t i = 0; i < n; i++)
        keel_gauge_set(keel_gauge_with(g, cases[i].value), cases[i].v);
    for (size_t i = 0; i < n; i++) {
        char rule[128], name[8];
        snprintf(rule, sizeof rule, "last(g{p=\"%s\"}[1m]) > 0", cases[i].escaped);
        snprintf(name, sizeof name, "R%zu", i);
        ck_assert_msg(keel_alerts_add(f.a, name, rule, NULL, 0, NULL, 0, NULL) == 0, "%s refused", rule);
    }
    tick(&f);
    for (size_t i = 0; i < n; i++) {
        char name[8];
        snprintf(name, sizeof name, "R%zu", i);
        ck_assert_msg(value_of(&f, name) == cases[i].v, "%s: %g, want %g", cases[i].escaped,
                      value_of(&f, name), cases[i].v);
    }
    /* no such escape, one cut short, a surrogate, past U+10FFFF, octal past
     * 255, \' in "", NUL (no label value has one: it would match "a") */
    const char *bad[] = {"\\q",   "\\x4", "\\u00e", "\\ud800", "\\U00110000",
                         "\\400", "\\'",  "\\x00",  "\\000",  "\\u0000"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char rule[128];
        snprintf(rule, sizeof rule, "last(g{p=\"a%s\"}[1m]) > 0", bad[i]);
        size_t pos = 0;
        ck_assert_msg(keel_alerts_add(f.a, "Bad", rule, NULL, 0, NULL, 0, &pos) == KEEL_EINVAL, "%s taken", rule);
        ck_assert_msg(pos == 11, "%s: error at %zu, want 11", rule, pos);
    }
    teardown(&f);
}
END_TEST

START_TEST(malformed_rules_report_where)
{
    fixture f;
    setup(&f);
    struct {
        const char *rule;
        size_t pos;
    } bad[] = {
        {"rate(x[5m]) >", 13},
        {"rate(x[5q]) > 1", 8},
        {"rate(x[0s]) > 1", 7},
        /* durations are Prometheus's: integers and units, largest first */
        {"rate(x[1e-300ms]) > 1", 8},
        {"rate(x[0x10m]) > 1", 8},
        {"rate(x[+5m]) > 1", 7},
        {"rate(x[1e3s]) > 1", 8},
        {"rate(x[1.5m]) > 1", 8},
        {"rate(x[5 m]) > 1", 9},
        {"rate(x[5m1h]) > 1", 10},
        {"rate(x[1m1m]) > 1", 10},
        {"rate(x[30s1ms5m]) > 1", 14},
        {"rate(x[5mx]) > 1", 9},
        {"rate(x[5m_]) > 1", 9},
        {"rate(x[0]) > 1", 7},
        {"rate(x[0ms]) > 1", 7},
        {"rate(x[32y]) > 1", 7}, /* past about 31 years */
        {"rate(x[99999999999999999999999s]) > 1", 7},
        {"last(x[1m]) > 1 for 5m3", 23},
        {"last(x[1m]) > 1 for -5m", 20},
        {"rate(x[5m] > 1", 11},
        {"foo(x[5m]) > 1", 0},
        {"last(x[1m]) > 1 for", 19},
        {"last(x[1m]) > 1 extra", 16},
        {"last(x{a=\"b\"[1m]) > 1", 12},
        {"last(x{a\"b\"[1m]) > 1", 8}, /* a label name without "=" (once leaked it) */
        {"last(x{a=\"b\",c[1m]) > 1", 14},
        {"", 0},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        size_t pos = 99;
        ck_assert_msg(keel_alerts_add(f.a, "Bad", bad[i].rule, NULL, 0, NULL, 0, &pos) == KEEL_EINVAL, "%s taken",
                      bad[i].rule);
        ck_assert_msg(pos == bad[i].pos, "\"%s\": error at %zu, want %zu", bad[i].rule, pos, bad[i].pos);
    }
    ck_assert_int_eq(keel_alerts_add(f.a, "Ok", "max(x{a=\"b\",c=\"d\"}[90s]) <= 1.5e3 and last(y[1h]) != 0",
                                     NULL, 0, NULL, 0, NULL), 0);
    ck_assert_int_eq(keel_alerts_add(f.a, "Ok", "last(x[1m]) > 1", NULL, 0, NULL, 0, NULL), KEEL_EEXIST);
    ck_assert_int_eq(keel_alerts_add(f.a, "Now", "last(x[1m]) > 1 for 0s keep_firing_for 0m", NULL, 0, NULL, 0,
                                     NULL), 0); /* fires at once, as in Prometheus */
    static const char *const good[] = {
        "last(x[1y]) > 1", "last(x[2w]) > 1", "last(x[1d12h]) > 1", "last(x[1500ms]) > 1",
        "last(x[1y2w3d4h5m6s7ms]) > 1", "last(x[1m0s]) > 1", "last(x[05m]) > 1",
        "last(x[31y]) > 1", "last(x[1m]) > 1 for 0 keep_firing_for 0",
    };
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        char name[16];
        snprintf(name, sizeof name, "Good%zu", i);
        ck_assert_msg(keel_alerts_add(f.a, name, good[i], NULL, 0, NULL, 0, NULL) == 0, "%s refused", good[i]);
    }
    ck_assert_int_eq(keel_alerts_add(NULL, "x", "last(x[1m]) > 1", NULL, 0, NULL, 0, NULL), KEEL_EINVAL);
    /* pair counts whose name-and-value count overflows (once one wrapped
     * to an empty list, was taken, and crashed keel_alerts_to_send()) */
    const char *pair[] = {"severity", "page"};
    ck_assert_int_eq(keel_alerts_add(f.a, "Big", "last(x[1m]) > 1", pair, SIZE_MAX / 2 + 1, NULL, 0, NULL),
                     KEEL_EINVAL);
    ck_assert_int_eq(keel_alerts_add(f.a, "Big", "last(x[1m]) > 1", NULL, 0, pair, SIZE_MAX / 2 + 1, NULL),
                     KEEL_EINVAL);
    ck_assert_int_eq(keel_alerts_add(f.a, "Big", "last(x[1m]) > 1", pair, SIZE_MAX, NULL, 0, NULL), KEEL_EINVAL);
    ck_assert_int_eq(keel_alerts_add(f.a, "Big", "last(x[1m]) > 1", pair, 1, pair, 1, NULL), 0);
    /* labels Alertmanager would refuse, or that would make the JSON have a
     * key twice: alertname is the rule's name, label names are
     * [a-zA-Z_][a-zA-Z0-9_]* and once each, values (and the name) UTF-8 */
    static const char *const bad_labels[][4] = {
        {"alertname", "Other"},          {"", "x"},           {"1st", "x"},
        {"sev-erity", "x"},              {"sévérité", "x"},  {"severity", "\xff"},
        {"severity", "\xc3\x28"},      {"severity", "page", "severity", "info"},
    };
    for (size_t i = 0; i < sizeof bad_labels / sizeof bad_labels[0]; i++)
        ck_assert_msg(keel_alerts_add(f.a, "Lbl", "last(x[1m]) > 1", bad_labels[i], bad_labels[i][2] ? 2 : 1,
                                      NULL, 0, NULL) == KEEL_EINVAL,
                      "labels %zu taken", i);
    /* annotations go into the same JSON: the same rules, but one may be
     * named alertname (Alertmanager keeps annotations apart) */
    for (size_t i = 1; i < sizeof bad_labels / sizeof bad_labels[0]; i++)
        ck_assert_msg(keel_alerts_add(f.a, "Ann", "last(x[1m]) > 1", NULL, 0, bad_labels[i],
                                      bad_labels[i][2] ? 2 : 1, NULL) == KEEL_EINVAL,
                      "annotations %zu taken", i);
    ck_assert_int_eq(keel_alerts_add(f.a, "Ann", "last(x[1m]) > 1", NULL, 0,
                                     (const char *[]){"alertname", "x", "summary", "caf\xc3\xa9"}, 2, NULL),
                     0);
    ck_assert_int_eq(keel_alerts_add(f.a, "Bad\xff", "last(x[1m]) > 1", NULL, 0, NULL, 0, NULL), KEEL_EINVAL);
    ck_assert_int_eq(keel_alerts_add(f.a, "Lbl", "last(x[1m]) > 1",
                                     (const char *[]){"_team9", "caf\xc3\xa9", "severity", ""}, 2, NULL, 0, NULL),
                     0);
    ck_assert_int_eq(keel_alerts_tick(NULL), KEEL_EINVAL);
    keel_alerts *bad_a;
    keel_alerts_opts none = {0};
    ck_assert_int_eq(keel_alerts_create(&bad_a, &none), KEEL_EINVAL);
    /* the generator URL goes into the JSON too */
    keel_alerts_opts bad_url = {.metrics = f.m, .generator_url = "http://svc/\xc3\x28"};
    ck_assert_int_eq(keel_alerts_create(&bad_a, &bad_url), KEEL_EINVAL);
    bad_url.generator_url = "http://svc/caf\xc3\xa9";
    ck_assert_int_eq(keel_alerts_create(&bad_a, &bad_url), 0);
    keel_alerts_destroy(bad_a);
    teardown(&f);
}
END_TEST

/* A small JSON validator: value := object | array | string | number | literal */
static const char *json_value(const char *p);
static const char *json_ws(const char *p)
{
    while (isspace((unsigned char)*p))
        p++;
    return p;
}
static const char *json_string(const char *p)
{
    if (*p++ != '"')
        return NULL;
    for (; *p && *p != '"'; p++)
        if (*p == '\\' && !*++p)
            return NULL;
    return *p == '"' ? p + 1 : NULL;
}
static const char *json_value(const char *p)
{
    p = json_ws(p);
    if (*p == '{' || *p == '[') {
        char close = *p == '{' ? '}' : ']';
        bool obj = *p == '{';
        p = json_ws(p + 1);
        if (*p == close)
            return p + 1;
        for (;;) {
            if (obj) {
                if (!(p = json_string(json_ws(p))) || *(p = json_ws(p)) != ':')
                    return NULL;
                p++;
            }
            if (!(p = json_value(p)))
                return NULL;
            p = json_ws(p);
            if (*p == close)
                return p + 1;
            if (*p++ != ',')
                return NULL;
        }
    }
    if (*p == '"')
        return json_string(p);
    char *end;
    strtod(p, &end);
    return end > p ? end : NULL;
}

START_TEST(alertmanager_json_parses_and_resends)
{
    fixture f;
    setup(&f);
    keel_gauge_child *g = gauge(&f, "temperature_celsius");
    ck_assert_int_eq(keel_alerts_add(f.a, "Hot", "last(temperature_celsius[1m]) > 30", 
                                     (const char *[]){"severity", "warn"}, 1,
                                     (const char *[]){"summary", "it is \"hot\"\n"}, 1, NULL), 0);
    keel_gauge_set(g, 35);
    tick(&f); /* fires at t=0 (wall 2026-11-26T00:00:00Z) */
    char *json;
    ck_assert_int_eq(keel_alerts_to_send(f.a, &json, NULL), 0);
    const char *end = json_value(json);
    ck_assert_msg(end && *json_ws(end) == '\0', "not JSON: %s", json);
    ck_assert_ptr_nonnull(strstr(json, "\"labels\":{\"alertname\":\"Hot\",\"severity\":\"warn\"}"));
    ck_assert_ptr_nonnull(strstr(json, "\"annotations\":{\"summary\":\"it is \\\"hot\\\"\\u000a\"}"));
    ck_assert_ptr_nonnull(strstr(json, "\"startsAt\":\"2026-11-26T00:00:00.000Z\""));
    /* endsAt = eval time + 4 x max(interval, resend) = +4 min */
    ck_assert_ptr_nonnull(strstr(json, "\"endsAt\":\"2026-11-26T00:04:00.000Z\""));
    ck_assert_ptr_nonnull(strstr(json, "\"generatorURL\":\"http://svc/alerts\""));
    keel_free(json);
    ck_assert_int_eq(keel_alerts_to_send(f.a, &json, NULL), 0);
    ck_assert_str_eq(json, "[]"); /* sent already */
    keel_free(json);
    tick(&f); /* a minute later: re-sent */
    ck_assert_int_eq(keel_alerts_to_send(f.a, &json, NULL), 0);
    ck_assert_ptr_nonnull(strstr(json, "\"alertname\":\"Hot\""));
    keel_free(json);
    keel_gauge_set(g, 20);
    tick(&f); /* resolved: sent at once with endsAt = resolution */
    ck_assert_int_eq(keel_alerts_to_send(f.a, &json, NULL), 0);
    ck_assert_ptr_nonnull(strstr(json, "\"endsAt\":\"2026-11-26T00:02:00.000Z\""));
    keel_free(json);
    teardown(&f);
}
END_TEST

START_TEST(resolved_alerts_are_resent_every_resend_delay_for_15_minutes)
{
    fixture f;
    setup_resend(&f, 3 * MIN); /* apart from the 1-minute evaluations */
    keel_gauge_child *g = gauge(&f, "temperature_celsius");
    ck_assert_int_eq(keel_alerts_add(f.a, "Hot", "last(temperature_celsius[1m]) > 30", NULL, 0, NULL, 0,
                                     NULL), 0);
    keel_gauge_set(g, 35);
    tick(&f); /* t=0: fires, sent */
    char *json;
    ck_assert_int_eq(keel_alerts_to_send(f.a, &json, NULL), 0);
    ck_assert_ptr_nonnull(strstr(json, "\"alertname\":\"Hot\""));
    keel_free(json);
    keel_gauge_set(g, 20);
    /* t=1m: resolved, and sent at once though the firing one went out
     * within the resend delay; then again every 3 minutes while kept, the
     * last at t=16m, 15 minutes after the resolution; gone at t=17m */
    for (int t = 1; t <= 20; t++) {
        tick(&f);
        ck_assert_int_eq(state(&f, "Hot"), t <= 16 ? KEEL_ALERT_RESOLVED : KEEL_ALERT_INACTIVE);
        bool due = t <= 16 && (t - 1) % 3 == 0;
        ck_assert_int_eq(keel_alerts_to_send(f.a, &json, NULL), 0);
        if (due) {
            ck_assert_msg(strstr(json, "\"alertname\":\"Hot\""), "t=%dm: not sent: %s", t, json);
            const char *end = json_value(json);
            ck_assert_msg(end && *json_ws(end) == '\0', "not JSON: %s", json);
            ck_assert_ptr_nonnull(strstr(json, "\"startsAt\":\"2026-11-26T00:00:00.000Z\""));
            ck_assert_msg(strstr(json, "\"endsAt\":\"2026-11-26T00:01:00.000Z\""), /* the resolution */
                          "t=%dm: %s", t, json);
        } else {
            ck_assert_msg(strcmp(json, "[]") == 0, "t=%dm: sent %s", t, json);
        }
        keel_free(json);
        ck_assert_int_eq(keel_alerts_to_send(f.a, &json, NULL), 0);
        ck_assert_str_eq(json, "[]"); /* once per due time */
        keel_free(json);
    }
    teardown(&f);
}
END_TEST

/* A resend delay so long that 4 x it, or the last send plus it, passes
 * UINT64_MAX: endsAt stays at the largest time (2^62 once wrapped it to
 * startsAt, which Alertmanager resolves at once) and the alert is not
 * sent again (UINT64_MAX once re-sent it at every evaluation). */
START_TEST(a_resend_delay_too_long_to_add_means_never)
{
    const uint64_t delays[] = {1ull << 62, UINT64_MAX};
    for (size_t k = 0; k < 2; k++) {
        fixture f;
        setup_resend(&f, delays[k]);
        keel_gauge_child *g = gauge(&f, "temperature_celsius");
        ck_assert_int_eq(keel_alerts_add(f.a, "Hot", "last(temperature_celsius[1m]) > 30", NULL, 0, NULL, 0,
                                         NULL), 0);
        keel_gauge_set(g, 35);
        kt_clock_advance(&f.clock, MIN); /* a send at 0 plus UINT64_MAX would not wrap */
        tick(&f); /* fires at t=1m */
        char *json;
        ck_assert_int_eq(keel_alerts_to_send(f.a, &json, NULL), 0);
        ck_assert_ptr_nonnull(strstr(json, "\"startsAt\":\"2026-11-26T00:01:00.000Z\""));
        ck_assert_msg(strstr(json, "\"endsAt\":\"2554-07-21T23:34:33.709Z\""), /* UINT64_MAX ns */
                      "delay %zu: %s", k, json);
        keel_free(json);
        for (int t = 1; t <= 3; t++) {
            tick(&f);
            ck_assert_int_eq(keel_alerts_to_send(f.a, &json, NULL), 0);
            ck_assert_msg(strcmp(json, "[]") == 0, "delay %zu, t=%dm: sent again %s", k, t, json);
            keel_free(json);
        }
        teardown(&f);
    }
}
END_TEST

START_TEST(active_alerts_show_as_keel_alerts_series)
{
    fixture f;
    setup(&f);
    keel_gauge_child *g = gauge(&f, "load");
    keel_alerts_add(f.a, "Load", "last(load[1m]) > 1 for 1m", NULL, 0, NULL, 0, NULL);
    keel_gauge_set(g, 2);
    tick(&f);
    char *text;
    keel_metrics_render_buf(f.m, KEEL_METRICS_PROMETHEUS, &text, NULL);
    ck_assert_ptr_nonnull(strstr(text, "keel_alerts{alertname=\"Load\",alertstate=\"pending\"} 1\n"));
    keel_free(text);
    tick(&f);
    keel_metrics_render_buf(f.m, KEEL_METRICS_PROMETHEUS, &text, NULL);
    ck_assert_ptr_null(strstr(text, "alertstate=\"pending\""));
    ck_assert_ptr_nonnull(strstr(text, "keel_alerts{alertname=\"Load\",alertstate=\"firing\"} 1\n"));
    keel_free(text);
    keel_gauge_set(g, 0);
    tick(&f);
    keel_metrics_render_buf(f.m, KEEL_METRICS_PROMETHEUS, &text, NULL);
    ck_assert_ptr_null(strstr(text, "keel_alerts{"));
    keel_free(text);
    /* a tick before the interval is up does nothing */
    ck_assert_int_eq(keel_alerts_tick(f.a), 1);
    ck_assert_int_eq(keel_alerts_tick(f.a), 0);
    teardown(&f);
}
END_TEST

/* One keel_alerts of two on one registry, with a rule of the name the
 * other uses too, flipping between firing and resolved at every tick. */
typedef struct twin {
    keel_metrics *m;
    const char *gauge;
    int ticks;
} twin;

static void *flip(void *arg)
{
    twin *t = arg;
    kt_clock clock = {0};
    keel_alerts *a;
    keel_alerts_opts o = {.metrics = t->m, .eval_interval_ns = MIN, .clock = kt_clock_now, .clock_ud = &clock};
    if (keel_alerts_create(&a, &o) != 0)
        return NULL;
    char rule[64];
    snprintf(rule, sizeof rule, "last(%s[1m]) > 0", t->gauge);
    keel_alerts_add(a, "Twin", rule, NULL, 0, NULL, 0, NULL);
    keel_gauge *g;
    keel_metrics_gauge(t->m, t->gauge, "", NULL, 0, &g);
    keel_gauge_child *on = keel_gauge_with(g);
    for (int i = 0; i < t->ticks; i++) {
        keel_gauge_set(on, i % 2); /* firing (through pending), then resolved */
        keel_alerts_tick(a);
        kt_clock_advance(&clock, MIN);
    }
    keel_alerts_destroy(a);
    return NULL;
}

START_TEST(two_instances_with_a_rule_of_one_name_share_the_series_safely)
{
    keel_metrics *m;
    ck_assert_int_eq(keel_metrics_create(&m, NULL), 0);
    twin t[2] = {{m, "left", 20000}, {m, "right", 20000}};
    pthread_t th[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&th[i], NULL, flip, &t[i]);
    for (int i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    char *text;
    ck_assert_int_eq(keel_metrics_render_buf(m, KEEL_METRICS_PROMETHEUS, &text, NULL), 0);
    ck_assert_ptr_null(strstr(text, "keel_alerts{")); /* both destroyed */
    keel_free(text);
    keel_metrics_destroy(m);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("alert");
    TCase *tc = tcase_create("alert");
    tcase_add_test(tc, pending_then_firing_after_for_then_resolved);
    tcase_add_test(tc, rules_read_a_point_under_a_decimal_comma_locale);
    tcase_add_test(tc, a_condition_that_clears_while_pending_is_dropped_silently);
    tcase_add_test(tc, compound_durations_add_up);
    tcase_add_test(tc, no_for_fires_at_once_and_keep_firing_for_holds_it);
    tcase_add_test(tc, rate_corrects_counter_resets_and_empty_windows_never_fire);
    tcase_add_test(tc, rate_extrapolates_as_prometheus_3);
    tcase_add_test(tc, ratio_of_nothing_is_nan_and_never_fires);
    tcase_add_test(tc, min_and_max_of_a_window_of_nan_are_nan);
    tcase_add_test(tc, quantiles_interpolate_as_prometheus);
    tcase_add_test(tc, a_removed_counter_child_is_no_reset);
    tcase_add_test(tc, a_removed_histogram_child_is_no_reset);
    tcase_add_test(tc, a_removed_gauge_child_leaves_the_sum);
    tcase_add_test(tc, malformed_rules_report_where);
    tcase_add_test(tc, gauge_functions_refuse_counting_families);
    tcase_add_test(tc, a_refused_rule_keeps_no_history);
    tcase_add_test(tc, matcher_values_unescape_as_promql);
    tcase_add_test(tc, selectors_add_up_matching_series_and_empty_matches_absent);
    tcase_add_test(tc, alertmanager_json_parses_and_resends);
    tcase_add_test(tc, resolved_alerts_are_resent_every_resend_delay_for_15_minutes);
    tcase_add_test(tc, a_resend_delay_too_long_to_add_means_never);
    tcase_add_test(tc, active_alerts_show_as_keel_alerts_series);
    suite_add_tcase(s, tc);
    tc = tcase_create("threads");
    tcase_set_tags(tc, "stress"); /* its window is a few instructions: for the sanitizer runs */
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, two_instances_with_a_rule_of_one_name_share_the_series_safely);
    suite_add_tcase(s, tc);
    return kt_run(s);
}
