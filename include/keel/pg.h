/* keel/pg.h — PostgreSQL connections for a multi-threaded program: pools
 * of libpq connections to a primary and its streaming replicas, reads
 * routed to replicas that keep up, writes to the primary, health checks,
 * failover to a promoted replica, read-your-writes by WAL position.
 *
 * Hosts. The primary and each replica are libpq conninfo strings
 * ("host=... port=... dbname=..." or "postgresql://..."); each gets a
 * keel_pool of connections, opened when first needed. Host 0 is the
 * configured primary, hosts 1..n the replicas, in the order given. A
 * conninfo without a fallback_application_name gets "libkeel". Two hosts
 * are one server given twice only when both write the address (hostaddr
 * when given, else host) and the port, the same, and name no service: a
 * service or PGHOST/PGPORT, which libpq reads only when it connects, may
 * tell apart conninfos that look alike.
 *
 * Health. A check asks every host whether it is in recovery and how far
 * its WAL is (one query on a connection of its own, made again once when
 * the one kept was lost since the last check). The write host is the
 * reachable host that is not in recovery, and of several, the one on the
 * newest timeline: so when the primary is gone and a replica has been
 * promoted, writes go to the replica without restarting the program, and
 * an old primary that comes back on its old timeline is fenced (used for
 * nothing, even when no other host is writable: a host on a timeline older
 * than one a write host was seen on never takes writes). A replica is used for reads while it answers and its lag is at
 * most max_replica_lag_ns, and never while it holds WAL the write host
 * never had: on another timeline than the write host's, or past its
 * position (an old primary made a standby without pg_rewind); neither
 * does keel_pg_acquire_after() use it. A replica's timeline is the one
 * its WAL receiver asks for, which the check sees with pg_read_all_stats
 * (pg_monitor); without, that of its last restartpoint, which after a
 * failover trails until the replica's next restartpoint (up to
 * checkpoint_timeout), so that until then a replica that did follow is
 * not read either: grant pg_monitor (or pg_read_all_stats) to the user
 * the replicas' conninfos name. Without, a warning is logged once per
 * replica the first time a check finds it hidden. Lag is measured in time with the library's
 * clock: a replica is as far behind as the oldest position the write
 * host had flushed at a check that it has not replayed yet (zero when it
 * has replayed all of them; older positions are thinned out, so a long
 * lag is known to within a fraction of itself). With no write host, a
 * lag is measured as of the last check that saw one: it does not grow
 * with the outage, and a replica down while the write host went on stays
 * behind what it missed; a replica never seen at a check that also saw a
 * write host has an unknown lag (UINT64_MAX) and serves no reads until one
 * is seen. Checks run in a
 * background thread every health_interval_ns, or only when the program
 * calls keel_pg_check() (manual_health). A connect that fails marks its
 * host down until a check finds it up (or for one interval), except one
 * refused for the server's connection limit (SQLSTATE 53300), which fails
 * only its own call (a check refused so leaves a host it had seen up as it
 * was, at its last position); a connection lost in use retires the host's older connections and wakes
 * the health thread, but one killed backend does not make the host down.
 * An idle pooled connection whose session the server has already closed
 * is dropped when taken (a poll of its socket), so a call made after a
 * restart goes on a new connection instead of failing.
 *
 * Modes. KEEL_PG_WRITE: the write host. KEEL_PG_READ: a usable replica,
 * round robin (keel_lb), else the write host. KEEL_PG_AUTO (exec helpers
 * only): READ or WRITE as keel_pg_classify() says of the SQL.
 *
 * Queries. Parameters always travel apart from the SQL (the extended
 * protocol: PQsendQueryParams, PQsendQueryPrepared), so one call runs one
 * statement and a value can never become SQL. Results are libpq's
 * PGresult, which the caller frees with PQclear(). A failed read on a
 * connection that was lost is tried once more on a new connection, chosen
 * as for any read (maybe on the same host: one lost connection does not
 * make its host down); a write is never retried by libkeel, since it may
 * have reached the server.
 *
 * Errors. KEEL_EUNAVAIL: no host could take the call (one that does not
 * answer within connect_timeout_ns counts as down), or the connection
 * was lost during it (a write's outcome is then unknown). KEEL_ETIMEDOUT:
 * no connection within acquire_timeout_ns, or no answer within
 * query_timeout_ns (the connection is dropped). KEEL_EBACKEND: the server
 * refused the statement; the PGresult is returned, with its SQLSTATE
 * (PQresultErrorField(res, PG_DIAG_SQLSTATE)) and message, and the message
 * goes to the log hook. KEEL_EPROTO: an answer libpq could not make sense
 * of (PGRES_BAD_RESPONSE). libpq's own messages and the server's notices
 * reach the log hook too (notices at KEEL_LOG_INFO).
 *
 * Thread safety: a keel_pg is used by any number of threads at once. A
 * leased keel_pg_conn belongs to one thread at a time, like a PGconn.
 * libpq sends with MSG_NOSIGNAL: no SIGPIPE comes from these connections.
 */
