/* tests/harness.h — what every Check suite shares: running a suite, the
 * servers from tests/servers.sh, and a fake clock. */
#ifndef KEEL_TEST_HARNESS_H
#define KEEL_TEST_HARNESS_H

#include <check.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

/* Check's ck_assert_msg, which every ck_assert_* goes through, reports each
 * assertion that passes to the runner (a write to its result file), so
 * that a test that crashes is placed at the last one passed. The suites
 * assert inside loops of many thousand steps, and under valgrind and the
 * sanitizers those writes were most of the run. Here a passed assertion
 * costs nothing; a crash is placed by the sanitizer's or valgrind's stack
 * trace instead. */
#undef ck_assert_msg
#define ck_assert_msg(expr, ...) \
    ((expr) ? (void)0 : _ck_assert_failed(__FILE__, __LINE__, "Assertion '" #expr "' failed", ##__VA_ARGS__))

/* Runs the suite (Check's fork mode unless CK_FORK=no) and returns the
 * process exit status: 0 when every test passed. */
int kt_run(Suite *s);

/* The value of a KEEL_TEST_* variable. A missing one fails the test with a
 * message saying how to get it (run through `make check`): a missing server
 * is a failure, never a silent skip. */
const char *kt_env(const char *name);

/* The i-th host:port of KEEL_TEST_REDIS, split into host and port. */
void kt_redis_node(int i, char *host, size_t hostlen, int *port);
int kt_redis_nodes(void);

/* "redis://host:port" of the first n (at most 8) nodes of KEEL_TEST_REDIS,
 * in a static array that the next call rewrites. */
const char *const *kt_redis_urls(int n);

/* A keel_redis over the first n nodes of KEEL_TEST_REDIS, with short
 * timeouts (connect 300 ms, commands cmd_timeout_ns) and a fail_timeout of
 * 1 ns, so that a restarted node is tried again at once. */
struct keel_redis;
struct keel_redis *kt_redis_open(int n, uint64_t cmd_timeout_ns);

/* Runs `tests/servers.sh VERB NAME` (stop-one, start-one, pause-one,
 * resume-one, promote); fails the test if it fails. */
void kt_server(const char *verb, const char *name);

/* A libpq connection of the test's own, to look behind keel_pg (PGconn:
 * include <libpq-fe.h> to use it further). Fails the test when it cannot
 * be made. */
struct pg_conn;
struct pg_conn *kt_pg_connect(const char *conninfo);
/* Runs sql (one or more statements); fails the test on an error. */
void kt_pg_exec(struct pg_conn *c, const char *sql);
/* The first value of a query's first row, as a number. */
long long kt_pg_number(struct pg_conn *c, const char *sql);

/* A server set of a test's own (PostgreSQL primary and replica, no Redis),
 * for faults that would spoil the shared one (a failover). Start it from
 * an unchecked fixture's setup and stop it in its teardown, which run in
 * Check's parent process: it is stopped even when a test fails. */
typedef struct kt_private {
    char dir[512];
    char pg[256], pg_replica[256]; /* conninfos */
} kt_private;
void kt_private_start(kt_private *p);
void kt_private_server(kt_private *p, const char *verb, const char *name);
void kt_private_stop(kt_private *p);

/* A clock for the `clock` options: time moves only when the test says. */
typedef struct kt_clock {
    _Atomic uint64_t ns;
} kt_clock;
uint64_t kt_clock_now(void *clock); /* a keel_clock_fn over a kt_clock */
void kt_clock_advance(kt_clock *c, uint64_t ns);

/* Sleeps for real: for waits on real servers and threads, never for the
 * time of the code under test (that comes from a kt_clock). */
void kt_nap(uint64_t ns);

/* Runs fn(arg) in a forked child, which is killed when it has not exited
 * within `seconds`; true when the child exited with status 0 (fn's return
 * value is its exit status). */
bool kt_in_child(int (*fn)(void *), void *arg, unsigned seconds);

/* Makes the calling process write numbers with a decimal comma
 * (LC_NUMERIC), as a host program may have chosen: a locale of only that,
 * built with localedef (libc-bin) in a temporary folder. Fails the test
 * when it cannot. */
void kt_decimal_comma(void);

/* A seeded random source for randomized tests (xorshift64*, its state
 * from splitmix64 of the seed), and the runs of such a test: `runs_env`
 * (e.g. "KT_LB_RUNS") may ask for more than n; `seed_env` replays one seed
 * alone (*n becomes 1), else run i has seed base + i. */
typedef struct kt_rng {
    uint64_t s;
} kt_rng;
kt_rng kt_rng_seed(uint64_t seed);
uint64_t kt_rng_next(kt_rng *g);
uint64_t kt_rng_below(kt_rng *g, uint64_t n); /* 0 for n 0 */
int kt_runs(const char *runs_env, int n);
uint64_t kt_seed(const char *seed_env, uint64_t base, int i, int *n);

#define KT_MS (1000000ull)
#define KT_S (1000000000ull)

#endif
