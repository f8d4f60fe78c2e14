/* lib/cqrs/cqrs.c — keel_cqrs: handlers, middleware, dispatch, the
 * handler context, the in-memory store and projections.
 *
 * The in-memory store is a log of events (position = index + 1) and a
 * table of streams, each the positions of its events, under one mutex:
 * appends are serialized, so positions follow commit order as with the
 * PostgreSQL store's append lock. An event, once appended, never moves
 * or goes away until destroy, so handlers may hold pointers into it.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <keel/bus.h>
#include <keel/metrics.h>
#include <keel/pg.h>

#include "../hash.h"
#include "cqrs_int.h"

#define MAX_LINKS 32

typedef struct chandler {
    char *name;
    int kind;
    keel_cqrs_handler fn;
    void *ud;
    struct chandler *next;
} chandler;

typedef struct clink {
    unsigned kinds;
    keel_cqrs_middleware fn;
    void *ud;
} clink;

typedef struct mstream {
    char *id;
    uint64_t h;
    uint64_t *pos; /* positions of its events, by version */
    size_t n, cap;
    struct mstream *next;
} mstream;

typedef struct mkv { /* idempotency replies and checkpoints */
    char *key;
    uint64_t h;
    void *val;
    size_t len;
    uint64_t pos;
    struct mkv *next;
} mkv;

typedef struct mstore {
    pthread_mutex_t mu;
    keel_cqrs_event *log;
    size_t n, cap;
    mstream **streams; /* chained, grown at a load of 1 */
    size_t scap, scount;
    mkv **idem;
    size_t icap, icount;
    mkv *checkpoints; /* pos: the checkpoint; len: 1 while a run has it */
    pthread_cond_t cp_cv;
    uint64_t seed; /* the tables' hash seed: stream ids and keys come from clients */
} mstore;

struct keel_cqrs {
    keel_cqrs_opts o;
    char *prefix, *subject_prefix;
    pthread_rwlock_t lock; /* handlers */
    chandler *handlers[256];
    pthread_mutex_t links_mu;
    clink links[MAX_LINKS];
    _Atomic size_t nlinks;
    mstore *mem;
    cpg *pg;
    struct {
        _Atomic uint64_t commands, queries, conflicts, retries, repeats, appended, published, applied, failed;
    } st;
};

struct keel_cqrs_req {
    keel_cqrs *c;
    keel_cqrs_kind kind;
    const char *name;
    const void *payload;
    size_t len;
    const char *key;
    uint64_t after_lsn;
    chandler *h;
    size_t next_link, nlinks;
    keel_cqrs_result *res;
};

static uint64_t wall_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void *dup_bytes(const void *p, size_t n)
{
    void *d = keel__malloc(n ? n : 1);
    if (d && n)
        memcpy(d, p, n);
    return d;
}

static bool good_name(const char *s, size_t max)
{
    if (!s)
        return false;
    size_t n = strnlen(s, max + 1);
    return n > 0 && n <= max;
}

/* ---- the in-memory store ---- */

/* Doubles a chained table when it holds as many entries as buckets (the
 * entries keep their hash in `h`, so moving them needs no rehashing). */
#define GROW(type, tab, cap, count)                                                                \
    do {                                                                                           \
        if ((count) < (cap))                                                                       \
            break;                                                                                 \
        size_t ncap = (cap) ? (cap) * 2 : 64;                                                      \
        type **nt = keel__calloc(ncap, sizeof *nt);                                                \
        if (!nt)                                                                                   \
            break; /* longer chains, still correct */                                              \
        for (size_t b_ = 0; b_ < (cap); b_++)                                                      \
            for (type *e_ = (tab)[b_], *n_; e_; e_ = n_) {                                         \
                n_ = e_->next;                                                                     \
                e_->next = nt[e_->h & (ncap - 1)];                                                 \
                nt[e_->h & (ncap - 1)] = e_;                                                       \
            }                                                                                      \
        keel__free(tab);                                                                           \
        (tab) = nt;                                                                                \
        (cap) = ncap;                                                                              \
    } while (0)

static mstream *mem_stream(mstore *m, const char *id, bool create)
{
    uint64_t h = keel__hash64(id, strlen(id), m->seed);
    for (mstream *s = m->scap ? m->streams[h & (m->scap - 1)] : NULL; s; s = s->next)
        if (s->h == h && strcmp(s->id, id) == 0)
            return s;
    if (!create)
        return NULL;
    GROW(mstream, m->streams, m->scap, m->scount);
    mstream *s = m->scap ? keel__calloc(1, sizeof *s) : NULL;
    if (!s || !(s->id = keel__strdup(id))) {
        keel__free(s);
        return NULL;
    }
    s->h = h;
    s->next = m->streams[h & (m->scap - 1)];
    m->streams[h & (m->scap - 1)] = s;
    m->scount++;
    return s;
}

/* The slot of an idempotency key: where it is, or where it would go. */
static mkv **mem_idem(mstore *m, const char *key, uint64_t *hash)
{
    static mkv *none;
    uint64_t h = keel__hash64(key, strlen(key), m->seed);
    *hash = h;
    if (!m->icap)
        return &none;
    mkv **pp = &m->idem[h & (m->icap - 1)];
    while (*pp && ((*pp)->h != h || strcmp((*pp)->key, key) != 0))
        pp = &(*pp)->next;
    return pp;
}

static mkv **mem_kv(mkv **head, const char *key)
{
    mkv **pp = head;
    while (*pp && strcmp((*pp)->key, key) != 0)
        pp = &(*pp)->next;
    return pp;
}

