/* tests/test_breaker.c — keel_breaker: resilience4j's state machine under
 * the caller's clock. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include <keel/breaker.h>

#include "harness.h"

#define S KT_S
#define MS KT_MS

static keel_breaker *make(keel_breaker_opts o)
{
    keel_breaker *b = NULL;
    ck_assert_int_eq(keel_breaker_create(&b, &o), 0);
    return b;
}

/* One call through the breaker at `now`; returns try_acquire's answer. */
static int call(keel_breaker *b, uint64_t now, int failed, uint64_t took)
{
    int rc = keel_breaker_try_acquire(b, now);
    if (rc == 0)
        keel_breaker_on_result(b, now, took, failed);
    return rc;
}

START_TEST(below_minimum_calls_nothing_trips)
{
    keel_breaker *b = make((keel_breaker_opts){.window_size = 100, .minimum_calls = 100});
    for (int i = 0; i < 99; i++)
        ck_assert_int_eq(call(b, 0, 1, MS), 0);
    ck_assert_int_eq(keel_breaker_state_get(b), KEEL_BREAKER_CLOSED); /* 99 of 99 */
    ck_assert_int_eq(call(b, 0, 1, MS), 0);
    ck_assert_int_eq(keel_breaker_state_get(b), KEEL_BREAKER_OPEN);
    ck_assert_int_eq(keel_breaker_try_acquire(b, 0), KEEL_EUNAVAIL);
    keel_breaker_destroy(b);
}
END_TEST

START_TEST(fifty_of_a_hundred_opens_and_forty_nine_does_not)
{
    keel_breaker *b = make((keel_breaker_opts){.window_size = 100, .minimum_calls = 100,
                                               .failure_rate = 50});
    for (int i = 0; i < 100; i++)
        call(b, 0, i >= 51, MS); /* the oldest 51 succeed, the newest 49 fail */
    ck_assert_int_eq(keel_breaker_state_get(b), KEEL_BREAKER_CLOSED);
    keel_breaker_stats st;
    keel_breaker_stats_get(b, &st);
    ck_assert_uint_eq(st.window_calls, 100);
    ck_assert_uint_eq(st.window_failed, 49);
    /* the window slides: one success leaves, one failure comes: 50 of 100 */
    call(b, 0, 1, MS);
    ck_assert_int_eq(keel_breaker_state_get(b), KEEL_BREAKER_OPEN);
    keel_breaker_destroy(b);
}
END_TEST

START_TEST(minimum_calls_is_clamped_to_a_count_window)
{
    keel_breaker *b = make((keel_breaker_opts){.window_size = 10, .minimum_calls = 100});
    for (int i = 0; i < 9; i++)
        call(b, 0, 1, MS);
    ck_assert_int_eq(keel_breaker_state_get(b), KEEL_BREAKER_CLOSED);
    call(b, 0, 1, MS);
    ck_assert_int_eq(keel_breaker_state_get(b), KEEL_BREAKER_OPEN);
    keel_breaker_destroy(b);
}
END_TEST

START_TEST(slow_calls_trip_at_their_own_rate)
{
    keel_breaker *b = make((keel_breaker_opts){.window_size = 20, .minimum_calls = 20,
                                               .slow_call_ns = 1 * S, .slow_call_rate = 50});
    for (int i = 0; i < 19; i++)
        call(b, 0, 0, i < 10 ? 10 * MS : 2 * S); /* 10 fast, then 9 slow; none failed */
    ck_assert_int_eq(keel_breaker_state_get(b), KEEL_BREAKER_CLOSED);
    call(b, 0, 0, 1 * S); /* exactly the threshold is not slow (resilience4j: >) */
    ck_assert_int_eq(keel_breaker_state_get(b), KEEL_BREAKER_CLOSED); /* 9 of 20 */
    keel_breaker_stats st;
    keel_breaker_stats_get(b, &st);
    ck_assert_uint_eq(st.window_slow, 9);
    call(b, 0, 0, 1 * S + 1); /* one nanosecond more is; a fast call leaves: 10 of 20 */
    ck_assert_int_eq(keel_breaker_state_get(b), KEEL_BREAKER_OPEN);
    keel_breaker_destroy(b);
}
END_TEST

