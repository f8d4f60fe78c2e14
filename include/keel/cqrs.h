/* keel/cqrs.h — command/query dispatch with middleware, an event store
 * (in memory or on PostgreSQL) with optimistic concurrency and
 * idempotency, and projections that never skip an event.
 *
 * Dispatch. A command or query handler is registered by name, one per
 * name. keel_cqrs_send() runs a command, keel_cqrs_ask() a query, each
 * through the middleware chain: links registered with keel_cqrs_use(), in
 * order, each of which calls keel_cqrs_next() to go on or returns without
 * it to stop the dispatch with its own result. Payloads and replies are
 * bytes; a reply is the caller's, freed with keel_cqrs_result_free().
 *
 * Commands and events. A command handler reads aggregate streams with
 * keel_cqrs_load() and emits events with keel_cqrs_emit(). When it returns
 * 0, its events are appended atomically, each stream it emitted to at the
 * version the handler saw (one it did not load is expected to be new; a
 * stream only read is not checked). If another writer got there first
 * the command fails with KEEL_ECONFLICT and nothing is appended; with
 * max_retries it is run again on a fresh read, up to that many times. A
 * command with an idempotency key runs once: a repeat of the same command
 * with the same key returns the first reply (res->repeated set, position
 * 0) without running the handler, across processes too with PostgreSQL.
 * (Two first attempts racing may both run the handler; only one appends,
 * the other returns the winner's result.) KEEL_ETIMEDOUT or KEEL_EUNAVAIL
 * from a send means the outcome is unknown: send again with the same key.
 * After the append commits, the events are published on `bus` (subject:
 * subject_prefix + type; concurrent commands may publish out of position
 * order, which the "position" header shows); the store stays the source of
 * truth, so a crash between commit and publish loses nothing for
 * projections. A publish that fails after the commit (the bus out of
 * memory or full; with a Redis bus, Redis down or not answering, which
 * holds the send up to keel_redis's command timeout per event, and after
 * which the event may have gone out all the same) is logged and not
 * counted in `published`; the send still returns 0, since the command
 * took effect: subscribers that must see every event read them from the
 * store, as projections do.
 *
 * Event types are subjects in keel_bus's sense (dot-separated tokens, no
 * wildcards) of 1..128 bytes (KEEL_CQRS_NAME_MAX); stream ids are 1..200
 * bytes of text without NUL. PostgreSQL also wants names, ids, types and
 * keys to be valid UTF-8 (else KEEL_EBACKEND); the memory store takes any
 * bytes.
 *
 * Global order. Every event has a position. Appends take one lock (a
 * PostgreSQL transaction-level advisory lock, held until commit), so
 * positions are handed out in commit order: once a reader has seen
 * position p, no event at or below p can appear later. Projections read
 * by position and so never skip an event that committed late.
 *
 * Projections. A projection has a name, a handler and a checkpoint (the
 * last position it applied). keel_cqrs_projection_run() applies what is
 * past the checkpoint, in batches; with PostgreSQL each batch runs in one
 * transaction on the connection keel_cqrs_conn() gives the handler, with
 * the checkpoint update, so after a crash every event's effect is applied
 * exactly once. With the in-memory store there is no transaction: events
 * applied before a handler failure stay applied. A background thread can
 * follow new events (follow_interval_ns); an idle poll on PostgreSQL is
 * one read outside any transaction. Deleting a projection's checkpoint
 * row resets it: the next run applies every event again from the first,
 * once (a run waiting for the row's lock when it goes starts over).
 *
 * Queries. A query handler gets, through keel_cqrs_conn(), a keel_pg
 * connection in read mode (a replica when one keeps up); a query asked
 * with the lsn a command returned reads its writes (keel_pg's LSN wait:
 * up to 5 s for a replica to replay it, then on the primary).
 *
 * Thread safety: every function may be called from any thread; handlers
 * may run concurrently. Register handlers and middleware before
 * dispatching (registration is locked, but a dispatch sees the chain as it
 * was when it began).
 */
#ifndef KEEL_CQRS_H
#define KEEL_CQRS_H

#include <keel/common.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct keel_cqrs keel_cqrs;
typedef struct keel_cqrs_ctx keel_cqrs_ctx;
typedef struct keel_cqrs_req keel_cqrs_req;
typedef struct keel_cqrs_projection keel_cqrs_projection;
struct keel_pg;
struct keel_pg_conn;
struct keel_bus;

#define KEEL_CQRS_STREAM_MAX 200
#define KEEL_CQRS_NAME_MAX 128

