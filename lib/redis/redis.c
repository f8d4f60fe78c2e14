/* lib/redis/redis.c — Redis nodes, pools of hiredis contexts, routing,
 * commands, pipelines and scripts. The pub/sub listener is in sub.c.
 *
 * Each node has a keel_pool of connections whose `init` connects (outside
 * every lock, so a slow connect blocks only its caller) and whose `fini`
 * closes. A call takes a connection for its duration: hiredis contexts are
 * not thread-safe. A connection that saw an I/O or protocol error goes
 * back with keel_pool_discard(), never to be reused.
 *
 * Node health is a keel_breaker per node set to nginx's max_fails /
 * fail_timeout: a count window of max_fails calls that trips when all of
 * them failed (connect errors, I/O errors, timeouts; not error replies,
 * replies hiredis cannot parse, nor timeouts of blocking commands),
 * that is after max_fails failures in a row; OPEN for fail_timeout; then
 * HALF_OPEN with one permit, so exactly one call probes the node while
 * the others still skip it, and its success closes the breaker. With
 * reconnect_max above fail_timeout, the open wait is keel_backoff's equal
 * jitter from fail_timeout up to reconnect_max, so that a node that stays
 * down is probed ever less often, and clients that lost it together do
 * not probe it together.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sha1.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/un.h>
#include <time.h>

#include <keel/backoff.h>
#include <keel/breaker.h>
#include <keel/metrics.h>
#include <keel/pool.h>
#include <keel/redis.h>
#include <keel/ring.h>

#include "redis_int.h"

/* ---- URLs ---- */

static bool all_digits(const char *s, size_t n)
{
    if (n == 0)
        return false;
    for (size_t i = 0; i < n; i++)
        if (s[i] < '0' || s[i] > '9')
            return false;
    return true;
}

/* A decimal in [lo, hi] made of s[0..n), else -1. Leading zeros are
 * dropped first: only nine significant digits fit. */
static long parse_num(const char *s, size_t n, long lo, long hi)
{
    if (!all_digits(s, n))
        return -1;
    while (n > 1 && *s == '0')
        s++, n--;
    if (n > 9)
        return -1;
    long v = 0;
    for (size_t i = 0; i < n; i++)
        v = v * 10 + (s[i] - '0');
    return v >= lo && v <= hi ? v : -1;
}

static char *dup_n(const char *s, size_t n)
{
    char *d = n < SIZE_MAX ? keel__malloc(n + 1) : NULL; /* n + 1 would wrap to 0 */
    if (d) {
        memcpy(d, s, n);
        d[n] = '\0';
    }
    return d;
}

/* Percent-decoding for the user, password and socket path: %XX with two hex
 * digits, never %00 (they travel as C strings). KEEL_EINVAL for a bad
 * escape. */
static int dup_decoded(const char *s, size_t n, char **out)
{
    char *d = keel__malloc(n + 1);
    if (!d)
        return KEEL_ENOMEM;
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] != '%') {
            d[k++] = s[i];
            continue;
        }
        int hi = i + 2 < n ? keel__hex_digit(s[i + 1]) : -1;
        int lo = hi >= 0 ? keel__hex_digit(s[i + 2]) : -1;
        if (lo < 0 || (hi | lo) == 0) {
            keel__free(d);
            return KEEL_EINVAL;
        }
        d[k++] = (char)(hi << 4 | lo);
        i += 2;
    }
    d[k] = '\0';
    *out = d;
    return 0;
}

/* A host name or address: no spaces, controls or URL delimiters. */
static bool host_ok(const char *h, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)h[i] <= ' ' || strchr("@/?#[]%\\", h[i]) || h[i] == 0x7f)
            return false;
    return n > 0;
}

/* The credentials p[0..auth_end): [user]:password or password alone. */
static int parse_auth(const char *p, const char *auth_end, keel__rurl *u)
{
    const char *colon = memchr(p, ':', (size_t)(auth_end - p));
    const char *pw = colon ? colon + 1 : p;
    int rc = 0;
    if (colon && colon > p)
        rc = dup_decoded(p, (size_t)(colon - p), &u->user);
    if (rc == 0 && (u->user || auth_end > pw)) /* ":@" alone: no AUTH */
        rc = dup_decoded(pw, (size_t)(auth_end - pw), &u->pass);
    return rc;
}

/* unix://[[user]:password@]/path[?db=N]: the path begins at the first '/',
 * so the credentials end at the '@' right before it. */
static int parse_unix(const char *p, keel__rurl *u)
{
    const char *path = strchr(p, '/');
    if (!path || (path > p && path[-1] != '@'))
        return KEEL_EINVAL; /* no path, or something else before it */
    int rc = path > p ? parse_auth(p, path - 1, u) : 0;
    if (rc)
        return rc;
    const char *q = strchr(path, '?');
    if (q && (strncmp(q, "?db=", 4) != 0 || (u->db = (int)parse_num(q + 4, strlen(q + 4), 0, 65535)) < 0))
        return KEEL_EINVAL;
    if ((rc = dup_decoded(path, q ? (size_t)(q - path) : strlen(path), &u->path)) != 0)
        return rc;
    if (strlen(u->path) < 2 || strlen(u->path) >= sizeof(((struct sockaddr_un *)0)->sun_path))
        return KEEL_EINVAL; /* "/" is no socket; a longer path would be cut short by the connect */
    return 0;
}

