/* tests/test_cache.c — keel_cache: tier fill and TTL caps under the fake
 * clock; write-through and delete through real Redis and PostgreSQL;
 * 8 threads missing one key call the loader once; negative caching;
 * invalidation across processes (a forked second cache), and an L1 flush
 * when the link drops; tags across tiers and processes; prefixes holding
 * glob and LIKE characters and NUL bytes; Redis and PostgreSQL stopped
 * mid-run, and one Redis node of three; S3-FIFO keeping a hot set
 * through a scan; XFetch; bad input; the L1 alone against a seeded
 * model. */
#define _GNU_SOURCE
#include <endian.h>
#include <libpq-fe.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <keel/cache.h>
#include <keel/pg.h>
#include <keel/redis.h>

#include "harness.h"
#include "cache/cache_int.h" /* a key's L1 shard: keel_cache's hash, its top 5 bits */

#define MS KT_MS
#define S KT_S

static kt_clock clk;

typedef struct loader_state {
    _Atomic int calls;
    int absent;          /* answer KEEL_ENOTFOUND */
    uint64_t take_ns;    /* advance the fake clock by this (the load's duration) */
    uint64_t sleep_ns;   /* really wait (for the single-flight test) */
    _Atomic int hold;    /* wait while set: the test releases the load */
    const char *tag;
    const char *val;     /* the value, if not "loaded:" and the key */
    uint64_t ttl;        /* 0: 60 s */
} loader_state;

static int load(const void *key, size_t klen, keel_cache_load *ld, void *ud)
{
    loader_state *s = ud;
    atomic_fetch_add(&s->calls, 1);
    if (s->sleep_ns)
        kt_nap(s->sleep_ns);
    while (atomic_load(&s->hold))
        kt_nap(1 * MS);
    if (s->take_ns)
        kt_clock_advance(&clk, s->take_ns);
    if (s->absent)
        return KEEL_ENOTFOUND;
    char v[64];
    int n = s->val ? snprintf(v, sizeof v, "%s", s->val)
                   : snprintf(v, sizeof v, "loaded:%.*s", (int)klen, (const char *)key);
    const char *tags[1] = {s->tag};
    return keel_cache_load_set(ld, v, (size_t)n, s->ttl ? s->ttl : 60 * S, tags, s->tag ? 1 : 0);
}

static char *uniq(const char *what)
{
    static char p[64];
    static int n;
    snprintf(p, sizeof p, "t%d%s%d", (int)getpid(), what, n++);
    return p;
}

static keel_pg *open_pg(void)
{
    keel_pg *pg = NULL;
    keel_pg_opts o = {.primary = kt_env("KEEL_TEST_PG"), .connect_timeout_ns = 1 * S, .acquire_timeout_ns = 2 * S,
                      .query_timeout_ns = 2 * S, .manual_health = 1};
    ck_assert_int_eq(keel_pg_create(&pg, &o), 0);
    ck_assert_int_eq(keel_pg_check(pg), 0);
    return pg;
}

/* A cache over the tiers given; prefix/table unique to the test. */
typedef struct rig {
    keel_redis *redis;
    keel_pg *pg;
    keel_cache *c;
    char prefix[80], table[80];
    loader_state ls;
} rig;

static void rig_open(rig *r, bool redis, bool pg, uint64_t l1_max_ttl, size_t max_items)
{
    memset(&r->ls, 0, sizeof r->ls);
    snprintf(r->prefix, sizeof r->prefix, "%s:", uniq("c"));
    snprintf(r->table, sizeof r->table, "%s", uniq("tbl"));
    r->redis = redis ? kt_redis_open(kt_redis_nodes(), 500 * MS) : NULL;
    r->pg = pg ? open_pg() : NULL;
    keel_cache_opts o = {.redis = r->redis, .redis_prefix = r->prefix, .pg = r->pg, .table = r->table,
                         .loader = load, .loader_ud = &r->ls, .l1_max_ttl_ns = l1_max_ttl, .l1_max_items = max_items,
                         .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_cache_create(&r->c, &o), 0);
    ck_assert_int_eq(keel_cache_create_schema(r->c), 0);
}

/* A second cache on the rig's tiers, as another process has: L1 of its
 * own, L2 only when `redis`. */
static keel_cache *rig_peer(rig *r, bool redis)
{
    keel_cache *c;
    keel_cache_opts o = {.redis = redis ? r->redis : NULL, .redis_prefix = r->prefix, .pg = r->pg,
                         .table = r->table, .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_cache_create(&c, &o), 0);
    return c;
}

static void rig_close(rig *r)
{
    keel_cache_destroy(r->c);
    keel_redis_destroy(r->redis);
    keel_pg_destroy(r->pg);
}

/* get as a string; returns the result code. */
static int get(keel_cache *c, const char *key, char *out, size_t cap)
{
    size_t len = 0;
    int rc = keel_cache_get(c, key, strlen(key), out, cap - 1, &len);
    out[rc == 0 ? len : 0] = '\0';
    return rc;
}

static int set(keel_cache *c, const char *key, const char *val, const char *const *tags, size_t ntags)
{
    return keel_cache_set(c, key, strlen(key), val, strlen(val), 0, tags, ntags);
}

/* Whether Redis holds a value for key (prefix "v:" key; not an absence). */
static bool in_l2(rig *r, const void *key, size_t klen)
{
    char k[256];
    size_t pl = strlen(r->prefix);
    memcpy(k, r->prefix, pl);
    memcpy(k + pl, "v:", 2);
    memcpy(k + pl + 2, key, klen);
    const char *a[2] = {"GET", k};
    size_t l[2] = {3, pl + 2 + klen};
    redisReply *rep;
    ck_assert_int_eq(keel_redis_command(r->redis, k, l[1], 2, a, l, &rep), 0);
    bool yes = rep->type == REDIS_REPLY_STRING && rep->len > 0 && rep->str[0] == 'K'; /* not an absence, 'N' */
    freeReplyObject(rep);
    return yes;
}

static void l2_drop(rig *r, const char *key)
{
    char k[256];
    int n = snprintf(k, sizeof k, "%sv:%s", r->prefix, key);
    const char *a[2] = {"DEL", k};
    size_t l[2] = {3, (size_t)n};
    redisReply *rep;
    ck_assert_int_eq(keel_redis_command(r->redis, k, (size_t)n, 2, a, l, &rep), 0);
    freeReplyObject(rep);
}

static bool in_l3(rig *r, const void *key, size_t klen)
{
    char sql[200];
    snprintf(sql, sizeof sql, "SELECT count(*) FROM \"%s\" WHERE key = $1 AND expires_at > now()", r->table);
    const char *v[1] = {key};
    int l[1] = {(int)klen}, f[1] = {1};
    keel_pg_params p = {1, v, l, f, NULL, 0};
    PGresult *res;
    ck_assert_int_eq(keel_pg_exec(r->pg, KEEL_PG_WRITE, sql, &p, &res), 0);
    bool yes = strcmp(PQgetvalue(res, 0, 0), "1") == 0;
    PQclear(res);
    return yes;
}

/* ---- tiers ---- */

START_TEST(a_miss_fills_every_tier_and_l1_ttl_is_capped)
{
    rig r;
    rig_open(&r, true, true, 1 * S, 0);
    char v[64];
    ck_assert_int_eq(get(r.c, "user:1", v, sizeof v), 0);
    ck_assert_str_eq(v, "loaded:user:1");
    ck_assert_int_eq(atomic_load(&r.ls.calls), 1);
    ck_assert(in_l2(&r, "user:1", 6));
    ck_assert(in_l3(&r, "user:1", 6));
    ck_assert_int_eq(get(r.c, "user:1", v, sizeof v), 0); /* L1 */
    kt_clock_advance(&clk, 2 * S);                          /* past L1's cap of 1 s, within the 60 s TTL */
    ck_assert_int_eq(get(r.c, "user:1", v, sizeof v), 0); /* L2, and L1 again */
    ck_assert_int_eq(get(r.c, "user:1", v, sizeof v), 0);
    l2_drop(&r, "user:1");
    kt_clock_advance(&clk, 2 * S);
    ck_assert_int_eq(get(r.c, "user:1", v, sizeof v), 0); /* L3, which fills L2 again */
    ck_assert_str_eq(v, "loaded:user:1");
    ck_assert(in_l2(&r, "user:1", 6));
    keel_cache_stats st;
    keel_cache_stats_get(r.c, &st);
    ck_assert_uint_eq(st.hits_l1, 2);
    ck_assert_uint_eq(st.hits_l2, 1);
    ck_assert_uint_eq(st.hits_l3, 1);
    ck_assert_uint_eq(st.loads, 1);
    ck_assert_int_eq(atomic_load(&r.ls.calls), 1);
    /* a small buffer: KEEL_ERANGE and the size */
    size_t len;
    char tiny[4];
    ck_assert_int_eq(keel_cache_get(r.c, "user:1", 6, tiny, sizeof tiny, &len), KEEL_ERANGE);
    ck_assert_uint_eq(len, strlen("loaded:user:1"));
    rig_close(&r);
}
END_TEST

START_TEST(set_and_del_go_through_every_tier)
{
    rig r;
    rig_open(&r, true, true, 0, 0);
    const char bin[] = "k\0ey";
    ck_assert_int_eq(keel_cache_set(r.c, bin, 4, "v\0alue", 6, 0, NULL, 0), 0);
    ck_assert(in_l2(&r, bin, 4));
    ck_assert(in_l3(&r, bin, 4));
    char v[16];
    size_t len;
    ck_assert_int_eq(keel_cache_get(r.c, bin, 4, v, sizeof v, &len), 0);
    ck_assert_uint_eq(len, 6);
    ck_assert_int_eq(memcmp(v, "v\0alue", 6), 0);
    ck_assert_int_eq(keel_cache_del(r.c, bin, 4), 0);
    ck_assert(!in_l2(&r, bin, 4));
    ck_assert(!in_l3(&r, bin, 4));
    r.ls.absent = 1;
    ck_assert_int_eq(keel_cache_get(r.c, bin, 4, v, sizeof v, &len), KEEL_ENOTFOUND);
    size_t swept = 99;
    ck_assert_int_eq(keel_cache_set(r.c, "short", 5, "x", 1, 1 * MS, NULL, 0), 0);
    kt_nap(20 * MS); /* the server's clock: the row's time must really pass */
    ck_assert_int_eq(keel_cache_sweep(r.c, 10, &swept), 0);
    ck_assert_uint_eq(swept, 1);
    ck_assert_int_eq(keel_cache_set(r.c, "short", 5, "x", 1, 1 * MS, NULL, 0), 0);
    kt_nap(20 * MS);
    ck_assert_int_eq(keel_cache_sweep(r.c, SIZE_MAX, &swept), 0); /* more than a bigint: no limit */
    ck_assert_uint_eq(swept, 1);
    rig_close(&r);
}
END_TEST

/* A sweep and a set of the same expired key at once: the sweep saw the
 * row expired, the set makes it live again and commits while the sweep
 * waits for its lock. The sweep deletes only what is still expired. */
typedef struct sweeper_job {
    keel_cache *c;
    int rc;
    size_t deleted;
    atomic_bool done;
} sweeper_job;

static void *sweep_thread(void *arg)
{
    sweeper_job *j = arg;
    j->rc = keel_cache_sweep(j->c, 10, &j->deleted);
    atomic_store(&j->done, true);
    return NULL;
}

START_TEST(a_sweep_spares_a_row_set_again_meanwhile)
{
    rig r;
    rig_open(&r, false, true, 0, 0);
    ck_assert_int_eq(keel_cache_set(r.c, "again", 5, "old", 3, 1 * MS, NULL, 0), 0);
    kt_nap(20 * MS); /* the server's clock: the row expires */
    PGconn *held = kt_pg_connect(kt_env("KEEL_TEST_PG")); /* a set of the key, not yet committed */
    kt_pg_exec(held, "BEGIN");
    char sql[300];
    snprintf(sql, sizeof sql,
             "UPDATE \"%s\" SET value = 'new'::bytea, expires_at = now() + interval '1 hour' WHERE key = 'again'::bytea",
             r.table);
    kt_pg_exec(held, sql);
    sweeper_job j = {r.c, 99, 99, false};
    pthread_t t;
    pthread_create(&t, NULL, sweep_thread, &j);
    PGconn *look = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    long long waiting = 0; /* real time: until the sweep waits for the row's lock */
    for (int i = 0; i < 500 && !waiting; i++) {
        waiting = kt_pg_number(look, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                     "AND query LIKE 'DELETE%'");
        if (!waiting)
            kt_nap(10 * MS);
    }
    ck_assert_int_eq(waiting, 1);
    ck_assert(!atomic_load(&j.done));
    kt_pg_exec(held, "COMMIT");
    pthread_join(t, NULL);
    ck_assert_int_eq(j.rc, 0);
    ck_assert_uint_eq(j.deleted, 0);
    ck_assert(in_l3(&r, "again", 5));
    PQfinish(look);
    PQfinish(held);
    rig_close(&r);
}
END_TEST

/* A sweep interval too long to add to the time is a wait forever, not a
 * sweep after sweep. */
START_TEST(a_sweep_interval_past_the_clock_never_comes)
{
    rig r;
    memset(&r, 0, sizeof r);
    snprintf(r.table, sizeof r.table, "%s", uniq("sw"));
    r.pg = open_pg();
    keel_cache_opts o = {.pg = r.pg, .table = r.table, .sweep_interval_ns = UINT64_MAX};
    ck_assert_int_eq(keel_cache_create(&r.c, &o), 0);
    ck_assert_int_eq(keel_cache_create_schema(r.c), 0);
    ck_assert_int_eq(keel_cache_set(r.c, "short", 5, "x", 1, 1 * MS, NULL, 0), 0);
    kt_nap(300 * MS); /* real time: the row expires, and a busy sweeper would take it */
    PGconn *look = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    char sql[200];
    snprintf(sql, sizeof sql, "SELECT count(*) FROM \"%s\"", r.table);
    ck_assert_int_eq(kt_pg_number(look, sql), 1);
    PQfinish(look);
    rig_close(&r);
}
END_TEST

/* The sweeper thread deletes expired rows, batch after batch, and spares
 * live ones. Real time: it waits on CLOCK_MONOTONIC, and rows expire by
 * the server's clock. */
START_TEST(the_sweeper_deletes_expired_rows)
{
    rig r;
    memset(&r, 0, sizeof r);
    snprintf(r.table, sizeof r.table, "%s", uniq("sw"));
    r.pg = open_pg();
    keel_cache_opts o = {.pg = r.pg, .table = r.table, .sweep_interval_ns = 20 * MS};
    ck_assert_int_eq(keel_cache_create(&r.c, &o), 0);
    ck_assert_int_eq(keel_cache_create_schema(r.c), 0);
    ck_assert_int_eq(keel_cache_set(r.c, "live", 4, "x", 1, 3600 * S, NULL, 0), 0);
    PGconn *look = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    char sql[300]; /* more than two of the sweeper's batches of 1000 */
    snprintf(sql, sizeof sql,
             "INSERT INTO \"%s\" SELECT convert_to('old' || g, 'UTF8'), 'v'::bytea, now() - interval '1 second', "
             "NULL FROM generate_series(1, 2500) g",
             r.table);
    kt_pg_exec(look, sql);
    snprintf(sql, sizeof sql, "SELECT count(*) FROM \"%s\"", r.table);
    long long rows = -1;
    for (int i = 0; i < 500 && (rows = kt_pg_number(look, sql)) != 1; i++)
        kt_nap(20 * MS); /* at most 10 s */
    ck_assert_int_eq(rows, 1);
    ck_assert(in_l3(&r, "live", 4));
    PQfinish(look);
    rig_close(&r);
}
END_TEST

/* L3's table is UNLOGGED unless l3_logged. */
START_TEST(the_l3_table_is_unlogged_unless_asked)
{
    PGconn *look = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    for (int logged = 0; logged < 2; logged++) {
        rig r;
        memset(&r, 0, sizeof r);
        snprintf(r.table, sizeof r.table, "%s", uniq("lg"));
        r.pg = open_pg();
        keel_cache_opts o = {.pg = r.pg, .table = r.table, .l3_logged = logged};
        ck_assert_int_eq(keel_cache_create(&r.c, &o), 0);
        ck_assert_int_eq(keel_cache_create_schema(r.c), 0);
        char sql[200];
        snprintf(sql, sizeof sql, "SELECT ascii(relpersistence) FROM pg_class WHERE relname = '%s'", r.table);
        ck_assert_int_eq(kt_pg_number(look, sql), logged ? 'p' : 'u');
        rig_close(&r);
    }
    PQfinish(look);
}
END_TEST

/* MGETs a Redis node has run so far (INFO commandstats), asked through a
 * connection of the test's own. */
static long long mgets_on(int node)
{
    char host[64];
    int port;
    kt_redis_node(node, host, sizeof host, &port);
    redisContext *c = redisConnect(host, port);
    ck_assert(c && !c->err);
    redisReply *rep = redisCommand(c, "INFO commandstats");
    ck_assert(rep && rep->type == REDIS_REPLY_STRING);
    const char *at = strstr(rep->str, "cmdstat_mget:calls=");
    long long n = at ? atoll(at + strlen("cmdstat_mget:calls=")) : 0;
    freeReplyObject(rep);
    redisFree(c);
    return n;
}

