/* lib/redis/redis_int.h — what redis.c and sub.c share. Private. */
#ifndef KEEL_REDIS_INT_H
#define KEEL_REDIS_INT_H

#include <signal.h>
#include <stdatomic.h>
#include <sys/time.h>

#include <keel/breaker.h>
#include <keel/pool.h>
#include <keel/redis.h>
#include <keel/ring.h>

#include "../internal.h"

typedef struct keel__rurl {
    char *host; /* or */
    char *path; /* a unix socket */
    int port, db;
    char *user, *pass;
    bool ip6;                /* host is a bracketed IPv6 address: */
    unsigned char addr6[16]; /* its bytes, to compare spellings */
} keel__rurl;

typedef struct rconn {
    redisContext *c;
    uint64_t gen; /* the node's generation when connected */
    bool used;    /* went back to the pool after a call: may have idled */
} rconn;

typedef struct rnode {
    keel_redis *r;
    size_t idx;
    keel__rurl url;
    char name[300];
    keel_pool *pool;
    keel_breaker *health;
    _Atomic uint32_t fails; /* in a row, for the stats */
    _Atomic uint64_t gen; /* bumped at every failure */
    _Atomic uint64_t commands, errors, timeouts, unavailable, connects;
} rnode;

struct keel_redis {
    rnode *nodes;
    size_t nnodes;
    keel_ring *ring;
    uint64_t connect_timeout, cmd_timeout;
    keel__clock clock;
    keel_metrics *metrics;
};

struct keel_redis_script {
    char *lua;
    size_t len;
    char sha[41];
};

typedef struct keel__sigpipe {
    sigset_t old;
    int was_pending;
} keel__sigpipe;

int keel__redis_url(const char *url, keel__rurl *u);
void keel__redis_url_free(keel__rurl *u);
int keel__redis_ctx_error(const redisContext *c);
void keel__sigpipe_block(keel__sigpipe *s);
/* Blocks SIGPIPE in this thread around hiredis's writes on c; restore
 * takes back a SIGPIPE they raised (c->err set) and the old mask. */
void keel__sigpipe_restore(const keel__sigpipe *s, const redisContext *c);
struct timeval keel__tv(uint64_t ns);
/* One reply on c, sending first what is queued, all by deadline
 * (keel_now_ns): hiredis's socket timeout bounds each read alone, so a
 * server trickling bytes would hold a call for ever. As redisGetReply():
 * REDIS_ERR with c->err set, a missed deadline as a timeout. */
int keel__redis_reply(redisContext *c, uint64_t deadline, void **reply);
/* The deadline ns from now, saturated: a timeout of any length (UINT64_MAX
 * included) lies in the future. */
static inline uint64_t keel__redis_by(uint64_t ns) { return keel__sat_add(keel_now_ns(), ns); }
/* Appends a command and takes its reply by deadline (argvlen may be NULL
 * for C strings). */
int keel__redis_call(redisContext *c, int argc, const char *const *argv, const size_t *argvlen,
                     uint64_t deadline, redisReply **reply);
/* A new connection to n, authenticated and on its db. */
int keel__redis_connect(rnode *n, redisContext **out);
size_t keel__redis_route(keel_redis *r, const void *key, size_t len);
/* keel_redis_command() on a given node (SCAN and the like visit each). */
int keel__redis_command_on(keel_redis *r, size_t node, int argc, const char *const *argv, const size_t *argvlen,
                           redisReply **reply);

#endif
