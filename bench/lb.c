/* bench/lb.c — picks per second for each keel_lb policy at 3, 30 and 300
 * peers, 1 and 2 threads, against a bare atomic round-robin counter (the
 * cheapest pick there is) in the same run.
 * Goal (issue 10): round robin and P2C under 50 ns per pick at 30 peers. */
#include <stdatomic.h>

#include <keel/lb.h>

#include "bench.h"

typedef struct job {
    keel_lb *lb;
    atomic_ulong *counter; /* baseline */
    uint64_t iters;
    uint32_t npeers;
} job;

static volatile uintptr_t sink;

/* Each thread sums into a local and writes the shared sink once: a store
 * to it per pick would bounce its cache line between the threads and
 * measure the bench, not the picks. */
static void *run_lb(void *arg)
{
    job *j = arg;
    uintptr_t sum = 0;
    for (uint64_t i = 0; i < j->iters; i++) {
        keel_lb_peer *p;
        keel_lb_pick(j->lb, NULL, &p);
        sum += (uintptr_t)p;
        keel_lb_done(j->lb, p, 1, 1000);
    }
    sink += sum;
    return NULL;
}

static void *run_counter(void *arg)
{
    job *j = arg;
    uintptr_t sum = 0;
    for (uint64_t i = 0; i < j->iters; i++)
        sum += atomic_fetch_add_explicit(j->counter, 1, memory_order_relaxed) % j->npeers;
    sink += sum;
    return NULL;
}

static double ns_per_pick(keel_lb *lb, uint32_t npeers, int threads, uint64_t iters)
{
    atomic_ulong counter = 0;
    job jobs[2];
    for (int i = 0; i < threads && i < 2; i++) /* two at most */
        jobs[i] = (job){lb, &counter, iters, npeers};
    uint64_t ns = bench_threads(threads, lb ? run_lb : run_counter, jobs, sizeof(job));
    return (double)ns / (double)iters; /* per pick per thread: wall time / picks each */
}

int main(void)
{
    uint64_t iters = bench_iters(2000000);
    const char *names[] = {"round robin", "least_conn", "p2c", "peak ewma"};
    bench_section("lb: ns per pick+done (per thread) vs an atomic counter % n");
    uint32_t sizes[] = {3, 30, 300};
    for (int s = 0; s < 3; s++)
        for (int th = 1; th <= 2; th++) {
            double base = ns_per_pick(NULL, sizes[s], th, iters);
            for (int pol = 0; pol < 4; pol++) {
                keel_lb *lb;
                keel_lb_opts o = {.policy = (keel_lb_policy)pol};
                keel_lb_create(&lb, &o);
                for (uint32_t i = 0; i < sizes[s]; i++)
                    keel_lb_add(lb, &(keel_lb_peer_opts){.weight = 1 + i % 3}, NULL);
                double t = ns_per_pick(lb, sizes[s], th, iters);
                char what[64];
                snprintf(what, sizeof what, "%s, %u peers, %d thread%s", names[pol], sizes[s], th,
                         th > 1 ? "s" : "");
                printf("%-44s %8.1f ns  | atomic counter %6.1f ns  | %6.2fx slower | goal: %s\n",
                       what, t, base, t / base,
                       sizes[s] == 30 && (pol == 0 || pol == 2) ? "< 50 ns" : "-");
                keel_lb_destroy(lb);
            }
        }
    return 0;
}
