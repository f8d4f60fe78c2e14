/* tests/harness.c — helpers shared by the Check suites. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"

int kt_run(Suite *s)
{
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? 0 : 1;
}

const char *kt_env(const char *name)
{
    const char *v = getenv(name);
    ck_assert_msg(v != NULL && *v != '\0',
                  "%s is not set: this test needs the servers that `make check` "
                  "starts (tests/servers.sh run <test>)", name);
    return v;
}

int kt_redis_nodes(void)
{
    const char *v = kt_env("KEEL_TEST_REDIS");
    int n = 1;
    for (; *v; v++)
        n += *v == ',';
    return n;
}

void kt_redis_node(int i, char *host, size_t hostlen, int *port)
{
    const char *v = kt_env("KEEL_TEST_REDIS");
    for (int k = 0; k < i; k++) {
        v = strchr(v, ',');
        ck_assert_msg(v != NULL, "KEEL_TEST_REDIS has no node %d", i);
        v++;
    }
    const char *colon = strchr(v, ':');
    ck_assert_msg(colon != NULL, "KEEL_TEST_REDIS node %d is not host:port", i);
    size_t n = (size_t)(colon - v);
    ck_assert(n < hostlen);
    memcpy(host, v, n);
    host[n] = '\0';
    *port = atoi(colon + 1);
}

void kt_server(const char *verb, const char *name)
{
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "'%s' %s %s", kt_env("KEEL_TEST_SERVERS"), verb, name);
    int rc = system(cmd);
    ck_assert_msg(rc == 0, "`%s` failed (status %d)", cmd, rc);
}

uint64_t kt_clock_now(void *clock)
{
    return atomic_load(&((kt_clock *)clock)->ns);
}

void kt_clock_advance(kt_clock *c, uint64_t ns)
{
    atomic_fetch_add(&c->ns, ns);
}
