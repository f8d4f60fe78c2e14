/* lib/cache/cache.c — keel_cache: the tiers, read-through with
 * single-flight, write-through, invalidation across processes.
 *
 * The invalidation epoch: every invalidation this process applies (its
 * own or one announced by another process, a flush after the link came
 * back) moves an epoch before it touches L1: one key's, the stripe of
 * c->kepoch its hash picks; a prefix's, a tag's or a flush's, c->epoch,
 * which every key's includes. A key's epoch is the sum of the two (both
 * only grow, so the sum moves when either does). A value read from a lower
 * tier or loaded goes into L1 only if its key's epoch is still what it
 * was when the read began, checked under the L1 shard's mutex (keel__l1_set), and
 * invalidations delete under that same mutex: so a reply that was already
 * on its way when an invalidation came never lands in L1 after it. The
 * loads in flight of the keys an invalidation covers stop taking callers
 * (a get after it waits for no value read before it); those of other keys
 * go on, so that one load still serves every miss of a key. A tag's
 * invalidation cannot know the keys it covers before their values are
 * in: each flight notes it, and its value, if it carries the tag, goes
 * neither to the lower tiers nor to the callers that joined after it.
 *
 * Redis keys: prefix + "v:" + key (the value, with a small header: its
 * tags and the time it took to load, for XFetch; or 'N' and an expiry:
 * the loader said absent), prefix + "t:" + tag (a
 * set of value keys), prefix + "l:" + key (a load lease). Messages on
 * prefix + "inv": 16 bytes naming the sending cache, then 'K' and a key,
 * 'T' and a tag, or 'P' and a prefix. A cache ignores its own messages.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <libpq-fe.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <keel/breaker.h>
#include <keel/metrics.h>
#include <keel/pg.h>
#include <keel/redis.h>

#include "../hash.h"
#include "../redis/redis_int.h"
#include "cache_int.h"

enum { L2 = 0, L3 = 1 };
#define ID_LEN 16
#define KEY_EPOCHS 1024 /* stripes of the keys' invalidation epochs */
#define PREFIX_MAX 200
#define RKEY_MAX (PREFIX_MAX + 2 + 1024)        /* prefix, "v:", a key */
#define TKEY_MAX (PREFIX_MAX + 2 + CACHE_MAX_TAG) /* prefix, "t:", a tag */

struct keel_cache_load {
    void *val;
    size_t vlen;
    uint64_t ttl;
    const char *tags[CACHE_MAX_TAGS];
    size_t ntags;
    char *tagcopy;
    bool set;
    size_t max_value;
};

/* The counters every get bumps, striped (internal.h). */
typedef struct lookup_stats {
    _Atomic uint64_t hits_l1, negative_hits, misses;
} __attribute__((aligned(KEEL__CACHELINE))) lookup_stats;

/* The tag invalidations a flight remembers; past them, any tag counts. */
#define FLIGHT_TAGS 8

/* One in-process load of a key; the callers that missed meanwhile wait. */
typedef struct flight {
    uint64_t h;
    void *key;
    size_t klen;
    int rc;
    void *val;
    size_t vlen;
    bool done;
    bool stale; /* an invalidation of the key came: later callers start a load of their own */
    /* Tags invalidated during the load, in order (the first FLIGHT_TAGS
     * hashes kept): a value carrying one of them is from before it. */
    size_t ntags;
    uint64_t tags[FLIGHT_TAGS];
    size_t tainted; /* done: the first of them the value's tags meet (SIZE_MAX: none); callers that joined after it load again */
    unsigned refs;
    pthread_cond_t cv;
    struct flight *next;
} flight;

struct keel_cache {
    keel_cache_opts o;
    char *rprefix, *table;
    char chan[256];
    unsigned char self[ID_LEN];
    keel__clock clock;
    keel__rand rand;
    l1 *l1;
    tag_stripe *tags; /* TAG_STRIPES */
    pthread_mutex_t fl_mu;
    flight *flights;
    _Atomic size_t nflights; /* on the list: invalidations skip fl_mu at 0 */
    _Atomic uint64_t epoch;               /* every key's: prefixes, tags, flushes */
    _Atomic uint64_t kepoch[KEY_EPOCHS]; /* one key's, by stripe of its hash */
    keel_breaker **l2h; /* each Redis node's health, as seen by this cache */
    size_t nl2;
    keel_breaker *l3h;
    keel_redis_sub *sub;
    keel_redis_script *release; /* a lease's compare-and-delete */
    keel_pg_stmt *st_get, *st_put, *st_fill, *st_del, *st_del_tag, *st_del_prefix, *st_sweep;
    pthread_t sweeper;
    pthread_mutex_t sweep_mu;
    pthread_cond_t sweep_cv;
    bool sweeping;
    atomic_bool stop;
    struct {
        _Atomic uint64_t hits_l2, hits_l3, loads, load_waits;
        _Atomic uint64_t invalidations_received, flushes, errors[2];
    } st;
    lookup_stats lk[KEEL__STRIPES];
    uint64_t seed; /* key_hash()'s */
};

static lookup_stats *my_stripe(keel_cache *c) { return &c->lk[keel__stripe()]; }

static uint64_t now_ns(keel_cache *c) { return keel__clock_now(&c->clock); }
/* Keys may come from clients, and the hash chooses L1's shard and bucket:
 * with a seed known to all, keys found offline would share one chain. */
static uint64_t key_hash(const keel_cache *c, const void *k, size_t n) { return keel__hash64(k, n, c->seed); }
uint64_t keel__cache_key_hash(const keel_cache *c, const void *key, size_t klen) { return key_hash(c, key, klen); }

static _Atomic uint64_t *kepoch_of(keel_cache *c, uint64_t h) { return &c->kepoch[h >> 54]; }

/* The epoch of the key of hash h (see the top of this file). */
static uint64_t seen_of(keel_cache *c, uint64_t h)
{
    return atomic_load(&c->epoch) + atomic_load(kepoch_of(c, h));
}

/* ---- tags ----
 *
 * The records of the tags L1's entries carry (cache_int.h), in hash
 * tables striped by the hash's top bits, each under its own mutex and
 * doubled when it holds two records a bucket. */

#define TAG_STRIPES 16
#define TAG_MIN_BUCKETS 16

struct tag_stripe {
    pthread_mutex_t mu;
    ctag **b;
    size_t mask, n;
} __attribute__((aligned(KEEL__CACHELINE)));

static uint64_t tag_hash(const char *name) { return keel__hash64(name, strlen(name), 0x7467); }

static int tags_create(tag_stripe **out)
{
    tag_stripe *t = keel__aligned_alloc(KEEL__CACHELINE, TAG_STRIPES * sizeof *t);
    if (!t)
        return KEEL_ENOMEM;
    memset(t, 0, TAG_STRIPES * sizeof *t);
    int rc = 0;
    for (size_t i = 0; i < TAG_STRIPES; i++) {
        pthread_mutex_init(&t[i].mu, NULL);
        t[i].mask = TAG_MIN_BUCKETS - 1;
        if (!(t[i].b = keel__calloc(TAG_MIN_BUCKETS, sizeof *t[i].b)))
            rc = KEEL_ENOMEM;
    }
    *out = t;
    return rc;
}

/* After L1 (whose entries give their references back). */
static void tags_destroy(tag_stripe *t)
{
    for (size_t i = 0; t && i < TAG_STRIPES; i++) {
        for (size_t b = 0; t[i].b && b <= t[i].mask; b++)
            for (ctag *x = t[i].b[b], *n; x; x = n) {
                n = x->next;
                keel__free(x);
            }
        keel__free(t[i].b);
        pthread_mutex_destroy(&t[i].mu);
    }
    keel__aligned_free(t);
}

static tag_stripe *stripe_of(keel_cache *c, uint64_t h) { return &c->tags[h >> 60]; }

/* Under s's mutex. */
static ctag *tag_locate(tag_stripe *s, const char *name, uint64_t h)
{
    ctag *t = s->b[h & s->mask];
    while (t && (t->h != h || strcmp(t->name, name) != 0))
        t = t->next;
    return t;
}

/* Doubles s's buckets, under its mutex; on no memory they stay. */
static void tags_grow(tag_stripe *s)
{
    size_t n = (s->mask + 1) * 2;
    ctag **b = keel__calloc(n, sizeof *b);
    if (!b)
        return;
    for (size_t i = 0; i <= s->mask; i++)
        for (ctag *t = s->b[i], *next; t; t = next) {
            next = t->next;
            t->next = b[t->h & (n - 1)];
            b[t->h & (n - 1)] = t;
        }
    keel__free(s->b);
    s->b = b;
    s->mask = n - 1;
}

/* A reference to a tag's record, made when missing (NULL: no memory). */
static ctag *tag_get(keel_cache *c, const char *name)
{
    uint64_t h = tag_hash(name);
    size_t len = strnlen(name, CACHE_MAX_TAG); /* good_tags() checked it */
    tag_stripe *s = stripe_of(c, h);
    pthread_mutex_lock(&s->mu);
    ctag *t = tag_locate(s, name, h);
    if (t) {
        t->refs++;
    } else if ((t = keel__malloc(sizeof *t + len + 1))) {
        atomic_init(&t->version, 0);
        t->home = s;
        t->refs = 1;
        t->h = h;
        memcpy(t->name, name, len);
        t->name[len] = '\0';
        t->next = s->b[h & s->mask];
        s->b[h & s->mask] = t;
        if (++s->n > 2 * (s->mask + 1))
            tags_grow(s);
    }
    pthread_mutex_unlock(&s->mu);
    return t;
}

void keel__ctag_put(ctag *t)
{
    tag_stripe *s = t->home;
    pthread_mutex_lock(&s->mu);
    if (--t->refs == 0) {
        ctag **pp = &s->b[t->h & s->mask];
        while (*pp != t)
            pp = &(*pp)->next;
        *pp = t->next;
        s->n--;
        keel__free(t);
    }
    pthread_mutex_unlock(&s->mu);
}

/* Bumps a tag's version, if it has a record (without one, no L1 entry
 * carries it). Under the mutex: the record cannot go meanwhile. */
static void tag_bump(keel_cache *c, const char *name)
{
    uint64_t h = tag_hash(name);
    tag_stripe *s = stripe_of(c, h);
    pthread_mutex_lock(&s->mu);
    ctag *t = tag_locate(s, name, h);
    if (t)
        atomic_fetch_add(&t->version, 1);
    pthread_mutex_unlock(&s->mu);
}

static uint64_t tags_count(keel_cache *c)
{
    uint64_t n = 0;
    for (size_t i = 0; i < TAG_STRIPES; i++) {
        pthread_mutex_lock(&c->tags[i].mu);
        n += c->tags[i].n;
        pthread_mutex_unlock(&c->tags[i].mu);
    }
    return n;
}

static bool good_tags(const char *const *tags, size_t n)
{
    if (n > CACHE_MAX_TAGS || (n && !tags))
        return false;
    for (size_t i = 0; i < n; i++) {
        size_t l = tags[i] ? strnlen(tags[i], CACHE_MAX_TAG + 1) : 0;
        if (l == 0 || l > CACHE_MAX_TAG || memchr(tags[i], '\x1f', l) || !keel__utf8_ok(tags[i]))
            return false; /* L3 keeps them as text */
    }
    return true;
}

/* Each tag with its current version, a reference taken on each (for
 * keel__l1_set); false when out of memory (none taken). */
static bool tag_refs(keel_cache *c, const char *const *tags, size_t n, l1_tagref *out)
{
    for (size_t i = 0; i < n; i++) {
        if (!(out[i].tag = tag_get(c, tags[i]))) {
            while (i > 0)
                keel__ctag_put(out[--i].tag);
            return false;
        }
        out[i].version = atomic_load(&out[i].tag->version);
    }
    return true;
}

