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
        int rc = keel_batch_add(p->b, e, sizeof *e); /* blocks while the queue is full */
        if (rc != 0) {
            fprintf(stderr, "keel_batch_add: %s\n", keel_strerror(rc));
            break;
        }
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
    PGresult *r = NULL;
    int rc = keel_pg_exec(a.pg, KEEL_PG_WRITE, "CREATE TABLE IF NOT EXISTS demo_events "
                                               "(id bigint PRIMARY KEY, kind text)", NULL, &r);
    PQclear(r);
    r = NULL;
    if (rc == 0)
        rc = keel_pg_exec(a.pg, KEEL_PG_WRITE, "TRUNCATE demo_events", NULL, &r);
    PQclear(r);
    if (rc == 0)
        rc = keel_pg_stmt_create(a.pg, "INSERT INTO demo_events VALUES ($1, $2) "
                                       "ON CONFLICT (id) DO NOTHING", 0, NULL, &a.insert);
    if (rc != 0) {
        fprintf(stderr, "setting up demo_events: %s\n", keel_strerror(rc));
        keel_pg_destroy(a.pg);
        return 1;
    }

    keel_batch *b;
    keel_batch_opts o = {.handler = insert_events, .dead_letter = given_up, .ud = &a,
                         .max_items = 500, .linger_ns = 2000000, .capacity = 8192,
                         .max_retries = 5, .retry_base_ns = 50000000};
    enum { THREADS = 4, EACH = 25000 };
    event *events = calloc(THREADS * EACH, sizeof *events);
    if (!events || (rc = keel_batch_create(&b, &o)) != 0) {
        fprintf(stderr, "keel_batch_create: %s\n", keel_strerror(events ? rc : KEEL_ENOMEM));
        free(events);
        keel_pg_stmt_free(a.insert);
        keel_pg_destroy(a.pg);
        return 1;
    }
    pthread_t t[THREADS];
    producer p[THREADS];
    int started = 0;
    for (; started < THREADS; started++) {
        p[started] = (producer){b, events, (long)started * EACH, EACH};
        if (pthread_create(&t[started], NULL, produce, &p[started]) != 0)
            break;
    }
    for (int i = 0; i < started; i++)
        pthread_join(t[i], NULL);
    if ((rc = keel_batch_close(b)) != 0) /* every accepted event handled or given up */
        fprintf(stderr, "keel_batch_close: %s\n", keel_strerror(rc));

    keel_batch_stats st;
    keel_batch_stats_get(b, &st);
    printf("%d threads added %llu events: %llu inserted in %llu batches, %llu retried, "
           "%llu given up\n",
           THREADS, (unsigned long long)st.accepted, (unsigned long long)st.handled,
           (unsigned long long)st.batches, (unsigned long long)st.retried,
           (unsigned long long)st.dead_lettered);
    int top = 0; /* size[i] counts batches of 2^(i-1)+1 to 2^i items */
    for (int i = 0; i < KEEL_BATCH_BUCKETS; i++)
        if (st.size[i])
            top = i;
    printf("largest batches: %llu to %llu events (max_items %zu)\n",
           top ? (1ull << (top - 1)) + 1 : 1, 1ull << top, (size_t)o.max_items);
    r = NULL;
    int crc = keel_pg_exec(a.pg, KEEL_PG_WRITE, "SELECT count(*) FROM demo_events", NULL, &r);
    printf("rows in demo_events: %s\n", crc == 0 ? PQgetvalue(r, 0, 0) : keel_strerror(crc));
    int ok = rc == 0 && started == THREADS && crc == 0 &&
             atoll(PQgetvalue(r, 0, 0)) == (long long)st.handled &&
             st.accepted == (unsigned long long)THREADS * EACH &&
             st.accepted == st.handled + st.dead_lettered + st.dropped;
    PQclear(r);
    keel_batch_destroy(b);
    free(events);
    keel_pg_stmt_free(a.insert);
    keel_pg_destroy(a.pg);
    return ok ? 0 : 1;
}