START_TEST(a_multi_get_asks_each_node_once)
{
    rig r;
    rig_open(&r, true, false, 0, 0);
    enum { N = 60 };
    char keys[N + 2][16], bufs[N + 2][64];
    keel_cache_item it[N + 2];
    for (int i = 0; i < N + 2; i++) {
        snprintf(keys[i], sizeof keys[i], "m%d", i);
        if (i < N)
            ck_assert_int_eq(set(r.c, keys[i], keys[i], NULL, 0), 0);
    }
    keel_cache *cold; /* a second process, in effect: its L1 is empty */
    keel_cache_opts o = {.redis = r.redis, .redis_prefix = r.prefix, .loader = load, .loader_ud = &r.ls};
    ck_assert_int_eq(keel_cache_create(&cold, &o), 0);
    int nodes = kt_redis_nodes();
    ck_assert_int_le(nodes, 8);
    int holds[8] = {0}, busy = 0;
    long long before[8];
    for (int i = 0; i < N + 2; i++) {
        it[i] = (keel_cache_item){keys[i], strlen(keys[i]), bufs[i], sizeof bufs[i], 0, 99};
        char k[64];
        int n = snprintf(k, sizeof k, "%sv:%s", r.prefix, keys[i]); /* the key in Redis */
        holds[keel_redis_node_of(r.redis, k, (size_t)n)]++;
    }
    for (int i = 0; i < nodes; i++) {
        busy += holds[i] > 0;
        before[i] = mgets_on(i);
    }
    ck_assert_int_gt(busy, 1); /* else one MGET in all proves nothing */
    ck_assert_int_eq(keel_cache_get_many(cold, it, N + 2), 0);
    for (int i = 0; i < nodes; i++) { /* one MGET for all of a node's keys, none elsewhere */
        long long got = mgets_on(i) - before[i];
        ck_assert_msg(got == (holds[i] > 0), "node %d (%d keys): %lld MGETs", i, holds[i], got);
    }
    for (int i = 0; i < N + 2; i++) {
        ck_assert_int_eq(it[i].rc, 0);
        bufs[i][it[i].len] = '\0';
        if (i < N)
            ck_assert_str_eq(bufs[i], keys[i]);
        else
            ck_assert(strncmp(bufs[i], "loaded:", 7) == 0); /* the two not in L2: the loader */
    }
    keel_cache_stats st;
    keel_cache_stats_get(cold, &st);
    ck_assert_uint_eq(st.hits_l2, N);
    ck_assert_uint_eq(st.loads, 2);
    for (int i = 0; i < nodes; i++)
        before[i] = mgets_on(i);
    ck_assert_int_eq(keel_cache_get_many(cold, it, N + 2), 0); /* now all from L1 */
    keel_cache_stats_get(cold, &st);
    ck_assert_uint_eq(st.hits_l1, N + 2);
    for (int i = 0; i < nodes; i++)
        ck_assert_int_eq(mgets_on(i), before[i]); /* Redis not asked */
    keel_cache_destroy(cold);
    rig_close(&r);
}
END_TEST

/* ---- single-flight, negative caching, XFetch ---- */

typedef struct getter {
    keel_cache *c;
    int rc;
    char v[64];
} getter;

static void *get_thread(void *arg)
{
    getter *g = arg;
    g->rc = get(g->c, "hot", g->v, sizeof g->v);
    return NULL;
}

START_TEST(eight_threads_missing_one_key_load_it_once)
{
    rig r;
    rig_open(&r, false, false, 0, 0);
    r.ls.sleep_ns = 100 * MS; /* a slow loader: the others arrive meanwhile */
    getter g[8];
    pthread_t t[8];
    for (int i = 0; i < 8; i++) {
        g[i] = (getter){r.c, 99, ""};
        pthread_create(&t[i], NULL, get_thread, &g[i]);
    }
    for (int i = 0; i < 8; i++) {
        pthread_join(t[i], NULL);
        ck_assert_int_eq(g[i].rc, 0);
        ck_assert_str_eq(g[i].v, "loaded:hot");
    }
    ck_assert_int_eq(atomic_load(&r.ls.calls), 1);
    keel_cache_stats st;
    keel_cache_stats_get(r.c, &st);
    ck_assert_uint_eq(st.loads, 1);
    ck_assert_uint_eq(st.load_waits + st.hits_l1, 7);
    rig_close(&r);
}
END_TEST

/* Waits until a second get of "hot", started after the stats st0 were
 * read, either waits for the load in flight or calls the loader itself;
 * returns the loader's calls then. */
static int second_caller_settles(rig *r, const keel_cache_stats *st0, int calls)
{
    keel_cache_stats st;
    for (;;) {
        keel_cache_stats_get(r->c, &st);
        if (st.load_waits > st0->load_waits || atomic_load(&r->ls.calls) > calls)
            return atomic_load(&r->ls.calls);
        kt_nap(1 * MS);
    }
}

/* A write of another key while "hot" loads does not make a later miss of
 * "hot" load again; a delete of "hot" itself does (the load in flight may
 * have read what it deleted). */
START_TEST(only_an_invalidation_of_the_key_splits_its_flight)
{
    rig r;
    rig_open(&r, false, false, 0, 0);
    getter g[2];
    pthread_t t[2];
    for (int round = 0; round < 2; round++) {
        int calls = atomic_load(&r.ls.calls);
        atomic_store(&r.ls.hold, 1);
        g[0] = (getter){r.c, 99, ""};
        pthread_create(&t[0], NULL, get_thread, &g[0]);
        while (atomic_load(&r.ls.calls) == calls) /* the first caller loads */
            kt_nap(1 * MS);
        if (round == 0) {
            const char *tags[1] = {"other"};
            ck_assert_int_eq(set(r.c, "other", "o", tags, 1), 0);
            ck_assert_int_eq(keel_cache_del(r.c, "other2", 6), 0);
        } else {
            ck_assert_int_eq(keel_cache_del(r.c, "hot", 3), 0);
        }
        keel_cache_stats st0;
        keel_cache_stats_get(r.c, &st0);
        g[1] = (getter){r.c, 99, ""};
        pthread_create(&t[1], NULL, get_thread, &g[1]);
        int now = second_caller_settles(&r, &st0, calls + 1);
        atomic_store(&r.ls.hold, 0);
        for (int i = 0; i < 2; i++) {
            pthread_join(t[i], NULL);
            ck_assert_int_eq(g[i].rc, 0);
            ck_assert_str_eq(g[i].v, "loaded:hot");
        }
        ck_assert_int_eq(now, calls + (round == 0 ? 1 : 2));
        ck_assert_int_eq(keel_cache_del(r.c, "hot", 3), 0);
    }
    rig_close(&r);
}
END_TEST

/* A write of another key while "hot" loads does not keep the loaded
 * value out of L1 (many processes writing other keys would otherwise keep
 * every load out); a delete of "hot" itself does. */
START_TEST(only_an_invalidation_of_the_key_keeps_a_load_out_of_l1)
{
    rig r;
    rig_open(&r, false, false, 0, 0);
    for (int round = 0; round < 2; round++) {
        int calls = atomic_load(&r.ls.calls);
        atomic_store(&r.ls.hold, 1);
        getter g = {r.c, 99, ""};
        pthread_t t;
        pthread_create(&t, NULL, get_thread, &g);
        while (atomic_load(&r.ls.calls) == calls) /* it loads */
            kt_nap(1 * MS);
        if (round == 0) {
            ck_assert_int_eq(set(r.c, "other", "o", NULL, 0), 0);
            ck_assert_int_eq(keel_cache_del(r.c, "other2", 6), 0);
        } else {
            ck_assert_int_eq(keel_cache_del(r.c, "hot", 3), 0);
        }
        atomic_store(&r.ls.hold, 0);
        pthread_join(t, NULL);
        ck_assert_int_eq(g.rc, 0);
        ck_assert_str_eq(g.v, "loaded:hot");
        keel_cache_stats a, b;
        keel_cache_stats_get(r.c, &a);
        char v[64];
        size_t len;
        ck_assert_int_eq(keel_cache_get(r.c, "hot", 3, v, sizeof v, &len), 0);
        keel_cache_stats_get(r.c, &b);
        ck_assert_uint_eq(b.hits_l1 - a.hits_l1, round == 0); /* in L1 only when another key moved */
        ck_assert_int_eq(atomic_load(&r.ls.calls), calls + 1 + (round == 1));
        ck_assert_int_eq(keel_cache_del(r.c, "hot", 3), 0);
    }
    rig_close(&r);
}
END_TEST

/* A write of another key while "hot" loads does not keep the loaded
 * value from L2 and L3, where other processes wait for it; a delete of
 * "hot" itself does. */
START_TEST(only_an_invalidation_of_the_key_keeps_a_load_from_the_lower_tiers)
{
    rig r;
    rig_open(&r, true, true, 0, 0);
    for (int round = 0; round < 2; round++) {
        ck_assert_int_eq(keel_cache_del(r.c, "hot", 3), 0);
        int calls = atomic_load(&r.ls.calls);
        atomic_store(&r.ls.hold, 1);
        getter g = {r.c, 99, ""};
        pthread_t t;
        pthread_create(&t, NULL, get_thread, &g);
        while (atomic_load(&r.ls.calls) == calls) /* it loads */
            kt_nap(1 * MS);
        if (round == 0)
            ck_assert_int_eq(set(r.c, "other", "o", NULL, 0), 0);
        else
            ck_assert_int_eq(keel_cache_del(r.c, "hot", 3), 0);
        atomic_store(&r.ls.hold, 0);
        pthread_join(t, NULL);
        ck_assert_int_eq(g.rc, 0);
        ck_assert_str_eq(g.v, "loaded:hot");
        ck_assert_int_eq(in_l2(&r, "hot", 3), (round == 0));
        ck_assert_int_eq(in_l3(&r, "hot", 3), (round == 0));
    }
    rig_close(&r);
}
END_TEST

/* An invalidation of a tag the loaded value does not carry, while "hot"
 * loads, neither splits its flight nor keeps the value from L2 and L3:
 * the callers that miss after it wait for the one load. One of the
 * value's own tag does split it: a caller that joined after it loads
 * again, since the value may be from before it. */
START_TEST(only_a_tag_the_value_carries_splits_its_flight)
{
    rig r;
    rig_open(&r, true, true, 0, 0);
    r.ls.tag = "mine";
    for (int round = 0; round < 2; round++) {
        ck_assert_int_eq(keel_cache_del(r.c, "hot", 3), 0);
        int calls = atomic_load(&r.ls.calls);
        keel_cache_stats st0;
        keel_cache_stats_get(r.c, &st0);
        atomic_store(&r.ls.hold, 1);
        getter g[4];
        pthread_t t[4];
        g[0] = (getter){r.c, 99, ""};
        pthread_create(&t[0], NULL, get_thread, &g[0]);
        while (atomic_load(&r.ls.calls) == calls) /* the first caller loads */
            kt_nap(1 * MS);
        ck_assert_int_eq(keel_cache_invalidate_tag(r.c, round == 0 ? "unrelated" : "mine"), 0);
        for (int i = 1; i < 4; i++) {
            g[i] = (getter){r.c, 99, ""};
            pthread_create(&t[i], NULL, get_thread, &g[i]);
        }
        keel_cache_stats st;
        do { /* the three join the load in flight, or (the bug) start their own */
            kt_nap(1 * MS);
            keel_cache_stats_get(r.c, &st);
        } while (st.load_waits - st0.load_waits + (uint64_t)(atomic_load(&r.ls.calls) - calls - 1) < 3);
        atomic_store(&r.ls.hold, 0);
        for (int i = 0; i < 4; i++) {
            pthread_join(t[i], NULL);
            ck_assert_int_eq(g[i].rc, 0);
            ck_assert_str_eq(g[i].v, "loaded:hot");
        }
        if (round == 0) {
            ck_assert_int_eq(atomic_load(&r.ls.calls), calls + 1);
            ck_assert(in_l2(&r, "hot", 3) && in_l3(&r, "hot", 3));
        } else {
            /* the three joined after it: each loads again, on its own
             * (a caller waits for at most one load besides its own); one
             * that comes after another's load finds the value in L2, so
             * one to three loads more, as the threads happen to run */
            int more = atomic_load(&r.ls.calls) - calls - 1;
            ck_assert_int_ge(more, 1);
            ck_assert_int_le(more, 3);
        }
    }
    rig_close(&r);
}
END_TEST

/* A clock that holds one thread at its second reading of it: a get that
 * missed L1 reads it once to ask a tier (tier_up) and once when the
 * tier has answered (tier_done), so it is held with the value read and
 * not yet put into L1. */
static struct {
    _Atomic int armed, calls, held, go;
    pthread_t who;
} hold;

static uint64_t holding_clock(void *ud)
{
    if (atomic_load(&hold.armed) && pthread_equal(pthread_self(), hold.who) && atomic_fetch_add(&hold.calls, 1) == 1) {
        atomic_store(&hold.held, 1);
        while (!atomic_load(&hold.go))
            kt_nap(1 * MS);
    }
    return kt_clock_now(ud);
}

/* A rig over L2 or L3 whose cache reads the holding clock, not yet armed. */
static void rig_open_held(rig *r, bool l2)
{
    rig_open(r, l2, !l2, 0, 0);
    keel_cache_destroy(r->c); /* again, on the holding clock */
    keel_cache_opts o = {.redis = r->redis, .redis_prefix = r->prefix, .pg = r->pg, .table = r->table,
                         .loader = load, .loader_ud = &r->ls, .clock = holding_clock, .clock_ud = &clk};
    ck_assert_int_eq(keel_cache_create(&r->c, &o), 0);
    atomic_store(&hold.calls, 0);
    atomic_store(&hold.held, 0);
    atomic_store(&hold.go, 0);
}

typedef struct held_getter {
    keel_cache *c;
    bool many;
    int rc;
    char v[64];
} held_getter;

static void *held_get_thread(void *arg)
{
    held_getter *g = arg;
    hold.who = pthread_self();
    atomic_store(&hold.armed, 1);
    if (!g->many) {
        g->rc = get(g->c, "k", g->v, sizeof g->v);
    } else {
        keel_cache_item it = {.key = "k", .klen = 1, .buf = g->v, .cap = sizeof g->v - 1};
        g->rc = keel_cache_get_many(g->c, &it, 1);
        g->v[g->rc == 0 ? it.len : 0] = '\0';
    }
    atomic_store(&hold.armed, 0);
    return NULL;
}

/* A get (or multi-get) that read "k" from L2 or L3 just before a del, a
 * set, or a tag or prefix invalidation of it returns what it read but
 * does not put it into L1: the next get sees the invalidation. */
START_TEST(a_value_read_below_before_an_invalidation_stays_out_of_l1)
{
    for (int round = 0; round < 16; round++) {
        bool l2 = round % 2 == 0, many = round >= 8;
        int kind = (round / 2) % 4; /* del, set, tag, prefix */
        rig r;
        rig_open_held(&r, l2);
        keel_cache *peer = rig_peer(&r, l2); /* the value below only, not in this L1 */
        const char *tags[1] = {"tg"};
        ck_assert_int_eq(set(peer, "k", "old", tags, 1), 0);
        keel_cache_stats st;
        do /* its announcement came (and went) before the get */
            keel_cache_stats_get(r.c, &st);
        while (l2 && st.invalidations_received == 0 && (kt_nap(1 * MS), true));
        held_getter g = {r.c, many, 99, ""};
        pthread_t t;
        pthread_create(&t, NULL, held_get_thread, &g);
        while (!atomic_load(&hold.held))
            kt_nap(1 * MS);
        if (kind == 0)
            ck_assert_int_eq(keel_cache_del(r.c, "k", 1), 0);
        else if (kind == 1)
            ck_assert_int_eq(set(r.c, "k", "new", NULL, 0), 0);
        else if (kind == 2)
            ck_assert_int_eq(keel_cache_invalidate_tag(r.c, "tg"), 0);
        else
            ck_assert_int_eq(keel_cache_invalidate_prefix(r.c, "k", 1), 0);
        atomic_store(&hold.go, 1);
        pthread_join(t, NULL);
        ck_assert_int_eq(g.rc, 0);
        ck_assert_str_eq(g.v, "old"); /* read before the invalidation */
        char v[64];
        ck_assert_int_eq(get(r.c, "k", v, sizeof v), 0);
        ck_assert_msg(strcmp(v, kind == 1 ? "new" : "loaded:k") == 0, "round %d: got \"%s\"", round, v);
        keel_cache_destroy(peer);
        rig_close(&r);
    }
}
END_TEST

static void *held_set_thread(void *arg)
{
    held_getter *g = arg;
    hold.who = pthread_self();
    atomic_store(&hold.armed, 1);
    g->rc = set(g->c, "k", "new", NULL, 0);
    atomic_store(&hold.armed, 0);
    return NULL;
}

/* A set held between its writes below and L1 while a del of the key
 * runs: the del, the later of the two everywhere else, wins in L1 too
 * (no value there that no tier has). */
START_TEST(a_set_overtaken_by_a_del_leaves_no_value_in_l1)
{
    for (int round = 0; round < 2; round++) {
        bool l2 = round == 0;
        rig r;
        rig_open_held(&r, l2);
        held_getter g = {r.c, false, 99, ""};
        pthread_t t;
        pthread_create(&t, NULL, held_set_thread, &g);
        while (!atomic_load(&hold.held)) /* its value is below, not yet in L1 */
            kt_nap(1 * MS);
        ck_assert_int_eq(keel_cache_del(r.c, "k", 1), 0);
        atomic_store(&hold.go, 1);
        pthread_join(t, NULL);
        ck_assert_int_eq(g.rc, 0);
        ck_assert(l2 ? !in_l2(&r, "k", 1) : !in_l3(&r, "k", 1));
        char v[64];
        ck_assert_int_eq(get(r.c, "k", v, sizeof v), 0);
        ck_assert_msg(strcmp(v, "loaded:k") == 0, "round %d: got \"%s\"", round, v);
        rig_close(&r);
    }
}
END_TEST

