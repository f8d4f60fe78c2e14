/* keel/ring.h — consistent hashing: which node owns a key.
 *
 * Four algorithms, chosen at create time:
 *
 *  KEEL_RING_CONTINUUM (the default) — a hash ring with points per node in
 *    proportion to its weight alone, hashed with XXH3. Removing a node moves
 *    only the keys it owned; adding one moves about 1/(N+1) of the keys, all
 *    to the new node. A point two nodes share goes to the one whose name
 *    hashes lower, so the order nodes were added in does not matter.
 *    Lookup is O(1) on average (an index of the top bits of the hash in
 *    front of the sorted points).
 *  KEEL_RING_KETAMA — bit-exact with libmemcached's weighted ketama (and so
 *    twemproxy with `hash: md5`), quirks included, for clusters shared with
 *    clients in other languages. That is MEMCACHED_BEHAVIOR_KETAMA_WEIGHTED,
 *    which also hashes keys with MD5; MEMCACHED_BEHAVIOR_KETAMA alone keeps
 *    the default key hash (and, all weights 1, 100 points a server) and
 *    places keys differently. To match, name each node exactly as
 *    libmemcached formats the server: "host" when its port is 11211, and
 *    "host:port" otherwise (the name is hashed as "<name>-<n>"); port 0
 *    counts there as 11211 (so "host"), a unix socket is "path:0", and a
 *    weight of 0 counts as 1, which keel refuses: add such a node with
 *    weight 1. Where two nodes share a point, the one whose name was
 *    first added to the ring earlier takes it, as in libmemcached with
 *    glibc's qsort (its comparator looks at points only): a node removed
 *    and added again keeps its place, as an ejected server does there.
 *    Points
 *    depend on the number of nodes, so, as in libmemcached, removing one
 *    node also moves a few keys between the nodes that stay.
 *  KEEL_RING_JUMP — Lamping & Veach's jump consistent hash over XXH3: no
 *    memory per key range, perfect balance. A node of weight w owns w
 *    buckets. Only the node added last can be removed (anything else is
 *    KEEL_EINVAL): use it for a cluster that only grows and shrinks at the
 *    end.
 *  KEEL_RING_MAGLEV — Google's Maglev table (NSDI 2016): a prime-size table
 *    (65537 entries unless set; keep it above 100 x nodes) filled from each
 *    node's permutation (nodes taking turns in the order of their names'
 *    hashes, not the order they were added in); O(1) lookups,
 *    near-perfect balance, little movement on change.
 *
 * Concurrency: lookups (lookup, lookup_n, assign, unassign, nodes) never
 * take a lock and never wait for a writer; each sees the ring as it was
 * before or after a concurrent add or remove, never a mix. add and remove
 * serialise among themselves and wait until no lookup still reads the ring
 * version they replaced, then free it. (A thread whose very first lookup
 * finds no memory for its small reader record reads under the writers'
 * lock instead, so that lookups never fail for memory.) All functions are
 * thread-safe except keel_ring_destroy().
 *
 * The name a lookup returns points into the ring and stays valid until
 * keel_ring_destroy(), even after the node is removed: removed node records
 * are kept, and reused when the same name is added again, so a ring grows
 * by one small record per distinct name it has ever held.
 */
#ifndef KEEL_RING_H
#define KEEL_RING_H

#include <keel/common.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct keel_ring keel_ring;

typedef enum keel_ring_algo {
    KEEL_RING_CONTINUUM = 0,
    KEEL_RING_KETAMA = 1,
    KEEL_RING_JUMP = 2,
    KEEL_RING_MAGLEV = 3
} keel_ring_algo;

typedef struct keel_ring_opts {
    keel_ring_algo algo;
    /* CONTINUUM: points per unit of weight, 1..10000; 0 = 160. */
    unsigned points_per_weight;
    /* MAGLEV: table size, a prime from 7 to 16777259; 0 = 65537. */
    uint32_t maglev_size;
    /* Bounded loads (keel_ring_assign): a node holds at most
     * ceil((1 + epsilon) * average) assignments; 0 = 0.25; at most 1e6. */
    double load_epsilon;
    /* Hash seed of CONTINUUM, JUMP and MAGLEV (KETAMA has none). Rings that
     * must agree use the same seed. */
    uint64_t seed;
    /* Optional: keel_ring_nodes and keel_ring_assignments gauges labelled
     * ring=metrics_name (default "default") in this registry. */
    keel_metrics *metrics;
    const char *metrics_name; /* "default" if NULL; taken twice in one registry: KEEL_EEXIST */
} keel_ring_opts;

/* A node as lookups return it. */
typedef struct keel_ring_node {
    const void *name;  /* the bytes given to keel_ring_add() */
    size_t name_len;
    uint32_t weight;
    void *ud;          /* the pointer given to keel_ring_add() */
    uint64_t id;       /* unique per add in this ring, never reused */
} keel_ring_node;

/* One node for keel_ring_add_many(). */
typedef struct keel_ring_node_spec {
    const void *name;
    size_t name_len;
    uint32_t weight;
    void *ud;
} keel_ring_node_spec;

