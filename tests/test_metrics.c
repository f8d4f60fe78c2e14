/* tests/test_metrics.c — keel_metrics: exposition in both formats against
 * golden files, checks promtool does not make, exact totals from threads,
 * escaping, validation, caps, removal, every module's metrics (Redis and
 * PostgreSQL from tests/servers.sh) through promtool and, for OpenMetrics,
 * which promtool cannot read, through checks of our own. */
#define _GNU_SOURCE
#include <libpq-fe.h>
#include <locale.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <keel.h>

#include "harness.h"

static uint64_t fixed_wall(void *ud)
{
    (void)ud;
    return 1700000000ull * KT_S + 250 * KT_MS; /* 1700000000.25 */
}

static int promtool(const char *text, char *msg, size_t len);

static keel_metrics *registry(void)
{
    keel_metrics *m = NULL;
    keel_metrics_opts o = {.wall_clock = fixed_wall};
    ck_assert_int_eq(keel_metrics_create(&m, &o), 0);
    return m;
}

static char *render(keel_metrics *m, keel_metrics_format f)
{
    char *text = NULL;
    size_t len = 0;
    ck_assert_int_eq(keel_metrics_render_buf(m, f, &text, &len), 0);
    ck_assert_uint_eq(strlen(text), len);
    return text;
}

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "%s missing: run the tests from the top of the tree", path);
    static char buf[65536];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    return buf;
}

/* The registry behind the golden files. */
static keel_metrics *golden_registry(void)
{
    keel_metrics *m = registry();
    keel_counter *req;
    keel_gauge *temp;
    keel_histogram *lat;
    ck_assert_int_eq(keel_metrics_counter(m, "http_requests_total", "Requests served.",
                                          (const char *[]){"method", "code"}, 2, &req), 0);
    ck_assert_int_eq(keel_metrics_gauge(m, "room_temperature_celsius",
                                        "Temperature with \"quotes\", a \\ and a\nnewline.", NULL,
                                        0, &temp), 0);
    ck_assert_int_eq(keel_metrics_histogram(m, "request_duration_seconds", "Latency.",
                                            (const char *[]){"route"}, 1,
                                            (const double[]){0.001, 0.01, 0.1, 1, 10}, 5, &lat), 0);
    keel_counter_add(keel_counter_with(req, "GET", "200"), 1027);
    keel_counter_add_f(keel_counter_with(req, "POST", "500"), 3.5);
    keel_counter_inc(keel_counter_with(req, "weird \"one\"\\\n", "ünïcødé"));
    keel_gauge_set(keel_gauge_with(temp), -21.25);
    keel_histogram_child *h = keel_histogram_with(lat, "/api");
    double obs[] = {0.0005, 0.001, 0.003, 0.05, 0.05, 2, 100};
    for (size_t i = 0; i < sizeof obs / sizeof obs[0]; i++)
        keel_histogram_observe(h, obs[i]);
    keel_histogram_with(lat, "/idle"); /* a child with nothing observed */
    return m;
}

START_TEST(prometheus_text_matches_the_golden_file)
{
    keel_metrics *m = golden_registry();
    char *text = render(m, KEEL_METRICS_PROMETHEUS);
    ck_assert_str_eq(text, slurp("tests/golden/metrics.prom"));
    keel_free(text);
    keel_metrics_destroy(m);
}
END_TEST

START_TEST(openmetrics_matches_the_golden_file)
{
    keel_metrics *m = golden_registry();
    char *text = render(m, KEEL_METRICS_OPENMETRICS);
    ck_assert_str_eq(text, slurp("tests/golden/metrics.om"));
    keel_free(text);
    keel_metrics_destroy(m);
}
END_TEST

/* ---- what promtool does not check ---- */

/* Families contiguous, no duplicate series, buckets in le order ending in
 * +Inf, +Inf == _count, cumulative counts never falling. */
static void check_exposition(const char *text, int om)
{
    char seen_families[256][128];
    int nfam = 0;
    char last_family[128] = "";
    char **series = calloc(20000, sizeof *series);
    int nseries = 0;
    double last_le = -INFINITY, last_bucket = 0, inf_bucket = -1;
    char line[4096];
    for (const char *p = text; *p;) {
        const char *nl = strchr(p, '\n');
        ck_assert_msg(nl != NULL, "exposition does not end with a newline");
        size_t n = (size_t)(nl - p);
        ck_assert(n < sizeof line);
        memcpy(line, p, n);
        line[n] = '\0';
        p = nl + 1;
        if (strcmp(line, "# EOF") == 0) {
            ck_assert_msg(om && *p == '\0', "# EOF must be last, and only in OpenMetrics");
            continue;
        }
        if (strncmp(line, "# TYPE ", 7) == 0 || strncmp(line, "# HELP ", 7) == 0) {
            char fam[128];
            sscanf(line + 7, "%127s", fam);
            if (strcmp(fam, last_family) != 0) {
                for (int i = 0; i < nfam; i++)
                    ck_assert_msg(strcmp(seen_families[i], fam) != 0, "family %s split", fam);
                snprintf(seen_families[nfam++], 128, "%s", fam);
                snprintf(last_family, sizeof last_family, "%s", fam);
                last_le = -INFINITY;
            }
            continue;
        }
        ck_assert_msg(line[0] != '#', "stray comment: %s", line);
        ck_assert_msg(strncmp(line, last_family, strlen(last_family)) == 0,
                      "sample %s outside its family %s", line, last_family);
        char *sp = strrchr(line, ' ');
        ck_assert(sp != NULL);
        *sp = '\0';
        double v = strtod(sp + 1, NULL);
        for (int i = 0; i < nseries; i++)
            ck_assert_msg(strcmp(series[i], line) != 0, "duplicate series %s", line);
        series[nseries++] = strdup(line);
        char *le = strstr(line, "le=\"");
        if (le && strstr(line, "_bucket")) {
            double b = strncmp(le + 4, "+Inf", 4) == 0 ? INFINITY : strtod(le + 4, NULL);
            if (b < last_le) /* a new child starts over */
                last_bucket = 0;
            else
                ck_assert_msg(v >= last_bucket, "cumulative bucket fell: %s", line);
            ck_assert_msg(b != last_le, "bucket repeated: %s", line);
            last_le = b;
            last_bucket = v;
            if (isinf(b))
                inf_bucket = v;
        } else if (strstr(line, "_count")) {
            ck_assert_msg(inf_bucket == v, "+Inf bucket %g != _count %g", inf_bucket, v);
            last_le = -INFINITY; /* the next child starts over */
            last_bucket = 0;
        }
    }
    ck_assert_msg(!om || strstr(text, "# EOF\n"), "OpenMetrics without # EOF");
    for (int i = 0; i < nseries; i++)
        free(series[i]);
    free(series);
}

/* promtool check metrics (Debian's 2.42) reads only the 0.0.4 text format:
 * it takes an OpenMetrics counter family `x` with samples `x_total` for
 * two families, and refuses the \" escape in HELP, so it fails valid
 * OpenMetrics text (`# TYPE a counter`, `a_total 1`, `# EOF` is refused).
 * This checks what OpenMetrics asks on top of check_exposition() instead:
 * each family opens with its TYPE, its HELP and UNIT come once before its
 * samples, every sample carries a suffix its type allows and a value that
 * parses, and the text ends with the one # EOF. */
static bool om_suffix_allowed(const char *type, const char *suffix)
{
    static const struct {
        const char *type, *suffixes[5];
    } allowed[] = {
        {"counter", {"_total", "_created"}},
        {"gauge", {""}},
        {"unknown", {""}},
        {"histogram", {"_bucket", "_count", "_sum", "_created"}},
        {"summary", {"", "_count", "_sum", "_created"}},
    };
    for (size_t i = 0; i < sizeof allowed / sizeof allowed[0]; i++)
        if (strcmp(allowed[i].type, type) == 0)
            for (size_t k = 0; k < 5 && allowed[i].suffixes[k]; k++)
                if (strcmp(allowed[i].suffixes[k], suffix) == 0)
                    return true;
    return false;
}

