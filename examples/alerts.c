/* examples/alerts.c — the four classic alert rules firing and resolving
 * on a simulated load.
 *
 * 75 minutes of simulated traffic (time is injected, the run takes
 * milliseconds): an error burst from minute 10 to 25, slow responses from
 * 30 to 40, a cold cache from 45 to 60, memory pressure from 50 to 55;
 * every alert has resolved by the end.
 * The rules are evaluated every 30 s; every change is printed, and the
 * first two batches of alerts for Alertmanager. */
#include <stdio.h>
#include <string.h>

#include <keel/alert.h>
#include <keel/metrics.h>

#define S 1000000000ull
static uint64_t now_ns;
static uint64_t fake_clock(void *ud)
{
    (void)ud;
    return now_ns;
}
static uint64_t fake_wall(void *ud)
{
    (void)ud;
    return 1795651200ull * S + now_ns; /* 2026-11-26T00:00:00Z */
}

static void changed(const keel_alert_info *a, keel_alert_state from, keel_alert_state to, void *ud)
{
    (void)ud;
    static const char *names[] = {"inactive", "pending", "firing", "resolved"};
    printf("  %5.1f min  %-16s %-8s -> %-8s (value %.3g)\n", (double)now_ns / 60 / S, a->name,
           names[from], names[to], a->value);
}

int main(void)
{
    keel_metrics *m;
    keel_metrics_opts mo = {.wall_clock = fake_wall};
    int rc = keel_metrics_create(&m, &mo);
    if (rc) {
        fprintf(stderr, "keel_metrics_create: %s\n", keel_strerror(rc));
        return 1;
    }
    keel_counter *req, *err, *lookups, *hits;
    keel_histogram *lat;
    keel_gauge *mem;
    if ((rc = keel_metrics_counter(m, "http_requests_total", "Requests.", NULL, 0, &req)) ||
        (rc = keel_metrics_counter(m, "http_errors_total", "Failed requests.", NULL, 0, &err)) ||
        (rc = keel_metrics_histogram(m, "http_request_duration_seconds", "Latency.", NULL, 0, NULL, 0,
                                     &lat)) ||
        (rc = keel_metrics_counter(m, "cache_lookups_total", "Cache lookups.", NULL, 0, &lookups)) ||
        (rc = keel_metrics_counter(m, "cache_hits_total", "Cache hits.", NULL, 0, &hits)) ||
        (rc = keel_metrics_gauge(m, "memory_usage_ratio", "Used / available memory.", NULL, 0, &mem))) {
        fprintf(stderr, "keel_metrics: %s\n", keel_strerror(rc));
        keel_metrics_destroy(m);
        return 1;
    }

    keel_alerts *a;
    keel_alerts_opts ao = {.metrics = m, .eval_interval_ns = 30 * S, .on_change = changed,
                           .clock = fake_clock, .wall_clock = fake_wall,
                           .generator_url = "http://example/alerts"};
    if ((rc = keel_alerts_create(&a, &ao)) != 0) {
        fprintf(stderr, "keel_alerts_create: %s\n", keel_strerror(rc));
        keel_metrics_destroy(m);
        return 1;
    }
    const char *page[] = {"severity", "page"}, *warn[] = {"severity", "warn"};
    struct {
        const char *name, *rule, **labels, *summary;
    } rules[] = {
        {"HighErrorRatio",
         "ratio(rate(http_errors_total[5m]), rate(http_requests_total[5m])) > 0.05 for 5m", page,
         "more than 5% of requests fail"},
        {"SlowResponses", "quantile(0.95, http_request_duration_seconds[5m]) > 1 for 2m", page,
         "p95 latency above 1 s"},
        {"ColdCache",
         "ratio(rate(cache_hits_total[10m]), rate(cache_lookups_total[10m])) < 0.8"
         " and rate(cache_lookups_total[10m]) > 1 for 10m",
         warn, "cache hit ratio below 80% (with traffic)"},
        {"MemoryPressure", "last(memory_usage_ratio[1m]) > 0.9 for 1m", warn, "memory above 90%"},
    };
    for (int i = 0; i < 4; i++) {
        size_t at;
        const char *ann[] = {"summary", rules[i].summary};
        if ((rc = keel_alerts_add(a, rules[i].name, rules[i].rule, rules[i].labels, 1, ann, 1, &at))) {
            fprintf(stderr, "rule %s: %s (at byte %zu)\n", rules[i].name, keel_strerror(rc), at);
            keel_alerts_destroy(a);
            keel_metrics_destroy(m);
            return 1;
        }
    }

    keel_counter_child *r = keel_counter_with(req), *e = keel_counter_with(err);
    keel_counter_child *l = keel_counter_with(lookups), *h = keel_counter_with(hits);
    keel_histogram_child *d = keel_histogram_with(lat);
    keel_gauge_child *g = keel_gauge_with(mem);
    if (!r || !e || !l || !h || !d || !g) {
        fprintf(stderr, "keel_*_with: out of memory\n");
        keel_alerts_destroy(a);
        keel_metrics_destroy(m);
        return 1;
    }
    printf("state changes:\n");
    int batches = 0;
    for (now_ns = 0; now_ns <= 75 * 60 * S; now_ns += S) { /* one tick a second */
        double minute = (double)now_ns / 60 / S;
        keel_counter_add(r, 50);
        keel_counter_add(e, minute >= 10 && minute < 25 ? 5 : 0);
        for (int i = 0; i < 5; i++)
            keel_histogram_observe(d, minute >= 30 && minute < 40 ? 2.0 : 0.08);
        keel_counter_add(l, 20);
        keel_counter_add(h, minute >= 45 && minute < 60 ? 10 : 19);
        keel_gauge_set(g, minute >= 50 && minute < 55 ? 0.95 : 0.6);
        if ((rc = keel_alerts_tick(a)) < 0)
            break;
        if (rc == 1) {
            char *json;
            size_t len;
            if ((rc = keel_alerts_to_send(a, &json, &len)) != 0)
                break;
            if (len > 2 && batches++ < 2)
                printf("  to Alertmanager: %.*s%s\n", len > 300 ? 300 : (int)len, json,
                       len > 300 ? "..." : "");
            keel_free(json);
        }
    }
    char *text;
    if (rc >= 0 && (rc = keel_metrics_render_buf(m, KEEL_METRICS_PROMETHEUS, &text, NULL)) == 0) {
        printf("at the end, keel_alerts series:\n");
        int active = 0;
        for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n"))
            if (strncmp(line, "keel_alerts{", 12) == 0)
                printf("  %s\n", line), active++;
        if (!active)
            printf("  none: no alert is pending or firing\n");
        keel_free(text);
    }
    if (rc < 0)
        fprintf(stderr, "alerts: %s\n", keel_strerror(rc));
    keel_alerts_destroy(a);
    keel_metrics_destroy(m);
    return rc < 0 ? 1 : 0;
}
