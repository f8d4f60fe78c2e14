/* lib/pg/exec.c — statements on a connection: sending with parameters,
 * waiting for results with a deadline, prepared statements, batches in
 * pipeline mode.
 *
 * Every wait is a poll() on the connection's socket with the connection in
 * non-blocking mode, so a server that stops answering costs at most the
 * query timeout; the connection is then marked broken and closed on
 * release, never reused.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>

#include "pg_int.h"

/* ---- waiting ---- */

int keel__pg_wait_fd(int fd, short events, uint64_t deadline)
{
    if (fd < 0)
        return KEEL_EUNAVAIL;
    for (;;) {
        int ms = -1;
        if (deadline) {
            uint64_t now = keel_now_ns();
            if (now >= deadline)
                return KEEL_ETIMEDOUT;
            uint64_t left = (deadline - now + 999999u) / 1000000u;
            ms = left > 60000 ? 60000 : (int)left;
        }
        struct pollfd p = {.fd = fd, .events = events};
        int n = poll(&p, 1, ms);
        if (n > 0)
            return 0;
        if (n < 0 && errno != EINTR)
            return KEEL_EUNAVAIL;
    }
}

uint64_t keel__pg_deadline(const keel_pg *pg, uint64_t timeout)
{
    (void)pg;
    uint64_t now = keel_now_ns();
    return !timeout ? 0 : keel__sat_add(now, timeout);
}

uint64_t keel__pg_lsn_parse(const char *s)
{
    unsigned hi, lo;
    if (!s || sscanf(s, "%X/%X", &hi, &lo) != 2)
        return 0;
    return (uint64_t)hi << 32 | lo;
}

/* ---- results ---- */

static void lost(keel_pg_conn *c, const char *what)
{
    c->broken = true;
    keel__log(KEEL_LOG_WARN, "pg", "%s: %s: %s", c->h->name, what,
              c->conn ? PQerrorMessage(c->conn) : "no connection");
    if (!c->unpooled) /* the check decides about its own host itself */
        keel__pg_conn_lost(c->h);
}

/* Whether an error means the session is gone (class 08, or the server
 * shutting down or not accepting connections), unless it is a mere ERROR,
 * after which the server goes on (a Bind with the wrong number of
 * parameters is an ERROR 08P01). */
static bool state_lost(const PGresult *r, const char *st)
{
    const char *sev = PQresultErrorField(r, PG_DIAG_SEVERITY_NONLOCALIZED);
    if (sev && strcmp(sev, "ERROR") == 0)
        return false;
    return st && (strncmp(st, "08", 2) == 0 || strcmp(st, "57P01") == 0 ||
                  strcmp(st, "57P02") == 0 || strcmp(st, "57P03") == 0);
}

/* The code for a statement's final result; *res is kept only for 0 and
 * KEEL_EBACKEND. */
static int result_rc(keel_pg_conn *c, PGresult **res)
{
    PGresult *r = *res;
    ExecStatusType st = r ? PQresultStatus(r) : PGRES_FATAL_ERROR;
    switch (st) {
    case PGRES_COMMAND_OK:
    case PGRES_TUPLES_OK:
    case PGRES_EMPTY_QUERY:
    case PGRES_SINGLE_TUPLE:
    case PGRES_COPY_IN:
    case PGRES_COPY_OUT:
    case PGRES_COPY_BOTH:
        return 0;
    default:
        break;
    }
    const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
    int rc;
    if (st == PGRES_BAD_RESPONSE) {
        c->broken = true;
        rc = KEEL_EPROTO;
    } else if (!r || PQstatus(c->conn) != CONNECTION_OK || state_lost(r, state)) {
        lost(c, "connection lost");
        rc = KEEL_EUNAVAIL;
    } else if (!state) { /* an error of libpq's own, the session intact */
        keel__log(KEEL_LOG_WARN, "pg", "%s: %s", c->h->name, PQresultErrorMessage(r));
        rc = KEEL_EINVAL;
    } else {
        if (c->quiet)
            return KEEL_EBACKEND;
        atomic_fetch_add_explicit(&c->h->errors, 1, memory_order_relaxed);
        if (keel__log_enabled(KEEL_LOG_WARN)) {
            const char *msg = PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY);
            keel__log(KEEL_LOG_WARN, "pg", "%s: %s: %s", c->h->name, state, msg ? msg : "");
        }
        return KEEL_EBACKEND;
    }
    PQclear(r);
    *res = NULL;
    return rc;
}

