/* lib/ring.c — consistent hashing: continuum, ketama, jump, maglev.
 *
 * Every ring version is an immutable snapshot: the nodes in insertion order
 * plus the algorithm's lookup structure. Lookups read the current snapshot
 * inside an RCU read section (lib/rcu.h); add and remove build a new one
 * under the writers' mutex, publish it, wait for a grace period and free the
 * old. Node structs are shared between snapshots and freed after the grace
 * period that follows their removal.
 *
 * Removed node records are not freed but retired: a caller may still hold
 * the name pointer of a node it looked up. A table of every record by name
 * finds duplicates and retired records in O(1); adding a retired name again
 * reuses its record, so memory grows only with the number of distinct
 * names a ring has ever held.
 *
 * CONTINUUM and KETAMA share the continuum: 32-bit points sorted by value,
 * ties by a rank of their nodes fixed at build time (see build_continuum),
 * and an index of the top `bits` bits of the hash that gives
 * the first point of each bucket, so that a lookup reads one index entry
 * and scans, on average, less than one point.
 */
#define _GNU_SOURCE
#include <math.h>
#include <md5.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include <keel/metrics.h>
#include <keel/ring.h>

#include "hash.h"
#include "internal.h"
#include "rcu.h"

#define NAME_MAX_LEN 1030 /* libmemcached's longest: a 1024-byte host, ":65535" */
#define MAX_POINTS (1u << 24)
#define PPW_DEFAULT 160
#define PPW_MAX 10000
#define MAGLEV_DEFAULT 65537
#define MAGLEV_MAX 16777259u
#define KETAMA_POINTS 160 /* libmemcached's MEMCACHED_POINTS_PER_SERVER_KETAMA */
#define LOAD_REMOVED (UINT64_C(1) << 63)
#define NO_NODE UINT32_MAX

typedef struct node {
    uint64_t id;
    void *ud;
    uint32_t weight;
    bool live;      /* in the ring (else retired); under r->mu */
    bool created;   /* allocated by the add_many call under way */
    uint64_t stamp; /* the add_many call that claimed it; under r->mu */
    uint64_t seq;   /* when the name was first added: KETAMA's tie-break */
    _Atomic uint64_t load; /* assignments; LOAD_REMOVED once removed */
    uint64_t hash;  /* of the name, for the name table */
    size_t len;
    unsigned char name[];
} node;

typedef struct point {
    uint32_t val;
    uint32_t idx; /* into snap->nodes */
} point;

typedef struct snap {
    size_t n;
    node **nodes; /* insertion order, so also ascending id */
    keel_ring_node *view; /* what lookups hand out, by the same index: one
                           * dense array, so a lookup reads no node record */
    uint64_t wsum; /* their weights */
    /* CONTINUUM, KETAMA */
    size_t npoints;
    point *pts;
    uint32_t *index; /* (1 << bits) + 1 entries */
    unsigned shift;  /* 32 - bits */
    /* JUMP */
    uint32_t nbuckets;
    uint32_t *bucket_node;
    /* MAGLEV */
    uint32_t *table;
} snap;

struct keel_ring {
    keel_ring_algo algo;
    unsigned ppw;
    uint32_t msize;
    double eps;
    uint64_t seed;
    _Atomic(snap *) cur;
    _Atomic size_t count; /* cur's nodes: keel_ring_count() needs no read section */
    pthread_mutex_t mu; /* writers */
    uint64_t next_id;
    uint64_t next_seq; /* of new name records */
    _Atomic uint64_t total; /* assignments on nodes in the ring */
    /* Every node record the ring has held, live or retired, by name (open
     * addressing). Retired records stay so that name pointers handed out
     * stay valid until destroy, and come back when the name is added
     * again. Under mu. */
    node **names;
    size_t names_cap, names_used;
    uint64_t calls;
    keel_metrics *metrics;
};

/* ---- hashing ---- */

/* MD5 as ketama reads it: the digest's four little-endian words, which are
 * the state words themselves. A message of at most 55 bytes fits one
 * padded block and goes straight to the transform, which halves the cost
 * of the short names and keys ketama hashes. */
static void md5_words(const void *data, size_t len, uint32_t w[4])
{
    if (len > MD5_BLOCK_LENGTH - 9) {
        MD5_CTX ctx;
        uint8_t d[MD5_DIGEST_LENGTH];
        MD5Init(&ctx);
        MD5Update(&ctx, data, len);
        MD5Final(d, &ctx);
        for (int k = 0; k < 4; k++)
            w[k] = (uint32_t)d[4 * k] | (uint32_t)d[4 * k + 1] << 8 |
                   (uint32_t)d[4 * k + 2] << 16 | (uint32_t)d[4 * k + 3] << 24;
        return;
    }
    uint8_t block[MD5_BLOCK_LENGTH] = {0};
    if (len)
        memcpy(block, data, len);
    block[len] = 0x80;
    for (int k = 0; k < 8; k++) /* the length in bits, little-endian */
        block[MD5_BLOCK_LENGTH - 8 + k] = (uint8_t)((uint64_t)len * 8 >> 8 * k);
    w[0] = 0x67452301;
    w[1] = 0xefcdab89;
    w[2] = 0x98badcfe;
    w[3] = 0x10325476;
    MD5Transform(w, block);
}

static uint32_t key_hash32(const keel_ring *r, const void *key, size_t len)
{
    if (r->algo == KEEL_RING_KETAMA) {
        uint32_t w[4];
        md5_words(key, len, w);
        return w[0];
    }
    return (uint32_t)(keel__hash64(key, len, r->seed) >> 32);
}