static void check_openmetrics(const char *text)
{
    size_t len = strlen(text);
    ck_assert_msg(len >= 6 && strcmp(text + len - 6, "# EOF\n") == 0, "OpenMetrics does not end with # EOF");
    ck_assert_msg(strstr(text, "# EOF\n") == text + len - 6, "# EOF before the end");
    char family[128] = "", type[32] = "";
    bool help = false, unit = false, samples = false;
    char line[4096];
    for (const char *p = text; *p;) {
        const char *nl = strchr(p, '\n');
        size_t n = (size_t)(nl - p);
        ck_assert(n < sizeof line);
        memcpy(line, p, n);
        line[n] = '\0';
        p = nl + 1;
        char name[128];
        if (strcmp(line, "# EOF") == 0)
            continue;
        if (strncmp(line, "# TYPE ", 7) == 0) {
            ck_assert_int_eq(sscanf(line + 7, "%127s %31s", name, type), 2);
            ck_assert_msg(strcmp(name, family) != 0, "TYPE twice for %s", name);
            snprintf(family, sizeof family, "%s", name);
            help = unit = samples = false;
            continue;
        }
        if (strncmp(line, "# HELP ", 7) == 0 || strncmp(line, "# UNIT ", 7) == 0) {
            bool *seen = line[2] == 'H' ? &help : &unit;
            sscanf(line + 7, "%127s", name);
            ck_assert_msg(strcmp(name, family) == 0, "%s before the TYPE of %s", line, name);
            ck_assert_msg(!*seen && !samples, "%s twice or after samples", line);
            *seen = true;
            continue;
        }
        ck_assert_msg(line[0] != '#', "stray comment: %s", line);
        size_t nlen = strcspn(line, "{ ");
        ck_assert_msg(family[0] && strncmp(line, family, strlen(family)) == 0 && nlen >= strlen(family),
                      "sample before its family's TYPE: %s", line);
        snprintf(name, sizeof name, "%.*s", (int)(nlen - strlen(family)), line + strlen(family));
        ck_assert_msg(om_suffix_allowed(type, name), "%s: suffix \"%s\" not allowed in a %s", line, name, type);
        const char *value = strrchr(line, ' ') + 1;
        char *end;
        strtod(value, &end);
        ck_assert_msg(end > value && *end == '\0', "bad value: %s", line);
        samples = true;
    }
}

START_TEST(expositions_keep_families_whole_and_histograms_consistent)
{
    keel_metrics *m = golden_registry();
    for (int om = 0; om < 2; om++) {
        char *text = render(m, om ? KEEL_METRICS_OPENMETRICS : KEEL_METRICS_PROMETHEUS);
        check_exposition(text, om);
        if (om)
            check_openmetrics(text);
        keel_free(text);
    }
    keel_metrics_destroy(m);
}
END_TEST

START_TEST(values_round_trip_and_le_is_canonical)
{
    keel_metrics *m = registry();
    keel_gauge *g;
    ck_assert_int_eq(keel_metrics_gauge(m, "v", "", (const char *[]){"k"}, 1, &g), 0);
    double vals[] = {0.1, 1.0 / 3, 1e-5, 123456, 1234567, 9007199254740993.0, 5e-324, -0.0, 2.5,
                     NAN, INFINITY, -INFINITY, 1e300};
    char key[8];
    for (size_t i = 0; i < sizeof vals / sizeof vals[0]; i++) {
        snprintf(key, sizeof key, "%02zu", i);
        keel_gauge_set(keel_gauge_with(g, key), vals[i]);
    }
    char *text = render(m, KEEL_METRICS_PROMETHEUS);
    for (size_t i = 0; i < sizeof vals / sizeof vals[0]; i++) {
        char pat[32];
        snprintf(pat, sizeof pat, "v{k=\"%02zu\"} ", i);
        char *at = strstr(text, pat);
        ck_assert_ptr_nonnull(at);
        double back = strtod(at + strlen(pat), NULL);
        if (isnan(vals[i]))
            ck_assert(strncmp(at + strlen(pat), "NaN\n", 4) == 0);
        else
            ck_assert_msg(back == vals[i] && !signbit(back) == !signbit(vals[i]),
                          "%.17g came back as %.17g", vals[i], back);
    }
    ck_assert_ptr_nonnull(strstr(text, "v{k=\"07\"} -0\n")); /* Go's %g keeps the sign */
    ck_assert_ptr_nonnull(strstr(text, "v{k=\"10\"} +Inf\n"));
    ck_assert_ptr_nonnull(strstr(text, "v{k=\"11\"} -Inf\n"));
    ck_assert_ptr_nonnull(strstr(text, "v{k=\"02\"} 1e-05\n")); /* Go's %g */
    ck_assert_ptr_nonnull(strstr(text, "v{k=\"03\"} 123456\n"));
    ck_assert_ptr_nonnull(strstr(text, "v{k=\"04\"} 1.234567e+06\n"));
    keel_free(text);
    /* OpenMetrics le values: Go's %g with .0 on integers */
    keel_histogram *h;
    ck_assert_int_eq(keel_metrics_histogram(m, "h", "", NULL, 0,
                                            (const double[]){1e-10, 0.001, 0.95, 1, 10, 1e5, 1e6}, 7,
                                            &h), 0);
    keel_histogram_with(h);
    text = render(m, KEEL_METRICS_OPENMETRICS);
    const char *les[] = {"1e-10", "0.001", "0.95", "1.0", "10.0", "100000.0", "1e+06", "+Inf"};
    for (size_t i = 0; i < 8; i++) {
        char pat[64];
        snprintf(pat, sizeof pat, "h_bucket{le=\"%s\"} 0\n", les[i]);
        ck_assert_msg(strstr(text, pat) != NULL, "missing %s", pat);
    }
    keel_free(text);
    /* a bound of -0 is the bound 0, whose le has no sign */
    keel_histogram *z;
    ck_assert_int_eq(keel_metrics_histogram(m, "z", "", NULL, 0, (const double[]){-0.0}, 1, &z), 0);
    keel_histogram_observe(keel_histogram_with(z), -0.0);
    text = render(m, KEEL_METRICS_PROMETHEUS);
    ck_assert_ptr_nonnull(strstr(text, "z_bucket{le=\"0\"} 1\n"));
    keel_free(text);
    text = render(m, KEEL_METRICS_OPENMETRICS);
    ck_assert_ptr_nonnull(strstr(text, "z_bucket{le=\"0.0\"} 1\n"));
    keel_free(text);
    keel_metrics_destroy(m);
}
END_TEST

/* ---- threads ---- */

typedef struct hammer {
    keel_counter_child *c;
    keel_histogram_child *h;
    keel_gauge_child *g;
    long n;
} hammer;

/* What the threads observe, round-robin: one value in each default bucket
 * (0.5 and 1 on a bound, which le includes; 16 past the last). All are
 * dyadic, so every partial sum of millions of them is exact in a double,
 * in whatever order the shards add up. */
static const double observed[] = {0.00390625, 0.0078125, 0.015625, 0.03125, 0.0625, 0.125,
                                  0.5, 1, 2, 4, 8, 16};
#define NOBSERVED (sizeof observed / sizeof observed[0])

static void *hammer_run(void *arg)
{
    hammer *hm = arg;
    for (long i = 0; i < hm->n; i++) {
        keel_counter_inc(hm->c);
        keel_histogram_observe(hm->h, observed[i % (long)NOBSERVED]);
        if (i % 64 == 0)
            keel_gauge_inc(hm->g);
    }
    return NULL; /* and the thread's values are folded in at exit */
}

/* The value of the sample line that starts with `pattern`. */
static double sample_value(keel_metrics *m, const char *pattern)
{
    char *text = render(m, KEEL_METRICS_PROMETHEUS);
    char *at = text;
    while (at && strncmp(at, pattern, strlen(pattern)) != 0)
        at = (at = strchr(at, '\n')) ? at + 1 : NULL;
    ck_assert_msg(at != NULL, "no %s", pattern);
    double v = strtod(at + strlen(pattern), NULL);
    keel_free(text);
    return v;
}

/* Tagged slow: not run under valgrind, where 8M calls would take minutes;
 * under TSan it takes a few seconds. */
START_TEST(two_threads_count_exactly)
{
    keel_metrics *m = registry();
    keel_counter *c;
    keel_histogram *h;
    keel_gauge *g;
    ck_assert_int_eq(keel_metrics_counter(m, "ops_total", "", NULL, 0, &c), 0);
    ck_assert_int_eq(keel_metrics_histogram(m, "op_seconds", "", NULL, 0, NULL, 0, &h), 0);
    ck_assert_int_eq(keel_metrics_gauge(m, "g", "", NULL, 0, &g), 0);
    const long n = 2000000;
    hammer hm = {keel_counter_with(c), keel_histogram_with(h), keel_gauge_with(g), n};
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&t[i], NULL, hammer_run, &hm);
    /* a render while they run must not disturb anything */
    keel_free(render(m, KEEL_METRICS_OPENMETRICS));
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
    keel_counter_add(hm.c, 5); /* and this thread's own block */
    ck_assert_double_eq(sample_value(m, "ops_total "), 2.0 * n + 5);
    ck_assert_double_eq(sample_value(m, "g "), 2.0 * (double)((n + 63) / 64));
    /* each thread observed observed[k] n / NOBSERVED times, once more for
     * the first n % NOBSERVED values */
    const double default_bounds[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, INFINITY};
    double sum = 0;
    for (size_t k = 0; k < NOBSERVED; k++)
        sum += 2.0 * (double)(n / (long)NOBSERVED + ((long)k < n % (long)NOBSERVED)) * observed[k];
    for (size_t b = 0; b < sizeof default_bounds / sizeof default_bounds[0]; b++) {
        double want = 0;
        for (size_t k = 0; k < NOBSERVED; k++)
            if (observed[k] <= default_bounds[b])
                want += 2.0 * (double)(n / (long)NOBSERVED + ((long)k < n % (long)NOBSERVED));
        char pat[64];
        if (isinf(default_bounds[b]))
            snprintf(pat, sizeof pat, "op_seconds_bucket{le=\"+Inf\"} ");
        else
            snprintf(pat, sizeof pat, "op_seconds_bucket{le=\"%g\"} ", default_bounds[b]);
        ck_assert_msg(sample_value(m, pat) == want, "%s%.17g, want %.17g", pat, sample_value(m, pat), want);
    }
    ck_assert_double_eq(sample_value(m, "op_seconds_count "), 2.0 * n);
    ck_assert_msg(sample_value(m, "op_seconds_sum ") == sum, "op_seconds_sum %.17g, want %.17g",
                  sample_value(m, "op_seconds_sum "), sum);
    keel_metrics_destroy(m);
}
END_TEST