static keel_breaker *opened(uint32_t permitted, const keel_backoff_opts *grow)
{
    keel_breaker *b = make((keel_breaker_opts){.window_size = 4, .minimum_calls = 4,
                                               .permitted_in_half_open = permitted,
                                               .wait_open_ns = 10 * S, .open_backoff = grow});
    for (int i = 0; i < 4; i++)
        call(b, 0, 1, MS);
    ck_assert_int_eq(keel_breaker_state_get(b), KEEL_BREAKER_OPEN);
    return b;
}

START_TEST(half_open_admits_exactly_the_permitted_calls)
{
    keel_breaker *b = opened(3, NULL);
    ck_assert_int_eq(keel_breaker_try_acquire(b, 10 * S - 1), KEEL_EUNAVAIL);
    ck_assert_int_eq(keel_breaker_state_get(b), KEEL_BREAKER_OPEN); /* lazily */
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(keel_breaker_try_acquire(b, 10 * S), 0);
    ck_assert_int_eq(keel_breaker_state_get(b), KEEL_BREAKER_HALF_OPEN);
    ck_assert_int_eq(keel_breaker_try_acquire(b, 10 * S), KEEL_EUNAVAIL);
    keel_breaker_release(b); /* one permit was not used */
    ck_assert_int_eq(keel_breaker_try_acquire(b, 10 * S), 0);
    ck_assert_int_eq(keel_breaker_try_acquire(b, 10 * S), KEEL_EUNAVAIL);
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(keel_breaker_state_get(b), KEEL_BREAKER_HALF_OPEN);
        keel_breaker_on_result(b, 11 * S, MS, 0);
    }
    ck_assert_int_eq(keel_breaker_state_get(b), KEEL_BREAKER_CLOSED);
    keel_breaker_stats st;
    keel_breaker_stats_get(b, &st);
    ck_assert_uint_eq(st.window_calls, 0); /* closed with an empty window */
    keel_breaker_destroy(b);
}
END_TEST

START_TEST(failing_trials_reopen_and_the_wait_grows)
{
    keel_backoff_opts grow = {KEEL_BACKOFF_EXPONENTIAL, 10 * S, 60 * S, NULL, NULL};
    keel_breaker *b = opened(2, &grow);
    uint64_t t = 10 * S; /* the first wait: 10 s */
    uint64_t waits[] = {20 * S, 40 * S, 60 * S, 60 * S};
    for (int round = 0; round < 4; round++) {
        ck_assert_int_eq(keel_breaker_try_acquire(b, t), 0);
        ck_assert_int_eq(keel_breaker_try_acquire(b, t), 0);
        keel_breaker_on_result(b, t, MS, 1); /* 1 of 2 failed: 50% >= 50% */
        keel_breaker_on_result(b, t, MS, 0);
        ck_assert_int_eq(keel_breaker_state_get(b), KEEL_BREAKER_OPEN);
        ck_assert_int_eq(keel_breaker_try_acquire(b, t + waits[round] - 1), KEEL_EUNAVAIL);
        t += waits[round];
    }
    keel_breaker_stats st;
    keel_breaker_stats_get(b, &st);
    ck_assert_uint_eq(st.open_count, 5);
    /* trials that pass close it and the wait starts over */
    ck_assert_int_eq(call(b, t, 0, MS), 0);
    ck_assert_int_eq(call(b, t, 0, MS), 0);
    ck_assert_int_eq(keel_breaker_state_get(b), KEEL_BREAKER_CLOSED);
    for (int i = 0; i < 4; i++)
        call(b, t, 1, MS);
    ck_assert_int_eq(keel_breaker_try_acquire(b, t + 10 * S), 0);
    keel_breaker_destroy(b);
}
END_TEST

/* resilience4j's HALF_OPEN metrics are a count window of the permitted
 * calls with minimum_calls = min(minimum_calls, permitted), checked after
 * every result: it decides as soon as that many results are in, without
 * waiting for the other permits. */
