/* tests/test_pg.c — keel_pg against a real PostgreSQL primary and
 * streaming replica from tests/servers.sh: routing proven with
 * pg_is_in_recovery(), SQL classification, replica lag, a stopped replica,
 * failover to a promoted replica (by keel_pg_check() and by the health
 * thread alone), read-your-writes, pipeline batches, prepared statements,
 * parameters that stay data, acquire and connect timeouts, bad
 * conninfos. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <limits.h>
#include <libpq-fe.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <keel/metrics.h>
#include <keel/pg.h>

#include "harness.h"

#define MS KT_MS

static kt_clock clk;

static keel_pg *open_pg(const char *primary, const char *replica, uint64_t query_timeout)
{
    keel_pg *pg = NULL;
    const char *replicas[1] = {replica};
    keel_pg_opts o = {.primary = primary, .replicas = replicas, .nreplicas = replica ? 1 : 0,
                      .connect_timeout_ns = 2 * KT_S, .acquire_timeout_ns = 2 * KT_S,
                      .query_timeout_ns = query_timeout, .max_replica_lag_ns = 1 * KT_S,
                      .health_interval_ns = 1 * KT_S, .manual_health = 1,
                      .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_pg_create(&pg, &o), 0);
    ck_assert_int_eq(keel_pg_check(pg), 0);
    return pg;
}

static keel_pg *open_shared(void)
{
    return open_pg(kt_env("KEEL_TEST_PG"), kt_env("KEEL_TEST_PG_REPLICA"), 10 * KT_S);
}

/* The text of the first value of a statement run through keel_pg. */
static void value(keel_pg *pg, keel_pg_mode mode, const char *sql, char *out, size_t len)
{
    PGresult *r;
    int rc = keel_pg_exec(pg, mode, sql, NULL, &r);
    ck_assert_msg(rc == 0, "%s: %s", sql, keel_strerror(rc));
    ck_assert_int_ge(PQntuples(r), 1);
    snprintf(out, len, "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
}

/* Whether a leased connection is on a server in recovery. */
static int in_recovery(keel_pg_conn *c)
{
    PGresult *r;
    ck_assert_int_eq(keel_pg_conn_exec(c, "SELECT pg_is_in_recovery()", NULL, &r), 0);
    int v = PQgetvalue(r, 0, 0)[0] == 't';
    PQclear(r);
    return v;
}

static void write_sql(keel_pg *pg, const char *sql)
{
    PGresult *r;
    int rc = keel_pg_exec(pg, KEEL_PG_WRITE, sql, NULL, &r);
    ck_assert_msg(rc == 0, "%s: %s (%s)", sql, keel_strerror(rc),
                  r ? PQresultErrorMessage(r) : "");
    PQclear(r);
}

static char logged[512];
static void capture_log(keel_log_level level, const char *module, const char *msg, void *ud)
{
    (void)level, (void)module, (void)ud;
    snprintf(logged, sizeof logged, "%s", msg);
}

/* ---- classification, no server ---- */

START_TEST(sql_is_classified_better_than_by_its_first_word)
{
    static const struct {
        const char *sql;
        keel_pg_mode mode;
    } cases[] = {
        {"SELECT 1", KEEL_PG_READ},
        {"  select * from t", KEEL_PG_READ},
        {"-- a comment\n/* and /* a nested */ one */ SELECT 1", KEEL_PG_READ},
        {"(SELECT 1) UNION (SELECT 2)", KEEL_PG_READ},
        {"VALUES (1), (2)", KEEL_PG_READ},
        {"TABLE t", KEEL_PG_READ},
        {"SHOW work_mem", KEEL_PG_READ},
        {"WITH x AS (SELECT 1) SELECT * FROM x", KEEL_PG_READ},
        {"SELECT 'insert into t values (1)', \"update\" FROM t", KEEL_PG_READ},
        {"SELECT $$ delete $$, $tag$ update $x$ $tag$, E'\\' delete'", KEEL_PG_READ},
        {"SELECT * FROM t WHERE a = $1 -- for update", KEEL_PG_READ},
        {"SELECT substring(s for 2) FROM t", KEEL_PG_READ},
        {"EXPLAIN SELECT 1", KEEL_PG_READ},
        {"EXPLAIN (ANALYZE, BUFFERS) SELECT 1", KEEL_PG_READ},
        {"COPY t TO STDOUT", KEEL_PG_READ},
        {"COPY (SELECT a FROM b) TO STDOUT", KEEL_PG_READ},
        {"SELECT 1; SELECT 2", KEEL_PG_READ},
        {"INSERT INTO t VALUES (1)", KEEL_PG_WRITE},
        {"  /* x */ update t set a = 1", KEEL_PG_WRITE},
        {"DELETE FROM t", KEEL_PG_WRITE},
        {"MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE", KEEL_PG_WRITE},
        {"WITH x AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM x", KEEL_PG_WRITE},
        {"WITH d AS (DELETE FROM t RETURNING *) SELECT count(*) FROM d", KEEL_PG_WRITE},
        {"SELECT * FROM t FOR UPDATE", KEEL_PG_WRITE},
        {"SELECT * FROM t FOR NO KEY UPDATE", KEEL_PG_WRITE},
        {"SELECT * FROM t for share", KEEL_PG_WRITE},
        {"SELECT * FROM t FOR KEY SHARE", KEEL_PG_WRITE},
        {"SELECT nextval('s')", KEEL_PG_WRITE},
        {"select pg_catalog.setval('s', 1)", KEEL_PG_WRITE},
        {"SELECT txid_current()", KEEL_PG_WRITE},
        {"SELECT pg_notify('c', 'x')", KEEL_PG_WRITE},
        {"SELECT lo_create(0)", KEEL_PG_WRITE},
        {"SELECT * INTO new_t FROM t", KEEL_PG_WRITE},
        {"EXPLAIN ANALYZE INSERT INTO t VALUES (1)", KEEL_PG_WRITE},
        {"COPY t FROM STDIN", KEEL_PG_WRITE},
        {"COPY (INSERT INTO t VALUES (1) RETURNING *) TO STDOUT", KEEL_PG_WRITE},
        {"CREATE TABLE t (a int)", KEEL_PG_WRITE},
        {"ALTER TABLE t ADD b int", KEEL_PG_WRITE},
        {"DROP TABLE t", KEEL_PG_WRITE},
        {"TRUNCATE t", KEEL_PG_WRITE},
        {"CALL p()", KEEL_PG_WRITE},
        {"DO $$ BEGIN PERFORM 1; END $$", KEEL_PG_WRITE},
        {"BEGIN", KEEL_PG_WRITE},
        {"SET work_mem = '1MB'", KEEL_PG_WRITE},
        {"VACUUM t", KEEL_PG_WRITE},
        {"LOCK TABLE t", KEEL_PG_WRITE},
        {"SELECT 1; DELETE FROM t", KEEL_PG_WRITE},
        {"frobnicate the database", KEEL_PG_WRITE},
        {"", KEEL_PG_WRITE},
        {"-- only a comment", KEEL_PG_WRITE},
        {"SELECT 'unterminated", KEEL_PG_READ},
        {"SELECT 1 /* unterminated", KEEL_PG_READ},
        /* found by review: each of these fails on a standby */
        {"SELECT E'x'\n'\\'', nextval('s')", KEEL_PG_WRITE},
        {"SELECT E'x'\n'\\'' FROM t FOR UPDATE", KEEL_PG_WRITE},
        {"SELECT 'a' 'b', 1", KEEL_PG_READ},
        {"COPY (SELECT nextval('s')) TO STDOUT", KEEL_PG_WRITE},
        {"COPY (SELECT * FROM t FOR SHARE) TO STDOUT", KEEL_PG_WRITE},
        {"SELECT \"nextval\"('s')", KEEL_PG_WRITE},
        {"SELECT pg_catalog.\"nextval\"('s')", KEEL_PG_WRITE},
        {"SELECT U&\"nextval\"('s')", KEEL_PG_WRITE},
        {"SELECT pg_walfile_name('0/0')", KEEL_PG_WRITE},
        {"SELECT pg_logical_emit_message(true, 'p', 'x')", KEEL_PG_WRITE},
        {"SELECT pg_replication_origin_create('o')", KEEL_PG_WRITE},
        {"SELECT pg_advisory_lock(1)", KEEL_PG_WRITE},
        {"SELECT pg_try_advisory_xact_lock(1)", KEEL_PG_WRITE},
        {"SELECT * FROM pg_logical_slot_get_changes('s', NULL, NULL)", KEEL_PG_WRITE},
        {"SELECT * FROM pg_logical_slot_peek_binary_changes('s', NULL, NULL)", KEEL_PG_WRITE},
        {"SELECT pg_replication_slot_advance('s', '0/1')", KEEL_PG_WRITE},
        {"SELECT pg_promote(false)", KEEL_PG_WRITE}, /* on a replica it would promote it */
        {"SELECT pg_copy_logical_replication_slot('s', 't')", KEEL_PG_WRITE},
        {"SELECT pg_copy_physical_replication_slot('s', 't')", KEEL_PG_WRITE},
        {"SELECT pg_log_standby_snapshot()", KEEL_PG_WRITE}, /* writes WAL (PostgreSQL 16) */
        {"SELECT slot_name FROM pg_replication_slots", KEEL_PG_READ},
        {"SELECT \"nextval_of\"(1), txid_current_snapshot()", KEEL_PG_READ},
        /* PostgreSQL ends a -- comment at a carriage return too */
        {"SELECT 1 --\r, nextval('s')", KEEL_PG_WRITE},
        {"WITH x AS (SELECT 1) --\rDELETE FROM t", KEEL_PG_WRITE},
        {"SELECT 1 -- for update\r\n", KEEL_PG_READ},
        /* and joins a string continued after -- comments, in its mode */
        {"SELECT E'x' -- c\n'\\' ', txid_current() --'", KEEL_PG_WRITE},
        {"SELECT E'x'\n-- c\n-- d\n'\\' ' FROM t FOR UPDATE --'", KEEL_PG_WRITE},
        {"SELECT E'x' -- c\n'\\'' --'\n, 1", KEEL_PG_READ},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        ck_assert_msg(keel_pg_classify(cases[i].sql) == cases[i].mode, "%s: expected %s",
                      cases[i].sql, cases[i].mode == KEEL_PG_READ ? "read" : "write");
    ck_assert_int_eq(keel_pg_classify(NULL), KEEL_PG_WRITE);
}
END_TEST

START_TEST(malformed_conninfos_are_refused)
{
    const char *bad[] = {"host='unterminated", "nonsense_keyword=1", "postgresql://[::1",
                         "= x", "host", "postgresql://h:5432/db?sslmode", NULL};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        keel_pg *pg = (keel_pg *)0x1;
        keel_pg_opts o = {.primary = bad[i], .manual_health = 1};
        ck_assert_msg(keel_pg_create(&pg, &o) == KEEL_EINVAL, "accepted %s", bad[i] ? bad[i] : "NULL");
        ck_assert_ptr_null(pg);
    }
    const char *same[1] = {"host=h port=1 dbname=x"};
    keel_pg *pg;
    keel_pg_opts dup = {.primary = "host=h port=1", .replicas = same, .nreplicas = 1,
                        .manual_health = 1};
    ck_assert_int_eq(keel_pg_create(&pg, &dup), KEEL_EINVAL);
    keel_pg_opts none = {.primary = "host=h", .nreplicas = 1, .manual_health = 1};
    ck_assert_int_eq(keel_pg_create(&pg, &none), KEEL_EINVAL);
    keel_pg_opts uri = {.primary = "postgresql://u@h1:5433/db", .replicas = same, .nreplicas = 1,
                        .manual_health = 1};
    ck_assert_int_eq(keel_pg_create(&pg, &uri), 0);
    keel_pg_host_stats st;
    ck_assert_int_eq(keel_pg_host_stats_get(pg, 0, &st), 0);
    ck_assert_str_eq(st.name, "h1:5433");
    ck_assert_int_eq(st.role, KEEL_PG_ROLE_UNKNOWN);
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_AUTO, &(keel_pg_conn *){NULL}), KEEL_EINVAL);
    keel_pg_destroy(pg);
    ck_assert_int_eq(keel_pg_exec(NULL, KEEL_PG_READ, "SELECT 1", NULL, &(PGresult *){NULL}),
                     KEEL_EINVAL);
    /* Bad parameters are KEEL_EINVAL before a connection is asked for: not
     * KEEL_EUNAVAIL from a host that is down, nor a wait for one. */
    keel_pg_opts down = {.primary = "host=127.0.0.1 port=1 dbname=x", .manual_health = 1,
                         .connect_timeout_ns = 200 * KT_MS, .acquire_timeout_ns = 200 * KT_MS};
    ck_assert_int_eq(keel_pg_create(&pg, &down), 0);
    keel_pg_params neg = {.n = -1};
    PGresult *res = (PGresult *)0x1;
    ck_assert_int_eq(keel_pg_exec(pg, KEEL_PG_WRITE, "SELECT 1", &neg, &res), KEEL_EINVAL);
    ck_assert_ptr_null(res);
    keel_pg_stmt *stmt;
    ck_assert_int_eq(keel_pg_stmt_create(pg, "SELECT 1", 0, NULL, &stmt), 0);
    ck_assert_int_eq(keel_pg_exec_stmt(pg, KEEL_PG_READ, stmt, &neg, &res), KEEL_EINVAL);
    keel_pg_query q[2] = {{.sql = "SELECT 1"}, {.sql = NULL, .stmt = NULL}};
    ck_assert_int_eq(keel_pg_batch(pg, q, 2), KEEL_EINVAL);
    q[1] = (keel_pg_query){.sql = "SELECT 1", .params = {.n = 2}};
    ck_assert_int_eq(keel_pg_batch(pg, q, 2), KEEL_EINVAL);
    keel_pg_stmt_free(stmt);
    keel_pg_destroy(pg);
}
END_TEST

/* ---- the shared servers ---- */

START_TEST(reads_reach_the_replica_and_writes_the_primary)
{
    keel_pg *pg = open_shared();
    keel_pg_host_stats st;
    keel_pg_host_stats_get(pg, 0, &st);
    ck_assert_int_eq(st.role, KEEL_PG_ROLE_PRIMARY);
    keel_pg_host_stats_get(pg, 1, &st);
    ck_assert_int_eq(st.role, KEEL_PG_ROLE_REPLICA);
    ck_assert_int_eq(st.readable, 1);

    keel_pg_conn *c;
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_READ, &c), 0);
    ck_assert_int_eq(in_recovery(c), 1);
    ck_assert_uint_eq(keel_pg_conn_host(c), 1);
    keel_pg_release(c);
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c), 0);
    ck_assert_int_eq(in_recovery(c), 0);
    ck_assert_uint_eq(keel_pg_conn_host(c), 0);
    keel_pg_release(c);

    /* AUTO: the helpers classify */
    write_sql(pg, "CREATE TABLE IF NOT EXISTS kt_rw (id serial PRIMARY KEY, v text)");
    write_sql(pg, "CREATE SEQUENCE IF NOT EXISTS kt_seq");
    char v[64];
    value(pg, KEEL_PG_AUTO, "/* read */ SELECT pg_is_in_recovery()", v, sizeof v);
    ck_assert_str_eq(v, "t");
    value(pg, KEEL_PG_AUTO, "WITH x AS (SELECT pg_is_in_recovery() r) SELECT r FROM x", v, sizeof v);
    ck_assert_str_eq(v, "t");
    value(pg, KEEL_PG_AUTO, "INSERT INTO kt_rw (v) VALUES ('a') RETURNING pg_is_in_recovery()", v,
          sizeof v);
    ck_assert_str_eq(v, "f");
    value(pg, KEEL_PG_AUTO, "SELECT nextval('kt_seq') > 0, pg_is_in_recovery()", v, sizeof v);
    ck_assert_str_eq(v, "t"); /* it ran, so on the primary: a replica refuses nextval */
    value(pg, KEEL_PG_AUTO, "SELECT pg_is_in_recovery() FROM kt_rw LIMIT 1 FOR UPDATE", v, sizeof v);
    ck_assert_str_eq(v, "f");
    keel_pg_destroy(pg);
}
END_TEST

