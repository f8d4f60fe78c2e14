/* bench/breaker.c — try_acquire + on_result on the CLOSED path, 1 and 2
 * threads, against one relaxed atomic increment per call in the same run.
 * Goal (issue 10): under 20 ns per call on one thread. */
#include <stdatomic.h>

#include <keel/breaker.h>

#include "bench.h"

typedef struct job {
    keel_breaker *b;
    atomic_ulong *counter;
    uint64_t iters;
} job;

static void *run_breaker(void *arg)
{
    job *j = arg;
    for (uint64_t i = 0; i < j->iters; i++)
        if (keel_breaker_try_acquire(j->b, i) == 0)
            keel_breaker_on_result(j->b, i, 1000, (i & 1023) == 0); /* 0.1% failures */
    return NULL;
}

static void *run_counter(void *arg)
{
    job *j = arg;
    for (uint64_t i = 0; i < j->iters; i++)
        atomic_fetch_add_explicit(j->counter, 1, memory_order_relaxed);
    return NULL;
}

int main(void)
{
    uint64_t iters = bench_iters(10000000);
    bench_section("breaker: closed path (try_acquire + on_result) vs one atomic increment");
    keel_breaker_window kinds[] = {KEEL_BREAKER_COUNT, KEEL_BREAKER_TIME};
    for (int k = 0; k < 2; k++)
        for (int th = 1; th <= 2; th++) {
            keel_breaker *b;
            keel_breaker_opts o = {.window = kinds[k]};
            keel_breaker_create(&b, &o);
            atomic_ulong counter = 0;
            job jobs[2] = {{b, &counter, iters}, {b, &counter, iters}};
            double base = (double)bench_threads(th, run_counter, jobs, sizeof(job)) / (double)iters;
            double t = (double)bench_threads(th, run_breaker, jobs, sizeof(job)) / (double)iters;
            char what[64];
            snprintf(what, sizeof what, "%s window, %d thread%s", k ? "time" : "count", th,
                     th > 1 ? "s" : "");
            printf("%-44s %8.1f ns  | atomic increment %6.1f ns | %6.2fx slower | goal: %s\n", what,
                   t, base, t / base, th == 1 ? "< 20 ns" : "-");
            keel_breaker_destroy(b);
        }
    return 0;
}