static int mem_load(mstore *m, const char *id, keel_cqrs_event **evs, size_t *n)
{
    pthread_mutex_lock(&m->mu);
    mstream *s = mem_stream(m, id, false);
    size_t k = s ? s->n : 0;
    keel_cqrs_event *out = keel__malloc((k ? k : 1) * sizeof *out);
    if (out)
        for (size_t i = 0; i < k; i++)
            out[i] = m->log[s->pos[i] - 1];
    pthread_mutex_unlock(&m->mu);
    if (!out)
        return KEEL_ENOMEM;
    *evs = out;
    *n = k;
    return 0;
}

static int mem_append(mstore *m, const cappend *a, cappended *out)
{
    pthread_mutex_lock(&m->mu);
    int rc = 0;
    uint64_t ih = 0;
    if (a->key && *mem_idem(m, a->key, &ih))
        rc = KEEL_EEXIST;
    for (size_t i = 0; rc == 0 && i < a->nev; i++) { /* each stream's first event: right after what is there */
        bool first = true;
        for (size_t j = 0; j < i && first; j++)
            first = strcmp(a->ev[j].stream, a->ev[i].stream) != 0;
        mstream *s = mem_stream(m, a->ev[i].stream, false);
        if (first && (s ? s->n : 0) + 1 != a->ev[i].version)
            rc = KEEL_ECONFLICT;
    }
    if (rc == 0 && m->n + a->nev > m->cap) {
        size_t cap = m->cap ? m->cap : 1024;
        while (cap < m->n + a->nev)
            cap *= 2;
        keel_cqrs_event *nl = keel__realloc(m->log, cap * sizeof *nl);
        if (nl) {
            m->log = nl;
            m->cap = cap;
        } else {
            rc = KEEL_ENOMEM;
        }
    }
    /* Everything that can fail, first: the copies and the streams' room. */
    keel_cqrs_event *made = rc ? NULL : keel__calloc(a->nev ? a->nev : 1, sizeof *made);
    if (!rc && !made)
        rc = KEEL_ENOMEM;
    for (size_t i = 0; rc == 0 && i < a->nev; i++) {
        const cpending *p = &a->ev[i];
        mstream *s = mem_stream(m, p->stream, true);
        if (!s) {
            rc = KEEL_ENOMEM;
            break;
        }
        if (s->n + a->nev > s->cap) {
            size_t cap = s->cap ? s->cap * 2 : 8;
            while (cap < s->n + a->nev)
                cap *= 2;
            uint64_t *np = keel__realloc(s->pos, cap * sizeof *np);
            if (!np) {
                rc = KEEL_ENOMEM;
                break;
            }
            s->pos = np;
            s->cap = cap;
        }
        keel_cqrs_event *e = &made[i];
        e->stream = s->id;
        e->version = p->version;
        e->len = p->len;
        e->meta_len = p->meta_len;
        if (!(e->type = keel__strdup(p->type)) || !(e->data = dup_bytes(p->data, p->len)) ||
            !(e->meta = dup_bytes(p->meta, p->meta_len)))
            rc = KEEL_ENOMEM;
    }
    mkv *kv = NULL;
    if (rc == 0 && a->key) {
        GROW(mkv, m->idem, m->icap, m->icount);
        if (!m->icap)
            rc = KEEL_ENOMEM;
    }
    if (rc == 0 && a->key) {
        kv = keel__calloc(1, sizeof *kv);
        if (!kv || !(kv->key = keel__strdup(a->key)) || !(kv->val = dup_bytes(a->reply, a->reply_len))) {
            if (kv)
                keel__free(kv->key);
            keel__free(kv);
            rc = KEEL_ENOMEM;
        }
    }
    if (rc) {
        for (size_t i = 0; made && i < a->nev; i++) {
            keel__free((void *)made[i].type);
            keel__free((void *)made[i].data);
            keel__free((void *)made[i].meta);
        }
        keel__free(made);
        pthread_mutex_unlock(&m->mu);
        return rc;
    }
    uint64_t now = wall_ns();
    for (size_t i = 0; i < a->nev; i++) {
        mstream *s = mem_stream(m, a->ev[i].stream, false);
        made[i].position = m->n + 1;
        made[i].time_ns = now;
        m->log[m->n++] = made[i];
        s->pos[s->n++] = made[i].position;
        out->positions[i] = made[i].position;
        out->times[i] = now;
    }
    keel__free(made);
    if (kv) {
        kv->len = a->reply_len;
        kv->h = ih;
        kv->next = m->idem[ih & (m->icap - 1)];
        m->idem[ih & (m->icap - 1)] = kv;
        m->icount++;
    }
    pthread_mutex_unlock(&m->mu);
    return 0;
}

static int mem_idem_get(mstore *m, const char *key, void **reply, size_t *len)
{
    pthread_mutex_lock(&m->mu);
    uint64_t h;
    mkv *kv = *mem_idem(m, key, &h);
    int rc = kv ? 0 : KEEL_ENOTFOUND;
    *reply = NULL; /* empty: NULL */
    if (kv && kv->len && !(*reply = dup_bytes(kv->val, kv->len)))
        rc = KEEL_ENOMEM;
    if (kv)
        *len = kv->len;
    pthread_mutex_unlock(&m->mu);
    return rc;
}