int keel__redis_url(const char *url, keel__rurl *u)
{
    memset(u, 0, sizeof *u);
    if (!url)
        return KEEL_EINVAL;
    if (strncmp(url, "unix://", 7) == 0)
        return parse_unix(url + 7, u);
    if (strncmp(url, "redis://", 8) != 0)
        return KEEL_EINVAL;
    const char *p = url + 8, *end = p + strlen(p);
    const char *slash = strchr(p, '/');
    const char *auth_end = NULL; /* the last '@' before the path */
    for (const char *q = p; q < (slash ? slash : end); q++)
        if (*q == '@')
            auth_end = q;
    if (auth_end) { /* [user]:password@ or password@ */
        int rc = parse_auth(p, auth_end, u);
        if (rc)
            return rc;
        p = auth_end + 1;
    }
    const char *hend = slash ? slash : end, *port = NULL;
    if (*p == '[') { /* [IPv6], without a zone (no %25eth0) */
        const char *rb = memchr(p, ']', (size_t)(hend - p));
        if (!rb)
            return KEEL_EINVAL;
        if (!(u->host = dup_n(p + 1, (size_t)(rb - p - 1))))
            return KEEL_ENOMEM;
        if (inet_pton(AF_INET6, u->host, u->addr6) != 1)
            return KEEL_EINVAL; /* not an IPv6 address */
        u->ip6 = true;
        if (rb + 1 < hend) {
            if (rb[1] != ':')
                return KEEL_EINVAL;
            port = rb + 2;
        }
    } else {
        const char *colon = memchr(p, ':', (size_t)(hend - p));
        if (!host_ok(p, (size_t)((colon ? colon : hend) - p)))
            return KEEL_EINVAL; /* empty, or not a host name */
        u->host = dup_n(p, (size_t)((colon ? colon : hend) - p));
        if (colon)
            port = colon + 1;
    }
    if (!u->host)
        return KEEL_ENOMEM;
    u->port = 6379;
    if (port && (u->port = (int)parse_num(port, (size_t)(hend - port), 1, 65535)) < 0)
        return KEEL_EINVAL;
    if (slash && slash + 1 < end && (u->db = (int)parse_num(slash + 1, (size_t)(end - slash - 1), 0, 65535)) < 0)
        return KEEL_EINVAL;
    return 0;
}

void keel__redis_url_free(keel__rurl *u)
{
    keel__free(u->host);
    keel__free(u->path);
    keel__free(u->user);
    keel__free(u->pass);
    memset(u, 0, sizeof *u);
}

/* ---- errors, SIGPIPE ---- */

/* The keel code for a context in error, called right after the hiredis
 * call that failed: a timeout (EAGAIN from a read with SO_RCVTIMEO,
 * ETIMEDOUT from a connect) or anything else that lost the server. errno
 * tells, since hiredis's message follows the program's locale; the
 * messages of the C locale are the fallback. */
int keel__redis_ctx_error(const redisContext *c)
{
    int e = errno;
    if (c->err == REDIS_ERR_PROTOCOL || c->err == REDIS_ERR_OOM)
        return c->err == REDIS_ERR_OOM ? KEEL_ENOMEM : KEEL_EPROTO;
    if (c->err == REDIS_ERR_IO && (e == EAGAIN || e == EWOULDBLOCK || e == ETIMEDOUT))
        return KEEL_ETIMEDOUT;
    if (strstr(c->errstr, "temporarily unavailable") || strstr(c->errstr, "timed out"))
        return KEEL_ETIMEDOUT;
    return KEEL_EUNAVAIL;
}

/* hiredis writes with write(2): a closed peer raises SIGPIPE, which must
 * not kill the host program. Block it around our writes and swallow one
 * that we caused (not one that was pending before). */
void keel__sigpipe_block(keel__sigpipe *s)
{
    sigset_t pipe;
    sigemptyset(&pipe);
    sigaddset(&pipe, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe, &s->old);
    /* A SIGPIPE pending for us from before can only exist if the thread
     * already blocked it; else it would have been delivered. */
    s->was_pending = 0;
    if (sigismember(&s->old, SIGPIPE)) {
        sigset_t pending;
        sigpending(&pending);
        s->was_pending = sigismember(&pending, SIGPIPE);
    }
}

void keel__sigpipe_restore(const keel__sigpipe *s, const redisContext *c)
{
    /* A write that raised SIGPIPE failed with EPIPE, which hiredis keeps
     * in c->err: without an error there is nothing to take back. */
    if (c->err && !s->was_pending) {
        sigset_t pipe, pending;
        sigemptyset(&pipe);
        sigaddset(&pipe, SIGPIPE);
        sigpending(&pending);
        if (sigismember(&pending, SIGPIPE)) {
            struct timespec zero = {0, 0};
            while (sigtimedwait(&pipe, NULL, &zero) < 0 && errno == EINTR)
                ;
        }
    }
    pthread_sigmask(SIG_SETMASK, &s->old, NULL);
}

/* A timeout for hiredis: at least 1 us, since zero means "none" there. */
struct timeval keel__tv(uint64_t ns)
{
    if (ns < 1000)
        ns = 1000;
    return (struct timeval){(time_t)(ns / 1000000000u), (suseconds_t)(ns % 1000000000u / 1000u)};
}

/* ---- replies by a deadline ---- */

/* c in error as after a read that timed out (keel__redis_ctx_error() says
 * KEEL_ETIMEDOUT), so that its connection is discarded. */
static void timed_out(redisContext *c)
{
    c->err = REDIS_ERR_IO;
    snprintf(c->errstr, sizeof c->errstr, "Reply timed out");
    errno = EAGAIN;
}

/* Nanoseconds left before deadline (keel_now_ns), or 0 with c timed out. */
static uint64_t time_left(redisContext *c, uint64_t deadline)
{
    uint64_t now = keel_now_ns();
    if (now >= deadline) {
        timed_out(c);
        return 0;
    }
    return deadline - now;
}

/* Waits for c's socket to be readable by deadline: the read after it
 * cannot block, whatever the socket timeout. Past the deadline it still
 * looks once without waiting: an answer that came while the caller was
 * busy elsewhere (the listener's handlers) is taken, not timed out. */
