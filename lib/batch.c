/* lib/batch.c — keel_batch: a bounded lock-free ring in front of one
 * batcher thread, optional worker threads, retries and a lossless close.
 *
 * The ring (Vyukov's bounded queue). Each slot has a sequence number:
 * slot i starts at i; a producer that finds seq == pos claims the position
 * by compare-and-swap on `enq`, writes the item and publishes seq = pos+1;
 * the consumer takes a slot whose seq is pos+1 and frees it with
 * seq = pos + capacity. `enq` counts every accepted item; its top bit is
 * the closed flag, so that close and a claim can never both succeed: an
 * item is accepted if and only if its claim went through.
 *
 * The consumer side (the batcher's dequeues, a producer dropping the
 * oldest item, the list of batches in flight, flush and close) is
 * serialised by `mu`. A batch is in flight from its first dequeue until
 * its last item is handled or dead-lettered; the flush watermark is the
 * first position of the oldest batch in flight (or the dequeue position):
 * every item before it is done. flush and close wait on that.
 *
 * Sleeping without losing wake-ups: before it waits, the batcher spins a
 * little (at high rates the batch fills meanwhile), then publishes in
 * `wake_pos` the position whose arrival it waits for (the first item, or
 * the one that fills the batch), runs a heavy fence (membarrier) and looks
 * at the ring once more; a producer publishes, runs a light fence (a
 * compiler barrier when membarrier works) and wakes the batcher only if
 * its item is the awaited one or later. So the fast path pays one relaxed
 * load for it, and one producer per batch pays a wake-up.
 *
 * Linger: the first add after a batch was taken stamps the time the next
 * batch opened (`opened`, UNSTAMPED until then, set by compare-and-swap),
 * so only one add per batch reads the clock.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <keel/backoff.h>
#include <keel/batch.h>
#include <keel/metrics.h>

#include "internal.h"

#define CLOSED (UINT64_C(1) << 63)
#define UNSTAMPED UINT64_MAX
#define POLL_NS 1000000u /* how often a fake clock is looked at */

typedef struct bslot {
    _Atomic uint64_t seq;
    void *item;
    size_t bytes;
} bslot;

/* A batch in flight (or an item being dropped, n = 1). */
typedef struct bjob {
    struct bjob *next;      /* the list it is on: in flight, work queue or spare */
    struct bjob *next_live; /* the in-flight list */
    uint64_t lo;            /* its first item's position */
    uint64_t opened;        /* when its oldest item was added */
    size_t n;
    void **items;
    uint8_t *failed;
} bjob;

struct keel_batch_ctx {
    size_t n, nfailed;
    uint32_t attempt;
    uint8_t *failed;
};

struct keel_batch {
    keel_batch_opts o;
    keel__clock clock;
    bslot *ring;
    uint64_t cap, mask;

    _Alignas(KEEL__CACHELINE) _Atomic uint64_t enq; /* accepted; CLOSED bit */
    _Alignas(KEEL__CACHELINE) _Atomic uint64_t wake_pos; /* the batcher waits for this item */
    _Atomic uint64_t opened; /* when the open batch's first item came; UNSTAMPED */

    _Alignas(KEEL__CACHELINE) pthread_mutex_t mu;
    pthread_cond_t batcher_cv, space_cv, done_cv, work_cv;
    uint64_t deq;          /* taken from the ring */
    uint64_t flush_target; /* a flush waits for the items before it */
    bjob *live;            /* in flight, oldest first */
    bjob *work, *work_tail;
    size_t nwork;
    bjob *spare;
    size_t space_waiters;
    bool closing, stop_workers;
    int close_state; /* 0 open, 1 closing, 2 closed */

    pthread_t batcher;
    pthread_t *workers;
    size_t nworkers;
    bool started;

    _Atomic uint64_t handled, retried, dead, dropped, batches;
    _Atomic uint64_t size_hist[KEEL_BATCH_BUCKETS], wait_hist[KEEL_BATCH_BUCKETS];
};

static _Thread_local keel_batch *in_callback; /* the batch whose callback runs here */

/* ---- small helpers ---- */

static unsigned bucket(uint64_t v)
{
    unsigned i = v <= 1 ? 0 : 64 - (unsigned)__builtin_clzll(v - 1);
    return i < KEEL_BATCH_BUCKETS ? i : KEEL_BATCH_BUCKETS - 1;
}

