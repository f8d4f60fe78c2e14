/* tests/test_batch.c — keel_batch: flushing by count, bytes and linger
 * under the fake clock; flush and close with concurrent producers; each
 * full-queue policy; partial failure, backoff, dead letters; the
 * accounting invariant over two million items with random failures; a
 * seeded model of random options and operations (linger, backoff, order,
 * drops, flush and close on the fake clock); re-entrant adds; bad input; rows into a real PostgreSQL that is
 * stopped mid-run; and members into a Redis set through a restart, or
 * dead-lettered, also by a close while the server is down. */
#define _GNU_SOURCE
#include <libpq-fe.h>
#include <pthread.h>
#include <sched.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <keel/backoff.h>
#include <keel/batch.h>
#include <keel/pg.h>
#include <keel/redis.h>

#include "harness.h"

#define MS KT_MS
#define S KT_S
#define ID(p) ((size_t)(uintptr_t)(p))
#define ITEM(i) ((void *)(uintptr_t)(i))

static kt_clock clk;

/* What the handlers saw, for the tests to wait on. */
typedef struct seen {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    size_t batches, items, dead, attempts;
    size_t entered;         /* handler calls begun, blocked or not */
    size_t sizes[64];
    uint64_t attempt_at[16];
    int dead_err;
    int fail_mode;          /* 0 none, 1 odd ids on the first attempt, 2 always */
    int block;              /* the handler waits while this is set */
    size_t gate;            /* if set, handler calls from this one on wait */
    keel_batch *self;       /* for re-entrant adds */
} seen;

static void seen_init(seen *s)
{
    memset(s, 0, sizeof *s);
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
}

/* Waits (10 s at most, real time: the handler runs in another thread)
 * until *field reaches want. */
static void wait_for(seen *s, size_t *field, size_t want)
{
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 10;
    pthread_mutex_lock(&s->mu);
    while (*field < want && pthread_cond_timedwait(&s->cv, &s->mu, &until) == 0)
        ;
    size_t got = *field;
    pthread_mutex_unlock(&s->mu);
    ck_assert_msg(got >= want, "waited for %zu, have %zu", want, got);
}

/* Gives the batch threads a moment, to check that something did NOT
 * happen: a slow machine can only make such a check pass, not fail. */
static void settle(void)
{
    kt_nap(30 * MS);
}

/* Waits until the batch has counted `n` retries: its backoff has begun. */
static void wait_retried(keel_batch *b, uint64_t n)
{
    keel_batch_stats st;
    for (int i = 0; i < 10000; i++) {
        keel_batch_stats_get(b, &st);
        if (st.retried >= n)
            return;
        kt_nap(MS);
    }
    ck_abort_msg("no retry came");
}

/* Lets a handler held by s->block go on. */
static void unblock(seen *s)
{
    pthread_mutex_lock(&s->mu);
    s->block = 0;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

static size_t get(seen *s, size_t *field)
{
    pthread_mutex_lock(&s->mu);
    size_t v = *field;
    pthread_mutex_unlock(&s->mu);
    return v;
}

static int handler(void *const *items, size_t n, keel_batch_ctx *ctx, void *ud)
{
    seen *s = ud;
    pthread_mutex_lock(&s->mu);
    size_t call = ++s->entered;
    pthread_cond_broadcast(&s->cv);
    while (s->block || (s->gate && call >= s->gate))
        pthread_cond_wait(&s->cv, &s->mu);
    uint32_t attempt = keel_batch_attempt(ctx);
    if (s->attempts < 16)
        s->attempt_at[s->attempts] = kt_clock_now(&clk);
    s->attempts++;
    int rc = s->fail_mode == 2 ? KEEL_EBACKEND : 0;
    size_t failed = 0;
    for (size_t i = 0; rc == 0 && i < n; i++)
        if (s->fail_mode == 1 && attempt == 0 && ID(items[i]) % 2) {
            keel_batch_fail(ctx, i);
            failed++;
        }
    if (rc == 0) {
        s->batches++;
        s->sizes[s->batches < 64 ? s->batches - 1 : 63] = n;
        s->items += n - failed;
    }
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return rc;
}

static void dead_letter(void *const *items, size_t n, int err, void *ud)
{
    (void)items;
    seen *s = ud;
    pthread_mutex_lock(&s->mu);
    s->dead += n;
    s->dead_err = err;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

static keel_batch *make(seen *s, keel_batch_opts o)
{
    o.handler = handler;
    o.dead_letter = dead_letter;
    o.ud = s;
    o.clock = kt_clock_now;
    o.clock_ud = &clk;
    keel_batch *b;
    ck_assert_int_eq(keel_batch_create(&b, &o), 0);
    return b;
}

static void check_invariant(keel_batch *b)
{
    keel_batch_stats st;
    keel_batch_stats_get(b, &st);
    ck_assert_uint_eq(st.accepted, st.handled + st.dead_lettered + st.dropped);
    ck_assert_uint_eq(st.queued, 0);
}

START_TEST(a_batch_closes_at_max_items)
{
    seen s;
    seen_init(&s);
    keel_batch *b = make(&s, (keel_batch_opts){.max_items = 10, .linger_ns = 3600 * S});
    for (int i = 1; i <= 25; i++)
        ck_assert_int_eq(keel_batch_add(b, ITEM(i), 1), 0);
    wait_for(&s, &s.batches, 2);
    settle();
    ck_assert_uint_eq(get(&s, &s.batches), 2); /* the last 5 linger */
    ck_assert_uint_eq(s.sizes[0], 10);
    ck_assert_uint_eq(s.sizes[1], 10);
    kt_clock_advance(&clk, 3600 * S);
    wait_for(&s, &s.batches, 3);
    ck_assert_uint_eq(s.sizes[2], 5);
    keel_batch_close(b);
    check_invariant(b);
    keel_batch_destroy(b);
}
END_TEST

START_TEST(a_batch_closes_at_max_bytes)
{
    seen s;
    seen_init(&s);
    keel_batch *b = make(&s, (keel_batch_opts){.max_items = 100, .max_bytes = 100,
                                               .linger_ns = 3600 * S});
    for (int i = 1; i <= 7; i++) /* 30 bytes each: three fit, the fourth would not */
        ck_assert_int_eq(keel_batch_add(b, ITEM(i), 30), 0);
    ck_assert_int_eq(keel_batch_add(b, ITEM(8), 150), 0); /* too big for any batch: alone */
    ck_assert_int_eq(keel_batch_add(b, ITEM(9), 10), 0);
    wait_for(&s, &s.batches, 3);
    ck_assert_uint_eq(s.sizes[0], 3);
    ck_assert_uint_eq(s.sizes[1], 3);
    ck_assert_uint_eq(s.sizes[2], 1);
    ck_assert_int_eq(keel_batch_flush(b), 0);
    ck_assert_uint_eq(s.sizes[3], 1); /* the 150-byte item, alone */
    ck_assert_uint_eq(s.sizes[4], 1);
    keel_batch_destroy(b);
}
END_TEST

START_TEST(an_item_over_max_bytes_goes_alone_even_before_empty_ones)
{
    seen s;
    seen_init(&s);
    s.block = 1; /* the handler holds item 1 while the others queue */
    keel_batch *b = make(&s, (keel_batch_opts){.max_items = 4, .max_bytes = 10, .linger_ns = 3600 * S});
    ck_assert_int_eq(keel_batch_add(b, ITEM(1), 10), 0); /* full at once */
    wait_for(&s, &s.entered, 1);
    ck_assert_int_eq(keel_batch_add(b, ITEM(2), 100), 0);
    ck_assert_int_eq(keel_batch_add(b, ITEM(3), 0), 0); /* these once joined item 2: */
    ck_assert_int_eq(keel_batch_add(b, ITEM(4), 0), 0); /* they "fit" in 0 bytes left */
    unblock(&s);
    ck_assert_int_eq(keel_batch_flush(b), 0);
    ck_assert_uint_eq(get(&s, &s.batches), 3);
    ck_assert_uint_eq(s.sizes[1], 1);
    ck_assert_uint_eq(s.sizes[2], 2);
    keel_batch_destroy(b);
}
END_TEST

START_TEST(a_batch_closes_when_its_oldest_item_has_lingered)
{
    seen s;
    seen_init(&s);
    keel_batch *b = make(&s, (keel_batch_opts){.max_items = 100, .linger_ns = 5 * S});
    ck_assert_int_eq(keel_batch_add(b, ITEM(1), 1), 0);
    kt_clock_advance(&clk, 3 * S);
    ck_assert_int_eq(keel_batch_add(b, ITEM(2), 1), 0); /* the linger counts from item 1 */
    kt_clock_advance(&clk, 2 * S - 1);
    settle();
    ck_assert_uint_eq(get(&s, &s.batches), 0);
    kt_clock_advance(&clk, 1);
    wait_for(&s, &s.batches, 1);
    ck_assert_uint_eq(s.sizes[0], 2);
    keel_batch_stats st;
    keel_batch_stats_get(b, &st);
    ck_assert_uint_eq(st.wait[33], 1); /* 5 s: 2^32 < 5e9 <= 2^33 */
    keel_batch_destroy(b);
}
END_TEST

typedef struct producer {
    keel_batch *b;
    size_t from, n;
    _Atomic size_t *accepted;
} producer;

static void *produce(void *arg)
{
    producer *p = arg;
    for (size_t i = 0; i < p->n; i++)
        if (keel_batch_add(p->b, ITEM(p->from + i), 1) == 0)
            atomic_fetch_add(p->accepted, 1);
    return NULL;
}

START_TEST(flush_and_close_wait_for_everything_accepted_before)
{
    seen s;
    seen_init(&s);
    keel_batch *b = make(&s, (keel_batch_opts){.max_items = 64, .linger_ns = 3600 * S,
                                               .workers = 3});
    _Atomic size_t accepted = 0;
    producer p[2] = {{b, 1, 200000, &accepted}, {b, 1000001, 200000, &accepted}};
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&t[i], NULL, produce, &p[i]);
    for (int k = 0; k < 20; k++) { /* flushes while they add */
        size_t before = atomic_load(&accepted);
        ck_assert_int_eq(keel_batch_flush(b), 0);
        ck_assert_uint_ge(get(&s, &s.items), before);
    }
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
    ck_assert_int_eq(keel_batch_close(b), 0);
    ck_assert_uint_eq(get(&s, &s.items), 400000);
    ck_assert_int_eq(keel_batch_add(b, ITEM(1), 1), KEEL_ECLOSED);
    ck_assert_int_eq(keel_batch_close(b), 0); /* twice is fine */
    check_invariant(b);
    keel_batch_destroy(b);
}
END_TEST

typedef struct pending_add {
    keel_batch *b;
    void *item;
    _Atomic int rc; /* 1 while the add runs */
} pending_add;

static void *add_pending(void *arg)
{
    pending_add *a = arg;
    atomic_store(&a->rc, keel_batch_add(a->b, a->item, 1));
    return NULL;
}

/* Under KEEL_BATCH_BLOCK an add waits while the clock option stands
 * still, however long in real time, and times out once that clock has
 * moved block_timeout_ns. */
static int blocked_add_times_out_by_the_clock(seen *s, keel_batch *b, void *item)
{
    pending_add a = {b, item, 1};
    pthread_t t;
    ck_assert_int_eq(pthread_create(&t, NULL, add_pending, &a), 0);
    settle();
    ck_assert_int_eq(atomic_load(&a.rc), 1);
    kt_clock_advance(&clk, 3600 * S - 1);
    settle();
    ck_assert_int_eq(atomic_load(&a.rc), 1); /* 1 ns short */
    kt_clock_advance(&clk, 1);
    for (int i = 0; i < 5000 && atomic_load(&a.rc) == 1; i++)
        kt_nap(MS);
    if (atomic_load(&a.rc) == 1)
        unblock(s); /* not timed out: let it end, to fail below */
    pthread_join(t, NULL);
    return atomic_load(&a.rc);
}

START_TEST(each_full_queue_policy)
{
    for (int policy = 0; policy < 3; policy++) {
        seen s;
        seen_init(&s);
        s.block = 1; /* the handler holds item 1; the queue holds 8 */
        keel_batch *b = make(&s, (keel_batch_opts){.max_items = 1, .capacity = 8,
                                                   .on_full = (keel_batch_full)policy,
                                                   .block_timeout_ns = 3600 * S});
        ck_assert_int_eq(keel_batch_add(b, ITEM(1), 1), 0);
        wait_for(&s, &s.entered, 1); /* item 1 is taken */
        for (int i = 2; i <= 9; i++)
            ck_assert_int_eq(keel_batch_add(b, ITEM(i), 1), 0);
        int rc = policy == KEEL_BATCH_BLOCK ? blocked_add_times_out_by_the_clock(&s, b, ITEM(10))
                                            : keel_batch_add(b, ITEM(10), 1);
        keel_batch_stats st;
        keel_batch_stats_get(b, &st);
        if (policy == KEEL_BATCH_BLOCK) {
            ck_assert_int_eq(rc, KEEL_ETIMEDOUT);
            ck_assert_uint_eq(st.accepted, 9);
        } else if (policy == KEEL_BATCH_REJECT) {
            ck_assert_int_eq(rc, KEEL_EFULL);
            ck_assert_uint_eq(st.accepted, 9);
        } else {
            ck_assert_int_eq(rc, 0); /* item 2, the oldest queued, made room */
            ck_assert_uint_eq(st.accepted, 10);
            ck_assert_uint_eq(st.dropped, 1);
            ck_assert_uint_eq(get(&s, &s.dead), 1);
            ck_assert_int_eq(s.dead_err, KEEL_EFULL);
        }
        unblock(&s);
        ck_assert_int_eq(keel_batch_close(b), 0);
        /* handled: 1 to 9 (10 refused), or 1 and 3 to 10 (2 dropped) */
        ck_assert_uint_eq(get(&s, &s.items), 9);
        check_invariant(b);
        keel_batch_destroy(b);
    }
}
END_TEST

START_TEST(only_the_items_marked_failed_are_retried)
{
    seen s;
    seen_init(&s);
    s.fail_mode = 1;
    keel_batch *b = make(&s, (keel_batch_opts){.max_items = 10, .linger_ns = 3600 * S,
                                               .max_retries = 1, .retry_base_ns = 1 * MS});
    for (int i = 1; i <= 10; i++)
        keel_batch_add(b, ITEM(i), 1);
    wait_retried(b, 5);
    kt_clock_advance(&clk, 1 * MS);
    wait_for(&s, &s.attempts, 2);
    ck_assert_uint_eq(s.sizes[0], 10);
    ck_assert_uint_eq(s.sizes[1], 5); /* the odd ones, once more */
    keel_batch_close(b);
    keel_batch_stats st;
    keel_batch_stats_get(b, &st);
    ck_assert_uint_eq(st.handled, 10);
    ck_assert_uint_eq(st.retried, 5);
    ck_assert_uint_eq(st.dead_lettered, 0);
    keel_batch_destroy(b);
}
END_TEST

static uint64_t top_rand(void *ud)
{
    (void)ud;
    return UINT64_MAX; /* full jitter at its top: the delays are the caps */
}

START_TEST(retries_follow_the_backoff_then_the_dead_letter)
{
    seen s;
    seen_init(&s);
    s.fail_mode = 2;
    keel_batch *b = make(&s, (keel_batch_opts){.max_items = 4, .linger_ns = 1 * MS,
                                               .max_retries = 3, .retry_base_ns = 100 * MS,
                                               .retry_max_ns = 1 * S, .rand = top_rand});
    for (int i = 1; i <= 4; i++)
        keel_batch_add(b, ITEM(i), 1);
    wait_for(&s, &s.attempts, 1);
    keel_backoff_opts bo = {KEEL_BACKOFF_FULL_JITTER, 100 * MS, 1 * S, top_rand, NULL};
    for (uint32_t k = 0; k < 3; k++) {
        uint64_t delay = keel_backoff_delay(&bo, k, 0);
        wait_retried(b, 4 * (k + 1));
        kt_clock_advance(&clk, delay - 1);
        settle();
        ck_assert_uint_eq(get(&s, &s.attempts), k + 1); /* not yet */
        kt_clock_advance(&clk, 1);
        wait_for(&s, &s.attempts, k + 2);
        ck_assert_uint_ge(s.attempt_at[k + 1] - s.attempt_at[k], delay);
    }
    wait_for(&s, &s.dead, 4);
    ck_assert_int_eq(s.dead_err, KEEL_EBACKEND);
    keel_batch_close(b);
    keel_batch_stats st;
    keel_batch_stats_get(b, &st);
    ck_assert_uint_eq(st.handled, 0);
    ck_assert_uint_eq(st.retried, 12);
    ck_assert_uint_eq(st.dead_lettered, 4);
    check_invariant(b);
    keel_batch_destroy(b);
}
END_TEST

/* ---- two million items, random failures ---- */

enum { PER = 1000000 };
static _Atomic unsigned char fate[2 * PER + 1]; /* 0 pending, 1 handled, 2 dead */
static _Atomic size_t doubles;

static uint64_t rng_state = 88172645463325252ull;
static uint64_t xorshift(void)
{
    uint64_t x = __atomic_load_n(&rng_state, __ATOMIC_RELAXED);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    __atomic_store_n(&rng_state, x, __ATOMIC_RELAXED);
    return x;
}

/* Fails a whole batch now and then, else marks about one item in a
 * hundred; every item it lets succeed must be new to the success path. */
static int flaky_tracked(void *const *items, size_t n, keel_batch_ctx *ctx, void *ud)
{
    (void)ud;
    if (xorshift() % 50 == 0)
        return KEEL_EBACKEND;
    unsigned char mark[512] = {0};
    for (size_t i = 0; i < n && i < sizeof mark; i++)
        if (xorshift() % 100 == 0) {
            keel_batch_fail(ctx, i);
            mark[i] = 1;
        }
    for (size_t i = 0; i < n; i++) {
        if (mark[i])
            continue;
        unsigned char expect = 0;
        if (!atomic_compare_exchange_strong(&fate[ID(items[i])], &expect, 1))
            atomic_fetch_add(&doubles, 1);
    }
    return 0;
}

static void dead_tracked(void *const *items, size_t n, int err, void *ud)
{
    (void)err, (void)ud;
    for (size_t i = 0; i < n; i++) {
        unsigned char expect = 0;
        if (!atomic_compare_exchange_strong(&fate[ID(items[i])], &expect, 2))
            atomic_fetch_add(&doubles, 1);
    }
}

static void two_million(size_t workers)
{
    memset(fate, 0, sizeof fate);
    atomic_store(&doubles, 0);
    keel_batch *b;
    keel_batch_opts o = {.handler = flaky_tracked, .dead_letter = dead_tracked, .max_items = 256,
                         .linger_ns = 100000, .capacity = 4096, .workers = workers,
                         .max_retries = 2, .retry_base_ns = 1000, .retry_max_ns = 10000};
    ck_assert_int_eq(keel_batch_create(&b, &o), 0);
    _Atomic size_t accepted = 0;
    producer p[2] = {{b, 1, PER, &accepted}, {b, PER + 1, PER, &accepted}};
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&t[i], NULL, produce, &p[i]);
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
    ck_assert_int_eq(keel_batch_close(b), 0);
    keel_batch_stats st;
    keel_batch_stats_get(b, &st);
    ck_assert_uint_eq(st.accepted, 2 * PER);
    ck_assert_uint_eq(st.accepted, st.handled + st.dead_lettered + st.dropped);
    ck_assert_uint_eq(atomic_load(&doubles), 0);
    size_t handled = 0, dead = 0;
    for (size_t i = 1; i <= 2 * PER; i++) {
        handled += fate[i] == 1;
        dead += fate[i] == 2;
    }
    ck_assert_uint_eq(handled, st.handled);
    ck_assert_uint_eq(dead, st.dead_lettered);
    ck_assert_uint_eq(handled + dead, 2 * PER); /* every item, exactly once */
    ck_assert_uint_gt(st.retried, 0);
    ck_assert_uint_gt(dead, 0);
    keel_batch_destroy(b);
}

