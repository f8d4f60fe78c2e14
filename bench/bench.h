/* bench/bench.h — small helpers for the benchmarks: timing, threads, and
 * one output format. Every figure is printed next to a baseline measured in
 * the same run, with the ratio and the goal; benchmarks never fail. */
#ifndef KEEL_BENCH_H
#define KEEL_BENCH_H

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

/* The first Redis of KEEL_TEST_REDIS (`make bench` starts it); false, with
 * a message, when it is not set. */
static inline int bench_redis_addr(const char *who, char host[64], int *port)
{
    const char *env = getenv("KEEL_TEST_REDIS");
    if (!env || sscanf(env, "%63[^:]:%d", host, port) != 2) {
        fprintf(stderr, "bench/%s: KEEL_TEST_REDIS is not set (run it through `make bench`)\n", who);
        return 0;
    }
    return 1;
}

/* A keel_redis over that first Redis (declare keel/redis.h first to use
 * it); NULL, with a message, when there is none. */
#ifdef KEEL_REDIS_H
static inline keel_redis *bench_redis_open(const char *who, char host[64], int *port)
{
    if (!bench_redis_addr(who, host, port))
        return NULL;
    char url[96];
    snprintf(url, sizeof url, "redis://%s:%d", host, *port);
    const char *nodes[1] = {url};
    keel_redis *r;
    keel_redis_opts ro = {.nodes = nodes, .nnodes = 1};
    return keel_redis_create(&r, &ro) == 0 ? r : NULL;
}
#endif

/* redis-benchmark's requests per second for a command on one connection,
 * from its CSV; 0 if it did not run. */
static inline double bench_redis_reference(const char *host, int port, int pipeline, uint64_t n,
                                           const char *command)
{
    char cmd[1024], line[1024];
    snprintf(cmd, sizeof cmd, "redis-benchmark -h %s -p %d -c 1 -P %d -n %llu --csv -q %s 2>/dev/null",
             host, port, pipeline, (unsigned long long)n, command);
    FILE *f = popen(cmd, "r");
    double rps = 0;
    while (f && fgets(line, sizeof line, f)) {
        const char *last = strrchr(line, '"'); /* the command's name holds commas: */
        char *p = strstr(line, "\",\"");       /* its closing quote is the first "," */
        if (p && strncmp(line, "\"test\"", 6) != 0 && last)
            rps = strtod(p + 3, NULL);
    }
    if (f)
        pclose(f);
    return rps;
}

#endif
