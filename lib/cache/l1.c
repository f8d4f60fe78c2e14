/* lib/cache/l1.c — keel_cache's first tier: a sharded hash table read
 * under RCU, with S3-FIFO eviction (Yang et al., SOSP 2023).
 *
 * Readers walk a bucket's chain without a lock, copy the value and mark
 * the entry used (a 2-bit counter, stored without a read-modify-write:
 * a lost increment costs nothing). Writers hold the shard's mutex: a new
 * entry is published at the head of its chain with a release store, an
 * old one unlinked (its own `next` left alone, so a reader standing on it
 * walks on) and freed after a grace period, in batches.
 *
 * A get is bound by cache misses, so both things it touches are kept
 * small: the shard's bucket table grows with the entries it holds (two to
 * four buckets an entry; doubled while readers go on, as in Triplett,
 * McKenney and Walpole's relativistic hash tables; never shrunk), and an
 * entry starts with what a reader needs, then its key and value; the FIFO
 * links, the tags and the load time come after them.
 *
 * S3-FIFO: new entries go to a small FIFO (a tenth of the shard), or to
 * the main FIFO when the ghost remembers their key was evicted recently.
 * Evicting from the small FIFO moves an entry used since its insert to the
 * main one, else drops it into the ghost; evicting from the main FIFO gives
 * a used entry another round (its counter decremented). A one-pass scan
 * thus churns the small FIFO and leaves the main one, the hot set, alone.
 * The ghost is a direct-mapped table of key hashes: an approximation that
 * forgets on collisions.
 */
#define _GNU_SOURCE
#include <stdalign.h>
#include <stddef.h>
#include <string.h>

#include "../rcu.h"
#include "cache_int.h"

#define NSHARDS 32
#define GARBAGE_BATCH 128

#define MIN_BUCKETS 64
/* The ghost has a slot for every 2^GHOST_SHIFT buckets: half a slot to one
 * an entry, about the size of the main FIFO, as in the paper. A ghost of a
 * slot a bucket remembered keys for so long that rare ones came back to
 * the main FIFO in place of hot ones: a quarter of it gains 0.2 to 1.2
 * points of hit ratio on every Zipf trace of bench/cache. */
#define GHOST_SHIFT 2

/* An entry: what a reader needs in 31 bytes, then the key and the value,
 * then `cold` (its tags, and after them the load time when has_delta). */
typedef struct l1e {
    _Atomic(struct l1e *) next; /* the bucket chain */
    uint64_t expires;
    uint32_t h;      /* the key hash's low half: the bucket, a quick compare */
    uint32_t vlen;   /* at most 512 MiB */
    uint16_t klen;   /* at most 1024 */
    uint8_t ntags;   /* at most CACHE_MAX_TAGS */
    uint8_t main, negative, has_delta;
    _Atomic uint8_t freq;
    char data[];
} l1e;

typedef struct l1cold {
    l1e *qprev, *qnext; /* its FIFO, under the shard's mutex; once retired,
                           qnext links the garbage list */
    l1_tagref tags[];
} l1cold;

/* A shard's buckets, replaced as a whole when the table grows. */
typedef struct ltab {
    size_t mask;
    _Atomic(l1e *) b[];
} ltab;

typedef struct fifo {
    l1e *head, *tail; /* insert at head, evict at tail */
    size_t bytes, n;
} fifo;

typedef struct shard {
    _Atomic(ltab *) tab; /* alone in its line: readers load it on every get */
    _Alignas(KEEL__CACHELINE) pthread_mutex_t mu;
    fifo small, main;
    uint32_t *ghost; /* ghost_tag()s, a slot for every 2^GHOST_SHIFT buckets */
    size_t bytes, items, max_bytes, max_items;
    l1e *garbage;
    size_t ngarbage, gbytes;
    uint64_t evictions, expirations;
} __attribute__((aligned(KEEL__CACHELINE))) shard;

