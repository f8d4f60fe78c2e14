/* tests/test_limiter.c — keel_limiter: exactness of the three algorithms
 * under the fake clock (boundaries, bursts, costs, refund, peek, reset),
 * retrying clients, threads on one key, bounded memory, header text; and
 * against real Redis: processes and threads on one key never exceed the
 * limit, same-instant requests all count, scripts survive a flush and a
 * restart, each failure policy, binary keys. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <keel/limiter.h>
#include <keel/redis.h>

#include "harness.h"
#include "hash.h"
#include "limiter/limiter_int.h"

#define MS KT_MS
#define S KT_S

static kt_clock clk;

static keel_limiter *local(keel_limit_algo algo, uint64_t limit, uint64_t window, uint64_t burst)
{
    keel_limiter *l;
    keel_limiter_opts o = {.algo = algo, .limit = limit, .window_ns = window, .burst = burst,
                           .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_limiter_create(&l, &o), 0);
    return l;
}

static void set_time(uint64_t ns)
{
    atomic_store(&clk.ns, ns);
}

static int take(keel_limiter *l, const char *key, uint64_t cost, keel_limit_result *r)
{
    keel_limit_result tmp;
    int rc = keel_limiter_take(l, key, strlen(key), cost, r ? r : &tmp);
    ck_assert_msg(rc == 0 || rc == KEEL_ERANGE, "take: %s", keel_strerror(rc));
    return (r ? r : &tmp)->allowed;
}

/* ---- GCRA ---- */

/* The decisions divide by the limit and the window with a multiply: the
 * quotient is the hardware's for every numerator, at the edges and at
 * random, for divisors of every size. */
START_TEST(division_by_a_fixed_divisor_is_exact)
{
    static const uint64_t edges[] = {1, 2, 3, 5, 7, 10, 1000, 1000000, 1000000007, (1ull << 32) - 1,
                                     1ull << 32, (1ull << 32) + 1, 1ull << 62, (1ull << 63) - 1,
                                     1ull << 63, (1ull << 63) + 1, UINT64_MAX - 1, UINT64_MAX};
    uint64_t x = 0x9e3779b97f4a7c15u;
    for (size_t i = 0; i < 2000; i++) {
        uint64_t d;
        if (i < sizeof edges / sizeof edges[0]) {
            d = edges[i];
        } else {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            d = x >> (x % 64); /* divisors of every width */
            if (d == 0)
                d = 1;
        }
        ldivisor v = keel__ldivisor(d);
        for (size_t j = 0; j < 500; j++) {
            uint64_t n;
            if (j < sizeof edges / sizeof edges[0]) {
                n = edges[j];
            } else if (j < 40) { /* around multiples of d */
                uint64_t k = j * 0x5851f42d4c957f2du % (UINT64_MAX / d); /* d == 1: below max */
                n = k * d + (j % 3) - 1;
            } else {
                x ^= x << 13, x ^= x >> 7, x ^= x << 17;
                n = x >> (x % 64);
            }
            ck_assert_msg(keel__ldivide(&v, n) == n / d, "%llu / %llu", (unsigned long long)n,
                          (unsigned long long)d);
        }
    }
}
END_TEST

START_TEST(gcra_is_a_token_bucket_to_the_nanosecond)
{
    set_time(1000 * S);
    keel_limiter *l = local(KEEL_LIMIT_GCRA, 10, 1 * S, 5); /* one unit per 100 ms, 5 at once */
    keel_limit_result r;
    for (int i = 0; i < 5; i++) {
        ck_assert(take(l, "k", 1, &r));
        ck_assert_uint_eq(r.remaining, (uint64_t)(4 - i));
        ck_assert_uint_eq(r.limit, 5);
    }
    ck_assert_uint_eq(r.reset_ns, 500 * MS);
    ck_assert(!take(l, "k", 1, &r));
    ck_assert_uint_eq(r.retry_after_ns, 100 * MS);
    kt_clock_advance(&clk, 100 * MS - 1);
    ck_assert(!take(l, "k", 1, &r)); /* a rejection changes nothing */
    ck_assert_uint_eq(r.retry_after_ns, 1);
    kt_clock_advance(&clk, 1);
    ck_assert(take(l, "k", 1, &r));
    ck_assert(!take(l, "k", 1, &r));
    /* costs: 3 units need 300 ms of refill */
    kt_clock_advance(&clk, 250 * MS);
    ck_assert(!take(l, "k", 3, &r));
    ck_assert_uint_eq(r.retry_after_ns, 50 * MS);
    ck_assert(take(l, "k", 2, &r));
    /* more than the burst can never pass */
    ck_assert_int_eq(keel_limiter_take(l, "k", 1, 6, &r), KEEL_ERANGE);
    ck_assert(!r.allowed);
    ck_assert_uint_eq(r.retry_after_ns, UINT64_MAX);
    keel_limiter_destroy(l);

    /* an emission interval that is not a whole number of nanoseconds */
    set_time(1000 * S);
    l = local(KEEL_LIMIT_GCRA, 3, 1 * S, 1);
    ck_assert(take(l, "k", 1, &r));
    kt_clock_advance(&clk, 333333333);
    ck_assert(!take(l, "k", 1, &r));
    ck_assert_uint_eq(r.retry_after_ns, 1); /* 1/3 s is 333333333.33 ns */
    kt_clock_advance(&clk, 1);
    ck_assert(take(l, "k", 1, &r));
    keel_limiter_destroy(l);
}
END_TEST

/* ---- sliding window ---- */

START_TEST(the_sliding_window_weighs_the_previous_window)
{
    set_time(1000 * S);
    keel_limiter *l = local(KEEL_LIMIT_SLIDING_WINDOW, 10, 1 * S, 0);
    keel_limit_result r;
    for (int i = 0; i < 10; i++)
        ck_assert(take(l, "k", 1, &r));
    ck_assert_uint_eq(r.remaining, 0);
    ck_assert(!take(l, "k", 1, &r));
    /* next window at 10% in: 10 x 0.9 + 0 = 9, so one more fits */
    ck_assert_uint_eq(r.retry_after_ns, 1100 * MS);
    kt_clock_advance(&clk, 1100 * MS - 1);
    ck_assert(!take(l, "k", 1, &r));
    kt_clock_advance(&clk, 1);
    ck_assert(take(l, "k", 1, &r));
    ck_assert(!take(l, "k", 1, &r));
    /* in this window: prev 10, cur 1; one more needs prev's weight <= 8 */
    ck_assert_uint_eq(r.retry_after_ns, 100 * MS);
    kt_clock_advance(&clk, 100 * MS);
    ck_assert(take(l, "k", 1, &r));
    /* two windows later, all is forgotten */
    kt_clock_advance(&clk, 2 * S);
    for (int i = 0; i < 10; i++)
        ck_assert(take(l, "k", 1, &r));
    ck_assert_int_eq(keel_limiter_take(l, "k", 1, 11, &r), KEEL_ERANGE);
    ck_assert_uint_eq(r.retry_after_ns, UINT64_MAX);
    keel_limiter_destroy(l);
}
END_TEST

/* ---- sliding log ---- */

START_TEST(the_sliding_log_is_exact)
{
    set_time(1000 * S);
    keel_limiter *l = local(KEEL_LIMIT_SLIDING_LOG, 3, 1 * S, 0);
    keel_limit_result r;
    ck_assert(take(l, "k", 1, &r));
    kt_clock_advance(&clk, 100 * MS);
    ck_assert(take(l, "k", 1, &r));
    kt_clock_advance(&clk, 100 * MS);
    ck_assert(take(l, "k", 1, &r));
    ck_assert_uint_eq(r.reset_ns, 1 * S);
    kt_clock_advance(&clk, 100 * MS);
    ck_assert(!take(l, "k", 1, &r));
    ck_assert_uint_eq(r.retry_after_ns, 700 * MS);
    ck_assert(!take(l, "k", 2, &r));
    ck_assert_uint_eq(r.retry_after_ns, 800 * MS);
    kt_clock_advance(&clk, 700 * MS - 1);
    ck_assert(!take(l, "k", 1, &r));
    kt_clock_advance(&clk, 1); /* the first admission leaves the window */
    ck_assert(take(l, "k", 1, &r));
    ck_assert(!take(l, "k", 1, &r));
    ck_assert_int_eq(keel_limiter_take(l, "k", 1, 4, &r), KEEL_ERANGE);
    keel_limiter_destroy(l);
}
END_TEST

/* Random traffic with random costs: no window of length W ever holds more
 * than `limit` admitted units (checked by brute force). */
START_TEST(no_window_of_the_log_holds_more_than_the_limit)
{
    set_time(1000 * S);
    keel_limiter *l = local(KEEL_LIMIT_SLIDING_LOG, 20, 1 * S, 0);
    enum { N = 4000 };
    static uint64_t at[N], units[N];
    size_t n = 0;
    srand(7);
    for (int i = 0; i < N; i++) {
        kt_clock_advance(&clk, (uint64_t)(rand() % 20) * MS + (uint64_t)(rand() % 1000));
        uint64_t cost = 1 + (uint64_t)(rand() % 4);
        keel_limit_result r;
        if (take(l, "k", cost, &r)) {
            at[n] = r.now_ns;
            units[n++] = cost;
        }
    }
    ck_assert_uint_gt(n, 300);
    for (size_t i = 0; i < n; i++) {
        uint64_t sum = 0;
        for (size_t j = i + 1; j-- > 0 && at[j] + S > at[i];)
            sum += units[j];
        ck_assert_msg(sum <= 20, "window ending at admission %zu holds %llu", i,
                      (unsigned long long)sum);
    }
    keel_limiter_destroy(l);
}
END_TEST

/* ---- common behaviour ---- */

START_TEST(a_client_retrying_above_the_limit_still_gets_its_share)
{
    for (int algo = 0; algo < 3; algo++) {
        set_time(1000 * S);
        keel_limiter *l = local((keel_limit_algo)algo, 10, 1 * S, 10);
        int per_window[10] = {0};
        for (int t = 0; t < 1000; t++) { /* every 10 ms for 10 s: 10x the limit */
            if (take(l, "k", 1, NULL))
                per_window[t / 100]++;
            kt_clock_advance(&clk, 10 * MS);
        }
        int total = 0;
        for (int w = 0; w < 10; w++) {
            total += per_window[w];
            if (algo == KEEL_LIMIT_SLIDING_LOG)
                ck_assert_int_eq(per_window[w], 10);
            else /* the window's estimate keeps one unit out once the
                  * previous window weighs in; GCRA's steady pace falls
                  * on the windows' edges either way */
                ck_assert_int_ge(per_window[w], 9);
        }
        if (algo == KEEL_LIMIT_GCRA)
            ck_assert_int_eq(total, 10 + 99); /* the burst, then one per 100 ms */
        keel_limiter_destroy(l);
    }
}
END_TEST

START_TEST(peek_refund_and_reset)
{
    for (int algo = 0; algo < 3; algo++) {
        set_time(1000 * S);
        keel_limiter *l = local((keel_limit_algo)algo, 5, 1 * S, 0);
        keel_limit_result r;
        ck_assert_int_eq(keel_limiter_peek(l, "k", 1, 5, &r), 0);
        ck_assert(r.allowed);
        ck_assert_uint_eq(r.remaining, 5); /* a peek consumes nothing */
        ck_assert(take(l, "k", 5, &r));
        ck_assert_int_eq(keel_limiter_peek(l, "k", 1, 1, &r), 0);
        ck_assert(!r.allowed);
        ck_assert_int_eq(keel_limiter_refund(l, "k", 1, 2, &r), 0);
        ck_assert_uint_eq(r.remaining, 2);
        ck_assert(take(l, "k", 2, &r));
        ck_assert(!take(l, "k", 1, &r));
        ck_assert_int_eq(keel_limiter_refund(l, "k", 1, 100, NULL), 0); /* never more than held */
        ck_assert_int_eq(keel_limiter_peek(l, "k", 1, 1, &r), 0);
        ck_assert_uint_eq(r.remaining, 5);
        ck_assert(take(l, "k", 5, &r));
        ck_assert_int_eq(keel_limiter_reset(l, "k", 1), 0);
        ck_assert(take(l, "k", 5, &r));
        /* a peek of a key never seen stores nothing */
        keel_limiter_stats st;
        keel_limiter_stats_get(l, &st);
        uint64_t keys = st.keys;
        ck_assert_int_eq(keel_limiter_peek(l, "other", 5, 1, &r), 0);
        keel_limiter_stats_get(l, &st);
        ck_assert_uint_eq(st.keys, keys);
        keel_limiter_destroy(l);
    }
}
END_TEST

/* In process, take_many() hashes and prefetches 16 requests ahead and
 * reads the clock once for 16: its answers must be those of the same
 * requests taken one at a time, with keys repeated inside a batch and
 * tables growing under it. */
/* Keys come from clients. Hashed with one seed known to all, keys found
 * offline all land in one shard and one run of its slots, and every
 * decision on them walks that run under the shard's lock. Each limiter
 * hashes with its own random seed: keys that collide under the old public
 * seed spread over the shards, and two limiters place the same key apart. */
/* Out of line: inlined on a short array, XXH3's longer paths warn. */
static __attribute__((noinline)) uint64_t old_hash(const void *key, size_t len)
{
    return keel__hash64(key, len, 0x6b65656c6c696d);
}

START_TEST(each_limiter_hashes_keys_with_its_own_seed)
{
    keel_limiter *a = local(KEEL_LIMIT_GCRA, 100, 1 * S, 0), *b = local(KEEL_LIMIT_GCRA, 100, 1 * S, 0);
    bool shard_hit[64] = {false};
    int found = 0, differ = 0, shards = 0;
    for (unsigned c = 0; found < 256; c++) {
        char k[24];
        int n = snprintf(k, sizeof k, "ip-%u", c);
        if (old_hash(k, (size_t)n) >> 58 != 0)
            continue; /* shard 0 under the old seed */
        found++;
        uint64_t ha = keel__lstore_hash(a->local, k, (size_t)n, false);
        ck_assert_uint_eq(ha, keel__lstore_hash(a->local, k, (size_t)n, true)); /* stable */
        differ += ha != keel__lstore_hash(b->local, k, (size_t)n, false);
        shard_hit[ha >> 58] = true; /* 1,000,000 keys: 64 shards, the top 6 bits */
    }
    for (int i = 0; i < 64; i++)
        shards += shard_hit[i];
    ck_assert_int_eq(differ, 256);
    ck_assert_int_ge(shards, 48); /* 256 keys into 64 shards at random: about 63 */
    keel_limiter_destroy(a);
    keel_limiter_destroy(b);
}
END_TEST

START_TEST(take_many_answers_as_one_at_a_time)
{
    enum { N = 600 };
    static keel_limit_req q[N];
    static char names[N][16];
    for (int algo = 0; algo < 3; algo++) {
        set_time(1000 * S);
        keel_limiter *many = local((keel_limit_algo)algo, 4, 1 * S, 0), *one = local((keel_limit_algo)algo, 4, 1 * S, 0);
        for (int i = 0; i < N; i++) {
            /* the first half on 250 keys (new ones make the tables grow),
             * the second on 5 (each asked for again and again) */
            int k = i < N / 2 ? i * 7 % 250 : i % 5;
            snprintf(names[i], sizeof names[i], "key-%d", k);
            q[i] = (keel_limit_req){.key = names[i], .len = strlen(names[i]), .cost = 1 + (uint64_t)(i % 3)};
        }
        ck_assert_int_eq(keel_limiter_take_many(many, q, N), 0);
        size_t allowed = 0;
        for (int i = 0; i < N; i++) {
            keel_limit_result r;
            int rc = keel_limiter_take(one, names[i], strlen(names[i]), q[i].cost, &r);
            ck_assert_int_eq(q[i].rc, rc);
            ck_assert_int_eq(q[i].result.allowed, r.allowed);
            ck_assert_uint_eq(q[i].result.remaining, r.remaining);
            ck_assert_uint_eq(q[i].result.retry_after_ns, r.retry_after_ns);
            allowed += r.allowed;
        }
        ck_assert_uint_gt(allowed, 0);
        ck_assert_uint_lt(allowed, N);
        keel_limiter_destroy(many);
        keel_limiter_destroy(one);
    }
}
END_TEST

START_TEST(keys_are_bytes)
{
    set_time(1000 * S);
    keel_limiter *l = local(KEEL_LIMIT_GCRA, 1, 1 * S, 0);
    keel_limit_result r;
    ck_assert_int_eq(keel_limiter_take(l, "a\0b", 3, 1, &r), 0);
    ck_assert(r.allowed);
    ck_assert_int_eq(keel_limiter_take(l, "a\0c", 3, 1, &r), 0);
    ck_assert(r.allowed);
    ck_assert_int_eq(keel_limiter_take(l, "a\0b", 3, 1, &r), 0);
    ck_assert(!r.allowed);
    char longkey[300];
    memset(longkey, 'x', sizeof longkey);
    ck_assert_int_eq(keel_limiter_take(l, longkey, sizeof longkey, 1, &r), 0);
    ck_assert(r.allowed);
    ck_assert_int_eq(keel_limiter_take(l, longkey, sizeof longkey, 1, &r), 0);
    ck_assert(!r.allowed);
    keel_limiter_destroy(l);
}
END_TEST

