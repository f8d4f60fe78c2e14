/* lib/cqrs/pgstore.c — keel_cqrs's PostgreSQL store.
 *
 * Tables (prefix p, identifiers quoted; the prefix is [a-z0-9_]):
 *   p_events       position bigserial, stream_id, version, type, data bytea,
 *                  metadata bytea, created_at; UNIQUE (stream_id, version)
 *                  (partitioned by month: the uniqueness moves to
 *                  p_versions, since a partitioned table's unique keys
 *                  must hold the partition key)
 *   p_versions     stream_id, version: a row per event ever appended, kept
 *                  when its partition is dropped, so a stream's version
 *                  is its largest here, not its last event left (read
 *                  with the events in one statement: one snapshot)
 *   p_idempotency  key primary key, reply
 *   p_checkpoints  name primary key, position
 *
 * An append is one pipeline, one transaction: the append lock
 * (pg_advisory_xact_lock on a key from the prefix, held to the commit),
 * the idempotency row, the events. Versions are dense, so a writer that
 * got there first always holds the version we insert: the unique key
 * turns a lost race into 23505, reported as KEEL_ECONFLICT. The lock makes
 * positions follow commit order (see keel/cqrs.h).
 *
 * Monthly partitions are made a month ahead: an append or a projection
 * run, before its transaction, makes this month's and the next month's
 * when the clock says the server's month may have turned since it last
 * looked. CREATE TABLE ... PARTITION OF waits for every transaction that
 * read the events table, a projection's batch among them, maybe one on
 * this very thread (a saga's send): so that DDL waits MONTH_LOCK_WAIT at
 * most, and a try that fails is tried again LOOK_AGAIN_NS later.
 *
 * Values travel in binary: bytea as is, bigint as 8 big-endian bytes.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <keel/pg.h>

#include "../hash.h"
#include "cqrs_int.h"

struct cpg {
    keel_pg *pg;
    char *prefix;
    int partitioned;
    char events[64], idem[64], cps[64], versions[64];
    char lock_s[24];
    keel_pg_stmt *load, *idem_get, *ins_event, *ins_version, *ins_idem, *lock, *cp_get, *cp_make, *pending;
    keel__clock clock;
    _Atomic uint64_t look_at; /* the clock's time to make sure of the months again; 0: now */
    atomic_bool kind_ok;      /* check_kind() passed */
};

#define MONTH_LOCK_WAIT "500ms"
#define LOOK_AGAIN_NS (60 * 1000000000ull)

int64_t keel__cqrs_lock_key(const char *prefix)
{
    return (int64_t)(keel__hash64(prefix, strlen(prefix), 0x6b65656c) >> 1);
}

static uint64_t be64(const char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return be64toh(v);
}

/* A statement from an SQL template with the table names filled in. */
static int stmt(keel_pg *pg, keel_pg_stmt **out, const char *fmt, const char *table)
{
    char sql[512];
    snprintf(sql, sizeof sql, fmt, table);
    return keel_pg_stmt_create(pg, sql, 0, NULL, out);
}

#define COLS "position, stream_id, version, type, data, metadata, " \
             "(extract(epoch from created_at) * 1000000)::bigint"

/* Whether prefix+events, if there, is of the kind the option says: a
 * writer without partition_by_month on a partitioned store writes no
 * versions rows and finds no UNIQUE (stream_id, version) on the events
 * (a version appended twice); one with it on a plain store finds no
 * versions table. KEEL_EINVAL, logged, on a mismatch. */
