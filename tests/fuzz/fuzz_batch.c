/* tests/fuzz/fuzz_batch.c — keel_batch under a sequence of adds and
 * flushes from one thread, then close, with a handler that fails items as
 * the input says, against batch.h's accounting.
 *
 * Input: eight bytes of options, then operations [op][arg].
 *   [0] max_items % 9 (0: the default, 100).
 *   [1] max_bytes: % 4 == 0 none, else 1 + (byte >> 2) % 64.
 *   [2] capacity: % 4 == 0 the default, else max_items + (byte >> 2) % 32.
 *   [3] on_full: odd DROP_OLDEST, even REJECT (never BLOCK).
 *   [4] workers % 3: 0 (one), 1, 2 + bit 7 (two or three).
 *   [5] max_retries % 4.
 *   [6] bit 0 the clock: 0 frozen (no linger ever ends: batches close by
 *       count, bytes, flush or close, and random numbers are 0, so
 *       retries wait 0), 1 moving by 1 ms at every read (linger and every
 *       backoff end at the next read; random numbers from the input).
 *       Bits 1-2: linger, bits 3-4: retry base, for the moving clock.
 *   [7] % 8: 0-3 good options; 4 no handler, 5 an unknown policy, 6 1025
 *       workers, 7 a capacity under max_items or over 2^40 (all bad).
 * op % 4: 0, 1 add an item of arg % 64 bytes; 2 flush; 3 add arg % 32 + 1
 * items. The op's bits 2-7 give the items' fates: how many attempts fail
 * (0 to 3), whether a failure fails the whole call (a nonzero return, no
 * marks) or marks items with keel_batch_fail() (returning 0 or not).
 *
 * Checks: create refuses exactly the bad options; add answers 0, or
 * KEEL_EFULL only under REJECT, and KEEL_ECLOSED after close; the queue
 * never holds more than capacity; a first attempt holds only items never
 * seen, at most max_items, at most max_bytes unless a single item, in the
 * order they were added, and with workers = 1 after every earlier batch;
 * a retry holds exactly the items the previous attempt failed, in order,
 * with the next attempt number (workers = 1: at once); retries spent go
 * to dead_letter with the last return (KEEL_EBACKEND for marks only), a
 * drop with KEEL_EFULL, one item, in the adding thread, oldest first;
 * after a flush every item accepted before it is handled, dead-lettered
 * or dropped, exactly once; with the frozen clock and no drops the
 * batches are exactly the greedy split of the items by max_items and
 * max_bytes between flushes; the stats equal the model's: accepted = handled +
 * dead_lettered + dropped, retried, batches, queued 0 after a flush.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>

#include <keel/batch.h>

#include "fuzz.h"

#define MAX_IDS 512
#define MAX_CALLS 4096
#define MAX_FLUSHES 32
#define MS 1000000ull

enum { NEW, REJECTED, QUEUED, IN_FLIGHT, HANDLED, DEAD, DROPPED };

typedef struct item {
    size_t bytes;
    uint8_t fate;  /* the attempts that fail: 0 .. fate - 1 */
    bool whole;    /* its failure fails the whole call */
    bool rc;       /* with marks, return nonzero too */
    int status;
    int fail_call; /* the call whose failure it waits on */
    uint32_t batch_first; /* its first attempt's first item */
} item;

typedef struct call {
    uint32_t attempt;
    size_t nfailed;
    int rc;
} call;

typedef struct state {
    const uint8_t *d;
    size_t size;
    pthread_mutex_t mu; /* everything below */
    pthread_t main;
    item it[MAX_IDS];
    uint32_t nids;
    call calls[MAX_CALLS];
    size_t ncalls;
    /* options as used */
    size_t max_items, max_bytes, capacity, workers;
    uint32_t max_retries;
    keel_batch_full on_full;
    bool frozen;
    /* order with one worker */
    int64_t max_seen; /* highest id a first attempt has held */
    int pending_retry, pending_dead; /* workers = 1: what must come next */
    int64_t last_dropped;
    uint64_t handled, dead, dropped, retried, batches, accepted;
    /* clock and random numbers */
    _Atomic uint64_t now;
    _Atomic uint64_t rand_i;
} state;

