/* tests/test_oom_servers.c — the out-of-memory sweeps of tests/test_oom.c
 * (tests/oom.h) over the paths that talk to the servers of
 * tests/servers.sh: keel_redis and keel_pg themselves, and the limiter,
 * bus, cqrs and cache on them. Only libkeel's own allocations fail
 * (hiredis and libpq keep their own malloc). Every run must not crash;
 * the call that met the failure says so (or copes, where the module says
 * it does: marked at each call); the call made again succeeds; and once
 * the run's handles are destroyed no block is left. Each run names its
 * keys, channels, streams and rows apart (the process and a run
 * counter), so that what earlier runs left on the servers makes no later
 * run pass or fail. The backends a module's scenario stands on are made
 * with no failure (QUIETLY), and each of their connection pools used once
 * so that it has this thread's cache: their own sweeps come first.
 *
 * A connection pool (keel_pool) copes without a thread cache: the first
 * call on a node or host, which makes it, may meet a failure and still
 * succeed. So may a call that gives a connection back without memory
 * for a magazine: the pool closes it then. */
#define _GNU_SOURCE
#include <hiredis/hiredis.h>
#include <libpq-fe.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <keel/bus.h>
#include <keel/cache.h>
#include <keel/cqrs.h>
#include <keel/limiter.h>
#include <keel/pg.h>
#include <keel/redis.h>

#include "harness.h"
#include "oom.h"

/* Runs stmt with no allocation failing, or counted: for what a scenario
 * stands on rather than tests. Only while no other thread of the run
 * allocates. */
#define QUIETLY(stmt)                                                                              \
    do {                                                                                           \
        long at_ = atomic_exchange(&fail_at, 0), n_ = atomic_load(&allocs);                        \
        stmt;                                                                                      \
        atomic_store(&allocs, n_);                                                                 \
        atomic_store(&fail_at, at_);                                                               \
    } while (0)

/* A number for this run's names; with the pid, unique on the servers. */
static unsigned long next_run(void)
{
    static unsigned long n;
    return ++n;
}

/* A key of base's that routes to node i (base + a number). */
static void key_on(keel_redis *r, size_t i, const char *base, char *key, size_t cap)
{
    for (unsigned k = 0;; k++) {
        snprintf(key, cap, "%s%u", base, k);
        if (keel_redis_node_of(r, key, strlen(key)) == i)
            return;
    }
}

static keel_redis *redis_open(int nodes)
{
    keel_redis *r;
    QUIETLY({
        r = kt_redis_open(nodes, 2 * KT_S);
        for (size_t i = 0; i < (size_t)nodes; i++) {
            char key[32];
            key_on(r, i, "warm", key, sizeof key);
            redisReply *rep = NULL;
            ck_assert_int_eq(keel_redis_command(r, key, strlen(key), 1, (const char *[]){"PING"},
                                                (const size_t[]){4}, &rep), 0);
            freeReplyObject(rep);
        }
    });
    return r;
}

static keel_pg *pg_open(void)
{
    keel_pg *pg = NULL;
    keel_pg_opts o = {.primary = kt_env("KEEL_TEST_PG"), .conns_per_host = 2, .connect_timeout_ns = 5 * KT_S,
                      .acquire_timeout_ns = 5 * KT_S, .query_timeout_ns = 20 * KT_S, .manual_health = 1};
    QUIETLY({
        ck_assert_int_eq(keel_pg_create(&pg, &o), 0);
        keel_pg_conn *c;
        ck_assert_int_eq(keel_pg_acquire(pg, KEEL_PG_WRITE, &c), 0);
        keel_pg_release(c);
    });
    return pg;
}

static PGconn *pgd; /* the test's own connection, to look behind libkeel */