/* Lamping & Veach, "A Fast, Minimal Memory, Consistent Hash Algorithm". */
static uint32_t jump(uint64_t key, uint32_t buckets)
{
    int64_t b = -1, j = 0;
    while (j < (int64_t)buckets) {
        b = j;
        key = key * 2862933555777941757ull + 1;
        j = (int64_t)((double)(b + 1) * ((double)(1ull << 31) / (double)((key >> 33) + 1)));
    }
    return (uint32_t)b;
}

/* ---- snapshots ---- */

static void snap_free(snap *s)
{
    if (!s)
        return;
    keel__free(s->nodes);
    keel__free(s->view);
    keel__free(s->pts);
    keel__free(s->index);
    keel__free(s->bucket_node);
    keel__free(s->table);
    keel__free(s);
}

/* Byte d of a point's sort key, the 64-bit pair (val, idx): 0 to 3 are
 * idx's, 4 to 7 val's, least significant first. */
static inline unsigned point_byte(point p, unsigned d)
{
    return (d < 4 ? p.idx >> 8 * d : p.val >> 8 * (d - 4)) & 0xff;
}

/* Sorts points by (val, idx): LSD radix sort, skipping the byte positions
 * where every key agrees. One pass counts every byte position; n is at
 * most MAX_POINTS, so the counts fit 32 bits. */
static int sort_points(point *pts, size_t n)
{
    _Static_assert(MAX_POINTS <= UINT32_MAX, "counts are 32-bit");
    point *tmp = keel__malloc(n * sizeof *tmp), *a = pts, *b = tmp;
    if (!tmp)
        return KEEL_ENOMEM;
    uint32_t count[8][256] = {{0}};
    for (size_t i = 0; i < n; i++)
        for (unsigned d = 0; d < 8; d++)
            count[d][point_byte(pts[i], d)]++;
    for (unsigned d = 0; d < 8; d++) {
        uint32_t *c = count[d];
        if (c[point_byte(a[0], d)] == n)
            continue; /* one value in this byte: nothing to do */
        for (uint32_t v = 0, sum = 0; v < 256; v++) { /* counts become starts */
            uint32_t here = c[v];
            c[v] = sum;
            sum += here;
        }
        for (size_t i = 0; i < n; i++)
            b[c[point_byte(a[i], d)]++] = a[i];
        point *t = a;
        a = b;
        b = t;
    }
    if (a != pts)
        memcpy(pts, a, n * sizeof *pts);
    keel__free(tmp);
    return 0;
}

static int build_index(snap *s)
{
    unsigned bits = 1;
    while (bits < 24 && ((size_t)1 << bits) < s->npoints)
        bits++;
    size_t nb = (size_t)1 << bits;
    if (!(s->index = keel__calloc(nb + 1, sizeof *s->index)))
        return KEEL_ENOMEM;
    /* index[t] = how many points lie in buckets before t: a count per
     * bucket, then sums, with no branch on the points' values. */
    unsigned shift = s->shift = 32 - bits;
    uint32_t *index = s->index;
    for (size_t i = 0; i < s->npoints; i++)
        index[(s->pts[i].val >> shift) + 1]++;
    for (size_t t = 1; t <= nb; t++)
        index[t] += index[t - 1];
    return 0;
}

typedef struct canon_ctx {
    const snap *s;
    const uint64_t *h;
} canon_ctx;

/* Nodes by the hash of their name, then the name: an order that does not
 * depend on the order they were added in. */
static int canon_cmp(const void *a, const void *b, void *ud)
{
    const canon_ctx *c = ud;
    uint32_t i = *(const uint32_t *)a, j = *(const uint32_t *)b;
    if (c->h[i] != c->h[j])
        return c->h[i] < c->h[j] ? -1 : 1;
    const node *x = c->s->nodes[i], *y = c->s->nodes[j];
    int d = memcmp(x->name, y->name, x->len < y->len ? x->len : y->len);
    return d ? d : (x->len > y->len) - (x->len < y->len);
}

/* canon[k] is the k-th node in that order; hs[i] gets node i's hash. */
static void canon_order(const keel_ring *r, const snap *s, uint64_t *hs, uint32_t *canon)
{
    for (size_t i = 0; i < s->n; i++) {
        hs[i] = keel__hash64(s->nodes[i]->name, s->nodes[i]->len, r->seed);
        canon[i] = (uint32_t)i;
    }
    canon_ctx cc = {s, hs};
    qsort_r(canon, s->n, sizeof *canon, canon_cmp, &cc);
}

static int seq_cmp(const void *a, const void *b, void *ud)
{
    const snap *s = ud;
    uint64_t x = s->nodes[*(const uint32_t *)a]->seq, y = s->nodes[*(const uint32_t *)b]->seq;
    return (x > y) - (x < y);
}

/* Points per node for libmemcached's weighted ketama, in float as it does,
 * so that the same cluster sizes lose the same points (156, not 160, at
 * 25, 50, 100 nodes). */
static uint32_t ketama_points(uint32_t weight, uint64_t total_weight, size_t live)
{
    float pct = (float)weight / (float)total_weight;
    float x = pct * KETAMA_POINTS;
    x = x / 4;
    x = x * (float)live;
    x = x + 0.0000000001F;
    return (uint32_t)(floor(x) * 4);
}