/* Short-lived threads: each counts, observes and exits, in waves, while
 * a scraper reads the registry. A count must be in exactly one place at
 * every scrape (the thread's block or `retired`): never lost when its
 * thread exits, never counted twice, so every series only grows, and
 * ends exact. */
typedef struct churn {
    keel_metrics *m;
    keel_counter_child *c, *cf;
    keel_histogram_child *h;
    atomic_bool stop;
    atomic_long scrapes, went_down;
    double last[4];
} churn;

#define CHURN_WAVES 60
#define CHURN_THREADS 6
#define CHURN_N 500

static void *churn_thread(void *arg)
{
    churn *ch = arg;
    for (long i = 0; i < CHURN_N; i++) {
        keel_counter_inc(ch->c);
        keel_counter_add_f(ch->cf, 0.5);
        keel_histogram_observe(ch->h, observed[i % (long)NOBSERVED]);
    }
    return NULL;
}

static void churn_sample(const keel_metrics_sample *s, void *ud)
{
    churn *ch = ud;
    double now[4] = {-1, -1, -1, -1};
    if (strcmp(s->name, "churn_total") == 0)
        now[0] = s->value;
    else if (strcmp(s->name, "churn_f_total") == 0)
        now[1] = s->value;
    else if (strcmp(s->name, "churn_seconds") == 0) {
        now[2] = (double)s->count;
        now[3] = s->value;
    }
    for (int i = 0; i < 4; i++)
        if (now[i] >= 0) {
            if (now[i] < ch->last[i])
                atomic_fetch_add(&ch->went_down, 1);
            ch->last[i] = now[i];
        }
}

static void *churn_scraper(void *arg)
{
    churn *ch = arg;
    while (!atomic_load(&ch->stop)) {
        ck_assert_int_eq(keel_metrics_visit(ch->m, churn_sample, ch), 0);
        atomic_fetch_add(&ch->scrapes, 1);
    }
    return NULL;
}

START_TEST(counts_of_exited_threads_are_kept_once)
{
    churn ch = {.m = registry()};
    keel_counter *c, *cf;
    keel_histogram *h;
    ck_assert_int_eq(keel_metrics_counter(ch.m, "churn_total", "", NULL, 0, &c), 0);
    ck_assert_int_eq(keel_metrics_counter(ch.m, "churn_f_total", "", NULL, 0, &cf), 0);
    ck_assert_int_eq(keel_metrics_histogram(ch.m, "churn_seconds", "", NULL, 0, NULL, 0, &h), 0);
    ch.c = keel_counter_with(c);
    ch.cf = keel_counter_with(cf);
    ch.h = keel_histogram_with(h);
    pthread_t scraper;
    ck_assert_int_eq(pthread_create(&scraper, NULL, churn_scraper, &ch), 0);
    double sum = 0;
    for (int w = 0; w < CHURN_WAVES; w++) {
        pthread_t t[CHURN_THREADS];
        for (int i = 0; i < CHURN_THREADS; i++)
            ck_assert_int_eq(pthread_create(&t[i], NULL, churn_thread, &ch), 0);
        for (int i = 0; i < CHURN_THREADS; i++)
            ck_assert_int_eq(pthread_join(t[i], NULL), 0);
    }
    for (long i = 0; i < CHURN_N; i++)
        sum += observed[i % (long)NOBSERVED];
    atomic_store(&ch.stop, true);
    ck_assert_int_eq(pthread_join(scraper, NULL), 0);
    ck_assert_int_gt(atomic_load(&ch.scrapes), 0);
    ck_assert_msg(atomic_load(&ch.went_down) == 0, "a series went down %ld times",
                  (long)atomic_load(&ch.went_down));
    const double n = (double)CHURN_WAVES * CHURN_THREADS * CHURN_N;
    ck_assert_double_eq(sample_value(ch.m, "churn_total "), n);
    ck_assert_double_eq(sample_value(ch.m, "churn_f_total "), n / 2);
    ck_assert_double_eq(sample_value(ch.m, "churn_seconds_count "), n);
    ck_assert_double_eq(sample_value(ch.m, "churn_seconds_sum "), sum * CHURN_WAVES * CHURN_THREADS);
    keel_metrics_destroy(ch.m);
}
END_TEST

/* A thread that outlives a registry keeps a stale entry for it; a new
 * registry may get the same owner id. The thread's counts for the new one
 * start from zero, and the old block is freed, not folded into the new. */
typedef struct lingerer {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    keel_counter_child *c; /* what to count next; NULL: exit */
    int step, done;
} lingerer;

static void *lingerer_main(void *arg)
{
    lingerer *l = arg;
    pthread_mutex_lock(&l->mu);
    for (;;) {
        while (l->done == l->step)
            pthread_cond_wait(&l->cv, &l->mu);
        keel_counter_child *c = l->c;
        if (c)
            keel_counter_add(c, 7);
        l->done = l->step;
        pthread_cond_broadcast(&l->cv);
        if (!c)
            break;
    }
    pthread_mutex_unlock(&l->mu);
    return NULL;
}

static void lingerer_count(lingerer *l, keel_counter_child *c)
{
    pthread_mutex_lock(&l->mu);
    l->c = c;
    l->step++;
    pthread_cond_broadcast(&l->cv);
    while (l->done != l->step)
        pthread_cond_wait(&l->cv, &l->mu);
    pthread_mutex_unlock(&l->mu);
}

START_TEST(a_thread_outliving_its_registry_counts_from_zero_in_the_next)
{
    lingerer l = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};
    pthread_t t;
    ck_assert_int_eq(pthread_create(&t, NULL, lingerer_main, &l), 0);
    for (int round = 0; round < 20; round++) {
        keel_metrics *m = registry();
        keel_counter *c;
        ck_assert_int_eq(keel_metrics_counter(m, "lingering_total", "", NULL, 0, &c), 0);
        keel_counter_child *cc = keel_counter_with(c);
        lingerer_count(&l, cc);
        keel_counter_inc(cc);
        ck_assert_double_eq(sample_value(m, "lingering_total "), 8);
        lingerer_count(&l, cc);
        ck_assert_double_eq(sample_value(m, "lingering_total "), 15);
        keel_metrics_destroy(m); /* the thread keeps its entry for it */
    }
    keel_metrics *m = registry();
    keel_counter *c;
    ck_assert_int_eq(keel_metrics_counter(m, "lingering_total", "", NULL, 0, &c), 0);
    keel_counter_child *cc = keel_counter_with(c);
    lingerer_count(&l, cc);
    lingerer_count(&l, NULL); /* the thread exits, its block folded */
    ck_assert_int_eq(pthread_join(t, NULL), 0);
    ck_assert_double_eq(sample_value(m, "lingering_total "), 7);
    keel_metrics_destroy(m);
}
END_TEST

/* ---- validation, caps, removal ---- */