START_TEST(an_absent_answer_is_cached_for_negative_ttl)
{
    rig r;
    memset(&r, 0, sizeof r);
    r.ls.absent = 1;
    keel_cache_opts o = {.loader = load, .loader_ud = &r.ls, .negative_ttl_ns = 5 * S, .clock = kt_clock_now,
                         .clock_ud = &clk};
    ck_assert_int_eq(keel_cache_create(&r.c, &o), 0);
    char v[64];
    ck_assert_int_eq(get(r.c, "ghost", v, sizeof v), KEEL_ENOTFOUND);
    ck_assert_int_eq(get(r.c, "ghost", v, sizeof v), KEEL_ENOTFOUND);
    ck_assert_int_eq(atomic_load(&r.ls.calls), 1);
    kt_clock_advance(&clk, 6 * S);
    r.ls.absent = 0;
    ck_assert_int_eq(get(r.c, "ghost", v, sizeof v), 0);
    ck_assert_int_eq(atomic_load(&r.ls.calls), 2);
    keel_cache_stats st;
    keel_cache_stats_get(r.c, &st);
    ck_assert_uint_eq(st.negative_hits, 1);
    keel_cache_destroy(r.c);
}
END_TEST

/* A key given twice to one multi-get is loaded once: the second finds
 * what the first put into L1, a value or an absence. */
START_TEST(a_multi_get_loads_a_key_given_twice_once)
{
    rig r;
    memset(&r, 0, sizeof r);
    keel_cache_opts o = {.loader = load, .loader_ud = &r.ls, .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_cache_create(&r.c, &o), 0);
    char bufs[3][64];
    keel_cache_item it[3] = {{"dup", 3, bufs[0], sizeof bufs[0], 0, 99},
                             {"one", 3, bufs[1], sizeof bufs[1], 0, 99},
                             {"dup", 3, bufs[2], sizeof bufs[2], 0, 99}};
    ck_assert_int_eq(keel_cache_get_many(r.c, it, 3), 0);
    for (int i = 0; i < 3; i += 2) {
        ck_assert_int_eq(it[i].rc, 0);
        ck_assert_uint_eq(it[i].len, strlen("loaded:dup"));
        ck_assert_int_eq(memcmp(bufs[i], "loaded:dup", it[i].len), 0);
    }
    ck_assert_int_eq(atomic_load(&r.ls.calls), 2);
    r.ls.absent = 1;
    keel_cache_item gone[2] = {{"gone", 4, bufs[0], sizeof bufs[0], 0, 99},
                               {"gone", 4, bufs[1], sizeof bufs[1], 0, 99}};
    ck_assert_int_eq(keel_cache_get_many(r.c, gone, 2), KEEL_ENOTFOUND);
    ck_assert_int_eq(gone[0].rc, KEEL_ENOTFOUND);
    ck_assert_int_eq(gone[1].rc, KEEL_ENOTFOUND);
    ck_assert_int_eq(atomic_load(&r.ls.calls), 3);
    keel_cache_stats st;
    keel_cache_stats_get(r.c, &st);
    ck_assert_uint_eq(st.loads, 3);
    keel_cache_destroy(r.c);
}
END_TEST

/* Many copies of one key among a few others: each copy gets the one
 * load's value (KEEL_ERANGE in a buffer too small), each other key its
 * own, a bad item KEEL_EINVAL. Correctness only; dupes used to be matched
 * by a walk back over every earlier copy, quadratic in the copies. */
START_TEST(a_multi_get_with_many_copies_of_a_key_answers_each)
{
    enum { N = 50000 };
    rig r;
    memset(&r, 0, sizeof r);
    keel_cache_opts o = {.loader = load, .loader_ud = &r.ls, .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_cache_create(&r.c, &o), 0);
    keel_cache_item *it = calloc(N, sizeof *it);
    char(*bufs)[16] = calloc(N, sizeof *bufs);
    ck_assert(it && bufs);
    for (size_t i = 0; i < N; i++) {
        const char *k = i % 10007 == 3 ? "one" : i % 10007 == 5 ? "two" : "dup";
        it[i] = (keel_cache_item){k, strlen(k), bufs[i], i % 7 == 1 ? 4 : sizeof bufs[i], 0, 99};
        if (i % 12345 == 9)
            it[i].klen = 0; /* bad */
    }
    keel_cache_get_many(r.c, it, N);
    for (size_t i = 0; i < N; i++) {
        if (i % 12345 == 9) {
            ck_assert_int_eq(it[i].rc, KEEL_EINVAL);
            continue;
        }
        char want[16];
        int wl = snprintf(want, sizeof want, "loaded:%s", (const char *)it[i].key);
        ck_assert_uint_eq(it[i].len, (size_t)wl);
        if (i % 7 == 1) {
            ck_assert_int_eq(it[i].rc, KEEL_ERANGE);
        } else {
            ck_assert_int_eq(it[i].rc, 0);
            ck_assert_int_eq(memcmp(bufs[i], want, (size_t)wl), 0);
        }
    }
    ck_assert_int_eq(atomic_load(&r.ls.calls), 3);
    free(it);
    free(bufs);
    keel_cache_destroy(r.c);
}
END_TEST

/* A loader whose value L1 cannot keep (bigger than an L1 shard) or that
 * fails. */
static struct {
    _Atomic int calls;
    size_t size;
    int rc;
} unkept;

static int unkept_load(const void *key, size_t klen, keel_cache_load *ld, void *ud)
{
    (void)key, (void)klen, (void)ud;
    atomic_fetch_add(&unkept.calls, 1);
    if (unkept.rc)
        return unkept.rc;
    static char big[4096];
    memset(big, 'b', sizeof big);
    return keel_cache_load_set(ld, big, unkept.size, 60 * S, NULL, 0);
}

/* A key given twice is loaded once even when L1 cannot keep its value for
 * the second copy to find: the copies share the one result, each in its
 * own buffer (KEEL_ERANGE for one too small). */
START_TEST(a_multi_get_loads_a_key_given_twice_once_even_when_l1_cannot_keep_it)
{
    keel_cache *c;
    keel_cache_opts o = {.l1_max_bytes = 64 << 10, .loader = unkept_load, .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_cache_create(&c, &o), 0); /* shards of 2 KiB */
    static char bufs[3][4096];
    unkept.size = 3000;
    keel_cache_item it[3] = {{"dup", 3, bufs[0], 100, 0, 99},
                             {"dup", 3, bufs[1], sizeof bufs[1], 0, 99},
                             {"dup", 3, bufs[2], sizeof bufs[2], 0, 99}};
    ck_assert_int_eq(keel_cache_get_many(c, it, 3), KEEL_ERANGE);
    ck_assert_int_eq(it[0].rc, KEEL_ERANGE);
    ck_assert_uint_eq(it[0].len, 3000);
    for (int i = 1; i < 3; i++) {
        ck_assert_int_eq(it[i].rc, 0);
        ck_assert_uint_eq(it[i].len, 3000);
        ck_assert(bufs[i][0] == 'b' && bufs[i][2999] == 'b');
    }
    ck_assert_int_eq(atomic_load(&unkept.calls), 1);
    unkept.rc = KEEL_EUNAVAIL; /* an error, which L1 does not keep either */
    keel_cache_item bad[2] = {{"bad", 3, bufs[0], 64, 0, 99}, {"bad", 3, bufs[1], 64, 0, 99}};
    ck_assert_int_eq(keel_cache_get_many(c, bad, 2), KEEL_EUNAVAIL);
    ck_assert_int_eq(bad[0].rc, KEEL_EUNAVAIL);
    ck_assert_int_eq(bad[1].rc, KEEL_EUNAVAIL);
    ck_assert_int_eq(atomic_load(&unkept.calls), 2);
    keel_cache_destroy(c);
}
END_TEST

START_TEST(xfetch_refreshes_early_near_expiry_only)
{
    rig r;
    memset(&r, 0, sizeof r);
    r.ls.take_ns = 100 * MS; /* each load "takes" 100 ms on the fake clock */
    keel_cache_opts o = {.loader = load, .loader_ud = &r.ls, .xfetch_beta = 1, .default_ttl_ns = 10 * S,
                         .l1_max_ttl_ns = 10 * S, .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_cache_create(&r.c, &o), 0);
    char v[64];
    ck_assert_int_eq(get(r.c, "x", v, sizeof v), 0);
    for (int i = 0; i < 50; i++) /* far from expiry: -100 ms * ln(u) reaches 10 s only for u < e^-100 */
        ck_assert_int_eq(get(r.c, "x", v, sizeof v), 0);
    ck_assert_int_eq(atomic_load(&r.ls.calls), 1);
    kt_clock_advance(&clk, 9990 * MS); /* 10 ms left: nearly every get would refresh */
    int gets = 51;
    for (int i = 0; i < 20 && atomic_load(&r.ls.calls) == 1; i++, gets++)
        ck_assert_int_eq(get(r.c, "x", v, sizeof v), 0);
    ck_assert_int_eq(atomic_load(&r.ls.calls), 2);
    keel_cache_stats st; /* the get that refreshed found its value in L1 too: a hit */
    keel_cache_stats_get(r.c, &st);
    ck_assert_uint_eq(st.misses, 1);
    ck_assert_uint_eq(st.hits_l1, (uint64_t)gets - 1);
    keel_cache_destroy(r.c);
}
END_TEST

/* An early refresh whose loader says the key is gone now: the caller that
 * refreshed is told so, as every later caller is by the absence cached. */
START_TEST(an_early_refresh_that_finds_the_key_gone_says_so)
{
    rig r;
    memset(&r, 0, sizeof r);
    r.ls.take_ns = 100 * MS;
    keel_cache_opts o = {.loader = load, .loader_ud = &r.ls, .xfetch_beta = 1, .default_ttl_ns = 10 * S,
                         .l1_max_ttl_ns = 10 * S, .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_cache_create(&r.c, &o), 0);
    char v[64];
    ck_assert_int_eq(get(r.c, "x", v, sizeof v), 0);
    kt_clock_advance(&clk, 9990 * MS); /* 10 ms left: nearly every get would refresh */
    r.ls.absent = 1;
    int rc = 0;
    for (int i = 0; i < 20 && atomic_load(&r.ls.calls) == 1; i++)
        rc = get(r.c, "x", v, sizeof v);
    ck_assert_int_eq(atomic_load(&r.ls.calls), 2);
    ck_assert_int_eq(rc, KEEL_ENOTFOUND);
    ck_assert_int_eq(get(r.c, "x", v, sizeof v), KEEL_ENOTFOUND);
    keel_cache_destroy(r.c);
}
END_TEST

/* Without a loader there is nothing to refresh from: a value near its
 * expiry (here from L2, with the load time another process measured) is
 * a hit until it expires. */
START_TEST(without_a_loader_a_value_near_expiry_is_a_hit)
{
    rig r;
    memset(&r, 0, sizeof r);
    snprintf(r.prefix, sizeof r.prefix, "%s:", uniq("xn"));
    r.redis = kt_redis_open(kt_redis_nodes(), 500 * MS);
    r.ls.take_ns = 100 * MS;
    keel_cache_opts o = {.redis = r.redis, .redis_prefix = r.prefix, .loader = load, .loader_ud = &r.ls,
                         .default_ttl_ns = 10 * S, .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_cache_create(&r.c, &o), 0);
    char v[64];
    ck_assert_int_eq(get(r.c, "x", v, sizeof v), 0); /* loaded: 60 s in L2, with its load time */
    keel_cache *reader;
    keel_cache_opts ro = {.redis = r.redis, .redis_prefix = r.prefix, .xfetch_beta = 1, .l1_max_ttl_ns = 120 * S,
                          .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_cache_create(&reader, &ro), 0);
    ck_assert_int_eq(get(reader, "x", v, sizeof v), 0); /* from L2 */
    kt_clock_advance(&clk, 59990 * MS); /* 10 ms left in L1 (its TTL from L2's) */
    for (int i = 0; i < 20; i++) {
        ck_assert_int_eq(get(reader, "x", v, sizeof v), 0);
        ck_assert_str_eq(v, "loaded:x");
    }
    keel_cache_destroy(reader);
    rig_close(&r);
}
END_TEST

/* XFetch refreshes a value near its own expiry. An L1 entry cut short by
 * l1_max_ttl expires while L2 still holds the value for long: it is
 * filled from L2 again then, never reloaded early by the loader. */
START_TEST(xfetch_leaves_an_entry_capped_by_l1_max_ttl_to_l2)
{
    rig r;
    memset(&r, 0, sizeof r);
    snprintf(r.prefix, sizeof r.prefix, "%s:", uniq("xf"));
    r.redis = kt_redis_open(kt_redis_nodes(), 500 * MS);
    r.ls.take_ns = 100 * MS; /* each load "takes" 100 ms on the fake clock */
    keel_cache_opts o = {.redis = r.redis, .redis_prefix = r.prefix, .loader = load, .loader_ud = &r.ls,
                         .xfetch_beta = 1, .l1_max_ttl_ns = 1 * S, .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_cache_create(&r.c, &o), 0);
    char v[64];
    ck_assert_int_eq(get(r.c, "x", v, sizeof v), 0); /* loaded: 60 s in L2, 1 s in L1 */
    ck_assert_int_eq(atomic_load(&r.ls.calls), 1);
    kt_clock_advance(&clk, 990 * MS); /* 10 ms left in L1, 59 s in L2 */
    for (int i = 0; i < 20; i++) {
        ck_assert_int_eq(get(r.c, "x", v, sizeof v), 0);
        ck_assert_str_eq(v, "loaded:x");
    }
    ck_assert_int_eq(atomic_load(&r.ls.calls), 1);
    kt_clock_advance(&clk, 20 * MS); /* L1's entry expired: L2 has it */
    ck_assert_int_eq(get(r.c, "x", v, sizeof v), 0);
    ck_assert_str_eq(v, "loaded:x");
    ck_assert_int_eq(atomic_load(&r.ls.calls), 1);
    keel_cache_stats st;
    keel_cache_stats_get(r.c, &st);
    ck_assert_uint_eq(st.hits_l2, 1);
    rig_close(&r);
}
END_TEST

/* An early refresh asks the loader, not L3, which holds the same value
 * as near its expiry as L1's entry is. */
START_TEST(xfetch_refreshes_from_the_loader_over_l3)
{
    rig r;
    memset(&r, 0, sizeof r);
    snprintf(r.table, sizeof r.table, "%s", uniq("xf"));
    r.pg = open_pg();
    r.ls.take_ns = 100 * MS; /* each load "takes" 100 ms on the fake clock */
    keel_cache_opts o = {.pg = r.pg, .table = r.table, .loader = load, .loader_ud = &r.ls, .xfetch_beta = 1,
                         .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_cache_create(&r.c, &o), 0);
    ck_assert_int_eq(keel_cache_create_schema(r.c), 0);
    char v[64];
    ck_assert_int_eq(get(r.c, "x", v, sizeof v), 0); /* loaded: 60 s in L1 and L3 */
    ck_assert(in_l3(&r, "x", 1));
    kt_clock_advance(&clk, 59990 * MS); /* 10 ms left in L1: nearly every get would refresh */
    for (int i = 0; i < 20 && atomic_load(&r.ls.calls) == 1; i++) {
        ck_assert_int_eq(get(r.c, "x", v, sizeof v), 0);
        ck_assert_str_eq(v, "loaded:x");
    }
    ck_assert_int_eq(atomic_load(&r.ls.calls), 2);
    keel_cache_stats st;
    keel_cache_stats_get(r.c, &st);
    ck_assert_uint_eq(st.hits_l3, 0);
    rig_close(&r);
}
END_TEST

/* An early refresh is for every process: the value it loads replaces the
 * old one in L2 and L3 (with its new TTL), so the others do not all miss
 * at the old expiry. */
START_TEST(an_early_refresh_overwrites_l2_and_l3)
{
    rig r;
    rig_open(&r, true, true, 0, 0);
    keel_cache_destroy(r.c);
    r.ls.take_ns = 100 * MS; /* each load "takes" 100 ms on the fake clock */
    keel_cache_opts o = {.redis = r.redis, .redis_prefix = r.prefix, .pg = r.pg, .table = r.table, .loader = load,
                         .loader_ud = &r.ls, .xfetch_beta = 1, .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_cache_create(&r.c, &o), 0);
    char v[64];
    ck_assert_int_eq(get(r.c, "x", v, sizeof v), 0); /* loaded: 60 s in every tier */
    ck_assert_str_eq(v, "loaded:x");
    kt_clock_advance(&clk, 59990 * MS); /* 10 ms left in L1: nearly every get would refresh */
    r.ls.val = "fresh";
    r.ls.ttl = 600 * S;
    for (int i = 0; i < 20 && atomic_load(&r.ls.calls) == 1; i++)
        ck_assert_int_eq(get(r.c, "x", v, sizeof v), 0);
    ck_assert_int_eq(atomic_load(&r.ls.calls), 2);
    ck_assert_int_eq(get(r.c, "x", v, sizeof v), 0);
    ck_assert_str_eq(v, "fresh");
    char k[128]; /* L2: the new value, with its new TTL (Redis counts real time: the old had 60 s) */
    int n = snprintf(k, sizeof k, "%sv:x", r.prefix);
    const char *a[2] = {"PTTL", k};
    size_t l[2] = {4, (size_t)n};
    redisReply *rep;
    ck_assert_int_eq(keel_redis_command(r.redis, k, (size_t)n, 2, a, l, &rep), 0);
    ck_assert_int_gt(rep->integer, 120 * 1000);
    freeReplyObject(rep);
    keel_cache *peer = rig_peer(&r, true); /* another process: L2 */
    ck_assert_int_eq(get(peer, "x", v, sizeof v), 0);
    ck_assert_str_eq(v, "fresh");
    keel_cache_destroy(peer);
    peer = rig_peer(&r, false); /* and one with L3 only */
    ck_assert_int_eq(get(peer, "x", v, sizeof v), 0);
    ck_assert_str_eq(v, "fresh");
    keel_cache_destroy(peer);
    rig_close(&r);
}
END_TEST