static bool readable_by(redisContext *c, uint64_t deadline)
{
    for (;;) {
        uint64_t now = keel_now_ns(), left = now < deadline ? deadline - now : 0;
        struct pollfd p = {.fd = c->fd, .events = POLLIN};
        struct timespec ts = {(time_t)(left / 1000000000u), (long)(left % 1000000000u)};
        int n = ppoll(&p, 1, &ts, NULL);
        if (n > 0)
            return true; /* data, end of file or an error: the read tells */
        if (n == 0 && !left) {
            timed_out(c);
            return false;
        }
        if (n < 0 && errno != EINTR) {
            c->err = REDIS_ERR_IO;
            snprintf(c->errstr, sizeof c->errstr, "poll: %s", strerror(errno));
            return false;
        }
    }
}

int keel__redis_reply(redisContext *c, uint64_t deadline, void **reply)
{
    *reply = NULL;
    if (redisGetReplyFromReader(c, reply) != REDIS_OK || *reply)
        return *reply ? REDIS_OK : REDIS_ERR;
    int done = sdslen(c->obuf) == 0; /* nothing queued: no socket option to set */
    while (!done) {
        /* a write blocks while the server reads nothing: bound it by the
         * time left too (SO_SNDTIMEO; ppoll cannot, a write may be large) */
        uint64_t left = time_left(c, deadline);
        struct timeval tv = keel__tv(left);
        if (!left)
            return REDIS_ERR;
        if (setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) != 0) {
            c->err = REDIS_ERR_IO;
            snprintf(c->errstr, sizeof c->errstr, "setsockopt: %s", strerror(errno));
            return REDIS_ERR;
        }
        if (redisBufferWrite(c, &done) != REDIS_OK)
            return REDIS_ERR;
    }
    while (!*reply)
        if (!readable_by(c, deadline) || redisBufferRead(c) != REDIS_OK ||
            redisGetReplyFromReader(c, reply) != REDIS_OK)
            return REDIS_ERR;
    return REDIS_OK;
}

int keel__redis_call(redisContext *c, int argc, const char *const *argv, const size_t *argvlen,
                     uint64_t deadline, redisReply **reply)
{
    *reply = NULL;
    if (redisAppendCommandArgv(c, argc, (const char **)argv, argvlen) != REDIS_OK)
        return REDIS_ERR;
    return keel__redis_reply(c, deadline, (void **)reply);
}

/* ---- connections ---- */

/* One setup command. A refusal (a wrong password, a db out of range)
 * makes the node unusable: KEEL_EUNAVAIL, with the server's text logged. */
static int setup_command(rnode *n, redisContext *c, int argc, const char **argv)
{
    redisReply *rep;
    if (keel__redis_call(c, argc, argv, NULL, keel__redis_by(n->r->cmd_timeout), &rep) != REDIS_OK)
        return keel__redis_ctx_error(c);
    int rc = 0;
    if (rep->type == REDIS_REPLY_ERROR) {
        keel__log(KEEL_LOG_ERROR, "redis", "%s: %s: %s", n->name, argv[0], rep->str);
        rc = KEEL_EUNAVAIL;
    }
    freeReplyObject(rep);
    return rc;
}

/* Timeouts, keepalive (TCP only: it fails on a unix socket), AUTH and
 * SELECT on a fresh context. */
static int conn_setup(rnode *n, redisContext *c)
{
    keel_redis *r = n->r;
    if (redisSetTimeout(c, keel__tv(r->cmd_timeout)) != REDIS_OK ||
        (!n->url.path && redisEnableKeepAlive(c) != REDIS_OK)) {
        keel__log(KEEL_LOG_WARN, "redis", "%s: socket options: %s", n->name, c->errstr);
        return KEEL_EUNAVAIL;
    }
    int rc = 0;
    if (n->url.pass) {
        const char *argv[3] = {"AUTH", n->url.user ? n->url.user : n->url.pass, n->url.pass};
        rc = setup_command(n, c, n->url.user ? 3 : 2, argv);
    }
    if (rc == 0 && n->url.db) {
        char db[16];
        snprintf(db, sizeof db, "%d", n->url.db);
        const char *argv[2] = {"SELECT", db};
        rc = setup_command(n, c, 2, argv);
    }
    return rc;
}

int keel__redis_connect(rnode *n, redisContext **out)
{
    keel_redis *r = n->r;
    struct timeval tv = keel__tv(r->connect_timeout);
    redisContext *c = n->url.path ? redisConnectUnixWithTimeout(n->url.path, tv)
                                  : redisConnectWithTimeout(n->url.host, n->url.port, tv);
    if (!c)
        return KEEL_ENOMEM; /* hiredis could not even allocate */
    int rc = c->err ? KEEL_EUNAVAIL : 0; /* refused, unreachable, timed out */
    if (rc)
        keel__log(KEEL_LOG_WARN, "redis", "%s: connect: %s", n->name, c->errstr);
    if (rc == 0) {
        keel__sigpipe sp;
        keel__sigpipe_block(&sp);
        rc = conn_setup(n, c);
        keel__sigpipe_restore(&sp, c);
    }
    if (rc) {
        redisFree(c);
        return rc;
    }
    atomic_fetch_add_explicit(&n->connects, 1, memory_order_relaxed);
    *out = c;
    return 0;
}

/* KEEL_ETIMEDOUT from the pool means "no connection free"; a server that
 * went silent during AUTH or SELECT comes back as this code instead. */
#define SETUP_TIMEOUT (-1000)

static int conn_init(void *obj, void *ud)
{
    rnode *n = ud;
    rconn *c = obj;
    c->gen = atomic_load(&n->gen);
    c->used = false;
    int rc = keel__redis_connect(n, &c->c);
    return rc == KEEL_ETIMEDOUT ? SETUP_TIMEOUT : rc;
}

static void conn_fini(void *obj, void *ud)
{
    (void)ud;
    redisFree(((rconn *)obj)->c);
}

