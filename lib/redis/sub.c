/* lib/redis/sub.c — the pub/sub listener: one thread, one connection.
 *
 * The thread subscribes, then waits for each push at most the heartbeat:
 * a silent connection gets a PING, which must be answered within the
 * command timeout, so a connection that died without a word (a
 * network partition, a frozen server) is noticed. After any failure it
 * reconnects with jittered backoff, subscribes again and calls
 * on_reconnect, because messages published meanwhile were lost.
 *
 * Stopping: the flag is raised and the socket shut down (not closed: the
 * thread still owns the context), which wakes a blocked read at once.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include <keel/backoff.h>

#include "redis_int.h"

struct keel_redis_sub {
    keel_redis *r;
    rnode *node;
    keel_redis_sub_opts o;
    char **channels, **patterns;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    redisContext *ctx; /* the live connection, under mu (for shutdown) */
    bool stop, started;
    bool self_free; /* unsubscribed from a callback: the thread frees s */
    int first_rc; /* the first subscription's outcome, for subscribe() */
};

static void set_ctx(keel_redis_sub *s, redisContext *c)
{
    pthread_mutex_lock(&s->mu);
    s->ctx = c;
    pthread_mutex_unlock(&s->mu);
}

static bool stopping(keel_redis_sub *s)
{
    pthread_mutex_lock(&s->mu);
    bool st = s->stop;
    pthread_mutex_unlock(&s->mu);
    return st;
}

static bool deliver(keel_redis_sub *s, redisReply *rep, bool *pong);
static void sub_free(keel_redis_sub *s);

/* SUBSCRIBE and PSUBSCRIBE, and their confirmations. A message may come
 * among them (Redis serves other clients' PUBLISH between the two commands
 * when it reads the second in parts): it is delivered, unless a handler
 * has unsubscribed the listener meanwhile. */
static int subscribe_all(keel_redis_sub *s, redisContext *c)
{
    size_t want = 0;
    for (int kind = 0; kind < 2; kind++) {
        size_t n = kind ? s->o.npatterns : s->o.nchannels;
        char **names = kind ? s->patterns : s->channels;
        if (!n)
            continue;
        const char **argv = keel__malloc((n + 1) * sizeof *argv);
        if (!argv)
            return KEEL_ENOMEM;
        argv[0] = kind ? "PSUBSCRIBE" : "SUBSCRIBE";
        for (size_t i = 0; i < n; i++)
            argv[i + 1] = names[i];
        int ok = redisAppendCommandArgv(c, (int)n + 1, argv, NULL);
        keel__free(argv);
        if (ok != REDIS_OK)
            return KEEL_ENOMEM;
        want += n;
    }
    uint64_t deadline = keel__redis_by(s->r->cmd_timeout);
    for (size_t got = 0; got < want;) {
        redisReply *rep = NULL;
        if (keel__redis_reply(c, deadline, (void **)&rep) != REDIS_OK)
            return keel__redis_ctx_error(c);
        bool kind = rep->type == REDIS_REPLY_ARRAY && rep->elements >= 3 &&
                    rep->element[0]->type == REDIS_REPLY_STRING;
        bool ok = kind && rep->elements == 3 &&
                  (strcmp(rep->element[0]->str, "subscribe") == 0 ||
                   strcmp(rep->element[0]->str, "psubscribe") == 0);
        bool message = kind && !ok &&
                       (strcmp(rep->element[0]->str, "message") == 0 ||
                        strcmp(rep->element[0]->str, "pmessage") == 0);
        bool pong = false;
        if (message && !stopping(s))
            deliver(s, rep, &pong);
        if (rep->type == REDIS_REPLY_ERROR)
            keel__log(KEEL_LOG_ERROR, "redis", "%s: subscribe: %s", s->node->name, rep->str);
        freeReplyObject(rep);
        if (!ok && !message)
            return KEEL_EBACKEND;
        got += ok;
    }
    return 0;
}

