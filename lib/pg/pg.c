/* lib/pg/pg.c — keel_pg's hosts: connection parameters, pools, health
 * checks, the choice of the write host, and routing of acquires.
 *
 * State. Each host's role, WAL position and lag are written by a check
 * under pg->mu; the write host's index is also an atomic so that a WRITE
 * acquire reads it without a lock. Replicas are peers of a keel_lb (round
 * robin), set down while they may not serve reads. A host whose connection
 * fails between checks gets down_until (a READ or WRITE skips it) and a
 * new generation (its pooled connections, made before, are dropped when
 * next taken), and the health thread is woken.
 *
 * Lag. At each check the write host's WAL insert position is remembered
 * with the time (only when it moved: the earliest time of a position is
 * the one that counts). A replica's lag is the time since the oldest
 * remembered position it has not replayed; none: zero. With no write
 * host, nothing new is remembered, and a lag is measured as of the last
 * check that had one (the time without one is no lag, and a replica down
 * since is still behind what it missed); a replica never seen beside a
 * write host has no lag to tell: UINT64_MAX, over any limit.
 *
 * Locks: check_mu (one check at a time) before mu; keel_lb's own lock is
 * taken outside mu; the metrics registry's lock before mu.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <keel/metrics.h>

#include "pg_int.h"

/* One round trip tells a host's role, WAL position and timeline, in hex.
 * A primary's timeline starts its current WAL file's name, and its
 * position is what it has flushed: all a replica can ever receive. A
 * replica's timeline is the one its WAL receiver asks for (seen with
 * pg_read_all_stats), else that of its last restartpoint (which, after a
 * failover, trails until its next one); the last column says when the
 * receiver runs but hides it (its row shows only its pid). */
static const char HEALTH_SQL[] =
    "SELECT pg_is_in_recovery(),"
    " CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
    " ELSE pg_current_wal_flush_lsn() END,"
    " CASE WHEN pg_is_in_recovery() THEN to_hex(coalesce("
    "(SELECT received_tli FROM pg_stat_wal_receiver),"
    " (SELECT timeline_id FROM pg_control_checkpoint())))"
    " ELSE substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END,"
    " EXISTS (SELECT FROM pg_stat_wal_receiver WHERE received_tli IS NULL)";

/* Nanoseconds in whole milliseconds, rounded up (without adding first,
 * which wraps near UINT64_MAX): the server's unit for its timeouts. */
static uint64_t ms_up(uint64_t ns)
{
    return ns / 1000000u + (ns % 1000000u != 0);
}

/* ---- connection parameters ---- */

static void free_params(pghost *h)
{
    for (size_t i = 0; h->kw && h->kw[i]; i++) {
        keel__free((char *)h->kw[i]);
        keel__free((char *)h->val[i]);
    }
    keel__free(h->kw);
    keel__free(h->val);
    keel__free(h->name);
    h->kw = h->val = NULL;
    h->name = NULL;
}

static int add_param(pghost *h, size_t *n, const char *k, const char *v)
{
    char *kc = keel__strdup(k), *vc = keel__strdup(v);
    if (!kc || !vc) {
        keel__free(kc);
        keel__free(vc);
        return KEEL_ENOMEM;
    }
    h->kw[*n] = kc;
    h->val[*n] = vc;
    (*n)++;
    return 0;
}

/* Elements of a comma-separated list, as libpq counts them. */
static size_t list_len(const char *s)
{
    size_t n = 1;
    for (; *s; s++)
        n += *s == ',';
    return n;
}

static bool c_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r';
}

/* One element of a port list as libpq 15 reads it when it gets to its
 * host (parse_int_param, then PQconnectPoll's range check): strtol's
 * number, spaces around it allowed. 1: usable (empty: the default port);
 * 0: out of range, the host is skipped; -1: not an int, the connect ends
 * there. */
static int port_use(const char *s, size_t len)
{
    size_t i = 0;
    if (!len)
        return 1;
    while (i < len && c_space(s[i]))
        i++;
    bool neg = i < len && s[i] == '-';
    if (i < len && (s[i] == '-' || s[i] == '+'))
        i++;
    size_t digits = 0;
    uint64_t v = 0;
    for (; i < len && s[i] >= '0' && s[i] <= '9'; i++, digits++)
        if (v <= (uint64_t)INT_MAX + 1) /* past it stays past it */
            v = v * 10 + (uint64_t)(s[i] - '0');
    while (i < len && c_space(s[i]))
        i++;
    if (i < len || !digits || v > (uint64_t)INT_MAX + neg)
        return -1;
    return !neg && v >= 1 && v <= 65535;
}

/* Whether libpq would reach a host with a usable port: it tries them in
 * order, skips one whose port is out of range and gives up at one whose
 * port is no number. One port serves every host. */
static bool ports_ok(const char *s)
{
    for (;;) {
        size_t len = strcspn(s, ",");
        int use = port_use(s, len);
        if (use)
            return use > 0;
        if (!s[len])
            return false;
        s += len + 1;
    }
}

static bool among(const char *v, const char *const *set)
{
    for (; *set; set++)
        if (strcmp(v, *set) == 0)
            return true;
    return false;
}

/* Whether libpq would take the values it parsed without complaint but
 * refuse at every connect (connectOptions2 in libpq 15): no usable port, an
 * unknown sslmode or target_session_attrs, lists of hosts and ports that
 * do not match. Refused at create, they are KEEL_EINVAL, not a host down
 * at each call. An empty value is libpq's default. */
static bool values_ok(const PQconninfoOption *opts)
{
    static const char *const sslmodes[] = {"disable", "allow", "prefer", "require",
                                           "verify-ca", "verify-full", NULL};
    static const char *const attrs[] = {"any", "read-write", "read-only", "primary",
                                        "standby", "prefer-standby", NULL};
    const char *host = "", *hostaddr = "", *port = "", *sslmode = "", *attr = "";
    for (const PQconninfoOption *o = opts; o->keyword; o++) {
        const char *v = o->val ? o->val : "";
        if (strcmp(o->keyword, "host") == 0)
            host = v;
        else if (strcmp(o->keyword, "hostaddr") == 0)
            hostaddr = v;
        else if (strcmp(o->keyword, "port") == 0)
            port = v;
        else if (strcmp(o->keyword, "sslmode") == 0)
            sslmode = v;
        else if (strcmp(o->keyword, "target_session_attrs") == 0)
            attr = v;
    }
    /* libpq counts the hosts in hostaddr if given, else in host */
    size_t nhosts = hostaddr[0] ? list_len(hostaddr) : host[0] ? list_len(host) : 1;
    const char *why = NULL;
    if (port[0] && list_len(port) != 1 && list_len(port) != nhosts)
        why = "port numbers do not match the hosts";
    else if (port[0] && !ports_ok(port))
        why = "no host with a valid port";
    else if (host[0] && hostaddr[0] && list_len(host) != nhosts)
        why = "host names do not match the hostaddr values";
    else if (sslmode[0] && !among(sslmode, sslmodes))
        why = "invalid sslmode";
    else if (attr[0] && !among(attr, attrs))
        why = "invalid target_session_attrs";
    if (why)
        keel__log(KEEL_LOG_ERROR, "pg", "malformed conninfo: %s", why);
    return !why;
}