static void mem_free(mstore *m)
{
    if (!m)
        return;
    for (size_t i = 0; i < m->n; i++) {
        keel__free((void *)m->log[i].type);
        keel__free((void *)m->log[i].data);
        keel__free((void *)m->log[i].meta);
    }
    keel__free(m->log);
    for (size_t b = 0; b < m->scap; b++)
        for (mstream *s = m->streams[b], *next; s; s = next) {
            next = s->next;
            keel__free(s->id);
            keel__free(s->pos);
            keel__free(s);
        }
    keel__free(m->streams);
    for (size_t b = 0; b <= m->icap; b++)
        for (mkv *kv = b < m->icap ? m->idem[b] : m->checkpoints, *next; kv; kv = next) {
            next = kv->next;
            keel__free(kv->key);
            keel__free(kv->val);
            keel__free(kv);
        }
    keel__free(m->idem);
    pthread_mutex_destroy(&m->mu);
    pthread_cond_destroy(&m->cp_cv);
    keel__free(m);
}

uint64_t keel__cqrs_mem_seed(const keel_cqrs *c) { return c && c->mem ? c->mem->seed : 0; }

/* ---- the handler context ---- */

static void ctx_reset(keel_cqrs_ctx *x)
{
    for (size_t i = 0; i < x->nexp; i++) {
        keel__free(x->exp[i].stream);
        keel__free(x->exp[i].events);
        if (x->exp[i].owner)
            keel__cqrs_pg_free_owner(x->exp[i].owner);
    }
    for (size_t i = 0; i < x->nev; i++) {
        keel__free(x->ev[i].stream);
        keel__free(x->ev[i].type);
        keel__free(x->ev[i].data);
        keel__free(x->ev[i].meta);
    }
    x->nexp = x->nev = 0;
    keel__free(x->reply);
    x->reply = NULL;
    x->reply_len = 0;
}

static void ctx_free(keel_cqrs_ctx *x)
{
    ctx_reset(x);
    keel__free(x->exp);
    keel__free(x->ev);
    if (x->conn && x->kind == CTX_QUERY)
        keel_pg_release(x->conn);
    x->conn = NULL;
}

static cexpect *find_exp(keel_cqrs_ctx *x, const char *stream)
{
    for (size_t i = 0; i < x->nexp; i++)
        if (strcmp(x->exp[i].stream, stream) == 0)
            return &x->exp[i];
    return NULL;
}

/* Room for one more element in an array of n of cap; false: no memory. */
static bool grow(void **arr, size_t n, size_t *cap, size_t size)
{
    if (n < *cap)
        return true;
    size_t ncap = *cap ? *cap * 2 : 4;
    void *na = keel__realloc(*arr, ncap * size);
    if (!na)
        return false;
    *arr = na;
    *cap = ncap;
    return true;
}

/* A new entry for stream (version 0, nothing loaded); NULL: no memory. */
static cexpect *add_exp(keel_cqrs_ctx *x, const char *stream)
{
    if (!grow((void **)&x->exp, x->nexp, &x->capexp, sizeof *x->exp))
        return NULL;
    cexpect *e = &x->exp[x->nexp];
    *e = (cexpect){keel__strdup(stream), 0, NULL, 0, NULL};
    if (!e->stream)
        return NULL;
    x->nexp++;
    return e;
}

KEEL_API int keel_cqrs_load(keel_cqrs_ctx *x, const char *stream, const keel_cqrs_event **events, size_t *n)
{
    if (!x || x->kind != CTX_COMMAND || !good_name(stream, KEEL_CQRS_STREAM_MAX) || !events || !n)
        return KEEL_EINVAL;
    cexpect *e = find_exp(x, stream);
    if (!e) {
        if (!(e = add_exp(x, stream)))
            return KEEL_ENOMEM;
        uint64_t guard = 0;
        int rc = x->c->pg ? keel__cqrs_pg_load(x->c->pg, stream, &e->events, &e->n, &e->owner, &guard)
                          : mem_load(x->c->mem, stream, &e->events, &e->n);
        if (rc) {
            keel__free(e->stream);
            x->nexp--;
            return rc;
        }
        e->version = e->n ? e->events[e->n - 1].version : 0; /* not n: its first events may be gone */
        if (guard > e->version) /* its last ones too (a dropped partition), not their versions */
            e->version = guard;
    }
    *events = e->events;
    *n = e->n;
    return 0;
}

/* Whether subject_prefix + type is a publishable subject. */
static bool good_type(keel_cqrs *c, const char *type)
{
    if (!good_name(type, KEEL_CQRS_NAME_MAX))
        return false;
    char subject[KEEL_BUS_SUBJECT_MAX + 2];
    int n = snprintf(subject, sizeof subject, "%s%s", c->subject_prefix, type);
    return n > 0 && (size_t)n <= KEEL_BUS_SUBJECT_MAX && keel_bus_match(">", subject) == 1;
}

KEEL_API int keel_cqrs_emit(keel_cqrs_ctx *x, const char *stream, const char *type, const void *data, size_t len,
                            const void *meta, size_t meta_len)
{
    if (!x || x->kind != CTX_COMMAND || !good_name(stream, KEEL_CQRS_STREAM_MAX) || !good_type(x->c, type) ||
        (len && !data) || (meta_len && !meta) || len > x->c->o.max_payload || meta_len > x->c->o.max_payload)
        return KEEL_EINVAL;
    if (!grow((void **)&x->ev, x->nev, &x->capev, sizeof *x->ev))
        return KEEL_ENOMEM;
    cpending p = {keel__strdup(stream), keel__strdup(type), dup_bytes(data, len), dup_bytes(meta, meta_len),
                  len, meta_len, 0};
    if (!p.stream || !p.type || !p.data || !p.meta) {
        keel__free(p.stream);
        keel__free(p.type);
        keel__free(p.data);
        keel__free(p.meta);
        return KEEL_ENOMEM;
    }
    x->ev[x->nev++] = p;
    return 0;
}

