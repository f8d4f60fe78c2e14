/* tests/test_cqrs.c — keel_cqrs: registration and dispatch errors;
 * middleware order and short-circuit; optimistic concurrency from two
 * threads (one winner per version) and the retry option; idempotent
 * repeats, also across two processes; events on the bus after commit;
 * and on a real PostgreSQL: an append held open while another commits
 * (no projection skips or repeats an event), a projection process killed
 * mid-catch-up, queries on the replica with read-your-writes, the memory
 * and PostgreSQL stores agreeing, monthly partitions (made a month ahead
 * by ordinary use; a saga across a month's end; a stream whose month was
 * dropped goes on), a missing schema; two runners of one projection at
 * once, each event applied once; names at and over their limits;
 * commands with idempotency keys and a projection through a restart of
 * the primary, and an append that timed out sent again; a partitioned
 * load that sees a writer's events and version together; a reset during
 * a run; a store opened with the other partitioning refused; a hash seed
 * per memory store. */
#define _GNU_SOURCE
#include <libpq-fe.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <keel/bus.h>
#include <keel/cqrs.h>
#include <keel/pg.h>

#include "cqrs/cqrs_int.h"
#include "harness.h"

#define MS KT_MS
#define S KT_S

#define nap kt_nap

/* ---- the domain: counters and users ---- */

typedef struct app {
    _Atomic int calls;
} app;

/* inc: the payload names a counter stream; emits its next value. */
static int cmd_inc(keel_cqrs_ctx *x, const void *payload, size_t len, void *ud)
{
    app *a = ud;
    atomic_fetch_add(&a->calls, 1);
    char stream[64];
    snprintf(stream, sizeof stream, "%.*s", (int)len, (const char *)payload);
    const keel_cqrs_event *evs;
    size_t n;
    int rc = keel_cqrs_load(x, stream, &evs, &n);
    if (rc)
        return rc;
    for (size_t i = 0; i < n; i++) /* the history is dense and in order */
        if (evs[i].version != i + 1)
            return KEEL_EPROTO;
    uint64_t next = n + 1;
    rc = keel_cqrs_emit(x, stream, "counter.incremented", &next, sizeof next, "m", 1);
    return rc ? rc : keel_cqrs_reply(x, &next, sizeof next);
}

/* register: a user stream that must be new. */
static int cmd_register(keel_cqrs_ctx *x, const void *payload, size_t len, void *ud)
{
    app *a = ud;
    atomic_fetch_add(&a->calls, 1);
    char stream[96];
    snprintf(stream, sizeof stream, "user-%.*s", (int)len, (const char *)payload);
    int rc = keel_cqrs_emit(x, stream, "user.registered", payload, len, NULL, 0);
    return rc ? rc : keel_cqrs_reply(x, "welcome", 7);
}

static char *uniq(const char *what)
{
    static char p[64];
    static int n;
    snprintf(p, sizeof p, "t%d_%s%d_", (int)getpid(), what, n++);
    return p;
}

static keel_pg *open_pg(void)
{
    keel_pg *pg = NULL;
    const char *replicas[1] = {kt_env("KEEL_TEST_PG_REPLICA")};
    keel_pg_opts o = {.primary = kt_env("KEEL_TEST_PG"), .replicas = replicas, .nreplicas = 1,
                      .connect_timeout_ns = 2 * S, .acquire_timeout_ns = 5 * S, .query_timeout_ns = 20 * S,
                      .max_replica_lag_ns = 10 * S, .manual_health = 1, .conns_per_host = 4};
    ck_assert_int_eq(keel_pg_create(&pg, &o), 0);
    ck_assert_int_eq(keel_pg_check(pg), 0);
    return pg;
}

/* Runs a scenario written for both stores on PostgreSQL. */
static void with_pg(void (*scenario)(keel_pg *pg))
{
    keel_pg *pg = open_pg();
    scenario(pg);
    keel_pg_destroy(pg);
}

/* partition_by_month for the stores open_cqrs makes */
static int partitioned;

/* A cqrs over the memory store (pg NULL) or PostgreSQL with its schema. */
static keel_cqrs *open_cqrs(keel_pg *pg, const char *prefix, uint32_t retries, app *a)
{
    keel_cqrs *c;
    keel_cqrs_opts o = {.pg = pg, .prefix = prefix, .max_retries = retries, .read_your_writes = 1,
                        .partition_by_month = partitioned};
    ck_assert_int_eq(keel_cqrs_create(&c, &o), 0);
    ck_assert_int_eq(keel_cqrs_create_schema(c), 0);
    ck_assert_int_eq(keel_cqrs_command(c, "inc", cmd_inc, a), 0);
    ck_assert_int_eq(keel_cqrs_command(c, "register", cmd_register, a), 0);
    return c;
}

/* ---- dispatch ---- */

static int q_echo(keel_cqrs_ctx *x, const void *payload, size_t len, void *ud)
{
    (void)ud;
    return keel_cqrs_reply(x, payload, len);
}

static int q_misuse(keel_cqrs_ctx *x, const void *payload, size_t len, void *ud)
{
    (void)payload, (void)len, (void)ud;
    const keel_cqrs_event *e;
    size_t n;
    ck_assert_int_eq(keel_cqrs_load(x, "s", &e, &n), KEEL_EINVAL); /* not in a query */
    ck_assert_int_eq(keel_cqrs_emit(x, "s", "t", "", 0, NULL, 0), KEEL_EINVAL);
    ck_assert_ptr_null(keel_cqrs_conn(x)); /* the memory store has none */
    return 0;
}

static int cmd_bad_events(keel_cqrs_ctx *x, const void *payload, size_t len, void *ud)
{
    (void)payload, (void)len, (void)ud;
    char big[200];
    memset(big, 'a', sizeof big);
    big[sizeof big - 1] = '\0';
    ck_assert_int_eq(keel_cqrs_emit(x, "s", "a..b", "", 0, NULL, 0), KEEL_EINVAL);
    ck_assert_int_eq(keel_cqrs_emit(x, "s", "user.*", "", 0, NULL, 0), KEEL_EINVAL);
    ck_assert_int_eq(keel_cqrs_emit(x, "", "ok", "", 0, NULL, 0), KEEL_EINVAL);
    ck_assert_int_eq(keel_cqrs_emit(x, "s", big, "", 0, NULL, 0), KEEL_EINVAL); /* over 128 */
    ck_assert_int_eq(keel_cqrs_emit(x, "s", "ok", NULL, 3, NULL, 0), KEEL_EINVAL);
    ck_assert_int_eq(keel_cqrs_emit(x, "s", "ok", big, 100, NULL, 0), KEEL_EINVAL); /* over max_payload */
    ck_assert_int_eq(keel_cqrs_reply(x, big, 100), KEEL_EINVAL);
    return 0;
}

/* Stream ids and idempotency keys come from clients: each memory store
 * hashes them with its own seed, so colliding ids found offline for one
 * store (or one build) share no chain in another. */
START_TEST(each_memory_store_hashes_with_its_own_seed)
{
    keel_cqrs *c[2];
    for (int i = 0; i < 2; i++)
        ck_assert_int_eq(keel_cqrs_create(&c[i], NULL), 0);
    ck_assert(keel__cqrs_mem_seed(c[0]) != keel__cqrs_mem_seed(c[1]));
    for (int i = 0; i < 2; i++)
        keel_cqrs_destroy(c[i]);
}
END_TEST

START_TEST(registration_and_dispatch_errors)
{
    app a = {0};
    keel_cqrs *c;
    keel_cqrs_opts o = {.max_payload = 16};
    ck_assert_int_eq(keel_cqrs_create(&c, &o), 0);
    ck_assert_int_eq(keel_cqrs_command(c, "inc", cmd_inc, &a), 0);
    ck_assert_int_eq(keel_cqrs_command(c, "inc", cmd_inc, &a), KEEL_EEXIST);
    ck_assert_int_eq(keel_cqrs_query(c, "inc", q_echo, NULL), 0); /* queries have their own names */
    ck_assert_int_eq(keel_cqrs_query(c, "inc", q_echo, NULL), KEEL_EEXIST);
    ck_assert_int_eq(keel_cqrs_query(c, "misuse", q_misuse, NULL), 0);
    ck_assert_int_eq(keel_cqrs_command(c, "bad", cmd_bad_events, NULL), 0);
    char long_name[200];
    memset(long_name, 'n', sizeof long_name);
    long_name[sizeof long_name - 1] = '\0';
    ck_assert_int_eq(keel_cqrs_command(c, long_name, cmd_inc, &a), KEEL_EINVAL);
    ck_assert_int_eq(keel_cqrs_command(c, "", cmd_inc, &a), KEEL_EINVAL);
    /* idempotency keys are stored as name, 0x1f, key: a name with 0x1f
     * would share keys with another command */
    ck_assert_int_eq(keel_cqrs_command(c, "inc\x1fx", cmd_inc, &a), KEEL_EINVAL);
    ck_assert_int_eq(keel_cqrs_command(c, NULL, cmd_inc, &a), KEEL_EINVAL);
    ck_assert_int_eq(keel_cqrs_command(c, "x", NULL, &a), KEEL_EINVAL);
    ck_assert_int_eq(keel_cqrs_command(NULL, "x", cmd_inc, &a), KEEL_EINVAL);
    keel_cqrs_result r;
    ck_assert_int_eq(keel_cqrs_send(c, "nope", "s", 1, NULL, &r), KEEL_ENOTFOUND);
    ck_assert_int_eq(keel_cqrs_ask(c, "nope", "s", 1, 0, &r), KEEL_ENOTFOUND);
    ck_assert_int_eq(keel_cqrs_ask(c, "bad", "s", 1, 0, &r), KEEL_ENOTFOUND); /* a command, not a query */
    ck_assert_int_eq(keel_cqrs_send(c, long_name, "s", 1, NULL, &r), KEEL_EINVAL);
    ck_assert_int_eq(keel_cqrs_send(c, "inc", "0123456789abcdefX", 17, NULL, &r), KEEL_EINVAL); /* > 16 */
    ck_assert_int_eq(keel_cqrs_send(c, "inc", NULL, 3, NULL, &r), KEEL_EINVAL);
    ck_assert_int_eq(keel_cqrs_send(c, "inc", "s", 1, "", &r), KEEL_EINVAL); /* an empty key */
    ck_assert_int_eq(atomic_load(&a.calls), 0);
    ck_assert_int_eq(keel_cqrs_send(c, "inc", "s", 1, NULL, &r), 0);
    ck_assert_uint_eq(r.len, 8);
    ck_assert_uint_eq(*(uint64_t *)r.reply, 1);
    ck_assert_uint_eq(r.position, 1);
    keel_cqrs_result_free(&r);
    ck_assert_ptr_null(r.reply);
    ck_assert_int_eq(keel_cqrs_ask(c, "inc", "echo", 4, 0, &r), 0);
    ck_assert_int_eq(memcmp(r.reply, "echo", 4), 0);
    keel_cqrs_result_free(&r);
    ck_assert_int_eq(keel_cqrs_ask(c, "misuse", "", 0, 0, NULL), 0);
    ck_assert_int_eq(keel_cqrs_send(c, "bad", "", 0, NULL, NULL), 0);
    keel_cqrs_opts bad = {.prefix = "Bad-Prefix"};
    ck_assert_int_eq(keel_cqrs_create(&c, &bad) == KEEL_EINVAL, 1);
    keel_cqrs_stats st;
    keel_cqrs_stats_get(c, &st);
    ck_assert_uint_eq(st.appended, 1);
    keel_cqrs_destroy(c);
    keel_cqrs_destroy(NULL);
}
END_TEST

/* ---- middleware ---- */

typedef struct trail {
    char log[64];
    size_t n;
} trail;

static int link_a(keel_cqrs_req *q, void *ud)
{
    trail *t = ud;
    t->log[t->n++] = keel_cqrs_req_kind(q) == KEEL_CQRS_COMMAND ? 'A' : 'a';
    int rc = keel_cqrs_next(q);
    t->log[t->n++] = ')';
    return rc;
}

static int link_b(keel_cqrs_req *q, void *ud) /* commands only: refuses "deny" */
{
    trail *t = ud;
    t->log[t->n++] = 'B';
    size_t len;
    const char *p = keel_cqrs_req_payload(q, &len);
    if (len == 4 && memcmp(p, "deny", 4) == 0)
        return KEEL_ESTATE;
    ck_assert_str_eq(keel_cqrs_req_name(q), "inc");
    return keel_cqrs_next(q);
}

static int link_c(keel_cqrs_req *q, void *ud) /* queries only */
{
    trail *t = ud;
    t->log[t->n++] = 'c';
    return keel_cqrs_next(q);
}

