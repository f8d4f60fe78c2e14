/* tests/fuzz/fuzz_metrics.c — family and child creation with any names,
 * help texts, label names and values and histogram bounds, and the
 * exposition in both formats.
 *
 * Input: five bytes [type][nlabels][nchildren][nbounds][flags], then
 * nbounds (byte % 9) native doubles, then NUL-separated strings taken in
 * turn (from the first again when they run out): the Accept header, the
 * family name, its help, nlabels (% 18) label names, then nlabels label
 * values for each of nchildren (% 5) children. type % 3 is counter, gauge
 * or histogram; flags: 1 = default histogram bounds, 2 = remove a child
 * again, 4 = a writer that stops the rendering at its first call.
 *
 * The registry (at most 3 children a family) also holds a gauge "up" with
 * a label value that needs escaping. Checks: negotiation answers one of
 * the two formats; a stopped rendering returns the writer's value; a full
 * rendering through the callback equals keel_metrics_render_buf() byte for
 * byte, OpenMetrics ends in "# EOF", and every # HELP, # TYPE and # UNIT
 * line names its family (a counter named "_total" once had an empty
 * OpenMetrics name: seeds/metrics/counter-named-only-total). */
#include <keel/metrics.h>

#include "fuzz.h"

#define MAX_STRINGS 64
#define STOPPED 7 /* what the stopping writer returns */

typedef struct input {
    int type, flags;
    size_t nlabels, nchildren, nbounds;
    double bounds[8];
    char *buf;
    const char *str[MAX_STRINGS];
    size_t nstr, next;
} input;

/* Reads the header and bounds, and splits the rest; false when short. */
static bool input_read(input *in, const uint8_t *data, size_t size)
{
    if (size < 5)
        return false;
    in->type = data[0] % 3;
    in->nlabels = data[1] % 18u;
    in->nchildren = data[2] % 5u;
    in->nbounds = data[3] % 9u;
    in->flags = data[4];
    data += 5;
    size -= 5;
    if (size < in->nbounds * sizeof(double))
        return false;
    memcpy(in->bounds, data, in->nbounds * sizeof(double));
    data += in->nbounds * sizeof(double);
    size -= in->nbounds * sizeof(double);
    in->buf = kf_cstr(data, size);
    for (size_t i = 0; in->nstr < MAX_STRINGS;) {
        in->str[in->nstr++] = in->buf + i;
        size_t len = strlen(in->buf + i);
        if (i + len >= size)
            break;
        i += len + 1;
    }
    return true;
}

static const char *input_next(input *in)
{
    return in->str[in->next++ % in->nstr];
}

typedef struct family {
    int type;
    keel_counter *counter;
    keel_gauge *gauge;
    keel_histogram *histogram;
} family;

static int family_add(keel_metrics *m, family *f, input *in, const char **labels)
{
    const char *name = input_next(in);
    const char *help = input_next(in);
    for (size_t i = 0; i < in->nlabels; i++)
        labels[i] = input_next(in);
    f->type = in->type;
    if (f->type == 0)
        return keel_metrics_counter(m, name, help, labels, in->nlabels, &f->counter);
    if (f->type == 1)
        return keel_metrics_gauge(m, name, help, labels, in->nlabels, &f->gauge);
    bool defaults = in->flags & 1; /* NULL bounds go with a count of 0 */
    return keel_metrics_histogram(m, name, help, labels, in->nlabels, defaults ? NULL : in->bounds,
                                  defaults ? 0 : in->nbounds, &f->histogram);
}

static void child_feed(family *f, const char *const *values, size_t n, size_t c, double v)
{
    if (f->type == 0) {
        keel_counter_child *ch = NULL;
        if (keel_counter_get(f->counter, values, n, &ch) == 0) {
            keel_counter_add(ch, c);
            keel_counter_add_f(ch, v);
        }
    } else if (f->type == 1) {
        keel_gauge_child *ch = NULL;
        if (keel_gauge_get(f->gauge, values, n, &ch) == 0) {
            keel_gauge_set(ch, v);
            keel_gauge_inc(ch);
        }
    } else {
        keel_histogram_child *ch = NULL;
        if (keel_histogram_get(f->histogram, values, n, &ch) == 0) {
            keel_histogram_observe(ch, v);
            keel_histogram_observe(ch, (double)c);
        }
    }
}

static void child_remove(family *f, const char *const *values, size_t n)
{
    if (f->type == 0)
        keel_counter_remove(f->counter, values, n);
    else if (f->type == 1)
        keel_gauge_remove(f->gauge, values, n);
    else
        keel_histogram_remove(f->histogram, values, n);
}