/* The first value of a query on it, as a number. */
static long long count_of(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static long long count_of(const char *fmt, ...)
{
    char sql[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(sql, sizeof sql, fmt, ap);
    va_end(ap);
    return kt_pg_number(pgd, sql);
}

/* ---- keel_redis ---- */

/* A command of argc C strings; its reply, when it came, is `want` (a
 * status, a string or an integer's text; NULL: anything but an error),
 * then freed. */
static int rcmd(keel_redis *r, const char *key, const char *want, int argc, const char *const *argv)
{
    size_t lens[8];
    for (int i = 0; i < argc; i++)
        lens[i] = strlen(argv[i]);
    redisReply *rep = NULL;
    int rc = keel_redis_command(r, key, key ? strlen(key) : 0, argc, argv, lens, &rep);
    oom_assert((rc == 0) == (rep != NULL) || rc == KEEL_EBACKEND, "%s: %s with a reply %p", argv[0],
               keel_err_name(rc), (void *)rep);
    if (rc == 0 && want) {
        char num[32] = "";
        if (rep->type == REDIS_REPLY_INTEGER)
            snprintf(num, sizeof num, "%lld", rep->integer);
        const char *got = rep->type == REDIS_REPLY_INTEGER ? num : rep->str ? rep->str : "(nil)";
        oom_assert(strcmp(got, want) == 0, "%s answered %s, not %s", argv[0], got, want);
    }
    if (rep)
        freeReplyObject(rep);
    return rc;
}

/* MSET and MGET of two keys that share a hash tag, so one node. */
static int rcmd_keys(keel_redis *r, const char *tag, const char *verb)
{
    char a[80], b[80];
    snprintf(a, sizeof a, "{%s}a", tag);
    snprintf(b, sizeof b, "{%s}b", tag);
    const void *keys[2] = {a, b};
    size_t keylens[2] = {strlen(a), strlen(b)};
    bool set = strcmp(verb, "MSET") == 0;
    const char *argv[5] = {verb, a, set ? "1" : b, b, "2"};
    size_t lens[5] = {strlen(verb), keylens[0], set ? 1 : keylens[1], keylens[1], 1};
    redisReply *rep = NULL;
    int rc = keel_redis_command_keys(r, keys, keylens, 2, set ? 5 : 3, argv, lens, &rep);
    if (rc == 0 && !set)
        oom_assert(rep->type == REDIS_REPLY_ARRAY && rep->elements == 2 && rep->element[0]->str &&
                       strcmp(rep->element[0]->str, "1") == 0 && rep->element[1]->str &&
                       strcmp(rep->element[1]->str, "2") == 0,
                   "MGET of the tag's keys");
    if (rep)
        freeReplyObject(rep);
    return rc;
}

/* SETs of two keys on each node, in one pipeline. Whatever it returns,
 * each command has either its reply or the failure of its node, never
 * neither. */
static int pipeline(keel_redis *r, const char *base)
{
    enum { MAX = 6 };
    char keys[MAX][96];
    const char *argv[MAX][3];
    size_t lens[MAX][3];
    keel_redis_cmd cmds[MAX];
    size_t n = 2 * keel_redis_nodes(r);
    for (size_t i = 0; i < n; i++) {
        char b[80];
        snprintf(b, sizeof b, "%s:p%zu:", base, i);
        key_on(r, i / 2, b, keys[i], sizeof keys[i]);
        argv[i][0] = "SET", argv[i][1] = keys[i], argv[i][2] = "x";
        lens[i][0] = 3, lens[i][1] = strlen(keys[i]), lens[i][2] = 1;
        cmds[i] = (keel_redis_cmd){.key = keys[i], .keylen = lens[i][1], .argc = 3, .argv = argv[i],
                                   .argvlen = lens[i]};
    }
    int rc = keel_redis_pipeline(r, cmds, n), first = 0;
    for (size_t i = 0; i < n; i++) {
        if (cmds[i].rc == 0)
            oom_assert(cmds[i].reply && cmds[i].reply->type == REDIS_REPLY_STATUS, "command %zu: no reply", i);
        else
            oom_assert(!cmds[i].reply, "command %zu: %s with a reply", i, keel_err_name(cmds[i].rc));
        if (!first)
            first = cmds[i].rc;
        if (cmds[i].reply)
            freeReplyObject(cmds[i].reply);
    }
    oom_assert(rc == first, "the pipeline returned %s, its first command %s", keel_err_name(rc),
               keel_err_name(first));
    return rc;
}

static int eval(keel_redis *r, keel_redis_script *s, const char *key, const char *arg)
{
    const void *keys[1] = {key};
    size_t kl[1] = {strlen(key)}, al[1] = {strlen(arg)};
    const char *args[1] = {arg};
    redisReply *rep = NULL;
    int rc = keel_redis_eval(r, s, 1, keys, kl, 1, args, al, NULL, 0, &rep);
    if (rc == 0)
        oom_assert(rep->type == REDIS_REPLY_STRING && strcmp(rep->str, arg) == 0, "the script answered %s",
                   rep->str ? rep->str : "(not a string)");
    if (rep)
        freeReplyObject(rep);
    return rc;
}

static atomic_int heard;

static void on_publish(const char *channel, size_t chlen, const char *msg, size_t len, const char *pattern,
                       void *ud)
{
    (void)channel, (void)chlen, (void)msg, (void)len, (void)pattern, (void)ud;
    atomic_fetch_add(&heard, 1);
}

static void redis_scenario_nodes(int nodes, keel_metrics *m)
{
    char base[64];
    snprintf(base, sizeof base, "oom:%d:%lu", (int)getpid(), next_run());
    keel_redis *r = NULL;
    keel_redis_opts o = {.nodes = kt_redis_urls(nodes), .nnodes = (size_t)nodes,
                         .connect_timeout_ns = 2 * KT_S, .command_timeout_ns = 2 * KT_S, .metrics = m,
                         .metrics_name = nodes == 1 ? "one" : "three"};
    CALL(0, keel_redis_create(&r, &o));
    CALL_COPES(0, pipeline(r, base)); /* copes: the first call on each node */
    char key[96];
    snprintf(key, sizeof key, "%s:k", base);
    CALL(0, rcmd(r, key, "OK", 3, (const char *[]){"SET", key, "v"}));
    CALL(0, rcmd(r, key, "v", 2, (const char *[]){"GET", key}));
    CALL(0, rcmd_keys(r, base, "MSET"));
    CALL(0, rcmd_keys(r, base, "MGET"));
    CALL(0, pipeline(r, base));

    /* a script of this run's own, so that each run loads it (NOSCRIPT) */
    char lua[128];
    snprintf(lua, sizeof lua, "-- %s\nreturn ARGV[1]", base);
    keel_redis_script *s = NULL;
    CALL(0, keel_redis_script_create(r, lua, strlen(lua), &s));
    CALL(0, eval(r, s, key, "echo"));
    CALL(0, eval(r, s, base, "again"));
    keel_redis_script_free(s);

    /* the listener thread subscribes: a failure it meets is the call's */
    char chan[96], pat[100];
    snprintf(chan, sizeof chan, "%s:chan", base);
    snprintf(pat, sizeof pat, "%s:ch*", base);
    const char *chans[1] = {chan}, *pats[1] = {pat};
    keel_redis_sub_opts so = {.channels = chans, .nchannels = 1, .patterns = pats, .npatterns = 1,
                              .node = keel_redis_node_of(r, chan, strlen(chan)), .on_message = on_publish};
    keel_redis_sub *sub = NULL;
    atomic_store(&heard, 0);
    CALL_IN(true, false, 0, keel_redis_subscribe(r, &so, &sub), (void)0);
    CALL(0, rcmd(r, chan, "2", 3, (const char *[]){"PUBLISH", chan, "hello"})); /* the channel's and the pattern's */
    for (int i = 0; i < 1000 && atomic_load(&heard) < 2; i++)
        kt_nap(5 * KT_MS);
    oom_assert(atomic_load(&heard) == 2, "%d messages heard, not 2", atomic_load(&heard));
    keel_redis_unsubscribe(sub);

    oom_assert(keel_redis_nodes(r) == (size_t)nodes, "%zu nodes", keel_redis_nodes(r));
    uint64_t commands = 0;
    for (int i = 0; i < nodes; i++) {
        keel_redis_node_stats st;
        oom_assert(keel_redis_node_stats_get(r, (size_t)i, &st) == 0 && !st.skipped && st.fails == 0,
                   "node %d: skipped %d, %u failures", i, st.skipped, st.fails);
        commands += st.commands;
    }
    oom_assert(commands >= 8, "%llu commands counted", (unsigned long long)commands);
    keel_redis_destroy(r);
}

/* URLs are parsed with no server: every piece a copy, a malformed one
 * refused as such only when memory allowed looking at it. */
static void redis_urls_scenario(void)
{
    const char *urls[] = {"redis://u%3A:p%40@[::1]:7000/2", "unix://u:p%2F@/tmp/a%20b.sock?db=1"};
    keel_redis_opts o = {.nodes = urls, .nnodes = 2};
    keel_redis *r = NULL;
    CALL(0, keel_redis_create(&r, &o));
    keel_redis_destroy(r);
    const char *bad[] = {"redis://[::1]x", "redis://[:]"};
    for (int i = 0; i < 2; i++) {
        o.nodes = &bad[i];
        o.nnodes = 1;
        CALL(KEEL_EINVAL, keel_redis_create(&r, &o));
    }
}

static void redis_scenario(void)
{
    redis_urls_scenario();
    keel_metrics *m = registry(true);
    redis_scenario_nodes(1, m);
    redis_scenario_nodes(3, NULL);
    keel_metrics_destroy(m);
}

START_TEST(redis_survives_every_failed_allocation)
{
    sweep("redis", redis_scenario);
}
END_TEST

/* ---- keel_pg ---- */

/* A statement (SQL or prepared) with text parameters; the result dropped. */
static int pg_run(keel_pg *pg, keel_pg_mode mode, const char *sql, keel_pg_stmt *s, int n, const char *const *v,
                  long long want)
{
    keel_pg_params p = {.n = n, .values = v};
    PGresult *res = NULL;
    int rc = s ? keel_pg_exec_stmt(pg, mode, s, &p, &res) : keel_pg_exec(pg, mode, sql, &p, &res);
    if (rc == 0 && want >= 0)
        oom_assert(PQntuples(res) == 1 && atoll(PQgetvalue(res, 0, 0)) == want, "%s: %s, not %lld",
                   s ? "a statement" : sql, PQntuples(res) ? PQgetvalue(res, 0, 0) : "no row", want);
    if (rc == KEEL_EBACKEND)
        oom_assert(0, "%s: %s", s ? "a statement" : sql, PQresultErrorMessage(res));
    PQclear(res);
    return rc;
}

static int pg_batch(keel_pg *pg, keel_pg_stmt *ins, const char *run)
{
    const char *v3[2] = {run, "3"}, *v4[2] = {run, "4"}, *v1[1] = {run};
    keel_pg_query q[3] = {
        {.stmt = ins, .params = {.n = 2, .values = v3}},
        {.sql = "INSERT INTO oom_pg (run, k) VALUES ($1, $2::int)", .params = {.n = 2, .values = v4}},
        {.sql = "SELECT count(*) FROM oom_pg WHERE run = $1", .params = {.n = 1, .values = v1}},
    };
    int rc = keel_pg_batch(pg, q, 3);
    for (int i = 0; i < 3; i++) {
        oom_assert(rc || q[i].rc == 0, "statement %d: %s", i, keel_err_name(q[i].rc));
        if (rc == 0 && i == 2)
            oom_assert(atoll(PQgetvalue(q[i].res, 0, 0)) == 4, "the batch counts %s rows", PQgetvalue(q[i].res, 0, 0));
        PQclear(q[i].res);
    }
    return rc;
}

static long long pg_rows(const char *run)
{
    return count_of("SELECT count(*) FROM oom_pg WHERE run = '%s'", run);
}

static void pg_scenario(void)
{
    char run[32];
    snprintf(run, sizeof run, "%d-%lu", (int)getpid(), next_run());
    keel_metrics *m = registry(true);
    const char *replicas[1] = {kt_env("KEEL_TEST_PG_REPLICA")};
    keel_pg_opts o = {.primary = kt_env("KEEL_TEST_PG"), .replicas = replicas, .nreplicas = 1,
                      .conns_per_host = 2, .connect_timeout_ns = 5 * KT_S, .acquire_timeout_ns = 5 * KT_S,
                      .query_timeout_ns = 20 * KT_S, .max_replica_lag_ns = 60 * KT_S, .manual_health = 1,
                      .metrics = m};
    keel_pg *pg = NULL;
    CALL(0, keel_pg_create(&pg, &o));
    CALL(0, keel_pg_check(pg));
    keel_pg_host_stats st[2];
    for (size_t i = 0; i < 2; i++)
        oom_assert(keel_pg_host_stats_get(pg, i, &st[i]) == 0, "host %zu: no stats", i);
    oom_assert(st[0].role == KEEL_PG_ROLE_PRIMARY && st[1].role == KEEL_PG_ROLE_REPLICA && st[1].readable,
               "roles %d and %d, replica readable %d", st[0].role, st[1].role, st[1].readable);

    keel_pg_conn *c = NULL;
    CALL_COPES(0, keel_pg_acquire(pg, KEEL_PG_WRITE, &c)); /* copes: the first on the host */
    oom_assert(keel_pg_conn_host(c) == 0, "a write on host %zu", keel_pg_conn_host(c));
    keel_pg_release(c);
    /* copes: the first on the host; and without memory for the
     * replica's connection, the read goes to the write host, as when no
     * replica is usable */
    long seen = failures_here;
    CALL_COPES(0, keel_pg_acquire(pg, KEEL_PG_READ, &c));
    oom_assert(keel_pg_conn_host(c) == 1 || failures_here != seen, "a read on host %zu", keel_pg_conn_host(c));
    keel_pg_release(c);

    /* a write that said it failed did not happen: the key is still free */
    const char *row1[2] = {run, "1"}, *row2[2] = {run, "2"}, *one[1] = {run};
    CALL(0, pg_run(pg, KEEL_PG_WRITE, "INSERT INTO oom_pg (run, k) VALUES ($1, $2::int)", NULL, 2, row1, -1));
    keel_pg_stmt *ins = NULL, *count = NULL, *plus = NULL;
    CALL(0, keel_pg_stmt_create(pg, "INSERT INTO oom_pg (run, k) VALUES ($1, $2::int)", 0, NULL, &ins));
    CALL(0, keel_pg_stmt_create(pg, "SELECT count(*) FROM oom_pg WHERE run = $1", 0, NULL, &count));
    CALL(0, keel_pg_stmt_create(pg, "SELECT $1::int + 1", 1, (const Oid[]){23}, &plus));
    CALL(0, pg_run(pg, KEEL_PG_WRITE, NULL, ins, 2, row2, -1));
    CALL(0, pg_run(pg, KEEL_PG_WRITE, NULL, count, 1, one, 2));
    CALL(0, pg_run(pg, KEEL_PG_READ, NULL, plus, 1, (const char *[]){"41"}, 42));
    CALL(0, pg_run(pg, KEEL_PG_AUTO, NULL, plus, 1, (const char *[]){"1"}, 2));
    /* a failed batch committed nothing */
    CALL_THEN(0, pg_batch(pg, ins, run), oom_assert(pg_rows(run) == 2, "%lld rows after a failed batch", pg_rows(run)));

    uint64_t lsn = 0;
    CALL(0, keel_pg_write_lsn(pg, &lsn));
    oom_assert(lsn > 0, "no write position");
    CALL(0, keel_pg_acquire_after(pg, lsn, 0, &c));
    PGresult *res = NULL;
    CALL(0, keel_pg_conn_exec_stmt(c, count, &(keel_pg_params){1, one}, &res));
    oom_assert(atoll(PQgetvalue(res, 0, 0)) == 4, "host %zu sees %s rows after the write position",
               keel_pg_conn_host(c), PQgetvalue(res, 0, 0));
    PQclear(res);
    keel_pg_release(c);
    keel_pg_stmt_free(ins);
    keel_pg_stmt_free(count);
    keel_pg_stmt_free(plus);

    oom_assert(keel_pg_hosts(pg) == 2, "%zu hosts", keel_pg_hosts(pg));
    keel_pg_host_stats_get(pg, 0, &st[0]);
    oom_assert(st[0].queries >= 6 && st[0].errors == 0, "the primary: %llu queries, %llu errors",
               (unsigned long long)st[0].queries, (unsigned long long)st[0].errors);
    keel_pg_destroy(pg);
    keel_metrics_destroy(m);
}

START_TEST(pg_survives_every_failed_allocation)
{
    pgd = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    kt_pg_exec(pgd, "CREATE TABLE IF NOT EXISTS oom_pg (run text, k int, PRIMARY KEY (run, k))");
    sweep("pg", pg_scenario);
    PQfinish(pgd);
}
END_TEST

/* ---- keel_limiter on Redis ----
 *
 * With Redis, a decision that runs out of memory (its request, or
 * keel_redis's connection) is a store failure: on_store_error answers it
 * (here: rejected, source KEEL_LIMIT_SRC_CLOSED) and nothing is consumed,
 * so it is asked again. */

typedef int (*limit_fn)(keel_limiter *l, const void *key, size_t len, uint64_t cost, keel_limit_result *r);

static uint64_t store_errors(keel_limiter *l)
{
    keel_limiter_stats st;
    keel_limiter_stats_get(l, &st);
    return st.store_errors;
}

static keel_limit_result decide(keel_limiter *l, limit_fn fn, const char *key, uint64_t cost)
{
    keel_limit_result r;
    for (int attempt = 0;; attempt++) {
        long seen = failures_here;
        uint64_t errs = store_errors(l);
        in_call++;
        int rc = fn(l, key, strlen(key), cost, &r);
        if (--in_call == 0)
            failing = false;
        if (failures_here == seen) {
            oom_assert(rc == 0 && r.source == KEEL_LIMIT_SRC_REDIS, "%s: %s, source %d", key, keel_err_name(rc),
                       r.source);
            return r;
        }
        oom_assert(attempt == 0, "%s failed twice", key);
        oom_assert(rc == 0 && r.source == KEEL_LIMIT_SRC_CLOSED && !r.allowed && store_errors(l) == errs + 1,
                   "%s met the failure: %s, source %d, allowed %d", key, keel_err_name(rc), r.source, r.allowed);
    }
}

static void limiter_scenario_algo(keel_limit_algo algo)
{
    char prefix[64];
    snprintf(prefix, sizeof prefix, "oom:%d:%lu:rl:", (int)getpid(), next_run());
    keel_redis *redis = redis_open(3);
    keel_limiter *l = NULL;
    keel_limiter_opts o = {.algo = algo, .limit = 5, .window_ns = 60 * KT_S, .redis = redis, .prefix = prefix,
                           .on_store_error = KEEL_LIMIT_FAIL_CLOSED};
    CALL(0, keel_limiter_create(&l, &o));
    for (uint64_t i = 1; i <= 3; i++) {
        keel_limit_result r = decide(l, keel_limiter_take, "a", 1);
        oom_assert(r.allowed && r.remaining == 5 - i, "take %llu: allowed %d, %llu remaining", (unsigned long long)i,
                   r.allowed, (unsigned long long)r.remaining);
    }
    keel_limit_result r = decide(l, keel_limiter_peek, "a", 1);
    oom_assert(r.allowed && r.remaining == 2, "peek: %llu remaining", (unsigned long long)r.remaining);
    decide(l, keel_limiter_refund, "a", 1);
    r = decide(l, keel_limiter_peek, "a", 1);
    oom_assert(r.remaining == 3, "after a refund: %llu remaining", (unsigned long long)r.remaining);

    /* keys over the three nodes: each request has its own answer; those
     * Redis did not decide go again */
    enum { N = 6 };
    keel_limit_req reqs[N];
    char names[N][8];
    for (int i = 0; i < N; i++) {
        snprintf(names[i], sizeof names[i], "k%d", i);
        reqs[i] = (keel_limit_req){.key = names[i], .len = strlen(names[i]), .cost = 1};
        memset(&reqs[i].result, 0x5a, sizeof reqs[i].result); /* not what an answer says by chance */
    }
    long seen = failures_here;
    oom_assert(keel_limiter_take_many(l, reqs, N) == 0, "take_many failed");
    for (int i = 0; i < N; i++) {
        if (reqs[i].rc == 0 && reqs[i].result.source == KEEL_LIMIT_SRC_REDIS) {
            oom_assert(reqs[i].result.allowed, "request %d refused", i);
            continue;
        }
        /* a store failure (source CLOSED), or no memory to decide at all */
        oom_assert(failures_here != seen && ((reqs[i].rc == 0 && reqs[i].result.source == KEEL_LIMIT_SRC_CLOSED) ||
                                             reqs[i].rc == KEEL_ENOMEM),
                   "request %d: %s, source %d", i, keel_err_name(reqs[i].rc), reqs[i].result.source);
        /* either way a rejection the headers can carry, as fail-closed's */
        oom_assert(!reqs[i].result.allowed && reqs[i].result.limit == 5 &&
                       reqs[i].result.retry_after_ns == 60 * KT_S && reqs[i].result.reset_ns == 60 * KT_S,
                   "request %d: allowed %d, limit %llu, retry %llu", i, reqs[i].result.allowed,
                   (unsigned long long)reqs[i].result.limit, (unsigned long long)reqs[i].result.retry_after_ns);
        decide(l, keel_limiter_take, names[i], 1);
    }
    for (int i = 0; i < N; i++) {
        r = decide(l, keel_limiter_peek, names[i], 1);
        oom_assert(r.remaining == 4, "%s: %llu remaining", names[i], (unsigned long long)r.remaining);
    }
    CALL(0, keel_limiter_reset(l, "a", 1));
    r = decide(l, keel_limiter_peek, "a", 1);
    oom_assert(r.remaining == 5, "after a reset: %llu remaining", (unsigned long long)r.remaining);
    keel_limiter_destroy(l);
    keel_redis_destroy(redis);
}

static void limiter_scenario(void)
{
    limiter_scenario_algo(KEEL_LIMIT_SLIDING_LOG);
    limiter_scenario_algo(KEEL_LIMIT_GCRA);
}

START_TEST(a_redis_limiter_survives_every_failed_allocation)
{
    sweep("limiter on redis", limiter_scenario);
}
END_TEST

/* ---- keel_bus on Redis Streams ----
 *
 * Every publish carries a number of its own: a message whose publish
 * returned 0 must reach the consumer group once, and one whose publish
 * failed never. The readers meet failures too: they reconnect and read
 * their pending entries again. */

enum { BUS_MAX = 64 };
static atomic_int bus_got[BUS_MAX]; /* deliveries of each publish */
static bool bus_ok[BUS_MAX];        /* publishes that returned 0 */
static int bus_n;

static int bus_handler(const keel_bus_msg *msg, void *ud)
{
    (void)ud;
    int i;
    ck_assert_uint_eq(msg->len, sizeof i);
    memcpy(&i, msg->data, sizeof i);
    ck_assert(i >= 0 && i < BUS_MAX);
    atomic_fetch_add(&bus_got[i], 1);
    return 0;
}

static int bus_publish(keel_bus *b, const char *subject)
{
    int i = bus_n++;
    oom_assert(i < BUS_MAX, "too many publishes");
    keel_bus_header h[1] = {{"run", "oom"}};
    int rc = keel_bus_publish(b, subject, &i, sizeof i, h, 1, NULL);
    bus_ok[i] = rc == 0;
    return rc;
}

static void bus_scenario(void)
{
    bus_n = 0;
    for (int i = 0; i < BUS_MAX; i++)
        atomic_store(&bus_got[i], 0);
    char prefix[64];
    snprintf(prefix, sizeof prefix, "oom:%d:%lu:bus:", (int)getpid(), next_run());
    keel_redis *redis = redis_open(3);
    keel_bus *b = NULL;
    keel_bus_opts o = {.redis = redis, .prefix = prefix, .service = "svc", .consumer = "c1", .partitions = 3,
                       .block_ns = 20 * KT_MS, .read_count = 4, .min_idle_ns = 600 * KT_S};
    CALL(0, keel_bus_create(&b, &o));
    keel_bus_sub *sub;
    CALL(0, keel_bus_subscribe(b, &(keel_bus_sub_opts){.pattern = "orders.>", .handler = bus_handler}, &sub));
    CALL(0, keel_bus_start(b));
    static const char *const subjects[] = {"orders.eu.paid", "orders.us.paid", "orders.eu.new", "orders.asia"};
    for (int i = 0; i < 4; i++)
        CALL(0, bus_publish(b, subjects[i]));
    /* a batch over the partitions' nodes: only the failed messages go again */
    enum { N = 4 };
    keel_bus_pub many[N];
    int nums[N];
    for (int i = 0; i < N; i++) {
        nums[i] = bus_n++;
        many[i] = (keel_bus_pub){.subject = subjects[i], .data = &nums[i], .len = sizeof nums[i]};
    }
    long seen = failures_here;
    int rc = keel_bus_publish_many(b, many, N);
    oom_assert(rc == 0 || failures_here != seen, "publish_many: %s", keel_err_name(rc));
    for (int i = 0; i < N; i++) {
        bus_ok[nums[i]] = many[i].rc == 0;
        if (many[i].rc == 0)
            continue;
        oom_assert(many[i].rc == KEEL_ENOMEM && failures_here != seen, "message %d: %s", i,
                   keel_err_name(many[i].rc));
        CALL(0, bus_publish(b, many[i].subject));
    }
    CALL(0, keel_bus_drain(b));
    for (int i = 0; i < bus_n; i++)
        oom_assert(atomic_load(&bus_got[i]) == (bus_ok[i] ? 1 : 0), "publish %d (%s) delivered %d times", i,
                   bus_ok[i] ? "accepted" : "failed", atomic_load(&bus_got[i]));
    uint64_t accepted = 0;
    for (int i = 0; i < bus_n; i++)
        accepted += bus_ok[i];
    keel_bus_stats st;
    keel_bus_stats_get(b, &st);
    oom_assert(st.published == accepted && st.delivered == accepted && st.acked == accepted && st.failed == 0 &&
                   st.dead_lettered == 0,
               "%llu accepted: %llu published, %llu delivered, %llu acknowledged, %llu failed, %llu dead",
               (unsigned long long)accepted, (unsigned long long)st.published, (unsigned long long)st.delivered,
               (unsigned long long)st.acked, (unsigned long long)st.failed, (unsigned long long)st.dead_lettered);
    keel_bus_destroy(b);
    keel_redis_destroy(redis);
}

START_TEST(a_streams_bus_delivers_what_it_accepted_once)
{
    sweep("bus on redis streams", bus_scenario);
}
END_TEST

/* ---- keel_cqrs on PostgreSQL ---- */

static char cq_prefix[40];

static int deposit(keel_cqrs_ctx *x, const void *payload, size_t len, void *ud)
{
    (void)ud;
    char stream[64];
    size_t n;
    int rc = oom_load_account(x, payload, len, stream, &n);
    if (rc == 0 && n != 1)
        return KEEL_ENOTFOUND;
    for (int i = 0; rc == 0 && i < 3; i++)
        rc = keel_cqrs_emit(x, stream, "money.deposited", &i, sizeof i, NULL, 0);
    return rc;
}

/* Applied in the projection's transaction: a batch that fails leaves no row. */
static int project(keel_cqrs_ctx *x, const keel_cqrs_event *ev, void *ud)
{
    (void)ud;
    keel_pg_conn *c = keel_cqrs_conn(x);
    if (!c)
        return KEEL_EUNAVAIL;
    char sql[128], pos[24];
    snprintf(sql, sizeof sql, "INSERT INTO \"%sseen\" (position) VALUES ($1::bigint)", cq_prefix);
    snprintf(pos, sizeof pos, "%llu", (unsigned long long)ev->position);
    PGresult *r = NULL;
    int rc = keel_pg_conn_exec(c, sql, &(keel_pg_params){1, (const char *[]){pos}}, &r);
    PQclear(r);
    return rc;
}

static atomic_int cq_published;
static int on_event(const keel_bus_msg *msg, void *ud)
{
    (void)msg, (void)ud;
    atomic_fetch_add(&cq_published, 1);
    return 0;
}

static long long cq_events(const char *stream)
{
    return count_of("SELECT count(*) FROM \"%sevents\" WHERE stream_id = '%s'", cq_prefix, stream);
}

static void cqrs_scenario(void)
{
    char id[32], stream[40], key[40], proj[40];
    snprintf(id, sizeof id, "%lu", next_run());
    snprintf(stream, sizeof stream, "acct-%s", id);
    snprintf(key, sizeof key, "open-%s", id);
    snprintf(proj, sizeof proj, "totals-%s", id);
    /* the projection starts where earlier runs' events end */
    long long base = count_of("SELECT coalesce(max(position), 0) FROM \"%sevents\"", cq_prefix);
    char sql[256];
    snprintf(sql, sizeof sql, "INSERT INTO \"%scheckpoints\" (name, position) VALUES ('%s', %lld)", cq_prefix, proj,
             base);
    kt_pg_exec(pgd, sql);
    atomic_store(&cq_published, 0);
    keel_pg *pg = pg_open();
    keel_bus *bus = NULL;
    keel_bus_sub *sub;
    QUIETLY(ck_assert_int_eq(keel_bus_create(&bus, NULL), 0));
    QUIETLY(ck_assert_int_eq(keel_bus_subscribe(bus, &(keel_bus_sub_opts){.pattern = "cqrs.>", .handler = on_event},
                                                &sub), 0));

    keel_cqrs *c = NULL;
    keel_cqrs_opts o = {.pg = pg, .prefix = cq_prefix, .bus = bus, .read_your_writes = 1};
    CALL(0, keel_cqrs_create(&c, &o));
    CALL(0, keel_cqrs_create_schema(c));
    CALL(0, keel_cqrs_command(c, "open", oom_open_account, NULL));
    CALL(0, keel_cqrs_command(c, "deposit", deposit, NULL));
    keel_cqrs_result res = {0};
    /* a send that failed appended nothing: the one made again is the first */
    CALL_THEN(0, keel_cqrs_send(c, "open", id, strlen(id), key, &res),
              oom_assert(cq_events(stream) == 0, "a failed send appended"));
    oom_assert(!res.repeated && res.position > (uint64_t)base && res.len == strlen(stream) &&
                   memcmp(res.reply, stream, res.len) == 0,
               "open: repeated %d, position %llu", res.repeated, (unsigned long long)res.position);
    keel_cqrs_result_free(&res);
    CALL(0, keel_cqrs_send(c, "open", id, strlen(id), key, &res)); /* the same key: the first result */
    oom_assert(res.repeated && res.len == strlen(stream) && memcmp(res.reply, stream, res.len) == 0, "not a repeat");
    keel_cqrs_result_free(&res);
    CALL_THEN(0, keel_cqrs_send(c, "deposit", id, strlen(id), NULL, &res),
              oom_assert(cq_events(stream) == 1, "a failed deposit appended"));
    oom_assert(cq_events(stream) == 4, "%lld events", cq_events(stream));

    keel_cqrs_projection *p = NULL;
    keel_cqrs_projection_opts po = {.name = proj, .handler = project, .batch = 3};
    CALL(0, keel_cqrs_projection_create(c, &po, &p));
    oom_assert(keel_cqrs_projection_position(p) == (uint64_t)base, "the projection starts at %llu, not %lld",
               (unsigned long long)keel_cqrs_projection_position(p), base);
    size_t applied = 0, now;
    /* a failed batch is rolled back; the run goes on where it stopped */
    CALL_THEN(0, (now = 0, keel_cqrs_projection_run(p, &now)), applied += now);
    applied += now;
    long long rows = count_of("SELECT count(*) FROM \"%sseen\" WHERE position > %lld", cq_prefix, base);
    oom_assert(applied == 4 && rows == 4 && keel_cqrs_projection_position(p) > (uint64_t)base,
               "applied %zu, %lld rows, at %llu", applied, rows, (unsigned long long)keel_cqrs_projection_position(p));
    keel_cqrs_stats st;
    keel_cqrs_stats_get(c, &st);
    oom_assert(st.appended == 4 && st.published == (uint64_t)atomic_load(&cq_published),
               "%llu appended, %llu published, %d on the bus", (unsigned long long)st.appended,
               (unsigned long long)st.published, atomic_load(&cq_published));
    keel_cqrs_projection_destroy(p);
    keel_cqrs_destroy(c);
    keel_bus_destroy(bus);
    keel_pg_destroy(pg);
}

START_TEST(cqrs_on_postgresql_survives_every_failed_allocation)
{
    pgd = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    snprintf(cq_prefix, sizeof cq_prefix, "oom%d_", (int)getpid());
    keel_pg *pg = pg_open();
    keel_cqrs *c;
    ck_assert_int_eq(keel_cqrs_create(&c, &(keel_cqrs_opts){.pg = pg, .prefix = cq_prefix}), 0);
    ck_assert_int_eq(keel_cqrs_create_schema(c), 0);
    keel_cqrs_destroy(c);
    keel_pg_destroy(pg);
    char sql[128];
    snprintf(sql, sizeof sql, "CREATE TABLE \"%sseen\" (position bigint PRIMARY KEY)", cq_prefix);
    kt_pg_exec(pgd, sql);
    sweep("cqrs on postgresql", cqrs_scenario);
    PQfinish(pgd);
}
END_TEST

/* ---- keel_cache with L2 and L3 ---- */

static char cache_table[40];
static kt_clock cache_clock;

static void cache_expect(keel_cache *c, const char *run, const char *k, const char *want)
{
    char key[64], buf[128];
    snprintf(key, sizeof key, "%s:%s", run, k);
    int rc = oom_cache_get(c, key, buf, sizeof buf);
    oom_assert(rc == 0 && strcmp(buf, want) == 0, "%s: %s, %s, not %s", key, keel_err_name(rc), buf, want);
}

static void cache_scenario(void)
{
    char run[32], prefix[64], sql[256];
    snprintf(run, sizeof run, "%d-%lu", (int)getpid(), next_run());
    snprintf(prefix, sizeof prefix, "oom:%s:c:", run);
    atomic_store(&cache_clock.ns, 1000 * KT_S);
    /* another process's value, in L3 only (its L2 copy gone): the first
     * statement of this run's connection reads it */
    snprintf(sql, sizeof sql, "INSERT INTO \"%s\" VALUES ('%s:k0', 'v0', now() + interval '1 hour', NULL)",
             cache_table, run);
    kt_pg_exec(pgd, sql);
    keel_redis *redis = redis_open(3);
    keel_pg *pg = pg_open();
    keel_cache *c = NULL;
    keel_cache_opts o = {.redis = redis, .redis_prefix = prefix, .pg = pg, .table = cache_table,
                         .loader = oom_cache_loader, .l1_max_ttl_ns = KT_S, .clock = kt_clock_now,
                         .clock_ud = &cache_clock};
    /* the listener thread subscribes: a failure it meets is the call's */
    CALL_IN(true, false, 0, keel_cache_create(&c, &o), (void)0);
    cache_expect(c, run, "k0", "v0"); /* L3 */
    static const char *const names[] = {"k1", "k2", "k3", "k4"};
    char odd[40], even[40];
    snprintf(odd, sizeof odd, "odd-%s", run);
    snprintf(even, sizeof even, "even-%s", run);
    for (int i = 0; i < 4; i++) {
        char key[64], val[16];
        snprintf(key, sizeof key, "%s:%s", run, names[i]);
        snprintf(val, sizeof val, "v%d", i + 1);
        const char *tags[1] = {i % 2 ? even : odd};
        CALL(0, keel_cache_set(c, key, strlen(key), val, strlen(val), 60 * KT_S, tags, 1));
    }
    cache_expect(c, run, "k1", "v1"); /* L1 */
    kt_clock_advance(&cache_clock, 2 * KT_S); /* past l1_max_ttl: L1 has nothing */
    cache_expect(c, run, "k1", "v1"); /* L2 */
    char vkey[128]; /* k2's value, gone from L2 */
    snprintf(vkey, sizeof vkey, "%sv:%s:k2", prefix, run);
    QUIETLY(ck_assert_int_eq(rcmd(redis, vkey, "1", 2, (const char *[]){"DEL", vkey}), 0));
    cache_expect(c, run, "k2", "v2"); /* L3 */
    /* k3's row gone from L3: it is in L2 alone */
    snprintf(sql, sizeof sql, "DELETE FROM \"%s\" WHERE key = '%s:k3'", cache_table, run);
    kt_pg_exec(pgd, sql);
    kt_clock_advance(&cache_clock, 2 * KT_S);

    char keys[5][64], bufs[5][64];
    keel_cache_item items[5];
    for (int i = 0; i < 5; i++) {
        snprintf(keys[i], sizeof keys[i], "%s:%s", run, i < 4 ? names[i] : "absent");
        items[i] = (keel_cache_item){.key = keys[i], .klen = strlen(keys[i]), .buf = bufs[i], .cap = 63};
    }
    long seen = failures_here;
    int rc = keel_cache_get_many(c, items, 5); /* the first failure, if any */
    for (int i = 0; i < 5; i++) {
        if (items[i].rc == KEEL_ENOMEM) {
            oom_assert(failures_here != seen && rc == KEEL_ENOMEM, "item %d: KEEL_ENOMEM", i);
            continue;
        }
        bufs[i][items[i].rc ? 0 : items[i].len] = '\0';
        char want[16];
        snprintf(want, sizeof want, "v%d", i + 1);
        oom_assert(i < 4 ? items[i].rc == 0 && strcmp(bufs[i], want) == 0 : items[i].rc == KEEL_ENOTFOUND,
                   "item %d: %s, %s", i, keel_err_name(items[i].rc), bufs[i]);
    }

    CALL(0, keel_cache_invalidate_tag(c, odd));
    char want[80];
    snprintf(want, sizeof want, "loaded:%s:k3", run);
    cache_expect(c, run, "k3", want);
    cache_expect(c, run, "k4", "v4");
    char pfx[48];
    snprintf(pfx, sizeof pfx, "%s:k4", run);
    CALL(0, keel_cache_invalidate_prefix(c, pfx, strlen(pfx)));
    snprintf(want, sizeof want, "loaded:%s:k4", run);
    cache_expect(c, run, "k4", want);
    cache_expect(c, run, "k2", "v2");
    keel_cache_destroy(c);
    keel_pg_destroy(pg);
    keel_redis_destroy(redis);
}

START_TEST(a_cache_over_redis_and_postgresql_survives_every_failed_allocation)
{
    pgd = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    snprintf(cache_table, sizeof cache_table, "oom_cache_%d", (int)getpid());
    keel_pg *pg = pg_open();
    keel_cache *c;
    ck_assert_int_eq(keel_cache_create(&c, &(keel_cache_opts){.pg = pg, .table = cache_table}), 0);
    ck_assert_int_eq(keel_cache_create_schema(c), 0);
    keel_cache_destroy(c);
    keel_pg_destroy(pg);
    sweep("cache over redis and postgresql", cache_scenario);
    PQfinish(pgd);
}
END_TEST

int main(void)
{
    if (oom_install() != 0)
        return 1;
    Suite *s = suite_create("oom_servers");
    TCase *tc = tcase_create("oom_servers");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, redis_survives_every_failed_allocation);
    tcase_add_test(tc, pg_survives_every_failed_allocation);
    tcase_add_test(tc, a_redis_limiter_survives_every_failed_allocation);
    tcase_add_test(tc, a_streams_bus_delivers_what_it_accepted_once);
    tcase_add_test(tc, cqrs_on_postgresql_survives_every_failed_allocation);
    tcase_add_test(tc, a_cache_over_redis_and_postgresql_survives_every_failed_allocation);
    suite_add_tcase(s, tc);
    return kt_run(s);
}