START_TEST(middleware_runs_in_order_and_can_stop_a_dispatch)
{
    app a = {0};
    trail t = {{0}, 0};
    keel_cqrs *c = open_cqrs(NULL, NULL, 0, &a);
    ck_assert_int_eq(keel_cqrs_query(c, "echo", q_echo, NULL), 0);
    ck_assert_int_eq(keel_cqrs_use(c, KEEL_CQRS_COMMAND | KEEL_CQRS_QUERY, link_a, &t), 0);
    ck_assert_int_eq(keel_cqrs_use(c, KEEL_CQRS_COMMAND, link_b, &t), 0);
    ck_assert_int_eq(keel_cqrs_use(c, KEEL_CQRS_QUERY, link_c, &t), 0);
    ck_assert_int_eq(keel_cqrs_use(c, 0, link_c, &t), KEEL_EINVAL);
    ck_assert_int_eq(keel_cqrs_use(c, 8, link_c, &t), KEEL_EINVAL);
    ck_assert_int_eq(keel_cqrs_send(c, "inc", "s1", 2, NULL, NULL), 0);
    ck_assert_int_eq(keel_cqrs_ask(c, "echo", "x", 1, 0, NULL), 0);
    ck_assert_int_eq(keel_cqrs_send(c, "inc", "deny", 4, NULL, NULL), KEEL_ESTATE);
    t.log[t.n] = '\0';
    ck_assert_str_eq(t.log, "AB)ac)AB)");
    ck_assert_int_eq(atomic_load(&a.calls), 1); /* the denied one never reached its handler */
    for (int i = 3; i < 32; i++)
        ck_assert_int_eq(keel_cqrs_use(c, KEEL_CQRS_QUERY, link_c, &t), 0);
    ck_assert_int_eq(keel_cqrs_use(c, KEEL_CQRS_QUERY, link_c, &t), KEEL_ELIMIT);
    keel_cqrs_destroy(c);
}
END_TEST

/* A retry link: runs the rest twice. A later link must run each time. */
static int link_twice(keel_cqrs_req *q, void *ud)
{
    (void)ud;
    int rc = keel_cqrs_next(q);
    return rc ? rc : keel_cqrs_next(q);
}

static int link_count(keel_cqrs_req *q, void *ud)
{
    ++*(int *)ud;
    return keel_cqrs_next(q);
}

START_TEST(a_link_may_run_the_rest_of_the_chain_twice)
{
    app a = {0};
    int later = 0;
    keel_cqrs *c = open_cqrs(NULL, NULL, 0, &a);
    ck_assert_int_eq(keel_cqrs_use(c, KEEL_CQRS_COMMAND, link_twice, NULL), 0);
    ck_assert_int_eq(keel_cqrs_use(c, KEEL_CQRS_COMMAND, link_count, &later), 0);
    keel_cqrs_result r;
    ck_assert_int_eq(keel_cqrs_send(c, "inc", "twice", 5, NULL, &r), 0);
    ck_assert_int_eq(later, 2);
    ck_assert_int_eq(atomic_load(&a.calls), 2);
    ck_assert_uint_eq(*(uint64_t *)r.reply, 2); /* the second run's reply; the first's freed */
    keel_cqrs_result_free(&r);
    ck_assert_ptr_null(keel_cqrs_req_name(NULL));
    keel_cqrs_destroy(c);
}
END_TEST

/* A link that lets the command run, then fails the dispatch (an audit
 * that could not be written, say). */
static int link_fail_after(keel_cqrs_req *q, void *ud)
{
    (void)ud;
    int rc = keel_cqrs_next(q);
    return rc ? rc : KEEL_ESTATE;
}

/* A failed dispatch leaves nothing of the run in res: no reply, and no
 * position, lsn or repeated flag the caller could take for an outcome. */
START_TEST(a_failed_dispatch_leaves_res_empty)
{
    app a = {0};
    keel_cqrs *c = open_cqrs(NULL, NULL, 0, &a);
    ck_assert_int_eq(keel_cqrs_send(c, "inc", "f", 1, "key-1", NULL), 0);
    ck_assert_int_eq(keel_cqrs_use(c, KEEL_CQRS_COMMAND, link_fail_after, NULL), 0);
    keel_cqrs_result r;
    ck_assert_int_eq(keel_cqrs_send(c, "inc", "f", 1, NULL, &r), KEEL_ESTATE); /* appended, then failed */
    ck_assert_ptr_null(r.reply);
    ck_assert_uint_eq(r.len, 0);
    ck_assert_uint_eq(r.position, 0);
    ck_assert_int_eq(keel_cqrs_send(c, "inc", "f", 1, "key-1", &r), KEEL_ESTATE); /* a repeat, then failed */
    ck_assert_ptr_null(r.reply);
    ck_assert_int_eq(r.repeated, 0);
    ck_assert_uint_eq(r.position, 0);
    keel_cqrs_destroy(c);
}
END_TEST

START_TEST(idempotency_keys_belong_to_their_command)
{
    app a = {0};
    keel_cqrs *c = open_cqrs(NULL, NULL, 0, &a);
    keel_cqrs_result r;
    ck_assert_int_eq(keel_cqrs_send(c, "inc", "k", 1, "same-key", NULL), 0);
    ck_assert_int_eq(keel_cqrs_send(c, "register", "bob", 3, "same-key", &r), 0);
    ck_assert_int_eq(r.repeated, 0); /* another command: it runs */
    ck_assert_int_eq(memcmp(r.reply, "welcome", 7), 0);
    keel_cqrs_result_free(&r);
    ck_assert_int_eq(atomic_load(&a.calls), 2);
    keel_cqrs_opts bad[] = {{.subject_prefix = "a..b."}, {.subject_prefix = "x.*."}, {.max_payload = (size_t)1 << 31}};
    keel_cqrs *d;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        ck_assert_int_eq(keel_cqrs_create(&d, &bad[i]), KEEL_EINVAL);
    keel_cqrs_destroy(c);
}
END_TEST

/* Fails on the event at position `fail_at` once. */
typedef struct flaky {
    uint64_t fail_at;
    size_t n;
} flaky;

static int apply_flaky(keel_cqrs_ctx *x, const keel_cqrs_event *e, void *ud)
{
    (void)x;
    flaky *f = ud;
    if (e->position == f->fail_at) {
        f->fail_at = 0;
        return KEEL_EBACKEND;
    }
    f->n++;
    return 0;
}

START_TEST(projections_keep_their_own_checkpoints)
{
    app a = {0};
    keel_cqrs *c = open_cqrs(NULL, NULL, 0, &a);
    for (int i = 0; i < 10; i++)
        ck_assert_int_eq(keel_cqrs_send(c, "inc", "s", 1, NULL, NULL), 0);
    flaky fa = {4, 0}, fb = {0, 0};
    keel_cqrs_projection *pa, *pb;
    keel_cqrs_projection_opts oa = {.name = "a", .handler = apply_flaky, .ud = &fa, .batch = 3};
    keel_cqrs_projection_opts ob = {.name = "b", .handler = apply_flaky, .ud = &fb, .batch = 3};
    ck_assert_int_eq(keel_cqrs_projection_create(c, &oa, &pa), 0);
    ck_assert_int_eq(keel_cqrs_projection_create(c, &ob, &pb), 0);
    size_t n;
    ck_assert_int_eq(keel_cqrs_projection_run(pa, &n), KEEL_EBACKEND);
    ck_assert_uint_eq(n, 3); /* 1..3 applied, stopped at 4 */
    ck_assert_uint_eq(keel_cqrs_projection_position(pa), 3);
    ck_assert_int_eq(keel_cqrs_projection_run(pb, &n), 0);
    ck_assert_uint_eq(n, 10);
    ck_assert_int_eq(keel_cqrs_projection_run(pa, &n), 0);
    ck_assert_uint_eq(n, 7);
    ck_assert_uint_eq(fa.n, 10); /* each once */
    ck_assert_uint_eq(keel_cqrs_projection_position(pa), 10);
    ck_assert_uint_eq(keel_cqrs_projection_position(pb), 10);
    keel_cqrs_projection_destroy(pa);
    keel_cqrs_projection_destroy(pb);
    keel_cqrs_destroy(c);
}
END_TEST

/* ---- concurrency ---- */

typedef struct racer {
    keel_cqrs *c;
    int ok, conflicts, other;
} racer;

static void *race(void *arg)
{
    racer *r = arg;
    for (int i = 0; i < 150; i++) {
        int rc = keel_cqrs_send(r->c, "inc", "counter", 7, NULL, NULL);
        if (rc == 0)
            r->ok++;
        else if (rc == KEEL_ECONFLICT)
            r->conflicts++;
        else
            r->other++;
    }
    return NULL;
}

/* The stream's events, checked dense, each value its version (one winner
 * per version); returns how many. */
static size_t check_counter(keel_cqrs *c)
{
    size_t n = 0;
    ck_assert_int_eq(keel_cqrs_send(c, "inc", "counter", 7, NULL, NULL), 0); /* one more, reading them all */
    keel_cqrs_result r;
    ck_assert_int_eq(keel_cqrs_send(c, "inc", "counter", 7, NULL, &r), 0);
    memcpy(&n, r.reply, sizeof n);
    keel_cqrs_result_free(&r);
    return n - 2;
}

static void two_threads(keel_pg *pg, uint32_t retries)
{
    app a = {0};
    keel_cqrs *c = open_cqrs(pg, uniq("race"), retries, &a);
    racer r[2] = {{c, 0, 0, 0}, {c, 0, 0, 0}};
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&t[i], NULL, race, &r[i]);
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
    ck_assert_int_eq(r[0].other + r[1].other, 0);
    ck_assert_int_eq(r[0].ok + r[0].conflicts + r[1].ok + r[1].conflicts, 300);
    size_t n = check_counter(c); /* cmd_inc fails on a gap: the history is dense */
    ck_assert_uint_eq(n, (size_t)(r[0].ok + r[1].ok));
    keel_cqrs_stats st;
    keel_cqrs_stats_get(c, &st);
    ck_assert_uint_eq(st.appended, n + 2);
    if (retries) {
        ck_assert_int_eq(r[0].conflicts + r[1].conflicts, 0);
        ck_assert_uint_eq(n, 300);
        ck_assert_uint_eq(st.retries, st.conflicts);
    }
    keel_cqrs_destroy(c);
}

START_TEST(two_threads_on_one_stream_one_winner_per_version) { two_threads(NULL, 0); }
END_TEST

START_TEST(the_retry_option_runs_a_command_again) { two_threads(NULL, 1000); }
END_TEST

START_TEST(pg_two_threads_on_one_stream_one_winner_per_version)
{
    keel_pg *pg = open_pg();
    for (partitioned = 0; partitioned < 2; partitioned++) { /* the unique key, then the versions table */
        two_threads(pg, 0);
        two_threads(pg, 1000);
    }
    partitioned = 0;
    keel_pg_destroy(pg);
}
END_TEST

/* inc_raced: inc, but on its first run another writer (`rival`, a second
 * dispatcher on the same store, or the same one) appends to the stream
 * between this run's read and its append, which must then conflict. */
typedef struct raced {
    keel_cqrs *rival;
    _Atomic int runs;
} raced;

static int cmd_inc_raced(keel_cqrs_ctx *x, const void *payload, size_t len, void *ud)
{
    raced *r = ud;
    char stream[64];
    snprintf(stream, sizeof stream, "%.*s", (int)len, (const char *)payload);
    const keel_cqrs_event *evs;
    size_t n;
    int rc = keel_cqrs_load(x, stream, &evs, &n);
    if (rc)
        return rc;
    if (atomic_fetch_add(&r->runs, 1) == 0 && (rc = keel_cqrs_send(r->rival, "inc", payload, len, NULL, NULL)))
        return rc;
    uint64_t next = n + 1;
    rc = keel_cqrs_emit(x, stream, "counter.incremented", &next, sizeof next, NULL, 0);
    return rc ? rc : keel_cqrs_reply(x, &next, sizeof next);
}

/* peek: replies how many events the stream has, after checking that each
 * one's version is its place and its value (an inc's) is its version. */
static int cmd_peek(keel_cqrs_ctx *x, const void *payload, size_t len, void *ud)
{
    (void)ud;
    char stream[64];
    snprintf(stream, sizeof stream, "%.*s", (int)len, (const char *)payload);
    const keel_cqrs_event *evs;
    size_t n;
    int rc = keel_cqrs_load(x, stream, &evs, &n);
    for (size_t i = 0; rc == 0 && i < n; i++) {
        uint64_t v = 0;
        if (evs[i].len == sizeof v)
            memcpy(&v, evs[i].data, sizeof v);
        if (evs[i].version != i + 1 || v != i + 1)
            rc = KEEL_EPROTO;
    }
    return rc ? rc : keel_cqrs_reply(x, &n, sizeof n);
}

static size_t peek(keel_cqrs *c, const char *stream)
{
    keel_cqrs_result r;
    size_t n;
    ck_assert_int_eq(keel_cqrs_send(c, "peek", stream, strlen(stream), NULL, &r), 0);
    ck_assert_uint_eq(r.len, sizeof n);
    memcpy(&n, r.reply, sizeof n);
    keel_cqrs_result_free(&r);
    return n;
}

/* The stream holds one event when inc_raced starts; the rival's append
 * makes its read stale. */
static void forced_conflict(keel_pg *pg, uint32_t retries)
{
    char prefix[64];
    snprintf(prefix, sizeof prefix, "%s", uniq("forced"));
    app a = {0};
    keel_cqrs *c = open_cqrs(pg, prefix, retries, &a);
    keel_cqrs *rival = pg ? open_cqrs(pg, prefix, 0, &a) : c; /* the memory store is one dispatcher's */
    raced rr = {rival, 0};
    ck_assert_int_eq(keel_cqrs_command(c, "inc_raced", cmd_inc_raced, &rr), 0);
    ck_assert_int_eq(keel_cqrs_command(c, "peek", cmd_peek, NULL), 0);
    ck_assert_int_eq(keel_cqrs_send(c, "inc", "raced", 5, NULL, NULL), 0);
    keel_cqrs_result res;
    int rc = keel_cqrs_send(c, "inc_raced", "raced", 5, NULL, &res);
    keel_cqrs_stats st;
    keel_cqrs_stats_get(c, &st);
    ck_assert_uint_eq(st.conflicts, 1); /* the first run's append lost */
    if (retries) {
        ck_assert_int_eq(rc, 0);
        ck_assert_int_eq(atomic_load(&rr.runs), 2); /* run again, on a fresh read */
        ck_assert_uint_eq(st.retries, 1);
        uint64_t v;
        ck_assert_uint_eq(res.len, sizeof v);
        memcpy(&v, res.reply, sizeof v);
        ck_assert_uint_eq(v, 3); /* after the first event and the rival's */
        keel_cqrs_result_free(&res);
        ck_assert_uint_eq(peek(c, "raced"), 3); /* versions 1, 2, 3, no gap, none twice */
    } else {
        ck_assert_int_eq(rc, KEEL_ECONFLICT);
        ck_assert_int_eq(atomic_load(&rr.runs), 1);
        ck_assert_uint_eq(st.retries, 0);
        ck_assert_uint_eq(peek(c, "raced"), 2); /* only the rival's append went in */
    }
    if (rival != c)
        keel_cqrs_destroy(rival);
    keel_cqrs_destroy(c);
}