START_TEST(two_million_items_all_accounted_for_one_worker)
{
    two_million(1);
}
END_TEST

START_TEST(two_million_items_all_accounted_for_three_workers)
{
    two_million(3);
}
END_TEST

/* ---- each thread's order; threads that exit; close among adds ---- */

static int count_items(void *const *items, size_t n, keel_batch_ctx *ctx, void *ud)
{
    (void)items, (void)ctx;
    atomic_fetch_add((_Atomic size_t *)ud, n);
    return 0;
}


enum { ORDER_THREADS = 3, ORDER_PER = 100000 };
static _Atomic size_t order_next[ORDER_THREADS]; /* the next sequence number each thread's items must show */
static _Atomic size_t order_breaks;

static int in_order(void *const *items, size_t n, keel_batch_ctx *ctx, void *ud)
{
    (void)ctx, (void)ud;
    for (size_t i = 0; i < n; i++) {
        size_t id = ID(items[i]), t = id / (ORDER_PER + 1), seq = id % (ORDER_PER + 1);
        if (atomic_load(&order_next[t]) != seq)
            atomic_fetch_add(&order_breaks, 1);
        atomic_store(&order_next[t], seq + 1);
    }
    return 0;
}

static void *add_in_order(void *arg)
{
    producer *p = arg;
    for (size_t i = 0; i < p->n; i++)
        if (keel_batch_add(p->b, ITEM(p->from + i), 1) != 0) /* not ck_assert: each call writes to a pipe */
            atomic_fetch_add(&order_breaks, 1);
    return NULL;
}

/* One worker: each thread's items reach the handler in the order that
 * thread added them, though the threads' items interleave. */
START_TEST(each_thread_keeps_its_order)
{
    keel_batch *b;
    keel_batch_opts o = {.handler = in_order, .max_items = 64, .linger_ns = 100000, .capacity = 1000};
    ck_assert_int_eq(keel_batch_create(&b, &o), 0);
    pthread_t t[ORDER_THREADS];
    producer p[ORDER_THREADS];
    for (size_t i = 0; i < ORDER_THREADS; i++) {
        atomic_store(&order_next[i], 1);
        p[i] = (producer){b, i * (ORDER_PER + 1) + 1, ORDER_PER, NULL};
        ck_assert_int_eq(pthread_create(&t[i], NULL, add_in_order, &p[i]), 0);
    }
    for (size_t i = 0; i < ORDER_THREADS; i++)
        pthread_join(t[i], NULL);
    ck_assert_int_eq(keel_batch_close(b), 0);
    ck_assert_uint_eq(atomic_load(&order_breaks), 0);
    for (size_t i = 0; i < ORDER_THREADS; i++)
        ck_assert_uint_eq(atomic_load(&order_next[i]), ORDER_PER + 1);
    check_invariant(b);
    keel_batch_destroy(b);
}
END_TEST

static void *add_one(void *arg)
{
    producer *p = arg;
    ck_assert_int_eq(keel_batch_add(p->b, ITEM(p->from), 1), 0);
    return NULL;
}

/* A thread that added and exited leaves its item queued and its reserve
 * of room behind: the next thread takes over its queue, and the whole
 * capacity is there for the adds that follow. */
START_TEST(an_exited_thread_leaves_its_items_and_its_room)
{
    seen s;
    seen_init(&s);
    s.block = 1; /* the handler holds item 1; the queue holds the rest */
    keel_batch *b = make(&s, (keel_batch_opts){.max_items = 1, .capacity = 1000, .on_full = KEEL_BATCH_REJECT});
    ck_assert_int_eq(keel_batch_add(b, ITEM(1), 1), 0);
    wait_for(&s, &s.entered, 1); /* item 1 is taken */
    producer p = {b, 5000, 1, NULL};
    pthread_t t;
    ck_assert_int_eq(pthread_create(&t, NULL, add_one, &p), 0);
    pthread_join(t, NULL); /* it reserved 15 places and used one */
    p.from = 5001;
    ck_assert_int_eq(pthread_create(&t, NULL, add_one, &p), 0);
    pthread_join(t, NULL); /* a new thread: the same queue */
    size_t n = 0;
    while (keel_batch_add(b, ITEM(n + 2), 1) == 0)
        n++;
    ck_assert_uint_eq(n, 998); /* exactly the rest: nothing is held by the threads that left */
    keel_batch_stats st;
    keel_batch_stats_get(b, &st);
    ck_assert_uint_eq(st.accepted, 1001);
    ck_assert_uint_eq(st.queued, 1000);
    unblock(&s);
    ck_assert_int_eq(keel_batch_close(b), 0);
    ck_assert_uint_eq(get(&s, &s.items), 1001);
    check_invariant(b);
    keel_batch_destroy(b);
}
END_TEST

typedef struct racer {
    keel_batch *b;
    size_t base, ok;
    int bad; /* an answer other than 0 or KEEL_ECLOSED */
} racer;

static void *add_until_closed(void *arg)
{
    racer *r = arg;
    for (size_t i = 1;; i++) {
        int rc = keel_batch_add(r->b, ITEM(r->base + i), 1);
        if (rc == KEEL_ECLOSED)
            return NULL;
        if (rc != 0)
            r->bad = rc;
        else
            r->ok++;
    }
}

/* Close while threads add: every add that returned 0 is handled, no other. */
START_TEST(close_among_adds_keeps_what_it_accepted)
{
    _Atomic size_t handled = 0;
    keel_batch *b;
    keel_batch_opts o = {.handler = count_items, .ud = &handled, .max_items = 100, .linger_ns = 100000};
    ck_assert_int_eq(keel_batch_create(&b, &o), 0);
    racer r[2] = {{b, 0, 0, 0}, {b, 1u << 30, 0, 0}};
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        ck_assert_int_eq(pthread_create(&t[i], NULL, add_until_closed, &r[i]), 0);
    keel_batch_stats st;
    do /* until both are well under way */
        keel_batch_stats_get(b, &st);
    while (st.accepted < 20000);
    ck_assert_int_eq(keel_batch_close(b), 0);
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
    keel_batch_stats_get(b, &st);
    ck_assert_int_eq(r[0].bad | r[1].bad, 0);
    ck_assert_uint_eq(st.accepted, r[0].ok + r[1].ok);
    ck_assert_uint_eq(atomic_load(&handled), st.accepted);
    check_invariant(b);
    keel_batch_destroy(b);
}
END_TEST

static void *add_98(void *arg)
{
    keel_batch *b = arg;
    for (uintptr_t i = 3; i <= 100; i++)
        ck_assert_int_eq(keel_batch_add(b, ITEM(i), 1), 0);
    return NULL;
}