/* Two caches (two processes, in effect: each has its own single-flight)
 * with a lease: one loads, the other waits for its value in L2. */
typedef struct lease_getter {
    keel_cache *c;
    const char *key;
    int rc;
    char v[64];
} lease_getter;

static void *lease_get(void *arg)
{
    lease_getter *g = arg;
    g->rc = get(g->c, g->key, g->v, sizeof g->v);
    return NULL;
}

START_TEST(a_lease_makes_one_process_load)
{
    rig r;
    rig_open(&r, true, false, 0, 0);
    r.ls.sleep_ns = 300 * MS; /* slow: the other cache finds the lease taken */
    keel_cache *c2[2];
    for (int i = 0; i < 2; i++) {
        keel_cache_opts o = {.redis = r.redis, .redis_prefix = r.prefix, .loader = load, .loader_ud = &r.ls,
                             .lease = 1, .lease_ns = 5 * S};
        ck_assert_int_eq(keel_cache_create(&c2[i], &o), 0);
    }
    lease_getter g[2] = {{c2[0], "leased", 99, ""}, {c2[1], "leased", 99, ""}};
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&t[i], NULL, lease_get, &g[i]);
    for (int i = 0; i < 2; i++) {
        pthread_join(t[i], NULL);
        ck_assert_int_eq(g[i].rc, 0);
        ck_assert_str_eq(g[i].v, "loaded:leased");
    }
    ck_assert_int_eq(atomic_load(&r.ls.calls), 1);
    /* a holder that finds nothing says so in L2 and releases its lease
     * (only its own): the other reads the absence there, asking no loader */
    r.ls.absent = 1;
    lease_getter h[2] = {{c2[0], "nothing", 99, ""}, {c2[1], "nothing", 99, ""}};
    for (int i = 0; i < 2; i++)
        pthread_create(&t[i], NULL, lease_get, &h[i]);
    for (int i = 0; i < 2; i++) {
        pthread_join(t[i], NULL);
        ck_assert_int_eq(h[i].rc, KEEL_ENOTFOUND);
    }
    ck_assert_int_eq(atomic_load(&r.ls.calls), 2);
    /* and a third process, without the lease, for negative_ttl_ns */
    keel_cache *c3;
    keel_cache_opts o3 = {.redis = r.redis, .redis_prefix = r.prefix, .loader = load, .loader_ud = &r.ls};
    ck_assert_int_eq(keel_cache_create(&c3, &o3), 0);
    char v[16];
    ck_assert_int_eq(get(c3, "nothing", v, sizeof v), KEEL_ENOTFOUND);
    keel_cache_item many[1] = {{.key = "nothing", .klen = 7, .buf = v, .cap = sizeof v}};
    keel_cache_destroy(c3);
    ck_assert_int_eq(keel_cache_create(&c3, &o3), 0); /* an empty L1: get_many reads L2 */
    ck_assert_int_eq(keel_cache_get_many(c3, many, 1), KEEL_ENOTFOUND);
    ck_assert_int_eq(many[0].rc, KEEL_ENOTFOUND);
    keel_cache_destroy(c3);
    ck_assert_int_eq(atomic_load(&r.ls.calls), 2);
    char lk[128];
    int n = snprintf(lk, sizeof lk, "%sl:nothing", r.prefix);
    const char *a[2] = {"EXISTS", lk};
    size_t l[2] = {6, (size_t)n};
    redisReply *rep;
    ck_assert_int_eq(keel_redis_command(r.redis, lk, (size_t)n, 2, a, l, &rep), 0);
    ck_assert_int_eq(rep->integer, 0); /* released */
    freeReplyObject(rep);
    for (int i = 0; i < 2; i++)
        keel_cache_destroy(c2[i]);
    rig_close(&r);
}
END_TEST

/* Redis failing while a cache waits on another process's lease is a
 * failure of L2 like any other: counted, and told to the tier's breaker. */
START_TEST(redis_failing_during_a_lease_wait_counts_against_l2)
{
    rig r;
    memset(&r, 0, sizeof r);
    snprintf(r.prefix, sizeof r.prefix, "%s:", uniq("lw"));
    r.redis = kt_redis_open(1, 500 * MS);
    r.ls.absent = 1; /* after the wait: no value to write to L2 */
    keel_cache_opts o = {.redis = r.redis, .redis_prefix = r.prefix, .loader = load, .loader_ud = &r.ls,
                         .lease = 1, .lease_ns = 30 * S};
    ck_assert_int_eq(keel_cache_create(&r.c, &o), 0);
    char lk[128]; /* another process holds the key's lease */
    int n = snprintf(lk, sizeof lk, "%sl:k", r.prefix);
    const char *a[5] = {"SET", lk, "other", "PX", "30000"};
    size_t l[5] = {3, (size_t)n, 5, 2, 5};
    redisReply *rep;
    ck_assert_int_eq(keel_redis_command(r.redis, lk, (size_t)n, 5, a, l, &rep), 0);
    freeReplyObject(rep);
    lease_getter g = {r.c, "k", 99, ""};
    pthread_t t;
    pthread_create(&t, NULL, lease_get, &g);
    keel_cache_stats st;
    do {
        kt_nap(1 * MS);
        keel_cache_stats_get(r.c, &st);
    } while (st.load_waits == 0);
    ck_assert_uint_eq(st.errors_l2, 0);
    kt_server("stop-one", "redis1");
    pthread_join(t, NULL);
    kt_server("start-one", "redis1"); /* before any assertion: the other tests need it */
    ck_assert_int_eq(g.rc, KEEL_ENOTFOUND); /* the loader's answer, once the wait failed */
    keel_cache_stats_get(r.c, &st);
    ck_assert_uint_ge(st.errors_l2, 1);
    rig_close(&r);
}
END_TEST

/* ---- invalidation across processes ---- */

/* Waits (real time: messages travel through Redis) until get gives want
 * (NULL: absent). */
static bool eventually(keel_cache *c, const char *key, const char *want)
{
    for (int i = 0; i < 300; i++) {
        char v[64];
        int rc = get(c, key, v, sizeof v);
        if (want ? rc == 0 && strcmp(v, want) == 0 : rc == KEEL_ENOTFOUND)
            return true;
        kt_nap(10 * MS);
    }
    return false;
}

/* An early refresh whose loader says the key is gone removes it from L2
 * and L3 and from the other processes' L1, as a del would: they do not
 * go on serving the old value. */
START_TEST(an_early_refresh_that_finds_the_key_gone_removes_it_everywhere)
{
    rig r;
    rig_open(&r, true, true, 0, 0);
    keel_cache_destroy(r.c);
    r.ls.take_ns = 100 * MS;
    keel_cache_opts o = {.redis = r.redis, .redis_prefix = r.prefix, .pg = r.pg, .table = r.table, .loader = load,
                         .loader_ud = &r.ls, .xfetch_beta = 1, .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_cache_create(&r.c, &o), 0);
    char v[64];
    ck_assert_int_eq(get(r.c, "x", v, sizeof v), 0); /* loaded: 60 s in every tier */
    keel_cache *peer = rig_peer(&r, true);
    ck_assert_int_eq(get(peer, "x", v, sizeof v), 0); /* in the peer's L1 */
    kt_clock_advance(&clk, 59990 * MS); /* 10 ms left in L1: nearly every get would refresh */
    r.ls.absent = 1;
    int rc = 0;
    for (int i = 0; i < 20 && atomic_load(&r.ls.calls) == 1; i++)
        rc = get(r.c, "x", v, sizeof v);
    ck_assert_int_eq(atomic_load(&r.ls.calls), 2);
    ck_assert_int_eq(rc, KEEL_ENOTFOUND);
    ck_assert(!in_l2(&r, "x", 1) && !in_l3(&r, "x", 1));
    ck_assert(eventually(peer, "x", NULL));
    keel_cache_destroy(peer);
    rig_close(&r);
}
END_TEST

START_TEST(another_process_invalidates_this_l1)
{
    char prefix[80];
    snprintf(prefix, sizeof prefix, "%s:", uniq("x"));
    int go[2], done[2];
    ck_assert_int_eq(pipe(go), 0);
    ck_assert_int_eq(pipe(done), 0);
    pid_t kid = fork(); /* before this process opens anything */
    ck_assert_int_ge(kid, 0);
    if (kid == 0) {
        char x;
        if (read(go[0], &x, 1) != 1)
            _exit(2);
        keel_redis *redis = kt_redis_open(kt_redis_nodes(), 500 * MS);
        keel_cache *b;
        keel_cache_opts o = {.redis = redis, .redis_prefix = prefix};
        int rc = keel_cache_create(&b, &o);
        rc = rc ? rc : set(b, "k", "v2", NULL, 0);
        rc = rc ? rc : keel_cache_invalidate_tag(b, "team");
        rc = rc ? rc : keel_cache_invalidate_prefix(b, "pre", 3);
        keel_cache_destroy(b);
        keel_redis_destroy(redis);
        _exit(rc == 0 && write(done[1], "!", 1) == 1 ? 0 : 1);
    }
    keel_redis *redis = kt_redis_open(kt_redis_nodes(), 500 * MS);
    keel_cache *a;
    keel_cache_opts o = {.redis = redis, .redis_prefix = prefix, .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_cache_create(&a, &o), 0);
    const char *team[1] = {"team"};
    ck_assert_int_eq(set(a, "k", "v1", NULL, 0), 0);
    ck_assert_int_eq(set(a, "member", "m", team, 1), 0);
    ck_assert_int_eq(set(a, "prefixed", "p", NULL, 0), 0);
    char v[64];
    ck_assert_int_eq(get(a, "k", v, sizeof v), 0); /* all three in this L1 */
    ck_assert_int_eq(write(go[1], "!", 1), 1);
    char x;
    ck_assert_int_eq(read(done[0], &x, 1), 1);
    int st;
    waitpid(kid, &st, 0);
    ck_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    ck_assert_msg(eventually(a, "k", "v2"), "this L1 kept the old value");
    ck_assert(eventually(a, "member", NULL)); /* the tag, in L1 and L2 */
    ck_assert(eventually(a, "prefixed", NULL));
    keel_cache_stats s;
    keel_cache_stats_get(a, &s);
    ck_assert_uint_ge(s.invalidations_received, 3);
    keel_cache_destroy(a);
    keel_redis_destroy(redis);
}
END_TEST

START_TEST(a_dropped_link_flushes_l1)
{
    rig r;
    rig_open(&r, true, false, 0, 0);
    char v[64];
    for (int i = 0; i < 10; i++) {
        char k[16];
        snprintf(k, sizeof k, "k%d", i);
        ck_assert_int_eq(get(r.c, k, v, sizeof v), 0);
    }
    keel_cache_stats st;
    keel_cache_stats_get(r.c, &st);
    ck_assert_uint_eq(st.l1_items, 10);
    /* kill the listener's connection on the node the channel lives on */
    char chan[96];
    snprintf(chan, sizeof chan, "%sinv", r.prefix);
    const char *a[4] = {"CLIENT", "KILL", "TYPE", "pubsub"};
    size_t l[4] = {6, 4, 4, 6};
    redisReply *rep;
    ck_assert_int_eq(keel_redis_command(r.redis, chan, strlen(chan), 4, a, l, &rep), 0);
    freeReplyObject(rep);
    for (int i = 0; i < 500 && st.flushes == 0; i++) { /* real time: the listener reconnects */
        kt_nap(10 * MS);
        keel_cache_stats_get(r.c, &st);
    }
    ck_assert_uint_ge(st.flushes, 1);
    ck_assert_uint_eq(st.l1_items, 0);
    /* Redis gone: L1 is flushed at once, not when it comes back */
    for (int i = 0; i < 100 && st.flushes < 2; i++) { /* the reconnect's flush may come second */
        kt_nap(10 * MS);
        keel_cache_stats_get(r.c, &st);
    }
    ck_assert_int_eq(get(r.c, "k0", v, sizeof v), 0);
    keel_cache_stats_get(r.c, &st);
    ck_assert_uint_eq(st.l1_items, 1);
    uint64_t before = st.flushes;
    kt_server("stop-one", "redis1");
    kt_server("stop-one", "redis2");
    kt_server("stop-one", "redis3");
    for (int i = 0; i < 500 && st.flushes == before; i++) { /* real time: the listener notices */
        kt_nap(10 * MS);
        keel_cache_stats_get(r.c, &st);
    }
    ck_assert_uint_eq(st.flushes, before + 1);
    ck_assert_uint_eq(st.l1_items, 0);
    kt_server("start-one", "redis1");
    kt_server("start-one", "redis2");
    kt_server("start-one", "redis3");
    rig_close(&r);
}
END_TEST

/* ---- tags and prefixes ---- */

START_TEST(a_tag_goes_from_every_tier)
{
    rig r;
    rig_open(&r, true, true, 0, 0);
    const char *a[1] = {"a"}, *ab[2] = {"a", "b"}, *b[1] = {"b"};
    ck_assert_int_eq(set(r.c, "k1", "1", a, 1), 0);
    ck_assert_int_eq(set(r.c, "k2", "2", ab, 2), 0);
    ck_assert_int_eq(set(r.c, "k3", "3", b, 1), 0);
    ck_assert_int_eq(keel_cache_invalidate_tag(r.c, "a"), 0);
    r.ls.absent = 1;
    char v[16];
    ck_assert_int_eq(get(r.c, "k1", v, sizeof v), KEEL_ENOTFOUND);
    ck_assert_int_eq(get(r.c, "k2", v, sizeof v), KEEL_ENOTFOUND);
    ck_assert_int_eq(get(r.c, "k3", v, sizeof v), 0);
    ck_assert(!in_l2(&r, "k1", 2) && !in_l2(&r, "k2", 2) && in_l2(&r, "k3", 2));
    ck_assert(!in_l3(&r, "k1", 2) && !in_l3(&r, "k2", 2) && in_l3(&r, "k3", 2));
    /* a loaded value carries its tags too */
    r.ls.absent = 0;
    r.ls.tag = "b";
    ck_assert_int_eq(get(r.c, "k4", v, sizeof v), 0);
    ck_assert_int_eq(keel_cache_invalidate_tag(r.c, "b"), 0);
    ck_assert(!in_l2(&r, "k4", 2) && !in_l3(&r, "k4", 2) && !in_l2(&r, "k3", 2));
    rig_close(&r);
}
END_TEST

START_TEST(prefixes_with_glob_and_like_characters_and_nul)
{
    rig r;
    rig_open(&r, true, true, 0, 0);
    static const struct {
        const char *k;
        size_t n;
    } keys[] = {{"p*1", 3}, {"p%2", 3}, {"p_3", 3}, {"p\0x4", 4}, {"px5", 3}, {"pp6", 3}, {"q*7", 3}};
    enum { N = sizeof keys / sizeof keys[0] };
    for (size_t i = 0; i < N; i++)
        ck_assert_int_eq(keel_cache_set(r.c, keys[i].k, keys[i].n, "v", 1, 0, NULL, 0), 0);
    static const struct {
        const char *p;
        size_t n;
        size_t gone;
    } cuts[] = {{"p*", 2, 0}, {"p%", 2, 1}, {"p_", 2, 2}, {"p\0", 2, 3}};
    bool gone[N] = {false};
    for (size_t c = 0; c < sizeof cuts / sizeof cuts[0]; c++) {
        ck_assert_int_eq(keel_cache_invalidate_prefix(r.c, cuts[c].p, cuts[c].n), 0);
        gone[cuts[c].gone] = true;
        for (size_t i = 0; i < N; i++) {
            ck_assert_msg(in_l2(&r, keys[i].k, keys[i].n) == !gone[i], "L2 key %zu after cut %zu", i, c);
            ck_assert_msg(in_l3(&r, keys[i].k, keys[i].n) == !gone[i], "L3 key %zu after cut %zu", i, c);
        }
    }
    for (size_t i = 0; i < N; i++) { /* and L1: a cut key is asked of the loader, not served stale */
        char buf[64];
        size_t len = 0;
        ck_assert_int_eq(keel_cache_get(r.c, keys[i].k, keys[i].n, buf, sizeof buf, &len), 0);
        ck_assert_msg((len == 1 && buf[0] == 'v') == !gone[i], "L1 key %zu", i);
    }
    rig_close(&r);
}
END_TEST

static uint64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* An L2 value as keel_cache encodes it ('K' or, absent, 'N'; its expiry
 * in wall-clock ms), put by hand. */