/* The conninfo's parameters, plus libkeel's: a fallback application name
 * unless the conninfo has one (libpq takes the last value given) and,
 * added to `options`, the statement timeout. */
static int host_params(pghost *h, const char *conninfo, uint64_t statement_timeout)
{
    char *err = NULL;
    PQconninfoOption *opts = PQconninfoParse(conninfo, &err);
    if (!opts) {
        keel__log(KEEL_LOG_ERROR, "pg", "malformed conninfo: %s", err ? err : "out of memory");
        int rc = err ? KEEL_EINVAL : KEEL_ENOMEM;
        PQfreemem(err);
        return rc;
    }
    if (!values_ok(opts)) {
        PQconninfoFree(opts);
        return KEEL_EINVAL;
    }
    size_t count = 0;
    for (PQconninfoOption *o = opts; o->keyword; o++)
        count++;
    h->kw = keel__calloc(count + 3, sizeof *h->kw);
    h->val = keel__calloc(count + 3, sizeof *h->val);
    int rc = h->kw && h->val ? 0 : KEEL_ENOMEM;
    char st[128] = "";
    if (statement_timeout)
        snprintf(st, sizeof st, "-c statement_timeout=%llu",
                 (unsigned long long)ms_up(statement_timeout));
    const char *host = "", *hostaddr = "", *port = "", *service = "";
    bool have_options = false, have_fallback = false;
    size_t n = 0;
    for (PQconninfoOption *o = opts; rc == 0 && o->keyword; o++) {
        if (!o->val)
            continue;
        if (strcmp(o->keyword, "options") == 0 && st[0]) {
            size_t len = strlen(o->val) + strlen(st) + 2;
            char *both = keel__malloc(len);
            if (!both) {
                rc = KEEL_ENOMEM;
                break;
            }
            snprintf(both, len, "%s %s", o->val, st);
            rc = add_param(h, &n, "options", both);
            keel__free(both);
            have_options = true;
            continue;
        }
        if ((rc = add_param(h, &n, o->keyword, o->val)) != 0)
            break;
        if (strcmp(o->keyword, "host") == 0)
            host = h->val[n - 1];
        else if (strcmp(o->keyword, "hostaddr") == 0)
            hostaddr = h->val[n - 1];
        else if (strcmp(o->keyword, "port") == 0)
            port = h->val[n - 1];
        else if (strcmp(o->keyword, "service") == 0)
            service = h->val[n - 1];
        else if (strcmp(o->keyword, "fallback_application_name") == 0)
            have_fallback = o->val[0] != '\0'; /* empty: unset, to libpq */
    }
    if (rc == 0 && st[0] && !have_options)
        rc = add_param(h, &n, "options", st);
    if (rc == 0 && !have_fallback)
        rc = add_param(h, &n, "fallback_application_name", "libkeel");
    PQconninfoFree(opts);
    if (rc)
        return rc;
    /* Empty: libpq's default, which a service or PGHOST/PGPORT may set
     * (libpq reads them only when it connects): the server is known only
     * from an address and a port both written, and no service. The
     * address connected to is hostaddr, when given. */
    const char *shown = host[0] ? host : hostaddr[0] ? hostaddr : NULL;
    h->addr = service[0] || !port[0] ? NULL : hostaddr[0] ? hostaddr : shown;
    h->port = port;
    /* as long as it needs: a DNS name has up to 253 bytes, a socket
     * directory and a list of hosts more; room for add_host's "#<index>" */
    size_t len = strlen(shown ? shown : "localhost") + strlen(service) + strlen(port) + 40;
    if (!(h->name = keel__malloc(len)))
        return KEEL_ENOMEM;
    if (!shown && service[0])
        snprintf(h->name, len, "service=%s%s%s", service, port[0] ? ":" : "", port);
    else
        snprintf(h->name, len, "%s:%s", shown ? shown : "localhost", port[0] ? port : "5432");
    return 0;
}

/* ---- connecting ---- */

/* The server's notices and warnings go to the log hook, not to stderr. */
static void notice(void *arg, const char *msg)
{
    const pghost *h = arg;
    keel__log(KEEL_LOG_INFO, "pg", "%s: %.*s", h->name, (int)strcspn(msg, "\n"), msg);
}

/* A new connection within the connect timeout (libpq's own has a 2 s
 * floor): PQconnectStartParams, then PQconnectPoll on our own poll(). */
static int connect_host(pghost *h, PGconn **out)
{
    keel_pg *pg = h->pg;
    PGconn *c = PQconnectStartParams(h->kw, h->val, 0);
    if (!c)
        return KEEL_ENOMEM;
    uint64_t deadline = keel__pg_deadline(pg, pg->connect_timeout);
    PQsetErrorVerbosity(c, PQERRORS_VERBOSE); /* a refusal's SQLSTATE, in the message */
    PostgresPollingStatusType st = PGRES_POLLING_WRITING;
    int rc = PQstatus(c) == CONNECTION_BAD ? KEEL_EUNAVAIL : 0;
    while (rc == 0 && st != PGRES_POLLING_OK) {
        if (st == PGRES_POLLING_FAILED) {
            rc = KEEL_EUNAVAIL;
            break;
        }
        rc = keel__pg_wait_fd(PQsocket(c), st == PGRES_POLLING_READING ? POLLIN : POLLOUT, deadline);
        if (rc == 0)
            st = PQconnectPoll(c);
    }
    if (rc) {
        atomic_fetch_add_explicit(&h->conn_failures, 1, memory_order_relaxed);
        const char *msg = rc == KEEL_ETIMEDOUT ? "timed out" : PQerrorMessage(c);
        keel__log(KEEL_LOG_WARN, "pg", "%s: connect: %.*s", h->name, (int)strcspn(msg, "\n"), msg);
        /* too_many_connections: the server is up and serving others (our
         * own pooled connections, often); only this connection is refused */
        rc = strstr(msg, ":  53300:") ? KEEL_EBUSY : KEEL_EUNAVAIL; /* a timeout: not there */
        PQfinish(c);
        return rc;
    }
    PQsetErrorVerbosity(c, PQERRORS_DEFAULT);
    atomic_fetch_add_explicit(&h->connects, 1, memory_order_relaxed);
    PQsetNoticeProcessor(c, notice, h);
    *out = c;
    return 0;
}

/* The host goes without the client check: said once. */
static void no_check_interval(pghost *h, const char *why)
{
    if (!atomic_exchange(&h->no_check_interval, true))
        keel__log(KEEL_LOG_WARN, "pg",
                  "%s: client_connection_check_interval not set (%.*s): a query dropped for its"
                  " timeout runs on there until it ends", h->name, (int)strcspn(why, "\n"), why);
}