static int check_kind(cpg *s)
{
    char sql[160];
    snprintf(sql, sizeof sql, "SELECT relkind FROM pg_class WHERE oid = to_regclass('%s')", s->events);
    PGresult *r = NULL;
    int rc = keel_pg_exec(s->pg, KEEL_PG_WRITE, sql, NULL, &r);
    char want = s->partitioned ? 'p' : 'r';
    if (rc == 0 && PQntuples(r) == 1 && PQgetvalue(r, 0, 0)[0] != want) {
        keel__log(KEEL_LOG_ERROR, "cqrs", "%s is %s, but partition_by_month is %s: refused", s->events,
                  PQgetvalue(r, 0, 0)[0] == 'p' ? "partitioned" : "not a partitioned table",
                  s->partitioned ? "set" : "not set");
        rc = KEEL_EINVAL;
    }
    if (rc == 0 && PQntuples(r) == 1) /* no table yet: ask again once there is */
        atomic_store(&s->kind_ok, true);
    PQclear(r);
    return rc;
}

/* Before a command's first load or append: a check create could not make
 * (the primary did not answer, or the tables were not there yet). */
static int kind_checked(cpg *s)
{
    return atomic_load(&s->kind_ok) ? 0 : check_kind(s);
}

int keel__cqrs_pg_create(keel_pg *pg, const char *prefix, int partitioned, keel_clock_fn clock, void *clock_ud,
                         cpg **out)
{
    cpg *s = keel__calloc(1, sizeof *s);
    if (!s || !(s->prefix = keel__strdup(prefix))) {
        keel__free(s);
        return KEEL_ENOMEM;
    }
    s->pg = pg;
    s->partitioned = partitioned;
    s->clock = (keel__clock){clock, clock_ud};
    snprintf(s->events, sizeof s->events, "\"%sevents\"", prefix);
    snprintf(s->idem, sizeof s->idem, "\"%sidempotency\"", prefix);
    snprintf(s->cps, sizeof s->cps, "\"%scheckpoints\"", prefix);
    snprintf(s->versions, sizeof s->versions, "\"%sversions\"", prefix);
    snprintf(s->lock_s, sizeof s->lock_s, "%lld", (long long)keel__cqrs_lock_key(prefix));
    char lock[96], pending[512];
    snprintf(lock, sizeof lock, "SELECT pg_advisory_xact_lock(%s)", s->lock_s);
    snprintf(pending, sizeof pending,
             "SELECT c.position, EXISTS (SELECT 1 FROM %s e WHERE e.position > c.position) FROM %s c WHERE c.name = $1",
             s->events, s->cps);
    int rc = 0;
    if (!partitioned) {
        rc = stmt(pg, &s->load, "SELECT " COLS " FROM %s WHERE stream_id = $1 ORDER BY version", s->events);
    } else { /* the guard and the events in one statement: one snapshot (see keel__cqrs_pg_load) */
        char load[512];
        snprintf(load, sizeof load,
                 "WITH g AS (SELECT max(version) AS v FROM %s WHERE stream_id = $1) "
                 "SELECT " COLS ", g.v FROM g LEFT JOIN %s ON stream_id = $1 ORDER BY version",
                 s->versions, s->events);
        rc = keel_pg_stmt_create(pg, load, 0, NULL, &s->load);
    }
    rc = rc ? rc : stmt(pg, &s->idem_get, "SELECT reply FROM %s WHERE key = $1", s->idem);
    rc = rc ? rc
            : stmt(pg, &s->ins_event,
                   "INSERT INTO %s (stream_id, version, type, data, metadata) VALUES ($1, $2::bigint, $3, $4, $5) "
                   "RETURNING position, (extract(epoch from created_at) * 1000000)::bigint",
                   s->events);
    rc = rc ? rc : stmt(pg, &s->ins_version, "INSERT INTO %s (stream_id, version) VALUES ($1, $2::bigint)", s->versions);
    rc = rc ? rc : stmt(pg, &s->ins_idem, "INSERT INTO %s (key, reply) VALUES ($1, $2)", s->idem);
    rc = rc ? rc : stmt(pg, &s->lock, "%s", lock);
    rc = rc ? rc : stmt(pg, &s->cp_get, "SELECT position FROM %s WHERE name = $1", s->cps);
    rc = rc ? rc : stmt(pg, &s->cp_make, "INSERT INTO %s (name, position) VALUES ($1, 0) ON CONFLICT DO NOTHING", s->cps);
    rc = rc ? rc : stmt(pg, &s->pending, "%s", pending);
    if (rc == 0 && check_kind(s) == KEEL_EINVAL) /* primary not there: the first append asks */
        rc = KEEL_EINVAL;
    if (rc) {
        keel__cqrs_pg_destroy(s);
        return rc;
    }
    *out = s;
    return 0;
}

