/* lib/metrics.c — the metrics registry: families, children, per-thread
 * values, exposition.
 *
 * Values of counters and histograms live in slots: 64-bit words numbered
 * across the registry. A child owns a run of consecutive slots (a counter
 * two: integer and floating-point parts; a histogram one per bucket plus
 * one for the sum). Every thread that touches the registry gets its own
 * block of slots (lib/tslot.h finds it without a lock) and updates its
 * words with plain relaxed loads and stores: no thread ever writes another
 * thread's memory, so there is nothing to contend on. A block is a fixed
 * directory of chunks of 512 slots; chunks never move, so a renderer can
 * read a block while its thread writes. When a thread exits its values are
 * added to the registry's `retired` words.
 *
 * A removed child's slots are reused by a later child of the same size,
 * which zeroes them (in `retired` and in every live thread's block) when
 * it takes them. No thread writes them meanwhile: a removed child's handle
 * is no longer used. Keeping their old sum as a baseline instead does not
 * work for the floating-point slots: a thread's exit folds its word into
 * `retired` and so changes the order of the additions, and with it the
 * rounded sum, leaving a never-touched child a few ULPs off zero, below
 * zero for a counter.
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <keel/metrics.h>

#include "hash.h"
#include "internal.h"
#include "tslot.h"

#define CHUNK 512
#define DIR 1024 /* chunks per block: 524288 slots a registry */
#define MAX_SLOTS ((size_t)CHUNK * DIR)
#define MAX_LABELS 16
#define MAX_BUCKETS 256

typedef _Atomic uint64_t word;

enum { K_INT = 0, K_DBL = 1 }; /* how a slot adds up */

typedef struct block {
    struct block *next, *prevb; /* the registry's list, under m->mu */
    _Atomic(word *) dir[DIR];
} block;

typedef struct family family;

typedef struct child {
    keel_metrics *m;
    family *fam;
    size_t slot;       /* counters and histograms */
    word gauge;        /* gauges: the bits of a double */
    _Atomic bool went_negative; /* histograms: observed a value below 0 */
    double created;    /* seconds since the epoch */
    keel_metrics_value_fn fn; /* series computed at render time */
    void *ud;
    uint64_t hash;
    char **values;
    bool removed;
} child;

struct family {
    keel_metrics *m;
    keel_metric_type type;
    char *name, *help;
    char *om_name; /* the OpenMetrics family name (a counter without _total) */
    size_t nlabels;
    char **labels;
    size_t nbounds; /* histogram: finite bounds; +Inf is added */
    double *bounds;
    size_t width;   /* slots per child */
    child **tab;    /* children by label values (open addressing) */
    size_t tab_cap, nchildren;
    bool func;      /* children computed by functions */
};

/* The public handle types are the internal ones. */
struct keel_counter {
    family f;
};
struct keel_gauge {
    family f;
};
struct keel_histogram {
    family f;
};
struct keel_counter_child {
    child c;
};
struct keel_gauge_child {
    child c;
};
struct keel_histogram_child {
    child c;
};

typedef struct freeslot {
    size_t slot, width;
} freeslot;

struct keel_metrics {
    keel__towner owner;
    pthread_mutex_t mu;
    size_t max_children;
    keel__clock wall;
    family **fams;
    size_t nfams, fams_cap;
    block *blocks; /* of live threads */
    size_t next_slot;
    uint64_t *retired;      /* sums of exited threads, per slot */
    unsigned char *kind;    /* K_INT / K_DBL per slot */
    size_t slots_cap;       /* length of retired and kind */
    freeslot *free;         /* slots of removed children */
    size_t nfree, free_cap;
};

static const double default_bounds[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};

static inline double bits_d(uint64_t u)
{
    double d;
    memcpy(&d, &u, sizeof d);
    return d;
}

static inline uint64_t d_bits(double d)
{
    uint64_t u;
    memcpy(&u, &d, sizeof u);
    return u;
}

/* ---- per-thread blocks ---- */

static void block_free(void *data)
{
    block *b = data;
    for (size_t i = 0; i < DIR; i++)
        keel__aligned_free(atomic_load_explicit(&b->dir[i], memory_order_relaxed));
    keel__free(b);
}

/* A thread exits: fold its values into `retired`. Caller holds the tslot
 * registry mutex; takes m->mu. */
static void block_exit(keel__towner *o, void *data)
{
    keel_metrics *m = (keel_metrics *)((char *)o - offsetof(keel_metrics, owner));
    block *b = data;
    pthread_mutex_lock(&m->mu);
    for (size_t c = 0; c < DIR; c++) {
        word *ch = atomic_load_explicit(&b->dir[c], memory_order_relaxed);
        for (size_t i = 0; ch && i < CHUNK && c * CHUNK + i < m->slots_cap; i++) {
            size_t s = c * CHUNK + i;
            uint64_t v = atomic_load_explicit(&ch[i], memory_order_relaxed);
            m->retired[s] = m->kind[s] == K_DBL ? d_bits(bits_d(m->retired[s]) + bits_d(v))
                                                : m->retired[s] + v;
        }
    }
    if (b->prevb)
        b->prevb->next = b->next;
    else
        m->blocks = b->next;
    if (b->next)
        b->next->prevb = b->prevb;
    pthread_mutex_unlock(&m->mu);
    block_free(b);
}

/* The calling thread's word for a slot, creating its block or chunk on
 * first use; NULL when memory runs out (the update is then lost). */
static __attribute__((noinline)) word *slot_slow(keel_metrics *m, size_t slot)
{
    block *b = keel__tslot_get(&m->owner);
    if (!b) {
        if (!(b = keel__calloc(1, sizeof *b)))
            return NULL;
        pthread_mutex_lock(&m->mu);
        b->next = m->blocks;
        if (m->blocks)
            m->blocks->prevb = b;
        m->blocks = b;
        pthread_mutex_unlock(&m->mu);
        if (keel__tslot_set(&m->owner, b, block_free) != 0) {
            pthread_mutex_lock(&m->mu);
            if (b->prevb)
                b->prevb->next = b->next;
            else
                m->blocks = b->next;
            if (b->next)
                b->next->prevb = b->prevb;
            pthread_mutex_unlock(&m->mu);
            keel__free(b);
            return NULL;
        }
    }
    word *ch = atomic_load_explicit(&b->dir[slot / CHUNK], memory_order_relaxed);
    if (!ch) { /* whole lines: no thread's words share one with another's */
        if (!(ch = keel__aligned_alloc(KEEL__CACHELINE, CHUNK * sizeof *ch)))
            return NULL;
        memset(ch, 0, CHUNK * sizeof *ch);
        atomic_store_explicit(&b->dir[slot / CHUNK], ch, memory_order_release);
    }
    return &ch[slot % CHUNK];
}

