/* lib/lb.c — upstream selection: nginx round robin and least_conn, P2C,
 * peak EWMA; nginx passive health; Envoy outlier ejection.
 *
 * The peer lists (primaries, then backups) are immutable snapshots read
 * under RCU and replaced by add/remove/set_down. Round robin and
 * least_conn mutate rotation state at every pick, so they pick under
 * lb->mu, as nginx does inside one worker; that state lives in arrays of
 * the snapshot (carried over to the next one), so that the common pick is
 * a tight loop over three arrays. P2C and peak EWMA pick without a lock.
 *
 * Fast paths: while no peer has a failure on record or is ejected
 * (lb->suspect == 0), the snapshot has no DOWN or max_conns peer, and the
 * request has tried nothing, every primary is available and no clock is
 * needed, so a pick skips the health checks. Any failure sends every pick
 * through the full checks until the failure is forgiven.
 *
 * A removed peer leaves the snapshots at once; its memory is freed by a
 * later add/remove (or destroy) once no pick is in flight on it, so that a
 * handle returned by pick stays valid until keel_lb_done().
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <keel/lb.h>
#include <keel/metrics.h>

#include "internal.h"
#include "rcu.h"

#define NS 1000000000ull
#define MAX_WEIGHT 1000000u

struct keel_lb_peer {
    keel_lb *lb;
    uint32_t id;
    char *name;
    void *ud;
    uint32_t weight, max_fails, max_conns;
    uint64_t fail_timeout;
    _Atomic unsigned flags;
    bool backup;            /* fixed at add */
    _Atomic bool removed;   /* its late results change nothing shared */
    uint32_t slot; /* index in the current snapshot; under lb->mu */
    struct keel_lb_peer *next_dead;

    /* nginx passive health */
    _Atomic uint32_t fails;
    _Atomic uint64_t accessed, checked;
    _Atomic uint32_t conns;
    _Atomic uint64_t picks, failures;
    /* Envoy outlier ejection */
    _Atomic uint32_t consecutive;
    _Atomic uint64_t ejected_until; /* 0 = not ejected */
    uint32_t ejections;             /* under lk */
    uint64_t healthy_since;         /* under lk */
    /* Finagle peak EWMA, under lk */
    atomic_flag lk;
    double ewma;
    uint64_t ewma_stamp;
};

typedef struct snap {
    size_t n, nb;          /* primaries, backups */
    keel_lb_peer **peers;  /* primaries, then backups */
    int64_t *cur, *eff;    /* nginx rotation state, under lb->mu */
    int64_t *w;            /* weights, as int64 for the arithmetic */
    uint32_t *ord;         /* weighted P2C draws, per group (primaries, */
    uint64_t *cum;         /* backups): see draw_table() */
    bool equal_weights;    /* among primaries */
    bool simple;           /* no DOWN, no max_conns among primaries */
} snap;

struct keel_lb {
    keel_lb_policy policy;
    bool locked; /* round robin and least_conn pick under mu */
    uint32_t max_fails;
    uint64_t fail_timeout;
    double bias;
    double tau;
    uint32_t eject_consecutive, eject_pct;
    uint64_t eject_base, eject_max, eject_decay;
    keel__clock clock;
    keel__rand rand;
    _Atomic(snap *) cur;
    pthread_mutex_t mu;  /* rotation state, and the scratch below */
    bool *ok, *tie;      /* per-pick marks for round robin / least_conn */
    uint64_t *cc;        /* least_conn: the conns read by the first pass */
    pthread_mutex_t wmu; /* writers: add, remove, set_down, sweep */
    uint32_t next_id;
    keel_lb_peer *dead;  /* removed, waiting for their last done() */
    _Atomic uint32_t nejected;
    _Atomic uint32_t npeers;  /* peers now, for the ejection percentage */
    _Atomic uint32_t suspect; /* primaries with failures on record or ejected */
    keel_metrics *metrics;
    char *metrics_name;
};

/* suspect counts primaries only: a failing backup must not slow the fast
 * path, which never looks at backups. */
static void suspect_add(keel_lb *lb, keel_lb_peer *p, int d)
{
    if (!p->backup)
        atomic_fetch_add(&lb->suspect, (uint32_t)d);
}

static void lk_lock(keel_lb_peer *p)
{
    while (atomic_flag_test_and_set_explicit(&p->lk, memory_order_acquire))
        sched_yield();
}
static void lk_unlock(keel_lb_peer *p) { atomic_flag_clear_explicit(&p->lk, memory_order_release); }

/* ---- health ---- */

static bool tried_has(const keel_lb_tried *t, uint32_t id)
{
    for (uint32_t i = 0; t && i < t->n && i < 16; i++)
        if (t->ids[i] == id)
            return true;
    return false;
}

static void tried_add(keel_lb_tried *t, uint32_t id)
{
    if (t && t->n < 16)
        t->ids[t->n++] = id;
}

/* Ends an ejection whose time is up. Returns whether p is ejected now. */
static bool ejected(keel_lb *lb, keel_lb_peer *p, uint64_t now)
{
    uint64_t until = atomic_load_explicit(&p->ejected_until, memory_order_acquire);
    if (until == 0)
        return false;
    if (now < until)
        return true;
    if (atomic_compare_exchange_strong(&p->ejected_until, &until, 0)) {
        /* Envoy: failures of picks that ended while it was out start over */
        atomic_store(&p->consecutive, 0);
        lk_lock(p);
        p->healthy_since = until;
        lk_unlock(p);
        atomic_fetch_sub(&lb->nejected, 1);
        suspect_add(lb, p, -1);
    }
    return false;
}