START_TEST(a_conflicting_append_is_retried_on_a_fresh_read)
{
    forced_conflict(NULL, 0);
    forced_conflict(NULL, 3);
}
END_TEST

START_TEST(pg_a_conflicting_append_is_retried_on_a_fresh_read)
{
    keel_pg *pg = open_pg();
    for (partitioned = 0; partitioned < 2; partitioned++) {
        forced_conflict(pg, 0);
        forced_conflict(pg, 3);
    }
    partitioned = 0;
    keel_pg_destroy(pg);
}
END_TEST

/* Until another session waits for a lock d's session holds. pg_locks,
 * not pg_stat_activity: that one is read once per transaction, and d's
 * is open. */
static void wait_blocked_by(PGconn *d)
{
    while (kt_pg_number(d, "SELECT count(*) FROM pg_locks WHERE NOT granted AND "
                           "pg_backend_pid() = ANY(pg_blocking_pids(pid))") == 0)
        nap(1 * MS);
}

typedef struct inc_arg {
    keel_cqrs *c;
    int rc;
    uint64_t next; /* the inc's reply: what it saw, plus one */
} inc_arg;

static void *inc_s(void *arg)
{
    inc_arg *a = arg;
    keel_cqrs_result r;
    a->rc = keel_cqrs_send(a->c, "inc", "s", 1, NULL, &r);
    if (a->rc == 0 && r.len == sizeof a->next)
        memcpy(&a->next, r.reply, sizeof a->next);
    if (a->rc == 0)
        keel_cqrs_result_free(&r);
    return NULL;
}

/* Partitioned, a load reads the stream's events and its largest version
 * in prefix+versions: a writer that commits while the load reads must be
 * in both or in neither, or the command decides on the old history and
 * appends after the new version without a conflict. The load is held on
 * the versions table's lock while the writer commits version 2. */
START_TEST(pg_a_partitioned_load_reads_events_and_versions_at_once)
{
    keel_pg *pg; /* one connection: the load's statement is prepared on it before the lock */
    keel_pg_opts po = {.primary = kt_env("KEEL_TEST_PG"), .manual_health = 1, .conns_per_host = 1};
    ck_assert_int_eq(keel_pg_create(&pg, &po), 0);
    ck_assert_int_eq(keel_pg_check(pg), 0);
    app a = {0};
    char prefix[64], sql[512];
    snprintf(prefix, sizeof prefix, "%s", uniq("guard"));
    partitioned = 1;
    keel_cqrs *c = open_cqrs(pg, prefix, 0, &a);
    partitioned = 0;
    ck_assert_int_eq(keel_cqrs_send(c, "inc", "s", 1, NULL, NULL), 0); /* version 1; statements prepared */
    PGconn *d = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    kt_pg_exec(d, "BEGIN");
    snprintf(sql, sizeof sql, "LOCK TABLE \"%sversions\" IN ACCESS EXCLUSIVE MODE", prefix);
    kt_pg_exec(d, sql);
    inc_arg ia = {c, -1, 0};
    pthread_t t;
    pthread_create(&t, NULL, inc_s, &ia);
    wait_blocked_by(d); /* the load waits for the versions table */
    snprintf(sql, sizeof sql, "INSERT INTO \"%sversions\" VALUES ('s', 2)", prefix);
    kt_pg_exec(d, sql);
    snprintf(sql, sizeof sql,
             "INSERT INTO \"%sevents\" (stream_id, version, type, data, metadata) "
             "VALUES ('s', 2, 'counter.incremented', '\\x0200000000000000', '')",
             prefix);
    kt_pg_exec(d, sql);
    kt_pg_exec(d, "COMMIT");
    pthread_join(t, NULL);
    if (ia.rc == 0)
        ck_assert_uint_eq(ia.next, 3); /* it saw both events */
    else
        ck_assert_int_eq(ia.rc, KEEL_ECONFLICT);
    snprintf(sql, sizeof sql, "SELECT count(*) FROM \"%sevents\" WHERE stream_id = 's'", prefix);
    ck_assert_int_eq(kt_pg_number(d, sql), ia.rc == 0 ? 3 : 2);
    PQfinish(d);
    keel_cqrs_destroy(c);
    keel_pg_destroy(pg);
}
END_TEST

/* ---- idempotency ---- */

/* quiet: emits nothing; replies an empty reply when the payload says so */
static int cmd_quiet(keel_cqrs_ctx *x, const void *payload, size_t len, void *ud)
{
    (void)ud;
    return len && ((const char *)payload)[0] == 'e' ? keel_cqrs_reply(x, "", 0) : 0;
}

static void idempotent(keel_pg *pg)
{
    app a = {0};
    keel_cqrs *c = open_cqrs(pg, uniq("idem"), 0, &a);
    keel_cqrs_result r1, r2;
    ck_assert_int_eq(keel_cqrs_send(c, "register", "ada", 3, "req-1", &r1), 0);
    ck_assert_int_eq(r1.repeated, 0);
    ck_assert_int_eq(keel_cqrs_send(c, "register", "ada", 3, "req-1", &r2), 0);
    ck_assert_int_eq(r2.repeated, 1);
    ck_assert_uint_eq(r2.len, r1.len);
    ck_assert_int_eq(memcmp(r1.reply, r2.reply, r1.len), 0);
    ck_assert_int_eq(atomic_load(&a.calls), 1); /* not run again */
    keel_cqrs_result_free(&r1);
    keel_cqrs_result_free(&r2);
    /* without the key: the stream exists, so a new registration conflicts */
    ck_assert_int_eq(keel_cqrs_send(c, "register", "ada", 3, NULL, NULL), KEEL_ECONFLICT);
    /* no reply, or an empty one: NULL, the first time and on a repeat */
    ck_assert_int_eq(keel_cqrs_command(c, "quiet", cmd_quiet, NULL), 0);
    for (int i = 0; i < 4; i++) {
        keel_cqrs_result r;
        ck_assert_int_eq(keel_cqrs_send(c, "quiet", i < 2 ? "n" : "e", 1, i < 2 ? "q-none" : "q-empty", &r), 0);
        ck_assert_int_eq(r.repeated, i % 2);
        ck_assert_ptr_null(r.reply);
        ck_assert_uint_eq(r.len, 0);
        keel_cqrs_result_free(&r);
    }
    keel_cqrs_destroy(c);
}

START_TEST(an_idempotent_repeat_returns_the_first_result) { idempotent(NULL); }
END_TEST

START_TEST(pg_an_idempotent_repeat_returns_the_first_result) { with_pg(idempotent); }
END_TEST

START_TEST(pg_idempotency_holds_across_processes)
{
    char prefix[64];
    snprintf(prefix, sizeof prefix, "%s", uniq("procs"));
    pid_t kid = fork(); /* before this process opens anything: the child owns what it opens */
    ck_assert_int_ge(kid, 0);
    if (kid == 0) {
        keel_pg *p2 = open_pg();
        app b = {0};
        keel_cqrs *c2 = open_cqrs(p2, prefix, 0, &b);
        int rc = keel_cqrs_send(c2, "register", "grace", 5, "signup-7", NULL);
        keel_cqrs_destroy(c2);
        keel_pg_destroy(p2);
        _exit(rc == 0 && atomic_load(&b.calls) == 1 ? 0 : 1);
    }
    int st;
    waitpid(kid, &st, 0);
    ck_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    keel_pg *pg = open_pg();
    app a = {0};
    keel_cqrs *c = open_cqrs(pg, prefix, 0, &a);
    keel_cqrs_result r;
    ck_assert_int_eq(keel_cqrs_send(c, "register", "grace", 5, "signup-7", &r), 0);
    ck_assert_int_eq(r.repeated, 1);
    ck_assert_int_eq(memcmp(r.reply, "welcome", 7), 0);
    keel_cqrs_result_free(&r);
    ck_assert_int_eq(atomic_load(&a.calls), 0);
    keel_cqrs_destroy(c);
    keel_pg_destroy(pg);
}
END_TEST

/* signup: registers a user once, refusing one already there (it reads
 * the stream first). On its first run another first attempt with the
 * same key gets in between its idempotency check and its read. */
typedef struct signup {
    keel_cqrs *c;
    _Atomic int runs;
} signup;

static int cmd_signup(keel_cqrs_ctx *x, const void *payload, size_t len, void *ud)
{
    signup *s = ud;
    char stream[96];
    snprintf(stream, sizeof stream, "user-%.*s", (int)len, (const char *)payload);
    if (atomic_fetch_add(&s->runs, 1) == 0) {
        int rc = keel_cqrs_send(s->c, "signup", payload, len, "signup-1", NULL);
        if (rc)
            return rc;
    }
    const keel_cqrs_event *evs;
    size_t n;
    int rc = keel_cqrs_load(x, stream, &evs, &n);
    if (rc)
        return rc;
    if (n)
        return KEEL_EEXIST; /* already registered */
    rc = keel_cqrs_emit(x, stream, "user.registered", payload, len, NULL, 0);
    return rc ? rc : keel_cqrs_reply(x, "welcome", 7);
}

/* The first attempt commits while the second's handler runs: the second,
 * refused by its handler for what the first did, returns the first's
 * result as a repeat, not its handler's refusal. */
static void racing_first_attempts(keel_pg *pg)
{
    app a = {0};
    keel_cqrs *c = open_cqrs(pg, uniq("race1st"), 0, &a);
    signup s = {c, 0};
    ck_assert_int_eq(keel_cqrs_command(c, "signup", cmd_signup, &s), 0);
    keel_cqrs_result r;
    ck_assert_int_eq(keel_cqrs_send(c, "signup", "ada", 3, "signup-1", &r), 0);
    ck_assert_int_eq(atomic_load(&s.runs), 2);
    ck_assert_int_eq(r.repeated, 1);
    ck_assert_uint_eq(r.len, 7);
    ck_assert_int_eq(memcmp(r.reply, "welcome", 7), 0);
    keel_cqrs_result_free(&r);
    keel_cqrs_destroy(c);
}

START_TEST(a_repeat_refused_by_its_handler_returns_the_first_result) { racing_first_attempts(NULL); }
END_TEST

START_TEST(pg_a_repeat_refused_by_its_handler_returns_the_first_result) { with_pg(racing_first_attempts); }
END_TEST

/* ---- the bus ---- */

/* What the bus handler heard, and what the store held when it heard it:
 * a projection of the same dispatcher had the event's position applied,
 * and (PostgreSQL) another session saw the row, so it was committed. */
typedef struct heard {
    int n, projected, committed;
    char subject[64], stream[32], version[8], position[8];
    keel_cqrs_projection *p;
    PGconn *pq;
    const char *prefix;
} heard;

static int on_event(const keel_bus_msg *m, void *ud)
{
    heard *h = ud;
    h->n++;
    snprintf(h->subject, sizeof h->subject, "%s", m->subject);
    for (size_t i = 0; i < m->nheaders; i++) {
        const char *k = m->headers[i].key, *v = m->headers[i].value;
        char *dst = strcmp(k, "stream") == 0 ? h->stream : strcmp(k, "version") == 0 ? h->version
                    : strcmp(k, "position") == 0                                   ? h->position
                                                                                   : NULL;
        if (dst)
            snprintf(dst, 8, "%s", v);
    }
    /* No ck_assert here: the handler runs inside keel_bus_publish. */
    uint64_t pos = strtoull(h->position, NULL, 10);
    if (keel_cqrs_projection_run(h->p, NULL) == 0 && keel_cqrs_projection_position(h->p) >= pos)
        h->projected++;
    if (h->pq) {
        char sql[256];
        snprintf(sql, sizeof sql,
                 "SELECT count(*) FROM \"%sevents\" WHERE position = %llu AND stream_id = '%s' AND version = %s",
                 h->prefix, (unsigned long long)pos, h->stream, h->version);
        PGresult *r = PQexec(h->pq, sql);
        if (PQresultStatus(r) == PGRES_TUPLES_OK && atoll(PQgetvalue(r, 0, 0)) == 1)
            h->committed++;
        PQclear(r);
    }
    return 0;
}

static int apply_nothing(keel_cqrs_ctx *x, const keel_cqrs_event *e, void *ud)
{
    (void)x, (void)e, (void)ud;
    return 0;
}