static inline __attribute__((always_inline)) word *slot_word(keel_metrics *m, size_t slot)
{
    block *b = keel__tslot_get(&m->owner);
    if (KEEL__LIKELY(b != NULL)) {
        word *ch = atomic_load_explicit(&b->dir[slot / CHUNK], memory_order_relaxed);
        if (KEEL__LIKELY(ch != NULL))
            return &ch[slot % CHUNK];
    }
    return slot_slow(m, slot);
}

/* Only this thread writes the word: a plain load and store, no RMW. */
static inline void word_add(word *w, uint64_t n)
{
    atomic_store_explicit(w, atomic_load_explicit(w, memory_order_relaxed) + n, memory_order_relaxed);
}

static inline void word_add_d(word *w, double v)
{
    atomic_store_explicit(w, d_bits(bits_d(atomic_load_explicit(w, memory_order_relaxed)) + v),
                          memory_order_relaxed);
}

/* The sum of a slot over retired and live threads. Caller holds m->mu. */
static uint64_t slot_sum(keel_metrics *m, size_t s)
{
    uint64_t v = m->retired[s];
    double d = bits_d(v);
    for (block *b = m->blocks; b; b = b->next) {
        word *ch = atomic_load_explicit(&b->dir[s / CHUNK], memory_order_acquire);
        if (!ch)
            continue;
        uint64_t x = atomic_load_explicit(&ch[s % CHUNK], memory_order_relaxed);
        if (m->kind[s] == K_DBL)
            d += bits_d(x);
        else
            v += x;
    }
    return m->kind[s] == K_DBL ? d_bits(d) : v;
}

/* ---- the hot path ---- */

KEEL_API void keel_counter_inc(keel_counter_child *h)
{
    if (KEEL__LIKELY(h != NULL)) {
        word *w = slot_word(h->c.m, h->c.slot);
        if (KEEL__LIKELY(w != NULL))
            word_add(w, 1);
    }
}

KEEL_API void keel_counter_add(keel_counter_child *h, uint64_t n)
{
    word *w = h ? slot_word(h->c.m, h->c.slot) : NULL;
    if (w)
        word_add(w, n);
}

KEEL_API void keel_counter_add_f(keel_counter_child *h, double v)
{
    if (!h || !(v >= 0)) /* negative or NaN: a counter never goes down */
        return;
    word *w = slot_word(h->c.m, h->c.slot + 1);
    if (w)
        word_add_d(w, v);
}

static void gauge_update(keel_gauge_child *h, double v, bool set)
{
    if (!h)
        return;
    uint64_t old = atomic_load_explicit(&h->c.gauge, memory_order_relaxed);
    while (!atomic_compare_exchange_weak_explicit(&h->c.gauge, &old,
                                                  d_bits(set ? v : bits_d(old) + v),
                                                  memory_order_relaxed, memory_order_relaxed))
        ;
}

KEEL_API void keel_gauge_set(keel_gauge_child *h, double v)
{
    if (h)
        atomic_store_explicit(&h->c.gauge, d_bits(v), memory_order_relaxed);
}
KEEL_API void keel_gauge_add(keel_gauge_child *h, double v) { gauge_update(h, v, false); }
KEEL_API void keel_gauge_inc(keel_gauge_child *h) { gauge_update(h, 1, false); }
KEEL_API void keel_gauge_dec(keel_gauge_child *h) { gauge_update(h, -1, false); }

KEEL_API void keel_histogram_observe(keel_histogram_child *h, double v)
{
    if (!h || v != v)
        return;
    const family *f = h->c.fam;
    size_t n = f->nbounds, i;
    if (n <= 8) { /* a handful: straight scan */
        for (i = 0; i < n && v > f->bounds[i]; i++)
            ;
    } else { /* the first bound >= v */
        size_t lo = 0, hi = n;
        while (lo < hi) {
            size_t mid = (lo + hi) / 2;
            if (v > f->bounds[mid])
                lo = mid + 1;
            else
                hi = mid;
        }
        i = lo;
    }
    word *w = slot_word(h->c.m, h->c.slot + i);
    if (w) {
        word_add(w, 1);
        word_add_d(w + (n + 1 - i), v); /* the sum, in the same chunk */
    }
    /* the sum went down: no OpenMetrics _sum from now on (render_family);
     * written once, so that the child's line stays shared afterwards */
    if (v < 0 && !atomic_load_explicit(&h->c.went_negative, memory_order_relaxed))
        atomic_store_explicit(&h->c.went_negative, true, memory_order_relaxed);
}

/* ---- names ---- */

static bool name_ok(const char *s, bool metric)
{
    if (!s || !*s)
        return false;
    for (const char *p = s; *p; p++) {
        char c = *p;
        bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || (metric && c == ':');
        if (!alpha && !(p > s && c >= '0' && c <= '9'))
            return false;
    }
    return true;
}

/* Whether s is well-formed UTF-8 (no overlong forms, no surrogates,
 * nothing past U+10FFFF): Prometheus refuses a scrape with anything else
 * in a label value, and OpenMetrics allows only code points. */
bool keel__utf8_ok(const char *s)
{
    for (const unsigned char *p = (const unsigned char *)s; *p;) {
        unsigned c = *p++;
        if (c < 0x80)
            continue;
        size_t n = c >= 0xc2 && c <= 0xdf ? 1 : c >= 0xe0 && c <= 0xef ? 2 : c >= 0xf0 && c <= 0xf4 ? 3 : 0;
        if (n == 0)
            return false;
        unsigned lo = c == 0xe0 ? 0xa0 : c == 0xf0 ? 0x90 : 0x80; /* the second byte's range */
        unsigned hi = c == 0xed ? 0x9f : c == 0xf4 ? 0x8f : 0xbf;
        if (*p < lo || *p > hi)
            return false;
        for (p++; --n; p++)
            if (*p < 0x80 || *p > 0xbf)
                return false;
    }
    return true;
}

static bool label_name_ok(const char *s)
{
    return name_ok(s, false) && strncmp(s, "__", 2) != 0 && strcmp(s, "le") != 0 &&
           strcmp(s, "quantile") != 0;
}

static bool ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

/* Every sample name a family would produce, for collision checks. */
static size_t sample_names(const family *f, char out[][256])
{
    size_t n = 0;
    snprintf(out[n++], 256, "%s", f->om_name);
    if (f->type == KEEL_METRIC_COUNTER) {
        snprintf(out[n++], 256, "%s_total", f->om_name);
        snprintf(out[n++], 256, "%s_created", f->om_name);
    } else if (f->type == KEEL_METRIC_HISTOGRAM) {
        const char *suffix[] = {"_bucket", "_count", "_sum", "_created"};
        for (int i = 0; i < 4; i++)
            snprintf(out[n++], 256, "%s%s", f->name, suffix[i]);
    }
    return n;
}

