/* keel/cache.h — a multi-level cache: L1 in process, L2 Redis, L3
 * PostgreSQL; read-through with single-flight; tag and prefix
 * invalidation; L1 kept coherent across processes.
 *
 * Keys and values are bytes. keel_cache_get() copies the value into the
 * caller's buffer (KEEL_ERANGE with the size needed when it is too small).
 * An L1 hit takes no lock: the L1 is a hash table read under RCU, sharded,
 * with S3-FIFO eviction (a small FIFO for new entries, a main FIFO for
 * those used again, a ghost list of recent evictions), which a hit only
 * marks with a counter, so one-pass scans do not push out the hot set.
 * Entries expire by the injectable clock, their TTL capped by l1_max_ttl:
 * one set at t with a TTL of d is served while the clock reads before
 * t + d (t + d past the clock's end: never expires).
 * With the default clock a hit checks expiry against CLOCK_MONOTONIC_COARSE
 * (a precise read costs more than the rest of the hit and stalls the
 * loads after it), so an L1 entry may be served up to one kernel tick
 * (1 to 10 ms) past its expiry.
 *
 * Tiers. L1 always; L2 when `redis` is given (values under redis_prefix,
 * PX TTLs, sharded by keel_redis's ring); L3 when `pg` is given (a table,
 * UNLOGGED unless l3_logged, key bytea primary key, value, expires_at,
 * tags; upserts; expired rows ignored on read and deleted by
 * keel_cache_sweep() in bounded batches). get: L1, then L2, then L3, then
 * the loader; a hit below fills the tiers above (L1's TTL capped). set
 * writes through every tier; del removes from every tier.
 *
 * Single-flight: concurrent misses of one key in one process call the
 * loader once; the others wait for its result (a miss after an
 * invalidation of that key starts a load of its own, and so does one
 * after an invalidation of a tag the loaded value turns out to carry,
 * once that value is in; an invalidation of another key or tag splits no
 * load). With `lease`, a
 * Redis lease (SET NX PX) makes one process load while the others wait
 * for its value, or its absence, in L2 (until the lease is gone without
 * either, at most lease_ns, then they load too); the holder looks in L2
 * once more before it loads (another process may have filled it, and let
 * go of its lease, since the miss) and releases only its own lease.
 * With xfetch_beta > 0 and a loader, a hit close to its expiry may be
 * treated as a miss (XFetch), so that one caller refreshes it early from
 * the loader (L2 and L3 hold it as near its expiry) rather than all at
 * once, and writes the new value over the old one in L2 and L3 (unless an
 * invalidation of the key came during the load), so that the other
 * processes do not miss at the old expiry either; that caller keeps the
 * value it had if the refresh fails, and gets KEEL_ENOTFOUND if the
 * loader says the key is gone, which then goes, as by a del, from L2 (the
 * absence written over it), L3 and the other processes' L1 (unless an
 * invalidation of the key came during the load). An L1 entry cut short by l1_max_ttl over
 * L2 or L3 is not refreshed early: it is filled again from them when it
 * expires. A loader may answer KEEL_ENOTFOUND: that absence is cached in
 * L1 for negative_ttl_ns (at most l1_max_ttl_ns, like every L1 entry) and,
 * with L2, in Redis for as long where nothing is (a set overwrites it),
 * so that other processes see it without asking their loaders.
 *
 * Invalidation. set, del, invalidate_tag and invalidate_prefix act on all
 * tiers here and publish on the Redis channel redis_prefix + "inv"; every
 * process using the same Redis and prefix drops the same L1 entries (a
 * publish that fails, Redis down or no memory, is logged, not returned:
 * the others keep their entries until they expire). When
 * that link is lost, L1 is flushed, and again when it is made again, since
 * invalidations may have been missed (during the outage L1 fills as usual
 * from L3 and the loader, and may serve what other processes change
 * meanwhile: l1_max_ttl_ns bounds that). A value read from L2 or L3 (or
 * loaded) while an invalidation of its key arrived (or of a prefix or a
 * tag, or a flush; keys are told apart by 1024 stripes of their hash, so
 * now and then another key's counts too) is returned but not put into L1,
 * so a late reply never brings back what was just invalidated; fills of
 * the lower tiers never overwrite a value set meanwhile (SET NX, an upsert
 * over expired rows only; an early refresh overwrites, as it must), and
 * are skipped when an invalidation of that
 * key (a del, set or prefix, or of a tag the value carries; here or
 * announced) came during the read. (That check and the writes are not one step: a del that reaches
 * L2 or L3 between them, or is announced after it, removes nothing there,
 * and the loaded value stays until its TTL. A writer that changes the
 * source and must not see the old value again sets the new one, which
 * overwrites what a fill left, rather than deleting; only an early
 * refresh, which overwrites too, can still put its older value over a set
 * that lands in that same window.) Likewise a set that an invalidation
 * overtakes after it moved the epoch (just after its writes below) leaves
 * the key out of L1; a del that ran entirely between its last write below
 * and that move is not seen, and this L1 keeps the set's value until it
 * expires. L3 is read on the primary.
 *
 * Tags. set may name tags. L1 entries record each tag's version at set;
 * invalidating a tag bumps its version (here and, through the channel, in
 * every process), which makes those entries miss. A tag's record lives as
 * long as L1 entries carry the tag (stats: tags). L2 keeps a set of keys
 * per tag (redis_prefix + "t:" + tag; PEXPIRE NX/GT: Redis 7.0 or later)
 * whose keys are deleted; L3 deletes the rows whose tags contain it.
 *
 * Degraded mode: a tier that fails (down, timed out; not an error reply)
 * is counted and skipped by gets for tier_retry_ns; they are served by
 * the others and the loader. Then one get probes it while the others
 * still skip it, and its success ends the skip (a keel_breaker(3) for L3
 * and one per Redis node: a node that fails costs only its own keys, the
 * others' are still read from L2). Writes and invalidations still try a
 * failing tier (one skipped would leave an old value there), count its
 * errors and return the first.
 *
 * Thread safety: every function may be called from any thread. Calls
 * block on the servers they use, and L1 writers now and then on an RCU
 * grace period. A loader must not get its own key (it would wait for
 * itself). A cache must not be used in a child forked after its creation.
 */
