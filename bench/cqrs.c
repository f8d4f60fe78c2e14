/* bench/cqrs.c — keel_cqrs: the cost of a dispatch through two middleware
 * links (in process, a command that appends nothing) against calling the
 * handler directly; PostgreSQL appends per second, one event per command on
 * distinct streams, against pgbench running a comparable single INSERT
 * transaction on the same server in the same run; projection catch-up
 * events per second, in memory and on PostgreSQL.
 * Goals (issue 8): dispatch overhead under 100 ns; appends at least 0.7 of
 * pgbench. */
#define _GNU_SOURCE
#include <libpq-fe.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

#include <keel/cqrs.h>
#include <keel/pg.h>

#include "bench.h"

static int noop(keel_cqrs_ctx *x, const void *payload, size_t len, void *ud)
{
    (void)x, (void)payload, (void)ud;
    return (int)(len >> 62);
}

static int pass(keel_cqrs_req *q, void *ud)
{
    (void)ud;
    return keel_cqrs_next(q);
}

static int (*volatile direct)(keel_cqrs_ctx *, const void *, size_t, void *) = noop;

static int reg(keel_cqrs_ctx *x, const void *payload, size_t len, void *ud)
{
    (void)ud;
    char stream[64];
    snprintf(stream, sizeof stream, "user-%.*s", (int)len, (const char *)payload);
    return keel_cqrs_emit(x, stream, "user.registered", payload, len, NULL, 0);
}

static int count(keel_cqrs_ctx *x, const keel_cqrs_event *e, void *ud)
{
    (void)x;
    *(uint64_t *)ud += e->len;
    return 0;
}

static void dispatch_section(void)
{
    bench_section("cqrs: dispatch through two middleware links, ns each");
    keel_cqrs *c;
    if (keel_cqrs_create(&c, NULL) != 0)
        return;
    keel_cqrs_command(c, "noop", noop, NULL);
    keel_cqrs_use(c, KEEL_CQRS_COMMAND, pass, NULL);
    keel_cqrs_use(c, KEEL_CQRS_COMMAND, pass, NULL);
    uint64_t iters = bench_iters(5000000);
    uint64_t t0 = bench_ns();
    for (uint64_t i = 0; i < iters; i++)
        direct(NULL, "x", 1, NULL);
    double base = (double)(bench_ns() - t0) / (double)iters;
    t0 = bench_ns();
    for (uint64_t i = 0; i < iters; i++)
        keel_cqrs_send(c, "noop", "x", 1, NULL, NULL);
    double ns = (double)(bench_ns() - t0) / (double)iters;
    bench_row("keel_cqrs_send, 2 links", ns, "ns", "direct handler call", base, "< 100 ns");
    keel_cqrs_destroy(c);
}

static double catch_up(keel_cqrs *c, const char *name, uint64_t *events)
{
    uint64_t sum = 0;
    keel_cqrs_projection *p;
    keel_cqrs_projection_opts po = {.name = name, .handler = count, .ud = &sum, .batch = 500};
    if (keel_cqrs_projection_create(c, &po, &p) != 0)
        return 0;
    size_t n = 0;
    uint64_t t0 = bench_ns();
    keel_cqrs_projection_run(p, &n);
    double s = (double)(bench_ns() - t0) / 1e9;
    keel_cqrs_projection_destroy(p);
    *events = n;
    return s > 0 ? (double)n / s : 0;
}

static void memory_projection_section(void)
{
    bench_section("cqrs: projection catch-up, events/s");
    keel_cqrs *c;
    if (keel_cqrs_create(&c, NULL) != 0)
        return;
    keel_cqrs_command(c, "register", reg, NULL);
    uint64_t n = bench_iters(1000000);
    char id[24];
    uint64_t t0 = bench_ns();
    for (uint64_t i = 0; i < n; i++) {
        int len = snprintf(id, sizeof id, "%llu", (unsigned long long)i);
        keel_cqrs_send(c, "register", id, (size_t)len, NULL, NULL);
    }
    double appends = (double)n / ((double)(bench_ns() - t0) / 1e9);
    uint64_t got;
    double rate = catch_up(c, "count", &got);
    bench_row("memory store, catch-up", rate / 1e6, "M/s", "memory appends", appends / 1e6, "-");
    keel_cqrs_destroy(c);
}