struct l1 {
    shard shards[NSHARDS];
    keel__clock clock;
};

static void del(l1 *c, const void *key, size_t klen, uint64_t h, bool only_expired);

static shard *shard_of(l1 *c, uint64_t h) { return &c->shards[h >> 59]; }
static l1e *next_of(l1e *e) { return atomic_load_explicit(&e->next, memory_order_relaxed); }

/* Under the shard's mutex (readers load the table with acquire). */
static ltab *tab_of(shard *s) { return atomic_load_explicit(&s->tab, memory_order_relaxed); }
static _Atomic(l1e *) *bucket_of(shard *s, uint64_t h)
{
    ltab *t = tab_of(s);
    return &t->b[h & t->mask];
}

/* What the ghost keeps of a hash: its low half with the top bit set, so
 * that 0 means an empty slot. The top bit is never an index bit (tables
 * stop growing below 2^31 buckets). */
static uint32_t ghost_tag(uint64_t h) { return (uint32_t)h | 0x80000000u; }

/* The ghost slot of a hash, under the shard's mutex. */
static uint32_t *ghost_of(shard *s, uint64_t h) { return &s->ghost[h & (tab_of(s)->mask >> GHOST_SHIFT)]; }

static l1cold *cold(const l1e *e)
{
    uintptr_t end = (uintptr_t)(e->data + e->klen + e->vlen);
    return (l1cold *)((end + alignof(l1cold) - 1) & ~(uintptr_t)(alignof(l1cold) - 1));
}

static uint64_t *delta_of(const l1e *e) { return (uint64_t *)&cold(e)->tags[e->ntags]; }

static size_t entry_size(size_t klen, size_t vlen, size_t ntags, bool has_delta)
{
    size_t head = offsetof(l1e, data) + klen + vlen;
    head = (head + alignof(l1cold) - 1) & ~(alignof(l1cold) - 1);
    return head + sizeof(l1cold) + ntags * sizeof(l1_tagref) + (has_delta ? sizeof(uint64_t) : 0);
}

/* What an entry counts against the bounds: its size and the allocator's. */
static size_t charge_of(const l1e *e) { return entry_size(e->klen, e->vlen, e->ntags, e->has_delta) + 16; }

static ltab *tab_new(size_t n)
{
    ltab *t = keel__calloc(1, sizeof *t + n * sizeof t->b[0]);
    if (t)
        t->mask = n - 1;
    return t;
}

int keel__l1_create(l1 **out, size_t max_bytes, size_t max_items, const keel__clock *clock)
{
    l1 *c = keel__aligned_alloc(KEEL__CACHELINE, sizeof *c);
    if (!c)
        return KEEL_ENOMEM;
    memset(c, 0, sizeof *c);
    c->clock = *clock;
    int rc = 0;
    for (size_t i = 0; i < NSHARDS; i++) {
        shard *s = &c->shards[i];
        pthread_mutex_init(&s->mu, NULL);
        s->max_bytes = max_bytes / NSHARDS ? max_bytes / NSHARDS : 1;
        /* split exactly, so that the shards together hold max_items (but
         * one each at least) */
        size_t share = max_items / NSHARDS + (i < max_items % NSHARDS);
        s->max_items = !max_items ? SIZE_MAX : share ? share : 1;
        ltab *t = tab_new(MIN_BUCKETS);
        atomic_init(&s->tab, t);
        if (!t || !(s->ghost = keel__calloc(MIN_BUCKETS >> GHOST_SHIFT, sizeof *s->ghost)))
            rc = KEEL_ENOMEM;
    }
    if (rc) {
        keel__l1_destroy(c);
        return rc;
    }
    keel__fences_init();
    *out = c;
    return 0;
}

static void put_tags(const l1_tagref *t, size_t n)
{
    for (size_t i = 0; i < n; i++)
        keel__ctag_put(t[i].tag);
}

