/* bench/pool.c — acquire+release pairs per second against malloc+free of
 * the same size, 64 B and 1 KiB objects, 1 and 2 threads.
 * Goals (issue 2): at least 3x malloc+free on one thread, and at least
 * 1.8x scaling from 1 to 2 threads.
 *
 * Two patterns: depth 1 releases each object right after acquiring it (the
 * best case of glibc's per-thread tcache, which keeps 7 chunks per size),
 * with the pointer in a local as a caller that acquires, uses and releases
 * keeps it; depth 32 holds 32 objects in an array before releasing them,
 * as a pool of buffers or connections is used. Both sides run the same
 * loops. */
#include <string.h>

#include <keel/pool.h>

#include "bench.h"

#define MAX_DEPTH 32

typedef struct job {
    keel_pool *pool; /* NULL: malloc + free */
    size_t size;
    uint64_t iters; /* pairs */
    int depth;
} job;

static void *run_pool(void *arg)
{
    job *j = arg;
    char *held[MAX_DEPTH];
    if (j->depth == 1) {
        keel_pool *p = j->pool;
        for (uint64_t i = 0, n = j->iters; i < n; i++) {
            char *obj = keel_pool_acquire(p);
            obj[0] = (char)i;
            BENCH_KEEP(obj);
            keel_pool_release(p, obj);
        }
        return NULL;
    }
    for (uint64_t i = 0; i < j->iters; i += (uint64_t)j->depth) {
        for (int k = 0; k < j->depth; k++) {
            held[k] = keel_pool_acquire(j->pool);
            held[k][0] = (char)i;
            BENCH_KEEP(held[k]);
        }
        for (int k = 0; k < j->depth; k++)
            keel_pool_release(j->pool, held[k]);
    }
    return NULL;
}

static void *run_malloc(void *arg)
{
    job *j = arg;
    char *held[MAX_DEPTH];
    if (j->depth == 1) {
        for (uint64_t i = 0, n = j->iters, size = j->size; i < n; i++) {
            char *obj = malloc(size);
            obj[0] = (char)i;
            BENCH_KEEP(obj);
            free(obj);
        }
        return NULL;
    }
    for (uint64_t i = 0; i < j->iters; i += (uint64_t)j->depth) {
        for (int k = 0; k < j->depth; k++) {
            held[k] = malloc(j->size);
            held[k][0] = (char)i;
            BENCH_KEEP(held[k]);
        }
        for (int k = 0; k < j->depth; k++)
            free(held[k]);
    }
    return NULL;
}

/* Millions of acquire+release pairs per second, over `threads` threads. */
static double mops(size_t size, int depth, int threads, int use_pool, uint64_t iters)
{
    keel_pool *p = NULL;
    keel_pool_opts o = {.obj_size = size};
    if (use_pool && keel_pool_create(&p, &o) != 0)
        abort();
    job jobs[2];
    for (int i = 0; i < threads && i < 2; i++) /* two at most */
        jobs[i] = (job){p, size, iters, depth};
    /* warm up the thread caches and the allocator */
    job warm = {p, size, iters / 10 + 1, depth};
    (use_pool ? run_pool : run_malloc)(&warm);
    uint64_t ns = bench_threads(threads, use_pool ? run_pool : run_malloc, jobs, sizeof(job));
    keel_pool_destroy(p);
    return (double)iters * threads / ((double)ns / 1e9) / 1e6;
}

int main(void)
{
    uint64_t iters = bench_iters(20000000);
    bench_section("pool: acquire+release vs malloc+free");
    size_t sizes[] = {64, 1024};
    int depths[] = {1, MAX_DEPTH};
    for (int d = 0; d < 2; d++)
        for (int s = 0; s < 2; s++) {
            double best_pool[3] = {0}, best_malloc[3] = {0};
            for (int rep = 0; rep < 3; rep++) /* best of three: least disturbed */
                for (int th = 1; th <= 2; th++) {
                    double a = mops(sizes[s], depths[d], th, 1, iters);
                    double b = mops(sizes[s], depths[d], th, 0, iters);
                    if (a > best_pool[th])
                        best_pool[th] = a;
                    if (b > best_malloc[th])
                        best_malloc[th] = b;
                }
            char what[80];
            for (int th = 1; th <= 2; th++) {
                snprintf(what, sizeof what, "pool %zu B, depth %d, %d thread%s", sizes[s],
                         depths[d], th, th > 1 ? "s" : "");
                bench_row(what, best_pool[th], "M ops/s", "malloc+free", best_malloc[th],
                          th == 1 ? ">= 3x" : "-");
            }
            snprintf(what, sizeof what, "pool %zu B, depth %d, 1 -> 2 threads", sizes[s],
                     depths[d]);
            bench_row(what, best_pool[2], "M ops/s", "1 thread", best_pool[1], ">= 1.8x");
        }
    return 0;
}