/* ---- node health (a keel_breaker per node) ---- */

static void node_state(keel_breaker *b, keel_breaker_state from, keel_breaker_state to, void *ud)
{
    (void)b;
    rnode *n = ud;
    if (to == KEEL_BREAKER_OPEN && from == KEEL_BREAKER_CLOSED)
        keel__log(KEEL_LOG_WARN, "redis", "%s: %u failures in a row: skipped", n->name,
                  atomic_load(&n->fails));
    else if (to == KEEL_BREAKER_CLOSED && from == KEEL_BREAKER_HALF_OPEN)
        keel__log(KEEL_LOG_INFO, "redis", "%s: answers again", n->name);
}

/* The outcome of a call that the breaker let through. */
static void node_result(rnode *n, int rc)
{
    if (rc == KEEL_ENOMEM) { /* says nothing of the node: a probe that
                              * never reached it must not close the breaker */
        keel_breaker_release(n->health);
        return;
    }
    bool failed = rc == KEEL_EUNAVAIL || rc == KEEL_ETIMEDOUT || rc == KEEL_EPROTO;
    if (failed) {
        atomic_fetch_add(&n->gen, 1); /* its idle connections are suspect too */
        atomic_fetch_add(&n->fails, 1);
        atomic_fetch_add_explicit(rc == KEEL_ETIMEDOUT ? &n->timeouts : &n->unavailable, 1,
                                  memory_order_relaxed);
    } else if (atomic_load_explicit(&n->fails, memory_order_relaxed)) {
        atomic_store(&n->fails, 0);
    }
    keel_breaker_on_result(n->health, keel__clock_now(&n->r->clock), 0, failed);
}

/* An idle connection the server closed (its `timeout`, CLIENT KILL, a
 * restart): with RESP2 and no pub/sub on pooled connections the server
 * says nothing unasked, so a readable idle socket can only be at its end
 * or in error. Only idle ones are asked: a fresh one that a server closed
 * at once (maxclients) must fail its call, not be made again forever. */
static bool idle_conn_closed(const rconn *c)
{
    struct pollfd p = {.fd = c->c->fd, .events = POLLIN};
    return c->used && poll(&p, 1, 0) != 0; /* -1 (EINTR) as well: say dead, make another */
}

/* Bytes that hiredis has read but no call has taken: replies to nobody
 * (a server answering more than asked), which the next caller would get
 * for its own command. */
static bool unread_replies(const redisContext *c)
{
    return c->reader->pos < c->reader->len;
}

/* Runs fn(context, arg) on a connection of n: the whole life of one call.
 * With `blocking`, the call may wait at the server as long as the caller
 * asked (BLPOP and the like): its timeout drops the connection but is no
 * sign of the node failing. */
static int with_conn(rnode *n, int (*fn)(redisContext *c, uint64_t timeout, void *arg), void *arg,
                     bool blocking)
{
    keel_redis *r = n->r;
    if (keel_breaker_try_acquire(n->health, keel__clock_now(&r->clock)) != 0) {
        atomic_fetch_add_explicit(&n->unavailable, 1, memory_order_relaxed);
        return KEEL_EUNAVAIL;
    }
    rconn *c;
    int rc;
    /* A connection made before the node last failed is dropped unused:
     * after a restart, the probe must not fail on a stale socket. One the
     * server closed while it idled is no failure of the node either. */
    while ((rc = keel_pool_acquire_timeout(n->pool, r->cmd_timeout, (void **)&c)) == 0 &&
           (c->gen != atomic_load(&n->gen) || idle_conn_closed(c) || unread_replies(c->c)))
        keel_pool_discard(n->pool, c);
    if (rc) { /* every connection busy (ETIMEDOUT), or a connect failed */
        if (rc == SETUP_TIMEOUT) {
            rc = KEEL_ETIMEDOUT;
        } else if (rc == KEEL_ETIMEDOUT) { /* says nothing about the node */
            keel_breaker_release(n->health);
            return rc;
        }
        node_result(n, rc);
        return rc;
    }
    keel__sigpipe sp;
    keel__sigpipe_block(&sp);
    rc = fn(c->c, r->cmd_timeout, arg);
    keel__sigpipe_restore(&sp, c->c);
    atomic_fetch_add_explicit(&n->commands, 1, memory_order_relaxed);
    c->used = true;
    /* a reply nested past hiredis's 7 levels: the caller's, not the node's
     * health (any other protocol error is: the server speaks no Redis) */
    bool too_deep = rc == KEEL_EPROTO && strstr(c->c->errstr, "nested multi bulk") != NULL;
    if (c->c->err) { /* the context saw an error: never reuse it */
        if (rc == KEEL_EPROTO)
            keel__log(KEEL_LOG_WARN, "redis", "%s: %s: connection dropped", n->name, c->c->errstr);
        keel_pool_discard(n->pool, c);
    } else if (unread_replies(c->c)) { /* the call has its answer; the node is fine */
        keel__log(KEEL_LOG_WARN, "redis", "%s: replies left unread: connection dropped", n->name);
        keel_pool_discard(n->pool, c);
    } else {
        keel_pool_release(n->pool, c);
    }
    if (rc == KEEL_ETIMEDOUT && blocking) {
        atomic_fetch_add_explicit(&n->timeouts, 1, memory_order_relaxed);
        keel_breaker_release(n->health);
        return rc;
    }
    if (too_deep) {
        keel_breaker_release(n->health);
        return rc;
    }
    node_result(n, rc);
    return rc;
}

/* ---- routing ---- */

/* Redis Cluster's hash tag: the part between the first '{' and the next
 * '}', when not empty; else the whole key. */
static void hash_tag(const void *key, size_t len, const void **tag, size_t *taglen)
{
    const char *k = key, *open = len ? memchr(k, '{', len) : NULL;
    if (open) {
        const char *close = memchr(open + 1, '}', len - (size_t)(open + 1 - k));
        if (close && close > open + 1) {
            *tag = open + 1;
            *taglen = (size_t)(close - open - 1);
            return;
        }
    }
    *tag = key;
    *taglen = len;
}

