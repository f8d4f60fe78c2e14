/* bench/bench.h — small helpers for the benchmarks: timing, threads, and
 * one output format. Every figure is printed next to a baseline measured in
 * the same run, with the ratio and the goal; benchmarks never fail. */
#ifndef KEEL_BENCH_H
#define KEEL_BENCH_H

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

/* SHORT=1 in the environment: a quick pass that only keeps the code
 * working (CI). Returns the iteration count to use. */
static inline uint64_t bench_iters(uint64_t full)
{
    const char *s = getenv("SHORT");
    return s && *s && *s != '0' ? (full / 100 ? full / 100 : 1) : full;
}

static inline uint64_t bench_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Keeps a value alive without the compiler seeing what happens to it. */
#define BENCH_KEEP(p) __asm__ volatile("" : : "r"(p) : "memory")

typedef void *(*bench_fn)(void *arg);

/* Runs fn on n threads at once and returns the
 * wall-clock nanoseconds until the last one finished. */
static inline uint64_t bench_threads(int n, bench_fn fn, void *args, size_t arg_size)
{
    pthread_t t[64];
    uint64_t t0 = bench_ns();
    for (int i = 0; i < n; i++)
        pthread_create(&t[i], NULL, fn, (char *)args + (size_t)i * arg_size);
    for (int i = 0; i < n; i++)
        pthread_join(t[i], NULL);
    return bench_ns() - t0;
}

static inline void bench_section(const char *name)
{
    printf("\n## %s\n", name);
}

/* One result line: the figure, the baseline, their ratio and the goal. */
static inline void bench_row(const char *what, double value, const char *unit,
                             const char *base_what, double base, const char *goal)
{
    printf("%-44s %10.2f %-8s | %-22s %10.2f %-8s | ratio %6.2fx | goal: %s\n", what, value,
           unit, base_what, base, unit, base > 0 ? value / base : 0.0, goal);
}

#endif