static bool collides(keel_metrics *m, const family *f)
{
    char a[5][256], b[5][256];
    size_t na = sample_names(f, a);
    for (size_t k = 0; k < m->nfams; k++) {
        size_t nb = sample_names(m->fams[k], b);
        for (size_t i = 0; i < na; i++)
            for (size_t j = 0; j < nb; j++)
                if (strcmp(a[i], b[j]) == 0)
                    return true;
    }
    return false;
}

/* ---- families ---- */

static void family_free(family *f)
{
    if (!f)
        return;
    for (size_t i = 0; i < f->tab_cap; i++) {
        child *c = f->tab[i];
        if (!c)
            continue;
        for (size_t k = 0; k < f->nlabels; k++)
            keel__free(c->values[k]);
        keel__free(c->values);
        keel__free(c);
    }
    keel__free(f->tab);
    for (size_t k = 0; f->labels && k < f->nlabels; k++) /* NULL: out of memory in family_new */
        keel__free(f->labels[k]);
    keel__free(f->labels);
    keel__free(f->bounds);
    keel__free(f->name);
    keel__free(f->om_name);
    keel__free(f->help);
    keel__free(f);
}

static family *family_find(keel_metrics *m, const char *name)
{
    for (size_t i = 0; i < m->nfams; i++)
        if (strcmp(m->fams[i]->name, name) == 0)
            return m->fams[i];
    return NULL;
}

static int family_new(keel_metrics *m, keel_metric_type type, const char *name, const char *help,
                      const char *const *labels, size_t nlabels, const double *bounds,
                      size_t nbounds, bool func, family **out)
{
    if (!m || !out || !name_ok(name, true) || nlabels > MAX_LABELS || (nlabels && !labels) ||
        (type == KEEL_METRIC_COUNTER && (!ends_with(name, "_total") || strcmp(name, "_total") == 0)) ||
        strlen(name) > 200 || (help && !keel__utf8_ok(help)))
        return KEEL_EINVAL;
    for (size_t i = 0; i < nlabels; i++) {
        if (!label_name_ok(labels[i]))
            return KEEL_EINVAL;
        for (size_t k = 0; k < i; k++)
            if (strcmp(labels[i], labels[k]) == 0)
                return KEEL_EINVAL;
    }
    if (type == KEEL_METRIC_HISTOGRAM) {
        if (!bounds && nbounds)
            return KEEL_EINVAL; /* a count of no bounds: a caller's mistake, not the defaults */
        if (!bounds) {
            bounds = default_bounds;
            nbounds = sizeof default_bounds / sizeof default_bounds[0];
        }
        if (nbounds == 0 || nbounds > MAX_BUCKETS)
            return KEEL_EINVAL;
        for (size_t i = 0; i < nbounds; i++)
            if (!isfinite(bounds[i]) || (i && !(bounds[i] > bounds[i - 1])))
                return KEEL_EINVAL;
    }
    family *f = keel__calloc(1, sizeof *f);
    if (!f)
        return KEEL_ENOMEM;
    f->m = m;
    f->type = type;
    f->func = func;
    f->nlabels = nlabels;
    f->name = keel__strdup(name);
    f->help = keel__strdup(help ? help : "");
    f->om_name = keel__strdup(name);
    f->labels = keel__calloc(nlabels ? nlabels : 1, sizeof *f->labels);
    bool ok = f->name && f->help && f->om_name && f->labels;
    for (size_t i = 0; ok && i < nlabels; i++)
        ok = (f->labels[i] = keel__strdup(labels[i])) != NULL;
    if (ok && type == KEEL_METRIC_COUNTER)
        f->om_name[strlen(name) - strlen("_total")] = '\0';
    if (ok && type == KEEL_METRIC_HISTOGRAM) {
        f->nbounds = nbounds;
        ok = (f->bounds = keel__malloc(nbounds * sizeof *f->bounds)) != NULL;
        for (size_t i = 0; ok && i < nbounds; i++) /* a -0 bound is 0: le="0", not "-0" */
            f->bounds[i] = bounds[i] == 0 ? 0 : bounds[i];
    }
    f->width = func ? 0 : type == KEEL_METRIC_COUNTER ? 2 : type == KEEL_METRIC_HISTOGRAM ? f->nbounds + 2 : 0;
    if (!ok) {
        family_free(f);
        return KEEL_ENOMEM;
    }
    pthread_mutex_lock(&m->mu);
    int rc = 0;
    if (family_find(m, name) || collides(m, f)) {
        rc = KEEL_EEXIST;
    } else if (m->nfams == m->fams_cap) {
        size_t ncap = m->fams_cap ? m->fams_cap * 2 : 16;
        family **n = keel__realloc(m->fams, ncap * sizeof *n);
        if (!n)
            rc = KEEL_ENOMEM;
        else {
            m->fams = n;
            m->fams_cap = ncap;
        }
    }
    if (rc == 0)
        m->fams[m->nfams++] = f;
    pthread_mutex_unlock(&m->mu);
    if (rc) {
        family_free(f);
        return rc;
    }
    *out = f;
    return 0;
}

KEEL_API int keel_metrics_counter(keel_metrics *m, const char *name, const char *help,
                                  const char *const *labels, size_t nlabels, keel_counter **out)
{
    return family_new(m, KEEL_METRIC_COUNTER, name, help, labels, nlabels, NULL, 0, false,
                      (family **)out);
}

KEEL_API int keel_metrics_gauge(keel_metrics *m, const char *name, const char *help,
                                const char *const *labels, size_t nlabels, keel_gauge **out)
{
    return family_new(m, KEEL_METRIC_GAUGE, name, help, labels, nlabels, NULL, 0, false,
                      (family **)out);
}

KEEL_API int keel_metrics_histogram(keel_metrics *m, const char *name, const char *help,
                                    const char *const *labels, size_t nlabels,
                                    const double *bounds, size_t nbounds, keel_histogram **out)
{
    return family_new(m, KEEL_METRIC_HISTOGRAM, name, help, labels, nlabels, bounds, nbounds,
                      false, (family **)out);
}

/* ---- children (caller holds m->mu) ---- */

static uint64_t values_hash(const char *const *v, size_t n)
{
    uint64_t h = 0x6d6574726963;
    for (size_t i = 0; i < n; i++)
        h = keel__mix64(h ^ keel__hash64(v[i], strlen(v[i]), i));
    return h;
}

