/* tests/test_redis.c — keel_redis against real redis-server nodes from
 * tests/servers.sh: routing, binary keys, pipelines, scripts, AUTH, a node
 * stopped and paused mid-run, the pub/sub listener, SIGPIPE, bad URLs. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <keel/redis.h>
#include <keel/ring.h>

#include "harness.h"
#include "redis/redis_int.h"

#define MS KT_MS

static char urls[8][160];
static const char *url_ptrs[8];

/* redis:// URLs of the test nodes, with an optional "user:pass@" part. */
static int node_urls(const char *auth)
{
    int n = kt_redis_nodes();
    for (int i = 0; i < n && i < 8; i++) {
        char host[64];
        int port;
        kt_redis_node(i, host, sizeof host, &port);
        snprintf(urls[i], sizeof urls[i], "redis://%s%s%s:%d", auth ? auth : "", auth ? "@" : "", host,
                 port);
        url_ptrs[i] = urls[i];
    }
    return n;
}

static keel_redis *connect_nodes(size_t n, kt_clock *clock)
{
    node_urls(NULL);
    keel_redis *r = NULL;
    keel_redis_opts o = {.nodes = url_ptrs, .nnodes = n, .connect_timeout_ns = 300 * MS,
                         .command_timeout_ns = 300 * MS, .max_fails = 2, .fail_timeout_ns = 5 * KT_S,
                         .clock = clock ? kt_clock_now : NULL, .clock_ud = clock};
    ck_assert_int_eq(keel_redis_create(&r, &o), 0);
    return r;
}

/* A command from a C string's words (no binary data). */
static int cmd(keel_redis *r, const char *key, redisReply **rep, int argc, ...)
{
    const char *argv[16];
    size_t lens[16];
    va_list ap;
    va_start(ap, argc);
    for (int i = 0; i < argc; i++) {
        argv[i] = va_arg(ap, const char *);
        lens[i] = strlen(argv[i]);
    }
    va_end(ap);
    return keel_redis_command(r, key, key ? strlen(key) : 0, argc, argv, lens, rep);
}

static redisContext *direct(int node)
{
    char host[64];
    int port;
    kt_redis_node(node, host, sizeof host, &port);
    redisContext *c = redisConnect(host, port);
    ck_assert(c && !c->err);
    return c;
}

static char logged[256];
static void capture_log(keel_log_level level, const char *module, const char *msg, void *ud)
{
    (void)level, (void)ud;
    snprintf(logged, sizeof logged, "%s: %s", module, msg);
}

START_TEST(binary_keys_and_values_round_trip)
{
    keel_redis *r = connect_nodes(1, NULL);
    const char key[] = "kt:bin\0key\n\"x", val[] = "\0\1\2value with\0nul";
    const char *argv[3] = {"SET", key, val};
    size_t lens[3] = {3, sizeof key - 1, sizeof val - 1};
    redisReply *rep;
    ck_assert_int_eq(keel_redis_command(r, key, sizeof key - 1, 3, argv, lens, &rep), 0);
    ck_assert_int_eq(rep->type, REDIS_REPLY_STATUS);
    freeReplyObject(rep);
    const char *get[2] = {"GET", key};
    size_t getl[2] = {3, sizeof key - 1};
    ck_assert_int_eq(keel_redis_command(r, key, sizeof key - 1, 2, get, getl, &rep), 0);
    ck_assert_int_eq(rep->type, REDIS_REPLY_STRING);
    ck_assert_uint_eq(rep->len, sizeof val - 1);
    ck_assert(memcmp(rep->str, val, sizeof val - 1) == 0);
    freeReplyObject(rep);
    /* an error reply comes back with its text, as KEEL_EBACKEND, and the
     * text goes to the log hook too */
    keel_set_log(capture_log, KEEL_LOG_WARN, NULL);
    ck_assert_int_eq(cmd(r, "kt:x", &rep, 2, "NOSUCHCOMMAND", "x"), KEEL_EBACKEND);
    keel_set_log(NULL, KEEL_LOG_ERROR, NULL);
    ck_assert_ptr_nonnull(rep);
    ck_assert_int_eq(rep->type, REDIS_REPLY_ERROR);
    ck_assert_ptr_nonnull(strstr(rep->str, "unknown command"));
    ck_assert_msg(strstr(logged, "redis: ") == logged && strstr(logged, "unknown command"),
                  "logged: %s", logged);
    freeReplyObject(rep);
    keel_redis_node_stats st;
    ck_assert_int_eq(keel_redis_node_stats_get(r, 0, &st), 0);
    ck_assert_uint_eq(st.commands, 3);
    ck_assert_uint_eq(st.errors, 1);
    ck_assert_uint_eq(st.connects, 1);
    keel_redis_destroy(r);
}
END_TEST

START_TEST(keys_land_on_the_node_the_ring_says)
{
    keel_redis *r = connect_nodes(3, NULL);
    /* The ring redis.h documents, built here on its own: a continuum ring
     * of the nodes' "host:port" names, weight 1 each. */
    keel_ring *ring;
    keel_ring_opts ro = {.algo = KEEL_RING_CONTINUUM};
    ck_assert_int_eq(keel_ring_create(&ring, &ro), 0);
    char names[3][80];
    for (int k = 0; k < 3; k++) {
        char host[64];
        int port;
        kt_redis_node(k, host, sizeof host, &port);
        snprintf(names[k], sizeof names[k], "%s:%d", host, port);
        ck_assert_int_eq(keel_ring_add(ring, names[k], strlen(names[k]), 1, (void *)(uintptr_t)k), 0);
    }
    int per_node[3] = {0};
    for (int i = 0; i < 300; i++) {
        char key[32];
        snprintf(key, sizeof key, "kt:spread:%d", i);
        redisReply *rep;
        ck_assert_int_eq(cmd(r, key, &rep, 3, "SET", key, "1"), 0);
        freeReplyObject(rep);
        keel_ring_node rn;
        ck_assert_int_eq(keel_ring_lookup(ring, key, strlen(key), &rn), 0);
        size_t node = (size_t)(uintptr_t)rn.ud;
        ck_assert_uint_eq(keel_redis_node_of(r, key, strlen(key)), node);
        per_node[node]++;
        /* it is on that node and on no other */
        for (int k = 0; k < 3; k++) {
            redisContext *c = direct(k);
            redisReply *e = redisCommand(c, "EXISTS %s", key);
            ck_assert_int_eq(e->integer, (size_t)k == node);
            freeReplyObject(e);
            redisFree(c);
        }
    }
    for (int k = 0; k < 3; k++)
        ck_assert_int_gt(per_node[k], 50);
    /* a hash tag keeps keys together; spanning nodes needs one */
    const void *together[2] = {"kt:{user:7}:name", "kt:{user:7}:email"};
    size_t tl[2] = {16, 17};
    ck_assert_uint_eq(keel_redis_node_of(r, together[0], tl[0]), keel_redis_node_of(r, together[1], tl[1]));
    const char *mset[5] = {"MSET", together[0], "ann", together[1], "ann@x"};
    size_t ml[5] = {4, tl[0], 3, tl[1], 5};
    redisReply *rep;
    ck_assert_int_eq(keel_redis_command_keys(r, together, tl, 2, 5, mset, ml, &rep), 0);
    freeReplyObject(rep);
    int i = 0;
    char a[32], b[32];
    do { /* two keys on different nodes */
        snprintf(a, sizeof a, "kt:a%d", i);
        snprintf(b, sizeof b, "kt:b%d", i++);
    } while (keel_redis_node_of(r, a, strlen(a)) == keel_redis_node_of(r, b, strlen(b)));
    const void *apart[2] = {a, b};
    size_t al[2] = {strlen(a), strlen(b)};
    ck_assert_int_eq(keel_redis_command_keys(r, apart, al, 2, 5, mset, ml, &rep), KEEL_EINVAL);
    ck_assert_ptr_null(rep);
    keel_ring_destroy(ring);
    keel_redis_destroy(r);
}
END_TEST

START_TEST(pipeline_replies_come_back_in_order)
{
    keel_redis *r = connect_nodes(3, NULL);
    enum { N = 150 };
    keel_redis_cmd cmds[N];
    char keys[N][32], vals[N][16];
    const char *argv[N][3];
    size_t lens[N][3];
    for (int i = 0; i < N; i++) {
        snprintf(keys[i], sizeof keys[i], "kt:pipe:%d", i % 50);
        snprintf(vals[i], sizeof vals[i], "%d", i);
        argv[i][0] = i < 50 ? "DEL" : "INCRBY";
        argv[i][1] = keys[i];
        argv[i][2] = vals[i];
        for (int k = 0; k < 3; k++)
            lens[i][k] = strlen(argv[i][k]);
        cmds[i] = (keel_redis_cmd){keys[i], strlen(keys[i]), i < 50 ? 2 : 3, argv[i], lens[i]};
    }
    ck_assert_int_eq(keel_redis_pipeline(r, cmds, N), 0);
    for (int i = 50; i < N; i++) {
        ck_assert_int_eq(cmds[i].rc, 0);
        ck_assert_int_eq(cmds[i].reply->type, REDIS_REPLY_INTEGER);
        /* key i%50 got i-50... first (if i < 100), then i added to it */
        long long want = i < 100 ? i : i + (i - 50);
        ck_assert_int_eq(cmds[i].reply->integer, want);
    }
    for (int i = 0; i < N; i++)
        freeReplyObject(cmds[i].reply);
    keel_redis_destroy(r);
}
END_TEST

/* A command timeout of UINT64_MAX ("never") is a deadline in the future:
 * once it was added to the clock and wrapped, and every call timed out at
 * once. */
START_TEST(a_command_timeout_of_any_length_does_not_wrap)
{
    node_urls(NULL);
    keel_redis *r = NULL;
    keel_redis_opts o = {.nodes = url_ptrs, .nnodes = 1, .command_timeout_ns = UINT64_MAX};
    ck_assert_int_eq(keel_redis_create(&r, &o), 0);
    redisReply *rep;
    ck_assert_int_eq(cmd(r, "kt:forever", &rep, 3, "SET", "kt:forever", "1"), 0);
    freeReplyObject(rep);
    const char *argv[2] = {"INCR", "kt:forever"};
    size_t lens[2] = {4, 10};
    keel_redis_cmd cmds[2] = {{"kt:forever", 10, 2, argv, lens}, {"kt:forever", 10, 2, argv, lens}};
    ck_assert_int_eq(keel_redis_pipeline(r, cmds, 2), 0);
    ck_assert_int_eq(cmds[1].rc, 0);
    ck_assert_int_eq(cmds[1].reply->integer, 3);
    for (int i = 0; i < 2; i++)
        freeReplyObject(cmds[i].reply);
    keel_redis_destroy(r);
}
END_TEST

