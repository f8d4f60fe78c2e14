/* lib/bus/bus.c — keel_bus in process: the subscription trie, matching,
 * sync calls and the async workers.
 *
 * The trie: one node per token of a pattern's prefix; a node holds the
 * subscriptions whose pattern ends there (`here`), those whose pattern
 * continues with `>` (`full`), a hashed table of literal children and a
 * `*` child. Publishers walk it under RCU without a lock. Writers (under
 * the bus's mutex) change it one pointer at a time: a subscription array
 * is copied and the copy published; a child is published into an empty or
 * tombstoned slot of its table, and a full table is copied; what a reader
 * may still see is freed only after a grace period.
 *
 * References: a subscription starts with one, the trie's. A publisher takes
 * one on each match inside its read section and drops it after the call or
 * after the async worker ran it; unsubscribe drops the trie's after the
 * grace period, so a reader never sees freed memory.
 *
 * Unsubscribe vs. calls in flight: the caller raises `dead`, then waits
 * until `calls` holds only its own frames; a call raises `calls`, then
 * checks `dead`. Both sides use sequentially consistent operations, so
 * either the call sees `dead` and does not run, or unsubscribe sees the
 * call and waits for it.
 *
 * A queue group member that leaves with async deliveries queued: each
 * message went to that member alone (picked at publish), so skipping them
 * as for any other subscription would lose them for the group. The worker
 * re-routes them instead (regroup()): it matches the subject again, keeps
 * the group's members (by the group's id: the member's group may be freed
 * once it has left) and picks one as a publish does. The new member's
 * handler runs there and then, in the worker: an async member's messages
 * of that subject all go through this worker's queue, those before this
 * one have run and those after it have not, so it gets the message in
 * publish order, as if picked at the publish; nothing is queued again, so
 * no full queue can refuse it and drain waits for it as for the delivery
 * it replaces. A sync member runs it in the worker too, later than the
 * messages it ran itself at their publish. No member left: the delivery is
 * dropped, counted and reported (on_error with no subscription, which is
 * gone, and KEEL_ENOTFOUND). A sync member a publish chose that leaves
 * before its call is replaced the same way, by the publish itself
 * (call_sync()): a sync one is called there, an async one queued. A Redis
 * reader replaces one too (keel__bus_call()), calling the new member in
 * the reader; with none left it keeps the stream entry pending, for
 * another consumer, rather than drop it.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <keel/metrics.h>
#include <keel/pool.h>

#include "../hash.h"
#include "../rcu.h"
#include "bus_int.h"

/* ---- tokens ---- */

int keel__bus_tokens(const char *s, size_t len, bool pattern, btoks *t)
{
    if (!s || len == 0 || len > KEEL_BUS_SUBJECT_MAX)
        return KEEL_EINVAL;
    t->n = 0;
    size_t start = 0;
    for (size_t i = 0; i <= len; i++) {
        if (i < len && s[i] != '.') {
            unsigned char ch = (unsigned char)s[i];
            if (ch <= ' ' || ch == 0x7f)
                return KEEL_EINVAL;
            continue;
        }
        size_t tl = i - start;
        if (tl == 0 || t->n == BUS_MAX_TOKENS)
            return KEEL_EINVAL;
        const char *tok = s + start;
        bool wild = tl == 1 && (*tok == '*' || *tok == '>');
        if (wild && (!pattern || (*tok == '>' && i != len)))
            return KEEL_EINVAL;
        t->s[t->n] = tok;
        t->len[t->n] = tl;
        t->h[t->n] = wild ? 0 : keel__hash64(tok, tl, 0);
        t->n++;
        start = i + 1;
    }
    return 0;
}

static bool is_star(const btoks *t, size_t i) { return t->len[i] == 1 && t->s[i][0] == '*'; }
static bool is_full(const btoks *t, size_t i) { return t->len[i] == 1 && t->s[i][0] == '>'; }

KEEL_API int keel_bus_match(const char *pattern, const char *subject)
{
    btoks p, s;
    if (!pattern || !subject || keel__bus_tokens(pattern, strnlen(pattern, KEEL_BUS_SUBJECT_MAX + 1), true, &p) ||
        keel__bus_tokens(subject, strnlen(subject, KEEL_BUS_SUBJECT_MAX + 1), false, &s))
        return KEEL_EINVAL;
    for (size_t i = 0; i < p.n; i++) {
        if (is_full(&p, i))
            return s.n > i;
        if (i == s.n)
            return 0;
        if (!is_star(&p, i) && (p.len[i] != s.len[i] || memcmp(p.s[i], s.s[i], s.len[i])))
            return 0;
    }
    return p.n == s.n;
}

/* ---- the trie ---- */

typedef struct sarr {
    struct sarr *gnext; /* on the garbage list */
    size_t n;
    keel_bus_sub *s[];
} sarr;

struct bnode;
typedef struct bkids {
    struct bkids *gnext;
    size_t cap, used, live; /* used counts tombstones */
    _Atomic(struct bnode *) slot[];
} bkids;

typedef struct bnode {
    struct bnode *gnext, *parent;
    char *tok; /* a literal child's token; NULL for the root and `*` */
    size_t toklen;
    uint64_t hash;
    _Atomic(bkids *) kids;
    _Atomic(struct bnode *) star;
    _Atomic(sarr *) here, full;
} bnode;

/* A slot whose child left: probing goes on past it. */
static bnode tomb;

/* One worker: a bounded FIFO of deliveries under a mutex. */
typedef struct bmsg {
    _Atomic size_t refs;
    keel_pool *pool; /* where it came from; NULL: the heap */
    keel_bus_msg v;
    char id[KEEL_BUS_ID_MAX];
    keel_bus_header hdr[];
} bmsg;

/* One worker's queue: a bounded ring of deliveries, Vyukov's MPMC: the
 * publishers push, the worker pops, and a publisher dropping the oldest
 * (KEEL_BUS_DROP_OLDEST) pops too. A slot's sequence number says whose
 * turn it is. The worker sleeps on `work` only after spinning and raising
 * `sleeping`; a publisher wakes it only when it sees that flag (the two
 * sides order their store and load with the asymmetric fences). */
typedef struct bslot {
    _Atomic uint64_t seq;
    keel_bus_sub *sub;
    bmsg *m;
} __attribute__((aligned(32))) bslot; /* two a line: see slot_at() */

/* A line each for what publishers write, what they only read (written
 * seldom), and what the worker writes on every pop: a pop must not take
 * away the line a push reads. */
typedef struct bworker {
    _Atomic uint64_t tail; /* publishers */
    bslot *ring __attribute__((aligned(KEEL__CACHELINE)));
    keel_bus *bus;
    _Atomic int sleeping;
    _Atomic unsigned space_waiters, drain_waiters;
    _Atomic uint64_t head __attribute__((aligned(KEEL__CACHELINE))); /* the worker */
    _Atomic uint64_t done; /* deliveries run or dropped */
    pthread_t th;
    pthread_mutex_t mu; /* for the condition variables, and stop */
    pthread_cond_t work, space, done_cv;
    bool stop;
} __attribute__((aligned(KEEL__CACHELINE))) bworker;

struct keel_bus {
    keel_bus_opts o;
    pthread_mutex_t mu; /* writers: the trie, groups, workers' start */
    bnode root;
    uint64_t next_seq, next_group;
    bgroup *groups;
    sarr *g_arrs;       /* garbage waiting for a grace period */
    bkids *g_kids;
    bnode *g_nodes;
    bgroup *g_groups;
    size_t g_count;
    _Atomic uint64_t nsubs;
    bcounters c[KEEL__STRIPES];
    bworker *workers;
    size_t nworkers, cap, mask;
    unsigned rot; /* log2(cap) - 1: see slot_at() */
    bool workers_started;
    bstream *stream;
    keel_pool *msgs; /* small message copies, for async delivery */
};