static void published(keel_pg *pg)
{
    keel_bus *bus;
    ck_assert_int_eq(keel_bus_create(&bus, NULL), 0);
    char prefix[64];
    snprintf(prefix, sizeof prefix, "%s", uniq("bus"));
    heard h = {.pq = pg ? kt_pg_connect(kt_env("KEEL_TEST_PG")) : NULL, .prefix = prefix};
    keel_bus_sub *s;
    keel_bus_sub_opts so = {.pattern = "app.counter.>", .handler = on_event, .ud = &h};
    ck_assert_int_eq(keel_bus_subscribe(bus, &so, &s), 0);
    app a = {0};
    keel_cqrs *c;
    keel_cqrs_opts o = {.pg = pg, .prefix = prefix, .bus = bus, .subject_prefix = "app."};
    ck_assert_int_eq(keel_cqrs_create(&c, &o), 0);
    ck_assert_int_eq(keel_cqrs_create_schema(c), 0);
    ck_assert_int_eq(keel_cqrs_command(c, "inc", cmd_inc, &a), 0);
    keel_cqrs_projection_opts po = {.name = "on-bus", .handler = apply_nothing};
    ck_assert_int_eq(keel_cqrs_projection_create(c, &po, &h.p), 0);
    ck_assert_int_eq(keel_cqrs_send(c, "inc", "c1", 2, NULL, NULL), 0);
    ck_assert_int_eq(keel_cqrs_send(c, "inc", "c1", 2, NULL, NULL), 0);
    ck_assert_int_eq(h.n, 2);
    ck_assert_str_eq(h.subject, "app.counter.incremented");
    ck_assert_str_eq(h.stream, "c1");
    ck_assert_str_eq(h.version, "2");
    ck_assert_str_eq(h.position, "2");
    ck_assert_int_eq(h.projected, 2); /* each message came after its event was in the store */
    ck_assert_int_eq(h.committed, pg ? 2 : 0);
    keel_cqrs_stats st;
    keel_cqrs_stats_get(c, &st);
    ck_assert_uint_eq(st.published, 2);
    keel_cqrs_projection_destroy(h.p);
    keel_cqrs_destroy(c);
    keel_bus_destroy(bus);
    if (h.pq)
        PQfinish(h.pq);
}

START_TEST(events_are_published_on_the_bus_after_commit) { published(NULL); }
END_TEST

START_TEST(pg_events_are_published_on_the_bus_after_commit) { with_pg(published); }
END_TEST

/* ---- projections ---- */

/* A projection into memory: the positions it applied, in order. */
typedef struct seen {
    uint64_t pos[4096];
    char line[4096][48];
    size_t n;
} seen;

static int apply_seen(keel_cqrs_ctx *x, const keel_cqrs_event *e, void *ud)
{
    (void)x;
    seen *s = ud;
    ck_assert_uint_lt(s->n, 4096);
    s->pos[s->n] = e->position;
    uint64_t v = 0;
    if (e->len == 8)
        memcpy(&v, e->data, 8);
    snprintf(s->line[s->n], sizeof s->line[0], "%s/%llu/%s/%llu/%zu", e->stream, (unsigned long long)e->version,
             e->type, (unsigned long long)v, e->meta_len);
    s->n++;
    return 0;
}

/* The same scenario on a store; its projection's lines. */
static seen *scenario(keel_pg *pg)
{
    app a = {0};
    keel_cqrs *c = open_cqrs(pg, uniq("parity"), 0, &a);
    const char *streams[3] = {"a", "b", "c"};
    for (int i = 0; i < 30; i++)
        ck_assert_int_eq(keel_cqrs_send(c, "inc", streams[i % 3], 1, NULL, NULL), 0);
    ck_assert_int_eq(keel_cqrs_send(c, "register", "ken", 3, NULL, NULL), 0);
    ck_assert_int_eq(keel_cqrs_send(c, "register", "ken", 3, NULL, NULL), KEEL_ECONFLICT);
    seen *s = calloc(1, sizeof *s);
    keel_cqrs_projection *p;
    keel_cqrs_projection_opts po = {.name = "lines", .handler = apply_seen, .ud = s, .batch = 7};
    ck_assert_int_eq(keel_cqrs_projection_create(c, &po, &p), 0);
    size_t applied;
    ck_assert_int_eq(keel_cqrs_projection_run(p, &applied), 0);
    ck_assert_uint_eq(applied, 31);
    ck_assert_int_eq(keel_cqrs_projection_run(p, &applied), 0); /* nothing new */
    ck_assert_uint_eq(applied, 0);
    ck_assert_uint_eq(keel_cqrs_projection_position(p), s->pos[30]);
    keel_cqrs_projection_destroy(p);
    keel_cqrs_destroy(c);
    return s;
}

START_TEST(pg_and_memory_stores_agree)
{
    keel_pg *pg = open_pg();
    seen *m = scenario(NULL), *p = scenario(pg);
    ck_assert_uint_eq(m->n, p->n);
    for (size_t i = 0; i < m->n; i++) {
        ck_assert_str_eq(m->line[i], p->line[i]);
        ck_assert(i == 0 || p->pos[i] > p->pos[i - 1]);
    }
    free(m);
    free(p);
    keel_pg_destroy(pg);
}
END_TEST

/* A batch of SIZE_MAX (in effect: everything at once) is as good as
 * any other size on either store. */
static void largest_batch(keel_pg *pg)
{
    app a = {0};
    keel_cqrs *c = open_cqrs(pg, uniq("bigbatch"), 0, &a);
    for (int i = 0; i < 5; i++)
        ck_assert_int_eq(keel_cqrs_send(c, "inc", "b", 1, NULL, NULL), 0);
    seen *s = calloc(1, sizeof *s);
    keel_cqrs_projection *p;
    keel_cqrs_projection_opts po = {.name = "all", .handler = apply_seen, .ud = s, .batch = SIZE_MAX};
    ck_assert_int_eq(keel_cqrs_projection_create(c, &po, &p), 0);
    size_t applied;
    ck_assert_int_eq(keel_cqrs_projection_run(p, &applied), 0);
    ck_assert_uint_eq(applied, 5);
    ck_assert_uint_eq(s->n, 5);
    keel_cqrs_projection_destroy(p);
    keel_cqrs_destroy(c);
    free(s);
}

START_TEST(a_projection_with_the_largest_batch_applies_everything) { largest_batch(NULL); }
END_TEST

START_TEST(pg_a_projection_with_the_largest_batch_applies_everything) { with_pg(largest_batch); }
END_TEST

/* Deleting a projection's checkpoint row (a common way to reset it) makes
 * its next run start again from the first event, not stop for good. */
START_TEST(pg_a_projection_whose_checkpoint_row_was_deleted_starts_again)
{
    keel_pg *pg = open_pg();
    app a = {0};
    char prefix[64];
    snprintf(prefix, sizeof prefix, "%s", uniq("reset"));
    keel_cqrs *c = open_cqrs(pg, prefix, 0, &a);
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(keel_cqrs_send(c, "inc", "r", 1, NULL, NULL), 0);
    seen *s = calloc(1, sizeof *s);
    keel_cqrs_projection *p;
    keel_cqrs_projection_opts po = {.name = "all", .handler = apply_seen, .ud = s};
    ck_assert_int_eq(keel_cqrs_projection_create(c, &po, &p), 0);
    size_t applied;
    ck_assert_int_eq(keel_cqrs_projection_run(p, &applied), 0);
    ck_assert_uint_eq(applied, 3);
    uint64_t last = keel_cqrs_projection_position(p);
    PGconn *d = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    char sql[160];
    snprintf(sql, sizeof sql, "DELETE FROM \"%scheckpoints\" WHERE name = 'all'", prefix);
    kt_pg_exec(d, sql);
    PQfinish(d);
    ck_assert_int_eq(keel_cqrs_projection_run(p, &applied), 0);
    ck_assert_uint_eq(applied, 3);
    ck_assert_uint_eq(s->n, 6);
    ck_assert_uint_eq(keel_cqrs_projection_position(p), last);
    keel_cqrs_projection_destroy(p);
    keel_cqrs_destroy(c);
    keel_pg_destroy(pg);
    free(s);
}
END_TEST

typedef struct run_arg {
    keel_cqrs_projection *p;
    int rc;
    size_t applied;
} run_arg;

static void *run_once(void *arg)
{
    run_arg *r = arg;
    r->rc = keel_cqrs_projection_run(r->p, &r->applied);
    return NULL;
}

/* A reset committed while a run waits for the checkpoint row's lock: the
 * run finds no row, and must not apply a batch it cannot record (the next
 * run would make the row at 0 and apply those events again). Every event
 * is applied once after the reset, as with a reset between runs. */
START_TEST(pg_a_reset_during_a_run_applies_each_event_once_more)
{
    keel_pg *pg = open_pg();
    app a = {0};
    char prefix[64], sql[160];
    snprintf(prefix, sizeof prefix, "%s", uniq("rreset"));
    keel_cqrs *c = open_cqrs(pg, prefix, 0, &a);
    for (int i = 0; i < 5; i++)
        ck_assert_int_eq(keel_cqrs_send(c, "inc", "r", 1, NULL, NULL), 0);
    seen *s = calloc(1, sizeof *s);
    keel_cqrs_projection *p;
    keel_cqrs_projection_opts po = {.name = "all", .handler = apply_seen, .ud = s};
    ck_assert_int_eq(keel_cqrs_projection_create(c, &po, &p), 0); /* its row, at 0 */
    PGconn *d = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    kt_pg_exec(d, "BEGIN");
    snprintf(sql, sizeof sql, "DELETE FROM \"%scheckpoints\" WHERE name = 'all'", prefix);
    kt_pg_exec(d, sql); /* the reset, not committed yet: the row stays locked */
    run_arg r = {p, -1, 0};
    pthread_t t;
    pthread_create(&t, NULL, run_once, &r);
    wait_blocked_by(d); /* the run saw the row and waits for its lock */
    kt_pg_exec(d, "COMMIT");
    pthread_join(t, NULL);
    ck_assert_int_eq(r.rc, 0);
    size_t more = 0;
    ck_assert_int_eq(keel_cqrs_projection_run(p, &more), 0);
    ck_assert_uint_eq(r.applied + more, 5);
    ck_assert_uint_eq(s->n, 5); /* each event once */
    for (size_t i = 0; i < s->n; i++)
        ck_assert_uint_eq(s->pos[i], i + 1);
    snprintf(sql, sizeof sql, "SELECT position FROM \"%scheckpoints\" WHERE name = 'all'", prefix);
    ck_assert_int_eq(kt_pg_number(d, sql), 5);
    ck_assert_uint_eq(keel_cqrs_projection_position(p), 5);
    PQfinish(d);
    keel_cqrs_projection_destroy(p);
    keel_cqrs_destroy(c);
    keel_pg_destroy(pg);
    free(s);
}
END_TEST

/* A handler's failure is a failure whatever its value, 1 included: the
 * run returns it at once, the handler called once. */
static _Atomic int one_calls;
static int apply_returns_one(keel_cqrs_ctx *x, const keel_cqrs_event *ev, void *ud)
{
    (void)x, (void)ev, (void)ud;
    atomic_fetch_add(&one_calls, 1);
    return 1;
}

START_TEST(pg_a_handler_returning_one_fails_its_run)
{
    keel_pg *pg = open_pg();
    app a = {0};
    keel_cqrs *c = open_cqrs(pg, uniq("one"), 0, &a);
    ck_assert_int_eq(keel_cqrs_send(c, "inc", "r", 1, NULL, NULL), 0);
    keel_cqrs_projection *p;
    keel_cqrs_projection_opts po = {.name = "ones", .handler = apply_returns_one};
    ck_assert_int_eq(keel_cqrs_projection_create(c, &po, &p), 0);
    atomic_store(&one_calls, 0);
    size_t applied = 99;
    ck_assert_int_eq(keel_cqrs_projection_run(p, &applied), 1);
    ck_assert_int_eq(atomic_load(&one_calls), 1);
    ck_assert_uint_eq(applied, 0);
    ck_assert_uint_eq(keel_cqrs_projection_position(p), 0);
    keel_cqrs_projection_destroy(p);
    keel_cqrs_destroy(c);
    keel_pg_destroy(pg);
}
END_TEST

/* Two runners of one projection name (two processes, say, one of them
 * standing by): a run of the one that finds the other did the work
 * reports the checkpoint the other reached. */
static void two_runners(keel_pg *pg)
{
    app a = {0};
    keel_cqrs *c = open_cqrs(pg, uniq("runners"), 0, &a);
    seen *s = calloc(1, sizeof *s);
    keel_cqrs_projection *p1, *p2;
    keel_cqrs_projection_opts po = {.name = "shared", .handler = apply_seen, .ud = s};
    ck_assert_int_eq(keel_cqrs_projection_create(c, &po, &p1), 0);
    ck_assert_int_eq(keel_cqrs_projection_create(c, &po, &p2), 0);
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(keel_cqrs_send(c, "inc", "r", 1, NULL, NULL), 0);
    size_t applied;
    ck_assert_int_eq(keel_cqrs_projection_run(p1, &applied), 0);
    ck_assert_uint_eq(applied, 3);
    uint64_t at = keel_cqrs_projection_position(p1);
    ck_assert_uint_eq(at, s->pos[2]);
    ck_assert_int_eq(keel_cqrs_projection_run(p2, &applied), 0);
    ck_assert_uint_eq(applied, 0); /* nothing left */
    ck_assert_uint_eq(keel_cqrs_projection_position(p2), at);
    keel_cqrs_projection_destroy(p1);
    keel_cqrs_projection_destroy(p2);
    keel_cqrs_destroy(c);
    free(s);
}

START_TEST(a_run_with_nothing_left_reports_the_checkpoint) { two_runners(NULL); }
END_TEST

START_TEST(pg_a_run_with_nothing_left_reports_the_checkpoint) { with_pg(two_runners); }
END_TEST

typedef struct sender {
    keel_cqrs *c;
    int rc;
    _Atomic int done;
} sender;

static void *send_one(void *arg)
{
    sender *s = arg;
    s->rc = keel_cqrs_send(s->c, "inc", "late", 4, NULL, NULL);
    atomic_store(&s->done, 1);
    return NULL;
}