/* ---- tiers' health ----
 *
 * A keel_breaker per Redis node and one for L3: one failure trips it, it
 * stays OPEN for tier_retry_ns, then one get probes the node or the tier.
 * Per node, since keel_redis fails a dead node's keys at once and serves
 * the others': one breaker for all of L2 would let a dead node turn off
 * every node's keys, and the probes that land on it keep them off. Gets
 * take a permit with tier_up() and give every permit back through
 * tier_done(). Writes are tried even on a failing node, with no permit,
 * and report too: a failed write trips the breaker as a failed get does,
 * and a write that a server answers during HALF_OPEN counts as the probe.
 * `node`: for L2, the node the call went to; ignored for L3. */

static keel_breaker *health(keel_cache *c, int t, size_t node) { return t == L3 ? c->l3h : c->l2h[node]; }

static bool tier_up(keel_cache *c, int t, size_t node)
{
    return keel_breaker_try_acquire(health(c, t, node), now_ns(c)) == 0;
}

/* The outcome of a call on tier t; returns rc. Answers (found or not, an
 * error reply) and our own errors are not failures of the tier. */
static int tier_done(keel_cache *c, int t, size_t node, int rc)
{
    bool down = rc && rc != KEEL_ENOTFOUND && rc != KEEL_EBACKEND && rc != KEEL_ENOMEM && rc != KEEL_EINVAL;
    if (rc && rc != KEEL_ENOTFOUND)
        atomic_fetch_add_explicit(&c->st.errors[t], 1, memory_order_relaxed);
    if (down)
        keel__log(KEEL_LOG_DEBUG, "cache", "%s: %s", t == L2 ? "L2 (Redis)" : "L3 (PostgreSQL)", keel_strerror(rc));
    keel_breaker_on_result(health(c, t, node), now_ns(c), 0, down);
    return rc;
}

/* An L2 call made with node held's permit that failed on node `at` (a
 * pipeline's other command, on another node): held answered. */
static int l2_done(keel_cache *c, size_t held, size_t at, int rc)
{
    if (at != held)
        keel_breaker_on_result(c->l2h[held], now_ns(c), 0, false);
    return tier_done(c, L2, at, rc);
}

static void tier_state(keel_breaker *b, keel_breaker_state from, keel_breaker_state to, void *ud)
{
    keel_cache *c = ud;
    char name[400] = "L3 (PostgreSQL)";
    for (size_t i = 0; i < c->nl2; i++)
        if (b == c->l2h[i])
            snprintf(name, sizeof name, "L2 (Redis %s)", c->o.redis->nodes[i].name);
    if (to == KEEL_BREAKER_OPEN && from == KEEL_BREAKER_CLOSED)
        keel__log(KEEL_LOG_WARN, "cache", "%s failed: skipped by gets for %llu ms at a time", name,
                  (unsigned long long)(c->o.tier_retry_ns / 1000000));
    else if (to == KEEL_BREAKER_CLOSED && from == KEEL_BREAKER_HALF_OPEN)
        keel__log(KEEL_LOG_INFO, "cache", "%s answers again", name);
}

/* ---- L2: Redis ---- */

/* prefix + tag + bytes, in buf (at least plen + 2 + n + 1). */
static size_t rkey(const keel_cache *c, char kind, const void *k, size_t n, char *buf)
{
    size_t p = strlen(c->rprefix);
    memcpy(buf, c->rprefix, p);
    buf[p] = kind;
    buf[p + 1] = ':';
    memcpy(buf + p + 2, k, n);
    return p + 2 + n;
}

/* The Redis node of a key of ours (kind 'v' for the value, 'l' a lease). */
static size_t node_of(const keel_cache *c, char kind, const void *k, size_t n)
{
    char buf[RKEY_MAX];
    return keel_redis_node_of(c->o.redis, buf, rkey(c, kind, k, n, buf));
}

/* The node of the first command of a failed pipeline that its node left
 * unanswered (rc: what keel_redis_pipeline() returned); else dflt. */
static size_t failed_node(const keel_cache *c, const keel_redis_cmd *cmds, size_t n, int rc, size_t dflt)
{
    for (size_t i = 0; rc && i < n; i++)
        if (cmds[i].rc == rc && !cmds[i].reply)
            return keel_redis_node_of(c->o.redis, cmds[i].key, cmds[i].keylen);
    return dflt;
}

static uint64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* The L2 value: 'K', ntags, delta (8 bytes), expiry (wall-clock ms, 8
 * bytes: what L1 may keep it for, without asking Redis for a PTTL), tags
 * (length byte + bytes), value. */
#define L2_HEAD 18
/* The largest value whose encoding, with every tag at its longest, fits
 * in a Redis bulk string (proto-max-bulk-len, 512 MiB by default): past
 * it Redis answers the SET with a protocol error and drops the link. */
#define VALUE_MAX (((size_t)512 << 20) - L2_HEAD - CACHE_MAX_TAGS * (1 + CACHE_MAX_TAG))
static void *l2_encode(const void *val, size_t vlen, const char *const *tags, size_t ntags, uint64_t delta,
                       uint64_t ttl, size_t *len)
{
    size_t n = L2_HEAD + vlen;
    for (size_t i = 0; i < ntags; i++)
        n += 1 + strlen(tags[i]);
    unsigned char *b = keel__malloc(n), *p = b;
    if (!b)
        return NULL;
    *p++ = 'K';
    *p++ = (unsigned char)ntags;
    uint64_t d = htobe64(delta), e = htobe64(wall_ms() + ttl / 1000000u);
    memcpy(p, &d, 8);
    memcpy(p + 8, &e, 8);
    p += 16;
    for (size_t i = 0; i < ntags; i++) {
        size_t l = strlen(tags[i]);
        *p++ = (unsigned char)l;
        memcpy(p, tags[i], l);
        p += l;
    }
    if (vlen)
        memcpy(p, val, vlen);
    *len = n;
    return b;
}

/* ms as ns, UINT64_MAX past it: a TTL of UINT64_MAX ns ("never") comes
 * back from below as slightly more ms than that holds when the writer's
 * clock is ahead, and must not wrap to a short one. */
static uint64_t ms_to_ns(uint64_t ms) { return keel__sat_mul(ms, 1000000u); }

typedef struct decoded {
    bool negative; /* the loader said absent: no value */
    const char *val;
    size_t vlen;
    uint64_t delta, ttl; /* ttl: what is left of it now */
    char tagbuf[CACHE_MAX_TAGS * (CACHE_MAX_TAG + 1)];
    const char *tags[CACHE_MAX_TAGS];
    size_t ntags;
} decoded;

static bool l2_decode(const char *b, size_t n, decoded *d)
{
    uint64_t v, e, now = wall_ms();
    d->negative = n == 1 + 8 && b[0] == 'N'; /* an absence: 'N', its expiry */
    if (d->negative) {
        memcpy(&e, b + 1, 8);
        e = be64toh(e);
        d->ttl = ms_to_ns(e > now ? e - now : 1);
        d->val = NULL;
        d->vlen = d->ntags = 0;
        d->delta = 0;
        return true;
    }
    if (n < L2_HEAD || b[0] != 'K' || (unsigned char)b[1] > CACHE_MAX_TAGS)
        return false;
    d->ntags = (unsigned char)b[1];
    memcpy(&v, b + 2, 8);
    memcpy(&e, b + 10, 8);
    d->delta = be64toh(v);
    e = be64toh(e);
    d->ttl = ms_to_ns(e > now ? e - now : 1);
    size_t at = L2_HEAD;
    char *tb = d->tagbuf;
    for (size_t i = 0; i < d->ntags; i++) {
        if (at >= n)
            return false;
        size_t l = (unsigned char)b[at++];
        if (l == 0 || l > CACHE_MAX_TAG || at + l > n) /* tagbuf holds ours only */
            return false;
        memcpy(tb, b + at, l);
        tb[l] = '\0';
        d->tags[i] = tb;
        tb += l + 1;
        at += l;
    }
    d->val = b + at;
    d->vlen = n - at;
    return true;
}

/* GET; 0 with *val holding the reply. */
static int l2_get(keel_cache *c, const void *key, size_t klen, redisReply **val)
{
    char k[RKEY_MAX];
    size_t kl = rkey(c, 'v', key, klen, k);
    const char *a[2] = {"GET", k};
    size_t l[2] = {3, kl};
    redisReply *r = NULL;
    int rc = keel_redis_command(c->o.redis, k, kl, 2, a, l, &r);
    if (rc == 0 && r->type != REDIS_REPLY_STRING)
        rc = KEEL_ENOTFOUND;
    if (rc == 0)
        *val = r;
    else if (r)
        freeReplyObject(r);
    return rc;
}

/* SET (NX: only where nothing is, for fills) with the tag sets. *at: the
 * node that failed (the value's when none did). */
static int l2_put(keel_cache *c, const void *key, size_t klen, const void *val, size_t vlen, uint64_t ttl,
                  const char *const *tags, size_t ntags, uint64_t delta, bool nx, size_t *at)
{
    char k[RKEY_MAX], tk[CACHE_MAX_TAGS][TKEY_MAX], ms[24];
    size_t kl = rkey(c, 'v', key, klen, k), tkl[CACHE_MAX_TAGS];
    *at = keel_redis_node_of(c->o.redis, k, kl);
    size_t elen;
    void *enc = l2_encode(val, vlen, tags, ntags, delta, ttl, &elen);
    if (!enc)
        return KEEL_ENOMEM;
    snprintf(ms, sizeof ms, "%llu", (unsigned long long)(ttl / 1000000u ? ttl / 1000000u : 1));
    const char *sa[6] = {"SET", k, enc, "PX", ms, "NX"};
    size_t sl[6] = {3, kl, elen, 2, strlen(ms), 2};
    keel_redis_cmd cmds[1 + 3 * CACHE_MAX_TAGS];
    const char *ta[CACHE_MAX_TAGS][4];
    size_t tl[CACHE_MAX_TAGS][4];
    size_t n = 0;
    cmds[n++] = (keel_redis_cmd){k, kl, nx ? 6 : 5, sa, sl, 0, NULL};
    for (size_t i = 0; i < ntags; i++) { /* the tag's set, living as long as its longest member */
        tkl[i] = rkey(c, 't', tags[i], strlen(tags[i]), tk[i]);
        ta[i][0] = "SADD", ta[i][1] = tk[i], ta[i][2] = k;
        tl[i][0] = 4, tl[i][1] = tkl[i], tl[i][2] = kl;
        cmds[n++] = (keel_redis_cmd){tk[i], tkl[i], 3, ta[i], tl[i], 0, NULL};
    }
    const char *pa[2][CACHE_MAX_TAGS][4];
    size_t pl[2][CACHE_MAX_TAGS][4];
    for (int g = 0; g < 2; g++) /* NX: a new set gets the TTL; GT: a longer one extends it */
        for (size_t i = 0; i < ntags; i++) {
            pa[g][i][0] = "PEXPIRE", pa[g][i][1] = tk[i], pa[g][i][2] = ms, pa[g][i][3] = g ? "GT" : "NX";
            pl[g][i][0] = 7, pl[g][i][1] = tkl[i], pl[g][i][2] = strlen(ms), pl[g][i][3] = 2;
            cmds[n++] = (keel_redis_cmd){tk[i], tkl[i], 4, pa[g][i], pl[g][i], 0, NULL};
        }
    int rc = keel_redis_pipeline(c->o.redis, cmds, n);
    *at = failed_node(c, cmds, n, rc, *at);
    for (size_t i = 0; i < n; i++) {
        if (rc == 0 && cmds[i].rc)
            rc = cmds[i].rc;
        if (cmds[i].reply)
            freeReplyObject(cmds[i].reply);
    }
    keel__free(enc);
    return rc;
}

/* A fill of L2 (SET NX) or, `over`, a SET over what is there, if the
 * value's node is not being skipped. */
static void l2_fill(keel_cache *c, const void *key, size_t klen, const void *val, size_t vlen, uint64_t ttl,
                    const char *const *tags, size_t ntags, uint64_t delta, bool over)
{
    size_t node = node_of(c, 'v', key, klen), at;
    if (!tier_up(c, L2, node))
        return;
    int rc = l2_put(c, key, klen, val, vlen, ttl, tags, ntags, delta, !over, &at);
    l2_done(c, node, at, rc);
}