static void wait_stat(keel_batch *b, _Atomic size_t *handled, size_t want_handled, bool want_empty)
{
    keel_batch_stats st;
    for (int i = 0; i < 10000; i++) {
        keel_batch_stats_get(b, &st);
        if (want_empty ? st.accepted && !st.queued : atomic_load(handled) >= want_handled)
            return;
        kt_nap(MS);
    }
    ck_abort_msg("waited 10 s: %zu handled, %llu queued", atomic_load(handled), (unsigned long long)st.queued);
}

/* The batcher waits for a batch to fill, asking each thread's queue for
 * its share; a thread that starts adding meanwhile changes the shares and
 * must not leave a full batch waiting for its (hour-long) linger. */
START_TEST(a_thread_joining_a_filling_batch_does_not_leave_it_waiting)
{
    _Atomic size_t handled = 0;
    keel_batch *b;
    keel_batch_opts o = {.handler = count_items, .ud = &handled, .max_items = 100, .linger_ns = 3600 * S};
    ck_assert_int_eq(keel_batch_create(&b, &o), 0);
    ck_assert_int_eq(keel_batch_add(b, ITEM(1), 1), 0);
    wait_stat(b, &handled, 0, true); /* the batcher holds it, waiting for 99 more */
    ck_assert_int_eq(keel_batch_add(b, ITEM(2), 1), 0);
    pthread_t t;
    ck_assert_int_eq(pthread_create(&t, NULL, add_98, b), 0);
    pthread_join(t, NULL);
    wait_stat(b, &handled, 100, false);
    keel_batch_destroy(b);
}
END_TEST

/* ---- re-entrancy, bad input ---- */

static int reentrant(void *const *items, size_t n, keel_batch_ctx *ctx, void *ud)
{
    (void)ctx;
    seen *s = ud;
    for (size_t i = 0; i < n; i++)
        if (ID(items[i]) < 100) /* each first-generation item adds a follow-up */
            ck_assert_int_eq(keel_batch_add(s->self, ITEM(ID(items[i]) + 100), 1), 0);
    ck_assert_int_eq(keel_batch_flush(s->self), KEEL_ESTATE);
    ck_assert_int_eq(keel_batch_close(s->self), KEEL_ESTATE);
    pthread_mutex_lock(&s->mu);
    s->items += n;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return 0;
}

START_TEST(a_handler_may_add_items)
{
    seen s;
    seen_init(&s);
    keel_batch_opts o = {.handler = reentrant, .ud = &s, .max_items = 7, .linger_ns = 1,
                         .capacity = 16};
    ck_assert_int_eq(keel_batch_create(&s.self, &o), 0);
    for (int i = 1; i <= 10; i++)
        ck_assert_int_eq(keel_batch_add(s.self, ITEM(i), 1), 0);
    wait_for(&s, &s.items, 20);
    ck_assert_int_eq(keel_batch_close(s.self), 0);
    ck_assert_uint_eq(s.items, 20);
    check_invariant(s.self);
    keel_batch_destroy(s.self);
}
END_TEST

START_TEST(bad_input_is_refused)
{
    keel_batch *b;
    ck_assert_int_eq(keel_batch_create(&b, NULL), KEEL_EINVAL);
    ck_assert_int_eq(keel_batch_create(&b, &(keel_batch_opts){0}), KEEL_EINVAL);
    ck_assert_int_eq(keel_batch_create(&b, &(keel_batch_opts){.handler = handler, .on_full = 9}),
                     KEEL_EINVAL);
    ck_assert_int_eq(keel_batch_create(&b, &(keel_batch_opts){.handler = handler, .workers = 5000}),
                     KEEL_EINVAL);
    ck_assert_int_eq(keel_batch_create(&b, &(keel_batch_opts){.handler = handler, .max_items = 100,
                                                               .capacity = 16}),
                     KEEL_EINVAL);
    ck_assert_int_eq(keel_batch_create(&b, &(keel_batch_opts){.handler = handler,
                                                               .capacity = ((size_t)1 << 40) + 1}),
                     KEEL_EINVAL);
    ck_assert_int_eq(keel_batch_create(&b, &(keel_batch_opts){.handler = handler, .capacity = (size_t)1 << 40}), 0);
    keel_batch_destroy(b); /* 2^40 itself is fine */
    seen s;
    seen_init(&s);
    /* the default max_items is 100, or the capacity when that is smaller */
    b = make(&s, (keel_batch_opts){.capacity = 16, .linger_ns = 3600 * S});
    for (int i = 1; i <= 16; i++)
        ck_assert_int_eq(keel_batch_add(b, ITEM(i), 1), 0);
    wait_for(&s, &s.batches, 1);
    ck_assert_uint_eq(s.sizes[0], 16);
    keel_batch_destroy(b);
    b = make(&s, (keel_batch_opts){0});
    ck_assert_int_eq(keel_batch_add(b, NULL, 1), KEEL_EINVAL);
    ck_assert_int_eq(keel_batch_add(NULL, ITEM(1), 1), KEEL_EINVAL);
    ck_assert_int_eq(keel_batch_fail(NULL, 0), KEEL_EINVAL);
    ck_assert_int_eq(keel_batch_flush(NULL), KEEL_EINVAL);
    keel_batch_destroy(b); /* without close: it closes */
    keel_batch_destroy(NULL);
}
END_TEST

/* An allocator with no block over 1 GiB to give. */
static void *small_malloc(size_t n) { return n > ((size_t)1 << 30) ? NULL : malloc(n); }
static void *small_calloc(size_t n, size_t size)
{
    return size && n > ((size_t)1 << 30) / size ? NULL : calloc(n, size);
}
static void *small_realloc(void *p, size_t n) { return n > ((size_t)1 << 30) ? NULL : realloc(p, n); }

/* A batch of max_items that memory cannot hold: create says so, rather
 * than start a batcher that retries for ever at the first item. */
START_TEST(a_batch_memory_cannot_hold_fails_at_create)
{
    keel_allocator small = {small_malloc, small_calloc, small_realloc, free};
    ck_assert_int_eq(keel_set_allocator(&small), 0);
    keel_batch *b;
    keel_batch_opts o = {.handler = handler, .max_items = (size_t)1 << 30, .capacity = (size_t)1 << 30};
    ck_assert_int_eq(keel_batch_create(&b, &o), KEEL_ENOMEM);
    ck_assert_ptr_null(b);
    ck_assert_int_eq(keel_set_allocator(NULL), 0);
}
END_TEST

/* A dead letter that keeps the ids it was given. */
static _Atomic size_t last_dead_id;
static void id_dead_letter(void *const *items, size_t n, int err, void *ud)
{
    dead_letter(items, n, err, ud);
    atomic_store(&last_dead_id, ID(items[n - 1]));
}

typedef struct holder {
    keel_batch *b;
    size_t from, n;
    _Atomic int release; /* the thread stays (and keeps its queue) until this is set */
    _Atomic int added;
} holder;

static void *add_and_hold(void *arg)
{
    holder *h = arg;
    for (size_t i = 0; i < h->n; i++)
        ck_assert_int_eq(keel_batch_add(h->b, ITEM(h->from + i), 1), 0);
    atomic_store(&h->added, 1);
    while (!atomic_load(&h->release))
        kt_nap(MS);
    return NULL;
}

/* KEEL_BATCH_DROP_OLDEST drops the adding thread's own oldest item, though
 * another thread's queued item is older; a thread with none queued drops
 * the oldest item of some other thread's queue. */
START_TEST(a_drop_takes_the_adding_thread_s_own_oldest_item)
{
    seen s;
    seen_init(&s);
    s.block = 1; /* the handler holds item 1; the queue holds 8 */
    keel_batch *b;
    keel_batch_opts o = {.handler = handler, .dead_letter = id_dead_letter, .ud = &s, .clock = kt_clock_now,
                         .clock_ud = &clk, .max_items = 1, .capacity = 8, .on_full = KEEL_BATCH_DROP_OLDEST};
    ck_assert_int_eq(keel_batch_create(&b, &o), 0);
    ck_assert_int_eq(keel_batch_add(b, ITEM(1), 1), 0);
    wait_for(&s, &s.entered, 1); /* item 1 is taken */
    holder h = {b, 2, 2, 0, 0};
    pthread_t t;
    ck_assert_int_eq(pthread_create(&t, NULL, add_and_hold, &h), 0);
    while (!atomic_load(&h.added)) /* 2 and 3, the oldest queued, in its queue */
        kt_nap(MS);
    for (int i = 4; i <= 9; i++)
        ck_assert_int_eq(keel_batch_add(b, ITEM(i), 1), 0);
    ck_assert_int_eq(keel_batch_add(b, ITEM(10), 1), 0);
    ck_assert_uint_eq(atomic_load(&last_dead_id), 4); /* this thread's oldest, not 2 */
    holder u = {b, 11, 1, 1, 0}; /* a new thread, nothing queued of its own */
    pthread_t tu;
    ck_assert_int_eq(pthread_create(&tu, NULL, add_and_hold, &u), 0);
    pthread_join(tu, NULL);
    size_t d = atomic_load(&last_dead_id);
    ck_assert_msg(d == 2 || d == 5, "dropped %zu: the oldest of no queue", d);
    atomic_store(&h.release, 1);
    pthread_join(t, NULL);
    unblock(&s);
    ck_assert_int_eq(keel_batch_close(b), 0);
    ck_assert_uint_eq(get(&s, &s.dead), 2);
    ck_assert_uint_eq(get(&s, &s.items), 9);
    check_invariant(b);
    keel_batch_destroy(b);
}
END_TEST

/* An allocator that gives nothing while `starved` is set. */
static _Atomic int starved;
static void *starve_malloc(size_t n) { return atomic_load(&starved) ? NULL : malloc(n); }
static void *starve_calloc(size_t n, size_t size) { return atomic_load(&starved) ? NULL : calloc(n, size); }
static void *starve_realloc(void *p, size_t n) { return atomic_load(&starved) ? NULL : realloc(p, n); }

/* KEEL_BATCH_DROP_OLDEST drops an item to accept the new one: an add that
 * cannot accept it (no memory for its queue's next block) drops nothing. */
START_TEST(a_drop_oldest_add_without_memory_drops_nothing)
{
    keel_allocator starving = {starve_malloc, starve_calloc, starve_realloc, free};
    ck_assert_int_eq(keel_set_allocator(&starving), 0);
    seen s;
    seen_init(&s);
    keel_batch *b = make(&s, (keel_batch_opts){.max_items = 1, .capacity = 8,
                                               .on_full = KEEL_BATCH_DROP_OLDEST});
    for (int i = 1; i <= 246; i++) { /* into this thread's first block of 255, dropping none */
        ck_assert_int_eq(keel_batch_add(b, ITEM(i), 1), 0);
        ck_assert_int_eq(keel_batch_flush(b), 0);
    }
    s.block = 1; /* the handler holds item 247; 248 to 255 fill the queue and the block */
    ck_assert_int_eq(keel_batch_add(b, ITEM(247), 1), 0);
    wait_for(&s, &s.entered, 247);
    for (int i = 248; i <= 255; i++)
        ck_assert_int_eq(keel_batch_add(b, ITEM(i), 1), 0);
    atomic_store(&starved, 1);
    int rc = keel_batch_add(b, ITEM(256), 1); /* needs a new block */
    atomic_store(&starved, 0);
    ck_assert_int_eq(rc, KEEL_ENOMEM);
    keel_batch_stats st;
    keel_batch_stats_get(b, &st);
    ck_assert_uint_eq(st.dropped, 0);
    ck_assert_uint_eq(get(&s, &s.dead), 0);
    ck_assert_int_eq(keel_batch_add(b, ITEM(256), 1), 0); /* with memory: 248 makes room */
    unblock(&s);
    ck_assert_int_eq(keel_batch_close(b), 0);
    keel_batch_stats_get(b, &st);
    ck_assert_uint_eq(st.dropped, 1);
    check_invariant(b);
    keel_batch_destroy(b);
    ck_assert_int_eq(keel_set_allocator(NULL), 0);
}
END_TEST

/* A dead letter for a dropped item that adds to the batch again. */
static _Atomic int readd_rc = -1;
static void readd_dead_letter(void *const *items, size_t n, int err, void *ud)
{
    seen *s = ud;
    dead_letter(items, n, err, ud);
    atomic_store(&readd_rc, keel_batch_add(s->self, ITEM(1000), 1));
}

/* That dead letter runs inside the add that dropped the item: an add from
 * it is turned away (KEEL_EFULL; it would drop another item, for ever),
 * and the first add keeps its place and its block. */
START_TEST(an_add_from_a_drop_s_dead_letter_is_turned_away)
{
    seen s;
    seen_init(&s);
    keel_batch *b;
    keel_batch_opts o = {.handler = handler, .dead_letter = readd_dead_letter, .ud = &s, .clock = kt_clock_now,
                         .clock_ud = &clk, .max_items = 1, .capacity = 8, .on_full = KEEL_BATCH_DROP_OLDEST};
    ck_assert_int_eq(keel_batch_create(&b, &o), 0);
    s.self = b;
    for (int i = 1; i <= 246; i++) { /* into this thread's first block of 255 */
        ck_assert_int_eq(keel_batch_add(b, ITEM(i), 1), 0);
        ck_assert_int_eq(keel_batch_flush(b), 0);
    }
    s.block = 1; /* the handler holds 247; 248 to 255 fill the queue and the block */
    ck_assert_int_eq(keel_batch_add(b, ITEM(247), 1), 0);
    wait_for(&s, &s.entered, 247);
    for (int i = 248; i <= 255; i++)
        ck_assert_int_eq(keel_batch_add(b, ITEM(i), 1), 0);
    ck_assert_int_eq(keel_batch_add(b, ITEM(256), 1), 0); /* drops 248 */
    ck_assert_int_eq(atomic_load(&readd_rc), KEEL_EFULL);
    unblock(&s);
    ck_assert_int_eq(keel_batch_close(b), 0);
    keel_batch_stats st;
    keel_batch_stats_get(b, &st);
    ck_assert_uint_eq(st.accepted, 256);
    ck_assert_uint_eq(st.dropped, 1);
    ck_assert_uint_eq(get(&s, &s.items), 255); /* all but 248, 256 among them */
    check_invariant(b);
    keel_batch_destroy(b);
}
END_TEST

