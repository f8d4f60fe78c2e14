/* examples/cache.c — a read-through cache over three tiers: L1 in this
 * process, L2 Redis, L3 PostgreSQL, a loader behind them; a stampede of
 * threads loads once; tags and prefixes invalidate.
 *
 * Redis is the first of KEEL_TEST_REDIS and PostgreSQL KEEL_TEST_PG (both
 * set by `make demo`); without them the cache runs on L1 alone. */
#include <libpq-fe.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <keel/cache.h>
#include <keel/pg.h>
#include <keel/redis.h>

static atomic_int loads;

/* The slow source of truth: here, a made-up profile after a short wait. */
static int load_profile(const void *key, size_t klen, keel_cache_load *ld, void *ud)
{
    (void)ud;
    atomic_fetch_add(&loads, 1);
    struct timespec ts = {0, 50000000};
    nanosleep(&ts, NULL);
    if (klen < 5 || memcmp(key, "user:", 5) != 0)
        return KEEL_ENOTFOUND; /* remembered as absent for a while */
    char v[64];
    int n = snprintf(v, sizeof v, "{\"id\":\"%.*s\",\"plan\":\"pro\"}", (int)klen, (const char *)key);
    const char *tags[1] = {"profiles"};
    return keel_cache_load_set(ld, v, (size_t)n, 60ull * 1000000000u, tags, 1);
}

static void *reader(void *arg)
{
    keel_cache *c = arg;
    char v[128];
    size_t len;
    keel_cache_get(c, "user:42", 7, v, sizeof v, &len);
    return NULL;
}

int main(void)
{
    const char *renv = getenv("KEEL_TEST_REDIS"), *penv = getenv("KEEL_TEST_PG");
    keel_redis *redis = NULL;
    keel_pg *pg = NULL;
    if (renv && *renv) {
        char url[128];
        snprintf(url, sizeof url, "redis://%.*s", (int)strcspn(renv, ","), renv);
        const char *nodes[1] = {url};
        keel_redis_opts ro = {.nodes = nodes, .nnodes = 1};
        if (keel_redis_create(&redis, &ro) != 0)
            redis = NULL;
    }
    if (penv && *penv) {
        keel_pg_opts po = {.primary = penv, .manual_health = 1};
        if (keel_pg_create(&pg, &po) != 0 || keel_pg_check(pg) != 0) {
            keel_pg_destroy(pg);
            pg = NULL;
        }
    }
    char prefix[48], table[48];
    snprintf(prefix, sizeof prefix, "example:%ld:", (long)time(NULL));
    snprintf(table, sizeof table, "example_cache_%ld", (long)time(NULL));
    keel_cache *c;
    keel_cache_opts o = {.redis = redis, .redis_prefix = prefix, .pg = pg, .table = table,
                         .loader = load_profile, .l1_max_ttl_ns = 5ull * 1000000000u};
    int rc = keel_cache_create(&c, &o);
    if (rc == 0)
        rc = keel_cache_create_schema(c);
    if (rc) {
        fprintf(stderr, "keel_cache: %s\n", keel_strerror(rc));
        return 1;
    }
    printf("tiers: L1%s%s\n", redis ? " + L2 Redis" : "", pg ? " + L3 PostgreSQL" : "");

    pthread_t t[8]; /* a stampede on a cold key */
    int started = 0;
    while (started < 8 && pthread_create(&t[started], NULL, reader, c) == 0)
        started++;
    for (int i = 0; i < started; i++)
        pthread_join(t[i], NULL);
    printf("8 threads asked for user:42 at once: the loader ran %d time(s)\n", atomic_load(&loads));

    char v[128];
    size_t len;
    int bad = 0;
    rc = keel_cache_get(c, "user:42", 7, v, sizeof v, &len);
    bad |= rc != 0;
    printf("user:42 -> %.*s\n", rc ? 0 : (int)len, rc ? keel_err_name(rc) : v);
    printf("order:7 -> %s (and cached as absent)\n", keel_err_name(keel_cache_get(c, "order:7", 7, v, sizeof v, &len)));
    if ((rc = keel_cache_set(c, "user:43", 7, "{\"id\":\"user:43\"}", 16, 0, (const char *[]){"profiles"},
                             1)) ||
        (rc = keel_cache_invalidate_tag(c, "profiles"))) { /* every tier, every process */
        fprintf(stderr, "set or invalidate: %s\n", keel_strerror(rc));
        bad = 1;
    }
    if ((rc = keel_cache_get(c, "user:42", 7, v, sizeof v, &len)) != 0) {
        fprintf(stderr, "user:42 again: %s\n", keel_strerror(rc));
        bad = 1;
    }
    printf("after invalidating the tag, user:42 was loaded again: %d loads\n", atomic_load(&loads));
    if ((rc = keel_cache_invalidate_prefix(c, "user:", 5)) != 0) {
        fprintf(stderr, "invalidate prefix: %s\n", keel_strerror(rc));
        bad = 1;
    }

    keel_cache_stats st;
    keel_cache_stats_get(c, &st);
    printf("hits L1 %llu, L2 %llu, L3 %llu; misses %llu; loads %llu\n", (unsigned long long)st.hits_l1,
           (unsigned long long)st.hits_l2, (unsigned long long)st.hits_l3, (unsigned long long)st.misses,
           (unsigned long long)st.loads);
    keel_cache_destroy(c);
    if (pg) { /* the example's table goes; a real service keeps it */
        char sql[128];
        snprintf(sql, sizeof sql, "DROP TABLE \"%s\"", table);
        PGresult *r = NULL;
        if ((rc = keel_pg_exec(pg, KEEL_PG_WRITE, sql, NULL, &r)) != 0) {
            fprintf(stderr, "%s: %s\n", sql, keel_strerror(rc));
            bad = 1;
        }
        PQclear(r);
    }
    keel_pg_destroy(pg);
    keel_redis_destroy(redis);
    return atomic_load(&loads) == 3 && !bad ? 0 : 1;
}
