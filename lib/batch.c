/* lib/batch.c — keel_batch: a queue of its own for each producing thread
 * in front of one batcher thread, optional worker threads, retries and a
 * lossless close.
 *
 * Lanes. Each thread that adds gets a lane (found through lib/tslot.h):
 * a single-producer, single-consumer queue of blocks of BLOCK_ITEMS
 * items. The thread writes an item into its current block and publishes
 * it by storing the lane's `tail` (release); no other thread writes that
 * line, so producers on different cores never share one. The batcher
 * takes items under `mu` and publishes how far it got in `head`. Blocks
 * the batcher is done with go back to the lane's spare list, so a lane in
 * its steady state allocates nothing. A thread's lane outlives it: when
 * the thread exits the lane is left for the next new thread to adopt (its
 * queued items stay queued, in order).
 *
 * Capacity. `room` counts free places; a producer reserves them in steps
 * of `step` and spends its reserve (`credit`) one item at a time, and the
 * batcher gives places back as it takes items: one shared atomic per
 * step, not per item. The step shrinks as lanes are made (capacity over
 * twice the lanes), so that reserves taken at it stay under half the
 * capacity; one taken at an earlier, larger step is kept until spent or
 * taken back, so together they may hold more. An add that finds room empty
 * takes, under mu, every other lane's reserve back (steal()) before its
 * policy applies, so the policy applies only to a queue that holds
 * capacity items. A lane's credit changes only while its `busy` is set
 * or under mu; steal() flags the lane (`reclaim`), runs a heavy fence and
 * waits while it is busy: the add in progress ends before its credit is
 * taken, and a later add sees the flag and gets its place under mu.
 *
 * Close. An add sets its lane's `busy`, runs a light fence and looks at
 * `closed`; close sets `closed`, runs a heavy fence (membarrier) and
 * waits until no lane is busy. So either the add sees the close and
 * accepts nothing, or close sees the add and waits for its item to be
 * published: an item is accepted if and only if its add returned 0, and
 * every accepted item is counted by the final drain. An add that drops
 * (KEEL_BATCH_DROP_OLDEST) sets `busy` before it drops and clears it when
 * its own item is published, so that a close never comes between the two.
 *
 * The consumer side (the batcher taking items, a producer dropping the
 * oldest one, the list of batches in flight, flush and close) is
 * serialised by `mu`. A batch is in flight from its first item until its
 * last item is handled or dead-lettered; batches are numbered as they are
 * formed. A flush waits until every lane's head has passed the tail it
 * read, then until every batch formed by then is done.
 *
 * Sleeping without losing wake-ups: before it waits, the batcher spins a
 * little (at high rates the batch fills meanwhile), then publishes in
 * `wake_need` how many items a single lane must hold to wake it (the
 * items it waits for, divided among the lanes: when enough have come, one
 * lane holds at least that share), runs a heavy fence and looks at the
 * lanes once more; a producer publishes, runs a light fence and wakes the
 * batcher only when its lane holds that many. With several lanes the
 * batcher also looks every POLL_NS (a share can be missed by an add that
 * raced with the look), and a lane made meanwhile wakes it (the shares
 * were for fewer lanes). While batches fill up by count (`streaming`) the
 * batcher does not ask to be woken at all, since a wake-up costs the
 * producer a system call per batch: it looks every STREAM_NS, until a
 * look finds nothing new.
 *
 * Time: linger, backoff and the block timeout read the clock option; a
 * clock of the caller's is looked at every POLL_NS of real time (see
 * real_wait()), the default one is waited on directly.
 *
 * Linger: the first add after a batch was taken stamps the time the next
 * batch opened (`opened`, UNSTAMPED until then, set by compare-and-swap),
 * so only one add per batch reads the clock.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <keel/backoff.h>
#include <keel/batch.h>
#include <keel/metrics.h>

#include "internal.h"
#include "tslot.h"

#define UNSTAMPED UINT64_MAX
#define NOT_WAITING UINT64_MAX
#define POLL_NS 1000000u /* how often a fake clock, or the lanes, are looked at */
#define BLOCK_ITEMS 255  /* a block of 4 KiB */
#define STREAM_NS 50000u
#define CHUNK_MAX 256 /* places a producer reserves at a time, at most */

typedef struct bitem {
    void *item;
    size_t bytes;
} bitem;

typedef struct bblock {
    _Atomic(struct bblock *) next; /* the lane's next block, or the next spare */
    bitem it[BLOCK_ITEMS];
} bblock;