/* Message copies up to this size come from the bus's pool: malloc in the
 * publisher and free in a worker contend on glibc's arena lock. */
#define BUS_SMALL_MSG 512

bcounters *keel__bus_counters(keel_bus *bus) { return &bus->c[keel__stripe()]; }

static bnode *kid_find(const bnode *n, const char *tok, size_t len, uint64_t h)
{
    bkids *k = atomic_load_explicit(&n->kids, memory_order_acquire);
    if (!k)
        return NULL;
    size_t mask = k->cap - 1;
    for (size_t i = (size_t)h & mask;; i = (i + 1) & mask) {
        bnode *c = atomic_load_explicit(&k->slot[i], memory_order_acquire);
        if (!c)
            return NULL;
        if (c != &tomb && c->hash == h && c->toklen == len && memcmp(c->tok, tok, len) == 0)
            return c;
    }
}

/* Puts c into table k (which has room); writer only. */
static void kids_put(bkids *k, bnode *c)
{
    size_t mask = k->cap - 1;
    size_t i = (size_t)c->hash & mask;
    while (atomic_load_explicit(&k->slot[i], memory_order_relaxed) != NULL &&
           atomic_load_explicit(&k->slot[i], memory_order_relaxed) != &tomb)
        i = (i + 1) & mask;
    if (atomic_load_explicit(&k->slot[i], memory_order_relaxed) == NULL)
        k->used++;
    k->live++;
    atomic_store_explicit(&k->slot[i], c, memory_order_release);
}

static bkids *kids_new(size_t cap)
{
    bkids *k = keel__calloc(1, sizeof *k + cap * sizeof k->slot[0]);
    if (k)
        k->cap = cap;
    return k;
}

/* Adds child c to n, growing (a new table) when over half full. */
static int kid_add(keel_bus *bus, bnode *n, bnode *c)
{
    bkids *k = atomic_load_explicit(&n->kids, memory_order_relaxed);
    if (!k || (k->used + 1) * 2 > k->cap) {
        size_t cap = 4;
        while (k && cap < (k->live + 1) * 4)
            cap <<= 1;
        bkids *nk = kids_new(cap);
        if (!nk)
            return KEEL_ENOMEM;
        for (size_t i = 0; k && i < k->cap; i++) {
            bnode *x = atomic_load_explicit(&k->slot[i], memory_order_relaxed);
            if (x && x != &tomb)
                kids_put(nk, x);
        }
        kids_put(nk, c);
        atomic_store_explicit(&n->kids, nk, memory_order_release);
        if (k) {
            k->gnext = bus->g_kids;
            bus->g_kids = k;
            bus->g_count++;
        }
        return 0;
    }
    kids_put(k, c);
    return 0;
}

static void kid_remove(bnode *n, bnode *c)
{
    bkids *k = atomic_load_explicit(&n->kids, memory_order_relaxed);
    size_t mask = k->cap - 1;
    for (size_t i = (size_t)c->hash & mask;; i = (i + 1) & mask)
        if (atomic_load_explicit(&k->slot[i], memory_order_relaxed) == c) {
            atomic_store_explicit(&k->slot[i], &tomb, memory_order_release);
            k->live--;
            return;
        }
}

static bool node_empty(const bnode *n)
{
    bkids *k = atomic_load_explicit(&n->kids, memory_order_relaxed);
    return (!k || k->live == 0) && !atomic_load_explicit(&n->star, memory_order_relaxed) &&
           !atomic_load_explicit(&n->here, memory_order_relaxed) &&
           !atomic_load_explicit(&n->full, memory_order_relaxed);
}

static void node_free(bnode *n)
{
    keel__free(atomic_load_explicit(&n->kids, memory_order_relaxed));
    keel__free(n->tok);
    keel__free(n);
}

/* The array *slot with sub added (add) or removed; the old one to garbage. */
static int arr_change(keel_bus *bus, _Atomic(sarr *) *slot, keel_bus_sub *sub, bool add)
{
    sarr *a = atomic_load_explicit(slot, memory_order_relaxed);
    size_t n = a ? a->n : 0, at = 0;
    while (!add && at < n && a->s[at] != sub)
        at++;
    if (!add && at == n)
        return KEEL_EINVAL; /* not there */
    sarr *na = NULL;
    if (add || n > 1) {
        na = keel__malloc(sizeof *na + (add ? n + 1 : n - 1) * sizeof na->s[0]);
        if (!na)
            return KEEL_ENOMEM;
        na->n = 0;
        for (size_t i = 0; i < n; i++)
            if (a->s[i] != sub)
                na->s[na->n++] = a->s[i];
        if (add)
            na->s[na->n++] = sub;
    }
    atomic_store_explicit(slot, na, memory_order_release);
    if (a) {
        a->gnext = bus->g_arrs;
        bus->g_arrs = a;
        bus->g_count++;
    }
    return 0;
}

/* The node a pattern's tokens lead to (all but a final `>`), created when
 * `create`; NULL if absent or no memory, with *last the deepest node
 * reached (for pruning what a failed creation left). */
static bnode *walk(keel_bus *bus, const btoks *t, size_t ntok, bool create, bnode **last)
{
    bnode *n = &bus->root;
    *last = n;
    for (size_t i = 0; i < ntok; i++) {
        bnode *c = is_star(t, i) ? atomic_load_explicit(&n->star, memory_order_relaxed)
                                 : kid_find(n, t->s[i], t->len[i], t->h[i]);
        if (!c && create) {
            if (!(c = keel__calloc(1, sizeof *c)))
                return NULL;
            c->parent = n;
            if (!is_star(t, i)) {
                c->toklen = t->len[i];
                c->hash = t->h[i];
                if ((c->tok = keel__malloc(t->len[i])))
                    memcpy(c->tok, t->s[i], t->len[i]); /* before readers can see it */
                if (!c->tok || kid_add(bus, n, c)) {
                    node_free(c);
                    return NULL;
                }
            } else {
                atomic_store_explicit(&n->star, c, memory_order_release);
            }
        }
        if (!c)
            return NULL;
        *last = n = c;
    }
    return n;
}

/* Drops empty nodes from n up; they go to garbage. */
static void prune(keel_bus *bus, bnode *n)
{
    while (n != &bus->root && node_empty(n)) {
        bnode *p = n->parent;
        if (n->tok)
            kid_remove(p, n);
        else
            atomic_store_explicit(&p->star, NULL, memory_order_release);
        n->gnext = bus->g_nodes;
        bus->g_nodes = n;
        bus->g_count++;
        n = p;
    }
}

static void garbage_free(sarr *a, bkids *k, bnode *n, bgroup *g)
{
    while (a) {
        sarr *x = a;
        a = a->gnext;
        keel__free(x);
    }
    while (k) {
        bkids *x = k;
        k = k->gnext;
        keel__free(x);
    }
    while (n) {
        bnode *x = n;
        n = n->gnext;
        node_free(x);
    }
    while (g) {
        bgroup *x = g;
        g = g->next;
        keel__free(x->name);
        keel__free(x);
    }
}

/* Frees the garbage once no reader can see it. With `always`, waits for
 * a grace period even when there is none: another thread may have taken
 * ours. Called without bus->mu. */
static void collect_garbage(keel_bus *bus, bool always)
{
    pthread_mutex_lock(&bus->mu);
    sarr *a = bus->g_arrs;
    bkids *k = bus->g_kids;
    bnode *n = bus->g_nodes;
    bgroup *g = bus->g_groups;
    bus->g_arrs = NULL;
    bus->g_kids = NULL;
    bus->g_nodes = NULL;
    bus->g_groups = NULL;
    bus->g_count = 0;
    pthread_mutex_unlock(&bus->mu);
    if (!a && !k && !n && !g && !always)
        return;
    keel__rcu_synchronize();
    garbage_free(a, k, n, g);
}