/* After close an add answers KEEL_ECLOSED, even one that would need
 * memory for its queue's next block, which there is none of. */
START_TEST(an_add_after_close_is_closed_even_without_memory)
{
    keel_allocator starving = {starve_malloc, starve_calloc, starve_realloc, free};
    ck_assert_int_eq(keel_set_allocator(&starving), 0);
    seen s;
    seen_init(&s);
    keel_batch *b = make(&s, (keel_batch_opts){.max_items = 100});
    for (int i = 1; i <= 255; i++) /* this thread's first block, full */
        ck_assert_int_eq(keel_batch_add(b, ITEM(i), 1), 0);
    ck_assert_int_eq(keel_batch_close(b), 0);
    atomic_store(&starved, 1);
    int rc = keel_batch_add(b, ITEM(256), 1);
    atomic_store(&starved, 0);
    ck_assert_int_eq(rc, KEEL_ECLOSED);
    check_invariant(b);
    keel_batch_destroy(b);
    ck_assert_int_eq(keel_set_allocator(NULL), 0);
}
END_TEST

static void *close_batch(void *arg);

/* A drop's dead letter that starts a close in another thread, then adds
 * again. */
static _Atomic int closer_started;
static pthread_t closer;
static void closing_dead_letter(void *const *items, size_t n, int err, void *ud)
{
    seen *s = ud;
    dead_letter(items, n, err, ud);
    ck_assert_int_eq(pthread_create(&closer, NULL, close_batch, s->self), 0);
    while (!atomic_load(&closer_started))
        kt_nap(MS);
    int rc = KEEL_EFULL;
    for (int i = 0; i < 2000 && rc == KEEL_EFULL; i++) { /* until close has begun */
        rc = keel_batch_add(s->self, ITEM(1000), 1);
        if (rc == KEEL_EFULL)
            kt_nap(MS);
    }
    atomic_store(&readd_rc, rc);
}

static void *close_batch(void *arg)
{
    atomic_store(&closer_started, 1);
    ck_assert_int_eq(keel_batch_close(arg), 0);
    return NULL;
}

/* An add from a drop's dead letter is turned away with KEEL_EFULL while
 * the batch is open, with KEEL_ECLOSED once a close has begun. */
START_TEST(an_add_from_a_drop_s_dead_letter_after_close_is_closed)
{
    seen s;
    seen_init(&s);
    s.block = 1; /* the handler holds item 1 */
    keel_batch *b;
    keel_batch_opts o = {.handler = handler, .dead_letter = closing_dead_letter, .ud = &s, .clock = kt_clock_now,
                         .clock_ud = &clk, .max_items = 1, .capacity = 1, .on_full = KEEL_BATCH_DROP_OLDEST};
    ck_assert_int_eq(keel_batch_create(&b, &o), 0);
    s.self = b;
    ck_assert_int_eq(keel_batch_add(b, ITEM(1), 1), 0);
    wait_for(&s, &s.entered, 1);
    ck_assert_int_eq(keel_batch_add(b, ITEM(2), 1), 0); /* the queue is full */
    atomic_store(&readd_rc, -1);
    ck_assert_int_eq(keel_batch_add(b, ITEM(3), 1), 0); /* drops 2; close waits for its dead letter */
    int rc = atomic_load(&readd_rc);
    ck_assert_int_eq(rc, KEEL_ECLOSED);
    unblock(&s);
    pthread_join(closer, NULL);
    keel_batch_stats st;
    keel_batch_stats_get(b, &st);
    ck_assert_uint_eq(st.accepted, 3);
    ck_assert_uint_eq(st.dropped, 1);
    check_invariant(b);
    keel_batch_destroy(b);
}
END_TEST

/* Two batches whose callbacks nest: A's handler adds to B, whose queue is
 * full, and B's dead letter for the dropped item runs inside A's handler.
 * There, flush and close of A, and an add that would wait for A's room,
 * would wait for the thread they run on. */
static keel_batch *nest_a, *nest_b;
static _Atomic int nest_flush_rc = 1, nest_close_rc = 1, nest_add_rc = 1, nest_fill_rc = 1;

static int nest_a_handler(void *const *items, size_t n, keel_batch_ctx *ctx, void *ud)
{
    (void)ctx;
    (void)ud;
    for (size_t i = 0; i < n; i++)
        if (ID(items[i]) == 3)
            ck_assert_int_eq(keel_batch_add(nest_b, ITEM(9), 1), 0); /* drops 2 */
    return 0;
}

static void nest_b_dead_letter(void *const *items, size_t n, int err, void *ud)
{
    dead_letter(items, n, err, ud);
    atomic_store(&nest_flush_rc, keel_batch_flush(nest_a));
    atomic_store(&nest_close_rc, keel_batch_close(nest_a));
    atomic_store(&nest_fill_rc, keel_batch_add(nest_a, ITEM(4), 1)); /* A's one place */
    atomic_store(&nest_add_rc, keel_batch_add(nest_a, ITEM(5), 1));
    keel_batch_destroy(nest_a); /* logged, ignored */
}

START_TEST(nested_callbacks_of_two_batches_do_not_wait_for_themselves)
{
    seen s;
    seen_init(&s);
    s.block = 1; /* B's handler holds item 1 */
    keel_batch_opts ob = {.handler = handler, .dead_letter = nest_b_dead_letter, .ud = &s, .clock = kt_clock_now,
                          .clock_ud = &clk, .max_items = 1, .capacity = 1, .on_full = KEEL_BATCH_DROP_OLDEST};
    ck_assert_int_eq(keel_batch_create(&nest_b, &ob), 0);
    ck_assert_int_eq(keel_batch_add(nest_b, ITEM(1), 1), 0);
    wait_for(&s, &s.entered, 1);
    ck_assert_int_eq(keel_batch_add(nest_b, ITEM(2), 1), 0); /* B is full */
    _Atomic size_t handled = 0;
    keel_batch_opts oa = {.handler = nest_a_handler, .ud = &handled, .clock = kt_clock_now, .clock_ud = &clk,
                          .max_items = 1, .capacity = 1};
    ck_assert_int_eq(keel_batch_create(&nest_a, &oa), 0);
    ck_assert_int_eq(keel_batch_add(nest_a, ITEM(3), 1), 0);
    wait_for(&s, &s.dead, 1);
    for (int i = 0; i < 10000 && atomic_load(&nest_add_rc) == 1; i++)
        kt_nap(MS);
    int flush_rc = atomic_load(&nest_flush_rc), close_rc = atomic_load(&nest_close_rc);
    int fill_rc = atomic_load(&nest_fill_rc), add_rc = atomic_load(&nest_add_rc);
    ck_assert_int_eq(flush_rc, KEEL_ESTATE); /* 1: it never returned */
    ck_assert_int_eq(close_rc, KEEL_ESTATE);
    ck_assert_int_eq(fill_rc, 0);
    ck_assert_int_eq(add_rc, KEEL_EFULL);
    ck_assert_int_eq(keel_batch_close(nest_a), 0);
    unblock(&s);
    ck_assert_int_eq(keel_batch_close(nest_b), 0);
    check_invariant(nest_a);
    check_invariant(nest_b);
    keel_batch_destroy(nest_a);
    keel_batch_destroy(nest_b);
}
END_TEST

/* ---- reserves ---- */

enum { IDLE_THREADS = 64, IDLE_CAPACITY = 16384 };

/* Threads reserve places a step at a time. Threads that added once and
 * went idle hold their reserves; a new add takes them back before the
 * policy applies: under each policy, the queue takes exactly its capacity
 * before it refuses, drops or waits. */
START_TEST(idle_threads_reserves_do_not_make_the_queue_full)
{
    int policies[] = {KEEL_BATCH_REJECT, KEEL_BATCH_DROP_OLDEST, KEEL_BATCH_BLOCK};
    for (int k = 0; k < 3; k++) {
        int policy = policies[k];
        seen s;
        seen_init(&s);
        s.block = 1; /* the handler holds item 1; the queue holds the rest */
        keel_batch *b = make(&s, (keel_batch_opts){.max_items = 1, .capacity = IDLE_CAPACITY,
                                                   .on_full = policy, .block_timeout_ns = 3600 * S});
        ck_assert_int_eq(keel_batch_add(b, ITEM(1), 1), 0);
        wait_for(&s, &s.entered, 1); /* item 1 is taken */
        holder h[IDLE_THREADS];
        pthread_t t[IDLE_THREADS];
        for (size_t i = 0; i < IDLE_THREADS; i++) { /* each adds one and keeps its reserve */
            h[i] = (holder){b, 1000 + i, 1, 0, 0};
            ck_assert_int_eq(pthread_create(&t[i], NULL, add_and_hold, &h[i]), 0);
        }
        for (size_t i = 0; i < IDLE_THREADS; i++)
            while (!atomic_load(&h[i].added))
                kt_nap(MS);
        size_t n = 0;
        for (; n < IDLE_CAPACITY - IDLE_THREADS; n++) {
            int rc = keel_batch_add(b, ITEM(100000 + n), 1);
            ck_assert_msg(rc == 0, "policy %d: add %zu of %d into a queue holding %zu: %s", policy, n + 1,
                          IDLE_CAPACITY - IDLE_THREADS, IDLE_THREADS + n, keel_err_name(rc));
        }
        keel_batch_stats st;
        keel_batch_stats_get(b, &st);
        ck_assert_uint_eq(st.queued, IDLE_CAPACITY);
        ck_assert_uint_eq(st.dropped, 0);
        if (policy == KEEL_BATCH_REJECT)
            ck_assert_int_eq(keel_batch_add(b, ITEM(99), 1), KEEL_EFULL);
        else if (policy == KEEL_BATCH_DROP_OLDEST)
            ck_assert_int_eq(keel_batch_add(b, ITEM(99), 1), 0);
        else
            ck_assert_int_eq(blocked_add_times_out_by_the_clock(&s, b, ITEM(99)), KEEL_ETIMEDOUT);
        keel_batch_stats_get(b, &st);
        ck_assert_uint_eq(st.queued, IDLE_CAPACITY);
        ck_assert_uint_eq(st.dropped, policy == KEEL_BATCH_DROP_OLDEST);
        for (size_t i = 0; i < IDLE_THREADS; i++) {
            atomic_store(&h[i].release, 1);
            pthread_join(t[i], NULL);
        }
        unblock(&s);
        ck_assert_int_eq(keel_batch_close(b), 0);
        check_invariant(b);
        keel_batch_destroy(b);
    }
}
END_TEST

/* Two adds wait on a full queue (KEEL_BATCH_BLOCK) and one batch of 8
 * leaves it. The add that wins the first place reserves the other seven:
 * the other add takes them back, and does not wait on while the queue has
 * room for it. */
START_TEST(a_blocked_add_takes_back_places_another_add_reserved)
{
    seen s;
    seen_init(&s);
    s.gate = 1; /* the handler holds the first batch */
    keel_batch *b = make(&s, (keel_batch_opts){.max_items = 8, .capacity = 1024, .linger_ns = 3600 * S,
                                               .on_full = KEEL_BATCH_BLOCK, .block_timeout_ns = 3600 * S});
    for (size_t i = 0; i < 8; i++)
        ck_assert_int_eq(keel_batch_add(b, ITEM(1 + i), 1), 0);
    wait_for(&s, &s.entered, 1);
    for (size_t i = 0; i < 1024; i++)
        ck_assert_int_eq(keel_batch_add(b, ITEM(100 + i), 1), 0);
    holder h[2] = {{b, 5000, 1, 0, 0}, {b, 6000, 1, 0, 0}};
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        ck_assert_int_eq(pthread_create(&t[i], NULL, add_and_hold, &h[i]), 0);
    settle(); /* both wait for room (a slow machine can only make this pass) */
    pthread_mutex_lock(&s.mu);
    s.gate = 2; /* the first batch ends; the handler holds the second: 8 places */
    pthread_cond_broadcast(&s.cv);
    pthread_mutex_unlock(&s.mu);
    for (int i = 0; i < 10000 && !(atomic_load(&h[0].added) && atomic_load(&h[1].added)); i++)
        kt_nap(MS);
    ck_assert_msg(atomic_load(&h[0].added) && atomic_load(&h[1].added),
                  "an add waits on while another thread holds the places it needs");
    keel_batch_stats st;
    keel_batch_stats_get(b, &st);
    ck_assert_uint_eq(st.queued, 1024 - 8 + 2);
    for (int i = 0; i < 2; i++) {
        atomic_store(&h[i].release, 1);
        pthread_join(t[i], NULL);
    }
    pthread_mutex_lock(&s.mu);
    s.gate = 0;
    pthread_cond_broadcast(&s.cv);
    pthread_mutex_unlock(&s.mu);
    ck_assert_int_eq(keel_batch_close(b), 0);
    check_invariant(b);
    keel_batch_destroy(b);
}
END_TEST

