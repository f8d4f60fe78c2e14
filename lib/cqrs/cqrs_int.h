/* lib/cqrs/cqrs_int.h — what the files of keel_cqrs share. Private. */
#ifndef KEEL_CQRS_INT_H
#define KEEL_CQRS_INT_H

#include <pthread.h>
#include <stdatomic.h>

#include <keel/cqrs.h>

#include "../internal.h"

/* An event a command emitted, waiting for the append. */
typedef struct cpending {
    char *stream, *type;
    void *data, *meta;
    size_t len, meta_len;
    uint64_t version; /* set by the append */
} cpending;

/* A stream a command read, and the version it saw. */
typedef struct cexpect {
    char *stream;
    uint64_t version;
    keel_cqrs_event *events; /* what load returned; the handler's until it returns */
    size_t n;
    void *owner;             /* the store's memory behind events (PostgreSQL: the PGresult) */
} cexpect;

enum { CTX_COMMAND = 1, CTX_QUERY = 2, CTX_PROJECTION = 3 };

struct keel_cqrs_ctx {
    keel_cqrs *c;
    int kind;
    cexpect *exp;
    size_t nexp, capexp;
    cpending *ev;
    size_t nev, capev;
    void *reply;
    size_t reply_len;
    struct keel_pg_conn *conn; /* a query's (acquired on demand) or a projection's */
    uint64_t after_lsn;
    int conn_rc;
};

/* What an append writes, all or nothing. */
typedef struct cappend {
    cpending *ev; /* versions set before the call */
    size_t nev;
    const char *key; /* idempotency, or NULL */
    const void *reply;
    size_t reply_len;
} cappend;

/* The outcome of an append: positions and times of the events. */
typedef struct cappended {
    uint64_t *positions, *times; /* nev each, filled by the store */
    uint64_t lsn;
} cappended;

/* ---- the PostgreSQL store (pgstore.c) ---- */

typedef struct cpg cpg;

int keel__cqrs_pg_create(struct keel_pg *pg, const char *prefix, int partitioned, keel_clock_fn clock,
                         void *clock_ud, cpg **out);
void keel__cqrs_pg_destroy(cpg *s);
int keel__cqrs_pg_schema(cpg *s);
/* The events of a stream by version; *owner is freed with
 * keel__cqrs_pg_free_owner. *version: the largest the uniqueness guard
 * holds when it outlives events (partitioned; from the events' snapshot),
 * else 0. */
int keel__cqrs_pg_load(cpg *s, const char *stream, keel_cqrs_event **evs, size_t *n, void **owner,
                       uint64_t *version);
void keel__cqrs_pg_free_owner(void *owner);
/* KEEL_ECONFLICT: a stream moved; KEEL_EEXIST: the key was used meanwhile;
 * KEEL_ETIMEDOUT: also this month's partition missing and not made in
 * time. ahead: no transaction on the events table is open on this thread,
 * so the months may be made first when it is time (see pgstore.c). */
int keel__cqrs_pg_append(cpg *s, const cappend *a, cappended *out, int want_lsn, int ahead);
/* 0 and the stored reply (malloc'd through the hooks), or KEEL_ENOTFOUND. */
int keel__cqrs_pg_idem_get(cpg *s, const char *key, void **reply, size_t *len);
/* One projection batch in a transaction on a write connection: the
 * checkpoint locked, events past it read, apply() called per event with
 * ctx->conn set, the checkpoint moved; rolled back on a failure. ahead:
 * as for keel__cqrs_pg_append. */
int keel__cqrs_pg_project(cpg *s, const char *name, size_t batch, keel_cqrs_ctx *ctx,
                          int (*apply)(keel_cqrs_ctx *, const keel_cqrs_event *, void *), void *ud,
                          size_t *applied, uint64_t *checkpoint, int ahead);
int keel__cqrs_pg_checkpoint(cpg *s, const char *name, uint64_t *pos);
/* The memory store's hash seed (for tests). */
uint64_t keel__cqrs_mem_seed(const keel_cqrs *c);
/* The advisory lock key appends take (for tests that must hold it). */
int64_t keel__cqrs_lock_key(const char *prefix);

#endif