/* ---- matching ---- */

static int match_add(bmatch *m, keel_bus_sub *s)
{
    if (m->n == m->cap) {
        size_t cap = m->cap * 2;
        keel_bus_sub **ns = keel__malloc(cap * sizeof *ns);
        if (!ns)
            return KEEL_ENOMEM;
        memcpy(ns, m->subs, m->n * sizeof *ns);
        if (m->subs != m->local)
            keel__free(m->subs);
        m->subs = ns;
        m->cap = cap;
    }
    m->subs[m->n++] = s;
    return 0;
}

/* Skips unsubscribed ones (still in the trie until their removal, or for
 * good when it ran out of memory): a queue group must not pick a member
 * that would never be called. */
static int match_arr(bmatch *m, _Atomic(sarr *) *slot)
{
    sarr *a = atomic_load_explicit(slot, memory_order_acquire);
    for (size_t i = 0; a && i < a->n; i++)
        if (!atomic_load_explicit(&a->s[i]->dead, memory_order_relaxed) && match_add(m, a->s[i]))
            return KEEL_ENOMEM;
    return 0;
}

static int collect(bnode *n, const btoks *t, size_t i, bmatch *m)
{
    if (i < t->n && match_arr(m, &n->full))
        return KEEL_ENOMEM;
    if (i == t->n)
        return match_arr(m, &n->here);
    bnode *c = kid_find(n, t->s[i], t->len[i], t->h[i]);
    if (c && collect(c, t, i + 1, m))
        return KEEL_ENOMEM;
    bnode *s = atomic_load_explicit(&n->star, memory_order_acquire);
    return s ? collect(s, t, i + 1, m) : 0;
}

static int by_seq(const void *a, const void *b)
{
    uint64_t x = (*(keel_bus_sub *const *)a)->seq, y = (*(keel_bus_sub *const *)b)->seq;
    return (x > y) - (x < y);
}

/* Keeps one member of each queue group, in its own place: the group's
 * round robin over the members that matched. A kept member is tagged in
 * its pointer's low bit while the pass runs, so its group is not picked
 * twice. */
static void pick_groups(bmatch *m)
{
    const uintptr_t kept = 1;
    for (size_t i = 0; i < m->n; i++) {
        keel_bus_sub *s = m->subs[i];
        if (!s || ((uintptr_t)s & kept) || !s->group)
            continue;
        size_t count = 0;
        for (size_t j = i; j < m->n; j++)
            count += m->subs[j] && !((uintptr_t)m->subs[j] & kept) && m->subs[j]->group == s->group;
        size_t pick = (size_t)(atomic_fetch_add_explicit(&s->group->rr, 1, memory_order_relaxed) % count);
        for (size_t j = i; j < m->n; j++) {
            keel_bus_sub *x = m->subs[j];
            if (x && !((uintptr_t)x & kept) && x->group == s->group)
                m->subs[j] = pick-- == 0 ? (keel_bus_sub *)((uintptr_t)x | kept) : NULL;
        }
    }
    size_t out = 0;
    for (size_t i = 0; i < m->n; i++)
        if (m->subs[i])
            m->subs[out++] = (keel_bus_sub *)((uintptr_t)m->subs[i] & ~kept);
    m->n = out;
}

/* The matches of a subject; with a group id, that group's members only
 * (one of them after the pick). */
static int match(keel_bus *bus, const btoks *t, bmatch *m, uint64_t group)
{
    m->subs = m->local;
    m->n = 0;
    m->cap = sizeof m->local / sizeof m->local[0];
    int rc = keel__rcu_read_lock();
    if (rc)
        return rc;
    rc = collect(&bus->root, t, 0, m);
    if (rc == 0 && group) {
        size_t kept = 0;
        for (size_t i = 0; i < m->n; i++)
            if (m->subs[i]->group_id == group)
                m->subs[kept++] = m->subs[i];
        m->n = kept;
    }
    if (rc == 0 && m->n) {
        if (m->n <= 16) { /* insertion sort: matches come nearly sorted */
            for (size_t i = 1; i < m->n; i++)
                for (size_t j = i; j > 0 && m->subs[j - 1]->seq > m->subs[j]->seq; j--) {
                    keel_bus_sub *x = m->subs[j];
                    m->subs[j] = m->subs[j - 1];
                    m->subs[j - 1] = x;
                }
        } else {
            qsort(m->subs, m->n, sizeof m->subs[0], by_seq);
        }
        pick_groups(m);
    }
    for (size_t i = 0; rc == 0 && i < m->n; i++)
        atomic_fetch_add_explicit(&m->subs[i]->refs, 1, memory_order_relaxed);
    keel__rcu_read_unlock();
    if (rc)
        keel__bus_match_free(m);
    return rc;
}

int keel__bus_match(keel_bus *bus, const btoks *t, bmatch *m) { return match(bus, t, m, 0); }

int keel__bus_matches(keel_bus *bus, const btoks *t)
{
    bmatch m = {.cap = sizeof m.local / sizeof m.local[0]};
    m.subs = m.local;
    int rc = keel__rcu_read_lock();
    if (rc)
        return rc;
    rc = collect(&bus->root, t, 0, &m); /* no pick_groups(): no group's turn taken */
    keel__rcu_read_unlock();
    size_t n = m.n;
    keel__bus_match_free(&m);
    return rc ? rc : n > 0;
}

void keel__bus_match_free(bmatch *m)
{
    if (m->subs != m->local)
        keel__free(m->subs);
    m->subs = m->local;
    m->n = 0;
}

/* ---- calls ---- */

/* The calls this thread has in progress, innermost first. */
typedef struct bframe {
    keel_bus_sub *sub;
    struct bframe *up;
} bframe;
static __thread bframe *tl_frames;
static __thread keel_bus *tl_worker; /* the bus whose worker or reader this thread is */

/* Drops n references; the last frees the subscription. */
static void sub_unref_n(keel_bus_sub *sub, uint64_t n)
{
    if (atomic_fetch_sub_explicit(&sub->refs, n, memory_order_acq_rel) == n) {
        keel__free(sub->pattern);
        keel__aligned_free(sub);
    }
}

void keel__bus_sub_unref(keel_bus_sub *sub) { sub_unref_n(sub, 1); }

void keel__bus_error(keel_bus *bus, keel_bus_sub *sub, const keel_bus_msg *msg, int err)
{
    if (bus->o.on_error)
        bus->o.on_error(sub, msg, err, bus->o.ud);
}

/* Brackets a call on behalf of sub (see the top of the file): false once
 * it has been unsubscribed. The caller pushes a frame between the two. */
static bool enter(keel_bus_sub *sub)
{
    atomic_fetch_add(&sub->calls, 1);
    if (!atomic_load(&sub->dead))
        return true;
    atomic_fetch_sub(&sub->calls, 1);
    return false;
}

static void leave(keel_bus_sub *sub) { atomic_fetch_sub_explicit(&sub->calls, 1, memory_order_release); }

/* The handler's call and its outcome; between enter() and leave(). */
static int call_entered(keel_bus_sub *sub, const keel_bus_msg *msg)
{
    keel_bus *bus = sub->bus;
    int rc = sub->handler(msg, sub->ud);
    if (rc == 0) {
        keel__stripe_add(&keel__bus_counters(bus)->delivered, 1);
    } else { /* reported before leaving, and only while subscribed (the handler
                * may have unsubscribed itself): on_error never follows an unsubscribe */
        keel__stripe_add(&keel__bus_counters(bus)->failed, 1);
        if (!atomic_load(&sub->dead))
            keel__bus_error(bus, sub, msg, rc);
    }
    return rc;
}

