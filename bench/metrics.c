/* bench/metrics.c — counter increment and histogram observe, 1 and 2
 * threads, against one shared atomic counter and a mutex-protected counter
 * in the same run; and the time to render 10,000 series.
 * Goals (issue 11): increment <= 5 ns and observe <= 10 ns on one thread,
 * no slowdown from the second thread (a shared atomic slows about 4x). */
#include <pthread.h>
#include <stdatomic.h>

#include <keel/metrics.h>

#include "bench.h"

typedef struct job {
    int kind; /* 0 counter, 1 histogram, 2 shared atomic, 3 mutex */
    keel_counter_child *c;
    keel_histogram_child *h;
    atomic_ulong *shared;
    pthread_mutex_t *mu;
    unsigned long *plain;
    uint64_t iters;
} job;

static void *run(void *arg)
{
    job *j = arg;
    for (uint64_t i = 0; i < j->iters; i++) {
        switch (j->kind) {
        case 0: keel_counter_inc(j->c); break;
        case 1: keel_histogram_observe(j->h, (double)(i & 1023) * 1e-3); break;
        case 2: atomic_fetch_add_explicit(j->shared, 1, memory_order_relaxed); break;
        default:
            pthread_mutex_lock(j->mu);
            (*j->plain)++;
            pthread_mutex_unlock(j->mu);
        }
    }
    return NULL;
}

static int discard(const char *buf, size_t len, void *ud)
{
    (void)buf;
    *(size_t *)ud += len;
    return 0;
}

int main(void)
{
    uint64_t iters = bench_iters(20000000);
    keel_metrics *m;
    keel_metrics_opts mo = {.max_children = 20000};
    keel_metrics_create(&m, &mo);
    keel_counter *c;
    keel_histogram *h;
    keel_metrics_counter(m, "ops_total", "Operations.", NULL, 0, &c);
    keel_metrics_histogram(m, "op_seconds", "Latency.", NULL, 0, NULL, 0, &h);
    atomic_ulong shared = 0;
    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    unsigned long plain = 0;

    bench_section("metrics: ns per update (per thread)");
    const char *names[] = {"counter inc", "histogram observe (11 buckets)", "shared atomic add",
                           "mutex counter"};
    double ns[4][3];
    for (int kind = 0; kind < 4; kind++)
        for (int th = 1; th <= 2; th++) {
            job jobs[2];
            for (int i = 0; i < th; i++)
                jobs[i] = (job){kind, keel_counter_with(c), keel_histogram_with(h), &shared, &mu, &plain,
                                iters};
            double best = 1e30;
            for (int rep = 0; rep < 3; rep++) {
                double t = (double)bench_threads(th, run, jobs, sizeof(job)) / (double)iters;
                best = t < best ? t : best;
            }
            ns[kind][th] = best;
        }
    for (int kind = 0; kind < 2; kind++) {
        char what[80];
        snprintf(what, sizeof what, "%s, 1 thread", names[kind]);
        printf("%-44s %8.2f ns  | shared atomic %6.2f ns  | %5.2fx faster | goal: %s\n", what,
               ns[kind][1], ns[2][1], ns[2][1] / ns[kind][1], kind ? "<= 10 ns" : "<= 5 ns");
        snprintf(what, sizeof what, "%s, 2 threads", names[kind]);
        printf("%-44s %8.2f ns  | shared atomic %6.2f ns  | %5.2fx faster | goal: no slowdown "
               "(%.2fx of 1 thread)\n",
               what, ns[kind][2], ns[2][2], ns[2][2] / ns[kind][2], ns[kind][2] / ns[kind][1]);
    }
    printf("%-44s %8.2f ns  | 2 threads %10.2f ns  (%.2fx slower)\n", "shared atomic add, 1 thread",
           ns[2][1], ns[2][2], ns[2][2] / ns[2][1]);
    printf("%-44s %8.2f ns  | 2 threads %10.2f ns  (%.2fx slower)\n", "mutex counter, 1 thread",
           ns[3][1], ns[3][2], ns[3][2] / ns[3][1]);

    bench_section("metrics: render 10,000 series");
    keel_counter *many;
    keel_metrics_counter(m, "requests_total", "Requests.", (const char *[]){"route", "code"}, 2, &many);
    for (int i = 0; i < 10000; i++) {
        char route[32], code[8];
        snprintf(route, sizeof route, "/api/v1/item/%d", i / 5);
        snprintf(code, sizeof code, "%d", 200 + i % 5);
        keel_counter_add(keel_counter_with(many, route, code), (uint64_t)i);
    }
    for (int f = 0; f < 2; f++) {
        size_t bytes = 0;
        double best = 1e30;
        for (int rep = 0; rep < 5; rep++) {
            bytes = 0;
            uint64_t t0 = bench_ns();
            keel_metrics_render(m, (keel_metrics_format)f, discard, &bytes);
            double ms = (double)(bench_ns() - t0) / 1e6;
            best = ms < best ? ms : best;
        }
        printf("%-44s %8.2f ms  (%zu bytes)\n", f ? "OpenMetrics" : "Prometheus text", best, bytes);
    }
    keel_metrics_destroy(m);
    return 0;
}