typedef struct hammer {
    keel_limiter *l;
    pthread_barrier_t *b;
    int id, allowed;
} hammer;

/* 20,000 takes of "hot"; every tenth goes with 15 new keys in a
 * take_many(), whose prefetches read the tables the other thread grows. */
static void *hammer_one_key(void *arg)
{
    hammer *h = arg;
    pthread_barrier_wait(h->b);
    for (int i = 0; i < 20000; i++) {
        keel_limit_result r;
        if (i % 10) {
            keel_limiter_take(h->l, "hot", 3, 1, &r);
            h->allowed += r.allowed;
            continue;
        }
        keel_limit_req q[16];
        char fresh[15][24];
        q[0] = (keel_limit_req){.key = "hot", .len = 3, .cost = 1};
        for (int k = 0; k < 15; k++) {
            snprintf(fresh[k], sizeof fresh[k], "%d-%d-%d", h->id, i, k);
            q[k + 1] = (keel_limit_req){.key = fresh[k], .len = strlen(fresh[k]), .cost = 1};
        }
        ck_assert_int_eq(keel_limiter_take_many(h->l, q, 16), 0);
        h->allowed += q[0].result.allowed;
        for (int k = 1; k < 16; k++)
            ck_assert(q[k].result.allowed); /* a new key's first unit */
    }
    return NULL;
}

START_TEST(two_threads_on_one_key_never_exceed_the_limit)
{
    for (int algo = 0; algo < 3; algo++) {
        set_time(1000 * S); /* time stands still: exactly `limit` may pass */
        keel_limiter *l = local((keel_limit_algo)algo, 1000, 1 * S, 0);
        pthread_barrier_t b;
        pthread_barrier_init(&b, NULL, 2);
        hammer h[2] = {{l, &b, 0, 0}, {l, &b, 1, 0}};
        pthread_t t[2];
        for (int i = 0; i < 2; i++)
            pthread_create(&t[i], NULL, hammer_one_key, &h[i]);
        for (int i = 0; i < 2; i++)
            pthread_join(t[i], NULL);
        pthread_barrier_destroy(&b);
        ck_assert_int_eq(h[0].allowed + h[1].allowed, 1000);
        keel_limiter_stats st;
        keel_limiter_stats_get(l, &st);
        ck_assert_uint_eq(st.allowed, 1000 + 2 * 2000 * 15); /* and each new key's */
        ck_assert_uint_eq(st.rejected, 39000);
        keel_limiter_destroy(l);
    }
}
END_TEST

START_TEST(memory_stays_bounded_over_a_million_keys)
{
    set_time(1000 * S);
    keel_limiter *l;
    keel_limiter_opts o = {.algo = KEEL_LIMIT_GCRA, .limit = 10, .window_ns = 1 * S,
                           .max_keys = 10000, .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_limiter_create(&l, &o), 0);
    char key[32];
    for (int i = 0; i < 1000000; i++) {
        int n = snprintf(key, sizeof key, "client-%d", i);
        keel_limit_result r;
        ck_assert_int_eq(keel_limiter_take(l, key, (size_t)n, 10, &r), 0);
        ck_assert(r.allowed);
        if (i % 100 == 99) /* 10,000 keys span 5 s: most have refilled */
            kt_clock_advance(&clk, 50 * MS);
    }
    keel_limiter_stats st;
    keel_limiter_stats_get(l, &st);
    ck_assert_uint_le(st.keys, 10000);
    ck_assert_uint_ge(st.keys, 9000);
    ck_assert_uint_le(st.bytes, 10000 * 96); /* a few dozen bytes a key, tables included */
    ck_assert_uint_eq(st.evicted_idle + st.evicted_active, 1000000 - st.keys);
    /* every key emptied its bucket; a second later it is full again, idle,
     * and dropping it loses nothing */
    ck_assert_uint_gt(st.evicted_idle, 900000);
    keel_limiter_destroy(l);
    /* the sliding window's two counters cost no more */
    o.algo = KEEL_LIMIT_SLIDING_WINDOW;
    ck_assert_int_eq(keel_limiter_create(&l, &o), 0);
    for (int i = 0; i < 20000; i++) {
        int n = snprintf(key, sizeof key, "client-%d", i);
        keel_limit_result r;
        ck_assert_int_eq(keel_limiter_take(l, key, (size_t)n, 1, &r), 0);
    }
    keel_limiter_stats_get(l, &st);
    ck_assert_uint_ge(st.keys, 9000);
    ck_assert_uint_le(st.bytes, st.keys * 96);
    keel_limiter_destroy(l);
}
END_TEST

/* A rejected request learns when it could pass from the oldest entries
 * that must expire first: walked one by one, under the shard's lock, a
 * cost of the limit over a million entries took milliseconds a rejection.
 * Found by bisection, the times are exact and the work a few dozen steps. */
START_TEST(a_rejected_log_request_finds_its_retry_time_without_a_walk)
{
    enum { L = 1000000 };
    set_time(1000 * S);
    keel_limiter *l = local(KEEL_LIMIT_SLIDING_LOG, L, 60 * S, 0);
    keel_limit_result r;
    for (int i = 0; i < L; i++) { /* entry i at 1000 s + 10 i ns */
        ck_assert(take(l, "k", 1, &r));
        kt_clock_advance(&clk, 10);
    }
    uint64_t now = 1000 * S + 10ull * L, t0 = keel_now_ns();
    for (int i = 0; i < 100; i++) {
        ck_assert(!take(l, "k", L, &r)); /* every entry must go: the newest last */
        ck_assert_uint_eq(r.retry_after_ns, 1000 * S + 10ull * (L - 1) + 60 * S - now);
        ck_assert(!take(l, "k", L / 2, &r)); /* half of them */
        ck_assert_uint_eq(r.retry_after_ns, 1000 * S + 10ull * (L / 2 - 1) + 60 * S - now);
        ck_assert(!take(l, "k", 1, &r)); /* the oldest */
        ck_assert_uint_eq(r.retry_after_ns, 60 * S - 10ull * L);
    }
    uint64_t took = keel_now_ns() - t0;
    ck_assert_msg(took < 50 * MS, "300 rejections took %.1f ms", (double)took / 1e6);
    keel_limiter_destroy(l);
}
END_TEST

START_TEST(at_max_keys_an_active_key_may_go_and_is_counted)
{
    set_time(1000 * S);
    keel_limiter *l;
    keel_limiter_opts o = {.algo = KEEL_LIMIT_SLIDING_LOG, .limit = 2, .window_ns = S,
                           .max_keys = 64, .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_limiter_create(&l, &o), 0);
    char key[16];
    for (int i = 0; i < 1000; i++) { /* time stands still: every key stays active */
        int n = snprintf(key, sizeof key, "k%d", i);
        keel_limit_result r;
        ck_assert_int_eq(keel_limiter_take(l, key, (size_t)n, 1, &r), 0);
    }
    keel_limiter_stats st;
    keel_limiter_stats_get(l, &st);
    ck_assert_uint_le(st.keys, 64);
    ck_assert_uint_eq(st.evicted_idle, 0);
    ck_assert_uint_eq(st.evicted_active, 1000 - st.keys);
    keel_limiter_destroy(l);
}
END_TEST

/* A window key whose counts weigh nothing any more (its units refunded,
 * or its last write a rejection in the window after its admissions) is
 * in a fresh key's state whatever window it was written in: at max_keys it
 * goes before a key that still holds units, and counts as idle. */
START_TEST(at_max_keys_a_window_key_that_holds_nothing_goes_first)
{
    set_time(1000 * S);
    keel_limiter *l;
    keel_limiter_opts o = {.algo = KEEL_LIMIT_SLIDING_WINDOW, .limit = 1, .window_ns = S,
                           .max_keys = 2, .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_limiter_create(&l, &o), 0);
    keel_limit_result r;
    set_time(1001 * S + 500 * MS);
    ck_assert(take(l, "b", 1, &r)); /* b holds its unit into the next window */
    set_time(1002 * S + 50 * MS);
    ck_assert(take(l, "a", 1, &r));
    ck_assert_int_eq(keel_limiter_refund(l, "a", 1, 1, &r), 0); /* a holds nothing, written last */
    ck_assert_uint_eq(r.remaining, 1);
    ck_assert_uint_eq(r.reset_ns, 0);
    set_time(1002 * S + 100 * MS);
    ck_assert(take(l, "c", 1, &r)); /* a new key: one goes */
    keel_limiter_stats st;
    keel_limiter_stats_get(l, &st);
    ck_assert_uint_eq(st.evicted_idle, 1);
    ck_assert_uint_eq(st.evicted_active, 0);
    ck_assert_msg(!take(l, "b", 1, &r), "b, still holding 0.9 of its unit, was dropped and got another");
    keel_limiter_destroy(l);
}
END_TEST

/* A GCRA key whose bucket refills only after the clock's end (one unit
 * in 2^60 ns, a burst of 16) is as active as a key can be: at max_keys it
 * still makes room for a new one, and goes. */
START_TEST(at_max_keys_a_key_busy_past_the_clock_s_end_can_go)
{
    set_time(1000 * S);
    keel_limiter *l;
    keel_limiter_opts o = {.algo = KEEL_LIMIT_GCRA, .limit = 1, .window_ns = (uint64_t)1 << 60, .burst = 16,
                           .max_keys = 1, .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_limiter_create(&l, &o), 0);
    keel_limit_result r;
    ck_assert(take(l, "a", 16, &r));
    ck_assert(take(l, "b", 1, &r)); /* a goes */
    keel_limiter_stats st;
    keel_limiter_stats_get(l, &st);
    ck_assert_uint_eq(st.keys, 1);
    ck_assert_uint_eq(st.evicted_active, 1);
    ck_assert_msg(take(l, "a", 16, &r), "a was not dropped");
    keel_limiter_destroy(l);
}
END_TEST

/* A request that can never pass (cost over the limit) changes nothing:
 * at max_keys, a new key's rejection must not push out a key that still
 * holds units, which would then get more than its due. */
START_TEST(a_request_over_the_limit_pushes_out_no_key)
{
    for (int algo = 0; algo < 3; algo++) {
        set_time(1000 * S);
        keel_limiter *l;
        keel_limiter_opts o = {.algo = (keel_limit_algo)algo, .limit = 3, .window_ns = S,
                               .max_keys = 1, .clock = kt_clock_now, .clock_ud = &clk};
        ck_assert_int_eq(keel_limiter_create(&l, &o), 0);
        keel_limit_result r;
        ck_assert(take(l, "a", 3, &r));
        ck_assert_int_eq(keel_limiter_take(l, "b", 1, 4, &r), KEEL_ERANGE);
        ck_assert(!r.allowed);
        ck_assert_uint_eq(r.retry_after_ns, UINT64_MAX);
        keel_limiter_stats st;
        keel_limiter_stats_get(l, &st);
        ck_assert_uint_eq(st.keys, 1);
        ck_assert_uint_eq(st.evicted_active, 0);
        ck_assert_msg(!take(l, "a", 1, &r), "algo %d: the key pushed out got more than the limit", algo);
        keel_limiter_destroy(l);
    }
}
END_TEST

START_TEST(a_decision_with_an_older_clock_reading_stays_sane)
{
    /* two threads read the clock, the later one decides first */
    set_time(1000 * S);
    keel_limiter *l = local(KEEL_LIMIT_GCRA, 1000000, 1 * S, 1);
    keel_limit_result r;
    ck_assert(take(l, "k", 1, &r));
    set_time(1000 * S - 1);
    ck_assert(!take(l, "k", 1, &r));
    ck_assert_uint_eq(r.remaining, 0);
    ck_assert_uint_le(r.reset_ns, 1001);
    keel_limiter_destroy(l);
}
END_TEST

/* The same race on the log: the older reading is admitted after a newer
 * one. Its times to wait must stay times, not wrap around below zero. */
START_TEST(a_log_decision_with_an_older_clock_reading_stays_sane)
{
    set_time(1000 * S + 5);
    keel_limiter *l = local(KEEL_LIMIT_SLIDING_LOG, 2, 1 * S, 0);
    keel_limit_result r;
    ck_assert(take(l, "k", 1, &r));
    set_time(1000 * S);
    ck_assert(take(l, "k", 1, &r));
    ck_assert_uint_le(r.reset_ns, 1 * S + 5);
    set_time(1001 * S + 2); /* both leave the window at 1001 s + 5 at the latest */
    ck_assert(!take(l, "k", 2, &r));
    ck_assert_uint_le(r.retry_after_ns, 3);
    ck_assert_uint_le(r.reset_ns, 3);
    set_time(1001 * S + 5);
    ck_assert(take(l, "k", 2, &r));
    keel_limiter_destroy(l);
}
END_TEST

/* Near the clock's end, t + window wraps past zero: the log compared
 * t + W <= now and let every entry expire at once (10 of 10 admitted at
 * 1 per 1000 ns), and eviction took a key that still held units for an
 * idle one. Times are compared by their difference. */
START_TEST(the_log_expires_nothing_early_near_the_clock_s_end)
{
    set_time(UINT64_MAX - 500);
    keel_limiter *l = local(KEEL_LIMIT_SLIDING_LOG, 1, 1000, 0);
    keel_limit_result r;
    int admitted = 0;
    for (int i = 0; i < 10; i++, kt_clock_advance(&clk, 10))
        admitted += take(l, "k", 1, &r);
    ck_assert_int_eq(admitted, 1);
    ck_assert_uint_eq(r.retry_after_ns, 1000 - 90);
    ck_assert_uint_eq(r.reset_ns, 1000 - 90);
    keel_limiter_destroy(l);
    /* one key at most: the second pushes out the first, which holds a unit */
    keel_limiter_opts o = {.algo = KEEL_LIMIT_SLIDING_LOG, .limit = 1, .window_ns = 1000, .max_keys = 1,
                           .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_limiter_create(&l, &o), 0);
    set_time(UINT64_MAX - 500);
    ck_assert(take(l, "a", 1, &r));
    kt_clock_advance(&clk, 10);
    ck_assert(take(l, "b", 1, &r));
    keel_limiter_stats st;
    keel_limiter_stats_get(l, &st);
    ck_assert_uint_eq(st.evicted_active, 1);
    ck_assert_uint_eq(st.evicted_idle, 0);
    keel_limiter_destroy(l);
}
END_TEST

START_TEST(header_fields)
{
    set_time(1000 * S);
    keel_limiter *l;
    keel_limiter_opts o = {.algo = KEEL_LIMIT_SLIDING_LOG, .limit = 3, .window_ns = 60 * S,
                           .name = "per-client", .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_limiter_create(&l, &o), 0);
    keel_limit_result r;
    take(l, "k", 1, &r);
    kt_clock_advance(&clk, 1500 * MS);
    take(l, "k", 2, &r);
    char buf[512];
    size_t len;
    ck_assert_int_eq(keel_limiter_headers(l, &r, buf, sizeof buf, &len), 0);
    ck_assert_str_eq(buf, "X-RateLimit-Limit: 3\r\n"
                          "X-RateLimit-Remaining: 0\r\n"
                          "X-RateLimit-Reset: 60\r\n"
                          "RateLimit-Policy: \"per-client\";q=3;w=60\r\n"
                          "RateLimit: \"per-client\";r=0;t=60\r\n");
    ck_assert_uint_eq(len, strlen(buf));
    ck_assert(!take(l, "k", 1, &r));
    ck_assert_int_eq(keel_limiter_headers(l, &r, buf, sizeof buf, &len), 0);
    /* Retry-After 58.5 s, rounded up, and RateLimit's t the same time (the
     * draft's SHOULD); X-RateLimit-Reset stays until all units are back */
    ck_assert_str_eq(buf, "X-RateLimit-Limit: 3\r\n"
                          "X-RateLimit-Remaining: 0\r\n"
                          "X-RateLimit-Reset: 60\r\n"
                          "Retry-After: 59\r\n"
                          "RateLimit-Policy: \"per-client\";q=3;w=60\r\n"
                          "RateLimit: \"per-client\";r=0;t=59\r\n");
    ck_assert_int_eq(keel_limiter_headers(l, &r, buf, 10, &len), KEEL_ERANGE);
    ck_assert_uint_gt(len, 100);
    keel_limiter_destroy(l);
    /* GCRA's quota is its burst, earned back in burst x window / limit:
     * the policy agrees with X-RateLimit-Limit and what remains */
    o = (keel_limiter_opts){.algo = KEEL_LIMIT_GCRA, .limit = 100, .window_ns = 60 * S, .burst = 200,
                            .name = "api", .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_limiter_create(&l, &o), 0);
    take(l, "k", 1, &r);
    ck_assert_int_eq(keel_limiter_headers(l, &r, buf, sizeof buf, &len), 0);
    ck_assert_str_eq(buf, "X-RateLimit-Limit: 200\r\n"
                          "X-RateLimit-Remaining: 199\r\n"
                          "X-RateLimit-Reset: 1\r\n"
                          "RateLimit-Policy: \"api\";q=200;w=120\r\n"
                          "RateLimit: \"api\";r=199;t=1\r\n");
    take(l, "k", 199, &r);
    ck_assert(!take(l, "k", 1, &r)); /* a unit back in 0.6 s, all 200 in 120 s */
    ck_assert_int_eq(keel_limiter_headers(l, &r, buf, sizeof buf, &len), 0);
    ck_assert_str_eq(buf, "X-RateLimit-Limit: 200\r\n"
                          "X-RateLimit-Remaining: 0\r\n"
                          "X-RateLimit-Reset: 120\r\n"
                          "Retry-After: 1\r\n"
                          "RateLimit-Policy: \"api\";q=200;w=120\r\n"
                          "RateLimit: \"api\";r=0;t=1\r\n");
    /* a cost that never passes has no Retry-After: t stays the reset */
    ck_assert_int_eq(keel_limiter_take(l, "k", 1, 201, &r), KEEL_ERANGE);
    ck_assert_int_eq(keel_limiter_headers(l, &r, buf, sizeof buf, &len), 0);
    ck_assert_ptr_null(strstr(buf, "Retry-After"));
    ck_assert_ptr_nonnull(strstr(buf, "RateLimit: \"api\";r=0;t=120\r\n"));
    keel_limiter_destroy(l);
}
END_TEST