/* Calls sub's handler (its result in *rc); false if it was unsubscribed. */
static bool call(keel_bus_sub *sub, const keel_bus_msg *msg, int *rc)
{
    if (!enter(sub))
        return false;
    bframe f = {sub, tl_frames};
    tl_frames = &f;
    *rc = call_entered(sub, msg);
    tl_frames = f.up;
    leave(sub);
    return true;
}

/* A queue group's delivery that no member takes: counted and reported
 * with no subscription (the one it was for is gone). */
static void group_lost(keel_bus *bus, const keel_bus_msg *msg, int err)
{
    keel__stripe_add(&keel__bus_counters(bus)->dropped, 1);
    keel__bus_error(bus, NULL, msg, err);
}

/* Another member of queue group `group` that matches the subject t,
 * picked as a publish picks, with a reference (see the top of the file);
 * NULL when none is left (*err KEEL_ENOTFOUND) or no memory to look
 * (KEEL_ENOMEM). */
static keel_bus_sub *pick(keel_bus *bus, uint64_t group, const btoks *t, int *err)
{
    bmatch m;
    int rc = match(bus, t, &m, group);
    if (rc == 0) {
        keel_bus_sub *to = m.n ? m.subs[0] : NULL;
        keel__bus_match_free(&m);
        if (to)
            return to;
        rc = KEEL_ENOTFOUND;
    }
    *err = rc;
    return NULL;
}

/* pick(), the delivery lost when there is none. */
static keel_bus_sub *repick(keel_bus *bus, uint64_t group, const btoks *t, const keel_bus_msg *msg)
{
    int rc;
    keel_bus_sub *to = pick(bus, group, t, &rc);
    if (!to)
        group_lost(bus, msg, rc);
    return to;
}

/* Runs msg on a member of queue group `group`, picked (and replaced in
 * turn if it leaves before its call), here whatever its mode: true, its
 * result in *rc; false, pick()'s error there, when none is left. */
static bool call_member(keel_bus *bus, uint64_t group, const btoks *t, const keel_bus_msg *msg, int *rc)
{
    for (keel_bus_sub *to; (to = pick(bus, group, t, rc));) {
        bool ran = call(to, msg, rc);
        keel__bus_sub_unref(to);
        if (ran)
            return true;
    }
    return false;
}

int keel__bus_call(keel_bus_sub *sub, const btoks *t, const keel_bus_msg *msg, int *rc)
{
    *rc = 0;
    if (call(sub, msg, rc))
        return 1;
    if (!sub->group_id)
        return 0;
    return call_member(sub->bus, sub->group_id, t, msg, rc) ? 1 : -1;
}

bool keel__bus_in_worker(keel_bus *bus) { return tl_worker == bus; }
void keel__bus_set_worker(keel_bus *bus) { tl_worker = bus; }

/* ---- async workers ---- */

static void msg_unref(bmsg *m)
{
    if (atomic_fetch_sub_explicit(&m->refs, 1, memory_order_acq_rel) != 1)
        return;
    if (m->pool)
        keel_pool_release(m->pool, m);
    else
        keel__free(m);
}

/* The slot of a queue position. Consecutive positions go to consecutive
 * cache lines (the index rotated left by one bit), and the two slots of a
 * line are half the ring apart: the worker freeing one slot and a
 * publisher filling the next never write the same line. */
static inline bslot *slot_at(const bworker *w, size_t mask, uint64_t pos)
{
    uint64_t i = pos & mask;
    return &w->ring[((i << 1) | (i >> w->bus->rot)) & mask];
}

static bool ring_push(bworker *w, size_t mask, keel_bus_sub *sub, bmsg *m)
{
    uint64_t pos = atomic_load_explicit(&w->tail, memory_order_relaxed);
    for (;;) {
        bslot *sl = slot_at(w, mask, pos);
        int64_t dif = (int64_t)(atomic_load_explicit(&sl->seq, memory_order_acquire) - pos);
        if (dif == 0) {
            if (atomic_compare_exchange_weak_explicit(&w->tail, &pos, pos + 1, memory_order_relaxed,
                                                      memory_order_relaxed)) {
                sl->sub = sub;
                sl->m = m;
                atomic_store_explicit(&sl->seq, pos + 1, memory_order_release);
                return true;
            }
        } else if (dif < 0) {
            return false; /* full */
        } else {
            pos = atomic_load_explicit(&w->tail, memory_order_relaxed);
        }
    }
}

static bool ring_pop(bworker *w, size_t mask, bslot *out)
{
    uint64_t pos = atomic_load_explicit(&w->head, memory_order_relaxed);
    for (;;) {
        bslot *sl = slot_at(w, mask, pos);
        int64_t dif = (int64_t)(atomic_load_explicit(&sl->seq, memory_order_acquire) - (pos + 1));
        if (dif == 0) {
            if (atomic_compare_exchange_weak_explicit(&w->head, &pos, pos + 1, memory_order_relaxed,
                                                      memory_order_relaxed)) {
                out->sub = sl->sub;
                out->m = sl->m;
                atomic_store_explicit(&sl->seq, pos + mask + 1, memory_order_release);
                return true;
            }
        } else if (dif < 0) {
            return false; /* empty (or the next one is still being written) */
        } else {
            pos = atomic_load_explicit(&w->head, memory_order_relaxed);
        }
    }
}

static bool ring_ready(bworker *w, size_t mask)
{
    uint64_t pos = atomic_load_explicit(&w->head, memory_order_relaxed);
    return atomic_load_explicit(&slot_at(w, mask, pos)->seq, memory_order_acquire) == pos + 1;
}

static void wake(bworker *w, pthread_cond_t *cv)
{
    pthread_mutex_lock(&w->mu);
    pthread_cond_broadcast(cv);
    pthread_mutex_unlock(&w->mu);
}

/* n deliveries were run or dropped: tells drain. */
static void finished(bworker *w, uint64_t n)
{
    atomic_fetch_add(&w->done, n);
    if (atomic_load(&w->drain_waiters))
        wake(w, &w->done_cv);
}

/* Runs msg, queued for a member of queue group `group` that has left, on
 * another member, here in the worker whatever its mode (see the top of
 * the file); one that leaves before its call is replaced in turn. */
static void regroup(keel_bus *bus, uint64_t group, const keel_bus_msg *msg)
{
    btoks t;
    (void)keel__bus_tokens(msg->subject, msg->subject_len, false, &t); /* published: valid */
    int rc;
    if (!call_member(bus, group, &t, msg, &rc))
        group_lost(bus, msg, rc);
}

/* Delivers a run of queued messages for one subscription, entering it
 * once rather than once a message (the shared lines of a subscription
 * are what a delivery costs most); a handler that unsubscribes, or an
 * unsubscribe from elsewhere, stops the run: the rest is skipped, or
 * re-routed for a queue group's member. Drops the run's references. */
static void deliver_run(bslot *run, size_t n)
{
    keel_bus_sub *sub = run[0].sub;
    size_t i = 0;
    if (enter(sub)) {
        bframe f = {sub, tl_frames};
        tl_frames = &f;
        for (; i < n && !atomic_load(&sub->dead); i++)
            call_entered(sub, &run[i].m->v);
        tl_frames = f.up;
        leave(sub);
    }
    for (; sub->group_id && i < n; i++)
        regroup(sub->bus, sub->group_id, &run[i].m->v);
    for (i = 0; i < n; i++)
        msg_unref(run[i].m);
    sub_unref_n(sub, n);
}

