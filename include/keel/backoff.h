/* keel/backoff.h — retry schedules and retry budgets.
 *
 * A schedule says how long to wait before attempt n+1 of one operation:
 *
 *   KEEL_BACKOFF_CONSTANT      base every time (0 = retry at once)
 *   KEEL_BACKOFF_EXPONENTIAL   min(cap, base * 2^n)
 *   KEEL_BACKOFF_FULL_JITTER   U(0, min(cap, base * 2^n))
 *   KEEL_BACKOFF_EQUAL_JITTER  e/2 + U(0, e/2), e = min(cap, base * 2^n)
 *   KEEL_BACKOFF_DECORRELATED  min(cap, U(base, 3 * previous delay))
 *
 * (the formulas of Marc Brooker's "Exponential Backoff And Jitter", AWS
 * Architecture Blog, 2015; U(a, b) is uniform on [a, b]; in integer
 * nanoseconds, EQUAL_JITTER is ceil(e/2) + U(0, floor(e/2)), within
 * [ceil(e/2), e], so a delay of 1 ns stays 1). Jittered
 * schedules spread the retries of many clients so that they stop
 * arriving together.
 *
 * A retry budget keeps retries to a share of the traffic, so that a failing
 * server is not buried under retries:
 *
 *   KEEL_BUDGET_TOKENS   gRPC's retry throttling: tokens start at max,
 *                        each failure takes 1 (never below 0), each success
 *                        gives `ratio` (capped at max); a retry is allowed
 *                        only while tokens > max / 2. Integer milli-tokens.
 *   KEEL_BUDGET_PERCENT  Finagle's RetryBudget: every request (once, not
 *                        per retry) deposits `percent`% of a retry, a
 *                        retry withdraws one, both expire after `window`
 *                        (counted in tenths of it: 0.9 to 1 window
 *                        later), and a reserve of
 *                        `min_per_sec` x window-seconds retries is always
 *                        there, for clients with little traffic.
 *
 * A keel_backoff is a small value owned by one retry loop (one thread at a
 * time); a keel_retry_budget is a handle shared by all threads.
 */
#ifndef KEEL_BACKOFF_H
#define KEEL_BACKOFF_H

#include <keel/common.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum keel_backoff_policy {
    KEEL_BACKOFF_CONSTANT = 0,
    KEEL_BACKOFF_EXPONENTIAL = 1,
    KEEL_BACKOFF_FULL_JITTER = 2,
    KEEL_BACKOFF_EQUAL_JITTER = 3,
    KEEL_BACKOFF_DECORRELATED = 4
} keel_backoff_policy;

typedef struct keel_backoff_opts {
    keel_backoff_policy policy;
    uint64_t base_ns; /* first delay (DECORRELATED: the least delay) */
    uint64_t cap_ns;  /* largest delay; 0 = no cap (UINT64_MAX) */
    keel_rand_fn rand; /* NULL = keel_rand_u64 */
    void *rand_ud;
} keel_backoff_opts;

/* The state of one retry loop. Initialise it with keel_backoff_init(); the
 * fields are private (they are public only so that the value can live on
 * the caller's stack). */
typedef struct keel_backoff {
    keel_backoff_opts opts;
    uint32_t attempt; /* delays handed out since init or reset */
    uint64_t prev_ns; /* the last delay (DECORRELATED) */
} keel_backoff;

/* Returns 0, or KEEL_EINVAL for NULL arguments, an unknown policy, or a
 * cap below base. */
KEEL_API int keel_backoff_init(keel_backoff *b, const keel_backoff_opts *opts);

/* The delay before the next attempt, in nanoseconds; advances the
 * schedule. Never overflows: growth stops at the cap. Not thread-safe (one
 * loop, one value). */
KEEL_API uint64_t keel_backoff_next(keel_backoff *b);

/* Starts the schedule again (after a success). */
KEEL_API void keel_backoff_reset(keel_backoff *b);

/* The delay for attempt `attempt` (0-based) without state, given the
 * previous delay for DECORRELATED (0 = none yet). What keel_backoff_next()
 * computes; for callers that keep their own counter (keel_breaker's open
 * wait). Returns 0 for NULL opts. Thread-safe if the rand source is. */
KEEL_API uint64_t keel_backoff_delay(const keel_backoff_opts *opts, uint32_t attempt,
                                     uint64_t prev_ns);

/* ---- retry budgets ---- */

typedef struct keel_retry_budget keel_retry_budget;

typedef enum keel_budget_kind {
    KEEL_BUDGET_TOKENS = 0,
    KEEL_BUDGET_PERCENT = 1
} keel_budget_kind;

typedef struct keel_retry_budget_opts {
    keel_budget_kind kind;
    /* TOKENS: the bucket size and the refill per success, in milli-tokens
     * (gRPC's maxTokens 10 and tokenRatio 0.1 are 10000 and 100, the
     * defaults). max 1000..1000000, ratio <= max. */
    uint32_t max_milli;
    uint32_t ratio_milli;
    /* PERCENT: retries allowed per 100 requests (0 = 20, Finagle's
     * default; at most 1000), over a window (0 = 10 s, 1 s..1 h), plus a
     * reserve of min_per_sec x window-seconds retries (0 = 10 per second,
     * at most 1,000,000;
     * KEEL_BUDGET_NONE for a real zero, in either field). */
    uint32_t percent;
    uint64_t window_ns;
    uint32_t min_per_sec;
    keel_clock_fn clock; /* PERCENT; NULL = keel_now_ns */
    void *clock_ud;
    /* Optional: a keel_retry_budget_tokens gauge (the balance in retries)
     * labelled budget=metrics_name (default "default") in this registry. */
    keel_metrics *metrics;
    const char *metrics_name; /* "default" if NULL; taken twice in one registry: KEEL_EEXIST */
} keel_retry_budget_opts;

/* An explicit zero for the PERCENT options (whose 0 means the default). */
#define KEEL_BUDGET_NONE UINT32_MAX

/* Returns 0, KEEL_EINVAL (NULL, unknown kind, values out of range) or
 * KEEL_ENOMEM. */
KEEL_API int keel_retry_budget_create(keel_retry_budget **out, const keel_retry_budget_opts *opts);

/* A new request is about to be sent: call it once per request, before its
 * first attempt, not for retries (as Finagle's RetryFilter deposits once
 * per request). PERCENT deposits its share of a retry; TOKENS ignores it.
 * Called for retries too, the retries would pay for themselves: with
 * every attempt failing, 20% would allow 25% (r = 0.2 (n + r)). Lock-free
 * (TOKENS) or a short lock (PERCENT). */
KEEL_API void keel_retry_budget_on_request(keel_retry_budget *b);

/* An attempt ended. TOKENS: a failure takes one token, a success gives
 * `ratio`. PERCENT ignores it. Lock-free. */
KEEL_API void keel_retry_budget_on_result(keel_retry_budget *b, int ok);

/* May a retry be sent now? Returns 0 (and, for PERCENT, withdraws one
 * retry) or KEEL_ELIMIT when the budget is spent; KEEL_EINVAL for NULL. */
KEEL_API int keel_retry_budget_try_retry(keel_retry_budget *b);

/* The balance in milli-tokens (TOKENS: the bucket; PERCENT: deposits in the
 * window plus the per-second reserve, minus withdrawals). */
KEEL_API int64_t keel_retry_budget_balance(keel_retry_budget *b);

/* NULL is a no-op. Must not run concurrently with other calls on b. */
KEEL_API void keel_retry_budget_destroy(keel_retry_budget *b);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_BACKOFF_H */