/* One append is held open (its transaction has the append lock and an
 * event at position p) while another command tries to commit and the
 * projection runs: the projection must not pass p, and afterwards applies
 * both, in order, once each. */
START_TEST(pg_an_append_held_open_is_not_skipped)
{
    char prefix[64], sql[512];
    snprintf(prefix, sizeof prefix, "%s", uniq("order"));
    keel_pg *pg = open_pg();
    app a = {0};
    keel_cqrs *c = open_cqrs(pg, prefix, 0, &a);
    ck_assert_int_eq(keel_cqrs_send(c, "inc", "early", 5, NULL, NULL), 0);
    seen *s = calloc(1, sizeof *s);
    keel_cqrs_projection *p;
    keel_cqrs_projection_opts po = {.name = "ordered", .handler = apply_seen, .ud = s};
    ck_assert_int_eq(keel_cqrs_projection_create(c, &po, &p), 0);
    ck_assert_int_eq(keel_cqrs_projection_run(p, NULL), 0);
    ck_assert_uint_eq(s->n, 1);

    PGconn *held = kt_pg_connect(kt_env("KEEL_TEST_PG")); /* an append, as the store makes it, left open */
    kt_pg_exec(held, "BEGIN");
    snprintf(sql, sizeof sql, "SELECT pg_advisory_xact_lock(%lld)", (long long)keel__cqrs_lock_key(prefix));
    kt_pg_exec(held, sql);
    snprintf(sql, sizeof sql,
             "INSERT INTO \"%sevents\" (stream_id, version, type, data, metadata) "
             "VALUES ('held', 1, 'counter.incremented', '\\x0100000000000000', '')",
             prefix);
    kt_pg_exec(held, sql);

    sender snd = {c, 99, 0};
    pthread_t t;
    pthread_create(&t, NULL, send_one, &snd);
    nap(200 * MS); /* settle: the second append must be waiting for the lock */
    ck_assert_int_eq(atomic_load(&snd.done), 0);
    size_t applied;
    ck_assert_int_eq(keel_cqrs_projection_run(p, &applied), 0);
    ck_assert_uint_eq(applied, 0); /* nothing committed past what it saw */

    kt_pg_exec(held, "COMMIT");
    pthread_join(t, NULL);
    ck_assert_int_eq(snd.rc, 0);
    ck_assert_int_eq(keel_cqrs_projection_run(p, &applied), 0);
    ck_assert_uint_eq(applied, 2);
    ck_assert_uint_eq(s->n, 3);
    ck_assert(s->pos[0] < s->pos[1] && s->pos[1] < s->pos[2]);
    ck_assert(strncmp(s->line[1], "held/", 5) == 0); /* the held one first: it committed first */
    ck_assert(strncmp(s->line[2], "late/", 5) == 0);
    PQfinish(held);
    keel_cqrs_projection_destroy(p);
    keel_cqrs_destroy(c);
    keel_pg_destroy(pg);
    free(s);
}
END_TEST

/* A projection writing a read model in its transaction: a row per event,
 * keyed by position, so an event applied twice fails the projection. */
typedef struct rm {
    char table[96];
    int slow;
} rm;

static int apply_row(keel_cqrs_ctx *x, const keel_cqrs_event *e, void *ud)
{
    rm *r = ud;
    keel_pg_conn *conn = keel_cqrs_conn(x);
    if (!conn)
        return KEEL_EUNAVAIL;
    char sql[256], pos[24], ver[24];
    snprintf(sql, sizeof sql, "INSERT INTO %s (position, stream, version) VALUES ($1::bigint, $2, $3::bigint)",
             r->table);
    snprintf(pos, sizeof pos, "%llu", (unsigned long long)e->position);
    snprintf(ver, sizeof ver, "%llu", (unsigned long long)e->version);
    const char *v[3] = {pos, e->stream, ver};
    keel_pg_params p = {3, v, NULL, NULL, NULL, 0};
    PGresult *res = NULL;
    int rc = keel_pg_conn_exec(conn, sql, &p, &res);
    PQclear(res);
    if (r->slow)
        nap(2 * MS); /* so that the kill lands mid-catch-up */
    return rc;
}

START_TEST(pg_a_projection_killed_mid_catch_up_resumes_exactly)
{
    char prefix[64], sql[512];
    snprintf(prefix, sizeof prefix, "%s", uniq("kill"));
    keel_pg *pg = open_pg();
    app a = {0};
    keel_cqrs *c = open_cqrs(pg, prefix, 0, &a);
    PGconn *d = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    for (int i = 0; i < 2; i++) {
        snprintf(sql, sizeof sql, "CREATE TABLE \"%srm%d\" (position bigint PRIMARY KEY, stream text, version bigint)",
                 prefix, i);
        kt_pg_exec(d, sql);
    }
    enum { N = 400 };
    for (int i = 0; i < N; i++) {
        char stream[16];
        snprintf(stream, sizeof stream, "s%d", i % 13);
        ck_assert_int_eq(keel_cqrs_send(c, "inc", stream, strlen(stream), NULL, NULL), 0);
    }
    pid_t kid = fork();
    ck_assert_int_ge(kid, 0);
    if (kid == 0) {
        keel_pg *p2 = open_pg();
        keel_cqrs *c2;
        keel_cqrs_opts o = {.pg = p2, .prefix = prefix};
        rm r;
        snprintf(r.table, sizeof r.table, "\"%srm0\"", prefix);
        r.slow = 1;
        keel_cqrs_projection *p;
        keel_cqrs_projection_opts po = {.name = "rm", .handler = apply_row, .ud = &r, .batch = 10};
        if (keel_cqrs_create(&c2, &o) || keel_cqrs_projection_create(c2, &po, &p))
            _exit(2);
        keel_cqrs_projection_run(p, NULL);
        _exit(3); /* never: killed first */
    }
    snprintf(sql, sizeof sql, "SELECT coalesce(max(position), 0) FROM \"%scheckpoints\" WHERE name = 'rm'", prefix);
    uint64_t deadline = keel_now_ns() + 30 * S;
    while (kt_pg_number(d, sql) < 100 && keel_now_ns() < deadline)
        nap(5 * MS);
    kill(kid, SIGKILL);
    int st;
    waitpid(kid, &st, 0);
    ck_assert(WIFSIGNALED(st));
    int64_t at_kill = kt_pg_number(d, sql);
    ck_assert_int_ge(at_kill, 100);
    ck_assert_int_lt(at_kill, N); /* mid-catch-up */

    rm r0, r1;
    snprintf(r0.table, sizeof r0.table, "\"%srm0\"", prefix);
    snprintf(r1.table, sizeof r1.table, "\"%srm1\"", prefix);
    r0.slow = r1.slow = 0;
    keel_cqrs_projection *p0, *p1;
    keel_cqrs_projection_opts po0 = {.name = "rm", .handler = apply_row, .ud = &r0, .batch = 10};
    keel_cqrs_projection_opts po1 = {.name = "reference", .handler = apply_row, .ud = &r1, .batch = 64};
    ck_assert_int_eq(keel_cqrs_projection_create(c, &po0, &p0), 0);
    ck_assert_uint_eq(keel_cqrs_projection_position(p0), (uint64_t)at_kill);
    ck_assert_int_eq(keel_cqrs_projection_create(c, &po1, &p1), 0);
    ck_assert_int_eq(keel_cqrs_projection_run(p0, NULL), 0); /* a row applied twice would fail here */
    ck_assert_int_eq(keel_cqrs_projection_run(p1, NULL), 0);
    snprintf(sql, sizeof sql, "SELECT count(*) FROM \"%srm0\"", prefix);
    ck_assert_int_eq(kt_pg_number(d, sql), N);
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM ((TABLE \"%srm0\" EXCEPT TABLE \"%srm1\") UNION ALL "
             "(TABLE \"%srm1\" EXCEPT TABLE \"%srm0\")) diff",
             prefix, prefix, prefix, prefix);
    ck_assert_int_eq(kt_pg_number(d, sql), 0); /* the same read model as without the crash */
    PQfinish(d);
    keel_cqrs_projection_destroy(p0);
    keel_cqrs_projection_destroy(p1);
    keel_cqrs_destroy(c);
    keel_pg_destroy(pg);
}
END_TEST

/* ---- the primary stopped mid-stream ---- */

/* A sender of idempotent commands that sends each one again, with its
 * key, until it succeeds: what the header tells a caller to do. */
typedef struct flow {
    keel_cqrs *c;
    int id, n;
    _Atomic int sent;
    int unknown, definite, repeats, hidden, gave_up;
} flow;

static void *send_flow(void *arg)
{
    flow *f = arg;
    for (int i = 0; i < f->n; i++) {
        char key[32], stream[8];
        snprintf(key, sizeof key, "f%d-%d", f->id, i);
        snprintf(stream, sizeof stream, "s%d", i % 5); /* both senders: conflicts too */
        bool maybe = false; /* an attempt's outcome is unknown */
        uint64_t deadline = keel_now_ns() + 30 * S;
        for (;;) {
            keel_cqrs_result res;
            int rc = keel_cqrs_send(f->c, "inc", stream, strlen(stream), key, &res);
            if (rc == 0) {
                f->repeats += res.repeated;
                f->hidden += res.repeated && !maybe; /* an error that took effect */
                keel_cqrs_result_free(&res);
                break;
            }
            if (rc == KEEL_ETIMEDOUT || rc == KEEL_EUNAVAIL) {
                maybe = true;
                f->unknown++;
            } else {
                f->definite++;
            }
            if (keel_now_ns() > deadline) {
                f->gave_up++;
                break;
            }
            nap(5 * MS);
        }
        atomic_store(&f->sent, i + 1);
    }
    return NULL;
}

/* Two threads send commands with idempotency keys while the primary is
 * stopped and started, a projection following meanwhile. Every command
 * sent again with its key until it succeeds appends exactly once; an
 * error other than "outcome unknown" never took effect; the projection
 * applies every event once. */
START_TEST(pg_commands_and_a_projection_through_a_primary_restart)
{
    char prefix[64], sql[512];
    snprintf(prefix, sizeof prefix, "%s", uniq("restart"));
    keel_pg *pg;
    keel_pg_opts po = {.primary = kt_env("KEEL_TEST_PG"), .connect_timeout_ns = 1 * S,
                       .acquire_timeout_ns = 2 * S, .query_timeout_ns = 5 * S,
                       .health_interval_ns = 50 * MS, .conns_per_host = 4};
    ck_assert_int_eq(keel_pg_create(&pg, &po), 0);
    app a = {0};
    keel_cqrs *c = open_cqrs(pg, prefix, 0, &a);
    PGconn *d = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    snprintf(sql, sizeof sql, "CREATE TABLE \"%srm\" (position bigint PRIMARY KEY, stream text, version bigint)",
             prefix);
    kt_pg_exec(d, sql);
    PQfinish(d); /* the server goes away under it */
    rm r = {.slow = 0};
    snprintf(r.table, sizeof r.table, "\"%srm\"", prefix);
    keel_cqrs_projection *p;
    keel_cqrs_projection_opts pro = {.name = "rm", .handler = apply_row, .ud = &r, .batch = 7,
                                     .follow_interval_ns = 20 * MS};
    ck_assert_int_eq(keel_cqrs_projection_create(c, &pro, &p), 0);
    enum { N = 150 };
    flow f[2] = {{.c = c, .id = 0, .n = N}, {.c = c, .id = 1, .n = N}};
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&t[i], NULL, send_flow, &f[i]);
    while (atomic_load(&f[0].sent) < N / 3)
        nap(1 * MS);
    kt_server("stop-one", "pg-primary");
    nap(300 * MS); /* a real outage: the senders meet it */
    kt_server("start-one", "pg-primary");
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
    keel_cqrs_projection_destroy(p);
    ck_assert_int_eq(keel_cqrs_projection_create(c, &pro, &p), 0);
    ck_assert_int_eq(keel_cqrs_projection_run(p, NULL), 0);
    for (int i = 0; i < 2; i++) {
        ck_assert_int_eq(f[i].gave_up, 0);
        ck_assert_int_eq(f[i].hidden, 0);
    }
    ck_assert_int_gt(f[0].unknown + f[1].unknown, 0); /* the outage was felt */
    d = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    snprintf(sql, sizeof sql, "SELECT count(*) FROM \"%sevents\"", prefix);
    ck_assert_int_eq(kt_pg_number(d, sql), 2 * N); /* once per key */
    snprintf(sql, sizeof sql, "SELECT count(*) FROM \"%sidempotency\"", prefix);
    ck_assert_int_eq(kt_pg_number(d, sql), 2 * N);
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM (SELECT stream_id FROM \"%sevents\" GROUP BY stream_id "
             "HAVING max(version) <> count(*)) gaps",
             prefix);
    ck_assert_int_eq(kt_pg_number(d, sql), 0); /* dense versions */
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM \"%sevents\" e FULL JOIN \"%srm\" m USING (position) "
             "WHERE m.position IS NULL OR e.position IS NULL OR e.stream_id <> m.stream OR e.version <> m.version",
             prefix, prefix);
    ck_assert_int_eq(kt_pg_number(d, sql), 0); /* the read model: every event, once */
    PQfinish(d);
    keel_cqrs_projection_destroy(p);
    keel_cqrs_destroy(c);
    keel_pg_destroy(pg);
}
END_TEST

/* A command whose append times out waiting for the append lock may still
 * commit once the lock is free (the server finishes what it was sent,
 * unless its client_connection_check_interval saw the client go first:
 * a race the test cannot decide), so the header calls its outcome
 * unknown. Sent again with its key, it appends once either way: the
 * first reply when an attempt committed, else a run of its own. */