/* An absence the loader reported, for the other processes (those waiting
 * on the lease among them): for negative_ttl_ns, where nothing is, if the
 * node is not being skipped; or, `over`, over the value there (an early
 * refresh found the key gone): a write, tried even on a failing node, as
 * a del is (one skipped would leave the old value there for later). */
static void l2_absent(keel_cache *c, const void *key, size_t klen, bool over)
{
    size_t node = node_of(c, 'v', key, klen);
    if (!over && !tier_up(c, L2, node))
        return;
    char k[RKEY_MAX], v[9], ms[24];
    size_t kl = rkey(c, 'v', key, klen, k);
    uint64_t ttl_ms = c->o.negative_ttl_ns / 1000000u ? c->o.negative_ttl_ns / 1000000u : 1;
    uint64_t e = htobe64(wall_ms() + ttl_ms);
    v[0] = 'N';
    memcpy(v + 1, &e, 8);
    snprintf(ms, sizeof ms, "%llu", (unsigned long long)ttl_ms);
    const char *a[6] = {"SET", k, v, "PX", ms, "NX"};
    size_t l[6] = {3, kl, sizeof v, 2, strlen(ms), 2};
    redisReply *r = NULL;
    int rc = keel_redis_command(c->o.redis, k, kl, over ? 5 : 6, a, l, &r);
    if (r)
        freeReplyObject(r);
    tier_done(c, L2, node, rc);
}

static int l2_del(keel_cache *c, const void *key, size_t klen)
{
    char k[RKEY_MAX];
    size_t kl = rkey(c, 'v', key, klen, k);
    const char *a[2] = {"DEL", k};
    size_t l[2] = {3, kl};
    redisReply *r = NULL;
    int rc = keel_redis_command(c->o.redis, k, kl, 2, a, l, &r);
    if (r)
        freeReplyObject(r);
    return rc;
}

/* Tells the other processes; a failure only costs them staleness until
 * their L1 entries expire, so it is logged, not returned. */
static void announce(keel_cache *c, char kind, const void *p, size_t n)
{
    if (!c->o.redis)
        return;
    char msg[ID_LEN + 1 + 1024];
    memcpy(msg, c->self, ID_LEN);
    msg[ID_LEN] = kind;
    memcpy(msg + ID_LEN + 1, p, n);
    const char *a[3] = {"PUBLISH", c->chan, msg};
    size_t l[3] = {7, strlen(c->chan), ID_LEN + 1 + n};
    redisReply *r = NULL;
    int rc = keel_redis_command(c->o.redis, c->chan, strlen(c->chan), 3, a, l, &r);
    if (r)
        freeReplyObject(r);
    if (rc)
        keel__log(KEEL_LOG_WARN, "cache", "invalidation not announced: %s", keel_strerror(rc));
}

/* ---- L3: PostgreSQL ---- */

static int l3_get(keel_cache *c, const void *key, size_t klen, PGresult **res)
{
    const char *v[1] = {key};
    int l[1] = {(int)klen}, f[1] = {1};
    keel_pg_params p = {1, v, l, f, NULL, 1};
    /* the primary: a replica cannot read an UNLOGGED table, and a lagging
     * one would hand back what was just deleted */
    int rc = keel_pg_exec_stmt(c->o.pg, KEEL_PG_WRITE, c->st_get, &p, res);
    if (rc == 0 && PQntuples(*res) == 0)
        rc = KEEL_ENOTFOUND;
    if (rc) {
        PQclear(*res);
        *res = NULL;
    }
    return rc;
}

/* An upsert; `fill`: only over an expired row (a fill must not replace
 * a value someone set meanwhile). */
static int l3_put(keel_cache *c, const void *key, size_t klen, const void *val, size_t vlen, uint64_t ttl,
                  const char *const *tags, size_t ntags, bool fill)
{
    char ms[24], tagtext[CACHE_MAX_TAGS * (CACHE_MAX_TAG + 1) + 1] = "";
    snprintf(ms, sizeof ms, "%llu", (unsigned long long)(ttl / 1000000u ? ttl / 1000000u : 1));
    size_t at = 0; /* the tags joined by 0x1f (good_tags bounded them) */
    for (size_t i = 0; i < ntags; i++)
        at += (size_t)snprintf(tagtext + at, sizeof tagtext - at, "%s%s", i ? "\x1f" : "", tags[i]);
    const char *v[4] = {key, vlen ? val : "", ms, tagtext};
    int l[4] = {(int)klen, (int)vlen, 0, 0}, f[4] = {1, 1, 0, 0};
    keel_pg_params p = {4, v, l, f, NULL, 0};
    PGresult *r = NULL;
    int rc = keel_pg_exec_stmt(c->o.pg, KEEL_PG_WRITE, fill ? c->st_fill : c->st_put, &p, &r);
    PQclear(r);
    return rc;
}

/* One statement with one parameter (binary when len != -1), on the primary;
 * *rows (may be NULL) the rows it touched. */
static int l3_one(keel_cache *c, keel_pg_stmt *s, const void *arg, int len, size_t *rows)
{
    const char *v[1] = {arg};
    int l[1] = {len < 0 ? 0 : len}, f[1] = {len < 0 ? 0 : 1};
    keel_pg_params p = {1, v, l, f, NULL, 0};
    PGresult *r = NULL;
    int rc = keel_pg_exec_stmt(c->o.pg, KEEL_PG_WRITE, s, &p, &r);
    if (rc == 0 && rows)
        *rows = (size_t)strtoull(PQcmdTuples(r), NULL, 10);
    PQclear(r);
    return rc;
}

/* ---- read-through ---- */

/* Joins the flight of key, or starts one (true: the caller leads it);
 * with `lead`, always starts one. *joined: the tag invalidations the
 * flight had seen when joined. */
static bool sf_join(keel_cache *c, const void *key, size_t klen, uint64_t h, bool lead, flight **out,
                    size_t *joined)
{
    pthread_mutex_lock(&c->fl_mu);
    for (flight *f = lead ? NULL : c->flights; f; f = f->next)
        if (f->h == h && !f->stale && f->klen == klen && memcmp(f->key, key, klen) == 0) {
            f->refs++;
            *out = f;
            *joined = f->ntags;
            pthread_mutex_unlock(&c->fl_mu);
            return false;
        }
    flight *f = keel__calloc(1, sizeof *f);
    if (f && !(f->key = keel__malloc(klen ? klen : 1))) {
        keel__free(f);
        f = NULL;
    }
    if (f) {
        memcpy(f->key, key, klen);
        f->klen = klen;
        f->h = h;
        f->refs = 1;
        pthread_cond_init(&f->cv, NULL);
        f->next = c->flights;
        c->flights = f;
        atomic_fetch_add(&c->nflights, 1);
    }
    pthread_mutex_unlock(&c->fl_mu);
    *out = f; /* NULL: no memory, load alone */
    return true;
}

/* An invalidation is applied: the epoch moves (a value read before it
 * stays out of L1), and the loads in flight of the keys it covers take no
 * more callers, whose gets began after it (the load may have read what it
 * removed). key: that key, or with `prefix` every key it starts; NULL:
 * every key. Other keys' loads go on gathering their callers. With no
 * load in flight (a flight counted after the epoch moved began its load
 * after it) writes take no shared lock. Returns the epoch it made: of the
 * key, for a single key. */
static uint64_t invalidated(keel_cache *c, const void *key, size_t klen, bool prefix)
{
    uint64_t epoch;
    if (key && !prefix) { /* c->epoch read first: one that moves meanwhile is not in it */
        uint64_t all = atomic_load(&c->epoch);
        epoch = all + atomic_fetch_add(kepoch_of(c, key_hash(c, key, klen)), 1) + 1;
    } else {
        epoch = atomic_fetch_add(&c->epoch, 1) + 1;
    }
    if (atomic_load(&c->nflights) == 0)
        return epoch;
    pthread_mutex_lock(&c->fl_mu);
    for (flight *f = c->flights; f; f = f->next)
        if (!key || ((prefix ? f->klen >= klen : f->klen == klen) && memcmp(f->key, key, klen) == 0))
            f->stale = true;
    pthread_mutex_unlock(&c->fl_mu);
    return epoch;
}

/* Under fl_mu: the index of the first of the flight's tag invalidations
 * that the value's tags (hashes th) meet; SIZE_MAX if none does. */
static size_t flight_tainted(const flight *f, const uint64_t *th, size_t nth)
{
    for (size_t i = 0; i < f->ntags && i < FLIGHT_TAGS; i++)
        for (size_t j = 0; j < nth; j++)
            if (f->tags[i] == th[j])
                return i;
    return nth && f->ntags > FLIGHT_TAGS ? FLIGHT_TAGS : SIZE_MAX; /* those not kept may be the value's */
}

/* A tag is invalidated: each flight notes it, so that its value, if it
 * carries the tag, stays out of the lower tiers and from the callers that
 * joined after (flight_tainted); flights of other keys go on. */
static void flights_tag(keel_cache *c, const char *tag)
{
    if (atomic_load(&c->nflights) == 0)
        return;
    uint64_t th = tag_hash(tag);
    pthread_mutex_lock(&c->fl_mu);
    for (flight *f = c->flights; f; f = f->next)
        if (f->ntags++ < FLIGHT_TAGS)
            f->tags[f->ntags - 1] = th;
    pthread_mutex_unlock(&c->fl_mu);
}

static void tag_hashes(const char *const *tags, size_t ntags, uint64_t *th)
{
    for (size_t i = 0; i < ntags; i++)
        th[i] = tag_hash(tags[i]);
}

/* th, nth: the hashes of the value's tags. */
static void sf_finish(keel_cache *c, flight *f, int rc, const void *val, size_t vlen, const uint64_t *th, size_t nth)
{
    if (!f)
        return;
    void *copy = rc == 0 ? keel__malloc(vlen ? vlen : 1) : NULL;
    if (rc == 0 && !copy)
        rc = KEEL_ENOMEM;
    if (copy && vlen)
        memcpy(copy, val, vlen);
    pthread_mutex_lock(&c->fl_mu);
    for (flight **pp = &c->flights; *pp; pp = &(*pp)->next)
        if (*pp == f) {
            *pp = f->next; /* later misses start a flight of their own */
            atomic_fetch_sub(&c->nflights, 1);
            break;
        }
    f->rc = rc;
    f->tainted = rc == 0 ? flight_tainted(f, th, nth) : SIZE_MAX;
    f->val = copy;
    f->vlen = vlen;
    f->done = true;
    pthread_cond_broadcast(&f->cv);
    pthread_mutex_unlock(&c->fl_mu);
}

static void sf_leave(keel_cache *c, flight *f)
{
    if (!f)
        return;
    pthread_mutex_lock(&c->fl_mu);
    bool last = --f->refs == 0;
    pthread_mutex_unlock(&c->fl_mu);
    if (!last)
        return;
    pthread_cond_destroy(&f->cv);
    keel__free(f->key);
    keel__free(f->val);
    keel__free(f);
}

static int copy_out(const void *val, size_t vlen, void *buf, size_t cap, size_t *len)
{
    *len = vlen;
    if (vlen > cap)
        return KEEL_ERANGE;
    if (vlen)
        memcpy(buf, val, vlen);
    return 0;
}

static uint64_t l1_expiry(keel_cache *c, uint64_t ttl)
{
    if (c->o.l1_max_ttl_ns && ttl > c->o.l1_max_ttl_ns)
        ttl = c->o.l1_max_ttl_ns;
    uint64_t now = now_ns(c);
    return keel__sat_add(now, ttl);
}

/* The load time an L1 entry keeps for XFetch: none when l1_max_ttl cuts
 * the entry short and a tier below keeps the value, since the entry's
 * expiry is then not the value's: refreshing near it would call the
 * loader for a value the tier below still holds (a get after it finds
 * it there). */