/* nginx: skipped while fails >= max_fails within fail_timeout of the last
 * check. `single`: a group of one is never skipped for failures or
 * ejection. `panic`: ejection is ignored (see keel_lb_pick). */
static bool available(keel_lb *lb, keel_lb_peer *p, const keel_lb_tried *t, uint64_t now,
                      bool single, bool panic)
{
    if ((atomic_load_explicit(&p->flags, memory_order_relaxed) & KEEL_LB_DOWN) ||
        tried_has(t, p->id))
        return false;
    uint64_t checked = atomic_load_explicit(&p->checked, memory_order_relaxed);
    if (!single && p->max_fails != KEEL_LB_NO_MAX_FAILS &&
        atomic_load_explicit(&p->fails, memory_order_relaxed) >= p->max_fails &&
        (now < checked || now - checked <= p->fail_timeout)) /* another thread's newer check */
        return false;
    if (p->max_conns && atomic_load_explicit(&p->conns, memory_order_relaxed) >= p->max_conns)
        return false;
    bool out = ejected(lb, p, now); /* first: a lone peer's ejection ends on time too */
    return single || panic || !out;
}

/* The probe: a pick after fail_timeout moves `checked`, so that this
 * pick's success may reset the failure count. Only matters to a peer with
 * failures on record, so the fast paths skip it. */
static void probe(keel_lb_peer *p, uint64_t now)
{
    uint64_t c = atomic_load_explicit(&p->checked, memory_order_relaxed);
    if (now > c && now - c > p->fail_timeout)
        atomic_compare_exchange_strong(&p->checked, &c, now);
}

/* ---- nginx round robin and least_conn (caller holds lb->mu) ---- */

/* Adds one round of effective weights over [from, to) of the candidates
 * marked in `ok` (NULL: all, the fast path), returns the winner (first on
 * a tie) after taking the total off it, or -1. One loop over three plain
 * arrays: about 1 ns a peer. */
static long rr_round(snap *s, size_t from, size_t to, const bool *ok)
{
    int64_t total = 0, best_cur = 0;
    long best = -1;
    for (size_t i = from; i < to; i++) {
        if (ok && !ok[i - from])
            continue;
        s->cur[i] += s->eff[i];
        total += s->eff[i];
        if (s->eff[i] < s->w[i])
            s->eff[i]++;
        if (best < 0 || s->cur[i] > best_cur) {
            best = (long)i;
            best_cur = s->cur[i];
        }
    }
    if (best >= 0)
        s->cur[best] -= total;
    return best;
}

/* The fast path of rr_round, when every primary is available: the same
 * arithmetic on local, non-aliasing pointers, about 0.8 ns a peer. */
static long rr_all(int64_t *restrict cur, int64_t *restrict eff, const int64_t *restrict w,
                   size_t n)
{
    int64_t total = 0, best_cur = INT64_MIN;
    size_t best = 0;
    for (size_t i = 0; i < n; i++) {
        int64_t c = cur[i] + eff[i];
        cur[i] = c;
        total += eff[i];
        eff[i] += eff[i] < w[i];
        if (c > best_cur) {
            best_cur = c;
            best = i;
        }
    }
    cur[best] -= total;
    return (long)best;
}

/* Reads each peer's conns once (into cc): done() changes them without the
 * lock, and the tie pass must see what the first pass saw. */
static long lc_pick(snap *s, size_t from, size_t to, const bool *ok, bool *tie, uint64_t *cc)
{
    long best = -1;
    uint64_t bc = 0;
    bool many = false;
    for (size_t i = from; i < to; i++) {
        if (ok && !ok[i - from])
            continue;
        uint64_t c = cc[i - from] = atomic_load_explicit(&s->peers[i]->conns, memory_order_relaxed);
        if (best < 0 || c * (uint64_t)s->w[best] < bc * (uint64_t)s->w[i]) {
            best = (long)i;
            bc = c;
            many = false;
        } else if (c * (uint64_t)s->w[best] == bc * (uint64_t)s->w[i]) {
            many = true;
        }
    }
    if (best < 0 || !many)
        return best;
    /* Several with the same load: smooth round robin among them. */
    for (size_t i = from; i < to; i++)
        tie[i - from] = (!ok || ok[i - from]) && i >= (size_t)best &&
                        cc[i - from] * (uint64_t)s->w[best] == bc * (uint64_t)s->w[i];
    return rr_round(s, from, to, tie);
}

/* ---- P2C and peak EWMA (no lock) ---- */

/* The estimate decayed to now, without storing it: for stats, which must
 * not change what later results are compared with. */
static double ewma_now(keel_lb *lb, keel_lb_peer *p, uint64_t now)
{
    lk_lock(p);
    double e = p->ewma;
    uint64_t stamp = p->ewma_stamp;
    lk_unlock(p);
    if (now > stamp && e > 0)
        e *= exp(-(double)(now - stamp) / lb->tau);
    return e;
}

/* Finagle's PeakEwma observe(rtt): a higher rtt replaces the estimate at
 * once, a lower one is blended in with weight 1 - exp(-td / tau), td the
 * time since the last observation. A pick's look at a peer is observe(0),
 * as in Finagle's load: it stores the decay, so that a result is compared
 * with the estimate as of that look, not with an older peak. Time never
 * goes back here: another thread may have observed at a later now. */
static double ewma_observe(keel_lb *lb, keel_lb_peer *p, uint64_t now, double rtt)
{
    lk_lock(p);
    uint64_t td = now > p->ewma_stamp ? now - p->ewma_stamp : 0;
    if (rtt > p->ewma) {
        p->ewma = rtt;
    } else if (td && p->ewma > 0) {
        double w = exp(-(double)td / lb->tau);
        p->ewma = p->ewma * w + rtt * (1 - w);
    }
    if (td)
        p->ewma_stamp = now;
    double e = p->ewma;
    lk_unlock(p);
    return e;
}

