/* keel/redis.h — Redis connections for a multi-threaded program: pools of
 * hiredis contexts per node, keys sharded over nodes with keel_ring,
 * pipelines, Lua scripts by SHA1, a pub/sub listener, and nodes that are
 * skipped while they fail.
 *
 * Nodes are given as URLs: redis://[[user]:password@]host[:port][/db]
 * (port 6379 and db 0 by default) or
 * unix://[[user]:password@]/path/to/socket[?db=N]; user, password and
 * socket path are percent-decoded (%40 for @, %3F for ?; %00 refused), a
 * bracketed host must be an IPv6 address without a zone (no %25eth0),
 * and the db is 0..65535 (leading zeros allowed). With
 * several nodes, the routing key of each command picks the node through a
 * consistent hash ring (KEEL_RING_CONTINUUM, node names "host:port",
 * weight 1; keel_redis_node_of() says which); a key with a hash tag,
 * `{...}`, is routed by the tag alone, as Redis Cluster does, so related
 * keys can share a node.
 *
 * Replies are hiredis's redisReply (hiredis 0.14, RESP2): the caller frees
 * every reply it receives with freeReplyObject(), including error replies.
 * hiredis 0.14 parses arrays nested at most 7 levels deep: a deeper reply
 * (a script returning {{{{{{{{1}}}}}}}}, some COMMAND DOCS) is KEEL_EPROTO,
 * its connection dropped, and not counted as a failure of the node.
 * Command arguments are passed as argv/argvlen and are binary-safe; nothing
 * is ever formatted into a command string.
 *
 * Failures: a connection that saw any error is discarded, never reused. A
 * node whose commands failed max_fails times in a row is skipped (its keys
 * fail at once with KEEL_EUNAVAIL) for fail_timeout, then one command
 * probes it (nginx's semantics) while the others still skip it; the
 * probe's success ends the skip. Each node's health is a keel_breaker(3):
 * a count window of max_fails calls tripping at 100% failures, one
 * half-open permit. Before any node is skipped, connections
 * made before its last failure are dropped unused, so the probe after a
 * restart connects afresh. A blocking command (BLPOP, BRPOP, BLMOVE,
 * BRPOPLPUSH, BZPOPMIN, BZPOPMAX, BLMPOP, BZMPOP, XREAD and XREADGROUP with
 * BLOCK, WAIT, WAITAOF) is bounded by the command timeout like any other:
 * give it a server-side timeout shorter than that (BLPOP key 0 waits for
 * ever at the server). When it times out all the same, the call gives
 * KEEL_ETIMEDOUT and its connection is dropped, but the node is not
 * counted as failing (a pipeline holding one such command likewise). An idle connection that the server closed (its
 * `timeout`, CLIENT KILL, a restart) is dropped when next taken, unused
 * and not counted as a failure: the call takes another or connects. A server that does not answer within the
 * command timeout gives KEEL_ETIMEDOUT; an error reply gives KEEL_EBACKEND,
 * with the reply (and so its text) returned and the text logged. A new
 * connection whose AUTH or SELECT is refused makes the node unusable:
 * KEEL_EUNAVAIL, counted as a failure, with the server's text logged.
 *
 * SIGPIPE: hiredis writes with write(2), which raises SIGPIPE on a closed
 * socket. libkeel blocks SIGPIPE in the calling thread around every write
 * and consumes a SIGPIPE it caused, so the host program is never killed
 * and its own handler never sees ours.
 *
 * Thread safety: a keel_redis is used by any number of threads at once;
 * hiredis contexts are not thread-safe, so each call takes one from the
 * node's pool for its duration. A call waits at most the command timeout
 * for a free connection and, for a new one, the connect timeout (and the
 * command timeout for each of its AUTH and SELECT), then makes
 * one round trip per node, each bounded by the command timeout as a whole
 * (sending, waiting and reading every byte of the replies: a server that
 * trickles its answer times out too, and the connection is dropped)
 * (keel_redis_eval makes two when the server has forgotten the script).
 */
#ifndef KEEL_REDIS_H
#define KEEL_REDIS_H

#include <hiredis/hiredis.h>
#include <keel/common.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct keel_redis keel_redis;
typedef struct keel_redis_script keel_redis_script;
typedef struct keel_redis_sub keel_redis_sub;

