/* keel/lb.h — upstream selection: which of several servers gets the next
 * request.
 *
 * Policies:
 *   KEEL_LB_ROUND_ROBIN   nginx's smooth weighted round robin, exactly: at
 *                         every pick each eligible peer adds its effective
 *                         weight to its current weight, the highest current
 *                         weight wins (the first on a tie) and loses the
 *                         total. Weights {5,1,1} give a a b a c a a.
 *   KEEL_LB_LEAST_CONN    nginx's least_conn: the fewest connections per
 *                         weight (compared by cross-multiplication), ties
 *                         broken by the smooth round robin among them.
 *   KEEL_LB_P2C           power of two choices (Envoy's least request): of
 *                         two random eligible peers, the one with fewer
 *                         requests in flight; with unequal weights, the
 *                         higher weight / (active + 1)^bias, the two drawn
 *                         (independently, O(1) from an alias table) so
 *                         that with nothing in flight each peer gets its
 *                         weight's share of the picks, as in Envoy; a DOWN
 *                         peer's share goes to the others by weight (and
 *                         weights equal but for DOWN peers' are equal).
 *                         The shares of peers failed out, ejected, at
 *                         max_conns or tried are not spread that way:
 *                         draws landing on them are drawn again (8 at
 *                         most, then a scan finds a second peer to
 *                         compare), which favours the heavier of the
 *                         rest. The same peer drawn twice is a pick of
 *                         it, however busy.
 *   KEEL_LB_PEAK_EWMA     Finagle's peak EWMA: of two random peers, the
 *                         lower latency estimate x (active + 1), where the
 *                         estimate jumps to any higher latency at once and
 *                         decays towards lower ones with time constant tau.
 *                         As in Finagle, comparing two peers decays and
 *                         keeps each one's estimate, so a result is
 *                         compared with the decayed value (100 ms, 30 s
 *                         idle, a pick: 4.98 ms; then 50 ms gives 50 ms).
 *                         Weights play no part; every pick reads the clock.
 *
 * Passive health, nginx's semantics exactly: a failure counts against a
 * peer and lowers its effective weight by weight / max_fails (it grows back
 * by one per pick); a peer with fails >= max_fails is skipped until
 * fail_timeout has passed since it was last checked, then gets one probe
 * per fail_timeout; a success resets the count only when the peer has
 * been picked as a probe since its last failure, whichever pick the
 * success came from, as in nginx (a success inside the window keeps the
 * count); a lone peer (the only one in the lb, a primary or a backup
 * whose primaries were removed) is never skipped for failures. When every
 * primary is unavailable the BACKUP peers are used; when they are too,
 * pick returns KEEL_EUNAVAIL. (No "quick recovery" of all peers: nginx
 * removed it in 1.11.5.)
 *
 * Outlier ejection, Envoy's consecutive-failures detector: after
 * eject_consecutive failures in a row a peer is ejected for
 * eject_base x (its number of ejections), at most eject_max; never more
 * than eject_max_percent of the peers at once (but at least one); the
 * number of ejections grows only while eject_base x it < eject_max +
 * eject_base (it stops at eject_max / eject_base + 1) and decays by one
 * per eject_decay spent healthy. The count of consecutive failures starts
 * over at an ejection, at one the percentage refused, and when an
 * ejection ends.
 * Ejection alone never leaves nothing to pick: a lone peer is never
 * ejected, and when every peer a pick could take is ejected it takes them
 * as if they were not (primaries first, then backups; DOWN, max_fails,
 * max_conns and `tried` still count), as Envoy's panic routing does at
 * zero healthy.
 *
 * Thread safety: every function is thread-safe except destroy; peers may
 * be added and removed while other threads pick. ROUND_ROBIN and
 * LEAST_CONN keep shared rotation state and pick under a short lock; P2C
 * and PEAK_EWMA pick without one, so for them max_conns and the one probe
 * per fail_timeout are approximate under concurrent picks (two threads
 * may both take a peer's last connection or its probe). Nothing blocks.
 */
#ifndef KEEL_LB_H
#define KEEL_LB_H

#include <keel/common.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct keel_lb keel_lb;
typedef struct keel_lb_peer keel_lb_peer;

typedef enum keel_lb_policy {
    KEEL_LB_ROUND_ROBIN = 0,
    KEEL_LB_LEAST_CONN = 1,
    KEEL_LB_P2C = 2,
    KEEL_LB_PEAK_EWMA = 3
} keel_lb_policy;

/* Peer flags. */
#define KEEL_LB_BACKUP 1u /* used only when no primary is available */
#define KEEL_LB_DOWN 2u   /* administratively down: never picked */

/* max_fails value that turns failure accounting off (nginx max_fails=0). */
#define KEEL_LB_NO_MAX_FAILS UINT32_MAX

typedef struct keel_lb_opts {
    keel_lb_policy policy;
    uint32_t max_fails;       /* default per peer; 0 = 1 (nginx) */
    uint64_t fail_timeout_ns; /* default per peer; 0 = 10 s (nginx) */
    double p2c_bias;          /* P2C weighted exponent, at most 64; 0 = 1.0 */
    uint64_t ewma_tau_ns;     /* PEAK_EWMA decay; 0 = 10 s */
    uint32_t eject_consecutive; /* 0 = no outlier ejection (Envoy: 5) */
    uint64_t eject_base_ns;   /* 0 = 30 s */
    uint64_t eject_max_ns;    /* 0 = 300 s */
    uint32_t eject_max_percent; /* 0 = 10 */
    uint64_t eject_decay_ns;  /* 0 = 10 s */
    keel_clock_fn clock;      /* NULL = keel_now_ns */
    void *clock_ud;
    keel_rand_fn rand;        /* NULL = keel_rand_u64 */
    void *rand_ud;
    /* Optional: per-peer keel_lb_peer_* series labelled lb=metrics_name
     * (default "default") and peer=<peer name, or its id> in this
     * registry. */
    keel_metrics *metrics;
    const char *metrics_name; /* "default" if NULL; create does not check it:
                                 a peer name that already has series under
                                 it (in this lb or another) is KEEL_EEXIST
                                 from keel_lb_add() */
} keel_lb_opts;

