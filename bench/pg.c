/* bench/pg.c — keel_pg against raw libpq on the same server in the same
 * run: a single round trip (SELECT 1) through the pool, and a 1000-row
 * insert of a prepared statement as one pipeline batch against 1000 round
 * trips.
 * Goals (issue 4): pool overhead under 5% (ratio <= 1.05); the batch at
 * least 5x faster than the round trips.
 *
 * The server is the primary of KEEL_TEST_PG (`make bench` starts it). */
#include <libpq-fe.h>
#include <stdlib.h>
#include <string.h>

#include <keel/pg.h>

#include "bench.h"

#define ROWS 1000

/* The baseline runs on the pool's own (single) connection, taken out of
 * the pool: the same server process answers both sides, so what differs
 * is only libkeel's work. */
static double raw_select(keel_pg *pg, uint64_t n)
{
    keel_pg_conn *kc;
    if (keel_pg_acquire(pg, KEEL_PG_WRITE, &kc) != 0)
        return 0;
    PGconn *c = keel_pg_conn_raw(kc);
    uint64_t t0 = bench_ns();
    for (uint64_t i = 0; i < n; i++)
        PQclear(PQexecParams(c, "SELECT 1", 0, NULL, NULL, NULL, NULL, 0));
    double ns = (double)(bench_ns() - t0) / (double)n;
    keel_pg_release(kc);
    return ns;
}

static double keel_select(keel_pg *pg, uint64_t n, int *failed)
{
    uint64_t t0 = bench_ns();
    for (uint64_t i = 0; i < n; i++) {
        PGresult *r;
        if (keel_pg_exec(pg, KEEL_PG_WRITE, "SELECT 1", NULL, &r) != 0)
            *failed = 1;
        PQclear(r);
    }
    return (double)(bench_ns() - t0) / (double)n;
}

static void run_sql(PGconn *c, const char *sql)
{
    PQclear(PQexec(c, sql));
}

/* ROWS inserts of a prepared statement, one round trip each. */
static double raw_inserts(PGconn *c, char ids[][12])
{
    run_sql(c, "TRUNCATE kb_rows");
    uint64_t t0 = bench_ns();
    for (int i = 0; i < ROWS; i++) {
        const char *v[1] = {ids[i]};
        PQclear(PQexecPrepared(c, "kb_ins", 1, v, NULL, NULL, 0));
    }
    return (double)(bench_ns() - t0);
}

static double batch_inserts(keel_pg *pg, PGconn *c, char ids[][12], keel_pg_query *q, int *failed)
{
    run_sql(c, "TRUNCATE kb_rows");
    uint64_t t0 = bench_ns();
    if (keel_pg_batch(pg, q, ROWS) != 0)
        *failed = 1;
    double ns = (double)(bench_ns() - t0);
    for (int i = 0; i < ROWS; i++)
        PQclear(q[i].res);
    (void)ids;
    return ns;
}

static double best(double a, double b)
{
    return a < b ? a : b;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, size_t n)
{
    qsort(v, n, sizeof *v, cmp_double);
    return v[n / 2];
}

int main(void)
{
    const char *conninfo = getenv("KEEL_TEST_PG");
    if (!conninfo || !*conninfo) {
        fprintf(stderr, "bench/pg: KEEL_TEST_PG is not set (run it through `make bench`)\n");
        return 1;
    }
    PGconn *c = PQconnectdb(conninfo);
    if (PQstatus(c) != CONNECTION_OK) {
        fprintf(stderr, "bench/pg: %s", PQerrorMessage(c));
        PQfinish(c);
        return 1;
    }
    keel_pg *pg;
    keel_pg_opts o = {.primary = conninfo, .conns_per_host = 1, .manual_health = 1};
    if (keel_pg_create(&pg, &o) != 0) {
        PQfinish(c);
        return 1;
    }
    int failed = 0;

    bench_section("pg: SELECT 1, one round trip, through the pool vs raw libpq");
    uint64_t n = bench_iters(20000);
    keel_select(pg, n / 10 + 1, &failed); /* warm both: connection, caches */
    raw_select(pg, n / 10 + 1);
    /* Round trips on loopback vary by tens of percent with scheduling: many
     * short interleaved rounds, and the median of each side. */
    enum { ROUNDS = 101 };
    double raw[ROUNDS], kp[ROUNDS];
    uint64_t per = n / ROUNDS + 1;
    for (int round = 0; round < ROUNDS; round++) {
        raw[round] = raw_select(pg, per);
        kp[round] = keel_select(pg, per, &failed);
    }
    bench_row("keel_pg_exec SELECT 1 (median)", median(kp, ROUNDS) / 1000, "us",
              "PQexecParams, same conn", median(raw, ROUNDS) / 1000, "<= 1.05x");

    bench_section("pg: 1000-row insert, one pipeline batch vs 1000 round trips");
    run_sql(c, "CREATE UNLOGGED TABLE IF NOT EXISTS kb_rows (id int, v text)");
    PQclear(PQprepare(c, "kb_ins", "INSERT INTO kb_rows VALUES ($1, 'row')", 0, NULL));
    keel_pg_stmt *ins;
    if (keel_pg_stmt_create(pg, "INSERT INTO kb_rows VALUES ($1, 'row')", 0, NULL, &ins) != 0)
        return 1;
    static char ids[ROWS][12];
    static const char *vals[ROWS][1];
    static keel_pg_query q[ROWS];
    for (int i = 0; i < ROWS; i++) {
        snprintf(ids[i], sizeof ids[i], "%d", i);
        vals[i][0] = ids[i];
        q[i] = (keel_pg_query){.stmt = ins, .params = {.n = 1, .values = vals[i]}};
    }
    int rounds = getenv("SHORT") && *getenv("SHORT") && *getenv("SHORT") != '0' ? 1 : 5;
    double seq = 1e18, bat = 1e18;
    for (int round = 0; round < rounds; round++) {
        seq = best(seq, raw_inserts(c, ids));
        bat = best(bat, batch_inserts(pg, c, ids, q, &failed));
    }
    bench_row("keel_pg_batch, 1000 rows", bat / 1e6, "ms", "1000 round trips", seq / 1e6,
              "<= 0.2x (5x faster)");
    run_sql(c, "DROP TABLE kb_rows");
    keel_pg_stmt_free(ins);
    keel_pg_destroy(pg);
    PQfinish(c);
    if (failed)
        fprintf(stderr, "bench/pg: some calls failed\n");
    return failed;
}
