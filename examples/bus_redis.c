/* examples/bus_redis.c — events across processes through Redis Streams: a
 * consumer process in the group "mailer" and a publisher; an entry is
 * acknowledged only once its handler succeeded.
 *
 * The server is the first of KEEL_TEST_REDIS ("host:port,...", set by
 * `make demo`), else 127.0.0.1:6379. */
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <keel/bus.h>
#include <keel/redis.h>

#define N 5

static keel_redis *connect_redis(void)
{
    const char *env = getenv("KEEL_TEST_REDIS");
    char url[128];
    snprintf(url, sizeof url, "redis://%.*s", env && *env ? (int)strcspn(env, ",") : 14,
             env && *env ? env : "127.0.0.1:6379");
    const char *nodes[1] = {url};
    keel_redis *r;
    keel_redis_opts o = {.nodes = nodes, .nnodes = 1};
    return keel_redis_create(&r, &o) == 0 ? r : NULL;
}

static atomic_int handled;

static int send_mail(const keel_bus_msg *m, void *ud)
{
    (void)ud;
    printf("  consumer %d: %s %.*s (entry %s)\n", (int)getpid(), m->subject, (int)m->len,
           (const char *)m->data, m->id);
    fflush(stdout);
    handled++;
    return 0;
}

/* The consumer process: reads until it has handled N entries. */
static int consumer(const char *prefix, int ready)
{
    keel_redis *r = connect_redis();
    keel_bus *bus;
    keel_bus_opts o = {.redis = r, .prefix = prefix, .service = "mailer", .consumer = "mailer-1"};
    keel_bus_sub *s;
    keel_bus_sub_opts so = {.pattern = "user.*", .handler = send_mail};
    if (!r || keel_bus_create(&bus, &o) || keel_bus_subscribe(bus, &so, &s) || keel_bus_start(bus))
        return 1;
    if (write(ready, "!", 1) != 1)
        return 1;
    for (int waited = 0; handled < N && waited < 1000; waited++) {
        struct timespec ts = {0, 10000000};
        nanosleep(&ts, NULL);
    }
    keel_bus_destroy(bus);
    keel_redis_destroy(r);
    return handled == N ? 0 : 1;
}

int main(void)
{
    char prefix[64];
    snprintf(prefix, sizeof prefix, "example:bus:%d:", (int)getpid());
    int p[2];
    if (pipe(p) != 0)
        return 1;
    fflush(stdout);
    pid_t kid = fork();
    if (kid == 0)
        _exit(consumer(prefix, p[1]));
    char c;
    if (read(p[0], &c, 1) != 1) { /* the consumer's group exists */
        fprintf(stderr, "the consumer did not start: is Redis running?\n");
        return 1;
    }

    keel_redis *r = connect_redis();
    keel_bus *bus;
    keel_bus_opts o = {.redis = r, .prefix = prefix};
    if (!r || keel_bus_create(&bus, &o) != 0)
        return 1;
    const char *names[N] = {"ada", "grace", "edsger", "barbara", "ken"};
    for (int i = 0; i < N; i++) {
        char id[KEEL_BUS_ID_MAX];
        int rc = keel_bus_publish(bus, "user.created", names[i], strlen(names[i]), NULL, 0, id);
        printf("publisher %d: user.created %s -> %s\n", (int)getpid(), names[i], rc ? keel_strerror(rc) : id);
        fflush(stdout);
    }
    int st;
    waitpid(kid, &st, 0);
    printf("consumer %s\n", WIFEXITED(st) && WEXITSTATUS(st) == 0 ? "handled all 5" : "FAILED");
    char key[96];
    snprintf(key, sizeof key, "%s0", prefix);
    const char *del[] = {"DEL", key};
    size_t dl[] = {3, strlen(key)};
    redisReply *rep;
    if (keel_redis_command(r, key, strlen(key), 2, del, dl, &rep) == 0)
        freeReplyObject(rep);
    keel_bus_destroy(bus);
    keel_redis_destroy(r);
    return WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : 1;
}