static void l2_put_raw(rig *r, const char *key, bool absent, uint64_t expiry_ms)
{
    char k[256], v[18 + 1] = {'K', 0};
    int kl = snprintf(k, sizeof k, "%sv:%s", r->prefix, key);
    uint64_t e = htobe64(expiry_ms);
    size_t vl = 18 + 1;
    if (absent) {
        v[0] = 'N';
        memcpy(v + 1, &e, 8);
        vl = 9;
    } else {
        memset(v + 2, 0, 8);
        memcpy(v + 10, &e, 8);
        v[18] = 'x';
    }
    const char *a[5] = {"SET", k, v, "PX", "600000"};
    size_t l[5] = {3, (size_t)kl, vl, 2, 6};
    redisReply *rep;
    ck_assert_int_eq(keel_redis_command(r->redis, k, (size_t)kl, 5, a, l, &rep), 0);
    freeReplyObject(rep);
}

/* A TTL of UINT64_MAX ns ("never expires") written by a process whose
 * wall clock is ahead of ours, and a row whose expiry is far off, keep
 * L1's copy as long as they say: the time left, in ns, saturates rather
 * than wrapping to a fraction of a millisecond. */
START_TEST(a_far_expiry_read_below_does_not_wrap_to_a_short_one)
{
    rig r;
    rig_open(&r, true, true, 0, 0);
    uint64_t forever_ms = UINT64_MAX / 1000000u; /* what a writer adds for ttl UINT64_MAX */
    l2_put_raw(&r, "val", false, wall_ms() + forever_ms + 1000); /* its clock 1 s ahead */
    l2_put_raw(&r, "gone", true, wall_ms() + forever_ms + 1000);
    char sql[300];
    snprintf(sql, sizeof sql,
             "INSERT INTO \"%s\" (key, value, expires_at, tags) VALUES ('row', 'y', now() + interval '100000 years', NULL)",
             r.table);
    PGresult *res;
    ck_assert_int_eq(keel_pg_exec(r.pg, KEEL_PG_WRITE, sql, NULL, &res), 0);
    PQclear(res);
    char v[16];
    ck_assert_int_eq(get(r.c, "val", v, sizeof v), 0);
    ck_assert_str_eq(v, "x");
    ck_assert_int_eq(get(r.c, "gone", v, sizeof v), KEEL_ENOTFOUND);
    ck_assert_int_eq(get(r.c, "row", v, sizeof v), 0);
    ck_assert_str_eq(v, "y");
    kt_clock_advance(&clk, 3600 * S);
    keel_cache_stats a, b;
    keel_cache_stats_get(r.c, &a);
    ck_assert_int_eq(get(r.c, "val", v, sizeof v), 0);
    ck_assert_int_eq(get(r.c, "gone", v, sizeof v), KEEL_ENOTFOUND);
    ck_assert_int_eq(get(r.c, "row", v, sizeof v), 0);
    keel_cache_stats_get(r.c, &b);
    ck_assert_uint_eq(b.hits_l1 - a.hits_l1, 2); /* an hour on: still in L1 */
    ck_assert_uint_eq(b.negative_hits - a.negative_hits, 1);
    ck_assert_uint_eq(b.hits_l2 + b.hits_l3, a.hits_l2 + a.hits_l3);
    ck_assert_int_eq(atomic_load(&r.ls.calls), 0);
    rig_close(&r);
}
END_TEST

/* A get that missed L2 just before another process filled it (and let
 * go of its lease) and then wins the lease looks in L2 again before it
 * calls the loader, and lets go of the lease. */
START_TEST(a_lease_holder_looks_in_l2_again_before_loading)
{
    rig r;
    rig_open(&r, true, false, 0, 0);
    keel_cache_destroy(r.c); /* again, with a lease and on the holding clock */
    keel_cache_opts o = {.redis = r.redis, .redis_prefix = r.prefix, .loader = load, .loader_ud = &r.ls,
                         .lease = 1, .clock = holding_clock, .clock_ud = &clk};
    ck_assert_int_eq(keel_cache_create(&r.c, &o), 0);
    atomic_store(&hold.calls, 0);
    atomic_store(&hold.held, 0);
    atomic_store(&hold.go, 0);
    held_getter g = {r.c, false, 99, ""};
    pthread_t t;
    pthread_create(&t, NULL, held_get_thread, &g);
    while (!atomic_load(&hold.held)) /* it missed L2 */
        kt_nap(1 * MS);
    l2_put_raw(&r, "k", false, wall_ms() + 60000); /* another process's load lands, its lease gone */
    atomic_store(&hold.go, 1);
    pthread_join(t, NULL);
    ck_assert_int_eq(g.rc, 0);
    ck_assert_str_eq(g.v, "x");
    ck_assert_int_eq(atomic_load(&r.ls.calls), 0);
    char k[128];
    int n = snprintf(k, sizeof k, "%sl:k", r.prefix);
    const char *a[2] = {"EXISTS", k};
    size_t l[2] = {6, (size_t)n};
    redisReply *rep;
    ck_assert_int_eq(keel_redis_command(r.redis, k, (size_t)n, 2, a, l, &rep), 0);
    ck_assert_int_eq(rep->integer, 0); /* the lease let go */
    freeReplyObject(rep);
    rig_close(&r);
}
END_TEST

/* An early refresh that takes the lease does not take the value it
 * refreshes back from L2 for a new one: it asks the loader. */
START_TEST(an_early_refresh_under_a_lease_asks_the_loader)
{
    rig r;
    rig_open(&r, true, false, 0, 0);
    keel_cache_destroy(r.c);
    r.ls.take_ns = 100 * MS;
    keel_cache_opts o = {.redis = r.redis, .redis_prefix = r.prefix, .loader = load, .loader_ud = &r.ls,
                         .lease = 1, .xfetch_beta = 1, .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_cache_create(&r.c, &o), 0);
    char v[64];
    ck_assert_int_eq(get(r.c, "x", v, sizeof v), 0);
    kt_clock_advance(&clk, 59990 * MS); /* 10 ms left in L1: nearly every get would refresh */
    r.ls.val = "fresh";
    for (int i = 0; i < 20 && atomic_load(&r.ls.calls) == 1; i++)
        ck_assert_int_eq(get(r.c, "x", v, sizeof v), 0);
    ck_assert_int_eq(atomic_load(&r.ls.calls), 2);
    ck_assert_int_eq(get(r.c, "x", v, sizeof v), 0);
    ck_assert_str_eq(v, "fresh");
    rig_close(&r);
}
END_TEST

/* Values in L2 and rows in L3 that keel_cache did not write (another
 * program under the prefix, a row put by hand) are not values of ours
 * when their tags do not fit: the loader answers, nothing overflows. */
START_TEST(foreign_tags_too_long_are_not_values_of_ours)
{
    rig r;
    rig_open(&r, true, true, 0, 0);
    unsigned char enc[18 + 16 * 256 + 1], *p = enc;
    *p++ = 'K';
    *p++ = 16; /* tags */
    memset(p, 0, 8); /* no load time */
    p += 8;
    uint64_t until = (uint64_t)time(NULL) * 1000u + 60000u;
    for (int i = 7; i >= 0; i--, until >>= 8)
        p[i] = (unsigned char)until; /* expiry, wall-clock ms, big-endian */
    p += 8;
    for (int i = 0; i < 16; i++) { /* 16 tags of 255 bytes: over 200 each */
        *p++ = 255;
        memset(p, 'a' + i, 255);
        p += 255;
    }
    *p++ = 'v';
    char k[128];
    int kl = snprintf(k, sizeof k, "%sv:l2bad", r.prefix);
    const char *a[3] = {"SET", k, (const char *)enc};
    size_t l[3] = {3, (size_t)kl, (size_t)(p - enc)};
    redisReply *rep;
    ck_assert_int_eq(keel_redis_command(r.redis, k, (size_t)kl, 3, a, l, &rep), 0);
    freeReplyObject(rep);
    char sql[300];
    snprintf(sql, sizeof sql,
             "INSERT INTO \"%s\" VALUES ('l3bad'::bytea, 'v'::bytea, now() + interval '1 hour', "
             "array_fill(repeat('a', 300), ARRAY[16]))",
             r.table);
    PGresult *res;
    ck_assert_int_eq(keel_pg_exec(r.pg, KEEL_PG_WRITE, sql, NULL, &res), 0);
    PQclear(res);
    char v[64];
    ck_assert_int_eq(get(r.c, "l2bad", v, sizeof v), 0);
    ck_assert_str_eq(v, "loaded:l2bad");
    ck_assert_int_eq(get(r.c, "l3bad", v, sizeof v), 0);
    ck_assert_str_eq(v, "loaded:l3bad");
    ck_assert_int_eq(atomic_load(&r.ls.calls), 2);
    rig_close(&r);
}
END_TEST

/* ---- tiers down ---- */

/* A key whose L2 value lives on the given node: k<tag><i>. */
static void key_on(rig *r, int node, const char *tag, char *out, size_t cap)
{
    for (int i = 0;; i++) {
        char rk[128];
        snprintf(out, cap, "k%s%d", tag, i);
        int n = snprintf(rk, sizeof rk, "%sv:%s", r->prefix, out);
        if ((int)keel_redis_node_of(r->redis, rk, (size_t)n) == node)
            return;
    }
}

START_TEST(redis_down_then_back)
{
    rig r;
    rig_open(&r, true, true, 0, 0);
    char v[64];
    ck_assert_int_eq(set(r.c, "a", "A", NULL, 0), 0);
    kt_server("stop-one", "redis1");
    kt_server("stop-one", "redis2");
    kt_server("stop-one", "redis3");
    ck_assert_int_eq(get(r.c, "a", v, sizeof v), 0); /* L1, or L3 once the dropped link flushed L1 */
    ck_assert_str_eq(v, "A");
    ck_assert_int_eq(get(r.c, "b", v, sizeof v), 0); /* L2 fails: L3 misses, the loader */
    ck_assert_str_eq(v, "loaded:b");
    keel_cache_stats st, st0;
    int nodes = kt_redis_nodes();
    char k[32];
    for (int node = 0; node < nodes; node++) { /* each node fails once (maybe for "a" or "b" already) */
        key_on(&r, node, "c", k, sizeof k);
        ck_assert_int_eq(get(r.c, k, v, sizeof v), 0);
    }
    keel_cache_stats_get(r.c, &st0);
    ck_assert_uint_eq(st0.errors_l2, (uint64_t)nodes);
    for (int i = 0; i < 5; i++) { /* skipped now: no more errors, no more timeouts */
        snprintf(k, sizeof k, "c%d", i);
        ck_assert_int_eq(get(r.c, k, v, sizeof v), 0);
    }
    keel_cache_stats_get(r.c, &st);
    ck_assert_uint_eq(st.errors_l2, (uint64_t)nodes);
    ck_assert_uint_eq(st.hits_l3, st0.hits_l3);
    ck_assert(in_l3(&r, "c4", 2)); /* the loads went to L3 */
    kt_clock_advance(&clk, 2 * S); /* past tier_retry, still down: one get a node probes, and fails */
    for (int node = 0; node < nodes; node++)
        for (int i = 0; i < 3; i++) {
            char p[8];
            snprintf(p, sizeof p, "p%d", i);
            key_on(&r, node, p, k, sizeof k);
            ck_assert_int_eq(get(r.c, k, v, sizeof v), 0);
            keel_cache_stats_get(r.c, &st);
            ck_assert_uint_eq(st.errors_l2, (uint64_t)(nodes + node + 1)); /* the probe's, then skipped again */
        }
    kt_server("start-one", "redis1");
    kt_server("start-one", "redis2");
    kt_server("start-one", "redis3");
    kt_clock_advance(&clk, 2 * S); /* past tier_retry */
    int rc = -1;
    for (int i = 0; i < 5 && rc != 0; i++) { /* the pool's stale connections fail once */
        rc = set(r.c, "d", "D", NULL, 0);
        kt_clock_advance(&clk, 2 * S);
    }
    ck_assert_int_eq(rc, 0);
    ck_assert(in_l2(&r, "d", 1));
    /* and gets read L2 again: a key another process wrote meanwhile */
    keel_cache *peer = rig_peer(&r, true);
    ck_assert_int_eq(set(peer, "d2", "D2", NULL, 0), 0);
    keel_cache_stats_get(r.c, &st0);
    ck_assert_int_eq(get(r.c, "d2", v, sizeof v), 0);
    ck_assert_str_eq(v, "D2");
    keel_cache_stats_get(r.c, &st);
    ck_assert_uint_eq(st.hits_l2, st0.hits_l2 + 1);
    keel_cache_destroy(peer);
    rig_close(&r);
}
END_TEST

/* One Redis node down costs only its own keys: the others' keys are
 * still read from L2, by gets and multi-gets, again and again across
 * tier_retry; the dead node's keys fall to L3. */
START_TEST(one_redis_node_down_costs_only_its_keys)
{
    rig r;
    rig_open(&r, true, true, 0, 0);
    int nodes = kt_redis_nodes();
    ck_assert_int_ge(nodes, 2);
    enum { N = 60, ROUNDS = 3 };
    char keys[N][12];
    int node[N];
    for (int i = 0; i < N; i++) {
        snprintf(keys[i], sizeof keys[i], "n%d", i);
        ck_assert_int_eq(set(r.c, keys[i], keys[i], NULL, 0), 0);
        char rk[128];
        int n = snprintf(rk, sizeof rk, "%sv:%s", r.prefix, keys[i]);
        node[i] = (int)keel_redis_node_of(r.redis, rk, (size_t)n);
    }
    char chan[128];
    snprintf(chan, sizeof chan, "%sinv", r.prefix);
    int victim = ((int)keel_redis_node_of(r.redis, chan, strlen(chan)) + 1) % nodes; /* not the link's */
    int healthy = 0;
    for (int i = 0; i < N; i++)
        healthy += node[i] != victim;
    ck_assert_int_gt(healthy, 0);
    ck_assert_int_lt(healthy, N);
    char name[24];
    snprintf(name, sizeof name, "redis%d", victim + 1);
    kt_server("stop-one", name);
    keel_cache *c; /* another process's cache: an empty L1 that keeps entries 1 s */
    keel_cache_opts o = {.redis = r.redis, .redis_prefix = r.prefix, .pg = r.pg, .table = r.table,
                         .l1_max_ttl_ns = 1 * S, .clock = kt_clock_now, .clock_ud = &clk};
    int crc = keel_cache_create(&c, &o);
    uint64_t l2[2 * ROUNDS] = {0}, l3[2 * ROUNDS] = {0};
    int bad = 0;
    for (int round = 0; crc == 0 && round < 2 * ROUNDS; round++) {
        keel_cache_stats st0, st;
        keel_cache_stats_get(c, &st0);
        if (round % 2 == 0) { /* single gets */
            for (int i = 0; i < N; i++) {
                char v[32];
                if (get(c, keys[i], v, sizeof v) != 0 || strcmp(v, keys[i]) != 0)
                    bad++;
            }
        } else { /* one multi-get */
            char bufs[N][32];
            keel_cache_item it[N];
            for (int i = 0; i < N; i++)
                it[i] = (keel_cache_item){keys[i], strlen(keys[i]), bufs[i], sizeof bufs[i], 0, 99};
            if (keel_cache_get_many(c, it, N) != 0)
                bad++;
            for (int i = 0; i < N; i++)
                bad += it[i].rc != 0 || it[i].len != strlen(keys[i]) || memcmp(bufs[i], keys[i], it[i].len) != 0;
        }
        keel_cache_stats_get(c, &st);
        l2[round] = st.hits_l2 - st0.hits_l2;
        l3[round] = st.hits_l3 - st0.hits_l3;
        kt_clock_advance(&clk, 2 * S); /* past tier_retry and L1's TTL */
    }
    keel_cache_destroy(c);
    kt_server("start-one", name); /* before any assertion: the other tests need it */
    ck_assert_int_eq(crc, 0);
    ck_assert_int_eq(bad, 0);
    for (int round = 0; round < 2 * ROUNDS; round++) {
        ck_assert_uint_eq(l2[round], (uint64_t)healthy);
        ck_assert_uint_eq(l3[round], (uint64_t)(N - healthy));
    }
    rig_close(&r);
}
END_TEST

START_TEST(postgres_down_then_back)
{
    rig r;
    rig_open(&r, true, true, 0, 0);
    char v[64];
    kt_server("stop-one", "pg-primary");
    ck_assert_int_eq(get(r.c, "e", v, sizeof v), 0); /* L2 misses, L3 fails, the loader */
    ck_assert_str_eq(v, "loaded:e");
    ck_assert(in_l2(&r, "e", 1));
    keel_cache_stats st;
    keel_cache_stats_get(r.c, &st);
    ck_assert_uint_ge(st.errors_l3, 1);
    uint64_t errs = st.errors_l3;
    ck_assert_int_eq(get(r.c, "f", v, sizeof v), 0);
    keel_cache_stats_get(r.c, &st);
    ck_assert_uint_eq(st.errors_l3, errs); /* skipped meanwhile */
    kt_server("start-one", "pg-primary");
    int rc = -1;
    for (int i = 0; i < 20 && rc != 0; i++) {
        keel_pg_check(r.pg); /* manual health: the check finds the host up */
        kt_clock_advance(&clk, 2 * S);
        rc = set(r.c, "g", "G", NULL, 0);
        if (rc)
            kt_nap(200 * MS); /* real time: the server is starting */
    }
    ck_assert_int_eq(rc, 0);
    ck_assert(in_l3(&r, "g", 1));
    /* and gets read L3 again: a key another process put only there */
    keel_cache *peer = rig_peer(&r, false);
    ck_assert_int_eq(set(peer, "h", "H", NULL, 0), 0);
    keel_cache_stats_get(r.c, &st);
    uint64_t l3 = st.hits_l3;
    ck_assert_int_eq(get(r.c, "h", v, sizeof v), 0);
    ck_assert_str_eq(v, "H");
    keel_cache_stats_get(r.c, &st);
    ck_assert_uint_eq(st.hits_l3, l3 + 1);
    keel_cache_destroy(peer);
    rig_close(&r);
}
END_TEST

