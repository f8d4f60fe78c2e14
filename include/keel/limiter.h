/* keel/limiter.h — rate limiting per key: an exact sliding log, a sliding
 * window counter and GCRA, decided in process or shared by every instance
 * of a service through Redis.
 *
 * A limiter has one policy (algorithm, limit, window) and any number of
 * keys (a client, a route: 1 to 4096 bytes, NUL allowed). Each request
 * has a cost in units (default 1). A rejected request changes nothing (as
 * nginx's limit_req): a client that keeps retrying above the limit still
 * gets its `limit` units per window (limit - 1 with the sliding window
 * counter once the previous window weighs in: see below).
 *
 * Algorithms:
 *  - KEEL_LIMIT_SLIDING_LOG: exact. In no window of length window_ns are
 *    more than `limit` units admitted; the log keeps one entry per
 *    admission (its time and a running total of units), and a decision,
 *    allowed or rejected, costs O(log n) of them.
 *  - KEEL_LIMIT_SLIDING_WINDOW: Cloudflare's two counters: the previous
 *    fixed window's count weighted by how much of it the sliding window
 *    still covers, plus the current count. O(1) state. Never more than
 *    `limit` units in one fixed window, never more than 2 x limit in any
 *    sliding window (the bound is reached only by a burst at the very end
 *    of a window; traffic spread evenly stays within a few percent of
 *    `limit`). An estimate, it errs both ways: a client retrying steadily
 *    above the limit gets limit - 1 units in a window that follows a full
 *    one.
 *  - KEEL_LIMIT_GCRA: the generic cell rate algorithm (redis-cell's): a
 *    token bucket of `burst` units refilled at limit / window_ns, stored as
 *    one "theoretical arrival time" per key. It bounds the rate, not a
 *    window's count: over any interval of length t at most
 *    burst + t x limit / window_ns units pass.
 *
 * Stores. In process (the default): keys in shards of open hash tables,
 * at most max_keys; time from the clock option. Through Redis (opts.redis):
 * one atomic Lua script per decision, run by EVALSHA with the Redis
 * server's TIME (so the clocks of application servers do not matter), keys
 *     prefix algo ":" policy ":{" key "}"
 * (the log adds the same name followed by ":s"), with '%' and '}' in the
 * key written "%25" and "%7D", so that the hash tag is the whole key (one
 * key's state on one node, keys spread over nodes): algo is "log", "window"
 * or "gcra"; policy is 8 lowercase hex digits, the top 32 bits of
 * XXH3_64bits (seed 0) of the text "limit window_ns burst name" (decimal,
 * one space apart; burst is the limit but for GCRA, name "default" if
 * NULL). So limiters of distinct policies never share a key's record,
 * while every instance of one policy (any process) does; changing a
 * policy starts its keys afresh. Redis must
 * never evict them (maxmemory-policy noeviction: every key the limiter
 * writes has an expiry, so volatile-* policies may take them too; see
 * keel_limiter(3)). When Redis is
 * unreachable or answers any error but WRONGTYPE (BUSY, LOADING, OOM,
 * MISCONF, READONLY, NOPERM, too many clients..., also when Redis 6 wraps
 * them in a script error), on_store_error decides: fail open, fail
 * closed, or decide in process (this process's requests only: with N
 * processes, up to N times the limit) — and the answer says which
 * happened.
 *
 * Thread safety: every call may be made from any number of threads.
 */
#ifndef KEEL_LIMITER_H
#define KEEL_LIMITER_H

#include <keel/common.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct keel_limiter keel_limiter;
struct keel_redis;

typedef enum keel_limit_algo {
    KEEL_LIMIT_SLIDING_LOG = 0,
    KEEL_LIMIT_SLIDING_WINDOW = 1,
    KEEL_LIMIT_GCRA = 2
} keel_limit_algo;

