/* tests/fuzz/fuzz_alert.c — the alert rule parser and rule evaluation.
 *
 * Input: the text of one rule, up to its first NUL, e.g.
 * `rate(x_total{a="b"}[5m]) > 1 for 1m`. The registry holds a counter
 * x_total{a}, a gauge y and a histogram z for selectors to name.
 *
 * The rule is added twice under two names (the second shares the first's
 * selectors), evaluated three times a minute apart while the series
 * change, and the alerts to send are rendered as JSON. Checks: a refused
 * rule says where parsing stopped, inside the text; both adds agree; every
 * tick evaluates; the JSON is a NUL-terminated array of the length given;
 * and, under LeakSanitizer, neither path leaks (a label matcher without
 * "=" once leaked its name: seeds/alert/leak-matcher-without-eq). */
#include <keel/alert.h>
#include <keel/metrics.h>

#include "fuzz.h"

#define MINUTE_NS 60000000000ull

static uint64_t fake_clock(void *ud)
{
    return *(const uint64_t *)ud;
}

typedef struct series {
    keel_counter_child *counter;
    keel_gauge_child *gauge;
    keel_histogram_child *histogram;
} series;

/* The families a rule may select, one child each. */
static series series_add(keel_metrics *m)
{
    static const char *const counter_labels[] = {"a"};
    static const double bounds[] = {0.1, 0.5, 1};
    keel_counter *c = NULL;
    keel_gauge *g = NULL;
    keel_histogram *h = NULL;
    KF_CHECK(keel_metrics_counter(m, "x_total", "", counter_labels, 1, &c) == 0, "x_total");
    KF_CHECK(keel_metrics_gauge(m, "y", "", NULL, 0, &g) == 0, "y");
    KF_CHECK(keel_metrics_histogram(m, "z", "", NULL, 0, bounds, 3, &h) == 0, "z");
    series s = {keel_counter_with(c, "b"), keel_gauge_with(g), keel_histogram_with(h)};
    KF_CHECK(s.counter && s.gauge && s.histogram, "children of fixed families");
    return s;
}

static void check_json(keel_alerts *a)
{
    char *json = NULL;
    size_t len = 0;
    int rc = keel_alerts_to_send(a, &json, &len);
    KF_CHECK(rc == 0, "to_send returned %d", rc);
    KF_CHECK(len >= 2 && strlen(json) == len, "length %zu for %zu bytes", len, strlen(json));
    KF_CHECK(json[0] == '[' && json[len - 1] == ']', "not an array: %s", json);
    keel_free(json);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char *const labels[] = {"severity", "page"};
    static const char *const annotations[] = {"summary", "s"};
    char *rule = kf_cstr(data, size);
    uint64_t now = 1000000000ull;
    keel_metrics *m = NULL;
    KF_CHECK(keel_metrics_create(&m, NULL) == 0, "metrics");
    series s = series_add(m);
    keel_alerts_opts o = {.metrics = m, .clock = fake_clock, .wall_clock = fake_clock, .clock_ud = &now};
    keel_alerts *a = NULL;
    KF_CHECK(keel_alerts_create(&a, &o) == 0, "alerts");

    size_t pos = (size_t)-1;
    int rc = keel_alerts_add(a, "R", rule, labels, 1, annotations, 1, &pos);
    KF_CHECK(rc == 0 || rc == KEEL_EINVAL, "add returned %d", rc);
    KF_CHECK(rc == 0 || pos <= strlen(rule), "error at %zu of %zu bytes", pos, strlen(rule));
    int rc2 = keel_alerts_add(a, "R2", rule, NULL, 0, NULL, 0, NULL);
    KF_CHECK(rc2 == rc, "the same rule added as %d, then as %d", rc, rc2);

    for (int i = 0; i < 3; i++) {
        keel_counter_add(s.counter, 5.0 + i);
        keel_gauge_set(s.gauge, i * 0.5);
        keel_histogram_observe(s.histogram, 0.3 * i);
        int ticked = keel_alerts_tick(a);
        KF_CHECK(ticked == 1, "tick %d a minute after the last returned %d", i, ticked);
        now += MINUTE_NS;
    }
    check_json(a);

    keel_alerts_destroy(a);
    keel_metrics_destroy(m);
    free(rule);
    return 0;
}
