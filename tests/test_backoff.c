/* tests/test_backoff.c — keel_backoff schedules and retry budgets. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include <keel/backoff.h>

#include "harness.h"

#define MS 1000000ull

/* A scripted random source: returns the values in turn. */
typedef struct script {
    const uint64_t *v;
    size_t n, i;
} script;

static uint64_t scripted(void *ud)
{
    script *s = ud;
    return s->v[s->i++ % s->n];
}

static keel_backoff make(keel_backoff_policy p, uint64_t base, uint64_t cap, script *rnd)
{
    keel_backoff b;
    keel_backoff_opts o = {p, base, cap, rnd ? scripted : NULL, rnd};
    ck_assert_int_eq(keel_backoff_init(&b, &o), 0);
    return b;
}

START_TEST(constant_and_exponential_are_exact)
{
    keel_backoff c = make(KEEL_BACKOFF_CONSTANT, 7 * MS, 0, NULL);
    for (int i = 0; i < 5; i++)
        ck_assert_uint_eq(keel_backoff_next(&c), 7 * MS);
    keel_backoff e = make(KEEL_BACKOFF_EXPONENTIAL, 100 * MS, 1000 * MS, NULL);
    uint64_t want[] = {100, 200, 400, 800, 1000, 1000, 1000};
    for (int i = 0; i < 7; i++)
        ck_assert_uint_eq(keel_backoff_next(&e), want[i] * MS);
    keel_backoff_reset(&e);
    ck_assert_uint_eq(keel_backoff_next(&e), 100 * MS);
}
END_TEST

START_TEST(growth_stops_at_the_cap_without_overflow)
{
    keel_backoff e = make(KEEL_BACKOFF_EXPONENTIAL, 3, 0, NULL); /* no cap */
    uint64_t prev = 0;
    for (int i = 0; i < 200; i++) {
        uint64_t d = keel_backoff_next(&e);
        ck_assert_uint_ge(d, prev); /* never wraps around */
        prev = d;
    }
    ck_assert_uint_eq(prev, UINT64_MAX);
    ck_assert_uint_eq(keel_backoff_delay(&e.opts, 63, 0), UINT64_MAX);
    ck_assert_uint_eq(keel_backoff_delay(&e.opts, 4000000000u, 0), UINT64_MAX);
}
END_TEST

START_TEST(full_jitter_spans_zero_to_the_exponential)
{
    script s = {(uint64_t[]){0, UINT64_MAX}, 2, 0};
    keel_backoff_opts full = {KEEL_BACKOFF_FULL_JITTER, 10 * MS, 1000 * MS, scripted, &s};
    keel_backoff_opts expo = {KEEL_BACKOFF_EXPONENTIAL, 10 * MS, 1000 * MS, NULL, NULL};
    for (uint32_t n = 0; n < 10; n++) {
        uint64_t e = keel_backoff_delay(&expo, n, 0);
        ck_assert_uint_eq(keel_backoff_delay(&full, n, 0), 0); /* rand 0: the low end */
        ck_assert_uint_eq(keel_backoff_delay(&full, n, 0), e); /* rand max: the high end */
    }
    /* with the real source: always within [0, expo] */
    keel_backoff r = make(KEEL_BACKOFF_FULL_JITTER, 10 * MS, 1000 * MS, NULL);
    for (int i = 0; i < 1000; i++) {
        uint64_t e = keel_backoff_delay(&(keel_backoff_opts){KEEL_BACKOFF_EXPONENTIAL, 10 * MS, 1000 * MS},
                                        r.attempt, 0);
        ck_assert_uint_le(keel_backoff_next(&r), e);
    }
}
END_TEST

START_TEST(equal_jitter_keeps_at_least_half)
{
    keel_backoff r = make(KEEL_BACKOFF_EQUAL_JITTER, 10 * MS, 640 * MS, NULL);
    for (int i = 0; i < 2000; i++) {
        uint64_t e = keel_backoff_delay(&(keel_backoff_opts){KEEL_BACKOFF_EXPONENTIAL, 10 * MS, 640 * MS},
                                        r.attempt, 0);
        uint64_t d = keel_backoff_next(&r);
        ck_assert_uint_ge(d, e / 2);
        ck_assert_uint_le(d, e);
        if (i % 10 == 9)
            keel_backoff_reset(&r);
    }
    script s = {(uint64_t[]){0, UINT64_MAX}, 2, 0};
    keel_backoff b = make(KEEL_BACKOFF_EQUAL_JITTER, 10 * MS, 0, &s);
    ck_assert_uint_eq(keel_backoff_next(&b), 5 * MS);  /* 10/2 + 0 */
    ck_assert_uint_eq(keel_backoff_next(&b), 20 * MS); /* 20/2 + 10 */
}
END_TEST