/* Whether b is a better choice than a (strictly). */
static bool p2c_better(keel_lb *lb, keel_lb_peer *b, keel_lb_peer *a, uint64_t now, bool equal)
{
    uint64_t ca = atomic_load_explicit(&a->conns, memory_order_relaxed);
    uint64_t cb = atomic_load_explicit(&b->conns, memory_order_relaxed);
    if (lb->policy == KEEL_LB_PEAK_EWMA) {
        /* cost = estimate x (active + 1); no estimate yet but busy:
         * Finagle's penalty */
        double ea = ewma_observe(lb, a, now, 0), eb = ewma_observe(lb, b, now, 0);
        double xa = ea == 0 && ca ? 1e18 + (double)ca : ea * (double)(ca + 1);
        double xb = eb == 0 && cb ? 1e18 + (double)cb : eb * (double)(cb + 1);
        return xb < xa;
    }
    if (equal)
        return cb < ca;
    if (lb->bias == 1.0) /* weight / (active + 1), cross-multiplied */
        return (uint64_t)b->weight * (ca + 1) > (uint64_t)a->weight * (cb + 1);
    return b->weight / pow((double)(cb + 1), lb->bias) > a->weight / pow((double)(ca + 1), lb->bias);
}

/* One weighted draw over [from, to), from draw_table()'s: the high half
 * of r x n picks the bucket, the low half (uniform in steps of n) tosses
 * its coin. */
static long draw(keel_lb *lb, const snap *s, size_t from, size_t to)
{
    unsigned __int128 x = (unsigned __int128)keel__rand_next(&lb->rand) * (to - from);
    size_t i = from + (size_t)(x >> 64);
    return (uint64_t)x < s->cum[i] ? (long)i : (long)s->ord[i];
}

static long p2c_pick(keel_lb *lb, snap *s, size_t from, size_t to, const keel_lb_tried *t,
                     uint64_t now, bool fast, bool panic)
{
    size_t n = to - from;
    if (n == 0)
        return -1;
    long c[2] = {-1, -1};
    /* equal_weights is about the primaries; backups alone also start at 0 */
    bool equal = from == 0 && to == s->n && s->equal_weights;
    if (lb->policy == KEEL_LB_P2C && !equal) {
        /* weighted: two independent draws (the same peer twice is a pick
         * of it), the first two available ones; when 8 find fewer, the
         * probes and scan below look for the rest, so that one found is
         * still compared with another */
        for (int tries = 0; tries < 8 && c[1] < 0; tries++) {
            long i = draw(lb, s, from, to);
            if (fast || available(lb, s->peers[i], t, now, false, panic))
                c[c[0] < 0 ? 0 : 1] = i;
        }
    }
    if (c[1] >= 0) {
        /* drawn */
    } else if (fast && c[0] < 0) { /* all available: two distinct random peers */
        c[0] = (long)(from + keel__rand_upto(&lb->rand, n - 1));
        if (n > 1) {
            size_t j = keel__rand_upto(&lb->rand, n - 2);
            c[1] = (long)(from + j + (from + j >= (size_t)c[0]));
        }
    } else {
        /* random probes first (O(1) when most are available)... */
        for (int tries = 0; tries < 8 && c[1] < 0; tries++) {
            size_t i = from + keel__rand_upto(&lb->rand, n - 1);
            if ((long)i != c[0] && available(lb, s->peers[i], t, now, false, panic))
                c[c[0] < 0 ? 0 : 1] = (long)i;
        }
        if (c[1] < 0) { /* ...then an honest scan from a random start */
            size_t start = keel__rand_upto(&lb->rand, n - 1);
            for (size_t k = 0; k < n && c[1] < 0; k++) {
                size_t i = from + (start + k) % n;
                if ((long)i != c[0] && available(lb, s->peers[i], t, now, false, panic))
                    c[c[0] < 0 ? 0 : 1] = (long)i;
            }
        }
    }
    if (c[1] < 0)
        return c[0];
    return p2c_better(lb, s->peers[c[1]], s->peers[c[0]], now, equal) ? c[1] : c[0];
}

/* ---- pick / done ---- */

/* A pick among peers [from, to) of s, checking each one's health. */
static long pick_checked(keel_lb *lb, snap *s, size_t from, size_t to, const keel_lb_tried *t,
                         uint64_t now, bool panic)
{
    size_t n = to - from;
    if (n == 0)
        return -1;
    /* nginx: a lone peer is never failed out; a backup left alone (its
     * primaries removed) is as lone, or one failure would leave nothing */
    if (s->n + s->nb == 1) {
        if (!available(lb, s->peers[0], t, now, true, panic))
            return -1;
        if (lb->policy == KEEL_LB_ROUND_ROBIN && s->eff[0] < s->w[0]) /* as rr_all() does */
            s->eff[0]++;
        return 0;
    }
    if (!lb->locked)
        return p2c_pick(lb, s, from, to, t, now, false, panic);
    for (size_t i = 0; i < n; i++)
        lb->ok[i] = available(lb, s->peers[from + i], t, now, false, panic);
    return lb->policy == KEEL_LB_ROUND_ROBIN ? rr_round(s, from, to, lb->ok)
                                             : lc_pick(s, from, to, lb->ok, lb->tie, lb->cc);
}