#ifndef KEEL_PG_H
#define KEEL_PG_H

#include <keel/common.h>

#ifdef __cplusplus
extern "C" {
#endif

/* libpq's types, declared as <libpq-fe.h> declares them (repeating an
 * identical typedef is valid C11 and C++), so that this header needs no
 * libpq include path. Include <libpq-fe.h> to call libpq. */
typedef struct pg_conn PGconn;
typedef struct pg_result PGresult;
typedef unsigned int Oid;

typedef struct keel_pg keel_pg;
typedef struct keel_pg_conn keel_pg_conn;
typedef struct keel_pg_stmt keel_pg_stmt;

typedef enum keel_pg_mode {
    KEEL_PG_WRITE = 0,
    KEEL_PG_READ = 1,
    KEEL_PG_AUTO = 2
} keel_pg_mode;

typedef struct keel_pg_opts {
    const char *primary;              /* conninfo; required */
    const char *const *replicas;      /* conninfos; none to 63 */
    size_t nreplicas;
    size_t conns_per_host;            /* 0 = 8 */
    uint64_t connect_timeout_ns;      /* 0 = 5 s (any value, unlike libpq's 2 s
                                       * floor; a host name's lookup is not
                                       * covered: it blocks as the resolver does) */
    uint64_t acquire_timeout_ns;      /* wait for a free connection; 0 = 5 s
                                       * (a READ: on each usable replica in
                                       * turn, then on the write host) */
    uint64_t query_timeout_ns;        /* wait for an answer; 0 = no limit (the
                                       * server then stops what we dropped:
                                       * client_connection_check_interval, set
                                       * on each pooled connection once made;
                                       * a server before 14, or one that
                                       * refuses it (not on Linux), goes
                                       * without, logged once per host) */
    uint64_t statement_timeout_ns;    /* the server's statement_timeout; 0 = unset;
                                       * whole ms rounded up, at most INT_MAX
                                       * ms (~24.8 days): more is KEEL_EINVAL */
    uint64_t health_interval_ns;      /* 0 = 1 s */
    uint64_t max_replica_lag_ns;      /* 0 = 5 s */
    int manual_health;                /* no thread: only keel_pg_check() checks */
    keel_clock_fn clock;              /* for lag and down times; NULL = keel_now_ns */
    void *clock_ud;
    keel_metrics *metrics;            /* keel_pg_* series; may be NULL */
    const char *metrics_name; /* "default" if NULL; taken twice in one registry: KEEL_EEXIST */
} keel_pg_opts;

/* Parses the conninfos and prepares the pools; connects lazily (the health
 * thread, unless manual_health, starts checking at once). Returns 0,
 * KEEL_EINVAL (no primary, a malformed conninfo, whose libpq message is
 * logged, or one libpq would refuse at every connect: no host it reaches
 * with a usable port (libpq 15 skips a host whose port is not from 1 to
 * 65535, and stops at one whose port is no integer, spaces around it
 * allowed), an unknown sslmode or target_session_attrs, lists of hosts
 * and ports that do not match; a host given twice (see Hosts); a
 * statement timeout over INT_MAX ms) or
 * KEEL_ENOMEM. */
KEEL_API int keel_pg_create(keel_pg **out, const keel_pg_opts *opts);

/* Stops the health thread and closes every connection. NULL is a no-op.
 * Every leased connection must have been released. */
KEEL_API void keel_pg_destroy(keel_pg *pg);

/* Runs one health check of every host now, in the calling thread. Returns
 * 0 when a write host is known afterwards, else KEEL_EUNAVAIL; or
 * KEEL_ENOMEM when memory ran out (the roles found stand, but a replica's
 * use for reads may be left as it was until the next check). */
KEEL_API int keel_pg_check(keel_pg *pg);

/* ---- leased connections ---- */

/* A connection for the mode (KEEL_PG_WRITE or KEEL_PG_READ), for any
 * number of statements, transactions included; give it back with
 * keel_pg_release(). Returns 0, KEEL_EUNAVAIL, KEEL_ETIMEDOUT or
 * KEEL_EINVAL (KEEL_PG_AUTO has no SQL to classify). */
KEEL_API int keel_pg_acquire(keel_pg *pg, keel_pg_mode mode, keel_pg_conn **out);

/* A read connection that sees every transaction committed before `lsn`
 * (from keel_pg_write_lsn()): on a replica that has replayed it (even one
 * over the lag limit: that position is all the read needs), waiting up to
 * wait_ns for one to catch up, else on the write host; at once on the
 * write host when no replica is up to wait for (none configured, all
 * down, none with a free connection). A replica asked its position
 * answers within connect_timeout_ns and the rest of the wait, but never
 * less than min(connect_timeout_ns, 50 ms), so a short wait does not
 * give up a replica for being a round trip away (a call may end up to
 * that much past its wait for each replica it asked), else it is given
 * up; none is asked once the wait is over (with no wait, each is asked
 * once, within connect_timeout_ns); the query timeout does not apply. */
KEEL_API int keel_pg_acquire_after(keel_pg *pg, uint64_t lsn, uint64_t wait_ns,
                                   keel_pg_conn **out);

/* Gives a connection back. One left inside a transaction is rolled back;
 * one that is broken, in COPY or pipeline mode, or busy is closed. NULL is
 * a no-op. */
KEEL_API void keel_pg_release(keel_pg_conn *c);

/* The libpq connection, for any libpq call. It stays in blocking mode and
 * must not be closed or reset; keel_pg_release() cleans up after it. */
KEEL_API PGconn *keel_pg_conn_raw(keel_pg_conn *c);

/* The index of the host the connection is on (0 = configured primary). */
KEEL_API size_t keel_pg_conn_host(const keel_pg_conn *c);

/* ---- statements ---- */

/* Parameters of a statement: values are text (NUL-terminated) unless
 * formats[i] is 1 (binary, lengths[i] bytes); a NULL value is SQL NULL.
 * types may be NULL (the server infers them). result_format 1 asks for
 * binary results. A NULL keel_pg_params means no parameters. */
typedef struct keel_pg_params {
    int n;
    const char *const *values;
    const int *lengths;
    const int *formats;
    const Oid *types;
    int result_format;
} keel_pg_params;

/* Runs one statement on a connection chosen by mode (KEEL_PG_AUTO:
 * classified), and gives the connection back. *res is set on 0 and on
 * KEEL_EBACKEND (free it with PQclear()), NULL otherwise. A COPY, which
 * needs its connection kept (keel_pg_acquire() and PQputCopyData() on
 * keel_pg_conn_raw()), is KEEL_ENOTSUP here: the connection is given up
 * and nothing is copied. */
KEEL_API int keel_pg_exec(keel_pg *pg, keel_pg_mode mode, const char *sql,
                          const keel_pg_params *params, PGresult **res);

/* The same on a leased connection. */
KEEL_API int keel_pg_conn_exec(keel_pg_conn *c, const char *sql, const keel_pg_params *params,
                               PGresult **res);

/* A statement prepared on each connection the first time it runs there,
 * and again on a connection opened later (after a reconnect, a failover)
 * or whose server forgot it or refuses the plan it cached since the
 * statement's result columns changed (once, outside a transaction). Its
 * SQL is classified once for KEEL_PG_AUTO; its parameter types are those
 * given here (the types of the params it runs with are not used).
 * Returns 0, KEEL_EINVAL or KEEL_ENOMEM.
 *
 * keel_pg_stmt_free: each connection that prepared the statement
 * deallocates it when next released (one DEALLOCATE round trip then; one
 * whose DEALLOCATE fails otherwise than for a statement already gone is
 * closed), so statements made and freed at runtime do not pile up on the
 * server. Its name (keel_<n>) is given to a later statement once no
 * connection holds it prepared, so names, and the memory that tracks
 * them, stay as many as the statements alive and not yet deallocated.
 * Free a statement before destroying its keel_pg, and not while a call
 * uses it. NULL is a no-op. */
KEEL_API int keel_pg_stmt_create(keel_pg *pg, const char *sql, int ntypes, const Oid *types,
                                 keel_pg_stmt **out);
KEEL_API void keel_pg_stmt_free(keel_pg_stmt *s);

KEEL_API int keel_pg_exec_stmt(keel_pg *pg, keel_pg_mode mode, keel_pg_stmt *s,
                               const keel_pg_params *params, PGresult **res);
KEEL_API int keel_pg_conn_exec_stmt(keel_pg_conn *c, keel_pg_stmt *s, const keel_pg_params *params,
                                    PGresult **res);

/* ---- batches (libpq pipeline mode) ---- */

/* One statement of a batch: SQL or a prepared statement, its parameters;
 * its result out. */
typedef struct keel_pg_query {
    const char *sql;       /* or */
    keel_pg_stmt *stmt;
    keel_pg_params params;
    int rc;                /* out: 0, KEEL_EBACKEND, KEEL_EABORTED, ... */
    PGresult *res;         /* out: on 0 and KEEL_EBACKEND; PQclear() it */
} keel_pg_query;

/* Sends n statements in one pipeline (no round trip between them, one
 * Sync at the end), reading results as they come so neither side blocks.
 * Without an open transaction the batch is one transaction: all or
 * nothing (and, rolled back whole, it is run once more if the server had
 * forgotten one of its prepared statements, or refused its cached plan;
 * not when a statement before that one may have ended the transaction,
 * that is any but a SELECT, VALUES, TABLE, WITH, SHOW, INSERT, UPDATE,
 * DELETE or MERGE, such as COMMIT, BEGIN or CALL: what it committed would
 * be committed twice. The statement's error is then returned, and it is
 * prepared anew at the next call, or, when the batch left a failed
 * transaction, the one after).
 * COPY is refused (KEEL_ENOTSUP, the connection given up). When a
 * statement fails, it gets KEEL_EBACKEND and its result, and every other
 * statement KEEL_EABORTED (those before it were rolled back, those after
 * it not run; a batch that commits by itself, with its own COMMIT, keeps
 * what it committed before the failure, though those statements say
 * KEEL_EABORTED too). Returns 0, the failing statement's
 * KEEL_EBACKEND, or the connection's failure (KEEL_EUNAVAIL: lost, the
 * batch may or may not have been committed; KEEL_ETIMEDOUT), or
 * KEEL_ESTATE on a connection already in pipeline mode or busy (nothing
 * sent). */
KEEL_API int keel_pg_conn_batch(keel_pg_conn *c, keel_pg_query *q, size_t n);

/* The same on a write connection, given back afterwards. */
KEEL_API int keel_pg_batch(keel_pg *pg, keel_pg_query *q, size_t n);

/* ---- read-your-writes ---- */

/* The write host's WAL insert position now (less a page header it may sit
 * just after, which no replica reaches on an idle primary): every
 * transaction committed before the call is at or before it. Pass it to
 * keel_pg_acquire_after(). */
KEEL_API int keel_pg_write_lsn(keel_pg *pg, uint64_t *lsn);

/* ---- classification ---- */

/* KEEL_PG_READ when the SQL can run on a replica, else KEEL_PG_WRITE:
 * leading whitespace and comments are skipped, case is ignored, strings,
 * quoted names and dollar quotes are not looked into. Reads: SELECT,
 * VALUES, TABLE, SHOW, EXPLAIN of a read, WITH of reads, COPY ... TO;
 * unless they lock rows (FOR UPDATE/SHARE), create a table (SELECT INTO),
 * contain INSERT/UPDATE/DELETE/MERGE, or call (by name, quoted or not)
 * nextval, setval, txid_current, pg_current_xact_id, pg_notify, a lo_*,
 * advisory lock, replication origin or slot function, pg_promote, or a
 * WAL function that fails during recovery. Everything else (DML, DDL, CALL, DO,
 * COPY ... FROM, SET, transaction control, several statements of which one
 * writes, anything unknown) is a write. A SELECT of a user function that
 * writes is classified a read: name the mode. */
KEEL_API keel_pg_mode keel_pg_classify(const char *sql);

/* ---- hosts ---- */

typedef enum keel_pg_role {
    KEEL_PG_ROLE_UNKNOWN = 0, /* not checked yet */
    KEEL_PG_ROLE_PRIMARY,     /* the write host */
    KEEL_PG_ROLE_REPLICA,     /* in recovery */
    KEEL_PG_ROLE_FENCED,      /* not in recovery, but not the write host */
    KEEL_PG_ROLE_DOWN         /* did not answer */
} keel_pg_role;

typedef struct keel_pg_host_stats {
    const char *name;      /* "host:port" ("service=name[:port]" for a
                            * service with no host; "#index" added when
                            * alike an earlier host's) */
    keel_pg_role role;
    int readable;          /* a READ may use it now */
    uint64_t lsn;          /* WAL position at the last check (replayed, on a replica) */
    uint64_t lag_ns;       /* replicas; UINT64_MAX: unknown (see Health) */
    /* queries: the caller's statements sent, not libkeel's own (checks,
     * ROLLBACK, DEALLOCATE, set_config) */
    uint64_t checks, check_failures, connects, conn_failures, queries, errors;
} keel_pg_host_stats;

KEEL_API size_t keel_pg_hosts(keel_pg *pg);
KEEL_API int keel_pg_host_stats_get(keel_pg *pg, size_t host, keel_pg_host_stats *st);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_PG_H */