/* With a query timeout, the server checks every so often that the client
 * is still there (client_connection_check_interval), and so stops a query
 * whose connection we dropped. Set once connected, never as a startup
 * option: a server before 14 does not know it, and one not on Linux takes
 * only 0; either would refuse every connection. They go without. */
static int set_check_interval(keel_pg_conn *c)
{
    keel_pg *pg = c->h->pg;
    if (!pg->query_timeout)
        return 0;
    int version = PQserverVersion(c->conn);
    if (version < 140000) {
        char why[32];
        snprintf(why, sizeof why, "server version %d", version);
        no_check_interval(c->h, why);
        return 0;
    }
    uint64_t ms = ms_up(pg->query_timeout);
    char v[24];
    snprintf(v, sizeof v, "%llu", (unsigned long long)(ms < 1000 ? ms : 1000));
    const char *vp = v;
    keel_pg_params p = {.n = 1, .values = &vp};
    PGresult *r;
    c->quiet = true; /* refused: the warning below says it, once */
    int rc = keel__pg_run(c, "SELECT set_config('client_connection_check_interval', $1, false)",
                          &p, pg->connect_timeout, &r);
    c->quiet = false;
    if (rc == KEEL_EBACKEND) {
        const char *msg = PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY);
        no_check_interval(c->h, msg ? msg : "refused");
        rc = 0;
    }
    PQclear(r);
    return rc ? KEEL_EUNAVAIL : 0; /* lost or silent: as a connect that failed */
}

static int conn_init(void *obj, void *ud)
{
    pghost *h = ud;
    keel_pg_conn *c = obj;
    memset(c, 0, sizeof *c);
    c->h = h;
    c->gen = atomic_load(&h->gen);
    int rc = connect_host(h, &c->conn);
    if (rc == 0 && (rc = set_check_interval(c)) != 0) {
        atomic_fetch_add_explicit(&h->conn_failures, 1, memory_order_relaxed);
        PQfinish(c->conn);
        c->conn = NULL;
    }
    return rc;
}

static void conn_fini(void *obj, void *ud)
{
    keel_pg *pg = ((pghost *)ud)->pg;
    keel_pg_conn *c = obj;
    PQfinish(c->conn); /* the session's statements go with it */
    pthread_mutex_lock(&pg->freed_mu);
    for (size_t i = 0; i < c->nwords; i++)
        for (uint64_t w = c->prepared[i]; w; w &= w - 1)
            keel__pg_let_go(pg, (uint32_t)(i * 64 + (size_t)__builtin_ctzll(w)));
    pthread_mutex_unlock(&pg->freed_mu);
    keel__free(c->prepared);
}

/* ---- host state ---- */

static void kick(keel_pg *pg)
{
    pthread_mutex_lock(&pg->tmu);
    pg->kick = true;
    pthread_cond_signal(&pg->tcv);
    pthread_mutex_unlock(&pg->tmu);
}

void keel__pg_conn_lost(pghost *h)
{
    atomic_fetch_add(&h->gen, 1);
    kick(h->pg);
}

/* A connect failed: the host is skipped until the next check finds it up,
 * or for one interval. */
static void host_down(pghost *h)
{
    keel_pg *pg = h->pg;
    atomic_fetch_add(&h->gen, 1);
    uint64_t until = keel__sat_add(keel__clock_now(&pg->clock), pg->interval);
    uint64_t cur = atomic_load(&h->down_until);
    while (cur < until && !atomic_compare_exchange_weak(&h->down_until, &cur, until))
        ;
    kick(pg);
}

static bool usable(pghost *h, uint64_t now)
{
    return atomic_load_explicit(&h->down_until, memory_order_acquire) <= now;
}

/* Whether an idle connection is known dead: the server that ended the
 * session (a restart, pg_terminate_backend, idle_session_timeout) has
 * already closed the socket, which then reads. A poll costs little beside
 * a round trip, and a write sent on such a connection would come back
 * "outcome unknown". */
static bool idle_conn_dead(PGconn *conn)
{
    struct pollfd p = {.fd = PQsocket(conn), .events = POLLIN};
    if (p.fd < 0)
        return true;
    /* a notice or a NOTIFY reads too: only a closed session is dead; the
     * server's FATAL comes in one read and the end of the stream in the
     * next */
    for (int i = 0; i < 4 && poll(&p, 1, 0) > 0; i++)
        if (!PQconsumeInput(conn) || PQstatus(conn) != CONNECTION_OK)
            return true;
    return false; /* nothing more said: alive as far as anyone can tell */
}

int keel__pg_conn_get(pghost *h, uint64_t timeout, keel_pg_conn **out)
{
    keel_pg_conn *c;
    int rc;
    while ((rc = keel_pool_acquire_timeout(h->pool, timeout, (void **)&c)) == 0 &&
           (c->gen != atomic_load(&h->gen) || idle_conn_dead(c->conn)))
        keel_pool_discard(h->pool, c); /* made before the host last failed, or closed by the server */
    if (rc == KEEL_EUNAVAIL)
        host_down(h);
    else if (rc == KEEL_EBUSY) /* refused for its connection limit: the host stays up */
        rc = KEEL_EUNAVAIL;
    if (rc == 0)
        *out = c;
    return rc;
}

/* ---- health ---- */

typedef struct probe {
    bool ok, recovery;
    bool busy; /* not ok: the server refused a connection for its limit */
    bool tli_hidden; /* a replica's receiver timeline, not shown to our user */
    uint64_t lsn;
    uint32_t timeline;
} probe;

static void probe_host(pghost *h, probe *out)
{
    keel_pg *pg = h->pg;
    memset(out, 0, sizeof *out);
    if (h->hconn && PQstatus(h->hconn) != CONNECTION_OK) {
        PQfinish(h->hconn);
        h->hconn = NULL;
    }
    atomic_fetch_add_explicit(&h->checks, 1, memory_order_relaxed);
    /* A connection kept from an earlier check may have been lost since (a
     * killed backend, a restart): that says nothing of the host, so the
     * check asks once more on a new one. */
    for (int attempt = 0; attempt < 2 && !out->ok; attempt++) {
        bool kept = h->hconn != NULL;
        int crc = h->hconn ? 0 : connect_host(h, &h->hconn);
        if (crc) {
            out->busy = crc == KEEL_EBUSY;
            break;
        }
        keel_pg_conn tmp = {.conn = h->hconn, .h = h, .unpooled = true};
        PGresult *r;
        int rc = keel__pg_run(&tmp, HEALTH_SQL, NULL, pg->connect_timeout, &r);
        if (rc == 0 && PQntuples(r) == 1 && PQnfields(r) == 4) {
            out->ok = true;
            out->recovery = PQgetvalue(r, 0, 0)[0] == 't';
            out->lsn = keel__pg_lsn_parse(PQgetisnull(r, 0, 1) ? NULL : PQgetvalue(r, 0, 1));
            out->timeline = (uint32_t)strtoul(PQgetvalue(r, 0, 2), NULL, 16); /* NULL: 0 */
            out->tli_hidden = out->recovery && PQgetvalue(r, 0, 3)[0] == 't';
        }
        PQclear(r);
        if (!out->ok) {
            PQfinish(h->hconn);
            h->hconn = NULL;
        }
        if (!kept || rc != KEEL_EUNAVAIL)
            break;
    }
    if (!out->ok)
        atomic_fetch_add_explicit(&h->check_failures, 1, memory_order_relaxed);
    if (out->tli_hidden && !h->tli_hidden_said) { /* once: it stays so until granted */
        h->tli_hidden_said = true;
        keel__log(KEEL_LOG_WARN, "pg",
                  "%s: the WAL receiver's timeline is hidden from this user; after a failover"
                  " the replica serves no reads until its next restartpoint: grant pg_monitor"
                  " (or pg_read_all_stats)", h->name);
    }
}