/* What to answer when the Redis store fails (unreachable, timed out). */
typedef enum keel_limit_on_error {
    KEEL_LIMIT_FAIL_OPEN = 0,   /* allow */
    KEEL_LIMIT_FAIL_CLOSED = 1, /* reject */
    KEEL_LIMIT_FALL_BACK = 2    /* decide in process */
} keel_limit_on_error;

/* Who decided. */
typedef enum keel_limit_source {
    KEEL_LIMIT_SRC_LOCAL = 0,   /* the in-process store */
    KEEL_LIMIT_SRC_REDIS = 1,   /* Redis */
    KEEL_LIMIT_SRC_OPEN = 2,    /* Redis failed: allowed by policy */
    KEEL_LIMIT_SRC_CLOSED = 3,  /* Redis failed: rejected by policy */
    KEEL_LIMIT_SRC_FALLBACK = 4 /* Redis failed: decided in process */
} keel_limit_source;

typedef struct keel_limiter_opts {
    keel_limit_algo algo;
    uint64_t limit;        /* units per window; 1..2^32-1 */
    uint64_t window_ns;    /* required, at most 2^60; with Redis at least 1 ms, rounded up
                            * to whole microseconds (what it counts: a little stricter,
                            * never looser), 3 x limit x window_us under 2^53 and, for
                            * GCRA, burst x window_us / limit under 2^53 */
    uint64_t burst;        /* GCRA: units that may pass at once; 0 = limit */
    const char *name;      /* the policy's name in the RateLimit fields (up to 63
                              bytes); NULL = "default" */
    size_t max_keys;       /* in process: 0 = 1,000,000; at most 2^32. Each of up to 64
                            * shards holds its share: eviction may begin a little
                            * before max_keys keys in all */
    struct keel_redis *redis; /* NULL: in process */
    const char *prefix;    /* of Redis keys (see above); NULL = "keel:rl:"; no '{', up to
                            * 256 bytes */
    keel_limit_on_error on_store_error;
    keel_clock_fn clock;   /* in process; NULL = keel_now_ns */
    void *clock_ud;
    keel_metrics *metrics; /* keel_limiter_* series; may be NULL */
    const char *metrics_name; /* "default" if NULL; taken twice in one registry: KEEL_EEXIST */
} keel_limiter_opts;

/* A decision. Times are nanoseconds from now. */
typedef struct keel_limit_result {
    int allowed;
    keel_limit_source source;
    uint64_t limit;          /* the limit (GCRA: the burst) */
    uint64_t remaining;      /* units that would pass now, after this decision */
    uint64_t reset_ns;       /* until all `limit` units are available again */
    uint64_t retry_after_ns; /* rejected: until the same request could pass;
                              * UINT64_MAX if it never can (cost over the limit) */
    uint64_t now_ns;         /* the store's time of the decision (Redis: its TIME) */
} keel_limit_result;

/* Returns 0, KEEL_EINVAL (no window, a limit or a burst over 2^32-1, a
 * limit of 0, a prefix with '{', an unknown algorithm or policy, a window
 * or a GCRA bucket Redis cannot count: see window_ns) or KEEL_ENOMEM.
 * With Redis, loads nothing yet. */
KEEL_API int keel_limiter_create(keel_limiter **out, const keel_limiter_opts *opts);
KEEL_API void keel_limiter_destroy(keel_limiter *l);

/* Asks for `cost` units (0 means 1) for key and consumes them if allowed.
 * Returns 0 with *r filled (allowed or not); KEEL_ERANGE, *r filled as a
 * rejection with retry_after_ns UINT64_MAX, when cost exceeds the limit
 * (GCRA: the burst), whatever the store; KEEL_EINVAL (NULL, an empty key
 * or one over 4096 bytes); with Redis, KEEL_EBACKEND when Redis refused
 * the script with WRONGTYPE (the key holds another type: not a failure of
 * the server, so no policy applies), logged, with *r a rejection;
 * in process, KEEL_ENOMEM when the key's state could not be stored (*r a
 * rejection; nothing was consumed). Those two rejections carry the limit
 * and, the key's state being unknown, retry_after_ns and reset_ns of one
 * window, as KEEL_LIMIT_FAIL_CLOSED answers. A store failure is not an
 * error: see source. With Redis, a request that runs out of memory on its
 * way there is a store failure too (nothing was consumed). */