size_t keel__redis_route(keel_redis *r, const void *key, size_t len)
{
    if (r->nnodes == 1 || !key)
        return 0;
    const void *tag;
    size_t taglen;
    hash_tag(key, len, &tag, &taglen);
    keel_ring_node nd;
    if (keel_ring_lookup(r->ring, tag, taglen, &nd) != 0)
        return 0;
    return (size_t)(uintptr_t)nd.ud;
}

KEEL_API size_t keel_redis_node_of(keel_redis *r, const void *key, size_t len)
{
    return r ? keel__redis_route(r, key, len) : 0;
}

/* ---- commands ---- */

typedef struct one {
    int argc;
    const char *const *argv;
    const size_t *argvlen;
    redisReply *reply;
} one;

/* The result of a reply that came: an error reply is KEEL_EBACKEND,
 * counted and logged with the server's text. */
static int reply_rc(rnode *n, const redisReply *rep)
{
    if (rep->type == REDIS_REPLY_ERROR) {
        atomic_fetch_add_explicit(&n->errors, 1, memory_order_relaxed);
        keel__log(KEEL_LOG_WARN, "redis", "%s: %.*s", n->name, (int)rep->len, rep->str);
        return KEEL_EBACKEND;
    }
    return 0;
}

static int run_one(redisContext *c, uint64_t timeout, void *arg)
{
    one *o = arg;
    if (keel__redis_call(c, o->argc, o->argv, o->argvlen, keel__redis_by(timeout), &o->reply) != REDIS_OK)
        return keel__redis_ctx_error(c);
    return 0;
}

/* n byte strings, none NULL with a length (NULL lists for n == 0). */
static bool bytes_ok(size_t n, const void *const *p, const size_t *len)
{
    if (n && (!p || !len))
        return false;
    for (size_t i = 0; i < n; i++)
        if (!p[i] && len[i])
            return false;
    return true;
}

static bool is_cmd(const char *a, size_t n, const char *name)
{
    return n == strlen(name) && strncasecmp(a, name, n) == 0;
}

/* Whether a command would change its pooled connection for whoever takes
 * it next (the database, the protocol, a subscription, replies switched
 * off, a watch, its name, eviction or LRU flags, cluster reads), or leave
 * replies unread on it (the UNSUBSCRIBEs answer once per channel, even
 * when not subscribed). MULTI is judged by the caller. */
static bool changes_conn(int argc, const char *const *argv, const size_t *argvlen)
{
    static const char *const names[] = {"SELECT", "AUTH", "HELLO", "RESET", "QUIT", "WATCH",
                                        "MONITOR", "SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE",
                                        "UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE",
                                        "SYNC", "PSYNC", "READONLY", "READWRITE"};
    static const char *const client[] = {"REPLY", "TRACKING", "SETNAME", "NO-EVICT", "NO-TOUCH"};
    size_t n = argvlen[0];
    if (n < 4 || n > 12)
        return false;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (is_cmd(argv[0], n, names[i]))
            return true;
    for (size_t i = 0; argc > 1 && is_cmd(argv[0], n, "CLIENT") && i < sizeof client / sizeof client[0]; i++)
        if (is_cmd(argv[1], argvlen[1], client[i]))
            return true;
    return false;
}

/* Whether a command waits at the server for as long as its caller says
 * (XREAD and XREADGROUP only with BLOCK, before STREAMS and its keys). */