/* A pipeline refused for a bad command sends nothing and says so in every
 * command, as it does when out of memory: no rc left at a value that reads
 * as success, no reply pointer left from an earlier use of the array (once
 * both were left as they were, and a caller freeing every non-NULL reply
 * freed a stale one). */
START_TEST(a_refused_pipeline_says_so_in_every_command)
{
    keel_redis *r = connect_nodes(1, NULL);
    const char *ok[2] = {"SET", "kt:refused"}, *bad[2] = {"GET", NULL};
    size_t okl[2] = {3, 10}, badl[2] = {3, 4};
    keel_redis_cmd cmds[2] = {{"kt:refused", 10, 2, ok, okl, 0, (redisReply *)0x1},
                              {"kt:refused", 10, 2, bad, badl, 0, (redisReply *)0x1}};
    ck_assert_int_eq(keel_redis_pipeline(r, cmds, 2), KEEL_EINVAL);
    for (int i = 0; i < 2; i++) {
        ck_assert_int_eq(cmds[i].rc, KEEL_EINVAL);
        ck_assert_ptr_null(cmds[i].reply);
    }
    keel_redis_destroy(r);
}
END_TEST

/* A pooled connection goes from caller to caller: commands that would
 * change it for the next one are refused, and a transaction must end in
 * the pipeline that opens it. With one connection, a MULTI left open once
 * made another caller's GET answer QUEUED, and a SELECT moved later
 * commands to another database. */
START_TEST(commands_that_would_change_a_pooled_connection_are_refused)
{
    node_urls(NULL);
    keel_redis *r = NULL;
    keel_redis_opts o = {.nodes = url_ptrs, .nnodes = 1, .conns_per_node = 1,
                         .connect_timeout_ns = 300 * MS, .command_timeout_ns = 300 * MS};
    ck_assert_int_eq(keel_redis_create(&r, &o), 0);
    redisReply *rep = (redisReply *)0x1;
    static const char *const refused[][3] = {
        {"SELECT", "5"}, {"select", "5"}, {"MULTI"}, {"multi"}, {"WATCH", "kt:tx"},
        {"SUBSCRIBE", "kt:ch"}, {"PSUBSCRIBE", "kt:*"}, {"SSUBSCRIBE", "kt:ch"}, {"MONITOR"},
        {"HELLO", "3"}, {"RESET"}, {"QUIT"}, {"AUTH", "x"}, {"CLIENT", "REPLY", "OFF"},
        {"client", "tracking", "on"}, {"CLIENT", "SETNAME", "kt"}, {"CLIENT", "NO-EVICT", "on"},
        {"CLIENT", "NO-TOUCH", "on"}, {"READONLY"}, {"READWRITE"}};
    for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++) {
        int argc = refused[i][2] ? 3 : refused[i][1] ? 2 : 1;
        size_t lens[3];
        for (int k = 0; k < argc; k++)
            lens[k] = strlen(refused[i][k]);
        ck_assert_msg(keel_redis_command(r, NULL, 0, argc, refused[i], lens, &rep) == KEEL_EINVAL,
                      "%s was not refused", refused[i][0]);
        ck_assert_ptr_null(rep);
    }
    /* CLIENT's harmless subcommands, and a transaction ended in its pipeline */
    ck_assert_int_eq(cmd(r, NULL, &rep, 2, "CLIENT", "ID"), 0);
    freeReplyObject(rep);
    const char *multi[1] = {"MULTI"}, *set[3] = {"SET", "kt:tx", "1"}, *exec[1] = {"EXEC"};
    size_t ml[1] = {5}, sl[3] = {3, 5, 1}, el[1] = {4};
    keel_redis_cmd tx[3] = {{"kt:tx", 5, 1, multi, ml}, {"kt:tx", 5, 3, set, sl}, {"kt:tx", 5, 1, exec, el}};
    ck_assert_int_eq(keel_redis_pipeline(r, tx, 3), 0);
    ck_assert_int_eq(tx[2].reply->type, REDIS_REPLY_ARRAY);
    for (int i = 0; i < 3; i++)
        freeReplyObject(tx[i].reply);
    keel_redis_cmd open_tx[2] = {{"kt:tx", 5, 1, multi, ml}, {"kt:tx", 5, 3, set, sl}};
    ck_assert_int_eq(keel_redis_pipeline(r, open_tx, 2), KEEL_EINVAL);
    ck_assert_int_eq(open_tx[0].rc, KEEL_EINVAL);
    /* the one connection is as it was: the key is read back from db 0 */
    ck_assert_int_eq(cmd(r, "kt:tx", &rep, 2, "GET", "kt:tx"), 0);
    ck_assert_int_eq(rep->type, REDIS_REPLY_STRING);
    ck_assert_str_eq(rep->str, "1");
    freeReplyObject(rep);
    keel_redis_destroy(r);
}
END_TEST

START_TEST(scripts_survive_script_flush_and_a_restart)
{
    keel_redis *r = connect_nodes(3, NULL);
    const char *lua = "return redis.call('INCRBY', KEYS[1], ARGV[1])";
    keel_redis_script *s;
    ck_assert_int_eq(keel_redis_script_create(r, lua, strlen(lua), &s), 0);
    ck_assert_uint_eq(strlen(keel_redis_script_sha(s)), 40);
    const void *key[1] = {"kt:script"};
    size_t kl[1] = {9};
    const char *arg[1] = {"5"};
    size_t argl[1] = {1};
    redisReply *rep;
    ck_assert_int_eq(keel_redis_eval(r, s, 1, key, kl, 1, arg, argl, NULL, 0, &rep), 0);
    long long first = rep->integer;
    freeReplyObject(rep);
    /* SCRIPT FLUSH on the node: the next call loads it again */
    size_t node = keel_redis_node_of(r, key[0], kl[0]);
    redisContext *c = direct((int)node);
    freeReplyObject(redisCommand(c, "SCRIPT FLUSH"));
    redisFree(c);
    ck_assert_int_eq(keel_redis_eval(r, s, 1, key, kl, 1, arg, argl, NULL, 0, &rep), 0);
    ck_assert_int_eq(rep->integer, first + 5);
    freeReplyObject(rep);
    /* a restart: the pooled connection is dead and the script forgotten */
    char name[16];
    snprintf(name, sizeof name, "redis%zu", node + 1);
    kt_server("stop-one", name);
    kt_server("start-one", name);
    int rc;
    for (int tries = 0; (rc = keel_redis_eval(r, s, 1, key, kl, 1, arg, argl, NULL, 0, &rep)) != 0 &&
                        tries < 3; tries++)
        ; /* the dead pooled connection fails once, then a new one works */
    ck_assert_int_eq(rc, 0);
    ck_assert_int_eq(rep->integer, 5); /* a fresh server: no data */
    freeReplyObject(rep);
    keel_redis_script_free(s);
    keel_redis_destroy(r);
}
END_TEST

START_TEST(auth_with_a_password_and_with_a_user)
{
    redisContext *c = direct(2);
    freeReplyObject(redisCommand(c, "ACL SETUSER kt-user on >kt-secret ~* &* +@all"));
    freeReplyObject(redisCommand(c, "CONFIG SET requirepass kt-pass"));
    redisFree(c);
    const char *auths[] = {":kt-pass", "kt-user:kt-secret", ":wrong"};
    for (int i = 0; i < 3; i++) {
        node_urls(auths[i]);
        keel_redis *r;
        keel_redis_opts o = {.nodes = &url_ptrs[2], .nnodes = 1, .command_timeout_ns = 500 * MS};
        ck_assert_int_eq(keel_redis_create(&r, &o), 0);
        redisReply *rep = NULL;
        logged[0] = '\0';
        keel_set_log(capture_log, KEEL_LOG_ERROR, NULL);
        int rc = cmd(r, "k", &rep, 1, "PING");
        keel_set_log(NULL, KEEL_LOG_ERROR, NULL);
        if (i < 2) {
            ck_assert_int_eq(rc, 0);
            ck_assert_str_eq(rep->str, "PONG");
            freeReplyObject(rep);
        } else { /* a refused AUTH: the node is unusable, the server says why */
            ck_assert_int_eq(rc, KEEL_EUNAVAIL);
            ck_assert_ptr_null(rep);
            ck_assert_msg(strstr(logged, "AUTH") && strstr(logged, "WRONGPASS"), "logged: %s", logged);
        }
        keel_redis_destroy(r);
    }
    c = direct(2);
    freeReplyObject(redisCommand(c, "AUTH kt-pass"));
    freeReplyObject(redisCommand(c, "CONFIG SET requirepass %s", ""));
    freeReplyObject(redisCommand(c, "ACL DELUSER kt-user"));
    redisFree(c);
}
END_TEST

START_TEST(a_stopped_node_fails_fast_while_the_others_serve)
{
    kt_clock clk = {0};
    kt_clock_advance(&clk, 1000 * KT_S);
    keel_redis *r = connect_nodes(3, &clk);
    char on1[32] = "", on0[32] = "";
    for (int i = 0; !on1[0] || !on0[0]; i++) {
        char k[32];
        snprintf(k, sizeof k, "kt:f%d", i);
        size_t n = keel_redis_node_of(r, k, strlen(k));
        if (n == 1 && !on1[0])
            strcpy(on1, k);
        if (n == 0 && !on0[0])
            strcpy(on0, k);
    }
    redisReply *rep;
    ck_assert_int_eq(cmd(r, on1, &rep, 3, "SET", on1, "v"), 0);
    freeReplyObject(rep);
    kt_server("stop-one", "redis2");
    for (int i = 0; i < 4; i++) {
        uint64_t t0 = keel_now_ns();
        int rc = cmd(r, on1, &rep, 2, "GET", on1);
        ck_assert_int_eq(rc, KEEL_EUNAVAIL);
        ck_assert_ptr_null(rep);
        ck_assert_uint_lt(keel_now_ns() - t0, 700 * MS); /* within the timeouts */
        ck_assert_int_eq(cmd(r, on0, &rep, 2, "PING", "x"), 0); /* the others serve */
        freeReplyObject(rep);
    }
    keel_redis_node_stats st;
    keel_redis_node_stats_get(r, 1, &st);
    ck_assert_int_eq(st.skipped, 1);
    /* a pipeline over both nodes: the live one answers, the other fails */
    const char *g1[2] = {"GET", on1}, *g0[2] = {"GET", on0};
    size_t l1[2] = {3, strlen(on1)}, l0[2] = {3, strlen(on0)};
    keel_redis_cmd both[2] = {{on1, l1[1], 2, g1, l1, 0, NULL}, {on0, l0[1], 2, g0, l0, 0, NULL}};
    ck_assert_int_eq(keel_redis_pipeline(r, both, 2), KEEL_EUNAVAIL);
    ck_assert_int_eq(both[0].rc, KEEL_EUNAVAIL);
    ck_assert_ptr_null(both[0].reply);
    ck_assert_int_eq(both[1].rc, 0);
    freeReplyObject(both[1].reply);
    kt_server("start-one", "redis2");
    ck_assert_int_eq(cmd(r, on1, &rep, 2, "PING", "x"), KEEL_EUNAVAIL); /* still skipped */
    kt_clock_advance(&clk, 6 * KT_S); /* fail_timeout: the probe goes through */
    ck_assert_int_eq(cmd(r, on1, &rep, 2, "PING", "x"), 0);
    freeReplyObject(rep);
    keel_redis_node_stats_get(r, 1, &st);
    ck_assert_int_eq(st.skipped, 0);
    keel_redis_destroy(r);
}
END_TEST