START_TEST(names_and_labels_are_validated)
{
    keel_metrics *d;
    ck_assert_int_eq(keel_metrics_create(NULL, NULL), KEEL_EINVAL);
    ck_assert_int_eq(keel_metrics_create(&d, NULL), 0); /* the defaults */
    keel_metrics_destroy(d);
    keel_metrics *m = registry();
    keel_counter *c;
    keel_gauge *g;
    keel_histogram *h;
    ck_assert_int_eq(keel_metrics_counter(m, "requests", "", NULL, 0, &c), KEEL_EINVAL); /* _total */
    ck_assert_int_eq(keel_metrics_counter(m, "9lives_total", "", NULL, 0, &c), KEEL_EINVAL);
    ck_assert_int_eq(keel_metrics_counter(m, "_total", "", NULL, 0, &c), KEEL_EINVAL); /* no family name */
    ck_assert_int_eq(keel_metrics_gauge(m, "bad-name", "", NULL, 0, &g), KEEL_EINVAL);
    ck_assert_int_eq(keel_metrics_gauge(m, "", "", NULL, 0, &g), KEEL_EINVAL);
    ck_assert_int_eq(keel_metrics_gauge(m, NULL, "", NULL, 0, &g), KEEL_EINVAL);
    const char *bad_labels[][1] = {{"le"}, {"quantile"}, {"__x"}, {"a-b"}, {""}, {NULL}};
    for (size_t i = 0; i < 6; i++)
        ck_assert_int_eq(keel_metrics_gauge(m, "ok", "", bad_labels[i], 1, &g), KEEL_EINVAL);
    ck_assert_int_eq(keel_metrics_gauge(m, "ok", "", (const char *[]){"a", "a"}, 2, &g), KEEL_EINVAL);
    ck_assert_int_eq(keel_metrics_histogram(m, "h", "", NULL, 0, (const double[]){1, 1}, 2, &h),
                     KEEL_EINVAL);
    ck_assert_int_eq(keel_metrics_histogram(m, "h", "", NULL, 0, (const double[]){NAN}, 1, &h),
                     KEEL_EINVAL);
    /* bounds and their count go together: one without the other is refused
     * (NULL with a count once took the defaults silently) */
    ck_assert_int_eq(keel_metrics_histogram(m, "h", "", NULL, 0, NULL, 3, &h), KEEL_EINVAL);
    ck_assert_int_eq(keel_metrics_histogram(m, "h", "", NULL, 0, (const double[]){1}, 0, &h), KEEL_EINVAL);
    ck_assert_int_eq(keel_metrics_gauge(m, "ns:ok_name", "", NULL, 0, &g), 0);
    ck_assert_int_eq(keel_metrics_gauge(m, "ns:ok_name", "", NULL, 0, &g), KEEL_EEXIST);
    ck_assert_int_eq(keel_metrics_histogram(m, "lat", "", NULL, 0, NULL, 0, &h), 0);
    ck_assert_int_eq(keel_metrics_gauge(m, "lat_count", "", NULL, 0, &g), KEEL_EEXIST);
    ck_assert_int_eq(keel_metrics_counter(m, "x_total", "", NULL, 0, &c), 0);
    ck_assert_int_eq(keel_metrics_gauge(m, "x", "", NULL, 0, &g), KEEL_EEXIST); /* OM family x */
    /* children: wrong counts */
    keel_counter *two;
    ck_assert_int_eq(keel_metrics_counter(m, "two_total", "", (const char *[]){"a", "b"}, 2, &two), 0);
    keel_counter_child *ch;
    ck_assert_int_eq(keel_counter_get(two, (const char *[]){"x"}, 1, &ch), KEEL_EINVAL);
    ck_assert_int_eq(keel_counter_get(two, (const char *[]){"x", NULL}, 2, &ch), KEEL_EINVAL);
    ck_assert_int_eq(keel_counter_get(NULL, NULL, 0, &ch), KEEL_EINVAL);
    /* A count past the family's is refused before the values are read:
     * two values, just before a page that cannot be read. */
    long pg = sysconf(_SC_PAGESIZE);
    char *pages = mmap(NULL, 2 * (size_t)pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ck_assert_ptr_ne(pages, MAP_FAILED);
    ck_assert_int_eq(mprotect(pages + pg, (size_t)pg, PROT_NONE), 0);
    const char **edge = (const char **)(pages + pg) - 2;
    edge[0] = "x";
    edge[1] = "y";
    ck_assert_int_eq(keel_counter_get(two, edge, 3, &ch), KEEL_EINVAL);
    ck_assert_int_eq(keel_counter_get(two, edge, SIZE_MAX, &ch), KEEL_EINVAL);
    ck_assert_int_eq(keel_counter_remove(two, edge, 3), KEEL_EINVAL);
    munmap(pages, 2 * (size_t)pg);
    keel_counter_inc(NULL); /* harmless */
    keel_histogram_observe(NULL, 1);
    keel_gauge_set(NULL, 1);
    keel_metrics_destroy(m);
}
END_TEST

/* Label values and help texts are UTF-8: one series with a byte that is
 * not would make Prometheus refuse the whole scrape ("invalid label
 * value"), so they are refused when given. */
START_TEST(label_values_and_help_must_be_utf8)
{
    keel_metrics *m = registry();
    keel_gauge *g;
    ck_assert_int_eq(keel_metrics_gauge(m, "bad_help", "\xff", NULL, 0, &g), KEEL_EINVAL);
    ck_assert_int_eq(keel_metrics_gauge(m, "g", "d\xc3\xa9j\xc3\xa0 vu", (const char *[]){"k"}, 1, &g), 0);
    const char *bad[] = {"\xff", "a\xc3\x28", "\xc0\xaf", "\xe0\x80\xaf", "\xed\xa0\x80",
                         "\xe2\x82", "\xf4\x90\x80\x80", "\xf8\x88\x80\x80\x80", "\x80"};
    keel_gauge_child *c;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ck_assert_msg(keel_gauge_get(g, (const char *[]){bad[i]}, 1, &c) == KEEL_EINVAL, "value %zu taken", i);
        ck_assert_int_eq(keel_gauge_remove(g, (const char *[]){bad[i]}, 1), KEEL_EINVAL);
    }
    const char *good[] = {"", "plain", "\xc3\xbcn\xc3\xaf" "c\xc3\xb8" "d\xc3\xa9", "\xe2\x82\xac",
                          "\xf0\x9f\x98\x80", "\xef\xbf\xbf", "\xf4\x8f\xbf\xbf", "\xed\x9f\xbf"};
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++)
        ck_assert_msg(keel_gauge_get(g, (const char *[]){good[i]}, 1, &c) == 0, "value %zu refused", i);
    char *text = render(m, KEEL_METRICS_PROMETHEUS);
    char msg[4096];
    ck_assert_msg(promtool(text, msg, sizeof msg) == 0, "%s\n%s", msg, text);
    keel_free(text);
    keel_metrics_destroy(m);
}
END_TEST

START_TEST(children_are_bound_once_capped_and_removable)
{
    keel_metrics *m = NULL;
    keel_metrics_opts o = {.max_children = 3, .wall_clock = fixed_wall};
    ck_assert_int_eq(keel_metrics_create(&m, &o), 0);
    keel_counter *c;
    ck_assert_int_eq(keel_metrics_counter(m, "hits_total", "", (const char *[]){"k"}, 1, &c), 0);
    keel_counter_child *a = keel_counter_with(c, "a");
    ck_assert_ptr_nonnull(a);
    ck_assert_ptr_eq(keel_counter_with(c, "a"), a); /* the same handle */
    ck_assert_ptr_nonnull(keel_counter_with(c, "b"));
    ck_assert_ptr_nonnull(keel_counter_with(c, "c"));
    keel_counter_child *d;
    ck_assert_int_eq(keel_counter_get(c, (const char *[]){"d"}, 1, &d), KEEL_EFULL);
    ck_assert_ptr_null(keel_counter_with(c, "d"));
    keel_counter_add(a, 7);
    ck_assert_int_eq(keel_counter_remove(c, (const char *[]){"a"}, 1), 0);
    ck_assert_int_eq(keel_counter_remove(c, (const char *[]){"a"}, 1), KEEL_ENOTFOUND);
    ck_assert_int_eq(keel_counter_remove(c, (const char *[]){NULL}, 1), KEEL_EINVAL); /* once crashed */
    /* room again; the new child reuses a's slots but starts at zero */
    keel_counter_child *e = keel_counter_with(c, "e");
    ck_assert_ptr_nonnull(e);
    keel_counter_inc(e);
    char *text = render(m, KEEL_METRICS_PROMETHEUS);
    ck_assert_ptr_null(strstr(text, "k=\"a\""));
    ck_assert_ptr_nonnull(strstr(text, "hits_total{k=\"e\"} 1\n"));
    keel_free(text);
    keel_metrics_destroy(m);
}
END_TEST

/* Threads that add to a child and stay alive until told to exit. */
typedef struct adder {
    pthread_t t;
    keel_counter_child *c;
    double v;
    pthread_mutex_t *mu;
    pthread_cond_t *cv;
    int added, go;
} adder;

static void *adder_main(void *arg)
{
    adder *a = arg;
    keel_counter_add_f(a->c, a->v);
    pthread_mutex_lock(a->mu);
    a->added = 1;
    pthread_cond_broadcast(a->cv);
    while (!a->go)
        pthread_cond_wait(a->cv, a->mu);
    pthread_mutex_unlock(a->mu);
    return NULL;
}