START_TEST(parameters_stay_data)
{
    keel_pg *pg = open_shared();
    write_sql(pg, "CREATE TABLE IF NOT EXISTS kt_inj (id int, v text, b bytea)");
    const char *evil = "x'); DROP TABLE kt_inj; --";
    const char bin[] = "\0\1\2'\0;DROP";
    const char *vals[3] = {"1", evil, bin};
    int lens[3] = {0, 0, sizeof bin - 1};
    int fmts[3] = {0, 0, 1};
    keel_pg_params p = {.n = 3, .values = vals, .lengths = lens, .formats = fmts};
    PGresult *r;
    ck_assert_int_eq(keel_pg_exec(pg, KEEL_PG_AUTO, "INSERT INTO kt_inj VALUES ($1, $2, $3)", &p, &r),
                     0);
    PQclear(r);
    /* stacked statements are refused, parameters or not */
    ck_assert_int_eq(keel_pg_exec(pg, KEEL_PG_WRITE, "SELECT 1; DROP TABLE kt_inj", NULL, &r),
                     KEEL_EBACKEND);
    ck_assert_str_eq(PQresultErrorField(r, PG_DIAG_SQLSTATE), "42601");
    PQclear(r);
    keel_pg_params q = {.n = 1, .values = vals, .result_format = 1};
    ck_assert_int_eq(keel_pg_exec(pg, KEEL_PG_WRITE, "SELECT v, b FROM kt_inj WHERE id = $1", &q, &r),
                     0);
    ck_assert_int_eq(PQntuples(r), 1);
    ck_assert_str_eq(PQgetvalue(r, 0, 0), evil);
    ck_assert_int_eq(PQgetlength(r, 0, 1), (int)sizeof bin - 1);
    ck_assert(memcmp(PQgetvalue(r, 0, 1), bin, sizeof bin - 1) == 0);
    PQclear(r);
    /* the server's notices reach the log hook, not stderr */
    logged[0] = '\0';
    keel_set_log(capture_log, KEEL_LOG_INFO, NULL);
    ck_assert_int_eq(keel_pg_exec(pg, KEEL_PG_WRITE, "DROP TABLE IF EXISTS kt_never_there", NULL, &r), 0);
    keel_set_log(NULL, KEEL_LOG_ERROR, NULL);
    PQclear(r);
    ck_assert_msg(strstr(logged, "kt_never_there"), "logged: %s", logged);
    /* a SQL error: KEEL_EBACKEND with the SQLSTATE and message */
    ck_assert_int_eq(keel_pg_exec(pg, KEEL_PG_WRITE, "SELECT * FROM kt_no_such_table", NULL, &r),
                     KEEL_EBACKEND);
    ck_assert_str_eq(PQresultErrorField(r, PG_DIAG_SQLSTATE), "42P01");
    ck_assert_ptr_nonnull(strstr(PQresultErrorMessage(r), "kt_no_such_table"));
    PQclear(r);
    keel_pg_destroy(pg);
}
END_TEST

/* A binary value of negative length is bad input: libpq would copy
 * SIZE_MAX bytes of it. A NULL value has no length to look at. */
START_TEST(a_binary_parameter_of_negative_length_is_refused)
{
    keel_pg *pg = open_shared();
    const char *vals[2] = {"x", NULL};
    int lens[2] = {-1, -1};
    int fmts[2] = {1, 1};
    keel_pg_params p = {.n = 2, .values = vals, .lengths = lens, .formats = fmts};
    PGresult *r;
    ck_assert_int_eq(keel_pg_exec(pg, KEEL_PG_WRITE, "SELECT $1::bytea, $2::bytea", &p, &r),
                     KEEL_EINVAL);
    ck_assert_ptr_null(r);
    keel_pg_query q = {.sql = "SELECT $1::bytea, $2::bytea", .params = p};
    ck_assert_int_eq(keel_pg_batch(pg, &q, 1), KEEL_EINVAL);
    vals[0] = NULL;
    const char *sql = "SELECT $1::bytea IS NULL AND $2::bytea IS NULL";
    ck_assert_int_eq(keel_pg_exec(pg, KEEL_PG_WRITE, sql, &p, &r), 0);
    ck_assert_str_eq(PQgetvalue(r, 0, 0), "t");
    PQclear(r);
    keel_pg_destroy(pg);
}
END_TEST

/* The server answers a wrong number of parameters with an ERROR of class
 * 08 (protocol_violation): the statement is refused, the session lives. */
START_TEST(a_wrong_parameter_count_is_refused_and_the_connection_kept)
{
    keel_pg *pg = open_shared();
    const char *vals[2] = {"1", "2"};
    keel_pg_params p = {.n = 2, .values = vals};
    keel_pg_conn *c;
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c), 0);
    PGresult *r;
    ck_assert_int_eq(keel_pg_conn_exec(c, "SELECT $1::int", &p, &r), KEEL_EBACKEND);
    ck_assert_str_eq(PQresultErrorField(r, PG_DIAG_SQLSTATE), "08P01");
    PQclear(r);
    ck_assert_int_eq(keel_pg_conn_exec(c, "SELECT 1", NULL, &r), 0);
    PQclear(r);
    keel_pg_release(c);
    keel_pg_host_stats before, after;
    keel_pg_host_stats_get(pg, 0, &before);
    ck_assert_int_eq(keel_pg_exec(pg, KEEL_PG_WRITE, "SELECT $1::int", &p, &r), KEEL_EBACKEND);
    PQclear(r);
    char v[8];
    value(pg, KEEL_PG_WRITE, "SELECT 1", v, sizeof v);
    keel_pg_host_stats_get(pg, 0, &after);
    ck_assert_uint_eq(after.connects, before.connects); /* the pooled one, still good */
    keel_pg_destroy(pg);
}
END_TEST

START_TEST(a_lagging_replica_sends_reads_to_the_primary)
{
    keel_pg *pg = open_shared();
    PGconn *rep = kt_pg_connect(kt_env("KEEL_TEST_PG_REPLICA"));
    kt_pg_exec(rep, "SELECT pg_wal_replay_pause()");
    write_sql(pg, "CREATE TABLE IF NOT EXISTS kt_lag (v int)");
    /* a durable commit (the test servers run with synchronous_commit off):
     * else the primary's flushed position may not have moved yet */
    PGconn *prim = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    kt_pg_exec(prim, "SET synchronous_commit = on; INSERT INTO kt_lag VALUES (1)");
    PQfinish(prim);
    ck_assert_int_eq(keel_pg_check(pg), 0); /* the primary's position is noted now... */
    kt_clock_advance(&clk, 3 * KT_S);       /* ...and the replica still has not replayed it */
    ck_assert_int_eq(keel_pg_check(pg), 0);
    keel_pg_host_stats st;
    keel_pg_host_stats_get(pg, 1, &st);
    ck_assert_int_eq(st.role, KEEL_PG_ROLE_REPLICA);
    ck_assert_uint_ge(st.lag_ns, 3 * KT_S);
    ck_assert_int_eq(st.readable, 0);
    char v[8];
    value(pg, KEEL_PG_READ, "SELECT pg_is_in_recovery()", v, sizeof v);
    ck_assert_str_eq(v, "f");
    /* more positions than the history holds: the lag keeps growing */
    for (int i = 0; i < 80; i++) {
        write_sql(pg, "INSERT INTO kt_lag VALUES (2)");
        kt_clock_advance(&clk, 100 * MS);
        ck_assert_int_eq(keel_pg_check(pg), 0);
    }
    keel_pg_host_stats_get(pg, 1, &st);
    ck_assert_uint_ge(st.lag_ns, 11 * KT_S);

    kt_pg_exec(rep, "SELECT pg_wal_replay_resume()");
    uint64_t lsn;
    ck_assert_int_eq(keel_pg_write_lsn(pg, &lsn), 0);
    keel_pg_conn *c;
    ck_assert_int_eq(keel_pg_acquire_after(pg, lsn, 20 * KT_S, &c), 0);
    ck_assert_uint_eq(keel_pg_conn_host(c), 1); /* it caught up */
    keel_pg_release(c);
    ck_assert_int_eq(keel_pg_check(pg), 0);
    keel_pg_host_stats_get(pg, 1, &st);
    ck_assert_uint_eq(st.lag_ns, 0);
    ck_assert_int_eq(st.readable, 1);
    value(pg, KEEL_PG_READ, "SELECT pg_is_in_recovery()", v, sizeof v);
    ck_assert_str_eq(v, "t");

    /* a WAL switch on an idle primary leaves its insert position after a
     * page header no replica reaches: that is not lag */
    prim = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    kt_pg_exec(prim, "SELECT pg_switch_wal()");
    PQfinish(prim);
    ck_assert_int_eq(keel_pg_write_lsn(pg, &lsn), 0);
    ck_assert_int_eq(keel_pg_acquire_after(pg, lsn, 20 * KT_S, &c), 0);
    ck_assert_uint_eq(keel_pg_conn_host(c), 1);
    keel_pg_release(c);
    ck_assert_int_eq(keel_pg_check(pg), 0);
    kt_clock_advance(&clk, 3 * KT_S);
    ck_assert_int_eq(keel_pg_check(pg), 0);
    keel_pg_host_stats_get(pg, 1, &st);
    ck_assert_uint_eq(st.lag_ns, 0);
    ck_assert_int_eq(st.readable, 1);
    PQfinish(rep);
    keel_pg_destroy(pg);
}
END_TEST

/* The remembered positions are thinned as they age, but not near the
 * present: after minutes of checks a replica that stopped replaying a few
 * checks ago is still seen that far behind, not one check behind. */
START_TEST(a_replica_lag_is_measured_after_many_checks)
{
    keel_pg *pg = open_shared();
    write_sql(pg, "CREATE TABLE IF NOT EXISTS kt_lag2 (v int)");
    PGconn *prim = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    kt_pg_exec(prim, "SET synchronous_commit = on"); /* each check sees the position move */
    for (int i = 0; i < 300; i++) {
        kt_pg_exec(prim, "INSERT INTO kt_lag2 VALUES (1)");
        kt_clock_advance(&clk, 1 * KT_S);
        ck_assert_int_eq(keel_pg_check(pg), 0);
    }
    uint64_t lsn;
    ck_assert_int_eq(keel_pg_write_lsn(pg, &lsn), 0);
    keel_pg_conn *c;
    ck_assert_int_eq(keel_pg_acquire_after(pg, lsn, 20 * KT_S, &c), 0);
    ck_assert_uint_eq(keel_pg_conn_host(c), 1); /* caught up */
    keel_pg_release(c);
    PGconn *rep = kt_pg_connect(kt_env("KEEL_TEST_PG_REPLICA"));
    kt_pg_exec(rep, "SELECT pg_wal_replay_pause()");
    for (int i = 0; i < 6; i++) {
        kt_pg_exec(prim, "INSERT INTO kt_lag2 VALUES (2)");
        kt_clock_advance(&clk, 1 * KT_S);
        ck_assert_int_eq(keel_pg_check(pg), 0);
    }
    keel_pg_host_stats st;
    keel_pg_host_stats_get(pg, 1, &st);
    kt_pg_exec(rep, "SELECT pg_wal_replay_resume()");
    /* behind the first of the 6 checks since it stopped: 5 s, over 1 s */
    ck_assert_msg(st.lag_ns >= 4 * KT_S, "lag %llu ns", (unsigned long long)st.lag_ns);
    ck_assert_int_eq(st.readable, 0);
    PQfinish(rep);
    PQfinish(prim);
    keel_pg_destroy(pg);
}
END_TEST

static void *write_for_a_while(void *arg)
{
    atomic_bool *stop = arg;
    PGconn *d = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    kt_pg_exec(d, "SET synchronous_commit = on");
    while (!atomic_load(stop))
        kt_pg_exec(d, "INSERT INTO kt_busy_w SELECT generate_series(1, 50)");
    PQfinish(d);
    return NULL;
}

/* A replica past the write host's position is taken for one with a
 * history of its own; under writes a healthy one gets there too, when the
 * primary, asked first, moved on while the replica was asked: that is no
 * divergence. (The clock stands still: no lag either.) */
START_TEST(a_replica_keeping_up_under_writes_stays_readable)
{
    keel_pg *pg = open_shared();
    write_sql(pg, "CREATE TABLE IF NOT EXISTS kt_busy_w (v int)");
    atomic_bool stop = false;
    pthread_t t;
    pthread_create(&t, NULL, write_for_a_while, &stop);
    int unreadable = 0;
    for (int i = 0; i < 300; i++) {
        ck_assert_int_eq(keel_pg_check(pg), 0);
        keel_pg_host_stats st;
        keel_pg_host_stats_get(pg, 1, &st);
        unreadable += !st.readable;
    }
    atomic_store(&stop, true);
    pthread_join(t, NULL);
    ck_assert_int_eq(unreadable, 0);
    keel_pg_destroy(pg);
}
END_TEST

typedef struct after_job {
    keel_pg *pg;
    uint64_t lsn, wait;
    size_t host;
    char seen[16];
} after_job;

static void *read_after(void *arg)
{
    after_job *j = arg;
    keel_pg_conn *c;
    ck_assert_int_eq(keel_pg_acquire_after(j->pg, j->lsn, j->wait, &c), 0);
    j->host = keel_pg_conn_host(c);
    PGresult *r;
    ck_assert_int_eq(keel_pg_conn_exec(c, "SELECT v FROM kt_ryw WHERE id = 7", NULL, &r), 0);
    snprintf(j->seen, sizeof j->seen, "%s", PQntuples(r) ? PQgetvalue(r, 0, 0) : "(none)");
    PQclear(r);
    keel_pg_release(c);
    return NULL;
}

START_TEST(read_your_writes_waits_for_the_replica_or_uses_the_primary)
{
    keel_pg *pg = open_shared();
    write_sql(pg, "CREATE TABLE IF NOT EXISTS kt_ryw (id int PRIMARY KEY, v text)");
    write_sql(pg, "DELETE FROM kt_ryw");
    PGconn *rep = kt_pg_connect(kt_env("KEEL_TEST_PG_REPLICA"));
    kt_pg_exec(rep, "SELECT pg_wal_replay_pause()");
    /* a durable commit (the test servers run with synchronous_commit off),
     * so the replica can receive it at once */
    PGconn *prim = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    kt_pg_exec(prim, "SET synchronous_commit = on; INSERT INTO kt_ryw VALUES (7, 'mine')");
    PQfinish(prim);
    uint64_t lsn;
    ck_assert_int_eq(keel_pg_write_lsn(pg, &lsn), 0);
    ck_assert_uint_gt(lsn, 0);

    /* no wait: the replica has not replayed it, so the primary serves */
    after_job now = {pg, lsn, 0, 99, ""};
    read_after(&now);
    ck_assert_uint_eq(now.host, 0);
    ck_assert_str_eq(now.seen, "mine");

    /* with a wait: it returns once the replica has replayed the write */
    after_job later = {pg, lsn, 20 * KT_S, 99, ""};
    pthread_t t;
    pthread_create(&t, NULL, read_after, &later);
    kt_pg_exec(rep, "SELECT pg_wal_replay_resume()");
    pthread_join(t, NULL);
    ck_assert_uint_eq(later.host, 1);
    ck_assert_str_eq(later.seen, "mine");
    PQfinish(rep);
    keel_pg_destroy(pg);
}
END_TEST

/* A wait shorter than a round trip: each look was bounded by what was
 * left of it, so the question timed out and the replica's pooled
 * connection was dropped at every call, and the write host served. A
 * look gets at least min(connect_timeout, 50 ms). */
START_TEST(read_your_writes_with_a_short_wait_keeps_the_replica_connection)
{
    keel_pg *pg = open_shared();
    write_sql(pg, "CREATE TABLE IF NOT EXISTS kt_short (v int)");
    PGconn *rep = kt_pg_connect(kt_env("KEEL_TEST_PG_REPLICA"));
    keel_pg_host_stats before, after;
    for (int i = 0; i < 10; i++) {
        write_sql(pg, "INSERT INTO kt_short VALUES (1)");
        uint64_t lsn;
        ck_assert_int_eq(keel_pg_write_lsn(pg, &lsn), 0);
        char q[128]; /* caught up, but the check has not seen it */
        snprintf(q, sizeof q, "SELECT (pg_last_wal_replay_lsn() >= '%X/%X')::int",
                 (unsigned)(lsn >> 32), (unsigned)lsn);
        for (int j = 0; j < 500 && !kt_pg_number(rep, q); j++)
            kt_nap(10 * MS);
        ck_assert_int_eq(kt_pg_number(rep, q), 1);
        if (i == 1) /* the first call made the connection */
            keel_pg_host_stats_get(pg, 1, &before);
        keel_pg_conn *c;
        ck_assert_int_eq(keel_pg_acquire_after(pg, lsn, 5000, &c), 0); /* 5 us */
        ck_assert_uint_eq(keel_pg_conn_host(c), 1);
        keel_pg_release(c);
    }
    keel_pg_host_stats_get(pg, 1, &after);
    ck_assert_uint_eq(after.connects, before.connects);
    PQfinish(rep);
    keel_pg_destroy(pg);
}
END_TEST

/* Nothing to wait for: no replica configured, or the one there is down.
 * The wait asked for is an hour, past the case's timeout. */
START_TEST(read_your_writes_with_no_replica_up_uses_the_primary_at_once)
{
    const char *down = "host=127.0.0.1 port=1 dbname=postgres connect_timeout=2";
    for (int i = 0; i < 2; i++) {
        keel_pg *pg = open_pg(kt_env("KEEL_TEST_PG"), i ? down : NULL, 10 * KT_S);
        uint64_t lsn;
        ck_assert_int_eq(keel_pg_write_lsn(pg, &lsn), 0);
        keel_pg_conn *c;
        ck_assert_int_eq(keel_pg_acquire_after(pg, lsn, 3600 * KT_S, &c), 0);
        ck_assert_uint_eq(keel_pg_conn_host(c), 0);
        keel_pg_release(c);
        keel_pg_destroy(pg);
    }
}
END_TEST