static uint64_t fake_clock(void *ud)
{
    state *st = ud;
    return st->frozen ? atomic_load(&st->now) : atomic_fetch_add(&st->now, MS) + MS;
}

static uint64_t input_rand(void *ud)
{
    state *st = ud;
    if (st->frozen)
        return 0;
    uint64_t i = atomic_fetch_add(&st->rand_i, 1);
    return (st->d[i % st->size] + 1) * 0x9e3779b97f4a7c15ull;
}

static uint32_t id_of(const state *st, const void *p)
{
    const item *x = p;
    KF_CHECK(x >= st->it && x < st->it + st->nids, "an item that was never added: %p", p);
    return (uint32_t)(x - st->it);
}

/* ---- the callbacks ---- */

static void first_attempt(state *st, const uint32_t *ids, size_t n)
{
    KF_CHECK(n <= st->max_items, "a batch of %zu items, max_items %zu", n, st->max_items);
    size_t bytes = 0;
    for (size_t i = 0; i < n; i++) {
        item *x = &st->it[ids[i]];
        KF_CHECK(x->status == QUEUED, "item %u in a first attempt with status %d", ids[i], x->status);
        x->status = IN_FLIGHT;
        x->batch_first = ids[0];
        bytes += x->bytes;
    }
    /* "a bigger item goes alone": alone, not even with zero-byte items */
    KF_CHECK(!st->max_bytes || n <= 1 || bytes <= st->max_bytes,
             "a batch of %zu items, %zu bytes, max_bytes %zu", n, bytes, st->max_bytes);
    if (st->workers <= 1) {
        KF_CHECK((int64_t)ids[0] > st->max_seen, "batch from item %u after item %lld", ids[0],
                 (long long)st->max_seen);
        KF_CHECK(st->pending_retry < 0 && st->pending_dead < 0,
                 "a new batch before the retry or dead letter of call %d/%d", st->pending_retry,
                 st->pending_dead);
    }
    if ((int64_t)ids[n - 1] > st->max_seen)
        st->max_seen = ids[n - 1];
    st->batches++;
}

static void retry_attempt(state *st, const uint32_t *ids, size_t n, uint32_t attempt)
{
    int c = st->it[ids[0]].fail_call;
    KF_CHECK(c >= 0, "item %u retried without a failure", ids[0]);
    KF_CHECK(st->calls[c].attempt + 1 == attempt && st->calls[c].nfailed == n,
             "attempt %u of %zu items after attempt %u failed %zu", attempt, n, st->calls[c].attempt,
             st->calls[c].nfailed);
    KF_CHECK(attempt <= st->max_retries, "attempt %u, max_retries %u", attempt, st->max_retries);
    for (size_t i = 0; i < n; i++)
        KF_CHECK(st->it[ids[i]].status == IN_FLIGHT && st->it[ids[i]].fail_call == c,
                 "item %u in a retry of call %d: status %d, failed in call %d", ids[i], c,
                 st->it[ids[i]].status, st->it[ids[i]].fail_call);
    if (st->workers <= 1) {
        KF_CHECK(st->pending_retry == c, "retry of call %d, expected call %d", c, st->pending_retry);
        st->pending_retry = -1;
    }
}