/* An absolute CLOCK_MONOTONIC time `ns` from now (keel_now_ns's clock). */
/* a + b, or UINT64_MAX (a timeout of "forever" must not wrap to the past) */
static uint64_t sat_add(uint64_t a, uint64_t b) { return b > UINT64_MAX - a ? UINT64_MAX : a + b; }

static struct timespec abs_in(uint64_t ns)
{
    uint64_t at = sat_add(keel_now_ns(), ns);
    if (at / 1000000000u > (uint64_t)INT32_MAX) /* far enough: a wait that ends on a wake-up */
        at = (uint64_t)INT32_MAX * 1000000000u;
    return (struct timespec){(time_t)(at / 1000000000u), (long)(at % 1000000000u)};
}

/* Real time to wait for the option clock to reach `until`: with a clock of
 * the caller's, no more than a poll interval. */
static uint64_t real_wait(const keel_batch *b, uint64_t until)
{
    uint64_t now = keel__clock_now(&b->clock);
    uint64_t left = until > now ? until - now : 0;
    return b->o.clock && left > POLL_NS ? POLL_NS : left;
}

/* ---- the ring ---- */

static int try_enqueue(keel_batch *b, void *item, size_t bytes)
{
    uint64_t pos = atomic_load_explicit(&b->enq, memory_order_relaxed);
    bslot *s;
    for (;;) {
        if (pos & CLOSED)
            return KEEL_ECLOSED;
        s = &b->ring[pos & b->mask];
        uint64_t seq = atomic_load_explicit(&s->seq, memory_order_acquire);
        int64_t d = (int64_t)(seq - pos);
        if (d == 0) {
            if (atomic_compare_exchange_weak_explicit(&b->enq, &pos, pos + 1, memory_order_relaxed,
                                                      memory_order_relaxed))
                break;
        } else if (d < 0) {
            return KEEL_EFULL;
        } else {
            pos = atomic_load_explicit(&b->enq, memory_order_relaxed);
        }
    }
    s->item = item;
    s->bytes = bytes;
    atomic_store_explicit(&s->seq, pos + 1, memory_order_release);
    return 0;
}

/* Under mu: the item `ahead` places after the next one, if published. */
static bslot *peek_at(keel_batch *b, uint64_t ahead)
{
    uint64_t pos = b->deq + ahead;
    bslot *s = &b->ring[pos & b->mask];
    return atomic_load_explicit(&s->seq, memory_order_acquire) == pos + 1 ? s : NULL;
}

static bslot *peek_slot(keel_batch *b)
{
    return peek_at(b, 0);
}

/* Under mu: takes the next item (peek_slot said it is there). */
static void *take_slot(keel_batch *b, bslot *s)
{
    void *item = s->item;
    atomic_store_explicit(&s->seq, b->deq + b->cap, memory_order_release);
    b->deq++;
    if (b->space_waiters)
        pthread_cond_broadcast(&b->space_cv);
    return item;
}

static uint64_t accepted(keel_batch *b)
{
    return atomic_load(&b->enq) & ~CLOSED;
}

/* ---- jobs in flight ---- */

/* Under mu. */
static bjob *job_get(keel_batch *b)
{
    bjob *j = b->spare;
    if (j) {
        b->spare = j->next;
    } else {
        size_t n = b->o.max_items;
        j = keel__calloc(1, sizeof *j + n * (sizeof(void *) + 1));
        if (!j)
            return NULL;
        j->items = (void **)(j + 1);
        j->failed = (uint8_t *)(j->items + n);
    }
    j->next = j->next_live = NULL;
    j->n = 0;
    return j;
}

/* Under mu: j joins the in-flight list (positions only grow). */
static void live_add(keel_batch *b, bjob *j)
{
    bjob **p = &b->live;
    while (*p)
        p = &(*p)->next_live;
    *p = j;
}

/* Under mu: j is done; flushers may be able to return. */
static void live_remove(keel_batch *b, bjob *j)
{
    for (bjob **p = &b->live; *p; p = &(*p)->next_live)
        if (*p == j) {
            *p = j->next_live;
            break;
        }
    pthread_cond_broadcast(&b->done_cv);
}

/* Under mu: every item before this position is done. */
static uint64_t watermark(keel_batch *b)
{
    uint64_t w = b->deq;
    for (bjob *j = b->live; j; j = j->next_live)
        if (j->lo < w)
            w = j->lo;
    return w;
}