KEEL_API int keel_cqrs_reply(keel_cqrs_ctx *x, const void *data, size_t len)
{
    if (!x || (len && !data) || len > x->c->o.max_payload)
        return KEEL_EINVAL;
    void *d = len ? dup_bytes(data, len) : NULL; /* empty: NULL, as a repeat gives it */
    if (len && !d)
        return KEEL_ENOMEM;
    keel__free(x->reply);
    x->reply = d;
    x->reply_len = len;
    return 0;
}

KEEL_API keel_pg_conn *keel_cqrs_conn(keel_cqrs_ctx *x)
{
    if (!x || !x->c->o.pg || x->kind == CTX_COMMAND)
        return NULL;
    if (!x->conn && x->kind == CTX_QUERY && x->conn_rc == 0) {
        x->conn_rc = x->after_lsn ? keel_pg_acquire_after(x->c->o.pg, x->after_lsn, 5000000000ull, &x->conn)
                                  : keel_pg_acquire(x->c->o.pg, KEEL_PG_READ, &x->conn);
        if (x->conn_rc)
            x->conn = NULL;
    }
    return x->conn;
}

/* ---- registration ---- */

static int reg(keel_cqrs *c, int kind, const char *name, keel_cqrs_handler h, void *ud)
{
    if (!c || !h || !good_name(name, KEEL_CQRS_NAME_MAX))
        return KEEL_EINVAL;
    if (kind == KEEL_CQRS_COMMAND && strchr(name, '\x1f')) /* it ends the name in idempotency keys */
        return KEEL_EINVAL;
    chandler *n = keel__calloc(1, sizeof *n);
    if (!n || !(n->name = keel__strdup(name))) {
        keel__free(n);
        return KEEL_ENOMEM;
    }
    n->kind = kind;
    n->fn = h;
    n->ud = ud;
    chandler **b = &c->handlers[keel__hash64(name, strlen(name), (uint64_t)kind) % 256];
    pthread_rwlock_wrlock(&c->lock);
    for (chandler *x = *b; x; x = x->next)
        if (x->kind == kind && strcmp(x->name, name) == 0) {
            pthread_rwlock_unlock(&c->lock);
            keel__free(n->name);
            keel__free(n);
            return KEEL_EEXIST;
        }
    n->next = *b;
    *b = n;
    pthread_rwlock_unlock(&c->lock);
    return 0;
}

KEEL_API int keel_cqrs_command(keel_cqrs *c, const char *name, keel_cqrs_handler h, void *ud)
{
    return reg(c, KEEL_CQRS_COMMAND, name, h, ud);
}

KEEL_API int keel_cqrs_query(keel_cqrs *c, const char *name, keel_cqrs_handler h, void *ud)
{
    return reg(c, KEEL_CQRS_QUERY, name, h, ud);
}

static chandler *lookup(keel_cqrs *c, int kind, const char *name)
{
    chandler *found = NULL;
    pthread_rwlock_rdlock(&c->lock);
    for (chandler *x = c->handlers[keel__hash64(name, strlen(name), (uint64_t)kind) % 256]; x; x = x->next)
        if (x->kind == kind && strcmp(x->name, name) == 0) {
            found = x;
            break;
        }
    pthread_rwlock_unlock(&c->lock);
    return found; /* handlers are never removed */
}

KEEL_API int keel_cqrs_use(keel_cqrs *c, unsigned kinds, keel_cqrs_middleware fn, void *ud)
{
    if (!c || !fn || !kinds || (kinds & ~(unsigned)(KEEL_CQRS_COMMAND | KEEL_CQRS_QUERY)))
        return KEEL_EINVAL;
    pthread_mutex_lock(&c->links_mu);
    size_t n = atomic_load_explicit(&c->nlinks, memory_order_relaxed);
    int rc = n < MAX_LINKS ? 0 : KEEL_ELIMIT;
    if (rc == 0) {
        c->links[n] = (clink){kinds, fn, ud};
        atomic_store_explicit(&c->nlinks, n + 1, memory_order_release);
    }
    pthread_mutex_unlock(&c->links_mu);
    return rc;
}

/* ---- dispatch ---- */

static void publish(keel_cqrs *c, const cpending *ev, const cappended *done, size_t n)
{
    for (size_t i = 0; c->o.bus && i < n; i++) {
        char subject[KEEL_BUS_SUBJECT_MAX + 1], version[24], position[24];
        snprintf(subject, sizeof subject, "%s%s", c->subject_prefix, ev[i].type);
        snprintf(version, sizeof version, "%llu", (unsigned long long)ev[i].version);
        snprintf(position, sizeof position, "%llu", (unsigned long long)done->positions[i]);
        keel_bus_header h[3] = {{"stream", ev[i].stream}, {"version", version}, {"position", position}};
        int rc = keel_bus_publish(c->o.bus, subject, ev[i].data, ev[i].len, h, 3, NULL);
        if (rc == 0)
            atomic_fetch_add_explicit(&c->st.published, 1, memory_order_relaxed);
        else
            keel__log(KEEL_LOG_WARN, "cqrs", "event %s at %llu committed but not published: %s", subject,
                      (unsigned long long)done->positions[i], keel_strerror(rc));
    }
}