enum { FILLERS = 8 };

typedef struct filler {
    keel_batch *b;
    size_t base, ok;
    int rc; /* the answer that stopped it */
} filler;

static void *add_until_full(void *arg)
{
    filler *f = arg;
    while ((f->rc = keel_batch_add(f->b, ITEM(f->base + f->ok + 1), 1)) == 0)
        f->ok++;
    return NULL;
}

/* Threads racing to fill the queue: a refusal comes only when the queue
 * holds capacity items, whatever the others hold reserved at that moment. */
START_TEST(threads_filling_the_queue_fill_it_exactly)
{
    for (int round = 0; round < 20; round++) {
        seen s;
        seen_init(&s);
        s.block = 1;
        keel_batch *b = make(&s, (keel_batch_opts){.max_items = 1, .capacity = IDLE_CAPACITY,
                                                   .on_full = KEEL_BATCH_REJECT});
        ck_assert_int_eq(keel_batch_add(b, ITEM(1), 1), 0);
        wait_for(&s, &s.entered, 1);
        filler f[FILLERS];
        pthread_t t[FILLERS];
        for (size_t i = 0; i < FILLERS; i++) {
            f[i] = (filler){b, (i + 1) << 20, 0, 0};
            ck_assert_int_eq(pthread_create(&t[i], NULL, add_until_full, &f[i]), 0);
        }
        size_t ok = 0;
        for (size_t i = 0; i < FILLERS; i++) {
            pthread_join(t[i], NULL);
            ck_assert_int_eq(f[i].rc, KEEL_EFULL);
            ok += f[i].ok;
        }
        ck_assert_uint_eq(ok, IDLE_CAPACITY);
        unblock(&s);
        ck_assert_int_eq(keel_batch_close(b), 0);
        check_invariant(b);
        keel_batch_destroy(b);
    }
}
END_TEST

/* ---- statistics ---- */

static void *add_many(void *arg)
{
    producer *p = arg;
    for (size_t i = 0; i < p->n; i++)
        ck_assert_int_eq(keel_batch_add(p->b, ITEM(p->from + i), 1), 0);
    return NULL;
}

/* A snapshot taken while items flow never shows more items finished or
 * queued than accepted. */
START_TEST(a_snapshot_never_shows_more_finished_than_accepted)
{
    _Atomic size_t handled = 0;
    keel_batch *b;
    keel_batch_opts o = {.handler = count_items, .ud = &handled, .max_items = 256, .linger_ns = 100000};
    ck_assert_int_eq(keel_batch_create(&b, &o), 0);
    producer p = {b, 1, 3000000, NULL};
    pthread_t t;
    ck_assert_int_eq(pthread_create(&t, NULL, add_many, &p), 0);
    size_t bad = 0, looks = 0;
    keel_batch_stats st;
    do {
        keel_batch_stats_get(b, &st);
        looks++;
        if (st.handled + st.dead_lettered + st.dropped + st.queued > st.accepted)
            bad++;
    } while (st.accepted < p.n);
    pthread_join(t, NULL);
    ck_assert_msg(bad == 0, "%zu of %zu snapshots: more finished or queued than accepted", bad, looks);
    ck_assert_int_eq(keel_batch_close(b), 0);
    check_invariant(b);
    keel_batch_destroy(b);
}
END_TEST

/* ---- drops racing close ---- */

enum { RACE_PRODUCERS = 2, RACE_ROUNDS = 300 };

typedef struct race {
    keel_batch *b;
    _Atomic int gate;          /* the handler waits while it is 0 */
    _Atomic size_t handled, drops;
    _Atomic size_t refused_dropping, dropped_twice; /* adds that did what they must not */
    _Atomic size_t ok, ok_dropping, other_rc;
    _Atomic int done;          /* producers that saw KEEL_ECLOSED */
} race;

static _Thread_local size_t race_drops_here; /* drops made by this thread's current add */

static int race_handler(void *const *items, size_t n, keel_batch_ctx *ctx, void *ud)
{
    (void)items, (void)ctx;
    race *r = ud;
    while (!atomic_load(&r->gate)) /* the queue fills meanwhile: adds drop */
        sched_yield();
    atomic_fetch_add(&r->handled, n);
    return 0;
}

static void race_dead_letter(void *const *items, size_t n, int err, void *ud)
{
    (void)items;
    race *r = ud;
    if (err == KEEL_EFULL) { /* a drop: it runs in the adding thread */
        race_drops_here += n;
        atomic_fetch_add(&r->drops, n);
    }
}

static void *race_add(void *arg)
{
    race *r = arg;
    for (size_t i = 1;; i++) {
        race_drops_here = 0;
        int rc = keel_batch_add(r->b, ITEM(i), 1);
        if (rc != 0 && race_drops_here)
            atomic_fetch_add(&r->refused_dropping, 1);
        if (race_drops_here > 1)
            atomic_fetch_add(&r->dropped_twice, 1);
        if (rc == 0) {
            atomic_fetch_add(&r->ok, 1);
            atomic_fetch_add(&r->ok_dropping, race_drops_here);
        } else if (rc != KEEL_ECLOSED) {
            atomic_fetch_add(&r->other_rc, 1);
        } else {
            atomic_fetch_add(&r->done, 1);
            return NULL;
        }
    }
}

static void *race_close(void *arg)
{
    keel_batch_close(arg);
    return NULL;
}

/* KEEL_BATCH_DROP_OLDEST with adds racing close: an add drops at most one
 * item, and only when it then accepts its own; an add refused by the close
 * drops nothing (the item it would have dropped was accepted, and close
 * hands it to the handler). */
START_TEST(a_drop_oldest_add_refused_by_close_drops_nothing)
{
    for (int round = 0; round < RACE_ROUNDS; round++) {
        race *r = calloc(1, sizeof *r);
        ck_assert_ptr_nonnull(r);
        keel_batch_opts o = {.handler = race_handler, .dead_letter = race_dead_letter, .ud = r, .max_items = 4,
                             .capacity = 16, .on_full = KEEL_BATCH_DROP_OLDEST, .linger_ns = 1000};
        ck_assert_int_eq(keel_batch_create(&r->b, &o), 0);
        pthread_t t[RACE_PRODUCERS], closer;
        for (int i = 0; i < RACE_PRODUCERS; i++)
            ck_assert_int_eq(pthread_create(&t[i], NULL, race_add, r), 0);
        size_t want = 1 + (size_t)round % 64; /* close while they drop, a little later each round */
        while (atomic_load(&r->drops) < want)
            sched_yield();
        ck_assert_int_eq(pthread_create(&closer, NULL, race_close, r->b), 0);
        while (atomic_load(&r->done) < RACE_PRODUCERS) /* refused: the close has begun */
            sched_yield();
        atomic_store(&r->gate, 1); /* its drain can go on */
        pthread_join(closer, NULL);
        for (int i = 0; i < RACE_PRODUCERS; i++)
            pthread_join(t[i], NULL);
        keel_batch_stats st;
        keel_batch_stats_get(r->b, &st);
        ck_assert_msg(atomic_load(&r->refused_dropping) == 0, "round %d: %zu adds dropped an item, then were refused",
                      round, atomic_load(&r->refused_dropping));
        ck_assert_msg(atomic_load(&r->dropped_twice) == 0, "round %d: %zu adds dropped more than one item", round,
                      atomic_load(&r->dropped_twice));
        ck_assert_uint_eq(atomic_load(&r->other_rc), 0);
        ck_assert_uint_eq(atomic_load(&r->drops), atomic_load(&r->ok_dropping));
        ck_assert_uint_eq(st.dropped, atomic_load(&r->drops));
        ck_assert_uint_eq(st.accepted, atomic_load(&r->ok));
        ck_assert_uint_eq(st.handled, atomic_load(&r->handled));
        check_invariant(r->b);
        keel_batch_destroy(r->b);
        free(r);
    }
}
END_TEST

/* ---- rows into PostgreSQL ---- */

typedef struct rows {
    keel_pg *pg;
    keel_pg_stmt *ins;
} rows;

static int insert_rows(void *const *items, size_t n, keel_batch_ctx *ctx, void *ud)
{
    (void)ctx;
    rows *r = ud;
    keel_pg_query q[256];
    char ids[256][24];
    const char *vals[256][1];
    for (size_t i = 0; i < n; i++) {
        snprintf(ids[i], sizeof ids[i], "%zu", ID(items[i]));
        vals[i][0] = ids[i];
        q[i] = (keel_pg_query){.stmt = r->ins, .params = {.n = 1, .values = vals[i]}};
    }
    int rc = keel_pg_batch(r->pg, q, n);
    for (size_t i = 0; i < n; i++)
        PQclear(q[i].res);
    return rc;
}

START_TEST(rows_reach_postgresql_through_a_restart)
{
    keel_pg *pg;
    keel_pg_opts po = {.primary = kt_env("KEEL_TEST_PG"), .manual_health = 1,
                       .connect_timeout_ns = 1 * S, .query_timeout_ns = 5 * S,
                       .health_interval_ns = 100 * MS};
    ck_assert_int_eq(keel_pg_create(&pg, &po), 0);
    PGresult *res;
    ck_assert_int_eq(keel_pg_exec(pg, KEEL_PG_WRITE,
                                  "CREATE TABLE IF NOT EXISTS kt_batch_rows (id bigint PRIMARY KEY)",
                                  NULL, &res), 0);
    PQclear(res);
    ck_assert_int_eq(keel_pg_exec(pg, KEEL_PG_WRITE, "TRUNCATE kt_batch_rows", NULL, &res), 0);
    PQclear(res);
    rows r = {pg, NULL};
    /* at-least-once delivery: a batch whose connection died may have been
     * committed; the insert is idempotent so a retry does no harm */
    ck_assert_int_eq(keel_pg_stmt_create(pg, "INSERT INTO kt_batch_rows VALUES ($1) "
                                             "ON CONFLICT (id) DO NOTHING", 0, NULL, &r.ins), 0);
    keel_batch *b;
    keel_batch_opts o = {.handler = insert_rows, .ud = &r, .max_items = 200, .linger_ns = 2 * MS,
                         .max_retries = 100, .retry_base_ns = 20 * MS, .retry_max_ns = 200 * MS};
    ck_assert_int_eq(keel_batch_create(&b, &o), 0);
    size_t n = 0;
    for (; n < 3000; n++)
        ck_assert_int_eq(keel_batch_add(b, ITEM(n + 1), 8), 0);
    ck_assert_int_eq(keel_batch_flush(b), 0);
    kt_server("stop-one", "pg-primary");
    for (; n < 6000; n++) /* accepted while the server is down */
        ck_assert_int_eq(keel_batch_add(b, ITEM(n + 1), 8), 0);
    kt_server("start-one", "pg-primary");
    for (; n < 9000; n++)
        ck_assert_int_eq(keel_batch_add(b, ITEM(n + 1), 8), 0);
    ck_assert_int_eq(keel_batch_close(b), 0);
    keel_batch_stats st;
    keel_batch_stats_get(b, &st);
    ck_assert_uint_eq(st.accepted, 9000);
    ck_assert_uint_eq(st.handled, 9000);
    ck_assert_uint_eq(st.dead_lettered, 0);
    ck_assert_uint_gt(st.retried, 0); /* the outage was felt */
    keel_batch_destroy(b);
    keel_pg_check(pg);
    ck_assert_int_eq(keel_pg_exec(pg, KEEL_PG_WRITE, "SELECT count(*), min(id), max(id) FROM kt_batch_rows",
                                  NULL, &res), 0);
    ck_assert_str_eq(PQgetvalue(res, 0, 0), "9000");
    ck_assert_str_eq(PQgetvalue(res, 0, 1), "1");
    ck_assert_str_eq(PQgetvalue(res, 0, 2), "9000");
    PQclear(res);
    keel_pg_stmt_free(r.ins);
    keel_pg_destroy(pg);
}
END_TEST

/* ---- members into Redis ---- */

enum { MEMBERS = 1500 };

typedef struct members {
    keel_redis *r;
    char key[64];
    pthread_mutex_t mu;
    uint8_t handled[MEMBERS + 1], dead[MEMBERS + 1]; /* per item: successes, dead letters */
} members;

/* One SADD of the batch's ids. */
static int sadd_items(void *const *items, size_t n, keel_batch_ctx *ctx, void *ud)
{
    (void)ctx;
    members *m = ud;
    const char *argv[2 + 64];
    size_t lens[2 + 64];
    char ids[64][24];
    ck_assert_uint_le(n, 64);
    argv[0] = "SADD";
    argv[1] = m->key;
    for (size_t i = 0; i < n; i++) {
        snprintf(ids[i], sizeof ids[i], "%zu", ID(items[i]));
        argv[2 + i] = ids[i];
    }
    for (size_t i = 0; i < 2 + n; i++)
        lens[i] = strlen(argv[i]);
    redisReply *rep = NULL;
    int rc = keel_redis_command(m->r, m->key, strlen(m->key), (int)(2 + n), argv, lens, &rep);
    if (rep)
        freeReplyObject(rep);
    pthread_mutex_lock(&m->mu);
    for (size_t i = 0; rc == 0 && i < n; i++)
        m->handled[ID(items[i])]++;
    pthread_mutex_unlock(&m->mu);
    return rc;
}