/* ---- running a batch ---- */

static void sleep_until(keel_batch *b, uint64_t until)
{
    for (uint64_t ns; (ns = real_wait(b, until)) > 0;) {
        struct timespec ts = {(time_t)(ns / 1000000000u), (long)(ns % 1000000000u)};
        nanosleep(&ts, NULL);
    }
}

static void dead_letter(keel_batch *b, void *const *items, size_t n, int err)
{
    if (b->o.dead_letter)
        b->o.dead_letter(items, n, err, b->o.ud);
    else
        keel__log(KEEL_LOG_WARN, "batch", "%zu item(s) given up (%s) and no dead_letter set", n,
                  keel_strerror(err));
}

/* Handles a job to the end: retries with backoff, then the dead letter. */
static void run_job(keel_batch *b, bjob *j)
{
    keel_batch *outer = in_callback;
    in_callback = b;
    uint64_t now = keel__clock_now(&b->clock);
    atomic_fetch_add_explicit(&b->wait_hist[bucket(now > j->opened ? now - j->opened : 0)], 1,
                              memory_order_relaxed);
    keel_backoff bo;
    keel_backoff_opts bopts = {KEEL_BACKOFF_FULL_JITTER, b->o.retry_base_ns, b->o.retry_max_ns,
                               b->o.rand, b->o.rand_ud};
    keel_backoff_init(&bo, &bopts);
    size_t n = j->n;
    for (uint32_t attempt = 0;; attempt++) {
        memset(j->failed, 0, n);
        keel_batch_ctx ctx = {n, 0, attempt, j->failed};
        int rc = b->o.handler(j->items, n, &ctx, b->o.ud);
        size_t nf = ctx.nfailed;
        if (nf == 0 && rc != 0) { /* no marks: the whole batch failed */
            memset(j->failed, 1, n);
            nf = n;
        }
        atomic_fetch_add_explicit(&b->handled, n - nf, memory_order_relaxed);
        if (nf == 0)
            break;
        size_t k = 0; /* keep the failed items, in order */
        for (size_t i = 0; i < n; i++)
            if (j->failed[i])
                j->items[k++] = j->items[i];
        n = k;
        if (attempt >= b->o.max_retries) {
            dead_letter(b, j->items, n, rc ? rc : KEEL_EBACKEND);
            atomic_fetch_add_explicit(&b->dead, n, memory_order_relaxed);
            break;
        }
        /* the wait starts now; only then is the retry counted (so a test
         * that sees the count may move its clock) */
        uint64_t until = sat_add(keel__clock_now(&b->clock), keel_backoff_next(&bo));
        atomic_fetch_add_explicit(&b->retried, n, memory_order_release);
        sleep_until(b, until);
    }
    in_callback = outer;
    pthread_mutex_lock(&b->mu);
    live_remove(b, j);
    j->next = b->spare;
    b->spare = j;
    pthread_mutex_unlock(&b->mu);
}

/* ---- the batcher ---- */

/* Under mu: waits until `need` items are published (at most `ns` of real
 * time; 0: until woken), or a flush or close asks, without missing the
 * producer's wake-up. */
static void wait_items(keel_batch *b, uint64_t need, uint64_t ns)
{
    /* the slot to wait for: the one that completes `need`, or the head
     * when its producer has claimed it but not yet written it (waiting for
     * a later one would return at once and spin, holding mu) */
    uint64_t k = peek_at(b, 0) ? need - 1 : 0;
    for (int spin = 0; spin < 2000; spin++) { /* up to a hundred microseconds */
        if (peek_at(b, k))
            return;
        keel__cpu_relax();
    }
    atomic_store(&b->wake_pos, b->deq + k + 1);
    keel__heavy_fence();
    if (!peek_at(b, k)) {
        if (ns) {
            struct timespec ts = abs_in(ns);
            pthread_cond_timedwait(&b->batcher_cv, &b->mu, &ts);
        } else {
            pthread_cond_wait(&b->batcher_cv, &b->mu);
        }
    }
    atomic_store(&b->wake_pos, UINT64_MAX);
}

/* Under mu: the next batch, closed by count, bytes, linger, flush or
 * close; NULL when closed and drained. */