/* Writes v in decimal, as "%u" does, and returns the length. */
static size_t put_decimal(char *out, uint32_t v)
{
    char tmp[10];
    size_t n = 0;
    do
        tmp[n++] = (char)('0' + v % 10);
    while ((v /= 10) != 0);
    for (size_t k = 0; k < n; k++)
        out[k] = tmp[n - 1 - k];
    return n;
}

static int build_continuum(const keel_ring *r, snap *s)
{
    size_t total = 0;
    uint64_t total_weight = 0;
    for (size_t i = 0; i < s->n; i++)
        total_weight += s->nodes[i]->weight;
    /* Stop once past the limit: a node adds under 2^46 points, so the sum
     * cannot wrap back under it, however many nodes an add_many brings. */
    for (size_t i = 0; i < s->n && total <= MAX_POINTS; i++)
        total += r->algo == KEEL_RING_KETAMA
                     ? ketama_points(s->nodes[i]->weight, total_weight, s->n)
                     : (size_t)s->nodes[i]->weight * r->ppw;
    if (total > MAX_POINTS)
        return KEEL_EINVAL;
    if (total == 0) /* ketama: weights so small that nobody gets a point */
        return KEEL_EINVAL;
    /* Points that share a value are sorted by the rank of their node.
     * KETAMA's is the order in which names were first added: libmemcached
     * breaks ties by a server's place in its list, which an ejected server
     * keeps when it comes back. CONTINUUM's is the canonical order, so that
     * the order of addition does not matter. The sort sees ranks in place
     * of node indexes; byrank maps back. */
    uint32_t *byrank = keel__malloc(s->n * sizeof *byrank);
    uint32_t *rank = keel__malloc(s->n * sizeof *rank);
    uint64_t *hs = keel__malloc(s->n * sizeof *hs);
    s->pts = keel__malloc(total * sizeof *s->pts);
    int rc = 0;
    if (!byrank || !rank || !hs || !s->pts) {
        rc = KEEL_ENOMEM;
        goto out;
    }
    if (r->algo == KEEL_RING_KETAMA) {
        for (size_t i = 0; i < s->n; i++)
            byrank[i] = (uint32_t)i;
        qsort_r(byrank, s->n, sizeof *byrank, seq_cmp, s);
    } else
        canon_order(r, s, hs, byrank);
    for (size_t k = 0; k < s->n; k++)
        rank[byrank[k]] = (uint32_t)k;
    size_t at = 0;
    for (size_t i = 0; i < s->n; i++) {
        const node *nd = s->nodes[i];
        if (r->algo == KEEL_RING_KETAMA) {
            uint32_t pts = ketama_points(nd->weight, total_weight, s->n);
            char buf[NAME_MAX_LEN + 16];
            memcpy(buf, nd->name, nd->len);
            buf[nd->len] = '-';
            for (uint32_t p = 0; p < pts / 4; p++) {
                size_t len = nd->len + 1 + put_decimal(buf + nd->len + 1, p);
                uint32_t w[4];
                md5_words(buf, len, w);
                for (int k = 0; k < 4; k++, at++) {
                    s->pts[at].val = w[k];
                    s->pts[at].idx = rank[i];
                }
            }
        } else {
            /* The node's own points only: a splitmix64 sequence seeded by
             * the hash of its name. */
            size_t pts = (size_t)nd->weight * r->ppw;
            for (size_t p = 0; p < pts; p++, at++) {
                s->pts[at].val = (uint32_t)(keel__mix64(hs[i] + p * 0x9e3779b97f4a7c15ull) >> 32);
                s->pts[at].idx = rank[i];
            }
        }
    }
    s->npoints = total;
    if ((rc = sort_points(s->pts, total)))
        goto out;
    for (size_t k = 0; k < total; k++)
        s->pts[k].idx = byrank[s->pts[k].idx];
    rc = build_index(s);
out:
    keel__free(byrank);
    keel__free(rank);
    keel__free(hs);
    return rc;
}

static int build_jump(snap *s)
{
    uint64_t total = 0;
    for (size_t i = 0; i < s->n; i++)
        total += s->nodes[i]->weight;
    if (total > MAX_POINTS)
        return KEEL_EINVAL;
    if (!(s->bucket_node = keel__malloc((size_t)total * sizeof *s->bucket_node)))
        return KEEL_ENOMEM;
    uint32_t b = 0;
    for (size_t i = 0; i < s->n; i++)
        for (uint32_t k = 0; k < s->nodes[i]->weight; k++)
            s->bucket_node[b++] = (uint32_t)i;
    s->nbuckets = b;
    return 0;
}

typedef struct rank_ctx {
    const double *rem;     /* by remainder when set, */
    const uint64_t *quota; /* else by quota; */
    const uint32_t *pos;   /* ties by place in the canonical order */
} rank_ctx;

static int rank_desc(const void *a, const void *b, void *ud)
{
    const rank_ctx *c = ud;
    uint32_t i = *(const uint32_t *)a, j = *(const uint32_t *)b;
    int tie = (c->pos[i] > c->pos[j]) - (c->pos[i] < c->pos[j]);
    if (c->rem)
        return c->rem[i] < c->rem[j] ? 1 : c->rem[i] > c->rem[j] ? -1 : tie;
    return c->quota[i] < c->quota[j] ? 1 : c->quota[i] > c->quota[j] ? -1 : tie;
}

/* Maglev population, weighted: each node gets a quota of entries in
 * proportion to its weight (at least one; largest remainders settle the
 * sum), then nodes with quota left take turns claiming the next free entry
 * of their permutation. O(table + nodes) turns whatever the weights. Turns
 * and ties follow the nodes' names, not the order they were added in, so
 * that processes that learned the nodes in different orders agree. */