/* Waits until the socket is ready for events, then reads what came. A
 * connection that times out is never used again. */
static int wait_and_read(keel_pg_conn *c, short events, uint64_t deadline)
{
    int rc = keel__pg_wait_fd(PQsocket(c->conn), events, deadline);
    if (rc) {
        if (rc == KEEL_ETIMEDOUT)
            keel__log(KEEL_LOG_WARN, "pg", "%s: no answer in time: connection dropped", c->h->name);
        c->broken = true;
        return rc;
    }
    if (!PQconsumeInput(c->conn)) {
        lost(c, "receive");
        return KEEL_EUNAVAIL;
    }
    return 0;
}

/* Flushes what libpq holds for the server, reading meanwhile so that a
 * server blocked on its own output cannot block us. */
static int flush(keel_pg_conn *c, uint64_t deadline)
{
    int f;
    while ((f = PQflush(c->conn)) != 0) {
        if (f < 0) {
            lost(c, "send");
            return KEEL_EUNAVAIL;
        }
        int rc = wait_and_read(c, POLLIN | POLLOUT, deadline);
        if (rc)
            return rc;
    }
    return 0;
}

/* Waits until libpq has the next result (or knows there is none). */
static int ready(keel_pg_conn *c, uint64_t deadline)
{
    while (PQisBusy(c->conn)) {
        int rc = wait_and_read(c, POLLIN, deadline);
        if (rc)
            return rc;
    }
    return 0;
}

/* Reads a statement's results to the end and keeps the last one (an error
 * wins over what follows it); stops at COPY, which the caller drives. */
static int await(keel_pg_conn *c, uint64_t deadline, PGresult **out)
{
    PGresult *last = NULL;
    for (;;) {
        int rc = ready(c, deadline);
        if (rc) {
            PQclear(last);
            return rc;
        }
        PGresult *r = PQgetResult(c->conn);
        if (!r)
            break;
        ExecStatusType st = PQresultStatus(r);
        if (last && PQresultStatus(last) == PGRES_FATAL_ERROR) {
            PQclear(r);
        } else {
            PQclear(last);
            last = r;
        }
        if (st == PGRES_COPY_IN || st == PGRES_COPY_OUT || st == PGRES_COPY_BOTH)
            break;
    }
    *out = last;
    return 0;
}

static const keel_pg_params no_params = {0};

bool keel__pg_params_ok(const keel_pg_params *p)
{
    if (p->n < 0 || p->n > 65535 || (p->n && !p->values) ||
        (p->result_format != 0 && p->result_format != 1))
        return false;
    for (int i = 0; p->formats && i < p->n; i++) /* a binary value needs its length */
        if (p->formats[i] != 0 &&
            (p->formats[i] != 1 || !p->lengths || (p->values[i] && p->lengths[i] < 0)))
            return false;
    return true;
}

/* Sends one statement (SQL, or a prepared statement by name) without
 * waiting. */
static int send_one(keel_pg_conn *c, const char *sql, const char *name, const keel_pg_params *p)
{
    int ok = name ? PQsendQueryPrepared(c->conn, name, p->n, p->values, p->lengths, p->formats,
                                        p->result_format)
                  : PQsendQueryParams(c->conn, sql, p->n, p->types, p->values, p->lengths,
                                      p->formats, p->result_format);
    if (ok)
        return 0;
    if (PQstatus(c->conn) != CONNECTION_OK) {
        lost(c, "send");
        return KEEL_EUNAVAIL;
    }
    /* refused by libpq before sending: busy, or bad arguments */
    keel__log(KEEL_LOG_WARN, "pg", "%s: %s", c->h->name, PQerrorMessage(c->conn));
    return KEEL_EINVAL;
}