/* How much dropping history entry j would blur the lags it tells: the
 * gap left, relative to the age of its older side (an absolute gap would
 * spread the entries evenly over the whole history, whose oldest entry
 * stays, so that after an hour of checks none is left near the present). */
static double blur(const keel_pg *pg, size_t j, uint64_t now)
{
    uint64_t age = now - pg->hist[j - 1].t;
    return age ? (double)(pg->hist[j + 1].t - pg->hist[j - 1].t) / (double)age : 0;
}

/* Under mu. The history keeps its oldest entry (so a replica stuck behind
 * it sees its lag grow without end) and, when full, drops the entry whose
 * removal blurs the times least. */
static void remember(keel_pg *pg, uint64_t now, uint64_t lsn)
{
    if (pg->nhist && pg->hist[pg->nhist - 1].lsn >= lsn)
        return; /* not moved: keep the earliest time of this position */
    if (pg->nhist == PG_HIST) {
        size_t drop = 1;
        for (size_t j = 2; j + 1 < PG_HIST; j++)
            if (blur(pg, j, now) < blur(pg, drop, now))
                drop = j;
        memmove(&pg->hist[drop], &pg->hist[drop + 1], (PG_HIST - drop - 1) * sizeof pg->hist[0]);
        pg->nhist--;
    }
    pg->hist[pg->nhist].t = now;
    pg->hist[pg->nhist].lsn = lsn;
    pg->nhist++;
}

/* Under mu: how long ago the write host was at a position that `lsn`
 * has not reached. */
static uint64_t lag_of(const keel_pg *pg, uint64_t lsn, uint64_t now)
{
    for (size_t i = 0; i < pg->nhist; i++)
        if (pg->hist[i].lsn > lsn)
            return now > pg->hist[i].t ? now - pg->hist[i].t : 0;
    return 0;
}

/* Under mu: whether a replica holds what the write host never had, so
 * that it serves nothing: it is on another timeline than the write host
 * (with none, on one older than a write host was seen on: it did not
 * follow a promotion), or past upto, the write host's position after it
 * was asked. A timeline it does not tell is not held against it. */
static bool diverged(const keel_pg *pg, const probe *p, size_t best, uint64_t upto)
{
    if (p->timeline && p->timeline != pg->timeline && (best != PG_NONE || p->timeline < pg->timeline))
        return true;
    return best != PG_NONE && p->lsn > upto;
}

static int check_round(keel_pg *pg)
{
    pthread_mutex_lock(&pg->check_mu);
    probe *pr = keel__calloc(pg->nhosts, sizeof *pr);
    if (!pr) {
        pthread_mutex_unlock(&pg->check_mu);
        return KEEL_ENOMEM;
    }
    /* the write host first: its position must not be newer than what the
     * replicas are then compared with */
    size_t w = atomic_load(&pg->writer);
    if (w != PG_NONE)
        probe_host(&pg->hosts[w], &pr[w]);
    for (size_t i = 0; i < pg->nhosts; i++)
        if (i != w)
            probe_host(&pg->hosts[i], &pr[i]);
    /* A replica past the write host's position is on a history of its own
     * (an old primary made a standby without pg_rewind), unless the write
     * host moved on while the replicas were asked: it is asked again then,
     * and a replica still past that is. */
    uint64_t upto = w != PG_NONE && pr[w].ok && !pr[w].recovery ? pr[w].lsn : UINT64_MAX;
    for (size_t i = 0; i < pg->nhosts && upto != UINT64_MAX; i++)
        if (pr[i].ok && pr[i].recovery && pr[i].lsn > upto) {
            probe again;
            probe_host(&pg->hosts[w], &again);
            if (again.ok && !again.recovery && again.timeline == pr[w].timeline)
                upto = again.lsn;
            break;
        }
    uint64_t now = keel__clock_now(&pg->clock);

    pthread_mutex_lock(&pg->mu);
    /* A host that refused the check's connection for its connection limit
     * is up, serving others (the pool, often): it stays what it was, at the
     * position it was last seen at. */
    for (size_t i = 0; i < pg->nhosts; i++) {
        const pghost *h = &pg->hosts[i];
        if (pr[i].busy && h->role != KEEL_PG_ROLE_UNKNOWN && h->role != KEEL_PG_ROLE_DOWN)
            pr[i] = (probe){.ok = true, .recovery = h->role == KEEL_PG_ROLE_REPLICA, .lsn = h->lsn,
                            .timeline = h->timeline};
    }
    /* not in recovery, newest timeline, first given; never on a timeline
     * older than one a write host was seen on: that is an old primary */
    size_t best = PG_NONE;
    for (size_t i = 0; i < pg->nhosts; i++)
        if (pr[i].ok && !pr[i].recovery && pr[i].timeline >= pg->timeline &&
            (best == PG_NONE || pr[i].timeline > pr[best].timeline))
            best = i;
    if (best != PG_NONE) {
        if (best != pg->last_writer || pr[best].timeline != pg->timeline)
            pg->nhist = 0; /* another primary: its positions only */
        pg->timeline = pr[best].timeline;
        remember(pg, now, pr[best].lsn);
        pg->writer_at = now;
    }
    for (size_t i = 0; i < pg->nhosts; i++) {
        pghost *h = &pg->hosts[i];
        if (!pr[i].ok) {
            if (h->role != KEEL_PG_ROLE_DOWN)
                atomic_fetch_add(&h->gen, 1);
            h->role = KEEL_PG_ROLE_DOWN;
            h->readable = false;
            atomic_store(&h->down_until, UINT64_MAX);
            continue;
        }
        atomic_store(&h->down_until, 0);
        h->lsn = pr[i].lsn;
        h->timeline = pr[i].timeline;
        if (!pr[i].recovery) {
            h->lag_ns = 0;
        } else if (best != PG_NONE) {
            h->lag_ns = lag_of(pg, pr[i].lsn, now);
        } else if (h->measured) { /* no write host: as of the last check with one */
            h->lag_ns = lag_of(pg, pr[i].lsn, pg->writer_at);
        } else { /* nothing it was ever measured against: unknown */
            h->lag_ns = UINT64_MAX;
        }
        h->measured = h->measured || best != PG_NONE;
        h->role = pr[i].recovery ? KEEL_PG_ROLE_REPLICA
                  : i == best    ? KEEL_PG_ROLE_PRIMARY
                                 : KEEL_PG_ROLE_FENCED;
        h->diverged = pr[i].recovery && diverged(pg, &pr[i], best, best == w ? upto : UINT64_MAX);
        h->readable = pr[i].recovery && !h->diverged && h->lag_ns <= pg->max_lag;
    }
    if (best != PG_NONE && best != pg->last_writer) {
        if (pg->last_writer != PG_NONE) {
            pg->failovers++;
            keel__log(KEEL_LOG_WARN, "pg", "writes go to %s now (was %s)", pg->hosts[best].name,
                      pg->hosts[pg->last_writer].name);
        }
        pg->last_writer = best;
    }
    atomic_store(&pg->writer, best);
    bool readable[64]; /* nhosts <= 64 */
    for (size_t i = 0; i < pg->nhosts; i++)
        readable[i] = pg->hosts[i].readable;
    pthread_mutex_unlock(&pg->mu);

    int rc = best == PG_NONE ? KEEL_EUNAVAIL : 0;
    for (size_t i = 0; i < pg->nhosts; i++) {
        pghost *h = &pg->hosts[i];
        if (h->lb_down == !readable[i])
            continue;
        if (keel_lb_set_down(pg->lb, h->peer, !readable[i]) == 0)
            h->lb_down = !readable[i];
        else if (!rc) /* no memory: the next check sets it */
            rc = KEEL_ENOMEM;
    }
    keel__free(pr);
    pthread_mutex_unlock(&pg->check_mu);
    return rc;
}

