/* tests/test_servers.c — the throwaway servers of tests/servers.sh are
 * real: every Redis node answers and is its own server, the replica
 * replicates the primary, and a test can stop and restart a server. */
#define _GNU_SOURCE
#include <hiredis/hiredis.h>
#include <libpq-fe.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <keel/common.h>

#include "harness.h"

static redisContext *redis_at(int i)
{
    char host[256];
    int port;
    kt_redis_node(i, host, sizeof host, &port);
    struct timeval tv = {2, 0};
    return redisConnectWithTimeout(host, port, tv);
}

static PGconn *pg(const char *var)
{
    PGconn *c = PQconnectdb(kt_env(var));
    ck_assert_msg(PQstatus(c) == CONNECTION_OK, "%s: %s", var, PQerrorMessage(c));
    return c;
}

static char *pg_value(PGconn *c, const char *sql)
{
    PGresult *r = PQexec(c, sql);
    ck_assert_msg(PQresultStatus(r) == PGRES_TUPLES_OK, "%s: %s", sql, PQerrorMessage(c));
    char *v = PQntuples(r) ? strdup(PQgetvalue(r, 0, 0)) : NULL;
    PQclear(r);
    return v;
}

START_TEST(every_redis_node_is_a_separate_live_server)
{
    int n = kt_redis_nodes();
    ck_assert_int_ge(n, 3);
    char ids[8][64] = {{0}};
    for (int i = 0; i < n && i < 8; i++) {
        redisContext *c = redis_at(i);
        ck_assert_msg(c && !c->err, "redis node %d: %s", i, c ? c->errstr : "no memory");
        redisReply *r = redisCommand(c, "INFO server");
        ck_assert(r && r->type == REDIS_REPLY_STRING);
        char *run_id = strstr(r->str, "run_id:");
        ck_assert_ptr_nonnull(run_id);
        snprintf(ids[i], sizeof ids[i], "%.*s", 47, run_id);
        for (int k = 0; k < i; k++)
            ck_assert_str_ne(ids[i], ids[k]);
        freeReplyObject(r);
        redisFree(c);
    }
}
END_TEST

START_TEST(a_redis_node_can_be_stopped_and_restarted)
{
    redisContext *c = redis_at(1);
    ck_assert(c && !c->err);
    redisReply *r = redisCommand(c, "SET kt:restart 1");
    ck_assert(r && r->type == REDIS_REPLY_STATUS);
    freeReplyObject(r);
    redisFree(c);

    kt_server("stop-one", "redis2");
    c = redis_at(1);
    ck_assert_msg(c && c->err, "redis2 still accepts connections after stop-one");
    redisFree(c);

    kt_server("start-one", "redis2");
    c = redis_at(1);
    ck_assert(c && !c->err);
    r = redisCommand(c, "PING");
    ck_assert(r && r->type == REDIS_REPLY_STATUS && strcmp(r->str, "PONG") == 0);
    freeReplyObject(r);
    redisFree(c);
}
END_TEST

START_TEST(the_replica_is_in_recovery_and_the_primary_is_not)
{
    PGconn *p = pg("KEEL_TEST_PG"), *r = pg("KEEL_TEST_PG_REPLICA");
    char *pv = pg_value(p, "SELECT pg_is_in_recovery()");
    char *rv = pg_value(r, "SELECT pg_is_in_recovery()");
    ck_assert_str_eq(pv, "f");
    ck_assert_str_eq(rv, "t");
    free(pv);
    free(rv);
    PQfinish(p);
    PQfinish(r);
}
END_TEST

START_TEST(a_row_written_on_the_primary_appears_on_the_replica)
{
    PGconn *p = pg("KEEL_TEST_PG"), *r = pg("KEEL_TEST_PG_REPLICA");
    PQclear(PQexec(p, "CREATE TABLE IF NOT EXISTS kt_replication (v text)"));
    char token[64], sql[160];
    snprintf(token, sizeof token, "%llu-%d", (unsigned long long)keel_wall_ns(), getpid());
    const char *params[1] = {token};
    PGresult *res = PQexecParams(p, "INSERT INTO kt_replication VALUES ($1)", 1, NULL,
                                 params, NULL, NULL, 0);
    ck_assert_msg(PQresultStatus(res) == PGRES_COMMAND_OK, "%s", PQerrorMessage(p));
    PQclear(res);

    /* Streaming replication is asynchronous: wait (for real, it is a real
     * server) until the row is there, up to 20 s. */
    snprintf(sql, sizeof sql, "SELECT count(*) FROM kt_replication WHERE v = '%s'", token);
    uint64_t deadline = keel_now_ns() + 20 * KT_S;
    int seen = 0;
    while (!seen && keel_now_ns() < deadline) {
        res = PQexec(r, sql);
        seen = PQresultStatus(res) == PGRES_TUPLES_OK && strcmp(PQgetvalue(res, 0, 0), "1") == 0;
        PQclear(res);
        if (!seen) {
            struct timespec ts = {0, 10 * 1000000};
            nanosleep(&ts, NULL);
        }
    }
    ck_assert_msg(seen, "row %s never reached the replica", token);

    /* And the replica refuses writes. */
    res = PQexec(r, "INSERT INTO kt_replication VALUES ('x')");
    ck_assert_int_eq(PQresultStatus(res), PGRES_FATAL_ERROR);
    ck_assert_str_eq(PQresultErrorField(res, PG_DIAG_SQLSTATE), "25006");
    PQclear(res);
    PQfinish(p);
    PQfinish(r);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("servers");
    TCase *tc = tcase_create("servers");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, every_redis_node_is_a_separate_live_server);
    tcase_add_test(tc, a_redis_node_can_be_stopped_and_restarted);
    tcase_add_test(tc, the_replica_is_in_recovery_and_the_primary_is_not);
    tcase_add_test(tc, a_row_written_on_the_primary_appears_on_the_replica);
    suite_add_tcase(s, tc);
    return kt_run(s);
}