/* A replica whose connections are all out is nothing to wait for either:
 * the write host at once, not after the acquire timeout (an hour here,
 * past the case's timeout). */
START_TEST(read_your_writes_with_no_free_replica_connection_uses_the_primary_at_once)
{
    const char *replicas[1] = {kt_env("KEEL_TEST_PG_REPLICA")};
    keel_pg_opts o = {.primary = kt_env("KEEL_TEST_PG"), .replicas = replicas, .nreplicas = 1,
                      .conns_per_host = 1, .acquire_timeout_ns = 3600 * KT_S,
                      .manual_health = 1, .clock = kt_clock_now, .clock_ud = &clk};
    keel_pg *pg;
    ck_assert_int_eq(keel_pg_create(&pg, &o), 0);
    ck_assert_int_eq(keel_pg_check(pg), 0);
    keel_pg_conn *held, *c;
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_READ, &held), 0);
    ck_assert_uint_eq(keel_pg_conn_host(held), 1); /* the replica's one connection */
    for (int i = 0; i < 2; i++) { /* no wait, and a long one */
        ck_assert_int_eq(keel_pg_acquire_after(pg, 1, i ? 3600 * KT_S : 0, &c), 0);
        ck_assert_uint_eq(keel_pg_conn_host(c), 0);
        keel_pg_release(c);
    }
    keel_pg_release(held);
    keel_pg_destroy(pg);
}
END_TEST

/* Resumes a backend stopped with SIGSTOP after a while, unless told to
 * before: a test that would block for ever fails instead. */
typedef struct thaw {
    int pid;
    atomic_bool done;
} thaw;

static void *thaw_later(void *arg)
{
    thaw *t = arg;
    for (int i = 0; i < 1000 && !atomic_load(&t->done); i++) /* 10 s */
        kt_nap(10 * MS);
    kill(t->pid, SIGCONT);
    return NULL;
}

/* Every client backend of the shared replica goes on, and its replay (an
 * unchecked teardown, in Check's parent: also after a test that failed
 * with one stopped). */
static void resume_replica_backends(void)
{
    const char *ci = getenv("KEEL_TEST_PG_REPLICA");
    PGconn *d = ci ? PQconnectdb(ci) : NULL;
    PGresult *r = d ? PQexec(d, "SELECT pid FROM pg_stat_activity"
                                " WHERE backend_type = 'client backend'") : NULL;
    for (int i = 0; PQresultStatus(r) == PGRES_TUPLES_OK && i < PQntuples(r); i++)
        kill(atoi(PQgetvalue(r, i, 0)), SIGCONT);
    PQclear(r);
    if (d)
        PQclear(PQexec(d, "SELECT pg_wal_replay_resume()"));
    PQfinish(d);
}

/* A replica that takes the question "have you replayed it?" and never
 * answers (here its backend is stopped): the question used to wait for
 * the query timeout, none by default, so the read blocked for ever. It
 * is bounded by the wait asked for, and the write host serves. */
START_TEST(read_your_writes_waits_no_longer_than_asked_on_a_silent_replica)
{
    const char *replicas[1] = {kt_env("KEEL_TEST_PG_REPLICA")};
    keel_pg_opts o = {.primary = kt_env("KEEL_TEST_PG"), .replicas = replicas, .nreplicas = 1,
                      .conns_per_host = 1, .connect_timeout_ns = 5 * KT_S, .manual_health = 1,
                      .clock = kt_clock_now, .clock_ud = &clk}; /* no query timeout */
    keel_pg *pg;
    ck_assert_int_eq(keel_pg_create(&pg, &o), 0);
    ck_assert_int_eq(keel_pg_check(pg), 0);
    keel_pg_conn *c;
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_READ, &c), 0);
    ck_assert_uint_eq(keel_pg_conn_host(c), 1);
    thaw t = {.pid = PQbackendPID(keel_pg_conn_raw(c))}; /* the replica's one connection */
    keel_pg_release(c);
    write_sql(pg, "CREATE TABLE IF NOT EXISTS kt_silent (v int)");
    uint64_t lsn;
    ck_assert_int_eq(keel_pg_write_lsn(pg, &lsn), 0); /* newer than the check saw */
    ck_assert_int_eq(kill(t.pid, SIGSTOP), 0);
    pthread_t th;
    pthread_create(&th, NULL, thaw_later, &t);
    uint64_t t0 = keel_now_ns();
    int rc = keel_pg_acquire_after(pg, lsn, 1 * KT_S, &c);
    uint64_t took = keel_now_ns() - t0;
    atomic_store(&t.done, true);
    pthread_join(th, NULL);
    ck_assert_int_eq(rc, 0);
    ck_assert_msg(took < 2500 * MS, "took %llu ms for a wait of 1 s",
                  (unsigned long long)(took / MS));
    ck_assert_uint_eq(keel_pg_conn_host(c), 0);
    keel_pg_release(c);
    keel_pg_destroy(pg);
}
END_TEST

/* Stops a backend `at` after the thread starts, and resumes it when told
 * to or after 10 s. */
typedef struct freeze {
    int pid;
    uint64_t at;
    atomic_bool done;
} freeze;

static void *freeze_at(void *arg)
{
    freeze *f = arg;
    kt_nap(f->at);
    kill(f->pid, SIGSTOP);
    for (int i = 0; i < 1000 && !atomic_load(&f->done); i++)
        kt_nap(10 * MS);
    kill(f->pid, SIGCONT);
    return NULL;
}

/* A replica behind the position is looked at again after each pause; the
 * last pause ends at the deadline, and the look taken then had all of
 * connect_timeout: a replica gone silent late held the caller that much
 * past its wait (5 s here). After the wait no replica is looked at. */
START_TEST(read_your_writes_takes_no_look_after_its_wait)
{
    const char *replicas[1] = {kt_env("KEEL_TEST_PG_REPLICA")};
    keel_pg_opts o = {.primary = kt_env("KEEL_TEST_PG"), .replicas = replicas, .nreplicas = 1,
                      .conns_per_host = 1, .connect_timeout_ns = 5 * KT_S, .manual_health = 1,
                      .clock = kt_clock_now, .clock_ud = &clk};
    keel_pg *pg;
    ck_assert_int_eq(keel_pg_create(&pg, &o), 0);
    ck_assert_int_eq(keel_pg_check(pg), 0);
    keel_pg_conn *c;
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_READ, &c), 0);
    ck_assert_uint_eq(keel_pg_conn_host(c), 1);
    /* The looks, answered "not yet" in well under a millisecond, come
     * after pauses of 1, 2, 4, ... 64 ms: at ~130 ms + k * 64 ms, the last
     * at ~970 ms, and the pause after it ends at the deadline (1030 ms).
     * The backend stops in the middle of that pause. */
    freeze f = {.pid = PQbackendPID(keel_pg_conn_raw(c)), .at = 1000 * MS};
    keel_pg_release(c);
    PGconn *rep = kt_pg_connect(kt_env("KEEL_TEST_PG_REPLICA"));
    kt_pg_exec(rep, "SELECT pg_wal_replay_pause()");
    write_sql(pg, "CREATE TABLE IF NOT EXISTS kt_late (v int)");
    write_sql(pg, "INSERT INTO kt_late VALUES (1)");
    uint64_t lsn;
    ck_assert_int_eq(keel_pg_write_lsn(pg, &lsn), 0);
    pthread_t th;
    pthread_create(&th, NULL, freeze_at, &f);
    uint64_t t0 = keel_now_ns();
    int rc = keel_pg_acquire_after(pg, lsn, 1030 * MS, &c);
    uint64_t took = keel_now_ns() - t0;
    atomic_store(&f.done, true);
    pthread_join(th, NULL);
    kt_pg_exec(rep, "SELECT pg_wal_replay_resume()");
    PQfinish(rep);
    ck_assert_int_eq(rc, 0);
    ck_assert_msg(took < 1500 * MS, "took %llu ms for a wait of 1030 ms",
                  (unsigned long long)(took / MS));
    ck_assert_uint_eq(keel_pg_conn_host(c), 0);
    keel_pg_release(c);
    keel_pg_destroy(pg);
}
END_TEST

START_TEST(a_batch_is_one_pipeline_and_all_or_nothing)
{
    keel_pg *pg = open_shared();
    write_sql(pg, "CREATE TABLE IF NOT EXISTS kt_batch (id int PRIMARY KEY, v text)");
    write_sql(pg, "DELETE FROM kt_batch");
    keel_pg_stmt *ins;
    ck_assert_int_eq(keel_pg_stmt_create(pg, "INSERT INTO kt_batch VALUES ($1, $2)", 0, NULL, &ins), 0);
    enum { N = 1000 };
    static char ids[N][12];
    static const char *vals[N][2];
    static keel_pg_query q[N];
    for (int i = 0; i < N; i++) {
        snprintf(ids[i], sizeof ids[i], "%d", i);
        vals[i][0] = ids[i];
        vals[i][1] = "row";
        q[i] = (keel_pg_query){.stmt = ins, .params = {.n = 2, .values = vals[i]}};
    }
    /* a duplicate key in the middle: that row fails, the rest is aborted */
    vals[500][0] = "3";
    ck_assert_int_eq(keel_pg_batch(pg, q, N), KEEL_EBACKEND);
    for (int i = 0; i < N; i++) {
        if (i == 500) {
            ck_assert_int_eq(q[i].rc, KEEL_EBACKEND);
            ck_assert_str_eq(PQresultErrorField(q[i].res, PG_DIAG_SQLSTATE), "23505");
            PQclear(q[i].res);
        } else {
            ck_assert_msg(q[i].rc == KEEL_EABORTED, "row %d: %d", i, q[i].rc);
            ck_assert_ptr_null(q[i].res);
        }
    }
    char v[16];
    value(pg, KEEL_PG_WRITE, "SELECT count(*) FROM kt_batch", v, sizeof v);
    ck_assert_str_eq(v, "0");

    /* all good: every row in, SQL and statements mixed, results kept */
    vals[500][0] = ids[500];
    q[N - 1] = (keel_pg_query){.sql = "SELECT count(*) FROM kt_batch"};
    ck_assert_int_eq(keel_pg_batch(pg, q, N), 0);
    for (int i = 0; i < N; i++) {
        ck_assert_int_eq(q[i].rc, 0);
        ck_assert_ptr_nonnull(q[i].res);
    }
    ck_assert_str_eq(PQgetvalue(q[N - 1].res, 0, 0), "999"); /* it sees the rows before it */
    for (int i = 0; i < N; i++)
        PQclear(q[i].res);
    value(pg, KEEL_PG_READ, "SELECT 1", v, sizeof v);
    value(pg, KEEL_PG_WRITE, "SELECT count(*) FROM kt_batch", v, sizeof v);
    ck_assert_str_eq(v, "999");
    ck_assert_int_eq(keel_pg_batch(pg, NULL, 0), 0);
    keel_pg_query bad = {.sql = "SELECT 1", .stmt = ins};
    ck_assert_int_eq(keel_pg_batch(pg, &bad, 1), KEEL_EINVAL);
    int binary = 1;
    keel_pg_query nolen = {.sql = "SELECT $1::bytea", .params = {.n = 1, .values = vals[0],
                                                                 .formats = &binary}};
    ck_assert_int_eq(keel_pg_batch(pg, &nolen, 1), KEEL_EINVAL);

    /* the session forgot the statement: the batch, rolled back whole, is
     * prepared again and run once more */
    write_sql(pg, "DELETE FROM kt_batch");
    keel_pg_conn *c;
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c), 0);
    ck_assert_int_eq(keel_pg_conn_batch(c, q, 3), 0);
    for (int i = 0; i < 3; i++)
        PQclear(q[i].res);
    PQclear(PQexec(keel_pg_conn_raw(c), "DEALLOCATE ALL; DELETE FROM kt_batch"));
    ck_assert_int_eq(keel_pg_conn_batch(c, q, 3), 0);
    for (int i = 0; i < 3; i++)
        PQclear(q[i].res);
    /* COPY has no place in a pipeline: refused, the connection given up */
    keel_pg_query copy[2] = {{.sql = "SELECT 1"}, {.sql = "COPY kt_batch TO STDOUT"}};
    ck_assert_int_eq(keel_pg_conn_batch(c, copy, 2), KEEL_ENOTSUP);
    ck_assert_int_eq(copy[1].rc, KEEL_ENOTSUP);
    ck_assert_int_eq(copy[0].rc, KEEL_EABORTED);
    keel_pg_release(c);
    value(pg, KEEL_PG_WRITE, "SELECT count(*) FROM kt_batch", v, sizeof v);
    ck_assert_str_eq(v, "3");
    keel_pg_stmt_free(ins);
    keel_pg_destroy(pg);
}
END_TEST

/* A connection busy with the caller's own libpq use (a result not read
 * yet, a COPY) takes no batch: KEEL_ESTATE, the host's other connections
 * untouched. */
START_TEST(a_batch_on_a_busy_connection_is_refused)
{
    keel_pg *pg = open_shared();
    write_sql(pg, "CREATE TABLE IF NOT EXISTS kt_busy (v int)");
    keel_pg_conn *c, *other;
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &other), 0);
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c), 0);
    keel_pg_release(other);
    PGconn *raw = keel_pg_conn_raw(c);
    ck_assert_int_eq(PQsendQuery(raw, "SELECT 1"), 1);
    for (int i = 0; i < 1000 && PQisBusy(raw); i++) { /* its result arrived, unread */
        kt_nap(2 * MS);
        PQconsumeInput(raw);
    }
    ck_assert_int_eq(PQisBusy(raw), 0);
    keel_pg_query q = {.sql = "SELECT 2"};
    ck_assert_int_eq(keel_pg_conn_batch(c, &q, 1), KEEL_ESTATE);
    for (PGresult *r; (r = PQgetResult(raw)) != NULL;)
        PQclear(r);
    PQclear(PQexec(raw, "COPY kt_busy FROM STDIN"));
    ck_assert_int_eq(keel_pg_conn_batch(c, &q, 1), KEEL_ESTATE);
    keel_pg_release(c); /* in COPY: closed */
    keel_pg_host_stats before, after;
    keel_pg_host_stats_get(pg, 0, &before);
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c), 0);
    ck_assert_int_eq(in_recovery(c), 0);
    keel_pg_release(c);
    keel_pg_host_stats_get(pg, 0, &after);
    ck_assert_uint_eq(after.connects, before.connects); /* the other one was kept */
    keel_pg_destroy(pg);
}
END_TEST

START_TEST(statements_are_prepared_again_when_the_server_forgets)
{
    keel_pg *pg = open_shared();
    keel_pg_stmt *s;
    ck_assert_int_eq(keel_pg_stmt_create(pg, "SELECT $1::int + 1, pg_backend_pid()", 0, NULL, &s), 0);
    const char *one = "1";
    keel_pg_params p = {.n = 1, .values = &one};
    keel_pg_conn *c;
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c), 0);
    PGresult *r;
    ck_assert_int_eq(keel_pg_conn_exec_stmt(c, s, &p, &r), 0);
    ck_assert_str_eq(PQgetvalue(r, 0, 0), "2");
    char pid[16];
    snprintf(pid, sizeof pid, "%s", PQgetvalue(r, 0, 1));
    PQclear(r);
    /* the session forgets it behind our back: prepared again, once */
    PQclear(PQexec(keel_pg_conn_raw(c), "DEALLOCATE ALL"));
    ck_assert_int_eq(keel_pg_conn_exec_stmt(c, s, &p, &r), 0);
    ck_assert_str_eq(PQgetvalue(r, 0, 0), "2");
    PQclear(r);
    keel_pg_release(c);

    /* the server ends the idle session (a restart, an admin): the pool
     * sees the closed socket, and the write goes on a new connection, where
     * the statement is prepared again; one killed backend is not a dead
     * server, so no check is needed */
    PGconn *d = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    char sql[96];
    snprintf(sql, sizeof sql, "SELECT pg_terminate_backend(%s)", pid);
    kt_pg_exec(d, sql);
    snprintf(sql, sizeof sql, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", pid);
    for (int i = 0; i < 500 && kt_pg_number(d, sql) != 0; i++)
        kt_nap(10 * KT_MS);
    kt_nap(50 * KT_MS); /* the backend has gone: its socket closes as it exits */
    ck_assert_int_eq(keel_pg_exec_stmt(pg, KEEL_PG_WRITE, s, &p, &r), 0);
    ck_assert_str_eq(PQgetvalue(r, 0, 0), "2");
    ck_assert_str_ne(PQgetvalue(r, 0, 1), pid);
    snprintf(pid, sizeof pid, "%s", PQgetvalue(r, 0, 1));
    PQclear(r);
    /* a session ended while a caller holds it: the call on it fails, and
     * a write is never retried */
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c), 0);
    snprintf(sql, sizeof sql, "SELECT pg_terminate_backend(%s)", pid);
    kt_pg_exec(d, sql);
    snprintf(sql, sizeof sql, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", pid);
    for (int i = 0; i < 500 && kt_pg_number(d, sql) != 0; i++)
        kt_nap(10 * KT_MS);
    PQfinish(d);
    ck_assert_int_eq(keel_pg_conn_exec_stmt(c, s, &p, &r), KEEL_EUNAVAIL);
    ck_assert_ptr_null(r);
    keel_pg_release(c);
    /* a statement that does not compile: KEEL_EBACKEND from the prepare */
    keel_pg_stmt *bad;
    ck_assert_int_eq(keel_pg_stmt_create(pg, "SELEC nothing", 0, NULL, &bad), 0);
    ck_assert_int_eq(keel_pg_exec_stmt(pg, KEEL_PG_WRITE, bad, NULL, &r), KEEL_EBACKEND);
    ck_assert_str_eq(PQresultErrorField(r, PG_DIAG_SQLSTATE), "42601");
    PQclear(r);
    keel_pg_stmt_free(bad);
    keel_pg_stmt_free(s);
    keel_pg_destroy(pg);
}
END_TEST