static uint64_t l1_delta(const keel_cache *c, uint64_t ttl, uint64_t delta)
{
    bool capped = c->o.l1_max_ttl_ns && ttl > c->o.l1_max_ttl_ns;
    return capped && (c->o.redis || c->o.pg) ? 0 : delta;
}

/* L1, unless an invalidation came since `seen`. */
static void l1_fill(keel_cache *c, const void *key, size_t klen, uint64_t h, const void *val, size_t vlen,
                    uint64_t ttl, uint64_t delta, const char *const *tags, size_t ntags, uint64_t seen)
{
    l1_tagref refs[CACHE_MAX_TAGS];
    if (tag_refs(c, tags, ntags, refs))
        keel__l1_set(c->l1, key, klen, h, val, vlen, l1_expiry(c, ttl), l1_delta(c, ttl, delta), refs, ntags, false,
                     &c->epoch, kepoch_of(c, h), seen);
}

/* An absence in L1 for ttl, unless an invalidation of the key came since
 * `seen`. */
static void l1_absent(keel_cache *c, const void *key, size_t klen, uint64_t h, uint64_t ttl, uint64_t seen)
{
    keel__l1_set(c->l1, key, klen, h, NULL, 0, l1_expiry(c, ttl), 0, NULL, 0, true, &c->epoch, kepoch_of(c, h), seen);
}

/* L1 after a write or a fill; with `check`, only if no invalidation came
 * since `seen`. A write leaves the new value or (it does not fit, no
 * memory, an invalidation came) no value at all, never the old one. */
static int l1_put(keel_cache *c, const void *key, size_t klen, uint64_t h, const void *val, size_t vlen,
                  uint64_t ttl, uint64_t delta, const char *const *tags, size_t ntags, bool write, bool check,
                  uint64_t seen)
{
    l1_tagref refs[CACHE_MAX_TAGS];
    int rc = tag_refs(c, tags, ntags, refs) ? keel__l1_set(c->l1, key, klen, h, val, vlen, l1_expiry(c, ttl),
                                                            l1_delta(c, ttl, delta), refs, ntags, false,
                                                            check ? &c->epoch : NULL, kepoch_of(c, h), seen)
                                             : KEEL_ENOMEM;
    if (rc && (write || rc != KEEL_ECONFLICT))
        keel__l1_del(c->l1, key, klen, h);
    return rc == KEEL_ENOMEM ? rc : 0;
}

/* A user's set: every tier, tried even when one was failing (a write
 * skipped would leave the old value there for later). The epoch moves
 * after the lower tiers have the value, so a get that read them before
 * cannot put the old one into L1 after ours; and with a tier below, L1
 * takes ours only if no invalidation came since that move: a del that ran
 * meanwhile removed it from the tiers below, and would not be seen in this
 * L1 until the value expired. (An invalidation of another key of the same
 * epoch stripe, or of a prefix or tag, counts too: then the next get reads
 * the value from below. With L1 alone, L1 holds the only
 * copy, and a del and a set simply take effect in the order they reach
 * its shard.) */
static int write_through(keel_cache *c, const void *key, size_t klen, uint64_t h, const void *val, size_t vlen,
                         uint64_t ttl, const char *const *tags, size_t ntags)
{
    int first = 0, rc;
    if (c->o.redis) {
        size_t at;
        rc = l2_put(c, key, klen, val, vlen, ttl, tags, ntags, 0, false, &at);
        if ((rc = tier_done(c, L2, at, rc)) != 0)
            first = rc;
    }
    if (c->o.pg && (rc = tier_done(c, L3, 0, l3_put(c, key, klen, val, vlen, ttl, tags, ntags, false))) != 0 && !first)
        first = rc;
    uint64_t seen = invalidated(c, key, klen, false);
    rc = l1_put(c, key, klen, h, val, vlen, ttl, 0, tags, ntags, true, c->o.redis || c->o.pg, seen);
    return first ? first : rc;
}

/* Whether an invalidation of the flight's key, or of one of the value's
 * tags, came since it began; with no flight (no memory for one), whether
 * the epoch of the key (hash h) moved since `seen`. */
static bool flight_stale(keel_cache *c, flight *f, uint64_t h, uint64_t seen, const char *const *tags, size_t ntags)
{
    if (!f)
        return seen_of(c, h) != seen;
    uint64_t th[CACHE_MAX_TAGS];
    tag_hashes(tags, ntags, th);
    pthread_mutex_lock(&c->fl_mu);
    bool stale = f->stale || flight_tainted(f, th, ntags) != SIZE_MAX;
    pthread_mutex_unlock(&c->fl_mu);
    return stale;
}

/* A loaded value: the lower tiers only where nothing newer is (SET NX, an
 * upsert over expired rows only), or with `refresh` (XFetch) over the
 * value they hold, which is the one being refreshed (else the other
 * processes would still miss at its expiry); and only if no invalidation
 * of the key came during the load (one of another key does not keep it
 * from the processes waiting on the lease); L1 only if the key's epoch did
 * not move (keel__l1_set checks that under the shard's mutex). */
static void fill_through(keel_cache *c, flight *f, const void *key, size_t klen, uint64_t h, const void *val,
                         size_t vlen, uint64_t ttl, const char *const *tags, size_t ntags, uint64_t delta,
                         uint64_t seen, bool refresh)
{
    if (flight_stale(c, f, h, seen, tags, ntags))
        return;
    if (c->o.redis)
        l2_fill(c, key, klen, val, vlen, ttl, tags, ntags, delta, refresh);
    if (c->o.pg && tier_up(c, L3, 0))
        tier_done(c, L3, 0, l3_put(c, key, klen, val, vlen, ttl, tags, ntags, !refresh));
    l1_put(c, key, klen, h, val, vlen, ttl, delta, tags, ntags, false, true, seen);
}

/* Waits (real time: another process works) until the value is in L2, or
 * the lease `lk` is gone without one (that holder failed or found
 * nothing: the caller loads), or lease_ns passed. *at: the node that
 * failed, if one did. */
static int lease_wait(keel_cache *c, const void *key, size_t klen, const char *lk, size_t lkl, redisReply **val,
                      size_t *at)
{
    char k[RKEY_MAX];
    size_t kl = rkey(c, 'v', key, klen, k);
    for (uint64_t waited = 0; waited < c->o.lease_ns; waited += 5000000u) {
        struct timespec ts = {0, 5000000};
        nanosleep(&ts, NULL);
        const char *a1[2] = {"GET", k}, *a2[2] = {"EXISTS", lk};
        size_t n1[2] = {3, kl}, n2[2] = {6, lkl};
        keel_redis_cmd cmds[2] = {{k, kl, 2, a1, n1, 0, NULL}, {lk, lkl, 2, a2, n2, 0, NULL}};
        int rc = keel_redis_pipeline(c->o.redis, cmds, 2);
        *at = failed_node(c, cmds, 2, rc, *at);
        bool got = rc == 0 && cmds[0].rc == 0 && cmds[0].reply->type == REDIS_REPLY_STRING;
        bool gone = rc == 0 && cmds[1].rc == 0 && cmds[1].reply->type == REDIS_REPLY_INTEGER &&
                    cmds[1].reply->integer == 0;
        if (got) {
            *val = cmds[0].reply;
            cmds[0].reply = NULL;
        }
        for (int i = 0; i < 2; i++)
            if (cmds[i].reply)
                freeReplyObject(cmds[i].reply);
        if (got)
            return 0;
        if (rc || gone)
            return rc ? rc : KEEL_ENOTFOUND;
    }
    return KEEL_ENOTFOUND;
}

/* Lets go of our lease lk, and only ours: it may have expired and gone
 * to another process. */
static void lease_release(keel_cache *c, const char *lk, size_t lkl)
{
    const void *keys[1] = {lk};
    const char *args[1] = {(const char *)c->self};
    size_t ks[1] = {lkl}, as[1] = {ID_LEN};
    redisReply *r = NULL;
    keel_redis_eval(c->o.redis, c->release, 1, keys, ks, 1, args, as, NULL, 0, &r);
    if (r)
        freeReplyObject(r);
}

/* *out: a copy of the value (through the hooks). */
static int dup_out(const void *val, size_t vlen, void **out, size_t *outlen)
{
    *out = keel__malloc(vlen ? vlen : 1);
    if (!*out)
        return KEEL_ENOMEM;
    if (vlen)
        memcpy(*out, val, vlen);
    *outlen = vlen;
    return 0;
}

/* An L2 reply in hand: decoded into L1 and *out (th, *nth: the hashes
 * of its tags), the reply freed. false (the reply freed too) when it is
 * not a value of ours. */
static bool l2_take(keel_cache *c, const void *key, size_t klen, uint64_t h, redisReply *r, uint64_t seen, void **out,
                    size_t *outlen, uint64_t *th, size_t *nth, int *rc)
{
    decoded d;
    bool ok = r && l2_decode(r->str, r->len, &d);
    if (ok && d.negative) { /* another process's loader said absent */
        l1_absent(c, key, klen, h, d.ttl, seen);
        *rc = KEEL_ENOTFOUND;
    } else if (ok) {
        l1_fill(c, key, klen, h, d.val, d.vlen, d.ttl, d.delta, d.tags, d.ntags, seen);
        tag_hashes(d.tags, d.ntags, th);
        *nth = d.ntags;
        *rc = dup_out(d.val, d.vlen, out, outlen);
    }
    if (r)
        freeReplyObject(r);
    return ok;
}

/* An L3 row's tags, joined by 0x1f, into d; false when they are not ours
 * (too many, or one too long for d->tagbuf). */
static bool l3_tags(const char *tt, decoded *d)
{
    char *tb = d->tagbuf;
    for (d->ntags = 0; *tt; d->ntags++) {
        size_t l = strcspn(tt, "\x1f");
        if (d->ntags == CACHE_MAX_TAGS || l == 0 || l > CACHE_MAX_TAG)
            return false;
        memcpy(tb, tt, l);
        tb[l] = '\0';
        d->tags[d->ntags] = tb;
        tb += l + 1;
        tt += l + (tt[l] != '\0');
    }
    return true;
}

/* The lower tiers (L2 unless the caller just asked it; neither when it
 * refreshes early: both hold the value as near its expiry as L1 did),
 * then the loader, for the flight f the caller leads; *out (malloc'd) is
 * the value, th and *nth the hashes of its tags (CACHE_MAX_TAGS). */