static void *worker_main(void *arg)
{
    bworker *w = arg;
    size_t mask = w->bus->mask;
    keel__bus_set_worker(w->bus);
    bslot batch[64];
    for (;;) {
        size_t got = 0;
        while (got < 64 && ring_pop(w, mask, &batch[got]))
            got++;
        if (got) {
            KEEL__FULL_FENCE(); /* the pops before the load: a blocked publisher is woken */
            if (atomic_load_explicit(&w->space_waiters, memory_order_relaxed))
                wake(w, &w->space);
            for (size_t i = 0, n; i < got; i += n) {
                n = 1;
                while (i + n < got && batch[i + n].sub == batch[i].sub)
                    n++;
                deliver_run(&batch[i], n);
            }
            finished(w, got);
            continue;
        }
        /* Empty: spin a while (pausing, then yielding), then sleep. */
        bool ready = false;
        for (int i = 0; i < 300 && !(ready = ring_ready(w, mask)); i++)
            keel__spin(i);
        if (ready)
            continue;
        atomic_store_explicit(&w->sleeping, 1, memory_order_relaxed);
        keel__heavy_fence();
        pthread_mutex_lock(&w->mu);
        while (!w->stop && !(ready = ring_ready(w, mask)))
            pthread_cond_wait(&w->work, &w->mu);
        bool stop = w->stop && !ready && atomic_load(&w->tail) == atomic_load(&w->head);
        pthread_mutex_unlock(&w->mu);
        atomic_store_explicit(&w->sleeping, 0, memory_order_relaxed);
        if (stop)
            break;
    }
    return NULL;
}

/* Pops the oldest delivery of a full queue and reports it. Finished
 * before the report: on_error may drain, which must not wait for it.
 * One for a subscription that left is what the worker would have done
 * with it: a queue group's, which it would have re-routed, is dropped
 * and reported with no subscription (as when no member is left);
 * another's, which it would have skipped, is only skipped. */
static void drop_oldest(keel_bus *bus, bworker *w)
{
    bslot v;
    if (!ring_pop(w, bus->mask, &v))
        return;
    finished(w, 1);
    if (enter(v.sub)) {
        keel__stripe_add(&keel__bus_counters(bus)->dropped, 1);
        bframe f = {v.sub, tl_frames};
        tl_frames = &f;
        keel__bus_error(bus, v.sub, &v.m->v, KEEL_EFULL);
        tl_frames = f.up;
        leave(v.sub);
    } else if (v.sub->group_id) {
        group_lost(bus, &v.m->v, KEEL_EFULL);
    }
    keel__bus_sub_unref(v.sub);
    msg_unref(v.m);
}

/* Queues one delivery; on failure the caller keeps its references.
 * *until is the publish's deadline for KEEL_BUS_BLOCK, set by its first
 * wait (tv_sec -1 until then): the deliveries of one publish share one
 * block_timeout_ns. */
static int enqueue(keel_bus *bus, keel_bus_sub *sub, bmsg *m, uint64_t subject_hash, struct timespec *until)
{
    bworker *w = &bus->workers[subject_hash % bus->nworkers];
    int rc = 0;
    while (!ring_push(w, bus->mask, sub, m)) {
        if (bus->o.on_full == KEEL_BUS_DROP_OLDEST) {
            /* a push can fail while the worker is releasing a slot: drop
             * only from a queue that is really full. The head first: read
             * after it, the tail is never behind it, so the difference
             * cannot wrap. */
            uint64_t head = atomic_load(&w->head);
            if (atomic_load(&w->tail) - head >= bus->cap)
                drop_oldest(bus, w);
            continue;
        }
        if (bus->o.on_full == KEEL_BUS_REJECT || keel__bus_in_worker(bus)) {
            rc = KEEL_EFULL; /* a worker never blocks: it may be the one to make room */
            break;
        }
        if (bus->o.block_timeout_ns && until->tv_sec < 0)
            keel__abstime_in(bus->o.block_timeout_ns, until);
        pthread_mutex_lock(&w->mu);
        atomic_fetch_add(&w->space_waiters, 1);
        /* The count before the ring's loads: the worker stores a slot,
         * fences, then loads the count (worker_main), so one of the two
         * sees the other. A seq_cst RMW alone does not order the acquire
         * loads after it in C11: a fence does, and the wait is slow anyway. */
        KEEL__FULL_FENCE();
        /* one push after the time is up: room made at the last moment is
         * taken, and a push that succeeded is never tried again */
        for (bool late = false; !ring_push(w, bus->mask, sub, m);) {
            if (late) {
                rc = KEEL_ETIMEDOUT;
                break;
            }
            if (!bus->o.block_timeout_ns)
                pthread_cond_wait(&w->space, &w->mu);
            else
                late = pthread_cond_timedwait(&w->space, &w->mu, until) != 0;
        }
        atomic_fetch_sub(&w->space_waiters, 1);
        pthread_mutex_unlock(&w->mu);
        break;
    }
    if (rc) {
        keel__stripe_add(&keel__bus_counters(bus)->rejected, 1);
        return rc;
    }
    keel__light_fence(); /* the push before the load: see worker_main */
    if (atomic_load_explicit(&w->sleeping, memory_order_relaxed))
        wake(w, &w->work);
    return 0;
}

/* Stops and joins the first n workers; each runs what its queue holds. */
static void stop_workers(keel_bus *bus, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        bworker *w = &bus->workers[i];
        pthread_mutex_lock(&w->mu);
        w->stop = true;
        pthread_cond_broadcast(&w->work);
        pthread_mutex_unlock(&w->mu);
    }
    for (size_t i = 0; i < n; i++)
        pthread_join(bus->workers[i].th, NULL);
}

/* Starts the workers on the first async subscription; under bus->mu. */
static int start_workers(keel_bus *bus)
{
    if (bus->workers_started)
        return 0;
    keel_pool_opts po = {.obj_size = BUS_SMALL_MSG, .align = KEEL__CACHELINE};
    if (!bus->msgs && keel_pool_create(&bus->msgs, &po) != 0)
        return KEEL_ENOMEM;
    size_t started = 0;
    int rc = 0;
    for (; started < bus->nworkers; started++) {
        bworker *w = &bus->workers[started];
        w->stop = false;
        if (!w->ring) {
            if (!(w->ring = keel__aligned_alloc(KEEL__CACHELINE, bus->cap * sizeof *w->ring))) {
                rc = KEEL_ENOMEM;
                break;
            }
            for (size_t i = 0; i < bus->cap; i++)
                atomic_init(&slot_at(w, bus->mask, i)->seq, i);
        }
        if (pthread_create(&w->th, NULL, worker_main, w) != 0) {
            rc = KEEL_ENOMEM;
            break;
        }
    }
    if (rc)
        stop_workers(bus, started);
    else
        bus->workers_started = true;
    return rc;
}

/* ---- ids ---- */

/* Writes v in decimal at p; returns the end. (snprintf costs more than
 * the rest of a publish.) */
static char *put_u64(char *p, uint64_t v)
{
    char tmp[20];
    size_t n = 0;
    do
        tmp[n++] = (char)('0' + v % 10);
    while ((v /= 10) != 0);
    while (n)
        *p++ = tmp[--n];
    return p;
}

/* The last id handed out, by every bus of the process: two buses publishing
 * in the same millisecond still give different ids. */
static _Atomic uint64_t idstate;

/* A time-ordered id, unique in the process: milliseconds, then a sequence
 * within them (20 bits; one that overflows borrows the next millisecond).
 * The time is the coarse clock's, as of the last kernel tick: a precise
 * read cost a fifth of an asynchronous delivery. *time_ns is the id's
 * millisecond, not this thread's reading, when the two are a tick apart
 * at most: another thread may have moved the id past it, and a message's
 * time must not go back in id order. Further apart, the clock stepped
 * back (ids count on from where they were): the reading, as a time an
 * hour ahead would be wrong for as long as the step. */