START_TEST(pg_a_timed_out_append_sent_again_with_its_key_appends_once)
{
    char prefix[64], sql[512];
    snprintf(prefix, sizeof prefix, "%s", uniq("late"));
    keel_pg *pg;
    keel_pg_opts po = {.primary = kt_env("KEEL_TEST_PG"), .connect_timeout_ns = 1 * S,
                       .query_timeout_ns = 300 * MS, .manual_health = 1, .conns_per_host = 4};
    ck_assert_int_eq(keel_pg_create(&pg, &po), 0);
    app a = {0};
    keel_cqrs *c = open_cqrs(pg, prefix, 0, &a);
    ck_assert_int_eq(keel_cqrs_send(c, "inc", "x", 1, NULL, NULL), 0);
    PGconn *held = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    kt_pg_exec(held, "BEGIN");
    snprintf(sql, sizeof sql, "SELECT pg_advisory_xact_lock(%lld)", (long long)keel__cqrs_lock_key(prefix));
    kt_pg_exec(held, sql);
    keel_cqrs_result res;
    ck_assert_int_eq(keel_cqrs_send(c, "inc", "x", 1, "k", &res), KEEL_ETIMEDOUT);
    ck_assert_int_eq(keel_cqrs_send(c, "inc", "x", 1, "k", &res), KEEL_ETIMEDOUT);
    kt_pg_exec(held, "COMMIT"); /* both waiting appends go on, on the server */
    PQfinish(held);
    snprintf(sql, sizeof sql, "SELECT count(*) FROM \"%sevents\"", prefix);
    PGconn *d = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    uint64_t deadline = keel_now_ns() + 5 * S;
    while (kt_pg_number(d, sql) < 2 && keel_now_ns() < deadline)
        nap(5 * MS);
    int committed = kt_pg_number(d, sql) == 2; /* else the server stopped both */
    int rc = KEEL_ETIMEDOUT;
    for (int i = 0; i < 20 && rc == KEEL_ETIMEDOUT; i++)
        rc = keel_cqrs_send(c, "inc", "x", 1, "k", &res);
    ck_assert_int_eq(rc, 0);
    ck_assert_int_eq(res.repeated, committed);
    uint64_t v;
    ck_assert_uint_eq(res.len, sizeof v);
    memcpy(&v, res.reply, sizeof v);
    ck_assert_uint_eq(v, 2);
    keel_cqrs_result_free(&res);
    nap(100 * MS); /* settle: the second attempt's append has ended on the server */
    ck_assert_int_eq(kt_pg_number(d, sql), 2);
    PQfinish(d);
    keel_cqrs_destroy(c);
    keel_pg_destroy(pg);
}
END_TEST

/* ---- queries ---- */

typedef struct qctx {
    char prefix[64];
} qctx;

static int q_where(keel_cqrs_ctx *x, const void *payload, size_t len, void *ud)
{
    qctx *q = ud;
    keel_pg_conn *conn = keel_cqrs_conn(x);
    if (!conn)
        return KEEL_EUNAVAIL;
    char sql[256], stream[32];
    snprintf(stream, sizeof stream, "%.*s", (int)len, (const char *)payload);
    snprintf(sql, sizeof sql,
             "SELECT pg_is_in_recovery()::text || ' ' || count(*) FROM \"%sevents\" WHERE stream_id = $1", q->prefix);
    const char *v[1] = {stream};
    keel_pg_params p = {1, v, NULL, NULL, NULL, 0};
    PGresult *res = NULL;
    int rc = keel_pg_conn_exec(conn, sql, &p, &res);
    if (rc == 0)
        rc = keel_cqrs_reply(x, PQgetvalue(res, 0, 0), strlen(PQgetvalue(res, 0, 0)) + 1);
    PQclear(res);
    return rc;
}

START_TEST(pg_queries_go_to_the_replica_and_read_their_writes)
{
    keel_pg *pg = open_pg();
    app a = {0};
    qctx q;
    snprintf(q.prefix, sizeof q.prefix, "%s", uniq("query"));
    keel_cqrs *c = open_cqrs(pg, q.prefix, 0, &a);
    ck_assert_int_eq(keel_cqrs_query(c, "where", q_where, &q), 0);
    keel_cqrs_result r;
    for (int i = 1; i <= 5; i++) {
        ck_assert_int_eq(keel_cqrs_send(c, "inc", "ryw", 3, NULL, &r), 0);
        ck_assert_uint_gt(r.lsn, 0);
        uint64_t lsn = r.lsn;
        keel_cqrs_result_free(&r);
        ck_assert_int_eq(keel_cqrs_ask(c, "where", "ryw", 3, lsn, &r), 0);
        char want[32];
        snprintf(want, sizeof want, "true %d", i);
        ck_assert_str_eq(r.reply, want); /* on the replica, and it sees the write */
        keel_cqrs_result_free(&r);
    }
    keel_cqrs_destroy(c);
    keel_pg_destroy(pg);
}
END_TEST

/* The client's wall clock, shifted by client_skew seconds: this program's
 * time() stands in for libc's, so that the store's clock can disagree
 * with the server's as two machines' clocks do. */
static time_t client_skew;

time_t time(time_t *t)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    time_t v = ts.tv_sec + client_skew;
    if (t)
        *t = v;
    return v;
}

/* The server's month, as the partitions are named. */
static void server_month(PGconn *d, int *y, int *m)
{
    long long v = kt_pg_number(d, "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYYMM')::int");
    *y = (int)(v / 100);
    *m = (int)(v % 100);
}

START_TEST(pg_monthly_partitions)
{
    /* a client clock ten weeks slow: the partitions still follow the
     * server's month, which created_at takes */
    client_skew = -70 * 86400;
    keel_pg *pg = open_pg();
    app a = {0};
    keel_cqrs *c;
    keel_cqrs_opts o = {.pg = pg, .prefix = uniq("part"), .partition_by_month = 1};
    ck_assert_int_eq(keel_cqrs_create(&c, &o), 0);
    ck_assert_int_eq(keel_cqrs_create_schema(c), 0);
    ck_assert_int_eq(keel_cqrs_create_schema(c), 0); /* idempotent */
    ck_assert_int_eq(keel_cqrs_command(c, "register", cmd_register, &a), 0);
    ck_assert_int_eq(keel_cqrs_command(c, "inc", cmd_inc, &a), 0);
    ck_assert_int_eq(keel_cqrs_send(c, "register", "edsger", 6, NULL, NULL), 0);
    ck_assert_int_eq(keel_cqrs_send(c, "register", "edsger", 6, NULL, NULL), KEEL_ECONFLICT); /* across partitions too */
    for (int i = 0; i < 5; i++)
        ck_assert_int_eq(keel_cqrs_send(c, "inc", "p", 1, NULL, NULL), 0);
    char sql[256];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = '%sevents'",
             o.prefix);
    PGconn *d = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    ck_assert_int_eq(kt_pg_number(d, sql), 2); /* this month and the next */
    /* A process that outlives its months finds the month's partition
     * missing: the append makes it and goes through. */
    int y, m;
    server_month(d, &y, &m);
    char drop[256];
    snprintf(drop, sizeof drop, "DROP TABLE \"%sevents_%04d_%02d\"", o.prefix, y, m);
    kt_pg_exec(d, drop);
    ck_assert_int_eq(kt_pg_number(d, sql), 1);
    ck_assert_int_eq(keel_cqrs_send(c, "register", "dijkstra", 8, NULL, NULL), 0);
    ck_assert_int_eq(kt_pg_number(d, sql), 2);
    PQfinish(d);
    keel_cqrs_destroy(c);
    keel_pg_destroy(pg);
    client_skew = 0;
}
END_TEST

START_TEST(pg_a_missing_schema_is_a_clear_error)
{
    keel_pg *pg = open_pg();
    app a = {0};
    keel_cqrs *c;
    keel_cqrs_opts o = {.pg = pg, .prefix = uniq("none")};
    ck_assert_int_eq(keel_cqrs_create(&c, &o), 0);
    ck_assert_int_eq(keel_cqrs_command(c, "inc", cmd_inc, &a), 0);
    ck_assert_int_eq(keel_cqrs_command(c, "register", cmd_register, &a), 0);
    ck_assert_int_eq(keel_cqrs_send(c, "inc", "s", 1, NULL, NULL), KEEL_EBACKEND); /* load fails */
    ck_assert_int_eq(keel_cqrs_send(c, "register", "x", 1, NULL, NULL), KEEL_EBACKEND); /* append fails */
    keel_cqrs_projection *p;
    keel_cqrs_projection_opts po = {.name = "x", .handler = apply_seen, .ud = NULL};
    ck_assert_int_eq(keel_cqrs_projection_create(c, &po, &p), KEEL_EBACKEND);
    keel_cqrs_destroy(c);
    keel_pg_destroy(pg);
}
END_TEST

/* append: loads the stream the payload names and emits one event. */
static int cmd_append(keel_cqrs_ctx *x, const void *payload, size_t len, void *ud)
{
    (void)ud;
    char stream[64];
    snprintf(stream, sizeof stream, "%.*s", (int)len, (const char *)payload);
    const keel_cqrs_event *evs;
    size_t n;
    int rc = keel_cqrs_load(x, stream, &evs, &n);
    return rc ? rc : keel_cqrs_emit(x, stream, "thing.happened", "d", 1, NULL, 0);
}

/* keel_pg connects lazily, and so does create: with the primary not
 * there it succeeds, and a command fails with the primary's error. */
START_TEST(pg_create_does_not_need_the_primary)
{
    keel_pg *pg;
    keel_pg_opts po = {.primary = "host=127.0.0.1 port=1 user=keel dbname=postgres", .manual_health = 1};
    ck_assert_int_eq(keel_pg_create(&pg, &po), 0);
    keel_cqrs *c;
    keel_cqrs_opts o = {.pg = pg, .prefix = "kt_down_"};
    ck_assert_int_eq(keel_cqrs_create(&c, &o), 0);
    ck_assert_int_eq(keel_cqrs_command(c, "append", cmd_append, NULL), 0);
    ck_assert_int_eq(keel_cqrs_send(c, "append", "s", 1, NULL, NULL), KEEL_EUNAVAIL);
    keel_cqrs_destroy(c);
    keel_pg_destroy(pg);
}
END_TEST

/* A store's events table is partitioned or not for good: a dispatcher
 * with the other partition_by_month would write without the guard the
 * store's versions need (no versions rows; or, partitioned, no unique
 * key on the events), so keel_cqrs_create refuses it, and so does
 * keel_cqrs_create_schema when the other kind appeared after create, and
 * so does the first append of one made before the tables were. */
START_TEST(pg_a_store_opened_with_the_other_partitioning_is_refused)
{
    keel_pg *pg = open_pg();
    for (int part = 0; part < 2; part++) {
        char prefix[64];
        snprintf(prefix, sizeof prefix, "%s", uniq("kind"));
        keel_cqrs *c, *other, *same;
        keel_cqrs_opts o = {.pg = pg, .prefix = prefix, .partition_by_month = part};
        keel_cqrs_opts x = {.pg = pg, .prefix = prefix, .partition_by_month = !part};
        ck_assert_int_eq(keel_cqrs_create(&c, &o), 0); /* no tables yet: either kind */
        ck_assert_int_eq(keel_cqrs_create(&other, &x), 0);
        ck_assert_int_eq(keel_cqrs_create_schema(c), 0);
        ck_assert_int_eq(keel_cqrs_command(other, "append", cmd_append, NULL), 0);
        ck_assert_int_eq(keel_cqrs_send(other, "append", "s1", 2, NULL, NULL), KEEL_EINVAL);
        ck_assert_int_eq(keel_cqrs_create_schema(other), KEEL_EINVAL);
        keel_cqrs_destroy(other);
        other = NULL;
        ck_assert_int_eq(keel_cqrs_create(&other, &x), KEEL_EINVAL);
        ck_assert_ptr_null(other);
        ck_assert_int_eq(keel_cqrs_create(&same, &o), 0);
        ck_assert_int_eq(keel_cqrs_create_schema(same), 0);
        keel_cqrs_destroy(same);
        keel_cqrs_destroy(c);
    }
    keel_pg_destroy(pg);
}
END_TEST

/* A stream whose first events were removed (archived, an old month's
 * partition dropped) goes on from its last version, not its count. */
START_TEST(pg_a_stream_missing_its_first_events_goes_on_from_its_last)
{
    char prefix[64], sql[512];
    snprintf(prefix, sizeof prefix, "%s", uniq("gap"));
    keel_pg *pg = open_pg();
    app a = {0};
    keel_cqrs *c = open_cqrs(pg, prefix, 0, &a);
    ck_assert_int_eq(keel_cqrs_command(c, "append", cmd_append, NULL), 0);
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(keel_cqrs_send(c, "append", "g", 1, NULL, NULL), 0);
    PGconn *d = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    snprintf(sql, sizeof sql, "DELETE FROM \"%sevents\" WHERE stream_id = 'g' AND version < 3", prefix);
    kt_pg_exec(d, sql);
    ck_assert_int_eq(keel_cqrs_send(c, "append", "g", 1, NULL, NULL), 0);
    snprintf(sql, sizeof sql, "SELECT max(version) FROM \"%sevents\" WHERE stream_id = 'g'", prefix);
    ck_assert_int_eq(kt_pg_number(d, sql), 4);
    PQfinish(d);
    keel_cqrs_destroy(c);
    keel_pg_destroy(pg);
}
END_TEST

/* A process manager: a projection whose handler sends a command for each
 * order, while a bus subscriber runs the projection on every event. */
