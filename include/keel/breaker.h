/* keel/breaker.h — circuit breaker with resilience4j's state machine.
 *
 *   CLOSED     calls pass; their outcomes fill a sliding window. Once the
 *              window holds minimum_calls, a failure rate >= failure_rate
 *              or a slow-call rate >= slow_call_rate trips it OPEN.
 *   OPEN       calls are refused (KEEL_EUNAVAIL) for the open wait, which
 *              may grow with every consecutive re-open (a keel_backoff
 *              schedule). The first try_acquire at or after the wait's
 *              end moves it to HALF_OPEN (lazily: there is no timer
 *              thread).
 *   HALF_OPEN  exactly permitted_in_half_open trial calls pass (but see
 *              late releases below). As in
 *              resilience4j, once min(minimum_calls as set, permitted)
 *              trial results are in, the same thresholds are checked
 *              after every result, so the first such result decides OPEN
 *              again or CLOSED (with an empty window), without waiting
 *              for the trials still out: those count in the state they
 *              find (the CLOSED window, or nothing when OPEN).
 *   DISABLED, FORCED_OPEN   set by keel_breaker_force(): always pass and
 *              record nothing; always refuse.
 *
 * The window counts the last window_size calls (KEEL_BREAKER_COUNT) or the
 * calls of the last window_size seconds, in one-second buckets
 * (KEEL_BREAKER_TIME). minimum_calls is clamped to the window size of a
 * count window, as resilience4j does.
 *
 * Time is passed in by the caller (now_ns, monotonic nanoseconds), so that
 * tests and simulations control it; pass keel_now_ns() in production.
 *
 * Thread safety: every function is thread-safe except destroy. The CLOSED
 * path (try_acquire and on_result) takes no lock: atomic loads and a few
 * atomic increments; with a TIME window, the one call a second that moves
 * the window on does it under a short internal lock, as do state changes. A result
 * is counted in the state current when it arrives, as resilience4j does; so
 * is a release (a permit taken while CLOSED and released in HALF_OPEN gives
 * one more trial, and such a call's result counts as a trial's). So is a
 * trial permit of an earlier HALF_OPEN released after the breaker opened
 * and half-opened again: a release names no permit, so it cannot be told
 * from a current trial's, and it gives the new HALF_OPEN one more trial
 * (resilience4j's releasePermission() also adds one in any HALF_OPEN).
 * Releases never raise the permits left above permitted_in_half_open, but
 * such late ones can let more than that many trials run in one HALF_OPEN;
 * release a permit promptly, before the call's time could outlast an open
 * wait, to keep the count exact.
 */
#ifndef KEEL_BREAKER_H
#define KEEL_BREAKER_H

#include <keel/backoff.h>
#include <keel/common.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct keel_breaker keel_breaker;

typedef enum keel_breaker_state {
    KEEL_BREAKER_CLOSED = 0,
    KEEL_BREAKER_OPEN = 1,
    KEEL_BREAKER_HALF_OPEN = 2,
    KEEL_BREAKER_DISABLED = 3,
    KEEL_BREAKER_FORCED_OPEN = 4
} keel_breaker_state;

typedef enum keel_breaker_window {
    KEEL_BREAKER_COUNT = 0,
    KEEL_BREAKER_TIME = 1
} keel_breaker_window;

typedef void (*keel_breaker_state_fn)(keel_breaker *b, keel_breaker_state from,
                                      keel_breaker_state to, void *ud);