/* Ends, from a session of its own, the backend running a statement
 * tagged so once `ready` (SQL) holds; gives up after 10 s. */
typedef struct killer {
    const char *conninfo, *tag, *ready;
    long long killed;
} killer;

static void *kill_mid_statement(void *arg)
{
    killer *k = arg;
    PGconn *d = kt_pg_connect(k->conninfo);
    char sql[512];
    snprintf(sql, sizeof sql,
             "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE state = 'active'"
             " AND query LIKE '%%%s%%' AND pid <> pg_backend_pid() AND %s", k->tag, k->ready);
    for (int i = 0; i < 1000 && !(k->killed = kt_pg_number(d, sql)); i++)
        kt_nap(10 * MS);
    PQfinish(d);
    return NULL;
}

/* A statement whose connection is lost while it runs: a read is run once
 * more, on a new connection, and succeeds; a write is not, since it may
 * have done its work (here a nextval, which no rollback undoes): it runs
 * once and the caller gets KEEL_EUNAVAIL. */
START_TEST(a_read_that_lost_its_connection_runs_again_and_a_write_never)
{
    keel_pg *pg = open_shared();
    char v[8];
    value(pg, KEEL_PG_READ, "SELECT 1", v, sizeof v); /* the replica's pooled connection */
    keel_pg_host_stats before, after;
    keel_pg_host_stats_get(pg, 1, &before);
    killer k = {kt_env("KEEL_TEST_PG_REPLICA"), "kt_read_again", "true", 0};
    pthread_t t;
    pthread_create(&t, NULL, kill_mid_statement, &k);
    PGresult *r;
    int rc = keel_pg_exec(pg, KEEL_PG_READ,
                          "SELECT pg_is_in_recovery(), pg_sleep(1)::text || 'kt_read_again'", NULL, &r);
    pthread_join(t, NULL);
    ck_assert_int_eq(k.killed, 1);
    ck_assert_msg(rc == 0, "read: %s", keel_strerror(rc));
    ck_assert_str_eq(PQgetvalue(r, 0, 0), "t");
    PQclear(r);
    keel_pg_host_stats_get(pg, 1, &after);
    ck_assert_uint_eq(after.connects, before.connects + 1); /* the second run's */

    write_sql(pg, "DROP SEQUENCE IF EXISTS kt_once");
    write_sql(pg, "CREATE SEQUENCE kt_once");
    killer w = {kt_env("KEEL_TEST_PG"), "kt_write_once", "(SELECT is_called FROM kt_once)", 0};
    pthread_create(&t, NULL, kill_mid_statement, &w);
    rc = keel_pg_exec(pg, KEEL_PG_WRITE,
                      "SELECT nextval('kt_once'), pg_sleep(1)::text || 'kt_write_once'", NULL, &r);
    pthread_join(t, NULL);
    ck_assert_int_eq(w.killed, 1);
    ck_assert_msg(rc == KEEL_EUNAVAIL, "write: %s", keel_strerror(rc));
    ck_assert_ptr_null(r);
    PGconn *d = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    ck_assert_int_eq(kt_pg_number(d, "SELECT last_value FROM kt_once"), 1); /* one nextval */
    PQfinish(d);
    keel_pg_destroy(pg);
}
END_TEST

/* A one-call helper gives its connection back as soon as the statement
 * has run, so it cannot carry a COPY: refused, with nothing copied, where
 * it used to return 0 and drop the COPY with the connection. */
START_TEST(a_one_call_copy_is_refused)
{
    keel_pg *pg = open_shared();
    PGresult *r;
    ck_assert_int_eq(keel_pg_exec(pg, KEEL_PG_WRITE, "CREATE TABLE IF NOT EXISTS kt_copy (v int)", NULL, &r), 0);
    PQclear(r);
    ck_assert_int_eq(keel_pg_exec(pg, KEEL_PG_WRITE, "COPY kt_copy FROM STDIN", NULL, &r), KEEL_ENOTSUP);
    ck_assert_ptr_null(r);
    ck_assert_int_eq(keel_pg_exec(pg, KEEL_PG_AUTO, "COPY (SELECT 1) TO STDOUT", NULL, &r), KEEL_ENOTSUP);
    ck_assert_ptr_null(r);
    char v[8];
    value(pg, KEEL_PG_WRITE, "SELECT 1", v, sizeof v); /* the pool goes on */
    ck_assert_str_eq(v, "1");
    keel_pg_destroy(pg);
}
END_TEST

START_TEST(a_statement_whose_columns_changed_is_prepared_again)
{
    keel_pg *pg = open_shared();
    write_sql(pg, "DROP TABLE IF EXISTS keel_reshaped");
    write_sql(pg, "CREATE TABLE keel_reshaped (a int)");
    write_sql(pg, "INSERT INTO keel_reshaped VALUES (1)");
    keel_pg_stmt *s;
    ck_assert_int_eq(keel_pg_stmt_create(pg, "SELECT * FROM keel_reshaped", 0, NULL, &s), 0);
    keel_pg_conn *c;
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c), 0);
    PGresult *r;
    ck_assert_int_eq(keel_pg_conn_exec_stmt(c, s, NULL, &r), 0);
    ck_assert_int_eq(PQnfields(r), 1);
    PQclear(r);
    /* the table gains a column: the server refuses the plan it cached
     * ("cached plan must not change result type") until it is prepared
     * anew, which happens once, on this connection as in a batch */
    ck_assert_int_eq(keel_pg_conn_exec(c, "ALTER TABLE keel_reshaped ADD COLUMN b int", NULL, &r), 0);
    PQclear(r);
    ck_assert_int_eq(keel_pg_conn_exec_stmt(c, s, NULL, &r), 0);
    ck_assert_int_eq(PQnfields(r), 2);
    PQclear(r);
    ck_assert_int_eq(keel_pg_conn_exec(c, "ALTER TABLE keel_reshaped ADD COLUMN c int", NULL, &r), 0);
    PQclear(r);
    keel_pg_query q[2] = {{.stmt = s}, {.sql = "SELECT 1"}};
    ck_assert_int_eq(keel_pg_conn_batch(c, q, 2), 0);
    ck_assert_int_eq(q[0].rc, 0);
    ck_assert_int_eq(PQnfields(q[0].res), 3);
    PQclear(q[0].res);
    PQclear(q[1].res);
    keel_pg_release(c);
    write_sql(pg, "DROP TABLE keel_reshaped");
    keel_pg_stmt_free(s);
    keel_pg_destroy(pg);
}
END_TEST

/* Rows in a table, counted on a session of its own. */
static long long rows_in(const char *table)
{
    PGconn *d = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    char sql[96];
    snprintf(sql, sizeof sql, "SELECT count(*) FROM %s", table);
    long long n = kt_pg_number(d, sql);
    PQfinish(d);
    return n;
}

/* The re-run of a batch whose prepared statement went stale assumed the
 * whole batch had been rolled back; a COMMIT (or any transaction control)
 * before the stale statement had already committed what came before it,
 * which the re-run then committed twice. Such a batch is not run again:
 * the stale statement's error comes back, and the next call prepares it
 * anew. A batch of plain statements before it still runs again. */
START_TEST(a_batch_that_committed_before_a_stale_statement_is_not_run_again)
{
    keel_pg *pg = open_shared();
    write_sql(pg, "DROP TABLE IF EXISTS kt_twice");
    write_sql(pg, "DROP TABLE IF EXISTS kt_twice_b");
    write_sql(pg, "CREATE TABLE kt_twice (v int)");
    write_sql(pg, "CREATE TABLE kt_twice_b (a int)");
    keel_pg_stmt *s;
    ck_assert_int_eq(keel_pg_stmt_create(pg, "SELECT * FROM kt_twice_b", 0, NULL, &s), 0);
    PGconn *d = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    kt_pg_exec(d, "CREATE OR REPLACE PROCEDURE kt_noop() LANGUAGE sql AS $$ SELECT 1 $$");
    /* each with whether it commits the INSERT before it, and how many rows
     * the same batch adds when run again on the same connection (-1: not
     * tried; it fails by itself, or leaves a failed transaction) */
    static const struct {
        const char *sql;
        bool commits;
        int again;
    } enders[] = {
        {"COMMIT", true, 1}, {"end", true, 1}, {"/* c */ commit and no chain", true, 1},
        {"BEGIN", false, -1}, {"SAVEPOINT x", false, -1},
        {"ROLLBACK", false, 0}, {"CALL kt_noop()", false, 1},
    };
    long long expect = 0;
    char alter[64];
    for (size_t k = 0; k < sizeof enders / sizeof enders[0] + 1; k++) {
        bool plain = k == sizeof enders / sizeof enders[0];
        keel_pg_conn *c;
        ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c), 0);
        PGresult *r;
        ck_assert_int_eq(keel_pg_conn_exec_stmt(c, s, NULL, &r), 0); /* prepared here */
        PQclear(r);
        /* another session changes its columns: the plan is refused */
        snprintf(alter, sizeof alter, "ALTER TABLE kt_twice_b ADD COLUMN c%zu int", k);
        kt_pg_exec(d, alter);
        keel_pg_query q[3] = {{.sql = "INSERT INTO kt_twice VALUES (1)"},
                              {.sql = plain ? "SELECT 1" : enders[k].sql},
                              {.stmt = s}};
        int rc = keel_pg_conn_batch(c, q, 3);
        if (plain) { /* rolled back whole: run once more */
            ck_assert_int_eq(rc, 0);
            ck_assert_int_eq(PQnfields(q[2].res), (int)k + 2);
            expect++;
        } else {
            ck_assert_msg(rc != 0, "%s: run again", enders[k].sql);
            ck_assert_msg(q[2].rc == KEEL_EBACKEND || q[1].rc == KEEL_EBACKEND, "%s", enders[k].sql);
            if (q[2].rc == KEEL_EBACKEND) { /* the stale statement's own error */
                ck_assert_str_eq(PQresultErrorField(q[2].res, PG_DIAG_SQLSTATE), "0A000");
                if (enders[k].commits)
                    expect++; /* committed by the batch's own COMMIT, once */
            }
        }
        for (int i = 0; i < 3; i++)
            PQclear(q[i].res);
        if (!plain && enders[k].again >= 0) { /* prepared anew for the next batch */
            rc = keel_pg_conn_batch(c, q, 3);
            ck_assert_msg(rc == 0, "%s again: %s (%s %s)", enders[k].sql, keel_strerror(rc),
                          q[1].res ? PQresultErrorMessage(q[1].res) : "",
                          q[2].res ? PQresultErrorMessage(q[2].res) : "");
            ck_assert_int_eq(PQnfields(q[2].res), (int)k + 2);
            for (int i = 0; i < 3; i++)
                PQclear(q[i].res);
            expect += enders[k].again;
        }
        keel_pg_release(c);
        ck_assert_msg(rows_in("kt_twice") == expect, "%s: %lld rows, not %lld",
                      plain ? "plain" : enders[k].sql, rows_in("kt_twice"), expect);
        /* and the statement runs again at the next call */
        ck_assert_int_eq(keel_pg_exec_stmt(pg, KEEL_PG_WRITE, s, NULL, &r), 0);
        ck_assert_int_eq(PQnfields(r), (int)k + 2);
        PQclear(r);
    }
    /* forgotten by the server (26000) after a COMMIT: the same */
    keel_pg_conn *c;
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c), 0);
    PGresult *r;
    ck_assert_int_eq(keel_pg_conn_exec_stmt(c, s, NULL, &r), 0);
    PQclear(r);
    PQclear(PQexec(keel_pg_conn_raw(c), "DEALLOCATE ALL"));
    keel_pg_query q[3] = {{.sql = "INSERT INTO kt_twice VALUES (1)"}, {.sql = "COMMIT"}, {.stmt = s}};
    ck_assert_int_eq(keel_pg_conn_batch(c, q, 3), KEEL_EBACKEND);
    ck_assert_str_eq(PQresultErrorField(q[2].res, PG_DIAG_SQLSTATE), "26000");
    for (int i = 0; i < 3; i++)
        PQclear(q[i].res);
    ck_assert_int_eq(rows_in("kt_twice"), expect + 1);
    ck_assert_int_eq(keel_pg_conn_exec_stmt(c, s, NULL, &r), 0);
    PQclear(r);
    keel_pg_release(c);
    kt_pg_exec(d, "DROP PROCEDURE kt_noop()");
    PQfinish(d);
    write_sql(pg, "DROP TABLE kt_twice");
    write_sql(pg, "DROP TABLE kt_twice_b");
    keel_pg_stmt_free(s);
    keel_pg_destroy(pg);
}
END_TEST

/* How many of this session's prepared statements have this name. */
static int prepared_as(keel_pg_conn *c, const char *name)
{
    const char *v[1] = {name};
    PGresult *r = PQexecParams(keel_pg_conn_raw(c), "SELECT count(*) FROM pg_prepared_statements WHERE name = $1",
                               1, NULL, v, NULL, NULL, 0);
    ck_assert_int_eq(PQresultStatus(r), PGRES_TUPLES_OK);
    int n = atoi(PQgetvalue(r, 0, 0));
    PQclear(r);
    return n;
}

START_TEST(freed_statements_are_deallocated_where_they_were_prepared)
{
    keel_pg *pg = NULL;
    keel_pg_opts o = {.primary = kt_env("KEEL_TEST_PG"), .conns_per_host = 1, .manual_health = 1};
    ck_assert_int_eq(keel_pg_create(&pg, &o), 0);
    ck_assert_int_eq(keel_pg_check(pg), 0);
    keel_pg_stmt *s[3];
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(keel_pg_stmt_create(pg, "SELECT $1::int", 0, NULL, &s[i]), 0);
    char name[3][32];
    const char *one = "1";
    keel_pg_params p = {.n = 1, .values = &one};
    keel_pg_conn *c;
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c), 0); /* the one connection */
    keel_pg_host_stats st0, st;
    keel_pg_host_stats_get(pg, 0, &st0);
    for (int i = 0; i < 2; i++) { /* s[2] is never run here */
        PGresult *r;
        ck_assert_int_eq(keel_pg_conn_exec_stmt(c, s[i], &p, &r), 0);
        PQclear(r);
    }
    PGresult *r = PQexec(keel_pg_conn_raw(c), "SELECT name FROM pg_prepared_statements ORDER BY name");
    ck_assert_int_eq(PQntuples(r), 2);
    for (int i = 0; i < 2; i++)
        snprintf(name[i], sizeof name[i], "%s", PQgetvalue(r, i, 0));
    PQclear(r);
    keel_pg_stmt_free(s[0]); /* while the connection is out: done at its release */
    keel_pg_stmt_free(s[2]);
    ck_assert_int_eq(prepared_as(c, name[0]), 1);
    keel_pg_release(c);
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c), 0);
    ck_assert_int_eq(prepared_as(c, name[0]), 0);
    ck_assert_int_eq(prepared_as(c, name[1]), 1); /* the live one stays */
    /* one the server forgot already: the DEALLOCATE's error reply is fine */
    PQclear(PQexec(keel_pg_conn_raw(c), "DEALLOCATE ALL"));
    keel_pg_stmt_free(s[1]);
    keel_pg_release(c);
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c), 0);
    r = PQexec(keel_pg_conn_raw(c), "SELECT 1"); /* the same session, still good */
    ck_assert_int_eq(PQresultStatus(r), PGRES_TUPLES_OK);
    PQclear(r);
    keel_pg_host_stats_get(pg, 0, &st);
    ck_assert_uint_eq(st.connects, st0.connects); /* one session all along */
    keel_pg_release(c);
    keel_pg_destroy(pg);
}
END_TEST

/* The highest id among this session's prepared statements (keel_<id>),
 * or -1 for none. */