/* ---- eviction ---- */

START_TEST(the_hot_set_survives_a_scan)
{
    rig r;
    rig_open(&r, false, false, 0, 3200); /* 100 entries a shard */
    char k[32], v[64];
    for (int round = 0; round < 3; round++) /* 1000 hot keys, each used repeatedly */
        for (int i = 0; i < 1000; i++) {
            snprintf(k, sizeof k, "hot%d", i);
            ck_assert_int_eq(get(r.c, k, v, sizeof v), 0);
        }
    int before = atomic_load(&r.ls.calls);
    for (int i = 0; i < 20000; i++) { /* a one-pass scan, six times the cache */
        snprintf(k, sizeof k, "scan%d", i);
        ck_assert_int_eq(get(r.c, k, v, sizeof v), 0);
    }
    int scan = atomic_load(&r.ls.calls) - before;
    ck_assert_int_eq(scan, 20000);
    for (int i = 0; i < 1000; i++) {
        snprintf(k, sizeof k, "hot%d", i);
        ck_assert_int_eq(get(r.c, k, v, sizeof v), 0);
    }
    int reloaded = atomic_load(&r.ls.calls) - before - scan;
    ck_assert_msg(reloaded < 100, "%d of 1000 hot keys were pushed out by the scan", reloaded);
    keel_cache_stats st;
    keel_cache_stats_get(r.c, &st);
    ck_assert_uint_le(st.l1_items, 3200);
    ck_assert_uint_gt(st.evictions, 0);
    rig_close(&r);
}
END_TEST

static int m_shard(keel_cache *c, const void *k, size_t n) { return (int)(keel__cache_key_hash(c, k, n) >> 59); }

/* S3-FIFO makes room before it inserts: a value just set is not what its
 * own insert evicts, though the main FIFO holds older entries. */
typedef struct setter {
    keel_cache *c;
    int id;
    int lost; /* sets whose value a get right after did not find */
} setter;

static void *set_and_get(void *arg)
{
    setter *st = arg;
    for (int i = 0; i < 20000; i++) {
        char k[32], v[8];
        size_t len;
        int n = snprintf(k, sizeof k, "t%d-%d", st->id, i % 500);
        ck_assert_int_eq(keel_cache_set(st->c, k, (size_t)n, "v", 1, 0, NULL, 0), 0);
        st->lost += keel_cache_get(st->c, k, (size_t)n, v, sizeof v, &len) != 0;
    }
    return NULL;
}

/* With L1 alone a set is the only copy: other threads' sets of other keys
 * (each an invalidation) must not keep it out. */
START_TEST(an_l1_only_set_stays_whatever_other_keys_are_set_meanwhile)
{
    keel_cache *c;
    ck_assert_int_eq(keel_cache_create(&c, NULL), 0);
    setter st[3];
    pthread_t t[3];
    for (int i = 0; i < 3; i++) {
        st[i] = (setter){c, i, 0};
        ck_assert_int_eq(pthread_create(&t[i], NULL, set_and_get, &st[i]), 0);
    }
    for (int i = 0; i < 3; i++) {
        pthread_join(t[i], NULL);
        ck_assert_msg(st[i].lost == 0, "thread %d: %d sets lost", i, st[i].lost);
    }
    keel_cache_destroy(c);
}
END_TEST

START_TEST(a_set_is_not_evicted_by_its_own_insert)
{
    keel_cache *c;
    keel_cache_opts o = {.l1_max_items = 32, .clock = kt_clock_now, .clock_ud = &clk}; /* one a shard */
    ck_assert_int_eq(keel_cache_create(&c, &o), 0);
    const char *a = "a";
    char b[16], v[16];
    size_t len;
    int i = 0;
    do
        snprintf(b, sizeof b, "b%d", i++);
    while (m_shard(c, b, strlen(b)) != m_shard(c, a, 1));
    ck_assert_int_eq(keel_cache_set(c, a, 1, "old", 3, 0, NULL, 0), 0);
    ck_assert_int_eq(keel_cache_get(c, a, 1, v, sizeof v, &len), 0); /* used: it goes to the main FIFO */
    ck_assert_int_eq(keel_cache_set(c, b, strlen(b), "new", 3, 0, NULL, 0), 0);
    ck_assert_int_eq(keel_cache_get(c, b, strlen(b), v, sizeof v, &len), 0);
    ck_assert_int_eq(memcmp(v, "new", 3), 0);
    keel_cache_stats st;
    keel_cache_stats_get(c, &st);
    ck_assert_uint_eq(st.l1_items, 1);
    ck_assert_uint_eq(st.evictions, 1);
    keel_cache_destroy(c);
}
END_TEST

/* Readers go on while a writer makes the table double many times: every
 * key set before a read began is found, with its own value. */
typedef struct grow_job {
    keel_cache *c;
    _Atomic int *written; /* keys 0 .. *written-1 are in */
    atomic_bool *done;
    long found;
} grow_job;

static void *grow_reader(void *arg)
{
    grow_job *j = arg;
    uint64_t x = (uint64_t)(uintptr_t)arg;
    while (!atomic_load(j->done)) {
        int n = atomic_load(j->written);
        if (n == 0)
            continue;
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        int i = (int)((x >> 33) % (uint64_t)n);
        char k[16], v[16];
        size_t len;
        snprintf(k, sizeof k, "g%d", i);
        ck_assert_int_eq(keel_cache_get(j->c, k, strlen(k), v, sizeof v, &len), 0);
        ck_assert_uint_eq(len, sizeof(int));
        int got;
        memcpy(&got, v, sizeof got);
        ck_assert_int_eq(got, i);
        j->found++;
    }
    return NULL;
}

START_TEST(readers_go_on_while_the_table_grows)
{
    keel_cache *c;
    keel_cache_opts o = {.l1_max_bytes = (size_t)64 << 20};
    ck_assert_int_eq(keel_cache_create(&c, &o), 0);
    _Atomic int written = 0;
    atomic_bool done = false;
    grow_job jobs[3];
    pthread_t t[3];
    for (int i = 0; i < 3; i++) {
        jobs[i] = (grow_job){c, &written, &done, 0};
        ck_assert_int_eq(pthread_create(&t[i], NULL, grow_reader, &jobs[i]), 0);
    }
    for (int i = 0; i < 60000; i++) { /* 64 buckets a shard at first: ten doublings */
        char k[16];
        snprintf(k, sizeof k, "g%d", i);
        ck_assert_int_eq(keel_cache_set(c, k, strlen(k), &i, sizeof i, 0, NULL, 0), 0);
        atomic_store(&written, i + 1);
    }
    atomic_store(&done, true);
    long found = 0;
    for (int i = 0; i < 3; i++) {
        pthread_join(t[i], NULL);
        found += jobs[i].found;
    }
    ck_assert_int_gt(found, 0);
    keel_cache_stats st;
    keel_cache_stats_get(c, &st);
    ck_assert_uint_eq(st.l1_items, 60000);
    ck_assert_uint_eq(st.evictions, 0);
    keel_cache_destroy(c);
}
END_TEST

static void *hit_thread(void *arg)
{
    keel_cache *c = arg;
    for (int i = 0; i < 1000; i++) {
        char v[8];
        size_t len;
        ck_assert_int_eq(keel_cache_get(c, "k", 1, v, sizeof v, &len), 0);
    }
    return NULL;
}

/* Threads own their counter stripes while they live and give them back
 * when they exit; more threads than stripes share the last one. No hit
 * may be lost either way. */
START_TEST(hits_from_many_threads_are_all_counted)
{
    keel_cache *c;
    ck_assert_int_eq(keel_cache_create(&c, NULL), 0);
    ck_assert_int_eq(keel_cache_set(c, "k", 1, "v", 1, 0, NULL, 0), 0);
    enum { WAVES = 3, THREADS = 24 }; /* more than the 16 stripes, and again once they are back */
    for (int w = 0; w < WAVES; w++) {
        pthread_t t[THREADS];
        for (int i = 0; i < THREADS; i++)
            ck_assert_int_eq(pthread_create(&t[i], NULL, hit_thread, c), 0);
        for (int i = 0; i < THREADS; i++)
            pthread_join(t[i], NULL);
    }
    keel_cache_stats st;
    keel_cache_stats_get(c, &st);
    ck_assert_uint_eq(st.hits_l1, WAVES * THREADS * 1000);
    keel_cache_destroy(c);
}
END_TEST

/* One tag per key, over far more keys than L1 holds: a tag's record
 * lives as long as entries carry the tag, so their number stays bounded
 * by L1's entries (and those awaiting their grace period, at most 128 a
 * shard); none is left once L1 is empty. Tags invalidated after their
 * records were freed and made again still make their entries miss. */
START_TEST(tag_records_live_as_long_as_their_entries)
{
    keel_cache *c;
    keel_cache_opts o = {.l1_max_items = 320, .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_cache_create(&c, &o), 0);
    keel_cache_stats st;
    char k[32], v[64];
    for (int i = 0; i < 20000; i++) {
        snprintf(k, sizeof k, "user:%d", i);
        const char *tags[2] = {k, "all"};
        ck_assert_int_eq(set(c, k, "v", tags, 2), 0);
        if (i % 1000 == 999) {
            keel_cache_stats_get(c, &st);
            ck_assert_uint_le(st.l1_items, 320);
            ck_assert_uint_le(st.tags, 1 + 320 + 32 * 128);
        }
    }
    ck_assert_int_eq(keel_cache_invalidate_prefix(c, "", 0), 0); /* L1 empty, its garbage freed */
    keel_cache_stats_get(c, &st);
    ck_assert_uint_eq(st.l1_items, 0);
    ck_assert_uint_eq(st.tags, 0);
    /* entries set before an invalidation, their records made again */
    const char *t1[1] = {"t1"}, *t2[1] = {"t2"};
    ck_assert_int_eq(set(c, "a", "A", t1, 1), 0);
    ck_assert_int_eq(set(c, "b", "B", t1, 1), 0);
    ck_assert_int_eq(set(c, "c", "C", t2, 1), 0);
    keel_cache_stats_get(c, &st);
    ck_assert_uint_eq(st.tags, 2);
    ck_assert_int_eq(keel_cache_invalidate_tag(c, "t1"), 0);
    ck_assert_int_eq(get(c, "a", v, sizeof v), KEEL_ENOTFOUND);
    ck_assert_int_eq(get(c, "b", v, sizeof v), KEEL_ENOTFOUND);
    ck_assert_int_eq(get(c, "c", v, sizeof v), 0);
    /* a tag invalidated with no record, then set again: a hit */
    ck_assert_int_eq(keel_cache_invalidate_tag(c, "t3"), 0);
    const char *t3[1] = {"t3"};
    ck_assert_int_eq(set(c, "d", "D", t3, 1), 0);
    ck_assert_int_eq(get(c, "d", v, sizeof v), 0);
    ck_assert_str_eq(v, "D");
    ck_assert_int_eq(keel_cache_invalidate_tag(c, "t3"), 0);
    ck_assert_int_eq(get(c, "d", v, sizeof v), KEEL_ENOTFOUND);
    /* t1's record freed with its last entry, made again by a new one */
    ck_assert_int_eq(keel_cache_invalidate_prefix(c, "", 0), 0);
    ck_assert_int_eq(set(c, "a", "A2", t1, 1), 0);
    ck_assert_int_eq(get(c, "a", v, sizeof v), 0);
    ck_assert_str_eq(v, "A2");
    ck_assert_int_eq(set(c, "e", "E", t1, 1), 0);
    ck_assert_int_eq(keel_cache_invalidate_tag(c, "t1"), 0);
    ck_assert_int_eq(get(c, "a", v, sizeof v), KEEL_ENOTFOUND);
    ck_assert_int_eq(get(c, "e", v, sizeof v), KEEL_ENOTFOUND);
    /* an entry replaced gives its tags back */
    ck_assert_int_eq(set(c, "f", "F", t2, 1), 0);
    ck_assert_int_eq(set(c, "f", "F2", NULL, 0), 0);
    ck_assert_int_eq(keel_cache_invalidate_prefix(c, "", 0), 0);
    keel_cache_stats_get(c, &st);
    ck_assert_uint_eq(st.tags, 0);
    keel_cache_destroy(c);
}
END_TEST

static int says_yes(const void *key, size_t klen, keel_cache_load *ld, void *ud)
{
    (void)key, (void)klen, (void)ld;
    atomic_fetch_add((_Atomic int *)ud, 1);
    return 0; /* but sets nothing */
}

/* A loader that returns 0 without keel_cache_load_set() gives
 * KEEL_EPROTO, and nothing is cached: the next get asks it again. */
START_TEST(a_loader_that_sets_nothing_is_a_protocol_error)
{
    _Atomic int calls = 0;
    keel_cache *c;
    keel_cache_opts o = {.loader = says_yes, .loader_ud = &calls, .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_cache_create(&c, &o), 0);
    char v[16];
    ck_assert_int_eq(get(c, "k", v, sizeof v), KEEL_EPROTO);
    ck_assert_int_eq(get(c, "k", v, sizeof v), KEEL_EPROTO);
    ck_assert_int_eq(atomic_load(&calls), 2);
    keel_cache_destroy(c);
}
END_TEST