typedef struct keel_breaker_opts {
    keel_breaker_window window;
    uint32_t window_size;   /* calls (COUNT, 0 = 100, <= 1000000) or seconds
                               (TIME, 0 = 60, <= 3600) */
    uint32_t minimum_calls; /* 0 = 100 */
    uint32_t failure_rate;  /* percent, 1..100; 0 = 50 */
    uint32_t slow_call_rate; /* percent, 1..100; 0 = 100 */
    uint64_t slow_call_ns;  /* a call longer than this is slow (not one
                               exactly this long, as resilience4j); 0 = 60 s */
    uint32_t permitted_in_half_open; /* 0 = 10, <= 8191 */
    uint64_t wait_open_ns;  /* 0 = 60 s */
    /* Growth of the open wait: the n-th consecutive opening waits
     * keel_backoff_delay(open_backoff, n - 1, previous wait). NULL: always
     * wait_open_ns. Needs a base and a cap (> 0, cap >= base). Copied at
     * create. */
    const keel_backoff_opts *open_backoff;
    /* Longest stay in HALF_OPEN before going back to OPEN when trial
     * results do not arrive; 0 = wait for them for ever. */
    uint64_t max_half_open_ns;
    keel_breaker_state_fn on_state; /* called after every transition (a forced
                                       one to the same state too, as it resets
                                       the window), from the thread that made
                                       it; may be NULL */
    void *ud;
    /* Optional: keel_breaker_state{state} and keel_breaker_*_total series
     * labelled breaker=metrics_name (default "default") in this registry. */
    keel_metrics *metrics;
    const char *metrics_name; /* "default" if NULL; taken twice in one registry: KEEL_EEXIST */
} keel_breaker_opts;

typedef struct keel_breaker_stats {
    keel_breaker_state state;
    uint32_t window_calls;  /* calls in the window as of the last result
                               (HALF_OPEN: the trial calls so far) */
    uint32_t window_failed;
    uint32_t window_slow;
    uint64_t failed;        /* failed results recorded, ever */
    uint64_t slow;          /* slow results recorded, ever */
    uint64_t rejected;      /* try_acquire refusals */
    uint64_t transitions;
    uint32_t open_count;    /* consecutive openings (the backoff step) */
} keel_breaker_stats;

/* Returns 0, KEEL_EINVAL (NULL, unknown window kind, values out of range,
 * an open_backoff with an unknown policy, no base or cap, or cap < base) or
 * KEEL_ENOMEM. */
KEEL_API int keel_breaker_create(keel_breaker **out, const keel_breaker_opts *opts);

/* May a call go ahead? 0, or KEEL_EUNAVAIL when the breaker refuses it
 * (OPEN, FORCED_OPEN, or HALF_OPEN with no trial permit left); KEEL_EINVAL
 * for NULL. Every 0 must be followed by keel_breaker_on_result() or
 * keel_breaker_release(). */
KEEL_API int keel_breaker_try_acquire(keel_breaker *b, uint64_t now_ns);

/* The outcome of a call that was let through: how long it took and
 * whether it failed. */
KEEL_API void keel_breaker_on_result(keel_breaker *b, uint64_t now_ns, uint64_t duration_ns,
                                     int failed);

/* A permit taken by try_acquire was not used (the call was never made):
 * gives a HALF_OPEN trial permit back; nothing to do in other states. */
KEEL_API void keel_breaker_release(keel_breaker *b);

KEEL_API keel_breaker_state keel_breaker_state_get(keel_breaker *b);

/* Moves to any state: CLOSED (with an empty window and the open count
 * reset), OPEN (the wait starts at now_ns), HALF_OPEN, DISABLED,
 * FORCED_OPEN. Returns 0 or KEEL_EINVAL. */
KEEL_API int keel_breaker_force(keel_breaker *b, keel_breaker_state to, uint64_t now_ns);

KEEL_API void keel_breaker_stats_get(keel_breaker *b, keel_breaker_stats *st);

/* "closed", "open", "half_open", "disabled", "forced_open"; a static
 * string for every input ("unknown"). */
KEEL_API const char *keel_breaker_state_name(keel_breaker_state s);

/* NULL is a no-op. Must not run concurrently with other calls on b. */
KEEL_API void keel_breaker_destroy(keel_breaker *b);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_BREAKER_H */