/* Delivers one push; returns false for a reply that makes no sense. */
static bool deliver(keel_redis_sub *s, redisReply *rep, bool *pong)
{
    if (rep->type != REDIS_REPLY_ARRAY || rep->elements < 2 || rep->element[0]->type != REDIS_REPLY_STRING)
        return false;
    const char *kind = rep->element[0]->str;
    redisReply **e = rep->element;
    if (strcmp(kind, "message") == 0 && rep->elements == 3) {
        s->o.on_message(e[1]->str, e[1]->len, e[2]->str, e[2]->len, NULL, s->o.ud);
    } else if (strcmp(kind, "pmessage") == 0 && rep->elements == 4) {
        s->o.on_message(e[2]->str, e[2]->len, e[3]->str, e[3]->len, e[1]->str, s->o.ud);
    } else if (strcmp(kind, "pong") == 0) {
        *pong = true;
    }
    return true;
}

/* Reads until the connection fails or the listener stops. */
static void listen_loop(keel_redis_sub *s, redisContext *c)
{
    keel_redis *r = s->r;
    bool waiting_pong = false;
    uint64_t pong_by = 0; /* a PING's answer, messages before it or not */
    while (!stopping(s)) {
        redisReply *rep = NULL;
        uint64_t deadline = waiting_pong ? pong_by : keel__redis_by(s->o.heartbeat_ns);
        keel__sigpipe sp;
        keel__sigpipe_block(&sp);
        int ok = keel__redis_reply(c, deadline, (void **)&rep); /* sends a queued PING too */
        int rc = ok == REDIS_OK ? 0 : keel__redis_ctx_error(c);
        keel__sigpipe_restore(&sp, c);
        if (ok == REDIS_OK) {
            bool pong = false;
            uint64_t t0 = keel_now_ns();
            bool sane = deliver(s, rep, &pong);
            freeReplyObject(rep);
            if (!sane)
                return;
            if (pong)
                waiting_pong = false;
            else if (waiting_pong) /* the handler's time is not the server's */
                pong_by = keel__sat_add(pong_by, keel_now_ns() - t0);
            continue;
        }
        if (rc != KEEL_ETIMEDOUT || waiting_pong)
            return; /* dead, or the heartbeat went unanswered */
        /* Silence for a heartbeat: ask, and give the answer the command
         * timeout. hiredis keeps its error until cleared. */
        c->err = 0;
        c->errstr[0] = '\0';
        const char *ping[1] = {"PING"};
        if (redisAppendCommandArgv(c, 1, ping, NULL) != REDIS_OK)
            return;
        waiting_pong = true;
        pong_by = keel__redis_by(r->cmd_timeout);
    }
}

static void *run(void *arg)
{
    keel_redis_sub *s = arg;
    keel_backoff bo;
    keel_backoff_opts bopts = {KEEL_BACKOFF_FULL_JITTER, s->o.reconnect_min_ns, s->o.reconnect_max_ns,
                               NULL, NULL};
    keel_backoff_init(&bo, &bopts);
    bool first = true;
    while (!stopping(s)) {
        redisContext *c = NULL;
        int rc = keel__redis_connect(s->node, &c);
        if (rc == 0) {
            keel__sigpipe sp;
            keel__sigpipe_block(&sp);
            rc = subscribe_all(s, c);
            keel__sigpipe_restore(&sp, c);
        }
        if (first) { /* subscribe() waits for this outcome */
            pthread_mutex_lock(&s->mu);
            s->first_rc = rc;
            s->started = true;
            if (rc)
                s->stop = true;
            pthread_cond_broadcast(&s->cv);
            pthread_mutex_unlock(&s->mu);
            first = false;
        } else if (rc == 0) {
            if (s->o.on_reconnect && !stopping(s))
                s->o.on_reconnect(s->o.ud);
        }
        if (rc == 0) {
            uint64_t up = keel_now_ns();
            set_ctx(s, c);
            listen_loop(s, c);
            set_ctx(s, NULL);
            /* Only a connection that lasted resets the backoff: one a
             * server drops at once, confirmed or not, must not make the
             * next attempt (and its on_reconnect) come at once again. */
            if (keel_now_ns() - up >= s->o.reconnect_max_ns)
                keel_backoff_reset(&bo);
            if (s->o.on_disconnect && !stopping(s))
                s->o.on_disconnect(s->o.ud);
        }
        if (c)
            redisFree(c);
        if (stopping(s))
            break;
        /* back off before the next attempt, waking at once on stop */
        uint64_t wait = keel_backoff_next(&bo);
        struct timespec ts;
        keel__abstime_in(wait, &ts);
        pthread_mutex_lock(&s->mu);
        while (!s->stop && pthread_cond_timedwait(&s->cv, &s->mu, &ts) == 0)
            ;
        pthread_mutex_unlock(&s->mu);
    }
    pthread_mutex_lock(&s->mu);
    bool self_free = s->self_free;
    pthread_mutex_unlock(&s->mu);
    if (self_free) {
        pthread_mutex_destroy(&s->mu);
        pthread_cond_destroy(&s->cv);
        sub_free(s);
    }
    return NULL;
}