#ifndef KEEL_CACHE_H
#define KEEL_CACHE_H

#include <keel/common.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct keel_cache keel_cache;
typedef struct keel_cache_load keel_cache_load;
struct keel_redis;
struct keel_pg;

/* Fills a miss: calls keel_cache_load_set() and returns 0, or returns
 * KEEL_ENOTFOUND (absent, cached negatively) or another error (returned to
 * every caller waiting for it, nothing cached). 0 without a value set is
 * KEEL_EPROTO to the callers. */
typedef int (*keel_cache_loader)(const void *key, size_t klen, keel_cache_load *ld, void *ud);

typedef struct keel_cache_opts {
    size_t l1_max_bytes;        /* entries: keys, values, their overhead; 0 =
                                   64 MiB (the tables that find them, 18 to 36
                                   bytes an entry, come on top) */
    size_t l1_max_items;        /* 0 = no limit but bytes; split over 32
                                   shards, one each at least (so 32 at least) */
    uint64_t l1_max_ttl_ns;     /* 0 = no cap */
    size_t max_key;             /* bytes; 0 = 1024 (the most); a key is 1..max_key
                                   bytes: NULL or empty is KEEL_EINVAL */
    size_t max_value;           /* bytes; 0 = 1 MiB; at most 512 MiB - 3234
                                   (with its header and tags, a Redis bulk
                                   string) */
    uint64_t default_ttl_ns;    /* a set or load without a TTL; 0 = 1 hour */
    struct keel_redis *redis;   /* L2; NULL: none */
    const char *redis_prefix;   /* NULL = "kc:"; up to 200 bytes */
    struct keel_pg *pg;         /* L3; NULL: none */
    const char *table;          /* NULL = "keel_cache" ([a-z0-9_], up to 48) */
    int l3_logged;              /* a logged table (crash-safe, slower) */
    uint64_t sweep_interval_ns; /* L3: a thread runs keel_cache_sweep() this often; 0: none */
    keel_cache_loader loader;   /* NULL: misses stay misses */
    void *loader_ud;
    uint64_t negative_ttl_ns;   /* 0 = 10 s */
    int lease;                  /* a cross-process load lease in Redis */
    uint64_t lease_ns;          /* 0 = 5 s */
    double xfetch_beta;         /* 0: off; 1 is XFetch's usual value */
    uint64_t tier_retry_ns;     /* a failed tier is skipped this long; 0 = 1 s */
    keel_clock_fn clock;        /* L1 expiry, XFetch, tier retries; NULL = keel_now_ns */
    void *clock_ud;
    keel_metrics *metrics;      /* keel_cache_* series; may be NULL */
    const char *metrics_name; /* "default" if NULL; taken twice in one registry: KEEL_EEXIST */
} keel_cache_opts;