static int fill(keel_cache *c, flight *f, const void *key, size_t klen, uint64_t h, bool try_l2, bool refresh,
                void **out, size_t *outlen, uint64_t *th, size_t *nth)
{
    bool try_l3 = !refresh;
    uint64_t seen = seen_of(c, h);
    redisReply *r = NULL;
    uint64_t ttl = 0;
    int rc;
    size_t vnode = c->o.redis ? node_of(c, 'v', key, klen) : 0;
    if (try_l2 && c->o.redis && tier_up(c, L2, vnode)) {
        rc = tier_done(c, L2, vnode, l2_get(c, key, klen, &r));
        if (l2_take(c, key, klen, h, rc == 0 ? r : NULL, seen, out, outlen, th, nth, &rc)) {
            if (rc != KEEL_ENOTFOUND)
                atomic_fetch_add_explicit(&c->st.hits_l2, 1, memory_order_relaxed);
            return rc;
        }
        if (rc == KEEL_ENOMEM) /* not a miss: L2 may hold a value the loader does not */
            return rc;
    }
    if (try_l3 && c->o.pg && tier_up(c, L3, 0)) {
        PGresult *res = NULL;
        rc = tier_done(c, L3, 0, l3_get(c, key, klen, &res));
        if (rc == KEEL_ENOMEM)
            return rc;
        decoded d;
        if (rc == 0 && !l3_tags(PQgetvalue(res, 0, 1), &d)) { /* a row we did not write: a miss */
            PQclear(res);
            rc = KEEL_ENOTFOUND;
        }
        if (rc == 0) {
            atomic_fetch_add_explicit(&c->st.hits_l3, 1, memory_order_relaxed);
            size_t vlen = (size_t)PQgetlength(res, 0, 0);
            const char *val = PQgetvalue(res, 0, 0);
            uint64_t ms_left;
            memcpy(&ms_left, PQgetvalue(res, 0, 2), 8);
            ttl = ms_to_ns(be64toh(ms_left));
            if (c->o.redis && !flight_stale(c, f, h, seen, d.tags, d.ntags))
                l2_fill(c, key, klen, val, vlen, ttl, d.tags, d.ntags, 0, false);
            l1_fill(c, key, klen, h, val, vlen, ttl, 0, d.tags, d.ntags, seen);
            tag_hashes(d.tags, d.ntags, th);
            *nth = d.ntags;
            rc = dup_out(val, vlen, out, outlen);
            PQclear(res);
            return rc;
        }
    }
    if (!c->o.loader)
        return KEEL_ENOTFOUND;
    char lk[RKEY_MAX];
    size_t lkl = 0;
    bool leased = false;
    size_t lnode = c->o.redis ? node_of(c, 'l', key, klen) : 0;
    if (c->o.lease && c->o.redis && tier_up(c, L2, lnode)) {
        lkl = rkey(c, 'l', key, klen, lk);
        char ms[24];
        snprintf(ms, sizeof ms, "%llu", (unsigned long long)(c->o.lease_ns / 1000000u ? c->o.lease_ns / 1000000u : 1));
        const char *a[6] = {"SET", lk, (const char *)c->self, "NX", "PX", ms};
        size_t l[6] = {3, lkl, ID_LEN, 2, 2, strlen(ms)};
        rc = tier_done(c, L2, lnode, keel_redis_command(c->o.redis, lk, lkl, 6, a, l, &r));
        leased = rc == 0 && r->type == REDIS_REPLY_STATUS;
        bool other = rc == 0 && r->type == REDIS_REPLY_NIL;
        if (r)
            freeReplyObject(r);
        r = NULL;
        /* L2 once more: another process may have filled it, and let go of
         * its lease, since we looked (not for a refresh: L2 holds the
         * value being refreshed) */
        if (leased && !refresh && tier_up(c, L2, vnode)) {
            rc = tier_done(c, L2, vnode, l2_get(c, key, klen, &r));
            if (l2_take(c, key, klen, h, rc == 0 ? r : NULL, seen, out, outlen, th, nth, &rc) ||
                rc == KEEL_ENOMEM) {
                if (rc == 0)
                    atomic_fetch_add_explicit(&c->st.hits_l2, 1, memory_order_relaxed);
                lease_release(c, lk, lkl);
                return rc;
            }
            r = NULL;
        }
        if (other) { /* another process loads: wait for its value */
            atomic_fetch_add_explicit(&c->st.load_waits, 1, memory_order_relaxed);
            r = NULL;
            size_t at = vnode;
            int wrc = KEEL_EUNAVAIL;
            if (tier_up(c, L2, vnode)) {
                wrc = lease_wait(c, key, klen, lk, lkl, &r, &at);
                l2_done(c, vnode, at, wrc);
            }
            if (l2_take(c, key, klen, h, wrc == 0 ? r : NULL, seen, out, outlen, th, nth, &rc))
                return rc;
        }
    }
    keel_cache_load ld = {.max_value = c->o.max_value};
    uint64_t t0 = now_ns(c);
    atomic_fetch_add_explicit(&c->st.loads, 1, memory_order_relaxed);
    rc = c->o.loader(key, klen, &ld, c->o.loader_ud);
    uint64_t delta = now_ns(c) - t0;
    if (rc == 0 && !ld.set)
        rc = KEEL_EPROTO; /* said yes, gave nothing */
    if (rc == KEEL_ENOTFOUND) {
        /* a refresh found the key gone: as a del, from every tier and
         * process, unless an invalidation (a set among them) came meanwhile */
        bool fresh = !flight_stale(c, f, h, seen, NULL, 0);
        if (c->o.redis && fresh)
            l2_absent(c, key, klen, refresh);
        if (refresh && fresh && c->o.pg) /* tried even when failing, as by a del */
            tier_done(c, L3, 0, l3_one(c, c->st_del, key, (int)klen, NULL));
        if (refresh && fresh) /* the key's epoch moves, as by a del: a get that
                                 read the old value below keeps it out of L1 */
            seen = invalidated(c, key, klen, false);
        l1_absent(c, key, klen, h, c->o.negative_ttl_ns, seen);
        if (refresh && fresh)
            announce(c, 'K', key, klen);
    } else if (rc == 0) {
        uint64_t lttl = ld.ttl ? ld.ttl : c->o.default_ttl_ns;
        fill_through(c, f, key, klen, h, ld.val, ld.vlen, lttl, ld.tags, ld.ntags, delta, seen, refresh);
        tag_hashes(ld.tags, ld.ntags, th);
        *nth = ld.ntags;
        *out = ld.val;
        *outlen = ld.vlen;
        ld.val = NULL;
    }
    if (leased)
        lease_release(c, lk, lkl);
    keel__free(ld.val);
    keel__free(ld.tagcopy);
    return rc;
}

KEEL_API int keel_cache_load_set(keel_cache_load *ld, const void *val, size_t vlen, uint64_t ttl_ns,
                                 const char *const *tags, size_t ntags)
{
    if (!ld || (vlen && !val) || vlen > ld->max_value || !good_tags(tags, ntags))
        return KEEL_EINVAL;
    size_t tl = 0;
    for (size_t i = 0; i < ntags; i++)
        tl += strlen(tags[i]) + 1;
    void *copy = keel__malloc(vlen ? vlen : 1);
    char *tc = keel__malloc(tl ? tl : 1);
    if (!copy || !tc) {
        keel__free(copy);
        keel__free(tc);
        return KEEL_ENOMEM;
    }
    if (vlen)
        memcpy(copy, val, vlen);
    keel__free(ld->val);
    keel__free(ld->tagcopy);
    ld->val = copy;
    ld->vlen = vlen;
    ld->ttl = ttl_ns;
    ld->tagcopy = tc;
    for (size_t i = 0; i < ntags; i++) { /* tc was sized for them all */
        size_t l = strlen(tags[i]) + 1;
        ld->tags[i] = memcpy(tc, tags[i], l);
        tc += l;
    }
    ld->ntags = ntags;
    ld->set = true;
    return 0;
}

/* XFetch: refresh early with probability rising as expiry nears. */
static bool refresh_early(keel_cache *c, const l1_hit *hit)
{
    if (c->o.xfetch_beta <= 0 || !hit->delta || !c->o.loader) /* no loader: nothing to refresh from */
        return false;
    double u = ((double)(keel__rand_next(&c->rand) >> 11) + 1.0) / 9007199254740993.0; /* (0, 1] */
    double gap = -(double)hit->delta * c->o.xfetch_beta * log(u);
    return (double)now_ns(c) + gap >= (double)hit->expires;
}

static bool key_ok(const keel_cache *c, const void *key, size_t klen)
{
    return key && klen && klen <= c->o.max_key;
}

static int miss(keel_cache *c, const void *key, size_t klen, uint64_t h, bool try_l2, bool stale_ok, void *buf,
                size_t cap, size_t *len);

KEEL_API int keel_cache_get(keel_cache *c, const void *key, size_t klen, void *buf, size_t cap, size_t *len)
{
    if (!c || !key_ok(c, key, klen) || !len || (cap && !buf))
        return KEEL_EINVAL;
    uint64_t h = key_hash(c, key, klen);
    l1_hit hit;
    int rc = keel__l1_get(c->l1, key, klen, h, buf, cap, len, &hit);
    bool stale_ok = false;
    if (rc == 0 || rc == KEEL_ERANGE) {
        if (hit.negative) {
            keel__stripe_add(&my_stripe(c)->negative_hits, 1);
            return KEEL_ENOTFOUND;
        }
        keel__stripe_add(&my_stripe(c)->hits_l1, 1); /* a refresh too: the value is in buf */
        if (rc != 0 || !refresh_early(c, &hit))
            return rc;
        stale_ok = true; /* refreshing early: the value in buf stands if that fails */
    } else {
        keel__stripe_add(&my_stripe(c)->misses, 1);
    }
    return miss(c, key, klen, h, !stale_ok, stale_ok, buf, cap, len); /* a refresh asks the loader */
}

/* A miss (or an early refresh: stale_ok, the value already in buf), with
 * single-flight. */
static int miss(keel_cache *c, const void *key, size_t klen, uint64_t h, bool try_l2, bool stale_ok, void *buf,
                size_t cap, size_t *len)
{
    int rc;
    flight *f;
    size_t joined = 0;
    bool leader = sf_join(c, key, klen, h, false, &f, &joined);
    if (!leader && stale_ok) { /* someone refreshes it already: ours stands */
        sf_leave(c, f);
        return 0;
    }
    if (!leader) { /* another thread loads it */
        atomic_fetch_add_explicit(&c->st.load_waits, 1, memory_order_relaxed);
        pthread_mutex_lock(&c->fl_mu);
        while (!f->done)
            pthread_cond_wait(&f->cv, &c->fl_mu);
        pthread_mutex_unlock(&c->fl_mu);
        if (f->rc != 0 || f->tainted >= joined) {
            rc = f->rc == 0 ? copy_out(f->val, f->vlen, buf, cap, len) : f->rc;
            sf_leave(c, f);
            return rc;
        }
        /* we came after a tag of the value went: a load of our own, not
         * another flight (a hot tag may taint that one too), so a caller
         * waits for at most one load besides its own */
        sf_leave(c, f);
        sf_join(c, key, klen, h, true, &f, &joined);
        try_l2 = true;
    }
    void *val = NULL;
    size_t vlen = 0, nth = 0;
    uint64_t th[CACHE_MAX_TAGS];
    rc = fill(c, f, key, klen, h, try_l2, stale_ok, &val, &vlen, th, &nth);
    sf_finish(c, f, rc, val, vlen, th, nth);
    sf_leave(c, f);
    if (rc == 0)
        rc = copy_out(val, vlen, buf, cap, len);
    else if (stale_ok && rc != KEEL_ENOTFOUND) /* gone now: so L1 says too */
        rc = 0;
    keel__free(val);
    return rc;
}

/* L2 for the items still missing (len SIZE_MAX): one MGET per node, at
 * most 512 keys each, for the nodes not being skipped. A node that fails
 * is passed over for the others; its items, and those of a node skipped,
 * keep rc KEEL_EUNAVAIL, while those asked for in vain get
 * KEEL_ENOTFOUND. Returns 0 or KEEL_ENOMEM. */