START_TEST(half_open_decides_once_minimum_calls_are_in)
{
    keel_breaker_opts o = {.window_size = 10, .minimum_calls = 2, .permitted_in_half_open = 10,
                           .wait_open_ns = 5 * S};
    for (int fail = 0; fail < 2; fail++) {
        keel_breaker *b = make(o);
        call(b, 0, 1, MS);
        call(b, 0, 1, MS);
        ck_assert_int_eq(keel_breaker_state_get(b), KEEL_BREAKER_OPEN);
        for (int i = 0; i < 3; i++) /* three of the ten trials go out */
            ck_assert_int_eq(keel_breaker_try_acquire(b, 5 * S), 0);
        keel_breaker_on_result(b, 5 * S, MS, fail);
        ck_assert_int_eq(keel_breaker_state_get(b), KEEL_BREAKER_HALF_OPEN); /* 1 < 2 */
        keel_breaker_on_result(b, 5 * S, MS, fail);
        ck_assert_int_eq(keel_breaker_state_get(b), (fail ? KEEL_BREAKER_OPEN : KEEL_BREAKER_CLOSED));
        /* the third trial ends after the change and counts in the state it
         * finds: a failure in the fresh CLOSED window, nothing when OPEN */
        keel_breaker_on_result(b, 5 * S, MS, 1);
        keel_breaker_stats st;
        keel_breaker_stats_get(b, &st);
        ck_assert_uint_eq(st.failed, fail ? 4 : 3); /* 2 to open, the trials' */
        if (!fail) {
            ck_assert_uint_eq(st.window_calls, 1);
            ck_assert_uint_eq(st.window_failed, 1);
        }
        ck_assert_int_eq(keel_breaker_state_get(b), (fail ? KEEL_BREAKER_OPEN : KEEL_BREAKER_CLOSED));
        keel_breaker_destroy(b);
    }
    /* the half-open minimum is min(minimum_calls, permitted) as configured,
     * not the CLOSED one clamped to a smaller count window (here 4) */
    keel_breaker *b = make((keel_breaker_opts){.window_size = 4, .minimum_calls = 100,
                                               .permitted_in_half_open = 6, .wait_open_ns = 5 * S});
    for (int i = 0; i < 4; i++)
        call(b, 0, 1, MS);
    ck_assert_int_eq(keel_breaker_state_get(b), KEEL_BREAKER_OPEN);
    for (int i = 0; i < 5; i++) {
        ck_assert_int_eq(call(b, 5 * S, 0, MS), 0);
        ck_assert_int_eq(keel_breaker_state_get(b), KEEL_BREAKER_HALF_OPEN);
    }
    ck_assert_int_eq(call(b, 5 * S, 0, MS), 0);
    ck_assert_int_eq(keel_breaker_state_get(b), KEEL_BREAKER_CLOSED);
    keel_breaker_destroy(b);
}
END_TEST

START_TEST(a_time_window_evicts_by_the_second)
{
    keel_breaker *b = make((keel_breaker_opts){.window = KEEL_BREAKER_TIME, .window_size = 10,
                                               .minimum_calls = 10});
    for (int i = 0; i < 9; i++)
        call(b, 500 * MS, 1, MS); /* second 0 */
    keel_breaker_stats st;
    uint64_t t = 10 * S + 500 * MS; /* the window is seconds 1..10 now */
    call(b, t, 1, MS);
    ck_assert_int_eq(keel_breaker_state_get(b), KEEL_BREAKER_CLOSED);
    for (int i = 0; i < 8; i++)
        call(b, t, 1, MS);
    ck_assert_int_eq(keel_breaker_state_get(b), KEEL_BREAKER_CLOSED); /* 9 calls */
    call(b, 11 * S + 200 * MS, 1, MS); /* second 11: with second 10's nine, ten */
    ck_assert_int_eq(keel_breaker_state_get(b), KEEL_BREAKER_OPEN);
    keel_breaker_stats_get(b, &st);
    ck_assert_uint_eq(st.failed, 19);
    keel_breaker_destroy(b);
}
END_TEST

static int changes;
static keel_breaker_state last_from, last_to;
static void on_state(keel_breaker *b, keel_breaker_state from, keel_breaker_state to, void *ud)
{
    (void)b;
    (void)ud;
    changes++;
    last_from = from;
    last_to = to;
}

START_TEST(forced_states_and_the_callback)
{
    changes = 0;
    keel_breaker *b = make((keel_breaker_opts){.window_size = 5, .minimum_calls = 5,
                                               .on_state = on_state});
    ck_assert_int_eq(keel_breaker_force(b, KEEL_BREAKER_DISABLED, 0), 0);
    for (int i = 0; i < 50; i++)
        ck_assert_int_eq(call(b, 0, 1, MS), 0); /* never trips, records nothing */
    ck_assert_int_eq(keel_breaker_state_get(b), KEEL_BREAKER_DISABLED);
    ck_assert_int_eq(keel_breaker_force(b, KEEL_BREAKER_FORCED_OPEN, 0), 0);
    ck_assert_int_eq(keel_breaker_try_acquire(b, 1000 * S), KEEL_EUNAVAIL);
    ck_assert_int_eq(keel_breaker_force(b, KEEL_BREAKER_CLOSED, 0), 0);
    ck_assert_int_eq(changes, 3);
    ck_assert_int_eq(last_from, KEEL_BREAKER_FORCED_OPEN);
    ck_assert_int_eq(last_to, KEEL_BREAKER_CLOSED);
    for (int i = 0; i < 5; i++)
        call(b, 0, 1, MS);
    ck_assert_int_eq(last_to, KEEL_BREAKER_OPEN);
    ck_assert_int_eq(changes, 4);
    ck_assert_str_eq(keel_breaker_state_name(KEEL_BREAKER_HALF_OPEN), "half_open");
    ck_assert_str_eq(keel_breaker_state_name((keel_breaker_state)77), "unknown");
    keel_breaker_destroy(b);
}
END_TEST