KEEL_API int keel_pg_check(keel_pg *pg)
{
    return pg ? check_round(pg) : KEEL_EINVAL;
}

static void *health_main(void *arg)
{
    keel_pg *pg = arg;
    pthread_mutex_lock(&pg->tmu);
    while (!pg->stop) {
        pg->kick = false;
        pthread_mutex_unlock(&pg->tmu);
        uint64_t started = keel_now_ns();
        check_round(pg);
        pthread_mutex_lock(&pg->tmu);
        /* the next check after the interval, or soon after a kick (a host
         * failed), but not more than ten times a second */
        uint64_t soon = pg->interval < 100000000u ? pg->interval : 100000000u;
        for (;;) {
            uint64_t due = keel__sat_add(started, pg->kick ? soon : pg->interval);
            uint64_t now = keel_now_ns();
            if (pg->stop || now >= due)
                break;
            struct timespec ts;
            keel__abstime_in(due - now, &ts);
            pthread_cond_timedwait(&pg->tcv, &pg->tmu, &ts);
        }
    }
    pthread_mutex_unlock(&pg->tmu);
    return NULL;
}

/* ---- acquiring ---- */

static int get_write(keel_pg *pg, keel_pg_conn **out)
{
    size_t w = atomic_load(&pg->writer);
    if (w == PG_NONE || !usable(&pg->hosts[w], keel__clock_now(&pg->clock)))
        return KEEL_EUNAVAIL;
    return keel__pg_conn_get(&pg->hosts[w], pg->acquire_timeout, out);
}

/* Whether the connection's host has replayed lsn: known from the last
 * check, else asked, waiting at most timeout. 1, 0 or a negative code
 * (no answer in time: the connection is given up). */
static int has_replayed(keel_pg_conn *c, uint64_t lsn, uint64_t timeout)
{
    keel_pg *pg = c->h->pg;
    pthread_mutex_lock(&pg->mu);
    bool known = c->h->lsn >= lsn;
    pthread_mutex_unlock(&pg->mu);
    if (known)
        return 1;
    char text[32];
    snprintf(text, sizeof text, "%X/%X", (unsigned)(lsn >> 32), (unsigned)lsn);
    return keel__pg_query_bool(c, "SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn", text, timeout);
}

/* A replica that may serve reads, round robin: KEEL_EUNAVAIL when none. */
static int get_replica(keel_pg *pg, keel_pg_conn **out)
{
    keel_lb_tried tried = {0};
    uint64_t now = keel__clock_now(&pg->clock);
    for (size_t k = 0; k < pg->nhosts; k++) {
        keel_lb_peer *peer;
        if (keel_lb_pick(pg->lb, &tried, &peer) != 0)
            break;
        keel_lb_done(pg->lb, peer, 1, 0);
        pghost *h = keel_lb_peer_ud(peer);
        if (usable(h, now) && keel__pg_conn_get(h, pg->acquire_timeout, out) == 0)
            return 0;
    }
    return KEEL_EUNAVAIL;
}

/* How long a replica asked its position has at least, past the wait if
 * need be: a look cut shorter than a round trip would drop a healthy
 * pooled connection, and its host's reads with it. */
#define LOOK_FLOOR 50000000u

/* A replica that has replayed lsn, whatever its lag otherwise (that lsn
 * is all the read needs). Each is asked once: with no wait (once), within
 * connect_timeout; else until the wait's deadline (keel_now_ns), or for
 * min(connect_timeout, LOOK_FLOOR) if that ends later: a replica that
 * takes the question and never answers must not hold the caller past the
 * wait it asked for by more than that floor. KEEL_EBUSY when the
 * replicas that answered are all behind it (waiting may help);
 * KEEL_EUNAVAIL when none answered or had a connection free. */
static int get_replica_after(keel_pg *pg, uint64_t lsn, uint64_t deadline, bool once,
                             keel_pg_conn **out)
{
    uint64_t now = keel__clock_now(&pg->clock);
    size_t start = atomic_fetch_add(&pg->rotor, 1);
    int rc = KEEL_EUNAVAIL;
    for (size_t k = 0; k < pg->nhosts; k++) {
        pghost *h = &pg->hosts[(start + k) % pg->nhosts];
        pthread_mutex_lock(&pg->mu);
        bool replica = h->role == KEEL_PG_ROLE_REPLICA && !h->diverged;
        pthread_mutex_unlock(&pg->mu);
        keel_pg_conn *c; /* none free now: not one to wait for */
        if (!replica || !usable(h, now) || keel__pg_conn_get(h, 0, &c) != 0)
            continue;
        uint64_t t = keel_now_ns(), timeout = pg->connect_timeout;
        uint64_t left = deadline > t ? deadline - t : 0;
        uint64_t least = timeout < LOOK_FLOOR ? timeout : LOOK_FLOOR;
        if (!once && left < timeout)
            timeout = left > least ? left : least;
        int yes = has_replayed(c, lsn, timeout);
        if (yes == 1) {
            *out = c;
            return 0;
        }
        keel_pg_release(c);
        if (yes == 0) /* silent or lost: not one to wait for */
            rc = KEEL_EBUSY;
    }
    return rc;
}