static int handler(void *const *items, size_t n, keel_batch_ctx *ctx, void *ud)
{
    state *st = ud;
    uint32_t ids[MAX_IDS];
    KF_CHECK(n >= 1 && n <= MAX_IDS, "handler with %zu items", n);
    pthread_mutex_lock(&st->mu);
    for (size_t i = 0; i < n; i++) {
        ids[i] = id_of(st, items[i]);
        KF_CHECK(i == 0 || ids[i] > ids[i - 1], "items %u then %u in one call", ids[i - 1], ids[i]);
    }
    uint32_t attempt = keel_batch_attempt(ctx);
    if (attempt == 0)
        first_attempt(st, ids, n);
    else
        retry_attempt(st, ids, n, attempt);
    KF_CHECK(keel_batch_fail(ctx, n) == KEEL_EINVAL, "fail of index n");
    /* the items that fail now, and how */
    int first_failing = -1;
    size_t nfail = 0;
    for (size_t i = 0; i < n; i++)
        if (st->it[ids[i]].fate > attempt) {
            if (first_failing < 0)
                first_failing = (int)i;
            nfail++;
        }
    int rc = 0;
    bool whole = first_failing >= 0 && st->it[ids[first_failing]].whole;
    if (whole) {
        rc = -1000 - (int)attempt;
        nfail = n;
    } else if (first_failing >= 0) {
        for (size_t i = 0; i < n; i++)
            if (st->it[ids[i]].fate > attempt) {
                KF_CHECK(keel_batch_fail(ctx, i) == 0, "fail %zu of %zu", i, n);
                KF_CHECK(keel_batch_fail(ctx, i) == 0, "fail %zu again", i);
            }
        rc = st->it[ids[first_failing]].rc ? -2000 : 0;
    }
    KF_CHECK(st->ncalls < MAX_CALLS, "too many calls");
    int c = (int)st->ncalls++;
    st->calls[c] = (call){attempt, nfail, rc};
    for (size_t i = 0; i < n; i++) {
        item *x = &st->it[ids[i]];
        if (whole || x->fate > attempt) {
            x->fail_call = c;
        } else {
            x->status = HANDLED;
            st->handled++;
        }
    }
    if (nfail) {
        if (attempt >= st->max_retries) {
            st->pending_dead = st->workers <= 1 ? c : -1;
        } else {
            st->retried += nfail;
            st->pending_retry = st->workers <= 1 ? c : -1;
        }
    }
    pthread_mutex_unlock(&st->mu);
    return rc;
}

static void dead_letter(void *const *items, size_t n, int err, void *ud)
{
    state *st = ud;
    pthread_mutex_lock(&st->mu);
    if (err == KEEL_EFULL) { /* dropped from a full queue */
        KF_CHECK(st->on_full == KEEL_BATCH_DROP_OLDEST, "a drop under policy %d", (int)st->on_full);
        KF_CHECK(n == 1, "a drop of %zu items", n);
        KF_CHECK(pthread_equal(pthread_self(), st->main), "a drop outside the adding thread");
        uint32_t id = id_of(st, items[0]);
        KF_CHECK(st->it[id].status == QUEUED, "dropped item %u has status %d", id, st->it[id].status);
        KF_CHECK((int64_t)id > st->last_dropped, "dropped %u after %lld: not the oldest", id,
                 (long long)st->last_dropped);
        st->last_dropped = id;
        st->it[id].status = DROPPED;
        st->dropped++;
        pthread_mutex_unlock(&st->mu);
        return;
    }
    KF_CHECK(n >= 1, "a dead letter of no items");
    uint32_t id0 = id_of(st, items[0]);
    int c = st->it[id0].fail_call;
    KF_CHECK(c >= 0, "item %u dead-lettered without a failure", id0);
    const call *cl = &st->calls[c];
    KF_CHECK(cl->attempt == st->max_retries && cl->nfailed == n,
             "dead letter of %zu items after attempt %u failed %zu (max_retries %u)", n, cl->attempt,
             cl->nfailed, st->max_retries);
    KF_CHECK(err == (cl->rc ? cl->rc : KEEL_EBACKEND), "dead letter err %d, the last attempt returned %d",
             err, cl->rc);
    for (size_t i = 0; i < n; i++) {
        uint32_t id = id_of(st, items[i]);
        item *x = &st->it[id];
        KF_CHECK(x->status == IN_FLIGHT && x->fail_call == c, "dead item %u: status %d, call %d of %d", id,
                 x->status, x->fail_call, c);
        x->status = DEAD;
        st->dead++;
    }
    if (st->workers <= 1) {
        KF_CHECK(st->pending_dead == c, "dead letter of call %d, expected %d", c, st->pending_dead);
        st->pending_dead = -1;
    }
    pthread_mutex_unlock(&st->mu);
}

/* ---- the main thread ---- */