void keel__cqrs_pg_destroy(cpg *s)
{
    keel_pg_stmt *all[] = {s->load, s->idem_get, s->ins_event, s->ins_version,
                           s->ins_idem, s->lock, s->cp_get, s->cp_make, s->pending};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        keel_pg_stmt_free(all[i]);
    keel__free(s->prefix);
    keel__free(s);
}

/* The server's month (created_at takes now(), and the client's clock may
 * be on the other side of a month's end) and the time left in it. */
static int server_month(cpg *s, int *year, int *month, uint64_t *left_ns)
{
    PGresult *r = NULL;
    int rc = keel_pg_exec(s->pg, KEEL_PG_WRITE,
                          "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY MM'), extract(epoch from "
                          "date_trunc('month', now() AT TIME ZONE 'UTC') + interval '1 month' - "
                          "(now() AT TIME ZONE 'UTC'))::bigint",
                          NULL, &r);
    long long left = -1;
    if (rc == 0 && (PQntuples(r) != 1 || PQnfields(r) != 2 ||
                    sscanf(PQgetvalue(r, 0, 0), "%d %d", year, month) != 2 || *month < 1 || *month > 12 ||
                    sscanf(PQgetvalue(r, 0, 1), "%lld", &left) != 1 || left < 0))
        rc = KEEL_EPROTO;
    PQclear(r);
    *left_ns = rc == 0 ? (uint64_t)left * 1000000000u : 0;
    return rc;
}

/* CREATE TABLE IF NOT EXISTS of the partition k months after year-month. */
static void month_sql(cpg *s, char *sql, size_t len, int year, int month, int k)
{
    int y = year, m = month + k;
    for (; m > 12; m -= 12)
        y++;
    int ny = m == 12 ? y + 1 : y, nm = m == 12 ? 1 : m + 1;
    snprintf(sql, len,
             "CREATE TABLE IF NOT EXISTS \"%sevents_%04d_%02d\" PARTITION OF %s FOR VALUES "
             "FROM ('%04d-%02d-01 00:00:00+00') TO ('%04d-%02d-01 00:00:00+00')",
             s->prefix, y, m, s->events, y, m, ny, nm);
}

/* The months are there until the server's month ends: look again then
 * (a minute on, at the soonest, should the clocks' rates differ). */
static void made_months(cpg *s, uint64_t left_ns)
{
    atomic_store(&s->look_at, keel__clock_now(&s->clock) + (left_ns > LOOK_AGAIN_NS ? left_ns : LOOK_AGAIN_NS));
}

/* This month's partition and the next month's, waiting MONTH_LOCK_WAIT
 * at most for the events table's lock. KEEL_ETIMEDOUT: a transaction that
 * read the table held it. */
static int make_months(cpg *s)
{
    int year = 0, month = 0;
    uint64_t left = 0;
    int rc = server_month(s, &year, &month, &left);
    if (rc)
        return rc;
    char sql[3][768];
    snprintf(sql[0], sizeof sql[0], "SELECT set_config('lock_timeout', '%s', true)", MONTH_LOCK_WAIT);
    for (int k = 0; k < 2; k++)
        month_sql(s, sql[1 + k], sizeof sql[0], year, month, k);
    keel_pg_query q[3];
    memset(q, 0, sizeof q);
    for (size_t i = 0; i < 3; i++)
        q[i].sql = sql[i];
    rc = keel_pg_batch(s->pg, q, 3);
    for (size_t i = 0; i < 3; i++) {
        const char *state = q[i].rc == KEEL_EBACKEND ? PQresultErrorField(q[i].res, PG_DIAG_SQLSTATE) : NULL;
        if (state && strcmp(state, "55P03") == 0) /* lock_not_available */
            rc = KEEL_ETIMEDOUT;
        PQclear(q[i].res);
    }
    if (rc == 0)
        made_months(s, left);
    return rc;
}