/* Frees an entry no reader can see, with its tags' references. */
static void free_entry(l1e *e)
{
    put_tags(cold(e)->tags, e->ntags);
    keel__free(e);
}

static void free_list(l1e *e)
{
    while (e) {
        l1e *x = e;
        e = cold(e)->qnext;
        free_entry(x);
    }
}

void keel__l1_destroy(l1 *c)
{
    if (!c)
        return;
    for (size_t i = 0; i < NSHARDS; i++) {
        shard *s = &c->shards[i];
        ltab *t = tab_of(s);
        for (size_t b = 0; t && b <= t->mask; b++)
            for (l1e *e = atomic_load_explicit(&t->b[b], memory_order_relaxed), *n; e; e = n) {
                n = next_of(e);
                free_entry(e);
            }
        free_list(s->garbage);
        keel__free(t);
        keel__free(s->ghost);
        pthread_mutex_destroy(&s->mu);
    }
    keel__aligned_free(c);
}

/* Whether two keys of n bytes are equal: short ones (most) without a call. */
static inline bool same_key(const char *a, const char *b, size_t n)
{
    if (n < 8 || n > 16)
        return memcmp(a, b, n) == 0;
    uint64_t a0, b0, a1, b1; /* two loads each, overlapping when n < 16 */
    memcpy(&a0, a, 8), memcpy(&b0, b, 8);
    memcpy(&a1, a + n - 8, 8), memcpy(&b1, b + n - 8, 8);
    return ((a0 ^ b0) | (a1 ^ b1)) == 0;
}

static bool tags_current(const l1e *e)
{
    const l1_tagref *t = cold(e)->tags;
    for (uint16_t i = 0; i < e->ntags; i++)
        if (atomic_load_explicit(&t[i].tag->version, memory_order_acquire) != t[i].version)
            return false;
    return true;
}

int keel__l1_get(l1 *c, const void *key, size_t klen, uint64_t h, void *buf, size_t cap, size_t *len, l1_hit *hit)
{
    shard *s = shard_of(c, h);
    int rc = keel__rcu_read_lock();
    if (rc)
        return KEEL_ENOTFOUND; /* no slot for this thread: go below */
    rc = KEEL_ENOTFOUND;
    bool expired = false;
    ltab *t = atomic_load_explicit(&s->tab, memory_order_acquire);
    for (l1e *e = atomic_load_explicit(&t->b[h & t->mask], memory_order_acquire); e;
         e = atomic_load_explicit(&e->next, memory_order_acquire)) {
        if (e->h != (uint32_t)h || e->klen != klen || !same_key(e->data, key, klen))
            continue;
        if (e->expires <= keel__clock_coarse(&c->clock)) { /* may be a tick late */
            expired = true;
            break;
        }
        if (e->ntags && !tags_current(e))
            break;
        uint8_t f = atomic_load_explicit(&e->freq, memory_order_relaxed);
        if (f < 3)
            atomic_store_explicit(&e->freq, (uint8_t)(f + 1), memory_order_relaxed);
        hit->expires = e->expires;
        hit->delta = e->has_delta ? *delta_of(e) : 0;
        hit->negative = e->negative;
        *len = e->vlen;
        if (e->negative) {
            rc = 0;
        } else if (e->vlen > cap) {
            rc = KEEL_ERANGE;
        } else {
            if (e->vlen) /* buf may be NULL with cap 0 */
                memcpy(buf, e->data + e->klen, e->vlen);
            rc = 0;
        }
        break;
    }
    keel__rcu_read_unlock();
    if (expired) /* take it out now, so that it stops costing memory */
        del(c, key, klen, h, true);
    return rc;
}

static void fifo_unlink(fifo *q, l1e *e)
{
    l1cold *x = cold(e);
    if (x->qprev)
        cold(x->qprev)->qnext = x->qnext;
    else
        q->head = x->qnext;
    if (x->qnext)
        cold(x->qnext)->qprev = x->qprev;
    else
        q->tail = x->qprev;
    x->qprev = x->qnext = NULL;
    q->bytes -= charge_of(e);
    q->n--;
}