START_TEST(bad_input_is_refused)
{
    keel_limiter *l;
    keel_limiter_opts ok = {.algo = KEEL_LIMIT_GCRA, .limit = 1, .window_ns = S};
    keel_limiter_opts bad[] = {
        {.algo = KEEL_LIMIT_GCRA, .limit = 0, .window_ns = S},
        {.algo = KEEL_LIMIT_GCRA, .limit = 1, .window_ns = 0},
        {.algo = KEEL_LIMIT_GCRA, .limit = (uint64_t)UINT32_MAX + 1, .window_ns = S},
        {.algo = (keel_limit_algo)7, .limit = 1, .window_ns = S},
        {.algo = KEEL_LIMIT_GCRA, .limit = 1, .window_ns = S, .prefix = "app{x}:"},
        {.algo = KEEL_LIMIT_GCRA, .limit = 1, .window_ns = S, .name = "a\"b"},
        {.algo = KEEL_LIMIT_GCRA, .limit = 1, .window_ns = S, .on_store_error = 9},
        {.algo = KEEL_LIMIT_GCRA, .limit = 1, .window_ns = S, .max_keys = (size_t)1 << 38},
        {.algo = KEEL_LIMIT_GCRA, .limit = 1, .window_ns = UINT64_MAX},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        ck_assert_msg(keel_limiter_create(&l, &bad[i]) == KEEL_EINVAL, "case %zu accepted", i);
    ck_assert_int_eq(keel_limiter_create(&l, NULL), KEEL_EINVAL);
    ck_assert_int_eq(keel_limiter_create(&l, &ok), 0);
    keel_limit_result r;
    static char huge[4097];
    ck_assert_int_eq(keel_limiter_take(l, NULL, 1, 1, &r), KEEL_EINVAL);
    ck_assert_int_eq(keel_limiter_take(l, "k", 0, 1, &r), KEEL_EINVAL);
    ck_assert_int_eq(keel_limiter_take(l, huge, sizeof huge, 1, &r), KEEL_EINVAL);
    ck_assert_int_eq(keel_limiter_take(l, huge, sizeof huge - 1, 1, &r), 0);
    ck_assert_int_eq(keel_limiter_take(l, "k", 1, 1, NULL), KEEL_EINVAL);
    ck_assert_int_eq(keel_limiter_take(NULL, "k", 1, 1, &r), KEEL_EINVAL);
    ck_assert_int_eq(keel_limiter_take(l, "k", 1, UINT64_MAX, &r), KEEL_ERANGE);
    ck_assert_int_eq(keel_limiter_take_many(l, NULL, 1), KEEL_EINVAL);
    keel_limiter_destroy(l);
    keel_limiter_destroy(NULL);
}
END_TEST

/* ---- model-based: seeded random sequences against brute-force models ----
 *
 * Each run draws a policy, then takes, peeks, refunds, resets and
 * take_many() batches over keys of every shape (NUL bytes, at and past
 * the 16 inline bytes, 4096 bytes), with costs 0, 1, the limit, just over
 * it and near UINT64_MAX, and clock steps of 0, 1 ns, just under and over
 * the window, the last retry_after or reset_ns exactly or 1 ns short, and
 * huge ones. Every answer is compared field by field with a model that
 * knows only what limiter.h says:
 *  - the log: the admissions, net of refunds, in (t - W, t];
 *  - the window: the count of each fixed window [kW, (k + 1)W), the
 *    previous one weighted by the share (W - (t - kW)) / W of it that the
 *    sliding window still covers, plus the current one;
 *  - GCRA: a token bucket of `burst` units refilled at limit / W, its
 *    tokens kept as tokens x W (exact);
 * allowed is the model's test; remaining the most units that test passes
 * now; reset_ns the first time every unit passes again and retry_after_ns
 * the first time the same request passes, nothing else asked meanwhile,
 * both found by searching the model's future, never by the store's
 * formulas. The header text is checked for every answer. A failure names
 * its seed and step; KT_LIMITER_SEED=n (with CK_RUN_CASE) replays that
 * run alone, KT_LIMITER_RUNS=n runs n seeds instead of a test's few. */

typedef unsigned __int128 u128;

#define CLOCK_END ((uint64_t)1 << 62) /* the fake clock stays below */

/* Admissions of a key: when, and their units net of refunds. */
typedef struct madm {
    uint64_t t, units;
} madm;

typedef struct mlist {
    madm *e;
    size_t n, cap;
} mlist;

static void mlist_add(mlist *l, uint64_t t, uint64_t units)
{
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 16;
        l->e = realloc(l->e, l->cap * sizeof *l->e);
        ck_assert_ptr_nonnull(l->e);
    }
    l->e[l->n++] = (madm){t, units};
}

/* Takes back up to `units` of the newest admissions at or after `from`. */
static void mlist_refund(mlist *l, uint64_t from, uint64_t units)
{
    while (l->n && units && l->e[l->n - 1].t >= from) {
        madm *e = &l->e[l->n - 1];
        uint64_t back = e->units < units ? e->units : units;
        e->units -= back;
        units -= back;
        if (e->units == 0)
            l->n--;
    }
}

typedef struct mkey {
    const char *p;
    size_t len;
    mlist live;    /* log, window: the admissions that can still count */
    mlist all;     /* GCRA: every admission, for the rate bound */
    u128 tokens;   /* GCRA: tokens x W at `last`, once used */
    uint64_t last; /* (else a full bucket) */
    bool used;
    uint64_t seen; /* the store's time of its last answer */
} mkey;

/* The model of one limiter. Times are in the store's unit: ns in process,
 * us through Redis (`unit` ns each). B is what a cost may reach: GCRA's
 * burst, else the limit. */
typedef struct model {
    keel_limit_algo algo;
    uint64_t L, W, B, unit;
    mkey *keys;
    size_t nkeys;
    uint64_t allowed, rejected;
} model;

static void mkey_forget(mkey *k)
{
    k->live.n = k->all.n = 0;
    k->used = false;
}

static u128 m_tokens(const model *m, const mkey *k, u128 t)
{
    u128 full = (u128)m->B * m->W;
    if (!k->used)
        return full;
    u128 v = k->tokens + (t - k->last) * m->L;
    return v > full ? full : v;
}

/* The units admitted at times in [lo, hi). */
static uint64_t m_units(const mkey *k, u128 lo, u128 hi)
{
    uint64_t sum = 0;
    for (size_t i = 0; i < k->live.n; i++)
        if (k->live.e[i].t >= lo && k->live.e[i].t < hi)
            sum += k->live.e[i].units;
    return sum;
}

static u128 m_after_window(const model *m, u128 t) { return t + 1 > m->W ? t + 1 - m->W : 0; }

/* Whether `cost` units pass at t (0: whether the key is within its limit). */
static bool m_passes(const model *m, const mkey *k, u128 t, uint64_t cost)
{
    u128 W = m->W;
    switch (m->algo) {
    case KEEL_LIMIT_SLIDING_LOG: return m_units(k, m_after_window(m, t), t + 1) + (u128)cost <= m->L;
    case KEEL_LIMIT_SLIDING_WINDOW: {
        u128 kw = t / W, f = t % W;
        u128 prev = kw ? m_units(k, (kw - 1) * W, kw * W) : 0, cur = m_units(k, kw * W, (kw + 1) * W);
        return prev * (W - f) + (cur + cost) * W <= (u128)m->L * W;
    }
    default: return m_tokens(m, k, t) >= (u128)cost * W;
    }
}