/* In integers: ceil(e/2) + U{0, floor(e/2)}, so never below half of e
 * (e = 1 never gives 0) and never above e. */
START_TEST(equal_jitter_of_an_odd_delay_rounds_half_up)
{
    const uint64_t lo = 0, hi = UINT64_MAX;
    static const struct {
        uint64_t base;
        uint32_t attempt;
        uint64_t at_lo, at_hi;
    } cases[] = {
        {1, 0, 1, 1},
        {3, 0, 2, 3},
        {2, 0, 1, 2},
        {5, 1, 5, 10},
        {1, 70, UINT64_MAX / 2 + 1, UINT64_MAX}, /* e = UINT64_MAX, no cap */
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        script s = {(uint64_t[]){lo, hi}, 2, 0};
        keel_backoff_opts o = {KEEL_BACKOFF_EQUAL_JITTER, cases[c].base, 0, scripted, &s};
        ck_assert_uint_eq(keel_backoff_delay(&o, cases[c].attempt, 0), cases[c].at_lo);
        ck_assert_uint_eq(keel_backoff_delay(&o, cases[c].attempt, 0), cases[c].at_hi);
    }
}
END_TEST

START_TEST(decorrelated_stays_between_base_and_three_times_previous)
{
    keel_backoff r = make(KEEL_BACKOFF_DECORRELATED, 10 * MS, 2000 * MS, NULL);
    uint64_t prev = 10 * MS;
    for (int i = 0; i < 5000; i++) {
        uint64_t d = keel_backoff_next(&r);
        ck_assert_uint_ge(d, 10 * MS);
        ck_assert_uint_le(d, prev * 3 < 2000 * MS ? prev * 3 : 2000 * MS);
        prev = d;
    }
    script s = {(uint64_t[]){UINT64_MAX}, 1, 0}; /* always the top: 30, 90, 270 */
    keel_backoff b = make(KEEL_BACKOFF_DECORRELATED, 10 * MS, 200 * MS, &s);
    ck_assert_uint_eq(keel_backoff_next(&b), 30 * MS);
    ck_assert_uint_eq(keel_backoff_next(&b), 90 * MS);
    ck_assert_uint_eq(keel_backoff_next(&b), 200 * MS); /* capped */
}
END_TEST

START_TEST(bad_schedules_are_refused)
{
    keel_backoff b;
    keel_backoff_opts ok = {KEEL_BACKOFF_EXPONENTIAL, 10, 100, NULL, NULL};
    ck_assert_int_eq(keel_backoff_init(NULL, &ok), KEEL_EINVAL);
    ck_assert_int_eq(keel_backoff_init(&b, NULL), KEEL_EINVAL);
    keel_backoff_opts bad = {(keel_backoff_policy)9, 10, 100, NULL, NULL};
    ck_assert_int_eq(keel_backoff_init(&b, &bad), KEEL_EINVAL);
    keel_backoff_opts inverted = {KEEL_BACKOFF_EXPONENTIAL, 100, 10, NULL, NULL};
    ck_assert_int_eq(keel_backoff_init(&b, &inverted), KEEL_EINVAL);
    ck_assert_uint_eq(keel_backoff_next(NULL), 0);
    ck_assert_uint_eq(keel_backoff_delay(NULL, 1, 0), 0);
    keel_backoff_reset(NULL);
}
END_TEST

/* ---- budgets ---- */