static void sub_free(keel_redis_sub *s)
{
    for (size_t i = 0; s->channels && i < s->o.nchannels; i++)
        keel__free(s->channels[i]);
    for (size_t i = 0; s->patterns && i < s->o.npatterns; i++)
        keel__free(s->patterns[i]);
    keel__free(s->channels);
    keel__free(s->patterns);
    keel__free(s);
}

static char **dup_all(const char *const *v, size_t n, bool *ok)
{
    char **d = keel__calloc(n ? n : 1, sizeof *d);
    *ok = d != NULL;
    for (size_t i = 0; *ok && i < n; i++)
        *ok = v[i] && (d[i] = keel__strdup(v[i])) != NULL;
    return d;
}

KEEL_API int keel_redis_subscribe(keel_redis *r, const keel_redis_sub_opts *o, keel_redis_sub **out)
{
    if (!r || !o || !out || !o->on_message || o->node >= r->nnodes || o->nchannels + o->npatterns == 0 ||
        (o->nchannels && !o->channels) || (o->npatterns && !o->patterns))
        return KEEL_EINVAL;
    for (size_t i = 0; i < o->nchannels + o->npatterns; i++)
        if (!(i < o->nchannels ? o->channels[i] : o->patterns[i - o->nchannels]))
            return KEEL_EINVAL;
    keel_redis_sub *s = keel__calloc(1, sizeof *s);
    if (!s)
        return KEEL_ENOMEM;
    s->r = r;
    s->node = &r->nodes[o->node];
    s->o = *o;
    if (!s->o.heartbeat_ns)
        s->o.heartbeat_ns = 1000000000u;
    if (!s->o.reconnect_min_ns)
        s->o.reconnect_min_ns = 50000000u;
    if (!s->o.reconnect_max_ns)
        s->o.reconnect_max_ns = 2000000000u;
    if (s->o.reconnect_max_ns < s->o.reconnect_min_ns)
        s->o.reconnect_max_ns = s->o.reconnect_min_ns;
    bool ok1, ok2;
    s->channels = dup_all(o->channels, o->nchannels, &ok1);
    s->patterns = dup_all(o->patterns, o->npatterns, &ok2);
    if (!ok1 || !ok2) {
        sub_free(s);
        return KEEL_ENOMEM;
    }
    pthread_mutex_init(&s->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s->cv, &ca);
    pthread_condattr_destroy(&ca);
    if (pthread_create(&s->thread, NULL, run, s) != 0) {
        pthread_mutex_destroy(&s->mu);
        pthread_cond_destroy(&s->cv);
        sub_free(s);
        return KEEL_ENOMEM;
    }
    pthread_mutex_lock(&s->mu);
    while (!s->started)
        pthread_cond_wait(&s->cv, &s->mu);
    int rc = s->first_rc;
    pthread_mutex_unlock(&s->mu);
    if (rc) {
        pthread_join(s->thread, NULL);
        pthread_mutex_destroy(&s->mu);
        pthread_cond_destroy(&s->cv);
        sub_free(s);
        return rc;
    }
    *out = s;
    return 0;
}

KEEL_API void keel_redis_unsubscribe(keel_redis_sub *s)
{
    if (!s)
        return;
    bool inside = pthread_equal(pthread_self(), s->thread); /* from a callback */
    pthread_mutex_lock(&s->mu);
    s->stop = true;
    s->self_free = inside;
    if (s->ctx) /* wake a blocked read; the thread closes it */
        shutdown(s->ctx->fd, SHUT_RDWR);
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    if (inside) { /* the thread ends when the callback returns, and frees s */
        pthread_detach(s->thread);
        return;
    }
    pthread_join(s->thread, NULL);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    sub_free(s);
}