typedef struct keel_redis_opts {
    const char *const *nodes;   /* URLs; at least one, at most 4096 */
    size_t nnodes;
    uint64_t connect_timeout_ns; /* 0 = 1 s (a host name's lookup is not
                                  * covered: it blocks as the resolver does) */
    uint64_t command_timeout_ns; /* 0 = 1 s */
    size_t conns_per_node;       /* 0 = 8 */
    uint32_t max_fails;          /* 0 = 3, <= 1000000 */
    uint64_t fail_timeout_ns;    /* 0 = 10 s */
    uint64_t reconnect_max_ns;   /* each failed probe of a skipped node
                                    doubles the wait before the next one,
                                    from fail_timeout up to this, with equal
                                    jitter (the first skip too: e/2 + U(0,
                                    e/2)); 0 (or up to fail_timeout) = a
                                    probe every fail_timeout, as nginx */
    keel_clock_fn clock;         /* for fail_timeout; NULL = keel_now_ns */
    void *clock_ud;
    keel_metrics *metrics;       /* keel_redis_* series; may be NULL */
    const char *metrics_name; /* "default" if NULL; taken twice in one registry: KEEL_EEXIST */
} keel_redis_opts;

/* Parses the URLs and prepares the pools; connects lazily. Returns 0,
 * KEEL_EINVAL (no node, a malformed URL: bad scheme, port, db or empty
 * host, a server given twice, even with two databases, a host name in
 * another case or an IPv6 address spelled otherwise ([::1], [0::1]); a
 * name and an address of one host are not told apart; max_fails over
 * 1000000) or KEEL_ENOMEM. */
KEEL_API int keel_redis_create(keel_redis **out, const keel_redis_opts *opts);

/* Closes every connection. NULL is a no-op. Must not run concurrently with
 * other calls on r; subscriptions must be stopped first. */
KEEL_API void keel_redis_destroy(keel_redis *r);

/* The node index a key routes to (hash tags honoured); 0..nnodes-1. */
KEEL_API size_t keel_redis_node_of(keel_redis *r, const void *key, size_t len);

/* One command on the node of `key` (NULL: the first node). argv/argvlen
 * hold argc arguments. Returns 0 with *reply set; KEEL_EBACKEND with *reply
 * set to the error reply; KEEL_EUNAVAIL (node down or skipped),
 * KEEL_ETIMEDOUT, KEEL_EPROTO, KEEL_EINVAL or KEEL_ENOMEM with *reply
 * NULL. Only an error reply at the top counts: errors inside an array
 * (EXEC's results, a script returning redis.pcall()'s error in a table)
 * come back with rc 0, and the caller must look at the elements.
 *
 * Connections are pooled, so a command that would change its connection
 * for the next caller is KEEL_EINVAL: SELECT (the database comes from the
 * URL), AUTH, HELLO, RESET, QUIT, WATCH, MONITOR, SUBSCRIBE, PSUBSCRIBE,
 * SSUBSCRIBE (use keel_redis_subscribe()), UNSUBSCRIBE, PUNSUBSCRIBE and
 * SUNSUBSCRIBE (answered once per channel, subscribed or not: the replies
 * past the first would go to the next caller), SYNC, PSYNC, READONLY,
 * READWRITE, CLIENT REPLY, TRACKING, SETNAME, NO-EVICT and NO-TOUCH, and
 * MULTI outside a pipeline that ends it with EXEC or DISCARD on the same
 * node. A connection left with replies unread after a call all the same
 * (a server answering more than asked) is dropped, not reused. */
KEEL_API int keel_redis_command(keel_redis *r, const void *key, size_t keylen, int argc,
                                const char *const *argv, const size_t *argvlen,
                                redisReply **reply);

/* Like keel_redis_command() for a command about several keys: they must
 * all route to one node (use a common hash tag), else KEEL_EINVAL. */
KEEL_API int keel_redis_command_keys(keel_redis *r, const void *const *keys, const size_t *keylens,
                                     size_t nkeys, int argc, const char *const *argv,
                                     const size_t *argvlen, redisReply **reply);

/* One command of a pipeline: its routing key and arguments in; its result
 * and reply out (the caller frees every non-NULL reply). */
typedef struct keel_redis_cmd {
    const void *key;
    size_t keylen;
    int argc;
    const char *const *argv;
    const size_t *argvlen;
    int rc;            /* out: as keel_redis_command() */
    redisReply *reply; /* out */
} keel_redis_cmd;

/* Sends n commands with one round trip per node involved, replies matched
 * to commands in order. The nodes are visited one after the other in
 * node-index order, not in the order given: commands on one node run in
 * the order given, commands on different nodes in no order the caller can
 * rely on. EVALSHA in a pipeline gets no NOSCRIPT reload (its reply is
 * the NOSCRIPT error): run scripts with keel_redis_eval(). Errors nested
 * in a reply (EXEC's results) are as for keel_redis_command(). Returns 0 when every command got a reply (error
 * replies included: see each rc), or, when some node failed (its commands
 * left unanswered have rc set to its failure and no reply; those it
 * answered first keep theirs), the rc of the first such command in the
 * order given; out of memory before anything was sent,
 * every command has rc KEEL_ENOMEM and no reply, and with a command's
 * arguments malformed (or r NULL), nothing is sent and every command has
 * rc KEEL_EINVAL and no reply. */