static void check_stats(state *st, keel_batch *b, bool settled)
{
    keel_batch_stats s;
    keel_batch_stats_get(b, &s);
    pthread_mutex_lock(&st->mu);
    KF_CHECK(s.accepted == st->accepted, "accepted %llu, model %llu", (unsigned long long)s.accepted,
             (unsigned long long)st->accepted);
    KF_CHECK(s.queued <= st->capacity, "%llu queued, capacity %zu", (unsigned long long)s.queued,
             st->capacity);
    if (settled) {
        KF_CHECK(s.queued == 0, "%llu queued after a flush", (unsigned long long)s.queued);
        KF_CHECK(s.accepted == s.handled + s.dead_lettered + s.dropped,
                 "accepted %llu != handled %llu + dead %llu + dropped %llu", (unsigned long long)s.accepted,
                 (unsigned long long)s.handled, (unsigned long long)s.dead_lettered,
                 (unsigned long long)s.dropped);
        KF_CHECK(s.handled == st->handled && s.dead_lettered == st->dead && s.dropped == st->dropped &&
                     s.retried == st->retried && s.batches == st->batches,
                 "stats %llu/%llu/%llu/%llu/%llu, model %llu/%llu/%llu/%llu/%llu",
                 (unsigned long long)s.handled, (unsigned long long)s.dead_lettered,
                 (unsigned long long)s.dropped, (unsigned long long)s.retried,
                 (unsigned long long)s.batches, (unsigned long long)st->handled,
                 (unsigned long long)st->dead, (unsigned long long)st->dropped,
                 (unsigned long long)st->retried, (unsigned long long)st->batches);
        uint64_t sizes = 0, waits = 0;
        for (int i = 0; i < KEEL_BATCH_BUCKETS; i++)
            sizes += s.size[i], waits += s.wait[i];
        KF_CHECK(sizes == s.batches && waits == s.batches, "histograms %llu/%llu, batches %llu",
                 (unsigned long long)sizes, (unsigned long long)waits, (unsigned long long)s.batches);
    }
    pthread_mutex_unlock(&st->mu);
}

/* After a flush or close: every item of [from, nids) is settled, and with
 * the frozen clock and no drops the batches are the greedy split of those
 * not rejected. */
static void check_segment(state *st, uint32_t from)
{
    pthread_mutex_lock(&st->mu);
    /* A batch also closes when the next item does not fit in its bytes,
     * and that item may be dropped afterwards: with drops, the split of
     * what is left depends on timing. */
    bool greedy = st->frozen;
    for (uint32_t id = from; id < st->nids; id++)
        greedy = greedy && st->it[id].status != DROPPED;
    uint32_t first = UINT32_MAX;
    size_t n = 0, bytes = 0;
    for (uint32_t id = from; id < st->nids; id++) {
        item *x = &st->it[id];
        KF_CHECK(x->status == REJECTED || x->status == HANDLED || x->status == DEAD || x->status == DROPPED,
                 "item %u not settled after a flush: status %d", id, x->status);
        if (!greedy || x->status == REJECTED)
            continue;
        bool fits = n < st->max_items && (!st->max_bytes || x->bytes <= st->max_bytes - bytes);
        bool at_max = st->max_bytes && bytes >= st->max_bytes;
        if (first == UINT32_MAX || !fits || at_max) {
            first = id; /* a new batch */
            n = 0;
            bytes = 0;
        }
        n++;
        bytes += x->bytes < st->max_bytes - bytes ? x->bytes : st->max_bytes - bytes;
        KF_CHECK(x->batch_first == first, "item %u in the batch of item %u, greedy split: %u", id,
                 x->batch_first, first);
    }
    pthread_mutex_unlock(&st->mu);
}

static void add_one(state *st, keel_batch *b, size_t bytes, uint8_t fate_bits)
{
    if (st->nids == MAX_IDS)
        return;
    pthread_mutex_lock(&st->mu);
    uint32_t id = st->nids++;
    item *x = &st->it[id];
    unsigned f = fate_bits & 7;
    *x = (item){.bytes = bytes, .fate = (uint8_t)(f < 5 ? 0 : f - 4), .whole = (fate_bits >> 3) & 1,
                .rc = (fate_bits >> 4) & 1, .status = QUEUED, .fail_call = -1};
    st->accepted++;
    pthread_mutex_unlock(&st->mu);
    /* counted before the add returns: the batcher may hand it on at once */
    int rc = keel_batch_add(b, x, bytes);
    if (rc == 0)
        return;
    KF_CHECK(rc == KEEL_EFULL && st->on_full == KEEL_BATCH_REJECT, "add returned %d under policy %d", rc,
             (int)st->on_full);
    pthread_mutex_lock(&st->mu);
    KF_CHECK(x->status == QUEUED, "rejected item %u was seen", id);
    x->status = REJECTED;
    st->accepted--;
    pthread_mutex_unlock(&st->mu);
}

