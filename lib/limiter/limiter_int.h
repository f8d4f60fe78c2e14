/* lib/limiter/limiter_int.h — what the files of keel_limiter share. Private. */
#ifndef KEEL_LIMITER_INT_H
#define KEEL_LIMITER_INT_H

#include <stdatomic.h>

#include <keel/limiter.h>

#include "../internal.h"

#define LIM_MAX_KEY 4096

typedef enum lop { OP_TAKE, OP_PEEK, OP_REFUND } lop;

/* The policy every key of a limiter shares. */
typedef struct lcfg {
    keel_limit_algo algo;
    uint64_t limit, window, burst; /* window in ns */
} lcfg;

/* ---- the in-process store (local.c) ---- */

/* n / d for a divisor fixed when the limiter is made, by a multiply and
 * shifts (Granlund and Montgomery, "Division by invariant integers using
 * multiplication", PLDI 1994, figure 4.1): a decision divides by the limit
 * and the window up to three times, and a hardware divide costs several
 * multiplies. Exact for every n and every d >= 1. */
typedef struct ldivisor {
    uint64_t d, m;
    unsigned shift; /* l - 1, l = ceil(log2 d); unused when d == 1 */
} ldivisor;
ldivisor keel__ldivisor(uint64_t d);
uint64_t keel__ldivide(const ldivisor *v, uint64_t n);

typedef struct lstore lstore;

int keel__lstore_create(lstore **out, const lcfg *cfg, size_t max_keys, const keel__clock *clock);
void keel__lstore_destroy(lstore *s);
/* A key's hash, for keel__lstore_decide(). With prefetch, its slot is
 * also on its way into the cache: a batch hashes every key first so that
 * the cache misses of its keys overlap. */
uint64_t keel__lstore_hash(lstore *s, const void *key, size_t len, bool prefetch);
/* The store's clock. */
uint64_t keel__lstore_now(lstore *s);
/* Decides for one key of hash h at time now. Returns 0 or KEEL_ERANGE
 * (cost over the limit), *r filled either way; KEEL_ENOMEM when a new key
 * could not be stored (the request is then rejected, nothing kept). */
int keel__lstore_decide(lstore *s, const void *key, size_t len, uint64_t h, uint64_t now, uint64_t cost, lop op,
                        keel_limit_result *r);
void keel__lstore_reset(lstore *s, const void *key, size_t len);
void keel__lstore_stats(lstore *s, keel_limiter_stats *out);

/* ---- the Redis store (redis_store.c) ---- */

typedef struct rstore rstore;

/* Keys are named from prefix, the policy and its name (see limiter.h). */
int keel__rstore_create(rstore **out, const lcfg *cfg, struct keel_redis *redis, const char *prefix,
                        const char *name);
void keel__rstore_destroy(rstore *s);
/* Decides for n keys in one pipeline; each gets rc 0, KEEL_ERANGE,
 * KEEL_EBACKEND, or a store failure (KEEL_EUNAVAIL, KEEL_ETIMEDOUT,
 * KEEL_EPROTO, KEEL_ENOMEM) for the caller's policy. */
void keel__rstore_decide(rstore *s, keel_limit_req *reqs, size_t n, lop op);
int keel__rstore_reset(rstore *s, const void *key, size_t len);
/* Whether a command's outcome (rc and reply) is a store failure for the
 * caller's policy, rather than an answer or a refusal. */
struct redisReply;
bool keel__rstore_failure(int rc, const struct redisReply *rep);
/* The script's SHA1 (for benchmarks comparing against redis-benchmark). */
const char *keel__rstore_sha(const rstore *s);

/* ---- the limiter (limiter.c) ---- */

struct keel_limiter {
    lcfg cfg;
    char name[64];
    keel__clock clock;
    lstore *local;    /* the in-process store, or Redis's fallback */
    rstore *remote;
    keel_limit_on_error on_error;
    _Atomic uint64_t store_errors, remote_allowed, remote_rejected;
    keel_metrics *metrics;
};

#endif