static long highest_prepared(keel_pg_conn *c)
{
    PGresult *r = PQexec(keel_pg_conn_raw(c),
                         "SELECT coalesce(max(substr(name, 6)::bigint), -1)"
                         " FROM pg_prepared_statements WHERE name LIKE 'keel\\_%'");
    ck_assert_int_eq(PQresultStatus(r), PGRES_TUPLES_OK);
    long v = atol(PQgetvalue(r, 0, 0));
    PQclear(r);
    return v;
}

/* The one statement of this session prepared by libkeel, by name. */
static void only_prepared(keel_pg_conn *c, char *name, size_t len)
{
    PGresult *r = PQexec(keel_pg_conn_raw(c), "SELECT name FROM pg_prepared_statements");
    ck_assert_int_eq(PQntuples(r), 1);
    snprintf(name, len, "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
}

static void runs_as(keel_pg_conn *c, keel_pg_stmt *s, const char *want)
{
    PGresult *r;
    ck_assert_int_eq(keel_pg_conn_exec_stmt(c, s, NULL, &r), 0);
    ck_assert_str_eq(PQgetvalue(r, 0, 0), want);
    PQclear(r);
}

/* Statement ids came from a counter that only grew: a service making and
 * freeing statements at runtime grew every connection's bitset, and the
 * freed set each release scans, without end. The id of a freed statement
 * is used again once no connection holds it prepared; never before, so a
 * connection that prepared the old statement under its name never runs
 * the old SQL for the new one. */
START_TEST(freed_statement_ids_are_used_again_once_deallocated)
{
    keel_pg *pg = NULL;
    keel_pg_opts o = {.primary = kt_env("KEEL_TEST_PG"), .conns_per_host = 2, .manual_health = 1};
    ck_assert_int_eq(keel_pg_create(&pg, &o), 0);
    ck_assert_int_eq(keel_pg_check(pg), 0);
    keel_pg_conn *c1, *c2;
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c1), 0);
    keel_pg_stmt *s1, *s2, *s3;
    ck_assert_int_eq(keel_pg_stmt_create(pg, "SELECT 'one'", 0, NULL, &s1), 0);
    runs_as(c1, s1, "one");
    char old[32], name[32];
    only_prepared(c1, old, sizeof old);
    int pid = PQbackendPID(keel_pg_conn_raw(c1));
    keel_pg_stmt_free(s1); /* c1, out, still holds it prepared */
    ck_assert_int_eq(keel_pg_stmt_create(pg, "SELECT 'two'", 0, NULL, &s2), 0);
    runs_as(c1, s2, "two");
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c2), 0);
    runs_as(c2, s2, "two");
    keel_pg_release(c1); /* deallocates s1's: its id is free now */
    ck_assert_int_eq(keel_pg_stmt_create(pg, "SELECT 'three'", 0, NULL, &s3), 0);
    runs_as(c2, s3, "three");
    keel_pg_release(c2);
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c1), 0);
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c2), 0);
    keel_pg_conn *had = PQbackendPID(keel_pg_conn_raw(c1)) == pid ? c1 : c2; /* ran s1 */
    ck_assert_int_eq(PQbackendPID(keel_pg_conn_raw(had)), pid);
    ck_assert_int_eq(prepared_as(had, old), 0);
    runs_as(had, s3, "three");
    runs_as(had, s2, "two");
    PGresult *r = PQexec(keel_pg_conn_raw(had), "SELECT name FROM pg_prepared_statements"
                                                " WHERE statement LIKE '%three%'");
    ck_assert_int_eq(PQntuples(r), 1);
    snprintf(name, sizeof name, "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
    ck_assert_str_eq(name, old); /* used again: the case above is the one it must be */
    keel_pg_release(c1);
    keel_pg_release(c2);
    keel_pg_stmt_free(s2);
    keel_pg_stmt_free(s3);

    /* made and freed at runtime, on either connection, in a batch or
     * not, freed while out or after: the ids stay few */
    long high = -1;
    for (int i = 0; i < 400; i++) {
        char sql[48];
        snprintf(sql, sizeof sql, "SELECT %d", i);
        keel_pg_stmt *s;
        ck_assert_int_eq(keel_pg_stmt_create(pg, sql, 0, NULL, &s), 0);
        keel_pg_conn *c;
        ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c), 0);
        char want[16];
        snprintf(want, sizeof want, "%d", i);
        if (i % 3 == 0) {
            keel_pg_query q[1] = {{.stmt = s}};
            ck_assert_int_eq(keel_pg_conn_batch(c, q, 1), 0);
            ck_assert_str_eq(PQgetvalue(q[0].res, 0, 0), want);
            PQclear(q[0].res);
        } else {
            runs_as(c, s, want);
        }
        long h = highest_prepared(c);
        high = h > high ? h : high;
        if (i % 2)
            keel_pg_stmt_free(s);
        keel_pg_release(c);
        if (i % 2 == 0)
            keel_pg_stmt_free(s);
    }
    ck_assert_int_lt(high, 8);
    keel_pg_destroy(pg);
}
END_TEST

START_TEST(release_rolls_back_and_drops_what_it_cannot_reuse)
{
    keel_pg *pg = open_shared();
    write_sql(pg, "CREATE TABLE IF NOT EXISTS kt_tx (v int)");
    write_sql(pg, "DELETE FROM kt_tx");
    keel_pg_conn *c;
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c), 0);
    PGconn *raw = keel_pg_conn_raw(c);
    PQclear(PQexec(raw, "BEGIN"));
    PQclear(PQexec(raw, "INSERT INTO kt_tx VALUES (1)"));
    keel_pg_release(c); /* no COMMIT */
    keel_pg_host_stats before, after;
    keel_pg_host_stats_get(pg, 0, &before);
    char v[16];
    value(pg, KEEL_PG_WRITE, "SELECT count(*) FROM kt_tx", v, sizeof v);
    ck_assert_str_eq(v, "0");
    /* a failed transaction too, and the connection is reused */
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c), 0);
    PQclear(PQexec(keel_pg_conn_raw(c), "BEGIN"));
    PQclear(PQexec(keel_pg_conn_raw(c), "SELECT 1/0"));
    keel_pg_release(c);
    value(pg, KEEL_PG_WRITE, "SELECT 1", v, sizeof v);
    keel_pg_host_stats_get(pg, 0, &after);
    ck_assert_uint_eq(after.connects, before.connects);
    /* one left in COPY is closed */
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c), 0);
    PQclear(PQexec(keel_pg_conn_raw(c), "COPY kt_tx FROM STDIN"));
    keel_pg_release(c);
    value(pg, KEEL_PG_WRITE, "SELECT 1", v, sizeof v);
    keel_pg_host_stats_get(pg, 0, &after);
    ck_assert_uint_eq(after.connects, before.connects + 1);
    keel_pg_destroy(pg);
}
END_TEST

START_TEST(timeouts_client_and_server)
{
    keel_pg *pg = open_pg(kt_env("KEEL_TEST_PG"), NULL, 200 * MS);
    PGresult *r;
    uint64_t t0 = keel_now_ns();
    ck_assert_int_eq(keel_pg_exec(pg, KEEL_PG_WRITE, "SELECT pg_sleep(5)", NULL, &r), KEEL_ETIMEDOUT);
    ck_assert_ptr_null(r);
    ck_assert_uint_lt(keel_now_ns() - t0, 2 * KT_S);
    keel_pg_destroy(pg);

    keel_pg_opts o = {.primary = kt_env("KEEL_TEST_PG"), .statement_timeout_ns = 100 * MS,
                      .manual_health = 1};
    ck_assert_int_eq(keel_pg_create(&pg, &o), 0);
    ck_assert_int_eq(keel_pg_exec(pg, KEEL_PG_WRITE, "SELECT pg_sleep(5)", NULL, &r), KEEL_EBACKEND);
    ck_assert_str_eq(PQresultErrorField(r, PG_DIAG_SQLSTATE), "57014"); /* query_canceled */
    PQclear(r);
    keel_pg_destroy(pg);
}
END_TEST

/* A setting of a leased connection, as the server has it, and where from. */
static void setting(keel_pg_conn *c, const char *name, char *value, size_t vlen, char *source,
                    size_t slen)
{
    const char *v[1] = {name};
    PGresult *r = PQexecParams(keel_pg_conn_raw(c),
                               "SELECT current_setting($1), source FROM pg_settings WHERE name = $1",
                               1, NULL, v, NULL, NULL, 0);
    ck_assert_int_eq(PQresultStatus(r), PGRES_TUPLES_OK);
    ck_assert_int_eq(PQntuples(r), 1);
    snprintf(value, vlen, "%s", PQgetvalue(r, 0, 0));
    snprintf(source, slen, "%s", PQgetvalue(r, 0, 1));
    PQclear(r);
}

/* client_connection_check_interval used to be a startup option, which a
 * server before 14, or one not on Linux, answers with a FATAL: every
 * connection refused, the host down. It is set once connected now (its
 * source "session", not "client"), and still takes effect. */
START_TEST(a_query_timeout_sets_the_client_check_after_connecting)
{
    keel_pg *pg = open_pg(kt_env("KEEL_TEST_PG"), NULL, 200 * MS);
    keel_pg_conn *c;
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c), 0);
    char v[32], src[32];
    setting(c, "client_connection_check_interval", v, sizeof v, src, sizeof src);
    ck_assert_str_eq(v, "200ms");
    ck_assert_str_eq(src, "session");
    keel_pg_release(c);
    keel_pg_destroy(pg);
    pg = open_pg(kt_env("KEEL_TEST_PG"), NULL, 10 * KT_S); /* at most a second apart */
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c), 0);
    setting(c, "client_connection_check_interval", v, sizeof v, src, sizeof src);
    ck_assert_str_eq(v, "1s");
    keel_pg_release(c);
    keel_pg_destroy(pg);
}
END_TEST

static _Atomic int check_logs;
static void count_check_logs(keel_log_level level, const char *module, const char *msg, void *ud)
{
    (void)level, (void)module, (void)ud;
    if (strstr(msg, "client_connection_check_interval") || strstr(msg, "set_config"))
        check_logs++;
}

/* A server that answers the setting with an error (as one on another
 * platform does; here, a role that may not call set_config()) still gives
 * connections: the check goes without, said once. */
START_TEST(a_server_that_refuses_the_client_check_still_connects)
{
    PGconn *d = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    kt_pg_exec(d, "CREATE DATABASE kt_nocheck");
    kt_pg_exec(d, "CREATE ROLE kt_plain LOGIN");
    char ci[512];
    snprintf(ci, sizeof ci, "%s dbname=kt_nocheck", kt_env("KEEL_TEST_PG"));
    PGconn *db = kt_pg_connect(ci);
    kt_pg_exec(db, "REVOKE EXECUTE ON FUNCTION set_config(text, text, boolean) FROM PUBLIC");
    PQfinish(db);
    snprintf(ci, sizeof ci, "%s dbname=kt_nocheck user=kt_plain", kt_env("KEEL_TEST_PG"));

    keel_set_log(count_check_logs, KEEL_LOG_WARN, NULL);
    keel_pg *pg = open_pg(ci, NULL, 200 * MS);
    keel_pg_conn *c[2];
    for (int i = 0; i < 2; i++) /* two connections, each told no */
        ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c[i]), 0);
    for (int i = 0; i < 2; i++) {
        char v[32], src[32];
        setting(c[i], "client_connection_check_interval", v, sizeof v, src, sizeof src);
        ck_assert_str_eq(v, "0"); /* without, but usable */
    }
    for (int i = 0; i < 2; i++)
        keel_pg_release(c[i]);
    keel_pg_host_stats st;
    keel_pg_host_stats_get(pg, 0, &st);
    ck_assert_uint_eq(st.conn_failures, 0);
    ck_assert_uint_eq(st.errors, 0); /* not a statement of the caller's */
    keel_set_log(NULL, KEEL_LOG_ERROR, NULL);
    ck_assert_int_eq(check_logs, 1);
    keel_pg_destroy(pg);
    kt_pg_exec(d, "DROP DATABASE kt_nocheck WITH (FORCE)");
    kt_pg_exec(d, "DROP ROLE kt_plain");
    PQfinish(d);
}
END_TEST

/* Without pg_read_all_stats a check cannot see the timeline the
 * replica's WAL receiver follows, and takes that of its last restartpoint,
 * which after a failover trails for up to checkpoint_timeout: said once
 * per host, with what to grant. */
static _Atomic int tli_logs;
static void count_tli_logs(keel_log_level level, const char *module, const char *msg, void *ud)
{
    (void)module, (void)ud;
    if (level == KEEL_LOG_WARN && strstr(msg, "pg_monitor"))
        tli_logs++;
}

START_TEST(a_replica_that_hides_its_timeline_is_said_once)
{
    PGconn *prim = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    kt_pg_exec(prim, "DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'kt_low')"
                     " THEN CREATE ROLE kt_low LOGIN; END IF; END$$");
    kt_pg_exec(prim, "SET synchronous_commit = on; SELECT 1");
    PQfinish(prim);
    PGconn *rep = kt_pg_connect(kt_env("KEEL_TEST_PG_REPLICA"));
    for (int i = 0; i < 500 && !kt_pg_number(rep, "SELECT count(*) FROM pg_roles"
                                                 " WHERE rolname = 'kt_low'"); i++)
        kt_nap(10 * MS);
    PQfinish(rep);
    for (int low = 0; low < 2; low++) {
        char p[256], r[256];
        snprintf(p, sizeof p, "%s%s", kt_env("KEEL_TEST_PG"), low ? " user=kt_low" : "");
        snprintf(r, sizeof r, "%s%s", kt_env("KEEL_TEST_PG_REPLICA"), low ? " user=kt_low" : "");
        tli_logs = 0;
        keel_set_log(count_tli_logs, KEEL_LOG_WARN, NULL);
        keel_pg *pg = open_pg(p, r, 5 * KT_S);
        ck_assert_int_eq(keel_pg_check(pg), 0);
        keel_set_log(NULL, KEEL_LOG_ERROR, NULL);
        keel_pg_host_stats st;
        keel_pg_host_stats_get(pg, 1, &st);
        ck_assert_int_eq(st.role, KEEL_PG_ROLE_REPLICA);
        ck_assert_int_eq(tli_logs, low ? 1 : 0);
        keel_pg_destroy(pg);
    }
}
END_TEST

START_TEST(a_stopped_replica_is_skipped)
{
    keel_pg *pg = open_shared();
    char v[8];
    value(pg, KEEL_PG_READ, "SELECT pg_is_in_recovery()", v, sizeof v);
    ck_assert_str_eq(v, "t");
    kt_server("stop-one", "pg-replica");
    /* the pooled connection to it fails; a read is tried again elsewhere */
    value(pg, KEEL_PG_READ, "SELECT pg_is_in_recovery()", v, sizeof v);
    ck_assert_str_eq(v, "f");
    value(pg, KEEL_PG_READ, "SELECT pg_is_in_recovery()", v, sizeof v);
    ck_assert_str_eq(v, "f");
    ck_assert_int_eq(keel_pg_check(pg), 0);
    keel_pg_host_stats st;
    keel_pg_host_stats_get(pg, 1, &st);
    ck_assert_int_eq(st.role, KEEL_PG_ROLE_DOWN);
    kt_server("start-one", "pg-replica");
    ck_assert_int_eq(keel_pg_check(pg), 0);
    keel_pg_host_stats_get(pg, 1, &st);
    ck_assert_int_eq(st.role, KEEL_PG_ROLE_REPLICA);
    value(pg, KEEL_PG_READ, "SELECT pg_is_in_recovery()", v, sizeof v);
    ck_assert_str_eq(v, "t");
    keel_pg_destroy(pg);
}
END_TEST

/* The check's own connection, killed between checks (an admin, an
 * idle_session_timeout, a restart): the host answers a new one, so it is
 * up, and writes go on. */
START_TEST(a_check_whose_connection_was_killed_asks_again)
{
    char conninfo[256];
    snprintf(conninfo, sizeof conninfo, "%s application_name=kt_hc_killed", kt_env("KEEL_TEST_PG"));
    keel_pg *pg = open_pg(conninfo, NULL, 10 * KT_S);
    PGconn *d = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    ck_assert_int_eq(kt_pg_number(d, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                                      " WHERE application_name = 'kt_hc_killed'"),
                     1);
    PQfinish(d);
    ck_assert_int_eq(keel_pg_check(pg), 0);
    keel_pg_host_stats st;
    keel_pg_host_stats_get(pg, 0, &st);
    ck_assert_int_eq(st.role, KEEL_PG_ROLE_PRIMARY);
    char v[8];
    value(pg, KEEL_PG_WRITE, "SELECT 1", v, sizeof v);
    keel_pg_destroy(pg);
}
END_TEST

/* The check's own connection is no pooled one: when it is lost, the
 * check asks again on a new one, and the host's pooled connections,
 * healthy, stay (they used to be retired, as if a pooled one was lost). */