/* One statement, start to end: send, flush, await, classify; timeout 0:
 * the query timeout. Only the caller's statements count in queries, not
 * libkeel's own (checks, ROLLBACK, DEALLOCATE, set_config...). */
static int run(keel_pg_conn *c, const char *sql, const char *name, const keel_pg_params *p,
               uint64_t timeout, bool callers, PGresult **res)
{
    *res = NULL;
    if (c->broken || PQstatus(c->conn) != CONNECTION_OK)
        return KEEL_EUNAVAIL;
    uint64_t deadline = keel__pg_deadline(c->h->pg, timeout ? timeout : c->h->pg->query_timeout);
    PQsetnonblocking(c->conn, 1);
    int rc = send_one(c, sql, name, p);
    if (rc == 0)
        rc = flush(c, deadline);
    if (rc == 0)
        rc = await(c, deadline, res);
    if (!c->broken)
        PQsetnonblocking(c->conn, 0);
    if (callers)
        atomic_fetch_add_explicit(&c->h->queries, 1, memory_order_relaxed);
    return rc ? rc : result_rc(c, res);
}

int keel__pg_run(keel_pg_conn *c, const char *sql, const keel_pg_params *p, uint64_t timeout,
                 PGresult **res)
{
    return run(c, sql, NULL, p ? p : &no_params, timeout, false, res);
}

int keel__pg_query_bool(keel_pg_conn *c, const char *sql, const char *param, uint64_t timeout)
{
    keel_pg_params p = {.n = param ? 1 : 0, .values = &param};
    PGresult *r;
    int rc = run(c, sql, NULL, &p, timeout, false, &r);
    if (rc == KEEL_EBACKEND)
        PQclear(r);
    if (rc)
        return rc;
    int v = PQntuples(r) == 1 && !PQgetisnull(r, 0, 0) && PQgetvalue(r, 0, 0)[0] == 't';
    PQclear(r);
    return v;
}

KEEL_API int keel_pg_conn_exec(keel_pg_conn *c, const char *sql, const keel_pg_params *params,
                               PGresult **res)
{
    if (res)
        *res = NULL;
    if (!c || !sql || !res || (params && !keel__pg_params_ok(params)))
        return KEEL_EINVAL;
    return run(c, sql, NULL, params ? params : &no_params, 0, true, res);
}

/* ---- prepared statements ---- */

static bool is_prepared(const keel_pg_conn *c, uint32_t id)
{
    return id / 64 < c->nwords && (c->prepared[id / 64] >> (id % 64) & 1);
}

int keel__pg_bit_room(uint64_t **words, size_t *nwords, uint32_t id)
{
    if (id / 64 < *nwords)
        return 0;
    size_t n = id / 64 + 1;
    uint64_t *w = keel__realloc(*words, n * sizeof *w);
    if (!w)
        return KEEL_ENOMEM;
    memset(w + *nwords, 0, (n - *nwords) * sizeof *w);
    *words = w;
    *nwords = n;
    return 0;
}

/* Setting a bit needs keel__pg_bit_room() first. The id's holders are
 * counted: a freed id is used again only when no connection holds it
 * prepared, so that its name never runs the old statement's SQL. */
static void mark_prepared(keel_pg_conn *c, uint32_t id, bool on)
{
    if (id / 64 >= c->nwords || is_prepared(c, id) == on)
        return;
    c->prepared[id / 64] ^= (uint64_t)1 << (id % 64);
    keel_pg *pg = c->h->pg;
    pthread_mutex_lock(&pg->freed_mu);
    if (on)
        pg->holders[id]++;
    else
        keel__pg_let_go(pg, id);
    pthread_mutex_unlock(&pg->freed_mu);
}