static int build_maglev(const keel_ring *r, snap *s)
{
    uint32_t m = r->msize;
    size_t n = s->n;
    if (n > m)
        return KEEL_EINVAL;
    uint64_t *offset = keel__malloc(n * sizeof *offset); /* then: the next try */
    uint64_t *skip = keel__malloc(n * sizeof *skip);
    uint64_t *quota = keel__malloc(n * sizeof *quota);
    double *rem = keel__malloc(n * sizeof *rem);
    uint32_t *turn = keel__malloc(n * sizeof *turn);
    uint32_t *canon = keel__malloc(n * sizeof *canon), *pos = keel__malloc(n * sizeof *pos);
    uint64_t *hs = keel__malloc(n * sizeof *hs);
    s->table = keel__malloc((size_t)m * sizeof *s->table);
    int rc = 0;
    if (!offset || !skip || !quota || !rem || !turn || !canon || !pos || !hs || !s->table) {
        rc = KEEL_ENOMEM;
        goto out;
    }
    canon_order(r, s, hs, canon);
    uint64_t wsum = 0, given = 0;
    for (size_t i = 0; i < n; i++)
        wsum += s->nodes[i]->weight;
    for (size_t i = 0; i < n; i++) {
        const node *nd = s->nodes[i];
        uint64_t h = hs[i];
        offset[i] = h % m;
        skip[i] = keel__mix64(h) % (m - 1) + 1;
        double exact = (double)m * nd->weight / (double)wsum;
        quota[i] = (uint64_t)exact;
        rem[i] = exact - (double)quota[i];
        if (quota[i] == 0) { /* everyone gets an entry */
            quota[i] = 1;
            rem[i] = -1;
        }
        given += quota[i];
    }
    /* Settle the sum at m: hand the rest out by largest remainder (fewer
     * than n entries), or take back from the largest quotas (only the
     * minimum of one can overshoot, by fewer than n). */
    for (size_t k = 0; k < n; k++)
        pos[canon[k]] = (uint32_t)k;
    memcpy(turn, canon, n * sizeof *turn);
    if (given != m) {
        rank_ctx ctx = {given < m ? rem : NULL, quota, pos};
        qsort_r(turn, n, sizeof *turn, rank_desc, &ctx);
    }
    for (size_t k = 0; given < m; k = (k + 1) % n, given++)
        quota[turn[k]]++;
    for (size_t k = 0; given > m; k = (k + 1) % n)
        if (quota[turn[k]] > 1) {
            quota[turn[k]]--;
            given--;
        }
    memset(s->table, 0xff, (size_t)m * sizeof *s->table);
    size_t active = n;
    memcpy(turn, canon, n * sizeof *turn);
    for (uint32_t filled = 0; filled < m;) {
        for (size_t k = 0; k < active;) {
            uint32_t i = turn[k];
            uint64_t c;
            do { /* (offset + j x skip) mod m for j = 0, 1, ..., by steps */
                c = offset[i];
                if ((offset[i] += skip[i]) >= m)
                    offset[i] -= m;
            } while (s->table[c] != NO_NODE);
            s->table[c] = i;
            filled++;
            if (--quota[i] == 0)
                turn[k] = turn[--active]; /* its turn goes to the last */
            else
                k++;
        }
    }
out:
    keel__free(offset);
    keel__free(skip);
    keel__free(quota);
    keel__free(rem);
    keel__free(turn);
    keel__free(canon);
    keel__free(pos);
    keel__free(hs);
    return rc;
}

static void node_out(const node *nd, keel_ring_node *out)
{
    out->name = nd->name;
    out->name_len = nd->len;
    out->weight = nd->weight;
    out->ud = nd->ud;
    out->id = nd->id;
}

/* A snapshot over `nodes`, which it owns on success only. */
static int snap_build(const keel_ring *r, node **nodes, size_t n, snap **out)
{
    snap *s = keel__calloc(1, sizeof *s);
    if (!s)
        return KEEL_ENOMEM;
    s->nodes = nodes;
    s->n = n;
    for (size_t i = 0; i < n; i++)
        s->wsum += nodes[i]->weight;
    int rc = 0;
    if (n > 0 && !(s->view = keel__malloc(n * sizeof *s->view)))
        rc = KEEL_ENOMEM;
    for (size_t i = 0; i < n && !rc; i++)
        node_out(nodes[i], &s->view[i]);
    if (n > 0 && !rc) {
        switch (r->algo) {
        case KEEL_RING_CONTINUUM:
        case KEEL_RING_KETAMA: rc = build_continuum(r, s); break;
        case KEEL_RING_JUMP: rc = build_jump(s); break;
        case KEEL_RING_MAGLEV: rc = build_maglev(r, s); break;
        }
    }
    if (rc) {
        s->nodes = NULL;
        snap_free(s);
        return rc;
    }
    *out = s;
    return 0;
}

/* ---- lookups ---- */

/* A key's table entry: the high half of hash x size, uniform as the
 * remainder is and without a division. */
static uint32_t maglev_entry(const keel_ring *r, const void *key, size_t len)
{
    return (uint32_t)((unsigned __int128)keel__hash64(key, len, r->seed) * r->msize >> 64);
}

static size_t continuum_find(const snap *s, uint32_t h)
{
    size_t i = s->index[h >> s->shift], end = s->index[(h >> s->shift) + 1];
    while (i < end && s->pts[i].val < h)
        i++;
    return i == s->npoints ? 0 : i;
}

