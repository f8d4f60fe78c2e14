/* keel/metrics.h — counters, gauges and histograms with a lock-free hot
 * path, exposed in the Prometheus text format 0.0.4 and OpenMetrics 1.0.
 *
 * A registry holds families: a name, a help text and fixed label names.
 * A family has a child per tuple of label values, bound once:
 *
 *   keel_counter *req;
 *   keel_metrics_counter(m, "http_requests_total", "Requests served.",
 *                        (const char *[]){"method", "code"}, 2, &req);
 *   keel_counter_child *get_200 = keel_counter_with(req, "GET", "200");
 *   ...
 *   keel_counter_inc(get_200);          // no lock, no allocation, no strings
 *
 * Counters and histograms keep one value per thread (each thread writes
 * only its own memory, with plain stores) and are summed when rendered, so
 * threads never contend. Gauges are one atomic value. Histograms keep
 * per-bucket counts and build the cumulative `le` series when rendered, so
 * `+Inf` equals `_count` by construction.
 *
 * The library contains no HTTP server: keel_metrics_render() streams the
 * exposition through a callback into whatever server the program has
 * (examples/metrics.c serves /metrics with libmicrohttpd).
 *
 * Thread safety: everything is thread-safe; handles stay valid until the
 * registry is destroyed (a child until it is removed, which its users
 * must have stopped using). The hot-path calls never block, except a
 * thread's first update through a registry, which takes the registry's
 * lock to link the thread's block; registration and rendering take that
 * lock too (rendering only while it builds the text, never while its
 * writer runs).
 */
#ifndef KEEL_METRICS_H
#define KEEL_METRICS_H

#include <keel/common.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct keel_counter keel_counter;
typedef struct keel_gauge keel_gauge;
typedef struct keel_histogram keel_histogram;
typedef struct keel_counter_child keel_counter_child;
typedef struct keel_gauge_child keel_gauge_child;
typedef struct keel_histogram_child keel_histogram_child;

typedef struct keel_metrics_opts {
    size_t max_children;  /* per family; 0 = 10000. Past it: KEEL_EFULL */
    keel_clock_fn wall_clock; /* for _created: ns since the epoch; NULL =
                                 keel_wall_ns */
    void *clock_ud;
} keel_metrics_opts;

/* Creates an empty registry; opts may be NULL (the defaults). Returns 0,
 * KEEL_EINVAL (NULL out) or KEEL_ENOMEM. */
KEEL_API int keel_metrics_create(keel_metrics **out, const keel_metrics_opts *opts);
/* Frees the registry and every family and child. NULL is a no-op. Must not
 * run concurrently with other calls on it or on its handles. */
KEEL_API void keel_metrics_destroy(keel_metrics *m);

/* ---- families ----
 *
 * Names follow Prometheus: metric names [a-zA-Z_:][a-zA-Z0-9_:]* of at
 * most 200 bytes, label names [a-zA-Z_][a-zA-Z0-9_]* not starting with
 * "__" and not "le" or "quantile", each once; a counter's name ends in
 * "_total" (and is more than that); at most 16 labels; help is UTF-8. A name
 * whose samples would collide with another family's (a histogram "x"
 * makes x_bucket, x_count, x_sum) is KEEL_EEXIST. Returns 0, KEEL_EINVAL,
 * KEEL_EEXIST or KEEL_ENOMEM. */
KEEL_API int keel_metrics_counter(keel_metrics *m, const char *name, const char *help,
                                  const char *const *labels, size_t nlabels, keel_counter **out);
KEEL_API int keel_metrics_gauge(keel_metrics *m, const char *name, const char *help,
                                const char *const *labels, size_t nlabels, keel_gauge **out);
/* bounds: strictly increasing, finite, 1..256 of them; NULL with nbounds 0
 * = the Prometheus defaults in seconds (0.005 .. 10); NULL with a count,
 * or bounds with none, is KEEL_EINVAL. A +Inf bucket is always added. With
 * a negative bound, OpenMetrics exposes no _sum (its rule: that sum is no
 * counter) and so no _count (it has _count if and only if _sum; the +Inf
 * bucket holds the count); nor for a child from its first negative
 * observation on (its sum went down: no counter, even once back above
 * zero), nor while its sum is NaN. The Prometheus format always has
 * both. */
KEEL_API int keel_metrics_histogram(keel_metrics *m, const char *name, const char *help,
                                    const char *const *labels, size_t nlabels,
                                    const double *bounds, size_t nbounds, keel_histogram **out);

/* ---- children ----
 *
 * The child for a tuple of label values (any UTF-8, copied), created on
 * first use and the same handle afterwards. The _get forms take an array
 * and say why they fail: KEEL_EINVAL (wrong count, NULL value, a value
 * that is not well-formed UTF-8), KEEL_EFULL
 * (the family holds max_children already, or the registry's 524,288 value
 * slots are taken), KEEL_ENOMEM. The _with forms
 * take exactly as many values as the family has labels and return NULL on
 * any failure. Both take the registry lock: bind once, keep the handle. */
KEEL_API int keel_counter_get(keel_counter *c, const char *const *values, size_t n,
                              keel_counter_child **out);
KEEL_API int keel_gauge_get(keel_gauge *g, const char *const *values, size_t n,
                            keel_gauge_child **out);
KEEL_API int keel_histogram_get(keel_histogram *h, const char *const *values, size_t n,
                                keel_histogram_child **out);
KEEL_API keel_counter_child *keel_counter_with(keel_counter *c, ...);
KEEL_API keel_gauge_child *keel_gauge_with(keel_gauge *g, ...);
KEEL_API keel_histogram_child *keel_histogram_with(keel_histogram *h, ...);

