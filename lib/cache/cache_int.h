/* lib/cache/cache_int.h — what the files of keel_cache share. Private. */
#ifndef KEEL_CACHE_INT_H
#define KEEL_CACHE_INT_H

#include <pthread.h>
#include <stdatomic.h>

#include <keel/cache.h>

#include "../internal.h"

#define CACHE_MAX_TAGS 16
#define CACHE_MAX_TAG 200

/* A tag's record: its version, bumped by each invalidation, here or
 * announced by another process. Counted references pin it: one for each
 * L1 entry that carries the tag (given back when the entry is freed,
 * after its grace period) and one for each caller between tag lookup and
 * keel__l1_set. L1 readers reach a record only through an entry they
 * can still see, so the last reference gone, no reader holds it: it is
 * freed at once. A tag without a record has no entry to make miss; one
 * made again starts a new count of versions, which no entry has seen. */
typedef struct tag_stripe tag_stripe;
typedef struct ctag {
    _Atomic uint64_t version;
    struct ctag *next; /* its bucket, under its stripe's mutex */
    tag_stripe *home;
    size_t refs;       /* under home's mutex */
    uint64_t h;
    char name[];
} ctag;

/* Gives a reference back; the last frees the record. */
void keel__ctag_put(ctag *t);

typedef struct l1_tagref {
    ctag *tag;
    uint64_t version;
} l1_tagref;

/* ---- L1 (l1.c): sharded, S3-FIFO, read under RCU ---- */

typedef struct l1 l1;

typedef struct l1_hit {
    uint64_t expires, delta; /* for XFetch */
    bool negative;
} l1_hit;

typedef struct l1_stats {
    uint64_t evictions, expirations, items, bytes;
} l1_stats;

int keel__l1_create(l1 **out, size_t max_bytes, size_t max_items, const keel__clock *clock);
void keel__l1_destroy(l1 *c);
/* 0: a hit, the value copied (or KEEL_ERANGE, *len the size); KEEL_ENOTFOUND:
 * a miss (expired, or a tag invalidated since). */
int keel__l1_get(l1 *c, const void *key, size_t klen, uint64_t h, void *buf, size_t cap, size_t *len, l1_hit *hit);
/* Inserts (replacing) unless *epoch + *kepoch moved past `seen` (an
 * invalidation of the key arrived meanwhile: the value may be stale). Returns 0, KEEL_ENOMEM,
 * KEEL_ECONFLICT (skipped) or KEEL_ERANGE (larger than an L1 shard, a
 * 32nd of the L1). Takes the tags' references in every case (the entry
 * keeps them, or they are given back). */
int keel__l1_set(l1 *c, const void *key, size_t klen, uint64_t h, const void *val, size_t vlen, uint64_t expires,
                 uint64_t delta, const l1_tagref *tags, size_t ntags, bool negative, _Atomic uint64_t *epoch,
                 _Atomic uint64_t *kepoch, uint64_t seen);
void keel__l1_del(l1 *c, const void *key, size_t klen, uint64_t h);
void keel__l1_del_prefix(l1 *c, const void *prefix, size_t len);
void keel__l1_flush(l1 *c);
void keel__l1_stats(l1 *c, l1_stats *st);

/* A key's hash in cache c (its own random seed): L1's shard is the top
 * five bits. For the tests' model. */
uint64_t keel__cache_key_hash(const keel_cache *c, const void *key, size_t klen);

#endif