/* The most units that pass at t. */
static uint64_t m_remaining(const model *m, const mkey *k, u128 t)
{
    uint64_t lo = 0, hi = m->B;
    while (lo < hi) {
        uint64_t mid = hi - (hi - lo) / 2;
        if (m_passes(m, k, t, mid))
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

/* The first d >= from at which, nothing else asked meanwhile, `cost` units
 * pass at now + d (cost B: every unit is free again); UINT64_MAX when
 * there is none before. Passing is monotone in d: a binary search. */
static uint64_t m_first(const model *m, const mkey *k, uint64_t now, uint64_t from, uint64_t cost)
{
    uint64_t lo = from, hi = UINT64_MAX - 1;
    if (!m_passes(m, k, (u128)now + hi, cost))
        return UINT64_MAX;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (m_passes(m, k, (u128)now + mid, cost))
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

/* Drops the admissions that count no more at now or later. */
static void m_prune(const model *m, mkey *k, uint64_t now)
{
    size_t kept = 0;
    for (size_t i = 0; i < k->live.n; i++) {
        uint64_t t = k->live.e[i].t;
        if (m->algo == KEEL_LIMIT_SLIDING_LOG ? (u128)t + m->W > now : t / m->W + 1 >= now / m->W)
            k->live.e[kept++] = k->live.e[i];
    }
    k->live.n = kept;
}

static void m_take(const model *m, mkey *k, uint64_t now, uint64_t cost)
{
    if (m->algo != KEEL_LIMIT_GCRA) {
        mlist_add(&k->live, now, cost);
        return;
    }
    k->tokens = m_tokens(m, k, now) - (u128)cost * m->W;
    k->last = now;
    k->used = true;
    mlist_add(&k->all, now, cost);
}

/* A refund gives back the newest units: the log's (all in its window),
 * those of the window's current fixed window, GCRA's (never over a full
 * bucket). */
static void m_refund(const model *m, mkey *k, uint64_t now, uint64_t cost)
{
    switch (m->algo) {
    case KEEL_LIMIT_SLIDING_LOG: mlist_refund(&k->live, 0, cost); break;
    case KEEL_LIMIT_SLIDING_WINDOW: mlist_refund(&k->live, now / m->W * m->W, cost); break;
    default: {
        u128 full = (u128)m->B * m->W, v = m_tokens(m, k, now) + (u128)(cost > m->B ? m->B : cost) * m->W;
        k->tokens = v > full ? full : v;
        k->last = now;
        k->used = true;
        mlist_refund(&k->all, 0, cost);
    }
    }
}

/* What limiter.h promises of the admissions, net of refunds, checked by
 * brute force at each admission: the log's window holds at most the
 * limit; the window's fixed window at most the limit and its sliding one
 * twice that; GCRA passes over any [t, now] at most burst + (now - t) x
 * limit / W units. */
static void m_bounds(const model *m, const mkey *k, uint64_t now, const char *where)
{
    u128 W = m->W;
    if (m->algo == KEEL_LIMIT_GCRA) {
        u128 sum = 0;
        for (size_t i = k->all.n; i-- > 0;) {
            sum += k->all.e[i].units;
            ck_assert_msg(sum * W <= (u128)m->B * W + (u128)(now - k->all.e[i].t) * m->L,
                          "%s: %llu units in %llu", where, (unsigned long long)sum,
                          (unsigned long long)(now - k->all.e[i].t));
        }
        return;
    }
    uint64_t sliding = m_units(k, m_after_window(m, now), (u128)now + 1);
    uint64_t fixed = m_units(k, (u128)now / W * W, (u128)now / W * W + W);
    if (m->algo == KEEL_LIMIT_SLIDING_LOG)
        ck_assert_msg(sliding <= m->L, "%s: %llu units in one window", where, (unsigned long long)sliding);
    else
        ck_assert_msg(fixed <= m->L && sliding <= 2 * m->L, "%s: %llu units in a fixed window, %llu in a sliding one",
                      where, (unsigned long long)fixed, (unsigned long long)sliding);
}

/* One run: the limiter, its model, the fake clock's time. */
typedef struct mrun {
    model m;
    keel_limiter *l;
    keel_limit_source src;
    const char *name;   /* the policy's name in the header fields */
    uint64_t window_ns; /* as given */
    uint64_t seed;
    int step;
    uint64_t now;                    /* in process */
    uint64_t last_retry, last_reset; /* of the latest answers, for clock steps */
    char where[192];
} mrun;

static uint64_t m_ns(const mrun *x, uint64_t v)
{
    return v == UINT64_MAX ? v : v * x->m.unit; /* Redis: microseconds, small */
}

static unsigned long long m_secs(uint64_t ns) { return ns / S + (ns % S != 0); }

/* The policy's window: the time to earn back B units (the window but for
 * a GCRA burst other than the limit), at most UINT64_MAX ns. */
static uint64_t policy_ns(const mrun *x)
{
    u128 w = ((u128)x->window_ns * x->m.B + x->m.L - 1) / x->m.L;
    return w > UINT64_MAX ? UINT64_MAX : (uint64_t)w;
}

/* The header fields of r, as limiter.h spells them. */
static void m_headers(mrun *x, const keel_limit_result *r)
{
    char want[512], got[512], retry[48] = "";
    unsigned long long t = m_secs(r->reset_ns); /* with Retry-After, the same time */
    if (!r->allowed && r->retry_after_ns != UINT64_MAX)
        snprintf(retry, sizeof retry, "Retry-After: %llu\r\n", t = m_secs(r->retry_after_ns));
    int n = snprintf(want, sizeof want,
                     "X-RateLimit-Limit: %llu\r\nX-RateLimit-Remaining: %llu\r\nX-RateLimit-Reset: %llu\r\n%s"
                     "RateLimit-Policy: \"%s\";q=%llu;w=%llu\r\nRateLimit: \"%s\";r=%llu;t=%llu\r\n",
                     (unsigned long long)r->limit, (unsigned long long)r->remaining, m_secs(r->reset_ns), retry,
                     x->name, (unsigned long long)x->m.B, m_secs(policy_ns(x)), x->name,
                     (unsigned long long)r->remaining, t);
    size_t len = 0;
    ck_assert_msg(keel_limiter_headers(x->l, r, got, sizeof got, &len) == 0 && strcmp(got, want) == 0 &&
                      len == (size_t)n,
                  "%s: headers\n%s\nwant\n%s", x->where, got, want);
    ck_assert_int_eq(keel_limiter_headers(x->l, r, got, (size_t)n, &len), KEEL_ERANGE); /* no room for the NUL */
    ck_assert_uint_eq(len, (size_t)n);
    ck_assert_int_eq(keel_limiter_headers(x->l, r, NULL, 0, &len), KEEL_ERANGE);
    ck_assert_uint_eq(len, (size_t)n);
}

/* Checks one answer to op on key k against the model, then applies the
 * request to the model. */
static void m_check(mrun *x, mkey *k, lop op, uint64_t cost, int rc, const keel_limit_result *r)
{
    static const char *const ops[] = {"take", "peek", "refund"};
    model *m = &x->m;
    uint64_t now = x->src == KEEL_LIMIT_SRC_REDIS ? r->now_ns / m->unit : x->now;
    snprintf(x->where, sizeof x->where, "seed %llu, step %d: %s of key %d (%zu bytes), cost %llu, at %llu",
             (unsigned long long)x->seed, x->step, ops[op], (int)(k - m->keys), k->len, (unsigned long long)cost,
             (unsigned long long)now);
    ck_assert_msg(r->now_ns == now * m->unit && r->source == x->src, "%s: now_ns %llu, source %d", x->where,
                  (unsigned long long)r->now_ns, (int)r->source);
    ck_assert_msg(now >= k->seen, "%s: the store's clock went back from %llu", x->where,
                  (unsigned long long)k->seen);
    k->seen = now;
    m_prune(m, k, now);
    uint64_t c = cost ? cost : 1;
    bool over = c > m->B;
    keel_limit_result e = {.allowed = 1, .limit = m->B};
    int erc = over && op != OP_REFUND ? KEEL_ERANGE : 0;
    if (op == OP_REFUND) {
        m_refund(m, k, now, c);
    } else {
        e.allowed = !over && m_passes(m, k, now, c);
        if (!e.allowed)
            e.retry_after_ns = over ? UINT64_MAX : m_ns(x, m_first(m, k, now, 1, c));
        if (op == OP_TAKE && e.allowed)
            m_take(m, k, now, c);
        if (op == OP_TAKE)
            *(e.allowed ? &m->allowed : &m->rejected) += 1;
    }
    e.remaining = m_remaining(m, k, now);
    e.reset_ns = m_ns(x, m_first(m, k, now, 0, m->B));
    ck_assert_msg(rc == erc, "%s: rc %d, want %d", x->where, rc, erc);
    ck_assert_msg(r->allowed == e.allowed && r->limit == e.limit && r->remaining == e.remaining &&
                      r->reset_ns == e.reset_ns && r->retry_after_ns == e.retry_after_ns,
                  "%s: allowed %d, limit %llu, remaining %llu, reset %llu, retry after %llu; the model: "
                  "%d, %llu, %llu, %llu, %llu",
                  x->where, r->allowed, (unsigned long long)r->limit, (unsigned long long)r->remaining,
                  (unsigned long long)r->reset_ns, (unsigned long long)r->retry_after_ns, e.allowed,
                  (unsigned long long)e.limit, (unsigned long long)e.remaining, (unsigned long long)e.reset_ns,
                  (unsigned long long)e.retry_after_ns);
    if (op == OP_TAKE && e.allowed)
        m_bounds(m, k, now, x->where);
    if (!e.allowed && !over)
        x->last_retry = r->retry_after_ns / m->unit;
    x->last_reset = r->reset_ns / m->unit;
    m_headers(x, r);
}

static void m_stats(mrun *x)
{
    keel_limiter_stats st;
    keel_limiter_stats_get(x->l, &st);
    ck_assert_msg(st.allowed == x->m.allowed && st.rejected == x->m.rejected,
                  "%s: stats say %llu allowed, %llu rejected; the model %llu, %llu", x->where,
                  (unsigned long long)st.allowed, (unsigned long long)st.rejected,
                  (unsigned long long)x->m.allowed, (unsigned long long)x->m.rejected);
}

/* Keys of every shape: NUL bytes, 16 bytes (inline) and 17, braces (a
 * Redis hash tag), up to the longest, 4096 bytes. */
static void m_keys(model *m)
{
    static char k16[2][16], k17[17], k300[300], k4096[2][4096];
    memcpy(k16[0], "0123456789abcdef", 16);
    memcpy(k16[1], "0123456789abcdeg", 16);
    memcpy(k17, "0123456789abcdef", 16); /* then a NUL */
    memset(k300, 'x', sizeof k300);
    k300[150] = '\0';
    memset(k4096, 'y', sizeof k4096);
    k4096[1][4095] = 'z';
    const struct {
        const char *p;
        size_t len;
    } shapes[] = {{"a", 1},     {"b", 1},         {"a\0b", 3},        {"a\0c", 3},  {"\0", 1},
                  {"\0\0", 2},  {k16[0], 16},     {k16[1], 16},       {k17, 17},    {k300, 300},
                  {k4096[0], 4096}, {k4096[1], 4096}, {"}{", 2},      {"{x}", 3}};
    m->nkeys = sizeof shapes / sizeof shapes[0];
    m->keys = calloc(m->nkeys, sizeof *m->keys);
    ck_assert_ptr_nonnull(m->keys);
    for (size_t i = 0; i < m->nkeys; i++)
        m->keys[i] = (mkey){.p = shapes[i].p, .len = shapes[i].len};
}

static void m_free(model *m)
{
    for (size_t i = 0; i < m->nkeys; i++) {
        free(m->keys[i].live.e);
        free(m->keys[i].all.e);
    }
    free(m->keys);
}

static uint64_t m_cost(kt_rng *g, uint64_t B)
{
    switch (kt_rng_below(g, 12)) {
    case 0: return 0;
    case 1:
    case 2: return 1;
    case 3: return B;
    case 4: return B + 1;
    case 5: return B + 2 + kt_rng_below(g, 1000);
    case 6: return UINT64_MAX - kt_rng_below(g, 2);
    case 7: return (uint64_t)1 << (32 + kt_rng_below(g, 32));
    default: return 1 + kt_rng_below(g, B > 8 && kt_rng_below(g, 2) ? 8 : B);
    }
}

/* A random take, peek, refund, reset or take_many() batch. */
static void m_op(mrun *x, kt_rng *g)
{
    model *m = &x->m;
    mkey *k = &m->keys[kt_rng_below(g, m->nkeys)];
    uint64_t cost = m_cost(g, m->B);
    keel_limit_result r;
    int what = (int)kt_rng_below(g, 20);
    if (what < 9) {
        int rc = keel_limiter_take(x->l, k->p, k->len, cost, &r);
        m_check(x, k, OP_TAKE, cost, rc, &r);
    } else if (what < 12) {
        int rc = keel_limiter_peek(x->l, k->p, k->len, cost, &r);
        m_check(x, k, OP_PEEK, cost, rc, &r);
    } else if (what < 15) {
        int rc = keel_limiter_refund(x->l, k->p, k->len, cost, &r);
        m_check(x, k, OP_REFUND, cost, rc, &r);
    } else if (what < 16) {
        ck_assert_int_eq(keel_limiter_reset(x->l, k->p, k->len), 0);
        mkey_forget(k);
    } else { /* a batch, keys repeated */
        keel_limit_req q[24];
        mkey *of[24];
        size_t n = 1 + kt_rng_below(g, 24);
        for (size_t i = 0; i < n; i++) {
            of[i] = &m->keys[kt_rng_below(g, 2) ? kt_rng_below(g, 3) : kt_rng_below(g, m->nkeys)];
            q[i] = (keel_limit_req){.key = of[i]->p, .len = of[i]->len, .cost = m_cost(g, m->B)};
        }
        ck_assert_int_eq(keel_limiter_take_many(x->l, q, n), 0);
        for (size_t i = 0; i < n; i++)
            m_check(x, of[i], OP_TAKE, q[i].cost, q[i].rc, &q[i].result);
    }
    m_stats(x);
}

/* ---- the in-process store under the model ---- */

static void m_advance(mrun *x, uint64_t d)
{
    if (d <= CLOCK_END - x->now) {
        x->now += d;
        set_time(x->now);
    }
}

static uint64_t m_step(mrun *x, kt_rng *g)
{
    uint64_t W = x->m.W, r = x->last_retry, z = x->last_reset;
    switch (kt_rng_below(g, 16)) {
    case 0:
    case 1: return 0;
    case 2: return 1;
    case 3: return W - 1;
    case 4: return W;
    case 5: return W + 1;
    case 6: return 2 * W - 1;
    case 7: return kt_rng_below(g, W);
    case 8: return kt_rng_below(g, 3 * W);
    case 9: return r;
    case 10: return r ? r - 1 : 0;
    case 11: return z;
    case 12: return z ? z - 1 : 0;
    case 13: return (uint64_t)1 << kt_rng_below(g, 61);
    default: return kt_rng_below(g, W / 8 + 2);
    }
}

/* Takes a key until a rejection; then retried 1 ns before retry_after_ns
 * it still fails, and exactly then it passes, nothing else asked
 * meanwhile. After that take, every unit is back exactly at its reset_ns,
 * and not 1 ns before. */
static void m_probe(mrun *x, kt_rng *g)
{
    model *m = &x->m;
    mkey *k = &m->keys[kt_rng_below(g, m->nkeys)];
    uint64_t cost = 1 + kt_rng_below(g, m->B < 4 ? m->B : 4);
    keel_limit_result r = {.allowed = 1};
    for (int i = 0; i < 64 && r.allowed; i++)
        m_check(x, k, OP_TAKE, cost, keel_limiter_take(x->l, k->p, k->len, cost, &r), &r);
    uint64_t wait = r.retry_after_ns;
    if (r.allowed || wait > CLOCK_END - x->now)
        return;
    m_advance(x, wait - 1);
    m_check(x, k, OP_TAKE, cost, keel_limiter_take(x->l, k->p, k->len, cost, &r), &r);
    ck_assert_msg(!r.allowed && r.retry_after_ns == 1, "%s: passed 1 ns before its retry_after", x->where);
    m_advance(x, 1);
    m_check(x, k, OP_TAKE, cost, keel_limiter_take(x->l, k->p, k->len, cost, &r), &r);
    ck_assert_msg(r.allowed, "%s: refused at its retry_after", x->where);
    wait = r.reset_ns;
    if (wait == 0 || wait > CLOCK_END - x->now)
        return;
    m_advance(x, wait - 1);
    m_check(x, k, OP_PEEK, m->B, keel_limiter_peek(x->l, k->p, k->len, m->B, &r), &r);
    ck_assert_msg(!r.allowed && r.remaining < m->B, "%s: all back 1 ns before reset_ns", x->where);
    m_advance(x, 1);
    m_check(x, k, OP_PEEK, m->B, keel_limiter_peek(x->l, k->p, k->len, m->B, &r), &r);
    ck_assert_msg(r.allowed && r.remaining == m->B && r.reset_ns == 0, "%s: not all back at reset_ns", x->where);
    m_stats(x);
}

/* A policy for run `seed`, in process. */
static void m_local_open(mrun *x, keel_limit_algo algo, kt_rng *g, size_t max_keys)
{
    static const uint64_t limits[] = {1, 2, 3, 7, 10, 100, 1000, UINT32_MAX};
    static const uint64_t windows[] = {1, 2, 3, 1000, 999983, S, 60 * S, (uint64_t)1 << 60};
    static const char *const names[] = {NULL, "api", "a-policy-name-of-the-longest-length-a-quoted-string-may-hold-63"};
    uint64_t L = kt_rng_below(g, 4) ? limits[kt_rng_below(g, 8)] : 1 + kt_rng_below(g, UINT32_MAX);
    uint64_t W = kt_rng_below(g, 4) ? windows[kt_rng_below(g, 8)] : 1 + kt_rng_below(g, (uint64_t)1 << 60);
    uint64_t bursts[] = {0, 1, L, 1 + kt_rng_below(g, UINT32_MAX), UINT32_MAX};
    uint64_t burst = algo == KEEL_LIMIT_GCRA ? bursts[kt_rng_below(g, 5)] : 0;
    const char *name = names[kt_rng_below(g, 3)];
    keel_limiter_opts o = {.algo = algo, .limit = L, .window_ns = W, .burst = burst, .name = name,
                           .max_keys = max_keys, .clock = kt_clock_now, .clock_ud = &clk};
    uint64_t starts[] = {0, 1, W - 1, 1000 * S, kt_rng_below(g, (uint64_t)1 << 61)};
    x->now = starts[kt_rng_below(g, 5)];
    set_time(x->now);
    ck_assert_msg(keel_limiter_create(&x->l, &o) == 0, "seed %llu: create", (unsigned long long)x->seed);
    x->m = (model){.algo = algo, .L = L, .W = W, .B = burst ? burst : L, .unit = 1};
    x->src = KEEL_LIMIT_SRC_LOCAL;
    x->name = name ? name : "default";
    x->window_ns = W;
}

static void m_run_local(keel_limit_algo algo, uint64_t seed, int steps)
{
    kt_rng g = kt_rng_seed(seed);
    mrun x = {.seed = seed};
    m_local_open(&x, algo, &g, 0);
    m_keys(&x.m);
    for (x.step = 0; x.step < steps; x.step++) {
        if (kt_rng_below(&g, 2))
            m_advance(&x, m_step(&x, &g));
        if (kt_rng_below(&g, 30) == 0)
            m_probe(&x, &g);
        else
            m_op(&x, &g);
    }
    keel_limiter_destroy(x.l);
    m_free(&x.m);
}

START_TEST(each_algorithm_answers_as_its_model)
{
    int n = kt_runs("KT_LIMITER_RUNS", 40);
    for (int i = 0; i < n; i++)
        m_run_local((keel_limit_algo)_i, kt_seed("KT_LIMITER_SEED", 1000 * (uint64_t)(_i + 1), i, &n), 300);
}
END_TEST

/* At max_keys, a key dropped as idle was in a fresh key's state: nothing
 * visible changes, and the model, which forgets nothing, goes on agreeing.
 * A key dropped while it held units is counted in evicted_active: after
 * each such count, exactly that many keys the model says hold units
 * answer as fresh keys, and from then on the model forgets them too. */
static void m_run_evict(keel_limit_algo algo, uint64_t seed, int steps)
{
    kt_rng g = kt_rng_seed(seed);
    mrun x = {.seed = seed};
    size_t max_keys = 1 + kt_rng_below(&g, 200);
    m_local_open(&x, algo, &g, max_keys);
    model *m = &x.m;
    m->nkeys = max_keys + 1 + kt_rng_below(&g, 2 * max_keys + 8);
    m->keys = calloc(m->nkeys, sizeof *m->keys);
    char *names = calloc(m->nkeys, 40);
    ck_assert(m->keys && names);
    for (size_t i = 0; i < m->nkeys; i++) { /* short, inline and not, NUL bytes */
        char *p = names + 40 * i;
        int n = snprintf(p, 40, "key-%zu", i);
        m->keys[i] = (mkey){.p = p, .len = i % 3 == 0 ? 40 : i % 3 == 1 ? (size_t)n : (size_t)n + 1};
    }
    uint64_t active = 0;
    for (x.step = 0; x.step < steps; x.step++) {
        uint64_t W = m->W, steps_of[] = {0, 0, 1, kt_rng_below(&g, W / 4 + 1), W, 2 * W, W / 2 + 1};
        if (kt_rng_below(&g, 3) == 0)
            m_advance(&x, steps_of[kt_rng_below(&g, 7)]);
        mkey *k = &m->keys[kt_rng_below(&g, m->nkeys)];
        uint64_t cost = kt_rng_below(&g, 4) ? 1 + kt_rng_below(&g, m->B < 3 ? m->B : 3) : m_cost(&g, m->B);
        keel_limit_result r;
        int what = (int)kt_rng_below(&g, 20);
        if (what < 14)
            m_check(&x, k, OP_TAKE, cost, keel_limiter_take(x.l, k->p, k->len, cost, &r), &r);
        else if (what < 16)
            m_check(&x, k, OP_PEEK, cost, keel_limiter_peek(x.l, k->p, k->len, cost, &r), &r);
        else if (what < 19)
            m_check(&x, k, OP_REFUND, cost, keel_limiter_refund(x.l, k->p, k->len, cost, &r), &r);
        else {
            ck_assert_int_eq(keel_limiter_reset(x.l, k->p, k->len), 0);
            mkey_forget(k);
        }
        m_stats(&x);
        keel_limiter_stats st;
        keel_limiter_stats_get(x.l, &st);
        ck_assert_msg(st.keys <= max_keys, "%s: %llu keys held, max_keys %zu", x.where,
                      (unsigned long long)st.keys, max_keys);
        if (st.evicted_active == active)
            continue;
        uint64_t gone = 0;
        for (size_t i = 0; i < m->nkeys; i++) {
            mkey *o = &m->keys[i];
            if (m_passes(m, o, x.now, m->B)) /* holds nothing */
                continue;
            keel_limiter_peek(x.l, o->p, o->len, 1, &r);
            if (r.remaining == m->B && r.reset_ns == 0) { /* a fresh key's answer: dropped */
                mkey_forget(o);
                gone++;
            }
        }
        ck_assert_msg(gone == st.evicted_active - active,
                      "%s: %llu keys dropped while active, but %llu holding units answer as fresh",
                      x.where, (unsigned long long)(st.evicted_active - active), (unsigned long long)gone);
        active = st.evicted_active;
    }
    free(names);
    keel_limiter_destroy(x.l);
    m_free(&x.m);
}

START_TEST(a_key_dropped_at_max_keys_idle_loses_nothing)
{
    int n = kt_runs("KT_LIMITER_RUNS", 60);
    for (int i = 0; i < n; i++)
        m_run_evict((keel_limit_algo)_i, kt_seed("KT_LIMITER_SEED", 5000 * (uint64_t)(_i + 1), i, &n), 500);
}
END_TEST

/* ---- Redis ---- */

static keel_redis *redis_nodes(int n) { return kt_redis_open(n, 500 * MS); }

/* The Redis names of key's record (k1) and the log's sum (k2) under the
 * options, as keel_limiter(3) documents them (key without '%' or '}'). */
static void rkeys(const keel_limiter_opts *o, const char *key, char *k1, char *k2, size_t size)
{
    static const char *const algos[] = {"log", "window", "gcra"};
    char text[128];
    uint64_t burst = o->algo == KEEL_LIMIT_GCRA && o->burst ? o->burst : o->limit;
    int n = snprintf(text, sizeof text, "%llu %llu %llu %s", (unsigned long long)o->limit,
                     (unsigned long long)o->window_ns, (unsigned long long)burst, o->name ? o->name : "default");
    unsigned long long h = keel__hash64(text, (size_t)n, 0) >> 32;
    snprintf(k1, size, "%s%s:%08llx:{%s}", o->prefix ? o->prefix : "keel:rl:", algos[o->algo], h, key);
    snprintf(k2, size, "%s:s", k1);
}

static keel_limiter *remote(keel_redis *redis, keel_limit_algo algo, uint64_t limit,
                            uint64_t window, const char *prefix, keel_limit_on_error on_error)
{
    keel_limiter *l;
    keel_limiter_opts o = {.algo = algo, .limit = limit, .window_ns = window, .redis = redis,
                           .prefix = prefix, .on_store_error = on_error};
    ck_assert_int_eq(keel_limiter_create(&l, &o), 0);
    return l;
}

START_TEST(redis_decides_like_the_local_store)
{
    keel_redis *redis = redis_nodes(3);
    static const char *const names[] = {"log", "window", "gcra"};
    for (int algo = 0; algo < 3; algo++) {
        char prefix[64];
        snprintf(prefix, sizeof prefix, "kt:%s:%d:", names[algo], getpid());
        keel_limiter *l = remote(redis, (keel_limit_algo)algo, 5, 10 * S, prefix, KEEL_LIMIT_FAIL_CLOSED);
        keel_limit_result r;
        for (int i = 0; i < 5; i++) {
            ck_assert(take(l, "user:1", 1, &r));
            ck_assert_int_eq(r.source, KEEL_LIMIT_SRC_REDIS);
            ck_assert_uint_eq(r.remaining, (uint64_t)(4 - i));
        }
        ck_assert(!take(l, "user:1", 1, &r));
        ck_assert_uint_gt(r.retry_after_ns, 0);
        ck_assert_uint_le(r.retry_after_ns, 20 * S); /* the window: up to two windows */
        ck_assert_uint_gt(r.now_ns, 1600000000ull * S); /* the server's clock */
        ck_assert_int_eq(keel_limiter_peek(l, "user:2", 6, 5, &r), 0);
        ck_assert(r.allowed);
        ck_assert_int_eq(keel_limiter_refund(l, "user:1", 6, 2, &r), 0);
        ck_assert(take(l, "user:1", 2, &r));
        ck_assert(!take(l, "user:1", 1, &r));
        ck_assert_int_eq(keel_limiter_take(l, "user:1", 6, 6, &r), KEEL_ERANGE);
        ck_assert_uint_eq(r.retry_after_ns, UINT64_MAX);
        /* binary keys, and reset */
        ck_assert_int_eq(keel_limiter_take(l, "a\0b}{", 5, 5, &r), 0);
        ck_assert(r.allowed);
        ck_assert_int_eq(keel_limiter_take(l, "a\0c}{", 5, 5, &r), 0);
        ck_assert(r.allowed);
        ck_assert_int_eq(keel_limiter_take(l, "a\0b}{", 5, 1, &r), 0);
        ck_assert(!r.allowed);
        ck_assert_int_eq(keel_limiter_reset(l, "a\0b}{", 5), 0);
        ck_assert_int_eq(keel_limiter_take(l, "a\0b}{", 5, 5, &r), 0);
        ck_assert(r.allowed);
        keel_limiter_destroy(l);
    }
    keel_redis_destroy(redis);
}
END_TEST

/* Limiters of distinct policies on one Redis, each with the default
 * prefix, for one client key: each keeps its own record. They shared one:
 * a GCRA limiter's writes (PEXPIRE, DEL) wiped a window limiter's counts,
 * and a log limiter next to a GCRA one got WRONGTYPE on every request.
 * Instances of one policy (other processes of the service) still share. */
START_TEST(only_limiters_of_one_policy_share_a_key_through_redis)
{
    keel_redis *redis = redis_nodes(3);
    char key[32];
    size_t len = (size_t)snprintf(key, sizeof key, "client:%d", getpid());
    keel_limiter_opts opts[] = {
        {.algo = KEEL_LIMIT_GCRA, .limit = 3, .window_ns = 60 * S},
        {.algo = KEEL_LIMIT_SLIDING_WINDOW, .limit = 3, .window_ns = 60 * S},
        {.algo = KEEL_LIMIT_SLIDING_LOG, .limit = 3, .window_ns = 60 * S},
        {.algo = KEEL_LIMIT_SLIDING_LOG, .limit = 4, .window_ns = 60 * S},
        {.algo = KEEL_LIMIT_SLIDING_LOG, .limit = 3, .window_ns = 30 * S},
        {.algo = KEEL_LIMIT_GCRA, .limit = 3, .window_ns = 60 * S, .burst = 2},
        {.algo = KEEL_LIMIT_GCRA, .limit = 3, .window_ns = 60 * S, .name = "other"},
    };
    enum { N = sizeof opts / sizeof opts[0] };
    keel_limiter *l[N], *twin[N];
    for (int i = 0; i < N; i++) {
        opts[i].redis = redis;
        opts[i].on_store_error = KEEL_LIMIT_FAIL_CLOSED;
        ck_assert_int_eq(keel_limiter_create(&l[i], &opts[i]), 0);
        ck_assert_int_eq(keel_limiter_create(&twin[i], &opts[i]), 0);
        ck_assert_int_eq(keel_limiter_reset(l[i], key, len), 0);
    }
    keel_limit_result r;
    for (int i = 0; i < N; i++) { /* each gets its whole quota, whatever the others did */
        uint64_t quota = opts[i].burst ? opts[i].burst : opts[i].limit;
        for (uint64_t k = 0; k < quota; k++) {
            int rc = keel_limiter_take(l[i], key, len, 1, &r);
            ck_assert_msg(rc == 0, "policy %d, take %llu: %s", i, (unsigned long long)k, keel_strerror(rc));
            ck_assert_int_eq(r.source, KEEL_LIMIT_SRC_REDIS);
            ck_assert_msg(r.allowed, "policy %d: take %llu of %llu refused", i, (unsigned long long)k + 1,
                          (unsigned long long)quota);
        }
    }
    for (int i = 0; i < N; i++) { /* and none lost its state to another's writes */
        ck_assert_int_eq(keel_limiter_peek(l[i], key, len, 1, &r), 0);
        ck_assert_msg(!r.allowed, "policy %d: its record was wiped", i);
        ck_assert_int_eq(keel_limiter_take(twin[i], key, len, 1, &r), 0); /* the same policy: shared */
        ck_assert_int_eq(r.source, KEEL_LIMIT_SRC_REDIS);
        ck_assert_msg(!r.allowed, "policy %d: a second instance does not share its record", i);
    }
    for (int i = 0; i < N; i++) {
        ck_assert_int_eq(keel_limiter_reset(l[i], key, len), 0);
        keel_limiter_destroy(l[i]);
        keel_limiter_destroy(twin[i]);
    }
    keel_redis_destroy(redis);
}
END_TEST

/* The bytes of a key's state, as DUMP gives them (empty: no key). */
static void dump(const char *key, size_t len, char *out, size_t size, size_t *n)
{
    char host[64];
    int port;
    kt_redis_node(0, host, sizeof host, &port);
    redisContext *c = redisConnect(host, port);
    ck_assert(c && !c->err);
    const char *argv[2] = {"DUMP", key};
    size_t lens[2] = {4, len};
    redisReply *rep = redisCommandArgv(c, 2, argv, lens);
    ck_assert_ptr_nonnull(rep);
    *n = rep->type == REDIS_REPLY_STRING ? rep->len : 0;
    ck_assert_uint_le(*n, size);
    memcpy(out, rep->str ? rep->str : "", *n);
    freeReplyObject(rep);
    redisFree(c);
}

START_TEST(a_rejection_writes_nothing_to_redis)
{
    keel_redis *redis = redis_nodes(1);
    for (int algo = 0; algo < 3; algo++) {
        char prefix[64], k1[128], k2[128];
        snprintf(prefix, sizeof prefix, "kt:rej:%d:%d:", getpid(), algo);
        rkeys(&(keel_limiter_opts){.algo = (keel_limit_algo)algo, .limit = 3, .window_ns = 60 * S, .prefix = prefix},
              "k", k1, k2, sizeof k1);
        keel_limiter *l = remote(redis, (keel_limit_algo)algo, 3, 60 * S, prefix, KEEL_LIMIT_FAIL_CLOSED);
        keel_limit_result r;
        for (int i = 0; i < 3; i++)
            ck_assert(take(l, "k", 1, &r));
        char before[2][512], after[2][512];
        size_t nb[2], na[2];
        dump(k1, strlen(k1), before[0], sizeof before[0], &nb[0]);
        dump(k2, strlen(k2), before[1], sizeof before[1], &nb[1]);
        ck_assert_uint_gt(nb[0], 0);
        for (int i = 0; i < 20; i++) /* a client retrying above the limit */
            ck_assert(!take(l, "k", 1, &r));
        dump(k1, strlen(k1), after[0], sizeof after[0], &na[0]);
        dump(k2, strlen(k2), after[1], sizeof after[1], &na[1]);
        for (int k = 0; k < 2; k++) {
            ck_assert_uint_eq(na[k], nb[k]);
            ck_assert(memcmp(before[k], after[k], nb[k]) == 0);
        }
        keel_limiter_destroy(l);
    }
    keel_redis_destroy(redis);
}
END_TEST

/* A number a command on node 0 answers (PTTL, EXISTS). */
static long long node0_number(const char *cmd, const char *key)
{
    char host[64];
    int port;
    kt_redis_node(0, host, sizeof host, &port);
    redisContext *c = redisConnect(host, port);
    ck_assert(c && !c->err);
    const char *argv[2] = {cmd, key};
    size_t lens[2] = {strlen(cmd), strlen(key)};
    redisReply *rep = redisCommandArgv(c, 2, argv, lens);
    ck_assert(rep && rep->type == REDIS_REPLY_INTEGER);
    long long v = rep->integer;
    freeReplyObject(rep);
    redisFree(c);
    return v;
}

/* A refund rewrites the log's newest entry: the set it recreates must
 * expire with the sum beside it. A set that outlived its sum came back as
 * a negative sum when its entries expired, and a burst then got more than
 * the limit. A refund of a key that holds nothing stores nothing. */
START_TEST(a_log_refund_through_redis_leaves_nothing_that_never_expires)
{
    keel_redis *redis = redis_nodes(1);
    char prefix[64], k1[128], k2[128];
    snprintf(prefix, sizeof prefix, "kt:refund:%d:", getpid());
    rkeys(&(keel_limiter_opts){.algo = KEEL_LIMIT_SLIDING_LOG, .limit = 3, .window_ns = 200 * MS, .prefix = prefix},
          "k", k1, k2, sizeof k1);
    /* a window the take and the refund fit in even under valgrind on a
     * busy machine (Redis keeps time on its own clock) */
    keel_limiter *l = remote(redis, KEEL_LIMIT_SLIDING_LOG, 3, 200 * MS, prefix, KEEL_LIMIT_FAIL_CLOSED);
    keel_limit_result r;
    ck_assert_int_eq(keel_limiter_refund(l, "k", 1, 1, &r), 0); /* nothing to give back */
    ck_assert_int_eq(node0_number("EXISTS", k1) + node0_number("EXISTS", k2), 0);
    ck_assert(take(l, "k", 3, &r));
    ck_assert_int_eq(keel_limiter_refund(l, "k", 1, 1, &r), 0);
    ck_assert_uint_eq(r.remaining, 1);
    ck_assert_int_ne(node0_number("PTTL", k1), -1); /* -1: a key without expiry */
    ck_assert_int_ne(node0_number("PTTL", k2), -1);
    /* the sum expires (about 201 ms): then a burst gets the limit, not more */
    for (int i = 0; i < 2000 && node0_number("EXISTS", k2); i++)
        kt_nap(1 * MS); /* Redis expires it on its own clock */
    ck_assert_int_eq(node0_number("EXISTS", k2), 0);
    keel_limit_req q[3] = {{.key = "k", .len = 1, .cost = 3}, {.key = "k", .len = 1, .cost = 2},
                           {.key = "k", .len = 1, .cost = 1}};
    ck_assert_int_eq(keel_limiter_take_many(l, q, 3), 0); /* one round trip, well within the window */
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(q[i].rc, 0);
        ck_assert_int_eq(q[i].result.source, KEEL_LIMIT_SRC_REDIS);
    }
    ck_assert_msg(q[0].result.allowed && !q[1].result.allowed && !q[2].result.allowed,
                  "a burst after the refund got %d+%d+%d", q[0].result.allowed * 3,
                  q[1].result.allowed * 2, q[2].result.allowed);
    keel_limiter_destroy(l);
    keel_redis_destroy(redis);
}
END_TEST

/* A limiter on one Redis node, a connection of the test's own to it, and
 * the names of key "k"'s log (or bucket) and sum. */
typedef struct rfix {
    keel_redis *redis;
    keel_limiter *l;
    redisContext *c;
    char prefix[64], k1[128], k2[128];
} rfix;

static void rfix_open(rfix *f, const char *tag, keel_limiter_opts o)
{
    f->redis = redis_nodes(1);
    snprintf(f->prefix, sizeof f->prefix, "kt:%s:%d:", tag, getpid());
    char host[64];
    int port;
    kt_redis_node(0, host, sizeof host, &port);
    f->c = redisConnect(host, port);
    ck_assert(f->c && !f->c->err);
    o.redis = f->redis;
    o.prefix = f->prefix;
    rkeys(&o, "k", f->k1, f->k2, sizeof f->k1);
    ck_assert_int_eq(keel_limiter_create(&f->l, &o), 0);
}

static void rfix_close(rfix *f)
{
    keel_limiter_destroy(f->l);
    redisFree(f->c);
    keel_redis_destroy(f->redis);
}

/* The log's sum must never outlive the entries it counts: one that did
 * would count units no entry holds, for as long as the client stays busy.
 * Two PEXPIREs each read the server's clock, and now and then a
 * millisecond ticks between them; both keys must share one deadline. */
START_TEST(the_log_and_its_sum_expire_at_the_same_instant)
{
    rfix f;
    rfix_open(&f, "ttl", (keel_limiter_opts){.algo = KEEL_LIMIT_SLIDING_LOG, .limit = 1000000, .window_ns = 10 * S});
    keel_limit_result r;
    for (int i = 0; i < 10000; i++) {
        ck_assert(take(f.l, "k", 1, &r));
        ck_assert_int_eq(r.source, KEEL_LIMIT_SRC_REDIS);
        redisReply *a = redisCommand(f.c, "PEXPIRETIME %s", f.k1), *b = redisCommand(f.c, "PEXPIRETIME %s", f.k2);
        ck_assert(a && b && a->type == REDIS_REPLY_INTEGER && b->type == REDIS_REPLY_INTEGER);
        ck_assert_msg(a->integer == b->integer, "take %d: the log expires at %lld, its sum at %lld", i,
                      a->integer, b->integer);
        freeReplyObject(a);
        freeReplyObject(b);
    }
    rfix_close(&f);
}
END_TEST

START_TEST(redis_gcra_keeps_sub_microsecond_intervals)
{
    rfix f;
    rfix_open(&f, "fine", (keel_limiter_opts){.algo = KEEL_LIMIT_GCRA, .limit = 10000000, .window_ns = 1 * S, .burst = 10});
    keel_limit_result r;
    ck_assert(take(f.l, "fresh", 1, &r)); /* one unit is 0.1 us */
    ck_assert_int_eq(r.source, KEEL_LIMIT_SRC_REDIS);
    ck_assert_uint_eq(r.remaining, 9);
    rfix_close(&f);
}
END_TEST

/* Node 0's TIME in microseconds. */
static uint64_t node0_time_us(redisContext *c)
{
    redisReply *rep = redisCommand(c, "TIME");
    ck_assert(rep && rep->type == REDIS_REPLY_ARRAY && rep->elements == 2);
    uint64_t us = strtoull(rep->element[0]->str, NULL, 10) * 1000000 + strtoull(rep->element[1]->str, NULL, 10);
    freeReplyObject(rep);
    return us;
}

/* A key a client has kept busy for a day keeps the base of its first use:
 * the times the script compares are then a day of microseconds, whose
 * doubles are 2^-16 us apart. A full bucket still passes its burst. */
START_TEST(redis_gcra_stays_exact_for_a_key_busy_for_days)
{
    rfix f;
    rfix_open(&f, "days", (keel_limiter_opts){.algo = KEEL_LIMIT_GCRA, .limit = 3, .window_ns = 1 * S, .burst = 2});
    /* first used 10^11 us ago; its bucket has just filled up again */
    uint64_t base = node0_time_us(f.c) - 100000000000ull;
    freeReplyObject(redisCommand(f.c, "HSET %s b %llu t 100000000000", f.k1, (unsigned long long)base));
    freeReplyObject(redisCommand(f.c, "PEXPIRE %s 10000", f.k1));
    keel_limit_result r;
    ck_assert_int_eq(keel_limiter_take(f.l, "k", 1, 2, &r), 0);
    ck_assert_int_eq(r.source, KEEL_LIMIT_SRC_REDIS);
    ck_assert_msg(r.allowed, "a full bucket refused its burst (retry after %llu ns)",
                  (unsigned long long)r.retry_after_ns);
    ck_assert_uint_eq(r.remaining, 0);
    rfix_close(&f);
}
END_TEST

/* The log's keys expire at a deadline from the script's TIME, a window
 * and at most 2 ms later: a script that runs past it (here trimming 50,000
 * expired entries; a busy machine's scheduler does it too) has Redis drop
 * both keys at its PEXPIREAT. Their entries had all expired by then, so
 * nothing is lost, but the script must not read them after: that was an
 * error (KEEL_EBACKEND) and the admission was answered as a rejection. */
START_TEST(a_log_script_that_runs_past_its_keys_deadline_still_answers)
{
    enum { N = 50000 };
    rfix f;
    rfix_open(&f, "slow", (keel_limiter_opts){.algo = KEEL_LIMIT_SLIDING_LOG, .limit = 10, .window_ns = 1 * MS});
    uint64_t old = node0_time_us(f.c) - 10000000; /* 10 s ago */
    static const char *argv[2 + 2 * N];
    static size_t lens[2 + 2 * N];
    static char members[N][24];
    char score[24];
    snprintf(score, sizeof score, "%llu", (unsigned long long)old);
    argv[0] = "ZADD", lens[0] = 4;
    argv[1] = f.k1, lens[1] = strlen(f.k1);
    for (int i = 0; i < N; i++) {
        argv[2 + 2 * i] = score, lens[2 + 2 * i] = strlen(score);
        lens[3 + 2 * i] = (size_t)snprintf(members[i], sizeof members[i], "%016d:1", i + 1);
        argv[3 + 2 * i] = members[i];
    }
    freeReplyObject(redisCommandArgv(f.c, 2 + 2 * N, argv, lens));
    freeReplyObject(redisCommand(f.c, "HSET %s tot %d sum %d", f.k2, N, N));
    freeReplyObject(redisCommand(f.c, "PEXPIRE %s 60000", f.k1));
    freeReplyObject(redisCommand(f.c, "PEXPIRE %s 60000", f.k2));
    keel_limit_result r;
    int rc = keel_limiter_take(f.l, "k", 1, 3, &r);
    ck_assert_msg(rc == 0, "take: %s", keel_strerror(rc));
    ck_assert_int_eq(r.source, KEEL_LIMIT_SRC_REDIS);
    ck_assert(r.allowed);
    ck_assert_uint_eq(r.remaining, 7);
    ck_assert_uint_eq(r.reset_ns, 1 * MS);
    rfix_close(&f);
}
END_TEST

/* 4 x 10^9 units a millisecond: a unit is 2.5e-7 us, under the margin
 * the script allowed its doubles (1e-6 us), which let one unit over the
 * burst through. */
START_TEST(redis_gcra_never_passes_a_cost_over_the_burst)
{
    rfix f;
    rfix_open(&f, "over", (keel_limiter_opts){.algo = KEEL_LIMIT_GCRA, .limit = 4000000000u, .window_ns = 1 * MS});
    keel_limit_result r;
    ck_assert_int_eq(keel_limiter_take(f.l, "k", 1, 4000000001u, &r), KEEL_ERANGE);
    ck_assert_int_eq(r.source, KEEL_LIMIT_SRC_REDIS);
    ck_assert(!r.allowed);
    ck_assert_uint_eq(r.retry_after_ns, UINT64_MAX);
    rfix_close(&f);
}
END_TEST

/* One unit a 10^15 us window: half a second of debt is 5e-10 of a unit,
 * which rounding `remaining` up to the next unit took for nothing. What
 * remains is what a take would pass. */
START_TEST(redis_gcra_remaining_is_what_would_pass)
{
    rfix f;
    rfix_open(&f, "rem", (keel_limiter_opts){.algo = KEEL_LIMIT_GCRA, .limit = 1, .window_ns = 1000000000000000000ull});
    /* the bucket refills in half a second */
    freeReplyObject(redisCommand(f.c, "HSET %s b %llu t 500000", f.k1, (unsigned long long)node0_time_us(f.c)));
    freeReplyObject(redisCommand(f.c, "PEXPIRE %s 10000", f.k1));
    keel_limit_result r;
    ck_assert_int_eq(keel_limiter_peek(f.l, "k", 1, 1, &r), 0);
    ck_assert_int_eq(r.source, KEEL_LIMIT_SRC_REDIS);
    ck_assert(!r.allowed);
    ck_assert_uint_gt(r.retry_after_ns, 0);
    ck_assert_msg(r.remaining == 0, "remaining %llu, but a take of 1 is refused", (unsigned long long)r.remaining);
    rfix_close(&f);
}
END_TEST

/* 7 a day, 6 at once: a unit is 1.2e10 us, the burst 7.4e10 us, and the
 * doubles of such times round by some 1e-5 us, over a fixed margin of
 * 1e-6 us. A fresh key that takes 1 still holds 5 for the same instant. */
START_TEST(redis_gcra_rounds_no_unit_away_over_long_windows)
{
    rfix f;
    rfix_open(&f, "day", (keel_limiter_opts){.algo = KEEL_LIMIT_GCRA, .limit = 7, .window_ns = 86400 * S, .burst = 6});
    keel_limit_result r;
    ck_assert(take(f.l, "k", 1, &r));
    ck_assert_int_eq(r.source, KEEL_LIMIT_SRC_REDIS);
    ck_assert_uint_eq(r.remaining, 5);
    rfix_close(&f);
}
END_TEST

/* GCRA's times in Redis reach burst x window / limit microseconds, which
 * the doubles hold exactly only under 2^53: such a policy is refused. A
 * lead written by hand can still exceed it; the answer's times saturate, as in process, never wrap
 * (x 1000 into nanoseconds) nor overflow Lua's conversion to an integer. */
START_TEST(redis_gcra_times_saturate_and_too_long_a_bucket_is_refused)
{
    rfix f;
    /* 1 a day, burst 100,000: 8.64e15 us to earn it back, under 2^53 */
    rfix_open(&f, "sat", (keel_limiter_opts){.algo = KEEL_LIMIT_GCRA, .limit = 1, .window_ns = 86400 * S,
                                              .burst = 100000});
    keel_limit_result r;
    ck_assert_int_eq(keel_limiter_take(f.l, "k", 1, 100000, &r), 0);
    ck_assert(r.allowed);
    ck_assert_uint_le(r.reset_ns, 8640000000000000000ull); /* less the rounding forgiven, 2^-40 of it */
    ck_assert_uint_ge(r.reset_ns, 8640000000000000000ull - 8 * S);
    ck_assert_int_eq(keel_limiter_reset(f.l, "k", 1), 0);
    static const char *const leads[] = {"1e17", "1e19", "1e300"};
    for (size_t i = 0; i < sizeof leads / sizeof leads[0]; i++) {
        freeReplyObject(redisCommand(f.c, "HSET %s b %llu t %s", f.k1, (unsigned long long)node0_time_us(f.c),
                                     leads[i]));
        freeReplyObject(redisCommand(f.c, "PEXPIRE %s 10000", f.k1));
        ck_assert_int_eq(keel_limiter_peek(f.l, "k", 1, 1, &r), 0);
        ck_assert_int_eq(r.source, KEEL_LIMIT_SRC_REDIS);
        ck_assert(!r.allowed);
        ck_assert_msg(r.reset_ns == UINT64_MAX, "lead %s us: reset_ns %llu", leads[i],
                      (unsigned long long)r.reset_ns);
        ck_assert_msg(r.retry_after_ns == UINT64_MAX, "lead %s us: retry_after_ns %llu", leads[i],
                      (unsigned long long)r.retry_after_ns);
        ck_assert_uint_eq(r.remaining, 0);
    }
    /* 1 a day, burst 1,000,000: 8.64e16 us */
    keel_limiter *l;
    keel_limiter_opts o = {.algo = KEEL_LIMIT_GCRA, .limit = 1, .window_ns = 86400 * S, .burst = 1000000,
                           .redis = f.redis, .prefix = f.prefix};
    ck_assert_int_eq(keel_limiter_create(&l, &o), KEEL_EINVAL);
    o.redis = NULL; /* in process, 128-bit integers: fine */
    ck_assert_int_eq(keel_limiter_create(&l, &o), 0);
    keel_limiter_destroy(l);
    rfix_close(&f);
}
END_TEST

/* A key that holds another type: Redis refuses the script, and the
 * rejection says the limit and a window to wait, as fail-closed does, not
 * "X-RateLimit-Limit: 0" and "Retry-After: 0". */
START_TEST(a_refused_script_is_a_rejection_headers_can_carry)
{
    static const char *const tags[] = {"wt-log", "wt-window", "wt-gcra"};
    for (int algo = 0; algo < 3; algo++) {
        rfix f;
        rfix_open(&f, tags[algo], (keel_limiter_opts){.algo = (keel_limit_algo)algo, .limit = 3, .window_ns = 10 * S});
        freeReplyObject(redisCommand(f.c, "SET %s x EX 60", f.k1));
        keel_limit_result r;
        keel_limit_req q = {.key = "k", .len = 1, .cost = 1};
        for (int i = 0; i < 2; i++) { /* alone and in a batch */
            int rc = i ? (keel_limiter_take_many(f.l, &q, 1), q.rc) : keel_limiter_take(f.l, "k", 1, 1, &r);
            if (i)
                r = q.result;
            ck_assert_int_eq(rc, KEEL_EBACKEND);
            ck_assert(!r.allowed);
            ck_assert_int_eq(r.source, KEEL_LIMIT_SRC_REDIS);
            ck_assert_uint_eq(r.limit, 3);
            ck_assert_uint_eq(r.remaining, 0);
            ck_assert_uint_eq(r.retry_after_ns, 10 * S);
            ck_assert_uint_eq(r.reset_ns, 10 * S);
        }
        keel_limiter_stats st; /* rejections, counted as in process */
        keel_limiter_stats_get(f.l, &st);
        ck_assert_uint_eq(st.rejected, 2);
        ck_assert_uint_eq(st.allowed, 0);
        freeReplyObject(redisCommand(f.c, "DEL %s", f.k1));
        rfix_close(&f);
    }
}
END_TEST

/* The window's refund of a key that holds nothing stored p = 0, c = 0
 * with an expiry: a key made for nothing, by any client that can refund. */
START_TEST(a_window_refund_through_redis_stores_no_empty_key)
{
    rfix f;
    rfix_open(&f, "wrefund", (keel_limiter_opts){.algo = KEEL_LIMIT_SLIDING_WINDOW, .limit = 5, .window_ns = 10 * S});
    keel_limit_result r;
    ck_assert_int_eq(keel_limiter_refund(f.l, "k", 1, 1, &r), 0);
    ck_assert_int_eq(r.source, KEEL_LIMIT_SRC_REDIS);
    ck_assert_uint_eq(r.remaining, 5);
    ck_assert_int_eq(node0_number("EXISTS", f.k1), 0);
    /* nor a key whose units all went back */
    ck_assert(take(f.l, "k", 2, &r));
    ck_assert_int_eq(node0_number("EXISTS", f.k1), 1);
    ck_assert_int_eq(keel_limiter_refund(f.l, "k", 1, 2, &r), 0);
    ck_assert_uint_eq(r.remaining, 5);
    ck_assert_int_eq(node0_number("EXISTS", f.k1), 0);
    ck_assert(take(f.l, "k", 5, &r));
    ck_assert(!take(f.l, "k", 1, &r));
    rfix_close(&f);
}
END_TEST

typedef struct busy_job {
    char host[64];
    int port;
} busy_job;

static void *busy_script(void *arg)
{
    busy_job *j = arg;
    redisContext *c = redisConnect(j->host, j->port);
    redisReply *rep = redisCommand(c, "EVAL %s 0", "while true do end");
    if (rep)
        freeReplyObject(rep); /* the SCRIPT KILL's error */
    redisFree(c);
    return NULL;
}

START_TEST(a_busy_server_is_a_store_failure)
{
    busy_job j;
    kt_redis_node(0, j.host, sizeof j.host, &j.port);
    redisContext *c = redisConnect(j.host, j.port);
    freeReplyObject(redisCommand(c, "CONFIG SET busy-reply-threshold 50"));
    keel_redis *redis = redis_nodes(1);
    keel_limiter *l = remote(redis, KEEL_LIMIT_GCRA, 3, 1 * S, "kt:busy:", KEEL_LIMIT_FAIL_OPEN);
    keel_limit_result r;
    ck_assert(take(l, "k", 1, &r)); /* the script is loaded */
    pthread_t t;
    pthread_create(&t, NULL, busy_script, &j);
    int open = 0;
    for (int i = 0; i < 200 && !open; i++) { /* until the server says BUSY */
        kt_nap(10 * MS);
        ck_assert_int_eq(keel_limiter_take(l, "k", 1, 1, &r), 0);
        open = r.source == KEEL_LIMIT_SRC_OPEN;
    }
    redisReply *rep = redisCommand(c, "SCRIPT KILL");
    freeReplyObject(rep);
    pthread_join(t, NULL);
    freeReplyObject(redisCommand(c, "CONFIG SET busy-reply-threshold 5000"));
    redisFree(c);
    ck_assert_msg(open, "BUSY did not reach the failure policy");
    ck_assert(r.allowed);
    keel_limiter_destroy(l);
    keel_redis_destroy(redis);
}
END_TEST

/* A field of node 0's INFO, as a number (-1: absent). */
static long long info_field(redisContext *c, const char *section, const char *field)
{
    redisReply *rep = redisCommand(c, "INFO %s", section);
    ck_assert(rep && rep->type == REDIS_REPLY_STRING);
    char want[64];
    snprintf(want, sizeof want, "\n%s:", field);
    const char *at = strstr(rep->str, want);
    long long v = at ? strtoll(at + strlen(want), NULL, 10) : -1;
    freeReplyObject(rep);
    return v;
}

/* A snapshot that fails (its child killed) with save points set makes
 * Redis refuse every write with MISCONF until one succeeds: an error reply
 * that says the server cannot serve, as BUSY or OOM do. It was a
 * KEEL_EBACKEND rejection whatever the policy, logged for each request,
 * not counted in store_errors. */
START_TEST(a_server_that_stopped_writes_is_a_store_failure)
{
    char host[64];
    int port;
    kt_redis_node(0, host, sizeof host, &port);
    redisContext *c = redisConnect(host, port);
    ck_assert(c && !c->err);
    redisReply *rep = redisCommand(c, "CONFIG GET save");
    ck_assert(rep && rep->type == REDIS_REPLY_ARRAY && rep->elements == 2);
    char save[128];
    snprintf(save, sizeof save, "%s", rep->element[1]->str);
    freeReplyObject(rep);
    int pid = (int)info_field(c, "server", "process_id");
    freeReplyObject(redisCommand(c, "SET kt:misconf:%d x", getpid())); /* a key to save slowly */
    freeReplyObject(redisCommand(c, "CONFIG SET rdb-key-save-delay 1000000"));
    freeReplyObject(redisCommand(c, "BGSAVE"));
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task/%d/children", pid, pid);
    int child = 0;
    for (int i = 0; i < 500 && child <= 0; i++) {
        FILE *fp = fopen(path, "r");
        if (!fp || fscanf(fp, "%d", &child) != 1)
            kt_nap(2 * MS);
        if (fp)
            fclose(fp);
    }
    ck_assert_int_gt(child, 0);
    kill(child, SIGKILL);
    for (int i = 0; i < 1000 && info_field(c, "persistence", "rdb_bgsave_in_progress") != 0; i++)
        kt_nap(2 * MS);
    freeReplyObject(redisCommand(c, "CONFIG SET save %s", "3600 1"));
    keel_redis *redis = redis_nodes(1);
    int rc[3], allowed[3], source[3];
    keel_limiter_stats st[3];
    for (int algo = 0; algo < 3; algo++) {
        keel_limiter *l = remote(redis, (keel_limit_algo)algo, 10, 1 * S, "kt:misconf:", KEEL_LIMIT_FAIL_OPEN);
        keel_limit_result r;
        rc[algo] = keel_limiter_take(l, "k", 1, 1, &r);
        allowed[algo] = r.allowed;
        source[algo] = (int)r.source;
        keel_limiter_stats_get(l, &st[algo]);
        keel_limiter_destroy(l);
    }
    keel_redis_destroy(redis);
    /* writes back before any assertion: the other tests need them */
    freeReplyObject(redisCommand(c, "CONFIG SET rdb-key-save-delay 0"));
    freeReplyObject(redisCommand(c, "CONFIG SET save %s", save));
    freeReplyObject(redisCommand(c, "BGSAVE"));
    for (int i = 0; i < 1000 && info_field(c, "persistence", "rdb_bgsave_in_progress") != 0; i++)
        kt_nap(2 * MS);
    freeReplyObject(redisCommand(c, "DEL kt:misconf:%d", getpid()));
    redisFree(c);
    for (int algo = 0; algo < 3; algo++) {
        ck_assert_msg(rc[algo] == 0, "algo %d: %s", algo, keel_strerror(rc[algo]));
        ck_assert_int_eq(source[algo], KEEL_LIMIT_SRC_OPEN);
        ck_assert(allowed[algo]);
        ck_assert_uint_eq(st[algo].store_errors, 1);
    }
}
END_TEST

/* The calls of one command node 0 has served (INFO commandstats). */
static long long command_calls(redisContext *c, const char *cmd)
{
    redisReply *rep = redisCommand(c, "INFO commandstats");
    ck_assert(rep && rep->type == REDIS_REPLY_STRING);
    char want[64];
    snprintf(want, sizeof want, "cmdstat_%s:calls=", cmd);
    const char *at = strstr(rep->str, want);
    long long v = at ? strtoll(at + strlen(want), NULL, 10) : 0;
    freeReplyObject(rep);
    return v;
}

/* The log's script found a rejection's retry time walking the oldest
 * entries, 100 a ZRANGE: a cost of the limit over 200,000 entries held
 * Redis for half a second. Found by bisection over running totals, it
 * reads a few dozen entries, and answers the same. */
START_TEST(a_rejected_log_request_through_redis_reads_a_few_entries)
{
    enum { L = 20000 };
    rfix f;
    rfix_open(&f, "bisect", (keel_limiter_opts){.algo = KEEL_LIMIT_SLIDING_LOG, .limit = L, .window_ns = 60 * S});
    static keel_limit_req q[1000];
    for (int i = 0; i < L / 1000; i++) {
        for (int j = 0; j < 1000; j++)
            q[j] = (keel_limit_req){.key = "k", .len = 1, .cost = 1};
        ck_assert_int_eq(keel_limiter_take_many(f.l, q, 1000), 0);
        for (int j = 0; j < 1000; j++)
            ck_assert(q[j].rc == 0 && q[j].result.allowed);
    }
    redisReply *first = redisCommand(f.c, "ZRANGE %s 0 0 WITHSCORES", f.k1),
               *mid = redisCommand(f.c, "ZRANGE %s %d %d WITHSCORES", f.k1, L / 2 - 1, L / 2 - 1);
    ck_assert(first && first->elements == 2 && mid && mid->elements == 2);
    uint64_t t_first = strtoull(first->element[1]->str, NULL, 10), t_mid = strtoull(mid->element[1]->str, NULL, 10);
    freeReplyObject(first);
    freeReplyObject(mid);
    long long before = command_calls(f.c, "zrange");
    keel_limit_result r;
    ck_assert(!take(f.l, "k", L, &r)); /* every entry must go */
    ck_assert_int_eq(r.source, KEEL_LIMIT_SRC_REDIS);
    ck_assert_uint_eq(r.retry_after_ns, r.reset_ns);
    ck_assert(!take(f.l, "k", L / 2, &r)); /* the older half */
    ck_assert_uint_eq(r.retry_after_ns, t_mid * 1000 + 60 * S - r.now_ns);
    ck_assert(!take(f.l, "k", 1, &r)); /* the oldest */
    ck_assert_uint_eq(r.retry_after_ns, t_first * 1000 + 60 * S - r.now_ns);
    long long calls = command_calls(f.c, "zrange") - before;
    ck_assert_msg(calls <= 3 * 20, "3 rejections read the log with %lld ZRANGEs", calls);
    ck_assert_int_eq(keel_limiter_reset(f.l, "k", 1), 0);
    rfix_close(&f);
}
END_TEST

/* The log's running totals are doubles in the script: past 2^52 they
 * are numbered again from the oldest entry, and answers do not change. */
START_TEST(the_log_s_running_totals_are_renumbered_before_doubles_lose_them)
{
    const unsigned long long T = 4503599627370496ull; /* 2^52 */
    rfix f;
    rfix_open(&f, "renumber", (keel_limiter_opts){.algo = KEEL_LIMIT_SLIDING_LOG, .limit = 5, .window_ns = 10 * S});
    unsigned long long t = node0_time_us(f.c) - 1000;
    freeReplyObject(redisCommand(f.c, "ZADD %s %llu %016llu:1 %llu %016llu:1 %llu %016llu:1", f.k1, t, T - 2, t,
                                 T - 1, t, T));
    freeReplyObject(redisCommand(f.c, "HSET %s tot %llu sum 3", f.k2, T));
    freeReplyObject(redisCommand(f.c, "PEXPIRE %s 60000", f.k1));
    freeReplyObject(redisCommand(f.c, "PEXPIRE %s 60000", f.k2));
    keel_limit_result r;
    ck_assert(take(f.l, "k", 1, &r));
    ck_assert_int_eq(r.source, KEEL_LIMIT_SRC_REDIS);
    ck_assert_uint_eq(r.remaining, 1);
    redisReply *rep = redisCommand(f.c, "ZRANGE %s 0 -1", f.k1);
    ck_assert(rep && rep->type == REDIS_REPLY_ARRAY && rep->elements == 4);
    for (int i = 0; i < 4; i++) {
        char want[32];
        snprintf(want, sizeof want, "%016d:1", i + 1);
        ck_assert_str_eq(rep->element[i]->str, want);
    }
    freeReplyObject(rep);
    ck_assert(!take(f.l, "k", 2, &r)); /* the oldest must go first */
    ck_assert_uint_eq(r.retry_after_ns, t * 1000 + 10 * S - r.now_ns);
    ck_assert(take(f.l, "k", 1, &r));
    ck_assert_uint_eq(r.remaining, 0);
    rfix_close(&f);
}
END_TEST

/* Records written before Redis's clock stepped back hold times ahead of
 * its TIME: they must live until those times are a window old, not a
 * window from now. The step itself cannot be made (TIME is the host's),
 * so the records are written as it would leave them. */
START_TEST(records_from_before_a_clock_step_back_expire_no_earlier)
{
    rfix f;
    rfix_open(&f, "stepl", (keel_limiter_opts){.algo = KEEL_LIMIT_SLIDING_LOG, .limit = 5, .window_ns = 1 * S});
    unsigned long long ahead = node0_time_us(f.c) + 5000000; /* an entry 5 s ahead */
    freeReplyObject(redisCommand(f.c, "ZADD %s %llu %016d:1", f.k1, ahead, 1));
    freeReplyObject(redisCommand(f.c, "HSET %s tot 1 sum 1", f.k2));
    keel_limit_result r;
    ck_assert(take(f.l, "k", 1, &r));
    ck_assert_uint_eq(r.remaining, 3);
    for (int k = 0; k < 2; k++) {
        redisReply *rep = redisCommand(f.c, "PEXPIRETIME %s", k ? f.k2 : f.k1);
        ck_assert(rep && rep->type == REDIS_REPLY_INTEGER);
        ck_assert_msg((unsigned long long)rep->integer * 1000 >= ahead + 1000000,
                      "the log expires at %lld ms, its newest entry at %llu us", rep->integer, ahead + 1000000);
        freeReplyObject(rep);
    }
    rfix_close(&f);
    rfix_open(&f, "stepw", (keel_limiter_opts){.algo = KEEL_LIMIT_SLIDING_WINDOW, .limit = 5, .window_ns = 1 * S});
    unsigned long long k = node0_time_us(f.c) / 1000000 + 3; /* a window 3 ahead */
    freeReplyObject(redisCommand(f.c, "HSET %s k %llu p 0 c 1", f.k1, k));
    ck_assert(take(f.l, "k", 1, &r));
    ck_assert_uint_eq(r.remaining, 3);
    redisReply *rep = redisCommand(f.c, "PEXPIRETIME %s", f.k1);
    ck_assert(rep && rep->type == REDIS_REPLY_INTEGER);
    ck_assert_msg((unsigned long long)rep->integer >= (k + 2) * 1000, "the window expires at %lld ms, its counts weigh until %llu ms",
                  rep->integer, (k + 2) * 1000);
    freeReplyObject(rep);
    rfix_close(&f);
}
END_TEST

/* Redis counts whole microseconds: a window of 1,000,999 ns sent as
 * 1000 us let an entry stop counting 999 ns early, and four admissions of
 * a limit of 3 fit in one window. Rounded up, an entry counts at least a
 * window. */
START_TEST(a_window_of_a_fraction_of_a_microsecond_is_rounded_up_in_redis)
{
    rfix f;
    rfix_open(&f, "trunc", (keel_limiter_opts){.algo = KEEL_LIMIT_SLIDING_LOG, .limit = 3, .window_ns = 1000999});
    keel_limit_result r;
    ck_assert(take(f.l, "k", 3, &r));
    ck_assert_int_eq(r.source, KEEL_LIMIT_SRC_REDIS);
    ck_assert_uint_eq(r.reset_ns, 1001000); /* counts until a whole window is over */
    rfix_close(&f);
}
END_TEST

/* Keys of Redis names matching pattern on node i. */
static size_t node_keys(int i, const char *pattern)
{
    char host[64];
    int port;
    kt_redis_node(i, host, sizeof host, &port);
    redisContext *c = redisConnect(host, port);
    ck_assert(c && !c->err);
    size_t n = 0;
    char cursor[32] = "0";
    do {
        redisReply *rep = redisCommand(c, "SCAN %s MATCH %s COUNT 1000", cursor, pattern);
        ck_assert(rep && rep->type == REDIS_REPLY_ARRAY && rep->elements == 2);
        snprintf(cursor, sizeof cursor, "%s", rep->element[0]->str);
        n += rep->element[1]->elements;
        freeReplyObject(rep);
    } while (strcmp(cursor, "0") != 0);
    redisFree(c);
    return n;
}

/* The hash tag is the whole client key: keys that began with '}' all had
 * the tag "#" (the tag ends at the first '}') and all went to one node. */
START_TEST(keys_that_begin_with_a_brace_spread_over_the_nodes)
{
    keel_redis *redis = redis_nodes(3);
    char prefix[64], pattern[80];
    snprintf(prefix, sizeof prefix, "kt:brace:%d:", getpid());
    snprintf(pattern, sizeof pattern, "%s*", prefix);
    keel_limiter *l = remote(redis, KEEL_LIMIT_SLIDING_LOG, 5, 60 * S, prefix, KEEL_LIMIT_FAIL_CLOSED);
    char key[16];
    for (int i = 0; i < 60; i++) {
        keel_limit_result r;
        int n = snprintf(key, sizeof key, "}%d%%}", i);
        ck_assert_int_eq(keel_limiter_take(l, key, (size_t)n, 5, &r), 0);
        ck_assert(r.allowed && r.source == KEEL_LIMIT_SRC_REDIS);
        ck_assert_int_eq(keel_limiter_take(l, key, (size_t)n, 1, &r), 0);
        ck_assert(!r.allowed && r.source == KEEL_LIMIT_SRC_REDIS);
    }
    size_t total = 0, nodes = 0;
    for (int i = 0; i < 3; i++) {
        size_t n = node_keys(i, pattern);
        ck_assert_uint_eq(n % 2, 0); /* a log's two keys on one node */
        total += n;
        nodes += n > 0;
    }
    ck_assert_uint_eq(total, 120);
    ck_assert_msg(nodes == 3, "60 keys on %zu node(s) of 3", nodes);
    for (int i = 0; i < 60; i++) {
        int n = snprintf(key, sizeof key, "}%d%%}", i);
        ck_assert_int_eq(keel_limiter_reset(l, key, (size_t)n), 0);
    }
    ck_assert_uint_eq(node_keys(0, pattern) + node_keys(1, pattern) + node_keys(2, pattern), 0);
    keel_limiter_destroy(l);
    keel_redis_destroy(redis);
}
END_TEST

/* Redis 6 wraps an error a script's command met in one of its own ("ERR
 * Error running script ... -OOM ..."): the inner code decides. Every
 * error but WRONGTYPE (the key holds another type: a request that will
 * never pass there) goes to the failure policy. */
START_TEST(error_replies_are_told_apart_by_their_code)
{
    static const struct {
        const char *text;
        bool failure;
    } cases[] = {
        {"WRONGTYPE Operation against a key holding the wrong kind of value script: 1f, on @user_script:47.", false},
        {"ERR Error running script (call to f_1f): @user_script:47: @user_script: 47: -WRONGTYPE Operation "
         "against a key holding the wrong kind of value",
         false},
        {"ERR Error running script (call to f_1f): @user_script:63: @user_script: 63: -OOM command not allowed "
         "when used memory > 'maxmemory'.",
         true},
        {"ERR Error running script (call to f_1f): @user_script:63: @user_script: 63: -MISCONF Redis is "
         "configured to save RDB snapshots",
         true},
        {"MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.", true},
        {"ERR max number of clients reached", true},
        {"NOPERM this user has no permissions to run the 'evalsha' command", true},
        {"BUSY Redis is busy running a script.", true},
        {"OOM command not allowed when used memory > 'maxmemory'. script: 1f, on @user_script:63.", true},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        redisReply rep = {.type = REDIS_REPLY_ERROR, .str = (char *)cases[i].text, .len = strlen(cases[i].text)};
        ck_assert_msg(keel__rstore_failure(KEEL_EBACKEND, &rep) == cases[i].failure, "%s", cases[i].text);
    }
    ck_assert(keel__rstore_failure(KEEL_EUNAVAIL, NULL));
    ck_assert(keel__rstore_failure(KEEL_ETIMEDOUT, NULL));
    ck_assert(!keel__rstore_failure(0, NULL));
}
END_TEST

START_TEST(requests_in_the_same_instant_all_count)
{
    keel_redis *redis = redis_nodes(3);
    char prefix[64];
    snprintf(prefix, sizeof prefix, "kt:same:%d:", getpid());
    keel_limiter *l = remote(redis, KEEL_LIMIT_SLIDING_LOG, 100, 10 * S, prefix, KEEL_LIMIT_FAIL_CLOSED);
    keel_limit_req q[150];
    for (int i = 0; i < 150; i++)
        q[i] = (keel_limit_req){.key = "burst", .len = 5, .cost = 1};
    ck_assert_int_eq(keel_limiter_take_many(l, q, 150), 0); /* one pipeline */
    int allowed = 0;
    for (int i = 0; i < 150; i++) {
        ck_assert_int_eq(q[i].rc, 0);
        allowed += q[i].result.allowed;
        ck_assert_int_eq(q[i].result.allowed, i < 100);
    }
    ck_assert_int_eq(allowed, 100);
    keel_limiter_destroy(l);
    keel_redis_destroy(redis);
}
END_TEST

START_TEST(scripts_come_back_after_a_flush_and_a_restart)
{
    keel_redis *redis = redis_nodes(1);
    char prefix[64];
    snprintf(prefix, sizeof prefix, "kt:reload:%d:", getpid());
    keel_limiter *l = remote(redis, KEEL_LIMIT_GCRA, 100, 1 * S, prefix, KEEL_LIMIT_FAIL_CLOSED);
    keel_limit_result r;
    ck_assert(take(l, "k", 1, &r));
    redisReply *rep;
    const char *flush[2] = {"SCRIPT", "FLUSH"};
    size_t fl[2] = {6, 5};
    ck_assert_int_eq(keel_redis_command(redis, NULL, 0, 2, flush, fl, &rep), 0);
    freeReplyObject(rep);
    ck_assert(take(l, "k", 1, &r)); /* NOSCRIPT: loaded again */
    ck_assert_int_eq(r.source, KEEL_LIMIT_SRC_REDIS);
    ck_assert_int_eq(keel_redis_command(redis, NULL, 0, 2, flush, fl, &rep), 0);
    freeReplyObject(rep);
    keel_limit_req q[3] = {{.key = "a", .len = 1}, {.key = "b", .len = 1}, {.key = "c", .len = 1}};
    ck_assert_int_eq(keel_limiter_take_many(l, q, 3), 0); /* in a pipeline too */
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(q[i].rc, 0);
        ck_assert_int_eq(q[i].result.source, KEEL_LIMIT_SRC_REDIS);
    }
    /* a batch the server refuses whole: the script is loaded once, and
     * the rest go again in one pipeline, not one round trip each */
    ck_assert_int_eq(keel_redis_command(redis, NULL, 0, 2, flush, fl, &rep), 0);
    freeReplyObject(rep);
    keel_limit_req many[50];
    char names[50][8];
    for (int i = 0; i < 50; i++)
        many[i] = (keel_limit_req){.key = names[i], .len = (size_t)snprintf(names[i], sizeof names[i], "m%d", i)};
    keel_redis_node_stats before, after;
    ck_assert_int_eq(keel_redis_node_stats_get(redis, 0, &before), 0);
    ck_assert_int_eq(keel_limiter_take_many(l, many, 50), 0);
    ck_assert_int_eq(keel_redis_node_stats_get(redis, 0, &after), 0);
    for (int i = 0; i < 50; i++) {
        ck_assert_int_eq(many[i].rc, 0);
        ck_assert_int_eq(many[i].result.source, KEEL_LIMIT_SRC_REDIS);
        ck_assert(many[i].result.allowed);
    }
    ck_assert_uint_le(after.commands - before.commands, 4);
    kt_server("stop-one", "redis1");
    kt_server("start-one", "redis1");
    int redis_answered = 0;
    for (int i = 0; i < 3 && !redis_answered; i++) { /* the stale connection fails once */
        ck_assert_int_eq(keel_limiter_take(l, "k", 1, 1, &r), 0);
        redis_answered = r.source == KEEL_LIMIT_SRC_REDIS;
    }
    ck_assert(redis_answered);
    keel_limiter_destroy(l);
    keel_redis_destroy(redis);
}
END_TEST

START_TEST(each_failure_policy_does_what_it_says)
{
    keel_redis *redis = redis_nodes(1);
    keel_limiter *open = remote(redis, KEEL_LIMIT_GCRA, 3, 1 * S, "kt:p1:", KEEL_LIMIT_FAIL_OPEN);
    keel_limiter *closed = remote(redis, KEEL_LIMIT_GCRA, 3, 1 * S, "kt:p2:", KEEL_LIMIT_FAIL_CLOSED);
    keel_limiter *fallback;
    keel_limiter_opts o = {.algo = KEEL_LIMIT_GCRA, .limit = 3, .window_ns = 1 * S,
                           .redis = redis, .prefix = "kt:p3:", .on_store_error = KEEL_LIMIT_FALL_BACK,
                           .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_limiter_create(&fallback, &o), 0);
    kt_server("stop-one", "redis1");
    keel_limit_result r;
    uint64_t t0 = keel_now_ns();
    for (int i = 0; i < 5; i++) {
        ck_assert(take(open, "k", 1, &r));
        ck_assert_int_eq(r.source, KEEL_LIMIT_SRC_OPEN);
        ck_assert(!take(closed, "k", 1, &r));
        ck_assert_int_eq(r.source, KEEL_LIMIT_SRC_CLOSED);
        ck_assert_uint_gt(r.retry_after_ns, 0);
        ck_assert_uint_eq(r.reset_ns, r.retry_after_ns); /* the headers must not say "now" */
        ck_assert_int_eq(take(fallback, "k", 1, &r), i < 3); /* the limit, in process */
        ck_assert_int_eq(r.source, KEEL_LIMIT_SRC_FALLBACK);
    }
    ck_assert_uint_lt(keel_now_ns() - t0, 5 * S); /* never past the timeouts */
    keel_limiter_stats st;
    keel_limiter_stats_get(closed, &st);
    ck_assert_uint_eq(st.store_errors, 5);
    kt_server("start-one", "redis1");
    keel_limiter_destroy(open);
    keel_limiter_destroy(closed);
    keel_limiter_destroy(fallback);
    keel_redis_destroy(redis);
}
END_TEST

/* 4 processes x 2 threads take from one key for a few windows; each
 * process writes the server times of its admissions to a pipe. */
typedef struct proc_job {
    keel_limiter *l;
    uint64_t until_ns;
    uint64_t at[4096];
    size_t n;
} proc_job;

static void *proc_thread(void *arg)
{
    proc_job *j = arg;
    while (keel_now_ns() < j->until_ns && j->n < 4096) {
        keel_limit_result r;
        if (keel_limiter_take(j->l, "shared", 6, 1, &r) == 0 && r.allowed &&
            r.source == KEEL_LIMIT_SRC_REDIS)
            j->at[j->n++] = r.now_ns;
    }
    return NULL;
}

static size_t run_processes(keel_limit_algo algo, uint64_t limit, uint64_t window, uint64_t **out)
{
    char prefix[64];
    snprintf(prefix, sizeof prefix, "kt:procs:%d:%d:", getpid(), (int)algo);
    int fds[2];
    ck_assert_int_eq(pipe(fds), 0);
    pid_t kids[4];
    uint64_t until = keel_now_ns() + 4 * window;
    for (int p = 0; p < 4; p++) {
        kids[p] = fork();
        ck_assert_int_ge(kids[p], 0);
        if (kids[p] == 0) {
            close(fds[0]);
            keel_redis *redis = redis_nodes(3);
            keel_limiter *l = remote(redis, algo, limit, window, prefix, KEEL_LIMIT_FAIL_CLOSED);
            static proc_job jobs[2];
            pthread_t t[2];
            for (int i = 0; i < 2; i++) {
                jobs[i] = (proc_job){.l = l, .until_ns = until};
                pthread_create(&t[i], NULL, proc_thread, &jobs[i]);
            }
            for (int i = 0; i < 2; i++) {
                pthread_join(t[i], NULL);
                if (write(fds[1], jobs[i].at, jobs[i].n * sizeof(uint64_t)) < 0)
                    _exit(1);
            }
            keel_limiter_destroy(l);
            keel_redis_destroy(redis);
            _exit(0);
        }
    }
    close(fds[1]);
    size_t cap = 1 << 16, n = 0;
    uint64_t *all = malloc(cap * sizeof *all);
    ssize_t got;
    while ((got = read(fds[0], (char *)all + n * sizeof *all, (cap - n) * sizeof *all)) > 0)
        n += (size_t)got / sizeof *all;
    close(fds[0]);
    for (int p = 0; p < 4; p++) {
        int status;
        waitpid(kids[p], &status, 0);
        ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "process %d failed", p);
    }
    for (size_t i = 1; i < n; i++) /* insertion sort: a few hundred entries */
        for (size_t j = i; j > 0 && all[j - 1] > all[j]; j--) {
            uint64_t t = all[j];
            all[j] = all[j - 1];
            all[j - 1] = t;
        }
    *out = all;
    return n;
}