typedef struct keel_cqrs_opts {
    struct keel_pg *pg;         /* NULL: the in-memory store */
    const char *prefix;         /* table names; NULL = "keel_" ([a-z0-9_], up to 40) */
    int partition_by_month;     /* PostgreSQL: events partitioned by month (see create_schema) */
    struct keel_bus *bus;       /* events published here after commit; may be NULL */
    const char *subject_prefix; /* NULL = "cqrs."; under 512 bytes */
    uint32_t max_retries;       /* re-runs of a command on KEEL_ECONFLICT */
    int read_your_writes;       /* PostgreSQL: a command's result carries the write
                                   position (keel_pg_write_lsn, one more round trip) */
    size_t max_payload;         /* payloads, replies, event data; 0 = 1 MiB */
    keel_metrics *metrics;      /* keel_cqrs_* series; may be NULL */
    const char *metrics_name; /* "default" if NULL; taken twice in one registry: KEEL_EEXIST */
    keel_clock_fn clock;        /* partition_by_month: when to look ahead again; NULL = keel_now_ns */
    void *clock_ud;
} keel_cqrs_opts;

/* Returns 0, KEEL_EINVAL (a bad prefix or subject prefix, max_payload
 * over 1 GiB) or KEEL_ENOMEM.
 * With PostgreSQL the schema must exist (keel_cqrs_create_schema). Create
 * asks the primary whether prefix+events exists and is partitioned: one
 * that does not match partition_by_month is KEEL_EINVAL (logged), since
 * such a writer would append without the store's version guard. When
 * the primary does not answer or the tables are not there yet, a
 * command's first load or append asks, and fails (KEEL_EINVAL, or the
 * primary's error) until the answer is right: create tries the primary
 * once (up to keel_pg's connect timeout) but does not need it. */
KEEL_API int keel_cqrs_create(keel_cqrs **out, const keel_cqrs_opts *opts);

/* PostgreSQL: creates the tables if missing (idempotent): prefix+events,
 * prefix+idempotency, prefix+checkpoints; with partition_by_month also
 * prefix+versions, the uniqueness guard of (stream, version), which keeps
 * a row per event ever appended (dropping a partition leaves them), and
 * the partitions of this month and the next by the server's clock, which
 * created_at follows. After that the partitions are made a month ahead:
 * once the clock option says the server's month has turned since it last
 * looked, the next append or projection run (before its transaction)
 * makes this month's and the next month's, waiting at most 500 ms for the
 * events table's lock, which any open transaction that read the table
 * holds (a failure is logged and tried again a minute later). A store left
 * unused for more than a month: the append that finds its month missing
 * makes it the same way and tries again, and if the lock is held (a
 * projection's batch, say: a saga's command sent from its handler) fails
 * with KEEL_ETIMEDOUT instead of waiting for it; the next run or append
 * makes the partition before its own transaction. An existing
 * prefix+events of the other kind (partitioned or not) than the option
 * says: KEEL_EINVAL, nothing created.
 * The in-memory store: nothing to do. */
KEEL_API int keel_cqrs_create_schema(keel_cqrs *c);

/* Stops nothing: stop projections first. NULL is a no-op. */
KEEL_API void keel_cqrs_destroy(keel_cqrs *c);

/* ---- registration ---- */

typedef int (*keel_cqrs_handler)(keel_cqrs_ctx *ctx, const void *payload, size_t len, void *ud);

/* One handler per name (1..128 bytes; a command name without the byte
 * 0x1f, which separates it from idempotency keys): KEEL_EEXIST on a
 * second, KEEL_EINVAL for a bad name. */
KEEL_API int keel_cqrs_command(keel_cqrs *c, const char *name, keel_cqrs_handler h, void *ud);
KEEL_API int keel_cqrs_query(keel_cqrs *c, const char *name, keel_cqrs_handler h, void *ud);

typedef enum keel_cqrs_kind { KEEL_CQRS_COMMAND = 1, KEEL_CQRS_QUERY = 2 } keel_cqrs_kind;

/* A middleware link: calls keel_cqrs_next(req) to go on, and gets the
 * rest of the chain's result (it may call it again: a retry), or returns
 * without it to stop the dispatch with a result of its own. */
typedef int (*keel_cqrs_middleware)(keel_cqrs_req *req, void *ud);

/* Adds a link at the end of the chain for the kinds given (a mask of
 * keel_cqrs_kind). Returns 0, KEEL_EINVAL or KEEL_ELIMIT (32 links). */
KEEL_API int keel_cqrs_use(keel_cqrs *c, unsigned kinds, keel_cqrs_middleware fn, void *ud);

KEEL_API int keel_cqrs_next(keel_cqrs_req *req);
KEEL_API keel_cqrs_kind keel_cqrs_req_kind(const keel_cqrs_req *req);
KEEL_API const char *keel_cqrs_req_name(const keel_cqrs_req *req);
KEEL_API const void *keel_cqrs_req_payload(const keel_cqrs_req *req, size_t *len);

/* ---- dispatch ---- */

typedef struct keel_cqrs_result {
    void *reply;      /* the handler's keel_cqrs_reply(); NULL when none or empty */
    size_t len;
    uint64_t lsn;     /* a command with PostgreSQL: the write position after it (for asks) */
    uint64_t position; /* a command: the position of its last event (0: none) */
    int repeated;     /* an idempotent repeat: the first result */
} keel_cqrs_result;