static void dead_members(void *const *items, size_t n, int err, void *ud)
{
    members *m = ud;
    ck_assert(err == KEEL_EUNAVAIL || err == KEEL_ETIMEDOUT || err == KEEL_EPROTO);
    pthread_mutex_lock(&m->mu);
    for (size_t i = 0; i < n; i++)
        m->dead[ID(items[i])]++;
    pthread_mutex_unlock(&m->mu);
}

/* Moves the fake clock along while the test waits for a real server:
 * linger and backoff pass quickly, in the batch's own time. */
static _Atomic int ticking;

static void *tick(void *arg)
{
    (void)arg;
    while (atomic_load(&ticking)) {
        kt_clock_advance(&clk, 1 * MS);
        kt_nap(100000);
    }
    return NULL;
}

static keel_batch *members_batch(members *m, pthread_t *ticker)
{
    m->r = kt_redis_open(1, 300 * MS);
    snprintf(m->key, sizeof m->key, "kt:batch:%d:%llu", (int)getpid(), (unsigned long long)keel_now_ns());
    pthread_mutex_init(&m->mu, NULL);
    keel_batch *b;
    keel_batch_opts o = {.handler = sadd_items, .dead_letter = dead_members, .ud = m, .max_items = 50,
                         .linger_ns = 2 * MS, .max_retries = 2, .retry_base_ns = 20 * MS,
                         .retry_max_ns = 20 * MS, .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_batch_create(&b, &o), 0);
    atomic_store(&ticking, 1);
    pthread_create(ticker, NULL, tick, NULL);
    return b;
}

static void add_members(keel_batch *b, size_t from, size_t to)
{
    for (size_t i = from; i < to; i++) {
        ck_assert_int_eq(keel_batch_add(b, ITEM(i), 8), 0);
        kt_nap(200000); /* a steady stream */
    }
}

/* Closes the batch, then checks each item's one outcome: handled once
 * (and then in the set) or dead-lettered. Returns the dead letters. */
static size_t close_members(keel_batch *b, members *m, pthread_t ticker, size_t n)
{
    ck_assert_int_eq(keel_batch_close(b), 0);
    atomic_store(&ticking, 0);
    pthread_join(ticker, NULL);
    keel_batch_stats st;
    keel_batch_stats_get(b, &st);
    keel_batch_destroy(b);
    ck_assert_uint_eq(st.accepted, n);
    ck_assert_uint_eq(st.handled + st.dead_lettered, n);
    ck_assert_uint_eq(st.dropped, 0);
    const char *argv[] = {"SMEMBERS", m->key};
    size_t lens[] = {8, strlen(m->key)};
    redisReply *rep = NULL;
    int rc = KEEL_EUNAVAIL;
    for (int i = 0; i < 20 && rc; i++) { /* the node may still be skipped a moment */
        if (rep)
            freeReplyObject(rep);
        if ((rc = keel_redis_command(m->r, m->key, strlen(m->key), 2, argv, lens, &rep)) != 0)
            kt_nap(50 * MS);
    }
    ck_assert_int_eq(rc, 0);
    static uint8_t stored[MEMBERS + 1];
    memset(stored, 0, sizeof stored);
    for (size_t i = 0; i < rep->elements; i++)
        stored[strtoul(rep->element[i]->str, NULL, 10)] = 1;
    freeReplyObject(rep);
    size_t dead = 0;
    for (size_t i = 1; i <= n; i++) {
        ck_assert_msg(m->handled[i] + m->dead[i] == 1, "item %zu handled %d times, dead-lettered %d times", i,
                      m->handled[i], m->dead[i]);
        ck_assert_msg(!m->handled[i] || stored[i], "item %zu handled but not stored", i);
        dead += m->dead[i];
    }
    ck_assert_uint_eq(dead, st.dead_lettered);
    keel_redis_destroy(m->r);
    return dead;
}

/* A handler adding members to a Redis set while the server stops and
 * starts (its data saved on the way): batches that meet the outage are
 * retried, then dead-lettered; every item is handled once or
 * dead-lettered, and every handled one is in the set. */
START_TEST(members_reach_redis_through_a_restart_or_the_dead_letter)
{
    members *m = calloc(1, sizeof *m);
    pthread_t ticker;
    keel_batch *b = members_batch(m, &ticker);
    add_members(b, 1, 501);
    ck_assert_int_eq(keel_batch_flush(b), 0);
    const char *argv[] = {"CONFIG", "SET", "save", "3600 1"}; /* the test servers save nothing: this shutdown saves */
    size_t lens[] = {6, 3, 4, 6};
    redisReply *rep;
    ck_assert_int_eq(keel_redis_command(m->r, m->key, strlen(m->key), 4, argv, lens, &rep), 0);
    freeReplyObject(rep);
    kt_server("stop-one", "redis1");
    add_members(b, 501, 1001); /* accepted while the server is down */
    kt_server("start-one", "redis1");
    char dump[600];
    snprintf(dump, sizeof dump, "%s/redis1/dump.rdb", kt_env("KEEL_TEST_DIR"));
    ck_assert_int_eq(unlink(dump), 0); /* the next restart starts empty again */
    add_members(b, 1001, MEMBERS + 1);
    size_t dead = close_members(b, m, ticker, MEMBERS);
    ck_assert_uint_gt(dead, 0); /* the outage was felt */
    ck_assert_uint_lt(dead, 1000);
    free(m);
}
END_TEST

/* Closed while the server is down: close still runs the retries, then
 * hands every item to the dead letter. */
START_TEST(a_close_while_redis_is_down_dead_letters_every_item)
{
    members *m = calloc(1, sizeof *m);
    pthread_t ticker;
    keel_batch *b = members_batch(m, &ticker);
    kt_server("stop-one", "redis1");
    add_members(b, 1, 301);
    ck_assert_int_eq(keel_batch_close(b), 0);
    kt_server("start-one", "redis1"); /* before any assertion: the other tests need it */
    ck_assert_uint_eq(close_members(b, m, ticker, 300), 300);
    free(m);
}
END_TEST

/* The smallest queue (one place) and "forever" limits
 * that must not wrap around to the past. */
START_TEST(edge_sizes_and_forever)
{
    _Atomic size_t handled = 0;
    keel_batch *b;
    keel_batch_opts o = {.handler = count_items, .ud = &handled, .capacity = 1, .max_items = 1};
    ck_assert_int_eq(keel_batch_create(&b, &o), 0);
    for (uintptr_t i = 1; i <= 200; i++)
        ck_assert_int_eq(keel_batch_add(b, ITEM(i), 1), 0);
    ck_assert_int_eq(keel_batch_close(b), 0);
    ck_assert_uint_eq(atomic_load(&handled), 200);
    keel_batch_destroy(b);

    atomic_store(&handled, 0);
    keel_batch_opts f = {.handler = count_items, .ud = &handled, .max_items = 10, .linger_ns = UINT64_MAX,
                         .block_timeout_ns = UINT64_MAX};
    ck_assert_int_eq(keel_batch_create(&b, &f), 0);
    ck_assert_int_eq(keel_batch_add(b, ITEM(1), 1), 0);
    kt_nap(50 * MS); /* settle: a linger of "forever" must not close it */
    keel_batch_stats st;
    keel_batch_stats_get(b, &st);
    ck_assert_uint_eq(st.batches, 0);
    ck_assert_int_eq(keel_batch_flush(b), 0);
    ck_assert_uint_eq(atomic_load(&handled), 1);
    keel_batch_destroy(b);
}
END_TEST

/* ---- a model of a whole batch: random options, random operations ----
 *
 * One thread (the test's) adds, moves the clock, flushes, waits and
 * closes; the handler fails items as each item's fate says (decided at its
 * add, so the outcome does not hang on how the items were batched). The
 * callbacks check every call against the model; the test thread checks
 * the model's expectations after each operation. KEEL_BATCH_SEED=<n> runs
 * one seed; a failure names its seed. */

#define M_IDS 320
#define M_CALLS 2048
#define M_NONE UINT64_MAX

enum { M_QUEUED = 1, M_REJECTED, M_INFLIGHT, M_HANDLED, M_DEAD, M_DROPPED };

typedef struct m_item {
    size_t bytes;
    uint64_t added;  /* the clock at its add */
    uint8_t fails;   /* its first `fails` attempts fail */
    bool whole;      /* its failure fails the whole call (a return, no marks) */
    bool rc_too;     /* with marks, return its code too */
    int code;        /* what a call it fails returns */
    int status;
    int call;        /* the last call that failed it */
} m_item;

typedef struct m_call {
    uint32_t attempt;
    size_t nfailed;
    int rc;
    uint64_t at; /* the clock when it began */
} m_call;

typedef struct model {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    unsigned long long seed;
    _Atomic uint64_t now, tick; /* tick: every read moves the clock (flush, close) */
    uint64_t rand_value;
    keel_backoff_opts bo;
    size_t max_items, max_bytes, capacity, workers;
    uint32_t max_retries;
    uint64_t linger;
    keel_batch_full on_full;
    pthread_t main;
    m_item it[M_IDS];
    uint32_t nids;
    m_call calls[M_CALLS];
    size_t ncalls;
    bool flushing;          /* a flush or close runs: batches close early */
    bool adding;            /* the test thread is in an add: an item it drops is out of the queue
                               before the dead letter says so */
    int64_t max_first;      /* the highest id a first attempt held */
    int64_t last_drop, drop_floor;
    int pending_retry, pending_dead; /* workers = 1: the call whose retry or dead letter comes next */
    size_t nqueued, ninflight;
    bool could_fill;        /* an add made the queued items enough to close a batch */
    uint64_t accepted, handled, dead, dropped, retried, batches, rejected;
    char fail[512]; /* the first thing a callback found wrong */
} model;

#define M_CHECK(m, cond, ...)                                                                   \
    do {                                                                                        \
        if (!(cond) && !(m)->fail[0])                                                           \
            snprintf((m)->fail, sizeof (m)->fail, __VA_ARGS__);                                 \
    } while (0)

#define M_ASSERT(m, cond, fmt, ...)                                                             \
    ck_assert_msg(cond, "seed %llu: " fmt, (m)->seed, __VA_ARGS__)

static uint64_t m_clock(void *ud)
{
    model *m = ud;
    uint64_t t = atomic_load(&m->tick);
    return t ? atomic_fetch_add(&m->now, t) + t : atomic_load(&m->now);
}

static uint64_t m_rand(void *ud) { return ((model *)ud)->rand_value; }

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint32_t m_id(model *m, const void *p)
{
    const m_item *x = p;
    if (x < m->it || x >= m->it + m->nids) {
        M_CHECK(m, false, "an item that was never added: %p", p);
        return 0;
    }
    return (uint32_t)(x - m->it);
}

/* Under mu: item id is not queued (or may not be: a drop in progress). */
static bool m_gone(model *m, uint32_t id)
{
    int st = m->it[id].status;
    return st == M_REJECTED || st == M_DROPPED ||
           (st == M_QUEUED && m->adding && m->on_full == KEEL_BATCH_DROP_OLDEST);
}

/* Under mu: could the batch ending with item `last`, holding `bytes`, have
 * closed because the next item would not fit? */
static bool m_next_misfits(model *m, uint32_t last, size_t bytes)
{
    if (!m->max_bytes)
        return false;
    for (uint32_t id = last + 1; id < m->nids; id++) {
        const m_item *x = &m->it[id];
        if (x->status == M_REJECTED)
            continue;
        if (bytes >= m->max_bytes || x->bytes > m->max_bytes - bytes)
            return true;
        if (x->status != M_DROPPED)
            break;
    }
    return false;
}

static void m_first_attempt(model *m, const uint32_t *ids, size_t n, uint64_t now)
{
    size_t bytes = 0;
    for (size_t i = 0; i < n; i++) {
        m_item *x = &m->it[ids[i]];
        M_CHECK(m, x->status == M_QUEUED, "item %u in a first attempt with status %d", ids[i], x->status);
        x->status = M_INFLIGHT;
        bytes += x->bytes;
        for (uint32_t id = i ? ids[i - 1] + 1 : ids[0]; id < ids[i]; id++) /* a batch is a run */
            M_CHECK(m, m_gone(m, id),
                    "items %u and %u in one batch, item %u between has status %d", ids[i - 1], ids[i], id,
                    m->it[id].status);
    }
    m->nqueued -= n;
    m->ninflight += n;
    M_CHECK(m, !m->max_bytes || n == 1 || bytes <= m->max_bytes, "a batch of %zu items, %zu bytes, max_bytes %zu",
            n, bytes, m->max_bytes);
    if (m->workers <= 1) {
        M_CHECK(m, (int64_t)ids[0] > m->max_first, "batch from item %u after item %lld", ids[0],
                (long long)m->max_first);
        for (int64_t id = m->max_first + 1; id < (int64_t)ids[0]; id++)
            M_CHECK(m, m_gone(m, (uint32_t)id),
                    "batch from item %u skips item %lld (status %d)", ids[0], (long long)id, m->it[id].status);
        M_CHECK(m, m->pending_retry < 0 && m->pending_dead < 0,
                "a new batch before the retry or dead letter of call %d/%d", m->pending_retry, m->pending_dead);
    }
    /* Closed by linger: its opener (at the earliest, the first item after
     * the batches handed so far) has waited linger_ns. */
    bool early = m->flushing || n == m->max_items || (m->max_bytes && bytes >= m->max_bytes) ||
                 m_next_misfits(m, ids[n - 1], bytes);
    if (!early) {
        int64_t p = (int64_t)ids[0] - 1;
        while (p >= 0 && (m->it[p].status == M_REJECTED || m->it[p].status == M_DROPPED ||
                          m->it[p].status == M_QUEUED))
            p--;
        uint32_t o = (uint32_t)(p + 1);
        while (m->it[o].status == M_REJECTED)
            o++;
        M_CHECK(m, now >= m->it[o].added + m->linger,
                "batch of %zu items from item %u (%zu bytes) handed at %llu, before the linger of item %u "
                "(added %llu, linger %llu) ended",
                n, ids[0], bytes, (unsigned long long)now, o, (unsigned long long)m->it[o].added,
                (unsigned long long)m->linger);
    }
    if ((int64_t)ids[n - 1] > m->max_first)
        m->max_first = ids[n - 1];
    m->batches++;
}