START_TEST(a_lost_check_connection_leaves_the_pool_alone)
{
    char conninfo[256];
    snprintf(conninfo, sizeof conninfo, "%s application_name=kt_hc_pool", kt_env("KEEL_TEST_PG"));
    keel_pg *pg = open_pg(conninfo, NULL, 10 * KT_S);
    char v[8];
    value(pg, KEEL_PG_WRITE, "SELECT 1", v, sizeof v); /* one pooled connection */
    keel_pg_host_stats before, st;
    keel_pg_host_stats_get(pg, 0, &before);
    PGconn *d = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    const char *check = "application_name = 'kt_hc_pool' AND query LIKE 'SELECT pg_is_in_recovery()%'";
    char sql[256];
    snprintf(sql, sizeof sql, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE %s",
             check);
    ck_assert_int_eq(kt_pg_number(d, sql), 1);
    snprintf(sql, sizeof sql, "SELECT count(*) FROM pg_stat_activity WHERE %s", check);
    for (int i = 0; i < 500 && kt_pg_number(d, sql) != 0; i++)
        kt_nap(10 * MS);
    PQfinish(d);
    kt_nap(50 * MS); /* the backend has gone: its socket closes as it exits */
    ck_assert_int_eq(keel_pg_check(pg), 0);
    keel_pg_host_stats_get(pg, 0, &st);
    ck_assert_uint_eq(st.connects, before.connects + 1); /* the check's new one */
    value(pg, KEEL_PG_WRITE, "SELECT 1", v, sizeof v);
    keel_pg_host_stats_get(pg, 0, &st);
    ck_assert_uint_eq(st.connects, before.connects + 1); /* the pooled one, kept */
    keel_pg_destroy(pg);
}
END_TEST

/* A connect refused for the server's connection limit (too_many_connections)
 * fails only that call: the server is up, serving the pool's other
 * connections, so the host is not taken down and writes go on. */
static char connect_log[512];
static void capture_connect(keel_log_level level, const char *module, const char *msg, void *ud)
{
    (void)level, (void)ud;
    if (strcmp(module, "pg") == 0 && strstr(msg, "connect:"))
        snprintf(connect_log, sizeof connect_log, "%s", msg);
}

/* A keel_pg on the primary as a role with room for two connections: the
 * check's and one; *admin, when given, is a connection as the usual user. */
static keel_pg *open_limited(PGconn **admin)
{
    PGconn *d = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    kt_pg_exec(d, "SET client_min_messages = warning; DROP ROLE IF EXISTS kt_limited");
    kt_pg_exec(d, "CREATE ROLE kt_limited LOGIN CONNECTION LIMIT 2");
    if (admin)
        *admin = d;
    else
        PQfinish(d);
    char conninfo[256];
    snprintf(conninfo, sizeof conninfo, "%s user=kt_limited", kt_env("KEEL_TEST_PG"));
    return open_pg(conninfo, NULL, 10 * KT_S);
}

START_TEST(a_connect_refused_for_the_connection_limit_leaves_the_host_up)
{
    keel_pg *pg = open_limited(NULL);
    keel_pg_conn *c, *c2;
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c), 0);
    keel_set_log(capture_connect, KEEL_LOG_WARN, NULL);
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c2), KEEL_EUNAVAIL);
    keel_set_log(NULL, KEEL_LOG_WARN, NULL);
    keel_pg_release(c);
    char v[8];
    value(pg, KEEL_PG_WRITE, "SELECT 1", v, sizeof v); /* the pooled connection serves */
    ck_assert_str_eq(v, "1");
    /* the log says why, on one line */
    ck_assert_msg(strstr(connect_log, "53300") && !strchr(connect_log, '\n'), "logged: %s", connect_log);
    keel_pg_destroy(pg);
}
END_TEST

/* So is the health check's own connect: a host whose check connection was
 * lost, and whose connection limit is taken by the pool, stays what it was
 * (a primary here) instead of going down. */
START_TEST(a_check_refused_for_the_connection_limit_leaves_the_host_as_it_was)
{
    PGconn *d;
    keel_pg *pg = open_limited(&d);
    keel_pg_conn *c, *c2;
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c), 0);
    char sql[200]; /* every kt_limited session but c's: the check's (waiting until it is gone) */
    snprintf(sql, sizeof sql,
             "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = 'kt_limited' AND pid <> %d",
             PQbackendPID(keel_pg_conn_raw(c)));
    kt_pg_exec(d, sql);
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c2), 0); /* the place the check had */
    keel_pg_check(pg);
    keel_pg_host_stats st;
    keel_pg_host_stats_get(pg, 0, &st);
    ck_assert_int_eq(st.role, KEEL_PG_ROLE_PRIMARY);
    /* the check's lost connection retired c and c2 (made before it): they
     * are closed at release, and their places free once the server has
     * seen them go */
    keel_pg_release(c2);
    keel_pg_release(c);
    for (int i = 0; i < 500; i++) {
        PGresult *r = PQexec(d, "SELECT count(*) FROM pg_stat_activity WHERE usename = 'kt_limited'");
        bool free_place = PQresultStatus(r) == PGRES_TUPLES_OK && atoi(PQgetvalue(r, 0, 0)) < 2;
        PQclear(r);
        if (free_place)
            break;
        kt_nap(10 * KT_MS);
    }
    PQfinish(d);
    char v[8];
    value(pg, KEEL_PG_WRITE, "SELECT 1", v, sizeof v);
    ck_assert_str_eq(v, "1");
    keel_pg_destroy(pg);
}
END_TEST

static void *busy_client(void *arg)
{
    keel_pg *pg = arg;
    for (int i = 0; i < 200; i++) {
        PGresult *r;
        int rc = keel_pg_exec(pg, i % 2 ? KEEL_PG_READ : KEEL_PG_WRITE, "SELECT 1", NULL, &r);
        ck_assert_int_eq(rc, 0);
        PQclear(r);
    }
    return NULL;
}

START_TEST(the_health_thread_checks_by_itself)
{
    keel_pg *pg;
    const char *replicas[1] = {kt_env("KEEL_TEST_PG_REPLICA")};
    keel_metrics *m;
    ck_assert_int_eq(keel_metrics_create(&m, &(keel_metrics_opts){0}), 0);
    keel_pg_opts o = {.primary = kt_env("KEEL_TEST_PG"), .replicas = replicas, .nreplicas = 1,
                      .health_interval_ns = 20 * MS, .metrics = m};
    ck_assert_int_eq(keel_pg_create(&pg, &o), 0);
    keel_pg_host_stats st = {0};
    for (int i = 0; i < 500 && st.checks < 3; i++) { /* a real thread: wait for it, 10 s at most */
        nanosleep(&(struct timespec){0, 20 * MS}, NULL);
        keel_pg_host_stats_get(pg, 1, &st);
    }
    ck_assert_uint_ge(st.checks, 3);
    ck_assert_int_eq(st.role, KEEL_PG_ROLE_REPLICA);
    /* clients and the thread at once (for the sanitizers' eyes) */
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&t[i], NULL, busy_client, pg);
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
    char *text;
    ck_assert_int_eq(keel_metrics_render_buf(m, KEEL_METRICS_PROMETHEUS, &text, NULL), 0);
    char want[256];
    keel_pg_host_stats_get(pg, 0, &st);
    snprintf(want, sizeof want, "keel_pg_host_primary{pg=\"default\",host=\"%s\"} 1", st.name);
    ck_assert_msg(strstr(text, want), "no %s in\n%s", want, text);
    keel_free(text);
    keel_pg_destroy(pg);
    keel_metrics_destroy(m);
}
END_TEST

/* ---- waits bounded by the timeouts, in real time ---- */

/* With every connection of a host leased, an acquire waits
 * acquire_timeout_ns for one (a READ on the replica, then on the write
 * host) and gives up with KEEL_ETIMEDOUT; a connection given back serves
 * the next one. */
START_TEST(an_acquire_with_every_connection_leased_times_out)
{
    const char *replicas[1] = {kt_env("KEEL_TEST_PG_REPLICA")};
    keel_pg_opts o = {.primary = kt_env("KEEL_TEST_PG"), .replicas = replicas, .nreplicas = 1,
                      .conns_per_host = 1, .acquire_timeout_ns = 50 * MS,
                      .connect_timeout_ns = 2 * KT_S, .manual_health = 1, .clock = kt_clock_now,
                      .clock_ud = &clk};
    keel_pg *pg;
    ck_assert_int_eq(keel_pg_create(&pg, &o), 0);
    ck_assert_int_eq(keel_pg_check(pg), 0);
    keel_pg_conn *w, *rd, *x = (keel_pg_conn *)&x;
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &w), 0);
    ck_assert_uint_eq(keel_pg_conn_host(w), 0);
    uint64_t t0 = keel_now_ns();
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &x), KEEL_ETIMEDOUT);
    uint64_t took = keel_now_ns() - t0;
    ck_assert_ptr_null(x);
    ck_assert_uint_ge(took, 50 * MS);
    ck_assert_uint_lt(took, 3 * KT_S);
    PGresult *r;
    ck_assert_int_eq(keel_pg_exec(pg, KEEL_PG_WRITE, "SELECT 1", NULL, &r), KEEL_ETIMEDOUT);
    ck_assert_ptr_null(r);

    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_READ, &rd), 0);
    ck_assert_uint_eq(keel_pg_conn_host(rd), 1);
    t0 = keel_now_ns();
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_READ, &x), KEEL_ETIMEDOUT);
    took = keel_now_ns() - t0;
    ck_assert_uint_ge(took, 100 * MS); /* the replica's wait, then the write host's */
    ck_assert_uint_lt(took, 3 * KT_S);

    /* a timed-out wait takes nothing down: a connection given back serves */
    keel_pg_release(w);
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_READ, &x), 0);
    ck_assert_uint_eq(keel_pg_conn_host(x), 0);
    keel_pg_release(x);
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &x), 0);
    ck_assert_uint_eq(keel_pg_conn_host(x), 0);
    ck_assert_int_eq(in_recovery(x), 0);
    keel_pg_release(x);
    keel_pg_release(rd);
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_READ, &x), 0);
    ck_assert_uint_eq(keel_pg_conn_host(x), 1);
    ck_assert_int_eq(in_recovery(x), 1);
    keel_pg_release(x);
    keel_pg_destroy(pg);
}
END_TEST

/* A host that takes the TCP connection and never says a word (a frozen
 * server, a black hole behind a proxy): libpq would wait for ever for the
 * answer to its startup packet; keel_pg gives up at connect_timeout_ns
 * with KEEL_EUNAVAIL and skips the host for one health interval (of the
 * library's clock), then tries it again. */