static bool values_eq(const child *c, const char *const *v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(c->values[i], v[i]) != 0)
            return false;
    return true;
}

static child **child_slot(family *f, uint64_t h, const char *const *v)
{
    for (size_t i = h & (f->tab_cap - 1);; i = (i + 1) & (f->tab_cap - 1))
        if (!f->tab[i] || (f->tab[i]->hash == h && values_eq(f->tab[i], v, f->nlabels)))
            return &f->tab[i];
}

static int tab_grow(family *f)
{
    if ((f->nchildren + 1) * 2 <= f->tab_cap)
        return 0;
    size_t cap = f->tab_cap ? f->tab_cap * 2 : 8;
    child **tab = keel__calloc(cap, sizeof *tab);
    if (!tab)
        return KEEL_ENOMEM;
    child **old = f->tab;
    size_t ocap = f->tab_cap;
    f->tab = tab;
    f->tab_cap = cap;
    for (size_t i = 0; i < ocap; i++)
        if (old[i])
            *child_slot(f, old[i]->hash, (const char *const *)old[i]->values) = old[i];
    keel__free(old);
    return 0;
}

/* Backward-shift deletion for the linear probing table. */
static void tab_delete(family *f, child *c)
{
    size_t mask = f->tab_cap - 1, i = c->hash & mask;
    while (f->tab[i] != c)
        i = (i + 1) & mask;
    f->tab[i] = NULL;
    for (size_t j = (i + 1) & mask; f->tab[j]; j = (j + 1) & mask) {
        size_t home = f->tab[j]->hash & mask;
        bool stays = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (!stays) {
            f->tab[i] = f->tab[j];
            f->tab[j] = NULL;
            i = j;
        }
    }
    f->nchildren--;
}

static int slots_reserve(keel_metrics *m, size_t upto)
{
    if (upto <= m->slots_cap)
        return 0;
    size_t cap = m->slots_cap ? m->slots_cap : 1024;
    while (cap < upto)
        cap *= 2;
    uint64_t *r = keel__realloc(m->retired, cap * sizeof *r);
    if (!r)
        return KEEL_ENOMEM;
    m->retired = r;
    unsigned char *k = keel__realloc(m->kind, cap);
    if (!k)
        return KEEL_ENOMEM;
    m->kind = k;
    memset(m->retired + m->slots_cap, 0, (cap - m->slots_cap) * sizeof *r);
    memset(m->kind + m->slots_cap, K_INT, cap - m->slots_cap);
    m->slots_cap = cap;
    return 0;
}

/* A run of `width` slots within one chunk: a removed child's, or new. */
static int slots_take(keel_metrics *m, family *f, size_t *slot, bool *reused)
{
    size_t w = f->width;
    for (size_t i = 0; i < m->nfree; i++)
        if (m->free[i].width == w) {
            *slot = m->free[i].slot;
            m->free[i] = m->free[--m->nfree];
            *reused = true;
            return 0;
        }
    size_t s = m->next_slot;
    if (s % CHUNK + w > CHUNK)
        s += CHUNK - s % CHUNK; /* a run never straddles chunks */
    if (s + w > MAX_SLOTS)
        return KEEL_EFULL;
    int rc = slots_reserve(m, s + w);
    if (rc)
        return rc;
    m->next_slot = s + w;
    *slot = s;
    *reused = false;
    return 0;
}

/* Zeroes a run of a removed child's slots for a new child, in `retired`
 * and in every live thread's block (all of it within one chunk). Caller
 * holds m->mu, which keeps exiting threads from folding their blocks. */
static void slots_zero(keel_metrics *m, size_t slot, size_t width)
{
    memset(m->retired + slot, 0, width * sizeof *m->retired);
    for (block *b = m->blocks; b; b = b->next) {
        word *ch = atomic_load_explicit(&b->dir[slot / CHUNK], memory_order_acquire);
        for (size_t i = 0; ch && i < width; i++)
            atomic_store_explicit(&ch[slot % CHUNK + i], 0, memory_order_relaxed);
    }
}

/* Whether n label values are there, none of them NULL, all UTF-8. */
static bool values_ok(const char *const *values, size_t n)
{
    if (n && !values)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!values[i] || !keel__utf8_ok(values[i]))
            return false;
    return true;
}

/* The child with these label values, made if new. A computed series (fn
 * given) gets fn before it can be seen, and is made only once. With `set`,
 * a gauge's value is stored before the lock goes, so that a remove from
 * another thread cannot free the child first. */
static int child_get(family *f, const char *const *values, size_t n, keel_metrics_value_fn fn, void *ud,
                     const double *set, child **out)
{
    if (!f || n != f->nlabels || !values_ok(values, n) || !out) /* the count first: values has n */
        return KEEL_EINVAL;
    keel_metrics *m = f->m;
    uint64_t h = values_hash(values, n);
    pthread_mutex_lock(&m->mu);
    child *c = f->tab_cap ? *child_slot(f, h, values) : NULL;
    int rc = 0;
    if (c && fn) {
        rc = KEEL_EEXIST;
        c = NULL;
    } else if (!c) {
        if (f->nchildren >= m->max_children)
            rc = KEEL_EFULL;
        else if ((rc = tab_grow(f)) == 0 && !(c = keel__calloc(1, sizeof *c)))
            rc = KEEL_ENOMEM;
        if (rc == 0 && !(c->values = keel__calloc(n ? n : 1, sizeof *c->values)))
            rc = KEEL_ENOMEM;
        for (size_t i = 0; rc == 0 && i < n; i++)
            if (!(c->values[i] = keel__strdup(values[i])))
                rc = KEEL_ENOMEM;
        bool reused = false;
        if (rc == 0 && f->width)
            rc = slots_take(m, f, &c->slot, &reused);
        if (rc == 0 && reused)
            slots_zero(m, c->slot, f->width);
        if (rc == 0) {
            for (size_t i = 0; i < f->width; i++) /* the sums are doubles */
                m->kind[c->slot + i] = (f->type == KEEL_METRIC_COUNTER ? i == 1 : i == f->width - 1)
                                           ? K_DBL : K_INT;
            c->m = m;
            c->fam = f;
            c->hash = h;
            c->fn = fn;
            c->ud = ud;
            uint64_t ns = keel__clock_now(&m->wall);
            c->created = (double)(ns / 1000000000u) + (double)(ns % 1000000000u) / 1e9;
            *child_slot(f, h, values) = c;
            f->nchildren++;
        } else if (c) {
            for (size_t i = 0; c->values && i < n; i++)
                keel__free(c->values[i]);
            keel__free(c->values);
            keel__free(c);
            c = NULL;
        }
    }
    if (c && set)
        atomic_store_explicit(&c->gauge, d_bits(*set), memory_order_relaxed);
    pthread_mutex_unlock(&m->mu);
    *out = c;
    return rc;
}