static void m_retry_attempt(model *m, const uint32_t *ids, size_t n, uint32_t attempt, uint64_t now)
{
    int c = m->it[ids[0]].call;
    if (c < 0) {
        M_CHECK(m, false, "item %u retried without a failure", ids[0]);
        return;
    }
    const m_call *cl = &m->calls[c];
    M_CHECK(m, cl->attempt + 1 == attempt && cl->nfailed == n, "attempt %u of %zu items after attempt %u failed %zu",
            attempt, n, cl->attempt, cl->nfailed);
    M_CHECK(m, attempt <= m->max_retries, "attempt %u, max_retries %u", attempt, m->max_retries);
    for (size_t i = 0; i < n; i++)
        M_CHECK(m, m->it[ids[i]].status == M_INFLIGHT && m->it[ids[i]].call == c,
                "item %u in a retry of call %d: status %d, failed in call %d", ids[i], c, m->it[ids[i]].status,
                m->it[ids[i]].call);
    uint64_t delay = keel_backoff_delay(&m->bo, attempt - 1, 0);
    M_CHECK(m, now >= cl->at + delay, "attempt %u at %llu, the failure at %llu, backoff %llu", attempt,
            (unsigned long long)now, (unsigned long long)cl->at, (unsigned long long)delay);
    if (m->workers <= 1) {
        M_CHECK(m, m->pending_retry == c, "retry of call %d, expected call %d", c, m->pending_retry);
        m->pending_retry = -1;
    }
}

static int m_handler(void *const *items, size_t n, keel_batch_ctx *ctx, void *ud)
{
    model *m = ud;
    uint32_t attempt = keel_batch_attempt(ctx);
    uint64_t now = m_clock(m);
    uint32_t ids[M_IDS];
    pthread_mutex_lock(&m->mu);
    M_CHECK(m, n >= 1 && n <= m->max_items, "a call of %zu items, max_items %zu", n, m->max_items);
    if (n < 1 || n > m->max_items || m->ncalls == M_CALLS) {
        M_CHECK(m, m->ncalls < M_CALLS, "too many calls");
        pthread_mutex_unlock(&m->mu);
        return 0;
    }
    for (size_t i = 0; i < n; i++) {
        ids[i] = m_id(m, items[i]);
        M_CHECK(m, i == 0 || ids[i] > ids[i - 1], "items %u then %u in one call", ids[i - 1], ids[i]);
    }
    if (attempt == 0)
        m_first_attempt(m, ids, n, now);
    else
        m_retry_attempt(m, ids, n, attempt, now);
    M_CHECK(m, keel_batch_fail(ctx, n) == KEEL_EINVAL, "keel_batch_fail of index n");
    int lead = -1; /* the first item that fails now */
    size_t nfail = 0;
    for (size_t i = 0; i < n; i++)
        if (m->it[ids[i]].fails > attempt) {
            lead = lead < 0 ? (int)i : lead;
            nfail++;
        }
    int rc = 0;
    bool whole = lead >= 0 && m->it[ids[lead]].whole;
    if (whole) {
        rc = m->it[ids[lead]].code;
        nfail = n;
    } else if (lead >= 0) {
        for (size_t i = 0; i < n; i++)
            if (m->it[ids[i]].fails > attempt)
                M_CHECK(m, keel_batch_fail(ctx, i) == 0, "keel_batch_fail(%zu) of %zu", i, n);
        rc = m->it[ids[lead]].rc_too ? m->it[ids[lead]].code : 0;
    }
    int c = (int)m->ncalls++;
    m->calls[c] = (m_call){attempt, nfail, rc, now};
    for (size_t i = 0; i < n; i++) {
        m_item *x = &m->it[ids[i]];
        if (whole || x->fails > attempt) {
            x->call = c;
        } else {
            x->status = M_HANDLED;
            m->handled++;
            m->ninflight--;
        }
    }
    if (nfail && attempt >= m->max_retries) {
        m->pending_dead = m->workers <= 1 ? c : -1;
    } else if (nfail) {
        m->retried += nfail;
        m->pending_retry = m->workers <= 1 ? c : -1;
    }
    pthread_cond_broadcast(&m->cv);
    pthread_mutex_unlock(&m->mu);
    return rc;
}

static void m_dead_letter(void *const *items, size_t n, int err, void *ud)
{
    model *m = ud;
    pthread_mutex_lock(&m->mu);
    if (err == KEEL_EFULL) { /* dropped from a full queue */
        uint32_t id = m_id(m, items[0]);
        M_CHECK(m, m->on_full == KEEL_BATCH_DROP_OLDEST, "a drop under policy %d", (int)m->on_full);
        M_CHECK(m, n == 1, "a drop of %zu items", n);
        M_CHECK(m, pthread_equal(pthread_self(), m->main), "a drop outside the adding thread");
        M_CHECK(m, m->it[id].status == M_QUEUED, "dropped item %u has status %d", id, m->it[id].status);
        M_CHECK(m, (int64_t)id > m->last_drop && (int64_t)id > m->drop_floor,
                "dropped item %u: not the oldest queued (last drop %lld, batches up to %lld)", id,
                (long long)m->last_drop, (long long)m->drop_floor);
        m->last_drop = id;
        m->it[id].status = M_DROPPED;
        m->nqueued--;
        m->dropped++;
    } else {
        uint32_t id0 = m_id(m, items[0]);
        int c = m->it[id0].call;
        M_CHECK(m, c >= 0, "item %u dead-lettered without a failure", id0);
        M_CHECK(m, !pthread_equal(pthread_self(), m->main), "a dead letter of retries in the adding thread");
        if (c >= 0) {
            const m_call *cl = &m->calls[c];
            M_CHECK(m, cl->attempt == m->max_retries && cl->nfailed == n,
                    "dead letter of %zu items after attempt %u failed %zu (max_retries %u)", n, cl->attempt,
                    cl->nfailed, m->max_retries);
            M_CHECK(m, err == (cl->rc ? cl->rc : KEEL_EBACKEND), "dead letter err %d, the last attempt returned %d",
                    err, cl->rc);
            for (size_t i = 0; i < n; i++) {
                uint32_t id = m_id(m, items[i]);
                M_CHECK(m, m->it[id].status == M_INFLIGHT && m->it[id].call == c,
                        "dead item %u: status %d, call %d of %d", id, m->it[id].status, m->it[id].call, c);
                m->it[id].status = M_DEAD;
                m->dead++;
                m->ninflight--;
            }
            if (m->workers <= 1) {
                M_CHECK(m, m->pending_dead == c, "dead letter of call %d, expected %d", c, m->pending_dead);
                m->pending_dead = -1;
            }
        }
    }
    pthread_cond_broadcast(&m->cv);
    pthread_mutex_unlock(&m->mu);
}

static void m_ok(model *m)
{
    pthread_mutex_lock(&m->mu);
    char fail[sizeof m->fail];
    memcpy(fail, m->fail, sizeof fail);
    pthread_mutex_unlock(&m->mu);
    M_ASSERT(m, !fail[0], "%s", fail);
}

/* The stats against the model: exact where the test thread alone moves
 * them, and all of them once everything is settled. */
static void m_stats(model *m, keel_batch *b, bool settled)
{
    pthread_mutex_lock(&m->mu); /* first: nqueued can only shrink meanwhile */
    struct {
        uint64_t accepted, handled, dead, dropped, retried, batches;
        size_t nqueued;
    } c = {m->accepted, m->handled, m->dead, m->dropped, m->retried, m->batches, m->nqueued};
    pthread_mutex_unlock(&m->mu);
    keel_batch_stats s;
    keel_batch_stats_get(b, &s);
    M_ASSERT(m, s.accepted == c.accepted && s.dropped == c.dropped, "accepted %llu dropped %llu, model %llu %llu",
             (unsigned long long)s.accepted, (unsigned long long)s.dropped, (unsigned long long)c.accepted,
             (unsigned long long)c.dropped);
    M_ASSERT(m, s.queued <= m->capacity && s.queued <= c.nqueued, "%llu queued, capacity %zu, model %zu",
             (unsigned long long)s.queued, m->capacity, c.nqueued);
    if (!settled)
        return;
    M_ASSERT(m, s.queued == 0 && s.accepted == s.handled + s.dead_lettered + s.dropped,
             "queued %llu, accepted %llu != handled %llu + dead %llu + dropped %llu", (unsigned long long)s.queued,
             (unsigned long long)s.accepted, (unsigned long long)s.handled, (unsigned long long)s.dead_lettered,
             (unsigned long long)s.dropped);
    M_ASSERT(m, s.handled == c.handled && s.dead_lettered == c.dead && s.retried == c.retried &&
                    s.batches == c.batches,
             "handled/dead/retried/batches %llu/%llu/%llu/%llu, model %llu/%llu/%llu/%llu",
             (unsigned long long)s.handled, (unsigned long long)s.dead_lettered, (unsigned long long)s.retried,
             (unsigned long long)s.batches, (unsigned long long)c.handled, (unsigned long long)c.dead,
             (unsigned long long)c.retried, (unsigned long long)c.batches);
    uint64_t sizes = 0, waits = 0;
    for (int i = 0; i < KEEL_BATCH_BUCKETS; i++)
        sizes += s.size[i], waits += s.wait[i];
    M_ASSERT(m, sizes == s.batches && waits == s.batches, "histograms %llu/%llu, batches %llu",
             (unsigned long long)sizes, (unsigned long long)waits, (unsigned long long)s.batches);
}

/* Under mu: every item before `upto` is settled. */
static uint32_t m_unsettled(model *m, uint32_t upto)
{
    for (uint32_t id = 0; id < upto; id++)
        if (m->it[id].status == M_QUEUED || m->it[id].status == M_INFLIGHT)
            return id;
    return UINT32_MAX;
}

/* Under mu: could the queued items close a batch by count or bytes? */
static bool m_could_fill(model *m)
{
    size_t bytes = 0;
    for (uint32_t id = 0; id < m->nids; id++)
        if (m->it[id].status == M_QUEUED)
            bytes += m->it[id].bytes;
    return m->nqueued >= m->max_items || (m->max_bytes && bytes >= m->max_bytes);
}

static void m_add(model *m, keel_batch *b, size_t bytes, uint64_t *rs)
{
    if (m->nids == M_IDS)
        return;
    keel_batch_stats s;
    keel_batch_stats_get(b, &s); /* only this thread adds: the queue can only shrink meanwhile */
    uint64_t r = splitmix(rs);
    pthread_mutex_lock(&m->mu);
    uint32_t id = m->nids++;
    m_item *x = &m->it[id];
    unsigned fate = (unsigned)(r % 100);
    *x = (m_item){.bytes = bytes, .added = atomic_load(&m->now),
                  .fails = (uint8_t)(fate < 80 ? 0 : 1 + (r >> 8) % (m->max_retries + 1)),
                  .whole = (r >> 16) & 1, .rc_too = (r >> 17) & 1,
                  .code = ((r >> 18) & 1 ? 1 : -1) * (int)(1000 + (r >> 20) % 1000),
                  .status = M_QUEUED, .call = -1};
    m->drop_floor = m->max_first;
    uint64_t dropped = m->dropped;
    m->accepted++; /* before the add: the batcher may hand it on at once */
    m->nqueued++;
    m->adding = true;
    m->could_fill = m->could_fill || m_could_fill(m); /* now: the batcher may take them at once */
    pthread_mutex_unlock(&m->mu);
    bool full = s.queued >= m->capacity;
    if (full && m->on_full == KEEL_BATCH_BLOCK) /* it may wait: the clock moves, its timeout ends */
        atomic_store(&m->tick, MS);
    int rc = keel_batch_add(b, x, bytes);
    atomic_store(&m->tick, 0);
    pthread_mutex_lock(&m->mu);
    m->adding = false;
    bool drop = m->dropped != dropped;
    if (rc != 0) {
        M_CHECK(m, x->status == M_QUEUED, "refused item %u was seen: status %d", id, x->status);
        x->status = M_REJECTED;
        m->accepted--;
        m->nqueued--;
        m->rejected++;
    }
    pthread_mutex_unlock(&m->mu);
    m_ok(m);
    if (rc != 0)
        M_ASSERT(m, full && ((rc == KEEL_EFULL && m->on_full == KEEL_BATCH_REJECT) ||
                             (rc == KEEL_ETIMEDOUT && m->on_full == KEEL_BATCH_BLOCK)),
                 "add of item %u returned %d, policy %d, %llu queued of %zu", id, rc, (int)m->on_full,
                 (unsigned long long)s.queued, m->capacity);
    else if (m->on_full == KEEL_BATCH_DROP_OLDEST)
        M_ASSERT(m, (!drop || full) && m->dropped - dropped <= 1, "add of item %u: %llu dropped, %llu queued of %zu", id,
                 (unsigned long long)(m->dropped - dropped), (unsigned long long)s.queued, m->capacity);
}

