/* lib/alert.c — alert rules with Prometheus's state machine.
 *
 * Each evaluation reads the registry once (keel_metrics_visit), adds one
 * sample per selector to its history, evaluates every rule over those
 * histories, and moves each rule's alert through pending, firing and
 * resolved as Prometheus's rules/alerting.go does.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <keel/alert.h>
#include <keel/metrics.h>

#include "hash.h"
#include "internal.h"

#define MIN_NS 60000000000ull
#define MAX_MATCHERS 8

/* ---- selectors and their histories ---- */

/* A series a counting selector matched at its last evaluation, so that the
 * next one can tell its increase from its reset (see sum_increases). */
typedef struct series {
    char *key;          /* label name, value, name, value, ... each NUL-ended */
    size_t keylen;
    uint64_t hash;
    double created, created_now; /* a new child of the same labels is a reset */
    double *vals;       /* 2 width values: */
    double *prev, *now; /* last evaluation's and this one's, swapped each time */
    bool known;         /* prev holds a sample of an evaluation that completed */
    bool seen;          /* matched in this evaluation */
} series;

typedef struct selector {
    char *name;
    size_t nm;
    char *mk[MAX_MATCHERS], *mv[MAX_MATCHERS];
    uint64_t keep;  /* the longest window over it */
    size_t width;   /* values per sample: 1, or 1 + buckets for histograms */
    double *bounds; /* histograms: upper bounds, +Inf last */
    /* history: samples t[i] with values v[i * width ...] */
    uint64_t *t;
    double *v;
    size_t n, cap;
    /* the sample being gathered by the current evaluation */
    double *acc;
    size_t acc_width;
    bool matched;
    /* counters and histograms: the history holds a running total of the
     * increases of each series, not the plain sum (gauges) */
    bool counting;
    bool has_total;
    double *total;      /* acc_width values: the last sample pushed */
    series *ser;        /* the series matched at the last evaluation, then
                           the new ones of this one */
    size_t nser, ser_cap;
    uint32_t *slot;     /* open addressing over ser: index + 1, 0 empty */
    size_t nslot;       /* a power of two, 0 or more than 2 nser */
} selector;

/* ---- expressions ---- */

typedef enum { N_NUM, N_RATE, N_RATIO, N_QUANT, N_AVG, N_MIN, N_MAX, N_LAST } ntype;

typedef struct expr {
    ntype t;
    double num;             /* N_NUM; N_QUANT: q */
    struct expr *a, *b;     /* N_RATIO */
    size_t sel;             /* selector index */
    uint64_t win;           /* window */
} expr;

enum { OP_GT, OP_GE, OP_LT, OP_LE, OP_EQ, OP_NE };

typedef struct cond {
    expr *lhs;
    int op;
    double rhs;
} cond;

typedef struct rule {
    char *name;
    cond conds[8];
    size_t nconds;
    uint64_t for_ns, keep_firing_ns;
    char **labels, **annotations; /* pairs */
    size_t nlabels, nannotations;
    /* the alert */
    keel_alert_state state;
    double value;
    uint64_t active_mono, fired_mono, resolved_mono, keep_since_mono, last_sent_mono;
    bool sent; /* since it became this alert */
    uint64_t active_wall, fired_wall, resolved_wall, valid_until_wall;
} rule;

struct keel_alerts {
    pthread_mutex_t mu;
    keel_metrics *m;
    keel_gauge *gauge; /* keel_alerts{alertname, alertstate} */
    uint64_t interval, resend, keep_resolved;
    char *generator_url;
    keel_alert_change_fn on_change;
    void *ud;
    keel__clock clock, wall;
    bool evaluated;
    bool gather_failed; /* memory ran out in the current evaluation's gather */
    uint64_t last_eval, last_eval_wall;
    selector *sels;
    size_t nsels, sels_cap;
    rule *rules;
    size_t nrules, rules_cap;
};

/* ---- the parser ---- */

typedef struct parser {
    keel_alerts *a;
    const char *s, *p;
    bool bad;
    bool nomem; /* bad because memory ran out, not because of the text */
    uint64_t longest;
} parser;

/* Stops the parse for want of memory. */
static void out_of_memory(parser *ps)
{
    ps->bad = true;
    ps->nomem = true;
}

static void ws(parser *ps)
{
    while (isspace((unsigned char)*ps->p))
        ps->p++;
}

static bool lit(parser *ps, const char *w)
{
    if (ps->bad) /* stay where the error is */
        return false;
    ws(ps);
    size_t n = strlen(w);
    if (strncmp(ps->p, w, n) != 0)
        return false;
    /* a word must end: "for" is not "format" */
    if (isalpha((unsigned char)w[n - 1]) && (isalnum((unsigned char)ps->p[n]) || ps->p[n] == '_'))
        return false;
    ps->p += n;
    return true;
}

static bool need(parser *ps, const char *w)
{
    if (!lit(ps, w))
        ps->bad = true;
    return !ps->bad;
}

static double number(parser *ps)
{
    if (ps->bad)
        return 0;
    ws(ps);
    char *end;
    double v = keel__strtod(ps->p, &end);
    if (end == ps->p || !isfinite(v) || isalpha((unsigned char)*end) || *end == '.') {
        ps->bad = true;
        return 0;
    }
    ps->p = end;
    return v;
}

/* Whether c could go on a number or a word: "5mx" is no duration. */
static bool in_number(char c)
{
    return isalnum((unsigned char)c) || c == '_' || c == '.';
}

/* A duration as Prometheus writes one (model.ParseDuration): integers
 * with units, largest first and each once, as 1h30m; "0" alone too. It
 * must be positive, or 0 when zero_ok (a "for" of 0 fires at once, as in
 * Prometheus; a window of 0 holds nothing). */