KEEL_API int keel_lb_pick(keel_lb *lb, keel_lb_tried *tried, keel_lb_peer **out)
{
    if (!lb || !out)
        return KEEL_EINVAL;
    *out = NULL;
    int rc = keel__rcu_read_lock();
    if (rc)
        return rc;
    if (lb->locked)
        pthread_mutex_lock(&lb->mu);
    snap *s = atomic_load_explicit(&lb->cur, memory_order_acquire);
    bool fast = s->simple && s->n > 0 && (!tried || tried->n == 0) &&
                atomic_load_explicit(&lb->suspect, memory_order_relaxed) == 0;
    uint64_t now = 0;
    long at;
    if (fast && lb->policy != KEEL_LB_PEAK_EWMA) { /* no clock needed */
        if (lb->policy == KEEL_LB_ROUND_ROBIN)
            at = rr_all(s->cur, s->eff, s->w, s->n);
        else if (lb->policy == KEEL_LB_LEAST_CONN)
            at = lc_pick(s, 0, s->n, NULL, lb->tie, lb->cc);
        else
            at = p2c_pick(lb, s, 0, s->n, NULL, 0, true, false);
    } else {
        now = keel__clock_now(&lb->clock);
        at = fast ? p2c_pick(lb, s, 0, s->n, NULL, now, true, false)
                  : pick_checked(lb, s, 0, s->n, tried, now, false);
        if (at < 0)
            at = pick_checked(lb, s, s->n, s->n + s->nb, tried, now, false);
        /* Envoy's panic routing, at zero healthy only: when ejection alone
         * leaves nothing to pick, the ejected peers are picked as if they
         * were not, primaries first. Failures (max_fails), DOWN, max_conns
         * and `tried` still count. */
        if (at < 0 && atomic_load_explicit(&lb->nejected, memory_order_relaxed)) {
            at = pick_checked(lb, s, 0, s->n, tried, now, true);
            if (at < 0)
                at = pick_checked(lb, s, s->n, s->n + s->nb, tried, now, true);
        }
    }
    keel_lb_peer *p = at >= 0 ? s->peers[at] : NULL;
    if (p) {
        if (!fast)
            probe(p, now);
        atomic_fetch_add_explicit(&p->conns, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&p->picks, 1, memory_order_relaxed);
        tried_add(tried, p->id);
    }
    if (lb->locked)
        pthread_mutex_unlock(&lb->mu);
    keel__rcu_read_unlock();
    *out = p;
    return p ? 0 : KEEL_EUNAVAIL;
}

/* Envoy's consecutive-failures detector. Caller holds p->lk. */
static void maybe_eject(keel_lb *lb, keel_lb_peer *p, uint64_t now)
{
    if (atomic_load(&p->consecutive) < lb->eject_consecutive || atomic_load(&p->ejected_until) != 0)
        return;
    /* Ejections end lazily, when a pick looks at the peer: end the expired
     * ones now, or they would count against the percentage. Rare path. */
    if (atomic_load(&lb->nejected) && keel__rcu_read_lock() == 0) {
        snap *s = atomic_load_explicit(&lb->cur, memory_order_acquire);
        for (size_t i = 0; i < s->n + s->nb; i++)
            if (s->peers[i] != p)
                ejected(lb, s->peers[i], now);
        keel__rcu_read_unlock();
    }
    uint32_t npeers = atomic_load_explicit(&lb->npeers, memory_order_relaxed);
    uint32_t ej = atomic_load(&lb->nejected);
    do { /* never more than the percentage, but always at least one */
        if (ej > 0 && (uint64_t)(ej + 1) * 100 > (uint64_t)lb->eject_pct * npeers) {
            atomic_store(&p->consecutive, 0); /* Envoy: reset after ejectHost(), refused or not */
            return;
        }
    } while (!atomic_compare_exchange_weak(&lb->nejected, &ej, ej + 1));
    if (p->ejections && p->healthy_since && now > p->healthy_since) { /* decay while healthy */
        uint64_t steps = (now - p->healthy_since) / lb->eject_decay;
        p->ejections = steps >= p->ejections ? 0 : p->ejections - (uint32_t)steps;
    }
    /* Envoy's ejectHost(): the multiplier grows only while base x it <
     * max + base (that is, base x (it - 1) < max), so it stops at about
     * max / base + 1 and a peer that recovers decays from there. */
    if (p->ejections == 0 ||
        (p->ejections < UINT32_MAX && p->ejections - 1 <= (lb->eject_max - 1) / lb->eject_base))
        p->ejections++;
    uint64_t span = p->ejections > lb->eject_max / lb->eject_base ? lb->eject_max
                                                                   : lb->eject_base * p->ejections;
    atomic_store(&p->consecutive, 0);
    suspect_add(lb, p, 1);
    atomic_store_explicit(&p->ejected_until, keel__sat_add(now, span),
                          memory_order_release);
}

static void on_failure(keel_lb *lb, keel_lb_peer *p, uint64_t now, bool alone)
{
    atomic_fetch_add_explicit(&p->failures, 1, memory_order_relaxed);
    if (alone) /* nginx keeps no accounting for a lone peer; an ejection would be ignored */
        return;
    if (p->max_fails != KEEL_LB_NO_MAX_FAILS) { /* nginx */
        atomic_store(&p->accessed, now);
        atomic_store(&p->checked, now);
        uint32_t f = atomic_load(&p->fails); /* saturating: never wraps to 0 */
        while (f < UINT32_MAX && !atomic_compare_exchange_weak(&p->fails, &f, f + 1))
            ;
        if (f == 0)
            suspect_add(lb, p, 1);
        if (lb->locked) {
            pthread_mutex_lock(&lb->mu);
            snap *s = atomic_load_explicit(&lb->cur, memory_order_relaxed);
            if (p->slot < s->n + s->nb && s->peers[p->slot] == p) {
                s->eff[p->slot] -= p->weight / p->max_fails;
                if (s->eff[p->slot] < 0)
                    s->eff[p->slot] = 0;
            }
            pthread_mutex_unlock(&lb->mu);
        }
    }
    if (lb->eject_consecutive) { /* Envoy */
        atomic_fetch_add(&p->consecutive, 1);
        lk_lock(p);
        maybe_eject(lb, p, now);
        lk_unlock(p);
    }
}