START_TEST(a_child_on_reused_slots_starts_at_zero_whatever_threads_exit)
{
    /* A removed child's slots go to a new child. Floating-point sums are
     * not associative: with 0.3, 0.1 and 0.2 in three threads' words, a
     * value kept as "sum now minus sum at creation" moved when a thread
     * exited and its word was folded in, and the new, never incremented
     * counter read -1.1102230246251565e-16: a negative counter. */
    keel_metrics *m = registry();
    keel_counter *c;
    ck_assert_int_eq(keel_metrics_counter(m, "x_total", "", (const char *[]){"k"}, 1, &c), 0);
    keel_counter_child *old = keel_counter_with(c, "old");
    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
    adder ad[3];
    const double v[3] = {0.3, 0.1, 0.2};
    for (int i = 0; i < 3; i++) { /* one at a time: a known order of blocks */
        ad[i] = (adder){.c = old, .v = v[i], .mu = &mu, .cv = &cv};
        ck_assert_int_eq(pthread_create(&ad[i].t, NULL, adder_main, &ad[i]), 0);
        pthread_mutex_lock(&mu);
        while (!ad[i].added)
            pthread_cond_wait(&cv, &mu);
        pthread_mutex_unlock(&mu);
    }
    ck_assert_int_eq(keel_counter_remove(c, (const char *[]){"old"}, 1), 0);
    ck_assert_ptr_nonnull(keel_counter_with(c, "new"));
    for (int i = 0; i < 3; i++) {
        pthread_mutex_lock(&mu);
        ad[i].go = 1;
        pthread_cond_broadcast(&cv);
        pthread_mutex_unlock(&mu);
        ck_assert_int_eq(pthread_join(ad[i].t, NULL), 0);
        char *text = render(m, KEEL_METRICS_PROMETHEUS);
        ck_assert_msg(strstr(text, "x_total{k=\"new\"} 0\n"), "after %d exits:\n%s", i + 1, text);
        keel_free(text);
    }
    keel_metrics_destroy(m);
}
END_TEST

START_TEST(accept_headers_choose_the_format)
{
    ck_assert_int_eq(keel_metrics_negotiate(NULL), KEEL_METRICS_PROMETHEUS);
    ck_assert_int_eq(keel_metrics_negotiate(""), KEEL_METRICS_PROMETHEUS);
    ck_assert_int_eq(keel_metrics_negotiate("text/plain;version=0.0.4"), KEEL_METRICS_PROMETHEUS);
    ck_assert_int_eq(keel_metrics_negotiate("application/openmetrics-text;version=1.0.0,text/plain;"
                                            "version=0.0.4;q=0.5,*/*;q=0.1"),
                     KEEL_METRICS_OPENMETRICS);
    ck_assert_int_eq(keel_metrics_negotiate("application/openmetrics-text;q=0,text/plain"),
                     KEEL_METRICS_PROMETHEUS);
    /* HTTP media types and the q parameter are case-insensitive (RFC 9110
     * 8.3.1, 12.4.2), and only a whole media range counts. */
    ck_assert_int_eq(keel_metrics_negotiate("Application/OpenMetrics-Text; version=1.0.0"),
                     KEEL_METRICS_OPENMETRICS);
    ck_assert_int_eq(keel_metrics_negotiate("application/openmetrics-text;Q=0, text/plain"),
                     KEEL_METRICS_PROMETHEUS);
    ck_assert_int_eq(keel_metrics_negotiate("application/openmetrics-text;version=1.0.0 ; q=0"),
                     KEEL_METRICS_PROMETHEUS);
    ck_assert_int_eq(keel_metrics_negotiate("text/plain;q=0.5, application/openmetrics-text-v2"),
                     KEEL_METRICS_PROMETHEUS);
    ck_assert_int_eq(keel_metrics_negotiate("application/openmetrics-text;foo=\"a,b\";q=0"),
                     KEEL_METRICS_PROMETHEUS);
    ck_assert_int_eq(keel_metrics_negotiate("application/openmetrics-text;q=0,"
                                            "application/openmetrics-text;version=1.0.0;q=0.5"),
                     KEEL_METRICS_OPENMETRICS);
    /* the higher q wins, as in client_golang; at equal q, the first named */
    ck_assert_int_eq(keel_metrics_negotiate("application/openmetrics-text;q=0.5, text/plain;q=0.9"),
                     KEEL_METRICS_PROMETHEUS);
    ck_assert_int_eq(keel_metrics_negotiate("TEXT/plain;q=0.2, application/openmetrics-text;q=0.3"),
                     KEEL_METRICS_OPENMETRICS);
    ck_assert_int_eq(keel_metrics_negotiate("text/plain, application/openmetrics-text"),
                     KEEL_METRICS_PROMETHEUS);
    ck_assert_int_eq(keel_metrics_negotiate("application/openmetrics-text, text/plain"),
                     KEEL_METRICS_OPENMETRICS);
    ck_assert_int_eq(keel_metrics_negotiate("*/*;q=0.9, application/openmetrics-text;q=0.1"),
                     KEEL_METRICS_OPENMETRICS); /* a wildcard names neither */
    /* OpenMetrics of a version keel does not write names nothing; 0.0.1,
     * 1.0.0 or none are taken, as client_golang takes them */
    ck_assert_int_eq(keel_metrics_negotiate("application/openmetrics-text;version=2.0.0"),
                     KEEL_METRICS_PROMETHEUS);
    ck_assert_int_eq(keel_metrics_negotiate("application/openmetrics-text;version=2.0.0, text/plain;q=0.1"),
                     KEEL_METRICS_PROMETHEUS);
    ck_assert_int_eq(keel_metrics_negotiate("application/openmetrics-text;version=2.0.0,"
                                            "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;q=0.4"),
                     KEEL_METRICS_OPENMETRICS);
    ck_assert_int_eq(keel_metrics_negotiate("application/openmetrics-text;Version=0.0.1;q=0.5,text/plain;q=0.4"),
                     KEEL_METRICS_OPENMETRICS);
    ck_assert_int_eq(keel_metrics_negotiate("application/openmetrics-text;version=1.0.01"),
                     KEEL_METRICS_PROMETHEUS);
    /* a parameter value may be a quoted string (RFC 9110 5.6.6) */
    ck_assert_int_eq(keel_metrics_negotiate("application/openmetrics-text;version=\"1.0.0\";q=\"0.5\","
                                            "text/plain;q=0.4"),
                     KEEL_METRICS_OPENMETRICS);
    ck_assert_int_eq(keel_metrics_negotiate("application/openmetrics-text;version=\"2.0.0\""),
                     KEEL_METRICS_PROMETHEUS);
    /* a weight that is no qvalue (above 1, a number past double's range,
     * not a number) makes the range count for nothing (RFC 9110 12.4.2
     * allows 0 to 1 only), and so does an unterminated quoted string */
    ck_assert_int_eq(keel_metrics_negotiate("application/openmetrics-text;q=2, text/plain;q=0.5"),
                     KEEL_METRICS_PROMETHEUS);
    ck_assert_int_eq(keel_metrics_negotiate("application/openmetrics-text;q=1e999, text/plain;q=0.5"),
                     KEEL_METRICS_PROMETHEUS);
    ck_assert_int_eq(keel_metrics_negotiate("application/openmetrics-text;q=-1, text/plain;q=0.5"),
                     KEEL_METRICS_PROMETHEUS);
    ck_assert_int_eq(keel_metrics_negotiate("application/openmetrics-text;q=nan"), KEEL_METRICS_PROMETHEUS);
    ck_assert_int_eq(keel_metrics_negotiate("application/openmetrics-text;q=0x1"), KEEL_METRICS_PROMETHEUS);
    ck_assert_int_eq(keel_metrics_negotiate("application/openmetrics-text;q=1.000, text/plain;q=0.999"),
                     KEEL_METRICS_OPENMETRICS);
    ck_assert_int_eq(keel_metrics_negotiate("text/plain;q=0.5, application/openmetrics-text;q=2"),
                     KEEL_METRICS_PROMETHEUS);
    ck_assert_int_eq(keel_metrics_negotiate("application/openmetrics-text;version=\"1.0.0"),
                     KEEL_METRICS_PROMETHEUS);
    ck_assert_int_eq(keel_metrics_negotiate("application/openmetrics-text;version=\"1.0.0\\\""),
                     KEEL_METRICS_PROMETHEUS);
    ck_assert_int_eq(keel_metrics_negotiate("application/openmetrics-text;q=\"0.5"), KEEL_METRICS_PROMETHEUS);
    ck_assert_int_eq(keel_metrics_negotiate("application/openmetrics-text;foo=\"x, text/plain;q=0.1"),
                     KEEL_METRICS_PROMETHEUS); /* the quote runs to the end: one range, ignored */
    ck_assert_str_eq(keel_metrics_content_type(KEEL_METRICS_PROMETHEUS),
                     "text/plain; version=0.0.4; charset=utf-8");
    ck_assert_str_eq(keel_metrics_content_type(KEEL_METRICS_OPENMETRICS),
                     "application/openmetrics-text; version=1.0.0; charset=utf-8");
}
END_TEST

static int writes;
static int stop_after_one(const char *buf, size_t len, void *ud)
{
    (void)buf;
    (void)len;
    (void)ud;
    return ++writes > 1 ? 42 : 0;
}

/* A host program that chose a decimal comma for its numbers: the
 * expositions keep the formats' point, and Accept's q values are read
 * with one. */