START_TEST(a_host_that_never_answers_times_out_connecting)
{
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    ck_assert_int_ge(lfd, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t salen = sizeof sa;
    ck_assert_int_eq(bind(lfd, (struct sockaddr *)&sa, sizeof sa), 0);
    ck_assert_int_eq(listen(lfd, 8), 0); /* never accepted: the kernel completes connects */
    ck_assert_int_eq(getsockname(lfd, (struct sockaddr *)&sa, &salen), 0);
    char conninfo[128];
    snprintf(conninfo, sizeof conninfo, "host=127.0.0.1 port=%d user=keel dbname=postgres",
             ntohs(sa.sin_port));
    keel_pg_opts o = {.primary = conninfo, .connect_timeout_ns = 200 * MS,
                      .acquire_timeout_ns = 5 * KT_S, .health_interval_ns = 1 * KT_S,
                      .manual_health = 1, .clock = kt_clock_now, .clock_ud = &clk};
    keel_pg *pg;
    ck_assert_int_eq(keel_pg_create(&pg, &o), 0);
    PGresult *r;
    uint64_t t0 = keel_now_ns();
    ck_assert_int_eq(keel_pg_exec(pg, KEEL_PG_WRITE, "SELECT 1", NULL, &r), KEEL_EUNAVAIL);
    uint64_t took = keel_now_ns() - t0;
    ck_assert_ptr_null(r);
    ck_assert_uint_ge(took, 200 * MS);
    ck_assert_uint_lt(took, 3 * KT_S);
    keel_pg_host_stats st;
    keel_pg_host_stats_get(pg, 0, &st);
    ck_assert_uint_eq(st.conn_failures, 1);
    ck_assert_uint_eq(st.connects, 0);

    /* skipped now, at once, until the interval has passed */
    t0 = keel_now_ns();
    ck_assert_int_eq(keel_pg_exec(pg, KEEL_PG_WRITE, "SELECT 1", NULL, &r), KEEL_EUNAVAIL);
    ck_assert_uint_lt(keel_now_ns() - t0, 150 * MS);
    keel_pg_host_stats_get(pg, 0, &st);
    ck_assert_uint_eq(st.conn_failures, 1);
    kt_clock_advance(&clk, 1 * KT_S);
    t0 = keel_now_ns();
    ck_assert_int_eq(keel_pg_exec(pg, KEEL_PG_WRITE, "SELECT 1", NULL, &r), KEEL_EUNAVAIL);
    took = keel_now_ns() - t0;
    ck_assert_uint_ge(took, 200 * MS);
    ck_assert_uint_lt(took, 3 * KT_S);
    keel_pg_host_stats_get(pg, 0, &st);
    ck_assert_uint_eq(st.conn_failures, 2);

    /* the health check's own connect is bounded the same way */
    t0 = keel_now_ns();
    ck_assert_int_eq(keel_pg_check(pg), KEEL_EUNAVAIL);
    took = keel_now_ns() - t0;
    ck_assert_uint_ge(took, 200 * MS);
    ck_assert_uint_lt(took, 3 * KT_S);
    keel_pg_host_stats_get(pg, 0, &st);
    ck_assert_int_eq(st.role, KEEL_PG_ROLE_DOWN);
    ck_assert_uint_eq(st.check_failures, 1);
    keel_pg_destroy(pg);
    close(lfd);
}
END_TEST

/* ---- failover, on servers of its own ---- */

static kt_private priv;
static void priv_start(void) { kt_private_start(&priv); }
static void priv_stop(void) { kt_private_stop(&priv); }

START_TEST(writes_follow_a_promoted_replica)
{
    keel_pg *pg = open_pg(priv.pg, priv.pg_replica, 5 * KT_S);
    write_sql(pg, "CREATE TABLE kt_fo (v int)");
    write_sql(pg, "INSERT INTO kt_fo VALUES (1)");
    kt_private_server(&priv, "stop-one", "pg-primary");
    /* a write that lost its server is not retried: its outcome is unknown */
    PGresult *r;
    ck_assert_int_eq(keel_pg_exec(pg, KEEL_PG_WRITE, "INSERT INTO kt_fo VALUES (2)", NULL, &r),
                     KEEL_EUNAVAIL);
    ck_assert_int_eq(keel_pg_check(pg), KEEL_EUNAVAIL); /* no primary now */
    ck_assert_int_eq(keel_pg_exec(pg, KEEL_PG_WRITE, "INSERT INTO kt_fo VALUES (2)", NULL, &r),
                     KEEL_EUNAVAIL);
    char v[16];
    value(pg, KEEL_PG_READ, "SELECT count(*) FROM kt_fo", v, sizeof v); /* reads go on */
    ck_assert_str_eq(v, "1");

    kt_private_server(&priv, "promote", "pg-replica");
    ck_assert_int_eq(keel_pg_check(pg), 0);
    keel_pg_host_stats st;
    keel_pg_host_stats_get(pg, 1, &st);
    ck_assert_int_eq(st.role, KEEL_PG_ROLE_PRIMARY);
    value(pg, KEEL_PG_AUTO, "INSERT INTO kt_fo VALUES (2) RETURNING pg_is_in_recovery()", v,
          sizeof v);
    ck_assert_str_eq(v, "f");

    /* the old primary comes back on its old timeline: fenced, unused */
    kt_private_server(&priv, "start-one", "pg-primary");
    ck_assert_int_eq(keel_pg_check(pg), 0);
    keel_pg_host_stats_get(pg, 0, &st);
    ck_assert_int_eq(st.role, KEEL_PG_ROLE_FENCED);
    value(pg, KEEL_PG_WRITE, "SELECT count(*) FROM kt_fo", v, sizeof v);
    ck_assert_str_eq(v, "2");
    value(pg, KEEL_PG_READ, "SELECT count(*) FROM kt_fo", v, sizeof v);
    ck_assert_str_eq(v, "2"); /* no replica left: the write host serves reads */

    /* the new primary goes too: the old one, on an older timeline, must
     * still never take writes (split brain) */
    kt_private_server(&priv, "stop-one", "pg-replica");
    ck_assert_int_eq(keel_pg_check(pg), KEEL_EUNAVAIL);
    ck_assert_int_eq(keel_pg_exec(pg, KEEL_PG_WRITE, "INSERT INTO kt_fo VALUES (3)", NULL, &r),
                     KEEL_EUNAVAIL);
    keel_pg_host_stats_get(pg, 0, &st);
    ck_assert_int_eq(st.role, KEEL_PG_ROLE_FENCED);
    keel_pg_destroy(pg);
}
END_TEST

/* A replica over the lag limit when the primary went: while no host takes
 * writes its lag used to stay as it was, so once it had replayed all the
 * primary ever flushed it still served no read for the whole outage. Its
 * lag is measured against the positions remembered before, and only goes
 * down: the time passing with no write host is no lag. */
START_TEST(a_replica_that_catches_up_with_no_write_host_serves_reads)
{
    keel_pg *pg = open_pg(priv.pg, priv.pg_replica, 5 * KT_S);
    PGconn *rep = kt_pg_connect(priv.pg_replica);
    kt_pg_exec(rep, "SELECT pg_wal_replay_pause()");
    PGconn *prim = kt_pg_connect(priv.pg);
    kt_pg_exec(prim, "SET synchronous_commit = on; CREATE TABLE kt_nw (v int);"
                     " INSERT INTO kt_nw VALUES (1)");
    PQfinish(prim);
    ck_assert_int_eq(keel_pg_check(pg), 0);
    kt_clock_advance(&clk, 3 * KT_S);
    ck_assert_int_eq(keel_pg_check(pg), 0);
    keel_pg_host_stats st;
    keel_pg_host_stats_get(pg, 1, &st);
    ck_assert_uint_ge(st.lag_ns, 3 * KT_S);
    ck_assert_int_eq(st.readable, 0);

    kt_private_server(&priv, "stop-one", "pg-primary");
    ck_assert_int_eq(keel_pg_check(pg), KEEL_EUNAVAIL);
    keel_pg_host_stats_get(pg, 1, &st);
    ck_assert_uint_ge(st.lag_ns, 3 * KT_S); /* still behind what it was behind */
    ck_assert_int_eq(st.readable, 0);

    kt_pg_exec(rep, "SELECT pg_wal_replay_resume()");
    for (int i = 0; i < 200 && !st.readable; i++) { /* replays in real time: 10 s at most */
        kt_nap(50 * MS);
        ck_assert_int_eq(keel_pg_check(pg), KEEL_EUNAVAIL);
        keel_pg_host_stats_get(pg, 1, &st);
    }
    ck_assert_msg(st.readable, "lag %llu ns after replaying all", (unsigned long long)st.lag_ns);
    ck_assert_uint_eq(st.lag_ns, 0);
    char v[16];
    value(pg, KEEL_PG_READ, "SELECT count(*) FROM kt_nw", v, sizeof v);
    ck_assert_str_eq(v, "1");
    /* a minute with no write host: no position to be behind, no lag */
    kt_clock_advance(&clk, 60 * KT_S);
    ck_assert_int_eq(keel_pg_check(pg), KEEL_EUNAVAIL);
    keel_pg_host_stats_get(pg, 1, &st);
    ck_assert_uint_eq(st.lag_ns, 0);
    ck_assert_int_eq(st.readable, 1);
    PQfinish(rep);
    keel_pg_destroy(pg);
}
END_TEST

/* A replica down while the primary wrote, back while no host takes
 * writes: it kept the lag it had before it went down, and with no write
 * host a lag only went down (min of the old and the new), so it served a
 * minute-old table although the limit is 1 s. Its lag is measured against
 * the positions remembered, as of the last check that saw a write host.
 * A replica never seen beside a write host has no lag to tell: unknown
 * (UINT64_MAX), not readable. */
START_TEST(a_replica_back_with_no_write_host_keeps_its_lag)
{
    keel_pg *pg = open_pg(priv.pg, priv.pg_replica, 5 * KT_S);
    PGconn *prim = kt_pg_connect(priv.pg);
    kt_pg_exec(prim, "SET synchronous_commit = on; CREATE TABLE kt_st (v int);"
                     " INSERT INTO kt_st VALUES (1)");
    PGconn *rep = kt_pg_connect(priv.pg_replica);
    for (int i = 0; i < 500 && !kt_pg_number(rep, "SELECT count(*) FROM pg_class"
                                                 " WHERE relname = 'kt_st'"); i++)
        kt_nap(10 * MS);
    PQfinish(rep);
    ck_assert_int_eq(keel_pg_check(pg), 0);
    keel_pg_host_stats st;
    keel_pg_host_stats_get(pg, 1, &st);
    ck_assert_int_eq(st.readable, 1);

    kt_private_server(&priv, "stop-one", "pg-replica");
    ck_assert_int_eq(keel_pg_check(pg), 0);
    for (int i = 0; i < 12; i++) { /* a minute of writes the replica misses */
        kt_pg_exec(prim, "INSERT INTO kt_st SELECT generate_series(1, 100)");
        kt_clock_advance(&clk, 5 * KT_S);
        ck_assert_int_eq(keel_pg_check(pg), 0);
    }
    PQfinish(prim);
    kt_private_server(&priv, "stop-one", "pg-primary");
    kt_private_server(&priv, "start-one", "pg-replica");
    ck_assert_int_eq(keel_pg_check(pg), KEEL_EUNAVAIL);
    keel_pg_host_stats_get(pg, 1, &st);
    ck_assert_int_eq(st.role, KEEL_PG_ROLE_REPLICA);
    ck_assert_uint_ge(st.lag_ns, 50 * KT_S);
    ck_assert_int_eq(st.readable, 0);
    kt_clock_advance(&clk, 60 * KT_S); /* the time with no write host is no lag */
    ck_assert_int_eq(keel_pg_check(pg), KEEL_EUNAVAIL);
    keel_pg_host_stats_get(pg, 1, &st);
    ck_assert_uint_ge(st.lag_ns, 50 * KT_S);
    ck_assert_uint_lt(st.lag_ns, 65 * KT_S);
    PGresult *r;
    ck_assert_int_eq(keel_pg_exec(pg, KEEL_PG_READ, "SELECT count(*) FROM kt_st", NULL, &r),
                     KEEL_EUNAVAIL);
    keel_pg_destroy(pg);

    /* first seen during the outage */
    const char *replicas[1] = {priv.pg_replica};
    keel_pg_opts o = {.primary = priv.pg, .replicas = replicas, .nreplicas = 1,
                      .connect_timeout_ns = 2 * KT_S, .manual_health = 1,
                      .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_pg_create(&pg, &o), 0);
    ck_assert_int_eq(keel_pg_check(pg), KEEL_EUNAVAIL);
    keel_pg_host_stats_get(pg, 1, &st);
    ck_assert_int_eq(st.role, KEEL_PG_ROLE_REPLICA);
    ck_assert_uint_eq(st.lag_ns, UINT64_MAX);
    ck_assert_int_eq(st.readable, 0);
    ck_assert_int_eq(keel_pg_exec(pg, KEEL_PG_READ, "SELECT count(*) FROM kt_st", NULL, &r),
                     KEEL_EUNAVAIL);
    keel_pg_destroy(pg);
}
END_TEST

/* The old primary, restarted as a standby of the promoted replica without
 * pg_rewind, is in recovery on a history of its own: it went on past the
 * point where the replica was promoted, and never follows the new
 * timeline. It used to be taken for a replica with no lag (its position
 * is past the new primary's), served reads of rows the new primary never
 * had, and read-your-writes trusted it. A replica on another timeline
 * than the write host's, or ahead of it, serves nothing. */
START_TEST(a_diverged_standby_serves_no_reads)
{
    keel_pg *pg = open_pg(priv.pg, priv.pg_replica, 5 * KT_S);
    write_sql(pg, "CREATE TABLE kt_dv (v int)");
    write_sql(pg, "INSERT INTO kt_dv VALUES (1)");
    uint64_t lsn;
    ck_assert_int_eq(keel_pg_write_lsn(pg, &lsn), 0);
    keel_pg_conn *c;
    ck_assert_int_eq(keel_pg_acquire_after(pg, lsn, 20 * KT_S, &c), 0);
    ck_assert_uint_eq(keel_pg_conn_host(c), 1); /* the replica has the row */
    keel_pg_release(c);
    /* the replica is cut off, the primary goes on alone, then dies */
    PGconn *rep = kt_pg_connect(priv.pg_replica);
    kt_pg_exec(rep, "ALTER SYSTEM SET primary_conninfo = ''");
    kt_pg_exec(rep, "SELECT pg_reload_conf()");
    for (int i = 0; i < 500 && kt_pg_number(rep, "SELECT count(*) FROM pg_stat_wal_receiver"); i++)
        kt_nap(20 * MS);
    ck_assert_int_eq(kt_pg_number(rep, "SELECT count(*) FROM pg_stat_wal_receiver"), 0);
    PQfinish(rep);
    PGconn *prim = kt_pg_connect(priv.pg);
    kt_pg_exec(prim, "SET synchronous_commit = on; INSERT INTO kt_dv SELECT generate_series(2, 100)");
    PQfinish(prim);
    kt_private_server(&priv, "stop-one", "pg-primary");
    kt_private_server(&priv, "promote", "pg-replica");
    /* and comes back as a standby of the new primary, not rewound */
    char path[700];
    snprintf(path, sizeof path, "%s/pg-primary/data/standby.signal", priv.dir);
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fclose(f);
    snprintf(path, sizeof path, "%s/pg-primary/data/postgresql.auto.conf", priv.dir);
    ck_assert_ptr_nonnull(f = fopen(path, "a"));
    fprintf(f, "primary_conninfo = '%s'\n", priv.pg_replica);
    fclose(f);
    kt_private_server(&priv, "start-one", "pg-primary");

    ck_assert_int_eq(keel_pg_check(pg), 0);
    keel_pg_host_stats old, now;
    keel_pg_host_stats_get(pg, 0, &old);
    keel_pg_host_stats_get(pg, 1, &now);
    ck_assert_int_eq(now.role, KEEL_PG_ROLE_PRIMARY);
    ck_assert_int_eq(old.role, KEEL_PG_ROLE_REPLICA);
    ck_assert_uint_gt(old.lsn, now.lsn); /* ahead of the write host... */
    ck_assert_int_eq(old.readable, 0);   /* ...so on a history of its own */
    char v[16];
    value(pg, KEEL_PG_READ, "SELECT count(*) FROM kt_dv", v, sizeof v);
    ck_assert_str_eq(v, "1"); /* the write host's rows, not the old primary's 100 */
    write_sql(pg, "INSERT INTO kt_dv VALUES (-1)");
    ck_assert_int_eq(keel_pg_write_lsn(pg, &lsn), 0);
    ck_assert_int_eq(keel_pg_acquire_after(pg, lsn, 1 * KT_S, &c), 0);
    ck_assert_uint_eq(keel_pg_conn_host(c), 1);
    keel_pg_release(c);

    /* the new primary goes past the old one's position: its timeline
     * still tells it apart */
    for (int i = 0; i < 100 && now.lsn <= old.lsn; i++) {
        write_sql(pg, "INSERT INTO kt_dv SELECT generate_series(1, 1000)");
        ck_assert_int_eq(keel_pg_check(pg), 0);
        keel_pg_host_stats_get(pg, 0, &old);
        keel_pg_host_stats_get(pg, 1, &now);
    }
    ck_assert_uint_gt(now.lsn, old.lsn);
    ck_assert_int_eq(old.role, KEEL_PG_ROLE_REPLICA);
    ck_assert_int_eq(old.readable, 0);
    value(pg, KEEL_PG_READ, "SELECT pg_is_in_recovery()", v, sizeof v);
    ck_assert_str_eq(v, "f");
    ck_assert_int_eq(keel_pg_write_lsn(pg, &lsn), 0);
    ck_assert_int_eq(keel_pg_acquire_after(pg, old.lsn, 1 * KT_S, &c), 0);
    ck_assert_uint_eq(keel_pg_conn_host(c), 1);
    keel_pg_release(c);
    keel_pg_destroy(pg);
}
END_TEST

/* The health thread alone (nobody calls keel_pg_check()) sees the
 * primary go and the replica promoted, and the next write goes to the
 * promoted server. The test only reads the hosts' roles while it waits:
 * no call of its own could wake the thread. */
static bool wait_role(keel_pg *pg, size_t host, keel_pg_role role, uint64_t ns)
{
    uint64_t deadline = keel_now_ns() + ns;
    keel_pg_host_stats st;
    for (;;) {
        keel_pg_host_stats_get(pg, host, &st);
        if (st.role == role)
            return true;
        if (keel_now_ns() >= deadline)
            return false;
        kt_nap(10 * MS);
    }
}

START_TEST(the_health_thread_alone_follows_a_promoted_replica)
{
    const char *replicas[1] = {priv.pg_replica};
    keel_pg_opts o = {.primary = priv.pg, .replicas = replicas, .nreplicas = 1,
                      .connect_timeout_ns = 2 * KT_S, .acquire_timeout_ns = 2 * KT_S,
                      .query_timeout_ns = 5 * KT_S, .health_interval_ns = 50 * MS};
    keel_pg *pg;
    ck_assert_int_eq(keel_pg_create(&pg, &o), 0);
    ck_assert_msg(wait_role(pg, 0, KEEL_PG_ROLE_PRIMARY, 10 * KT_S), "primary not seen in 10 s");
    ck_assert_msg(wait_role(pg, 1, KEEL_PG_ROLE_REPLICA, 10 * KT_S), "replica not seen in 10 s");
    write_sql(pg, "CREATE TABLE kt_afo (v int)");
    write_sql(pg, "INSERT INTO kt_afo VALUES (1)");

    kt_private_server(&priv, "stop-one", "pg-primary");
    ck_assert_msg(wait_role(pg, 0, KEEL_PG_ROLE_DOWN, 10 * KT_S), "stopped primary not seen down in 10 s");
    PGresult *r;
    ck_assert_int_eq(keel_pg_exec(pg, KEEL_PG_WRITE, "INSERT INTO kt_afo VALUES (2)", NULL, &r),
                     KEEL_EUNAVAIL); /* no write host, nothing promoted yet */

    kt_private_server(&priv, "promote", "pg-replica");
    ck_assert_msg(wait_role(pg, 1, KEEL_PG_ROLE_PRIMARY, 10 * KT_S),
                  "promoted replica not seen as the primary in 10 s");
    keel_pg_conn *c;
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c), 0);
    ck_assert_uint_eq(keel_pg_conn_host(c), 1);
    ck_assert_int_eq(keel_pg_conn_exec(c, "INSERT INTO kt_afo VALUES (2) RETURNING pg_is_in_recovery()",
                                       NULL, &r), 0);
    ck_assert_str_eq(PQgetvalue(r, 0, 0), "f");
    PQclear(r);
    keel_pg_release(c);
    char v[16];
    value(pg, KEEL_PG_READ, "SELECT count(*) FROM kt_afo", v, sizeof v);
    ck_assert_str_eq(v, "2");
    keel_pg_destroy(pg);
}
END_TEST

/* ---- option values at their limits ---- */

/* Timeouts of any length (the header says so) are deadlines that saturate,
 * never ones that wrap into the past: a connect with UINT64_MAX to spare
 * still connects, and a query timeout that long still sets the client
 * check to its one-second cap. */
START_TEST(timeouts_of_any_length_do_not_wrap)
{
    keel_pg *pg;
    keel_pg_opts o = {.primary = kt_env("KEEL_TEST_PG"), .manual_health = 1,
                      .connect_timeout_ns = UINT64_MAX};
    ck_assert_int_eq(keel_pg_create(&pg, &o), 0);
    ck_assert_int_eq(keel_pg_check(pg), 0);
    char v[32], src[32];
    value(pg, KEEL_PG_WRITE, "SELECT 1", v, sizeof v);
    ck_assert_str_eq(v, "1");
    keel_pg_destroy(pg);

    o = (keel_pg_opts){.primary = kt_env("KEEL_TEST_PG"), .manual_health = 1,
                       .query_timeout_ns = UINT64_MAX};
    ck_assert_int_eq(keel_pg_create(&pg, &o), 0);
    ck_assert_int_eq(keel_pg_check(pg), 0);
    keel_pg_conn *c;
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c), 0);
    setting(c, "client_connection_check_interval", v, sizeof v, src, sizeof src);
    ck_assert_str_eq(v, "1s");
    keel_pg_release(c);
    keel_pg_destroy(pg);
}
END_TEST

/* A host whose connect failed is skipped for one interval, however long:
 * with UINT64_MAX, until a check finds it up (not tried again at once
 * because now + interval wrapped). */
START_TEST(a_down_host_is_skipped_for_an_interval_of_any_length)
{
    keel_pg *pg;
    keel_pg_opts o = {.primary = "host=127.0.0.1 port=1 dbname=x", .manual_health = 1,
                      .connect_timeout_ns = 200 * MS, .acquire_timeout_ns = 200 * MS,
                      .health_interval_ns = UINT64_MAX, .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_pg_create(&pg, &o), 0);
    keel_pg_conn *c;
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c), KEEL_EUNAVAIL);
    kt_clock_advance(&clk, 3600 * KT_S);
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c), KEEL_EUNAVAIL);
    keel_pg_host_stats st;
    ck_assert_int_eq(keel_pg_host_stats_get(pg, 0, &st), 0);
    ck_assert_uint_eq(st.conn_failures, 1); /* the second acquire did not try it */
    keel_pg_destroy(pg);
}
END_TEST