/* Whether p is the lb's only peer (nginx keeps no failure accounting for
 * it, and never fails it out): a member and one peer in all, a primary or
 * a backup. From the count, not a read section, which could find no
 * memory. */
static bool alone(keel_lb *lb, keel_lb_peer *p)
{
    return atomic_load(&lb->npeers) == 1 && !atomic_load(&p->removed);
}

KEEL_API int keel_lb_done(keel_lb *lb, keel_lb_peer *p, int ok, uint64_t latency)
{
    if (!lb || !p || p->lb != lb)
        return KEEL_EINVAL;
    uint32_t c = atomic_load_explicit(&p->conns, memory_order_relaxed);
    if (c == 0)
        return KEEL_ESTATE; /* no pick in flight on it: a second done() */
    bool ewma = lb->policy == KEEL_LB_PEAK_EWMA && latency;
    uint64_t now = ewma || !ok ? keel__clock_now(&lb->clock) : 0;
    if (atomic_load(&p->removed)) {
        /* gone: its late result must not count against anything shared */
    } else if (ok) {
        /* nginx: a success resets the count only when its pick came after
         * a check that followed the last failure */
        if (atomic_load_explicit(&p->fails, memory_order_relaxed) &&
            atomic_load(&p->accessed) < atomic_load(&p->checked) && atomic_exchange(&p->fails, 0))
            suspect_add(lb, p, -1);
        if (atomic_load_explicit(&p->consecutive, memory_order_relaxed))
            atomic_store(&p->consecutive, 0);
    } else {
        on_failure(lb, p, now, alone(lb, p));
    }
    if (ewma)
        ewma_observe(lb, p, now, (double)latency);
    /* The last touch: after it a removed peer may be freed. */
    while (c > 0 && !atomic_compare_exchange_weak_explicit(&p->conns, &c, c - 1, memory_order_release,
                                                           memory_order_relaxed))
        ;
    return c > 0 ? 0 : KEEL_ESTATE;
}

/* ---- peers ---- */

static void snap_free(snap *s)
{
    if (s) {
        keel__free(s->peers);
        keel__free(s->cur);
        keel__free(s->eff);
        keel__free(s->w);
        keel__free(s->ord);
        keel__free(s->cum);
        keel__free(s);
    }
}

static snap *snap_new(size_t total)
{
    snap *s = keel__calloc(1, sizeof *s);
    size_t m = total ? total : 1;
    if (s) {
        s->peers = keel__calloc(m, sizeof *s->peers);
        s->cur = keel__calloc(m, sizeof *s->cur);
        s->eff = keel__calloc(m, sizeof *s->eff);
        s->w = keel__calloc(m, sizeof *s->w);
        s->ord = keel__calloc(m, sizeof *s->ord);
        s->cum = keel__calloc(m, sizeof *s->cum);
    }
    if (!s || !s->peers || !s->cur || !s->eff || !s->w || !s->ord || !s->cum) {
        snap_free(s);
        return NULL;
    }
    return s;
}

static void peer_free(keel_lb_peer *p)
{
    keel__free(p->name);
    keel__free(p);
}

/* Frees removed peers that no pick holds any more. Caller holds lb->wmu,
 * after the grace period of their removal. */
static void sweep(keel_lb *lb)
{
    for (keel_lb_peer **pp = &lb->dead; *pp;) {
        keel_lb_peer *p = *pp;
        if (atomic_load_explicit(&p->conns, memory_order_acquire) == 0) {
            *pp = p->next_dead;
            /* a done() that raced the removal may have counted it again */
            if (atomic_exchange(&p->ejected_until, 0)) {
                atomic_fetch_sub(&lb->nejected, 1);
                suspect_add(lb, p, -1);
            }
            if (atomic_exchange(&p->fails, 0))
                suspect_add(lb, p, -1);
            peer_free(p);
        } else {
            pp = &p->next_dead;
        }
    }
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* The table of weighted P2C's draws over peers [from, to) of s. Two
 * candidates drawn at random, the one of higher weight / (active + 1)^bias
 * wins; at rest that is the heavier, so each peer must be drawn with a
 * probability that makes the heavier of two draws come out in proportion
 * to weight (Envoy's weighted least request spreads by weight; uniform
 * draws gave {100,1,1} 67/17/17%). With peers sorted by weight, heaviest
 * first, the winner is among the first k when either draw is: so the
 * first k must have mass Q_k = 1 - sqrt(1 - W_k / W), W_k their weight.
 * Peers of equal weight share their group's mass equally (a tie goes to
 * the first draw, uniform within the group). The masses go into an alias
 * table (Vose), for draws in O(1): bucket i keeps peer from + i with
 * probability cum[i] / 2^64, else gives ord[i]. `mass` and `stk` are
 * scratch of to - from places. */