/* Before an append or a projection's batch, never inside a transaction
 * on the events table: the months, when it is time to look again. One
 * thread looks; a failure is logged and tried again later (a month of
 * chances before the next month's partition is needed). */
static void look_ahead(cpg *s)
{
    if (!s->partitioned)
        return;
    uint64_t now = keel__clock_now(&s->clock), at = atomic_load(&s->look_at);
    if (now < at || !atomic_compare_exchange_strong(&s->look_at, &at, now + LOOK_AGAIN_NS))
        return; /* not yet, or another thread looks */
    int rc = make_months(s);
    if (rc)
        keel__log(KEEL_LOG_WARN, "cqrs", "%s: next month's partition not made (%s): trying again later", s->events,
                  keel_strerror(rc));
}

int keel__cqrs_pg_schema(cpg *s)
{
    char sql[10][768];
    size_t n = 0;
    int year = 0, month = 0;
    uint64_t left = 0;
    int krc = check_kind(s); /* CREATE ... IF NOT EXISTS would pass over the other kind */
    if (krc)
        return krc;
    snprintf(sql[n++], sizeof sql[0], "SELECT pg_advisory_xact_lock(%s)", s->lock_s); /* one creator at a time */
    if (!s->partitioned) {
        snprintf(sql[n++], sizeof sql[0],
                 "CREATE TABLE IF NOT EXISTS %s (position bigserial PRIMARY KEY, stream_id text NOT NULL, "
                 "version bigint NOT NULL, type text NOT NULL, data bytea NOT NULL, metadata bytea NOT NULL, "
                 "created_at timestamptz NOT NULL DEFAULT now(), UNIQUE (stream_id, version))",
                 s->events);
    } else {
        snprintf(sql[n++], sizeof sql[0],
                 "CREATE TABLE IF NOT EXISTS %s (position bigserial, stream_id text NOT NULL, "
                 "version bigint NOT NULL, type text NOT NULL, data bytea NOT NULL, metadata bytea NOT NULL, "
                 "created_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (position, created_at)) "
                 "PARTITION BY RANGE (created_at)",
                 s->events);
        snprintf(sql[n++], sizeof sql[0],
                 "CREATE TABLE IF NOT EXISTS %s (stream_id text, version bigint, PRIMARY KEY (stream_id, version))",
                 s->versions);
        int rc = server_month(s, &year, &month, &left);
        if (rc)
            return rc;
        for (int k = 0; k < 2; k++) /* this month and the next */
            month_sql(s, sql[n++], sizeof sql[0], year, month, k);
        snprintf(sql[n++], sizeof sql[0], "CREATE INDEX IF NOT EXISTS \"%sevents_stream\" ON %s (stream_id, version)",
                 s->prefix, s->events);
    }
    snprintf(sql[n++], sizeof sql[0], "CREATE TABLE IF NOT EXISTS %s (key text PRIMARY KEY, reply bytea NOT NULL)",
             s->idem);
    snprintf(sql[n++], sizeof sql[0], "CREATE TABLE IF NOT EXISTS %s (name text PRIMARY KEY, position bigint NOT NULL)",
             s->cps);
    keel_pg_query q[10];
    memset(q, 0, sizeof q);
    for (size_t i = 0; i < n; i++)
        q[i].sql = sql[i];
    int rc = keel_pg_batch(s->pg, q, n);
    for (size_t i = 0; i < n; i++)
        PQclear(q[i].res);
    if (rc == 0 && s->partitioned)
        made_months(s, left);
    return rc;
}

/* The rows of res (COLS, binary, then `extra` more columns) as events
 * pointing into it; a row of NULLs (a left join's, no event) is none. */