/* Walks a key's preference order: calls `take` with node indexes (which may
 * repeat) until it returns true or every node has been offered. */
typedef bool (*take_fn)(const snap *s, uint32_t idx, void *ud);

static void prefer(const keel_ring *r, const snap *s, const void *key, size_t len, take_fn take,
                   void *ud)
{
    switch (r->algo) {
    case KEEL_RING_CONTINUUM:
    case KEEL_RING_KETAMA: {
        size_t i = continuum_find(s, key_hash32(r, key, len));
        for (size_t k = 0; k < s->npoints; k++) {
            if (take(s, s->pts[i].idx, ud))
                return;
            if (++i == s->npoints)
                i = 0;
        }
        break;
    }
    case KEEL_RING_MAGLEV: {
        uint32_t i = maglev_entry(r, key, len);
        for (uint32_t k = 0; k < r->msize; k++) {
            if (take(s, s->table[i], ud))
                return;
            if (++i == r->msize)
                i = 0;
        }
        break;
    }
    case KEEL_RING_JUMP: {
        /* The key's own bucket, then buckets for rehashes of the key (not
         * where it would go if the nodes before were gone: see ring.h). */
        uint64_t h = keel__hash64(key, len, r->seed);
        size_t tries = 8 * s->n + 64;
        for (size_t k = 0; k < tries; k++)
            if (take(s, s->bucket_node[jump(k ? keel__mix64(h + k) : h, s->nbuckets)], ud))
                return;
        break;
    }
    }
    /* Nodes the walk never reached (jump's rehashes missed them, or ketama
     * gave a tiny weight no point), in order. */
    for (size_t k = 0; k < s->n; k++)
        if (take(s, (uint32_t)k, ud))
            return;
}

/* Enters a read of r and returns the current version: a read section, or,
 * in a thread whose first read section finds no memory for its slot, the
 * writers' mutex, under which no version is replaced or freed (such a
 * thread is in no read section, so waiting for it is safe). Reads never
 * fail for memory. *locked says how to leave. */
static snap *read_enter(keel_ring *r, bool *locked)
{
    if ((*locked = keel__rcu_read_lock() != 0))
        pthread_mutex_lock(&r->mu);
    return atomic_load_explicit(&r->cur, memory_order_acquire);
}

static void read_leave(keel_ring *r, bool locked)
{
    if (locked)
        pthread_mutex_unlock(&r->mu);
    else
        keel__rcu_read_unlock();
}

/* read_enter, for a version with nodes: NULL and KEEL_EUNAVAIL (left
 * again) for an empty ring. */
static snap *read_begin(keel_ring *r, bool *locked, int *rc)
{
    snap *s = read_enter(r, locked);
    *rc = 0;
    if (s->n == 0) {
        read_leave(r, *locked);
        *rc = KEEL_EUNAVAIL;
        return NULL;
    }
    return s;
}

KEEL_API int keel_ring_lookup(keel_ring *r, const void *key, size_t len, keel_ring_node *node_out_)
{
    if (!r || (!key && len) || !node_out_)
        return KEEL_EINVAL;
    int rc;
    bool locked;
    snap *s = read_begin(r, &locked, &rc);
    if (!s)
        return rc;
    uint32_t idx;
    switch (r->algo) {
    case KEEL_RING_CONTINUUM:
    case KEEL_RING_KETAMA: idx = s->pts[continuum_find(s, key_hash32(r, key, len))].idx; break;
    case KEEL_RING_JUMP: idx = s->bucket_node[jump(keel__hash64(key, len, r->seed), s->nbuckets)]; break;
    default: idx = s->table[maglev_entry(r, key, len)]; break;
    }
    *node_out_ = s->view[idx];
    read_leave(r, locked);
    return 0;
}

typedef struct collect {
    keel_ring_node *out;
    size_t want, got;
    uint32_t small[16]; /* node indexes taken, when want <= 16 */
    uint64_t *bits;     /* else a bitmap over the nodes */
} collect;

static bool take_distinct(const snap *s, uint32_t idx, void *ud)
{
    collect *c = ud;
    if (c->bits) {
        if (c->bits[idx / 64] >> (idx % 64) & 1)
            return false;
        c->bits[idx / 64] |= UINT64_C(1) << (idx % 64);
    } else {
        for (size_t k = 0; k < c->got; k++)
            if (c->small[k] == idx)
                return false;
        c->small[c->got] = idx;
    }
    c->out[c->got++] = s->view[idx];
    return c->got == c->want;
}

KEEL_API int keel_ring_lookup_n(keel_ring *r, const void *key, size_t len, size_t n,
                                keel_ring_node *nodes, size_t *found)
{
    if (!r || (!key && len) || (!nodes && n) || !found)
        return KEEL_EINVAL;
    *found = 0;
    int rc;
    bool locked;
    snap *s = read_begin(r, &locked, &rc);
    if (!s)
        return rc;
    if (n > s->n)
        n = s->n;
    collect c = {.out = nodes, .want = n};
    if (n > 16 && !(c.bits = keel__calloc((s->n + 63) / 64, sizeof *c.bits))) {
        read_leave(r, locked);
        return KEEL_ENOMEM;
    }
    if (n)
        prefer(r, s, key, len, take_distinct, &c);
    *found = c.got;
    keel__free(c.bits);
    read_leave(r, locked);
    return 0;
}

/* ---- bounded loads ---- */