int LLVMFuzzerTestOneInput(const uint8_t *d, size_t size)
{
    if (size < 8)
        return 0;
    state *st = kf_calloc(sizeof *st);
    st->d = d;
    st->size = size;
    pthread_mutex_init(&st->mu, NULL);
    st->main = pthread_self();
    st->max_seen = st->last_dropped = -1;
    st->pending_retry = st->pending_dead = -1;
    atomic_init(&st->now, 1000 * MS);
    atomic_init(&st->rand_i, 0);

    unsigned bad = d[7] % 8;
    keel_batch_opts o = {.dead_letter = dead_letter, .ud = st, .max_items = d[0] % 9u,
                         .clock = fake_clock, .clock_ud = st, .rand = input_rand, .rand_ud = st};
    o.handler = bad == 4 ? NULL : handler;
    size_t mi = o.max_items ? o.max_items : 100;
    o.max_bytes = d[1] % 4 ? 1 + (d[1] >> 2) % 64u : 0;
    o.capacity = d[2] % 4 ? mi + (d[2] >> 2) % 32u : 0;
    o.on_full = (d[3] & 1) ? KEEL_BATCH_DROP_OLDEST : KEEL_BATCH_REJECT;
    o.workers = d[4] % 3u == 2 ? 2u + (d[4] >> 7) : d[4] % 3u;
    o.max_retries = d[5] % 4u;
    st->frozen = !(d[6] & 1);
    o.linger_ns = st->frozen ? 3600000 * MS : (1 + (d[6] >> 1 & 3)) * MS / 4;
    o.retry_base_ns = (1 + (d[6] >> 3 & 3)) * 1000;
    o.retry_max_ns = MS;
    if (bad == 5)
        o.on_full = (keel_batch_full)3;
    if (bad == 6)
        o.workers = 1025;
    if (bad == 7) /* a max_items of 0 shrinks to a small capacity: then only an oversized one fails */
        o.capacity = o.max_items > 1 ? o.max_items - 1 : ((size_t)1 << 40) + 1;
    keel_batch *b = NULL;
    int rc = keel_batch_create(&b, &o);
    KF_CHECK((rc == 0) == (bad < 4), "bad option %u: create returned %d", bad, rc);
    if (rc) {
        KF_CHECK(b == NULL, "*out set on failure");
        pthread_mutex_destroy(&st->mu);
        free(st);
        return 0;
    }
    st->max_items = mi;
    st->max_bytes = o.max_bytes;
    st->capacity = o.capacity ? o.capacity : 65536;
    st->workers = o.workers;
    st->max_retries = o.max_retries;
    st->on_full = o.on_full;

    uint32_t seg = 0;
    size_t flushes = 0;
    for (size_t i = 8; i + 2 <= size && st->nids < MAX_IDS; i += 2) {
        uint8_t op = d[i], arg = d[i + 1];
        switch (op % 4) {
        case 0:
        case 1:
            add_one(st, b, arg % 64u, op >> 2);
            break;
        case 2:
            if (flushes++ == MAX_FLUSHES)
                break;
            KF_CHECK(keel_batch_flush(b) == 0, "flush");
            check_segment(st, seg);
            check_stats(st, b, true);
            seg = st->nids;
            break;
        default:
            for (unsigned k = 0; k <= arg % 32u; k++)
                add_one(st, b, (arg * 7u + k * 13u) % 64u, (op & 4) && k % 3 == 0 ? (uint8_t)(op >> 3) | 4 : 0);
            break;
        }
        check_stats(st, b, false);
    }
    KF_CHECK(keel_batch_close(b) == 0, "close");
    check_segment(st, seg);
    check_stats(st, b, true);
    static int sentinel;
    KF_CHECK(keel_batch_add(b, &sentinel, 1) == KEEL_ECLOSED, "add after close");
    KF_CHECK(keel_batch_close(b) == 0, "a second close");
    KF_CHECK(keel_batch_add(NULL, &sentinel, 1) == KEEL_EINVAL && keel_batch_add(b, NULL, 1) == KEEL_EINVAL,
             "add with NULL");
    check_stats(st, b, true);
    keel_batch_destroy(b);
    pthread_mutex_destroy(&st->mu);
    free(st);
    return 0;
}