static int to_events(PGresult *res, int extra, keel_cqrs_event **evs, size_t *n)
{
    int rows = PQntuples(res);
    if (PQnfields(res) != 7 + extra || PQfformat(res, 0) != 1)
        return KEEL_EPROTO;
    if (rows == 1 && PQgetisnull(res, 0, 0))
        rows = 0;
    for (int r = 0; r < rows; r++) /* bigints are 8 bytes, or the table is not ours */
        if (PQgetlength(res, r, 0) != 8 || PQgetlength(res, r, 2) != 8 || PQgetlength(res, r, 6) != 8)
            return KEEL_EPROTO;
    keel_cqrs_event *out = keel__calloc(rows > 0 ? (size_t)rows : 1, sizeof *out);
    if (!out)
        return KEEL_ENOMEM;
    for (int r = 0; r < rows; r++) {
        keel_cqrs_event *e = &out[r];
        e->position = be64(PQgetvalue(res, r, 0));
        e->stream = PQgetvalue(res, r, 1);
        e->version = be64(PQgetvalue(res, r, 2));
        e->type = PQgetvalue(res, r, 3);
        e->data = PQgetvalue(res, r, 4);
        e->len = (size_t)PQgetlength(res, r, 4);
        e->meta = PQgetvalue(res, r, 5);
        e->meta_len = (size_t)PQgetlength(res, r, 5);
        e->time_ns = (uint64_t)((int64_t)be64(PQgetvalue(res, r, 6))) * 1000u;
    }
    *evs = out;
    *n = (size_t)(rows > 0 ? rows : 0);
    return 0;
}

int keel__cqrs_pg_load(cpg *s, const char *stream, keel_cqrs_event **evs, size_t *n, void **owner,
                       uint64_t *version)
{
    /* The primary: the version must be current. Partitioned, the guard's
     * version comes in the same statement, so from the same snapshot as
     * the events: a writer that commits meanwhile is in both or in
     * neither. Two statements would each take their own snapshot at READ
     * COMMITTED, and a writer committing between them would give the
     * handler the old events with the new version, so its append would
     * follow an event it never saw without a conflict. */
    int krc = kind_checked(s);
    if (krc)
        return krc;
    const char *v[1] = {stream};
    keel_pg_params p = {1, v, NULL, NULL, NULL, 1};
    PGresult *res = NULL;
    int rc = keel_pg_exec_stmt(s->pg, KEEL_PG_WRITE, s->load, &p, &res);
    *version = 0;
    if (rc == 0)
        rc = to_events(res, s->partitioned ? 1 : 0, evs, n);
    if (rc == 0 && s->partitioned && PQntuples(res) > 0 && !PQgetisnull(res, 0, 7)) {
        if (PQgetlength(res, 0, 7) == 8) {
            *version = be64(PQgetvalue(res, 0, 7));
        } else {
            keel__free(*evs);
            rc = KEEL_EPROTO;
        }
    }
    if (rc) {
        PQclear(res);
        return rc;
    }
    *owner = res;
    return 0;
}

void keel__cqrs_pg_free_owner(void *owner) { PQclear(owner); }

/* One attempt; KEEL_ENOTFOUND: no partition for the rows (a month
 * nobody created yet). */