typedef struct bounded {
    double per_weight; /* (1 + eps) x m / total weight */
    const node *chosen;
} bounded;

/* A node's capacity is its weight's share, as HAProxy's
 * hash-balance-factor scales each server's: at least 1. */
static bool take_if_room(const snap *s, uint32_t idx, void *ud)
{
    bounded *b = ud;
    node *nd = s->nodes[idx];
    uint64_t cap = (uint64_t)ceil(b->per_weight * nd->weight);
    if (cap == 0)
        cap = 1;
    uint64_t l = atomic_load_explicit(&nd->load, memory_order_relaxed);
    while (!(l & LOAD_REMOVED) && l < cap) {
        if (atomic_compare_exchange_weak(&nd->load, &l, l + 1)) {
            b->chosen = nd;
            return true;
        }
    }
    return false;
}

KEEL_API int keel_ring_assign(keel_ring *r, const void *key, size_t len, keel_ring_node *out)
{
    if (!r || (!key && len) || !out)
        return KEEL_EINVAL;
    int rc;
    bool locked;
    snap *s = read_begin(r, &locked, &rc);
    if (!s)
        return rc;
    /* m counts this assignment; a concurrent removal subtracts the loads it
     * takes away, so the total stays the sum over nodes in the ring. */
    bounded b = {0, NULL};
    for (int attempt = 0; attempt < 8 && !b.chosen; attempt++) {
        uint64_t m = atomic_fetch_add(&r->total, 1) + 1;
        b.per_weight = (1.0 + r->eps) * (double)m / (double)s->wsum;
        prefer(r, s, key, len, take_if_room, &b);
        if (!b.chosen) /* others filled the nodes meanwhile: retry */
            atomic_fetch_sub(&r->total, 1);
    }
    if (b.chosen)
        node_out(b.chosen, out);
    read_leave(r, locked);
    return b.chosen ? 0 : KEEL_EBUSY;
}

/* The node with this id in the current snapshot, or NULL. Caller is in a
 * read section. */
static node *find_id(const snap *s, uint64_t id)
{
    size_t lo = 0, hi = s->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (s->nodes[mid]->id < id)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < s->n && s->nodes[lo]->id == id ? s->nodes[lo] : NULL;
}

KEEL_API int keel_ring_unassign(keel_ring *r, const keel_ring_node *n)
{
    if (!r || !n)
        return KEEL_EINVAL;
    bool locked;
    node *nd = find_id(read_enter(r, &locked), n->id);
    int rc = KEEL_ENOTFOUND;
    if (nd) {
        uint64_t l = atomic_load_explicit(&nd->load, memory_order_relaxed);
        while (!(l & LOAD_REMOVED)) {
            if (l == 0) {
                rc = KEEL_EINVAL; /* more unassigns than assigns */
                break;
            }
            if (atomic_compare_exchange_weak(&nd->load, &l, l - 1)) {
                atomic_fetch_sub(&r->total, 1);
                rc = 0;
                break;
            }
        }
    }
    read_leave(r, locked);
    return rc;
}

KEEL_API uint64_t keel_ring_load(keel_ring *r, const keel_ring_node *n)
{
    if (!r || !n)
        return 0;
    bool locked;
    node *nd = find_id(read_enter(r, &locked), n->id);
    uint64_t l = nd ? atomic_load(&nd->load) : LOAD_REMOVED;
    read_leave(r, locked);
    return l & LOAD_REMOVED ? 0 : l;
}

/* ---- iteration ---- */

KEEL_API int keel_ring_nodes(keel_ring *r, keel_ring_visit_fn fn, void *ud)
{
    if (!r || !fn)
        return KEEL_EINVAL;
    bool locked;
    snap *s = read_enter(r, &locked);
    size_t n = s->n;
    double *share = n ? keel__calloc(n, sizeof *share) : NULL;
    keel_ring_node *nodes = n ? keel__malloc(n * sizeof *nodes) : NULL;
    if (n && (!share || !nodes)) {
        read_leave(r, locked);
        keel__free(share);
        keel__free(nodes);
        return KEEL_ENOMEM;
    }
    if (s->n) {
        switch (r->algo) {
        case KEEL_RING_CONTINUUM:
        case KEEL_RING_KETAMA:
            /* A point owns the arc from the point before it (exclusive). */
            for (size_t i = 0; i < s->npoints; i++) {
                double prev = i ? s->pts[i - 1].val : (double)s->pts[s->npoints - 1].val - 4294967296.0;
                share[s->pts[i].idx] += ((double)s->pts[i].val - prev) / 4294967296.0;
            }
            break;
        case KEEL_RING_JUMP:
            for (uint32_t b = 0; b < s->nbuckets; b++)
                share[s->bucket_node[b]] += 1.0 / s->nbuckets;
            break;
        case KEEL_RING_MAGLEV:
            for (uint32_t i = 0; i < r->msize; i++)
                share[s->table[i]] += 1.0 / r->msize;
            break;
        }
    }
    for (size_t i = 0; i < n; i++)
        nodes[i] = s->view[i]; /* node records outlive the version */
    read_leave(r, locked);
    for (size_t i = 0; i < n; i++) /* outside the read section: fn may do anything */
        fn(&nodes[i], share[i], ud);
    keel__free(share);
    keel__free(nodes);
    return 0;
}

/* Without a read section, whose first use in a thread may find no memory
 * (and a count cannot say so). */