/* pgbench's transactions per second for a script, on one connection. */
static double pgbench(const char *conninfo, const char *script_sql, int seconds)
{
    char path[] = "/tmp/keel-bench-XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0)
        return 0;
    FILE *f = fdopen(fd, "w");
    fputs(script_sql, f);
    fclose(f);
    char cmd[2048], line[512];
    snprintf(cmd, sizeof cmd,
             "PATH=\"$PATH:$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)\" "
             "pgbench -n -M prepared -c 1 -T %d -f %s '%s' 2>/dev/null",
             seconds, path, conninfo);
    FILE *p = popen(cmd, "r");
    double tps = 0;
    while (p && fgets(line, sizeof line, p))
        if (strncmp(line, "tps = ", 6) == 0)
            tps = strtod(line + 6, NULL);
    if (p)
        pclose(p);
    remove(path);
    return tps;
}

static void pg_section(void)
{
    const char *conninfo = getenv("KEEL_TEST_PG");
    if (!conninfo || !*conninfo) {
        fprintf(stderr, "bench/cqrs: KEEL_TEST_PG is not set (run it through `make bench`)\n");
        return;
    }
    keel_pg *pg;
    keel_pg_opts po = {.primary = conninfo, .manual_health = 1};
    if (keel_pg_create(&pg, &po) != 0)
        return;
    keel_pg_check(pg);
    keel_cqrs *c;
    keel_cqrs_opts o = {.pg = pg, .prefix = "bench_cqrs_"};
    if (keel_cqrs_create(&c, &o) != 0 || keel_cqrs_create_schema(c) != 0) {
        fprintf(stderr, "bench/cqrs: no schema\n");
        return;
    }
    keel_cqrs_command(c, "register", reg, NULL);
    bench_section("cqrs: PostgreSQL appends/s, one event per command, vs pgbench INSERT");
    int seconds = getenv("SHORT") && *getenv("SHORT") != '0' ? 1 : 5;
    double ref = pgbench(conninfo,
                         "\\set r random(1, 1000000000000)\n"
                         "INSERT INTO bench_cqrs_events (stream_id, version, type, data, metadata) VALUES "
                         "('ref-' || :r, 1, 'user.registered', '\\x0102', '');\n",
                         seconds);
    char id[32];
    uint64_t n = 0, failed = 0, t0 = bench_ns(), until = t0 + (uint64_t)seconds * 1000000000u;
    while (bench_ns() < until) {
        int len = snprintf(id, sizeof id, "%llu-%llu", (unsigned long long)t0, (unsigned long long)n);
        failed += keel_cqrs_send(c, "register", id, (size_t)len, NULL, NULL) != 0;
        n++; /* every id new, failed or not */
    }
    /* appends that committed: a failure may come back fast and flatter the rate */
    double rate = (double)(n - failed) / ((double)(bench_ns() - t0) / 1e9);
    if (ref > 0)
        bench_row("keel_cqrs_send, 1 event", rate, "/s", "pgbench INSERT", ref, ">= 0.7x");
    else
        printf("%-44s %10.2f /s | pgbench did not run\n", "keel_cqrs_send, 1 event", rate);
    if (failed)
        fprintf(stderr, "bench/cqrs: %llu appends failed\n", (unsigned long long)failed);
    uint64_t got;
    char name[48];
    snprintf(name, sizeof name, "bench-%llu", (unsigned long long)t0);
    double cu = catch_up(c, name, &got);
    printf("%-44s %10.2f k/s   (%llu events, batches of 500)\n", "PostgreSQL projection catch-up", cu / 1000,
           (unsigned long long)got);
    PGresult *r;
    keel_pg_exec(pg, KEEL_PG_WRITE,
                 "DROP TABLE bench_cqrs_events, bench_cqrs_idempotency, bench_cqrs_checkpoints", NULL, &r);
    PQclear(r);
    keel_cqrs_destroy(c);
    keel_pg_destroy(pg);
}

int main(void)
{
    dispatch_section();
    memory_projection_section();
    pg_section();
    return 0;
}