START_TEST(half_open_gives_up_when_trial_results_never_come)
{
    keel_breaker *b = make((keel_breaker_opts){.window_size = 2, .minimum_calls = 2,
                                               .wait_open_ns = 5 * S, .permitted_in_half_open = 1,
                                               .max_half_open_ns = 30 * S});
    call(b, 0, 1, MS);
    call(b, 0, 1, MS);
    ck_assert_int_eq(keel_breaker_try_acquire(b, 5 * S), 0); /* the trial, never answered */
    ck_assert_int_eq(keel_breaker_try_acquire(b, 20 * S), KEEL_EUNAVAIL);
    ck_assert_int_eq(keel_breaker_state_get(b), KEEL_BREAKER_HALF_OPEN);
    ck_assert_int_eq(keel_breaker_try_acquire(b, 35 * S), KEEL_EUNAVAIL);
    ck_assert_int_eq(keel_breaker_state_get(b), KEEL_BREAKER_OPEN);
    ck_assert_int_eq(keel_breaker_try_acquire(b, 40 * S), 0); /* a new trial */
    keel_breaker_destroy(b);
}
END_TEST

/* ---- threads ---- */

typedef struct worker {
    keel_breaker *b;
    atomic_ullong *clock;
    int seed;
    long passed, refused;
} worker;

static void *work(void *arg)
{
    worker *w = arg;
    uint32_t x = (uint32_t)w->seed;
    for (int i = 0; i < 200000; i++) {
        x = x * 1103515245u + 12345u;
        uint64_t now = atomic_fetch_add(w->clock, 100000); /* 0.1 ms a call */
        if (keel_breaker_try_acquire(w->b, now) == 0) {
            w->passed++;
            if ((x >> 16) % 7 == 0)
                keel_breaker_release(w->b);
            else /* failure rate drifts between 25% and 75% */
                keel_breaker_on_result(w->b, now, MS, (x >> 8) % 100 < (i / 20000 % 2 ? 75u : 25u));
        } else {
            w->refused++;
        }
    }
    return NULL;
}

START_TEST(concurrent_callers_drive_it_through_every_state)
{
    keel_breaker *b = make((keel_breaker_opts){.window_size = 50, .minimum_calls = 20,
                                               .wait_open_ns = 20 * MS,
                                               .permitted_in_half_open = 5});
    atomic_ullong clock = 0;
    worker w[2] = {{b, &clock, 1, 0, 0}, {b, &clock, 2, 0, 0}};
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&t[i], NULL, work, &w[i]);
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
    keel_breaker_stats st;
    keel_breaker_stats_get(b, &st);
    ck_assert_uint_gt(st.transitions, 10);
    ck_assert_uint_eq(st.rejected, (uint64_t)(w[0].refused + w[1].refused));
    ck_assert_int_gt(w[0].passed + w[1].passed, 0);
    ck_assert_uint_le(st.window_calls, 50);
    keel_breaker_destroy(b);
}
END_TEST

typedef struct recorder {
    keel_breaker *b;
    atomic_int *stop;
} recorder;

static void *record_failures(void *arg)
{
    recorder *r = arg;
    while (!atomic_load(r->stop))
        keel_breaker_on_result(r->b, 5 * S, MS, 1);
    return NULL;
}

/* A forced CLOSED empties a time window while results keep coming: a
 * result counted in its bucket but not yet in the window's totals when the
 * window is emptied must leave neither behind, or the window keeps phantom
 * calls and failures for good. */
