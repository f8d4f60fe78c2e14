/* bench/bus.c — keel_bus: a sync publish that matches one subscription
 * among 10,000 that do not, against calling the handler directly; async
 * throughput with 2 workers; publishing to Redis Streams 16 to a round
 * trip, against redis-benchmark running the same XADD on the same server
 * in the same run.
 * Goals (issue 7): a sync publish under 100 ns; 5 million async messages
 * per second; Redis at least 0.7 of redis-benchmark. */
#include <stdatomic.h>
#include <string.h>

#include <keel/bus.h>
#include <keel/redis.h>

#include "bench.h"

static uint64_t plain;

static int on_msg(const keel_bus_msg *m, void *ud)
{
    (void)ud;
    plain += m->len;
    return 0;
}

/* Counts per worker thread, on lines of their own: a counter the workers
 * shared would cost more than the delivery it counts. */
static struct {
    _Atomic uint64_t n;
} __attribute__((aligned(64))) per_worker[64];
static _Atomic unsigned workers_seen;

static int on_async(const keel_bus_msg *m, void *ud)
{
    (void)m;
    (void)ud;
    static __thread unsigned mine; /* 1 + this thread's counter */
    if (!mine)
        mine = atomic_fetch_add(&workers_seen, 1) % 64 + 1;
    atomic_fetch_add_explicit(&per_worker[mine - 1].n, 1, memory_order_relaxed);
    return 0;
}

static uint64_t handled_total(void)
{
    uint64_t n = 0;
    for (int i = 0; i < 64; i++)
        n += atomic_load(&per_worker[i].n);
    return n;
}

static int (*volatile direct)(const keel_bus_msg *, void *) = on_msg;

static void sync_section(void)
{
    bench_section("bus: sync publish, one match among 10,000 subscriptions, ns each");
    keel_bus *b;
    if (keel_bus_create(&b, NULL) != 0)
        return;
    char pat[64];
    for (int i = 0; i < 10000; i++) {
        snprintf(pat, sizeof pat, "svc%d.%s.created", i, i % 2 ? "*" : "user");
        keel_bus_sub *s;
        keel_bus_sub_opts o = {.pattern = pat, .handler = on_msg};
        keel_bus_subscribe(b, &o, &s);
    }
    keel_bus_sub *s;
    keel_bus_sub_opts o = {.pattern = "orders.eu.paid", .handler = on_msg};
    keel_bus_subscribe(b, &o, &s);
    uint64_t iters = bench_iters(5000000);
    keel_bus_msg m = {"orders.eu.paid", 14, "x", 1, NULL, 0, "0-0", 0};
    uint64_t t0 = bench_ns();
    for (uint64_t i = 0; i < iters; i++)
        direct(&m, NULL);
    double base = (double)(bench_ns() - t0) / (double)iters;
    t0 = bench_ns();
    for (uint64_t i = 0; i < iters; i++)
        keel_bus_publish(b, "orders.eu.paid", "x", 1, NULL, 0, NULL);
    double ns = (double)(bench_ns() - t0) / (double)iters;
    bench_row("keel_bus_publish", ns, "ns", "direct handler call", base, "< 100 ns");
    keel_bus_destroy(b);
}

static void async_section(void)
{
    bench_section("bus: async delivery, 2 workers, one publisher, messages/s");
    keel_bus *b;
    keel_bus_opts bo = {.workers = 2};
    if (keel_bus_create(&b, &bo) != 0)
        return;
    keel_bus_sub *s;
    keel_bus_sub_opts o = {.pattern = "load.>", .handler = on_async, .mode = KEEL_BUS_ASYNC};
    keel_bus_subscribe(b, &o, &s);
    keel_bus_sub_opts so = {.pattern = "sync.>", .handler = on_async};
    keel_bus_subscribe(b, &so, &s);
    const char *subjects[8] = {"load.a", "load.b", "load.c", "load.d", "sync.a", "sync.b", "sync.c", "sync.d"};
    uint64_t iters = bench_iters(4000000);
    uint64_t t0 = bench_ns();
    for (uint64_t i = 0; i < iters; i++)
        keel_bus_publish(b, subjects[4 + (i & 3)], "x", 1, NULL, 0, NULL);
    double base = (double)iters / ((double)(bench_ns() - t0) / 1e9);
    uint64_t before = handled_total();
    t0 = bench_ns();
    for (uint64_t i = 0; i < iters; i++)
        keel_bus_publish(b, subjects[i & 3], "x", 1, NULL, 0, NULL);
    keel_bus_drain(b);
    double rate = (double)(handled_total() - before) / ((double)(bench_ns() - t0) / 1e9);
    bench_row("async, publish to handled", rate / 1e6, "M/s", "sync publish+call", base / 1e6, ">= 5 M/s");
    keel_bus_destroy(b);
}

static void redis_section(void)
{
    char host[64];
    int port;
    keel_redis *r = bench_redis_open("bus", host, &port);
    if (!r)
        return;
    keel_bus *b;
    keel_bus_opts bo = {.redis = r, .prefix = "bench:bus:"};
    if (keel_bus_create(&b, &bo) != 0)
        return;
    bench_section("bus: Redis Streams publishes per second, 16 to a round trip, vs redis-benchmark XADD");
    uint64_t n = bench_iters(400000) / 16 * 16;
    if (n < 16)
        n = 16;
    double ref = bench_redis_reference(host, port, 16, n,
                                       "XADD bench:ref MAXLEN '~' 1000000 '*' s orders.eu.paid d payload");
    keel_bus_pub pubs[16];
    int failed = 0;
    uint64_t t0 = bench_ns();
    for (uint64_t i = 0; i < n; i += 16) {
        for (int k = 0; k < 16; k++)
            pubs[k] = (keel_bus_pub){.subject = "orders.eu.paid", .data = "payload", .len = 7};
        failed |= keel_bus_publish_many(b, pubs, 16) != 0;
    }
    double rate = (double)n / ((double)(bench_ns() - t0) / 1e9);
    if (ref > 0)
        bench_row("keel_bus_publish_many x16", rate / 1000, "k/s", "redis-benchmark -P 16", ref / 1000, ">= 0.7x");
    else
        printf("%-44s %10.2f k/s | redis-benchmark did not run\n", "keel_bus_publish_many x16", rate / 1000);
    if (failed)
        fprintf(stderr, "bench/bus: some publishes failed\n");
    const char *del[] = {"DEL", "bench:bus:0", "bench:ref"};
    size_t dl[] = {3, 11, 9};
    redisReply *rep;
    if (keel_redis_command(r, NULL, 0, 3, del, dl, &rep) == 0)
        freeReplyObject(rep);
    keel_bus_destroy(b);
    keel_redis_destroy(r);
}

int main(void)
{
    sync_section();
    async_section();
    redis_section();
    BENCH_KEEP(plain);
    return 0;
}