/* Returns 0, KEEL_EINVAL (a bad table name or Redis prefix, l1_max_bytes
 * under 64 KiB, max_key over 1024, max_value over 512 MiB - 3234, xfetch_beta
 * negative or NaN), KEEL_EEXIST (metrics_name taken in that registry) or
 * KEEL_ENOMEM. With redis, subscribes to the
 * invalidation channel (KEEL_EUNAVAIL if Redis cannot be reached, or
 * keel_redis_subscribe()'s other failures). */
KEEL_API int keel_cache_create(keel_cache **out, const keel_cache_opts *opts);

/* L3: creates the table and its index if missing (idempotent). */
KEEL_API int keel_cache_create_schema(keel_cache *c);

KEEL_API void keel_cache_destroy(keel_cache *c);

/* Copies the value of key into buf (cap bytes) and sets *len. Returns 0;
 * KEEL_ERANGE (buf too small: *len is the size needed; call again);
 * KEEL_ENOTFOUND (absent everywhere, or the loader said so); KEEL_EINVAL
 * (bad arguments, an empty key (NULL or klen 0), key over max_key);
 * KEEL_ENOMEM (also when L2 or L3 could not be read for want of memory:
 * unlike a tier that is down, it is not passed over for the loader, whose
 * value may not be the tier's);
 * KEEL_EPROTO (the loader returned 0 without keel_cache_load_set()); a
 * loader's error. */
KEEL_API int keel_cache_get(keel_cache *c, const void *key, size_t klen, void *buf, size_t cap, size_t *len);

/* One key of a multi-get: key and buffer in, result out. */
typedef struct keel_cache_item {
    const void *key;
    size_t klen;
    void *buf;
    size_t cap;
    size_t len; /* out */
    int rc;     /* out: as keel_cache_get() */
} keel_cache_item;

/* Gets n keys: L1 first, then one MGET per Redis node for the misses
 * (batches of 512; a node that fails or is skipped is passed over for the
 * others), then each key still missing through L3 and the loader as
 * keel_cache_get() does (through L2 too when its node's MGET failed or
 * was skipped, or lacked memory). A key given more than once is asked
 * for once: every copy gets that one result in its own buffer
 * (KEEL_ERANGE for one too small); without memory for the bookkeeping,
 * each copy asks on its own. Returns
 * 0 when every item has its value, else the error of the first item
 * without one (see each rc). */
KEEL_API int keel_cache_get_many(keel_cache *c, keel_cache_item *items, size_t n);

/* Writes through every tier; ttl_ns 0 = default_ttl_ns. tags: C strings
 * (at most 16, each 1..200 bytes of UTF-8 without 0x1f). Returns 0, KEEL_EINVAL,
 * KEEL_ENOMEM, or the first tier error (the tiers that worked keep the
 * value). */
KEEL_API int keel_cache_set(keel_cache *c, const void *key, size_t klen, const void *val, size_t vlen,
                            uint64_t ttl_ns, const char *const *tags, size_t ntags);

/* Removes from every tier and every process's L1. */
KEEL_API int keel_cache_del(keel_cache *c, const void *key, size_t klen);
KEEL_API int keel_cache_invalidate_tag(keel_cache *c, const char *tag);
/* Every key that starts with prefix (bytes; SCAN MATCH with the glob
 * characters escaped on Redis, an escaped LIKE on PostgreSQL). */
KEEL_API int keel_cache_invalidate_prefix(keel_cache *c, const void *prefix, size_t len);

/* L3: deletes up to `batch` expired rows (0 = 1000); *deleted may be NULL. */
KEEL_API int keel_cache_sweep(keel_cache *c, size_t batch, size_t *deleted);

/* From a loader: the value (copied), its TTL (0 = default) and tags. */
KEEL_API int keel_cache_load_set(keel_cache_load *ld, const void *val, size_t vlen, uint64_t ttl_ns,
                                 const char *const *tags, size_t ntags);

typedef struct keel_cache_stats {
    uint64_t hits_l1, hits_l2, hits_l3, misses, negative_hits, loads, load_waits;
    uint64_t evictions, expirations, invalidations_received, flushes;
    uint64_t errors_l2, errors_l3;
    uint64_t l1_items, l1_bytes;
    uint64_t tags; /* tag records: one per distinct tag of L1's entries
                      (those awaiting their RCU grace period too) */
} keel_cache_stats;

KEEL_API void keel_cache_stats_get(keel_cache *c, keel_cache_stats *st);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_CACHE_H */