KEEL_API int keel_pg_acquire(keel_pg *pg, keel_pg_mode mode, keel_pg_conn **out)
{
    if (out)
        *out = NULL;
    if (!pg || !out || (mode != KEEL_PG_WRITE && mode != KEEL_PG_READ))
        return KEEL_EINVAL;
    if (mode == KEEL_PG_READ && get_replica(pg, out) == 0)
        return 0;
    return get_write(pg, out);
}

KEEL_API int keel_pg_acquire_after(keel_pg *pg, uint64_t lsn, uint64_t wait_ns, keel_pg_conn **out)
{
    if (out)
        *out = NULL;
    if (!pg || !out)
        return KEEL_EINVAL;
    uint64_t now = keel_now_ns(), pause = 1000000u;
    uint64_t deadline = keel__sat_add(now, wait_ns);
    for (;;) {
        int rc = get_replica_after(pg, lsn, deadline, wait_ns == 0, out);
        if (rc == 0)
            return 0;
        if (rc != KEEL_EBUSY) /* no replica to wait for */
            break;
        now = keel_now_ns();
        if (now >= deadline)
            break;
        if (pause > deadline - now)
            pause = deadline - now;
        struct timespec ts = {(time_t)(pause / 1000000000u), (long)(pause % 1000000000u)};
        nanosleep(&ts, NULL);
        if (keel_now_ns() >= deadline) /* the wait is over: no look after it */
            break;
        if (pause < 50000000u)
            pause *= 2;
    }
    return get_write(pg, out);
}

KEEL_API void keel_pg_release(keel_pg_conn *c)
{
    if (!c)
        return;
    pghost *h = c->h;
    bool keep = !c->broken && PQstatus(c->conn) == CONNECTION_OK &&
                PQpipelineStatus(c->conn) == PQ_PIPELINE_OFF && c->gen == atomic_load(&h->gen);
    if (keep && PQisnonblocking(c->conn))
        keep = PQsetnonblocking(c->conn, 0) == 0;
    if (keep) {
        PGTransactionStatusType ts = PQtransactionStatus(c->conn);
        if (ts == PQTRANS_INTRANS || ts == PQTRANS_INERROR) {
            PGresult *r;
            keel_pg *pg = h->pg;
            keep = keel__pg_run(c, "ROLLBACK", NULL,
                                pg->query_timeout ? pg->query_timeout : pg->connect_timeout, &r) == 0;
            PQclear(r);
        } else if (ts != PQTRANS_IDLE) { /* a statement or COPY in progress */
            keep = false;
        }
    }
    if (keep && c->freed_seen != atomic_load_explicit(&h->pg->nfreed, memory_order_relaxed)) {
        keel_pg *pg = h->pg;
        keep = keel__pg_forget_freed(c, pg->query_timeout ? pg->query_timeout : pg->connect_timeout) == 0;
    }
    for (PGnotify *n; keep && (n = PQnotifies(c->conn)) != NULL;)
        PQfreemem(n);
    if (keep)
        keel_pool_release(h->pool, c);
    else
        keel_pool_discard(h->pool, c);
}

KEEL_API PGconn *keel_pg_conn_raw(keel_pg_conn *c)
{
    return c ? c->conn : NULL;
}

KEEL_API size_t keel_pg_conn_host(const keel_pg_conn *c)
{
    return c ? c->h->idx : 0;
}

/* ---- one-call helpers ---- */

static int exec_any(keel_pg *pg, keel_pg_mode mode, const char *sql, keel_pg_stmt *s,
                    const keel_pg_params *p, PGresult **res)
{
    if (mode == KEEL_PG_AUTO)
        mode = s ? s->mode : keel_pg_classify(sql);
    for (int attempt = 0;; attempt++) {
        keel_pg_conn *c;
        int rc = keel_pg_acquire(pg, mode, &c);
        if (rc)
            return rc;
        rc = s ? keel_pg_conn_exec_stmt(c, s, p, res) : keel_pg_conn_exec(c, sql, p, res);
        ExecStatusType st = rc == 0 ? PQresultStatus(*res) : PGRES_COMMAND_OK;
        if (st == PGRES_COPY_IN || st == PGRES_COPY_OUT || st == PGRES_COPY_BOTH) {
            /* the connection goes back now, so nobody could carry the COPY
             * on: it is given up (the server ends the COPY, copying nothing) */
            PQclear(*res);
            *res = NULL;
            c->broken = true;
            rc = KEEL_ENOTSUP;
        }
        /* a read that lost its connection goes once more, on a new one
         * (maybe of the same host: a lost connection does not make it
         * down); a write never does */
        bool again = mode == KEEL_PG_READ && rc == KEEL_EUNAVAIL && c->broken && attempt == 0;
        keel_pg_release(c);
        if (!again)
            return rc;
    }
}

KEEL_API int keel_pg_exec(keel_pg *pg, keel_pg_mode mode, const char *sql,
                          const keel_pg_params *params, PGresult **res)
{
    if (res)
        *res = NULL;
    if (!pg || !sql || !res || mode > KEEL_PG_AUTO || (params && !keel__pg_params_ok(params)))
        return KEEL_EINVAL;
    return exec_any(pg, mode, sql, NULL, params, res);
}

KEEL_API int keel_pg_exec_stmt(keel_pg *pg, keel_pg_mode mode, keel_pg_stmt *s,
                               const keel_pg_params *params, PGresult **res)
{
    if (res)
        *res = NULL;
    if (!pg || !s || s->pg != pg || !res || mode > KEEL_PG_AUTO ||
        (params && !keel__pg_params_ok(params)))
        return KEEL_EINVAL;
    return exec_any(pg, mode, NULL, s, params, res);
}

KEEL_API int keel_pg_batch(keel_pg *pg, keel_pg_query *q, size_t n)
{
    if (!pg || (!q && n))
        return KEEL_EINVAL;
    for (size_t i = 0; i < n; i++) /* bad input is refused before a connection is taken */
        if (!keel__pg_query_ok(&q[i], pg))
            return KEEL_EINVAL;
    keel_pg_conn *c;
    int rc = keel_pg_acquire(pg, KEEL_PG_WRITE, &c);
    if (rc)
        return rc;
    rc = keel_pg_conn_batch(c, q, n);
    keel_pg_release(c);
    return rc;
}

