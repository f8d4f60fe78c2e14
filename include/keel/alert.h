/* keel/alert.h — alert rules over keel_metrics series, evaluated
 * in-process with Prometheus's alerting semantics.
 *
 * A rule is a condition written in a small language, a `for` duration and
 * optional labels and annotations:
 *
 *   ratio(rate(errors_total[5m]), rate(requests_total[5m])) > 0.05 for 5m
 *   quantile(0.95, request_duration_seconds[5m]) > 1 for 2m
 *   ratio(rate(cache_hits_total[10m]), rate(cache_lookups_total[10m])) < 0.8
 *       and rate(cache_lookups_total[10m]) > 1 for 10m
 *   last(memory_usage_ratio[1m]) > 0.9 for 1m keep_firing_for 5m
 *
 * Grammar:
 *   rule     = cond { "and" cond } [ "for" dur ] [ "keep_firing_for" dur ]
 *   cond     = expr ( ">" | ">=" | "<" | "<=" | "==" | "!=" ) number
 *   expr     = "rate(" sel "[" dur "])"              per-second increase of a
 *                                                    counter, reset-corrected
 *                                                    and extrapolated as
 *                                                    Prometheus 3's rate()
 *                                                    over (now - dur, now]
 *            | "ratio(" expr "," expr ")"            a / b; 0/0 is NaN
 *            | "quantile(" number "," sel "[" dur "])"  histogram_quantile
 *                                                    over the window's rate
 *            | ("avg"|"min"|"max"|"last") "(" sel "[" dur "])"  a gauge
 *                                                    (over a counter or
 *                                                    histogram family:
 *                                                    refused if it is one
 *                                                    when the rule is
 *                                                    added, else NaN)
 *            | number
 *   sel      = name [ "{" label "=" "\"value\"" { "," ... } "}" ]
 *   dur      = digits unit { digits unit } | "0"
 *   unit     = "y" | "w" | "d" | "h" | "m" | "s" | "ms"
 *              Prometheus's durations: units largest first and each once
 *              (1h30m), a year 365 days; 1 ms to about 31 years (0 too
 *              for "for" and "keep_firing_for")
 * Limits: 8 conditions per rule, 8 label matchers per selector, ratio()
 * nested 16 deep; past them keel_alerts_add() is KEEL_EINVAL.
 * A selector adds up every series of the family whose labels match; an
 * empty value also matches a series without that label, as in Prometheus.
 * A value is a PromQL string: \a \b \f \n \r \t \v \\ \", \xhh and
 * \ooo (a byte), \uhhhh and \Uhhhhhhhh (a code point); any other escape,
 * or one that makes a NUL, is KEEL_EINVAL at its backslash.
 * Comparisons with NaN are false, so an empty window never fires.
 *
 * Over counters and histograms (each bucket, the count) resets are judged
 * per series, not on the sum: at each evaluation the selector's sample is
 * its previous one plus each matching series' increase since the previous
 * evaluation — its whole value where it went down or is a new child of
 * the same labels (its own reset). A series matched for the first time
 * adds nothing until its next evaluation, a series that goes away (removed,
 * or no longer matching) adds nothing more and takes nothing away, and a
 * NaN or infinite value adds nothing. The first sample is the plain sum.
 * rate() and quantile() then run Prometheus's reset correction and
 * extrapolation on that total, so they are rate(sum(x)[w]) without false
 * resets rather than sum(rate(x[w])): Prometheus extrapolates each series
 * to the window's edges and stops each at its own zero, this extrapolates
 * the total once. The two agree when every series has samples over the
 * whole window and none is extrapolated down to its zero; a series that appears or goes in the window counts only
 * the increases seen between its samples. Gauge selectors stay plain sums
 * (and rate() over one corrects drops of the sum as counter resets). The
 * state kept is one entry per matching series, freed at the first
 * evaluation that does not see it.
 *
 * State machine, exactly Prometheus's: a true condition makes the alert
 * pending, and firing once it has been true for `for` (at once with no
 * `for`); a false condition drops a pending alert silently and resolves a
 * firing one, unless keep_firing_for keeps it firing that long after the
 * condition was last true; a resolved alert is kept (and re-sent) for 15
 * minutes, and a new true condition starts a new alert. Firing alerts are
 * sent again every resend delay (1 minute; one too long to add to the
 * last send, as UINT64_MAX, means never again); each sent firing alert
 * says endsAt = now + 4 x max(eval interval, resend delay), at most the
 * largest time (2554-07-21T23:34:33.709Z). One departure: a
 * send exactly one resend delay after the last is due here, while
 * Prometheus waits until strictly after it (with an evaluation interval
 * equal to the delay, it re-sends at every second evaluation).
 *
 * Rules are evaluated by keel_alerts_tick(), which does the work when an
 * eval_interval has passed on the injectable clock: no thread is started.
 * Active alerts are also exposed in the registry as the gauge
 * keel_alerts{alertname, alertstate="pending"|"firing"} = 1.
 *
 * Thread safety: all functions are thread-safe (one internal lock); the
 * on_change callback runs inside keel_alerts_tick() and must not call back
 * into the same keel_alerts.
 */
