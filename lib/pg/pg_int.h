/* lib/pg/pg_int.h — what the files of keel_pg share. Private. */
#ifndef KEEL_PG_INT_H
#define KEEL_PG_INT_H

#include <pthread.h>
#include <stdatomic.h>

#include <libpq-fe.h>

#include <keel/lb.h>
#include <keel/pg.h>
#include <keel/pool.h>

#include "../internal.h"

#define PG_NONE SIZE_MAX /* no write host */
#define PG_HIST 64       /* primary WAL positions remembered for lag */

typedef struct pghost pghost;

/* A pooled connection, and the handle a caller leases. */
struct keel_pg_conn {
    PGconn *conn;
    pghost *h;
    uint64_t gen;       /* the host's generation when it connected */
    uint64_t *prepared; /* bitset of statement ids prepared here */
    size_t nwords;
    uint64_t freed_seen; /* pg->nfreed when last deallocated */
    bool broken;        /* lost, timed out or left in an unknown state */
    bool quiet;         /* an error reply is expected: neither logged nor counted */
    bool unpooled;      /* the health check's own: its loss retires no pooled one */
};

struct pghost {
    keel_pg *pg;
    size_t idx;
    char *name;                 /* "host:port", for logs, stats and labels */
    const char *addr, *port; /* in val: the server, when both are written and
                              * no service is given (addr NULL otherwise) */
    const char **kw, **val; /* connection parameters, NULL-terminated */
    keel_pool *pool;
    keel_lb_peer *peer;
    bool lb_down; /* as last set in the lb, under pg->check_mu */
    _Atomic uint64_t gen;        /* bumped when the host fails: older connections are dropped */
    _Atomic uint64_t down_until; /* clock ns; UINT64_MAX: until a check says otherwise */
    _Atomic bool no_check_interval; /* the server would not take it: said once */
    /* health, under pg->mu */
    keel_pg_role role;
    bool readable;
    bool diverged; /* a replica with WAL the write host never had: no reads */
    bool measured; /* answered a check that saw a write host: its lag is known */
    uint64_t lsn, lag_ns;
    uint32_t timeline;
    /* the health check's own connection, under pg->check_mu */
    PGconn *hconn;
    bool tli_hidden_said; /* the receiver's hidden timeline was logged */
    _Atomic uint64_t checks, check_failures, connects, conn_failures, queries, errors;
};

struct keel_pg {
    pghost *hosts;
    size_t nhosts;
    keel_lb *lb;
    uint64_t connect_timeout, acquire_timeout, query_timeout, interval, max_lag;
    keel__clock clock;
    keel_metrics *metrics;

    pthread_mutex_t mu; /* health state: writer, history, hosts' roles */
    _Atomic size_t writer;
    struct {
        uint64_t t, lsn;
    } hist[PG_HIST];
    size_t nhist;        /* entries, oldest first */
    uint32_t timeline;   /* the newest a write host was seen on */
    uint64_t writer_at;  /* when a check last saw a write host */
    size_t last_writer;  /* the last known write host */
    uint64_t failovers;

    pthread_mutex_t check_mu; /* one check at a time */

    /* the health thread */
    pthread_t thread;
    bool thread_started, stop, kick;
    pthread_mutex_t tmu;
    pthread_cond_t tcv;

    /* Statement ids, under freed_mu. A freed id is used again once no
     * connection holds it prepared, so that the ids, and the bitsets they
     * index, stay as few as the statements alive and not yet deallocated. */
    pthread_mutex_t freed_mu;
    uint32_t next_stmt;       /* ids made so far */
    uint32_t *holders;        /* per id: connections that hold it prepared */
    uint32_t *spare;          /* freed ids nobody holds: handed out first */
    size_t nspare, ids_cap;   /* ids_cap: room in holders and spare */
    uint64_t *freed;          /* bitset: freed ids some connection still holds */
    size_t freed_words;
    _Atomic uint64_t nfreed;  /* statements freed while held, ever */
    _Atomic size_t rotor; /* where the next read-after-LSN starts */
};

struct keel_pg_stmt {
    keel_pg *pg;
    uint32_t id;
    char name[32];
    char *sql;
    int ntypes;
    Oid *types;
    keel_pg_mode mode;
};

/* pg.c */
/* Under freed_mu: a connection no longer holds id prepared (it has
 * deallocated it, the server forgot it, or it closed); the last one to
 * let a freed id go makes it spare. */
void keel__pg_let_go(keel_pg *pg, uint32_t id);
/* A connection of h, waiting up to timeout for a free one (0: none). */
int keel__pg_conn_get(pghost *h, uint64_t timeout, keel_pg_conn **out);
/* A connection of h was lost: the host's other connections, made before,
 * are dropped when next taken, and a health check runs soon. Whether the
 * host is down is for a connect or a check to say (one killed backend is
 * not a dead server). */
void keel__pg_conn_lost(pghost *h);

/* exec.c */
/* Waits until fd is ready for events (POLLIN/POLLOUT) or the deadline
 * (keel_now_ns; 0 = none) passes: 0 or KEEL_ETIMEDOUT. */
int keel__pg_wait_fd(int fd, short events, uint64_t deadline);
/* A deadline query_timeout from now, or 0 (none). */
uint64_t keel__pg_deadline(const keel_pg *pg, uint64_t timeout);
/* Runs sql with at most one text parameter, waiting at most timeout (0:
 * the query timeout), and returns its one boolean value: 1, 0 (false or
 * NULL) or a negative code. */
int keel__pg_query_bool(keel_pg_conn *c, const char *sql, const char *param, uint64_t timeout);
/* Runs sql and returns its result as keel_pg_conn_exec() does, waiting
 * at most timeout (0: the query timeout). */
/* Room for bit id in a bitset of *nwords words (zeroed as it grows):
 * 0 or KEEL_ENOMEM, the bitset unchanged. */
int keel__pg_bit_room(uint64_t **words, size_t *nwords, uint32_t id);
/* Deallocates on c the statements freed since it last looked, that were
 * prepared on it. 0, or the error that left c unusable. */
int keel__pg_forget_freed(keel_pg_conn *c, uint64_t timeout);
/* Whether parameters, and a batch's query, are well formed (exec.c): the
 * one-call helpers check before they take a connection. */
bool keel__pg_params_ok(const keel_pg_params *p);
bool keel__pg_query_ok(const keel_pg_query *q, const keel_pg *pg);
int keel__pg_run(keel_pg_conn *c, const char *sql, const keel_pg_params *p, uint64_t timeout,
                 PGresult **res);
/* "16/B374D848" to a number; 0 for NULL or garbage. */
uint64_t keel__pg_lsn_parse(const char *s);

/* classify.c */
/* Whether sql is one statement that surely leaves the transaction it runs
 * in open (a read or DML); false for transaction control, CALL, DO,
 * VACUUM and anything else that might commit or roll back. */
bool keel__pg_keeps_xact(const char *sql);

#endif