typedef struct lane {
    /* the producer's line: only the lane's thread writes it */
    _Atomic uint64_t tail; /* items published */
    _Atomic int busy;      /* publishing (see close) */
    bblock *wblk;          /* the block being written, and where */
    size_t widx;
    size_t credit; /* places reserved in room; see steal() */
    _Atomic int reclaim; /* set under mu: credit is being, or was, taken back */
    bool making_room; /* in make_room: a dead letter it calls must not add */
    bblock *mine;  /* spares the producer has taken over */
    /* the batcher's line: written under mu */
    _Alignas(KEEL__CACHELINE) _Atomic uint64_t head; /* items taken */
    bblock *rblk; /* the block being read, and where */
    size_t ridx;
    _Atomic(bblock *) spares; /* blocks given back, for the producer */
    _Atomic int owned;        /* a live thread adds through it */
    struct lane *next;        /* every lane of the batch */
} __attribute__((aligned(KEEL__CACHELINE))) lane;

/* A batch in flight (or an item being dropped, n = 1). */
typedef struct bjob {
    struct bjob *next;      /* the list it is on: in flight, work queue or spare */
    struct bjob *next_live; /* the in-flight list */
    uint64_t seq;           /* formed before every batch with a higher one */
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
    size_t chunk;          /* places a producer reserves at a time, with one lane */
    keel__towner owner;    /* each thread's lane */
    bool registered;

    _Alignas(KEEL__CACHELINE) _Atomic uint64_t room; /* free places */
    /* read by every add, written seldom */
    _Alignas(KEEL__CACHELINE) _Atomic uint64_t opened; /* when the open batch's first item came; UNSTAMPED */
    _Atomic uint64_t wake_need; /* a lane holding this many wakes the batcher */
    _Atomic size_t step;        /* places a producer reserves at a time */
    _Atomic int closed;

    _Alignas(KEEL__CACHELINE) pthread_mutex_t mu;
    pthread_cond_t batcher_cv, space_cv, done_cv, work_cv;
    lane *lanes, *rr;       /* every lane; where the next batch starts taking */
    size_t nlanes;
    uint64_t next_seq;      /* the next batch's number */
    size_t flushers;        /* threads in flush or close: batches close early */
    bool streaming;         /* the last batch filled up: no wake-ups, look every STREAM_NS */
    bjob *live;             /* in flight, oldest first */
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

/* The callbacks running in this thread, innermost first (callbacks of
 * different batches nest: a handler adds to another batch, whose drop
 * runs its dead letter here). A flush, close, destroy or waiting add of
 * any of their batches would wait for this thread. */
typedef struct cb_frame {
    const keel_batch *b;
    struct cb_frame *outer;
} cb_frame;

static _Thread_local cb_frame *callbacks;

static bool in_callback(const keel_batch *b)
{
    for (const cb_frame *f = callbacks; f; f = f->outer)
        if (f->b == b)
            return true;
    return false;
}

/* ---- small helpers ---- */

static unsigned bucket(uint64_t v)
{
    unsigned i = v <= 1 ? 0 : 64 - (unsigned)__builtin_clzll(v - 1);
    return i < KEEL_BATCH_BUCKETS ? i : KEEL_BATCH_BUCKETS - 1;
}


/* Real time to wait for the option clock to reach `until`: with a clock of
 * the caller's, no more than a poll interval. */
static uint64_t real_wait(const keel_batch *b, uint64_t until)
{
    uint64_t now = keel__clock_now(&b->clock);
    uint64_t left = until > now ? until - now : 0;
    return b->o.clock && left > POLL_NS ? POLL_NS : left;
}

/* ---- lanes ---- */

static bblock *block_new(void)
{
    bblock *k = keel__malloc(sizeof *k);
    if (k)
        atomic_init(&k->next, NULL);
    return k;
}

/* The producer: a block for its lane, from the spares if it can. */
static KEEL__COLD bblock *block_get(lane *l)
{
    if (!l->mine)
        l->mine = atomic_exchange_explicit(&l->spares, NULL, memory_order_acquire);
    bblock *k = l->mine;
    if (!k)
        return block_new();
    l->mine = atomic_load_explicit(&k->next, memory_order_relaxed);
    atomic_store_explicit(&k->next, NULL, memory_order_relaxed);
    return k;
}

/* The producer got block k for an add that failed: if not linked, it is
 * kept for later. */
static void block_keep(lane *l, bblock *k)
{
    if (k != l->wblk) {
        atomic_store_explicit(&k->next, l->mine, memory_order_relaxed);
        l->mine = k;
    }
}

/* The batcher (under mu) is done with block k of lane l. */
static void block_put(lane *l, bblock *k)
{
    bblock *top = atomic_load_explicit(&l->spares, memory_order_relaxed);
    do
        atomic_store_explicit(&k->next, top, memory_order_relaxed);
    while (!atomic_compare_exchange_weak_explicit(&l->spares, &top, k, memory_order_release,
                                                  memory_order_relaxed));
}

static void blocks_free(bblock *k)
{
    while (k) {
        bblock *next = atomic_load_explicit(&k->next, memory_order_relaxed);
        keel__free(k);
        k = next;
    }
}

/* Under mu (head is written only there). */
static uint64_t lane_queued(lane *l)
{
    return atomic_load_explicit(&l->tail, memory_order_acquire) -
           atomic_load_explicit(&l->head, memory_order_relaxed);
}

static bool any_queued(keel_batch *b)
{
    for (lane *l = b->lanes; l; l = l->next)
        if (lane_queued(l))
            return true;
    return false;
}

static uint64_t queued(keel_batch *b)
{
    uint64_t n = 0;
    for (lane *l = b->lanes; l; l = l->next)
        n += lane_queued(l);
    return n;
}

/* Under mu: places taken out of the lanes are free again. */
static void room_give(keel_batch *b, uint64_t n)
{
    atomic_fetch_add(&b->room, n);
    if (b->space_waiters)
        pthread_cond_broadcast(&b->space_cv);
}

/* Under mu: moves items of lane l into j, until it holds `limit` or the
 * next item would not fit in max_bytes (*bytes so far; then returns
 * true). Their places go back to room, unless `keep` (a drop: the place
 * is the dropping add's). */
static bool take(keel_batch *b, lane *l, bjob *j, size_t *bytes, size_t limit, bool keep)
{
    uint64_t h = atomic_load_explicit(&l->head, memory_order_relaxed);
    uint64_t t = atomic_load_explicit(&l->tail, memory_order_acquire);
    size_t max = b->o.max_bytes, took = 0;
    bool full = false;
    while (!full && h < t && j->n < limit) {
        if (l->ridx == BLOCK_ITEMS) { /* the producer has moved on to the next block */
            bblock *next = atomic_load_explicit(&l->rblk->next, memory_order_acquire);
            block_put(l, l->rblk);
            l->rblk = next;
            l->ridx = 0;
        }
        const bitem *it = &l->rblk->it[l->ridx];
        size_t run = BLOCK_ITEMS - l->ridx, k = 0; /* what this block holds */
        run = run < t - h ? run : (size_t)(t - h);
        run = run < limit - j->n ? run : limit - j->n;
        if (!max) {
            for (; k < run; k++)
                j->items[j->n + k] = it[k].item;
        } else {
            for (; k < run; k++) {
                if (j->n + k && (*bytes >= max || it[k].bytes > max - *bytes)) { /* full: even 0 bytes wait */
                    full = true;
                    break;
                }
                *bytes += it[k].bytes < max - *bytes ? it[k].bytes : max - *bytes;
                j->items[j->n + k] = it[k].item;
            }
        }
        j->n += k;
        l->ridx += k;
        h += k;
        took += k;
    }
    if (took) {
        atomic_store_explicit(&l->head, h, memory_order_release);
        if (!keep)
            room_give(b, took);
    }
    return full;
}

/* A thread with a lane exits: its reserve goes back, the lane waits for
 * the next new thread. */
static void lane_exit(keel__towner *o, void *data)
{
    keel_batch *b = (keel_batch *)((char *)o - offsetof(keel_batch, owner));
    lane *l = data;
    pthread_mutex_lock(&b->mu);
    if (l->credit)
        room_give(b, l->credit);
    l->credit = 0;
    atomic_store_explicit(&l->owned, 0, memory_order_release);
    pthread_mutex_unlock(&b->mu);
}

static void lane_forget(void *data) { (void)data; } /* its batch is gone, and freed it */

/* The calling thread's lane: adopts a free one or makes one. NULL with
 * *rc KEEL_ECLOSED or KEEL_ENOMEM. */
static KEEL__COLD lane *lane_attach(keel_batch *b, int *rc)
{
    pthread_mutex_lock(&b->mu);
    lane *l = NULL;
    if (atomic_load(&b->closed)) {
        *rc = KEEL_ECLOSED;
        pthread_mutex_unlock(&b->mu);
        return NULL;
    }
    for (lane *x = b->lanes; x && !l; x = x->next) {
        int want = 0;
        if (atomic_compare_exchange_strong_explicit(&x->owned, &want, 1, memory_order_acquire,
                                                    memory_order_relaxed))
            l = x;
    }
    if (!l) {
        bblock *k = block_new();
        if (k && (l = keel__aligned_alloc(KEEL__CACHELINE, sizeof *l)) != NULL) {
            memset(l, 0, sizeof *l);
            l->wblk = l->rblk = k;
            atomic_init(&l->owned, 1);
            l->next = b->lanes;
            b->lanes = l;
            b->nlanes++;
            size_t share = b->o.capacity / (2 * b->nlanes); /* see "Capacity" above */
            size_t step = b->chunk < share ? b->chunk : share ? share : 1;
            atomic_store_explicit(&b->step, step, memory_order_relaxed);
            if (atomic_load(&b->wake_need) != NOT_WAITING) /* its share was for fewer lanes */
                pthread_cond_signal(&b->batcher_cv);
        } else {
            keel__free(k);
        }
    }
    pthread_mutex_unlock(&b->mu);
    if (l && keel__tslot_set(&b->owner, l, lane_forget) != 0) {
        atomic_store_explicit(&l->owned, 0, memory_order_release);
        l = NULL;
    }
    if (!l)
        *rc = KEEL_ENOMEM;
    return l;
}

static inline lane *my_lane(keel_batch *b, int *rc)
{
    lane *l = keel__tslot_get(&b->owner);
    return KEEL__LIKELY(l != NULL) ? l : lane_attach(b, rc);
}

/* Reserves places for lane l, whose `busy` is set or under mu: false
 * when room is empty. */
static bool reserve(keel_batch *b, lane *l)
{
    uint64_t r = atomic_load_explicit(&b->room, memory_order_relaxed);
    uint64_t step = atomic_load_explicit(&b->step, memory_order_relaxed);
    while (r) {
        uint64_t k = r < step ? r : step;
        if (atomic_compare_exchange_weak_explicit(&b->room, &r, r - k, memory_order_relaxed,
                                                  memory_order_relaxed)) {
            l->credit += k;
            return true;
        }
    }
    return false;
}

/* Under mu, with room empty: takes back the places the lanes other than
 * l hold reserved. Each is flagged, then (a heavy fence) waited for while
 * busy: an add in progress may still use its reserve, one that starts
 * later sees the flag and comes to make_room(), so after the wait no
 * other lane's credit can change until mu is released. A flagged lane
 * holds no credit (it clears its flag under mu, to get some): when every
 * lane is flagged there is nothing to take, and no fence. Returns whether
 * any place came back. */
static KEEL__COLD bool steal(keel_batch *b, lane *l)
{
    bool flagged = false;
    for (lane *x = b->lanes; x; x = x->next)
        if (x != l && !atomic_load_explicit(&x->reclaim, memory_order_relaxed)) {
            atomic_store_explicit(&x->reclaim, 1, memory_order_relaxed);
            flagged = true;
        }
    if (!flagged)
        return false;
    keel__heavy_fence(); /* reclaim before busy: see keel_batch_add() */
    uint64_t got = 0;
    for (lane *x = b->lanes; x; x = x->next) {
        if (x == l)
            continue;
        while (atomic_load_explicit(&x->busy, memory_order_acquire))
            sched_yield();
        got += x->credit;
        x->credit = 0;
    }
    if (got)
        room_give(b, got);
    return got != 0;
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

/* Under mu: j joins the in-flight list, numbered after every other. */
static void live_add(keel_batch *b, bjob *j)
{
    j->seq = b->next_seq++;
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

/* Under mu: every batch numbered below this is done. */
static uint64_t watermark(keel_batch *b)
{
    return b->live ? b->live->seq : b->next_seq;
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
    cb_frame frame = {b, callbacks};
    callbacks = &frame;
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
        atomic_fetch_add_explicit(&b->handled, n - nf, memory_order_release); /* see keel_batch_stats_get() */
        if (nf == 0)
            break;
        size_t k = 0; /* keep the failed items, in order */
        for (size_t i = 0; i < n; i++)
            if (j->failed[i])
                j->items[k++] = j->items[i];
        n = k;
        if (attempt >= b->o.max_retries) {
            dead_letter(b, j->items, n, rc ? rc : KEEL_EBACKEND);
            atomic_fetch_add_explicit(&b->dead, n, memory_order_release);
            break;
        }
        /* the wait starts now; only then is the retry counted (so a test
         * that sees the count may move its clock) */
        uint64_t until = keel__sat_add(keel__clock_now(&b->clock), keel_backoff_next(&bo));
        atomic_fetch_add_explicit(&b->retried, n, memory_order_release);
        sleep_until(b, until);
    }
    callbacks = frame.outer;
    pthread_mutex_lock(&b->mu);
    live_remove(b, j);
    j->next = b->spare;
    b->spare = j;
    pthread_mutex_unlock(&b->mu);
}

/* ---- the batcher ---- */

/* Under mu: waits until `need` items are queued (at most `ns` of real
 * time; 0: until woken), or a flush or close asks, without missing the
 * producer's wake-up. */
static void wait_items(keel_batch *b, uint64_t need, uint64_t ns)
{
    for (int spin = 0; spin < 2000; spin++) { /* up to a hundred microseconds */
        if (spin % 32 == 0 && queued(b) >= need) /* each look takes the lanes' lines away */
            return;
        keel__cpu_relax();
    }
    uint64_t share = need / (b->nlanes ? b->nlanes : 1);
    share = share ? share : 1;
    if (share > 1 && b->nlanes > 1 && (ns == 0 || ns > POLL_NS))
        ns = POLL_NS; /* a share can be missed: look again soon */
    atomic_store(&b->wake_need, share);
    keel__heavy_fence();
    if (queued(b) < need) {
        if (ns) {
            struct timespec ts;
            keel__abstime_in(ns, &ts);
            pthread_cond_timedwait(&b->batcher_cv, &b->mu, &ts);
        } else {
            pthread_cond_wait(&b->batcher_cv, &b->mu);
        }
    }
    atomic_store(&b->wake_need, NOT_WAITING);
}

/* Under mu: fills j from the lanes, one after another, each time starting
 * one lane further, so that no lane waits behind a busy one. Returns
 * true when the bytes left are too few for the next item. */
static bool fill(keel_batch *b, bjob *j, size_t *bytes)
{
    lane *start = b->rr ? b->rr : b->lanes, *l = start;
    bool full = false;
    do {
        full = take(b, l, j, bytes, b->o.max_items, false);
        l = l->next ? l->next : b->lanes;
    } while (!full && j->n < b->o.max_items && l != start);
    b->rr = start->next ? start->next : b->lanes;
    return full;
}

/* Under mu: the next batch, closed by count, bytes, linger, flush or
 * close; NULL when closed and drained. */
static bjob *form(keel_batch *b)
{
    bjob *j = NULL;
    while (!j) {
        while (!any_queued(b)) {
            if (b->closing)
                return NULL;
            wait_items(b, 1, 0);
        }
        if (!(j = job_get(b))) { /* no memory for a batch: try again soon */
            pthread_mutex_unlock(&b->mu);
            nanosleep(&(struct timespec){0, 1000000}, NULL);
            pthread_mutex_lock(&b->mu);
        }
    }
    live_add(b, j);
    j->opened = atomic_load(&b->opened);
    if (j->opened == UNSTAMPED) { /* items no add stamped (yet): now */
        uint64_t now = keel__clock_now(&b->clock), want = UNSTAMPED;
        atomic_compare_exchange_strong(&b->opened, &want, now == UNSTAMPED ? now - 1 : now);
        j->opened = atomic_load(&b->opened);
    }
    size_t bytes = 0;
    for (;;) {
        size_t had = j->n;
        bool full = fill(b, j, &bytes);
        full = full || j->n == b->o.max_items || (b->o.max_bytes && bytes >= b->o.max_bytes);
        if (full || b->closing || b->flushers) {
            b->streaming = full;
            break;
        }
        if (j->n == had)
            b->streaming = false; /* a look found nothing: be woken again */
        uint64_t due = keel__sat_add(j->opened, b->o.linger_ns);
        uint64_t ns = real_wait(b, due);
        if (ns == 0) {
            b->streaming = false;
            break; /* lingered long enough */
        }
        if (b->o.max_bytes && ns > POLL_NS)
            ns = POLL_NS; /* producers cannot tell when bytes fill it: look */
        if (b->streaming) { /* batches fill by count: look again soon, unwoken */
            struct timespec ts;
            keel__abstime_in(ns < STREAM_NS ? ns : STREAM_NS, &ts);
            pthread_cond_timedwait(&b->batcher_cv, &b->mu, &ts);
        } else {
            wait_items(b, b->o.max_items - j->n, ns);
        }
    }
    /* The next batch opens now if items are waiting, else with the next
     * add. The add publishes, fences, then looks for UNSTAMPED; here the
     * store of UNSTAMPED, a heavy fence, a look at the lanes: one of the
     * two sees the other, so the next batch is stamped by someone. */
    if (!any_queued(b)) {
        atomic_store(&b->opened, UNSTAMPED);
        keel__heavy_fence();
    }
    if (any_queued(b)) {
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
        while (b->nwork >= 2 * b->nworkers) /* workers busy: let the lanes fill */
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

static KEEL__COLD void wake_batcher(keel_batch *b)
{
    pthread_mutex_lock(&b->mu);
    pthread_cond_signal(&b->batcher_cv);
    pthread_mutex_unlock(&b->mu);
}

/* Writes the item into lane l and publishes it: the caller has set
 * `busy`, seen `closed` and `reclaim` clear (or holds a place made under
 * mu), holds a place (credit) and block k. */
static inline void publish(keel_batch *b, lane *l, bblock *k, void *item, size_t bytes)
{
    if (k != l->wblk) {
        atomic_store_explicit(&l->wblk->next, k, memory_order_release);
        l->wblk = k;
        l->widx = 0;
    }
    k->it[l->widx++] = (bitem){item, bytes};
    l->credit--; /* while busy: a steal waits for it */
    uint64_t t = atomic_load_explicit(&l->tail, memory_order_relaxed) + 1;
    atomic_store_explicit(&l->tail, t, memory_order_release);
    atomic_store_explicit(&l->busy, 0, memory_order_release);
    keel__light_fence(); /* the publish before the loads below: see form() and wait_items() */
    if (atomic_load_explicit(&b->opened, memory_order_relaxed) == UNSTAMPED) { /* this add opens a batch */
        uint64_t now = keel__clock_now(&b->clock), want = UNSTAMPED;
        if (atomic_load(&l->head) < t) /* not taken already (a late stamp would shorten the next linger) */
            atomic_compare_exchange_strong(&b->opened, &want, now == UNSTAMPED ? now - 1 : now);
    }
    uint64_t need = atomic_load_explicit(&b->wake_need, memory_order_relaxed);
    if (KEEL__UNLIKELY(need != NOT_WAITING) && t - atomic_load_explicit(&l->head, memory_order_relaxed) >= need)
        wake_batcher(b);
}

/* KEEL_BATCH_DROP_OLDEST with a full queue, under mu, with the lane
 * marked busy and `closed` seen clear: takes the oldest item queued by
 * the caller's thread (or, when it has none queued, another thread's
 * oldest) out, keeps its place for this add, publishes the item, and only
 * then dead-letters the dropped one (KEEL_EFULL). A close waits until the
 * item is published (the dropped item is in flight meanwhile, so flushes
 * wait for its dead letter). The place goes straight to this add, so one
 * add drops at most one item. Returns false, still under mu, when no lane
 * holds an item; else true, with mu released. */
static KEEL__COLD bool add_dropping(keel_batch *b, lane *mine, bblock *k, void *item, size_t bytes)
{
    void *old;
    bjob d = {.n = 0, .items = &old};
    lane *l = mine;
    for (lane *x = b->lanes; x && !lane_queued(l); x = x->next)
        l = x;
    if (!lane_queued(l))
        return false;
    size_t nbytes = 0;
    live_add(b, &d);
    take(b, l, &d, &nbytes, 1, true);
    mine->credit++;
    atomic_fetch_add_explicit(&b->dropped, 1, memory_order_release);
    pthread_mutex_unlock(&b->mu);
    publish(b, mine, k, item, bytes);
    cb_frame frame = {b, callbacks}; /* a flush from the callback would wait for itself */
    callbacks = &frame;
    dead_letter(b, &old, 1, KEEL_EFULL);
    callbacks = frame.outer;
    pthread_mutex_lock(&b->mu);
    live_remove(b, &d);
    pthread_mutex_unlock(&b->mu);
    return true;
}

/* Under mu: waits once for room (KEEL_BATCH_BLOCK) until `deadline` by
 * the clock option (0: no limit): 0 to try again, or KEEL_ETIMEDOUT when
 * the deadline had passed. Once, not until room shows: what came back may
 * already sit in another add's reserve, which the caller takes back. */
static int wait_space(keel_batch *b, uint64_t deadline)
{
    /* places come back under mu: none now means a wake-up comes */
    if (b->closing || atomic_load(&b->room) != 0)
        return 0;
    uint64_t ns = deadline ? real_wait(b, deadline) : 0; /* a clock of the caller's: looked at every POLL_NS */
    if (deadline && ns == 0)
        return KEEL_ETIMEDOUT;
    b->space_waiters++;
    if (deadline) {
        struct timespec ts;
        keel__abstime_in(ns, &ts);
        pthread_cond_timedwait(&b->space_cv, &b->mu, &ts);
    } else {
        pthread_cond_wait(&b->space_cv, &b->mu);
    }
    b->space_waiters--;
    return 0;
}

/* The slow part of an add, for lane l with no place of its own (none
 * left, or taken back): under mu, a place from room or from the other
 * lanes' reserves, else the policy. Returns 0 with a place and `busy`
 * set (the caller publishes at once, so the place cannot be stolen
 * before it is used), 1 when accepted by a drop (the item is published),
 * or an error. */
static KEEL__COLD int make_room(keel_batch *b, lane *l, bblock *k, void *item, size_t bytes)
{
    uint64_t deadline = 0;
    int rc = 0;
    pthread_mutex_lock(&b->mu);
    for (;;) {
        atomic_store_explicit(&l->busy, 1, memory_order_relaxed);
        keel__light_fence(); /* busy before closed: see keel_batch_close() */
        if (atomic_load_explicit(&b->closed, memory_order_relaxed)) {
            rc = KEEL_ECLOSED;
            break;
        }
        atomic_store_explicit(&l->reclaim, 0, memory_order_relaxed); /* steals hold mu: none now */
        if (l->credit || reserve(b, l) || (steal(b, l) && reserve(b, l))) {
            pthread_mutex_unlock(&b->mu);
            return 0;
        }
        if (in_callback(b) || b->o.on_full == KEEL_BATCH_REJECT) {
            rc = KEEL_EFULL; /* from a handler, waiting would wait for ourselves */
            break;
        }
        if (b->o.on_full == KEEL_BATCH_DROP_OLDEST) {
            if (add_dropping(b, l, k, item, bytes))
                return 1;
            /* unreachable: with every reserve taken, the queue holds capacity items */
            atomic_store_explicit(&l->busy, 0, memory_order_release);
            pthread_mutex_unlock(&b->mu);
            sched_yield();
            pthread_mutex_lock(&b->mu);
            continue;
        }
        atomic_store_explicit(&l->busy, 0, memory_order_release); /* a close waits for busy lanes */
        if (b->o.block_timeout_ns && !deadline)
            deadline = keel__sat_add(keel__clock_now(&b->clock), b->o.block_timeout_ns);
        if ((rc = wait_space(b, deadline)) != 0)
            break;
    }
    atomic_store_explicit(&l->busy, 0, memory_order_release);
    pthread_mutex_unlock(&b->mu);
    return rc;
}

KEEL_API int keel_batch_add(keel_batch *b, void *item, size_t bytes)
{
    if (!b || !item)
        return KEEL_EINVAL;
    int rc = 0;
    lane *l = my_lane(b, &rc);
    if (!l)
        return rc;
    atomic_store_explicit(&l->busy, 1, memory_order_relaxed);
    keel__light_fence(); /* busy before closed and reclaim: see keel_batch_close(), steal() */
    bblock *k = l->wblk;
    if (KEEL__UNLIKELY(atomic_load_explicit(&b->closed, memory_order_relaxed)))
        rc = KEEL_ECLOSED; /* first: a closed batch answers so, whatever else stands in the way */
    else if (KEEL__UNLIKELY(l->making_room))
        rc = KEEL_EFULL; /* from the dead letter of a drop for this thread's add */
    else if (KEEL__UNLIKELY(l->widx == BLOCK_ITEMS) && !(k = block_get(l)))
        rc = KEEL_ENOMEM; /* the block before a place: a place made by dropping an item must be used */
    if (KEEL__UNLIKELY(rc)) {
        atomic_store_explicit(&l->busy, 0, memory_order_release);
        return rc;
    }
    if (KEEL__UNLIKELY(atomic_load_explicit(&l->reclaim, memory_order_relaxed) ||
                       (l->credit == 0 && !reserve(b, l)))) {
        atomic_store_explicit(&l->busy, 0, memory_order_release);
        l->making_room = true; /* the place a drop makes, and the block, are this add's */
        rc = make_room(b, l, k, item, bytes);
        l->making_room = false;
        if (rc < 0)
            block_keep(l, k);
        if (rc)
            return rc < 0 ? rc : 0; /* refused, or accepted by a drop */
    }
    publish(b, l, k, item, bytes);
    return 0;
}

/* ---- flush, close ---- */

/* Under mu: closes the batches holding items accepted so far and waits for
 * every one of them to be done. */
static void drain(keel_batch *b)
{
    b->flushers++;
    pthread_cond_signal(&b->batcher_cv);
    for (lane *l = b->lanes; l; l = l->next) { /* lanes made meanwhile hold only later items */
        uint64_t t = atomic_load_explicit(&l->tail, memory_order_acquire);
        while (atomic_load_explicit(&l->head, memory_order_relaxed) < t)
            pthread_cond_wait(&b->done_cv, &b->mu);
    }
    uint64_t formed = b->next_seq; /* every item above is in one of these */
    while (watermark(b) < formed)
        pthread_cond_wait(&b->done_cv, &b->mu);
    b->flushers--;
}

KEEL_API int keel_batch_flush(keel_batch *b)
{
    if (!b)
        return KEEL_EINVAL;
    if (in_callback(b))
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
    if (in_callback(b))
        return KEEL_ESTATE;
    atomic_store(&b->closed, 1);
    keel__heavy_fence(); /* closed before busy: see keel_batch_add() */
    pthread_mutex_lock(&b->mu);
    if (b->close_state) {
        while (b->close_state != 2)
            pthread_cond_wait(&b->done_cv, &b->mu);
        pthread_mutex_unlock(&b->mu);
        return 0;
    }
    b->close_state = 1;
    for (lane *l = b->lanes; l; l = l->next) /* an add that missed `closed` publishes now */
        while (atomic_load_explicit(&l->busy, memory_order_acquire))
            sched_yield();
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
    /* The outcomes first (acquire, against their release increments):
     * every item they count had been taken, so the heads and tails read
     * after them cover it, and finished + queued <= accepted. */
    st->handled = atomic_load_explicit(&b->handled, memory_order_acquire);
    st->dead_lettered = atomic_load_explicit(&b->dead, memory_order_acquire);
    st->dropped = atomic_load_explicit(&b->dropped, memory_order_acquire);
    st->retried = atomic_load(&b->retried);
    pthread_mutex_lock(&b->mu);
    for (lane *l = b->lanes; l; l = l->next) {
        uint64_t t = atomic_load_explicit(&l->tail, memory_order_acquire); /* once: accepted and queued agree */
        st->accepted += t;
        st->queued += t - atomic_load_explicit(&l->head, memory_order_relaxed);
    }
    pthread_mutex_unlock(&b->mu);
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
    b->o.linger_ns = o->linger_ns ? o->linger_ns : 5000000u;
    b->o.retry_base_ns = o->retry_base_ns ? o->retry_base_ns : 100000000u;
    b->o.retry_max_ns = o->retry_max_ns ? o->retry_max_ns : 10000000000u;
    if (b->o.retry_max_ns < b->o.retry_base_ns)
        b->o.retry_max_ns = b->o.retry_base_ns;
    b->clock = (keel__clock){o->clock, o->clock_ud};
    b->o.capacity = o->capacity ? o->capacity : 65536;
    b->o.max_items = o->max_items ? o->max_items : b->o.capacity < 100 ? b->o.capacity : 100;
    b->chunk = b->o.capacity / 64 > CHUNK_MAX ? CHUNK_MAX : b->o.capacity / 64 ? b->o.capacity / 64 : 1;
    atomic_init(&b->step, b->chunk);
    if (b->o.max_items > b->o.capacity) {
        keel__aligned_free(b);
        return KEEL_EINVAL;
    }
    b->nworkers = o->workers > 1 ? o->workers : 0;
    atomic_init(&b->opened, UNSTAMPED);
    atomic_init(&b->wake_need, NOT_WAITING);
    atomic_init(&b->room, b->o.capacity);
    b->owner.thread_exit = lane_exit;
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
    int rc = keel__towner_register(&b->owner);
    b->registered = rc == 0;
    if (rc == 0 && b->nworkers && !(b->workers = keel__calloc(b->nworkers, sizeof *b->workers)))
        rc = KEEL_ENOMEM;
    /* One batch now: a max_items no memory can hold fails here, not in a
     * batcher that would retry for ever; and with it the batcher always
     * gets a batch back in the end, if not a new one. */
    if (rc == 0 && !(b->spare = job_get(b)))
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
    if (in_callback(b)) { /* its threads run us: freeing it would pull the floor away */
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
    if (b->registered) { /* no thread exit hands a lane back after this */
        keel__towner_unregister(&b->owner, NULL, NULL);
        keel__tslot_drop(&b->owner);
    }
    for (lane *l = b->lanes, *next; l; l = next) {
        next = l->next;
        blocks_free(l->rblk); /* the blocks in use, up to the one being written */
        blocks_free(atomic_load(&l->spares));
        blocks_free(l->mine);
        keel__aligned_free(l);
    }
    keel__free(b->workers);
    pthread_mutex_destroy(&b->mu);
    pthread_cond_destroy(&b->batcher_cv);
    pthread_cond_destroy(&b->space_cv);
    pthread_cond_destroy(&b->done_cv);
    pthread_cond_destroy(&b->work_cv);
    keel__aligned_free(b);
}