/* Whether a DEALLOCATE's error says there was no such statement. Any
 * other leaves it maybe prepared, under a name a later statement may be
 * given. */
static bool forgot(const PGresult *r)
{
    const char *st = PQresultErrorField(r, PG_DIAG_SQLSTATE);
    return st && strcmp(st, "26000") == 0;
}

int keel__pg_forget_freed(keel_pg_conn *c, uint64_t timeout)
{
    keel_pg *pg = c->h->pg;
    pthread_mutex_lock(&pg->freed_mu);
    uint64_t seen = atomic_load(&pg->nfreed);
    pthread_mutex_unlock(&pg->freed_mu);
    for (size_t i = 0; i < c->nwords; i++) {
        pthread_mutex_lock(&pg->freed_mu); /* freed may move when it grows */
        uint64_t gone = i < pg->freed_words ? c->prepared[i] & pg->freed[i] : 0;
        pthread_mutex_unlock(&pg->freed_mu);
        for (; gone; gone &= gone - 1) {
            uint32_t id = (uint32_t)(i * 64 + (size_t)__builtin_ctzll(gone));
            char sql[32];
            snprintf(sql, sizeof sql, "DEALLOCATE keel_%u", id);
            PGresult *r = NULL;
            int rc = keel__pg_run(c, sql, NULL, timeout, &r);
            bool absent = rc == KEEL_EBACKEND && forgot(r); /* it was gone already */
            PQclear(r);
            if (rc && !absent) /* maybe still there: the session must go */
                return rc;
            mark_prepared(c, id, false);
        }
    }
    c->freed_seen = seen;
    return 0;
}

/* Prepares s on this connection unless it already is. On KEEL_EBACKEND
 * (the SQL is wrong) *res holds the server's answer. */
static int prepare(keel_pg_conn *c, keel_pg_stmt *s, PGresult **res)
{
    *res = NULL;
    if (is_prepared(c, s->id))
        return 0;
    if (c->broken || PQstatus(c->conn) != CONNECTION_OK)
        return KEEL_EUNAVAIL;
    /* Its bit's room first: prepared on the server but not marked here, it
     * would be prepared again, and the duplicate's error would abort an
     * open transaction. */
    int rc = keel__pg_bit_room(&c->prepared, &c->nwords, s->id);
    if (rc)
        return rc;
    uint64_t deadline = keel__pg_deadline(c->h->pg, c->h->pg->query_timeout);
    PQsetnonblocking(c->conn, 1);
    if (!PQsendPrepare(c->conn, s->name, s->sql, s->ntypes, s->types)) {
        if (PQstatus(c->conn) != CONNECTION_OK) {
            lost(c, "prepare");
            rc = KEEL_EUNAVAIL;
        } else { /* busy with the caller's own libpq use */
            keel__log(KEEL_LOG_WARN, "pg", "%s: %s", c->h->name, PQerrorMessage(c->conn));
            rc = KEEL_EINVAL;
        }
    }
    if (rc == 0)
        rc = flush(c, deadline);
    if (rc == 0)
        rc = await(c, deadline, res);
    if (!c->broken)
        PQsetnonblocking(c->conn, 0);
    if (rc == 0)
        rc = result_rc(c, res);
    if (rc == KEEL_EBACKEND &&
        strcmp(PQresultErrorField(*res, PG_DIAG_SQLSTATE), "42P05") == 0) {
        PQclear(*res); /* duplicate_prepared_statement: it is there already */
        *res = NULL;
        rc = 0;
    }
    if (rc == 0) {
        PQclear(*res);
        *res = NULL;
        mark_prepared(c, s->id, true);
    }
    return rc;
}