/* A repeat's result: the first reply; with read_your_writes, a write
 * position taken now, which is past the first attempt's commit. */
static int idem_get(keel_cqrs *c, const char *key, keel_cqrs_result *res)
{
    void *reply = NULL;
    size_t len = 0;
    int rc = c->pg ? keel__cqrs_pg_idem_get(c->pg, key, &reply, &len) : mem_idem_get(c->mem, key, &reply, &len);
    if (rc)
        return rc;
    atomic_fetch_add_explicit(&c->st.repeats, 1, memory_order_relaxed);
    if (!res) {
        keel__free(reply);
        return 0;
    }
    res->reply = reply;
    res->len = len;
    res->repeated = 1;
    if (c->pg && c->o.read_your_writes && keel_pg_write_lsn(c->o.pg, &res->lsn) != 0)
        res->lsn = 0;
    return 0;
}

/* The projection runs this thread has in progress, innermost first: a
 * handler may run its own projection again (a command it sends, whose
 * event a bus subscriber turns into a run), which must not wait for the
 * run it is part of; nor may it make partitions (see pgstore.c). */
typedef struct pframe {
    keel_cqrs_projection *p;
    bool again; /* such a run came: go on past a short batch */
    struct pframe *up;
} pframe;
static __thread pframe *tl_runs;

/* The end of a command's chain: idempotency, the handler, the append. */
static int run_command(keel_cqrs_req *q)
{
    keel_cqrs *c = q->c;
    keel_cqrs_result *res = q->res;
    keel_cqrs_result_free(res); /* a middleware link may run the rest twice */
    if (res)
        memset(res, 0, sizeof *res);
    /* Keys are per command: the name, a unit separator, the key. */
    char key[2 * KEEL_CQRS_NAME_MAX + 2];
    if (q->key)
        snprintf(key, sizeof key, "%s\x1f%s", q->name, q->key);
    keel_cqrs_ctx x = {.c = c, .kind = CTX_COMMAND};
    int rc;
    for (uint32_t attempt = 0;; attempt++) {
        if (q->key && (rc = idem_get(c, key, res)) != KEEL_ENOTFOUND)
            break; /* a repeat (also after losing a race), or a store error */
        ctx_reset(&x);
        rc = q->h->fn(&x, q->payload, q->len, q->h->ud);
        if (rc && q->key && idem_get(c, key, res) == 0) { /* refused for what a racing first attempt did */
            rc = 0;
            break;
        }
        if (rc || (!x.nev && !q->key))
            break;
        for (size_t i = 0; i < x.nev; i++) { /* versions: after what was read, or from 1 */
            cexpect *e = find_exp(&x, x.ev[i].stream);
            if (!e && !(e = add_exp(&x, x.ev[i].stream))) {
                rc = KEEL_ENOMEM;
                break;
            }
            size_t before = 0;
            for (size_t j = 0; j < i; j++)
                before += strcmp(x.ev[j].stream, x.ev[i].stream) == 0;
            x.ev[i].version = e->version + before + 1;
        }
        if (rc)
            break;
        uint64_t stack_pos[16], stack_t[16];
        cappended done = {stack_pos, stack_t, 0};
        if (x.nev > 16) {
            done.positions = keel__malloc(x.nev * sizeof *done.positions);
            done.times = keel__malloc(x.nev * sizeof *done.times);
        }
        cappend a = {x.ev, x.nev, q->key ? key : NULL, x.reply, x.reply_len};
        rc = !done.positions || !done.times ? KEEL_ENOMEM
             : c->pg                        ? keel__cqrs_pg_append(c->pg, &a, &done, c->o.read_your_writes, !tl_runs)
                                            : mem_append(c->mem, &a, &done);
        if (rc == 0) {
            atomic_fetch_add_explicit(&c->st.appended, x.nev, memory_order_relaxed);
            publish(c, x.ev, &done, x.nev);
            if (res) {
                res->position = x.nev ? done.positions[x.nev - 1] : 0;
                res->lsn = done.lsn;
            }
        }
        if (done.positions != stack_pos) {
            keel__free(done.positions);
            keel__free(done.times);
        }
        if (rc == KEEL_EEXIST) { /* the key was used meanwhile: the winner's result */
            rc = idem_get(c, key, res);
            break;
        }
        if (rc != KEEL_ECONFLICT)
            break;
        atomic_fetch_add_explicit(&c->st.conflicts, 1, memory_order_relaxed);
        if (attempt >= c->o.max_retries)
            break;
        atomic_fetch_add_explicit(&c->st.retries, 1, memory_order_relaxed);
    }
    if (rc == 0 && res && !res->repeated) {
        res->reply = x.reply;
        res->len = x.reply_len;
        x.reply = NULL;
    }
    ctx_free(&x);
    return rc;
}

static int run_query(keel_cqrs_req *q)
{
    keel_cqrs_result_free(q->res);
    keel_cqrs_ctx x = {.c = q->c, .kind = CTX_QUERY, .after_lsn = q->after_lsn};
    int rc = q->h->fn(&x, q->payload, q->len, q->h->ud);
    if (rc == 0 && q->res) {
        q->res->reply = x.reply;
        q->res->len = x.reply_len;
        x.reply = NULL;
    }
    ctx_free(&x);
    return rc;
}

/* Runs the rest of the chain from the link after the caller's; a link
 * may call it more than once (a retry), each time from the same place. */