static void make_id(char id[KEEL_BUS_ID_MAX], uint64_t *time_ns)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME_COARSE, &ts);
    uint64_t ns = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    uint64_t want = ns / 1000000u << 20;
    uint64_t cur = atomic_load_explicit(&idstate, memory_order_relaxed), next;
    do
        next = want > cur ? want : cur + 1;
    while (!atomic_compare_exchange_weak_explicit(&idstate, &cur, next, memory_order_relaxed,
                                                  memory_order_relaxed));
    uint64_t id_ms = next >> 20, ms = ns / 1000000u;
    *time_ns = id_ms - ms <= 10 ? id_ms * 1000000u : ns; /* a coarse tick: 1-10 ms */
    static __thread uint64_t tl_ms = UINT64_MAX; /* the last millisecond written, as text */
    static __thread char tl_text[24];
    static __thread size_t tl_len;
    if (next >> 20 != tl_ms) {
        tl_ms = next >> 20;
        tl_len = (size_t)(put_u64(tl_text, tl_ms) - tl_text);
        tl_text[tl_len++] = '-';
    }
    memcpy(id, tl_text, 24);
    char *p = id + tl_len;
    *put_u64(p, next & 0xfffff) = '\0';
}

/* ---- publish ---- */

static int check_headers(const keel_bus_header *h, size_t n)
{
    if (n && !h)
        return KEEL_EINVAL;
    if (n > 64)
        return KEEL_EINVAL;
    for (size_t i = 0; i < n; i++)
        if (!h[i].key || !h[i].key[0] || !h[i].value)
            return KEEL_EINVAL;
    return 0;
}

/* A copy of the message the async deliveries share. */
static bmsg *msg_copy(keel_bus *bus, const keel_bus_msg *v, size_t refs)
{
    size_t sz = sizeof(bmsg) + v->nheaders * sizeof(keel_bus_header) + v->subject_len + 1;
    for (size_t i = 0; i < v->nheaders; i++)
        sz += strlen(v->headers[i].key) + strlen(v->headers[i].value) + 2;
    if (v->len > SIZE_MAX - sz) /* no copy can hold it: not a wrapped small one */
        return NULL;
    sz += v->len;
    keel_pool *pool = sz <= BUS_SMALL_MSG ? bus->msgs : NULL;
    bmsg *m = pool ? keel_pool_acquire(pool) : keel__malloc(sz);
    if (!m)
        return NULL;
    atomic_init(&m->refs, refs);
    m->pool = pool;
    char *p = (char *)(m->hdr + v->nheaders);
    m->v = *v;
    memcpy(m->id, v->id, KEEL_BUS_ID_MAX);
    m->v.id = m->id;
    m->v.subject = memcpy(p, v->subject, v->subject_len + 1);
    p += v->subject_len + 1;
    m->v.data = v->len ? memcpy(p, v->data, v->len) : p;
    p += v->len;
    for (size_t i = 0; i < v->nheaders; i++) {
        size_t kl = strlen(v->headers[i].key) + 1, vl = strlen(v->headers[i].value) + 1;
        m->hdr[i].key = memcpy(p, v->headers[i].key, kl);
        m->hdr[i].value = memcpy(p + kl, v->headers[i].value, vl);
        p += kl + vl;
    }
    m->v.headers = m->hdr;
    return m;
}

/* Calls s, a sync subscription a publish chose, and drops its reference.
 * If s left before the call and is a queue group's member, another member
 * takes the message, picked as the publish would have: a sync one is
 * called here in turn, an async one is returned (with a reference) for
 * the publish to queue. NULL when done. */
static keel_bus_sub *call_sync(keel_bus *bus, keel_bus_sub *s, const btoks *t, const keel_bus_msg *v)
{
    int rc;
    while (!call(s, v, &rc) && s->group_id) {
        keel_bus_sub *to = repick(bus, s->group_id, t, v);
        keel__bus_sub_unref(s);
        if (!(s = to) || s->mode == KEEL_BUS_ASYNC)
            return s;
    }
    keel__bus_sub_unref(s);
    return NULL;
}

static int publish_local(keel_bus *bus, keel_bus_pub *p)
{
    btoks t;
    size_t slen = strnlen(p->subject, KEEL_BUS_SUBJECT_MAX + 1);
    int rc = keel__bus_tokens(p->subject, slen, false, &t);
    if (rc)
        return rc;
    keel_bus_msg v = {p->subject, slen, p->data, p->len, p->headers, p->nheaders, p->id, 0};
    make_id(p->id, &v.time_ns);
    bmatch m;
    if ((rc = keel__bus_match(bus, &t, &m)))
        return rc;
    size_t async = 0;
    for (size_t i = 0; i < m.n; i++)
        async += m.subs[i]->mode == KEEL_BUS_ASYNC;
    bmsg *copy = NULL;
    if (async && !(copy = msg_copy(bus, &v, async))) { /* before any delivery: then none is made */
        for (size_t i = 0; i < m.n; i++)
            keel__bus_sub_unref(m.subs[i]);
        keel__bus_match_free(&m);
        return KEEL_ENOMEM;
    }
    keel__stripe_add(&keel__bus_counters(bus)->published, 1);
    uint64_t sh = async ? keel__hash64(p->subject, slen, 0) : 0;
    struct timespec until = {-1, 0};
    for (size_t i = 0; i < m.n; i++) {
        keel_bus_sub *s = m.subs[i];
        bmsg *c = copy;
        if (s->mode == KEEL_BUS_SYNC) {
            if (!(s = call_sync(bus, s, &t, &v)))
                continue;
            /* an async member takes it from a sync one that left: its own
             * copy (`copy` may be gone with the deliveries it counted) */
            sh = keel__hash64(p->subject, slen, 0);
            if (!(c = msg_copy(bus, &v, 1))) {
                group_lost(bus, &v, KEEL_ENOMEM);
                keel__bus_sub_unref(s);
                continue;
            }
        }
        int e = enqueue(bus, s, c, sh, &until);
        if (e == 0)
            continue; /* the worker drops both references */
        msg_unref(c);
        if (!rc)
            rc = e;
        keel__bus_sub_unref(s);
    }
    keel__bus_match_free(&m);
    return rc;
}

KEEL_API int keel_bus_publish(keel_bus *bus, const char *subject, const void *data, size_t len,
                              const keel_bus_header *headers, size_t nheaders, char id[KEEL_BUS_ID_MAX])
{
    keel_bus_pub p = {subject, data, len, headers, nheaders, 0, {0}};
    int rc = keel_bus_publish_many(bus, &p, 1);
    if (id)
        memcpy(id, p.id, KEEL_BUS_ID_MAX);
    return rc;
}

KEEL_API int keel_bus_publish_many(keel_bus *bus, keel_bus_pub *pubs, size_t n)
{
    if (!bus || (n && !pubs))
        return KEEL_EINVAL;
    for (size_t i = 0; i < n; i++) {
        keel_bus_pub *p = &pubs[i];
        p->id[0] = '\0';
        btoks t;
        p->rc = !p->subject || (p->len && !p->data) ? KEEL_EINVAL : check_headers(p->headers, p->nheaders);
        if (p->rc == 0 && bus->stream)
            p->rc = keel__bus_tokens(p->subject, strnlen(p->subject, KEEL_BUS_SUBJECT_MAX + 1), false, &t);
    }
    int first = 0;
    if (bus->stream) {
        first = keel__bus_stream_publish(bus->stream, pubs, n);
    } else {
        for (size_t i = 0; i < n; i++)
            if (pubs[i].rc == 0)
                pubs[i].rc = publish_local(bus, &pubs[i]);
    }
    for (size_t i = 0; i < n && !first; i++)
        first = pubs[i].rc;
    return first;
}

/* ---- subscriptions ---- */

