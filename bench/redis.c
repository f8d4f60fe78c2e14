/* bench/redis.c — pipelined SET and GET through keel_redis against
 * redis-benchmark -P 16 on the same server in the same run, with one
 * connection and with four.
 * Goal (issue 4): at least 0.8 of redis-benchmark's requests per second.
 *
 * Both sides send the same commands: SET key:__rand_int__ xxx and GET of
 * it (redis-benchmark's defaults without -r), 16 to a round trip. The
 * server is the first of KEEL_TEST_REDIS (`make bench` starts it). */
#include <stdlib.h>
#include <string.h>

#include <keel/redis.h>

#include "bench.h"

#define DEPTH 16

typedef struct job {
    keel_redis *r;
    int get;
    uint64_t pipelines;
    int failed;
} job;

static void *run(void *arg)
{
    job *j = arg;
    static const char *set[3] = {"SET", "key:__rand_int__", "xxx"};
    static const char *get[2] = {"GET", "key:__rand_int__"};
    static const size_t setl[3] = {3, 16, 3}, getl[2] = {3, 16};
    keel_redis_cmd cmds[DEPTH];
    for (uint64_t p = 0; p < j->pipelines; p++) {
        for (int i = 0; i < DEPTH; i++)
            cmds[i] = (keel_redis_cmd){.key = set[1], .keylen = setl[1], .argc = j->get ? 2 : 3,
                                       .argv = j->get ? get : set, .argvlen = j->get ? getl : setl};
        if (keel_redis_pipeline(j->r, cmds, DEPTH) != 0)
            j->failed = 1;
        for (int i = 0; i < DEPTH; i++)
            if (cmds[i].reply)
                freeReplyObject(cmds[i].reply);
    }
    return NULL;
}

/* redis-benchmark's requests per second for one test, from its CSV. */
static double reference(const char *host, int port, const char *test, int clients, uint64_t n)
{
    char cmd[256], line[256];
    snprintf(cmd, sizeof cmd,
             "redis-benchmark -h %s -p %d -P %d -c %d -n %llu -t %s --csv -q 2>/dev/null", host,
             port, DEPTH, clients, (unsigned long long)n, test);
    FILE *f = popen(cmd, "r");
    double rps = 0;
    while (f && fgets(line, sizeof line, f))
        if (line[0] == '"' && strncmp(line, "\"test\"", 6) != 0) {
            const char *comma = strchr(line, ',');
            if (comma)
                rps = strtod(comma + 2, NULL); /* skip ," */
        }
    if (f)
        pclose(f);
    return rps;
}

int main(void)
{
    const char *env = getenv("KEEL_TEST_REDIS");
    if (!env || !*env) {
        fprintf(stderr, "bench/redis: KEEL_TEST_REDIS is not set (run it through `make bench`)\n");
        return 1;
    }
    char host[64] = "127.0.0.1";
    int port = 6379;
    if (sscanf(env, "%63[^:]:%d", host, &port) != 2) {
        fprintf(stderr, "bench/redis: KEEL_TEST_REDIS=%s is not host:port,...\n", env);
        return 1;
    }
    char url[96];
    snprintf(url, sizeof url, "redis://%s:%d", host, port);
    const char *nodes[1] = {url};
    keel_redis *r;
    keel_redis_opts o = {.nodes = nodes, .nnodes = 1, .conns_per_node = 4};
    if (keel_redis_create(&r, &o) != 0)
        return 1;

    uint64_t n = bench_iters(800000) / DEPTH * DEPTH;
    if (n < DEPTH)
        n = DEPTH;
    bench_section("redis: pipelined requests per second, -P 16, vs redis-benchmark");
    int status = 0;
    for (int clients = 1; clients <= 4; clients *= 4) {
        for (int get = 0; get <= 1; get++) {
            const char *test = get ? "get" : "set";
            double ref = reference(host, port, test, clients, n);
            job jobs[4];
            for (int i = 0; i < clients; i++)
                jobs[i] = (job){r, get, n / DEPTH / (uint64_t)clients, 0};
            uint64_t ns = bench_threads(clients, run, jobs, sizeof(job));
            for (int i = 0; i < clients; i++)
                status |= jobs[i].failed;
            double rps = (double)(n / DEPTH / (uint64_t)clients * DEPTH * (uint64_t)clients) /
                         ((double)ns / 1e9);
            char what[64];
            snprintf(what, sizeof what, "%s, %d connection%s", get ? "GET" : "SET", clients,
                     clients > 1 ? "s" : "");
            if (ref > 0)
                bench_row(what, rps / 1000, "k req/s", "redis-benchmark", ref / 1000, ">= 0.8x");
            else
                printf("%-44s %10.2f k req/s | redis-benchmark did not run\n", what, rps / 1000);
        }
    }
    keel_redis_destroy(r);
    if (status)
        fprintf(stderr, "bench/redis: some pipelines failed\n");
    return status;
}