static void fifo_push(fifo *q, l1e *e)
{
    l1cold *x = cold(e);
    x->qprev = NULL;
    x->qnext = q->head;
    if (q->head)
        cold(q->head)->qprev = e;
    else
        q->tail = e;
    q->head = e;
    q->bytes += charge_of(e);
    q->n++;
}

/* Takes e out of its chain and FIFO, to be freed after a grace period. */
static void retire(shard *s, l1e *e)
{
    _Atomic(l1e *) *pp = bucket_of(s, e->h);
    for (l1e *x; (x = atomic_load_explicit(pp, memory_order_relaxed)) != NULL; pp = &x->next)
        if (x == e) {
            atomic_store_explicit(pp, atomic_load_explicit(&e->next, memory_order_relaxed), memory_order_release);
            break;
        }
    fifo_unlink(e->main ? &s->main : &s->small, e);
    size_t charge = charge_of(e);
    s->bytes -= charge;
    s->items--;
    cold(e)->qnext = s->garbage;
    s->garbage = e;
    s->ngarbage++;
    s->gbytes += charge;
}

/* The first entry from e on (e included) that belongs in bucket j of a
 * table of the given mask. */
static l1e *first_of(l1e *e, size_t mask, size_t j)
{
    while (e && (e->h & mask) != j)
        e = next_of(e);
    return e;
}

/* Doubles the shard's table while readers go on. Each new bucket starts
 * at the first entry of its old chain that belongs to it; the old chains,
 * which interleave entries of two new buckets, are then unzipped one link
 * a chain at a time, with a grace period between rounds, so that a reader
 * of one bucket standing on an entry of the other always finds its way
 * back. The ghost grows with the table. It waits for grace periods with
 * the shard's mutex held: safe because no read section runs user code or
 * waits for a lock (lib/rcu.h), so no reader waits for this mutex. Called
 * outside any read section; on no memory the table stays as it is. */
static void grow(shard *s)
{
    ltab *old = tab_of(s), *t;
    size_t n = old->mask + 1;
    if (n >= (size_t)1 << 31) /* entries keep 32 bits of their hash */
        return;
    l1e **cur = keel__malloc(n * sizeof *cur);
    uint32_t *ghost = keel__calloc((2 * n) >> GHOST_SHIFT, sizeof *ghost);
    if (!cur || !ghost || !(t = tab_new(2 * n))) {
        keel__free(cur);
        keel__free(ghost);
        return;
    }
    for (size_t j = 0; j < 2 * n; j++)
        atomic_init(&t->b[j], first_of(atomic_load_explicit(&old->b[j & (n - 1)], memory_order_relaxed), t->mask, j));
    for (size_t i = 0; i < n; i++)
        cur[i] = atomic_load_explicit(&old->b[i], memory_order_relaxed);
    for (size_t i = 0; i < n >> GHOST_SHIFT; i++)
        if (s->ghost[i])
            ghost[s->ghost[i] & (t->mask >> GHOST_SHIFT)] = s->ghost[i];
    keel__free(s->ghost);
    s->ghost = ghost;
    atomic_store_explicit(&s->tab, t, memory_order_release);
    keel__rcu_synchronize(); /* nobody reads the old table any more */
    keel__free(old);
    for (bool more = true; more;) {
        more = false;
        for (size_t i = 0; i < n; i++) {
            l1e *x = cur[i], *y;
            if (!x)
                continue;
            while ((y = next_of(x)) != NULL && (y->h & n) == (x->h & n))
                x = y; /* x: the end of a run of one bucket's entries */
            if (y) { /* skip the other bucket's run that follows */
                atomic_store_explicit(&x->next, first_of(y, n, x->h & n), memory_order_release);
                more = true;
            }
            cur[i] = y;
        }
        if (more)
            keel__rcu_synchronize();
    }
    keel__free(cur);
}