static uint64_t duration(parser *ps, bool zero_ok)
{
    if (ps->bad)
        return 0;
    ws(ps);
    static const struct {
        const char *unit;
        uint64_t ms;
    } units[] = {{"y", 365 * 86400000ull}, {"w", 7 * 86400000ull}, {"d", 86400000}, {"h", 3600000},
                 {"ms", 1}, {"m", 60000}, {"s", 1000}}; /* "ms" before "m" to be seen */
    static const int rank[] = {0, 1, 2, 3, 6, 4, 5};    /* the order they must come in */
    const uint64_t max_ms = 1000000000000ull;           /* 1e18 ns: about 31 years */
    const char *start = ps->p;
    uint64_t ms = 0;
    int next = 0; /* the rank the next unit may have at least */
    bool zero_alone = ps->p[0] == '0' && !in_number(ps->p[1]);
    for (ps->p += zero_alone; !zero_alone && (ps->p == start || isdigit((unsigned char)*ps->p));) {
        uint64_t n = 0;
        const char *digits = ps->p;
        for (; isdigit((unsigned char)*ps->p); ps->p++)
            n = n > max_ms ? n : n * 10 + (uint64_t)(*ps->p - '0'); /* past the cap is refused */
        size_t u = sizeof units / sizeof units[0];
        if (ps->p > digits)
            for (u = 0; u < sizeof units / sizeof units[0]; u++)
                if (strncmp(ps->p, units[u].unit, strlen(units[u].unit)) == 0)
                    break;
        if (u == sizeof units / sizeof units[0] || rank[u] < next) {
            ps->bad = true;
            return 0;
        }
        ps->p += strlen(units[u].unit);
        next = rank[u] + 1;
        ms = n > max_ms / units[u].ms ? max_ms + 1 : ms + n * units[u].ms;
    }
    if (in_number(*ps->p)) { /* "5mx", "1.5m" */
        ps->bad = true;
        return 0;
    }
    if (ms > max_ms || (ms == 0 && !zero_ok)) {
        ps->p = start;
        ps->bad = true;
        return 0;
    }
    return ms * 1000000;
}

/* [a-zA-Z_:][a-zA-Z0-9_:]* into a new string */
static char *ident(parser *ps, bool metric)
{
    if (ps->bad)
        return NULL;
    ws(ps);
    const char *q = ps->p;
    while (isalpha((unsigned char)*q) || *q == '_' || (metric && *q == ':') ||
           (q > ps->p && isdigit((unsigned char)*q)))
        q++;
    if (q == ps->p) {
        ps->bad = true;
        return NULL;
    }
    char *id = keel__malloc((size_t)(q - ps->p) + 1);
    if (!id) {
        out_of_memory(ps);
        return NULL;
    }
    memcpy(id, ps->p, (size_t)(q - ps->p));
    id[q - ps->p] = '\0';
    ps->p = q;
    return id;
}

/* One escape at r (past its backslash) into v at *k, as Go's
 * strconv.Unquote has them in a "..." string, which PromQL's are: \a \b
 * \f \n \r \t \v \\ \", \xhh and \ooo (a byte), \uhhhh and \Uhhhhhhhh (a
 * code point, no surrogate, as UTF-8); none of them NUL, which no label
 * value holds. Returns past the escape, or NULL when it is none of them. No escape writes more bytes than it takes. */