static uint32_t fails_of(keel_redis *r)
{
    keel_redis_node_stats st;
    ck_assert_int_eq(keel_redis_node_stats_get(r, 0, &st), 0);
    return st.fails;
}

START_TEST(a_node_that_stays_down_is_probed_ever_less_often)
{
    const uint64_t T = KT_S, CAP = 8 * KT_S; /* fail_timeout, reconnect_max */
    kt_clock clk = {0};
    kt_clock_advance(&clk, 1000 * KT_S);
    node_urls(NULL);
    keel_redis *r;
    keel_redis_opts o = {.nodes = url_ptrs, .nnodes = 1, .connect_timeout_ns = 300 * MS,
                         .command_timeout_ns = 300 * MS, .max_fails = 2, .fail_timeout_ns = T,
                         .reconnect_max_ns = CAP, .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_redis_create(&r, &o), 0);
    redisReply *rep;
    kt_server("stop-one", "redis1");
    ck_assert_int_eq(cmd(r, "k", &rep, 2, "PING", "x"), KEEL_EUNAVAIL);
    ck_assert_int_eq(cmd(r, "k", &rep, 2, "PING", "x"), KEEL_EUNAVAIL);
    ck_assert_uint_eq(fails_of(r), 2); /* skipped for T, then the probes */
    uint64_t waited = 0;
    for (uint32_t probe = 0; probe < 6; probe++) {
        /* after `probe` failed probes the wait is e/2 + U(0, e/2), e the
         * doubled fail_timeout under the cap */
        uint64_t e = T << probe < CAP ? T << probe : CAP, lo = e / 2;
        kt_clock_advance(&clk, lo - 1);
        ck_assert_int_eq(cmd(r, "k", &rep, 2, "PING", "x"), KEEL_EUNAVAIL);
        ck_assert_uint_eq(fails_of(r), 2 + probe); /* too early: no probe */
        kt_clock_advance(&clk, e - (lo - 1));
        ck_assert_int_eq(cmd(r, "k", &rep, 2, "PING", "x"), KEEL_EUNAVAIL);
        ck_assert_uint_eq(fails_of(r), 3 + probe); /* by the wait's end: one probe */
        waited += e;
    }
    ck_assert_uint_gt(waited, 6 * T); /* a probe a fail_timeout would be 6 */
    kt_server("start-one", "redis1");
    kt_clock_advance(&clk, CAP);
    ck_assert_int_eq(cmd(r, "k", &rep, 2, "PING", "x"), 0);
    freeReplyObject(rep);
    ck_assert_uint_eq(fails_of(r), 0);
    keel_redis_destroy(r);
}
END_TEST

static void *ping_once(void *arg)
{
    redisReply *rep = NULL;
    intptr_t rc = cmd(arg, "k", &rep, 1, "PING");
    freeReplyObject(rep);
    return (void *)rc;
}

START_TEST(a_probe_in_flight_leaves_the_node_skipped_for_the_others)
{
    kt_clock clk = {0};
    kt_clock_advance(&clk, 1000 * KT_S);
    node_urls(NULL);
    keel_redis *r;
    keel_redis_opts o = {.nodes = &url_ptrs[2], .nnodes = 1, .connect_timeout_ns = 300 * MS,
                         .command_timeout_ns = 300 * MS, .max_fails = 1, .fail_timeout_ns = 5 * KT_S,
                         .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_redis_create(&r, &o), 0);
    redisReply *rep;
    ck_assert_int_eq(cmd(r, "k", &rep, 1, "PING"), 0);
    freeReplyObject(rep);
    kt_server("pause-one", "redis3");
    ck_assert_int_eq(cmd(r, "k", &rep, 1, "PING"), KEEL_ETIMEDOUT); /* skipped from here */
    ck_assert_int_eq(cmd(r, "k", &rep, 1, "PING"), KEEL_EUNAVAIL);
    kt_clock_advance(&clk, 6 * KT_S);
    pthread_t t;
    pthread_create(&t, NULL, ping_once, r); /* the probe: connects, then waits */
    keel_redis_node_stats st;
    for (int i = 0; i < 2000; i++) {
        keel_redis_node_stats_get(r, 0, &st);
        if (st.connects == 2)
            break;
        kt_nap(MS);
    }
    ck_assert_uint_eq(st.connects, 2);
    /* while the probe waits for its answer, the node stays skipped */
    ck_assert_int_eq(cmd(r, "k", &rep, 1, "PING"), KEEL_EUNAVAIL);
    void *probe_rc;
    pthread_join(t, &probe_rc);
    kt_server("resume-one", "redis3");
    ck_assert_int_eq((intptr_t)probe_rc, KEEL_ETIMEDOUT);
    keel_redis_node_stats_get(r, 0, &st);
    ck_assert_uint_eq(st.fails, 2);    /* the first timeout and the probe's, no third */
    ck_assert_uint_eq(st.timeouts, 2);
    ck_assert_int_eq(st.skipped, 1);
    ck_assert_int_eq(cmd(r, "k", &rep, 1, "PING"), KEEL_EUNAVAIL); /* a new fail_timeout */
    kt_clock_advance(&clk, 6 * KT_S);
    ck_assert_int_eq(cmd(r, "k", &rep, 1, "PING"), 0);
    freeReplyObject(rep);
    keel_redis_node_stats_get(r, 0, &st);
    ck_assert_int_eq(st.skipped, 0);
    ck_assert_uint_eq(st.fails, 0);
    keel_redis_destroy(r);
}
END_TEST

START_TEST(a_server_that_never_answers_times_out)
{
    keel_redis *r = connect_nodes(3, NULL);
    char k[32];
    for (int i = 0;; i++) {
        snprintf(k, sizeof k, "kt:t%d", i);
        if (keel_redis_node_of(r, k, strlen(k)) == 2)
            break;
    }
    redisReply *rep;
    ck_assert_int_eq(cmd(r, k, &rep, 1, "PING"), 0); /* a pooled connection */
    freeReplyObject(rep);
    kt_server("pause-one", "redis3");
    uint64_t t0 = keel_now_ns();
    int rc = cmd(r, k, &rep, 1, "PING");
    uint64_t took = keel_now_ns() - t0;
    kt_server("resume-one", "redis3");
    ck_assert_int_eq(rc, KEEL_ETIMEDOUT);
    ck_assert_uint_ge(took, 250 * MS);
    ck_assert_uint_lt(took, 1000 * MS);
    keel_redis_destroy(r);
}
END_TEST

typedef struct inbox {
    pthread_mutex_t mu;
    char last[64]; /* the bytes of the last message (and a NUL) */
    size_t last_len;
    int messages, reconnects, disconnects;
    char last_pattern[32];
    char events[16]; /* 'D' for each on_disconnect, 'R' for each on_reconnect */
} inbox;

static void got(const char *ch, size_t chlen, const char *msg, size_t len, const char *pattern, void *ud)
{
    (void)ch;
    (void)chlen;
    inbox *in = ud;
    pthread_mutex_lock(&in->mu);
    in->last_len = len < sizeof in->last ? len : sizeof in->last - 1;
    memcpy(in->last, msg, in->last_len);
    in->last[in->last_len] = '\0';
    snprintf(in->last_pattern, sizeof in->last_pattern, "%s", pattern ? pattern : "");
    in->messages++;
    pthread_mutex_unlock(&in->mu);
}

static void note_event(inbox *in, char e)
{
    size_t n = strlen(in->events);
    if (n + 1 < sizeof in->events)
        in->events[n] = e;
}

static void reconnected(void *ud)
{
    inbox *in = ud;
    pthread_mutex_lock(&in->mu);
    in->reconnects++;
    note_event(in, 'R');
    pthread_mutex_unlock(&in->mu);
}

static void disconnected(void *ud)
{
    inbox *in = ud;
    pthread_mutex_lock(&in->mu);
    in->disconnects++;
    note_event(in, 'D');
    pthread_mutex_unlock(&in->mu);
}

/* Waits until *count (under in->mu) reaches want or `ns` of real time
 * passes; returns the count. Asserts nothing, so that a caller may first
 * undo a fault it made. */
static int wait_count(inbox *in, const int *count, int want, uint64_t ns)
{
    uint64_t deadline = keel_now_ns() + ns;
    for (;;) {
        pthread_mutex_lock(&in->mu);
        int n = *count;
        pthread_mutex_unlock(&in->mu);
        if (n >= want || keel_now_ns() >= deadline)
            return n;
        kt_nap(5 * MS);
    }
}

/* Publishes until the listener has seen `want` messages (a real wait on a
 * real server, bounded by 10 s). */
static void publish_until(keel_redis *r, inbox *in, const char *channel, const char *msg, size_t len, int want)
{
    uint64_t deadline = keel_now_ns() + 10 * KT_S;
    for (;;) {
        pthread_mutex_lock(&in->mu);
        int n = in->messages;
        pthread_mutex_unlock(&in->mu);
        if (n >= want)
            return;
        ck_assert_msg(keel_now_ns() < deadline, "no message on %s after 10 s", channel);
        redisReply *rep;
        const char *argv[] = {"PUBLISH", channel, msg};
        size_t lens[] = {7, strlen(channel), len};
        if (keel_redis_command(r, NULL, 0, 3, argv, lens, &rep) == 0)
            freeReplyObject(rep);
        struct timespec ts = {0, 20 * 1000000};
        nanosleep(&ts, NULL);
    }
}

START_TEST(the_listener_reconnects_and_says_so)
{
    keel_redis *r = connect_nodes(1, NULL);
    inbox in = {PTHREAD_MUTEX_INITIALIZER};
    keel_redis_sub *s;
    keel_redis_sub_opts so = {.channels = (const char *[]){"kt:events"}, .nchannels = 1,
                              .patterns = (const char *[]){"kt:p.*"}, .npatterns = 1,
                              .on_message = got, .on_reconnect = reconnected, .ud = &in,
                              .heartbeat_ns = 200 * MS, .reconnect_min_ns = 20 * MS,
                              .reconnect_max_ns = 200 * MS};
    ck_assert_int_eq(keel_redis_subscribe(r, &so, &s), 0);
    publish_until(r, &in, "kt:events", "hello\0binary", 12, 1); /* binary-safe */
    ck_assert_uint_eq(in.last_len, 12);
    ck_assert_mem_eq(in.last, "hello\0binary", 12);
    publish_until(r, &in, "kt:p.x", "patterned", 9, 2);
    ck_assert_str_eq(in.last_pattern, "kt:p.*");
    kt_server("stop-one", "redis1");
    kt_server("start-one", "redis1");
    uint64_t deadline = keel_now_ns() + 10 * KT_S;
    for (;;) {
        pthread_mutex_lock(&in.mu);
        int rec = in.reconnects;
        pthread_mutex_unlock(&in.mu);
        if (rec)
            break;
        ck_assert_msg(keel_now_ns() < deadline, "no reconnect after 10 s");
        struct timespec ts = {0, 20 * 1000000};
        nanosleep(&ts, NULL);
    }
    int before = in.messages;
    publish_until(r, &in, "kt:events", "after", 5, before + 1);
    ck_assert_str_eq(in.last, "after");
    keel_redis_unsubscribe(s);
    keel_redis_destroy(r);
}
END_TEST