#ifndef KEEL_ALERT_H
#define KEEL_ALERT_H

#include <keel/common.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct keel_alerts keel_alerts;

typedef enum keel_alert_state {
    KEEL_ALERT_INACTIVE = 0,
    KEEL_ALERT_PENDING = 1,
    KEEL_ALERT_FIRING = 2,
    KEEL_ALERT_RESOLVED = 3
} keel_alert_state;

/* One alert as the callbacks and keel_alerts_get() see it. Strings are
 * valid during the call only. Times are wall-clock nanoseconds; 0 = not
 * yet. */
typedef struct keel_alert_info {
    const char *name;
    keel_alert_state state;
    double value;          /* the first condition's left side, last eval */
    size_t nlabels, nannotations;
    const char *const *labels;      /* name, value, name, value, ... */
    const char *const *annotations; /* the same */
    uint64_t active_at, fired_at, resolved_at;
} keel_alert_info;

typedef void (*keel_alert_change_fn)(const keel_alert_info *alert, keel_alert_state from,
                                     keel_alert_state to, void *ud);

typedef struct keel_alerts_opts {
    keel_metrics *metrics;       /* required: where the series come from */
    uint64_t eval_interval_ns;   /* 0 = 1 minute */
    uint64_t resend_delay_ns;    /* 0 = 1 minute */
    uint64_t resolved_keep_ns;   /* 0 = 15 minutes */
    const char *generator_url;   /* for the JSON (UTF-8, copied); may be NULL */
    keel_alert_change_fn on_change; /* every state change; may be NULL */
    void *ud;
    keel_clock_fn clock;         /* monotonic; NULL = keel_now_ns */
    keel_clock_fn wall_clock;    /* for startsAt/endsAt; NULL = keel_wall_ns */
    void *clock_ud;              /* passed to both */
} keel_alerts_opts;

/* Returns 0, KEEL_EINVAL (NULL, no registry, a generator_url that is not
 * UTF-8), KEEL_EEXIST (the registry has a keel_alerts family of another
 * shape) or KEEL_ENOMEM. The registry must outlive the alerts. */
KEEL_API int keel_alerts_create(keel_alerts **out, const keel_alerts_opts *opts);

/* Adds a rule. labels and annotations are name/value pairs (n pairs each;
 * "summary" and "description" are the usual annotations). Returns 0;
 * KEEL_EINVAL for NULL, an empty name or one that is not UTF-8, a pair
 * count of SIZE_MAX / 2 or more, a label named "alertname" (the rule's
 * name is that label) or named twice, a label name not matching
 * [a-zA-Z_][a-zA-Z0-9_]*, a label value that is not UTF-8 (the same for
 * annotations, but for alertname, which they may have), or a rule that
 * does not parse or applies avg, min, max or last to a family the
 * registry has as a counter or histogram — then *err_pos (may be NULL)
 * is the byte offset where parsing stopped (that selector's start);
 * KEEL_EEXIST for a name in use; KEEL_ENOMEM. */
KEEL_API int keel_alerts_add(keel_alerts *a, const char *name, const char *rule,
                             const char *const *labels, size_t nlabels,
                             const char *const *annotations, size_t nannotations, size_t *err_pos);

/* Evaluates every rule if eval_interval has passed since the last
 * evaluation (the first call always evaluates). Returns 1 when it
 * evaluated, 0 when it was not due, or an error (KEEL_ENOMEM: nothing was
 * evaluated, and the next call tries again). */
KEEL_API int keel_alerts_tick(keel_alerts *a);

/* The alert of a rule now. Returns 0, KEEL_ENOTFOUND or KEEL_EINVAL; fn
 * is called with the alert before the lock is released. */
KEEL_API int keel_alerts_get(keel_alerts *a, const char *name,
                             void (*fn)(const keel_alert_info *alert, void *ud), void *ud);

/* The alerts due for sending now (firing ones not sent within the resend
 * delay, newly resolved ones, and resolved ones again every resend delay
 * while kept), as the JSON array Alertmanager's POST /api/v2/alerts takes:
 * labels (alertname included), annotations, startsAt, endsAt,
 * generatorURL. They count as sent. *json is freed with keel_free(); "[]"
 * when there is nothing to send. Returns 0, KEEL_EINVAL or KEEL_ENOMEM
 * (then none counts as sent). */
KEEL_API int keel_alerts_to_send(keel_alerts *a, char **json, size_t *len);

/* NULL is a no-op; removes the keel_alerts series from the registry. */
KEEL_API void keel_alerts_destroy(keel_alerts *a);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_ALERT_H */