START_TEST(numbers_keep_their_point_under_a_decimal_comma_locale)
{
    kt_decimal_comma();
    keel_metrics *m = registry();
    keel_gauge *g;
    ck_assert_int_eq(keel_metrics_gauge(m, "g", "", NULL, 0, &g), 0);
    keel_gauge_set(keel_gauge_with(g), 0.25);
    keel_histogram *h;
    ck_assert_int_eq(keel_metrics_histogram(m, "h", "", NULL, 0, (const double[]){0.5}, 1, &h), 0);
    keel_histogram_observe(keel_histogram_with(h), 0.375);
    for (int f = 0; f < 2; f++) {
        char *text = render(m, f ? KEEL_METRICS_OPENMETRICS : KEEL_METRICS_PROMETHEUS);
        ck_assert_msg(strstr(text, "g 0.25\n") && strstr(text, "h_bucket{le=\"0.5\"} 1\n") &&
                          strstr(text, "h_sum 0.375\n") && !strstr(text, "0,"),
                      "%s", text);
        keel_free(text);
    }
    ck_assert_int_eq(keel_metrics_negotiate("application/openmetrics-text;q=0.5"), KEEL_METRICS_OPENMETRICS);
    keel_metrics_destroy(m);
    setlocale(LC_NUMERIC, "C");
}
END_TEST

/* OpenMetrics: a histogram with a negative bound has no _sum (it would
 * not be a counter), and so no _count either: OpenMetrics has _count "if
 * and only if" _sum (its +Inf bucket still holds the count). The
 * Prometheus format keeps both. */
START_TEST(openmetrics_leaves_out_sum_and_count_under_a_negative_bound)
{
    keel_metrics *m = registry();
    keel_histogram *neg, *pos;
    ck_assert_int_eq(keel_metrics_histogram(m, "neg", "", NULL, 0, (const double[]){-1, 0, 1}, 3, &neg), 0);
    ck_assert_int_eq(keel_metrics_histogram(m, "pos", "", NULL, 0, (const double[]){0, 1}, 2, &pos), 0);
    keel_histogram_observe(keel_histogram_with(neg), -0.5);
    keel_histogram_observe(keel_histogram_with(pos), 0.5);
    char *text = render(m, KEEL_METRICS_OPENMETRICS);
    ck_assert_msg(!strstr(text, "neg_sum") && !strstr(text, "neg_count") &&
                      strstr(text, "neg_bucket{le=\"+Inf\"} 1\n") && strstr(text, "pos_count 1\n") &&
                      strstr(text, "pos_sum 0.5\n"),
                  "%s", text);
    keel_free(text);
    text = render(m, KEEL_METRICS_PROMETHEUS);
    ck_assert_msg(strstr(text, "neg_count 1\n") && strstr(text, "neg_sum -0.5\n") && strstr(text, "pos_sum 0.5\n"),
                  "%s", text);
    keel_free(text);
    keel_metrics_destroy(m);
}
END_TEST

/* The same for a child that observed a negative value under bounds that
 * are not: its sum went down, and an OpenMetrics _sum is a counter, so
 * that child shows neither _sum nor _count from then on, even once its
 * sum is back above zero ("back"), as for a negative bound. */
START_TEST(openmetrics_leaves_out_a_sum_made_negative_or_nan)
{
    keel_metrics *m = registry();
    keel_histogram *h;
    const char *labels[1] = {"k"};
    ck_assert_int_eq(keel_metrics_histogram(m, "h", "", labels, 1, (const double[]){0, 1}, 2, &h), 0);
    keel_histogram_observe(keel_histogram_with(h, "neg"), -2);
    keel_histogram_observe(keel_histogram_with(h, "nan"), INFINITY);
    keel_histogram_observe(keel_histogram_with(h, "nan"), -INFINITY);
    keel_histogram_observe(keel_histogram_with(h, "inf"), INFINITY);
    keel_histogram_observe(keel_histogram_with(h, "ok"), 0.5);
    keel_histogram_observe(keel_histogram_with(h, "back"), 3);
    keel_histogram_observe(keel_histogram_with(h, "back"), -1);
    keel_histogram_observe(keel_histogram_with(h, "back"), 5);
    char *text = render(m, KEEL_METRICS_OPENMETRICS);
    ck_assert_msg(!strstr(text, "h_sum{k=\"back\"}") && !strstr(text, "h_count{k=\"back\"}") &&
                      strstr(text, "h_bucket{k=\"back\",le=\"+Inf\"} 3\n"),
                  "%s", text);
    ck_assert_msg(!strstr(text, "h_sum{k=\"neg\"}") && !strstr(text, "h_count{k=\"neg\"}") &&
                      !strstr(text, "h_sum{k=\"nan\"}") && !strstr(text, "h_count{k=\"nan\"}") &&
                      strstr(text, "h_sum{k=\"inf\"} +Inf\n") && strstr(text, "h_sum{k=\"ok\"} 0.5\n") &&
                      strstr(text, "h_count{k=\"ok\"} 1\n") && strstr(text, "h_bucket{k=\"neg\",le=\"+Inf\"} 1\n"),
                  "%s", text);
    keel_free(text);
    text = render(m, KEEL_METRICS_PROMETHEUS);
    ck_assert_msg(strstr(text, "h_sum{k=\"neg\"} -2\n") && strstr(text, "h_sum{k=\"nan\"} NaN\n") &&
                      strstr(text, "h_sum{k=\"back\"} 7\n"),
                  "%s", text);
    keel_free(text);
    keel_metrics_destroy(m);
}
END_TEST

START_TEST(a_failing_writer_stops_the_rendering)
{
    keel_metrics *m = registry();
    keel_gauge *g;
    keel_metrics_gauge(m, "g", "", (const char *[]){"k"}, 1, &g);
    char key[16];
    for (int i = 0; i < 2000; i++) { /* more than one buffer's worth */
        snprintf(key, sizeof key, "%d", i);
        keel_gauge_set(keel_gauge_with(g, key), i);
    }
    writes = 0;
    ck_assert_int_eq(keel_metrics_render(m, KEEL_METRICS_PROMETHEUS, stop_after_one, NULL), 42);
    ck_assert_int_eq(writes, 2);
    ck_assert_int_eq(keel_metrics_render(m, (keel_metrics_format)5, stop_after_one, NULL), KEEL_EINVAL);
    keel_metrics_destroy(m);
}
END_TEST

/* The writer runs after the registry's lock is released: it may take as
 * long as its client, and call into the registry (once it deadlocked). */
static int count_scrapes(const char *buf, size_t len, void *ud)
{
    (void)buf, (void)len;
    keel_counter_inc(keel_counter_with(ud, "bytes"));
    return 0;
}

START_TEST(the_writer_may_call_into_the_registry)
{
    keel_metrics *m = registry();
    keel_counter *c;
    ck_assert_int_eq(keel_metrics_counter(m, "scrape_writes_total", "", (const char *[]){"what"}, 1, &c), 0);
    ck_assert_int_eq(keel_metrics_render(m, KEEL_METRICS_PROMETHEUS, count_scrapes, c), 0);
    char *text = render(m, KEEL_METRICS_PROMETHEUS);
    ck_assert_msg(strstr(text, "scrape_writes_total{what=\"bytes\"} 1\n"), "%s", text);
    keel_free(text);
    keel_metrics_destroy(m);
}
END_TEST

static double forty_two(void *ud)
{
    (void)ud;
    return 42;
}

typedef struct visit {
    int series;
    double hist_sum;
    uint64_t hist_count, inf;
} visit;

static void on_sample(const keel_metrics_sample *s, void *ud)
{
    visit *v = ud;
    v->series++;
    if (s->type == KEEL_METRIC_HISTOGRAM) {
        v->hist_sum = s->value;
        v->hist_count = s->count;
        v->inf = s->cumulative[s->nbuckets - 1];
    }
}

START_TEST(computed_series_and_the_visitor)
{
    keel_metrics *m = golden_registry();
    int token;
    ck_assert_int_eq(keel_metrics_func(m, KEEL_METRIC_GAUGE, "answer", "The answer.",
                                       (const char *[]){"k"}, (const char *[]){"v"}, 1, forty_two,
                                       &token), 0);
    ck_assert_int_eq(keel_metrics_func(m, KEEL_METRIC_GAUGE, "answer", NULL, (const char *[]){"k"},
                                       (const char *[]){"v"}, 1, forty_two, &token), KEEL_EEXIST);
    ck_assert_int_eq(keel_metrics_func(m, KEEL_METRIC_COUNTER, "answer", NULL, (const char *[]){"k"},
                                       (const char *[]){"w"}, 1, forty_two, &token), KEEL_EEXIST);
    ck_assert_int_eq(keel_metrics_func(m, KEEL_METRIC_GAUGE, "answer", NULL, (const char *[]){"k"}, NULL, 1,
                                       forty_two, &token), KEEL_EINVAL); /* once crashed */
    ck_assert_int_eq(keel_metrics_func(m, KEEL_METRIC_GAUGE, "answer", NULL, (const char *[]){"k"},
                                       (const char *[]){NULL}, 1, forty_two, &token), KEEL_EINVAL);
    ck_assert_double_eq(sample_value(m, "answer{k=\"v\"} "), 42);
    visit v = {0};
    ck_assert_int_eq(keel_metrics_visit(m, on_sample, &v), 0);
    ck_assert_int_eq(v.series, 3 + 1 + 2 + 1); /* counters, gauge, histograms, answer */
    keel_metrics_func_remove(m, &token);
    char *text = render(m, KEEL_METRICS_PROMETHEUS);
    ck_assert_ptr_null(strstr(text, "answer{"));
    keel_free(text);
    keel_metrics_destroy(m);
}
END_TEST