static bool is_blocking(int argc, const char *const *argv, const size_t *argvlen)
{
    static const char *const names[] = {"BLPOP", "BRPOP", "BLMOVE", "BRPOPLPUSH", "BZPOPMIN",
                                        "BZPOPMAX", "BLMPOP", "BZMPOP", "WAIT", "WAITAOF"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (is_cmd(argv[0], argvlen[0], names[i]))
            return true;
    int from = is_cmd(argv[0], argvlen[0], "XREAD")        ? 1
               : is_cmd(argv[0], argvlen[0], "XREADGROUP") ? 4 /* after GROUP group consumer */
                                                           : argc;
    for (int i = from; i < argc; i++) {
        if (is_cmd(argv[i], argvlen[i], "STREAMS"))
            break;
        if (is_cmd(argv[i], argvlen[i], "BLOCK"))
            return true;
        if (is_cmd(argv[i], argvlen[i], "COUNT"))
            i++; /* its number */
    }
    return false;
}

static bool args_ok(int argc, const char *const *argv, const size_t *argvlen)
{
    return argc > 0 && argv && argvlen && bytes_ok((size_t)argc, (const void *const *)argv, argvlen) &&
           !changes_conn(argc, argv, argvlen);
}

/* A lone command: MULTI too would leave its connection in a transaction. */
static bool lone_ok(int argc, const char *const *argv, const size_t *argvlen)
{
    return args_ok(argc, argv, argvlen) && !is_cmd(argv[0], argvlen[0], "MULTI");
}

static int command_on(keel_redis *r, size_t node, int argc, const char *const *argv,
                      const size_t *argvlen, redisReply **reply)
{
    rnode *n = &r->nodes[node];
    one o = {argc, argv, argvlen, NULL};
    int rc = with_conn(n, run_one, &o, is_blocking(argc, argv, argvlen));
    if (rc == 0)
        rc = reply_rc(n, o.reply);
    *reply = o.reply;
    return rc;
}

int keel__redis_command_on(keel_redis *r, size_t node, int argc, const char *const *argv, const size_t *argvlen,
                           redisReply **reply)
{
    if (!r || node >= r->nnodes || !reply || !lone_ok(argc, argv, argvlen))
        return KEEL_EINVAL;
    return command_on(r, node, argc, argv, argvlen, reply);
}

KEEL_API int keel_redis_command(keel_redis *r, const void *key, size_t keylen, int argc,
                                const char *const *argv, const size_t *argvlen, redisReply **reply)
{
    if (reply)
        *reply = NULL;
    if (!r || !reply || !lone_ok(argc, argv, argvlen) || (!key && keylen))
        return KEEL_EINVAL;
    return command_on(r, keel__redis_route(r, key, keylen), argc, argv, argvlen, reply);
}

KEEL_API int keel_redis_command_keys(keel_redis *r, const void *const *keys, const size_t *keylens,
                                     size_t nkeys, int argc, const char *const *argv,
                                     const size_t *argvlen, redisReply **reply)
{
    if (reply)
        *reply = NULL;
    if (!r || !reply || !lone_ok(argc, argv, argvlen) || !bytes_ok(nkeys, keys, keylens))
        return KEEL_EINVAL;
    size_t node = nkeys ? keel__redis_route(r, keys[0], keylens[0]) : 0;
    for (size_t i = 1; i < nkeys; i++)
        if (keel__redis_route(r, keys[i], keylens[i]) != node)
            return KEEL_EINVAL; /* keys on several nodes: give them a hash tag */
    return command_on(r, node, argc, argv, argvlen, reply);
}

/* ---- pipelines ---- */

typedef struct batch {
    keel_redis_cmd *cmds;
    const size_t *node_of;
    size_t n, node;
} batch;

/* Sends every command of the batch for this node, then reads the replies
 * in order, all within one command timeout. A reply that fails to come
 * ends the batch: the rest get the context's error. */
static int run_batch(redisContext *c, uint64_t timeout, void *arg)
{
    batch *b = arg;
    uint64_t deadline = keel__redis_by(timeout);
    for (size_t i = 0; i < b->n; i++) {
        keel_redis_cmd *cmd = &b->cmds[i];
        if (b->node_of[i] == b->node &&
            redisAppendCommandArgv(c, cmd->argc, (const char **)cmd->argv, cmd->argvlen) != REDIS_OK)
            return KEEL_ENOMEM;
    }
    int rc = 0;
    for (size_t i = 0; i < b->n; i++) {
        keel_redis_cmd *cmd = &b->cmds[i];
        if (b->node_of[i] != b->node)
            continue;
        void *rep = NULL;
        if (rc == 0 && keel__redis_reply(c, deadline, &rep) != REDIS_OK)
            rc = keel__redis_ctx_error(c);
        cmd->reply = rep;
        cmd->rc = rc;
    }
    return rc;
}

/* Every command gets rc and no reply: a pipeline refused, or not yet sent. */
static int set_all(keel_redis_cmd *cmds, size_t n, int rc)
{
    for (size_t i = 0; i < n; i++) {
        cmds[i].reply = NULL;
        cmds[i].rc = rc;
    }
    return rc;
}

KEEL_API int keel_redis_pipeline(keel_redis *r, keel_redis_cmd *cmds, size_t n)
{
    if (!cmds && n)
        return KEEL_EINVAL;
    bool bad = !r;
    for (size_t i = 0; i < n && !bad; i++)
        bad = !args_ok(cmds[i].argc, cmds[i].argv, cmds[i].argvlen) || (!cmds[i].key && cmds[i].keylen);
    if (bad)
        return set_all(cmds, n, KEEL_EINVAL);
    size_t *node_of = keel__malloc((n ? n : 1) * sizeof *node_of);
    unsigned char *used = keel__calloc(r->nnodes, sizeof *used); /* USED, IN_MULTI */
    if (!node_of || !used) {
        keel__free(node_of);
        keel__free(used);
        return set_all(cmds, n, KEEL_ENOMEM);
    }
    enum { USED = 1, IN_MULTI = 2 };
    for (size_t i = 0; i < n; i++) {
        size_t node = node_of[i] = keel__redis_route(r, cmds[i].key, cmds[i].keylen);
        const char *a = cmds[i].argv[0];
        size_t alen = cmds[i].argvlen[0];
        used[node] |= USED;
        if (is_cmd(a, alen, "MULTI"))
            used[node] |= IN_MULTI;
        else if (is_cmd(a, alen, "EXEC") || is_cmd(a, alen, "DISCARD"))
            used[node] &= (unsigned char)~IN_MULTI;
    }
    for (size_t node = 0; node < r->nnodes; node++)
        bad = bad || (used[node] & IN_MULTI); /* a transaction left open on a pooled connection */
    if (bad) {
        keel__free(node_of);
        keel__free(used);
        return set_all(cmds, n, KEEL_EINVAL);
    }
    set_all(cmds, n, KEEL_EUNAVAIL); /* until a reply says otherwise */
    for (size_t node = 0; node < r->nnodes; node++) {
        if (!used[node])
            continue;
        batch b = {cmds, node_of, n, node};
        bool blocking = false;
        for (size_t i = 0; i < n && !blocking; i++)
            blocking = node_of[i] == node && is_blocking(cmds[i].argc, cmds[i].argv, cmds[i].argvlen);
        int rc = with_conn(&r->nodes[node], run_batch, &b, blocking);
        for (size_t i = 0; i < n; i++) {
            if (node_of[i] != node)
                continue;
            keel_redis_cmd *cmd = &cmds[i];
            cmd->rc = cmd->reply ? reply_rc(&r->nodes[node], cmd->reply)
                                 : (rc ? rc : KEEL_EUNAVAIL);
        }
    }
    int first = 0; /* in command order, not node order */
    for (size_t i = 0; i < n && !first; i++)
        if (cmds[i].rc != KEEL_EBACKEND)
            first = cmds[i].rc;
    keel__free(node_of);
    keel__free(used);
    return first;
}

/* ---- scripts ---- */

KEEL_API int keel_redis_script_create(keel_redis *r, const char *lua, size_t len,
                                      keel_redis_script **out)
{
    if (!r || !lua || !len || !out)
        return KEEL_EINVAL;
    keel_redis_script *s = keel__calloc(1, sizeof *s);
    if (!s || !(s->lua = dup_n(lua, len))) {
        keel__free(s);
        return KEEL_ENOMEM;
    }
    s->len = len;
    SHA1_CTX ctx;
    uint8_t d[SHA1_DIGEST_LENGTH];
    SHA1Init(&ctx);
    SHA1Update(&ctx, (const uint8_t *)lua, len);
    SHA1Final(d, &ctx);
    for (int i = 0; i < SHA1_DIGEST_LENGTH; i++)
        snprintf(s->sha + 2 * i, 3, "%02x", d[i]);
    *out = s;
    return 0;
}

KEEL_API void keel_redis_script_free(keel_redis_script *s)
{
    if (s) {
        keel__free(s->lua);
        keel__free(s);
    }
}

KEEL_API const char *keel_redis_script_sha(const keel_redis_script *s) { return s ? s->sha : ""; }

typedef struct evalcall {
    keel_redis_script *s;
    int argc;
    const char **argv;
    size_t *argvlen;
    redisReply *reply;
} evalcall;

/* The server's own answer to an unknown script: a script may fail with an
 * error of its own that starts "NOSCRIPT", and it ran then. */
#define NOSCRIPT "NOSCRIPT No matching script"

static int run_eval(redisContext *c, uint64_t timeout, void *arg)
{
    evalcall *e = arg;
    if (keel__redis_call(c, e->argc, e->argv, e->argvlen, keel__redis_by(timeout), &e->reply) != REDIS_OK)
        return keel__redis_ctx_error(c);
    if (e->reply->type == REDIS_REPLY_ERROR && strncmp(e->reply->str, NOSCRIPT, strlen(NOSCRIPT)) == 0) {
        /* the server forgot it (restart, SCRIPT FLUSH): once more with
         * EVAL and the body, which caches it again for later EVALSHAs and
         * cannot answer NOSCRIPT */
        freeReplyObject(e->reply);
        e->argv[0] = "EVAL", e->argvlen[0] = 4;
        e->argv[1] = e->s->lua, e->argvlen[1] = e->s->len;
        if (keel__redis_call(c, e->argc, e->argv, e->argvlen, keel__redis_by(timeout), &e->reply) != REDIS_OK)
            return keel__redis_ctx_error(c);
    }
    return 0;
}

KEEL_API int keel_redis_eval(keel_redis *r, keel_redis_script *s, size_t nkeys,
                             const void *const *keys, const size_t *keylens, size_t nargs,
                             const char *const *args, const size_t *arglens, const void *route,
                             size_t routelen, redisReply **reply)
{
    if (reply)
        *reply = NULL;
    if (!r || !s || !reply || !bytes_ok(nkeys, keys, keylens) ||
        !bytes_ok(nargs, (const void *const *)args, arglens) ||
        nkeys + nargs > 1000000 || (!route && routelen))
        return KEEL_EINVAL;
    size_t node = nkeys ? keel__redis_route(r, keys[0], keylens[0]) : keel__redis_route(r, route, routelen);
    for (size_t i = 1; i < nkeys; i++)
        if (keel__redis_route(r, keys[i], keylens[i]) != node)
            return KEEL_EINVAL;
    int argc = (int)(3 + nkeys + nargs);
    const char **argv = keel__malloc((size_t)argc * sizeof *argv);
    size_t *lens = keel__malloc((size_t)argc * sizeof *lens);
    char nk[24];
    if (!argv || !lens) {
        keel__free(argv);
        keel__free(lens);
        return KEEL_ENOMEM;
    }
    snprintf(nk, sizeof nk, "%zu", nkeys);
    argv[0] = "EVALSHA", lens[0] = 7;
    argv[1] = s->sha, lens[1] = 40;
    argv[2] = nk, lens[2] = strlen(nk);
    for (size_t i = 0; i < nkeys; i++)
        argv[3 + i] = keys[i], lens[3 + i] = keylens[i];
    for (size_t i = 0; i < nargs; i++)
        argv[3 + nkeys + i] = args[i], lens[3 + nkeys + i] = arglens[i];
    evalcall e = {s, argc, argv, lens, NULL};
    rnode *n = &r->nodes[node];
    int rc = with_conn(n, run_eval, &e, false); /* a script's commands never block */
    if (rc == 0)
        rc = reply_rc(n, e.reply);
    keel__free(argv);
    keel__free(lens);
    *reply = e.reply;
    return rc;
}

/* ---- statistics and metrics ---- */

KEEL_API size_t keel_redis_nodes(keel_redis *r) { return r ? r->nnodes : 0; }

KEEL_API int keel_redis_node_stats_get(keel_redis *r, size_t node, keel_redis_node_stats *st)
{
    if (!r || !st || node >= r->nnodes)
        return KEEL_EINVAL;
    rnode *n = &r->nodes[node];
    st->name = n->name;
    st->fails = atomic_load(&n->fails);
    st->skipped = keel_breaker_state_get(n->health) != KEEL_BREAKER_CLOSED;
    st->commands = atomic_load(&n->commands);
    st->errors = atomic_load(&n->errors);
    st->timeouts = atomic_load(&n->timeouts);
    st->unavailable = atomic_load(&n->unavailable);
    st->connects = atomic_load(&n->connects);
    return 0;
}

#define NODE_STAT(fn, field)                                                                       \
    static double fn(void *ud) { return (double)atomic_load(&((rnode *)ud)->field); }
NODE_STAT(m_commands, commands)
NODE_STAT(m_errors, errors)
NODE_STAT(m_timeouts, timeouts)
NODE_STAT(m_unavailable, unavailable)
NODE_STAT(m_connects, connects)
#undef NODE_STAT
static double m_skipped(void *ud)
{
    keel_redis_node_stats st = {0};
    rnode *n = ud;
    keel_redis_node_stats_get(n->r, n->idx, &st);
    return st.skipped;
}

static int node_metrics(keel_redis *r, rnode *n, const char *name)
{
    keel__mfunc fs[] = {
        {0, "keel_redis_commands_total", "Calls that reached a connection.", "node", n->name, m_commands},
        {0, "keel_redis_error_replies_total", "Calls answered with an error reply.", "node", n->name, m_errors},
        {0, "keel_redis_timeouts_total", "Calls the node did not answer within the command timeout.", "node", n->name,
         m_timeouts},
        {0, "keel_redis_unavailable_total", "Calls that found the node down or skipped.", "node", n->name,
         m_unavailable},
        {0, "keel_redis_connects_total", "Connections made.", "node", n->name, m_connects},
        {1, "keel_redis_node_skipped", "1 while the node is skipped for failing.", "node", n->name, m_skipped},
    };
    return keel__metrics_funcs(r->metrics, "redis", name, fs, sizeof fs / sizeof fs[0], n);
}

/* ---- create, destroy ---- */

/* Whether two parsed URLs name one server, whatever the database: a host
 * name's case does not count (RFC 4343), and an IPv6 address is compared
 * as its 16 bytes ([::1] is [0::1]). A name and an address of one host
 * cannot be told apart without resolving, which create does not do. */
static bool same_server(const keel__rurl *a, const keel__rurl *b)
{
    if (a->path || b->path)
        return a->path && b->path && strcmp(a->path, b->path) == 0;
    if (a->port != b->port)
        return false;
    if (a->ip6 || b->ip6) /* a host name has no ':', so never equals one */
        return a->ip6 && b->ip6 && memcmp(a->addr6, b->addr6, sizeof a->addr6) == 0;
    return strcasecmp(a->host, b->host) == 0;
}

KEEL_API int keel_redis_create(keel_redis **out, const keel_redis_opts *o)
{
    if (!out || !o || !o->nodes || o->nnodes == 0 || o->nnodes > 4096)
        return KEEL_EINVAL;
    keel_redis *r = keel__calloc(1, sizeof *r);
    if (!r)
        return KEEL_ENOMEM;
    r->connect_timeout = o->connect_timeout_ns ? o->connect_timeout_ns : 1000000000u;
    r->cmd_timeout = o->command_timeout_ns ? o->command_timeout_ns : 1000000000u;
    uint64_t fail_timeout = o->fail_timeout_ns ? o->fail_timeout_ns : 10000000000u;
    keel_backoff_opts grow = {KEEL_BACKOFF_EQUAL_JITTER, fail_timeout, o->reconnect_max_ns, NULL, NULL};
    keel_breaker_opts health = {.window = KEEL_BREAKER_COUNT,
                                .window_size = o->max_fails ? o->max_fails : 3,
                                .minimum_calls = o->max_fails ? o->max_fails : 3,
                                .failure_rate = 100,
                                .permitted_in_half_open = 1,
                                .wait_open_ns = fail_timeout,
                                .open_backoff = o->reconnect_max_ns > fail_timeout ? &grow : NULL,
                                .on_state = node_state};
    r->clock = (keel__clock){o->clock, o->clock_ud};
    r->nnodes = o->nnodes;
    r->metrics = o->metrics;
    int rc = (r->nodes = keel__calloc(o->nnodes, sizeof *r->nodes)) ? 0 : KEEL_ENOMEM;
    for (size_t i = 0; rc == 0 && i < o->nnodes; i++) {
        rnode *n = &r->nodes[i];
        n->r = r;
        n->idx = i;
        if ((rc = keel__redis_url(o->nodes[i], &n->url)) != 0)
            break;
        if (n->url.path)
            snprintf(n->name, sizeof n->name, "%s", n->url.path);
        else
            snprintf(n->name, sizeof n->name, "%s:%d", n->url.host, n->url.port);
        for (size_t k = 0; k < i; k++)
            if (same_server(&r->nodes[k].url, &n->url))
                rc = KEEL_EINVAL; /* the same server twice, whatever the database */
        keel_pool_opts po = {.obj_size = sizeof(rconn),
                             .capacity = o->conns_per_node ? o->conns_per_node : 8,
                             .init = conn_init, .fini = conn_fini, .ud = n};
        if (rc == 0)
            rc = keel_pool_create(&n->pool, &po);
        health.ud = n;
        if (rc == 0)
            rc = keel_breaker_create(&n->health, &health);
    }
    if (rc == 0 && r->nnodes > 1) {
        keel_ring_opts ro = {.algo = KEEL_RING_CONTINUUM};
        rc = keel_ring_create(&r->ring, &ro);
        for (size_t i = 0; rc == 0 && i < r->nnodes; i++)
            rc = keel_ring_add(r->ring, r->nodes[i].name, strlen(r->nodes[i].name), 1,
                               (void *)(uintptr_t)i);
    }
    for (size_t i = 0; rc == 0 && r->metrics && i < r->nnodes; i++)
        rc = node_metrics(r, &r->nodes[i], o->metrics_name);
    if (rc) {
        keel_redis_destroy(r);
        return rc;
    }
    *out = r;
    return 0;
}

KEEL_API void keel_redis_destroy(keel_redis *r)
{
    if (!r)
        return;
    for (size_t i = 0; r->nodes && i < r->nnodes; i++) {
        if (r->metrics)
            keel_metrics_func_remove(r->metrics, &r->nodes[i]);
        keel_pool_destroy(r->nodes[i].pool);
        keel_breaker_destroy(r->nodes[i].health);
        keel__redis_url_free(&r->nodes[i].url);
    }
    keel_ring_destroy(r->ring);
    keel__free(r->nodes);
    keel__free(r);
}