KEEL_API int keel_pg_write_lsn(keel_pg *pg, uint64_t *lsn)
{
    if (!pg || !lsn)
        return KEEL_EINVAL;
    keel_pg_conn *c;
    int rc = keel_pg_acquire(pg, KEEL_PG_WRITE, &c);
    if (rc)
        return rc;
    /* The insert position, less a page header it may sit just after (no
     * record ends there, and an idle primary may never flush it). */
    PGresult *r;
    rc = keel__pg_run(c,
                      "SELECT pg_current_wal_insert_lsn(), current_setting('wal_block_size'),"
                      " (SELECT setting FROM pg_settings WHERE name = 'wal_segment_size')",
                      NULL, 0, &r);
    if (rc == 0) {
        uint64_t v = keel__pg_lsn_parse(PQgetvalue(r, 0, 0));
        uint64_t block = strtoull(PQgetvalue(r, 0, 1), NULL, 10);
        uint64_t segment = strtoull(PQgetvalue(r, 0, 2), NULL, 10);
        if (segment && v % segment == 40) /* after a long page header */
            v -= 40;
        else if (block && v % block == 24) /* after a short one */
            v -= 24;
        *lsn = v;
    }
    PQclear(r);
    keel_pg_release(c);
    return rc;
}

/* ---- statements ---- */

void keel__pg_let_go(keel_pg *pg, uint32_t id)
{
    uint64_t bit = (uint64_t)1 << (id % 64);
    if (--pg->holders[id] == 0 && (pg->freed[id / 64] & bit)) {
        pg->freed[id / 64] &= ~bit;
        pg->spare[pg->nspare++] = id;
    }
}

/* Under freed_mu: a spare id, else a new one, with room for it in every
 * table an id indexes, so that neither preparing nor freeing a statement
 * needs memory. */
static int new_id(keel_pg *pg, uint32_t *id)
{
    if (pg->nspare) {
        *id = pg->spare[--pg->nspare];
        return 0;
    }
    uint32_t n = pg->next_stmt;
    if (n == UINT32_MAX)
        return KEEL_ENOMEM;
    if (n >= pg->ids_cap) {
        size_t cap = pg->ids_cap ? pg->ids_cap * 2 : 64;
        uint32_t *h = keel__realloc(pg->holders, cap * sizeof *h);
        if (!h)
            return KEEL_ENOMEM;
        pg->holders = h; /* bigger already; ids_cap says so once spare is too */
        uint32_t *sp = keel__realloc(pg->spare, cap * sizeof *sp);
        if (!sp)
            return KEEL_ENOMEM;
        pg->spare = sp;
        pg->ids_cap = cap;
    }
    if (keel__pg_bit_room(&pg->freed, &pg->freed_words, n))
        return KEEL_ENOMEM;
    pg->holders[n] = 0;
    pg->next_stmt = n + 1;
    *id = n;
    return 0;
}

KEEL_API int keel_pg_stmt_create(keel_pg *pg, const char *sql, int ntypes, const Oid *types,
                                 keel_pg_stmt **out)
{
    if (out)
        *out = NULL;
    if (!pg || !sql || !out || ntypes < 0 || ntypes > 65535 || (ntypes && !types))
        return KEEL_EINVAL;
    keel_pg_stmt *s = keel__calloc(1, sizeof *s);
    if (!s || !(s->sql = keel__strdup(sql)) ||
        (ntypes && !(s->types = keel__malloc((size_t)ntypes * sizeof *types)))) {
        keel_pg_stmt_free(s);
        return KEEL_ENOMEM;
    }
    if (ntypes)
        memcpy(s->types, types, (size_t)ntypes * sizeof *types);
    pthread_mutex_lock(&pg->freed_mu);
    int rc = new_id(pg, &s->id);
    pthread_mutex_unlock(&pg->freed_mu);
    if (rc) {
        keel_pg_stmt_free(s);
        return rc;
    }
    s->pg = pg;
    s->ntypes = ntypes;
    snprintf(s->name, sizeof s->name, "keel_%u", s->id);
    s->mode = keel_pg_classify(sql);
    *out = s;
    return 0;
}

/* An id no connection holds is spare at once; else it joins pg->freed,
 * each connection that prepared it deallocates it when next released, and
 * the last of them makes it spare. */
KEEL_API void keel_pg_stmt_free(keel_pg_stmt *s)
{
    keel_pg *pg = s ? s->pg : NULL;
    if (pg) {
        pthread_mutex_lock(&pg->freed_mu);
        if (pg->holders[s->id] == 0) {
            pg->spare[pg->nspare++] = s->id;
        } else {
            pg->freed[s->id / 64] |= (uint64_t)1 << (s->id % 64);
            atomic_fetch_add(&pg->nfreed, 1);
        }
        pthread_mutex_unlock(&pg->freed_mu);
    }
    if (s) {
        keel__free(s->sql);
        keel__free(s->types);
        keel__free(s);
    }
}

/* ---- statistics and metrics ---- */

KEEL_API size_t keel_pg_hosts(keel_pg *pg)
{
    return pg ? pg->nhosts : 0;
}

KEEL_API int keel_pg_host_stats_get(keel_pg *pg, size_t host, keel_pg_host_stats *st)
{
    if (!pg || !st || host >= pg->nhosts)
        return KEEL_EINVAL;
    pghost *h = &pg->hosts[host];
    pthread_mutex_lock(&pg->mu);
    st->name = h->name;
    st->role = h->role;
    st->lsn = h->lsn;
    st->lag_ns = h->lag_ns;
    st->readable = h->readable && usable(h, keel__clock_now(&pg->clock));
    pthread_mutex_unlock(&pg->mu);
    st->checks = atomic_load(&h->checks);
    st->check_failures = atomic_load(&h->check_failures);
    st->connects = atomic_load(&h->connects);
    st->conn_failures = atomic_load(&h->conn_failures);
    st->queries = atomic_load(&h->queries);
    st->errors = atomic_load(&h->errors);
    return 0;
}

static double m_stat(pghost *h, int which)
{
    keel_pg_host_stats st = {0};
    keel_pg_host_stats_get(h->pg, h->idx, &st);
    switch (which) {
    case 0: return st.role == KEEL_PG_ROLE_PRIMARY || st.role == KEEL_PG_ROLE_REPLICA ||
                   st.role == KEEL_PG_ROLE_FENCED;
    case 1: return st.role == KEEL_PG_ROLE_PRIMARY;
    case 2: return st.readable;
    default: return st.lag_ns == UINT64_MAX ? INFINITY : (double)st.lag_ns / 1e9;
    }
}
static double m_up(void *ud) { return m_stat(ud, 0); }
static double m_primary(void *ud) { return m_stat(ud, 1); }
static double m_readable(void *ud) { return m_stat(ud, 2); }
static double m_lag(void *ud) { return m_stat(ud, 3); }
#define HOST_COUNTER(fn, field)                                                                    \
    static double fn(void *ud) { return (double)atomic_load(&((pghost *)ud)->field); }