static bgroup *group_get(keel_bus *bus, const char *name)
{
    for (bgroup *g = bus->groups; g; g = g->next)
        if (strcmp(g->name, name) == 0)
            return g;
    bgroup *g = keel__calloc(1, sizeof *g);
    if (!g || !(g->name = keel__strdup(name))) {
        keel__free(g);
        return NULL;
    }
    g->id = ++bus->next_group;
    g->next = bus->groups;
    bus->groups = g;
    return g;
}

static void group_leave(keel_bus *bus, bgroup *g)
{
    if (!g || --g->members)
        return;
    for (bgroup **pp = &bus->groups; *pp; pp = &(*pp)->next)
        if (*pp == g) {
            *pp = g->next;
            break;
        }
    g->next = bus->g_groups;
    bus->g_groups = g;
    bus->g_count++;
}

/* Adds (or removes) sub's entry in the trie; under bus->mu. */
static int trie_change(keel_bus *bus, keel_bus_sub *sub, bool add)
{
    btoks t;
    int rc = keel__bus_tokens(sub->pattern, strlen(sub->pattern), true, &t);
    if (rc)
        return rc;
    bool full = is_full(&t, t.n - 1);
    bnode *last, *n = walk(bus, &t, full ? t.n - 1 : t.n, add, &last);
    rc = n ? arr_change(bus, full ? &n->full : &n->here, sub, add) : add ? KEEL_ENOMEM : KEEL_EINVAL;
    prune(bus, last);
    return rc;
}

KEEL_API int keel_bus_subscribe(keel_bus *bus, const keel_bus_sub_opts *o, keel_bus_sub **out)
{
    btoks t;
    if (!bus || !o || !out || !o->pattern || !o->handler ||
        (o->mode != KEEL_BUS_SYNC && o->mode != KEEL_BUS_ASYNC) || (o->group && !o->group[0]) ||
        keel__bus_tokens(o->pattern, strnlen(o->pattern, KEEL_BUS_SUBJECT_MAX + 1), true, &t))
        return KEEL_EINVAL;
    keel_bus_sub *s = keel__aligned_alloc(KEEL__CACHELINE, sizeof *s);
    if (s)
        memset(s, 0, sizeof *s);
    if (!s || !(s->pattern = keel__strdup(o->pattern))) {
        keel__aligned_free(s);
        return KEEL_ENOMEM;
    }
    s->bus = bus;
    s->handler = o->handler;
    s->ud = o->ud;
    s->mode = bus->stream ? KEEL_BUS_SYNC : o->mode;
    atomic_init(&s->refs, 1);
    if (bus->stream && keel__bus_stream_pattern(bus->stream, s->pattern, true) != 0) {
        keel__free(s->pattern);
        keel__aligned_free(s);
        return KEEL_ENOMEM;
    }
    pthread_mutex_lock(&bus->mu);
    int rc = s->mode == KEEL_BUS_ASYNC ? start_workers(bus) : 0;
    if (rc == 0 && o->group && !(s->group = group_get(bus, o->group)))
        rc = KEEL_ENOMEM;
    if (s->group) {
        s->group->members++;
        s->group_id = s->group->id;
    }
    s->seq = bus->next_seq++;
    if (rc == 0)
        rc = trie_change(bus, s, true);
    if (rc)
        group_leave(bus, s->group);
    else
        atomic_fetch_add_explicit(&bus->nsubs, 1, memory_order_relaxed);
    bool gc = bus->g_count >= 64;
    pthread_mutex_unlock(&bus->mu);
    if (gc || rc)
        collect_garbage(bus, false);
    if (rc) {
        if (bus->stream)
            keel__bus_stream_pattern(bus->stream, s->pattern, false);
        keel__free(s->pattern);
        keel__aligned_free(s);
        return rc;
    }
    *out = s;
    return 0;
}

static size_t own_calls(const keel_bus_sub *sub)
{
    size_t n = 0;
    for (const bframe *f = tl_frames; f; f = f->up)
        n += f->sub == sub;
    return n;
}

KEEL_API int keel_bus_unsubscribe(keel_bus_sub *sub)
{
    if (!sub)
        return KEEL_EINVAL;
    if (keel__rcu_in_read())
        return KEEL_ESTATE;
    if (atomic_exchange(&sub->dead, 1)) /* a second (or concurrent) unsubscribe */
        return KEEL_EINVAL;
    keel_bus *bus = sub->bus;
    pthread_mutex_lock(&bus->mu);
    /* Out of memory for the smaller array: the subscription stays in the
     * trie, dead (never called), until destroy frees it; so does its
     * group, which publishers still reach through it. */
    bool removed = trie_change(bus, sub, false) == 0;
    if (removed)
        group_leave(bus, sub->group);
    atomic_fetch_sub_explicit(&bus->nsubs, 1, memory_order_relaxed);
    pthread_mutex_unlock(&bus->mu);
    if (bus->stream) /* never called again, left in the trie or not */
        keel__bus_stream_pattern(bus->stream, sub->pattern, false);
    collect_garbage(bus, true); /* after this no reader can take a new reference */
    size_t mine = own_calls(sub);
    for (unsigned spin = 0; atomic_load(&sub->calls) > mine; spin++) {
        struct timespec ts = {0, spin < 10 ? 1000 : 1000000};
        nanosleep(&ts, NULL);
    }
    if (removed)
        keel__bus_sub_unref(sub);
    return 0;
}

/* ---- drain, stats, lifetime ---- */

KEEL_API int keel_bus_start(keel_bus *bus)
{
    if (!bus)
        return KEEL_EINVAL;
    return bus->stream ? keel__bus_stream_start(bus->stream) : KEEL_ESTATE;
}

/* Waits until each worker has run what was queued on it at the call;
 * returns whether more was queued meanwhile (handlers publishing). */
static bool drain_pass(keel_bus *bus)
{
    uint64_t before = 0, after = 0;
    for (size_t i = 0; i < bus->nworkers; i++) {
        bworker *w = &bus->workers[i];
        uint64_t target = atomic_load(&w->tail);
        before += target;
        pthread_mutex_lock(&w->mu);
        atomic_fetch_add(&w->drain_waiters, 1);
        while (atomic_load(&w->done) < target)
            pthread_cond_wait(&w->done_cv, &w->mu);
        atomic_fetch_sub(&w->drain_waiters, 1);
        pthread_mutex_unlock(&w->mu);
    }
    for (size_t i = 0; i < bus->nworkers; i++)
        after += atomic_load(&bus->workers[i].tail);
    return after != before;
}

KEEL_API int keel_bus_drain(keel_bus *bus)
{
    if (!bus)
        return KEEL_EINVAL;
    if (keel__bus_in_worker(bus))
        return KEEL_ESTATE;
    if (bus->stream)
        return keel__bus_stream_drain(bus->stream);
    pthread_mutex_lock(&bus->mu);
    bool started = bus->workers_started;
    pthread_mutex_unlock(&bus->mu);
    if (started)
        drain_pass(bus);
    return 0;
}

KEEL_API void keel_bus_stats_get(keel_bus *bus, keel_bus_stats *st)
{
    if (!st)
        return;
    memset(st, 0, sizeof *st);
    if (!bus)
        return;
    for (size_t i = 0; i < KEEL__STRIPES; i++) {
        bcounters *c = &bus->c[i];
        st->published += atomic_load_explicit(&c->published, memory_order_relaxed);
        st->delivered += atomic_load_explicit(&c->delivered, memory_order_relaxed);
        st->failed += atomic_load_explicit(&c->failed, memory_order_relaxed);
        st->dropped += atomic_load_explicit(&c->dropped, memory_order_relaxed);
        st->rejected += atomic_load_explicit(&c->rejected, memory_order_relaxed);
        st->acked += atomic_load_explicit(&c->acked, memory_order_relaxed);
        st->claimed += atomic_load_explicit(&c->claimed, memory_order_relaxed);
        st->dead_lettered += atomic_load_explicit(&c->dead, memory_order_relaxed);
        st->skipped += atomic_load_explicit(&c->skipped, memory_order_relaxed);
    }
    st->subscriptions = atomic_load_explicit(&bus->nsubs, memory_order_relaxed);
    for (size_t i = 0; i < bus->nworkers; i++) {
        bworker *w = &bus->workers[i];
        uint64_t head = atomic_load(&w->head), tail = atomic_load(&w->tail);
        st->queued += tail > head ? tail - head : 0;
    }
}