static int append_once(cpg *s, const cappend *a, cappended *out)
{
    size_t per = s->partitioned ? 2 : 1, nq = 1 + (a->key ? 1 : 0) + per * a->nev;
    keel_pg_query *q = keel__calloc(nq, sizeof *q);
    char (*ver)[24] = keel__malloc((a->nev ? a->nev : 1) * sizeof *ver);
    const char **vals = keel__malloc((5 * a->nev + 3) * sizeof *vals);
    int *lens = keel__malloc((5 * a->nev + 3) * sizeof *lens), *fmts = keel__malloc((5 * a->nev + 3) * sizeof *fmts);
    int rc = q && ver && vals && lens && fmts ? 0 : KEEL_ENOMEM;
    size_t k = 0, v = 0, key_q = 0, first_event_q = 0;
    if (rc == 0) {
        q[k++] = (keel_pg_query){.stmt = s->lock};
        if (a->key) {
            key_q = k;
            vals[v] = a->key, lens[v] = 0, fmts[v] = 0;
            vals[v + 1] = a->reply_len ? a->reply : "", lens[v + 1] = (int)a->reply_len, fmts[v + 1] = 1;
            q[k++] = (keel_pg_query){.stmt = s->ins_idem, .params = {2, &vals[v], &lens[v], &fmts[v], NULL, 0}};
            v += 2;
        }
        first_event_q = k;
        for (size_t i = 0; i < a->nev; i++) {
            const cpending *e = &a->ev[i];
            snprintf(ver[i], sizeof ver[i], "%llu", (unsigned long long)e->version);
            const char *x[5] = {e->stream, ver[i], e->type, e->len ? e->data : "", e->meta_len ? e->meta : ""};
            int l[5] = {0, 0, 0, (int)e->len, (int)e->meta_len}, f[5] = {0, 0, 0, 1, 1};
            for (int j = 0; j < 5; j++)
                vals[v + j] = x[j], lens[v + j] = l[j], fmts[v + j] = f[j];
            if (s->partitioned) /* first: a conflict fails before the big table is written */
                q[k++] = (keel_pg_query){.stmt = s->ins_version, .params = {2, &vals[v], &lens[v], &fmts[v], NULL, 0}};
            q[k++] = (keel_pg_query){.stmt = s->ins_event, .params = {5, &vals[v], &lens[v], &fmts[v], NULL, 1}};
            v += 5;
        }
        rc = keel_pg_batch(s->pg, q, k);
    }
    if (rc == KEEL_EBACKEND) { /* which statement, and why */
        for (size_t i = 0; i < k; i++) {
            if (q[i].rc != KEEL_EBACKEND)
                continue;
            const char *state = PQresultErrorField(q[i].res, PG_DIAG_SQLSTATE);
            if (!state)
                continue;
            if (strcmp(state, "23505") == 0) /* unique_violation */
                rc = a->key && i == key_q ? KEEL_EEXIST : KEEL_ECONFLICT;
            else if (strcmp(state, "57014") == 0 || strcmp(state, "55P03") == 0) /* canceled, lock_not_available */
                rc = KEEL_ETIMEDOUT;
            else if (strcmp(state, "23514") == 0 && s->partitioned) /* no partition for the row */
                rc = KEEL_ENOTFOUND;
        }
    }
    for (size_t i = 0; rc == 0 && i < a->nev; i++) {
        PGresult *r = q[first_event_q + i * per + per - 1].res;
        out->positions[i] = be64(PQgetvalue(r, 0, 0));
        out->times[i] = (uint64_t)((int64_t)be64(PQgetvalue(r, 0, 1))) * 1000u;
    }
    for (size_t i = 0; q && i < k; i++)
        PQclear(q[i].res);
    keel__free(q);
    keel__free(ver);
    keel__free(vals);
    keel__free(lens);
    keel__free(fmts);
    return rc;
}

int keel__cqrs_pg_append(cpg *s, const cappend *a, cappended *out, int want_lsn, int ahead)
{
    int krc = kind_checked(s);
    if (krc)
        return krc;
    if (ahead)
        look_ahead(s);
    int rc = append_once(s, a, out);
    if (rc == KEEL_ENOTFOUND) { /* the month's partition (unused for a month), made now, and once more */
        keel__log(KEEL_LOG_WARN, "cqrs", "%s: no partition for this month: creating it", s->events);
        rc = make_months(s);
        if (rc) /* the next append or run looks again before its transaction */
            atomic_store(&s->look_at, 0);
        rc = rc ? rc : append_once(s, a, out);
        if (rc == KEEL_ENOTFOUND)
            rc = KEEL_EBACKEND;
    }
    out->lsn = 0;
    if (rc == 0 && want_lsn && keel_pg_write_lsn(s->pg, &out->lsn) != 0)
        out->lsn = 0; /* committed all the same; the next ask just cannot wait for it */
    return rc;
}