static int child_remove(family *f, const char *const *values, size_t n)
{
    if (!f || n != f->nlabels || !values_ok(values, n))
        return KEEL_EINVAL;
    keel_metrics *m = f->m;
    pthread_mutex_lock(&m->mu);
    child *c = f->tab_cap ? *child_slot(f, values_hash(values, n), values) : NULL;
    int rc = c ? 0 : KEEL_ENOTFOUND;
    if (c && f->width && m->nfree == m->free_cap) { /* room to keep its slots */
        size_t cap = m->free_cap ? 2 * m->free_cap : 16;
        freeslot *fs = keel__realloc(m->free, cap * sizeof *fs);
        if (fs) {
            m->free = fs;
            m->free_cap = cap;
        } else {
            rc = KEEL_ENOMEM;
        }
    }
    if (rc == 0) {
        if (f->width)
            m->free[m->nfree++] = (freeslot){c->slot, f->width};
        tab_delete(f, c);
        for (size_t i = 0; i < n; i++)
            keel__free(c->values[i]);
        keel__free(c->values);
        keel__free(c);
    }
    pthread_mutex_unlock(&m->mu);
    return rc;
}

KEEL_API int keel_counter_get(keel_counter *c, const char *const *v, size_t n, keel_counter_child **out)
{
    return child_get(c ? &c->f : NULL, v, n, NULL, NULL, NULL, (child **)out);
}
KEEL_API int keel_gauge_get(keel_gauge *g, const char *const *v, size_t n, keel_gauge_child **out)
{
    return child_get(g ? &g->f : NULL, v, n, NULL, NULL, NULL, (child **)out);
}
KEEL_API int keel_histogram_get(keel_histogram *h, const char *const *v, size_t n,
                                keel_histogram_child **out)
{
    return child_get(h ? &h->f : NULL, v, n, NULL, NULL, NULL, (child **)out);
}
KEEL_API int keel_counter_remove(keel_counter *c, const char *const *v, size_t n)
{
    return child_remove(c ? &c->f : NULL, v, n);
}
KEEL_API int keel_gauge_remove(keel_gauge *g, const char *const *v, size_t n)
{
    return child_remove(g ? &g->f : NULL, v, n);
}
KEEL_API int keel_histogram_remove(keel_histogram *h, const char *const *v, size_t n)
{
    return child_remove(h ? &h->f : NULL, v, n);
}

static child *child_with(family *f, va_list ap)
{
    if (!f)
        return NULL;
    const char *v[MAX_LABELS];
    for (size_t i = 0; i < f->nlabels; i++)
        v[i] = va_arg(ap, const char *);
    child *c = NULL;
    child_get(f, v, f->nlabels, NULL, NULL, NULL, &c);
    return c;
}