static int l2_get_many(keel_cache *c, keel_cache_item *it, size_t n)
{
    int failed = 0;
    size_t nodes = keel_redis_nodes(c->o.redis);
    size_t most = n < 512 ? n : 512; /* keys in one MGET */
    const char **argv = keel__malloc((most + 1) * sizeof *argv);
    size_t *lens = keel__malloc((most + 1) * sizeof *lens), *idx = keel__malloc(most * sizeof *idx);
    uint64_t *seen = keel__malloc(most * sizeof *seen), *hs = keel__malloc(most * sizeof *hs);
    char *keys = keel__malloc(most * RKEY_MAX);
    for (size_t node = 0; argv && lens && idx && seen && hs && keys && node < nodes; node++) {
        size_t from = 0;
        while (from < n) {
            size_t k = 0;
            argv[0] = "MGET";
            lens[0] = 4;
            for (; from < n && k < most; from++) {
                if (it[from].len != SIZE_MAX)
                    continue;
                char *kb = keys + k * RKEY_MAX;
                size_t kl = rkey(c, 'v', it[from].key, it[from].klen, kb);
                if (keel_redis_node_of(c->o.redis, kb, kl) != node)
                    continue;
                argv[k + 1] = kb;
                lens[k + 1] = kl;
                hs[k] = key_hash(c, it[from].key, it[from].klen);
                seen[k] = seen_of(c, hs[k]); /* before the read */
                idx[k++] = from;
            }
            if (!k || !tier_up(c, L2, node))
                break;
            redisReply *r = NULL;
            int rc = keel__redis_command_on(c->o.redis, node, (int)k + 1, argv, lens, &r);
            if (rc == 0 && (r->type != REDIS_REPLY_ARRAY || r->elements != k))
                rc = KEEL_EPROTO;
            tier_done(c, L2, node, rc);
            for (size_t j = 0; rc == 0 && j < k; j++) {
                decoded d;
                redisReply *e = r->element[j];
                keel_cache_item *x = &it[idx[j]];
                x->rc = KEEL_ENOTFOUND; /* asked: a miss, unless below */
                if (e->type != REDIS_REPLY_STRING || !l2_decode(e->str, e->len, &d))
                    continue;
                if (d.negative) { /* another process's loader said absent: so it is here */
                    l1_absent(c, x->key, x->klen, hs[j], d.ttl, seen[j]);
                    x->len = 0;
                    continue;
                }
                atomic_fetch_add_explicit(&c->st.hits_l2, 1, memory_order_relaxed);
                l1_fill(c, x->key, x->klen, hs[j], d.val, d.vlen, d.ttl, d.delta, d.tags, d.ntags, seen[j]);
                x->rc = copy_out(d.val, d.vlen, x->buf, x->cap, &x->len);
            }
            if (r)
                freeReplyObject(r);
            if (rc) /* this node's other batches too: they would fail alike */
                break;
        }
    }
    if (!argv || !lens || !idx || !seen || !hs || !keys)
        failed = KEEL_ENOMEM;
    keel__free(argv);
    keel__free(lens);
    keel__free(idx);
    keel__free(seen);
    keel__free(hs);
    keel__free(keys);
    return failed;
}

/* An item from L1: its rc, and *negative for a cached absence. */
static int l1_item(keel_cache *c, keel_cache_item *x, bool *negative)
{
    l1_hit hit;
    x->rc = keel__l1_get(c->l1, x->key, x->klen, key_hash(c, x->key, x->klen), x->buf, x->cap, &x->len, &hit);
    *negative = (x->rc == 0 || x->rc == KEEL_ERANGE) && hit.negative;
    if (*negative)
        x->rc = KEEL_ENOTFOUND;
    return x->rc;
}

/* One item of a multi-get, for the copies of a key given more than once:
 * the first copy asks for them all (L1 may not keep the value, or an
 * error, for a second to find), into the largest of their buffers. */
typedef struct same_key {
    uint64_t h;
    size_t i;
    size_t first; /* the copy that asks (i itself for it) */
    size_t back;  /* while sorted: the previous first of its hash run */
    void *buf;    /* the item's own buffer, while the first borrows another */
    size_t cap;
} same_key;

static int by_hash(const void *a, const void *b)
{
    const same_key *x = a, *y = b;
    return x->h != y->h ? (x->h < y->h ? -1 : 1) : (x->i > y->i) - (x->i < y->i);
}

static bool good_item(const keel_cache *c, const keel_cache_item *x)
{
    return key_ok(c, x->key, x->klen) && (!x->cap || x->buf);
}

static bool same_bytes(const keel_cache_item *x, const keel_cache_item *y)
{
    return x->klen == y->klen && memcmp(x->key, y->key, x->klen) == 0;
}

/* Finds the copies (by hash, then bytes) and lends each first copy the
 * largest buffer among its own; indexed by item. NULL when there are none
 * or no memory (each copy then asks alone, as before). */
static same_key *same_keys(keel_cache *c, keel_cache_item *it, size_t n)
{
    same_key *s = n > 1 ? keel__malloc(n * sizeof *s) : NULL, *byi = s ? keel__malloc(n * sizeof *byi) : NULL;
    if (!byi) {
        keel__free(s);
        return NULL;
    }
    for (size_t i = 0; i < n; i++)
        s[i] = (same_key){good_item(c, &it[i]) ? key_hash(c, it[i].key, it[i].klen) : 0, i, i, SIZE_MAX, it[i].buf,
                          it[i].cap};
    qsort(s, n, sizeof *s, by_hash);
    bool any = false;
    /* each copy's first: the earliest of its hash run with the same bytes.
     * Linear in the copies (keys may come from clients): a copy of the
     * item before it takes that one's first; any other is compared with
     * the run's distinct firsts only, chained through back. */
    size_t last = SIZE_MAX; /* the run's latest first */
    for (size_t a = 0; a < n; a++) {
        const keel_cache_item *x = &it[s[a].i];
        bool run = a > 0 && s[a - 1].h == s[a].h;
        if (!run)
            last = SIZE_MAX;
        if (!good_item(c, x))
            continue; /* asks for nothing, and is no one's first */
        if (run && s[a - 1].first != s[a - 1].i && same_bytes(&it[s[a - 1].i], x)) {
            s[a].first = s[a - 1].first;
            continue;
        }
        for (size_t b = last; b != SIZE_MAX && s[a].first == s[a].i; b = s[b].back)
            if (same_bytes(&it[s[b].i], x)) {
                s[a].first = s[b].i;
                any = true;
            }
        if (s[a].first == s[a].i) {
            s[a].back = last;
            last = a;
        }
    }
    for (size_t a = 0; a < n; a++)
        byi[s[a].i] = s[a];
    keel__free(s);
    if (!any) {
        keel__free(byi);
        return NULL;
    }
    for (size_t i = 0; i < n; i++) { /* the first asks into the largest buffer */
        keel_cache_item *f = &it[byi[i].first];
        if (it[i].cap > f->cap) {
            f->buf = it[i].buf;
            f->cap = it[i].cap;
        }
    }
    return byi;
}

/* Gives each copy its first's result, in its own buffer, and the first
 * its own buffer back. */
static void same_results(keel_cache_item *it, size_t n, same_key *sk)
{
    for (size_t i = 0; i < n; i++) {
        keel_cache_item *x = &it[i], *f = &it[sk[i].first];
        if (sk[i].first == i)
            continue;
        x->rc = f->rc;
        x->len = f->rc == 0 || f->rc == KEEL_ERANGE ? f->len : 0;
        if (f->rc == 0 && f->len > x->cap)
            x->rc = KEEL_ERANGE;
        else if (f->rc == 0 && f->len && x->buf != f->buf)
            memmove(x->buf, f->buf, f->len);
    }
    for (size_t i = 0; i < n; i++) {
        keel_cache_item *f = &it[i];
        if (sk[i].first != i || f->buf == sk[i].buf)
            continue;
        if (f->rc == 0 && f->len > sk[i].cap)
            f->rc = KEEL_ERANGE;
        else if (f->rc == 0 && f->len)
            memmove(sk[i].buf, f->buf, f->len);
        f->buf = sk[i].buf;
        f->cap = sk[i].cap;
    }
}

KEEL_API int keel_cache_get_many(keel_cache *c, keel_cache_item *items, size_t n)
{
    if (!c || (n && !items))
        return KEEL_EINVAL;
    same_key *sk = same_keys(c, items, n);
    size_t missing = 0;
    for (size_t i = 0; i < n; i++) {
        keel_cache_item *x = &items[i];
        if (!good_item(c, x)) {
            x->rc = KEEL_EINVAL;
            x->len = 0;
            continue;
        }
        if (sk && sk[i].first != i) { /* its first copy asks */
            x->rc = 0;
            x->len = 0;
            continue;
        }
        bool negative;
        x->rc = l1_item(c, x, &negative);
        if (negative) {
            keel__stripe_add(&my_stripe(c)->negative_hits, 1);
        } else if (x->rc == 0 || x->rc == KEEL_ERANGE) {
            keel__stripe_add(&my_stripe(c)->hits_l1, 1);
        } else {
            keel__stripe_add(&my_stripe(c)->misses, 1);
            x->len = SIZE_MAX; /* still to find */
            x->rc = KEEL_EUNAVAIL; /* not asked of L2 yet */
            missing++;
        }
    }
    if (missing && c->o.redis && l2_get_many(c, items, n) != 0)
        for (size_t i = 0; i < n; i++) /* no memory for the MGETs: each key asks alone */
            if (items[i].len == SIZE_MAX)
                items[i].rc = KEEL_EUNAVAIL;
    for (size_t i = 0; i < n; i++) {
        keel_cache_item *x = &items[i];
        /* L2 alone for a key its node's MGET did not answer (skipped nodes
         * are skipped again at once) */
        bool asked = x->rc == KEEL_ENOTFOUND, negative;
        /* L1 again: another item's load may have brought the key */
        if (x->len == SIZE_MAX && l1_item(c, x, &negative) == KEEL_ENOTFOUND && !negative)
            x->rc = miss(c, x->key, x->klen, key_hash(c, x->key, x->klen), !asked, false, x->buf, x->cap, &x->len);
        if (x->rc != 0 && x->len == SIZE_MAX)
            x->len = 0;
    }
    if (sk)
        same_results(items, n, sk);
    keel__free(sk);
    int first = 0;
    for (size_t i = 0; i < n && !first; i++)
        first = items[i].rc;
    return first;
}

KEEL_API int keel_cache_set(keel_cache *c, const void *key, size_t klen, const void *val, size_t vlen,
                            uint64_t ttl_ns, const char *const *tags, size_t ntags)
{
    if (!c || !key_ok(c, key, klen) || (vlen && !val) || vlen > c->o.max_value || !good_tags(tags, ntags))
        return KEEL_EINVAL;
    uint64_t h = key_hash(c, key, klen);
    int rc = write_through(c, key, klen, h, val, vlen, ttl_ns ? ttl_ns : c->o.default_ttl_ns, tags, ntags);
    announce(c, 'K', key, klen);
    return rc;
}

KEEL_API int keel_cache_del(keel_cache *c, const void *key, size_t klen)
{
    if (!c || !key_ok(c, key, klen))
        return KEEL_EINVAL;
    uint64_t h = key_hash(c, key, klen);
    invalidated(c, key, klen, false);
    keel__l1_del(c->l1, key, klen, h);
    int first = 0, rc; /* tried even when failing: a delete must not be skipped */
    if (c->o.redis && (rc = tier_done(c, L2, node_of(c, 'v', key, klen), l2_del(c, key, klen))) != 0)
        first = rc;
    if (c->o.pg && (rc = tier_done(c, L3, 0, l3_one(c, c->st_del, key, (int)klen, NULL))) != 0 && !first)
        first = rc;
    invalidated(c, key, klen, false); /* and again: a get that read a lower tier meanwhile */
    keel__l1_del(c->l1, key, klen, h);
    announce(c, 'K', key, klen);
    return first;
}

/* L2: the keys of a tag's set, deleted with the set. *at: the node that
 * failed (the set's when none did). */