/* Whether a prepared statement's error means it must be prepared again:
 * the server forgot it (invalid_sql_statement_name: DISCARD ALL,
 * DEALLOCATE, a pooler in between), or its tables changed the columns it
 * returns ("cached plan must not change result type", which the server
 * says on every run until the statement is prepared anew). */
static bool stale(const keel_pg_stmt *s, const PGresult *r)
{
    const char *st = s ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
    const char *fn = st ? PQresultErrorField(r, PG_DIAG_SOURCE_FUNCTION) : NULL;
    return st && (strcmp(st, "26000") == 0 ||
                  (strcmp(st, "0A000") == 0 && fn && strcmp(fn, "RevalidateCachedQuery") == 0));
}

/* Forgets s on this connection, and with dealloc on the server too (it
 * may be gone there already), so that it is prepared anew when next run.
 * A DEALLOCATE refused otherwise gives the connection up: KEEL_EUNAVAIL. */
static int unprepare(keel_pg_conn *c, const keel_pg_stmt *s, bool dealloc)
{
    if (!is_prepared(c, s->id))
        return 0;
    if (!dealloc) {
        mark_prepared(c, s->id, false);
        return 0;
    }
    char sql[48];
    snprintf(sql, sizeof sql, "DEALLOCATE %s", s->name);
    PGresult *r = NULL;
    int rc = keel__pg_run(c, sql, NULL, 0, &r);
    bool gone = rc == KEEL_EBACKEND && forgot(r); /* it was gone already */
    PQclear(r);
    if (rc && !gone) { /* maybe still there: the session must go */
        c->broken = true;
        return rc == KEEL_EBACKEND ? KEEL_EUNAVAIL : rc;
    }
    mark_prepared(c, s->id, false);
    return 0;
}

KEEL_API int keel_pg_conn_exec_stmt(keel_pg_conn *c, keel_pg_stmt *s, const keel_pg_params *params,
                                    PGresult **res)
{
    if (res)
        *res = NULL;
    if (!c || !s || !res || s->pg != c->h->pg || (params && !keel__pg_params_ok(params)))
        return KEEL_EINVAL;
    const keel_pg_params *p = params ? params : &no_params;
    /* A failed Bind aborts an open transaction: the statement can be
     * prepared again and retried only outside one. */
    bool idle = PQtransactionStatus(c->conn) == PQTRANS_IDLE;
    int rc = prepare(c, s, res);
    if (rc == 0)
        rc = run(c, NULL, s->name, p, 0, true, res);
    if (rc == KEEL_EBACKEND && idle && stale(s, *res)) { /* prepare again, once */
        bool gone = strcmp(PQresultErrorField(*res, PG_DIAG_SQLSTATE), "26000") == 0;
        PQclear(*res);
        *res = NULL;
        rc = unprepare(c, s, !gone);
        if (rc == 0)
            rc = prepare(c, s, res);
        if (rc == 0)
            rc = run(c, NULL, s->name, p, 0, true, res);
    }
    return rc;
}

/* ---- batches ---- */

bool keel__pg_query_ok(const keel_pg_query *q, const keel_pg *pg)
{
    return (!q->sql != !q->stmt) && (!q->stmt || q->stmt->pg == pg) && keel__pg_params_ok(&q->params);
}

/* Takes the next result of a batch in flight: assigns it to the query it
 * belongs to, or notes the end. *cur is the query whose results are being
 * read, *has whether it got one. Returns 1 at the Sync, 0 to go on, -1
 * when nothing more is available yet, -2 for a COPY (unsupported). */