KEEL_API int keel_cqrs_next(keel_cqrs_req *q)
{
    if (!q)
        return KEEL_EINVAL;
    size_t start = q->next_link, i = start;
    while (i < q->nlinks && !(q->c->links[i].kinds & (unsigned)q->kind))
        i++;
    int rc;
    if (i < q->nlinks) {
        q->next_link = i + 1;
        rc = q->c->links[i].fn(q, q->c->links[i].ud);
    } else {
        rc = q->kind == KEEL_CQRS_COMMAND ? run_command(q) : run_query(q);
    }
    q->next_link = start;
    return rc;
}

KEEL_API keel_cqrs_kind keel_cqrs_req_kind(const keel_cqrs_req *q) { return q ? q->kind : KEEL_CQRS_COMMAND; }
KEEL_API const char *keel_cqrs_req_name(const keel_cqrs_req *q) { return q ? q->name : NULL; }

KEEL_API const void *keel_cqrs_req_payload(const keel_cqrs_req *q, size_t *len)
{
    if (len)
        *len = q ? q->len : 0;
    return q ? q->payload : NULL;
}

static int dispatch(keel_cqrs *c, keel_cqrs_kind kind, const char *name, const void *payload, size_t len,
                    const char *key, uint64_t after_lsn, keel_cqrs_result *res)
{
    if (res)
        memset(res, 0, sizeof *res);
    if (!c || !good_name(name, KEEL_CQRS_NAME_MAX) || (len && !payload) || len > c->o.max_payload ||
        (key && !good_name(key, KEEL_CQRS_NAME_MAX)))
        return KEEL_EINVAL;
    chandler *h = lookup(c, kind, name);
    if (!h)
        return KEEL_ENOTFOUND;
    atomic_fetch_add_explicit(kind == KEEL_CQRS_COMMAND ? &c->st.commands : &c->st.queries, 1, memory_order_relaxed);
    keel_cqrs_req q = {c,   kind, name, payload, len, key, after_lsn, h, 0,
                       atomic_load_explicit(&c->nlinks, memory_order_acquire), res};
    int rc = keel_cqrs_next(&q);
    if (rc) { /* a link may fail a run that succeeded: none of its result stays */
        atomic_fetch_add_explicit(&c->st.failed, 1, memory_order_relaxed);
        keel_cqrs_result_free(res);
        if (res)
            memset(res, 0, sizeof *res);
    }
    return rc;
}

KEEL_API int keel_cqrs_send(keel_cqrs *c, const char *name, const void *payload, size_t len,
                            const char *idempotency_key, keel_cqrs_result *res)
{
    return dispatch(c, KEEL_CQRS_COMMAND, name, payload, len, idempotency_key, 0, res);
}

KEEL_API int keel_cqrs_ask(keel_cqrs *c, const char *name, const void *payload, size_t len, uint64_t after_lsn,
                           keel_cqrs_result *res)
{
    return dispatch(c, KEEL_CQRS_QUERY, name, payload, len, NULL, after_lsn, res);
}

KEEL_API void keel_cqrs_result_free(keel_cqrs_result *res)
{
    if (!res)
        return;
    keel__free(res->reply);
    res->reply = NULL;
    res->len = 0;
}

/* ---- projections ---- */

struct keel_cqrs_projection {
    keel_cqrs *c;
    keel_cqrs_projection_opts o;
    char *name;
    mkv *cp;                /* the memory store's checkpoint record */
    atomic_bool stopping;   /* destroy: no more batches */
    _Atomic uint64_t position;
    pthread_mutex_t run_mu; /* one run at a time */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t th;
    bool thread, stop;
};

/* One batch from the in-memory store. Runs of one name take turns
 * (`running`), as the PostgreSQL store's row lock makes them. Events
 * applied before a handler failure stay applied: there is no transaction
 * to roll back. */
static int mem_project(keel_cqrs_projection *p, size_t *applied)
{
    mstore *m = p->c->mem;
    mkv *cp = p->cp;
    pthread_mutex_lock(&m->mu);
    while (cp->len) /* len: a run in progress */
        pthread_cond_wait(&m->cp_cv, &m->mu);
    cp->len = 1;
    uint64_t from = cp->pos;
    size_t n = m->n > from ? m->n - from : 0;
    if (n > p->o.batch)
        n = p->o.batch;
    keel_cqrs_event *evs = keel__malloc((n ? n : 1) * sizeof *evs);
    if (evs && n)
        memcpy(evs, &m->log[from], n * sizeof *evs); /* the events themselves never move */
    pthread_mutex_unlock(&m->mu);
    keel_cqrs_ctx x = {.c = p->c, .kind = CTX_PROJECTION};
    int rc = evs ? 0 : KEEL_ENOMEM;
    size_t done = 0;
    while (rc == 0 && done < n && (rc = p->o.handler(&x, &evs[done], p->o.ud)) == 0)
        done++;
    ctx_free(&x);
    keel__free(evs);
    pthread_mutex_lock(&m->mu);
    cp->pos = from + done;
    cp->len = 0;
    pthread_cond_broadcast(&m->cp_cv);
    pthread_mutex_unlock(&m->mu);
    atomic_store(&p->position, from + done);
    *applied = done;
    return rc;
}