/* A server that goes silent (frozen: it accepts, never answers) sends no
 * error and closes nothing: only the heartbeat notices. The listener PINGs
 * after heartbeat_ns of silence, gives up after the command timeout, says
 * so, and once the server answers again subscribes anew and says that.
 * In a tcase of its own, whose teardown (in Check's parent process)
 * resumes the server even when this test dies while it is frozen. */
START_TEST(a_silent_server_is_noticed_by_the_heartbeat)
{
    node_urls(NULL);
    keel_redis *r;
    keel_redis_opts o = {.nodes = &url_ptrs[1], .nnodes = 1, .connect_timeout_ns = 300 * MS,
                         .command_timeout_ns = 300 * MS, .fail_timeout_ns = 1};
    ck_assert_int_eq(keel_redis_create(&r, &o), 0);
    inbox in = {PTHREAD_MUTEX_INITIALIZER};
    keel_redis_sub *s;
    keel_redis_sub_opts so = {.channels = (const char *[]){"kt:hb"}, .nchannels = 1, .on_message = got,
                              .on_reconnect = reconnected, .on_disconnect = disconnected, .ud = &in,
                              .heartbeat_ns = 200 * MS, .reconnect_min_ns = 20 * MS,
                              .reconnect_max_ns = 100 * MS};
    ck_assert_int_eq(keel_redis_subscribe(r, &so, &s), 0);
    publish_until(r, &in, "kt:hb", "before", 6, 1);
    kt_nap(500 * MS); /* a few heartbeats, all answered */
    pthread_mutex_lock(&in.mu);
    ck_assert_str_eq(in.events, "");
    pthread_mutex_unlock(&in.mu);

    kt_server("pause-one", "redis2");
    uint64_t t0 = keel_now_ns();
    int down = wait_count(&in, &in.disconnects, 1, 3 * KT_S);
    uint64_t took = keel_now_ns() - t0;
    kt_nap(600 * MS); /* frozen on: its attempts to subscribe again fail quietly */
    pthread_mutex_lock(&in.mu);
    char frozen[sizeof in.events];
    memcpy(frozen, in.events, sizeof frozen);
    pthread_mutex_unlock(&in.mu);
    kt_server("resume-one", "redis2");
    ck_assert_msg(down == 1, "no on_disconnect within 3 s of the server freezing");
    ck_assert_msg(took < 2 * KT_S, "on_disconnect after %llu ms", (unsigned long long)(took / MS));
    ck_assert_str_eq(frozen, "D");

    ck_assert_msg(wait_count(&in, &in.reconnects, 1, 5 * KT_S) == 1,
                  "no on_reconnect within 5 s of the server resuming");
    publish_until(r, &in, "kt:hb", "after", 5, 2); /* subscribed again */
    pthread_mutex_lock(&in.mu);
    ck_assert_str_eq(in.last, "after");
    ck_assert_str_eq(in.events, "DR");
    pthread_mutex_unlock(&in.mu);
    keel_redis_unsubscribe(s);
    pthread_mutex_lock(&in.mu);
    ck_assert_str_eq(in.events, "DR"); /* not on unsubscribe */
    pthread_mutex_unlock(&in.mu);
    keel_redis_destroy(r);
}
END_TEST

static void resume_redis2(void) { kt_server("resume-one", "redis2"); }

typedef struct hammer {
    atomic_bool stop;
    atomic_int sent;
} hammer;

/* Publishes to kt:hot as fast as one connection can, until told to stop. */
static void *publish_hard(void *arg)
{
    hammer *h = arg;
    redisContext *c = direct(0);
    while (!atomic_load(&h->stop)) {
        for (int i = 0; i < 50; i++)
            redisAppendCommand(c, "PUBLISH kt:hot x");
        for (int i = 0; i < 50; i++) {
            void *rep;
            ck_assert_int_eq(redisGetReply(c, &rep), REDIS_OK);
            freeReplyObject(rep);
        }
        atomic_fetch_add(&h->sent, 50);
    }
    redisFree(c);
    return NULL;
}

static void count_only(const char *ch, size_t chlen, const char *msg, size_t len, const char *pattern, void *ud)
{
    (void)ch, (void)chlen, (void)msg, (void)len, (void)pattern;
    atomic_fetch_add((atomic_int *)ud, 1);
}

/* A message may come between the confirmations of SUBSCRIBE and those of
 * PSUBSCRIBE (Redis runs the second only once it has read all of it, and
 * serves other clients meanwhile): it is a message, delivered, not a
 * refusal of the subscription (once KEEL_EBACKEND, and the message lost). */
START_TEST(a_message_among_the_confirmations_is_delivered)
{
    /* a server matching every publish against 5000 patterns may take a
     * while to confirm them on a busy machine: more than connect_nodes()'s
     * 300 ms */
    node_urls(NULL);
    keel_redis *r;
    keel_redis_opts o = {.nodes = url_ptrs, .nnodes = 1, .command_timeout_ns = 10 * KT_S};
    ck_assert_int_eq(keel_redis_create(&r, &o), 0);
    enum { NPAT = 5000 };
    static char pats[NPAT][48];
    static const char *pat_ptrs[NPAT];
    for (int i = 0; i < NPAT; i++) {
        snprintf(pats[i], sizeof pats[i], "kt:padding-pattern-that-never-matches:%d", i);
        pat_ptrs[i] = pats[i];
    }
    hammer h = {0};
    pthread_t t;
    pthread_create(&t, NULL, publish_hard, &h);
    while (atomic_load(&h.sent) < 500)
        kt_nap(MS);
    atomic_int got_msgs = 0;
    for (int i = 0; i < 20; i++) {
        keel_redis_sub *s;
        keel_redis_sub_opts so = {.channels = (const char *[]){"kt:hot"}, .nchannels = 1,
                                  .patterns = pat_ptrs, .npatterns = NPAT, .on_message = count_only,
                                  .ud = &got_msgs};
        int rc = keel_redis_subscribe(r, &so, &s);
        ck_assert_msg(rc == 0, "subscription %d: %s", i, keel_strerror(rc));
        keel_redis_unsubscribe(s);
    }
    atomic_store(&h.stop, true);
    pthread_join(t, NULL);
    ck_assert_int_gt(atomic_load(&got_msgs), 0);
    keel_redis_destroy(r);
}
END_TEST

static void *flush_scripts(void *arg)
{
    hammer *h = arg;
    redisContext *c = direct(0);
    while (!atomic_load(&h->stop)) {
        freeReplyObject(redisCommand(c, "SCRIPT FLUSH"));
        atomic_fetch_add(&h->sent, 1);
    }
    redisFree(c);
    return NULL;
}

/* A SCRIPT FLUSH can come between the reload and the retry: the retry
 * must not answer NOSCRIPT (it did for about half the calls while
 * another client flushed in a loop), since callers never see NOSCRIPT. */
/* A handler that unsubscribes its own listener: the handle it was given
 * through ud is freed by the listener once the handler returns. */
typedef struct self_stop {
    keel_redis_sub *s;
    atomic_int calls;
} self_stop;

static void stop_myself(const char *ch, size_t chlen, const char *msg, size_t len, const char *pattern, void *ud)
{
    (void)ch, (void)chlen, (void)msg, (void)len, (void)pattern;
    self_stop *st = ud;
    if (atomic_fetch_add(&st->calls, 1) == 0)
        keel_redis_unsubscribe(st->s);
}

START_TEST(a_handler_may_unsubscribe_its_own_listener)
{
    keel_redis *r = connect_nodes(1, NULL);
    self_stop st = {0};
    keel_redis_sub_opts so = {.channels = (const char *[]){"kt:self"}, .nchannels = 1,
                              .on_message = stop_myself, .ud = &st};
    ck_assert_int_eq(keel_redis_subscribe(r, &so, &st.s), 0);
    redisContext *c = direct(0);
    for (int i = 0; i < 3; i++) /* one round trip: all three are in flight together */
        redisAppendCommand(c, "PUBLISH kt:self m%d", i);
    for (int i = 0; i < 3; i++) {
        redisReply *rep;
        ck_assert_int_eq(redisGetReply(c, (void **)&rep), REDIS_OK);
        freeReplyObject(rep);
    }
    for (int i = 0; i < 500 && atomic_load(&st.calls) == 0; i++)
        kt_nap(10 * MS);
    /* the listener has gone: nobody hears the channel any more */
    redisReply *n = NULL;
    for (int i = 0; i < 500; i++) {
        n = redisCommand(c, "PUBSUB NUMSUB kt:self");
        ck_assert_ptr_nonnull(n);
        if (n->element[1]->integer == 0)
            break;
        freeReplyObject(n);
        n = NULL;
        kt_nap(10 * MS);
    }
    ck_assert_ptr_nonnull(n);
    freeReplyObject(n);
    ck_assert_int_eq(atomic_load(&st.calls), 1);
    redisFree(c);
    keel_redis_destroy(r);
}
END_TEST

/* A stand-in server for one listener, on a loopback port of its own: it
 * confirms the first connection's subscriptions, closes it when told, and
 * answers the second one with two messages between the confirmations of
 * SUBSCRIBE and of PSUBSCRIBE, as Redis can when other clients publish
 * meanwhile. */
typedef struct fake_pubsub {
    int lfd, port;
    atomic_bool close_first, second_gone;
} fake_pubsub;

static void send_all(int fd, const char *s)
{
    size_t n = strlen(s);
    ck_assert_int_eq(write(fd, s, n), (ssize_t)n);
}