static void draw_table(snap *s, size_t from, size_t to, double *mass, uint32_t *stk)
{
    size_t n = to - from;
    if (n == 0)
        return;
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++) { /* heaviest first, then in order (cum as scratch) */
        s->cum[from + i] = (uint64_t)(MAX_WEIGHT - (uint64_t)s->w[from + i]) << 32 | i;
        total += (uint64_t)s->w[from + i];
    }
    uint64_t *key = s->cum + from;
    qsort(key, n, sizeof *key, cmp_u64);
    uint64_t wk = 0;
    double q0 = 0;
    for (size_t g = 0; g < n;) { /* one group of equal weight: [g, e) */
        uint64_t w = MAX_WEIGHT - (key[g] >> 32);
        size_t e = g;
        while (e < n && key[e] >> 32 == key[g] >> 32)
            e++, wk += w;
        double q1 = e == n ? 1.0 : 1.0 - sqrt(1.0 - (double)wk / (double)total);
        for (size_t i = g; i < e; i++)
            mass[(uint32_t)key[i]] = (q1 - q0) / (double)(e - g) * (double)n;
        q0 = q1;
        g = e;
    }
    size_t ns = 0, nl = n; /* small ones from the front of stk, large from the back */
    for (uint32_t i = 0; i < n; i++)
        stk[mass[i] < 1.0 ? ns++ : --nl] = i;
    while (ns > 0 && nl < n) {
        uint32_t a = stk[--ns], b = stk[nl++];
        s->cum[from + a] = (uint64_t)(mass[a] * 0x1p64); /* mass < 1: fits */
        s->ord[from + a] = (uint32_t)(from + b);
        mass[b] -= 1.0 - mass[a];
        stk[mass[b] < 1.0 ? ns++ : --nl] = b;
    }
    while (ns > 0) /* rounding leaves these at about 1 */
        s->cum[from + stk[--ns]] = UINT64_MAX;
    while (nl < n)
        s->cum[from + stk[nl++]] = UINT64_MAX;
}

/* Publishes a snapshot with peer `add` added, or `drop` removed, or
 * `flip`'s flags replaced by `flags`, keeping the rotation state of the
 * peers that stay; then waits out the old one. Caller holds lb->wmu. */
static int rebuild(keel_lb *lb, keel_lb_peer *add, keel_lb_peer *drop, keel_lb_peer *flip,
                   unsigned flags)
{
    snap *old = atomic_load_explicit(&lb->cur, memory_order_relaxed);
    size_t total = old->n + old->nb + (add ? 1 : 0);
    snap *s = snap_new(total);
    bool *ok = keel__calloc(total ? total : 1, sizeof *ok);
    bool *tie = keel__calloc(total ? total : 1, sizeof *tie);
    uint64_t *cc = keel__calloc(total ? total : 1, sizeof *cc);
    bool p2c = lb->policy == KEEL_LB_P2C; /* scratch for draw_table() */
    double *mass = p2c ? keel__calloc(total ? total : 1, sizeof *mass) : NULL;
    uint32_t *stk = p2c ? keel__calloc(total ? total : 1, sizeof *stk) : NULL;
    if (!s || !ok || !tie || !cc || (p2c && (!mass || !stk))) {
        snap_free(s);
        keel__free(ok);
        keel__free(tie);
        keel__free(cc);
        keel__free(mass);
        keel__free(stk);
        return KEEL_ENOMEM;
    }
    s->equal_weights = s->simple = true;
    uint32_t w0 = 0; /* the first weight of a primary not DOWN */
    pthread_mutex_lock(&lb->mu); /* the rotation state must not move meanwhile */
    keel__free(lb->ok);
    keel__free(lb->tie);
    keel__free(lb->cc);
    lb->ok = ok;
    lb->tie = tie;
    lb->cc = cc;
    /* primaries first, then backups, each in order of addition */
    for (int pass = 0; pass < 2; pass++) {
        for (size_t i = 0; i <= old->n + old->nb; i++) {
            keel_lb_peer *p = i < old->n + old->nb ? old->peers[i] : add;
            if (!p || p == drop)
                continue;
            unsigned f = p == flip ? flags : atomic_load(&p->flags);
            if (!!(f & KEEL_LB_BACKUP) != pass)
                continue;
            size_t at = pass ? s->n + s->nb++ : s->n++;
            s->peers[at] = p;
            /* P2C's draw table takes no DOWN peer (P2C compares the
             * peers' own weights; only round robin and least_conn keep
             * s->w as nginx's) */
            s->w[at] = p2c && (f & KEEL_LB_DOWN) ? 0 : p->weight;
            s->cur[at] = p == add ? 0 : old->cur[i];
            s->eff[at] = p == add ? p->weight : old->eff[i];
            p->slot = (uint32_t)at;
            if (!pass) {
                /* a DOWN peer is never a candidate: its weight must not
                 * turn the others' plain P2C into weighted draws */
                if (!(f & KEEL_LB_DOWN)) {
                    w0 = w0 ? w0 : p->weight;
                    s->equal_weights &= p->weight == w0;
                }
                s->simple &= !(f & KEEL_LB_DOWN) && !p->max_conns;
            }
        }
    }
    if (p2c) {
        draw_table(s, 0, s->n, mass, stk);
        draw_table(s, s->n, s->n + s->nb, mass, stk);
        keel__free(mass);
        keel__free(stk);
    }
    if (flip)
        atomic_store(&flip->flags, flags);
    atomic_store_explicit(&lb->cur, s, memory_order_release);
    atomic_store(&lb->npeers, (uint32_t)(s->n + s->nb));
    pthread_mutex_unlock(&lb->mu);
    keel__rcu_synchronize();
    snap_free(old);
    return 0;
}

/* ---- metrics, per peer ---- */