KEEL_API int keel_limiter_take(keel_limiter *l, const void *key, size_t len, uint64_t cost,
                               keel_limit_result *r);

/* Whether keel_limiter_take() would allow the request, consuming nothing:
 * `allowed` and `retry_after_ns` are take's; `remaining` and `reset_ns`
 * are as they stand (before any consumption). */
KEEL_API int keel_limiter_peek(keel_limiter *l, const void *key, size_t len, uint64_t cost,
                               keel_limit_result *r);

/* Gives back `cost` units taken earlier (a request that did not happen
 * after all); never more than the key holds, and with the sliding window
 * only from the current window's count (units taken in the previous
 * window stay until it stops weighing). r may be NULL. */
KEEL_API int keel_limiter_refund(keel_limiter *l, const void *key, size_t len, uint64_t cost,
                                 keel_limit_result *r);

/* Forgets a key: it starts afresh. Returns 0, KEEL_EINVAL, or with Redis
 * the command's error (KEEL_EUNAVAIL, KEEL_ETIMEDOUT, KEEL_EBACKEND,
 * KEEL_EPROTO, KEEL_ENOMEM): no failure policy applies, and the key may
 * still be held. */
KEEL_API int keel_limiter_reset(keel_limiter *l, const void *key, size_t len);

/* One request of a batch. */
typedef struct keel_limit_req {
    const void *key;
    size_t len;
    uint64_t cost;
    int rc;                 /* out: as keel_limiter_take() */
    keel_limit_result result; /* out */
} keel_limit_req;

/* keel_limiter_take() for n keys; with Redis, in one pipeline (one round
 * trip per node); in process, 16 at a time with their slots fetched from
 * memory together, which over many keys (slots out of the CPU's caches)
 * makes each decision several times cheaper than alone. Returns 0 when every request got an answer (see each
 * rc: with Redis, KEEL_ENOMEM in every one, nothing decided, when there is
 * no memory for the batch itself, each result then such a rejection,
 * source KEEL_LIMIT_SRC_REDIS), else KEEL_EINVAL for bad arguments,
 * checked before anything. */
KEEL_API int keel_limiter_take_many(keel_limiter *l, keel_limit_req *reqs, size_t n);

/* Formats the response header fields for a decision, CRLF-terminated:
 *   X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset (seconds
 *   from now, rounded up), Retry-After (seconds, rounded up; only when
 *   rejected and it can ever pass), and the IETF draft's
 *   RateLimit-Policy: "name";q=limit;w=window-seconds (GCRA: q=burst and
 *   w the seconds to earn it back, burst x window / limit) and
 *   RateLimit: "name";r=remaining;t=reset-seconds (with Retry-After,
 *   the draft asks that t be the same time: it is then Retry-After's,
 *   while X-RateLimit-Reset stays the time until all units are back).
 * Returns 0 with *len the length written (a NUL follows), or KEEL_ERANGE
 * with *len the size needed (without the NUL). */
KEEL_API int keel_limiter_headers(const keel_limiter *l, const keel_limit_result *r, char *buf,
                                  size_t size, size_t *len);

typedef struct keel_limiter_stats {
    uint64_t keys;            /* in process */
    uint64_t bytes;           /* in process: tables, long keys and logs */
    uint64_t allowed, rejected; /* takes; rejected counts every refusal, those of
                                 * KEEL_EBACKEND and KEEL_ENOMEM included */
    uint64_t evicted_idle;    /* keys dropped at max_keys that held nothing */
    uint64_t evicted_active;  /* keys dropped at max_keys that still held units */
    uint64_t store_errors;    /* Redis failures handled by on_store_error */
} keel_limiter_stats;

KEEL_API void keel_limiter_stats_get(keel_limiter *l, keel_limiter_stats *st);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_LIMITER_H */