/* Series computed by forty_two(), registered by two threads at once (each
 * name by both: one must win) while a third visits the registry. */
typedef struct regjob {
    keel_metrics *m;
    int made;
    atomic_int *done, *calls;
} regjob;

static void *register_series(void *arg)
{
    regjob *j = arg;
    for (int i = 0; i < 3000; i++) {
        char n[16];
        snprintf(n, sizeof n, "%d", i);
        int rc = keel_metrics_func(j->m, KEEL_METRIC_COUNTER, "answers_total", NULL, (const char *[]){"n"},
                                   (const char *[]){n}, 1, forty_two, j);
        ck_assert(rc == 0 || rc == KEEL_EEXIST);
        j->made += rc == 0;
        atomic_fetch_add(j->calls, 1);
    }
    atomic_fetch_add(j->done, 1);
    return NULL;
}

typedef struct census {
    size_t seen, wrong;
} census;

static void on_answer(const keel_metrics_sample *s, void *ud)
{
    census *c = ud;
    if (strcmp(s->name, "answers_total") == 0) {
        c->seen++;
        c->wrong += s->value != 42;
    }
}

START_TEST(computed_series_are_whole_from_the_moment_they_show)
{
    keel_metrics *m;
    ck_assert_int_eq(keel_metrics_create(&m, NULL), 0);
    census empty = {0};
    ck_assert_int_eq(keel_metrics_visit(m, on_answer, &empty), 0); /* no family yet: UBSan once objected */
    ck_assert_uint_eq(empty.seen, 0);
    atomic_int done = 0, calls = 0;
    regjob j[2] = {{m, 0, &done, &calls}, {m, 0, &done, &calls}};
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&t[i], NULL, register_series, &j[i]);
    census c = {0};
    /* A visit every ten registrations: visits back to back would hold the
     * registry's lock so much of the time that registrations starve. */
    for (int last = 0; atomic_load(&done) < 2;) {
        int now = atomic_load(&calls);
        if (now - last < 10) {
            sched_yield();
            continue;
        }
        ck_assert_int_eq(keel_metrics_visit(m, on_answer, &c), 0);
        last = now;
    }
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
    ck_assert_uint_eq(c.wrong, 0); /* a series never shows before its function */
    ck_assert_int_eq(j[0].made + j[1].made, 3000);
    census last = {0};
    ck_assert_int_eq(keel_metrics_visit(m, on_answer, &last), 0);
    ck_assert_uint_eq(last.seen, 3000);
    ck_assert_uint_eq(last.wrong, 0);
    keel_metrics_destroy(m);
}
END_TEST

/* ---- every module's metrics through promtool ---- */

/* A keel_redis over every node of the harness, reporting to m. */
static keel_redis *redis_reporting(keel_metrics *m)
{
    int n = kt_redis_nodes();
    keel_redis *r;
    keel_redis_opts o = {.nodes = kt_redis_urls(n), .nnodes = (size_t)n, .connect_timeout_ns = 1 * KT_S,
                         .command_timeout_ns = 2 * KT_S, .metrics = m, .metrics_name = "sessions"};
    ck_assert_int_eq(keel_redis_create(&r, &o), 0);
    redisReply *rep;
    ck_assert_int_eq(keel_redis_command(r, NULL, 0, 1, (const char *[]){"PING"}, (const size_t[]){4}, &rep), 0);
    freeReplyObject(rep);
    return r;
}

/* A keel_pg over the harness's primary and replica, reporting to m. */
static keel_pg *pg_reporting(keel_metrics *m)
{
    keel_pg *pg;
    const char *replicas[1] = {kt_env("KEEL_TEST_PG_REPLICA")};
    keel_pg_opts o = {.primary = kt_env("KEEL_TEST_PG"), .replicas = replicas, .nreplicas = 1,
                      .connect_timeout_ns = 2 * KT_S, .acquire_timeout_ns = 2 * KT_S,
                      .query_timeout_ns = 10 * KT_S, .manual_health = 1, .metrics = m,
                      .metrics_name = "orders"};
    ck_assert_int_eq(keel_pg_create(&pg, &o), 0);
    ck_assert_int_eq(keel_pg_check(pg), 0);
    PGresult *res;
    ck_assert_int_eq(keel_pg_exec(pg, KEEL_PG_WRITE, "SELECT 1", NULL, &res), 0);
    PQclear(res);
    return pg;
}

static int handle_all(void *const *items, size_t n, keel_batch_ctx *ctx, void *ud)
{
    (void)items, (void)n, (void)ctx, (void)ud;
    return 0;
}

static int on_event(const keel_bus_msg *msg, void *ud)
{
    (void)msg, (void)ud;
    return 0;
}

/* Runs promtool check metrics over text; returns its exit status, and its
 * output in msg. */
static int promtool(const char *text, char *msg, size_t len)
{
    char path[] = "/tmp/keel-metrics-XXXXXX";
    int fd = mkstemp(path);
    ck_assert(fd >= 0);
    ck_assert(write(fd, text, strlen(text)) == (ssize_t)strlen(text));
    close(fd);
    char cmd[256];
    snprintf(cmd, sizeof cmd, "promtool check metrics < %s 2>&1", path);
    FILE *pr = popen(cmd, "r");
    ck_assert_ptr_nonnull(pr);
    size_t got = fread(msg, 1, len - 1, pr);
    msg[got] = '\0';
    int st = pclose(pr);
    unlink(path);
    ck_assert_msg(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) != 127,
                  "promtool not found: install Debian's prometheus package");
    return WEXITSTATUS(st);
}

START_TEST(promtool_reads_only_the_prometheus_format)
{
    /* the smallest valid OpenMetrics text */
    char msg[4096];
    ck_assert_msg(promtool("# TYPE a counter\na_total 1\n# EOF\n", msg, sizeof msg) != 0,
                  "promtool now reads OpenMetrics: give it the OpenMetrics rendering too in "
                  "module_metrics_pass_promtool");
    ck_assert_int_eq(promtool("# HELP a_total A.\n# TYPE a_total counter\na_total 1\n", msg, sizeof msg), 0);
}
END_TEST