static double m_in_flight(void *ud) { return atomic_load(&((keel_lb_peer *)ud)->conns); }
static double m_failures(void *ud) { return (double)atomic_load(&((keel_lb_peer *)ud)->failures); }
static double m_ejected(void *ud)
{
    keel_lb_peer *p = ud; /* one whose time is up and nobody picked since */
    return ejected(p->lb, p, keel__clock_now(&p->lb->clock));
}
static double m_fails(void *ud) { return atomic_load(&((keel_lb_peer *)ud)->fails); }

/* Registered before the peer is published and removed before it leaves,
 * never under lb->wmu: a render (registry lock) reads peers, so the
 * registry lock always comes first. */
static int peer_metrics(keel_lb *lb, keel_lb_peer *p)
{
    if (!lb->metrics)
        return 0;
    char id[24];
    snprintf(id, sizeof id, "#%u", p->id);
    const char *peer = p->name ? p->name : id;
    keel__mfunc fs[] = {
        {1, "keel_lb_peer_in_flight", "Picks not yet done.", "peer", peer, m_in_flight},
        {0, "keel_lb_peer_failures_total", "Requests reported failed.", "peer", peer, m_failures},
        {1, "keel_lb_peer_fails", "Failures counted against max_fails now.", "peer", peer, m_fails},
        {1, "keel_lb_peer_ejected", "1 while the peer is ejected as an outlier.", "peer", peer, m_ejected},
    };
    return keel__metrics_funcs(lb->metrics, "lb", lb->metrics_name, fs, sizeof fs / sizeof fs[0], p);
}

KEEL_API int keel_lb_add(keel_lb *lb, const keel_lb_peer_opts *o, keel_lb_peer **out)
{
    if (!lb || !o || o->weight > MAX_WEIGHT || (o->flags & ~(KEEL_LB_BACKUP | KEEL_LB_DOWN)))
        return KEEL_EINVAL;
    keel_lb_peer *p = keel__calloc(1, sizeof *p);
    if (!p)
        return KEEL_ENOMEM;
    if (o->name && !(p->name = keel__strdup(o->name))) {
        keel__free(p);
        return KEEL_ENOMEM;
    }
    p->lb = lb;
    p->ud = o->ud;
    p->weight = o->weight ? o->weight : 1;
    p->max_fails = o->max_fails ? o->max_fails : lb->max_fails;
    p->fail_timeout = o->fail_timeout_ns ? o->fail_timeout_ns : lb->fail_timeout;
    p->max_conns = o->max_conns;
    atomic_init(&p->flags, o->flags);
    p->backup = o->flags & KEEL_LB_BACKUP;
    atomic_flag_clear(&p->lk);
    if (keel__rcu_in_read()) { /* inside some read section: would wait for itself */
        peer_free(p);
        return KEEL_ESTATE;
    }
    pthread_mutex_lock(&lb->wmu);
    p->id = ++lb->next_id;
    pthread_mutex_unlock(&lb->wmu);
    /* The series first: once published, the peer can be picked and removed
     * by another thread, and series registered after that removal would
     * outlive the peer. */
    int rc = peer_metrics(lb, p);
    if (rc) {
        peer_free(p);
        return rc;
    }
    pthread_mutex_lock(&lb->wmu);
    rc = rebuild(lb, p, NULL, NULL, 0);
    if (rc == 0)
        sweep(lb);
    pthread_mutex_unlock(&lb->wmu);
    if (rc) {
        if (lb->metrics)
            keel_metrics_func_remove(lb->metrics, p);
        peer_free(p);
        return rc;
    }
    if (out)
        *out = p;
    return 0;
}

/* Whether p is a peer of lb now, found by its address alone: a handle
 * whose peer was removed and freed is never dereferenced. Caller holds
 * lb->wmu. */
static bool is_member(keel_lb *lb, keel_lb_peer *p)
{
    snap *s = atomic_load_explicit(&lb->cur, memory_order_relaxed);
    for (size_t i = 0; i < s->n + s->nb; i++)
        if (s->peers[i] == p)
            return true;
    return false;
}

KEEL_API int keel_lb_remove(keel_lb *lb, keel_lb_peer *p)
{
    if (!lb || !p)
        return KEEL_EINVAL;
    if (keel__rcu_in_read())
        return KEEL_ESTATE;
    pthread_mutex_lock(&lb->wmu);
    int rc = is_member(lb, p) ? rebuild(lb, NULL, p, NULL, 0) : KEEL_ENOTFOUND;
    if (rc == 0) {
        /* it no longer counts as ejected or suspect, and late results of
         * picks in flight on it will not make it count again */
        atomic_store(&p->removed, true);
        if (atomic_exchange(&p->ejected_until, 0)) {
            atomic_fetch_sub(&lb->nejected, 1);
            suspect_add(lb, p, -1);
        }
        if (atomic_exchange(&p->fails, 0))
            suspect_add(lb, p, -1);
    }
    pthread_mutex_unlock(&lb->wmu);
    if (rc) /* a failed rebuild leaves the peer, and so its series */
        return rc;
    /* Its series go only once it is out (so that a failure leaves them),
     * outside wmu, and before it joins the dead that sweep() may free. */
    if (lb->metrics)
        keel_metrics_func_remove(lb->metrics, p);
    pthread_mutex_lock(&lb->wmu);
    p->next_dead = lb->dead;
    lb->dead = p;
    sweep(lb);
    pthread_mutex_unlock(&lb->wmu);
    return 0;
}

