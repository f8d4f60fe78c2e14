/* examples/redis.c — one Redis client for a threaded program: keys sharded
 * over three nodes, a pipeline, a Lua script by SHA1 and a pub/sub listener.
 *
 * Nodes come from KEEL_TEST_REDIS ("host:port,host:port,...", set by
 * `make demo`), else 127.0.0.1:6379. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <keel/redis.h>

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int received;

static void on_message(const char *channel, size_t chlen, const char *msg, size_t len,
                       const char *pattern, void *ud)
{
    (void)ud;
    printf("  listener: %.*s on %.*s (pattern %s)\n", (int)len, msg, (int)chlen, channel,
           pattern ? pattern : "-");
    pthread_mutex_lock(&mu);
    received++;
    pthread_cond_signal(&cv);
    pthread_mutex_unlock(&mu);
}

/* A command from a string of words, for brevity here; real code passes
 * argv/argvlen so that values may hold any bytes. */
static int run(keel_redis *r, const char *key, const char *a0, const char *a1, const char *a2,
               redisReply **reply)
{
    const char *argv[3] = {a0, a1, a2};
    size_t argvlen[3] = {strlen(a0), a1 ? strlen(a1) : 0, a2 ? strlen(a2) : 0};
    int argc = a2 ? 3 : a1 ? 2 : 1;
    return keel_redis_command(r, key, key ? strlen(key) : 0, argc, argv, argvlen, reply);
}

int main(void)
{
    const char *env = getenv("KEEL_TEST_REDIS");
    char list[512];
    snprintf(list, sizeof list, "%s", env && *env ? env : "127.0.0.1:6379");
    char urls[8][80];
    const char *nodes[8];
    size_t n = 0;
    for (char *save, *tok = strtok_r(list, ",", &save); tok && n < 8;
         tok = strtok_r(NULL, ",", &save)) {
        snprintf(urls[n], sizeof urls[n], "redis://%s", tok);
        nodes[n] = urls[n];
        n++;
    }

    keel_redis *r;
    keel_redis_opts opts = {.nodes = nodes, .nnodes = n, .command_timeout_ns = 500000000};
    int rc = keel_redis_create(&r, &opts);
    if (rc != 0) {
        fprintf(stderr, "keel_redis_create: %s\n", keel_strerror(rc));
        return 1;
    }
    printf("%zu node(s)\n", keel_redis_nodes(r));

    /* 1. Plain commands: each key goes to the node the ring gives it. */
    redisReply *reply;
    const char *users[] = {"user:1", "user:2", "user:3", "user:4", "{user:1}:cart"};
    for (int i = 0; i < 5; i++) {
        rc = run(r, users[i], "SET", users[i], "hello", &reply);
        if (rc != 0) {
            fprintf(stderr, "SET %s: %s (is a Redis server running?)\n", users[i],
                    keel_strerror(rc));
            if (reply)
                freeReplyObject(reply);
            keel_redis_destroy(r);
            return 1;
        }
        freeReplyObject(reply);
        printf("  SET %-14s -> node %zu\n", users[i],
               keel_redis_node_of(r, users[i], strlen(users[i])));
    }
    printf("  ({user:1}:cart shares user:1's node through its hash tag)\n");

    /* An error reply is KEEL_EBACKEND, with the server's text in the reply. */
    rc = run(r, "user:1", "LPUSH", "user:1", "x", &reply);
    printf("  LPUSH on a string: %s, \"%s\"\n", keel_strerror(rc), reply ? reply->str : "");
    if (reply)
        freeReplyObject(reply);

    /* 2. A pipeline: ten INCRs, one round trip per node, replies in order. */
    const char *argv[2] = {"INCR", NULL};
    size_t argvlen[2] = {4, 0};
    char keys[10][16];
    const char *argvs[10][2];
    size_t lens[10][2];
    keel_redis_cmd cmds[10];
    for (int i = 0; i < 10; i++) {
        snprintf(keys[i], sizeof keys[i], "hits:%d", i % 4);
        argvs[i][0] = argv[0];
        argvs[i][1] = keys[i];
        lens[i][0] = argvlen[0];
        lens[i][1] = strlen(keys[i]);
        run(r, keys[i], "DEL", keys[i], NULL, &reply);
        if (reply)
            freeReplyObject(reply);
    }
    for (int i = 0; i < 10; i++)
        cmds[i] = (keel_redis_cmd){.key = keys[i], .keylen = lens[i][1], .argc = 2,
                                   .argv = argvs[i], .argvlen = lens[i]};
    rc = keel_redis_pipeline(r, cmds, 10);
    printf("pipeline: %s;", keel_strerror(rc));
    for (int i = 0; i < 10; i++) {
        if (cmds[i].reply) {
            printf(" %s=%lld", keys[i], cmds[i].reply->integer);
            freeReplyObject(cmds[i].reply);
        }
    }
    printf("\n");

    /* 3. A script: increment up to a cap, atomically. Loaded by SHA1 where
     * needed, and again if a server forgets it. */
    static const char lua[] = "local v = redis.call('INCR', KEYS[1])\n"
                              "if v > tonumber(ARGV[1]) then redis.call('DECR', KEYS[1]) "
                              "return 0 end\n"
                              "return v";
    keel_redis_script *s;
    if ((rc = keel_redis_script_create(r, lua, sizeof lua - 1, &s)) != 0) {
        fprintf(stderr, "keel_redis_script_create: %s\n", keel_strerror(rc));
        keel_redis_destroy(r);
        return 1;
    }
    printf("script %.12s...: capped increments of seats:", keel_redis_script_sha(s));
    const void *key = "seats";
    size_t keylen = 5;
    const char *cap = "3";
    size_t caplen = 1;
    run(r, "seats", "DEL", "seats", NULL, &reply);
    if (reply)
        freeReplyObject(reply);
    for (int i = 0; i < 5; i++) {
        rc = keel_redis_eval(r, s, 1, &key, &keylen, 1, &cap, &caplen, NULL, 0, &reply);
        printf(" %lld", rc == 0 ? reply->integer : -1LL);
        if (reply)
            freeReplyObject(reply);
    }
    printf("\n");
    keel_redis_script_free(s);

    /* 4. Pub/sub: a listener thread on node 0, heartbeated and reconnected
     * after failures. */
    const char *patterns[] = {"orders.*"};
    keel_redis_sub_opts so = {.patterns = patterns, .npatterns = 1, .node = 0,
                              .on_message = on_message};
    keel_redis_sub *sub;
    rc = keel_redis_subscribe(r, &so, &sub);
    if (rc == 0) {
        run(r, NULL, "PUBLISH", "orders.new", "order 42", &reply);
        if (reply)
            freeReplyObject(reply);
        run(r, NULL, "PUBLISH", "orders.paid", "order 41", &reply);
        if (reply)
            freeReplyObject(reply);
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += 2;
        pthread_mutex_lock(&mu);
        while (received < 2 && pthread_cond_timedwait(&cv, &mu, &until) == 0)
            ;
        pthread_mutex_unlock(&mu);
        keel_redis_unsubscribe(sub);
    }
    printf("listener got %d message(s)\n", received);

    keel_redis_node_stats st;
    for (size_t i = 0; i < keel_redis_nodes(r); i++)
        if (keel_redis_node_stats_get(r, i, &st) == 0)
            printf("  node %s: %llu commands, %llu error replies\n", st.name,
                   (unsigned long long)st.commands, (unsigned long long)st.errors);
    keel_redis_destroy(r);
    return received == 2 ? 0 : 1;
}