typedef struct keel_lb_peer_opts {
    const char *name;         /* copied; for logs and stats; may be NULL */
    uint32_t weight;          /* 0 = 1; at most 1000000 */
    unsigned flags;           /* KEEL_LB_BACKUP, KEEL_LB_DOWN */
    uint32_t max_fails;       /* 0 = the lb's */
    uint64_t fail_timeout_ns; /* 0 = the lb's */
    uint32_t max_conns;       /* 0 = no limit (nginx max_conns) */
    void *ud;
} keel_lb_peer_opts;

/* The peers a request has tried, so that its retries go elsewhere (nginx's
 * "tried" bitmap). Zero it per request; it remembers up to 16 peers. */
typedef struct keel_lb_tried {
    uint32_t n;
    uint32_t ids[16];
} keel_lb_tried;

typedef struct keel_lb_peer_stats {
    const char *name;
    uint32_t weight;
    int64_t effective_weight, current_weight;
    uint32_t fails;    /* failures counted against max_fails */
    uint32_t conns;    /* picks not yet done */
    uint32_t consecutive_failures;
    uint32_t ejections; /* the ejection multiplier: capped; the decay for time
                         * spent healthy is applied at the next ejection */
    int ejected;       /* ejected now */
    int available;     /* would be considered by a pick now */
    double ewma_ns;    /* PEAK_EWMA latency estimate, decayed to now (reading
                          it changes nothing) */
    uint64_t picks, failures;
} keel_lb_peer_stats;

/* Returns 0, KEEL_EINVAL (NULL, unknown policy, bias < 0, > 64 or NaN,
 * percent > 100) or KEEL_ENOMEM. */
KEEL_API int keel_lb_create(keel_lb **out, const keel_lb_opts *opts);

/* Adds a peer; *peer (may be NULL) receives its handle. Peers keep the
 * order of addition, which breaks ties. Returns 0, KEEL_EINVAL (weight out
 * of range, unknown flags), KEEL_EEXIST (with metrics: a peer name already
 * in this lb), KEEL_ESTATE (called inside one of libkeel's own read
 * sections, where it would wait for itself: a guard, since no callback of
 * libkeel runs in one) or KEEL_ENOMEM. */
KEEL_API int keel_lb_add(keel_lb *lb, const keel_lb_peer_opts *opts, keel_lb_peer **peer);

/* Removes a peer: no later pick returns it. A pick still in flight may
 * finish with keel_lb_done(); the handle stays valid for that. Returns 0,
 * KEEL_EINVAL, KEEL_ENOTFOUND (not a peer of this lb, or removed: the
 * handle is checked by address, never dereferenced), KEEL_ESTATE (inside
 * a read section, as for add) or KEEL_ENOMEM (the peer stays, with its
 * series). */
KEEL_API int keel_lb_remove(keel_lb *lb, keel_lb_peer *peer);

/* Marks a peer administratively down (1) or up (0). Returns 0, KEEL_EINVAL,
 * KEEL_ENOTFOUND (not a peer of this lb), KEEL_ESTATE (inside a read
 * section, as for add) or KEEL_ENOMEM. */
KEEL_API int keel_lb_set_down(keel_lb *lb, keel_lb_peer *peer, int down);

/* Picks a peer for a request, skipping those in *tried (may be NULL) and
 * adding the choice to it. Returns 0, KEEL_EUNAVAIL when no peer is
 * available, KEEL_EINVAL, or KEEL_ENOMEM (a thread's first pick registers
 * the thread with libkeel's read sections, from a reserve of 32 places
 * when memory has run out: only with that held too). Each success must be
 * ended with keel_lb_done(). Never blocks. */
KEEL_API int keel_lb_pick(keel_lb *lb, keel_lb_tried *tried, keel_lb_peer **peer);

/* Ends a pick: whether the request succeeded and how long it took (for
 * PEAK_EWMA; 0 if unknown). A failure feeds max_fails and the outlier
 * detector. Returns 0, KEEL_EINVAL, or KEEL_ESTATE when no pick of the
 * peer is in flight (a second done() for one pick). */
KEEL_API int keel_lb_done(keel_lb *lb, keel_lb_peer *peer, int ok, uint64_t latency_ns);

KEEL_API void *keel_lb_peer_ud(const keel_lb_peer *peer);
KEEL_API const char *keel_lb_peer_name(const keel_lb_peer *peer);

/* A snapshot of one peer's counters and health. Returns 0, KEEL_EINVAL, or
 * KEEL_ENOTFOUND for a peer not in the lb (removed ones included). */
KEEL_API int keel_lb_peer_stats_get(keel_lb *lb, keel_lb_peer *peer, keel_lb_peer_stats *st);

/* Peers in the lb now (primaries and backups). */
KEEL_API size_t keel_lb_count(keel_lb *lb);

/* Frees the lb and its peers. NULL is a no-op. Must not run concurrently
 * with other calls on lb; picks still in flight are abandoned. */
KEEL_API void keel_lb_destroy(keel_lb *lb);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_LB_H */