KEEL_API int keel_lb_set_down(keel_lb *lb, keel_lb_peer *p, int down)
{
    if (!lb || !p)
        return KEEL_EINVAL;
    if (keel__rcu_in_read())
        return KEEL_ESTATE;
    pthread_mutex_lock(&lb->wmu);
    int rc = KEEL_ENOTFOUND;
    if (is_member(lb, p)) {
        unsigned f = atomic_load(&p->flags);
        rc = rebuild(lb, NULL, NULL, p, down ? f | KEEL_LB_DOWN : f & ~KEEL_LB_DOWN);
    }
    pthread_mutex_unlock(&lb->wmu);
    return rc;
}

KEEL_API void *keel_lb_peer_ud(const keel_lb_peer *p) { return p ? p->ud : NULL; }
KEEL_API const char *keel_lb_peer_name(const keel_lb_peer *p) { return p && p->name ? p->name : ""; }

KEEL_API int keel_lb_peer_stats_get(keel_lb *lb, keel_lb_peer *p, keel_lb_peer_stats *st)
{
    if (!lb || !p || !st)
        return KEEL_EINVAL;
    pthread_mutex_lock(&lb->wmu);
    bool member = is_member(lb, p);
    if (member) {
        uint64_t now = keel__clock_now(&lb->clock);
        memset(st, 0, sizeof *st);
        st->name = keel_lb_peer_name(p);
        st->weight = p->weight;
        pthread_mutex_lock(&lb->mu);
        snap *s = atomic_load_explicit(&lb->cur, memory_order_relaxed);
        st->effective_weight = s->eff[p->slot];
        st->current_weight = s->cur[p->slot];
        pthread_mutex_unlock(&lb->mu);
        st->fails = atomic_load(&p->fails);
        st->conns = atomic_load(&p->conns);
        st->picks = atomic_load(&p->picks);
        st->failures = atomic_load(&p->failures);
        st->ejected = ejected(lb, p, now); /* first: ending one resets the count */
        st->consecutive_failures = atomic_load(&p->consecutive);
        lk_lock(p);
        st->ejections = p->ejections;
        lk_unlock(p);
        st->ewma_ns = ewma_now(lb, p, now);
        st->available = available(lb, p, NULL, now, alone(lb, p), false);
    }
    pthread_mutex_unlock(&lb->wmu);
    return member ? 0 : KEEL_ENOTFOUND;
}

/* Without a read section, whose first use in a thread may find no memory
 * (and a count cannot say so). */
KEEL_API size_t keel_lb_count(keel_lb *lb)
{
    return lb ? atomic_load(&lb->npeers) : 0;
}

KEEL_API int keel_lb_create(keel_lb **out, const keel_lb_opts *o)
{
    if (!out || !o || (unsigned)o->policy > KEEL_LB_PEAK_EWMA || o->eject_max_percent > 100 ||
        !(o->p2c_bias >= 0) || o->p2c_bias > 64)
        return KEEL_EINVAL;
    keel_lb *lb = keel__calloc(1, sizeof *lb);
    snap *s = snap_new(0);
    if (!lb || !s) {
        keel__free(lb);
        snap_free(s);
        return KEEL_ENOMEM;
    }
    lb->policy = o->policy;
    lb->locked = o->policy == KEEL_LB_ROUND_ROBIN || o->policy == KEEL_LB_LEAST_CONN;
    lb->max_fails = o->max_fails ? o->max_fails : 1;
    lb->fail_timeout = o->fail_timeout_ns ? o->fail_timeout_ns : 10 * NS;
    lb->bias = o->p2c_bias > 0 ? o->p2c_bias : 1.0;
    lb->tau = (double)(o->ewma_tau_ns ? o->ewma_tau_ns : 10 * NS);
    lb->eject_consecutive = o->eject_consecutive;
    lb->eject_base = o->eject_base_ns ? o->eject_base_ns : 30 * NS;
    lb->eject_max = o->eject_max_ns ? o->eject_max_ns : 300 * NS;
    if (lb->eject_max < lb->eject_base)
        lb->eject_max = lb->eject_base;
    lb->eject_pct = o->eject_max_percent ? o->eject_max_percent : 10;
    lb->eject_decay = o->eject_decay_ns ? o->eject_decay_ns : 10 * NS;
    lb->clock = (keel__clock){o->clock, o->clock_ud};
    lb->rand = (keel__rand){o->rand, o->rand_ud};
    lb->metrics = o->metrics;
    if (o->metrics_name && !(lb->metrics_name = keel__strdup(o->metrics_name))) {
        keel__free(lb);
        snap_free(s);
        return KEEL_ENOMEM;
    }
    s->equal_weights = s->simple = true;
    atomic_init(&lb->cur, s);
    pthread_mutex_init(&lb->mu, NULL);
    pthread_mutex_init(&lb->wmu, NULL);
    keel__fences_init();
    *out = lb;
    return 0;
}

KEEL_API void keel_lb_destroy(keel_lb *lb)
{
    if (!lb)
        return;
    snap *s = atomic_load_explicit(&lb->cur, memory_order_relaxed);
    for (size_t i = 0; lb->metrics && i < s->n + s->nb; i++)
        keel_metrics_func_remove(lb->metrics, s->peers[i]);
    keel__free(lb->metrics_name);
    for (size_t i = 0; i < s->n + s->nb; i++)
        peer_free(s->peers[i]);
    while (lb->dead) {
        keel_lb_peer *p = lb->dead;
        lb->dead = p->next_dead;
        peer_free(p);
    }
    snap_free(s);
    keel__free(lb->ok);
    keel__free(lb->tie);
    keel__free(lb->cc);
    pthread_mutex_destroy(&lb->mu);
    pthread_mutex_destroy(&lb->wmu);
    keel__free(lb);
}
