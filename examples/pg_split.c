/* examples/pg_split.c — reads on the replica, writes on the primary: the
 * SQL is classified, a batch goes in one pipeline, and a read after a
 * write sees it (read-your-writes by WAL position).
 *
 * Servers come from KEEL_TEST_PG and KEEL_TEST_PG_REPLICA (conninfos, set
 * by `make demo`). */
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>

#include <keel/pg.h>

static const char *const role_names[] = {"unknown", "primary", "replica", "fenced", "down"};

/* Runs one statement through the pool and says where it ran. */
static int show(keel_pg *pg, keel_pg_mode mode, const char *sql)
{
    PGresult *r;
    int rc = keel_pg_exec(pg, mode, sql, NULL, &r);
    if (rc != 0) {
        fprintf(stderr, "%s: %s %s", sql, keel_strerror(rc), r ? PQresultErrorMessage(r) : "\n");
        PQclear(r);
        return rc;
    }
    const char *m = mode == KEEL_PG_AUTO ? "auto" : mode == KEEL_PG_READ ? "read" : "write";
    printf("  %-5s %-62.62s -> %s\n", m, sql,
           PQntuples(r) && PQgetvalue(r, 0, 0)[0] == 't' ? "replica" : "primary");
    PQclear(r);
    return 0;
}

/* Waits (2 s at most) until a replica has replayed every write so far. */
static void wait_for_replica(keel_pg *pg)
{
    uint64_t lsn;
    keel_pg_conn *c;
    if (keel_pg_write_lsn(pg, &lsn) == 0 && keel_pg_acquire_after(pg, lsn, 2000000000, &c) == 0)
        keel_pg_release(c);
}

int main(void)
{
    const char *primary = getenv("KEEL_TEST_PG"), *replica = getenv("KEEL_TEST_PG_REPLICA");
    if (!primary || !replica) {
        fprintf(stderr, "set KEEL_TEST_PG and KEEL_TEST_PG_REPLICA to conninfos of a primary and "
                        "its streaming replica (make demo does)\n");
        return 1;
    }
    keel_pg *pg;
    keel_pg_opts o = {.primary = primary, .replicas = &replica, .nreplicas = 1,
                      .health_interval_ns = 200000000, .max_replica_lag_ns = 2000000000};
    int rc = keel_pg_create(&pg, &o);
    if (rc == 0)
        rc = keel_pg_check(pg); /* the health thread runs too; check once now */
    if (rc != 0) {
        fprintf(stderr, "keel_pg: %s\n", keel_strerror(rc));
        keel_pg_destroy(pg);
        return 1;
    }
    for (size_t i = 0; i < keel_pg_hosts(pg); i++) {
        keel_pg_host_stats st;
        keel_pg_host_stats_get(pg, i, &st);
        printf("host %zu: %s, %s\n", i, st.name, role_names[st.role]);
    }

    printf("where statements run (each reports pg_is_in_recovery()):\n");
    rc |= show(pg, KEEL_PG_WRITE, "CREATE TABLE IF NOT EXISTS demo_orders (id int PRIMARY KEY, "
                                  "item text, at timestamptz DEFAULT now())");
    rc |= show(pg, KEEL_PG_WRITE, "TRUNCATE demo_orders");
    wait_for_replica(pg); /* replication is asynchronous: let it see the table */
    rc |= show(pg, KEEL_PG_AUTO, "SELECT pg_is_in_recovery()");
    rc |= show(pg, KEEL_PG_AUTO, "/* report */ WITH n AS (SELECT count(*) FROM demo_orders) "
                                 "SELECT pg_is_in_recovery() FROM n");
    rc |= show(pg, KEEL_PG_AUTO, "INSERT INTO demo_orders VALUES (0, 'first') "
                                 "RETURNING pg_is_in_recovery()");
    rc |= show(pg, KEEL_PG_AUTO, "SELECT pg_is_in_recovery() FROM demo_orders FOR UPDATE");
    rc |= show(pg, KEEL_PG_READ, "SELECT pg_is_in_recovery()");

    /* A batch: 100 rows in one pipeline, one transaction. */
    keel_pg_stmt *ins;
    if (keel_pg_stmt_create(pg, "INSERT INTO demo_orders (id, item) VALUES ($1, $2)", 0, NULL, &ins)) {
        keel_pg_destroy(pg);
        return 1;
    }
    static char ids[100][8];
    static const char *vals[100][2];
    keel_pg_query q[100];
    for (int i = 0; i < 100; i++) {
        snprintf(ids[i], sizeof ids[i], "%d", i + 1);
        vals[i][0] = ids[i];
        vals[i][1] = i % 2 ? "book" : "lamp";
        q[i] = (keel_pg_query){.stmt = ins, .params = {.n = 2, .values = vals[i]}};
    }
    int brc = keel_pg_batch(pg, q, 100);
    for (int i = 0; i < 100; i++)
        PQclear(q[i].res);
    printf("batch of 100 inserts in one pipeline: %s\n", keel_strerror(brc));

    /* Read-your-writes: the replica serves only once it has replayed our
     * write; else the primary does. */
    uint64_t lsn = 0;
    keel_pg_write_lsn(pg, &lsn);
    keel_pg_conn *c;
    if (keel_pg_acquire_after(pg, lsn, 2000000000, &c) == 0) {
        PGresult *r;
        keel_pg_conn_exec(c, "SELECT count(*) FROM demo_orders", NULL, &r);
        printf("read after write (WAL %X/%X) on host %zu: %s rows\n", (unsigned)(lsn >> 32),
               (unsigned)lsn, keel_pg_conn_host(c), r ? PQgetvalue(r, 0, 0) : "?");
        PQclear(r);
        keel_pg_release(c);
    }

    /* Parameters are data, never SQL. */
    const char *evil[2] = {"1000", "'); DROP TABLE demo_orders; --"};
    PGresult *r;
    keel_pg_exec_stmt(pg, KEEL_PG_AUTO, ins, &(keel_pg_params){.n = 2, .values = evil}, &r);
    PQclear(r);
    wait_for_replica(pg);
    keel_pg_exec(pg, KEEL_PG_READ, "SELECT item FROM demo_orders WHERE id = 1000", NULL, &r);
    printf("stored as data: %s\n", r && PQntuples(r) ? PQgetvalue(r, 0, 0) : "(not replicated in time)");
    PQclear(r);

    keel_pg_stmt_free(ins);
    keel_pg_destroy(pg);
    return rc || brc ? 1 : 0;
}