START_TEST(grpc_token_arithmetic)
{
    keel_retry_budget *b;
    keel_retry_budget_opts o = {.kind = KEEL_BUDGET_TOKENS, .max_milli = 4000, .ratio_milli = 1600};
    ck_assert_int_eq(keel_retry_budget_create(&b, &o), 0);
    ck_assert_int_eq(keel_retry_budget_balance(b), 4000);
    keel_retry_budget_on_result(b, 0); /* fail: 3000 > 2000 */
    ck_assert_int_eq(keel_retry_budget_balance(b), 3000);
    ck_assert_int_eq(keel_retry_budget_try_retry(b), 0);
    keel_retry_budget_on_result(b, 1); /* success: capped at 4000 */
    ck_assert_int_eq(keel_retry_budget_balance(b), 4000);
    keel_retry_budget_on_result(b, 0);
    keel_retry_budget_on_result(b, 0); /* 2000: not above half */
    ck_assert_int_eq(keel_retry_budget_balance(b), 2000);
    ck_assert_int_eq(keel_retry_budget_try_retry(b), KEEL_ELIMIT);
    keel_retry_budget_on_result(b, 1); /* 3600 */
    ck_assert_int_eq(keel_retry_budget_try_retry(b), 0);
    for (int i = 0; i < 10; i++)
        keel_retry_budget_on_result(b, 0);
    ck_assert_int_eq(keel_retry_budget_balance(b), 0); /* floors at zero */
    keel_retry_budget_destroy(b);
}
END_TEST

typedef struct hammer {
    keel_retry_budget *b;
    int ok;
} hammer;

static void *budget_hammer(void *arg)
{
    hammer *h = arg;
    for (int i = 0; i < 100000; i++)
        keel_retry_budget_on_result(h->b, h->ok);
    return NULL;
}

START_TEST(token_updates_from_two_threads_stay_in_bounds)
{
    keel_retry_budget *b;
    keel_retry_budget_opts o = {.kind = KEEL_BUDGET_TOKENS};
    ck_assert_int_eq(keel_retry_budget_create(&b, &o), 0);
    hammer h[2] = {{b, 0}, {b, 1}};
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&t[i], NULL, budget_hammer, &h[i]);
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
    int64_t v = keel_retry_budget_balance(b);
    ck_assert(v >= 0 && v <= 10000);
    keel_retry_budget_destroy(b);
}
END_TEST

START_TEST(percent_budget_allows_its_share_plus_the_reserve)
{
    kt_clock clk = {0};
    keel_retry_budget *b;
    keel_retry_budget_opts o = {.kind = KEEL_BUDGET_PERCENT, .percent = 20,
                                .window_ns = 10 * KT_S, .min_per_sec = 1,
                                .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_retry_budget_create(&b, &o), 0);
    /* reserve: 1/s x 10 s = 10 retries; 100 requests add 20 more */
    for (int i = 0; i < 100; i++)
        keel_retry_budget_on_request(b);
    int allowed = 0;
    while (keel_retry_budget_try_retry(b) == 0)
        allowed++;
    ck_assert_int_eq(allowed, 30);
    /* the window slides: after 10 s the deposits and withdrawals expire */
    kt_clock_advance(&clk, 11 * KT_S);
    allowed = 0;
    while (keel_retry_budget_try_retry(b) == 0)
        allowed++;
    ck_assert_int_eq(allowed, 10); /* only the reserve */
    keel_retry_budget_destroy(b);

    keel_retry_budget_opts none = {.kind = KEEL_BUDGET_PERCENT, .percent = KEEL_BUDGET_NONE,
                                   .min_per_sec = KEEL_BUDGET_NONE};
    ck_assert_int_eq(keel_retry_budget_create(&b, &none), 0);
    keel_retry_budget_on_request(b);
    ck_assert_int_eq(keel_retry_budget_try_retry(b), KEEL_ELIMIT);
    keel_retry_budget_destroy(b);
}
END_TEST

/* Finagle's RetryFilter deposits once per request and withdraws once per
 * retry. Against a server where every attempt fails, that keeps retries
 * to `percent` of the requests plus the reserve, in every window. */
static int failing_requests(keel_retry_budget *b, int n, bool deposit_per_retry)
{
    int retries = 0;
    for (int i = 0; i < n; i++) {
        keel_retry_budget_on_request(b); /* the request; its attempt fails */
        while (keel_retry_budget_try_retry(b) == 0) { /* and so does every retry */
            retries++;
            if (deposit_per_retry)
                keel_retry_budget_on_request(b);
        }
    }
    return retries;
}