typedef struct saga {
    keel_cqrs *c;
    keel_cqrs_projection *p;
    int applied, nested, nested_rc;
} saga;

static int apply_saga(keel_cqrs_ctx *x, const keel_cqrs_event *e, void *ud)
{
    (void)x;
    saga *s = ud;
    s->applied++;
    return strcmp(e->stream, "orders") == 0 ? keel_cqrs_send(s->c, "append", "shipments", 9, NULL, NULL) : 0;
}

static int on_event_run(const keel_bus_msg *m, void *ud)
{
    (void)m;
    saga *s = ud;
    s->nested++;
    int rc = keel_cqrs_projection_run(s->p, NULL);
    if (rc)
        s->nested_rc = rc;
    return 0;
}

/* The run the shipment's event starts is inside the order's run, on the
 * same thread: it must not wait for it (for ever), and the run in
 * progress goes on to the shipment. */
static void runs_itself(keel_pg *pg)
{
    keel_bus *bus;
    ck_assert_int_eq(keel_bus_create(&bus, NULL), 0);
    keel_cqrs *c;
    keel_cqrs_opts o = {.pg = pg, .prefix = uniq("saga"), .bus = bus};
    ck_assert_int_eq(keel_cqrs_create(&c, &o), 0);
    ck_assert_int_eq(keel_cqrs_create_schema(c), 0);
    ck_assert_int_eq(keel_cqrs_command(c, "append", cmd_append, NULL), 0);
    saga s = {c, NULL, 0, 0, 0};
    keel_bus_sub *sub;
    keel_bus_sub_opts so = {.pattern = ">", .handler = on_event_run, .ud = &s};
    ck_assert_int_eq(keel_bus_subscribe(bus, &so, &sub), 0);
    keel_cqrs_projection_opts po = {.name = "saga", .handler = apply_saga, .ud = &s};
    ck_assert_int_eq(keel_cqrs_projection_create(c, &po, &s.p), 0);
    keel_cqrs_result r;
    ck_assert_int_eq(keel_cqrs_send(c, "append", "orders", 6, NULL, &r), 0);
    ck_assert_int_eq(s.nested, 2);
    ck_assert_int_eq(s.nested_rc, 0);
    ck_assert_int_eq(s.applied, 2); /* the order, then the shipment, each once */
    ck_assert_uint_gt(keel_cqrs_projection_position(s.p), r.position);
    keel_cqrs_projection_destroy(s.p);
    keel_cqrs_destroy(c);
    keel_bus_destroy(bus);
}

START_TEST(a_projection_run_from_its_own_handler_does_not_wait_for_itself) { runs_itself(NULL); }
END_TEST

START_TEST(pg_a_projection_run_from_its_own_handler_does_not_wait_for_itself) { with_pg(runs_itself); }
END_TEST

START_TEST(a_projection_follows_in_the_background)
{
    app a = {0};
    keel_cqrs *c = open_cqrs(NULL, NULL, 0, &a);
    seen *s = calloc(1, sizeof *s);
    keel_cqrs_projection *p;
    keel_cqrs_projection_opts po = {.name = "bg", .handler = apply_seen, .ud = s, .follow_interval_ns = 5 * MS};
    ck_assert_int_eq(keel_cqrs_projection_create(c, &po, &p), 0);
    for (int i = 0; i < 20; i++)
        ck_assert_int_eq(keel_cqrs_send(c, "inc", "bg", 2, NULL, NULL), 0);
    uint64_t deadline = keel_now_ns() + 10 * S;
    while (keel_cqrs_projection_position(p) < 20 && keel_now_ns() < deadline)
        nap(MS); /* a real-thread wait */
    ck_assert_uint_eq(keel_cqrs_projection_position(p), 20);
    keel_cqrs_projection_destroy(p);
    ck_assert_uint_eq(s->n, 20);
    /* a new projection of the same name resumes at its checkpoint */
    ck_assert_int_eq(keel_cqrs_projection_create(c, &po, &p), 0);
    ck_assert_uint_eq(keel_cqrs_projection_position(p), 20);
    keel_cqrs_projection_destroy(p);
    keel_cqrs_destroy(c);
    free(s);
}
END_TEST

/* An interval near UINT64_MAX (in effect: catch up once, then never)
 * is a long wait, not a deadline that wrapped into the past. */
START_TEST(a_projection_following_at_the_longest_interval_waits)
{
    app a = {0};
    keel_cqrs *c = open_cqrs(NULL, NULL, 0, &a);
    ck_assert_int_eq(keel_cqrs_send(c, "inc", "rare", 4, NULL, NULL), 0);
    seen *s = calloc(1, sizeof *s);
    keel_cqrs_projection *p;
    keel_cqrs_projection_opts po = {.name = "rare", .handler = apply_seen, .ud = s, .follow_interval_ns = UINT64_MAX};
    ck_assert_int_eq(keel_cqrs_projection_create(c, &po, &p), 0);
    uint64_t deadline = keel_now_ns() + 10 * S;
    while (keel_cqrs_projection_position(p) < 1 && keel_now_ns() < deadline)
        nap(MS); /* the thread's first run */
    ck_assert_uint_eq(keel_cqrs_projection_position(p), 1);
    ck_assert_int_eq(keel_cqrs_send(c, "inc", "rare", 4, NULL, NULL), 0);
    nap(200 * MS);
    ck_assert_uint_eq(keel_cqrs_projection_position(p), 1); /* still waiting */
    keel_cqrs_projection_destroy(p); /* and woken by destroy */
    ck_assert_uint_eq(s->n, 1);
    keel_cqrs_destroy(c);
    free(s);
}
END_TEST

/* ---- monthly partitions made ahead ---- */

/* Whether the events partition of month y-m exists. */
static bool has_month(PGconn *d, const char *prefix, int y, int m)
{
    char sql[256];
    snprintf(sql, sizeof sql, "SELECT count(*) FROM pg_class WHERE relname = '%sevents_%04d_%02d'", prefix, y, m);
    return kt_pg_number(d, sql) == 1;
}

static void drop_month(PGconn *d, const char *prefix, int y, int m)
{
    char sql[256];
    snprintf(sql, sizeof sql, "DROP TABLE \"%sevents_%04d_%02d\"", prefix, y, m);
    kt_pg_exec(d, sql);
}

#define DAY (86400 * S)

/* Appends and projection runs make the next month's partition ahead of
 * time, once its time comes by the clock, and cost nothing before. */
START_TEST(pg_next_months_partition_is_made_by_ordinary_use)
{
    char prefix[64];
    snprintf(prefix, sizeof prefix, "%s", uniq("ahead"));
    keel_pg *pg = open_pg();
    kt_clock clk = {0};
    keel_cqrs *c;
    keel_cqrs_opts o = {.pg = pg, .prefix = prefix, .partition_by_month = 1, .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_cqrs_create(&c, &o), 0);
    ck_assert_int_eq(keel_cqrs_create_schema(c), 0);
    ck_assert_int_eq(keel_cqrs_command(c, "append", cmd_append, NULL), 0);
    keel_cqrs_projection *p;
    keel_cqrs_projection_opts po = {.name = "noop", .handler = apply_nothing};
    ck_assert_int_eq(keel_cqrs_projection_create(c, &po, &p), 0);
    PGconn *d = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    int y, m;
    server_month(d, &y, &m);
    int ny = m == 12 ? y + 1 : y, nm = m == 12 ? 1 : m + 1;
    ck_assert(has_month(d, prefix, ny, nm));
    /* as when the month has turned and the one after has no partition */
    drop_month(d, prefix, ny, nm);
    ck_assert_int_eq(keel_cqrs_send(c, "append", "a", 1, NULL, NULL), 0);
    ck_assert(!has_month(d, prefix, ny, nm)); /* known to be there until the month's end: not asked */
    kt_clock_advance(&clk, 32 * DAY);
    ck_assert_int_eq(keel_cqrs_send(c, "append", "a", 1, NULL, NULL), 0);
    ck_assert(has_month(d, prefix, ny, nm)); /* the append made it */
    drop_month(d, prefix, ny, nm);
    kt_clock_advance(&clk, 32 * DAY);
    size_t applied;
    ck_assert_int_eq(keel_cqrs_projection_run(p, &applied), 0);
    ck_assert_uint_eq(applied, 2);
    ck_assert(has_month(d, prefix, ny, nm)); /* and so did the run */
    PQfinish(d);
    keel_cqrs_projection_destroy(p);
    keel_cqrs_destroy(c);
    keel_pg_destroy(pg);
}
END_TEST

/* A projection that sends a command for each order (a saga), when the
 * month has turned and its partition is missing. ahead: the clock says
 * it is time to look (the run makes the partition before its batch);
 * else the append finds it missing and must not wait on the run's own
 * transaction for ever (the DDL would). */
static void saga_at_a_months_end(bool ahead)
{
    char prefix[64], sql[1024];
    snprintf(prefix, sizeof prefix, "%s", uniq("turn"));
    keel_pg *pg = open_pg(); /* queries time out after 20 s */
    kt_clock clk = {0};
    keel_cqrs *c;
    keel_cqrs_opts o = {.pg = pg, .prefix = prefix, .partition_by_month = 1, .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_cqrs_create(&c, &o), 0);
    ck_assert_int_eq(keel_cqrs_create_schema(c), 0);
    ck_assert_int_eq(keel_cqrs_command(c, "append", cmd_append, NULL), 0);
    PGconn *d = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    /* an order placed in an old month */
    snprintf(sql, sizeof sql,
             "CREATE TABLE \"%sevents_old\" PARTITION OF \"%sevents\" FOR VALUES FROM ('2001-01-01') TO ('2001-02-01');"
             "INSERT INTO \"%sversions\" VALUES ('orders', 1);"
             "INSERT INTO \"%sevents\" (stream_id, version, type, data, metadata, created_at) "
             "VALUES ('orders', 1, 'order.placed', '\\x01', '', '2001-01-15')",
             prefix, prefix, prefix, prefix);
    kt_pg_exec(d, sql);
    int y, m;
    server_month(d, &y, &m);
    drop_month(d, prefix, y, m); /* this month's partition: not there yet */
    saga s = {c, NULL, 0, 0, 0};
    keel_cqrs_projection_opts po = {.name = "saga", .handler = apply_saga, .ud = &s};
    ck_assert_int_eq(keel_cqrs_projection_create(c, &po, &s.p), 0);
    size_t applied;
    if (ahead) {
        kt_clock_advance(&clk, 32 * DAY);
        ck_assert_int_eq(keel_cqrs_projection_run(s.p, &applied), 0);
    } else {
        uint64_t t0 = keel_now_ns();
        ck_assert_int_eq(keel_cqrs_projection_run(s.p, &applied), KEEL_ETIMEDOUT);
        ck_assert_uint_lt(keel_now_ns() - t0, 10 * S); /* the lock wait's bound, not the query timeout */
        ck_assert_uint_eq(applied, 0);
        ck_assert_int_eq(keel_cqrs_projection_run(s.p, &applied), 0); /* the next run makes it first */
    }
    ck_assert_uint_eq(applied, 1);
    ck_assert_int_eq(keel_cqrs_projection_run(s.p, &applied), 0);
    ck_assert_uint_eq(applied, 1); /* the shipment */
    ck_assert(has_month(d, prefix, y, m));
    snprintf(sql, sizeof sql, "SELECT count(*) FROM \"%sevents\" WHERE stream_id = 'shipments'", prefix);
    ck_assert_int_eq(kt_pg_number(d, sql), 1);
    PQfinish(d);
    keel_cqrs_projection_destroy(s.p);
    keel_cqrs_destroy(c);
    keel_pg_destroy(pg);
}

START_TEST(pg_a_saga_across_a_months_end_completes) { saga_at_a_months_end(true); }
END_TEST

START_TEST(pg_a_saga_that_finds_its_month_missing_fails_fast_then_goes_on) { saga_at_a_months_end(false); }
END_TEST

/* Dropping an old month's partition leaves its versions in the
 * uniqueness guard: a stream whose last events were in it goes on from
 * its last version, not from nothing. */
START_TEST(pg_a_stream_whose_month_was_dropped_goes_on_from_its_last_version)
{
    char prefix[64], sql[512];
    snprintf(prefix, sizeof prefix, "%s", uniq("drop"));
    keel_pg *pg = open_pg();
    keel_cqrs *c;
    keel_cqrs_opts o = {.pg = pg, .prefix = prefix, .partition_by_month = 1};
    ck_assert_int_eq(keel_cqrs_create(&c, &o), 0);
    ck_assert_int_eq(keel_cqrs_create_schema(c), 0);
    ck_assert_int_eq(keel_cqrs_command(c, "append", cmd_append, NULL), 0);
    for (int i = 0; i < 2; i++)
        ck_assert_int_eq(keel_cqrs_send(c, "append", "u", 1, NULL, NULL), 0);
    PGconn *d = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    int y, m;
    server_month(d, &y, &m);
    snprintf(sql, sizeof sql, "ALTER TABLE \"%sevents\" DETACH PARTITION \"%sevents_%04d_%02d\"", prefix, prefix, y, m);
    kt_pg_exec(d, sql); /* archived */
    drop_month(d, prefix, y, m);
    keel_cqrs_result r;
    ck_assert_int_eq(keel_cqrs_send(c, "append", "u", 1, NULL, &r), 0);
    snprintf(sql, sizeof sql, "SELECT version FROM \"%sevents\" WHERE stream_id = 'u'", prefix);
    ck_assert_int_eq(kt_pg_number(d, sql), 3);
    ck_assert_int_eq(keel_cqrs_send(c, "append", "u", 1, NULL, NULL), 0);
    snprintf(sql, sizeof sql, "SELECT max(version) FROM \"%sevents\" WHERE stream_id = 'u'", prefix);
    ck_assert_int_eq(kt_pg_number(d, sql), 4);
    PQfinish(d);
    keel_cqrs_destroy(c);
    keel_pg_destroy(pg);
}
END_TEST