KEEL_API int keel_cqrs_projection_run(keel_cqrs_projection *p, size_t *applied)
{
    if (applied)
        *applied = 0;
    if (!p)
        return KEEL_EINVAL;
    for (pframe *f = tl_runs; f; f = f->up)
        if (f->p->c == p->c && strcmp(f->p->name, p->name) == 0) { /* the same checkpoint */
            f->again = true;
            return 0;
        }
    bool ahead = !tl_runs; /* no batch of another projection open on this thread */
    pthread_mutex_lock(&p->run_mu);
    pframe f = {p, false, tl_runs};
    tl_runs = &f;
    int rc = 0;
    while (!atomic_load(&p->stopping)) {
        f.again = false;
        size_t n = 0;
        if (p->c->pg) {
            keel_cqrs_ctx x = {.c = p->c, .kind = CTX_PROJECTION};
            uint64_t cp = 0;
            rc = keel__cqrs_pg_project(p->c->pg, p->name, p->o.batch, &x, p->o.handler, p->o.ud, &n, &cp, ahead);
            ctx_free(&x);
            if (rc == 0 && cp != UINT64_MAX)
                atomic_store(&p->position, cp);
        } else {
            rc = mem_project(p, &n);
        }
        atomic_fetch_add_explicit(&p->c->st.applied, n, memory_order_relaxed);
        if (applied)
            *applied += n;
        if (rc || (n < p->o.batch && !f.again))
            break;
    }
    tl_runs = f.up;
    pthread_mutex_unlock(&p->run_mu);
    return rc;
}