/* The shard's garbage, when enough has gathered (or `all`): taken under
 * the mutex, freed after a grace period without it. Enough: a batch of
 * entries, or an eighth of the shard's bytes, so that memory held for
 * readers stays within the bound. A caller inside a read section cannot
 * wait for a grace period: the garbage stays for the next writer. */
static l1e *take_garbage(shard *s, bool all)
{
    if (!s->garbage || keel__rcu_in_read() ||
        (!all && s->ngarbage < GARBAGE_BATCH && s->gbytes * 8 < s->max_bytes))
        return NULL;
    l1e *g = s->garbage;
    s->garbage = NULL;
    s->ngarbage = 0;
    s->gbytes = 0;
    return g;
}

static void free_garbage(l1e *g)
{
    if (!g)
        return;
    keel__rcu_synchronize();
    free_list(g);
}

/* key's entry, or NULL; under the shard's mutex. */
static l1e *find_locked(shard *s, const void *key, size_t klen, uint64_t h)
{
    for (l1e *x = atomic_load_explicit(bucket_of(s, h), memory_order_relaxed); x; x = next_of(x))
        if (x->h == (uint32_t)h && x->klen == klen && memcmp(x->data, key, klen) == 0)
            return x;
    return NULL;
}

/* Retires key's entry (only if expired: a reader that found it so must
 * not take out a fresh one set meanwhile). */
static void del(l1 *c, const void *key, size_t klen, uint64_t h, bool only_expired)
{
    shard *s = shard_of(c, h);
    uint64_t now = keel__clock_now(&c->clock);
    pthread_mutex_lock(&s->mu);
    l1e *x = find_locked(s, key, klen, h);
    if (x && (!only_expired || x->expires <= now)) {
        s->expirations += x->expires <= now;
        retire(s, x);
    }
    l1e *g = take_garbage(s, false);
    pthread_mutex_unlock(&s->mu);
    free_garbage(g);
}

/* One step of S3-FIFO: frees one entry or moves one between FIFOs. With
 * `force` (the caller has given enough second chances: readers keep
 * raising the counters) the tail goes whatever its counter. */
static void evict_step(shard *s, uint64_t now, bool force)
{
    /* the small FIFO is held to a tenth of the shard, in bytes or in items */
    bool small_full = s->small.bytes * 10 >= s->max_bytes ||
                      (s->max_items != SIZE_MAX && s->small.n * 10 >= s->max_items);
    bool from_small = s->small.tail && (small_full || !s->main.tail);
    fifo *q = from_small ? &s->small : &s->main;
    l1e *e = q->tail;
    uint8_t f = atomic_load_explicit(&e->freq, memory_order_relaxed);
    if (e->expires > now && f > 0 && !force) {
        fifo_unlink(q, e);
        if (from_small) {
            e->main = 1;
            atomic_store_explicit(&e->freq, 0, memory_order_relaxed);
        } else {
            atomic_store_explicit(&e->freq, (uint8_t)(f - 1), memory_order_relaxed);
        }
        fifo_push(&s->main, e);
        return;
    }
    if (e->expires <= now)
        s->expirations++;
    else
        s->evictions++;
    if (from_small)
        *ghost_of(s, e->h) = ghost_tag(e->h);
    retire(s, e);
}

