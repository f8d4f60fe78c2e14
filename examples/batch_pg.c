/* examples/batch_pg.c — events batched into PostgreSQL rows: many threads
 * add, one pipeline per batch inserts, a failed batch is retried, and
 * close accounts for every event.
 *
 * The server comes from KEEL_TEST_PG (a conninfo, set by `make demo`). */
#include <libpq-fe.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include <keel/batch.h>
#include <keel/pg.h>

typedef struct event {
    long id;
    char kind[16];
} event;

typedef struct app {
    keel_pg *pg;
    keel_pg_stmt *insert;
} app;

/* One batch: one pipeline, all rows or none. ON CONFLICT makes a retry of
 * a batch whose fate was unknown (a lost connection) harmless. */
static int insert_events(void *const *items, size_t n, keel_batch_ctx *ctx, void *ud)
{
    app *a = ud;
    keel_pg_query q[500];
    char ids[500][24];
    const char *vals[500][2];
    for (size_t i = 0; i < n; i++) {
        const event *e = items[i];
        snprintf(ids[i], sizeof ids[i], "%ld", e->id);
        vals[i][0] = ids[i];
        vals[i][1] = e->kind;
        q[i] = (keel_pg_query){.stmt = a->insert, .params = {.n = 2, .values = vals[i]}};
    }
    int rc = keel_pg_batch(a->pg, q, n);
    for (size_t i = 0; i < n; i++)
        PQclear(q[i].res);
    if (rc && keel_batch_attempt(ctx) == 0)
        fprintf(stderr, "  a batch of %zu failed (%s): it will be retried\n", n, keel_strerror(rc));
    return rc;
}

static void given_up(void *const *items, size_t n, int err, void *ud)
{
    (void)items, (void)ud;
    fprintf(stderr, "  %zu event(s) given up: %s\n", n, keel_strerror(err));
}

typedef struct producer {
    keel_batch *b;
    event *events;
    long from, n;
} producer;

static void *produce(void *arg)
{
    producer *p = arg;
    for (long i = 0; i < p->n; i++) {
        event *e = &p->events[p->from + i];
        e->id = p->from + i + 1;
        snprintf(e->kind, sizeof e->kind, "%s", i % 3 ? "view" : "click");
        keel_batch_add(p->b, e, sizeof *e); /* blocks while the queue is full */
    }
    return NULL;
}

int main(void)
{
    const char *conninfo = getenv("KEEL_TEST_PG");
    if (!conninfo) {
        fprintf(stderr, "set KEEL_TEST_PG to a PostgreSQL conninfo (make demo does)\n");
        return 1;
    }
    app a;
    keel_pg_opts po = {.primary = conninfo, .manual_health = 1};
    if (keel_pg_create(&a.pg, &po) != 0)
        return 1;
    PGresult *r;
    keel_pg_exec(a.pg, KEEL_PG_WRITE, "CREATE TABLE IF NOT EXISTS demo_events "
                                      "(id bigint PRIMARY KEY, kind text)", NULL, &r);
    PQclear(r);
    keel_pg_exec(a.pg, KEEL_PG_WRITE, "TRUNCATE demo_events", NULL, &r);
    PQclear(r);
    keel_pg_stmt_create(a.pg, "INSERT INTO demo_events VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
                        0, NULL, &a.insert);

    keel_batch *b;
    keel_batch_opts o = {.handler = insert_events, .dead_letter = given_up, .ud = &a,
                         .max_items = 500, .linger_ns = 2000000, .capacity = 8192,
                         .max_retries = 5, .retry_base_ns = 50000000};
    if (keel_batch_create(&b, &o) != 0)
        return 1;
    enum { THREADS = 4, EACH = 25000 };
    event *events = calloc(THREADS * EACH, sizeof *events);
    pthread_t t[THREADS];
    producer p[THREADS];
    for (int i = 0; i < THREADS; i++) {
        p[i] = (producer){b, events, (long)i * EACH, EACH};
        pthread_create(&t[i], NULL, produce, &p[i]);
    }
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);
    keel_batch_close(b); /* every accepted event handled or given up */

    keel_batch_stats st;
    keel_batch_stats_get(b, &st);
    printf("%d threads added %llu events: %llu inserted in %llu batches, %llu retried, "
           "%llu given up\n",
           THREADS, (unsigned long long)st.accepted, (unsigned long long)st.handled,
           (unsigned long long)st.batches, (unsigned long long)st.retried,
           (unsigned long long)st.dead_lettered);
    unsigned long long most = 0;
    for (int i = 0; i < KEEL_BATCH_BUCKETS; i++)
        if (st.size[i])
            most = 1ull << i;
    printf("largest batches: up to %llu events (max_items %zu)\n", most, (size_t)o.max_items);
    keel_pg_exec(a.pg, KEEL_PG_WRITE, "SELECT count(*) FROM demo_events", NULL, &r);
    printf("rows in demo_events: %s\n", r ? PQgetvalue(r, 0, 0) : "?");
    int ok = r && atoll(PQgetvalue(r, 0, 0)) == (long long)st.handled &&
             st.accepted == st.handled + st.dead_lettered + st.dropped;
    PQclear(r);
    keel_batch_destroy(b);
    free(events);
    keel_pg_stmt_free(a.insert);
    keel_pg_destroy(a.pg);
    return ok ? 0 : 1;
}