KEEL_API int keel_redis_pipeline(keel_redis *r, keel_redis_cmd *cmds, size_t n);

/* A Lua script, identified by its SHA1 and loaded on each node when first
 * needed. Freed with keel_redis_script_free(). Returns 0, KEEL_EINVAL or
 * KEEL_ENOMEM. */
KEEL_API int keel_redis_script_create(keel_redis *r, const char *lua, size_t len,
                                      keel_redis_script **out);
KEEL_API void keel_redis_script_free(keel_redis_script *s);
/* The script's SHA1 as 40 hex digits (valid while s lives). */
KEEL_API const char *keel_redis_script_sha(const keel_redis_script *s);

/* Runs a script with EVALSHA on the node of keys[0] (all keys must route
 * there, else KEEL_EINVAL; with no keys, the node of `route`, which may be
 * NULL, with length 0, for the first node). A server that lost the script
 * (NOSCRIPT: a restart, SCRIPT FLUSH) gets the call once more as EVAL with
 * the script's text, which caches it again and cannot answer NOSCRIPT:
 * callers never see it. An error the script raises itself is its answer,
 * unless its text begins as the server's own "NOSCRIPT No matching
 * script": then the script runs a second time, as EVAL (the rest of the
 * server's message is not compared, so that another wording of it is
 * still understood). Returns as keel_redis_command(). */
KEEL_API int keel_redis_eval(keel_redis *r, keel_redis_script *s, size_t nkeys,
                             const void *const *keys, const size_t *keylens, size_t nargs,
                             const char *const *args, const size_t *arglens, const void *route,
                             size_t routelen, redisReply **reply);

/* ---- pub/sub ---- */

typedef struct keel_redis_sub_opts {
    /* Channel names and patterns are C strings (copied). */
    const char *const *channels;  /* SUBSCRIBE */
    size_t nchannels;
    const char *const *patterns;  /* PSUBSCRIBE */
    size_t npatterns;
    size_t node;                  /* the node to listen on (an index) */
    /* A message: channel and payload (binary-safe), and the pattern that
     * matched (NULL for plain subscriptions). Runs in the listener thread. */
    void (*on_message)(const char *channel, size_t chlen, const char *msg, size_t len,
                       const char *pattern, void *ud);
    /* The listener reconnected and subscribed again after a failure:
     * messages may have been missed meanwhile (a cache must flush). */
    void (*on_reconnect)(void *ud);
    /* The listener's connection failed (not called on unsubscribe): from
     * now until on_reconnect, messages are being missed. May be NULL. */
    void (*on_disconnect)(void *ud);
    void *ud;
    uint64_t heartbeat_ns;        /* PING when silent this long; 0 = 1 s */
    uint64_t reconnect_min_ns;    /* backoff with full jitter; 0 = 50 ms */
    uint64_t reconnect_max_ns;    /* 0 = 2 s; the backoff starts again from
                                   * reconnect_min only after a connection
                                   * that lasted this long */
} keel_redis_sub_opts;

/* Starts a listener thread with its own connection; it subscribes, calls
 * on_message for each message, and after any failure (including a heartbeat
 * that gets no answer within the command timeout) calls on_disconnect,
 * reconnects with backoff, subscribes again and calls on_reconnect. Returns 0 once the first
 * subscription is confirmed, KEEL_EUNAVAIL/KEEL_ETIMEDOUT if it cannot be
 * made, KEEL_EBACKEND if the server refuses it, KEEL_EPROTO, KEEL_EINVAL
 * or KEEL_ENOMEM. */
KEEL_API int keel_redis_subscribe(keel_redis *r, const keel_redis_sub_opts *opts,
                                  keel_redis_sub **out);

/* Stops the listener and joins its thread; no callback runs after it
 * returns. NULL is a no-op. From one of the listener's own callbacks it
 * returns at once: no callback runs after the current one, and the
 * listener's thread frees itself when that returns (destroy the
 * keel_redis only after that). */
KEEL_API void keel_redis_unsubscribe(keel_redis_sub *s);

/* ---- statistics ---- */

typedef struct keel_redis_node_stats {
    const char *name;     /* "host:port" or the socket path */
    int skipped;          /* failing: skipped until a probe succeeds */
    uint32_t fails;       /* failures in a row */
    uint64_t commands;    /* calls that reached a connection */
    uint64_t errors;      /* error replies */
    uint64_t timeouts;    /* calls not answered within the command timeout */
    uint64_t unavailable; /* calls that could not reach it (a connect timeout too) */
    uint64_t connects;    /* connections made */
} keel_redis_node_stats;

KEEL_API size_t keel_redis_nodes(keel_redis *r);
KEEL_API int keel_redis_node_stats_get(keel_redis *r, size_t node, keel_redis_node_stats *st);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_REDIS_H */