static void *fake_pubsub_serve(void *arg)
{
    fake_pubsub *f = arg;
    static const char sub[] = "*3\r\n$9\r\nsubscribe\r\n$5\r\nkt:ch\r\n:1\r\n",
                      psub[] = "*3\r\n$10\r\npsubscribe\r\n$4\r\nkt:*\r\n:2\r\n",
                      msg[] = "*3\r\n$7\r\nmessage\r\n$5\r\nkt:ch\r\n$1\r\nm\r\n";
    char buf[512];
    int c1 = accept(f->lfd, NULL, NULL);
    ck_assert_int_ge(c1, 0);
    ck_assert_int_gt(read(c1, buf, sizeof buf), 0);
    send_all(c1, sub);
    send_all(c1, psub);
    while (!atomic_load(&f->close_first))
        kt_nap(MS);
    close(c1); /* the listener reconnects */
    int c2 = accept(f->lfd, NULL, NULL);
    ck_assert_int_ge(c2, 0);
    ck_assert_int_gt(read(c2, buf, sizeof buf), 0);
    send_all(c2, sub);
    send_all(c2, msg);
    send_all(c2, msg);
    send_all(c2, psub);
    while (read(c2, buf, sizeof buf) > 0) /* until the listener hangs up */
        ;
    close(c2);
    atomic_store(&f->second_gone, true);
    return NULL;
}

/* A handler that unsubscribes its listener while it subscribes again after
 * a reconnect: no message is delivered after that one (the rest of the
 * confirmations were once read with their messages still delivered). */
START_TEST(a_handler_unsubscribing_during_a_resubscription_is_the_last_one)
{
    fake_pubsub f = {.lfd = socket(AF_INET, SOCK_STREAM, 0)};
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t salen = sizeof sa;
    ck_assert_int_eq(bind(f.lfd, (struct sockaddr *)&sa, sizeof sa), 0);
    ck_assert_int_eq(listen(f.lfd, 4), 0);
    ck_assert_int_eq(getsockname(f.lfd, (struct sockaddr *)&sa, &salen), 0);
    char url[64];
    snprintf(url, sizeof url, "redis://127.0.0.1:%d", ntohs(sa.sin_port));
    const char *u[1] = {url};
    keel_redis *r;
    keel_redis_opts o = {.nodes = u, .nnodes = 1, .command_timeout_ns = 2 * KT_S};
    ck_assert_int_eq(keel_redis_create(&r, &o), 0);
    pthread_t t;
    pthread_create(&t, NULL, fake_pubsub_serve, &f);
    self_stop st = {0};
    keel_redis_sub_opts so = {.channels = (const char *[]){"kt:ch"}, .nchannels = 1,
                              .patterns = (const char *[]){"kt:*"}, .npatterns = 1,
                              .on_message = stop_myself, .ud = &st, .heartbeat_ns = 10 * KT_S,
                              .reconnect_min_ns = MS, .reconnect_max_ns = MS};
    ck_assert_int_eq(keel_redis_subscribe(r, &so, &st.s), 0);
    atomic_store(&f.close_first, true);
    for (int i = 0; i < 1000 && !atomic_load(&f.second_gone); i++)
        kt_nap(10 * MS);
    ck_assert(atomic_load(&f.second_gone));
    pthread_join(t, NULL);
    close(f.lfd);
    int calls = atomic_load(&st.calls);
    ck_assert_int_eq(calls, 1);
    keel_redis_destroy(r);
}
END_TEST

/* Only the server's own NOSCRIPT means the script is not loaded: a script
 * that itself fails with an error starting so ran, and runs once. */
START_TEST(a_script_failing_with_its_own_noscript_error_runs_once)
{
    keel_redis *r = connect_nodes(1, NULL);
    const char *lua = "redis.call('INCR', KEYS[1]) return redis.error_reply('NOSCRIPT mine')";
    keel_redis_script *s;
    ck_assert_int_eq(keel_redis_script_create(r, lua, strlen(lua), &s), 0);
    const void *key[1] = {"kt:noscript"};
    size_t kl[1] = {11};
    redisReply *rep;
    ck_assert_int_eq(cmd(r, "kt:noscript", &rep, 2, "DEL", "kt:noscript"), 0);
    freeReplyObject(rep);
    for (int i = 0; i < 2; i++) { /* the first call may load it */
        ck_assert_int_eq(keel_redis_eval(r, s, 1, key, kl, 0, NULL, NULL, NULL, 0, &rep), KEEL_EBACKEND);
        ck_assert_str_eq(rep->str, "NOSCRIPT mine");
        freeReplyObject(rep);
    }
    ck_assert_int_eq(cmd(r, "kt:noscript", &rep, 2, "GET", "kt:noscript"), 0);
    ck_assert_str_eq(rep->str, "2");
    freeReplyObject(rep);
    keel_redis_script_free(s);
    keel_redis_destroy(r);
}
END_TEST

START_TEST(a_script_flushed_between_load_and_retry_still_runs)
{
    keel_redis *r = connect_nodes(1, NULL);
    const char *lua = "return 7";
    keel_redis_script *s;
    ck_assert_int_eq(keel_redis_script_create(r, lua, strlen(lua), &s), 0);
    hammer h = {0};
    pthread_t t;
    pthread_create(&t, NULL, flush_scripts, &h);
    while (atomic_load(&h.sent) < 10)
        kt_nap(MS);
    for (int i = 0; i < 2000; i++) {
        redisReply *rep;
        int rc = keel_redis_eval(r, s, 0, NULL, NULL, 0, NULL, NULL, NULL, 0, &rep);
        ck_assert_msg(rc == 0, "call %d: %s: %s", i, keel_strerror(rc), rep ? rep->str : "no reply");
        ck_assert_int_eq(rep->integer, 7);
        freeReplyObject(rep);
    }
    atomic_store(&h.stop, true);
    pthread_join(t, NULL);
    keel_redis_script_free(s);
    keel_redis_destroy(r);
}
END_TEST

/* hiredis writes with write(2). Blocking hiredis rarely gets as far as a
 * second write on a reset socket, but when it does the kernel raises
 * SIGPIPE: the guard around every write must swallow ours and leave the
 * program's own alone. A socket pair whose other end is closed raises it
 * on the first write. */
START_TEST(the_write_guard_swallows_our_sigpipe_and_keeps_the_programs)
{
    signal(SIGPIPE, SIG_DFL); /* the default: death, if one gets through */
    int sv[2];
    ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    close(sv[1]);
    redisContext *c = redisConnectFd(sv[0]);
    ck_assert_ptr_nonnull(c);
    keel__sigpipe g;
    keel__sigpipe_block(&g);
    ck_assert_ptr_null(redisCommand(c, "PING")); /* EPIPE, and SIGPIPE pending */
    ck_assert_int_eq(c->err, REDIS_ERR_IO);
    keel__sigpipe_restore(&g, c);
    sigset_t pending;
    sigpending(&pending);
    ck_assert(!sigismember(&pending, SIGPIPE)); /* ours was consumed */
    /* one the program raised itself, while it blocks SIGPIPE, stays */
    sigset_t pipe;
    sigemptyset(&pipe);
    sigaddset(&pipe, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe, NULL);
    raise(SIGPIPE);
    keel__sigpipe_block(&g);
    ck_assert_ptr_null(redisCommand(c, "PING"));
    keel__sigpipe_restore(&g, c);
    sigpending(&pending);
    ck_assert(sigismember(&pending, SIGPIPE));
    struct timespec zero = {0, 0};
    sigtimedwait(&pipe, NULL, &zero);
    /* while the thread blocks it with none pending, ours is still consumed */
    keel__sigpipe_block(&g);
    ck_assert_ptr_null(redisCommand(c, "PING"));
    keel__sigpipe_restore(&g, c);
    sigpending(&pending);
    ck_assert(!sigismember(&pending, SIGPIPE));
    pthread_sigmask(SIG_UNBLOCK, &pipe, NULL);
    redisFree(c); /* closes sv[0] */
}
END_TEST

typedef struct warm_job {
    keel_redis *r;
    pthread_barrier_t *b;
} warm_job;

/* Holds a connection while the others are taken, so the pool opens four. */
static void *hold_one(void *arg)
{
    warm_job *j = arg;
    redisReply *rep;
    pthread_barrier_wait(j->b);
    ck_assert_int_eq(cmd(j->r, "k", &rep, 3, "BLPOP", "kt:nothing", "0.05"), 0);
    freeReplyObject(rep);
    return NULL;
}

START_TEST(a_restarted_server_is_survived)
{
    signal(SIGPIPE, SIG_DFL);
    kt_clock clk = {0};
    kt_clock_advance(&clk, 1000 * KT_S);
    node_urls(NULL);
    keel_redis *r;
    keel_redis_opts o = {.nodes = url_ptrs, .nnodes = 1, .command_timeout_ns = 300 * MS,
                         .max_fails = 1, .fail_timeout_ns = 10 * KT_S, .clock = kt_clock_now,
                         .clock_ud = &clk};
    ck_assert_int_eq(keel_redis_create(&r, &o), 0);
    pthread_barrier_t b;
    pthread_barrier_init(&b, NULL, 4);
    pthread_t t[4];
    warm_job j = {r, &b};
    for (int i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, hold_one, &j);
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    pthread_barrier_destroy(&b);
    keel_redis_node_stats st;
    keel_redis_node_stats_get(r, 0, &st);
    ck_assert_uint_eq(st.connects, 4);

    kt_server("stop-one", "redis1");
    kt_server("start-one", "redis1");
    redisReply *rep;
    /* the server closed the four on its way down: none is taken, the first
     * call connects afresh, and the node was never failed (max_fails 1,
     * and the clock stands still: a skip would last) */
    for (int i = 0; i < 10; i++) {
        ck_assert_int_eq(cmd(r, "k", &rep, 1, "PING"), 0);
        freeReplyObject(rep);
    }
    keel_redis_node_stats_get(r, 0, &st);
    ck_assert_uint_eq(st.unavailable, 0);
    ck_assert_uint_eq(st.connects, 5);
    keel_redis_destroy(r);
}
END_TEST

/* Normal clients connected to a node, seen from a raw context (itself
 * included). */
static long long clients_on(redisContext *c)
{
    redisReply *rep = redisCommand(c, "CLIENT LIST TYPE normal");
    ck_assert(rep && rep->type == REDIS_REPLY_STRING);
    long long n = 0;
    for (const char *p = rep->str; (p = strchr(p, '\n')) != NULL; p++)
        n++;
    freeReplyObject(rep);
    return n;
}

/* A server closes idle clients (its `timeout`, CLIENT KILL, a NAT that
 * forgets the link): the pool must not hand out a socket the server closed
 * and count the node failed for it, nor call a write unavailable that
 * never ran. */