static bjob *form(keel_batch *b)
{
    bjob *j = NULL;
    while (!j) {
        while (!peek_slot(b)) {
            if (b->closing && b->deq == accepted(b))
                return NULL;
            wait_items(b, 1, 0);
        }
        if (!(j = job_get(b))) { /* no memory for a batch: try again soon */
            pthread_mutex_unlock(&b->mu);
            nanosleep(&(struct timespec){0, 1000000}, NULL);
            pthread_mutex_lock(&b->mu);
        }
    }
    j->lo = b->deq;
    live_add(b, j);
    j->opened = atomic_load(&b->opened);
    if (j->opened == UNSTAMPED) { /* items no add stamped (yet): now */
        uint64_t now = keel__clock_now(&b->clock), want = UNSTAMPED;
        atomic_compare_exchange_strong(&b->opened, &want, now == UNSTAMPED ? now - 1 : now);
        j->opened = atomic_load(&b->opened);
    }
    size_t bytes = 0;
    for (;;) {
        bslot *s;
        bool full = false;
        while (j->n < b->o.max_items && (s = peek_slot(b))) {
            if (b->o.max_bytes && j->n && s->bytes > b->o.max_bytes - bytes) {
                full = true; /* the next one would not fit */
                break;
            }
            if (b->o.max_bytes)
                bytes += s->bytes < b->o.max_bytes - bytes ? s->bytes : b->o.max_bytes - bytes;
            j->items[j->n++] = take_slot(b, s);
        }
        if (full || j->n == b->o.max_items || (b->o.max_bytes && bytes >= b->o.max_bytes) ||
            b->closing || b->flush_target > j->lo)
            break;
        uint64_t due = sat_add(j->opened, b->o.linger_ns);
        uint64_t ns = real_wait(b, due);
        if (ns == 0)
            break; /* lingered long enough */
        if (b->o.max_bytes && ns > POLL_NS)
            ns = POLL_NS; /* producers cannot tell when bytes fill it: look */
        wait_items(b, b->o.max_items - j->n, ns);
    }
    /* The next batch opens now if items are waiting, else with the next
     * add. The add publishes, fences, then looks for UNSTAMPED; here the
     * store of UNSTAMPED, a heavy fence, a look at the ring: one of the
     * two sees the other, so the next batch is stamped by someone. */
    if (!peek_slot(b)) {
        atomic_store(&b->opened, UNSTAMPED);
        keel__heavy_fence();
    }
    if (peek_slot(b)) {
        uint64_t now = keel__clock_now(&b->clock);
        atomic_store(&b->opened, now == UNSTAMPED ? now - 1 : now);
    }
    atomic_fetch_add_explicit(&b->batches, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&b->size_hist[bucket(j->n)], 1, memory_order_relaxed);
    return j;
}

static void *worker_main(void *arg)
{
    keel_batch *b = arg;
    pthread_mutex_lock(&b->mu);
    for (;;) {
        while (!b->work && !b->stop_workers)
            pthread_cond_wait(&b->work_cv, &b->mu);
        bjob *j = b->work;
        if (!j)
            break;
        b->work = j->next;
        if (!b->work)
            b->work_tail = NULL;
        b->nwork--;
        pthread_cond_broadcast(&b->work_cv); /* room for the batcher */
        pthread_mutex_unlock(&b->mu);
        run_job(b, j);
        pthread_mutex_lock(&b->mu);
    }
    pthread_mutex_unlock(&b->mu);
    return NULL;
}

static void *batcher_main(void *arg)
{
    keel_batch *b = arg;
    pthread_mutex_lock(&b->mu);
    for (bjob *j; (j = form(b)) != NULL;) {
        if (b->nworkers == 0) {
            pthread_mutex_unlock(&b->mu);
            run_job(b, j);
            pthread_mutex_lock(&b->mu);
            continue;
        }
        while (b->nwork >= 2 * b->nworkers) /* workers busy: let the ring fill */
            pthread_cond_wait(&b->work_cv, &b->mu);
        j->next = NULL;
        if (b->work_tail)
            b->work_tail->next = j;
        else
            b->work = j;
        b->work_tail = j;
        b->nwork++;
        pthread_cond_signal(&b->work_cv);
    }
    b->stop_workers = true;
    pthread_cond_broadcast(&b->work_cv);
    pthread_mutex_unlock(&b->mu);
    for (size_t i = 0; i < b->nworkers; i++)
        pthread_join(b->workers[i], NULL);
    return NULL;
}

