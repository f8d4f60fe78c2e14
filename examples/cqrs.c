/* examples/cqrs.c — user registration with CQRS: a command that checks and
 * emits an event, a projection that builds a directory from the events, a
 * query that reads it, an idempotent retry and a refused duplicate.
 *
 * The event store is PostgreSQL when KEEL_TEST_PG holds a conninfo (set by
 * `make demo`), else in memory. */
#include <libpq-fe.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <keel/cqrs.h>
#include <keel/pg.h>

/* The read model: who registered, in order. */
typedef struct directory {
    pthread_mutex_t mu;
    char names[16][32];
    int n;
} directory;

/* Command: register an email; its stream must be new. */
static int register_user(keel_cqrs_ctx *x, const void *payload, size_t len, void *ud)
{
    (void)ud;
    if (len == 0 || len > 31 || !memchr(payload, '@', len))
        return KEEL_EINVAL; /* validation: the handler's own rule */
    char stream[48];
    snprintf(stream, sizeof stream, "user-%.*s", (int)len, (const char *)payload);
    int rc = keel_cqrs_emit(x, stream, "user.registered", payload, len, NULL, 0);
    return rc ? rc : keel_cqrs_reply(x, "welcome", 7);
}

/* Projection: each event into the directory. The directory lives in this
 * process, the checkpoint (on PostgreSQL) in the database: a restarted
 * process would go on past events its new, empty directory never saw. A
 * read model that must outlast the process is written in the database
 * through keel_cqrs_conn(), in the batch's transaction with the
 * checkpoint: then each event is applied exactly once. */
static int index_user(keel_cqrs_ctx *x, const keel_cqrs_event *ev, void *ud)
{
    (void)x;
    directory *d = ud;
    pthread_mutex_lock(&d->mu);
    if (d->n < 16)
        snprintf(d->names[d->n++], sizeof d->names[0], "%.*s", (int)ev->len, (const char *)ev->data);
    pthread_mutex_unlock(&d->mu);
    return 0;
}

/* Query: how many users, from the read model. */
static int count_users(keel_cqrs_ctx *x, const void *payload, size_t len, void *ud)
{
    (void)payload, (void)len;
    directory *d = ud;
    pthread_mutex_lock(&d->mu);
    char text[32];
    int n = snprintf(text, sizeof text, "%d users", d->n);
    pthread_mutex_unlock(&d->mu);
    return keel_cqrs_reply(x, text, (size_t)n + 1);
}

/* Middleware: logs every dispatch and its outcome. */
static int log_link(keel_cqrs_req *q, void *ud)
{
    (void)ud;
    int rc = keel_cqrs_next(q);
    printf("  %-7s %-14s -> %s\n", keel_cqrs_req_kind(q) == KEEL_CQRS_COMMAND ? "command" : "query",
           keel_cqrs_req_name(q), rc ? keel_err_name(rc) : "ok");
    return rc;
}

int main(void)
{
    const char *conninfo = getenv("KEEL_TEST_PG");
    keel_pg *pg = NULL;
    if (conninfo && *conninfo) {
        keel_pg_opts po = {.primary = conninfo, .manual_health = 1};
        if (keel_pg_create(&pg, &po) != 0 || keel_pg_check(pg) != 0) {
            fprintf(stderr, "PostgreSQL at %s is not reachable\n", conninfo);
            return 1;
        }
    }
    char prefix[48];
    snprintf(prefix, sizeof prefix, "example_%ld_", (long)time(NULL));
    keel_cqrs *c = NULL;
    keel_cqrs_opts o = {.pg = pg, .prefix = prefix};
    int rc = keel_cqrs_create(&c, &o);
    if (rc == 0)
        rc = keel_cqrs_create_schema(c);
    if (rc) {
        fprintf(stderr, "keel_cqrs: %s\n", keel_strerror(rc));
        keel_cqrs_destroy(c);
        keel_pg_destroy(pg);
        return 1;
    }
    printf("event store: %s\n", pg ? "PostgreSQL" : "in memory");
    directory d = {PTHREAD_MUTEX_INITIALIZER, {{0}}, 0};
    if ((rc = keel_cqrs_command(c, "register_user", register_user, NULL)) ||
        (rc = keel_cqrs_query(c, "count_users", count_users, &d)) ||
        (rc = keel_cqrs_use(c, KEEL_CQRS_COMMAND | KEEL_CQRS_QUERY, log_link, NULL))) {
        fprintf(stderr, "keel_cqrs: %s\n", keel_strerror(rc));
        keel_cqrs_destroy(c);
        keel_pg_destroy(pg);
        return 1;
    }

    keel_cqrs_result r;
    keel_cqrs_send(c, "register_user", "ada@example.org", 15, "signup-1", &r);
    keel_cqrs_result_free(&r);
    keel_cqrs_send(c, "register_user", "ada@example.org", 15, "signup-1", &r); /* a client's retry */
    printf("  retry with the same key: %s, reply \"%.*s\"\n", r.repeated ? "answered from the store" : "ran again",
           (int)r.len, (const char *)r.reply);
    keel_cqrs_result_free(&r);
    keel_cqrs_send(c, "register_user", "ada@example.org", 15, NULL, NULL);   /* a duplicate: KEEL_ECONFLICT */
    keel_cqrs_send(c, "register_user", "not-an-email", 12, NULL, NULL);      /* refused: KEEL_EINVAL */
    keel_cqrs_send(c, "register_user", "grace@example.org", 17, NULL, NULL);

    keel_cqrs_projection *p;
    keel_cqrs_projection_opts po = {.name = "directory", .handler = index_user, .ud = &d};
    size_t applied = 0;
    if ((rc = keel_cqrs_projection_create(c, &po, &p)) == 0) {
        rc = keel_cqrs_projection_run(p, &applied);
        keel_cqrs_projection_destroy(p);
    }
    if (rc)
        fprintf(stderr, "projection: %s\n", keel_strerror(rc));
    printf("projection applied %zu events; checkpoint kept for the next run\n", applied);
    if (keel_cqrs_ask(c, "count_users", NULL, 0, 0, &r) == 0)
        printf("  query answer: %s (%s, %s)\n", (const char *)r.reply, d.names[0], d.names[1]);
    keel_cqrs_result_free(&r);

    if (pg) { /* the example's tables go; a real service keeps them */
        char sql[256];
        snprintf(sql, sizeof sql, "DROP TABLE \"%sevents\", \"%sidempotency\", \"%scheckpoints\"", prefix, prefix,
                 prefix);
        PGresult *res = NULL;
        keel_pg_exec(pg, KEEL_PG_WRITE, sql, NULL, &res);
        PQclear(res);
    }
    keel_cqrs_destroy(c);
    keel_pg_destroy(pg);
    return applied == 2 ? 0 : 1;
}