/* Waits (real time, a few seconds at most) until pred holds; the callbacks
 * broadcast on every change. */
static bool m_wait(model *m, bool (*pred)(model *, uint32_t), uint32_t arg)
{
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 5;
    pthread_mutex_lock(&m->mu);
    bool ok;
    while (!(ok = pred(m, arg)) && pthread_cond_timedwait(&m->cv, &m->mu, &until) == 0)
        ;
    pthread_mutex_unlock(&m->mu);
    return ok;
}

static bool m_taken(model *m, uint32_t id) { return m->it[id].status != M_QUEUED; }

static uint32_t m_oldest_queued(model *m)
{
    for (uint32_t id = 0; id < m->nids; id++)
        if (m->it[id].status == M_QUEUED)
            return id;
    return UINT32_MAX;
}

/* Flush or close, with a clock that moves at every read (backoffs end). */
static int m_drain(model *m, keel_batch *b, bool close)
{
    pthread_mutex_lock(&m->mu);
    m->flushing = true;
    uint32_t upto = m->nids;
    pthread_mutex_unlock(&m->mu);
    atomic_store(&m->tick, m->bo.cap_ns);
    int rc = close ? keel_batch_close(b) : keel_batch_flush(b);
    atomic_store(&m->tick, 0);
    pthread_mutex_lock(&m->mu);
    m->flushing = false;
    uint32_t left = m_unsettled(m, upto);
    pthread_mutex_unlock(&m->mu);
    m_ok(m);
    M_ASSERT(m, rc == 0, "%s returned %d", close ? "close" : "flush", rc);
    M_ASSERT(m, left == UINT32_MAX, "item %u not settled after %s", left, close ? "close" : "flush");
    m_stats(m, b, true);
    return rc;
}

static bool m_all_settled(model *m, uint32_t upto) { return m_unsettled(m, upto) == UINT32_MAX; }

/* Moves the clock on until everything accepted is settled, without a
 * flush: lingers and backoffs end by the clock alone. */
static void m_quiesce(model *m, keel_batch *b)
{
    uint64_t step = m->linger + m->bo.cap_ns;
    for (int i = 0;; i++) {
        keel_batch_stats s;
        keel_batch_stats_get(b, &s);
        pthread_mutex_lock(&m->mu);
        bool done = m_all_settled(m, m->nids) && s.accepted == s.handled + s.dead_lettered + s.dropped &&
                    s.retried == m->retried;
        pthread_mutex_unlock(&m->mu);
        if (done)
            break;
        M_ASSERT(m, i < 5000, "nothing settles by the clock alone (%llu queued)", (unsigned long long)s.queued);
        atomic_fetch_add(&m->now, step);
        kt_nap(1000000);
    }
    m_ok(m);
    m_stats(m, b, true);
}

static void model_run(unsigned long long seed)
{
    model *m = calloc(1, sizeof *m);
    ck_assert_ptr_nonnull(m);
    pthread_mutex_init(&m->mu, NULL);
    pthread_cond_init(&m->cv, NULL);
    m->seed = seed;
    m->main = pthread_self();
    m->max_first = m->last_drop = m->drop_floor = -1;
    m->pending_retry = m->pending_dead = -1;
    atomic_init(&m->now, 1000 * S);
    atomic_init(&m->tick, 0);
    uint64_t rs = seed * 0x2545f4914f6cdd1dull + 1;
    m->rand_value = splitmix(&rs);

    keel_batch_opts o = {.handler = m_handler, .dead_letter = m_dead_letter, .ud = m, .clock = m_clock,
                         .clock_ud = m, .rand = m_rand, .rand_ud = m, .block_timeout_ns = MS};
    o.max_items = splitmix(&rs) % 9; /* 0: the default */
    o.capacity = splitmix(&rs) % 4 ? (o.max_items ? o.max_items : 1) + splitmix(&rs) % 24 : 0;
    if (splitmix(&rs) % 8 == 0)
        o.capacity = 128 + splitmix(&rs) % 200; /* chunks of 2 or more */
    o.max_bytes = splitmix(&rs) % 3 ? 1 + splitmix(&rs) % 48 : 0;
    o.linger_ns = (1 + splitmix(&rs) % 10) * MS;
    o.on_full = (keel_batch_full)(splitmix(&rs) % 3);
    o.workers = splitmix(&rs) % 3; /* 0 and 1: one */
    o.max_retries = (uint32_t)(splitmix(&rs) % 4);
    o.retry_base_ns = (1 + splitmix(&rs) % 5) * MS;
    o.retry_max_ns = o.retry_base_ns * (1 + splitmix(&rs) % 8);
    keel_batch *b = NULL;
    int rc = keel_batch_create(&b, &o);
    M_ASSERT(m, rc == 0, "create: %d", rc);
    m->capacity = o.capacity ? o.capacity : 65536;
    m->max_items = o.max_items ? o.max_items : m->capacity < 100 ? m->capacity : 100;
    m->max_bytes = o.max_bytes;
    m->linger = o.linger_ns;
    m->on_full = o.on_full;
    m->workers = o.workers;
    m->max_retries = o.max_retries;
    m->bo = (keel_backoff_opts){KEEL_BACKOFF_FULL_JITTER, o.retry_base_ns, o.retry_max_ns, m_rand, m};

    /* What the model knows of the open batch's linger: exact (`lin_known`)
     * while no batch can have closed by count or bytes at a time of its
     * own; its start (M_NONE: the next add's time). */
    bool lin_known = true;
    uint64_t lin_open = M_NONE;
    bool closed = false;
    int nops = 80 + (int)(splitmix(&rs) % 120);
    for (int op = 0; op < nops && !closed; op++) {
        pthread_mutex_lock(&m->mu);
        if (m->nqueued == 0) { /* the last batch took every item: the next add opens one */
            lin_known = true;
            lin_open = M_NONE;
        }
        pthread_mutex_unlock(&m->mu);
        unsigned k = (unsigned)(splitmix(&rs) % 100);
        if (k < 55) { /* adds: one, or a burst */
            unsigned count = k < 40 ? 1 : 1 + (unsigned)(splitmix(&rs) % (2 * m->max_items + 2));
            for (unsigned i = 0; i < count; i++) {
                uint64_t r = splitmix(&rs);
                size_t bytes = r % 8 == 0   ? 0
                               : r % 8 == 1 && m->max_bytes ? m->max_bytes + 1 + (r >> 8) % 8
                                                           : 1 + (r >> 8) % (m->max_bytes ? m->max_bytes : 64);
                uint32_t before = m->nids;
                m_add(m, b, bytes, &rs);
                pthread_mutex_lock(&m->mu);
                if (m->nids > before && m->it[before].status != M_REJECTED && lin_open == M_NONE)
                    lin_open = m->it[before].added;
                if (m->could_fill)
                    lin_known = false;
                m->could_fill = false;
                pthread_mutex_unlock(&m->mu);
                m_stats(m, b, false);
            }
        } else if (k < 85) { /* the clock: within a linger, or past one */
            uint64_t r = splitmix(&rs);
            atomic_fetch_add(&m->now, k < 72 ? r % m->linger : m->linger + r % (2 * m->linger));
            /* A linger that has ended: its batch comes (nothing in flight
             * holds up the batcher). */
            pthread_mutex_lock(&m->mu);
            uint32_t oldest = m_oldest_queued(m);
            bool due = lin_known && lin_open != M_NONE && atomic_load(&m->now) >= lin_open + m->linger;
            if (due && (oldest == UINT32_MAX || m->ninflight)) {
                lin_known = false; /* it closes while the batcher is busy, or has closed: when is unknown */
                due = false;
            }
            pthread_mutex_unlock(&m->mu);
            if (due) {
                bool came = m_wait(m, m_taken, oldest);
                m_ok(m);
                M_ASSERT(m, came, "item %u (added %llu, batch opened %llu, linger %llu) not handed at %llu",
                         oldest, (unsigned long long)m->it[oldest].added, (unsigned long long)lin_open,
                         (unsigned long long)m->linger, (unsigned long long)atomic_load(&m->now));
                pthread_mutex_lock(&m->mu);
                lin_open = m_oldest_queued(m) == UINT32_MAX ? M_NONE : atomic_load(&m->now);
                pthread_mutex_unlock(&m->mu);
            }
        } else if (k < 92) {
            m_drain(m, b, false);
            lin_known = true;
            lin_open = M_NONE;
        } else if (k < 98 || op < 40) {
            m_quiesce(m, b);
            lin_known = true;
            lin_open = M_NONE;
        } else {
            m_drain(m, b, true);
            closed = true;
        }
        m_ok(m);
    }
    if (!closed)
        m_drain(m, b, true);
    static int sentinel;
    M_ASSERT(m, keel_batch_add(b, &sentinel, 1) == KEEL_ECLOSED, "%s", "add after close");
    M_ASSERT(m, keel_batch_close(b) == 0, "%s", "a second close");
    m_stats(m, b, true);
    keel_batch_destroy(b);
    m_ok(m);
    pthread_cond_destroy(&m->cv);
    pthread_mutex_destroy(&m->mu);
    free(m);
}

START_TEST(random_operations_agree_with_the_model)
{
    const char *one = getenv("KEEL_BATCH_SEED");
    if (one) {
        model_run(strtoull(one, NULL, 0));
        return;
    }
    for (unsigned long long seed = 1; seed <= 120; seed++)
        model_run(seed);
}
END_TEST

int main(void)
{
    atomic_store(&clk.ns, 1000 * S);
    Suite *s = suite_create("batch");
    TCase *tc = tcase_create("batch");
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, a_batch_closes_at_max_items);
    tcase_add_test(tc, edge_sizes_and_forever);
    tcase_add_test(tc, a_batch_closes_at_max_bytes);
    tcase_add_test(tc, an_item_over_max_bytes_goes_alone_even_before_empty_ones);
    tcase_add_test(tc, a_batch_closes_when_its_oldest_item_has_lingered);
    tcase_add_test(tc, flush_and_close_wait_for_everything_accepted_before);
    tcase_add_test(tc, each_full_queue_policy);
    tcase_add_test(tc, only_the_items_marked_failed_are_retried);
    tcase_add_test(tc, retries_follow_the_backoff_then_the_dead_letter);
    tcase_add_test(tc, a_handler_may_add_items);
    tcase_add_test(tc, an_exited_thread_leaves_its_items_and_its_room);
    tcase_add_test(tc, close_among_adds_keeps_what_it_accepted);
    tcase_add_test(tc, a_thread_joining_a_filling_batch_does_not_leave_it_waiting);
    tcase_add_test(tc, bad_input_is_refused);
    tcase_add_test(tc, a_batch_memory_cannot_hold_fails_at_create);
    tcase_add_test(tc, a_drop_takes_the_adding_thread_s_own_oldest_item);
    tcase_add_test(tc, a_drop_oldest_add_without_memory_drops_nothing);
    tcase_add_test(tc, an_add_from_a_drop_s_dead_letter_is_turned_away);
    tcase_add_test(tc, idle_threads_reserves_do_not_make_the_queue_full);
    tcase_add_test(tc, a_blocked_add_takes_back_places_another_add_reserved);
    tcase_add_test(tc, nested_callbacks_of_two_batches_do_not_wait_for_themselves);
    tcase_add_test(tc, an_add_after_close_is_closed_even_without_memory);
    tcase_add_test(tc, an_add_from_a_drop_s_dead_letter_after_close_is_closed);
    suite_add_tcase(s, tc);
    TCase *fill = tcase_create("fill");
    tcase_set_timeout(fill, 60);
    tcase_add_test(fill, threads_filling_the_queue_fill_it_exactly);
    tcase_set_tags(fill, "stress"); /* threads racing for the last places */
    suite_add_tcase(s, fill);
    TCase *mc = tcase_create("model");
    tcase_set_timeout(mc, 60);
    tcase_set_tags(mc, "model"); /* 120 random runs: plain and ASan runs check them */
    tcase_add_test(mc, random_operations_agree_with_the_model);
    suite_add_tcase(s, mc);
    TCase *big = tcase_create("million");
    tcase_set_timeout(big, 120);
    tcase_add_test(big, two_million_items_all_accounted_for_one_worker);
    tcase_add_test(big, two_million_items_all_accounted_for_three_workers);
    tcase_add_test(big, each_thread_keeps_its_order);
    tcase_add_test(big, a_snapshot_never_shows_more_finished_than_accepted);
    tcase_set_tags(big, "stress"); /* millions of items: not under valgrind */
    suite_add_tcase(s, big);
    TCase *race = tcase_create("drop_close");
    tcase_set_timeout(race, 60);
    tcase_add_test(race, a_drop_oldest_add_refused_by_close_drops_nothing);
    tcase_set_tags(race, "stress"); /* threads racing close */
    suite_add_tcase(s, race);
    TCase *pgc = tcase_create("postgresql");
    tcase_set_timeout(pgc, 60);
    tcase_add_test(pgc, rows_reach_postgresql_through_a_restart);
    suite_add_tcase(s, pgc);
    TCase *rdc = tcase_create("redis");
    tcase_set_timeout(rdc, 60);
    tcase_add_test(rdc, members_reach_redis_through_a_restart_or_the_dead_letter);
    tcase_add_test(rdc, a_close_while_redis_is_down_dead_letters_every_item);
    suite_add_tcase(s, rdc);
    return kt_run(s);
}