/* Removes a child (its series leaves the exposition). The handle must not
 * be used afterwards. Returns 0, KEEL_EINVAL or KEEL_ENOTFOUND. */
KEEL_API int keel_counter_remove(keel_counter *c, const char *const *values, size_t n);
KEEL_API int keel_gauge_remove(keel_gauge *g, const char *const *values, size_t n);
KEEL_API int keel_histogram_remove(keel_histogram *h, const char *const *values, size_t n);

/* ---- the hot path: never blocks; allocates only on a thread's first
 * update in a registry (its block, under the registry's lock) and its
 * first in each run of 512 series (4 KiB of cache-line-aligned counters);
 * without memory for them, the update is dropped ---- */
KEEL_API void keel_counter_inc(keel_counter_child *c);
KEEL_API void keel_counter_add(keel_counter_child *c, uint64_t n);
/* Adds a non-negative amount; negative or NaN amounts are ignored. */
KEEL_API void keel_counter_add_f(keel_counter_child *c, double v);
KEEL_API void keel_gauge_set(keel_gauge_child *g, double v);
KEEL_API void keel_gauge_add(keel_gauge_child *g, double v);
KEEL_API void keel_gauge_inc(keel_gauge_child *g);
KEEL_API void keel_gauge_dec(keel_gauge_child *g);
/* NaN observations are ignored. */
KEEL_API void keel_histogram_observe(keel_histogram_child *h, double v);

/* ---- series computed at render time ----
 *
 * A series whose value a function returns when the registry renders, for
 * numbers a program (or a libkeel module) already keeps: pool sizes,
 * breaker states. type is KEEL_METRIC_COUNTER or KEEL_METRIC_GAUGE; the
 * family is created on first use and must match on later ones. fn runs
 * under the registry lock, from the rendering thread, and must not call
 * into the registry. keel_metrics_func_remove() removes every such series
 * registered with `ud`. */
typedef enum keel_metric_type {
    KEEL_METRIC_COUNTER = 0,
    KEEL_METRIC_GAUGE = 1,
    KEEL_METRIC_HISTOGRAM = 2
} keel_metric_type;

typedef double (*keel_metrics_value_fn)(void *ud);
KEEL_API int keel_metrics_func(keel_metrics *m, keel_metric_type type, const char *name,
                               const char *help, const char *const *label_names,
                               const char *const *label_values, size_t nlabels,
                               keel_metrics_value_fn fn, void *ud);
KEEL_API void keel_metrics_func_remove(keel_metrics *m, void *ud);

/* ---- reading ----
 *
 * Calls fn once per series, families in name order and series in label
 * order, from one consistent pass; for histograms with the cumulative
 * counts. fn must not call into the registry. */
typedef struct keel_metrics_sample {
    const char *name;        /* the family name as registered */
    keel_metric_type type;
    size_t nlabels;
    const char *const *label_names;
    const char *const *label_values;
    double value;            /* counter, gauge; histogram: the sum */
    uint64_t count;          /* histogram: observations */
    size_t nbuckets;         /* histogram: bounds, +Inf last */
    const double *bounds;
    const uint64_t *cumulative;
    double created;          /* seconds since the epoch */
} keel_metrics_sample;

typedef void (*keel_metrics_visit_fn)(const keel_metrics_sample *s, void *ud);
KEEL_API int keel_metrics_visit(keel_metrics *m, keel_metrics_visit_fn fn, void *ud);

/* ---- exposition ---- */
typedef enum keel_metrics_format {
    KEEL_METRICS_PROMETHEUS = 0, /* text format 0.0.4 */
    KEEL_METRICS_OPENMETRICS = 1 /* OpenMetrics 1.0.0 */
} keel_metrics_format;

/* The format an HTTP Accept header asks for: OpenMetrics when
 * application/openmetrics-text (in any case, as HTTP has it) has a q above
 * 0 and above text/plain's (at equal q, the one named first), else
 * Prometheus; wildcards count for neither, nor does OpenMetrics with a
 * version parameter other than 1.0.0 or 0.0.1 (as client_golang has it).
 * Parameter values may be quoted ("0.5"). A media range whose q is no
 * qvalue of RFC 9110 (0 to 1 with at most three decimals: not 2, 1e999 or
 * nan), or with an unterminated quoted string, counts for neither. NULL
 * or "" gives Prometheus. */
KEEL_API keel_metrics_format keel_metrics_negotiate(const char *accept);

/* The Content-Type header value for a format (a static string). */
KEEL_API const char *keel_metrics_content_type(keel_metrics_format f);

/* Renders every family, each contiguous, HELP and TYPE first, in a
 * deterministic order, with escaped label values and help texts, values
 * that round-trip, and (OpenMetrics) _created samples and the # EOF line.
 * write gets the text in pieces and returns 0 to go on; any other value
 * stops the rendering, which then returns that value. The text is built
 * whole under the registry's lock and written after it is released, so
 * write may be as slow as its client and may call into the registry.
 * Returns 0, KEEL_EINVAL or KEEL_ENOMEM. */
typedef int (*keel_metrics_write_fn)(const char *buf, size_t len, void *ud);
KEEL_API int keel_metrics_render(keel_metrics *m, keel_metrics_format f, keel_metrics_write_fn write,
                                 void *ud);

/* The same into one NUL-terminated buffer, freed with keel_free(). */
KEEL_API int keel_metrics_render_buf(keel_metrics *m, keel_metrics_format f, char **out, size_t *len);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_METRICS_H */