START_TEST(processes_and_threads_never_exceed_the_limit_through_redis)
{
    const uint64_t W = 250 * MS, L = 20;
    uint64_t *at;
    /* the log: no window of length W holds more than L */
    size_t n = run_processes(KEEL_LIMIT_SLIDING_LOG, L, W, &at);
    ck_assert_uint_ge(n, 3 * L);
    for (size_t i = 0; i < n; i++) {
        size_t in = 0;
        for (size_t j = i + 1; j-- > 0 && at[j] + W > at[i];)
            in++;
        ck_assert_msg(in <= L, "log: %zu admissions in one window", in);
    }
    free(at);
    /* GCRA: over any interval of length t, at most burst + t x L / W */
    n = run_processes(KEEL_LIMIT_GCRA, L, W, &at);
    ck_assert_uint_ge(n, 3 * L);
    for (size_t i = 0; i < n; i++)
        for (size_t j = i; j < n; j++) {
            double allowed = (double)L + (double)(at[j] - at[i]) * (double)L / (double)W + 1e-6;
            ck_assert_msg((double)(j - i + 1) <= allowed, "gcra: %zu admissions in %llu ns",
                          j - i + 1, (unsigned long long)(at[j] - at[i]));
        }
    free(at);
    /* the window: at most L per fixed window, 2 L per sliding one */
    n = run_processes(KEEL_LIMIT_SLIDING_WINDOW, L, W, &at);
    ck_assert_uint_ge(n, 3 * L);
    for (size_t i = 0; i < n; i++) {
        size_t fixed = 0, sliding = 0;
        for (size_t j = i + 1; j-- > 0 && at[j] + W > at[i];) {
            sliding++;
            fixed += at[j] / W == at[i] / W;
        }
        ck_assert_msg(fixed <= L && sliding <= 2 * L, "window: %zu in a fixed, %zu in a sliding one",
                      fixed, sliding);
    }
    free(at);
}
END_TEST