int keel__l1_set(l1 *c, const void *key, size_t klen, uint64_t h, const void *val, size_t vlen, uint64_t expires,
                 uint64_t delta, const l1_tagref *tags, size_t ntags, bool negative, _Atomic uint64_t *epoch,
                 _Atomic uint64_t *kepoch, uint64_t seen)
{
    shard *s = shard_of(c, h);
    size_t size = entry_size(klen, vlen, ntags, delta != 0);
    /* the entry's fields, and a shard's bytes */
    int rc = klen > UINT16_MAX || vlen > UINT32_MAX || ntags > UINT8_MAX || size + 16 > s->max_bytes ? KEEL_ERANGE : 0;
    l1e *e = rc ? NULL : keel__malloc(size);
    if (!e) {
        put_tags(tags, ntags);
        return rc ? rc : KEEL_ENOMEM;
    }
    memset(e, 0, sizeof *e);
    e->h = (uint32_t)h;
    e->expires = expires;
    e->klen = (uint16_t)klen;
    e->vlen = (uint32_t)vlen;
    e->ntags = (uint8_t)ntags;
    e->negative = negative;
    e->has_delta = delta != 0;
    memcpy(e->data, key, klen);
    if (vlen)
        memcpy(e->data + klen, val, vlen);
    if (ntags)
        memcpy(cold(e)->tags, tags, ntags * sizeof *tags);
    if (delta)
        *delta_of(e) = delta;
    size_t charge = charge_of(e);
    uint64_t now = keel__clock_now(&c->clock);
    pthread_mutex_lock(&s->mu);
    if (epoch && atomic_load(epoch) + atomic_load(kepoch) != seen) { /* an invalidation came while it was read */
        pthread_mutex_unlock(&s->mu);
        free_entry(e);
        return KEEL_ECONFLICT;
    }
    l1e *old = find_locked(s, key, klen, h);
    if (old)
        retire(s, old);
    uint32_t *g = ghost_of(s, h);
    if (*g == ghost_tag(h)) {
        e->main = 1;
        *g = 0;
    }
    /* room first, as S3-FIFO does: the new entry is never the one evicted
     * (it fits: its size was checked above) */
    for (size_t steps = 0; s->bytes + charge > s->max_bytes || s->items + 1 > s->max_items; steps++)
        evict_step(s, now, steps > 4 * s->items + 8);
    fifo_push(e->main ? &s->main : &s->small, e);
    s->bytes += charge;
    s->items++;
    atomic_store_explicit(&e->next, atomic_load_explicit(bucket_of(s, h), memory_order_relaxed), memory_order_relaxed);
    atomic_store_explicit(bucket_of(s, h), e, memory_order_release);
    if (s->items > (tab_of(s)->mask + 1) / 2 && !keel__rcu_in_read())
        grow(s);
    l1e *garbage = take_garbage(s, false);
    pthread_mutex_unlock(&s->mu);
    free_garbage(garbage);
    return 0;
}

void keel__l1_del(l1 *c, const void *key, size_t klen, uint64_t h) { del(c, key, klen, h, false); }

/* Retires every entry of every shard that `match` accepts. */
static void sweep(l1 *c, const void *prefix, size_t len, bool all)
{
    for (size_t i = 0; i < NSHARDS; i++) {
        shard *s = &c->shards[i];
        pthread_mutex_lock(&s->mu);
        for (int which = 0; which < 2; which++) {
            fifo *q = which ? &s->main : &s->small;
            for (l1e *e = q->head, *n; e; e = n) {
                n = cold(e)->qnext;
                if (all || (e->klen >= len && memcmp(e->data, prefix, len) == 0))
                    retire(s, e);
            }
        }
        l1e *g = take_garbage(s, true);
        pthread_mutex_unlock(&s->mu);
        free_garbage(g);
    }
}

void keel__l1_del_prefix(l1 *c, const void *prefix, size_t len) { sweep(c, prefix, len, false); }
void keel__l1_flush(l1 *c) { sweep(c, NULL, 0, true); }

void keel__l1_stats(l1 *c, l1_stats *st)
{
    memset(st, 0, sizeof *st);
    for (size_t i = 0; i < NSHARDS; i++) {
        shard *s = &c->shards[i];
        pthread_mutex_lock(&s->mu);
        st->evictions += s->evictions;
        st->expirations += s->expirations;
        st->items += s->items;
        st->bytes += s->bytes;
        pthread_mutex_unlock(&s->mu);
    }
}