HOST_COUNTER(m_queries, queries)
HOST_COUNTER(m_errors, errors)
HOST_COUNTER(m_connects, connects)
HOST_COUNTER(m_conn_failures, conn_failures)
HOST_COUNTER(m_check_failures, check_failures)
#undef HOST_COUNTER

static int host_metrics(keel_pg *pg, pghost *h, const char *name)
{
    keel__mfunc fs[] = {
        {1, "keel_pg_host_up", "1 when the host answered its last health check.", "host", h->name, m_up},
        {1, "keel_pg_host_primary", "1 for the host that takes writes.", "host", h->name, m_primary},
        {1, "keel_pg_host_readable", "1 while the host may serve reads.", "host", h->name, m_readable},
        {1, "keel_pg_replica_lag_seconds", "Replay lag behind the write host.", "host", h->name, m_lag},
        {0, "keel_pg_queries_total", "The caller's statements sent.", "host", h->name, m_queries},
        {0, "keel_pg_errors_total", "Statements the server refused.", "host", h->name, m_errors},
        {0, "keel_pg_connects_total", "Connections made.", "host", h->name, m_connects},
        {0, "keel_pg_connect_failures_total", "Connections that failed.", "host", h->name,
         m_conn_failures},
        {0, "keel_pg_check_failures_total", "Health checks that failed.", "host", h->name,
         m_check_failures},
    };
    return keel__metrics_funcs(pg->metrics, "pg", name, fs, sizeof fs / sizeof fs[0], h);
}

/* ---- create, destroy ---- */

static int add_host(keel_pg *pg, size_t i, const char *conninfo, const keel_pg_opts *o)
{
    pghost *h = &pg->hosts[i];
    h->pg = pg;
    h->idx = i;
    h->role = KEEL_PG_ROLE_UNKNOWN;
    h->lb_down = true;
    if (!conninfo)
        return KEEL_EINVAL;
    int rc = host_params(h, conninfo, o->statement_timeout_ns);
    bool alike = false;
    for (size_t k = 0; rc == 0 && k < i; k++) {
        const pghost *g = &pg->hosts[k];
        if (h->addr && g->addr && strcmp(g->addr, h->addr) == 0 && strcmp(g->port, h->port) == 0) {
            keel__log(KEEL_LOG_ERROR, "pg", "%s is given twice", h->name);
            rc = KEEL_EINVAL;
        }
        alike = alike || strcmp(g->name, h->name) == 0;
    }
    /* maybe two servers (a service, PGHOST): told apart in logs and labels */
    if (rc == 0 && alike)
        snprintf(h->name + strlen(h->name), 24, "#%zu", i); /* host_params kept room */
    keel_pool_opts po = {.obj_size = sizeof(keel_pg_conn),
                         .capacity = o->conns_per_host ? o->conns_per_host : 8,
                         .init = conn_init, .fini = conn_fini, .ud = h};
    if (rc == 0)
        rc = keel_pool_create(&h->pool, &po);
    keel_lb_peer_opts lo = {.name = h->name, .flags = KEEL_LB_DOWN, .ud = h};
    if (rc == 0)
        rc = keel_lb_add(pg->lb, &lo, &h->peer);
    if (rc == 0 && pg->metrics)
        rc = host_metrics(pg, h, o->metrics_name);
    return rc;
}

KEEL_API int keel_pg_create(keel_pg **out, const keel_pg_opts *o)
{
    if (out)
        *out = NULL;
    if (!out || !o || !o->primary || (o->nreplicas && !o->replicas) || o->nreplicas > 63)
        return KEEL_EINVAL;
    /* the server takes an int of milliseconds, and refuses every connection
     * that asks for more */
    if (ms_up(o->statement_timeout_ns) > INT_MAX)
        return KEEL_EINVAL;
    keel_pg *pg = keel__calloc(1, sizeof *pg);
    if (!pg)
        return KEEL_ENOMEM;
    pg->connect_timeout = o->connect_timeout_ns ? o->connect_timeout_ns : 5000000000u;
    pg->acquire_timeout = o->acquire_timeout_ns ? o->acquire_timeout_ns : 5000000000u;
    pg->query_timeout = o->query_timeout_ns;
    pg->interval = o->health_interval_ns ? o->health_interval_ns : 1000000000u;
    pg->max_lag = o->max_replica_lag_ns ? o->max_replica_lag_ns : 5000000000u;
    pg->clock = (keel__clock){o->clock, o->clock_ud};
    pg->metrics = o->metrics;
    pg->writer = 0; /* the configured primary, until a check says otherwise */
    pg->last_writer = 0;
    pthread_mutex_init(&pg->mu, NULL);
    pthread_mutex_init(&pg->check_mu, NULL);
    pthread_mutex_init(&pg->freed_mu, NULL);
    pthread_mutex_init(&pg->tmu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&pg->tcv, &ca);
    pthread_condattr_destroy(&ca);
    pg->nhosts = 1 + o->nreplicas;
    keel_lb_opts lo = {.policy = KEEL_LB_ROUND_ROBIN, .max_fails = KEEL_LB_NO_MAX_FAILS};
    int rc = (pg->hosts = keel__calloc(pg->nhosts, sizeof *pg->hosts)) ? 0 : KEEL_ENOMEM;
    if (rc == 0)
        rc = keel_lb_create(&pg->lb, &lo);
    for (size_t i = 0; rc == 0 && i < pg->nhosts; i++)
        rc = add_host(pg, i, i ? o->replicas[i - 1] : o->primary, o);
    if (rc == 0 && !o->manual_health) {
        rc = pthread_create(&pg->thread, NULL, health_main, pg) ? KEEL_ENOMEM : 0;
        pg->thread_started = rc == 0;
    }
    if (rc) {
        keel_pg_destroy(pg);
        return rc;
    }
    *out = pg;
    return 0;
}

KEEL_API void keel_pg_destroy(keel_pg *pg)
{
    if (!pg)
        return;
    if (pg->thread_started) {
        pthread_mutex_lock(&pg->tmu);
        pg->stop = true;
        pthread_cond_signal(&pg->tcv);
        pthread_mutex_unlock(&pg->tmu);
        pthread_join(pg->thread, NULL);
    }
    for (size_t i = 0; pg->hosts && i < pg->nhosts; i++) {
        pghost *h = &pg->hosts[i];
        if (pg->metrics && h->pg)
            keel_metrics_func_remove(pg->metrics, h);
        keel_pool_destroy(h->pool);
        PQfinish(h->hconn);
        free_params(h);
    }
    keel_lb_destroy(pg->lb);
    keel__free(pg->hosts);
    pthread_mutex_destroy(&pg->mu);
    pthread_mutex_destroy(&pg->check_mu);
    pthread_mutex_destroy(&pg->freed_mu);
    keel__free(pg->freed);
    keel__free(pg->holders);
    keel__free(pg->spare);
    pthread_mutex_destroy(&pg->tmu);
    pthread_cond_destroy(&pg->tcv);
    keel__free(pg);
}