START_TEST(percent_budget_deposits_once_per_request_under_total_failure)
{
    kt_clock clk = {0};
    keel_retry_budget *b;
    keel_retry_budget_opts o = {.kind = KEEL_BUDGET_PERCENT, .percent = 20,
                                .window_ns = 10 * KT_S, .min_per_sec = 1,
                                .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_retry_budget_create(&b, &o), 0);
    for (int w = 0; w < 3; w++) {
        /* 20% of 1000 requests, plus the reserve of 1/s x 10 s */
        ck_assert_int_eq(failing_requests(b, 1000, false), 200 + 10);
        kt_clock_advance(&clk, 11 * KT_S); /* all of it expires */
    }
    /* Depositing for retries too, the retries would pay for themselves:
     * r = 0.2 (n + r) + 10 gives r = 0.25 n + 12.5, 25% instead of 20%. */
    ck_assert_int_eq(failing_requests(b, 1000, true), 262);
    keel_retry_budget_destroy(b);
}
END_TEST

/* A caller that read the clock, then stalled a whole window before taking
 * the budget's lock, brings a reading older than the deposits made since:
 * its own deposit is out of the window, and the newer ones stay. */
typedef struct stale_clock {
    kt_clock now;
    bool stale; /* the next reading is 0 */
} stale_clock;

static uint64_t stale_once(void *ud)
{
    stale_clock *c = ud;
    if (c->stale) {
        c->stale = false;
        return 0;
    }
    return kt_clock_now(&c->now);
}

START_TEST(a_stale_clock_reading_does_not_wipe_newer_deposits)
{
    stale_clock clk = {0};
    keel_retry_budget *b;
    keel_retry_budget_opts o = {.kind = KEEL_BUDGET_PERCENT, .percent = 20, .window_ns = 10 * KT_S,
                                .min_per_sec = KEEL_BUDGET_NONE, .clock = stale_once, .clock_ud = &clk};
    ck_assert_int_eq(keel_retry_budget_create(&b, &o), 0);
    kt_clock_advance(&clk.now, 10 * KT_S);
    for (int i = 0; i < 100; i++) /* 20 retries' worth, in the tenth at 10 s */
        keel_retry_budget_on_request(b);
    clk.stale = true; /* the next reading is from 0 s, the same tenth of an older window */
    keel_retry_budget_on_request(b);
    int allowed = 0;
    while (keel_retry_budget_try_retry(b) == 0)
        allowed++;
    ck_assert_int_eq(allowed, 20);
    keel_retry_budget_destroy(b);
}
END_TEST

START_TEST(bad_budgets_are_refused)
{
    keel_retry_budget *b;
    keel_retry_budget_opts bad[] = {
        {.kind = (keel_budget_kind)5},
        {.kind = KEEL_BUDGET_TOKENS, .max_milli = 999},
        {.kind = KEEL_BUDGET_TOKENS, .max_milli = 2000, .ratio_milli = 3000},
        {.kind = KEEL_BUDGET_PERCENT, .window_ns = 1000},
        {.kind = KEEL_BUDGET_PERCENT, .percent = 5000},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        ck_assert_msg(keel_retry_budget_create(&b, &bad[i]) == KEEL_EINVAL, "case %zu", i);
    ck_assert_int_eq(keel_retry_budget_create(NULL, &bad[1]), KEEL_EINVAL);
    ck_assert_int_eq(keel_retry_budget_try_retry(NULL), KEEL_EINVAL);
    keel_retry_budget_on_request(NULL);
    keel_retry_budget_on_result(NULL, 1);
    keel_retry_budget_destroy(NULL);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("backoff");
    TCase *tc = tcase_create("schedules");
    tcase_add_test(tc, constant_and_exponential_are_exact);
    tcase_add_test(tc, growth_stops_at_the_cap_without_overflow);
    tcase_add_test(tc, full_jitter_spans_zero_to_the_exponential);
    tcase_add_test(tc, equal_jitter_keeps_at_least_half);
    tcase_add_test(tc, equal_jitter_of_an_odd_delay_rounds_half_up);
    tcase_add_test(tc, decorrelated_stays_between_base_and_three_times_previous);
    tcase_add_test(tc, bad_schedules_are_refused);
    suite_add_tcase(s, tc);
    tc = tcase_create("budgets");
    tcase_add_test(tc, grpc_token_arithmetic);
    tcase_add_test(tc, token_updates_from_two_threads_stay_in_bounds);
    tcase_add_test(tc, percent_budget_allows_its_share_plus_the_reserve);
    tcase_add_test(tc, percent_budget_deposits_once_per_request_under_total_failure);
    tcase_add_test(tc, a_stale_clock_reading_does_not_wipe_newer_deposits);
    tcase_add_test(tc, bad_budgets_are_refused);
    suite_add_tcase(s, tc);
    return kt_run(s);
}