START_TEST(emptying_a_time_window_under_load_leaves_no_phantom_calls)
{
    for (int round = 0; round < 20; round++) {
        keel_breaker *b = make((keel_breaker_opts){.window = KEEL_BREAKER_TIME, .window_size = 1,
                                                   .minimum_calls = UINT32_MAX});
        atomic_int stop = 0;
        recorder r = {b, &stop};
        pthread_t t[2];
        for (int i = 0; i < 2; i++)
            pthread_create(&t[i], NULL, record_failures, &r);
        for (int i = 0; i < 50000; i++)
            keel_breaker_force(b, KEEL_BREAKER_CLOSED, 5 * S);
        atomic_store(&stop, 1);
        for (int i = 0; i < 2; i++)
            pthread_join(t[i], NULL);
        /* a later second: every earlier call has left the window */
        keel_breaker_on_result(b, 100 * S, MS, 0);
        keel_breaker_stats st;
        keel_breaker_stats_get(b, &st);
        ck_assert_uint_eq(st.window_calls, 1);
        ck_assert_uint_eq(st.window_failed, 0);
        keel_breaker_destroy(b);
    }
}
END_TEST

START_TEST(bad_input_is_refused)
{
    keel_breaker *b = (keel_breaker *)0x1;
    keel_breaker_opts bad[] = {
        {.window = (keel_breaker_window)3},
        {.failure_rate = 101},
        {.slow_call_rate = 200},
        {.permitted_in_half_open = 9000},
        {.window = KEEL_BREAKER_TIME, .window_size = 4000},
        {.window_size = 2000000},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        ck_assert_msg(keel_breaker_create(&b, &bad[i]) == KEEL_EINVAL, "case %zu", i);
    ck_assert_ptr_eq(b, (keel_breaker *)0x1);
    ck_assert_int_eq(keel_breaker_create(NULL, &bad[0]), KEEL_EINVAL);
    ck_assert_int_eq(keel_breaker_try_acquire(NULL, 0), KEEL_EINVAL);
    keel_breaker_on_result(NULL, 0, 0, 0);
    keel_breaker_release(NULL);
    b = make((keel_breaker_opts){0});
    ck_assert_int_eq(keel_breaker_force(b, (keel_breaker_state)9, 0), KEEL_EINVAL);
    keel_breaker_stats_get(b, NULL);
    keel_breaker_destroy(b);
    keel_breaker_destroy(NULL);
    /* The last nanosecond is a time like any other: an open breaker whose
     * wait is over goes half-open and lets a trial through, rather than
     * spinning between OPEN and HALF_OPEN for ever. */
    b = make((keel_breaker_opts){.permitted_in_half_open = 1});
    ck_assert_int_eq(keel_breaker_force(b, KEEL_BREAKER_OPEN, 0), 0);
    ck_assert_int_eq(keel_breaker_try_acquire(b, UINT64_MAX), 0);
    ck_assert_int_eq(keel_breaker_state_get(b), KEEL_BREAKER_HALF_OPEN);
    ck_assert_int_eq(keel_breaker_try_acquire(b, UINT64_MAX), KEEL_EUNAVAIL);
    keel_breaker_destroy(b);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("breaker");
    TCase *tc = tcase_create("states");
    tcase_add_test(tc, below_minimum_calls_nothing_trips);
    tcase_add_test(tc, fifty_of_a_hundred_opens_and_forty_nine_does_not);
    tcase_add_test(tc, minimum_calls_is_clamped_to_a_count_window);
    tcase_add_test(tc, slow_calls_trip_at_their_own_rate);
    tcase_add_test(tc, half_open_admits_exactly_the_permitted_calls);
    tcase_add_test(tc, failing_trials_reopen_and_the_wait_grows);
    tcase_add_test(tc, half_open_decides_once_minimum_calls_are_in);
    tcase_add_test(tc, a_time_window_evicts_by_the_second);
    tcase_add_test(tc, forced_states_and_the_callback);
    tcase_add_test(tc, half_open_gives_up_when_trial_results_never_come);
    tcase_add_test(tc, bad_input_is_refused);
    suite_add_tcase(s, tc);
    tc = tcase_create("threads");
    tcase_set_timeout(tc, 30);
    tcase_set_tags(tc, "stress"); /* races: for the sanitizer runs, not valgrind's one thread at a time */
    tcase_add_test(tc, concurrent_callers_drive_it_through_every_state);
    tcase_add_test(tc, emptying_a_time_window_under_load_leaves_no_phantom_calls);
    suite_add_tcase(s, tc);
    return kt_run(s);
}