static const char *unescape(const char *r, char *v, size_t *k)
{
    static const char simple[] = "a\ab\bf\fn\nr\rt\tv\v\\\\\"\"";
    for (const char *e = simple; *e; e += 2)
        if (*r == e[0]) {
            v[(*k)++] = e[1];
            return r + 1;
        }
    unsigned long cp = 0;
    int digits = *r == 'x' ? 2 : *r == 'u' ? 4 : *r == 'U' ? 8 : 0;
    if (digits) {
        for (int i = 1; i <= digits; i++) {
            int h = keel__hex_digit(r[i]);
            if (h < 0)
                return NULL;
            cp = cp << 4 | (unsigned long)h;
        }
        if (*r == 'x') {
            if (cp == 0) /* a C string ends there: it would match a prefix */
                return NULL;
            v[(*k)++] = (char)cp;
            return r + 3;
        }
    } else if (*r >= '0' && *r <= '7') {
        for (int i = 0; i < 3; i++) {
            if (r[i] < '0' || r[i] > '7')
                return NULL;
            cp = cp << 3 | (unsigned long)(r[i] - '0');
        }
        if (cp > 255 || cp == 0)
            return NULL;
        v[(*k)++] = (char)cp;
        return r + 3;
    } else {
        return NULL;
    }
    if (cp == 0 || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
        return NULL;
    unsigned char *o = (unsigned char *)v + *k;
    size_t n = cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
    static const unsigned char lead[] = {0, 0, 0xc0, 0xe0, 0xf0};
    for (size_t i = n - 1; i > 0; i--, cp >>= 6)
        o[i] = (unsigned char)(0x80 | (cp & 0x3f));
    o[0] = (unsigned char)(lead[n] | cp);
    *k += n;
    return r + 1 + digits;
}

static char *quoted(parser *ps)
{
    if (ps->bad)
        return NULL;
    ws(ps);
    if (*ps->p != '"') {
        ps->bad = true;
        return NULL;
    }
    const char *q = ++ps->p;
    for (; *q && *q != '"'; q++)
        if (*q == '\\' && q[1])
            q++;
    if (*q != '"') {
        ps->bad = true;
        return NULL;
    }
    char *v = keel__malloc((size_t)(q - ps->p) + 1);
    if (!v) {
        out_of_memory(ps);
        return NULL;
    }
    size_t k = 0;
    for (const char *r = ps->p; r < q;) {
        if (*r != '\\') {
            v[k++] = *r++;
            continue;
        }
        const char *past = unescape(r + 1, v, &k);
        if (!past || past > q) { /* no escape; or its digits ran into the quote */
            keel__free(v);
            ps->p = r;
            ps->bad = true;
            return NULL;
        }
        r = past;
    }
    v[k] = '\0';
    ps->p = q + 1;
    return v;
}

static void series_free(series *se)
{
    keel__free(se->key);
    keel__free(se->vals);
}

static void series_clear(selector *s)
{
    for (size_t i = 0; i < s->nser; i++)
        series_free(&s->ser[i]);
    s->nser = 0;
    if (s->slot)
        memset(s->slot, 0, s->nslot * sizeof *s->slot);
}

static void sel_free(selector *s)
{
    series_clear(s);
    keel__free(s->ser);
    keel__free(s->slot);
    keel__free(s->total);
    keel__free(s->name);
    for (size_t i = 0; i < s->nm; i++) {
        keel__free(s->mk[i]);
        keel__free(s->mv[i]);
    }
    keel__free(s->bounds);
    keel__free(s->t);
    keel__free(s->v);
    keel__free(s->acc);
}

/* sel "[" dur "]": the index of an equal selector, or a new one. */
static size_t selector_window(parser *ps, uint64_t *win)
{
    selector s = {0};
    s.name = ident(ps, true);
    if (lit(ps, "{")) {
        do {
            if (s.nm == MAX_MATCHERS) {
                ps->bad = true;
                break;
            }
            s.mk[s.nm] = ident(ps, false); /* counted at once: freed if bad */
            s.mv[s.nm] = need(ps, "=") ? quoted(ps) : NULL;
            s.nm++;
        } while (!ps->bad && lit(ps, ","));
        need(ps, "}");
    }
    need(ps, "[");
    *win = duration(ps, false);
    need(ps, "]");
    keel_alerts *a = ps->a;
    if (ps->bad) {
        sel_free(&s);
        return 0;
    }
    for (size_t i = 0; i < a->nsels; i++) { /* the same selector: share history */
        selector *o = &a->sels[i];
        bool same = strcmp(o->name, s.name) == 0 && o->nm == s.nm;
        for (size_t k = 0; same && k < s.nm; k++)
            same = strcmp(o->mk[k], s.mk[k]) == 0 && strcmp(o->mv[k], s.mv[k]) == 0;
        if (same) { /* its keep grows only with the rule taken (keeps_raise) */
            sel_free(&s);
            return i;
        }
    }
    if (a->nsels == a->sels_cap) {
        size_t cap = a->sels_cap ? 2 * a->sels_cap : 8;
        selector *n = keel__realloc(a->sels, cap * sizeof *n);
        if (!n) {
            sel_free(&s);
            out_of_memory(ps);
            return 0;
        }
        a->sels = n;
        a->sels_cap = cap;
    }
    s.keep = *win;
    a->sels[a->nsels] = s;
    return a->nsels++;
}

static void expr_free(expr *e)
{
    if (e) {
        expr_free(e->a);
        expr_free(e->b);
        keel__free(e);
    }
}

static expr *parse_expr(parser *ps, int depth)
{
    expr *e = keel__calloc(1, sizeof *e);
    if (!e || depth > 16) {
        keel__free(e);
        if (e)
            ps->bad = true;
        else
            out_of_memory(ps);
        return NULL;
    }
    static const struct {
        const char *word;
        ntype t;
    } fns[] = {{"rate", N_RATE}, {"avg", N_AVG}, {"min", N_MIN}, {"max", N_MAX}, {"last", N_LAST}};
    if (lit(ps, "ratio")) {
        e->t = N_RATIO;
        need(ps, "(");
        e->a = ps->bad ? NULL : parse_expr(ps, depth + 1);
        need(ps, ",");
        e->b = ps->bad ? NULL : parse_expr(ps, depth + 1);
        need(ps, ")");
    } else if (lit(ps, "quantile")) {
        e->t = N_QUANT;
        need(ps, "(");
        e->num = number(ps);
        need(ps, ",");
        if (!ps->bad)
            e->sel = selector_window(ps, &e->win);
        need(ps, ")");
    } else {
        size_t i;
        for (i = 0; i < sizeof fns / sizeof fns[0]; i++)
            if (lit(ps, fns[i].word))
                break;
        if (i < sizeof fns / sizeof fns[0]) {
            e->t = fns[i].t;
            need(ps, "(");
            ws(ps);
            const char *at = ps->p;
            if (!ps->bad)
                e->sel = selector_window(ps, &e->win);
            /* over a counter or histogram the history is a running total
             * of increases, not the value (gauge_over): refused when the
             * family is known to be one now, NaN when it becomes one */
            int type = e->t == N_RATE || ps->bad ? -1
                                                  : keel__metrics_type(ps->a->m, ps->a->sels[e->sel].name);
            if (type == KEEL_METRIC_COUNTER || type == KEEL_METRIC_HISTOGRAM) {
                ps->p = at;
                ps->bad = true;
            }
            need(ps, ")");
        } else {
            e->t = N_NUM;
            e->num = number(ps);
        }
    }
    if (e->t != N_NUM && e->t != N_RATIO && e->win > ps->longest)
        ps->longest = e->win;
    return e;
}

/* Makes the selectors of a rule just taken keep history as long as its
 * windows over them reach. Not while parsing: a rule refused after it
 * named a selector another rule has would leave that one keeping, say, a
 * year of samples for nothing. */
static void keeps_raise(keel_alerts *a, const expr *e)
{
    if (!e)
        return;
    if (e->t != N_NUM && e->t != N_RATIO && e->win > a->sels[e->sel].keep)
        a->sels[e->sel].keep = e->win;
    keeps_raise(a, e->a);
    keeps_raise(a, e->b);
}

static bool parse_rule(parser *ps, rule *r)
{
    static const struct {
        const char *op;
        int code;
    } ops[] = {{">=", OP_GE}, {"<=", OP_LE}, {"==", OP_EQ}, {"!=", OP_NE}, {">", OP_GT}, {"<", OP_LT}};
    do {
        if (r->nconds == 8) {
            ps->bad = true;
            break;
        }
        cond *c = &r->conds[r->nconds++];
        c->lhs = parse_expr(ps, 0);
        size_t i;
        for (i = 0; !ps->bad && i < sizeof ops / sizeof ops[0]; i++)
            if (lit(ps, ops[i].op))
                break;
        if (i == sizeof ops / sizeof ops[0])
            ps->bad = true;
        if (ps->bad)
            break;
        c->op = ops[i].code;
        c->rhs = number(ps);
    } while (!ps->bad && lit(ps, "and"));
    if (!ps->bad && lit(ps, "for"))
        r->for_ns = duration(ps, true);
    if (!ps->bad && lit(ps, "keep_firing_for"))
        r->keep_firing_ns = duration(ps, true);
    ws(ps);
    if (*ps->p)
        ps->bad = true; /* trailing text */
    return !ps->bad;
}

/* ---- evaluation (caller holds a->mu) ---- */

static uint64_t series_hash(const keel_metrics_sample *s)
{
    uint64_t h = 0;
    for (size_t i = 0; i < s->nlabels; i++)
        h = keel__mix64(h ^ keel__hash64(s->label_values[i], strlen(s->label_values[i]), i));
    return h;
}

static bool series_is(const series *se, uint64_t h, const keel_metrics_sample *s)
{
    if (se->hash != h)
        return false;
    const char *k = se->key, *end = se->key + se->keylen;
    for (size_t i = 0; i < s->nlabels; i++) {
        const char *pair[2] = {s->label_names[i], s->label_values[i]};
        for (int j = 0; j < 2; j++) {
            size_t n = strlen(pair[j]) + 1;
            if ((size_t)(end - k) < n || memcmp(k, pair[j], n) != 0)
                return false;
            k += n;
        }
    }
    return k == end;
}

/* Puts ser[i] in the slots (which have room). */
static void slot_put(selector *sel, size_t i)
{
    size_t mask = sel->nslot - 1, j = (size_t)sel->ser[i].hash & mask;
    while (sel->slot[j])
        j = (j + 1) & mask;
    sel->slot[j] = (uint32_t)(i + 1);
}

/* The state of the series of s in a counting selector, made (unknown) on
 * its first match; NULL without memory. */
static series *series_of(selector *sel, const keel_metrics_sample *s, size_t w)
{
    uint64_t h = series_hash(s);
    size_t mask = sel->nslot - 1;
    for (size_t j = (size_t)h & mask; sel->nslot && sel->slot[j]; j = (j + 1) & mask)
        if (series_is(&sel->ser[sel->slot[j] - 1], h, s))
            return &sel->ser[sel->slot[j] - 1];
    if (sel->nser >= UINT32_MAX - 1)
        return NULL;
    if (2 * (sel->nser + 1) >= sel->nslot) { /* grow the slots, then place all again */
        size_t n = sel->nslot ? 2 * sel->nslot : 16;
        uint32_t *slot = keel__calloc(n, sizeof *slot);
        if (!slot)
            return NULL;
        keel__free(sel->slot);
        sel->slot = slot;
        sel->nslot = n;
        for (size_t i = 0; i < sel->nser; i++)
            slot_put(sel, i);
    }
    if (sel->nser == sel->ser_cap) {
        size_t cap = sel->ser_cap ? 2 * sel->ser_cap : 8;
        series *ser = keel__realloc(sel->ser, cap * sizeof *ser);
        if (!ser)
            return NULL;
        sel->ser = ser;
        sel->ser_cap = cap;
    }
    series se = {.hash = h};
    for (size_t i = 0; i < s->nlabels; i++)
        se.keylen += strlen(s->label_names[i]) + strlen(s->label_values[i]) + 2;
    se.key = keel__malloc(se.keylen ? se.keylen : 1);
    se.vals = keel__malloc(2 * w * sizeof *se.vals);
    if (!se.key || !se.vals) {
        series_free(&se);
        return NULL;
    }
    se.prev = se.vals;
    se.now = se.vals + w;
    char *k = se.key;
    for (size_t i = 0; i < s->nlabels; i++) {
        k = stpcpy(k, s->label_names[i]) + 1;
        k = stpcpy(k, s->label_values[i]) + 1;
    }
    sel->ser[sel->nser] = se;
    slot_put(sel, sel->nser);
    return &sel->ser[sel->nser++];
}

/* Matching series add up into the selector's sample being gathered; for
 * counters and histograms, each one's values are kept for sum_increases. */
static void gather(const keel_metrics_sample *s, void *ud)
{
    keel_alerts *a = ud;
    for (size_t i = 0; i < a->nsels; i++) {
        selector *sel = &a->sels[i];
        if (strcmp(sel->name, s->name) != 0)
            continue;
        bool match = true;
        for (size_t k = 0; match && k < sel->nm; k++) {
            const char *v = ""; /* an absent label matches an empty value, as in Prometheus */
            for (size_t j = 0; j < s->nlabels; j++)
                if (strcmp(s->label_names[j], sel->mk[k]) == 0)
                    v = s->label_values[j];
            match = strcmp(v, sel->mv[k]) == 0;
        }
        if (!match)
            continue;
        size_t w = s->type == KEEL_METRIC_HISTOGRAM ? 1 + s->nbuckets : 1;
        bool counting = s->type != KEEL_METRIC_GAUGE;
        if (!sel->matched) {
            if (sel->acc_width != w || sel->counting != counting) { /* a new shape or kind */
                double *acc = keel__realloc(sel->acc, w * sizeof *acc);
                double *total = acc ? keel__realloc(sel->total, w * sizeof *total) : NULL;
                if (acc)
                    sel->acc = acc;
                if (!total) {
                    a->gather_failed = true;
                    continue;
                }
                sel->total = total;
                sel->acc_width = w;
                sel->counting = counting;
                sel->has_total = false;
                sel->width = 0; /* the history of the old one goes (history_room) */
                series_clear(sel);
            }
            memset(sel->acc, 0, w * sizeof *sel->acc);
            if (w > 1 && !sel->bounds) {
                if (!(sel->bounds = keel__malloc(s->nbuckets * sizeof(double))))
                    a->gather_failed = true;
                else
                    memcpy(sel->bounds, s->bounds, s->nbuckets * sizeof(double));
            }
            sel->matched = true;
        }
        if (w != sel->acc_width || counting != sel->counting)
            continue; /* a family that changed shape: ignore it */
        double *v = sel->acc;
        if (counting) {
            series *se = series_of(sel, s, w);
            if (!se) {
                a->gather_failed = true;
                continue;
            }
            se->seen = true;
            se->created_now = s->created;
            v = se->now;
            memset(v, 0, w * sizeof *v);
        }
        if (w == 1) {
            v[0] += s->value;
        } else {
            v[0] += (double)s->count;
            for (size_t b = 0; b < s->nbuckets; b++)
                v[1 + b] += (double)s->cumulative[b];
        }
    }
}

/* The sample of a counting selector: its last one plus each series'
 * increase since the last evaluation (its whole value when it went down
 * or is a new child of the same labels: its own reset). A series matched
 * for the first time adds nothing, one gone adds nothing more, and a NaN
 * or infinite value adds nothing; the first sample is the plain sum of
 * the finite values, so that the extrapolation stops where the counters
 * would reach zero. */
static void sum_increases(selector *s)
{
    if (!s->matched || !s->counting)
        return;
    size_t w = s->acc_width;
    for (size_t k = 0; k < w; k++)
        s->acc[k] = s->has_total ? s->total[k] : 0;
    for (size_t i = 0; i < s->nser; i++) {
        const series *se = &s->ser[i];
        if (!se->seen || (s->has_total && !se->known))
            continue;
        for (size_t k = 0; k < w; k++) {
            double now = se->now[k], d = now;
            if (s->has_total) {
                d = now - se->prev[k];
                if (d < 0 || se->created_now != se->created)
                    d = now;
            }
            if (isfinite(d))
                s->acc[k] += d;
        }
    }
}

/* Ends an evaluation for the series of s: they become what the next one
 * compares against when it completed, or are as they were before it
 * when it did not. Series not matched are forgotten. */
static void series_settle(selector *s, bool completed)
{
    if (!s->counting)
        return;
    if (completed && s->matched) {
        memcpy(s->total, s->acc, s->acc_width * sizeof *s->total);
        s->has_total = true;
    }
    size_t n = 0;
    for (size_t i = 0; i < s->nser; i++) {
        series *se = &s->ser[i];
        if (completed ? !se->seen : !se->known) {
            series_free(se);
            continue;
        }
        if (completed && se->seen) {
            double *t = se->prev; /* this evaluation's values are the next one's previous */
            se->prev = se->now;
            se->now = t;
            se->created = se->created_now;
            se->known = true;
        }
        se->seen = false;
        s->ser[n++] = *se;
    }
    s->nser = n;
    if (s->ser_cap > 64 && n < s->ser_cap / 4) { /* give back what many series that went away took */
        series *ser = keel__realloc(s->ser, (n ? 2 * n : 1) * sizeof *ser);
        if (ser) {
            s->ser = ser;
            s->ser_cap = n ? 2 * n : 1;
        }
    }
    size_t want = 16;
    while (want <= 2 * n)
        want *= 2;
    uint32_t *slot = 4 * want <= s->nslot ? keel__calloc(want, sizeof *slot) : NULL;
    if (slot) {
        keel__free(s->slot);
        s->slot = slot;
        s->nslot = want;
    }
    if (s->slot)
        memset(s->slot, 0, s->nslot * sizeof *s->slot);
    for (size_t i = 0; s->slot && i < n; i++)
        slot_put(s, i);
}

/* Makes room for the sample gathered into s. Returns 0 or KEEL_ENOMEM. */
static int history_room(keel_alerts *a, selector *s, uint64_t now)
{
    if (!s->matched)
        return 0;
    if (s->width != s->acc_width) { /* first sample, or a new shape */
        s->n = s->cap = 0; /* v was sized for the old width */
        s->width = s->acc_width;
    }
    /* drop what no window reaches any more (one interval of slack) */
    size_t drop = 0;
    while (drop < s->n && keel__sat_add(keel__sat_add(s->t[drop], s->keep), a->interval) < now)
        drop++;
    if (drop) {
        memmove(s->t, s->t + drop, (s->n - drop) * sizeof *s->t);
        memmove(s->v, s->v + drop * s->width, (s->n - drop) * s->width * sizeof *s->v);
        s->n -= drop;
    }
    if (s->n == s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 16;
        uint64_t *t = keel__realloc(s->t, cap * sizeof *t);
        if (t)
            s->t = t;
        double *v = t ? keel__realloc(s->v, cap * s->width * sizeof *v) : NULL;
        if (!v)
            return KEEL_ENOMEM;
        s->v = v;
        s->cap = cap;
    }
    return 0;
}

static void history_push(selector *s, uint64_t now)
{
    if (!s->matched)
        return;
    s->t[s->n] = now;
    memcpy(s->v + s->n * s->width, s->acc, s->width * sizeof *s->v);
    s->n++;
}

/* Samples of s in (now - win, now]: [*from, s->n). */
static size_t window_from(const selector *s, uint64_t now, uint64_t win)
{
    size_t i = 0;
    while (i < s->n && s->t[i] + win <= now)
        i++;
    return i;
}

/* Prometheus 3's extrapolatedRate() for value k of each sample, as a rate:
 * a gap to the start beyond 1.1 x the average interval counts as half an
 * interval, and only then is the start capped at the counter's zero (the
 * order Prometheus 2 had the other way round). */
static double rate_of(const selector *s, size_t k, uint64_t now, uint64_t win)
{
    size_t from = window_from(s, now, win), n = s->n - from;
    if (n < 2)
        return NAN;
    const double *v = s->v;
    size_t w = s->width;
    double first = v[from * w + k], last = v[(s->n - 1) * w + k], result = last - first;
    for (size_t i = from + 1; i < s->n; i++) /* counter resets */
        if (v[i * w + k] < v[(i - 1) * w + k])
            result += v[(i - 1) * w + k];
    double t_first = (double)s->t[from] / 1e9, t_last = (double)s->t[s->n - 1] / 1e9;
    double range_start = ((double)now - (double)win) / 1e9, range_end = (double)now / 1e9;
    double to_start = t_first - range_start, to_end = range_end - t_last;
    double sampled = t_last - t_first, avg = sampled / (double)(n - 1);
    double threshold = avg * 1.1;
    if (to_start >= threshold)
        to_start = avg / 2;
    if (result > 0 && first >= 0) { /* a counter does not go below zero */
        double to_zero = sampled * (first / result);
        if (to_zero < to_start)
            to_start = to_zero;
    }
    if (to_end >= threshold)
        to_end = avg / 2;
    double extrapolate = sampled + to_start + to_end;
    result *= extrapolate / sampled;
    return result / ((double)win / 1e9);
}

/* Prometheus's histogram_quantile() over the window's bucket rates. */
static double quantile_of(const selector *s, double q, uint64_t now, uint64_t win)
{
    if (!s->bounds || s->width < 2)
        return NAN;
    size_t nb = s->width - 1;
    double c[257];
    if (nb > 257)
        return NAN;
    for (size_t b = 0; b < nb; b++) {
        c[b] = rate_of(s, 1 + b, now, win);
        if (c[b] != c[b])
            return NAN;
        if (b && c[b] < c[b - 1]) /* Prometheus's ensureMonotonic */
            c[b] = c[b - 1];
    }
    if (q < 0)
        return -INFINITY;
    if (q > 1)
        return INFINITY;
    double total = c[nb - 1];
    if (nb < 2 || !(total > 0))
        return NAN;
    double rank = q * total;
    size_t b = 0;
    while (b < nb - 1 && c[b] < rank)
        b++;
    if (b == nb - 1) /* the +Inf bucket: the highest finite bound */
        return s->bounds[nb - 2];
    if (b == 0 && s->bounds[0] <= 0)
        return s->bounds[0];
    double start = b ? s->bounds[b - 1] : 0, end = s->bounds[b];
    double below = b ? c[b - 1] : 0, count = c[b] - below;
    return start + (end - start) * ((rank - below) / count);
}

static double gauge_over(const selector *s, ntype t, uint64_t now, uint64_t win)
{
    size_t from = window_from(s, now, win);
    if (from == s->n || s->width != 1 || s->counting) /* counting: no values, increases */
        return NAN;
    /* fmin and fmax pass over NaN, and give NaN only when all are NaN, as
     * min_over_time and max_over_time do */
    double acc = t == N_MIN || t == N_MAX ? NAN : 0;
    for (size_t i = from; i < s->n; i++) {
        double v = s->v[i];
        acc = t == N_MIN ? fmin(acc, v) : t == N_MAX ? fmax(acc, v) : acc + v;
    }
    if (t == N_LAST)
        return s->v[s->n - 1];
    return t == N_AVG ? acc / (double)(s->n - from) : acc;
}

static double eval(keel_alerts *a, const expr *e, uint64_t now)
{
    switch (e->t) {
    case N_NUM: return e->num;
    case N_RATIO: {
        double x = eval(a, e->a, now), y = eval(a, e->b, now);
        return x / y; /* 0/0 is NaN, x/0 infinite: IEEE, as Prometheus */
    }
    case N_RATE: {
        const selector *s = &a->sels[e->sel];
        return s->width == 1 ? rate_of(s, 0, now, e->win) : NAN;
    }
    case N_QUANT: return quantile_of(&a->sels[e->sel], e->num, now, e->win);
    default: return gauge_over(&a->sels[e->sel], e->t, now, e->win);
    }
}

static bool holds(const cond *c, double v)
{
    switch (c->op) { /* NaN compares false everywhere, != included */
    case OP_GT: return v > c->rhs;
    case OP_GE: return v >= c->rhs;
    case OP_LT: return v < c->rhs;
    case OP_LE: return v <= c->rhs;
    case OP_EQ: return v == c->rhs;
    default: return v == v && v != c->rhs;
    }
}

static void info_of(const rule *r, keel_alert_info *in)
{
    *in = (keel_alert_info){r->name, r->state, r->value, r->nlabels, r->nannotations,
                            (const char *const *)r->labels, (const char *const *)r->annotations,
                            r->active_wall, r->fired_wall, r->resolved_wall};
}

typedef struct change {
    size_t rule;
    keel_alert_state from, to;
} change;

/* Moves r's alert for this evaluation as Prometheus does, recording each
 * change for the callback and the keel_alerts series. */
static void step(keel_alerts *a, size_t idx, rule *r, bool active, uint64_t now, uint64_t wall,
                 change *ch, size_t *nch)
{
    keel_alert_state from = r->state;
    if (active) {
        if (from == KEEL_ALERT_INACTIVE || from == KEEL_ALERT_RESOLVED) { /* a new alert */
            r->state = KEEL_ALERT_PENDING;
            r->active_mono = now;
            r->active_wall = wall;
            r->fired_mono = r->fired_wall = r->resolved_mono = r->resolved_wall = 0;
            r->last_sent_mono = 0;
            r->sent = false;
            ch[(*nch)++] = (change){idx, from, KEEL_ALERT_PENDING};
        }
        r->keep_since_mono = 0;
        if (r->state == KEEL_ALERT_PENDING && now - r->active_mono >= r->for_ns) {
            r->state = KEEL_ALERT_FIRING;
            r->fired_mono = now;
            r->fired_wall = wall;
            ch[(*nch)++] = (change){idx, KEEL_ALERT_PENDING, KEEL_ALERT_FIRING};
        }
    } else if (from == KEEL_ALERT_PENDING) {
        r->state = KEEL_ALERT_INACTIVE; /* dropped, never sent */
    } else if (from == KEEL_ALERT_FIRING) {
        if (r->keep_firing_ns && r->keep_since_mono == 0)
            r->keep_since_mono = now;
        if (!r->keep_firing_ns || now - r->keep_since_mono >= r->keep_firing_ns) {
            r->state = KEEL_ALERT_RESOLVED;
            r->resolved_mono = now;
            r->resolved_wall = wall;
        }
    } else if (from == KEEL_ALERT_RESOLVED && now - r->resolved_mono > a->keep_resolved) {
        r->state = KEEL_ALERT_INACTIVE; /* kept long enough */
    }
    if (!active && r->state != from)
        ch[(*nch)++] = (change){idx, from, r->state};
    uint64_t delta = a->interval > a->resend ? a->interval : a->resend;
    /* saturated: a wrapped endsAt (resend 2^62: = startsAt) would resolve it */
    r->valid_until_wall = keel__sat_add(wall, keel__sat_mul(4, delta));
}

/* The keel_alerts series of an alert in each state (none when inactive or
 * resolved). The family is shared: another keel_alerts with a rule of the
 * same name may remove a series between a keel_gauge_with() and its set. */
static const char *const series_names[] = {NULL, "pending", "firing", NULL};

static void series_drop(keel_alerts *a, const char *rule_name, keel_alert_state st)
{
    if (series_names[st]) /* a gauge's remove allocates nothing */
        keel_gauge_remove(a->gauge, (const char *[]){rule_name, series_names[st]}, 2);
}

/* Shows the new state of every rule whose state changes, beside the old
 * one's series: all of them, or none and KEEL_ENOMEM. (A registry that
 * refuses a series for another reason, max_children, only goes without
 * it.) */
static int series_show(keel_alerts *a, const rule *next)
{
    for (size_t i = 0; i < a->nrules; i++) {
        const char *st = series_names[next[i].state];
        if (next[i].state == a->rules[i].state || !st)
            continue;
        if (keel__gauge_put(a->gauge, (const char *[]){next[i].name, st}, 2, 1) == KEEL_ENOMEM) {
            while (i--)
                if (next[i].state != a->rules[i].state)
                    series_drop(a, next[i].name, next[i].state);
            return KEEL_ENOMEM;
        }
    }
    return 0;
}

/* One evaluation at now: all of it, or KEEL_ENOMEM and nothing (but
 * history no window reaches any more dropped), so that the next tick
 * tries again. */
static int evaluate(keel_alerts *a, uint64_t now, uint64_t wall)
{
    for (size_t i = 0; i < a->nsels; i++)
        a->sels[i].matched = false;
    a->gather_failed = false;
    int rc = keel_metrics_visit(a->m, gather, a);
    if (rc == 0 && a->gather_failed)
        rc = KEEL_ENOMEM;
    for (size_t i = 0; rc == 0 && i < a->nsels; i++) {
        sum_increases(&a->sels[i]);
        rc = history_room(a, &a->sels[i], now);
    }
    change *ch = rc ? NULL : keel__malloc((2 * a->nrules + 1) * sizeof *ch);
    rule *next = ch ? keel__malloc((a->nrules ? a->nrules : 1) * sizeof *next) : NULL;
    if (!next) {
        keel__free(ch);
        for (size_t i = 0; i < a->nsels; i++)
            series_settle(&a->sels[i], false);
        return rc ? rc : KEEL_ENOMEM;
    }
    for (size_t i = 0; i < a->nsels; i++)
        history_push(&a->sels[i], now);
    size_t nch = 0;
    for (size_t i = 0; i < a->nrules; i++) {
        rule *r = &next[i];
        *r = a->rules[i];
        bool active = true;
        for (size_t k = 0; k < r->nconds; k++) {
            double v = eval(a, r->conds[k].lhs, now);
            if (k == 0)
                r->value = v;
            active = active && holds(&r->conds[k], v);
        }
        step(a, i, r, active, now, wall, ch, &nch);
    }
    rc = series_show(a, next);
    if (rc) {
        for (size_t i = 0; i < a->nsels; i++)
            a->sels[i].n -= a->sels[i].matched; /* the sample pushed */
    } else {
        for (size_t i = 0; i < a->nrules; i++) {
            if (next[i].state != a->rules[i].state)
                series_drop(a, next[i].name, a->rules[i].state);
            a->rules[i] = next[i];
        }
        for (size_t i = 0; a->on_change && i < nch; i++) {
            keel_alert_info in;
            info_of(&a->rules[ch[i].rule], &in);
            in.state = ch[i].to;
            a->on_change(&in, ch[i].from, ch[i].to, a->ud);
        }
    }
    for (size_t i = 0; i < a->nsels; i++)
        series_settle(&a->sels[i], rc == 0);
    keel__free(next);
    keel__free(ch);
    return rc;
}

KEEL_API int keel_alerts_tick(keel_alerts *a)
{
    if (!a)
        return KEEL_EINVAL;
    pthread_mutex_lock(&a->mu);
    uint64_t now = keel__clock_now(&a->clock), wall = keel__clock_now(&a->wall);
    if (a->evaluated && now - a->last_eval < a->interval) {
        pthread_mutex_unlock(&a->mu);
        return 0;
    }
    int rc = evaluate(a, now, wall);
    if (rc == 0) {
        a->evaluated = true;
        a->last_eval = now;
        a->last_eval_wall = wall;
    }
    pthread_mutex_unlock(&a->mu);
    return rc ? rc : 1;
}

/* ---- rules ---- */

/* Copies n name/value pairs into *out (freed with pairs_free(), also on
 * failure). Returns 0, KEEL_EINVAL (a NULL string) or KEEL_ENOMEM. */
static int pairs_dup(const char *const *kv, size_t n, char ***out)
{
    char **p = *out = keel__calloc(2 * n + 1, sizeof *p);
    if (!p)
        return KEEL_ENOMEM;
    for (size_t i = 0; i < 2 * n; i++) {
        if (!kv[i])
            return KEEL_EINVAL;
        if (!(p[i] = keel__strdup(kv[i])))
            return KEEL_ENOMEM;
    }
    return 0;
}

/* Whether n rule labels (or annotations) can go to Alertmanager: names
 * [a-zA-Z_][a-zA-Z0-9_]*, each once (the JSON would have a key twice),
 * values UTF-8; no label "alertname", which is the rule's name. */
static bool pairs_ok(const char *const *kv, size_t n, bool labels)
{
    for (size_t i = 0; i < n; i++) {
        const char *k = kv[2 * i];
        if (!k || !kv[2 * i + 1] || !*k || isdigit((unsigned char)*k) ||
            (labels && strcmp(k, "alertname") == 0) || !keel__utf8_ok(kv[2 * i + 1]))
            return false;
        for (const char *p = k; *p; p++)
            if (!(isalnum((unsigned char)*p) && (unsigned char)*p < 0x80) && *p != '_')
                return false;
        for (size_t j = 0; j < i; j++)
            if (strcmp(kv[2 * j], k) == 0)
                return false;
    }
    return true;
}

static void pairs_free(char **p, size_t n)
{
    for (size_t i = 0; p && i < 2 * n; i++)
        keel__free(p[i]);
    keel__free(p);
}

static void rule_free(rule *r)
{
    keel__free(r->name);
    for (size_t k = 0; k < r->nconds; k++)
        expr_free(r->conds[k].lhs);
    pairs_free(r->labels, r->nlabels);
    pairs_free(r->annotations, r->nannotations);
}

KEEL_API int keel_alerts_add(keel_alerts *a, const char *name, const char *text,
                             const char *const *labels, size_t nlabels,
                             const char *const *annotations, size_t nannotations, size_t *err_pos)
{
    if (err_pos)
        *err_pos = 0;
    if (!a || !name || !*name || !text || (nlabels && !labels) || (nannotations && !annotations) ||
        nlabels >= SIZE_MAX / 2 || nannotations >= SIZE_MAX / 2 || /* 2 n + 1 strings would wrap */
        !keel__utf8_ok(name) || !pairs_ok(labels, nlabels, true) ||
        !pairs_ok(annotations, nannotations, false))
        return KEEL_EINVAL;
    pthread_mutex_lock(&a->mu);
    for (size_t i = 0; i < a->nrules; i++)
        if (strcmp(a->rules[i].name, name) == 0) {
            pthread_mutex_unlock(&a->mu);
            return KEEL_EEXIST;
        }
    rule r = {0};
    size_t nsels_before = a->nsels;
    parser ps = {a, text, text, false, false, 0};
    int rc = parse_rule(&ps, &r) ? 0 : ps.nomem ? KEEL_ENOMEM : KEEL_EINVAL;
    if (rc == KEEL_EINVAL && err_pos)
        *err_pos = (size_t)(ps.p - text);
    if (rc == 0) {
        r.nlabels = nlabels;
        r.nannotations = nannotations;
        rc = pairs_dup(labels, nlabels, &r.labels);
        if (rc == 0)
            rc = pairs_dup(annotations, nannotations, &r.annotations);
        if (rc == 0 && !(r.name = keel__strdup(name)))
            rc = KEEL_ENOMEM;
    }
    if (rc == 0 && a->nrules == a->rules_cap) {
        size_t cap = a->rules_cap ? 2 * a->rules_cap : 8;
        rule *n = keel__realloc(a->rules, cap * sizeof *n);
        if (!n)
            rc = KEEL_ENOMEM;
        else {
            a->rules = n;
            a->rules_cap = cap;
        }
    }
    if (rc == 0) {
        for (size_t k = 0; k < r.nconds; k++)
            keeps_raise(a, r.conds[k].lhs);
        a->rules[a->nrules++] = r;
    } else {
        rule_free(&r);
        while (a->nsels > nsels_before) /* selectors only this rule made */
            sel_free(&a->sels[--a->nsels]);
    }
    pthread_mutex_unlock(&a->mu);
    return rc;
}

KEEL_API int keel_alerts_get(keel_alerts *a, const char *name,
                             void (*fn)(const keel_alert_info *alert, void *ud), void *ud)
{
    if (!a || !name || !fn)
        return KEEL_EINVAL;
    pthread_mutex_lock(&a->mu);
    int rc = KEEL_ENOTFOUND;
    for (size_t i = 0; i < a->nrules; i++)
        if (strcmp(a->rules[i].name, name) == 0) {
            keel_alert_info in;
            info_of(&a->rules[i], &in);
            fn(&in, ud);
            rc = 0;
        }
    pthread_mutex_unlock(&a->mu);
    return rc;
}

/* ---- the Alertmanager JSON ---- */

typedef struct jbuf {
    char *p;
    size_t len, cap;
    bool oom;
} jbuf;

static void jput(jbuf *b, const char *s, size_t n)
{
    if (b->oom)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? 2 * b->cap : 1024;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *p = keel__realloc(b->p, cap);
        if (!p) {
            b->oom = true;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void jstr(jbuf *b, const char *s)
{
    jput(b, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        char esc[8];
        if (*p == '"' || *p == '\\') {
            esc[0] = '\\';
            esc[1] = (char)*p;
            jput(b, esc, 2);
        } else if (*p < 0x20) {
            snprintf(esc, sizeof esc, "\\u%04x", *p);
            jput(b, esc, 6);
        } else {
            jput(b, (const char *)p, 1);
        }
    }
    jput(b, "\"", 1);
}

static void jtime(jbuf *b, uint64_t wall_ns)
{
    time_t sec = (time_t)(wall_ns / 1000000000u);
    struct tm tm;
    gmtime_r(&sec, &tm);
    char t[40];
    size_t n = strftime(t, sizeof t, "%Y-%m-%dT%H:%M:%S", &tm);
    n += (size_t)snprintf(t + n, sizeof t - n, ".%03uZ", (unsigned)(wall_ns / 1000000u % 1000u));
    jput(b, "\"", 1);
    jput(b, t, n);
    jput(b, "\"", 1);
}

static void jpairs(jbuf *b, const char *key, char **kv, size_t n, const char *first_k,
                   const char *first_v)
{
    jstr(b, key);
    jput(b, ":{", 2);
    if (first_k) {
        jstr(b, first_k);
        jput(b, ":", 1);
        jstr(b, first_v);
    }
    for (size_t i = 0; i < n; i++) {
        if (first_k || i)
            jput(b, ",", 1);
        jstr(b, kv[2 * i]);
        jput(b, ":", 1);
        jstr(b, kv[2 * i + 1]);
    }
    jput(b, "}", 1);
}

/* Whether r's alert is to be sent (again) at now. The next send saturates:
 * a resend delay that overflows it means never again, not at once. */
static bool due(const keel_alerts *a, const rule *r, uint64_t now)
{
    bool again = keel__sat_add(r->last_sent_mono, a->resend) <= now;
    if (r->state == KEEL_ALERT_FIRING)
        return !r->sent || again;
    if (r->state == KEEL_ALERT_RESOLVED) /* sent at once, then every resend */
        return !r->sent || r->resolved_mono > r->last_sent_mono || again;
    return false;
}

KEEL_API int keel_alerts_to_send(keel_alerts *a, char **json, size_t *len)
{
    if (!a || !json)
        return KEEL_EINVAL;
    jbuf b = {0};
    jput(&b, "[", 1);
    pthread_mutex_lock(&a->mu);
    uint64_t now = a->last_eval;
    size_t sent = 0;
    for (size_t i = 0; i < a->nrules; i++) {
        rule *r = &a->rules[i];
        if (!due(a, r, now))
            continue;
        if (sent++)
            jput(&b, ",", 1);
        jput(&b, "{", 1);
        jpairs(&b, "labels", r->labels, r->nlabels, "alertname", r->name);
        jput(&b, ",", 1);
        jpairs(&b, "annotations", r->annotations, r->nannotations, NULL, NULL);
        jput(&b, ",\"startsAt\":", 12);
        jtime(&b, r->fired_wall);
        jput(&b, ",\"endsAt\":", 10);
        jtime(&b, r->state == KEEL_ALERT_RESOLVED ? r->resolved_wall : r->valid_until_wall);
        jput(&b, ",\"generatorURL\":", 16);
        jstr(&b, a->generator_url ? a->generator_url : "");
        jput(&b, "}", 1);
    }
    for (size_t i = 0; !b.oom && i < a->nrules; i++) { /* sent only once the JSON is whole */
        rule *r = &a->rules[i];
        if (due(a, r, now)) {
            r->last_sent_mono = now;
            r->sent = true;
        }
    }
    pthread_mutex_unlock(&a->mu);
    jput(&b, "]", 1);
    if (b.oom) {
        keel__free(b.p);
        return KEEL_ENOMEM;
    }
    *json = b.p;
    if (len)
        *len = b.len;
    return 0;
}

/* ---- create, destroy ---- */

static uint64_t wall_ns(void *ud)
{
    (void)ud;
    return keel_wall_ns();
}

KEEL_API int keel_alerts_create(keel_alerts **out, const keel_alerts_opts *o)
{
    if (!out || !o || !o->metrics || (o->generator_url && !keel__utf8_ok(o->generator_url)))
        return KEEL_EINVAL; /* the URL goes into the JSON, which is UTF-8 */
    keel_alerts *a = keel__calloc(1, sizeof *a);
    if (!a)
        return KEEL_ENOMEM;
    a->m = o->metrics;
    a->interval = o->eval_interval_ns ? o->eval_interval_ns : MIN_NS;
    a->resend = o->resend_delay_ns ? o->resend_delay_ns : MIN_NS;
    a->keep_resolved = o->resolved_keep_ns ? o->resolved_keep_ns : 15 * MIN_NS;
    a->on_change = o->on_change;
    a->ud = o->ud;
    a->clock = (keel__clock){o->clock, o->clock_ud};
    a->wall = (keel__clock){o->wall_clock ? o->wall_clock : wall_ns, o->clock_ud};
    int rc = 0;
    if (o->generator_url && !(a->generator_url = keel__strdup(o->generator_url)))
        rc = KEEL_ENOMEM;
    if (rc == 0)
        rc = keel__metrics_gauge_shared(a->m, "keel_alerts", "Active alerts (1 while pending or firing).",
                                        (const char *[]){"alertname", "alertstate"}, 2, &a->gauge);
    if (rc) {
        keel__free(a->generator_url);
        keel__free(a);
        return rc;
    }
    pthread_mutex_init(&a->mu, NULL);
    *out = a;
    return 0;
}

KEEL_API void keel_alerts_destroy(keel_alerts *a)
{
    if (!a)
        return;
    for (size_t i = 0; i < a->nrules; i++) {
        series_drop(a, a->rules[i].name, a->rules[i].state);
        rule_free(&a->rules[i]);
    }
    for (size_t i = 0; i < a->nsels; i++)
        sel_free(&a->sels[i]);
    keel__free(a->rules);
    keel__free(a->sels);
    keel__free(a->generator_url);
    pthread_mutex_destroy(&a->mu);
    keel__free(a);
}
