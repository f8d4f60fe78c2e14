/* tests/harness.c — helpers shared by the Check suites. */
#define _GNU_SOURCE
#include <libpq-fe.h>
#include <locale.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <keel/redis.h>

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

void kt_nap(uint64_t ns)
{
    struct timespec ts = {(time_t)(ns / 1000000000u), (long)(ns % 1000000000u)};
    while (nanosleep(&ts, &ts) != 0)
        ;
}

bool kt_in_child(int (*fn)(void *), void *arg, unsigned seconds)
{
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        signal(SIGALRM, SIG_DFL); /* not Check's handler */
        alarm(seconds);
        _exit(fn(arg));
    }
    int status;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

kt_rng kt_rng_seed(uint64_t seed)
{
    uint64_t z = seed + 0x9e3779b97f4a7c15u; /* splitmix64, then never 0 */
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return (kt_rng){(z ^ (z >> 31)) | 1};
}

uint64_t kt_rng_next(kt_rng *g)
{
    g->s ^= g->s >> 12;
    g->s ^= g->s << 25;
    g->s ^= g->s >> 27;
    return g->s * 0x2545f4914f6cdd1du;
}

uint64_t kt_rng_below(kt_rng *g, uint64_t n) { return n ? kt_rng_next(g) % n : 0; }

int kt_runs(const char *runs_env, int n)
{
    const char *runs = getenv(runs_env);
    return runs ? atoi(runs) : n;
}

uint64_t kt_seed(const char *seed_env, uint64_t base, int i, int *n)
{
    const char *only = getenv(seed_env);
    if (!only)
        return base + (uint64_t)i;
    *n = 1;
    return strtoull(only, NULL, 10);
}

int kt_redis_nodes(void)
{
    const char *v = kt_env("KEEL_TEST_REDIS");
    int n = 1;
    for (; *v; v++)
        n += *v == ',';
    return n;
}

const char *const *kt_redis_urls(int n)
{
    static char urls[8][96];
    static const char *u[8];
    ck_assert_int_le(n, 8);
    for (int i = 0; i < n; i++) {
        char host[64];
        int port;
        kt_redis_node(i, host, sizeof host, &port);
        snprintf(urls[i], sizeof urls[i], "redis://%s:%d", host, port);
        u[i] = urls[i];
    }
    return u;
}

struct keel_redis *kt_redis_open(int n, uint64_t cmd_timeout_ns)
{
    keel_redis *r;
    keel_redis_opts o = {.nodes = kt_redis_urls(n), .nnodes = (size_t)n, .connect_timeout_ns = 300 * KT_MS,
                         .command_timeout_ns = cmd_timeout_ns, .fail_timeout_ns = 1};
    ck_assert_int_eq(keel_redis_create(&r, &o), 0);
    return r;
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

PGconn *kt_pg_connect(const char *conninfo)
{
    PGconn *c = PQconnectdb(conninfo);
    ck_assert_msg(PQstatus(c) == CONNECTION_OK, "%s", PQerrorMessage(c));
    return c;
}

void kt_pg_exec(PGconn *c, const char *sql)
{
    PGresult *r = PQexec(c, sql);
    ck_assert_msg(PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK, "%s: %s", sql,
                  PQerrorMessage(c));
    PQclear(r);
}

long long kt_pg_number(PGconn *c, const char *sql)
{
    PGresult *r = PQexec(c, sql);
    ck_assert_msg(PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) > 0, "%s: %s", sql, PQerrorMessage(c));
    long long n = atoll(PQgetvalue(r, 0, 0));
    PQclear(r);
    return n;
}

void kt_private_start(kt_private *p)
{
    memset(p, 0, sizeof *p);
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "KEEL_TEST_REDIS_NODES=0 '%s' start", kt_env("KEEL_TEST_SERVERS"));
    FILE *f = popen(cmd, "r");
    ck_assert_msg(f != NULL, "cannot run %s", cmd);
    char line[512];
    while (fgets(line, sizeof line, f))
        snprintf(p->dir, sizeof p->dir, "%.*s", (int)strcspn(line, "\n"), line);
    int rc = pclose(f);
    ck_assert_msg(rc == 0 && p->dir[0], "`%s` failed (status %d)", cmd, rc);
    snprintf(cmd, sizeof cmd, "%s/env", p->dir);
    f = fopen(cmd, "r");
    ck_assert_msg(f != NULL, "no %s", cmd);
    while (fgets(line, sizeof line, f)) {
        char *v = strchr(line, '\'');
        if (!v)
            continue;
        v[strcspn(v + 1, "'") + 1] = '\0';
        if (strncmp(line, "export KEEL_TEST_PG=", 20) == 0)
            snprintf(p->pg, sizeof p->pg, "%s", v + 1);
        else if (strncmp(line, "export KEEL_TEST_PG_REPLICA=", 28) == 0)
            snprintf(p->pg_replica, sizeof p->pg_replica, "%s", v + 1);
    }
    fclose(f);
    ck_assert_msg(p->pg[0] && p->pg_replica[0], "%s/env names no PostgreSQL", p->dir);
}

void kt_private_server(kt_private *p, const char *verb, const char *name)
{
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "KEEL_TEST_DIR='%s' '%s' %s %s", p->dir, kt_env("KEEL_TEST_SERVERS"),
             verb, name);
    int rc = system(cmd);
    ck_assert_msg(rc == 0, "`%s` failed (status %d)", cmd, rc);
}

void kt_private_stop(kt_private *p)
{
    if (p->dir[0])
        kt_private_server(p, "stop", "");
    p->dir[0] = '\0';
}

uint64_t kt_clock_now(void *clock)
{
    return atomic_load(&((kt_clock *)clock)->ns);
}

void kt_clock_advance(kt_clock *c, uint64_t ns)
{
    atomic_fetch_add(&c->ns, ns);
}

void kt_decimal_comma(void)
{
    char dir[] = "/tmp/keel-locale-XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    char path[128], cmd[512];
    snprintf(path, sizeof path, "%s/comma.def", dir);
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fputs("LC_NUMERIC\ndecimal_point \",\"\nthousands_sep \"\"\ngrouping -1\nEND LC_NUMERIC\n", f);
    fclose(f);
    snprintf(path, sizeof path, "%s/ascii.map", dir);
    ck_assert_ptr_nonnull(f = fopen(path, "w"));
    fputs("<code_set_name> KT\n<escape_char> /\nCHARMAP\n<U002C> /x2c COMMA\n<U002E> /x2e FULL STOP\nEND CHARMAP\n", f);
    fclose(f);
    /* -c: the definition is partial on purpose; localedef says so, loudly */
    snprintf(cmd, sizeof cmd, "localedef -c -i %s/comma.def -f %s/ascii.map %s/kt_COMMA >/dev/null 2>&1", dir, dir,
             dir);
    ck_assert_int_ne(system(cmd), -1);
    setenv("LOCPATH", dir, 1);
    ck_assert_msg(setlocale(LC_NUMERIC, "kt_COMMA") != NULL, "localedef made no decimal-comma locale in %s", dir);
    char probe[8];
    snprintf(probe, sizeof probe, "%.1f", 1.5);
    ck_assert_str_eq(probe, "1,5");
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    ck_assert_int_eq(system(cmd), 0);
}