int keel__cqrs_pg_idem_get(cpg *s, const char *key, void **reply, size_t *len)
{
    const char *v[1] = {key};
    keel_pg_params p = {1, v, NULL, NULL, NULL, 1};
    PGresult *res = NULL;
    int rc = keel_pg_exec_stmt(s->pg, KEEL_PG_WRITE, s->idem_get, &p, &res);
    if (rc == 0 && PQntuples(res) == 0)
        rc = KEEL_ENOTFOUND;
    if (rc == 0) {
        *len = (size_t)PQgetlength(res, 0, 0);
        *reply = NULL; /* empty: NULL */
        if (*len && (*reply = keel__malloc(*len)))
            memcpy(*reply, PQgetvalue(res, 0, 0), *len);
        else if (*len)
            rc = KEEL_ENOMEM;
    }
    PQclear(res);
    return rc;
}

int keel__cqrs_pg_checkpoint(cpg *s, const char *name, uint64_t *pos)
{
    const char *v[1] = {name};
    keel_pg_params p = {1, v, NULL, NULL, NULL, 1};
    PGresult *res = NULL;
    int rc = keel_pg_exec_stmt(s->pg, KEEL_PG_WRITE, s->cp_make, &p, &res); /* the row, once */
    PQclear(res);
    res = NULL;
    if (rc == 0)
        rc = keel_pg_exec_stmt(s->pg, KEEL_PG_WRITE, s->cp_get, &p, &res);
    *pos = rc == 0 && PQntuples(res) == 1 ? be64(PQgetvalue(res, 0, 0)) : 0;
    PQclear(res);
    return rc;
}

/* One statement on c; the result is dropped unless res. */
static int run(keel_pg_conn *c, const char *sql, const keel_pg_params *p, PGresult **res)
{
    PGresult *r = NULL;
    int rc = keel_pg_conn_exec(c, sql, p, &r);
    if (res && rc == 0)
        *res = r;
    else
        PQclear(r);
    return rc;
}

/* One batch. *gone: the checkpoint row went away while the run waited
 * for its lock (told apart from the return value, which may be any
 * handler's). */