START_TEST(idle_connections_the_server_closed_are_not_failures)
{
    node_urls(NULL);
    keel_redis *r;
    keel_redis_opts o = {.nodes = url_ptrs, .nnodes = 1, .command_timeout_ns = 300 * MS,
                         .max_fails = 1};
    ck_assert_int_eq(keel_redis_create(&r, &o), 0);
    redisReply *rep;
    pthread_barrier_t b;
    pthread_barrier_init(&b, NULL, 4);
    pthread_t t[4];
    warm_job j = {r, &b};
    for (int i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, hold_one, &j);
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    pthread_barrier_destroy(&b);
    keel_redis_node_stats st;
    keel_redis_node_stats_get(r, 0, &st);
    ck_assert_uint_eq(st.connects, 4);

    redisContext *c = direct(0);
    freeReplyObject(redisCommand(c, "DEL kt:idle"));
    ck_assert_int_eq(clients_on(c), 5);
    freeReplyObject(redisCommand(c, "CLIENT KILL TYPE normal SKIPME yes"));
    for (int i = 0; clients_on(c) > 1; i++) {
        ck_assert_int_lt(i, 1000);
        kt_nap(MS);
    }
    redisFree(c);
    for (int i = 1; i <= 4; i++) {
        int rc = cmd(r, "kt:idle", &rep, 2, "INCR", "kt:idle");
        ck_assert_msg(rc == 0, "INCR %d: %s", i, keel_strerror(rc));
        ck_assert_int_eq(rep->integer, i); /* each ran, and once */
        freeReplyObject(rep);
    }
    keel_redis_node_stats_get(r, 0, &st);
    ck_assert_uint_eq(st.unavailable, 0);
    ck_assert_uint_eq(st.fails, 0);
    ck_assert_int_eq(st.skipped, 0);
    ck_assert_uint_eq(st.connects, 5); /* the dead four dropped, one new one */
    keel_redis_destroy(r);
}
END_TEST

START_TEST(a_unix_socket_and_a_database)
{
    char url[2][300];
    const char *u[2] = {url[0], url[1]};
    char host[64];
    int port;
    kt_redis_node(0, host, sizeof host, &port);
    snprintf(url[0], sizeof url[0], "unix://%s/redis1/redis.sock?db=2", kt_env("KEEL_TEST_DIR"));
    snprintf(url[1], sizeof url[1], "redis://%s:%d/3", host, port);
    for (int i = 0; i < 2; i++) {
        keel_redis *r;
        keel_redis_opts o = {.nodes = &u[i], .nnodes = 1};
        ck_assert_int_eq(keel_redis_create(&r, &o), 0);
        redisReply *rep;
        ck_assert_int_eq(cmd(r, "kt:db", &rep, 3, "SET", "kt:db", i ? "three" : "two"), 0);
        freeReplyObject(rep);
        keel_redis_destroy(r);
    }
    redisContext *c = direct(0);
    for (int db = 0; db < 4; db++) {
        redisReply *rep = redisCommand(c, "SELECT %d", db);
        freeReplyObject(rep);
        rep = redisCommand(c, "GET kt:db");
        ck_assert_str_eq(rep->type == REDIS_REPLY_STRING ? rep->str : "nil",
                         db == 2 ? "two" : db == 3 ? "three" : "nil");
        freeReplyObject(rep);
    }
    redisFree(c);
}
END_TEST

/* AUTH over a unix socket: unix://user:password@/path. */
START_TEST(auth_over_a_unix_socket)
{
    redisContext *c = direct(0);
    freeReplyObject(redisCommand(c, "ACL SETUSER kt-unix on >kt-unix-pw ~* &* +@all"));
    char url[2][300];
    const char *u[2] = {url[0], url[1]};
    snprintf(url[0], sizeof url[0], "unix://kt-unix:kt-unix%%2Dpw@%s/redis1/redis.sock", kt_env("KEEL_TEST_DIR"));
    snprintf(url[1], sizeof url[1], "unix://kt-unix:wrong@%s/redis1/redis.sock", kt_env("KEEL_TEST_DIR"));
    for (int i = 0; i < 2; i++) {
        keel_redis *r;
        keel_redis_opts o = {.nodes = &u[i], .nnodes = 1, .command_timeout_ns = 500 * MS};
        ck_assert_int_eq(keel_redis_create(&r, &o), 0);
        redisReply *rep = NULL;
        keel_set_log(capture_log, KEEL_LOG_ERROR, NULL);
        int rc = cmd(r, NULL, &rep, 2, "ACL", "WHOAMI");
        keel_set_log(NULL, KEEL_LOG_ERROR, NULL);
        if (i == 0) {
            ck_assert_msg(rc == 0, "%s", keel_strerror(rc));
            ck_assert_str_eq(rep->str, "kt-unix"); /* not the default user */
            freeReplyObject(rep);
        } else {
            ck_assert_int_eq(rc, KEEL_EUNAVAIL);
            ck_assert_ptr_null(rep);
        }
        keel_redis_destroy(r);
    }
    freeReplyObject(redisCommand(c, "ACL DELUSER kt-unix"));
    redisFree(c);
}
END_TEST

START_TEST(malformed_urls_are_refused)
{
    const char *bad[] = {
        "http://localhost:6379", "redis://", "redis://:6379", "redis://host:0", "redis://host:70000",
        "redis://host:12ab", "redis://host:6379/x", "redis://host:6379/99999999", "unix://relative/path",
        "unix://", "unix:///tmp/s?db=x", "redis://[::1", "redis://[]:6379", "", NULL,
        "redis://:%zz@h", "redis://:%-1@h", "redis://:p%00x@h", "redis://:p%4@h", "redis://h st:6379",
        "redis://[not-an-ip]:6379", "redis://h%41:1", "redis://[:]", "redis://[:]:6379", "redis://[1::2::3]",
        "redis://[fe80::1%25eth0]:6379", "redis://[::1]x", "redis://[::1]:", "redis://h/65536",
        "redis://h/00000065536",
        "unix:///tmp/a-socket-path-longer-than-a-sockaddr_un-holds/.............................................................x.sock",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        keel_redis *r = (keel_redis *)0x1;
        keel_redis_opts o = {.nodes = &bad[i], .nnodes = 1};
        ck_assert_msg(keel_redis_create(&r, &o) == KEEL_EINVAL, "accepted %s", bad[i] ? bad[i] : "NULL");
        ck_assert_ptr_eq(r, (keel_redis *)0x1);
    }
    const char *good[] = {"redis://h", "redis://h:1/0", "redis://u:p%40ss@h:6380/3", "redis://:p@[::1]:7000",
                          "unix:///tmp/redis.sock?db=2"};
    keel_redis *r;
    keel_redis_opts o = {.nodes = good, .nnodes = 5};
    ck_assert_int_eq(keel_redis_create(&r, &o), 0);
    ck_assert_uint_eq(keel_redis_nodes(r), 5);
    keel_redis_node_stats st;
    keel_redis_node_stats_get(r, 2, &st);
    ck_assert_str_eq(st.name, "h:6380");
    keel_redis_destroy(r);
    /* the last '@' ends the credentials; ":@" alone means no AUTH */
    keel__rurl u;
    ck_assert_int_eq(keel__redis_url("redis://:p@ss@h:1", &u), 0);
    ck_assert_str_eq(u.pass, "p@ss");
    ck_assert_str_eq(u.host, "h");
    keel__redis_url_free(&u);
    ck_assert_int_eq(keel__redis_url("redis://:@h", &u), 0);
    ck_assert_ptr_null(u.pass);
    keel__redis_url_free(&u);
    ck_assert_int_eq(keel__redis_url("redis://u%3Ax:p%25@h", &u), 0);
    ck_assert_str_eq(u.user, "u:x");
    ck_assert_str_eq(u.pass, "p%");
    keel__redis_url_free(&u);
    /* bracketed hosts are IPv6 addresses; numbers may have leading zeros */
    ck_assert_int_eq(keel__redis_url("redis://[::ffff:1.2.3.4]:0006379/0000000000003", &u), 0);
    ck_assert_str_eq(u.host, "::ffff:1.2.3.4");
    ck_assert_int_eq(u.port, 6379);
    ck_assert_int_eq(u.db, 3);
    keel__redis_url_free(&u);
    ck_assert_int_eq(keel__redis_url("unix:///tmp/s?db=0000000000065535", &u), 0);
    ck_assert_int_eq(u.db, 65535);
    keel__redis_url_free(&u);
    /* a unix socket takes credentials too, and its path is percent-decoded */
    ck_assert_int_eq(keel__redis_url("unix://u%40x:p%2F@/tmp/a%20b.sock?db=3", &u), 0);
    ck_assert_str_eq(u.user, "u@x");
    ck_assert_str_eq(u.pass, "p/");
    ck_assert_str_eq(u.path, "/tmp/a b.sock");
    ck_assert_int_eq(u.db, 3);
    keel__redis_url_free(&u);
    ck_assert_int_eq(keel__redis_url("unix://:p@ss@/tmp/s", &u), 0);
    ck_assert_ptr_null(u.user);
    ck_assert_str_eq(u.pass, "p@ss");
    ck_assert_str_eq(u.path, "/tmp/s");
    keel__redis_url_free(&u);
    ck_assert_int_eq(keel__redis_url("unix://secret@/tmp/s", &u), 0);
    ck_assert_ptr_null(u.user);
    ck_assert_str_eq(u.pass, "secret");
    keel__redis_url_free(&u);
    ck_assert_int_eq(keel__redis_url("unix://:@/tmp/s", &u), 0);
    ck_assert_ptr_null(u.pass);
    ck_assert_str_eq(u.path, "/tmp/s");
    keel__redis_url_free(&u);
    const char *bad_unix[] = {"unix://pw/tmp/s", "unix://:pw@tmp/s", "unix://:pw@", "unix:///tmp/a%00b",
                              "unix:///tmp/%zz", "unix://:p%00@/tmp/s", "unix://:p@/", "unix://:p@/tmp/s?db=x"};
    for (size_t i = 0; i < sizeof bad_unix / sizeof bad_unix[0]; i++) {
        ck_assert_msg(keel__redis_url(bad_unix[i], &u) == KEEL_EINVAL, "accepted %s", bad_unix[i]);
        keel__redis_url_free(&u);
    }
    const char *dup[] = {"redis://h:1", "redis://h:1"};
    keel_redis_opts od = {.nodes = dup, .nnodes = 2};
    ck_assert_int_eq(keel_redis_create(&r, &od), KEEL_EINVAL);
    keel_redis_opts huge = {.nodes = good, .nnodes = 1, .max_fails = 1000001};
    ck_assert_int_eq(keel_redis_create(&r, &huge), KEEL_EINVAL);
    huge.max_fails = 1000000;
    ck_assert_int_eq(keel_redis_create(&r, &huge), 0);
    keel_redis_destroy(r);
    const char *two_dbs[] = {"redis://h:1/0", "redis://h:1/1"}; /* one ring name: once KEEL_EEXIST */
    od.nodes = two_dbs;
    ck_assert_int_eq(keel_redis_create(&r, &od), KEEL_EINVAL);
    keel_redis_opts none = {0};
    ck_assert_int_eq(keel_redis_create(&r, &none), KEEL_EINVAL);
    ck_assert_int_eq(keel_redis_command(NULL, NULL, 0, 1, NULL, NULL, NULL), KEEL_EINVAL);
}
END_TEST

/* A server given twice is refused however it is spelled: host names
 * ignore case (RFC 4343) and an IPv6 address is compared as one, not as
 * text. Nodes that differ are still taken. */