/* The health thread with an interval of UINT64_MAX checks once and then
 * waits, rather than finding every check due at once. */
START_TEST(the_health_thread_waits_an_interval_of_any_length)
{
    keel_pg *pg;
    keel_pg_opts o = {.primary = "host=127.0.0.1 port=1 dbname=x", .connect_timeout_ns = 200 * MS,
                      .health_interval_ns = UINT64_MAX};
    ck_assert_int_eq(keel_pg_create(&pg, &o), 0);
    keel_pg_host_stats st = {0};
    for (int i = 0; i < 500 && st.checks < 1; i++) { /* the first check, 10 s at most */
        kt_nap(20 * MS);
        keel_pg_host_stats_get(pg, 0, &st);
    }
    ck_assert_uint_eq(st.checks, 1);
    kt_nap(300 * MS);
    keel_pg_host_stats_get(pg, 0, &st);
    ck_assert_uint_eq(st.checks, 1);
    keel_pg_destroy(pg);
}
END_TEST

/* The server takes statement_timeout in whole milliseconds up to INT_MAX:
 * more is KEEL_EINVAL at create (the server would refuse every connection,
 * and UINT64_MAX rounded up used to wrap to 0, no limit); less than a
 * millisecond is rounded up, not down to 0. */
START_TEST(a_statement_timeout_is_whole_milliseconds_up_to_int_max)
{
    const uint64_t max = (uint64_t)INT_MAX * MS;
    const uint64_t over[] = {max + 1, max + MS, (uint64_t)UINT32_MAX * MS, UINT64_MAX};
    for (size_t i = 0; i < sizeof over / sizeof over[0]; i++) {
        keel_pg *pg = (keel_pg *)0x1;
        keel_pg_opts o = {.primary = "host=h", .manual_health = 1, .statement_timeout_ns = over[i]};
        ck_assert_msg(keel_pg_create(&pg, &o) == KEEL_EINVAL, "accepted %llu ns",
                      (unsigned long long)over[i]);
        ck_assert_ptr_null(pg);
    }
    const struct {
        uint64_t ns;
        const char *shown;
    } ok[] = {{max, "2147483647ms"}, {1, "1ms"}};
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        keel_pg *pg;
        keel_pg_opts o = {.primary = kt_env("KEEL_TEST_PG"), .manual_health = 1,
                          .statement_timeout_ns = ok[i].ns};
        ck_assert_int_eq(keel_pg_create(&pg, &o), 0);
        char v[32];
        value(pg, KEEL_PG_WRITE, "SHOW statement_timeout", v, sizeof v);
        ck_assert_str_eq(v, ok[i].shown);
        keel_pg_destroy(pg);
    }
}
END_TEST

/* Values libpq parses but would refuse at every connect are refused at
 * create, as a malformed conninfo is: not a host marked down at each call. */
START_TEST(conninfo_values_libpq_would_refuse_are_refused)
{
    /* libpq 15 reads a port as strtol does, spaces around it allowed (an
     * error ends the connect when it reaches that host), and skips a host
     * whose port is out of range: refused only when no host is reached
     * with a port it can use */
    const char *bad[] = {"port=abc", "port=0", "port=65536", "port=5432x", "port=-1",
                         "postgresql://h:99999/db", "host=a sslmode=bogus",
                         "target_session_attrs=nonsense", "host=a,b port=1,2,3",
                         "host=a,b,c port=1,2", "host=a,b port=x,1",
                         "host=a hostaddr=127.0.0.1,127.0.0.2", "port=' '", "port='+ 1'",
                         "host=a,b port=0,99999", "host=a,b,c port=0,x,3",
                         "port=99999999999999999999", "port=2147483648", NULL};
    for (size_t i = 0; bad[i]; i++) {
        keel_pg *pg = (keel_pg *)0x1;
        keel_pg_opts o = {.primary = bad[i], .manual_health = 1};
        ck_assert_msg(keel_pg_create(&pg, &o) == KEEL_EINVAL, "accepted %s", bad[i]);
        ck_assert_ptr_null(pg);
        const char *replicas[1] = {bad[i]};
        o = (keel_pg_opts){.primary = "host=p", .replicas = replicas, .nreplicas = 1,
                           .manual_health = 1};
        ck_assert_msg(keel_pg_create(&pg, &o) == KEEL_EINVAL, "accepted replica %s", bad[i]);
    }
    const char *good[] = {"port=1", "port=65535", "port=", "host=a,b port=1", "host=a,b port=1,2",
                          "host=a,b port=1,", "host=a,b port=' 1, 2 '", "postgresql://h1:5433,h2:5434/db",
                          "postgresql://h1,h2:5434/db", "hostaddr=127.0.0.1,127.0.0.2 port=7",
                          "host=a sslmode=verify-full target_session_attrs=prefer-standby",
                          "sslmode=disable target_session_attrs=read-write", "port=+24330",
                          "port='24330\t'", "port='\t24330 '", "host=a,b port=24330,99999",
                          "host=a,b port=99999,24330", "host=a,b port=1,x", "host=a,b port='1, '",
                          "postgresql://a,b:99999/db", NULL};
    for (size_t i = 0; good[i]; i++) {
        keel_pg *pg;
        keel_pg_opts o = {.primary = good[i], .manual_health = 1};
        ck_assert_msg(keel_pg_create(&pg, &o) == 0, "refused %s", good[i]);
        keel_pg_destroy(pg);
    }
}
END_TEST

/* Two hosts are refused as one only when both name the address and the
 * port themselves: a service (expanded by libpq at connect, from
 * pg_service.conf) or PGHOST/PGPORT may make two conninfos that look
 * alike different servers, and they used to be refused as one server
 * given twice; so were two hostaddrs under one host name. Hosts whose
 * names are alike get names apart, for logs and metric labels. */
static int create_pair(const char *a, const char *b, keel_metrics *m, keel_pg **out)
{
    const char *replicas[1] = {b};
    keel_pg_opts o = {.primary = a, .replicas = replicas, .nreplicas = 1, .manual_health = 1,
                      .metrics = m};
    return keel_pg_create(out, &o);
}

START_TEST(hosts_that_may_differ_are_not_refused_as_one)
{
    const char *const differ[][2] = {
        {"service=prim dbname=postgres", "service=rep dbname=postgres"},
        {"postgresql:///postgres?service=prim", "postgresql:///postgres?service=rep"},
        {"host=db1 port=5432 service=prim", "host=db1 port=5432 service=rep"},
        {"host=db.example hostaddr=10.0.0.1", "host=db.example hostaddr=10.0.0.2"},
        {"host=db.example hostaddr=10.0.0.1 port=5432", "host=db.example hostaddr=10.0.0.2 port=5432"},
        {"host=db1", "host=db1 dbname=x"}, /* PGPORT may tell them apart... */
        {"port=5432", "port=5432 dbname=x"}, /* ...or PGHOST */
        {"dbname=a", "dbname=b"},
    };
    keel_metrics *m;
    ck_assert_int_eq(keel_metrics_create(&m, &(keel_metrics_opts){0}), 0);
    for (size_t i = 0; i < sizeof differ / sizeof differ[0]; i++) {
        keel_pg *pg;
        ck_assert_msg(create_pair(differ[i][0], differ[i][1], m, &pg) == 0, "refused %s | %s",
                      differ[i][0], differ[i][1]);
        keel_pg_host_stats a, b;
        keel_pg_host_stats_get(pg, 0, &a);
        keel_pg_host_stats_get(pg, 1, &b);
        ck_assert_str_ne(a.name, b.name);
        keel_pg_destroy(pg);
    }
    keel_metrics_destroy(m);
    const char *const same[][2] = {
        {"host=h port=1", "host=h port=1 dbname=x"},
        {"hostaddr=10.0.0.1 port=5432", "host=db hostaddr=10.0.0.1 port=5432"},
        {"postgresql://h:5433/a", "host=h port=5433 dbname=b"},
    };
    for (size_t i = 0; i < sizeof same / sizeof same[0]; i++) {
        keel_pg *pg;
        ck_assert_msg(create_pair(same[i][0], same[i][1], NULL, &pg) == KEEL_EINVAL,
                      "accepted %s | %s", same[i][0], same[i][1]);
    }
}
END_TEST

/* Hosts are told apart by their whole name and port, however long (a DNS
 * name has up to 253 bytes, a socket directory more), and so named. */
START_TEST(long_host_names_are_kept_whole)
{
    char a[300], b[300], ca[320], cb[320];
    memset(a, 'h', sizeof a - 2);
    memcpy(b, a, sizeof b - 2);
    strcpy(a + sizeof a - 2, "1");
    strcpy(b + sizeof b - 2, "2");
    snprintf(ca, sizeof ca, "host=%s port=7", a);
    snprintf(cb, sizeof cb, "host=%s port=7", b);
    const char *replicas[1] = {cb};
    keel_pg *pg;
    keel_pg_opts o = {.primary = ca, .replicas = replicas, .nreplicas = 1, .manual_health = 1};
    ck_assert_int_eq(keel_pg_create(&pg, &o), 0);
    char want[320];
    keel_pg_host_stats st;
    keel_pg_host_stats_get(pg, 1, &st);
    snprintf(want, sizeof want, "%s:7", b);
    ck_assert_str_eq(st.name, want);
    keel_pg_destroy(pg);
    replicas[0] = ca; /* the same host twice: still refused */
    ck_assert_int_eq(keel_pg_create(&pg, &o), KEEL_EINVAL);
}
END_TEST

/* The caller's fallback_application_name is the one the server sees;
 * libkeel's is only the fallback's fallback. */
START_TEST(the_callers_fallback_application_name_wins)
{
    const struct {
        const char *extra, *want;
    } cases[] = {{"", "libkeel"}, {" fallback_application_name=kt_app", "kt_app"},
                 {" application_name=kt_named", "kt_named"}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char ci[512];
        snprintf(ci, sizeof ci, "%s%s", kt_env("KEEL_TEST_PG"), cases[i].extra);
        keel_pg *pg = open_pg(ci, NULL, 0);
        char v[64];
        value(pg, KEEL_PG_WRITE,
              "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()", v,
              sizeof v);
        ck_assert_str_eq(v, cases[i].want);
        keel_pg_destroy(pg);
    }
}
END_TEST

/* queries counts the caller's statements, not libkeel's own: health
 * checks, the client check's set_config, a release's ROLLBACK. */
START_TEST(queries_counts_the_callers_statements_only)
{
    keel_pg *pg = open_pg(kt_env("KEEL_TEST_PG"), NULL, 10 * KT_S); /* one check */
    char v[8];
    value(pg, KEEL_PG_WRITE, "SELECT 1", v, sizeof v); /* after a set_config */
    keel_pg_conn *c;
    ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c), 0);
    PGresult *r;
    ck_assert_int_eq(keel_pg_conn_exec(c, "BEGIN", NULL, &r), 0);
    PQclear(r);
    keel_pg_release(c); /* rolled back */
    ck_assert_int_eq(keel_pg_check(pg), 0);
    keel_pg_host_stats st;
    keel_pg_host_stats_get(pg, 0, &st);
    ck_assert_uint_eq(st.queries, 2);
    keel_pg_destroy(pg);
}
END_TEST

/* A tcase on a primary and replica of its own (its test stops or
 * promotes them), in the suite s. */
static TCase *own_servers(Suite *s, const char *name)
{
    TCase *tc = tcase_create(name);
    tcase_set_timeout(tc, 120);
    tcase_add_unchecked_fixture(tc, priv_start, priv_stop);
    suite_add_tcase(s, tc);
    return tc;
}

int main(void)
{
    atomic_store(&clk.ns, 1000 * KT_S);
    Suite *s = suite_create("pg");
    TCase *offline = tcase_create("offline");
    tcase_add_test(offline, sql_is_classified_better_than_by_its_first_word);
    tcase_add_test(offline, malformed_conninfos_are_refused);
    suite_add_tcase(s, offline);

    TCase *opt = tcase_create("options");
    tcase_set_timeout(opt, 60);
    tcase_add_test(opt, timeouts_of_any_length_do_not_wrap);
    tcase_add_test(opt, a_down_host_is_skipped_for_an_interval_of_any_length);
    tcase_add_test(opt, the_health_thread_waits_an_interval_of_any_length);
    tcase_add_test(opt, a_statement_timeout_is_whole_milliseconds_up_to_int_max);
    tcase_add_test(opt, conninfo_values_libpq_would_refuse_are_refused);
    tcase_add_test(opt, hosts_that_may_differ_are_not_refused_as_one);
    tcase_add_test(opt, long_host_names_are_kept_whole);
    tcase_add_test(opt, the_callers_fallback_application_name_wins);
    tcase_add_test(opt, queries_counts_the_callers_statements_only);
    suite_add_tcase(s, opt);

    TCase *tc = tcase_create("servers");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, reads_reach_the_replica_and_writes_the_primary);
    tcase_add_test(tc, parameters_stay_data);
    tcase_add_test(tc, a_binary_parameter_of_negative_length_is_refused);
    tcase_add_test(tc, a_wrong_parameter_count_is_refused_and_the_connection_kept);
    tcase_add_test(tc, a_lagging_replica_sends_reads_to_the_primary);
    tcase_add_test(tc, a_replica_lag_is_measured_after_many_checks);
    tcase_add_test(tc, a_replica_keeping_up_under_writes_stays_readable);
    tcase_add_test(tc, read_your_writes_waits_for_the_replica_or_uses_the_primary);
    tcase_add_test(tc, read_your_writes_with_a_short_wait_keeps_the_replica_connection);
    tcase_add_test(tc, read_your_writes_with_no_replica_up_uses_the_primary_at_once);
    tcase_add_test(tc, read_your_writes_with_no_free_replica_connection_uses_the_primary_at_once);
    tcase_add_test(tc, a_batch_is_one_pipeline_and_all_or_nothing);
    tcase_add_test(tc, a_batch_on_a_busy_connection_is_refused);
    tcase_add_test(tc, statements_are_prepared_again_when_the_server_forgets);
    tcase_add_test(tc, a_statement_whose_columns_changed_is_prepared_again);
    tcase_add_test(tc, a_batch_that_committed_before_a_stale_statement_is_not_run_again);
    tcase_add_test(tc, a_one_call_copy_is_refused);
    tcase_add_test(tc, a_read_that_lost_its_connection_runs_again_and_a_write_never);
    tcase_add_test(tc, a_connect_refused_for_the_connection_limit_leaves_the_host_up);
    tcase_add_test(tc, a_check_refused_for_the_connection_limit_leaves_the_host_as_it_was);
    tcase_add_test(tc, release_rolls_back_and_drops_what_it_cannot_reuse);
    tcase_add_test(tc, freed_statements_are_deallocated_where_they_were_prepared);
    tcase_add_test(tc, freed_statement_ids_are_used_again_once_deallocated);
    tcase_add_test(tc, timeouts_client_and_server);
    tcase_add_test(tc, a_query_timeout_sets_the_client_check_after_connecting);
    tcase_add_test(tc, a_server_that_refuses_the_client_check_still_connects);
    tcase_add_test(tc, a_replica_that_hides_its_timeline_is_said_once);
    tcase_add_test(tc, a_stopped_replica_is_skipped);
    tcase_add_test(tc, a_check_whose_connection_was_killed_asks_again);
    tcase_add_test(tc, a_lost_check_connection_leaves_the_pool_alone);
    tcase_add_test(tc, the_health_thread_checks_by_itself);
    suite_add_tcase(s, tc);

    tcase_add_test(own_servers(s, "failover"), writes_follow_a_promoted_replica);

    TCase *tm = tcase_create("timeouts");
    tcase_set_timeout(tm, 60);
    tcase_add_test(tm, an_acquire_with_every_connection_leased_times_out);
    tcase_add_test(tm, a_host_that_never_answers_times_out_connecting);
    suite_add_tcase(s, tm);

    TCase *fz = tcase_create("frozen");
    tcase_set_timeout(fz, 60);
    tcase_add_unchecked_fixture(fz, NULL, resume_replica_backends);
    tcase_add_test(fz, read_your_writes_waits_no_longer_than_asked_on_a_silent_replica);
    tcase_add_test(fz, read_your_writes_takes_no_look_after_its_wait);
    suite_add_tcase(s, fz);

    /* servers of its own: the primary is stopped */
    tcase_add_test(own_servers(s, "nowriter"), a_replica_that_catches_up_with_no_write_host_serves_reads);

    /* servers of its own: both stopped in turn */
    tcase_add_test(own_servers(s, "stale"), a_replica_back_with_no_write_host_keeps_its_lag);

    /* servers of its own: a failover, the old primary not rewound */
    tcase_add_test(own_servers(s, "diverged"), a_diverged_standby_serves_no_reads);

    /* its own servers again: the failover above used up the first pair */
    tcase_add_test(own_servers(s, "autofailover"), the_health_thread_alone_follows_a_promoted_replica);
    return kt_run(s);
}