START_TEST(bad_input_is_refused)
{
    keel_cache *c;
    keel_cache_opts bad[] = {{.table = "Bad-Name"}, {.l1_max_bytes = 1}, {.max_key = 4096},
                             {.max_value = (size_t)1 << 30}, {.redis_prefix = ""}, {.xfetch_beta = -1},
                             /* its L2 encoding, with 16 tags of 200 bytes, would pass Redis's 512 MiB */
                             {.max_value = (size_t)512 << 20}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        ck_assert_int_eq(keel_cache_create(&c, &bad[i]), KEEL_EINVAL);
    keel_cache_opts most = {.max_value = ((size_t)512 << 20) - 18 - 16 * 201}; /* the largest that fits */
    ck_assert_int_eq(keel_cache_create(&c, &most), 0);
    keel_cache_destroy(c);
    ck_assert_int_eq(keel_cache_create(NULL, NULL), KEEL_EINVAL);
    keel_cache_opts o = {.max_key = 8, .max_value = 16};
    ck_assert_int_eq(keel_cache_create(&c, &o), 0);
    char v[32];
    size_t len;
    ck_assert_int_eq(keel_cache_get(c, "123456789", 9, v, sizeof v, &len), KEEL_EINVAL); /* key over 8 */
    ck_assert_int_eq(keel_cache_get(c, "", 0, v, sizeof v, &len), KEEL_EINVAL);
    ck_assert_int_eq(keel_cache_get(c, NULL, 3, v, sizeof v, &len), KEEL_EINVAL);
    ck_assert_int_eq(keel_cache_get(c, "k", 1, NULL, 5, &len), KEEL_EINVAL);
    ck_assert_int_eq(keel_cache_get(c, "k", 1, v, sizeof v, NULL), KEEL_EINVAL);
    ck_assert_int_eq(keel_cache_get(c, "k", 1, v, sizeof v, &len), KEEL_ENOTFOUND); /* no loader */
    ck_assert_int_eq(keel_cache_set(c, "k", 1, "0123456789abcdefX", 17, 0, NULL, 0), KEEL_EINVAL);
    const char *many[17];
    for (int i = 0; i < 17; i++)
        many[i] = "t";
    ck_assert_int_eq(keel_cache_set(c, "k", 1, "v", 1, 0, many, 17), KEEL_EINVAL);
    const char *sep[1] = {"a\x1f" "b"}, *empty[1] = {""}, *null[1] = {NULL};
    ck_assert_int_eq(keel_cache_set(c, "k", 1, "v", 1, 0, sep, 1), KEEL_EINVAL);
    ck_assert_int_eq(keel_cache_set(c, "k", 1, "v", 1, 0, empty, 1), KEEL_EINVAL);
    ck_assert_int_eq(keel_cache_set(c, "k", 1, "v", 1, 0, null, 1), KEEL_EINVAL);
    const char *latin1[1] = {"caf\xe9"}; /* tags are text: L3 keeps them as such */
    ck_assert_int_eq(keel_cache_set(c, "k", 1, "v", 1, 0, latin1, 1), KEEL_EINVAL);
    ck_assert_int_eq(keel_cache_invalidate_tag(c, latin1[0]), KEEL_EINVAL);
    ck_assert_int_eq(keel_cache_invalidate_tag(c, NULL), KEEL_EINVAL);
    ck_assert_int_eq(keel_cache_invalidate_prefix(c, NULL, 2), KEEL_EINVAL);
    ck_assert_int_eq(keel_cache_del(c, NULL, 0), KEEL_EINVAL);
    ck_assert_int_eq(keel_cache_set(c, "k", 1, "v", 1, 0, NULL, 0), 0);
    ck_assert_int_eq(keel_cache_get(c, "k", 1, v, sizeof v, &len), 0);
    ck_assert_int_eq(keel_cache_load_set(NULL, "v", 1, 0, NULL, 0), KEEL_EINVAL);
    keel_cache_destroy(c);
    keel_cache_destroy(NULL);
    /* a value too big for L1 (a 32nd of 64 KiB) replaces the old one: by nothing */
    keel_cache_opts small = {.l1_max_bytes = 64 << 10};
    ck_assert_int_eq(keel_cache_create(&c, &small), 0);
    ck_assert_int_eq(keel_cache_set(c, "k", 1, "small", 5, 0, NULL, 0), 0);
    static char big[3000];
    ck_assert_int_eq(keel_cache_set(c, "k", 1, big, sizeof big, 0, NULL, 0), 0);
    ck_assert_int_eq(keel_cache_get(c, "k", 1, v, sizeof v, &len), KEEL_ENOTFOUND);
    keel_cache_destroy(c);
}
END_TEST

/* ---- a model of the L1 alone ----
 *
 * Seeded random set, get, get_many, del, invalidate_tag,
 * invalidate_prefix and clock steps on a cache without servers, checked
 * against a map: a get returns exactly the last value set (or loaded)
 * unless it expired (an entry set at t with TTL d lives while the clock
 * is under t + d, the TTL capped by l1_max_ttl), was deleted, invalidated
 * by tag or prefix, or evicted; an eviction only by a later write into
 * the key's shard that evicted (the evictions counter moved: the shard
 * was full); the bounds hold after every step. The loader answers
 * by the key: a value, or absent (cached for negative_ttl_ns). A failure
 * names its seed; KEEL_TEST_SEED replays one. */

enum { MK = 40, MT = 7, MSTEPS = 600, M_TAGS = 17, M_TAGLEN = 200 };
enum { M_ABSENT, M_VALUE, M_NEG };

typedef struct mkey {
    unsigned char b[1100];
    size_t n;
} mkey;

typedef struct ment {
    int state;
    unsigned char val[3100];
    size_t vlen;
    uint64_t expires;
    int tags[M_TAGS];
    uint64_t tagver[M_TAGS];
    size_t ntags;
    bool maybe_gone;    /* perhaps too big for a shard */
    bool present;       /* perhaps in the L1, expired or not */
    size_t most;        /* then its charge at most */
    uint64_t shard_ev;  /* the shard's evicting writes before its insert */
} ment;

typedef struct model {
    unsigned long long seed;
    uint64_t rng;
    kt_clock clk;
    keel_cache *c;
    keel_cache_opts o;
    size_t max_key, max_value, shard_bytes;
    uint64_t default_ttl, negative_ttl, max_ttl;
    mkey keys[MK];
    ment m[MK];
    char tagname[MT][M_TAGLEN + 2];
    uint64_t tagver[MT];
    uint64_t shard_ev[32];
    _Atomic int calls;
    int step;
} model;

#define MCHECK(md, cond, fmt, ...)                                                                          \
    ck_assert_msg(cond, "seed %llu step %d: " fmt, (md)->seed, (md)->step, __VA_ARGS__)

static uint64_t m_rand(model *md)
{
    md->rng = md->rng * 6364136223846793005ull + 1442695040888963407ull;
    return md->rng >> 17;
}
static uint64_t m_below(model *md, uint64_t n) { return n ? m_rand(md) % n : 0; }
static uint64_t m_now(model *md) { return atomic_load(&md->clk.ns); }

/* The loader's answer for a key: absent, or 'L', its length, the number
 * of the call (so that a value loaded again is not the same) and its
 * bytes. */
static bool m_absent(const void *k, size_t n) { return (((const unsigned char *)k)[0] + n) % 3 == 0; }
static size_t m_loaded(const void *k, size_t n, int call, unsigned char *out)
{
    size_t l = n < 30 ? n : 30;
    out[0] = 'L';
    out[1] = (unsigned char)n;
    memcpy(out + 2, &call, sizeof call);
    memcpy(out + 2 + sizeof call, k, l);
    return l + 2 + sizeof call;
}

static int m_load(const void *key, size_t klen, keel_cache_load *ld, void *ud)
{
    model *md = ud;
    int call = atomic_fetch_add(&md->calls, 1) + 1;
    if (m_absent(key, klen))
        return KEEL_ENOTFOUND;
    unsigned char v[40];
    return keel_cache_load_set(ld, v, m_loaded(key, klen, call, v), 0, NULL, 0);
}

static uint64_t m_expiry(model *md, uint64_t ttl)
{
    if (md->max_ttl && ttl > md->max_ttl)
        ttl = md->max_ttl;
    uint64_t now = m_now(md);
    return ttl > UINT64_MAX - now ? UINT64_MAX : now + ttl;
}

static bool m_live(model *md, int i)
{
    ment *e = &md->m[i];
    if (e->state == M_ABSENT || m_now(md) >= e->expires)
        return false;
    for (size_t t = 0; t < e->ntags; t++)
        if (md->tagver[e->tags[t]] != e->tagver[t])
            return false;
    return true;
}

/* Whether key i may have been evicted (or never fitted) since its insert. */
static bool m_may_be_gone(model *md, int i)
{
    ment *e = &md->m[i];
    return e->maybe_gone || md->shard_ev[m_shard(md->c, md->keys[i].b, md->keys[i].n)] > e->shard_ev;
}

/* An entry: 31 bytes, key and value, 8-aligned, 16 of links, 16 a tag,
 * 16 of allocator; at most. */
static size_t m_charge(size_t klen, size_t vlen, size_t ntags) { return 31 + klen + vlen + 7 + 16 + 16 * ntags + 16; }

/* Whether inserting `charge` for key i had to evict: its shard full by
 * what may be in it (other keys: the old entry of i is replaced). */
static bool m_full(model *md, int i, size_t charge)
{
    int sh = m_shard(md->c, md->keys[i].b, md->keys[i].n);
    size_t n = md->o.l1_max_items, share = n / 32 + ((size_t)sh < n % 32), items = 0, bytes = 0;
    size_t most = !n ? SIZE_MAX : share ? share : 1; /* as keel_cache_opts says */
    for (int j = 0; j < MK; j++)
        if (j != i && md->m[j].present && m_shard(md->c, md->keys[j].b, md->keys[j].n) == sh) {
            items++;
            bytes += md->m[j].most;
        }
    return items + 1 > most || bytes + charge > md->shard_bytes;
}

static uint64_t m_evictions(model *md)
{
    keel_cache_stats st;
    keel_cache_stats_get(md->c, &st);
    return st.evictions;
}

static void m_bounds(model *md)
{
    keel_cache_stats st;
    keel_cache_stats_get(md->c, &st);
    MCHECK(md, st.l1_bytes <= md->o.l1_max_bytes, "L1 holds %llu bytes, over %zu", (unsigned long long)st.l1_bytes,
           md->o.l1_max_bytes);
    MCHECK(md, !md->o.l1_max_items || st.l1_items <= md->o.l1_max_items, "L1 holds %llu items, over %zu",
           (unsigned long long)st.l1_items, md->o.l1_max_items);
}

/* What a miss of key i gives: the loader's answer, now in the model. */
static void m_loaded_into(model *md, int i, uint64_t ev_before, int call)
{
    ment *e = &md->m[i];
    mkey *k = &md->keys[i];
    e->ntags = 0;
    e->maybe_gone = false;
    e->shard_ev = ev_before;
    e->present = true;
    if (m_absent(k->b, k->n)) {
        e->state = M_NEG;
        e->vlen = 0;
        e->expires = m_expiry(md, md->negative_ttl);
    } else {
        e->state = M_VALUE;
        e->vlen = m_loaded(k->b, k->n, call, e->val);
        e->expires = m_expiry(md, md->default_ttl);
    }
    e->most = m_charge(k->n, e->vlen, 0);
}

/* Checks one get's answer for key i against the model and updates it.
 * loads: whether the loader was called for it (call: which call). */
static void m_answer(model *md, int i, int rc, const void *buf, size_t cap, size_t len, bool loads, int call,
                     uint64_t ev)
{
    ment *e = &md->m[i];
    bool live = m_live(md, i);
    if (live && !loads) {
        if (e->state == M_NEG) {
            MCHECK(md, rc == KEEL_ENOTFOUND, "key %d: cached absence answered %d", i, rc);
            return;
        }
        MCHECK(md, rc == (e->vlen > cap ? KEEL_ERANGE : 0), "key %d: rc %d for a value of %zu in %zu", i, rc,
               e->vlen, cap);
        MCHECK(md, len == e->vlen, "key %d: len %zu, want %zu", i, len, e->vlen);
        MCHECK(md, rc != 0 || len == 0 || memcmp(buf, e->val, len) == 0, "key %d: another value", i);
        return;
    }
    MCHECK(md, loads, "key %d: not loaded though the model has it gone", i);
    MCHECK(md, !live || m_may_be_gone(md, i), "key %d: loaded though live and not evictable", i);
    m_loaded_into(md, i, ev, call);
    if (e->state == M_NEG) {
        MCHECK(md, rc == KEEL_ENOTFOUND, "key %d: loader said absent, get said %d", i, rc);
        return;
    }
    MCHECK(md, rc == (e->vlen > cap ? KEEL_ERANGE : 0) && len == e->vlen, "key %d: loaded rc %d len %zu", i, rc, len);
    MCHECK(md, rc != 0 || memcmp(buf, e->val, len) == 0, "key %d: another loaded value", i);
}

static bool m_key_ok(model *md, size_t n) { return n >= 1 && n <= md->max_key; }

static void m_get(model *md)
{
    int i = (int)m_below(md, MK);
    mkey *k = &md->keys[i];
    static unsigned char buf[3200];
    size_t cap = m_below(md, 4) == 0 ? m_below(md, 40) : sizeof buf, len = 12345;
    int calls = atomic_load(&md->calls);
    uint64_t ev = m_evictions(md), sev = md->shard_ev[m_shard(md->c, k->b, k->n)];
    unsigned char lv[40];
    bool full = m_key_ok(md, k->n) && m_full(md, i, m_charge(k->n, m_loaded(k->b, k->n, 0, lv), 0));
    int rc = keel_cache_get(md->c, k->b, k->n, cap ? buf : NULL, cap, &len);
    if (!m_key_ok(md, k->n)) {
        MCHECK(md, rc == KEEL_EINVAL, "get of a key of %zu: %d", k->n, rc);
        return;
    }
    bool loads = atomic_load(&md->calls) != calls;
    MCHECK(md, atomic_load(&md->calls) - calls <= 1, "%d loads for one get", atomic_load(&md->calls) - calls);
    if (m_evictions(md) != ev) {
        MCHECK(md, loads && full, "key %d: a get evicted, its shard not full", i);
        md->shard_ev[m_shard(md->c, k->b, k->n)]++;
    }
    sev = md->shard_ev[m_shard(md->c, k->b, k->n)]; /* a load evicts others only */
    m_answer(md, i, rc, buf, cap, len, loads, atomic_load(&md->calls), sev);
}

static void m_get_many(model *md)
{
    enum { N = 6 };
    static unsigned char bufs[N][3200];
    keel_cache_item it[N];
    int idx[N];
    size_t n = 1 + m_below(md, N);
    for (size_t j = 0; j < n; j++) {
        idx[j] = (int)m_below(md, MK);
        if (j && m_below(md, 3) == 0)
            idx[j] = idx[m_below(md, j)]; /* a key given twice */
        bool twice = false;
        for (size_t p = 0; p < j; p++)
            twice |= idx[p] == idx[j];
        /* an entry perhaps evicted (by the load of an item before) must
         * show whether it was loaded again: no cached absence then, and
         * room for the value */
        mkey *k = &md->keys[idx[j]];
        bool unsure = twice || (m_key_ok(md, k->n) && m_live(md, idx[j]) && m_may_be_gone(md, idx[j]));
        if (unsure && m_key_ok(md, k->n) && (md->m[idx[j]].state == M_NEG || m_absent(k->b, k->n))) {
            j--, n--;
            continue;
        }
        size_t cap = m_below(md, 4) == 0 && !unsure ? m_below(md, 40) : sizeof bufs[j];
        it[j] = (keel_cache_item){md->keys[idx[j]].b, md->keys[idx[j]].n, bufs[j], cap, 777, 999};
    }
    int calls = atomic_load(&md->calls);
    uint64_t ev = m_evictions(md);
    uint64_t sev[N];
    for (size_t j = 0; j < n; j++)
        sev[j] = md->shard_ev[m_shard(md->c, it[j].key, it[j].klen)];
    int rc = keel_cache_get_many(md->c, it, n);
    if (m_evictions(md) != ev) /* some load evicted: in any of their shards */
        for (size_t j = 0; j < n; j++)
            md->shard_ev[m_shard(md->c, it[j].key, it[j].klen)]++;
    int first = 0, loads = 0;
    /* in order: an item loaded is what a later one of its key finds */
    for (size_t j = 0; j < n; j++) {
        keel_cache_item *x = &it[j];
        int i = idx[j];
        if (!m_key_ok(md, x->klen)) {
            MCHECK(md, x->rc == KEEL_EINVAL, "multi-get of a key of %zu: %d", x->klen, x->rc);
        } else {
            /* a load: the model has it gone, or evicted (its value not there) */
            bool live = m_live(md, i), load;
            if (!live) {
                load = true;
            } else if (md->m[i].state == M_VALUE) {
                load = x->rc == KEEL_ENOTFOUND || x->len != md->m[i].vlen ||
                       (x->rc == 0 && memcmp(x->buf, md->m[i].val, x->len) != 0);
                load = load && m_may_be_gone(md, i);
            } else {
                load = false; /* a cached absence; a reload says absent too */
            }
            if (load)
                loads++;
            m_answer(md, i, x->rc, x->buf, x->cap, x->len, load, calls + loads, sev[j]);
        }
        if (!first)
            first = x->rc;
    }
    MCHECK(md, rc == first, "multi-get returned %d, its first error is %d", rc, first);
    int got = atomic_load(&md->calls) - calls;
    MCHECK(md, got == loads, "multi-get: %d loads, the answers show %d", got, loads);
}

static void m_set(model *md)
{
    int i = (int)m_below(md, MK);
    mkey *k = &md->keys[i];
    static unsigned char v[3200];
    size_t vlen;
    switch (m_below(md, 5)) {
    case 0: vlen = 0; break;
    case 1: vlen = md->max_value + m_below(md, 2); break;
    case 2: vlen = m_below(md, md->max_value + 1); break;
    default: vlen = m_below(md, 24); break;
    }
    for (size_t j = 0; j < vlen; j++)
        v[j] = (unsigned char)m_rand(md);
    uint64_t ttl;
    uint64_t now = m_now(md);
    switch (m_below(md, 7)) {
    case 0: ttl = 0; break;
    case 1: ttl = 1; break;
    case 2: ttl = UINT64_MAX; break;
    case 3: ttl = UINT64_MAX - now + m_below(md, 3); break; /* now + ttl wraps, or just not */
    case 4: ttl = md->max_ttl ? md->max_ttl + m_below(md, 3) - 1 : 1 + m_below(md, 5000); break;
    default: ttl = 1 + m_below(md, 3000); break;
    }
    const char *tags[17];
    int tix[17];
    size_t ntags = m_below(md, 6) == 0 ? 16 + m_below(md, 2) : m_below(md, 4);
    bool bad_tag = false;
    for (size_t t = 0; t < ntags; t++) {
        tix[t] = (int)m_below(md, MT);
        tags[t] = md->tagname[tix[t]];
        bad_tag |= tix[t] == MT - 1; /* over 200 bytes */
    }
    int calls = atomic_load(&md->calls);
    uint64_t ev = m_evictions(md);
    int sh = m_shard(md->c, k->b, k->n);
    uint64_t sev = md->shard_ev[sh];
    size_t most = m_charge(k->n, vlen, ntags);
    bool full = m_key_ok(md, k->n) && m_full(md, i, most);
    int rc = keel_cache_set(md->c, k->b, k->n, vlen ? v : NULL, vlen, ttl, tags, ntags);
    MCHECK(md, atomic_load(&md->calls) == calls, "%s", "a set called the loader");
    if (!m_key_ok(md, k->n) || vlen > md->max_value || ntags > 16 || bad_tag) {
        MCHECK(md, rc == KEEL_EINVAL, "bad set (key %zu, value %zu, %zu tags, bad tag %d): %d", k->n, vlen, ntags,
               bad_tag, rc);
        return;
    }
    MCHECK(md, rc == 0, "set: %d", rc);
    if (m_evictions(md) != ev) {
        MCHECK(md, full, "key %d: a set evicted, its shard not full", i);
        md->shard_ev[sh]++;
    }
    sev = md->shard_ev[sh]; /* its own insert evicts others only */
    ment *e = &md->m[i];
    e->state = M_VALUE;
    memcpy(e->val, v, vlen);
    e->vlen = vlen;
    e->expires = m_expiry(md, ttl ? ttl : md->default_ttl);
    e->ntags = ntags;
    for (size_t t = 0; t < ntags; t++) {
        e->tags[t] = tix[t];
        e->tagver[t] = md->tagver[tix[t]];
    }
    e->shard_ev = sev;
    /* certainly over a shard, or perhaps */
    e->maybe_gone = most > md->shard_bytes;
    e->present = most - 7 <= md->shard_bytes;
    e->most = most;
    if (!e->present)
        e->state = M_ABSENT; /* too big for L1: the old value gone too */
}

static void m_del(model *md)
{
    int i = (int)m_below(md, MK);
    mkey *k = &md->keys[i];
    int rc = keel_cache_del(md->c, k->b, k->n);
    if (!m_key_ok(md, k->n)) {
        MCHECK(md, rc == KEEL_EINVAL, "del of a key of %zu: %d", k->n, rc);
        return;
    }
    MCHECK(md, rc == 0, "del: %d", rc);
    md->m[i].state = M_ABSENT;
    md->m[i].present = false;
}

static void m_tag(model *md)
{
    int t = (int)m_below(md, MT);
    int rc = keel_cache_invalidate_tag(md->c, md->tagname[t]);
    if (t == MT - 1) {
        MCHECK(md, rc == KEEL_EINVAL, "a tag over 200 bytes: %d", rc);
        return;
    }
    MCHECK(md, rc == 0, "invalidate_tag: %d", rc);
    md->tagver[t]++;
}

static void m_prefix(model *md)
{
    mkey *k = &md->keys[m_below(md, MK)];
    size_t len = m_below(md, 4) == 0 ? m_below(md, 3) : m_below(md, k->n + 1);
    int rc = keel_cache_invalidate_prefix(md->c, len ? k->b : NULL, len);
    if (len > md->max_key) {
        MCHECK(md, rc == KEEL_EINVAL, "a prefix of %zu: %d", len, rc);
        return;
    }
    MCHECK(md, rc == 0, "invalidate_prefix: %d", rc);
    for (int i = 0; i < MK; i++)
        if (md->keys[i].n >= len && memcmp(md->keys[i].b, k->b, len) == 0) {
            md->m[i].state = M_ABSENT;
            md->m[i].present = false;
        }
}

/* Time: a little, or to a key's expiry exactly, a nanosecond before or
 * after it. */
static void m_time(model *md)
{
    uint64_t now = m_now(md), to = now;
    ment *e = &md->m[m_below(md, MK)];
    if (m_below(md, 3) == 0 || e->state == M_ABSENT || e->expires == UINT64_MAX || e->expires <= now + 1)
        to = now + m_below(md, 50);
    else
        to = e->expires + m_below(md, 3) - 1;
    kt_clock_advance(&md->clk, to - now);
}

static void m_bad(model *md)
{
    size_t len;
    char b[4];
    keel_cache_item it = {NULL, 3, b, sizeof b, 0, 0};
    MCHECK(md, keel_cache_get(md->c, "k", 1, NULL, 4, &len) == KEEL_EINVAL, "%s", "get into NULL");
    MCHECK(md, keel_cache_get(md->c, "k", 1, b, sizeof b, NULL) == KEEL_EINVAL, "%s", "get to a NULL len");
    MCHECK(md, keel_cache_set(md->c, "k", 1, NULL, 3, 0, NULL, 0) == KEEL_EINVAL, "%s", "set of NULL");
    MCHECK(md, keel_cache_set(md->c, "k", 1, "v", 1, 0, NULL, 2) == KEEL_EINVAL, "%s", "NULL tags");
    MCHECK(md, keel_cache_get_many(md->c, &it, 1) == KEEL_EINVAL && it.rc == KEEL_EINVAL, "%s", "NULL item key");
    MCHECK(md, keel_cache_get_many(md->c, NULL, 1) == KEEL_EINVAL, "%s", "NULL items");
}

static void model_run(unsigned long long seed)
{
    static model md_;
    model *md = &md_;
    memset(md, 0, sizeof *md);
    md->seed = seed;
    md->rng = seed * 0x9e3779b97f4a7c15ull + 1;
    atomic_store(&md->clk.ns, 1000000 + m_below(md, 1000));
    md->max_key = m_below(md, 2) ? 64 : 1024;
    md->max_value = m_below(md, 2) ? 100 : 3000;
    md->o = (keel_cache_opts){.l1_max_bytes = m_below(md, 3) ? (size_t)64 << 10 : (size_t)1 << 20,
                              .l1_max_items = (size_t[]){0, 40, 100}[m_below(md, 3)],
                              .l1_max_ttl_ns = m_below(md, 2) ? 0 : 5000,
                              .max_key = md->max_key == 1024 && m_below(md, 2) ? 0 : md->max_key,
                              .max_value = md->max_value,
                              .default_ttl_ns = m_below(md, 3) ? 1000 : 0,
                              .negative_ttl_ns = m_below(md, 3) ? 300 : 0,
                              .loader = m_load, .loader_ud = md,
                              .clock = kt_clock_now, .clock_ud = &md->clk};
    md->shard_bytes = md->o.l1_max_bytes / 32;
    md->max_ttl = md->o.l1_max_ttl_ns;
    md->default_ttl = md->o.default_ttl_ns ? md->o.default_ttl_ns : 3600 * S;
    md->negative_ttl = md->o.negative_ttl_ns ? md->o.negative_ttl_ns : 10 * S;
    ck_assert_int_eq(keel_cache_create(&md->c, &md->o), 0);
    for (int t = 0; t < MT - 1; t++)
        snprintf(md->tagname[t], sizeof md->tagname[t], "t%d", t);
    memset(md->tagname[MT - 1], 'x', M_TAGLEN + 1); /* one too long */
    /* keys: binary, NUL bytes, many the prefix of another; a few empty or
     * over max_key */
    for (int i = 0; i < MK; i++) {
        mkey *k = &md->keys[i];
        size_t n;
        switch (m_below(md, 8)) {
        case 0: n = md->max_key + m_below(md, 2); break;
        case 1: n = m_below(md, 10) == 0 ? 0 : 1; break;
        default: n = 1 + m_below(md, 12); break;
        }
        k->n = n;
        const mkey *p = i ? &md->keys[m_below(md, (uint64_t)i)] : NULL;
        size_t from = p && m_below(md, 2) ? (p->n < n ? p->n : n) : 0;
        if (from)
            memcpy(k->b, p->b, from);
        for (size_t j = from; j < n; j++)
            k->b[j] = (unsigned char)(m_below(md, 3) == 0 ? 0 : m_rand(md) % 4);
        for (int j = 0; n && j < i; j++) /* one map entry a key */
            if (md->keys[j].n == n && memcmp(md->keys[j].b, k->b, n) == 0) {
                k->b[n - 1] = (unsigned char)(m_rand(md) | 0x80);
                j = -1;
            }
    }
    for (md->step = 0; md->step < MSTEPS; md->step++) {
        uint64_t r = m_below(md, 100);
        if (r < 30)
            m_get(md);
        else if (r < 55)
            m_set(md);
        else if (r < 62)
            m_get_many(md);
        else if (r < 68)
            m_del(md);
        else if (r < 73)
            m_tag(md);
        else if (r < 77)
            m_prefix(md);
        else if (r < 78)
            m_bad(md);
        else
            m_time(md);
        m_bounds(md);
    }
    keel_cache_destroy(md->c);
}

START_TEST(l1_agrees_with_a_model)
{
    const char *one = getenv("KEEL_TEST_SEED");
    if (one) {
        model_run(strtoull(one, NULL, 10));
        return;
    }
    for (unsigned long long seed = 1; seed <= 150; seed++)
        model_run(seed);
}
END_TEST


/* The same operations from four threads at once: no exact model, but no
 * get ever returns a value that was not set (or loaded) for its key, and
 * the bounds hold. A value carries its key and a pattern made from its
 * number, checked whole on every hit. */
enum { MT_KEYS = 24, MT_THREADS = 4, MT_OPS = 6000 };

typedef struct mt_job {
    keel_cache *c;
    kt_clock *clk;
    unsigned seed;
    size_t max_items, max_bytes;
} mt_job;

static size_t mt_value(int key, uint64_t n, unsigned char *out)
{
    size_t len = 9 + n % 300;
    out[0] = (unsigned char)key;
    memcpy(out + 1, &n, sizeof n);
    for (size_t j = 9; j < len; j++)
        out[j] = (unsigned char)(key * 31 + n + j);
    return len;
}

static void mt_check(int key, int rc, const unsigned char *buf, size_t cap, size_t len)
{
    ck_assert_msg(rc == 0 || rc == KEEL_ERANGE || rc == KEEL_ENOTFOUND, "key %d: rc %d", key, rc);
    if (rc == KEEL_ENOTFOUND)
        return;
    ck_assert_msg(len >= 9 && len < 9 + 300, "key %d: a value of %zu bytes", key, len);
    if (rc != 0)
        return;
    ck_assert_uint_le(len, cap);
    uint64_t n;
    memcpy(&n, buf + 1, sizeof n);
    unsigned char want[320];
    ck_assert_msg(buf[0] == key && mt_value(key, n, want) == len && memcmp(buf, want, len) == 0,
                  "key %d: a value never set for it", key);
}

static int mt_load(const void *key, size_t klen, keel_cache_load *ld, void *ud)
{
    (void)ud;
    int k = ((const unsigned char *)key)[0] * 4 + (int)klen;
    if (k % 5 == 0)
        return KEEL_ENOTFOUND;
    unsigned char v[320];
    return keel_cache_load_set(ld, v, mt_value(k, UINT64_MAX - (uint64_t)k, v), 0, NULL, 0);
}

static void *mt_thread(void *arg)
{
    mt_job *j = arg;
    uint64_t x = j->seed;
    for (int op = 0; op < MT_OPS; op++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        uint64_t r = x >> 20;
        unsigned char key[3] = {(unsigned char)(r % MT_KEYS), 0, 'k'}, buf[320];
        size_t klen = 1 + (r >> 30) % 3;
        int k = key[0] * 4 + (int)klen; /* the key's number, in its values */
        size_t len = 0, cap = (r >> 8) % 4 ? sizeof buf : (r >> 12) % 40;
        char tag[8];
        snprintf(tag, sizeof tag, "mt%d", (int)((r >> 16) % 3));
        const char *tags[1] = {tag};
        switch ((r >> 24) % 16) {
        case 0: case 1: case 2: case 3: case 4: {
            int rc = keel_cache_get(j->c, key, klen, buf, cap, &len);
            mt_check(k, rc, buf, cap, len);
            break;
        }
        case 5: case 6: case 7: case 8: {
            size_t vl = mt_value(k, (uint64_t)j->seed << 32 | (uint64_t)op, buf);
            uint64_t ttl = (r >> 34) % 3 ? (r >> 36) % 5000 : 1;
            ck_assert_int_eq(keel_cache_set(j->c, key, klen, buf, vl, ttl, tags, (r >> 40) % 2), 0);
            break;
        }
        case 9: {
            unsigned char kk[3][3], bb[3][320];
            keel_cache_item it[3];
            for (int i = 0; i < 3; i++) {
                kk[i][0] = (unsigned char)((r >> (8 * i)) % MT_KEYS), kk[i][1] = 0, kk[i][2] = 'k';
                it[i] = (keel_cache_item){kk[i], 1 + (r >> (30 + i)) % 3, bb[i], i ? sizeof bb[i] : cap, 0, 0};
            }
            keel_cache_get_many(j->c, it, 3);
            for (int i = 0; i < 3; i++)
                mt_check(kk[i][0] * 4 + (int)it[i].klen, it[i].rc, bb[i], it[i].cap, it[i].len);
            break;
        }
        case 10: ck_assert_int_eq(keel_cache_del(j->c, key, klen), 0); break;
        case 11: ck_assert_int_eq(keel_cache_invalidate_tag(j->c, tag), 0); break;
        case 12: ck_assert_int_eq(keel_cache_invalidate_prefix(j->c, key, (r >> 30) % 2), 0); break;
        default: kt_clock_advance(j->clk, (r >> 30) % 400); break;
        }
        if (op % 32 == 0) {
            keel_cache_stats st;
            keel_cache_stats_get(j->c, &st);
            ck_assert_uint_le(st.l1_items, j->max_items);
            ck_assert_uint_le(st.l1_bytes, j->max_bytes);
        }
    }
    return NULL;
}

START_TEST(threads_never_get_a_value_not_set_for_the_key)
{
    static kt_clock mclk;
    keel_cache *c;
    keel_cache_opts o = {.l1_max_items = 40, .l1_max_bytes = 64 << 10, .loader = mt_load, .negative_ttl_ns = 300,
                         .default_ttl_ns = 2000, .l1_max_ttl_ns = 3000, .clock = kt_clock_now, .clock_ud = &mclk};
    ck_assert_int_eq(keel_cache_create(&c, &o), 0);
    mt_job jobs[MT_THREADS];
    pthread_t t[MT_THREADS];
    for (int i = 0; i < MT_THREADS; i++) {
        jobs[i] = (mt_job){c, &mclk, (unsigned)i + 1, o.l1_max_items, o.l1_max_bytes};
        ck_assert_int_eq(pthread_create(&t[i], NULL, mt_thread, &jobs[i]), 0);
    }
    for (int i = 0; i < MT_THREADS; i++)
        pthread_join(t[i], NULL);
    keel_cache_destroy(c);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("cache");
    TCase *tc = tcase_create("local");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, eight_threads_missing_one_key_load_it_once);
    tcase_add_test(tc, only_an_invalidation_of_the_key_splits_its_flight);
    tcase_add_test(tc, only_an_invalidation_of_the_key_keeps_a_load_out_of_l1);
    tcase_add_test(tc, an_absent_answer_is_cached_for_negative_ttl);
    tcase_add_test(tc, a_multi_get_loads_a_key_given_twice_once);
    tcase_add_test(tc, a_multi_get_loads_a_key_given_twice_once_even_when_l1_cannot_keep_it);
    tcase_add_test(tc, a_multi_get_with_many_copies_of_a_key_answers_each);
    tcase_add_test(tc, xfetch_refreshes_early_near_expiry_only);
    tcase_add_test(tc, an_early_refresh_that_finds_the_key_gone_says_so);
    tcase_add_test(tc, the_hot_set_survives_a_scan);
    tcase_add_test(tc, a_set_is_not_evicted_by_its_own_insert);
    tcase_add_test(tc, hits_from_many_threads_are_all_counted);
    tcase_add_test(tc, bad_input_is_refused);
    tcase_add_test(tc, a_loader_that_sets_nothing_is_a_protocol_error);
    tcase_add_test(tc, tag_records_live_as_long_as_their_entries);
    suite_add_tcase(s, tc);
    TCase *th = tcase_create("threads");
    tcase_set_tags(th, "stress"); /* threads racing: not under valgrind */
    tcase_set_timeout(th, 60);
    tcase_add_test(th, readers_go_on_while_the_table_grows);
    tcase_add_test(th, threads_never_get_a_value_not_set_for_the_key);
    tcase_add_test(th, an_l1_only_set_stays_whatever_other_keys_are_set_meanwhile);
    suite_add_tcase(s, th);
    TCase *mo = tcase_create("model");
    tcase_set_tags(mo, "model"); /* one thread, random steps: not under TSan or valgrind */
    tcase_set_timeout(mo, 60);
    tcase_add_test(mo, l1_agrees_with_a_model);
    suite_add_tcase(s, mo);
    TCase *sv = tcase_create("servers");
    tcase_set_timeout(sv, 120);
    tcase_add_test(sv, a_miss_fills_every_tier_and_l1_ttl_is_capped);
    tcase_add_test(sv, set_and_del_go_through_every_tier);
    tcase_add_test(sv, a_sweep_spares_a_row_set_again_meanwhile);
    tcase_add_test(sv, a_sweep_interval_past_the_clock_never_comes);
    tcase_add_test(sv, the_sweeper_deletes_expired_rows);
    tcase_add_test(sv, the_l3_table_is_unlogged_unless_asked);
    tcase_add_test(sv, a_multi_get_asks_each_node_once);
    tcase_add_test(sv, only_an_invalidation_of_the_key_keeps_a_load_from_the_lower_tiers);
    tcase_add_test(sv, only_a_tag_the_value_carries_splits_its_flight);
    tcase_add_test(sv, a_value_read_below_before_an_invalidation_stays_out_of_l1);
    tcase_add_test(sv, a_set_overtaken_by_a_del_leaves_no_value_in_l1);
    tcase_add_test(sv, a_lease_makes_one_process_load);
    tcase_add_test(sv, a_lease_holder_looks_in_l2_again_before_loading);
    tcase_add_test(sv, an_early_refresh_under_a_lease_asks_the_loader);
    tcase_add_test(sv, redis_failing_during_a_lease_wait_counts_against_l2);
    tcase_add_test(sv, xfetch_leaves_an_entry_capped_by_l1_max_ttl_to_l2);
    tcase_add_test(sv, without_a_loader_a_value_near_expiry_is_a_hit);
    tcase_add_test(sv, xfetch_refreshes_from_the_loader_over_l3);
    tcase_add_test(sv, an_early_refresh_overwrites_l2_and_l3);
    tcase_add_test(sv, an_early_refresh_that_finds_the_key_gone_removes_it_everywhere);
    tcase_add_test(sv, another_process_invalidates_this_l1);
    tcase_add_test(sv, a_dropped_link_flushes_l1);
    tcase_add_test(sv, a_tag_goes_from_every_tier);
    tcase_add_test(sv, prefixes_with_glob_and_like_characters_and_nul);
    tcase_add_test(sv, foreign_tags_too_long_are_not_values_of_ours);
    tcase_add_test(sv, a_far_expiry_read_below_does_not_wrap_to_a_short_one);
    tcase_add_test(sv, redis_down_then_back);
    tcase_add_test(sv, postgres_down_then_back);
    tcase_add_test(sv, one_redis_node_down_costs_only_its_keys);
    suite_add_tcase(s, sv);
    return kt_run(s);
}