/* The model against Redis. Its time cannot be set: each answer's now_ns is
 * the server's TIME that the script decided on, and the model decides at
 * that time, in microseconds (what the scripts count). Windows of 1 to
 * 10 ms roll over a few times a run; GCRA's emission interval is a whole
 * number of microseconds, so that the script's doubles are exact. */
static void m_run_redis(keel_redis *redis, keel_limit_algo algo, uint64_t seed, int steps)
{
    static const uint64_t windows_us[] = {1000, 2000, 4000, 10000, 1000000};
    static const uint64_t gcra_limits[] = {1, 2, 4, 5, 8, 10, 20, 25, 40, 50, 100, 125, 200, 250, 500, 1000};
    static const uint64_t limits[] = {1, 2, 3, 5, 10, 100, 1000, UINT32_MAX};
    static const uint64_t bursts[] = {0, 1, 2, 7, 100};
    kt_rng g = kt_rng_seed(seed);
    mrun x = {.seed = seed, .src = KEEL_LIMIT_SRC_REDIS};
    uint64_t W = windows_us[kt_rng_below(&g, 5)], L, B = 0;
    if (algo == KEEL_LIMIT_GCRA) {
        L = gcra_limits[kt_rng_below(&g, 16)];
        B = bursts[kt_rng_below(&g, 5)];
    } else {
        L = kt_rng_below(&g, 4) ? limits[kt_rng_below(&g, 8)] : 1 + kt_rng_below(&g, 100000);
        if (3.0 * (double)L * (double)W >= 9007199254740992.0)
            L = 1000;
    }
    char prefix[96];
    snprintf(prefix, sizeof prefix, "kt:model:%d:%llu:", getpid(), (unsigned long long)seed);
    keel_limiter_opts o = {.algo = algo, .limit = L, .window_ns = W * 1000, .burst = B, .redis = redis,
                           .prefix = prefix, .name = kt_rng_below(&g, 2) ? "api" : NULL,
                           .on_store_error = KEEL_LIMIT_FAIL_CLOSED};
    ck_assert_msg(keel_limiter_create(&x.l, &o) == 0, "seed %llu: create", (unsigned long long)seed);
    x.m = (model){.algo = algo, .L = L, .W = W, .B = B ? B : L, .unit = 1000};
    x.name = o.name ? o.name : "default";
    x.window_ns = o.window_ns;
    m_keys(&x.m);
    for (x.step = 0; x.step < steps; x.step++)
        m_op(&x, &g);
    for (size_t i = 0; i < x.m.nkeys; i++) /* leaves nothing behind */
        ck_assert_int_eq(keel_limiter_reset(x.l, x.m.keys[i].p, x.m.keys[i].len), 0);
    keel_limiter_destroy(x.l);
    m_free(&x.m);
}