START_TEST(module_metrics_pass_promtool)
{
    keel_metrics *m = golden_registry();
    keel_pool *pool;
    keel_pool_opts po = {.obj_size = 64, .metrics = m, .metrics_name = "buffers"};
    ck_assert_int_eq(keel_pool_create(&pool, &po), 0);
    keel_pool_release(pool, keel_pool_acquire(pool));
    keel_pool *dup;
    ck_assert_int_eq(keel_pool_create(&dup, &po), KEEL_EEXIST); /* same name twice */
    keel_ring *ring;
    keel_ring_opts ro = {.metrics = m, .metrics_name = "cache"};
    ck_assert_int_eq(keel_ring_create(&ring, &ro), 0);
    keel_ring_add(ring, "a", 1, 1, NULL);
    keel_breaker *br;
    keel_breaker_opts bo = {.metrics = m, .metrics_name = "db"};
    ck_assert_int_eq(keel_breaker_create(&br, &bo), 0);
    keel_lb *lb;
    keel_lb_opts lo = {.metrics = m, .metrics_name = "api"};
    ck_assert_int_eq(keel_lb_create(&lb, &lo), 0);
    keel_lb_peer *p1;
    ck_assert_int_eq(keel_lb_add(lb, &(keel_lb_peer_opts){.name = "10.0.0.1:80"}, &p1), 0);
    ck_assert_int_eq(keel_lb_add(lb, &(keel_lb_peer_opts){0}, NULL), 0);
    keel_retry_budget *rb;
    keel_retry_budget_opts bu = {.metrics = m};
    ck_assert_int_eq(keel_retry_budget_create(&rb, &bu), 0);
    keel_cache *cache;
    keel_cache_opts co = {.metrics = m, .metrics_name = "sessions"};
    ck_assert_int_eq(keel_cache_create(&cache, &co), 0);
    char v[8];
    size_t vl;
    ck_assert_int_eq(keel_cache_set(cache, "k", 1, "v", 1, 0, NULL, 0), 0);
    ck_assert_int_eq(keel_cache_get(cache, "k", 1, v, sizeof v, &vl), 0);
    keel_limiter *lim;
    keel_limiter_opts lmo = {.algo = KEEL_LIMIT_GCRA, .limit = 10, .window_ns = 1000000000u, .metrics = m,
                             .metrics_name = "api"};
    ck_assert_int_eq(keel_limiter_create(&lim, &lmo), 0);
    keel_limit_result lr;
    ck_assert_int_eq(keel_limiter_take(lim, "client", 6, 1, &lr), 0);
    keel_cqrs *cq;
    keel_cqrs_opts cqo = {.metrics = m, .metrics_name = "orders"};
    ck_assert_int_eq(keel_cqrs_create(&cq, &cqo), 0);
    keel_redis *redis = redis_reporting(m);
    keel_pg *pg = pg_reporting(m);
    keel_batch *batch;
    keel_batch_opts bao = {.handler = handle_all, .metrics = m, .metrics_name = "writes"};
    ck_assert_int_eq(keel_batch_create(&batch, &bao), 0);
    int item;
    ck_assert_int_eq(keel_batch_add(batch, &item, sizeof item), 0);
    ck_assert_int_eq(keel_batch_flush(batch), 0);
    keel_bus *bus;
    keel_bus_opts buo = {.metrics = m, .metrics_name = "events"};
    ck_assert_int_eq(keel_bus_create(&bus, &buo), 0);
    keel_bus_sub *sub;
    keel_bus_sub_opts so = {.pattern = "orders.>", .handler = on_event};
    ck_assert_int_eq(keel_bus_subscribe(bus, &so, &sub), 0);
    ck_assert_int_eq(keel_bus_publish(bus, "orders.created", "x", 1, NULL, 0, NULL), 0);
    kt_clock clk = {0};
    keel_alerts *alerts;
    keel_alerts_opts ao = {.metrics = m, .clock = kt_clock_now, .wall_clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_alerts_create(&alerts, &ao), 0);
    ck_assert_int_eq(keel_alerts_add(alerts, "Freezing", "last(room_temperature_celsius[1m]) < 0", NULL, 0,
                                     NULL, 0, NULL), 0);
    ck_assert_int_eq(keel_alerts_add(alerts, "Cold", "last(room_temperature_celsius[1m]) < 0 for 5m", NULL, 0,
                                     NULL, 0, NULL), 0);
    ck_assert_int_eq(keel_alerts_tick(alerts), 1); /* Freezing fires at once, Cold is pending */

    char *text = render(m, KEEL_METRICS_PROMETHEUS);
    ck_assert_ptr_nonnull(strstr(text, "keel_pool_objects{pool=\"buffers\",state=\"idle_cached\"} 1\n"));
    ck_assert_ptr_nonnull(strstr(text, "keel_ring_nodes{ring=\"cache\"} 1\n"));
    ck_assert_ptr_nonnull(strstr(text, "keel_breaker_state{breaker=\"db\",state=\"closed\"} 1\n"));
    ck_assert_ptr_nonnull(strstr(text, "keel_lb_peer_in_flight{lb=\"api\",peer=\"10.0.0.1:80\"} 0\n"));
    ck_assert_ptr_nonnull(strstr(text, "keel_retry_budget_tokens{budget=\"default\"} 10\n"));
    ck_assert_ptr_nonnull(strstr(text, "keel_cache_hits_total{cache=\"sessions\",tier=\"l1\"} 1\n"));
    ck_assert_ptr_nonnull(strstr(text, "keel_cache_items{cache=\"sessions\"} 1\n"));
    ck_assert_ptr_nonnull(strstr(text, "keel_cache_flushes_total{cache=\"sessions\"} 0\n"));
    ck_assert_ptr_nonnull(strstr(text, "keel_limiter_allowed_total{limiter=\"api\"} 1\n"));
    ck_assert_ptr_nonnull(strstr(text, "keel_limiter_bytes{limiter=\"api\"} "));
    ck_assert_ptr_nonnull(strstr(text, "keel_cqrs_retries_total{cqrs=\"orders\"} 0\n"));
    ck_assert_ptr_nonnull(strstr(text, "keel_cqrs_published_total{cqrs=\"orders\"} 0\n"));
    ck_assert_ptr_nonnull(strstr(text, "keel_redis_commands_total{redis=\"sessions\",node=\""));
    ck_assert_ptr_nonnull(strstr(text, "keel_redis_node_skipped{redis=\"sessions\",node=\""));
    ck_assert_ptr_nonnull(strstr(text, "keel_pg_host_primary{pg=\"orders\",host=\""));
    ck_assert_ptr_nonnull(strstr(text, "keel_pg_replica_lag_seconds{pg=\"orders\",host=\""));
    ck_assert_ptr_nonnull(strstr(text, "keel_batch_handled_total{batch=\"writes\"} 1\n"));
    ck_assert_ptr_nonnull(strstr(text, "keel_batch_queued{batch=\"writes\"} 0\n"));
    ck_assert_ptr_nonnull(strstr(text, "keel_bus_delivered_total{bus=\"events\"} 1\n"));
    ck_assert_ptr_nonnull(strstr(text, "keel_bus_subscriptions{bus=\"events\"} 1\n"));
    ck_assert_ptr_nonnull(strstr(text, "keel_alerts{alertname=\"Freezing\",alertstate=\"firing\"} 1\n"));
    ck_assert_ptr_nonnull(strstr(text, "keel_alerts{alertname=\"Cold\",alertstate=\"pending\"} 1\n"));
    keel_free(text);
    for (int om = 0; om < 2; om++) {
        char *t = render(m, om ? KEEL_METRICS_OPENMETRICS : KEEL_METRICS_PROMETHEUS);
        check_exposition(t, om);
        if (om) { /* promtool cannot read it: see check_openmetrics() */
            check_openmetrics(t);
        } else {
            char msg[4096];
            ck_assert_msg(promtool(t, msg, sizeof msg) == 0, "promtool check metrics failed:\n%s", msg);
        }
        keel_free(t);
    }

    /* Destroying a module takes its series away. */
    keel_lb_remove(lb, p1);
    keel_pool_destroy(pool);
    keel_ring_destroy(ring);
    keel_breaker_destroy(br);
    keel_lb_destroy(lb);
    keel_retry_budget_destroy(rb);
    keel_cache_destroy(cache);
    keel_limiter_destroy(lim);
    keel_cqrs_destroy(cq);
    keel_redis_destroy(redis);
    keel_pg_destroy(pg);
    keel_batch_destroy(batch);
    keel_bus_destroy(bus);
    keel_alerts_destroy(alerts);
    text = render(m, KEEL_METRICS_PROMETHEUS);
    const char *gone[] = {"keel_pool_objects{", "keel_lb_peer_in_flight{", "keel_cache_hits_total{",
                          "keel_redis_commands_total{", "keel_pg_queries_total{", "keel_batch_handled_total{",
                          "keel_bus_delivered_total{", "keel_alerts{"};
    for (size_t i = 0; i < sizeof gone / sizeof gone[0]; i++)
        ck_assert_msg(strstr(text, gone[i]) == NULL, "%s still rendered", gone[i]);
    keel_free(text);
    keel_metrics_destroy(m);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("metrics");
    TCase *tc = tcase_create("exposition");
    tcase_add_test(tc, prometheus_text_matches_the_golden_file);
    tcase_add_test(tc, openmetrics_matches_the_golden_file);
    tcase_add_test(tc, expositions_keep_families_whole_and_histograms_consistent);
    tcase_add_test(tc, values_round_trip_and_le_is_canonical);
    tcase_add_test(tc, accept_headers_choose_the_format);
    tcase_add_test(tc, numbers_keep_their_point_under_a_decimal_comma_locale);
    tcase_add_test(tc, openmetrics_leaves_out_sum_and_count_under_a_negative_bound);
    tcase_add_test(tc, openmetrics_leaves_out_a_sum_made_negative_or_nan);
    tcase_add_test(tc, a_failing_writer_stops_the_rendering);
    tcase_add_test(tc, the_writer_may_call_into_the_registry);
    tcase_add_test(tc, computed_series_and_the_visitor);
    tcase_add_test(tc, computed_series_are_whole_from_the_moment_they_show);
    tcase_add_test(tc, names_and_labels_are_validated);
    tcase_add_test(tc, label_values_and_help_must_be_utf8);
    tcase_add_test(tc, children_are_bound_once_capped_and_removable);
    tcase_add_test(tc, a_child_on_reused_slots_starts_at_zero_whatever_threads_exit);
    tcase_set_timeout(tc, 20);
    tcase_add_test(tc, promtool_reads_only_the_prometheus_format);
    tcase_add_test(tc, module_metrics_pass_promtool);
    suite_add_tcase(s, tc);
    tc = tcase_create("threads");
    tcase_set_tags(tc, "stress");
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, two_threads_count_exactly);
    tcase_add_test(tc, counts_of_exited_threads_are_kept_once);
    tcase_add_test(tc, a_thread_outliving_its_registry_counts_from_zero_in_the_next);
    suite_add_tcase(s, tc);
    return kt_run(s);
}
