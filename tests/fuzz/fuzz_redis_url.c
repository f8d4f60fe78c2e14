/* tests/fuzz/fuzz_redis_url.c — the Redis node URL parser (the internal
 * keel__redis_url(), from libkeel.a) and keel_redis_create() over up to
 * four URLs. Nothing connects: connections are made lazily.
 *
 * Input: text up to its first NUL. The whole text is one URL for the
 * parser, e.g. `redis://u:p@[::1]:6380/2` or `unix:///tmp/r.sock?db=1`;
 * split at newlines it is the node list (the fourth node takes the rest).
 *
 * Checks: a parsed URL has a host or a socket path, not both; a port in
 * 1..65535 with a host; a db in 0..65535; a path that fits a unix socket
 * address (a longer one was once accepted and cut short:
 * seeds/redis_url/unix-path-too-long). keel_redis_create() accepts a
 * single node exactly when the parser does, has as many nodes as given and
 * routes every key to one of them. */
#include <sys/un.h>

#include <keel/redis.h>

#include "fuzz.h"
#include "redis/redis_int.h"

#define SUN_PATH_MAX sizeof(((struct sockaddr_un *)0)->sun_path)

static int parse(const char *url)
{
    keel__rurl u;
    int rc = keel__redis_url(url, &u);
    if (rc == 0) {
        KF_CHECK(!u.host != !u.path, "host %s, path %s", u.host ? u.host : "-", u.path ? u.path : "-");
        KF_CHECK(!u.host || (u.port >= 1 && u.port <= 65535), "port %d", u.port);
        KF_CHECK(u.db >= 0 && u.db <= 65535, "db %d", u.db);
        KF_CHECK(!u.path || strlen(u.path) < SUN_PATH_MAX, "a path of %zu bytes", strlen(u.path));
    }
    keel__redis_url_free(&u);
    return rc;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = kf_cstr(data, size);
    int parsed = parse(text);

    const char *nodes[4];
    size_t n = 0;
    for (char *p = text; n < 4;) {
        nodes[n++] = p;
        char *nl = strchr(p, '\n');
        if (!nl)
            break;
        *nl = '\0';
        p = nl + 1;
    }
    keel_redis_opts o = {.nodes = nodes, .nnodes = n, .connect_timeout_ns = 1000000,
                         .command_timeout_ns = 1000000};
    keel_redis *r = NULL;
    int created = keel_redis_create(&r, &o);
    KF_CHECK(n > 1 || (created == 0) == (parsed == 0), "create returned %d, the parser %d", created, parsed);
    if (created == 0) {
        KF_CHECK(keel_redis_nodes(r) == n, "%zu nodes of %zu", keel_redis_nodes(r), n);
        size_t node = keel_redis_node_of(r, data, size);
        KF_CHECK(node < n, "key routed to node %zu of %zu", node, n);
        keel_redis_destroy(r);
    }
    free(text);
    return 0;
}