#define WITH(type, fam)                                                                            \
    KEEL_API type##_child *type##_with(type *x, ...)                                               \
    {                                                                                              \
        va_list ap;                                                                                \
        va_start(ap, x);                                                                           \
        child *c = child_with(x ? &x->f : NULL, ap);                                               \
        va_end(ap);                                                                                \
        return (type##_child *)c;                                                                  \
    }
WITH(keel_counter, f)
WITH(keel_gauge, f)
WITH(keel_histogram, f)
#undef WITH

/* ---- series computed at render time ---- */

KEEL_API int keel_metrics_func(keel_metrics *m, keel_metric_type type, const char *name,
                               const char *help, const char *const *label_names,
                               const char *const *label_values, size_t nlabels,
                               keel_metrics_value_fn fn, void *ud)
{
    if (!m || !fn || !name || (type != KEEL_METRIC_COUNTER && type != KEEL_METRIC_GAUGE) ||
        !values_ok(label_values, nlabels))
        return KEEL_EINVAL;
    pthread_mutex_lock(&m->mu);
    family *f = family_find(m, name);
    pthread_mutex_unlock(&m->mu);
    int rc = 0;
    if (!f) {
        rc = family_new(m, type, name, help, label_names, nlabels, NULL, 0, true, &f);
        if (rc == KEEL_EEXIST) { /* another thread made it meanwhile */
            pthread_mutex_lock(&m->mu);
            f = family_find(m, name);
            pthread_mutex_unlock(&m->mu);
            rc = f ? 0 : KEEL_EEXIST;
        }
        if (rc)
            return rc;
    }
    if (!f->func || f->type != type || f->nlabels != nlabels)
        return KEEL_EEXIST;
    for (size_t i = 0; i < nlabels; i++)
        if (!label_names || !label_names[i] || strcmp(f->labels[i], label_names[i]) != 0)
            return KEEL_EEXIST;
    child *c;
    return child_get(f, label_values, nlabels, fn, ud, NULL, &c);
}

KEEL_API void keel_metrics_func_remove(keel_metrics *m, void *ud)
{
    if (!m)
        return;
    pthread_mutex_lock(&m->mu);
    for (size_t k = 0; k < m->nfams; k++) {
        family *f = m->fams[k];
        if (!f->func)
            continue;
        for (size_t i = 0; i < f->tab_cap;) {
            child *c = f->tab[i];
            if (c && c->ud == ud) {
                tab_delete(f, c); /* may move a later entry into i: look again */
                for (size_t j = 0; j < f->nlabels; j++)
                    keel__free(c->values[j]);
                keel__free(c->values);
                keel__free(c);
            } else {
                i++;
            }
        }
    }
    pthread_mutex_unlock(&m->mu);
}

int keel__metrics_gauge_shared(keel_metrics *m, const char *name, const char *help,
                               const char *const *labels, size_t nlabels, keel_gauge **out)
{
    int rc = family_new(m, KEEL_METRIC_GAUGE, name, help, labels, nlabels, NULL, 0, false,
                        (family **)out);
    if (rc != KEEL_EEXIST)
        return rc;
    pthread_mutex_lock(&m->mu);
    family *f = family_find(m, name);
    bool same = f && f->type == KEEL_METRIC_GAUGE && !f->func && f->nlabels == nlabels;
    for (size_t i = 0; same && i < nlabels; i++)
        same = strcmp(f->labels[i], labels[i]) == 0;
    pthread_mutex_unlock(&m->mu);
    if (!same)
        return KEEL_EEXIST;
    *out = (keel_gauge *)f;
    return 0;
}

int keel__metrics_type(keel_metrics *m, const char *name)
{
    pthread_mutex_lock(&m->mu);
    family *f = family_find(m, name);
    int t = f ? (int)f->type : -1;
    pthread_mutex_unlock(&m->mu);
    return t;
}

int keel__gauge_put(struct keel_gauge *g, const char *const *values, size_t n, double v)
{
    child *c;
    return child_get(g ? &g->f : NULL, values, n, NULL, NULL, &v, &c);
}

int keel__metrics_funcs(keel_metrics *m, const char *inst_label, const char *inst_value,
                        const keel__mfunc *fs, size_t n, void *ud)
{
    if (!m)
        return 0;
    for (size_t i = 0; i < n; i++) {
        const char *names[2] = {inst_label, fs[i].label};
        const char *values[2] = {inst_value ? inst_value : "default", fs[i].value};
        int rc = keel_metrics_func(m, (keel_metric_type)fs[i].type, fs[i].name, fs[i].help, names,
                                   values, fs[i].label ? 2 : 1, fs[i].fn, ud);
        if (rc) {
            keel_metrics_func_remove(m, ud);
            return rc;
        }
    }
    return 0;
}

/* ---- reading (caller holds m->mu) ---- */

static int cmp_family(const void *a, const void *b)
{
    return strcmp((*(family *const *)a)->name, (*(family *const *)b)->name);
}

static int cmp_child(const void *a, const void *b, void *ud)
{
    const child *x = *(child *const *)a, *y = *(child *const *)b;
    size_t n = *(size_t *)ud;
    for (size_t i = 0; i < n; i++) {
        int r = strcmp(x->values[i], y->values[i]);
        if (r)
            return r;
    }
    return 0;
}

/* Families in name order and each one's children in label order. */
static int sorted(keel_metrics *m, family ***fams, child ****kids)
{
    *fams = keel__malloc((m->nfams ? m->nfams : 1) * sizeof **fams);
    *kids = keel__calloc(m->nfams ? m->nfams : 1, sizeof **kids);
    if (!*fams || !*kids)
        return KEEL_ENOMEM;
    if (m->nfams) /* m->fams is NULL in an empty registry */
        memcpy(*fams, m->fams, m->nfams * sizeof **fams);
    qsort(*fams, m->nfams, sizeof **fams, cmp_family);
    for (size_t k = 0; k < m->nfams; k++) {
        family *f = (*fams)[k];
        child **cs = keel__malloc((f->nchildren ? f->nchildren : 1) * sizeof *cs);
        if (!cs)
            return KEEL_ENOMEM;
        size_t n = 0;
        for (size_t i = 0; i < f->tab_cap; i++)
            if (f->tab[i])
                cs[n++] = f->tab[i];
        qsort_r(cs, n, sizeof *cs, cmp_child, &f->nlabels);
        (*kids)[k] = cs;
    }
    return 0;
}

static void sorted_free(keel_metrics *m, family **fams, child ***kids)
{
    for (size_t k = 0; kids && k < m->nfams; k++)
        keel__free(kids[k]);
    keel__free(kids);
    keel__free(fams);
}

/* A child's value (counter, gauge) or sum (histogram), with its bucket
 * counts made cumulative into cum[] (nbounds + 1 of them). */
static double child_value(keel_metrics *m, const family *f, const child *c, uint64_t *cum,
                          uint64_t *count)
{
    if (c->fn)
        return c->fn(c->ud);
    if (f->type == KEEL_METRIC_GAUGE)
        return bits_d(atomic_load_explicit(&c->gauge, memory_order_relaxed));
    uint64_t raw[MAX_BUCKETS + 2];
    for (size_t i = 0; i < f->width; i++)
        raw[i] = slot_sum(m, c->slot + i);
    if (f->type == KEEL_METRIC_COUNTER)
        return (double)raw[0] + bits_d(raw[1]);
    uint64_t run = 0;
    for (size_t i = 0; i <= f->nbounds; i++)
        cum[i] = run += raw[i];
    *count = run; /* +Inf == _count by construction */
    return bits_d(raw[f->nbounds + 1]);
}

KEEL_API int keel_metrics_visit(keel_metrics *m, keel_metrics_visit_fn fn, void *ud)
{
    if (!m || !fn)
        return KEEL_EINVAL;
    pthread_mutex_lock(&m->mu);
    family **fams;
    child ***kids;
    int rc = sorted(m, &fams, &kids);
    double bounds[MAX_BUCKETS + 1];
    uint64_t cum[MAX_BUCKETS + 1];
    for (size_t k = 0; rc == 0 && k < m->nfams; k++) {
        family *f = fams[k];
        if (f->nbounds)
            memcpy(bounds, f->bounds, f->nbounds * sizeof *bounds);
        bounds[f->nbounds] = INFINITY;
        for (size_t i = 0; i < f->nchildren; i++) {
            child *c = kids[k][i];
            keel_metrics_sample s = {f->name, f->type, f->nlabels, (const char *const *)f->labels,
                                     (const char *const *)c->values};
            s.value = child_value(m, f, c, cum, &s.count);
            s.created = c->created;
            if (f->type == KEEL_METRIC_HISTOGRAM) {
                s.nbuckets = f->nbounds + 1;
                s.bounds = bounds;
                s.cumulative = cum;
            }
            fn(&s, ud);
        }
    }
    sorted_free(m, fams, kids);
    pthread_mutex_unlock(&m->mu);
    return rc;
}

/* ---- exposition ---- */

/* Past a token, or a quoted string with its escapes, of an Accept header;
 * *open is set when a quoted string runs to the end unterminated. */
static const char *accept_word(const char *p, bool *open)
{
    if (*p != '"') {
        while (*p && !strchr(",;= \t\"", *p))
            p++;
        return p;
    }
    for (p++; *p && *p != '"'; p++)
        if (*p == '\\' && p[1])
            p++;
    if (!*p)
        *open = true;
    return *p ? p + 1 : p;
}

/* RFC 9110 12.4.2's qvalue: ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] ).
 * Anything else (2, 1e999, nan, 0x1) is no weight. */
static bool accept_q(const char *v, double *q)
{
    if (v[0] != '0' && v[0] != '1')
        return false;
    bool dot = v[1] == '.';
    size_t n = dot ? strspn(v + 2, v[0] == '1' ? "0" : "0123456789") : 0;
    if (n > 3 || v[dot ? 2 + n : 1] != '\0')
        return false;
    *q = keel__strtod(v, NULL);
    return true;
}

static const char *accept_ows(const char *p)
{
    while (*p == ' ' || *p == '\t')
        p++;
    return p;
}

static bool accept_is(const char *type, const char *end, const char *name)
{
    return (size_t)(end - type) == strlen(name) && strncasecmp(type, name, (size_t)(end - type)) == 0;
}

/* A parameter value [v, end) into buf, unquoted and unescaped if it is a
 * quoted string; one too long for buf reads as "?", which is no q and no
 * version. */
static void accept_value(const char *v, const char *end, char *buf, size_t size)
{
    bool quoted = v < end && *v == '"';
    if (quoted) {
        v++;
        if (end > v && end[-1] == '"')
            end--;
    }
    size_t n = 0;
    for (; v < end; v++) {
        if (quoted && *v == '\\' && v + 1 < end)
            v++;
        if (n + 1 == size) {
            snprintf(buf, size, "?");
            return;
        }
        buf[n++] = *v;
    }
    buf[n] = '\0';
}

/* Media ranges are split at commas outside quoted strings; the type and
 * parameter names are case-insensitive (RFC 9110 8.3.1, 12.4.2), and
 * parameter values may be quoted strings. A range with a weight that is
 * no qvalue, or with a quoted string left open, is malformed: it names
 * neither format, whatever it says. The format whose media type has
 * the highest q wins, the first named at equal q; wildcards name neither,
 * nor does OpenMetrics of a version other than 1.0.0 or 0.0.1 (as
 * client_golang has it: keel writes 1.0.0, which 0.0.1 readers read). */
KEEL_API keel_metrics_format keel_metrics_negotiate(const char *accept)
{
    keel_metrics_format f = KEEL_METRICS_PROMETHEUS;
    double best = 0;
    for (const char *p = accept; p && *p;) {
        p = accept_ows(p);
        const char *type = p;
        bool bad = false;
        p = accept_word(p, &bad);
        bool is_om = accept_is(type, p, "application/openmetrics-text");
        bool is_text = accept_is(type, p, "text/plain");
        double q = 1;
        while (*p && *p != ',') {
            if (*p != ';') { /* whitespace, stray text; a quoted string whole */
                p = *p == '"' ? accept_word(p, &bad) : p + 1;
                continue;
            }
            const char *name = accept_ows(p + 1);
            p = accept_word(name, &bad);
            bool is_q = accept_is(name, p, "q"), is_version = accept_is(name, p, "version");
            p = accept_ows(p);
            if (*p != '=')
                continue;
            const char *value = accept_ows(p + 1);
            p = accept_word(value, &bad);
            char v[64];
            accept_value(value, p, v, sizeof v);
            if (is_q && !accept_q(v, &q))
                bad = true;
            else if (is_version && is_om && strcmp(v, "1.0.0") != 0 && strcmp(v, "0.0.1") != 0 && *v)
                is_om = false;
        }
        if (!bad && (is_om || is_text) && q > best) {
            best = q;
            f = is_om ? KEEL_METRICS_OPENMETRICS : KEEL_METRICS_PROMETHEUS;
        }
        if (*p == ',')
            p++;
    }
    return f;
}

KEEL_API const char *keel_metrics_content_type(keel_metrics_format f)
{
    return f == KEEL_METRICS_OPENMETRICS ? "application/openmetrics-text; version=1.0.0; charset=utf-8"
                                         : "text/plain; version=0.0.4; charset=utf-8";
}

/* The exposition being built: one NUL-terminated buffer. */
typedef struct sink {
    char *p;
    size_t len, cap;
    int rc; /* KEEL_ENOMEM once a growth failed */
} sink;

static void put(sink *o, const char *s, size_t n)
{
    if (o->rc)
        return;
    if (o->len + n + 1 > o->cap) {
        size_t cap = o->cap ? o->cap : 16384;
        while (cap < o->len + n + 1)
            cap *= 2;
        char *p = keel__realloc(o->p, cap);
        if (!p) {
            o->rc = KEEL_ENOMEM;
            return;
        }
        o->p = p;
        o->cap = cap;
    }
    memcpy(o->p + o->len, s, n);
    o->len += n;
    o->p[o->len] = '\0';
}

static void puts_(sink *o, const char *s) { put(o, s, strlen(s)); }

/* Backslash and newline always; double quotes in label values, and in
 * OpenMetrics help texts too. */
static void put_escaped(sink *o, const char *s, bool quotes)
{
    for (const char *p = s; *p; p++) {
        if (*p == '\\')
            put(o, "\\\\", 2);
        else if (*p == '\n')
            put(o, "\\n", 2);
        else if (*p == '"' && quotes)
            put(o, "\\\"", 2);
        else
            put(o, p, 1);
    }
}

/* The shortest decimal that reads back as v, laid out as Go's %g (what the
 * Prometheus clients print): exponent form below 1e-4 and from 1e6 up.
 * OpenMetrics `le` values get ".0" when they would look like integers. */
static void fmt_number(double v, char *buf, size_t size, bool om_canonical)
{
    if (v != v) {
        snprintf(buf, size, "NaN");
        return;
    }
    if (isinf(v)) {
        snprintf(buf, size, v > 0 ? "+Inf" : "-Inf");
        return;
    }
    if (v == 0) { /* -0 keeps its sign, as Go's %g: it must read back as -0 */
        snprintf(buf, size, "%s%s", signbit(v) ? "-" : "", om_canonical ? "0.0" : "0");
        return;
    }
    char e[40];
    int p;
    for (p = 1; p <= 17; p++) {
        keel__snprintf_c(e, sizeof e, "%.*e", p - 1, v);
        if (keel__strtod(e, NULL) == v)
            break;
    }
    int exp = atoi(strchr(e, 'e') + 1);
    if (exp < -4 || exp >= 6)
        snprintf(buf, size, "%s", e);
    else
        keel__snprintf_c(buf, size, "%.*f", p - 1 - exp > 0 ? p - 1 - exp : 0, v);
    if (om_canonical && !strpbrk(buf, ".e"))
        strncat(buf, ".0", size - strlen(buf) - 1);
}

static void put_number(sink *o, double v)
{
    char b[64];
    fmt_number(v, b, sizeof b, false);
    puts_(o, b);
}

/* A timestamp in seconds, in fixed notation (OpenMetrics asks for it), to
 * the microsecond, trailing zeros dropped. */
static void put_timestamp(sink *o, double v)
{
    char b[64];
    keel__snprintf_c(b, sizeof b, "%.6f", v);
    size_t n = strlen(b);
    while (b[n - 1] == '0')
        b[--n] = '\0';
    if (b[n - 1] == '.')
        b[--n] = '\0';
    puts_(o, b);
}

/* name{labels[,extra="value"]} value\n */
static void put_sample(sink *o, const char *name, const char *suffix, const family *f,
                       const child *c, const char *extra, const char *extra_value, double v)
{
    bool timestamp = strcmp(suffix, "_created") == 0;
    puts_(o, name);
    puts_(o, suffix);
    if (f->nlabels || extra) {
        put(o, "{", 1);
        for (size_t i = 0; i < f->nlabels; i++) {
            if (i)
                put(o, ",", 1);
            puts_(o, f->labels[i]);
            put(o, "=\"", 2);
            put_escaped(o, c->values[i], true);
            put(o, "\"", 1);
        }
        if (extra) {
            if (f->nlabels)
                put(o, ",", 1);
            puts_(o, extra);
            put(o, "=\"", 2);
            puts_(o, extra_value);
            put(o, "\"", 1);
        }
        put(o, "}", 1);
    }
    put(o, " ", 1);
    if (timestamp)
        put_timestamp(o, v);
    else
        put_number(o, v);
    put(o, "\n", 1);
}

static void render_family(sink *o, keel_metrics *m, const family *f, child **cs, bool om)
{
    static const char *types[] = {"counter", "gauge", "histogram"};
    const char *fname = om ? f->om_name : f->name;
    if (om) { /* OpenMetrics: TYPE, then HELP */
        puts_(o, "# TYPE ");
        puts_(o, fname);
        put(o, " ", 1);
        puts_(o, types[f->type]);
        put(o, "\n", 1);
    }
    if (f->help[0]) {
        puts_(o, "# HELP ");
        puts_(o, fname);
        put(o, " ", 1);
        put_escaped(o, f->help, om);
        put(o, "\n", 1);
    }
    if (!om) {
        puts_(o, "# TYPE ");
        puts_(o, fname);
        put(o, " ", 1);
        puts_(o, types[f->type]);
        put(o, "\n", 1);
    }
    uint64_t cum[MAX_BUCKETS + 1], count = 0;
    for (size_t i = 0; i < f->nchildren; i++) {
        const child *c = cs[i];
        double v = child_value(m, f, c, cum, &count);
        if (f->type == KEEL_METRIC_GAUGE) {
            put_sample(o, f->name, "", f, c, NULL, NULL, v);
        } else if (f->type == KEEL_METRIC_COUNTER) {
            put_sample(o, f->om_name, "_total", f, c, NULL, NULL, v);
            if (om && !c->fn)
                put_sample(o, f->om_name, "_created", f, c, NULL, NULL, c->created);
        } else {
            char le[64];
            for (size_t b = 0; b <= f->nbounds; b++) {
                if (b < f->nbounds)
                    fmt_number(f->bounds[b], le, sizeof le, om);
                else
                    snprintf(le, sizeof le, "+Inf");
                put_sample(o, f->name, "_bucket", f, c, "le", le, (double)cum[b]);
            }
            /* OpenMetrics: with a negative bucket bound the sum is no
             * counter, and must not be exposed, nor once a negative
             * observation made it go down (for good: a counter that went
             * down once is none), nor a NaN one; _count goes with it, as
             * OpenMetrics has _count if and only if _sum */
            bool sum_counts = (!f->nbounds || f->bounds[0] >= 0) && v >= 0 &&
                              !atomic_load_explicit(&c->went_negative, memory_order_relaxed);
            if (!om || sum_counts) {
                put_sample(o, f->name, "_count", f, c, NULL, NULL, (double)count);
                put_sample(o, f->name, "_sum", f, c, NULL, NULL, v);
            }
            if (om)
                put_sample(o, f->name, "_created", f, c, NULL, NULL, c->created);
        }
    }
}

/* The whole exposition into o (NUL-terminated, "" for an empty registry),
 * under the registry's lock, which is held no longer than the rendering:
 * the caller's writer, however slow, runs after. */
static int render_mem(keel_metrics *m, keel_metrics_format fmt, sink *o)
{
    if (!m || (unsigned)fmt > KEEL_METRICS_OPENMETRICS)
        return KEEL_EINVAL;
    pthread_mutex_lock(&m->mu);
    family **fams;
    child ***kids;
    int rc = sorted(m, &fams, &kids);
    for (size_t k = 0; rc == 0 && k < m->nfams && o->rc == 0; k++)
        render_family(o, m, fams[k], kids[k], fmt == KEEL_METRICS_OPENMETRICS);
    sorted_free(m, fams, kids);
    pthread_mutex_unlock(&m->mu);
    if (fmt == KEEL_METRICS_OPENMETRICS)
        puts_(o, "# EOF\n");
    put(o, "", 0); /* an empty registry renders "" */
    rc = rc ? rc : o->rc;
    if (rc) {
        keel__free(o->p);
        o->p = NULL;
    }
    return rc;
}

KEEL_API int keel_metrics_render(keel_metrics *m, keel_metrics_format fmt, keel_metrics_write_fn write,
                                 void *ud)
{
    if (!write)
        return KEEL_EINVAL;
    sink b = {0};
    int rc = render_mem(m, fmt, &b);
    for (size_t at = 0; rc == 0 && at < b.len; at += 16384) /* pieces a socket takes well */
        rc = write(b.p + at, b.len - at < 16384 ? b.len - at : 16384, ud);
    keel__free(b.p);
    return rc;
}

KEEL_API int keel_metrics_render_buf(keel_metrics *m, keel_metrics_format f, char **out_, size_t *len)
{
    if (!out_)
        return KEEL_EINVAL;
    sink b = {0};
    int rc = render_mem(m, f, &b);
    if (rc)
        return rc;
    *out_ = b.p;
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

KEEL_API int keel_metrics_create(keel_metrics **out, const keel_metrics_opts *given)
{
    static const keel_metrics_opts defaults;
    const keel_metrics_opts *opts = given ? given : &defaults;
    if (!out)
        return KEEL_EINVAL;
    keel_metrics *m = keel__calloc(1, sizeof *m);
    if (!m)
        return KEEL_ENOMEM;
    m->max_children = opts->max_children ? opts->max_children : 10000;
    m->wall = (keel__clock){opts->wall_clock ? opts->wall_clock : wall_ns, opts->clock_ud};
    m->owner.thread_exit = block_exit;
    pthread_mutex_init(&m->mu, NULL);
    int rc = keel__towner_register(&m->owner);
    if (rc) {
        pthread_mutex_destroy(&m->mu);
        keel__free(m);
        return rc;
    }
    *out = m;
    return 0;
}

static void detach_blocks(void *ud)
{
    keel_metrics *m = ud;
    m->blocks = NULL; /* their threads free them */
}

KEEL_API void keel_metrics_destroy(keel_metrics *m)
{
    if (!m)
        return;
    keel__towner_unregister(&m->owner, detach_blocks, m);
    keel__tslot_drop(&m->owner);
    for (size_t k = 0; k < m->nfams; k++)
        family_free(m->fams[k]);
    keel__free(m->fams);
    keel__free(m->retired);
    keel__free(m->kind);
    keel__free(m->free);
    pthread_mutex_destroy(&m->mu);
    keel__free(m);
}