/* ---- producers ---- */

/* Takes the oldest queued item out and dead-letters it (KEEL_EFULL). */
static void drop_oldest(keel_batch *b)
{
    pthread_mutex_lock(&b->mu);
    if (atomic_load(&b->enq) & CLOSED) { /* closing: the add fails anyway, drop nothing */
        pthread_mutex_unlock(&b->mu);
        return;
    }
    bslot *s = peek_slot(b);
    if (!s) { /* its producer is still writing it: let it finish */
        pthread_mutex_unlock(&b->mu);
        sched_yield();
        return;
    }
    bjob d = {.lo = b->deq, .n = 1};
    live_add(b, &d);
    void *item = take_slot(b, s);
    atomic_fetch_add_explicit(&b->dropped, 1, memory_order_relaxed);
    pthread_mutex_unlock(&b->mu);
    keel_batch *outer = in_callback;
    in_callback = b; /* a flush from the callback would wait for itself */
    dead_letter(b, &item, 1, KEEL_EFULL);
    in_callback = outer;
    pthread_mutex_lock(&b->mu);
    live_remove(b, &d);
    pthread_mutex_unlock(&b->mu);
}

/* Waits for room (KEEL_BATCH_BLOCK): 0 to try again, or KEEL_ETIMEDOUT. */
static int wait_space(keel_batch *b, uint64_t deadline)
{
    int rc = 0;
    pthread_mutex_lock(&b->mu);
    b->space_waiters++;
    /* under mu the batcher cannot dequeue: full now means a wake-up comes */
    while (!b->closing && accepted(b) - b->deq >= b->cap) {
        if (deadline) {
            uint64_t now = keel_now_ns();
            if (now >= deadline) {
                rc = KEEL_ETIMEDOUT;
                break;
            }
            struct timespec ts = abs_in(deadline - now);
            pthread_cond_timedwait(&b->space_cv, &b->mu, &ts);
        } else {
            pthread_cond_wait(&b->space_cv, &b->mu);
        }
    }
    b->space_waiters--;
    pthread_mutex_unlock(&b->mu);
    return rc;
}

static void wake_batcher(keel_batch *b)
{
    pthread_mutex_lock(&b->mu);
    pthread_cond_signal(&b->batcher_cv);
    pthread_mutex_unlock(&b->mu);
}

KEEL_API int keel_batch_add(keel_batch *b, void *item, size_t bytes)
{
    if (!b || !item)
        return KEEL_EINVAL;
    uint64_t deadline = 0;
    int rc;
    while ((rc = try_enqueue(b, item, bytes)) == KEEL_EFULL) {
        if (in_callback == b || b->o.on_full == KEEL_BATCH_REJECT)
            return KEEL_EFULL; /* from a handler, waiting would wait for ourselves */
        if (b->o.on_full == KEEL_BATCH_DROP_OLDEST) {
            drop_oldest(b);
            continue;
        }
        if (b->o.block_timeout_ns && !deadline)
            deadline = sat_add(keel_now_ns(), b->o.block_timeout_ns);
        if ((rc = wait_space(b, deadline)) != 0)
            return rc;
    }
    if (rc)
        return rc;
    keel__light_fence(); /* the publish before the loads below: see form() and wait_items() */
    if (atomic_load_explicit(&b->opened, memory_order_relaxed) == UNSTAMPED) { /* this add opens a batch */
        uint64_t now = keel__clock_now(&b->clock), want = UNSTAMPED;
        atomic_compare_exchange_strong(&b->opened, &want, now == UNSTAMPED ? now - 1 : now);
    }
    if (atomic_load_explicit(&b->enq, memory_order_relaxed) >=
        atomic_load_explicit(&b->wake_pos, memory_order_relaxed))
        wake_batcher(b); /* the awaited item, or one after it */
    return 0;
}

/* ---- flush, close ---- */

/* Under mu: closes the batches holding items accepted so far and waits for
 * every one of them to be done. */
static void drain(keel_batch *b)
{
    uint64_t target = accepted(b);
    if (target > b->flush_target)
        b->flush_target = target;
    pthread_cond_signal(&b->batcher_cv);
    while (watermark(b) < target)
        pthread_cond_wait(&b->done_cv, &b->mu);
}