KEEL__STAT_FN(m_published, keel_bus_stats, keel_bus_stats_get, published)
KEEL__STAT_FN(m_delivered, keel_bus_stats, keel_bus_stats_get, delivered)
KEEL__STAT_FN(m_failed, keel_bus_stats, keel_bus_stats_get, failed)
KEEL__STAT_FN(m_dropped, keel_bus_stats, keel_bus_stats_get, dropped)
KEEL__STAT_FN(m_rejected, keel_bus_stats, keel_bus_stats_get, rejected)
KEEL__STAT_FN(m_queued, keel_bus_stats, keel_bus_stats_get, queued)
KEEL__STAT_FN(m_acked, keel_bus_stats, keel_bus_stats_get, acked)
KEEL__STAT_FN(m_claimed, keel_bus_stats, keel_bus_stats_get, claimed)
KEEL__STAT_FN(m_dead, keel_bus_stats, keel_bus_stats_get, dead_lettered)
KEEL__STAT_FN(m_skipped, keel_bus_stats, keel_bus_stats_get, skipped)
KEEL__STAT_FN(m_subs, keel_bus_stats, keel_bus_stats_get, subscriptions)

static bool plain_name(const char *s)
{
    if (!s[0])
        return false;
    for (; *s; s++)
        if ((unsigned char)*s <= ' ' || *s == 0x7f)
            return false;
    return true;
}

KEEL_API int keel_bus_create(keel_bus **out, const keel_bus_opts *opts)
{
    keel_bus_opts o = opts ? *opts : (keel_bus_opts){0};
    if (!out || o.workers > 1024 || o.partitions > 64 || (unsigned)o.on_full > KEEL_BUS_DROP_OLDEST ||
        (o.service && !plain_name(o.service)) || (o.consumer && !plain_name(o.consumer)) ||
        (o.prefix && !o.prefix[0]) || o.capacity > ((size_t)1 << 32) || o.read_count > 100000)
        return KEEL_EINVAL;
    keel_bus *bus = keel__aligned_alloc(KEEL__CACHELINE, sizeof *bus);
    if (!bus)
        return KEEL_ENOMEM;
    memset(bus, 0, sizeof *bus);
    bus->o = o;
    bus->nworkers = o.workers ? o.workers : 2;
    for (bus->cap = 2; bus->cap < (o.capacity ? o.capacity : 65536);) /* the ring needs two */
        bus->cap <<= 1;
    bus->mask = bus->cap - 1;
    bus->rot = (unsigned)__builtin_ctzll(bus->cap) - 1;
    pthread_mutex_init(&bus->mu, NULL);
    keel__fences_init();
    int rc = 0;
    if (o.redis) {
        rc = keel__bus_stream_create(bus, &o, &bus->stream);
        bus->nworkers = 0;
    } else if (!(bus->workers = keel__aligned_alloc(KEEL__CACHELINE, bus->nworkers * sizeof *bus->workers))) {
        rc = KEEL_ENOMEM;
    }
    for (size_t i = 0; rc == 0 && i < bus->nworkers; i++) {
        bworker *w = &bus->workers[i];
        memset(w, 0, sizeof *w);
        w->bus = bus;
        pthread_mutex_init(&w->mu, NULL);
        pthread_condattr_t ca; /* timed waits count on the monotonic clock */
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&w->work, &ca);
        pthread_cond_init(&w->space, &ca);
        pthread_cond_init(&w->done_cv, &ca);
        pthread_condattr_destroy(&ca);
    }
    if (rc == 0 && o.metrics) {
        keel__mfunc fs[] = {
            {0, "keel_bus_published_total", "Messages published.", NULL, NULL, m_published},
            {0, "keel_bus_delivered_total", "Handler calls that succeeded.", NULL, NULL, m_delivered},
            {0, "keel_bus_failed_total", "Handler calls that failed.", NULL, NULL, m_failed},
            {0, "keel_bus_dropped_total",
             "Async deliveries dropped: from a full queue, or left by a queue group with no member.", NULL, NULL,
             m_dropped},
            {0, "keel_bus_rejected_total", "Async deliveries refused by a full queue.", NULL, NULL, m_rejected},
            {1, "keel_bus_queued", "Async deliveries waiting.", NULL, NULL, m_queued},
            {0, "keel_bus_acked_total", "Stream entries acknowledged.", NULL, NULL, m_acked},
            {0, "keel_bus_claimed_total", "Stream entries taken over from idle consumers.", NULL, NULL, m_claimed},
            {0, "keel_bus_dead_lettered_total", "Stream entries moved to the dead-letter stream.", NULL, NULL, m_dead},
            {0, "keel_bus_skipped_total", "Stream entries acknowledged unread: no consumer of the group subscribes.",
             NULL, NULL, m_skipped},
            {1, "keel_bus_subscriptions", "Live subscriptions.", NULL, NULL, m_subs},
        };
        rc = keel__metrics_funcs(o.metrics, "bus", o.metrics_name, fs, sizeof fs / sizeof fs[0], bus);
        if (rc)
            bus->o.metrics = NULL;
    }
    if (rc) {
        keel_bus_destroy(bus);
        return rc;
    }
    *out = bus;
    return 0;
}

static void free_node_tree(bnode *n, bool self)
{
    bkids *k = atomic_load_explicit(&n->kids, memory_order_relaxed);
    for (size_t i = 0; k && i < k->cap; i++) {
        bnode *c = atomic_load_explicit(&k->slot[i], memory_order_relaxed);
        if (c && c != &tomb)
            free_node_tree(c, true);
    }
    bnode *s = atomic_load_explicit(&n->star, memory_order_relaxed);
    if (s)
        free_node_tree(s, true);
    for (int which = 0; which < 2; which++) {
        sarr *a = atomic_load_explicit(which ? &n->full : &n->here, memory_order_relaxed);
        for (size_t i = 0; a && i < a->n; i++)
            keel__bus_sub_unref(a->s[i]);
        keel__free(a);
    }
    if (self)
        node_free(n);
    else
        keel__free(k);
}

KEEL_API void keel_bus_destroy(keel_bus *bus)
{
    if (!bus)
        return;
    if (bus->stream) {
        keel__bus_stream_stop(bus->stream);
        keel__bus_stream_destroy(bus->stream);
    }
    if (bus->workers_started) {
        /* until a pass finds nothing new: a handler may publish to a
         * worker that was already empty */
        while (drain_pass(bus))
            ;
        stop_workers(bus, bus->nworkers);
    }
    if (bus->o.metrics)
        keel_metrics_func_remove(bus->o.metrics, bus);
    for (size_t i = 0; bus->workers && i < bus->nworkers; i++) {
        bworker *w = &bus->workers[i];
        keel__aligned_free(w->ring);
        pthread_mutex_destroy(&w->mu);
        pthread_cond_destroy(&w->work);
        pthread_cond_destroy(&w->space);
        pthread_cond_destroy(&w->done_cv);
    }
    keel__aligned_free(bus->workers);
    keel_pool_destroy(bus->msgs);
    free_node_tree(&bus->root, false);
    garbage_free(bus->g_arrs, bus->g_kids, bus->g_nodes, bus->g_groups);
    garbage_free(NULL, NULL, NULL, bus->groups);
    pthread_mutex_destroy(&bus->mu);
    keel__aligned_free(bus);
}