/* ---- two runners of one projection ---- */

typedef struct runner {
    keel_cqrs_projection *p;
    const char *table;
    uint64_t last;
    size_t applied;
    int failures, rc;
} runner;

/* Records the event's position: a second apply of it breaks the key. */
static int apply_once_by_position(keel_cqrs_ctx *x, const keel_cqrs_event *e, void *ud)
{
    runner *r = ud;
    char sql[128], pos[24];
    snprintf(sql, sizeof sql, "INSERT INTO %s (position) VALUES ($1::bigint)", r->table);
    snprintf(pos, sizeof pos, "%llu", (unsigned long long)e->position);
    const char *v[1] = {pos};
    keel_pg_params p = {1, v, NULL, NULL, NULL, 0};
    PGresult *res = NULL;
    keel_pg_conn *c = keel_cqrs_conn(x);
    int rc = c ? keel_pg_conn_exec(c, sql, &p, &res) : KEEL_ESTATE;
    PQclear(res);
    return rc;
}

static void *run_until_last(void *arg)
{
    runner *r = arg;
    for (int i = 0; i < 2000 && keel_cqrs_projection_position(r->p) < r->last; i++) {
        size_t n = 0;
        int rc = keel_cqrs_projection_run(r->p, &n);
        r->applied += n;
        if (rc)
            r->failures++, r->rc = rc;
    }
    return NULL;
}

/* Runs of one name take turns across handles (the checkpoint's row
 * lock): two at once apply every event exactly once between them. */
START_TEST(pg_two_runners_of_one_projection_apply_each_event_once)
{
    char prefix[64], table[96], sql[256];
    snprintf(prefix, sizeof prefix, "%s", uniq("twice"));
    snprintf(table, sizeof table, "\"%srm\"", prefix);
    keel_pg *pg = open_pg();
    keel_cqrs *c;
    keel_cqrs_opts o = {.pg = pg, .prefix = prefix};
    ck_assert_int_eq(keel_cqrs_create(&c, &o), 0);
    ck_assert_int_eq(keel_cqrs_create_schema(c), 0);
    ck_assert_int_eq(keel_cqrs_command(c, "append", cmd_append, NULL), 0);
    PGconn *d = kt_pg_connect(kt_env("KEEL_TEST_PG"));
    snprintf(sql, sizeof sql, "CREATE TABLE %s (position bigint PRIMARY KEY)", table);
    kt_pg_exec(d, sql);
    keel_cqrs_result res;
    for (int i = 0; i < 500; i++) {
        char s[16];
        int l = snprintf(s, sizeof s, "s%d", i);
        ck_assert_int_eq(keel_cqrs_send(c, "append", s, (size_t)l, NULL, &res), 0);
    }
    runner r[2];
    pthread_t th[2];
    for (int i = 0; i < 2; i++) {
        r[i] = (runner){.table = table, .last = res.position};
        keel_cqrs_projection_opts po = {.name = "shared", .handler = apply_once_by_position, .ud = &r[i], .batch = 10};
        ck_assert_int_eq(keel_cqrs_projection_create(c, &po, &r[i].p), 0);
    }
    for (int i = 0; i < 2; i++)
        ck_assert_int_eq(pthread_create(&th[i], NULL, run_until_last, &r[i]), 0);
    for (int i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    for (int i = 0; i < 2; i++) {
        ck_assert_msg(r[i].failures == 0, "runner %d: %d runs failed, the last with %s", i, r[i].failures,
                      keel_err_name(r[i].rc));
        ck_assert_uint_eq(keel_cqrs_projection_position(r[i].p), res.position);
        keel_cqrs_projection_destroy(r[i].p);
    }
    ck_assert_uint_eq(r[0].applied + r[1].applied, 500);
    snprintf(sql, sizeof sql, "SELECT count(*) FROM %s", table);
    ck_assert_int_eq(kt_pg_number(d, sql), 500);
    PQfinish(d);
    keel_cqrs_destroy(c);
    keel_pg_destroy(pg);
}
END_TEST

/* ---- names at and over their limits ---- */

/* The payload: how long a stream id to use (at its limit, or one over). */
static int cmd_long_stream(keel_cqrs_ctx *x, const void *payload, size_t len, void *ud)
{
    (void)ud;
    ck_assert_uint_eq(len, sizeof(size_t));
    size_t n;
    memcpy(&n, payload, sizeof n);
    char id[KEEL_CQRS_STREAM_MAX + 2];
    memset(id, 's', n);
    id[n] = '\0';
    const keel_cqrs_event *e;
    size_t got;
    if (n > KEEL_CQRS_STREAM_MAX) {
        ck_assert_int_eq(keel_cqrs_load(x, id, &e, &got), KEEL_EINVAL);
        ck_assert_int_eq(keel_cqrs_emit(x, id, "t", "", 0, NULL, 0), KEEL_EINVAL);
        return 0;
    }
    ck_assert_int_eq(keel_cqrs_load(x, "", &e, &got), KEEL_EINVAL);
    ck_assert_int_eq(keel_cqrs_load(x, NULL, &e, &got), KEEL_EINVAL);
    ck_assert_int_eq(keel_cqrs_load(x, id, &e, &got), 0);
    ck_assert_int_eq(keel_cqrs_emit(x, id, "t", "", 0, NULL, 0), 0);
    return 0;
}

static void names_at_their_limits(keel_pg *pg)
{
    app a = {0};
    keel_cqrs *c = open_cqrs(pg, pg ? uniq("names") : NULL, 0, &a);
    ck_assert_int_eq(keel_cqrs_command(c, "long", cmd_long_stream, NULL), 0);
    size_t n = KEEL_CQRS_STREAM_MAX + 1;
    keel_cqrs_result r;
    ck_assert_int_eq(keel_cqrs_send(c, "long", &n, sizeof n, NULL, &r), 0);
    ck_assert_uint_eq(r.position, 0); /* nothing emitted */
    keel_cqrs_result_free(&r);
    n = KEEL_CQRS_STREAM_MAX;
    ck_assert_int_eq(keel_cqrs_send(c, "long", &n, sizeof n, NULL, &r), 0);
    ck_assert_uint_gt(r.position, 0);
    keel_cqrs_result_free(&r);
    char key[KEEL_CQRS_NAME_MAX + 2];
    memset(key, 'k', sizeof key - 1);
    key[sizeof key - 1] = '\0'; /* 129 bytes */
    ck_assert_int_eq(keel_cqrs_send(c, "inc", "s", 1, key, &r), KEEL_EINVAL);
    ck_assert_int_eq(atomic_load(&a.calls), 0);
    key[KEEL_CQRS_NAME_MAX] = '\0';
    ck_assert_int_eq(keel_cqrs_send(c, "inc", "s", 1, key, &r), 0);
    keel_cqrs_result_free(&r);
    ck_assert_int_eq(keel_cqrs_send(c, "inc", "s", 1, key, &r), 0);
    ck_assert_int_eq(r.repeated, 1);
    ck_assert_int_eq(atomic_load(&a.calls), 1);
    keel_cqrs_result_free(&r);
    char name[KEEL_CQRS_NAME_MAX + 2];
    memset(name, 'p', sizeof name - 1);
    name[sizeof name - 1] = '\0';
    keel_cqrs_projection *p = NULL;
    keel_cqrs_projection_opts po = {.name = name, .handler = apply_nothing};
    ck_assert_int_eq(keel_cqrs_projection_create(c, &po, &p), KEEL_EINVAL); /* 129 bytes */
    po.name = "";
    ck_assert_int_eq(keel_cqrs_projection_create(c, &po, &p), KEEL_EINVAL);
    po.name = NULL;
    ck_assert_int_eq(keel_cqrs_projection_create(c, &po, &p), KEEL_EINVAL);
    ck_assert_ptr_null(p);
    name[KEEL_CQRS_NAME_MAX] = '\0';
    po.name = name;
    ck_assert_int_eq(keel_cqrs_projection_create(c, &po, &p), 0);
    size_t applied;
    ck_assert_int_eq(keel_cqrs_projection_run(p, &applied), 0);
    ck_assert_uint_eq(applied, 2);
    keel_cqrs_projection_destroy(p);
    keel_cqrs_destroy(c);
}

START_TEST(names_over_their_limits_are_refused) { names_at_their_limits(NULL); }
END_TEST

START_TEST(pg_names_over_their_limits_are_refused) { with_pg(names_at_their_limits); }
END_TEST

int main(void)
{
    Suite *s = suite_create("cqrs");
    TCase *tc = tcase_create("memory");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, registration_and_dispatch_errors);
    tcase_add_test(tc, each_memory_store_hashes_with_its_own_seed);
    tcase_add_test(tc, middleware_runs_in_order_and_can_stop_a_dispatch);
    tcase_add_test(tc, two_threads_on_one_stream_one_winner_per_version);
    tcase_add_test(tc, the_retry_option_runs_a_command_again);
    tcase_add_test(tc, a_conflicting_append_is_retried_on_a_fresh_read);
    tcase_add_test(tc, an_idempotent_repeat_returns_the_first_result);
    tcase_add_test(tc, a_repeat_refused_by_its_handler_returns_the_first_result);
    tcase_add_test(tc, events_are_published_on_the_bus_after_commit);
    tcase_add_test(tc, a_projection_follows_in_the_background);
    tcase_add_test(tc, a_projection_following_at_the_longest_interval_waits);
    tcase_add_test(tc, a_link_may_run_the_rest_of_the_chain_twice);
    tcase_add_test(tc, a_failed_dispatch_leaves_res_empty);
    tcase_add_test(tc, idempotency_keys_belong_to_their_command);
    tcase_add_test(tc, projections_keep_their_own_checkpoints);
    tcase_add_test(tc, a_projection_with_the_largest_batch_applies_everything);
    tcase_add_test(tc, a_run_with_nothing_left_reports_the_checkpoint);
    tcase_add_test(tc, a_projection_run_from_its_own_handler_does_not_wait_for_itself);
    tcase_add_test(tc, names_over_their_limits_are_refused);
    suite_add_tcase(s, tc);
    TCase *pg = tcase_create("pg");
    tcase_set_timeout(pg, 120);
    tcase_add_test(pg, pg_two_threads_on_one_stream_one_winner_per_version);
    tcase_add_test(pg, pg_a_conflicting_append_is_retried_on_a_fresh_read);
    tcase_add_test(pg, pg_a_partitioned_load_reads_events_and_versions_at_once);
    tcase_add_test(pg, pg_an_idempotent_repeat_returns_the_first_result);
    tcase_add_test(pg, pg_idempotency_holds_across_processes);
    tcase_add_test(pg, pg_a_repeat_refused_by_its_handler_returns_the_first_result);
    tcase_add_test(pg, pg_events_are_published_on_the_bus_after_commit);
    tcase_add_test(pg, pg_and_memory_stores_agree);
    tcase_add_test(pg, pg_a_projection_with_the_largest_batch_applies_everything);
    tcase_add_test(pg, pg_a_projection_whose_checkpoint_row_was_deleted_starts_again);
    tcase_add_test(pg, pg_a_reset_during_a_run_applies_each_event_once_more);
    tcase_add_test(pg, pg_a_handler_returning_one_fails_its_run);
    tcase_add_test(pg, pg_a_run_with_nothing_left_reports_the_checkpoint);
    tcase_add_test(pg, pg_an_append_held_open_is_not_skipped);
    tcase_add_test(pg, pg_a_projection_killed_mid_catch_up_resumes_exactly);
    tcase_add_test(pg, pg_queries_go_to_the_replica_and_read_their_writes);
    tcase_add_test(pg, pg_monthly_partitions);
    tcase_add_test(pg, pg_a_missing_schema_is_a_clear_error);
    tcase_add_test(pg, pg_a_store_opened_with_the_other_partitioning_is_refused);
    tcase_add_test(pg, pg_create_does_not_need_the_primary);
    tcase_add_test(pg, pg_a_stream_missing_its_first_events_goes_on_from_its_last);
    tcase_add_test(pg, pg_a_projection_run_from_its_own_handler_does_not_wait_for_itself);
    tcase_add_test(pg, pg_next_months_partition_is_made_by_ordinary_use);
    tcase_add_test(pg, pg_a_saga_across_a_months_end_completes);
    tcase_add_test(pg, pg_a_saga_that_finds_its_month_missing_fails_fast_then_goes_on);
    tcase_add_test(pg, pg_a_stream_whose_month_was_dropped_goes_on_from_its_last_version);
    tcase_add_test(pg, pg_names_over_their_limits_are_refused);
    suite_add_tcase(s, pg);
    TCase *race = tcase_create("pg_stress");
    tcase_set_timeout(race, 120);
    tcase_set_tags(race, "stress"); /* threads racing: not under valgrind */
    tcase_add_test(race, pg_two_runners_of_one_projection_apply_each_event_once);
    suite_add_tcase(s, race);
    TCase *down = tcase_create("pg_faults"); /* the primary stopped, an append timed out */
    tcase_set_timeout(down, 120);
    tcase_add_test(down, pg_commands_and_a_projection_through_a_primary_restart);
    tcase_add_test(down, pg_a_timed_out_append_sent_again_with_its_key_appends_once);
    suite_add_tcase(s, down);
    return kt_run(s);
}