typedef struct sink {
    char *text;
    size_t len;
    int calls, stop_at;
} sink;

static int sink_write(const char *buf, size_t len, void *ud)
{
    sink *s = ud;
    if (s->stop_at && ++s->calls >= s->stop_at)
        return STOPPED;
    s->text = kf_realloc(s->text, s->len + len + 1);
    memcpy(s->text + s->len, buf, len);
    s->len += len;
    s->text[s->len] = '\0';
    return 0;
}

/* Every "# HELP ", "# TYPE " and "# UNIT " line goes on with a name. */
static void check_comments(const char *text, size_t len)
{
    for (const char *line = text; line < text + len;) {
        const char *end = memchr(line, '\n', (size_t)(text + len - line));
        KF_CHECK(end != NULL, "a last line without a newline");
        bool meta = strncmp(line, "# HELP ", 7) == 0 || strncmp(line, "# TYPE ", 7) == 0 ||
                    strncmp(line, "# UNIT ", 7) == 0;
        KF_CHECK(!meta || (line + 7 < end && line[7] != ' '), "no family name: %.*s",
                 (int)(end - line), line);
        line = end + 1;
    }
}

static void check_render(keel_metrics *m, keel_metrics_format fmt, bool stop_early)
{
    sink s = {.stop_at = stop_early ? 1 : 0};
    int rc = keel_metrics_render(m, fmt, sink_write, &s);
    if (stop_early) {
        KF_CHECK(rc == STOPPED || rc == 0, "a stopped rendering returned %d", rc);
        free(s.text);
        return;
    }
    KF_CHECK(rc == 0, "render returned %d", rc);
    KF_CHECK(s.len > 0, "\"up\" is always there");
    char *buf = NULL;
    size_t len = 0;
    KF_CHECK(keel_metrics_render_buf(m, fmt, &buf, &len) == 0, "render_buf");
    /* _created comes from the fixed wall clock: both renderings are equal */
    KF_CHECK(len == s.len && memcmp(buf, s.text, len) == 0, "callback and buffer differ:\n%s\n--\n%s",
             s.text, buf);
    KF_CHECK(fmt != KEEL_METRICS_OPENMETRICS || (len >= 6 && memcmp(buf + len - 6, "# EOF\n", 6) == 0),
             "OpenMetrics without # EOF");
    check_comments(buf, len);
    keel_free(buf);
    free(s.text);
}

static uint64_t fixed_wall_clock(void *ud)
{
    (void)ud;
    return 1700000000123456789ull;
}

static keel_metrics *registry_with_up(void)
{
    static const char *const job[] = {"job"};
    keel_metrics_opts mo = {.max_children = 3, .wall_clock = fixed_wall_clock};
    keel_metrics *m = NULL;
    KF_CHECK(keel_metrics_create(&m, &mo) == 0, "metrics");
    keel_gauge *up = NULL;
    KF_CHECK(keel_metrics_gauge(m, "up", "Up.", job, 1, &up) == 0, "up");
    keel_gauge_child *child = keel_gauge_with(up, "j\"\\\n");
    KF_CHECK(child != NULL, "up{job}");
    keel_gauge_set(child, 1);
    return m;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    input in = {0};
    if (!input_read(&in, data, size))
        return 0;
    keel_metrics_format fmt = keel_metrics_negotiate(input_next(&in));
    KF_CHECK(fmt == KEEL_METRICS_PROMETHEUS || fmt == KEEL_METRICS_OPENMETRICS, "format %d", (int)fmt);
    KF_CHECK(keel_metrics_negotiate(NULL) == KEEL_METRICS_PROMETHEUS, "NULL Accept");

    keel_metrics *m = registry_with_up();
    const char *labels[17];
    family f = {0};
    if (family_add(m, &f, &in, labels) == 0) {
        for (size_t c = 0; c < in.nchildren; c++) {
            const char *values[17];
            for (size_t i = 0; i < in.nlabels; i++)
                values[i] = input_next(&in);
            child_feed(&f, values, in.nlabels, c, in.bounds[c % 8]);
        }
        if (in.flags & 2) {
            const char *values[17];
            for (size_t i = 0; i < in.nlabels; i++)
                values[i] = in.str[(i + 3) % in.nstr];
            child_remove(&f, values, in.nlabels);
        }
    }
    check_render(m, KEEL_METRICS_PROMETHEUS, in.flags & 4);
    check_render(m, KEEL_METRICS_OPENMETRICS, in.flags & 4);
    keel_metrics_destroy(m);
    free(in.buf);
    return 0;
}