KEEL_API size_t keel_ring_count(keel_ring *r)
{
    return r ? atomic_load_explicit(&r->count, memory_order_acquire) : 0;
}

/* ---- changes ---- */

static snap *cur_locked(keel_ring *r)
{
    return atomic_load_explicit(&r->cur, memory_order_relaxed);
}

/* Publishes s, waits until nobody reads the old snapshot, frees it. */
static void publish(keel_ring *r, snap *s)
{
    snap *old = cur_locked(r);
    atomic_store_explicit(&r->cur, s, memory_order_release);
    atomic_store_explicit(&r->count, s->n, memory_order_release);
    keel__rcu_synchronize();
    snap_free(old);
}

/* ---- the name table (caller holds r->mu) ---- */

static node **names_slot(node **tab, size_t cap, uint64_t h, const void *name, size_t len)
{
    for (size_t i = h & (cap - 1);; i = (i + 1) & (cap - 1))
        if (!tab[i] || (tab[i]->hash == h && tab[i]->len == len && memcmp(tab[i]->name, name, len) == 0))
            return &tab[i];
}

static node *names_find(keel_ring *r, const void *name, size_t len, uint64_t h)
{
    return r->names_cap ? *names_slot(r->names, r->names_cap, h, name, len) : NULL;
}

/* Room for `more` records at a load of at most one half. */
static int names_reserve(keel_ring *r, size_t more)
{
    size_t want = r->names_used + more;
    if (want * 2 <= r->names_cap)
        return 0;
    size_t cap = r->names_cap ? r->names_cap : 16;
    while (cap < want * 2)
        cap *= 2;
    node **tab = keel__calloc(cap, sizeof *tab);
    if (!tab)
        return KEEL_ENOMEM;
    for (size_t i = 0; i < r->names_cap; i++)
        if (r->names[i])
            *names_slot(tab, cap, r->names[i]->hash, r->names[i]->name, r->names[i]->len) = r->names[i];
    keel__free(r->names);
    r->names = tab;
    r->names_cap = cap;
    return 0;
}

/* Linear probing's backward-shift deletion: no tombstones. */
static void names_delete(keel_ring *r, node *nd)
{
    size_t mask = r->names_cap - 1, i = nd->hash & mask;
    while (r->names[i] != nd)
        i = (i + 1) & mask;
    r->names[i] = NULL;
    for (size_t j = (i + 1) & mask; r->names[j]; j = (j + 1) & mask) {
        size_t home = r->names[j]->hash & mask;
        /* stays put if its home lies cyclically in (i, j] */
        bool stays = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (!stays) {
            r->names[i] = r->names[j];
            r->names[j] = NULL;
            i = j;
        }
    }
    r->names_used--;
}

static uint64_t name_hash(const void *name, size_t len) { return keel__hash64(name, len, 0x6b65656c); }

KEEL_API int keel_ring_add_many(keel_ring *r, const keel_ring_node_spec *specs, size_t n)
{
    if (!r || (!specs && n))
        return KEEL_EINVAL;
    for (size_t i = 0; i < n; i++)
        if (!specs[i].name || specs[i].name_len == 0 || specs[i].name_len > NAME_MAX_LEN ||
            specs[i].weight == 0)
            return KEEL_EINVAL;
    if (n == 0)
        return 0;
    if (keel__rcu_in_read()) /* a guard: it would wait for itself */
        return KEEL_ESTATE;

    pthread_mutex_lock(&r->mu);
    snap *old = cur_locked(r);
    uint64_t call = ++r->calls;
    node **nodes = keel__malloc((old->n + n) * sizeof *nodes);
    int rc = nodes ? names_reserve(r, n) : KEEL_ENOMEM;
    size_t made = 0; /* new records at nodes[old->n ..], reused ones too */
    for (size_t i = 0; i < n && rc == 0; i++) {
        uint64_t h = name_hash(specs[i].name, specs[i].name_len);
        node *nd = names_find(r, specs[i].name, specs[i].name_len, h);
        if (nd && (nd->live || nd->stamp == call)) {
            rc = KEEL_EEXIST; /* in the ring, or twice in specs */
            break;
        }
        if (!nd) {
            if (!(nd = keel__malloc(sizeof *nd + specs[i].name_len))) {
                rc = KEEL_ENOMEM;
                break;
            }
            nd->live = false;
            nd->created = true;
            nd->seq = r->next_seq++; /* kept for good: a removed record stays */
            nd->hash = h;
            nd->len = specs[i].name_len;
            memcpy(nd->name, specs[i].name, nd->len);
            /* in the table now, though not live: found again by a later
             * spec with the same name, and freed if this call fails */
            *names_slot(r->names, r->names_cap, h, nd->name, nd->len) = nd;
            r->names_used++;
        }
        /* A retired record keeps its name bytes: callers may read them. No
         * snapshot refers to it, so the other fields are ours to set. */
        nd->stamp = call;
        nd->id = r->next_id + i + 1;
        nd->ud = specs[i].ud;
        nd->weight = specs[i].weight;
        atomic_init(&nd->load, 0);
        nodes[old->n + made++] = nd;
    }
    snap *s = NULL;
    if (rc == 0) {
        if (old->n)
            memcpy(nodes, old->nodes, old->n * sizeof *nodes);
        rc = snap_build(r, nodes, old->n + n, &s);
    }
    for (size_t k = 0; k < made; k++) {
        node *nd = nodes[old->n + k];
        if (rc == 0) {
            nd->live = true;
        } else if (nd->created) { /* a failed call leaves nothing behind */
            names_delete(r, nd);
            keel__free(nd);
            continue;
        }
        nd->created = false;
    }
    if (rc == 0) {
        r->next_id += n;
        publish(r, s);
    } else {
        keel__free(nodes);
    }
    pthread_mutex_unlock(&r->mu);
    return rc;
}