/* Creates an empty ring; opts may be NULL (the defaults: continuum, 160
 * points a unit of weight...). Returns 0, KEEL_EINVAL (NULL out, unknown
 * algorithm, points_per_weight > 10000, a maglev_size that is not a prime
 * in range, a negative or NaN epsilon) or KEEL_ENOMEM. */
KEEL_API int keel_ring_create(keel_ring **out, const keel_ring_opts *opts);

/* Adds a node with a weight (> 0) and a user pointer. The name (1..1030
 * bytes, any bytes: room for libmemcached's "host:port" with a host of
 * 1024) is copied. Returns 0; KEEL_EEXIST for a name already
 * in the ring; KEEL_EINVAL for an empty or over-long name, a zero weight,
 * or a ring that would pass 16,777,216 points (CONTINUUM, KETAMA) or
 * buckets (JUMP), or more nodes than MAGLEV table entries; KEEL_ENOMEM;
 * KEEL_ESTATE inside one of libkeel's own read sections, where it would
 * wait for itself (a guard: no callback of libkeel runs in one).
 * Blocks until lookups of the previous ring version have finished. */
KEEL_API int keel_ring_add(keel_ring *r, const void *name, size_t len, uint32_t weight,
                           void *ud);

/* Adds n nodes with one rebuild: all or none. Errors as keel_ring_add(),
 * plus KEEL_EEXIST for a name repeated within specs. */
KEEL_API int keel_ring_add_many(keel_ring *r, const keel_ring_node_spec *specs, size_t n);

/* Removes a node. Returns 0, KEEL_ENOTFOUND, KEEL_EINVAL (NULL, or in JUMP
 * a node that was not added last), KEEL_ESTATE (as keel_ring_add()) or
 * KEEL_ENOMEM (the ring is unchanged). Blocks like keel_ring_add(). */
KEEL_API int keel_ring_remove(keel_ring *r, const void *name, size_t len);

/* The node that owns key. Returns 0, KEEL_EUNAVAIL for an empty ring,
 * KEEL_EINVAL for NULL arguments (an empty key is a valid key). Lock-free. */
KEEL_API int keel_ring_lookup(keel_ring *r, const void *key, size_t len, keel_ring_node *node);

/* Up to n distinct nodes for key in preference order, the owner first
 * (the replica set). With CONTINUUM the next node is where the key would
 * go if the nodes before were gone. KETAMA walks its continuum the same
 * way, but a node's points depend on the node count, so a removal changes
 * the others' points too and a removed owner's keys go to the next node
 * of their set most of the time, not always (1-5% went elsewhere at 20 to
 * 100 nodes). JUMP and MAGLEV cannot say that without a rebuild, and
 * follow rehashes of the key (JUMP) or the table entries after the key's
 * (MAGLEV) instead, so there the owner's removal moves its keys to a node
 * of the set only by chance. *found is
 * set to min(n, nodes in the ring). Returns 0,
 * KEEL_EUNAVAIL for an empty ring, KEEL_EINVAL, or KEEL_ENOMEM (n > 16
 * needs a small bitmap). */
KEEL_API int keel_ring_lookup_n(keel_ring *r, const void *key, size_t len, size_t n,
                                keel_ring_node *nodes, size_t *found);

/* Bounded loads (Mirrokni, Thorup & Zadimoghaddam): assigns key to the
 * first node in its preference order holding fewer than
 * ceil((1 + epsilon) * m * w / W) assignments (at least 1), where m counts
 * the assignments including this one, w is the node's weight and W the
 * ring's total (so N nodes of equal weight get ceil((1 + epsilon) * m / N)
 * each, and a heavier node its share, as HAProxy's hash-balance-factor
 * scales servers), and counts it there. Pair each success with one
 * keel_ring_unassign().
 * Returns 0, KEEL_EUNAVAIL (empty ring), KEEL_EINVAL, or KEEL_EBUSY when
 * other threads kept every node full through several attempts. Lock-free. */
KEEL_API int keel_ring_assign(keel_ring *r, const void *key, size_t len, keel_ring_node *node);

/* Ends an assignment made by keel_ring_assign() on that node. Returns 0,
 * KEEL_EINVAL (NULL, or the node holds no assignment), or KEEL_ENOTFOUND
 * when the node has been removed since (its assignments ended with it).
 * Lock-free. */
KEEL_API int keel_ring_unassign(keel_ring *r, const keel_ring_node *node);

/* Assignments a node holds now (0 for a node no longer in the ring). */
KEEL_API uint64_t keel_ring_load(keel_ring *r, const keel_ring_node *node);

/* Calls fn once per node, in the order the nodes were added, with the share
 * of the hash space the node owns (0..1, summing to 1), from one
 * consistent version of the ring, taken before the first call. fn may
 * call anything, this ring's add and remove included (later versions do
 * not change the visit). Returns 0, KEEL_EINVAL or KEEL_ENOMEM. */
typedef void (*keel_ring_visit_fn)(const keel_ring_node *node, double share, void *ud);
KEEL_API int keel_ring_nodes(keel_ring *r, keel_ring_visit_fn fn, void *ud);

/* Nodes in the ring now. */
KEEL_API size_t keel_ring_count(keel_ring *r);

/* Frees the ring. NULL is a no-op. Must not run concurrently with any other
 * call on the ring. */
KEEL_API void keel_ring_destroy(keel_ring *r);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_RING_H */