START_TEST(a_server_given_twice_in_another_spelling_is_refused)
{
    const char *same[][2] = {
        {"redis://h", "redis://H"},
        {"redis://Cache.Example:7000", "redis://cache.example:7000/2"},
        {"redis://[::1]", "redis://[0::1]"},
        {"redis://[2001:db8::1]:7000", "redis://[2001:DB8:0:0:0:0:0:1]:7000"},
        {"redis://[::ffff:1.2.3.4]", "redis://[::ffff:102:304]"},
    };
    for (size_t i = 0; i < sizeof same / sizeof same[0]; i++) {
        keel_redis *r = (keel_redis *)0x1;
        keel_redis_opts o = {.nodes = same[i], .nnodes = 2};
        ck_assert_msg(keel_redis_create(&r, &o) == KEEL_EINVAL, "accepted %s and %s", same[i][0], same[i][1]);
        ck_assert_ptr_eq(r, (keel_redis *)0x1);
    }
    const char *other[][2] = {
        {"redis://h", "redis://h:6380"},
        {"redis://h", "redis://hh"},
        {"redis://[::1]", "redis://[::2]"},
        {"redis://[::1]:7000", "redis://[::1]:7001"},
        {"redis://[::1]", "redis://localhost"},
    };
    for (size_t i = 0; i < sizeof other / sizeof other[0]; i++) {
        keel_redis *r = NULL;
        keel_redis_opts o = {.nodes = other[i], .nnodes = 2};
        ck_assert_msg(keel_redis_create(&r, &o) == 0, "refused %s and %s", other[i][0], other[i][1]);
        ck_assert_uint_eq(keel_redis_nodes(r), 2);
        keel_redis_destroy(r);
    }
}
END_TEST

/* Bad input is KEEL_EINVAL, never a crash: a key or an argument of a
 * script given as NULL with a length is refused like one of a command. */
START_TEST(a_script_with_a_null_key_or_argument_is_refused)
{
    keel_redis *r = connect_nodes(1, NULL);
    keel_redis_script *sc;
    const char *lua = "return 1";
    ck_assert_int_eq(keel_redis_script_create(r, lua, strlen(lua), &sc), 0);
    const void *keys[2] = {"k", NULL};
    size_t keylens[2] = {1, 3};
    const char *args[1] = {NULL};
    size_t arglens[1] = {3};
    redisReply *rep = (redisReply *)0x1;
    ck_assert_int_eq(keel_redis_eval(r, sc, 2, keys, keylens, 0, NULL, NULL, NULL, 0, &rep), KEEL_EINVAL);
    ck_assert_ptr_null(rep);
    ck_assert_int_eq(keel_redis_eval(r, sc, 1, keys, keylens, 1, args, arglens, NULL, 0, &rep), KEEL_EINVAL);
    /* a route length with no route, as keel_redis_command refuses it */
    ck_assert_int_eq(keel_redis_eval(r, sc, 0, NULL, NULL, 0, NULL, NULL, NULL, 5, &rep), KEEL_EINVAL);
    const char *argv[2] = {"MGET", "k"};
    size_t argvlen[2] = {4, 1};
    ck_assert_int_eq(keel_redis_command_keys(r, keys, keylens, 2, 2, argv, argvlen, &rep), KEEL_EINVAL);
    /* a length with no room for the copy's NUL: no copy, not a short one
     * overrun (once a heap overflow) */
    keel_redis_script *huge = (keel_redis_script *)0x1;
    ck_assert_int_eq(keel_redis_script_create(r, lua, SIZE_MAX, &huge), KEEL_ENOMEM);
    ck_assert_ptr_eq(huge, (keel_redis_script *)0x1);
    ck_assert_int_eq(keel_redis_eval(r, sc, 1, keys, keylens, 0, NULL, NULL, NULL, 0, &rep), 0);
    ck_assert_int_eq(rep->integer, 1);
    freeReplyObject(rep);
    keel_redis_script_free(sc);
    keel_redis_destroy(r);
}
END_TEST

/* A stand-in Redis on a loopback port of its own, serving one connection
 * at a time, for faults a real server does not make: to every read it
 * answers `reply` (at once, or a byte every `trickle` ns), then closes the
 * connection if `hang_up`. */
typedef struct fake_redis {
    int lfd, port;
    const char *reply;
    uint64_t trickle;
    bool hang_up;
    atomic_int accepts;
    atomic_bool stop;
    pthread_t t;
    char url[64];
} fake_redis;

static void *fake_redis_serve(void *arg)
{
    fake_redis *f = arg;
    while (!atomic_load(&f->stop)) {
        struct pollfd p = {.fd = f->lfd, .events = POLLIN};
        if (poll(&p, 1, 10) != 1)
            continue;
        int c = accept(f->lfd, NULL, NULL);
        if (c < 0)
            continue;
        atomic_fetch_add(&f->accepts, 1);
        char buf[512];
        bool up = true;
        while (up && !atomic_load(&f->stop) && read(c, buf, sizeof buf) > 0) {
            size_t n = strlen(f->reply);
            for (size_t i = 0; up && i < n; i += f->trickle ? 1 : n) {
                up = send(c, f->reply + i, f->trickle ? 1 : n, MSG_NOSIGNAL) > 0;
                if (f->trickle)
                    kt_nap(f->trickle);
            }
            up = up && !f->hang_up;
        }
        close(c);
    }
    return NULL;
}

static void fake_redis_start(fake_redis *f)
{
    f->lfd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t salen = sizeof sa;
    ck_assert_int_eq(bind(f->lfd, (struct sockaddr *)&sa, sizeof sa), 0);
    ck_assert_int_eq(listen(f->lfd, 16), 0);
    ck_assert_int_eq(getsockname(f->lfd, (struct sockaddr *)&sa, &salen), 0);
    f->port = ntohs(sa.sin_port);
    snprintf(f->url, sizeof f->url, "redis://127.0.0.1:%d", f->port);
    ck_assert_int_eq(pthread_create(&f->t, NULL, fake_redis_serve, f), 0);
}

static void fake_redis_stop(fake_redis *f)
{
    atomic_store(&f->stop, true);
    pthread_join(f->t, NULL);
    close(f->lfd);
}

static keel_redis *fake_redis_client(fake_redis *f, size_t conns, uint64_t cmd_timeout)
{
    const char *u[1] = {f->url};
    keel_redis *r = NULL;
    keel_redis_opts o = {.nodes = u, .nnodes = 1, .conns_per_node = conns, .connect_timeout_ns = 300 * MS,
                         .command_timeout_ns = cmd_timeout, .max_fails = 2};
    ck_assert_int_eq(keel_redis_create(&r, &o), 0);
    return r;
}

/* UNSUBSCRIBE a b c is answered once per channel: two replies were left on
 * the pooled connection, and the next callers got them for their GETs. */
START_TEST(unsubscribing_on_a_pooled_connection_is_refused)
{
    node_urls(NULL);
    keel_redis *r = NULL;
    keel_redis_opts o = {.nodes = url_ptrs, .nnodes = 1, .conns_per_node = 1,
                         .connect_timeout_ns = 300 * MS, .command_timeout_ns = 300 * MS};
    ck_assert_int_eq(keel_redis_create(&r, &o), 0);
    redisReply *rep;
    ck_assert_int_eq(cmd(r, "kt:un", &rep, 3, "SET", "kt:un", "value"), 0);
    freeReplyObject(rep);
    static const char *const names[] = {"UNSUBSCRIBE", "punsubscribe", "SUNSUBSCRIBE"};
    for (size_t i = 0; i < 3; i++) {
        rep = (redisReply *)0x1;
        ck_assert_int_eq(cmd(r, NULL, &rep, 4, names[i], "a", "b", "c"), KEEL_EINVAL);
        ck_assert_ptr_null(rep);
        const char *argv[4] = {names[i], "a", "b", "c"}, *get[2] = {"GET", "kt:un"};
        size_t al[4] = {strlen(names[i]), 1, 1, 1}, gl[2] = {3, 5};
        keel_redis_cmd p[2] = {{NULL, 0, 4, argv, al}, {"kt:un", 5, 2, get, gl}};
        ck_assert_int_eq(keel_redis_pipeline(r, p, 2), KEEL_EINVAL);
        ck_assert_int_eq(p[1].rc, KEEL_EINVAL);
        ck_assert_int_eq(cmd(r, "kt:un", &rep, 2, "GET", "kt:un"), 0);
        ck_assert_int_eq(rep->type, REDIS_REPLY_STRING);
        ck_assert_str_eq(rep->str, "value");
        freeReplyObject(rep);
    }
    keel_redis_destroy(r);
}
END_TEST

/* A connection with replies left unread after a call (here a server that
 * answers more than asked) is not handed to the next caller: it would get
 * them for its own command. Dropping it is no failure of the node. */
START_TEST(a_connection_with_unread_replies_is_dropped)
{
    fake_redis f = {.reply = "+A\r\n+B\r\n+C\r\n"};
    fake_redis_start(&f);
    keel_redis *r = fake_redis_client(&f, 1, 300 * MS);
    redisReply *rep;
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(cmd(r, "kt:x", &rep, 2, "GET", "kt:x"), 0);
        ck_assert_str_eq(rep->str, "A");
        freeReplyObject(rep);
    }
    const char *get[2] = {"GET", "kt:x"};
    size_t gl[2] = {3, 4};
    keel_redis_cmd p[2] = {{"kt:x", 4, 2, get, gl}, {"kt:x", 4, 2, get, gl}};
    for (int i = 0; i < 2; i++) {
        ck_assert_int_eq(keel_redis_pipeline(r, p, 2), 0);
        ck_assert_str_eq(p[0].reply->str, "A");
        ck_assert_str_eq(p[1].reply->str, "B");
        freeReplyObject(p[0].reply);
        freeReplyObject(p[1].reply);
    }
    ck_assert_int_eq(atomic_load(&f.accepts), 5);
    keel_redis_node_stats st;
    ck_assert_int_eq(keel_redis_node_stats_get(r, 0, &st), 0);
    ck_assert_uint_eq(st.fails, 0);
    ck_assert_int_eq(st.skipped, 0);
    keel_redis_destroy(r);
    fake_redis_stop(&f);
}
END_TEST

/* The command timeout bounds the whole call: hiredis's socket timeout
 * bounds each read alone, and a server trickling a byte every 100 ms held
 * a GET with a 300 ms timeout for 2.6 s. */