static void *follow(void *arg)
{
    keel_cqrs_projection *p = arg;
    pthread_mutex_lock(&p->mu);
    while (!p->stop) {
        pthread_mutex_unlock(&p->mu);
        int rc = keel_cqrs_projection_run(p, NULL);
        if (rc)
            keel__log(KEEL_LOG_WARN, "cqrs", "projection %s stopped at %llu: %s", p->name,
                      (unsigned long long)atomic_load(&p->position), keel_strerror(rc));
        struct timespec ts;
        keel__abstime_in(p->o.follow_interval_ns, &ts);
        pthread_mutex_lock(&p->mu);
        while (!p->stop && pthread_cond_timedwait(&p->cv, &p->mu, &ts) == 0)
            ;
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

KEEL_API int keel_cqrs_projection_create(keel_cqrs *c, const keel_cqrs_projection_opts *o,
                                         keel_cqrs_projection **out)
{
    if (!c || !o || !out || !o->handler || !good_name(o->name, KEEL_CQRS_NAME_MAX))
        return KEEL_EINVAL;
    keel_cqrs_projection *p = keel__calloc(1, sizeof *p);
    if (!p || !(p->name = keel__strdup(o->name))) {
        keel__free(p);
        return KEEL_ENOMEM;
    }
    p->c = c;
    p->o = *o;
    p->o.name = p->name;
    if (!p->o.batch)
        p->o.batch = 100;
    uint64_t cp = 0;
    int rc = 0;
    if (c->pg) {
        rc = keel__cqrs_pg_checkpoint(c->pg, p->name, &cp);
    } else { /* the record, made now and kept: runs find it without a search */
        pthread_mutex_lock(&c->mem->mu);
        mkv **pp = mem_kv(&c->mem->checkpoints, p->name);
        if (!*pp && (*pp = keel__calloc(1, sizeof **pp)) && !((*pp)->key = keel__strdup(p->name))) {
            keel__free(*pp);
            *pp = NULL;
        }
        p->cp = *pp;
        cp = p->cp ? p->cp->pos : 0;
        rc = p->cp ? 0 : KEEL_ENOMEM;
        pthread_mutex_unlock(&c->mem->mu);
    }
    if (rc) {
        keel__free(p->name);
        keel__free(p);
        return rc;
    }
    atomic_init(&p->position, cp);
    pthread_mutex_init(&p->run_mu, NULL);
    pthread_mutex_init(&p->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&p->cv, &ca);
    pthread_condattr_destroy(&ca);
    if (o->follow_interval_ns) {
        if (pthread_create(&p->th, NULL, follow, p) != 0) {
            keel_cqrs_projection_destroy(p);
            return KEEL_ENOMEM;
        }
        p->thread = true;
    }
    *out = p;
    return 0;
}

KEEL_API uint64_t keel_cqrs_projection_position(keel_cqrs_projection *p)
{
    return p ? atomic_load(&p->position) : 0;
}

KEEL_API void keel_cqrs_projection_destroy(keel_cqrs_projection *p)
{
    if (!p)
        return;
    atomic_store(&p->stopping, true);
    if (p->thread) {
        pthread_mutex_lock(&p->mu);
        p->stop = true;
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
        pthread_join(p->th, NULL);
    }
    pthread_mutex_destroy(&p->run_mu);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    keel__free(p->name);
    keel__free(p);
}

/* ---- lifetime, stats ---- */

KEEL_API void keel_cqrs_stats_get(keel_cqrs *c, keel_cqrs_stats *st)
{
    if (!st)
        return;
    memset(st, 0, sizeof *st);
    if (!c)
        return;
    st->commands = atomic_load(&c->st.commands);
    st->queries = atomic_load(&c->st.queries);
    st->conflicts = atomic_load(&c->st.conflicts);
    st->retries = atomic_load(&c->st.retries);
    st->repeats = atomic_load(&c->st.repeats);
    st->appended = atomic_load(&c->st.appended);
    st->published = atomic_load(&c->st.published);
    st->applied = atomic_load(&c->st.applied);
    st->failed = atomic_load(&c->st.failed);
}

KEEL__STAT_FN(m_commands, keel_cqrs_stats, keel_cqrs_stats_get, commands)
KEEL__STAT_FN(m_queries, keel_cqrs_stats, keel_cqrs_stats_get, queries)
KEEL__STAT_FN(m_conflicts, keel_cqrs_stats, keel_cqrs_stats_get, conflicts)
KEEL__STAT_FN(m_retries, keel_cqrs_stats, keel_cqrs_stats_get, retries)
KEEL__STAT_FN(m_published, keel_cqrs_stats, keel_cqrs_stats_get, published)
KEEL__STAT_FN(m_repeats, keel_cqrs_stats, keel_cqrs_stats_get, repeats)
KEEL__STAT_FN(m_appended, keel_cqrs_stats, keel_cqrs_stats_get, appended)
KEEL__STAT_FN(m_applied, keel_cqrs_stats, keel_cqrs_stats_get, applied)
KEEL__STAT_FN(m_failed, keel_cqrs_stats, keel_cqrs_stats_get, failed)

static bool good_prefix(const char *p)
{
    size_t n = strlen(p);
    if (n == 0 || n > 40)
        return false;
    for (; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '_'))
            return false;
    return true;
}

KEEL_API int keel_cqrs_create(keel_cqrs **out, const keel_cqrs_opts *opts)
{
    keel_cqrs_opts o = opts ? *opts : (keel_cqrs_opts){0};
    char probe[600];
    if (o.subject_prefix && strlen(o.subject_prefix) < 512) /* a valid prefix makes "<prefix>x" a subject */
        snprintf(probe, sizeof probe, "%sx", o.subject_prefix);
    if (!out || (o.prefix && !good_prefix(o.prefix)) ||
        (o.subject_prefix && (strlen(o.subject_prefix) >= 512 || keel_bus_match(">", probe) != 1)) ||
        o.max_payload > ((size_t)1 << 30)) /* bytea's limit, and int lengths for libpq */
        return KEEL_EINVAL;
    keel_cqrs *c = keel__calloc(1, sizeof *c);
    if (!c)
        return KEEL_ENOMEM;
    c->o = o;
    if (!c->o.max_payload)
        c->o.max_payload = 1 << 20;
    c->prefix = keel__strdup(o.prefix ? o.prefix : "keel_");
    c->subject_prefix = keel__strdup(o.subject_prefix ? o.subject_prefix : "cqrs.");
    pthread_rwlock_init(&c->lock, NULL);
    pthread_mutex_init(&c->links_mu, NULL);
    int rc = c->prefix && c->subject_prefix ? 0 : KEEL_ENOMEM;
    if (rc == 0 && o.pg) {
        rc = keel__cqrs_pg_create(o.pg, c->prefix, o.partition_by_month, o.clock, o.clock_ud, &c->pg);
    } else if (rc == 0) {
        if ((c->mem = keel__calloc(1, sizeof *c->mem))) {
            pthread_mutex_init(&c->mem->mu, NULL);
            pthread_cond_init(&c->mem->cp_cv, NULL);
            /* a seed of its own: with one known to all, ids found offline
             * would share one chain, each insert and lookup walking it */
            c->mem->seed = keel_rand_u64(NULL);
        } else
            rc = KEEL_ENOMEM;
    }
    if (rc == 0 && o.metrics) {
        keel__mfunc fs[] = {
            {0, "keel_cqrs_commands_total", "Commands dispatched.", NULL, NULL, m_commands},
            {0, "keel_cqrs_queries_total", "Queries dispatched.", NULL, NULL, m_queries},
            {0, "keel_cqrs_conflicts_total", "Appends that lost to a concurrent writer.", NULL, NULL, m_conflicts},
            {0, "keel_cqrs_retries_total", "Commands run again after a conflict.", NULL, NULL, m_retries},
            {0, "keel_cqrs_repeats_total", "Idempotent repeats answered from the store.", NULL, NULL, m_repeats},
            {0, "keel_cqrs_appended_total", "Events appended.", NULL, NULL, m_appended},
            {0, "keel_cqrs_published_total", "Events published on the bus.", NULL, NULL, m_published},
            {0, "keel_cqrs_applied_total", "Events applied by projections.", NULL, NULL, m_applied},
            {0, "keel_cqrs_failed_total", "Dispatches that failed.", NULL, NULL, m_failed},
        };
        rc = keel__metrics_funcs(o.metrics, "cqrs", o.metrics_name, fs, sizeof fs / sizeof fs[0], c);
        if (rc)
            c->o.metrics = NULL;
    }
    if (rc) {
        keel_cqrs_destroy(c);
        return rc;
    }
    *out = c;
    return 0;
}

KEEL_API int keel_cqrs_create_schema(keel_cqrs *c)
{
    if (!c)
        return KEEL_EINVAL;
    return c->pg ? keel__cqrs_pg_schema(c->pg) : 0;
}

KEEL_API void keel_cqrs_destroy(keel_cqrs *c)
{
    if (!c)
        return;
    if (c->o.metrics)
        keel_metrics_func_remove(c->o.metrics, c);
    for (size_t b = 0; b < 256; b++)
        for (chandler *h = c->handlers[b], *next; h; h = next) {
            next = h->next;
            keel__free(h->name);
            keel__free(h);
        }
    mem_free(c->mem);
    if (c->pg)
        keel__cqrs_pg_destroy(c->pg);
    pthread_rwlock_destroy(&c->lock);
    pthread_mutex_destroy(&c->links_mu);
    keel__free(c->prefix);
    keel__free(c->subject_prefix);
    keel__free(c);
}