static int take(keel_pg_conn *c, keel_pg_query *q, size_t n, size_t *cur, bool *has)
{
    PGresult *r = PQgetResult(c->conn);
    if (!r) {
        if (!*has)
            return -1;
        (*cur)++;
        *has = false;
        return 0;
    }
    ExecStatusType st = PQresultStatus(r);
    if (st == PGRES_PIPELINE_SYNC) {
        PQclear(r);
        return 1;
    }
    if (st == PGRES_COPY_IN || st == PGRES_COPY_OUT || st == PGRES_COPY_BOTH) {
        PQclear(r); /* COPY has no place in a pipeline: give the connection up */
        keel__log(KEEL_LOG_WARN, "pg", "%s: COPY in a batch", c->h->name);
        c->broken = true;
        if (*cur < n)
            q[*cur].rc = KEEL_ENOTSUP;
        return -2;
    }
    *has = true;
    if (*cur >= n) { /* nothing should come: ignore it */
        PQclear(r);
        return 0;
    }
    keel_pg_query *x = &q[*cur];
    PQclear(x->res); /* a statement has one result here: keep the last */
    x->res = r;
    x->rc = st == PGRES_PIPELINE_ABORTED ? KEEL_EABORTED : result_rc(c, &x->res);
    if (x->rc == KEEL_EABORTED) {
        PQclear(x->res);
        x->res = NULL;
    }
    return 0;
}

/* Sends everything and reads results as they come, until the Sync. */
static int pipeline(keel_pg_conn *c, keel_pg_query *q, size_t n, uint64_t deadline)
{
    size_t sent = 0, cur = 0;
    bool synced = false, has = false;
    for (;;) {
        while (sent < n) {
            keel_pg_query *x = &q[sent];
            int rc = send_one(c, x->sql, x->stmt ? x->stmt->name : NULL, &x->params);
            if (rc)
                return rc;
            sent++;
            if (sent % 256 == 0 && PQflush(c->conn) != 0) /* the socket is full: read first */
                break;
        }
        if (sent == n && !synced) {
            if (!PQpipelineSync(c->conn)) {
                lost(c, "sync");
                return KEEL_EUNAVAIL;
            }
            synced = true;
        }
        int f = PQflush(c->conn);
        if (f < 0) {
            lost(c, "send");
            return KEEL_EUNAVAIL;
        }
        /* The socket took it all after all: send on. Waiting to read now
         * could wait for ever, since the server may keep its answers
         * until a Sync. */
        if (f == 0 && sent < n)
            continue;
        int rc = wait_and_read(c, (short)(POLLIN | (f ? POLLOUT : 0)), deadline);
        if (rc)
            return rc;
        while (!PQisBusy(c->conn)) {
            int t = take(c, q, n, &cur, &has);
            if (t == 1)
                return 0;
            if (t == -2)
                return KEEL_ENOTSUP;
            if (t < 0)
                break;
            if (c->broken)
                return KEEL_EUNAVAIL;
        }
    }
}

/* One attempt at a batch: statements prepared first, outside the
 * pipeline, then the pipeline. */
static int batch_once(keel_pg_conn *c, keel_pg_query *q, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        q[i].rc = KEEL_EABORTED;
        q[i].res = NULL;
    }
    for (size_t i = 0; i < n; i++) {
        if (!q[i].stmt)
            continue;
        int rc = prepare(c, q[i].stmt, &q[i].res);
        if (rc) {
            q[i].rc = rc;
            return rc;
        }
    }
    uint64_t deadline = keel__pg_deadline(c->h->pg, c->h->pg->query_timeout);
    PQsetnonblocking(c->conn, 1);
    if (!PQenterPipelineMode(c->conn)) {
        lost(c, "pipeline mode");
        return KEEL_EUNAVAIL;
    }
    int rc = pipeline(c, q, n, deadline);
    atomic_fetch_add_explicit(&c->h->queries, n, memory_order_relaxed);
    if (rc) /* left inside the pipeline: the connection is spent (and, closed,
             * it takes the unfinished transaction with it) */
        c->broken = true;
    else if (!PQexitPipelineMode(c->conn))
        lost(c, "leaving pipeline mode");
    if (!c->broken)
        PQsetnonblocking(c->conn, 0);
    /* all or nothing: one failure aborts the others */
    int first = rc;
    for (size_t i = 0; i < n && !first; i++)
        if (q[i].rc && q[i].rc != KEEL_EABORTED)
            first = q[i].rc;
    for (size_t i = 0; i < n; i++) {
        if (q[i].rc == KEEL_EBACKEND || q[i].rc == KEEL_ENOTSUP)
            continue;
        if (rc == KEEL_EUNAVAIL || rc == KEEL_ETIMEDOUT || rc == KEEL_EPROTO)
            q[i].rc = rc; /* the connection failed: outcome unknown */
        else if (first)
            q[i].rc = KEEL_EABORTED;
        if (q[i].rc != 0) {
            PQclear(q[i].res);
            q[i].res = NULL;
        }
    }
    for (size_t i = 0; i < n && !first; i++)
        if (q[i].rc == KEEL_EABORTED) /* no failure seen, yet not run */
            first = KEEL_EPROTO;
    return first;
}

