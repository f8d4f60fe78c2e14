/* examples/limiter.c — a per-client rate limit: a burst of requests and
 * the response header fields each one gets, in process and through Redis.
 *
 * In process, time is simulated (an injected clock). Through Redis (the
 * first of KEEL_TEST_REDIS, set by `make demo`), the Redis server's clock
 * decides, as it would for every instance of a service sharing a limit. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <keel/limiter.h>
#include <keel/redis.h>

static uint64_t now_ns = 1000000000000ull;
static uint64_t fake_clock(void *ud)
{
    (void)ud;
    return now_ns;
}

static void request(keel_limiter *l, const char *client, int n)
{
    keel_limit_result r;
    int rc = keel_limiter_take(l, client, strlen(client), 1, &r);
    char headers[512];
    size_t len;
    keel_limiter_headers(l, &r, headers, sizeof headers, &len);
    printf("request %d from %-5s %s%s\n", n, client, rc ? keel_strerror(rc) : "",
           r.allowed ? "200 OK" : "429 Too Many Requests");
    if (n == 1 || !r.allowed) /* the whole set once, then when it says no */
        for (char *line = strtok(headers, "\r\n"); line; line = strtok(NULL, "\r\n"))
            printf("    %s\n", line);
}

int main(void)
{
    /* 5 requests per 10 s per client, exactly (a sliding log). */
    keel_limiter *l;
    keel_limiter_opts o = {.algo = KEEL_LIMIT_SLIDING_LOG, .limit = 5, .window_ns = 10000000000ull,
                           .name = "per-client", .clock = fake_clock};
    if (keel_limiter_create(&l, &o) != 0)
        return 1;
    printf("== in process: 5 per 10 s; alice sends 7 at once, then 1 more 4 s later\n");
    for (int i = 1; i <= 7; i++)
        request(l, "alice", i);
    now_ns += 4000000000ull;
    request(l, "alice", 8);
    request(l, "bob", 1); /* every client has its own limit */
    keel_limiter_destroy(l);

    const char *env = getenv("KEEL_TEST_REDIS");
    if (!env || !*env)
        return 0;
    char url[128];
    snprintf(url, sizeof url, "redis://%.*s", (int)strcspn(env, ","), env);
    const char *nodes[1] = {url};
    keel_redis *redis;
    keel_redis_opts ro = {.nodes = nodes, .nnodes = 1};
    if (keel_redis_create(&redis, &ro) != 0)
        return 1;
    /* GCRA through Redis: 2 a second, bursts of 3; if Redis fails, decide
     * in this process rather than let everything through. */
    keel_limiter_opts g = {.algo = KEEL_LIMIT_GCRA, .limit = 2, .window_ns = 1000000000, .burst = 3,
                           .name = "api", .redis = redis, .prefix = "example:rl:",
                           .on_store_error = KEEL_LIMIT_FALL_BACK};
    if (keel_limiter_create(&l, &g) != 0)
        return 1;
    keel_limiter_reset(l, "carol", 5);
    printf("== through Redis: 2 per second, bursts of 3; carol sends 4 at once\n");
    for (int i = 1; i <= 4; i++)
        request(l, "carol", i);
    keel_limiter_destroy(l);
    keel_redis_destroy(redis);
    return 0;
}