KEEL_API int keel_ring_add(keel_ring *r, const void *name, size_t len, uint32_t weight, void *ud)
{
    keel_ring_node_spec spec = {name, len, weight, ud};
    if (!name)
        return KEEL_EINVAL;
    return keel_ring_add_many(r, &spec, 1);
}

KEEL_API int keel_ring_remove(keel_ring *r, const void *name, size_t len)
{
    if (!r || !name || len == 0)
        return KEEL_EINVAL;
    if (len > NAME_MAX_LEN)
        return KEEL_ENOTFOUND;
    if (keel__rcu_in_read()) /* a guard: it would wait for itself */
        return KEEL_ESTATE;
    pthread_mutex_lock(&r->mu);
    snap *old = cur_locked(r);
    node *gone = names_find(r, name, len, name_hash(name, len));
    size_t at = 0;
    while (gone && gone->live && old->nodes[at] != gone)
        at++;
    int rc = 0;
    if (!gone || !gone->live)
        rc = KEEL_ENOTFOUND;
    else if (r->algo == KEEL_RING_JUMP && at != old->n - 1)
        rc = KEEL_EINVAL; /* jump hash can only drop its last bucket(s) */
    node **nodes = NULL;
    if (rc == 0 && old->n > 1 && !(nodes = keel__malloc((old->n - 1) * sizeof *nodes)))
        rc = KEEL_ENOMEM;
    snap *s = NULL;
    if (rc == 0) {
        size_t k = 0;
        for (size_t i = 0; i < old->n; i++)
            if (i != at)
                nodes[k++] = old->nodes[i];
        rc = snap_build(r, nodes, old->n - 1, &s);
    }
    if (rc) {
        keel__free(nodes);
        pthread_mutex_unlock(&r->mu);
        return rc;
    }
    publish(r, s);
    /* Its assignments end with it (see keel_ring_unassign). The grace
     * period in publish() also covers readers still holding `gone`. */
    uint64_t l = atomic_fetch_or(&gone->load, LOAD_REMOVED);
    atomic_fetch_sub(&r->total, l & ~LOAD_REMOVED);
    gone->live = false;
    pthread_mutex_unlock(&r->mu);
    return 0;
}

/* ---- metrics ---- */

static double m_nodes(void *ud) { return (double)keel_ring_count(ud); }
static double m_assigned(void *ud) { return (double)atomic_load(&((keel_ring *)ud)->total); }

static const keel__mfunc ring_metrics[] = {
    {1, "keel_ring_nodes", "Nodes in the ring.", NULL, NULL, m_nodes},
    {1, "keel_ring_assignments", "Bounded-load assignments held.", NULL, NULL, m_assigned},
};

/* ---- create, destroy ---- */

static bool is_prime(uint32_t m)
{
    if (m < 2)
        return false;
    for (uint32_t d = 2; (uint64_t)d * d <= m; d++)
        if (m % d == 0)
            return false;
    return true;
}

KEEL_API int keel_ring_create(keel_ring **out, const keel_ring_opts *given)
{
    static const keel_ring_opts defaults;
    const keel_ring_opts *opts = given ? given : &defaults;
    if (!out)
        return KEEL_EINVAL;
    if ((unsigned)opts->algo > KEEL_RING_MAGLEV || opts->points_per_weight > PPW_MAX)
        return KEEL_EINVAL;
    uint32_t msize = opts->maglev_size ? opts->maglev_size : MAGLEV_DEFAULT;
    if (msize < 7 || msize > MAGLEV_MAX || !is_prime(msize))
        return KEEL_EINVAL;
    double eps = opts->load_epsilon == 0 ? 0.25 : opts->load_epsilon;
    if (!(eps > 0) || eps > 1e6) /* also rejects NaN */
        return KEEL_EINVAL;

    keel_ring *r = keel__calloc(1, sizeof *r);
    snap *empty = keel__calloc(1, sizeof *empty);
    if (!r || !empty) {
        keel__free(r);
        keel__free(empty);
        return KEEL_ENOMEM;
    }
    r->algo = opts->algo;
    r->ppw = opts->points_per_weight ? opts->points_per_weight : PPW_DEFAULT;
    r->msize = msize;
    r->eps = eps;
    r->seed = opts->seed;
    atomic_init(&r->cur, empty);
    atomic_init(&r->count, 0);
    atomic_init(&r->total, 0);
    pthread_mutex_init(&r->mu, NULL);
    keel__fences_init();
    int rc = keel__metrics_funcs(opts->metrics, "ring", opts->metrics_name, ring_metrics,
                                 sizeof ring_metrics / sizeof ring_metrics[0], r);
    if (rc) {
        keel_ring_destroy(r);
        return rc;
    }
    r->metrics = opts->metrics;
    *out = r;
    return 0;
}

KEEL_API void keel_ring_destroy(keel_ring *r)
{
    if (!r)
        return;
    if (r->metrics)
        keel_metrics_func_remove(r->metrics, r);
    for (size_t i = 0; i < r->names_cap; i++) /* live and retired alike */
        keel__free(r->names[i]);
    keel__free(r->names);
    snap_free(cur_locked(r));
    pthread_mutex_destroy(&r->mu);
    keel__free(r);
}