/* Runs a command. idempotency_key (1..128 bytes) may be NULL. res may
 * be NULL; on a failure it is left zeroed (a middleware link that fails
 * a command which took effect leaves no reply, position or lsn). Returns
 * the handler's (or a middleware's) result, or KEEL_ENOTFOUND (no such
 * command), KEEL_ECONFLICT (a concurrent append, after the retries),
 * KEEL_EINVAL (bad name or key, payload over max_payload), KEEL_ENOMEM,
 * a store error (KEEL_EUNAVAIL, KEEL_EBACKEND: e.g. a missing schema). */
KEEL_API int keel_cqrs_send(keel_cqrs *c, const char *name, const void *payload, size_t len,
                            const char *idempotency_key, keel_cqrs_result *res);

/* Runs a query; after_lsn (0: none) from a command's result makes it read
 * that command's writes. */
KEEL_API int keel_cqrs_ask(keel_cqrs *c, const char *name, const void *payload, size_t len,
                           uint64_t after_lsn, keel_cqrs_result *res);

/* Frees the reply; the result may be reused. */
KEEL_API void keel_cqrs_result_free(keel_cqrs_result *res);

/* ---- inside handlers ---- */

typedef struct keel_cqrs_event {
    uint64_t position;  /* global, from 1 */
    const char *stream;
    uint64_t version;   /* within the stream, from 1 */
    const char *type;
    const void *data;
    size_t len;
    const void *meta;
    size_t meta_len;
    uint64_t time_ns;   /* wall clock of the append (PostgreSQL: its transaction's start) */
} keel_cqrs_event;

/* A command handler reads a stream: its events in order (valid until the
 * handler returns) and, remembered, its version for the append: its last
 * event's, or with partition_by_month the largest in prefix+versions, so
 * new events follow it even when the stream's first events, or all of
 * them, were removed, say with an old month's partition. Returns
 * 0, KEEL_EINVAL (bad id; not in a command), KEEL_ENOMEM, a store error. */
KEEL_API int keel_cqrs_load(keel_cqrs_ctx *ctx, const char *stream, const keel_cqrs_event **events,
                            size_t *n);

/* A command handler emits an event (copied). Returns 0, KEEL_EINVAL (bad
 * stream or type, data or meta over max_payload; not in a command) or
 * KEEL_ENOMEM. */
KEEL_API int keel_cqrs_emit(keel_cqrs_ctx *ctx, const char *stream, const char *type, const void *data,
                            size_t len, const void *meta, size_t meta_len);

/* Sets the reply (copied). Returns 0, KEEL_EINVAL (over max_payload) or
 * KEEL_ENOMEM. */
KEEL_API int keel_cqrs_reply(keel_cqrs_ctx *ctx, const void *data, size_t len);

/* PostgreSQL: a query's read connection (acquired on first use), or a
 * projection's transaction. NULL with the in-memory store, in commands,
 * or when no connection could be had (then the handler should fail). */
KEEL_API struct keel_pg_conn *keel_cqrs_conn(keel_cqrs_ctx *ctx);

/* ---- projections ---- */

typedef int (*keel_cqrs_apply)(keel_cqrs_ctx *ctx, const keel_cqrs_event *ev, void *ud);

typedef struct keel_cqrs_projection_opts {
    const char *name;             /* required, 1..128 bytes; its checkpoint's key */
    keel_cqrs_apply handler;      /* required; 0 = applied */
    void *ud;
    size_t batch;                 /* events per transaction; 0 = 100 */
    uint64_t follow_interval_ns;  /* 0: no thread, call keel_cqrs_projection_run() */
} keel_cqrs_projection_opts;

/* Returns 0, KEEL_EINVAL (no handler, a bad name), KEEL_ENOMEM or a
 * store error (PostgreSQL: its checkpoint row made or read). */
KEEL_API int keel_cqrs_projection_create(keel_cqrs *c, const keel_cqrs_projection_opts *opts,
                                         keel_cqrs_projection **out);

/* Applies every event past the checkpoint, batch by batch; *applied (may
 * be NULL) counts them. A handler failure stops there (returned); with
 * PostgreSQL its batch is rolled back. Runs of one projection name take
 * turns, across processes with PostgreSQL. A run of a name this thread is
 * already running (from its handler, say: a command it sends whose event
 * a bus subscriber turns into a run) returns 0 at once, and the run in
 * progress goes on to what came meanwhile. */
KEEL_API int keel_cqrs_projection_run(keel_cqrs_projection *p, size_t *applied);

/* The checkpoint: the last position applied. */
KEEL_API uint64_t keel_cqrs_projection_position(keel_cqrs_projection *p);

/* Stops its thread and frees it. NULL is a no-op. */
KEEL_API void keel_cqrs_projection_destroy(keel_cqrs_projection *p);

typedef struct keel_cqrs_stats {
    uint64_t commands, queries, conflicts, retries, repeats, appended, published, applied, failed;
} keel_cqrs_stats;

KEEL_API void keel_cqrs_stats_get(keel_cqrs *c, keel_cqrs_stats *st);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_CQRS_H */