static int l2_del_tag(keel_cache *c, const char *tag, size_t *at)
{
    char tk[TKEY_MAX];
    size_t tkl = rkey(c, 't', tag, strlen(tag), tk);
    *at = keel_redis_node_of(c->o.redis, tk, tkl);
    const char *a[2] = {"SMEMBERS", tk};
    size_t l[2] = {8, tkl};
    redisReply *m = NULL;
    int rc = keel_redis_command(c->o.redis, tk, tkl, 2, a, l, &m);
    size_t n = rc == 0 && m->type == REDIS_REPLY_ARRAY ? m->elements : 0;
    /* each key DEL'd on its node, then SREM of exactly those from the set
     * (a member added meanwhile stays for the next invalidation) */
    keel_redis_cmd *cmds = rc == 0 && n ? keel__calloc(n + 1, sizeof *cmds) : NULL;
    const char **argv = cmds ? keel__malloc((3 * n + 2) * sizeof *argv) : NULL;
    size_t *lens = cmds ? keel__malloc((3 * n + 2) * sizeof *lens) : NULL;
    if (rc == 0 && n && (!cmds || !argv || !lens))
        rc = KEEL_ENOMEM;
    const char **srem = argv ? argv + 2 * n : NULL;
    size_t *sreml = lens ? lens + 2 * n : NULL;
    for (size_t i = 0; rc == 0 && i < n; i++) {
        const char *k = m->element[i]->str;
        size_t kl = m->element[i]->len;
        argv[2 * i] = "DEL", argv[2 * i + 1] = k;
        lens[2 * i] = 3, lens[2 * i + 1] = kl;
        cmds[i] = (keel_redis_cmd){k, kl, 2, &argv[2 * i], &lens[2 * i], 0, NULL};
        srem[2 + i] = k;
        sreml[2 + i] = kl;
    }
    if (rc == 0 && n) {
        srem[0] = "SREM", srem[1] = tk;
        sreml[0] = 4, sreml[1] = tkl;
        rc = keel_redis_pipeline(c->o.redis, cmds, n);
        *at = failed_node(c, cmds, n, rc, *at);
        for (size_t i = 0; rc == 0 && i < n; i++)
            rc = cmds[i].rc;
        if (rc == 0) {
            redisReply *x = NULL;
            rc = keel_redis_command(c->o.redis, tk, tkl, (int)n + 2, srem, sreml, &x);
            if (x)
                freeReplyObject(x);
        }
    }
    for (size_t i = 0; cmds && i < n; i++)
        if (cmds[i].reply)
            freeReplyObject(cmds[i].reply);
    keel__free(cmds);
    keel__free(argv);
    keel__free(lens);
    if (m)
        freeReplyObject(m);
    return rc;
}

/* Makes L1's entries carrying the tag miss. The epoch moves first: a
 * value read below before it, whose tags' versions are taken after the
 * bump, stays out of L1 all the same. The loads in flight go on taking
 * callers: only those whose value carries the tag are kept from the
 * lower tiers and from the callers that came after it (flights_tag). */
static void bump_tag(keel_cache *c, const char *tag)
{
    atomic_fetch_add(&c->epoch, 1);
    flights_tag(c, tag);
    tag_bump(c, tag);
}

KEEL_API int keel_cache_invalidate_tag(keel_cache *c, const char *tag)
{
    if (!c || !good_tags(&tag, 1))
        return KEEL_EINVAL;
    bump_tag(c, tag);
    int first = 0, rc;
    if (c->o.redis) {
        size_t at;
        rc = l2_del_tag(c, tag, &at);
        if ((rc = tier_done(c, L2, at, rc)) != 0)
            first = rc;
    }
    if (c->o.pg && (rc = tier_done(c, L3, 0, l3_one(c, c->st_del_tag, tag, -1, NULL))) != 0 && !first)
        first = rc;
    bump_tag(c, tag); /* a get that read a lower tier meanwhile */
    announce(c, 'T', tag, strlen(tag));
    return first;
}

/* L2: SCAN each node for prefix* (glob characters escaped), DEL them; a
 * node that fails is passed over for the others. Returns the first
 * failure. */
static int l2_del_prefix(keel_cache *c, const void *prefix, size_t len)
{
    char raw[1400], pat[2900];
    size_t rl = rkey(c, 'v', prefix, len, raw), pl = 0;
    for (size_t i = 0; i < rl; i++) {
        if (strchr("*?[]\\", raw[i]) && raw[i])
            pat[pl++] = '\\';
        pat[pl++] = raw[i];
    }
    pat[pl++] = '*';
    int first = 0;
    for (size_t node = 0; node < keel_redis_nodes(c->o.redis); node++) {
        int rc = 0;
        char cursor[32] = "0";
        do {
            const char *a[6] = {"SCAN", cursor, "MATCH", pat, "COUNT", "1000"};
            size_t l[6] = {4, strlen(cursor), 5, pl, 5, 4};
            redisReply *r = NULL;
            rc = keel__redis_command_on(c->o.redis, node, 6, a, l, &r);
            if (rc == 0 && (r->type != REDIS_REPLY_ARRAY || r->elements != 2))
                rc = KEEL_EPROTO;
            if (rc == 0) {
                snprintf(cursor, sizeof cursor, "%s", r->element[0]->str);
                redisReply *keys = r->element[1];
                size_t n = keys->elements; /* one UNLINK for the page */
                const char **d = n ? keel__malloc((n + 1) * sizeof *d) : NULL;
                size_t *dl = n ? keel__malloc((n + 1) * sizeof *dl) : NULL;
                if (n && (!d || !dl))
                    rc = KEEL_ENOMEM;
                if (rc == 0 && n) {
                    d[0] = "UNLINK";
                    dl[0] = 6;
                    for (size_t i = 0; i < n; i++) {
                        d[i + 1] = keys->element[i]->str;
                        dl[i + 1] = keys->element[i]->len;
                    }
                    redisReply *x = NULL;
                    rc = keel__redis_command_on(c->o.redis, node, (int)n + 1, d, dl, &x);
                    if (x)
                        freeReplyObject(x);
                }
                keel__free(d);
                keel__free(dl);
            }
            if (r)
                freeReplyObject(r);
        } while (rc == 0 && strcmp(cursor, "0") != 0);
        if (tier_done(c, L2, node, rc) && !first)
            first = rc;
    }
    return first;
}

KEEL_API int keel_cache_invalidate_prefix(keel_cache *c, const void *prefix, size_t len)
{
    if (!c || (len && !prefix) || len > c->o.max_key)
        return KEEL_EINVAL;
    if (!len)
        prefix = "";
    invalidated(c, prefix, len, true);
    keel__l1_del_prefix(c->l1, prefix, len);
    int first = 0, rc;
    if (c->o.redis && (rc = l2_del_prefix(c, prefix, len)) != 0)
        first = rc;
    if (c->o.pg) {
        unsigned char pat[2 * 1024 + 1]; /* LIKE: \, % and _ escaped, then % */
        size_t pl = 0;
        for (size_t i = 0; i < len; i++) {
            unsigned char ch = ((const unsigned char *)prefix)[i];
            if (ch == '\\' || ch == '%' || ch == '_')
                pat[pl++] = '\\';
            pat[pl++] = ch;
        }
        pat[pl++] = '%';
        if ((rc = tier_done(c, L3, 0, l3_one(c, c->st_del_prefix, pat, (int)pl, NULL))) != 0 && !first)
            first = rc;
    }
    invalidated(c, prefix, len, true);
    keel__l1_del_prefix(c->l1, prefix, len);
    announce(c, 'P', prefix, len);
    return first;
}

KEEL_API int keel_cache_sweep(keel_cache *c, size_t batch, size_t *deleted)
{
    if (deleted)
        *deleted = 0;
    if (!c)
        return KEEL_EINVAL;
    if (!c->o.pg)
        return 0;
    char n[24]; /* LIMIT takes a bigint: a batch past it is no limit */
    snprintf(n, sizeof n, "%llu", batch ? (unsigned long long)(batch < INT64_MAX ? batch : INT64_MAX) : 1000ull);
    return l3_one(c, c->st_sweep, n, -1, deleted);
}

static void *sweeper(void *arg)
{
    keel_cache *c = arg;
    pthread_mutex_lock(&c->sweep_mu);
    while (!c->stop) {
        struct timespec ts;
        keel__abstime_in(c->o.sweep_interval_ns, &ts);
        if (pthread_cond_timedwait(&c->sweep_cv, &c->sweep_mu, &ts) == 0 || c->stop)
            continue;
        pthread_mutex_unlock(&c->sweep_mu);
        size_t n = 0;
        do /* batch after batch while they come back full */
            if (keel_cache_sweep(c, 1000, &n) != 0)
                n = 0;
        while (n == 1000 && !c->stop);
        pthread_mutex_lock(&c->sweep_mu);
    }
    pthread_mutex_unlock(&c->sweep_mu);
    return NULL;
}

/* ---- messages from other processes ---- */

static void on_message(const char *channel, size_t chlen, const char *msg, size_t len, const char *pattern, void *ud)
{
    (void)channel, (void)chlen, (void)pattern;
    keel_cache *c = ud;
    if (len < ID_LEN + 1 || memcmp(msg, c->self, ID_LEN) == 0)
        return;
    const char *p = msg + ID_LEN + 1;
    size_t n = len - ID_LEN - 1;
    atomic_fetch_add_explicit(&c->st.invalidations_received, 1, memory_order_relaxed);
    if (msg[ID_LEN] == 'K' && n) {
        invalidated(c, p, n, false);
        keel__l1_del(c->l1, p, n, key_hash(c, p, n));
    } else if (msg[ID_LEN] == 'T' && n && n <= CACHE_MAX_TAG) {
        char tag[CACHE_MAX_TAG + 1];
        memcpy(tag, p, n);
        tag[n] = '\0';
        bump_tag(c, tag);
    } else if (msg[ID_LEN] == 'P') {
        invalidated(c, p, n, true);
        keel__l1_del_prefix(c->l1, p, n);
    } else {
        invalidated(c, NULL, 0, false);
        keel__l1_flush(c->l1); /* a message we do not understand: be safe */
    }
}

/* The invalidation link dropped, or came back: invalidations were or may
 * have been missed. Both flush, so that nothing cached before the drop or
 * during the outage outlives it. */
static void link_changed(void *ud)
{
    keel_cache *c = ud;
    invalidated(c, NULL, 0, false);
    keel__l1_flush(c->l1);
    atomic_fetch_add_explicit(&c->st.flushes, 1, memory_order_relaxed);
}

/* ---- lifetime ---- */

KEEL_API void keel_cache_stats_get(keel_cache *c, keel_cache_stats *st)
{
    if (!st)
        return;
    memset(st, 0, sizeof *st);
    if (!c)
        return;
    for (size_t i = 0; i < KEEL__STRIPES; i++) {
        st->hits_l1 += atomic_load_explicit(&c->lk[i].hits_l1, memory_order_relaxed);
        st->misses += atomic_load_explicit(&c->lk[i].misses, memory_order_relaxed);
        st->negative_hits += atomic_load_explicit(&c->lk[i].negative_hits, memory_order_relaxed);
    }
    st->hits_l2 = atomic_load(&c->st.hits_l2);
    st->hits_l3 = atomic_load(&c->st.hits_l3);
    st->loads = atomic_load(&c->st.loads);
    st->load_waits = atomic_load(&c->st.load_waits);
    st->invalidations_received = atomic_load(&c->st.invalidations_received);
    st->flushes = atomic_load(&c->st.flushes);
    st->errors_l2 = atomic_load(&c->st.errors[L2]);
    st->errors_l3 = atomic_load(&c->st.errors[L3]);
    l1_stats ls;
    keel__l1_stats(c->l1, &ls);
    st->evictions = ls.evictions;
    st->expirations = ls.expirations;
    st->l1_items = ls.items;
    st->l1_bytes = ls.bytes;
    st->tags = tags_count(c);
}

KEEL__STAT_FN(m_hits_l1, keel_cache_stats, keel_cache_stats_get, hits_l1)
KEEL__STAT_FN(m_hits_l2, keel_cache_stats, keel_cache_stats_get, hits_l2)
KEEL__STAT_FN(m_hits_l3, keel_cache_stats, keel_cache_stats_get, hits_l3)
KEEL__STAT_FN(m_misses, keel_cache_stats, keel_cache_stats_get, misses)
KEEL__STAT_FN(m_loads, keel_cache_stats, keel_cache_stats_get, loads)
KEEL__STAT_FN(m_evictions, keel_cache_stats, keel_cache_stats_get, evictions)
KEEL__STAT_FN(m_items, keel_cache_stats, keel_cache_stats_get, l1_items)
KEEL__STAT_FN(m_err_l2, keel_cache_stats, keel_cache_stats_get, errors_l2)
KEEL__STAT_FN(m_err_l3, keel_cache_stats, keel_cache_stats_get, errors_l3)
KEEL__STAT_FN(m_negative, keel_cache_stats, keel_cache_stats_get, negative_hits)
KEEL__STAT_FN(m_load_waits, keel_cache_stats, keel_cache_stats_get, load_waits)
KEEL__STAT_FN(m_expirations, keel_cache_stats, keel_cache_stats_get, expirations)
KEEL__STAT_FN(m_inval, keel_cache_stats, keel_cache_stats_get, invalidations_received)
KEEL__STAT_FN(m_flushes, keel_cache_stats, keel_cache_stats_get, flushes)
KEEL__STAT_FN(m_bytes, keel_cache_stats, keel_cache_stats_get, l1_bytes)