KEEL_API int keel_batch_flush(keel_batch *b)
{
    if (!b)
        return KEEL_EINVAL;
    if (in_callback == b)
        return KEEL_ESTATE;
    pthread_mutex_lock(&b->mu);
    drain(b);
    pthread_mutex_unlock(&b->mu);
    return 0;
}

KEEL_API int keel_batch_close(keel_batch *b)
{
    if (!b)
        return KEEL_EINVAL;
    if (in_callback == b)
        return KEEL_ESTATE;
    atomic_fetch_or(&b->enq, CLOSED); /* no claim succeeds after this */
    pthread_mutex_lock(&b->mu);
    if (b->close_state) {
        while (b->close_state != 2)
            pthread_cond_wait(&b->done_cv, &b->mu);
        pthread_mutex_unlock(&b->mu);
        return 0;
    }
    b->close_state = 1;
    b->closing = true;
    pthread_cond_broadcast(&b->space_cv); /* blocked adds give up: closed */
    drain(b);
    pthread_mutex_unlock(&b->mu);
    if (b->started)
        pthread_join(b->batcher, NULL);
    pthread_mutex_lock(&b->mu);
    b->close_state = 2;
    pthread_cond_broadcast(&b->done_cv);
    pthread_mutex_unlock(&b->mu);
    return 0;
}

/* ---- the handler's context ---- */

KEEL_API int keel_batch_fail(keel_batch_ctx *ctx, size_t index)
{
    if (!ctx || index >= ctx->n)
        return KEEL_EINVAL;
    if (!ctx->failed[index]) {
        ctx->failed[index] = 1;
        ctx->nfailed++;
    }
    return 0;
}

KEEL_API uint32_t keel_batch_attempt(const keel_batch_ctx *ctx)
{
    return ctx ? ctx->attempt : 0;
}

/* ---- statistics ---- */

KEEL_API void keel_batch_stats_get(keel_batch *b, keel_batch_stats *st)
{
    if (!st)
        return;
    memset(st, 0, sizeof *st);
    if (!b)
        return;
    pthread_mutex_lock(&b->mu);
    st->accepted = accepted(b);
    st->queued = st->accepted - b->deq;
    pthread_mutex_unlock(&b->mu);
    st->handled = atomic_load(&b->handled);
    st->retried = atomic_load(&b->retried);
    st->dead_lettered = atomic_load(&b->dead);
    st->dropped = atomic_load(&b->dropped);
    st->batches = atomic_load(&b->batches);
    for (int i = 0; i < KEEL_BATCH_BUCKETS; i++) {
        st->size[i] = atomic_load(&b->size_hist[i]);
        st->wait[i] = atomic_load(&b->wait_hist[i]);
    }
}

KEEL__STAT_FN(m_accepted, keel_batch_stats, keel_batch_stats_get, accepted)
KEEL__STAT_FN(m_handled, keel_batch_stats, keel_batch_stats_get, handled)
KEEL__STAT_FN(m_retried, keel_batch_stats, keel_batch_stats_get, retried)
KEEL__STAT_FN(m_dead, keel_batch_stats, keel_batch_stats_get, dead_lettered)
KEEL__STAT_FN(m_dropped, keel_batch_stats, keel_batch_stats_get, dropped)
KEEL__STAT_FN(m_batches, keel_batch_stats, keel_batch_stats_get, batches)
KEEL__STAT_FN(m_queued, keel_batch_stats, keel_batch_stats_get, queued)
#undef BATCH_STAT

/* ---- create, destroy ---- */

