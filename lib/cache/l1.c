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
#include <string.h>

#include "../rcu.h"
#include "cache_int.h"

#define NSHARDS 32
#define GARBAGE_BATCH 128

typedef struct l1e {
    /* what a reader touches first, in the first half line */
    _Atomic(struct l1e *) next; /* the bucket chain */
    uint64_t h, expires;
    uint32_t klen, vlen;
    uint16_t ntags;
    uint8_t main, negative;
    _Atomic uint8_t freq;
    l1_tagref *tags;
    uint64_t delta;
    size_t charge;
    struct l1e *qprev, *qnext;  /* its FIFO; under the shard's mutex */
    struct l1e *gnext;          /* the garbage list */
    char data[]; /* key, value, tags */
} l1e;

typedef struct fifo {
    l1e *head, *tail; /* insert at head, evict at tail */
    size_t bytes, n;
} fifo;

typedef struct shard {
    pthread_mutex_t mu;
    _Atomic(l1e *) *buckets;
    size_t mask;
    fifo small, main;
    uint64_t *ghost;
    size_t gmask;
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
static _Atomic(l1e *) *bucket_of(shard *s, uint64_t h) { return &s->buckets[h & s->mask]; }

static size_t pow2_at_least(size_t n)
{
    size_t p = 1;
    while (p < n)
        p <<= 1;
    return p;
}

int keel__l1_create(l1 **out, size_t max_bytes, size_t max_items, const keel__clock *clock)
{
    l1 *c = keel__aligned_alloc(KEEL__CACHELINE, sizeof *c);
    if (!c)
        return KEEL_ENOMEM;
    memset(c, 0, sizeof *c);
    c->clock = *clock;
    /* buckets: one per expected entry (items, or bytes at 512 a piece: a
     * table sized for tiny entries would cost cache misses on every get) */
    size_t expect = max_items ? max_items : max_bytes / 512;
    size_t nb = pow2_at_least(expect / NSHARDS + 16);
    int rc = 0;
    for (size_t i = 0; i < NSHARDS; i++) {
        shard *s = &c->shards[i];
        pthread_mutex_init(&s->mu, NULL);
        s->max_bytes = max_bytes / NSHARDS ? max_bytes / NSHARDS : 1;
        s->max_items = max_items ? (max_items + NSHARDS - 1) / NSHARDS : SIZE_MAX;
        s->mask = nb - 1;
        s->gmask = nb - 1;
        if (!(s->buckets = keel__calloc(nb, sizeof *s->buckets)) || !(s->ghost = keel__calloc(nb, sizeof *s->ghost)))
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

static void free_list(l1e *e)
{
    while (e) {
        l1e *x = e;
        e = e->gnext;
        keel__free(x);
    }
}

void keel__l1_destroy(l1 *c)
{
    if (!c)
        return;
    for (size_t i = 0; i < NSHARDS; i++) {
        shard *s = &c->shards[i];
        for (size_t b = 0; s->buckets && b <= s->mask; b++)
            for (l1e *e = atomic_load_explicit(&s->buckets[b], memory_order_relaxed), *n; e; e = n) {
                n = atomic_load_explicit(&e->next, memory_order_relaxed);
                keel__free(e);
            }
        free_list(s->garbage);
        keel__free(s->buckets);
        keel__free(s->ghost);
        pthread_mutex_destroy(&s->mu);
    }
    keel__aligned_free(c);
}

static bool tags_current(const l1e *e)
{
    for (uint16_t i = 0; i < e->ntags; i++)
        if (atomic_load_explicit(&e->tags[i].tag->version, memory_order_acquire) != e->tags[i].version)
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
    for (l1e *e = atomic_load_explicit(bucket_of(s, h), memory_order_acquire); e;
         e = atomic_load_explicit(&e->next, memory_order_acquire)) {
        if (e->h != h || e->klen != klen || memcmp(e->data, key, klen) != 0)
            continue;
        if (e->expires <= keel__clock_now(&c->clock)) {
            expired = true;
            break;
        }
        if (!tags_current(e))
            break;
        uint8_t f = atomic_load_explicit(&e->freq, memory_order_relaxed);
        if (f < 3)
            atomic_store_explicit(&e->freq, (uint8_t)(f + 1), memory_order_relaxed);
        hit->expires = e->expires;
        hit->delta = e->delta;
        hit->negative = e->negative;
        *len = e->vlen;
        if (e->negative) {
            rc = 0;
        } else if (e->vlen > cap) {
            rc = KEEL_ERANGE;
        } else {
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
    if (e->qprev)
        e->qprev->qnext = e->qnext;
    else
        q->head = e->qnext;
    if (e->qnext)
        e->qnext->qprev = e->qprev;
    else
        q->tail = e->qprev;
    e->qprev = e->qnext = NULL;
    q->bytes -= e->charge;
    q->n--;
}

static void fifo_push(fifo *q, l1e *e)
{
    e->qprev = NULL;
    e->qnext = q->head;
    if (q->head)
        q->head->qprev = e;
    else
        q->tail = e;
    q->head = e;
    q->bytes += e->charge;
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
    s->bytes -= e->charge;
    s->items--;
    e->gnext = s->garbage;
    s->garbage = e;
    s->ngarbage++;
    s->gbytes += e->charge;
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

/* Retires key's entry (only if expired: a reader that found it so must
 * not take out a fresh one set meanwhile). */
static void del(l1 *c, const void *key, size_t klen, uint64_t h, bool only_expired)
{
    shard *s = shard_of(c, h);
    uint64_t now = keel__clock_now(&c->clock);
    pthread_mutex_lock(&s->mu);
    for (l1e *x = atomic_load_explicit(bucket_of(s, h), memory_order_relaxed); x;
         x = atomic_load_explicit(&x->next, memory_order_relaxed))
        if (x->h == h && x->klen == klen && memcmp(x->data, key, klen) == 0) {
            bool expired = x->expires <= now;
            if (!only_expired || expired) {
                s->expirations += expired;
                retire(s, x);
            }
            break;
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
        s->ghost[e->h & s->gmask] = e->h;
    retire(s, e);
}

int keel__l1_set(l1 *c, const void *key, size_t klen, uint64_t h, const void *val, size_t vlen, uint64_t expires,
                 uint64_t delta, const l1_tagref *tags, size_t ntags, bool negative, _Atomic uint64_t *epoch,
                 uint64_t seen)
{
    shard *s = shard_of(c, h);
    size_t charge = sizeof(l1e) + klen + vlen + ntags * sizeof(l1_tagref) + 16;
    if (charge > s->max_bytes)
        return KEEL_ERANGE;
    l1e *e = keel__malloc(sizeof *e + klen + vlen + ntags * sizeof(l1_tagref) + alignof(l1_tagref));
    if (!e)
        return KEEL_ENOMEM;
    memset(e, 0, sizeof *e);
    e->h = h;
    e->expires = expires;
    e->delta = delta;
    e->klen = (uint32_t)klen;
    e->vlen = (uint32_t)vlen;
    e->ntags = (uint16_t)ntags;
    e->negative = negative;
    e->charge = charge;
    memcpy(e->data, key, klen);
    if (vlen)
        memcpy(e->data + klen, val, vlen);
    uintptr_t t = ((uintptr_t)(e->data + klen + vlen) + alignof(l1_tagref) - 1) & ~(uintptr_t)(alignof(l1_tagref) - 1);
    e->tags = (l1_tagref *)t;
    if (ntags)
        memcpy(e->tags, tags, ntags * sizeof *tags);
    uint64_t now = keel__clock_now(&c->clock);
    pthread_mutex_lock(&s->mu);
    if (epoch && atomic_load(epoch) != seen) { /* an invalidation came while the value was read */
        pthread_mutex_unlock(&s->mu);
        keel__free(e);
        return KEEL_ECONFLICT;
    }
    for (l1e *x = atomic_load_explicit(bucket_of(s, h), memory_order_relaxed); x;
         x = atomic_load_explicit(&x->next, memory_order_relaxed))
        if (x->h == h && x->klen == klen && memcmp(x->data, key, klen) == 0) {
            retire(s, x);
            break;
        }
    if (s->ghost[h & s->gmask] == h) {
        e->main = 1;
        s->ghost[h & s->gmask] = 0;
    }
    fifo_push(e->main ? &s->main : &s->small, e);
    s->bytes += charge;
    s->items++;
    atomic_store_explicit(&e->next, atomic_load_explicit(bucket_of(s, h), memory_order_relaxed), memory_order_relaxed);
    atomic_store_explicit(bucket_of(s, h), e, memory_order_release);
    for (size_t steps = 0; s->bytes > s->max_bytes || s->items > s->max_items; steps++)
        evict_step(s, now, steps > 4 * s->items + 8);
    l1e *g = take_garbage(s, false);
    pthread_mutex_unlock(&s->mu);
    free_garbage(g);
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
                n = e->qnext;
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