static bool good_table(const char *t)
{
    size_t n = strlen(t);
    if (n == 0 || n > 48)
        return false;
    for (; *t; t++)
        if (!((*t >= 'a' && *t <= 'z') || (*t >= '0' && *t <= '9') || *t == '_'))
            return false;
    return true;
}

static int prepare(keel_cache *c)
{
    char sql[640];
    const char *t = c->table;
    struct {
        keel_pg_stmt **out;
        const char *fmt;
    } s[] = {
        {&c->st_get, "SELECT value, array_to_string(tags, E'\\x1f'), "
                     "GREATEST(1, (extract(epoch from expires_at - now()) * 1000)::bigint) "
                     "FROM \"%s\" WHERE key = $1 AND expires_at > now()"},
        {&c->st_put, "INSERT INTO \"%s\" (key, value, expires_at, tags) VALUES ($1, $2, now() + $3::bigint * "
                     "interval '1 millisecond', string_to_array(NULLIF($4, ''), E'\\x1f')) ON CONFLICT (key) DO "
                     "UPDATE SET value = excluded.value, expires_at = excluded.expires_at, tags = excluded.tags"},
        {&c->st_fill, "INSERT INTO \"%1$s\" (key, value, expires_at, tags) VALUES ($1, $2, now() + $3::bigint * "
                      "interval '1 millisecond', string_to_array(NULLIF($4, ''), E'\\x1f')) ON CONFLICT (key) DO "
                      "UPDATE SET value = excluded.value, expires_at = excluded.expires_at, tags = excluded.tags "
                      "WHERE \"%1$s\".expires_at <= now()"},
        {&c->st_del, "DELETE FROM \"%s\" WHERE key = $1"},
        {&c->st_del_tag, "DELETE FROM \"%s\" WHERE tags @> ARRAY[$1::text]"},
        {&c->st_del_prefix, "DELETE FROM \"%s\" WHERE key LIKE $1"},
        /* expired again at the delete: a row set anew while the sweep
         * waited for its lock is checked as it is now, not as the
         * subquery saw it */
        {&c->st_sweep, "DELETE FROM \"%1$s\" WHERE key IN (SELECT key FROM \"%1$s\" WHERE expires_at <= now() "
                       "LIMIT $1::bigint) AND expires_at <= now()"},
    };
    for (size_t i = 0; i < sizeof s / sizeof s[0]; i++) {
        snprintf(sql, sizeof sql, s[i].fmt, t);
        int rc = keel_pg_stmt_create(c->o.pg, sql, 0, NULL, s[i].out);
        if (rc)
            return rc;
    }
    return 0;
}

KEEL_API int keel_cache_create_schema(keel_cache *c)
{
    if (!c)
        return KEEL_EINVAL;
    if (!c->o.pg)
        return 0;
    char sql[3][400];
    snprintf(sql[0], sizeof sql[0],
             "CREATE %sTABLE IF NOT EXISTS \"%s\" (key bytea PRIMARY KEY, value bytea NOT NULL, "
             "expires_at timestamptz NOT NULL, tags text[])",
             c->o.l3_logged ? "" : "UNLOGGED ", c->table);
    snprintf(sql[1], sizeof sql[1], "CREATE INDEX IF NOT EXISTS \"%s_expires\" ON \"%s\" (expires_at)", c->table,
             c->table);
    snprintf(sql[2], sizeof sql[2], "CREATE INDEX IF NOT EXISTS \"%s_tags\" ON \"%s\" USING gin (tags)", c->table,
             c->table);
    keel_pg_query q[4] = {{.sql = "SELECT pg_advisory_xact_lock(7020303)"}, {.sql = sql[0]}, {.sql = sql[1]},
                          {.sql = sql[2]}};
    int rc = keel_pg_batch(c->o.pg, q, 4);
    for (int i = 0; i < 4; i++)
        PQclear(q[i].res);
    return rc;
}

KEEL_API int keel_cache_create(keel_cache **out, const keel_cache_opts *opts)
{
    keel_cache_opts o = opts ? *opts : (keel_cache_opts){0};
    if (!out || (o.table && !good_table(o.table)) || o.max_value > VALUE_MAX || o.max_key > 1024 ||
        (o.l1_max_bytes && o.l1_max_bytes < ((size_t)64 << 10)) ||
        (o.redis_prefix && (!o.redis_prefix[0] || strlen(o.redis_prefix) > PREFIX_MAX)) || !(o.xfetch_beta >= 0))
        return KEEL_EINVAL;
    if (!o.l1_max_bytes)
        o.l1_max_bytes = (size_t)64 << 20;
    if (!o.max_key)
        o.max_key = 1024;
    if (!o.max_value)
        o.max_value = (size_t)1 << 20;
    if (!o.default_ttl_ns)
        o.default_ttl_ns = 3600ull * 1000000000u;
    if (!o.negative_ttl_ns)
        o.negative_ttl_ns = 10ull * 1000000000u;
    if (!o.lease_ns)
        o.lease_ns = 5ull * 1000000000u;
    if (!o.tier_retry_ns)
        o.tier_retry_ns = 1000000000u;
    keel_cache *c = keel__aligned_alloc(KEEL__CACHELINE, sizeof *c);
    if (!c)
        return KEEL_ENOMEM;
    memset(c, 0, sizeof *c);
    c->o = o;
    c->clock = (keel__clock){o.clock, o.clock_ud};
    c->seed = keel_rand_u64(NULL); /* seeded from getrandom(2) */
    pthread_mutex_init(&c->fl_mu, NULL);
    pthread_mutex_init(&c->sweep_mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&c->sweep_cv, &ca);
    pthread_condattr_destroy(&ca);
    /* The name on our messages: random, and mixed with the pid and the
     * time, since a forked child starts from its parent's random state. */
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t mix[2] = {keel_rand_u64(NULL) ^ (uint64_t)getpid(),
                       keel_rand_u64(NULL) ^ ((uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec)};
    for (size_t i = 0; i < 2; i++)
        mix[i] = keel__mix64(mix[i] + (uint64_t)(uintptr_t)c);
    memcpy(c->self, mix, ID_LEN);
    c->rprefix = keel__strdup(o.redis_prefix ? o.redis_prefix : "kc:");
    c->table = keel__strdup(o.table ? o.table : "keel_cache");
    int rc = c->rprefix && c->table ? tags_create(&c->tags) : KEEL_ENOMEM;
    if (rc == 0)
        rc = keel__l1_create(&c->l1, o.l1_max_bytes, o.l1_max_items, &c->clock);
    keel_breaker_opts health = {.window = KEEL_BREAKER_COUNT, .window_size = 1, .minimum_calls = 1,
                                .failure_rate = 100, .permitted_in_half_open = 1,
                                .wait_open_ns = o.tier_retry_ns, .on_state = tier_state, .ud = c};
    if (rc == 0)
        rc = keel_breaker_create(&c->l3h, &health);
    if (rc == 0 && o.redis) {
        size_t n = keel_redis_nodes(o.redis);
        if (!(c->l2h = keel__calloc(n, sizeof *c->l2h)))
            rc = KEEL_ENOMEM;
        for (; rc == 0 && c->nl2 < n; c->nl2++)
            rc = keel_breaker_create(&c->l2h[c->nl2], &health);
    }
    if (rc == 0 && o.pg)
        rc = prepare(c);
    static const char release[] =
        "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";
    if (rc == 0 && o.redis && o.lease)
        rc = keel_redis_script_create(o.redis, release, sizeof release - 1, &c->release);
    if (rc == 0 && o.redis) {
        snprintf(c->chan, sizeof c->chan, "%sinv", c->rprefix);
        const char *chans[1] = {c->chan};
        keel_redis_sub_opts so = {.channels = chans, .nchannels = 1,
                                  .node = keel_redis_node_of(o.redis, c->chan, strlen(c->chan)),
                                  .on_message = on_message, .on_reconnect = link_changed,
                                  .on_disconnect = link_changed, .ud = c};
        rc = keel_redis_subscribe(o.redis, &so, &c->sub);
    }
    if (rc == 0 && o.pg && o.sweep_interval_ns) {
        if (pthread_create(&c->sweeper, NULL, sweeper, c) == 0)
            c->sweeping = true;
        else
            rc = KEEL_ENOMEM;
    }
    if (rc == 0 && o.metrics) {
        keel__mfunc fs[] = {
            {0, "keel_cache_hits_total", "Hits.", "tier", "l1", m_hits_l1},
            {0, "keel_cache_hits_total", "Hits.", "tier", "l2", m_hits_l2},
            {0, "keel_cache_hits_total", "Hits.", "tier", "l3", m_hits_l3},
            {0, "keel_cache_misses_total", "Gets that missed L1.", NULL, NULL, m_misses},
            {0, "keel_cache_loads_total", "Loader calls.", NULL, NULL, m_loads},
            {0, "keel_cache_evictions_total", "L1 evictions.", NULL, NULL, m_evictions},
            {1, "keel_cache_items", "L1 entries.", NULL, NULL, m_items},
            {0, "keel_cache_tier_errors_total", "Tier failures.", "tier", "l2", m_err_l2},
            {0, "keel_cache_tier_errors_total", "Tier failures.", "tier", "l3", m_err_l3},
            {0, "keel_cache_negative_hits_total", "Gets answered by a cached absence.", NULL, NULL, m_negative},
            {0, "keel_cache_load_waits_total", "Gets that waited for another caller's load.", NULL, NULL,
             m_load_waits},
            {0, "keel_cache_expirations_total", "L1 entries dropped on expiry.", NULL, NULL, m_expirations},
            {0, "keel_cache_invalidations_received_total", "Invalidations announced by other processes.", NULL,
             NULL, m_inval},
            {0, "keel_cache_flushes_total", "L1 flushes: the invalidation link lost or back.", NULL, NULL,
             m_flushes},
            {1, "keel_cache_bytes", "L1 bytes, with the allocator's share.", NULL, NULL, m_bytes},
        };
        rc = keel__metrics_funcs(o.metrics, "cache", o.metrics_name, fs, sizeof fs / sizeof fs[0], c);
        if (rc)
            c->o.metrics = NULL;
    }
    if (rc) {
        keel_cache_destroy(c);
        return rc;
    }
    *out = c;
    return 0;
}

KEEL_API void keel_cache_destroy(keel_cache *c)
{
    if (!c)
        return;
    if (c->sub)
        keel_redis_unsubscribe(c->sub);
    if (c->sweeping) {
        pthread_mutex_lock(&c->sweep_mu);
        c->stop = true;
        pthread_cond_broadcast(&c->sweep_cv);
        pthread_mutex_unlock(&c->sweep_mu);
        pthread_join(c->sweeper, NULL);
    }
    pthread_mutex_destroy(&c->sweep_mu);
    pthread_cond_destroy(&c->sweep_cv);
    keel_redis_script_free(c->release);
    if (c->o.metrics)
        keel_metrics_func_remove(c->o.metrics, c);
    keel_pg_stmt *all[] = {c->st_get, c->st_put, c->st_fill, c->st_del, c->st_del_tag, c->st_del_prefix, c->st_sweep};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        keel_pg_stmt_free(all[i]);
    keel__l1_destroy(c->l1);
    for (size_t i = 0; i < c->nl2; i++)
        keel_breaker_destroy(c->l2h[i]);
    keel__free(c->l2h);
    keel_breaker_destroy(c->l3h);
    tags_destroy(c->tags);
    pthread_mutex_destroy(&c->fl_mu);
    keel__free(c->rprefix);
    keel__free(c->table);
    keel__aligned_free(c);
}