/* The statement of the batch that failed because it must be prepared
 * again, or n. */
static size_t forgotten(const keel_pg_query *q, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (q[i].rc == KEEL_EBACKEND && stale(q[i].stmt, q[i].res))
            return i;
    return n;
}

/* Whether the statements before the i-th surely left the batch's implicit
 * transaction open, so that the i-th's failure rolled them all back. One
 * that may have ended it (COMMIT, BEGIN, a VACUUM, a CALL, ...) committed
 * what came before it, which a second run would commit again. */
static bool one_transaction(const keel_pg_query *q, size_t i)
{
    for (size_t j = 0; j < i; j++)
        if (!keel__pg_keeps_xact(q[j].stmt ? q[j].stmt->sql : q[j].sql))
            return false;
    return true;
}

KEEL_API int keel_pg_conn_batch(keel_pg_conn *c, keel_pg_query *q, size_t n)
{
    if (!c || (!q && n))
        return KEEL_EINVAL;
    for (size_t i = 0; i < n; i++)
        if (!keel__pg_query_ok(&q[i], c->h->pg))
            return KEEL_EINVAL;
    for (size_t i = 0; i < n; i++) {
        q[i].rc = KEEL_EABORTED;
        q[i].res = NULL;
    }
    if (n == 0)
        return 0;
    if (c->broken || PQstatus(c->conn) != CONNECTION_OK)
        return KEEL_EUNAVAIL;
    /* busy: a result not read yet (which PQisBusy() does not count) or a
     * COPY, all of which PQenterPipelineMode() refuses */
    if (PQpipelineStatus(c->conn) != PQ_PIPELINE_OFF ||
        PQtransactionStatus(c->conn) == PQTRANS_ACTIVE)
        return KEEL_ESTATE;
    bool idle = PQtransactionStatus(c->conn) == PQTRANS_IDLE;
    int rc = batch_once(c, q, n);
    size_t bad = rc == KEEL_EBACKEND && idle ? forgotten(q, n) : n;
    if (bad < n && !one_transaction(q, bad)) {
        /* not run again: its error stands, and it is prepared anew at the
         * next call (outside a transaction; else by a later one) */
        if (PQtransactionStatus(c->conn) == PQTRANS_IDLE) {
            bool gone = strcmp(PQresultErrorField(q[bad].res, PG_DIAG_SQLSTATE), "26000") == 0;
            unprepare(c, q[bad].stmt, !gone); /* a lost connection says so at the next call */
        }
    } else if (bad < n) {
        /* the batch was rolled back whole: prepare again, run it once more */
        rc = 0;
        for (size_t i = 0; i < n; i++) {
            PQclear(q[i].res);
            q[i].res = NULL;
            if (q[i].stmt && rc == 0)
                rc = unprepare(c, q[i].stmt, true); /* another's plan may be stale too */
        }
        for (size_t i = 0; rc && i < n; i++)
            q[i].rc = rc;
        if (rc == 0)
            rc = batch_once(c, q, n);
    }
    return rc;
}