KEEL_API int keel_batch_create(keel_batch **out, const keel_batch_opts *o)
{
    if (out)
        *out = NULL;
    if (!out || !o || !o->handler || o->on_full > KEEL_BATCH_DROP_OLDEST || o->workers > 1024 ||
        o->capacity > ((size_t)1 << 40))
        return KEEL_EINVAL;
    keel_batch *b = keel__aligned_alloc(KEEL__CACHELINE, sizeof *b);
    if (!b)
        return KEEL_ENOMEM;
    memset(b, 0, sizeof *b);
    b->o = *o;
    b->o.max_items = o->max_items ? o->max_items : 100;
    b->o.linger_ns = o->linger_ns ? o->linger_ns : 5000000u;
    b->o.retry_base_ns = o->retry_base_ns ? o->retry_base_ns : 100000000u;
    b->o.retry_max_ns = o->retry_max_ns ? o->retry_max_ns : 10000000000u;
    if (b->o.retry_max_ns < b->o.retry_base_ns)
        b->o.retry_max_ns = b->o.retry_base_ns;
    b->clock = (keel__clock){o->clock, o->clock_ud};
    b->cap = 2; /* a Vyukov ring needs two slots: with one, "written" and "free" look alike */
    while (b->cap < (o->capacity ? o->capacity : 65536))
        b->cap <<= 1;
    b->mask = b->cap - 1;
    if (b->o.max_items > b->cap) {
        keel__aligned_free(b);
        return KEEL_EINVAL;
    }
    b->nworkers = o->workers > 1 ? o->workers : 0;
    atomic_init(&b->opened, UNSTAMPED);
    atomic_init(&b->wake_pos, UINT64_MAX);
    keel__fences_init();
    pthread_mutex_init(&b->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&b->batcher_cv, &ca);
    pthread_cond_init(&b->space_cv, &ca);
    pthread_cond_init(&b->done_cv, &ca);
    pthread_cond_init(&b->work_cv, &ca);
    pthread_condattr_destroy(&ca);
    int rc = (b->ring = keel__aligned_alloc(KEEL__CACHELINE, b->cap * sizeof *b->ring)) ? 0 : KEEL_ENOMEM;
    for (uint64_t i = 0; rc == 0 && i < b->cap; i++)
        atomic_init(&b->ring[i].seq, i);
    if (rc == 0 && b->nworkers && !(b->workers = keel__calloc(b->nworkers, sizeof *b->workers)))
        rc = KEEL_ENOMEM;
    if (rc == 0 && o->metrics) {
        keel__mfunc fs[] = {
            {0, "keel_batch_accepted_total", "Items accepted.", NULL, NULL, m_accepted},
            {0, "keel_batch_handled_total", "Items handled.", NULL, NULL, m_handled},
            {0, "keel_batch_retried_total", "Item retries.", NULL, NULL, m_retried},
            {0, "keel_batch_dead_lettered_total", "Items given up after retries.", NULL, NULL, m_dead},
            {0, "keel_batch_dropped_total", "Items dropped from a full queue.", NULL, NULL, m_dropped},
            {0, "keel_batch_batches_total", "Batches formed.", NULL, NULL, m_batches},
            {1, "keel_batch_queued", "Items waiting in the queue.", NULL, NULL, m_queued},
        };
        rc = keel__metrics_funcs(o->metrics, "batch", o->metrics_name, fs, sizeof fs / sizeof fs[0], b);
    }
    size_t started = 0;
    while (rc == 0 && started < b->nworkers)
        if (pthread_create(&b->workers[started], NULL, worker_main, b) == 0)
            started++;
        else
            rc = KEEL_ENOMEM;
    if (rc == 0 && pthread_create(&b->batcher, NULL, batcher_main, b) != 0)
        rc = KEEL_ENOMEM;
    if (rc) { /* stop the workers that started; no batcher runs */
        pthread_mutex_lock(&b->mu);
        b->stop_workers = true;
        pthread_cond_broadcast(&b->work_cv);
        pthread_mutex_unlock(&b->mu);
        for (size_t i = 0; i < started; i++)
            pthread_join(b->workers[i], NULL);
        keel_batch_destroy(b);
        return rc;
    }
    b->started = true;
    *out = b;
    return 0;
}

KEEL_API void keel_batch_destroy(keel_batch *b)
{
    if (!b)
        return;
    if (in_callback == b) { /* its threads run us: freeing it would pull the floor away */
        keel__log(KEEL_LOG_ERROR, "batch", "keel_batch_destroy from its own callback: ignored");
        return;
    }
    if (b->started)
        keel_batch_close(b);
    if (b->o.metrics)
        keel_metrics_func_remove(b->o.metrics, b);
    while (b->spare) {
        bjob *j = b->spare;
        b->spare = j->next;
        keel__free(j);
    }
    keel__aligned_free(b->ring);
    keel__free(b->workers);
    pthread_mutex_destroy(&b->mu);
    pthread_cond_destroy(&b->batcher_cv);
    pthread_cond_destroy(&b->space_cv);
    pthread_cond_destroy(&b->done_cv);
    pthread_cond_destroy(&b->work_cv);
    keel__aligned_free(b);
}