START_TEST(a_trickling_server_times_out_within_the_command_timeout)
{
    fake_redis f = {.reply = "$20\r\n01234567890123456789\r\n", .trickle = 100 * MS};
    fake_redis_start(&f);
    keel_redis *r = fake_redis_client(&f, 1, 300 * MS);
    redisReply *rep = (redisReply *)0x1;
    uint64_t t0 = keel_now_ns();
    int rc = cmd(r, "kt:x", &rep, 2, "GET", "kt:x");
    uint64_t took = keel_now_ns() - t0;
    ck_assert_int_eq(rc, KEEL_ETIMEDOUT);
    ck_assert_ptr_null(rep);
    ck_assert_uint_ge(took, 250 * MS);
    ck_assert_uint_lt(took, 600 * MS);
    const char *get[2] = {"GET", "kt:x"};
    size_t gl[2] = {3, 4};
    keel_redis_cmd p[1] = {{"kt:x", 4, 2, get, gl}};
    t0 = keel_now_ns();
    rc = keel_redis_pipeline(r, p, 1);
    took = keel_now_ns() - t0;
    ck_assert_int_eq(rc, KEEL_ETIMEDOUT);
    ck_assert_ptr_null(p[0].reply);
    ck_assert_uint_lt(took, 600 * MS);
    ck_assert_int_eq(atomic_load(&f.accepts), 2); /* the first connection was dropped */
    keel_redis_destroy(r);
    fake_redis_stop(&f);
}
END_TEST

/* A blocking command that waits longer than the command timeout says
 * nothing of the node: three BLPOPs timing out once made a healthy node
 * skipped. Their connections are still dropped (the server would answer
 * them later). */
START_TEST(a_blocking_command_timing_out_is_no_node_failure)
{
    node_urls(NULL);
    keel_redis *r = NULL;
    keel_redis_opts o = {.nodes = url_ptrs, .nnodes = 1, .connect_timeout_ns = 300 * MS,
                         .command_timeout_ns = 200 * MS, .max_fails = 2, .fail_timeout_ns = 10 * KT_S};
    ck_assert_int_eq(keel_redis_create(&r, &o), 0);
    redisReply *rep;
    keel_redis_node_stats st;
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(cmd(r, "kt:nolist", &rep, 3, "BLPOP", "kt:nolist", "1"), KEEL_ETIMEDOUT);
        ck_assert_int_eq(cmd(r, "kt:nolist", &rep, 3, "bzpopmin", "kt:nolist", "1"), KEEL_ETIMEDOUT);
        ck_assert_int_eq(cmd(r, "kt:nostream", &rep, 6, "XREAD", "BLOCK", "1000", "STREAMS", "kt:nostream", "$"),
                         KEEL_ETIMEDOUT);
    }
    const char *bl[3] = {"BRPOP", "kt:nolist", "1"};
    size_t bll[3] = {5, 9, 1};
    keel_redis_cmd p[1] = {{"kt:nolist", 9, 3, bl, bll}};
    ck_assert_int_eq(keel_redis_pipeline(r, p, 1), KEEL_ETIMEDOUT);
    ck_assert_int_eq(keel_redis_node_stats_get(r, 0, &st), 0);
    ck_assert_int_eq(st.skipped, 0);
    ck_assert_uint_eq(st.fails, 0);
    ck_assert_uint_eq(st.timeouts, 10);
    ck_assert_uint_eq(st.connects, 10); /* each timed-out connection was dropped */
    ck_assert_int_eq(cmd(r, "kt:nolist", &rep, 1, "PING"), 0);
    freeReplyObject(rep);
    keel_redis_destroy(r);
}
END_TEST

/* hiredis 0.14 parses replies nested at most 7 deep: a deeper one is
 * KEEL_EPROTO, the caller's reply and not the node's health (three of them
 * once made a healthy node skipped). The connection, its parser in error,
 * is dropped. */
START_TEST(a_reply_too_deep_for_hiredis_is_no_node_failure)
{
    keel_redis *r = connect_nodes(1, NULL); /* max_fails 2 */
    redisReply *rep = (redisReply *)0x1;
    keel_redis_node_stats st;
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(cmd(r, "kt:deep", &rep, 3, "EVAL", "return {{{{{{{{{1}}}}}}}}}", "0"), KEEL_EPROTO);
        ck_assert_ptr_null(rep);
    }
    ck_assert_int_eq(keel_redis_node_stats_get(r, 0, &st), 0);
    ck_assert_int_eq(st.skipped, 0);
    ck_assert_uint_eq(st.fails, 0);
    ck_assert_uint_eq(st.connects, 3);
    ck_assert_int_eq(cmd(r, "kt:deep", &rep, 3, "EVAL", "return {{{{{{{1}}}}}}}", "0"), 0);
    freeReplyObject(rep);
    keel_redis_destroy(r);
}
END_TEST

/* A server that does not speak Redis is the node's failure: its replies
 * are no protocol hiredis knows, and after max_fails of them the node is
 * skipped (once every KEEL_EPROTO was let off, and such a node was never
 * skipped, each call opening a connection to it). */
START_TEST(a_server_that_speaks_no_redis_is_a_node_failure)
{
    fake_redis f = {.reply = "HTTP/1.1 400 Bad Request\r\n\r\n"};
    fake_redis_start(&f);
    keel_redis *r = fake_redis_client(&f, 1, 300 * MS); /* max_fails 2 */
    redisReply *rep;
    ck_assert_int_eq(cmd(r, "kt:x", &rep, 2, "GET", "kt:x"), KEEL_EPROTO);
    ck_assert_int_eq(cmd(r, "kt:x", &rep, 2, "GET", "kt:x"), KEEL_EPROTO);
    ck_assert_int_eq(cmd(r, "kt:x", &rep, 2, "GET", "kt:x"), KEEL_EUNAVAIL);
    keel_redis_node_stats st;
    ck_assert_int_eq(keel_redis_node_stats_get(r, 0, &st), 0);
    ck_assert_int_eq(st.skipped, 1);
    ck_assert_uint_eq(st.fails, 2);
    keel_redis_destroy(r);
    fake_redis_stop(&f);
}
END_TEST

static void ignore_message(const char *ch, size_t chlen, const char *msg, size_t len, const char *pattern,
                           void *ud)
{
    (void)ch, (void)chlen, (void)msg, (void)len, (void)pattern, (void)ud;
}

static void count_reconnect(void *ud) { atomic_fetch_add((atomic_int *)ud, 1); }

/* A server that confirms the subscription and hangs up at once: the
 * listener's backoff was reset at every resubscription, so it reconnected
 * every U(0, reconnect_min) and called on_reconnect as often (a cache
 * flushing its L1 hundreds of times a second). The backoff now grows. */
START_TEST(a_server_dropping_the_listener_at_once_is_not_hammered)
{
    fake_redis f = {.reply = "*3\r\n$9\r\nsubscribe\r\n$5\r\nkt:ch\r\n:1\r\n", .hang_up = true};
    fake_redis_start(&f);
    keel_redis *r = fake_redis_client(&f, 1, 300 * MS);
    atomic_int reconnects = 0;
    keel_redis_sub *sub;
    keel_redis_sub_opts so = {.channels = (const char *[]){"kt:ch"}, .nchannels = 1,
                              .on_message = ignore_message, .on_reconnect = count_reconnect,
                              .ud = &reconnects, .heartbeat_ns = 10 * KT_S,
                              .reconnect_min_ns = 10 * MS, .reconnect_max_ns = 200 * MS};
    ck_assert_int_eq(keel_redis_subscribe(r, &so, &sub), 0);
    kt_nap(1 * KT_S);
    keel_redis_unsubscribe(sub);
    int n = atomic_load(&reconnects);
    /* waits of U(0, 10, 20, 40 .. 200 ms): about a dozen in a second */
    ck_assert_int_ge(n, 2);
    ck_assert_int_lt(n, 30);
    keel_redis_destroy(r);
    fake_redis_stop(&f);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("redis");
    TCase *tc = tcase_create("redis");
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, malformed_urls_are_refused);
    tcase_add_test(tc, a_server_given_twice_in_another_spelling_is_refused);
    tcase_add_test(tc, a_script_with_a_null_key_or_argument_is_refused);
    tcase_add_test(tc, a_unix_socket_and_a_database);
    tcase_add_test(tc, auth_over_a_unix_socket);
    tcase_add_test(tc, binary_keys_and_values_round_trip);
    tcase_add_test(tc, keys_land_on_the_node_the_ring_says);
    tcase_add_test(tc, pipeline_replies_come_back_in_order);
    tcase_add_test(tc, a_command_timeout_of_any_length_does_not_wrap);
    tcase_add_test(tc, a_refused_pipeline_says_so_in_every_command);
    tcase_add_test(tc, commands_that_would_change_a_pooled_connection_are_refused);
    tcase_add_test(tc, scripts_survive_script_flush_and_a_restart);
    tcase_add_test(tc, auth_with_a_password_and_with_a_user);
    tcase_add_test(tc, a_stopped_node_fails_fast_while_the_others_serve);
    tcase_add_test(tc, a_node_that_stays_down_is_probed_ever_less_often);
    tcase_add_test(tc, a_server_that_never_answers_times_out);
    tcase_add_test(tc, a_probe_in_flight_leaves_the_node_skipped_for_the_others);
    tcase_add_test(tc, the_listener_reconnects_and_says_so);
    tcase_add_test(tc, a_message_among_the_confirmations_is_delivered);
    tcase_add_test(tc, a_handler_may_unsubscribe_its_own_listener);
    tcase_add_test(tc, a_handler_unsubscribing_during_a_resubscription_is_the_last_one);
    tcase_add_test(tc, a_script_flushed_between_load_and_retry_still_runs);
    tcase_add_test(tc, a_script_failing_with_its_own_noscript_error_runs_once);
    tcase_add_test(tc, the_write_guard_swallows_our_sigpipe_and_keeps_the_programs);
    tcase_add_test(tc, a_restarted_server_is_survived);
    tcase_add_test(tc, idle_connections_the_server_closed_are_not_failures);
    suite_add_tcase(s, tc);

    /* stand-in servers for faults, and what a pooled connection must not keep */
    TCase *fl = tcase_create("faults");
    tcase_set_timeout(fl, 30);
    tcase_add_test(fl, unsubscribing_on_a_pooled_connection_is_refused);
    tcase_add_test(fl, a_connection_with_unread_replies_is_dropped);
    tcase_add_test(fl, a_trickling_server_times_out_within_the_command_timeout);
    tcase_add_test(fl, a_blocking_command_timing_out_is_no_node_failure);
    tcase_add_test(fl, a_reply_too_deep_for_hiredis_is_no_node_failure);
    tcase_add_test(fl, a_server_that_speaks_no_redis_is_a_node_failure);
    tcase_add_test(fl, a_server_dropping_the_listener_at_once_is_not_hammered);
    suite_add_tcase(s, fl);

    /* real time against a 200 ms heartbeat: not under valgrind */
    TCase *hb = tcase_create("heartbeat");
    tcase_set_tags(hb, "stress");
    tcase_set_timeout(hb, 30);
    tcase_add_unchecked_fixture(hb, NULL, resume_redis2);
    tcase_add_test(hb, a_silent_server_is_noticed_by_the_heartbeat);
    suite_add_tcase(s, hb);
    return kt_run(s);
}