static int project_once(cpg *s, const char *name, size_t batch, keel_cqrs_ctx *ctx,
                        int (*apply)(keel_cqrs_ctx *, const keel_cqrs_event *, void *), void *ud, size_t *applied,
                        uint64_t *checkpoint, int ahead, bool *gone)
{
    *applied = 0;
    *gone = false;
    if (ahead) /* before the batch's connection: a pool of one must not wait on itself */
        look_ahead(s);
    keel_pg_conn *c;
    int rc = keel_pg_acquire(s->pg, KEEL_PG_WRITE, &c);
    if (rc)
        return rc;
    /* Anything to do? Asked outside a transaction, so an idle poll takes
     * no transaction id and writes nothing; the locked read below asks
     * again. */
    const char *pv[1] = {name};
    keel_pg_params pp = {1, pv, NULL, NULL, NULL, 0};
    PGresult *pend = NULL;
    rc = keel_pg_conn_exec_stmt(c, s->pending, &pp, &pend);
    if (rc == 0 && PQntuples(pend) == 0) { /* its row deleted (a reset): made again, at the start */
        PQclear(pend);
        pend = NULL;
        PGresult *made = NULL;
        rc = keel_pg_conn_exec_stmt(c, s->cp_make, &pp, &made);
        PQclear(made);
        if (rc == 0)
            rc = keel_pg_conn_exec_stmt(c, s->pending, &pp, &pend);
    }
    bool found = rc == 0 && PQntuples(pend) == 1;
    bool idle = rc == 0 && (!found || PQgetvalue(pend, 0, 1)[0] == 'f');
    /* another runner of the name may have moved it */
    uint64_t was = found ? strtoull(PQgetvalue(pend, 0, 0), NULL, 10) : UINT64_MAX;
    PQclear(pend);
    if (rc || idle) {
        keel_pg_release(c);
        if (rc == 0)
            *checkpoint = was; /* UINT64_MAX: unchanged */
        return rc;
    }
    char sql[512], limit[24], from[24];
    const char *v[2] = {name, NULL};
    keel_pg_params p1 = {1, v, NULL, NULL, NULL, 1};
    PGresult *cp = NULL, *evs = NULL;
    rc = run(c, "BEGIN", NULL, NULL);
    if (rc == 0) { /* the row lock: one runner of this projection at a time, across processes */
        snprintf(sql, sizeof sql, "SELECT position FROM %s WHERE name = $1 FOR UPDATE", s->cps);
        rc = run(c, sql, &p1, &cp);
    }
    /* No row: a reset deleted it while we waited for its lock. A batch
     * from 0 now could not be recorded (the UPDATE finds nothing), and the
     * next run would make the row at 0 and apply it again: roll back and
     * start over, which makes the row again first. */
    if (rc == 0 && PQntuples(cp) != 1) {
        *gone = true;
        rc = KEEL_ENOTFOUND;
    }
    uint64_t at = rc == 0 ? be64(PQgetvalue(cp, 0, 0)) : 0;
    if (rc == 0) {
        snprintf(from, sizeof from, "%llu", (unsigned long long)at);
        snprintf(limit, sizeof limit, "%zu", batch < INT64_MAX ? batch : (size_t)INT64_MAX); /* bigint's */
        const char *ev[2] = {from, limit};
        keel_pg_params p2 = {2, ev, NULL, NULL, NULL, 1};
        snprintf(sql, sizeof sql, "SELECT " COLS " FROM %s WHERE position > $1::bigint ORDER BY position LIMIT $2::bigint",
                 s->events);
        rc = run(c, sql, &p2, &evs);
    }
    keel_cqrs_event *list = NULL;
    size_t n = 0;
    if (rc == 0)
        rc = to_events(evs, 0, &list, &n);
    ctx->conn = c;
    size_t done = 0;
    for (; rc == 0 && done < n; done++)
        if ((rc = apply(ctx, &list[done], ud)) != 0)
            break;
    ctx->conn = NULL;
    if (rc == 0 && n) {
        char to[24];
        snprintf(to, sizeof to, "%llu", (unsigned long long)list[n - 1].position);
        v[1] = to;
        keel_pg_params p3 = {2, v, NULL, NULL, NULL, 0};
        snprintf(sql, sizeof sql, "UPDATE %s SET position = $2::bigint WHERE name = $1", s->cps);
        rc = run(c, sql, &p3, NULL);
        if (rc == 0)
            at = list[n - 1].position;
    }
    if (rc == 0)
        rc = run(c, "COMMIT", NULL, NULL);
    else
        run(c, "ROLLBACK", NULL, NULL); /* best effort: release rolls back anyway */
    keel__free(list);
    PQclear(cp);
    PQclear(evs);
    keel_pg_release(c);
    if (rc == 0) {
        *applied = n;
        *checkpoint = at;
    }
    return rc;
}

int keel__cqrs_pg_project(cpg *s, const char *name, size_t batch, keel_cqrs_ctx *ctx,
                          int (*apply)(keel_cqrs_ctx *, const keel_cqrs_event *, void *), void *ud,
                          size_t *applied, uint64_t *checkpoint, int ahead)
{
    bool gone = true;
    int rc = 0;
    for (int tries = 0; gone && tries < 3; tries++, ahead = 0)
        rc = project_once(s, name, batch, ctx, apply, ud, applied, checkpoint, ahead, &gone);
    if (gone) { /* reset again and again: nothing done, the next run goes on */
        *checkpoint = UINT64_MAX;
        rc = 0;
    }
    return rc;
}