START_TEST(redis_answers_as_the_model)
{
    keel_redis *redis = redis_nodes(3);
    int n = kt_runs("KT_LIMITER_RUNS", 20);
    for (int i = 0; i < n; i++)
        m_run_redis(redis, (keel_limit_algo)_i, kt_seed("KT_LIMITER_SEED", 9000 * (uint64_t)(_i + 1), i, &n), 300);
    keel_redis_destroy(redis);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("limiter");
    TCase *tc = tcase_create("local");
    tcase_add_test(tc, division_by_a_fixed_divisor_is_exact);
    tcase_add_test(tc, gcra_is_a_token_bucket_to_the_nanosecond);
    tcase_add_test(tc, the_sliding_window_weighs_the_previous_window);
    tcase_add_test(tc, the_sliding_log_is_exact);
    tcase_add_test(tc, no_window_of_the_log_holds_more_than_the_limit);
    tcase_add_test(tc, a_client_retrying_above_the_limit_still_gets_its_share);
    tcase_add_test(tc, peek_refund_and_reset);
    tcase_add_test(tc, take_many_answers_as_one_at_a_time);
    tcase_add_test(tc, each_limiter_hashes_keys_with_its_own_seed);
    tcase_add_test(tc, keys_are_bytes);
    tcase_add_test(tc, two_threads_on_one_key_never_exceed_the_limit);
    tcase_add_test(tc, at_max_keys_an_active_key_may_go_and_is_counted);
    tcase_add_test(tc, at_max_keys_a_window_key_that_holds_nothing_goes_first);
    tcase_add_test(tc, at_max_keys_a_key_busy_past_the_clock_s_end_can_go);
    tcase_add_test(tc, a_decision_with_an_older_clock_reading_stays_sane);
    tcase_add_test(tc, a_log_decision_with_an_older_clock_reading_stays_sane);
    tcase_add_test(tc, the_log_expires_nothing_early_near_the_clock_s_end);
    tcase_add_test(tc, a_request_over_the_limit_pushes_out_no_key);
    tcase_add_test(tc, header_fields);
    tcase_add_test(tc, bad_input_is_refused);
    suite_add_tcase(s, tc);
    TCase *mo = tcase_create("model");
    tcase_set_timeout(mo, 30);
    tcase_set_tags(mo, "model"); /* thousands of random steps: plain and ASan runs check them */
    tcase_add_loop_test(mo, each_algorithm_answers_as_its_model, 0, 3);
    tcase_add_loop_test(mo, a_key_dropped_at_max_keys_idle_loses_nothing, 0, 3);
    suite_add_tcase(s, mo);
    TCase *big = tcase_create("million");
    tcase_add_test(big, memory_stays_bounded_over_a_million_keys);
    tcase_add_test(big, a_rejected_log_request_finds_its_retry_time_without_a_walk);
    tcase_set_tags(big, "slow"); /* a million decisions: plain runs only */
    tcase_set_timeout(big, 60);
    suite_add_tcase(s, big);
    TCase *rd = tcase_create("redis");
    tcase_set_timeout(rd, 60);
    tcase_add_test(rd, redis_decides_like_the_local_store);
    tcase_add_test(rd, requests_in_the_same_instant_all_count);
    tcase_add_test(rd, only_limiters_of_one_policy_share_a_key_through_redis);
    tcase_add_test(rd, a_rejection_writes_nothing_to_redis);
    tcase_add_test(rd, redis_gcra_keeps_sub_microsecond_intervals);
    tcase_add_test(rd, redis_gcra_stays_exact_for_a_key_busy_for_days);
    tcase_add_test(rd, redis_gcra_never_passes_a_cost_over_the_burst);
    tcase_add_test(rd, redis_gcra_remaining_is_what_would_pass);
    tcase_add_test(rd, redis_gcra_rounds_no_unit_away_over_long_windows);
    tcase_add_test(rd, redis_gcra_times_saturate_and_too_long_a_bucket_is_refused);
    tcase_add_test(rd, a_log_refund_through_redis_leaves_nothing_that_never_expires);
    tcase_add_test(rd, the_log_and_its_sum_expire_at_the_same_instant);
    tcase_add_test(rd, a_log_script_that_runs_past_its_keys_deadline_still_answers);
    tcase_add_test(rd, a_busy_server_is_a_store_failure);
    tcase_add_test(rd, a_server_that_stopped_writes_is_a_store_failure);
    tcase_add_test(rd, error_replies_are_told_apart_by_their_code);
    tcase_add_test(rd, a_rejected_log_request_through_redis_reads_a_few_entries);
    tcase_add_test(rd, the_log_s_running_totals_are_renumbered_before_doubles_lose_them);
    tcase_add_test(rd, records_from_before_a_clock_step_back_expire_no_earlier);
    tcase_add_test(rd, a_window_of_a_fraction_of_a_microsecond_is_rounded_up_in_redis);
    tcase_add_test(rd, keys_that_begin_with_a_brace_spread_over_the_nodes);
    tcase_add_test(rd, a_window_refund_through_redis_stores_no_empty_key);
    tcase_add_test(rd, a_refused_script_is_a_rejection_headers_can_carry);
    tcase_add_test(rd, scripts_come_back_after_a_flush_and_a_restart);
    tcase_add_test(rd, each_failure_policy_does_what_it_says);
    suite_add_tcase(s, rd);
    TCase *rs = tcase_create("redis-race");
    tcase_set_timeout(rs, 60);
    tcase_set_tags(rs, "stress"); /* processes x threads racing: not under valgrind */
    tcase_add_test(rs, processes_and_threads_never_exceed_the_limit_through_redis);
    suite_add_tcase(s, rs);
    TCase *rm = tcase_create("redis-model");
    tcase_set_timeout(rm, 60);
    tcase_set_tags(rm, "model");
    tcase_add_loop_test(rm, redis_answers_as_the_model, 0, 3);
    suite_add_tcase(s, rm);
    return kt_run(s);
}
