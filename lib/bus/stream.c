/* lib/bus/stream.c — keel_bus over Redis Streams.
 *
 * Publishing goes through keel_redis's pooled connections (one pipeline
 * for a batch). Consuming: one reader thread per partition, each with a
 * connection of its own so that a blocking XREADGROUP does not hold a
 * pooled one. A reader reads its consumer's pending entries first (cursor
 * from 0 up, burying those delivered max_deliveries times already), then
 * new ones (">"), and every min_idle/2 takes care of the group's stuck
 * entries, a page of XPENDING at a time: those delivered max_deliveries
 * times go to the dead-letter stream, the rest idle longer than min_idle
 * and matching a subscription here (XRANGE first: a consumer of the
 * group may subscribe to subjects this one does not) are claimed by id
 * with XCLAIM (which skips any taken meanwhile) and delivered again. An
 * entry read that nothing here subscribes to is handed back when another
 * live consumer of the group's registry does (left pending, idle and with
 * its delivery count as before, for the others), else acknowledged:
 * skipped; so is a stuck one that no consumer here or there wants.
 * Deciding on the counts of the same page keeps an entry from being
 * delivered more than max_deliveries times. A failed
 * connection is dropped and made again with jittered backoff; the pending
 * entries are read again then, since the last acknowledgements may not
 * have reached the server.
 *
 * Stopping: the flag is raised, and the reader's socket shut down only
 * while the reader waits in a blocking read (as in lib/redis/sub.c), so
 * that the acknowledgements of a batch in progress still reach Redis.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <keel/backoff.h>

#include "../hash.h"
#include "../redis/redis_int.h"
#include "bus_int.h"

#define KEY_MAX 300

/* A pattern subscribed to here, and how many subscriptions use it. */
typedef struct bpat {
    char *p;
    size_t refs;
} bpat;

typedef struct breader {
    bstream *s;
    size_t part;
    rnode *node;
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    redisContext *ctx; /* the live connection, for shutdown */
    atomic_bool stop;
    bool healthy, waiting; /* healthy: its last read worked; waiting: in a read
                              that may block; under mu */
    uint64_t reads;      /* reads begun */
    uint64_t empty_read; /* the number of the last read of new entries that found none */
    uint64_t done_ms, done_seq; /* the highest entry ID handled (acknowledged or not) */
} breader;

struct bstream {
    keel_bus *bus;
    keel_redis *r;
    char *group, *consumer, *prefix;
    char keys[64][KEY_MAX];
    char dead[KEY_MAX];
    size_t parts, count;
    char maxlen[24], count_s[24], block_s[24], idle_s[24];
    uint64_t min_idle, block_ns;
    uint32_t max_deliveries;
    pthread_mutex_t start_mu; /* start, and drain's look at started */
    breader *readers;
    bool started;
    /* The group's registry (see "the group's registry" below). */
    char *subs_key;
    keel_redis_script *reg_put_lua, *reg_get_lua;
    pthread_mutex_t pat_mu; /* pats, dirty, next_put */
    bpat *pats;
    size_t npats, cap_pats;
    bool dirty;        /* pats changed since they were last written */
    uint64_t next_put; /* when a reader writes them again */
    pthread_mutex_t reg_mu; /* the cache */
    redisReply *cache; /* [server ms, [consumer, value]...], values cut at spaces; NULL: none */
    uint64_t cache_ms, cache_at; /* its server time; when it was asked for (mono_ns) */
};

static bool stopping(breader *rd) { return atomic_load_explicit(&rd->stop, memory_order_relaxed); }

/* Marks the reader as in (or out of) a read that stop may interrupt by
 * shutting the socket down. */
static void set_waiting(breader *rd, bool w)
{
    pthread_mutex_lock(&rd->mu);
    rd->waiting = w;
    pthread_mutex_unlock(&rd->mu);
}

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* An entry ID "ms-seq" as two numbers; false if it is not one. */
static bool parse_id(const char *id, uint64_t *ms, uint64_t *seq)
{
    char *end;
    *ms = strtoull(id, &end, 10);
    if (end == id || *end != '-')
        return false;
    const char *p = end + 1;
    *seq = strtoull(p, &end, 10);
    return end != p && *end == '\0';
}

/* The id publishers and handlers see for entry `id` of partition part:
 * the entry's ID, then "-" and the partition when there are several, as
 * each partition is a stream of its own and two of them may give the
 * same ID. Only ever shown: the streams are always given their own IDs.
 * False when it does not fit (an ID is at most 41 bytes: it does). */
static bool ext_id(const bstream *s, size_t part, const char *id, size_t len, char out[KEEL_BUS_ID_MAX])
{
    if (len + (s->parts > 1 ? 3 : 0) >= KEEL_BUS_ID_MAX)
        return false;
    memcpy(out, id, len);
    if (s->parts > 1) { /* part < 64 */
        out[len++] = '-';
        if (part >= 10)
            out[len++] = (char)('0' + part / 10);
        out[len++] = (char)('0' + part % 10);
    }
    out[len] = '\0';
    return true;
}

/* One command on the reader's own connection. */
static int cmd(redisContext *c, int argc, const char **argv, const size_t *lens, redisReply **out)
{
    keel__sigpipe sp;
    keel__sigpipe_block(&sp);
    redisReply *rep = redisCommandArgv(c, argc, argv, lens);
    keel__sigpipe_restore(&sp, c);
    *out = rep;
    if (!rep)
        return keel__redis_ctx_error(c);
    if (rep->type != REDIS_REPLY_ERROR)
        return 0;
    if (strncmp(rep->str, "NOGROUP", 7) != 0 && strncmp(rep->str, "BUSYGROUP", 9) != 0)
        keel__log(KEEL_LOG_ERROR, "bus", "%s %s: %s", argv[0], argc > 1 ? argv[1] : "", rep->str);
    return KEEL_EBACKEND;
}

/* A command of C strings on the pooled connections of the node of key. */
static int pooled(bstream *s, const char *key, int argc, const char **argv, redisReply **out)
{
    size_t lens[8];
    for (int i = 0; i < argc; i++)
        lens[i] = strlen(argv[i]);
    return keel_redis_command(s->r, key, strlen(key), argc, argv, lens, out);
}

static bool reply_is(const redisReply *rep, const char *prefix)
{
    return rep && rep->type == REDIS_REPLY_ERROR && strncmp(rep->str, prefix, strlen(prefix)) == 0;
}

/* XGROUP CREATE ... MKSTREAM; an existing group is fine. */
static int create_group(bstream *s, size_t part, redisContext *c)
{
    const char *argv[] = {"XGROUP", "CREATE", s->keys[part], s->group, "0", "MKSTREAM"};
    redisReply *rep = NULL;
    int rc = c ? cmd(c, 6, argv, NULL, &rep) : pooled(s, s->keys[part], 6, argv, &rep);
    if (rc == KEEL_EBACKEND && reply_is(rep, "BUSYGROUP"))
        rc = 0; /* other error replies were logged on the way */
    if (rep)
        freeReplyObject(rep);
    return rc;
}

/* ---- the group's registry ----
 *
 * Streams are shared by every service, so an entry may match no
 * subscription of any consumer of a group: left pending, it would stay so
 * until trimmed, and every reader would look at it again each min_idle/2.
 * So each consumer registers its patterns in a hash per group (prefix +
 * "subs:" + service; field: the consumer, value: the server's time in ms
 * at which the field expires, then the patterns, each after a space,
 * which neither may contain). A reader with an entry that nothing here
 * subscribes to hands it back only when a live consumer of the group
 * subscribes to it, else acknowledges it (skipped) if it is still where
 * this one found it (see skip_ids()). Expiry is by the
 * server's clock (TIME, in the scripts), so hosts' clocks do not matter;
 * a field lives 3 x min_idle and is written again each min_idle/2, or
 * soon after a subscription changes. A registry that cannot be read means
 * handing back, as before it existed: never acknowledged on doubt. */

/* Writes this consumer's field, and drops those of consumers whose time
 * is up; the hash lives as long as its longest-lived field. */
static const char reg_put_lua[] =
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    "local all = redis.call('HGETALL', KEYS[1])\n"
    "for i = 1, #all, 2 do\n"
    "  local exp = tonumber(string.match(all[i + 1], '^%d+'))\n"
    "  if all[i] ~= ARGV[1] and (not exp or exp <= now) then redis.call('HDEL', KEYS[1], all[i]) end\n"
    "end\n"
    "local ttl = tonumber(ARGV[2])\n"
    "redis.call('HSET', KEYS[1], ARGV[1], string.format('%.0f', now + ttl) .. ARGV[3])\n"
    "if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end\n"
    "return now\n";

/* The server's time in ms and the hash, read at once. */
static const char reg_get_lua[] =
    "local t = redis.call('TIME')\n"
    "return {tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), redis.call('HGETALL', KEYS[1])}\n";

/* Writes this consumer's field with the patterns subscribed to now; the
 * next writing is due min_idle/2 later. */
static int reg_put(bstream *s)
{
    pthread_mutex_lock(&s->pat_mu);
    size_t len = 1;
    for (size_t i = 0; i < s->npats; i++)
        len += 1 + strlen(s->pats[i].p);
    char *v = keel__malloc(len);
    if (v) {
        char *w = v;
        for (size_t i = 0; i < s->npats; i++) {
            size_t l = strlen(s->pats[i].p);
            *w++ = ' ';
            memcpy(w, s->pats[i].p, l);
            w += l;
        }
        *w = '\0';
    }
    bool was = s->dirty;
    s->dirty = false; /* a change from now on is written by the next put */
    pthread_mutex_unlock(&s->pat_mu);
    int rc = KEEL_ENOMEM;
    if (v) {
        char ttl[24];
        snprintf(ttl, sizeof ttl, "%llu", (unsigned long long)(3 * (s->min_idle / 1000000u) + 1));
        const void *keys[] = {s->subs_key};
        size_t klen[] = {strlen(s->subs_key)};
        const char *args[] = {s->consumer, ttl, v};
        size_t alen[] = {strlen(s->consumer), strlen(ttl), strlen(v)};
        redisReply *rep = NULL;
        rc = keel_redis_eval(s->r, s->reg_put_lua, 1, keys, klen, 3, args, alen, NULL, 0, &rep);
        if (rc == KEEL_EBACKEND && rep && rep->type == REDIS_REPLY_ERROR)
            keel__log(KEEL_LOG_ERROR, "bus", "%s: registering: %s", s->subs_key, rep->str);
        if (rep)
            freeReplyObject(rep);
        keel__free(v);
    }
    pthread_mutex_lock(&s->pat_mu);
    if (rc)
        s->dirty |= was;
    else
        s->next_put = mono_ns() + s->min_idle / 2;
    pthread_mutex_unlock(&s->pat_mu);
    return rc;
}

/* Whether it is time for a reader to write the field again: each
 * min_idle/2, or after a subscription changed. One reader takes each turn. */
static bool reg_due(bstream *s)
{
    uint64_t now = mono_ns();
    pthread_mutex_lock(&s->pat_mu);
    bool due = s->dirty || now >= s->next_put;
    if (due)
        s->next_put = now + s->min_idle / 2;
    pthread_mutex_unlock(&s->pat_mu);
    return due;
}

/* Reads the registry into the cache; under reg_mu. */
static int reg_get(bstream *s)
{
    if (s->cache)
        freeReplyObject(s->cache);
    s->cache = NULL;
    const void *keys[] = {s->subs_key};
    size_t klen[] = {strlen(s->subs_key)};
    redisReply *rep = NULL;
    uint64_t at = mono_ns();
    int rc = keel_redis_eval(s->r, s->reg_get_lua, 1, keys, klen, 0, NULL, NULL, NULL, 0, &rep);
    if (rc == 0 && (rep->type != REDIS_REPLY_ARRAY || rep->elements != 2 ||
                    rep->element[0]->type != REDIS_REPLY_INTEGER || rep->element[1]->type != REDIS_REPLY_ARRAY))
        rc = KEEL_EPROTO;
    if (rc) {
        if (rc == KEEL_EBACKEND && rep && rep->type == REDIS_REPLY_ERROR)
            keel__log(KEEL_LOG_ERROR, "bus", "%s: reading: %s", s->subs_key, rep->str);
        if (rep)
            freeReplyObject(rep);
        return rc;
    }
    const redisReply *h = rep->element[1];
    for (size_t i = 1; i < h->elements; i += 2)
        if (h->element[i]->type == REDIS_REPLY_STRING)
            for (size_t j = 0; j < h->element[i]->len; j++)
                if (h->element[i]->str[j] == ' ')
                    h->element[i]->str[j] = '\0';
    s->cache = rep;
    s->cache_ms = (uint64_t)rep->element[0]->integer;
    s->cache_at = at;
    return 0;
}

/* Whether a live consumer of the group other than this one subscribes to
 * subject (an entry of time ms, read at got_ns): 1, 0, or an error (the
 * registry could not be read). The cache is read again when older than
 * min_idle/2, and for an entry not a second older than its server time
 * (the streams may live on other nodes, with other clocks) unless read
 * after the entry was: a consumer registers before its readers start, so
 * one publishing after that is in any registry read after the entry. */
static int others_want(bstream *s, const char *subject, uint64_t ms, uint64_t got_ns)
{
    pthread_mutex_lock(&s->reg_mu);
    int rc = 0;
    if (!s->cache || mono_ns() >= s->cache_at + s->min_idle / 2 || (ms + 1000 > s->cache_ms && s->cache_at < got_ns))
        rc = reg_get(s);
    const redisReply *h = rc == 0 ? s->cache->element[1] : NULL;
    for (size_t i = 0; h && rc == 0 && i + 1 < h->elements; i += 2) {
        const redisReply *k = h->element[i], *v = h->element[i + 1];
        if (k->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING || strcmp(k->str, s->consumer) == 0)
            continue;
        char *end;
        if (strtoull(v->str, &end, 10) <= s->cache_ms || end == v->str)
            continue; /* its time is up: gone without a word */
        for (const char *p = end; rc == 0 && p < v->str + v->len; p += strlen(p) + 1)
            if (*p && keel_bus_match(p, subject) == 1)
                rc = 1;
    }
    pthread_mutex_unlock(&s->reg_mu);
    return rc;
}

/* Removes this consumer's field: its entries are no longer handed back
 * for it. One left by a failure expires. */
static void reg_del(bstream *s)
{
    const char *argv[] = {"HDEL", s->subs_key, s->consumer};
    redisReply *rep = NULL;
    int rc = pooled(s, s->subs_key, 3, argv, &rep);
    if (rc)
        keel__log(KEEL_LOG_WARN, "bus", "%s: removing %s: %s", s->subs_key, s->consumer, keel_strerror(rc));
    if (rep)
        freeReplyObject(rep);
}

/* Adds (or removes) a subscription's pattern; written to the registry by
 * a reader before its next read. */
int keel__bus_stream_pattern(bstream *s, const char *pattern, bool add)
{
    int rc = 0;
    pthread_mutex_lock(&s->pat_mu);
    size_t i = 0;
    while (i < s->npats && strcmp(s->pats[i].p, pattern) != 0)
        i++;
    if (add && i < s->npats) {
        s->pats[i].refs++;
    } else if (add) {
        if (s->npats == s->cap_pats) {
            size_t cap = s->cap_pats ? 2 * s->cap_pats : 8;
            bpat *np = keel__realloc(s->pats, cap * sizeof *np);
            if (np) {
                s->pats = np;
                s->cap_pats = cap;
            }
        }
        char *copy = s->npats < s->cap_pats ? keel__strdup(pattern) : NULL;
        if (copy) {
            s->pats[s->npats++] = (bpat){copy, 1};
            s->dirty = true;
        } else {
            rc = KEEL_ENOMEM;
        }
    } else if (i < s->npats && --s->pats[i].refs == 0) {
        keel__free(s->pats[i].p);
        s->pats[i] = s->pats[--s->npats];
        s->dirty = true;
    }
    pthread_mutex_unlock(&s->pat_mu);
    return rc;
}

/* ---- delivery ---- */

/* An entry's fields as a message (pointers into the reply). */
static void parse_fields(const redisReply *f, const char *id, keel_bus_msg *v, keel_bus_header hdr[64])
{
    *v = (keel_bus_msg){NULL, 0, "", 0, hdr, 0, id, 0};
    for (size_t i = 0; i + 1 < f->elements; i += 2) {
        const redisReply *k = f->element[i], *x = f->element[i + 1];
        if (k->type != REDIS_REPLY_STRING || x->type != REDIS_REPLY_STRING)
            continue;
        if (k->len == 1 && k->str[0] == 's') {
            v->subject = x->str;
            v->subject_len = x->len;
        } else if (k->len == 1 && k->str[0] == 'd') {
            v->data = x->str;
            v->len = x->len;
        } else if (k->len > 2 && k->str[0] == 'h' && k->str[1] == ':' && v->nheaders < 64) {
            hdr[v->nheaders].key = k->str + 2;
            hdr[v->nheaders++].value = x->str;
        }
    }
    uint64_t ms = 0, seq;
    parse_id(id, &ms, &seq);
    v->time_ns = ms * 1000000u;
}

/* Reads entry [id, fields] into v (headers in hdr) and its subject's
 * tokens into t; false for one deleted (trimmed) while pending, or without
 * a valid subject. */
static bool entry_parse(const redisReply *e, const char *id, keel_bus_msg *v, keel_bus_header *hdr, btoks *t)
{
    const redisReply *f = e->element[1];
    if (f->type != REDIS_REPLY_ARRAY)
        return false;
    parse_fields(f, id, v, hdr);
    return v->subject && strlen(v->subject) == v->subject_len &&
           keel__bus_tokens(v->subject, v->subject_len, false, t) == 0;
}

/* Whether entry e ([id, fields], with a valid subject, read at got_ns)
 * is for no live consumer of the group: to be skipped. On doubt (the
 * registry cannot be read), not. */
static bool nobody_wants(bstream *s, const redisReply *e, const char *id, uint64_t got_ns)
{
    keel_bus_header hdr[64];
    keel_bus_msg v;
    uint64_t ms, seq;
    parse_fields(e->element[1], id, &v, hdr);
    return v.subject && parse_id(id, &ms, &seq) && others_want(s, v.subject, ms, got_ns) == 0;
}

/* Whether entry [id, fields] (or NULL: not there) matches a subscription
 * here: 1 also for one that is gone or has no valid subject (whoever
 * takes it acknowledges it unread), 0, or KEEL_ENOMEM. */
static int wanted(bstream *s, const redisReply *e)
{
    keel_bus_header hdr[64];
    keel_bus_msg v;
    btoks t;
    if (!e || e->type != REDIS_REPLY_ARRAY || e->elements != 2 || !entry_parse(e, "0-0", &v, hdr, &t))
        return 1;
    return keel__bus_matches(s->bus, &t); /* deliver() picks the member */
}

/* Delivers one entry [id, fields] to the matching handlers. Returns 0 when
 * it may be acknowledged (handled, or one that cannot be: no fields, a bad
 * subject), 1 when it must stay pending (a handler failed, or a queue
 * group's member left and none of the group is left here to take it:
 * another consumer may), 2 when nothing here subscribes to it, or every
 * match left before its call (another consumer of the group may: it is
 * handed back), or KEEL_ENOMEM. */
static int deliver(breader *rd, const redisReply *e)
{
    bstream *s = rd->s;
    if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 || e->element[0]->type != REDIS_REPLY_STRING)
        return 0;
    keel_bus_header hdr[64];
    keel_bus_msg v;
    btoks t;
    char id[KEEL_BUS_ID_MAX];
    if (!ext_id(s, rd->part, e->element[0]->str, e->element[0]->len, id))
        return 0; /* not a Redis entry ID */
    if (!entry_parse(e, e->element[0]->str, &v, hdr, &t)) {
        if (e->element[1]->type == REDIS_REPLY_ARRAY) /* not one deleted (trimmed) while pending */
            keel__log(KEEL_LOG_WARN, "bus", "entry %s has no valid subject: acknowledged unread", v.id);
        return 0;
    }
    v.id = id;
    bmatch m;
    int rc = keel__bus_match(s->bus, &t, &m);
    if (rc)
        return rc;
    if (!m.n)
        return 2;
    bool failed = false, ran = false;
    for (size_t i = 0; i < m.n; i++) {
        int hrc, called = keel__bus_call(m.subs[i], &t, &v, &hrc);
        if (called < 0)
            keel__log(KEEL_LOG_WARN, "bus", "entry %s (%s): no member of its queue group left here: left pending",
                      v.id, v.subject);
        failed |= hrc != 0;
        ran |= called > 0;
        keel__bus_sub_unref(m.subs[i]);
    }
    keel__bus_match_free(&m);
    /* every match left before its call (racing it): as if none had
     * matched, another consumer of the group may want the entry */
    return failed ? 1 : ran ? 0 : 2;
}

static int bury(breader *rd, redisContext *c, const char *id);

/* The ID of a stream entry [id, fields] of a reply, or NULL when the
 * reply is not shaped so. */
static const char *entry_id(const redisReply *e)
{
    return e->type == REDIS_REPLY_ARRAY && e->elements >= 1 && e->element[0]->type == REDIS_REPLY_STRING
               ? e->element[0]->str
               : NULL;
}

/* XCLAIM's minimum idle time for entries read at got_ns: the ms since,
 * at most what Redis counts for one nobody touched since (it set their
 * idle time before it answered). Taken just before the command. */
static void since_ms(uint64_t got_ns, char out[24])
{
    snprintf(out, 24, "%llu", (unsigned long long)((mono_ns() - got_ns) / 1000000u));
}

/* Hands entries that nothing here subscribes to back to the group: each
 * stays pending, its delivery count put back to what it was before this
 * consumer got it (prev[i]; NULL: 0, new entries) and its idle time to
 * min_idle, so that a consumer that subscribes to it claims it at its
 * next look at stuck entries, as if this one had never read it. Only
 * entries nobody touched since this consumer got them (its reply came at
 * got_ns) are taken: Redis set their idle time before answering, so it is
 * at least the time since, while one claimed meanwhile by another
 * consumer (a batch that took longer than min_idle) is idle for less and
 * stays its new owner's, its count as that owner left it. */
static int give_back(breader *rd, redisContext *c, const char **ids, const long long *prev, size_t n, uint64_t got_ns)
{
    bstream *s = rd->s;
    char since[24];
    since_ms(got_ns, since);
    const char **argv = keel__malloc((n + 11) * sizeof *argv);
    bool *sent = keel__calloc(n ? n : 1, sizeof *sent);
    int rc = argv && sent ? 0 : KEEL_ENOMEM;
    for (size_t i = 0; rc == 0 && i < n; i++) {
        if (sent[i])
            continue;
        long long pc = prev ? prev[i] : 0; /* one command for each count */
        char count[24];
        snprintf(count, sizeof count, "%lld", pc);
        int argc = 0;
        argv[argc++] = "XCLAIM", argv[argc++] = s->keys[rd->part], argv[argc++] = s->group;
        argv[argc++] = s->consumer, argv[argc++] = since;
        for (size_t j = i; j < n; j++)
            if (!sent[j] && (prev ? prev[j] : 0) == pc) {
                sent[j] = true;
                argv[argc++] = ids[j];
            }
        argv[argc++] = "IDLE", argv[argc++] = s->idle_s, argv[argc++] = "RETRYCOUNT", argv[argc++] = count;
        argv[argc++] = "JUSTID";
        redisReply *rep = NULL;
        rc = cmd(c, argc, argv, NULL, &rep);
        if (rep)
            freeReplyObject(rep);
    }
    keel__free(argv);
    keel__free(sent);
    return rc;
}

/* Acknowledges entries no live consumer of the group wants (skipped),
 * but only those still where this consumer found them: XCLAIM with a
 * minimum idle time (idle_ms, at least the time since they were read or
 * found stuck) takes only those nobody claimed since, and only those are
 * acknowledged. One claimed meanwhile by a consumer whose registry field
 * read as out of date (it was slow to write it again) stays its own. */
static int skip_ids(breader *rd, redisContext *c, const char *idle_ms, const char **ids, size_t n)
{
    bstream *s = rd->s;
    const char **argv = keel__malloc((n + 6) * sizeof *argv);
    if (!argv)
        return KEEL_ENOMEM;
    int argc = 0;
    argv[argc++] = "XCLAIM", argv[argc++] = s->keys[rd->part], argv[argc++] = s->group;
    argv[argc++] = s->consumer, argv[argc++] = idle_ms;
    for (size_t i = 0; i < n; i++)
        argv[argc++] = ids[i];
    argv[argc++] = "JUSTID"; /* no delivery counted */
    redisReply *rep = NULL, *arep = NULL;
    int rc = cmd(c, argc, argv, NULL, &rep);
    argc = 3; /* XACK key group, the same first three */
    argv[0] = "XACK";
    for (size_t i = 0; rc == 0 && rep->type == REDIS_REPLY_ARRAY && i < rep->elements; i++)
        if (rep->element[i]->type == REDIS_REPLY_STRING)
            argv[argc++] = rep->element[i]->str;
    if (argc > 3 && (rc = cmd(c, argc, argv, NULL, &arep)) == 0 && arep->type == REDIS_REPLY_INTEGER) {
        keel__stripe_add(&keel__bus_counters(s->bus)->acked, (uint64_t)arep->integer);
        keel__stripe_add(&keel__bus_counters(s->bus)->skipped, (uint64_t)arep->integer);
    }
    if (arep)
        freeReplyObject(arep);
    if (rep)
        freeReplyObject(rep);
    keel__free(argv);
    return rc;
}

/* Delivers the entries of a reply array, acknowledges those handled,
 * gives back those that nothing here subscribes to, and records the
 * highest ID seen for drain. Entries marked in `over` (may be NULL) go to
 * the dead-letter stream instead. prev (may be NULL: 0 each) holds each
 * entry's delivery count before this consumer got it, -1 for one no
 * longer its own; got_ns when the entries' reply came. */
static int handle(breader *rd, redisContext *c, const redisReply *entries, const bool *over, const long long *prev,
                  uint64_t got_ns)
{
    bstream *s = rd->s;
    size_t n = entries->elements;
    if (!n)
        return 0;
    const char **argv = keel__malloc((n + 3) * sizeof *argv);
    const char **back = keel__malloc(2 * n * sizeof *back), **skip = back + n;
    long long *bprev = keel__malloc(n * sizeof *bprev);
    const redisReply **bent = keel__malloc(n * sizeof *bent);
    if (!argv || !back || !bprev || !bent) {
        keel__free(argv);
        keel__free(back);
        keel__free(bprev);
        keel__free(bent);
        return KEEL_ENOMEM;
    }
    size_t nback = 0;
    argv[0] = "XACK";
    argv[1] = s->keys[rd->part];
    argv[2] = s->group;
    int nack = 3, rc = 0;
    uint64_t top_ms = 0, top_seq = 0;
    for (size_t i = 0; i < n && rc >= 0 && !stopping(rd); i++) {
        const redisReply *e = entries->element[i];
        if (over && over[i]) { /* count_own() checked its ID */
            if ((rc = bury(rd, c, e->element[0]->str)) != 0)
                break;
            continue;
        }
        rc = deliver(rd, e);
        const char *id = entry_id(e);
        if (rc < 0 || !id)
            continue;
        if (rc == 0)
            argv[nack++] = id;
        if (rc == 2 && (!prev || prev[i] >= 0)) {
            bent[nback] = e;
            back[nback] = id;
            bprev[nback++] = prev ? prev[i] : 0;
        }
        uint64_t ms, seq; /* handled, acknowledged or not: drain goes by it */
        if (parse_id(id, &ms, &seq) && (ms > top_ms || (ms == top_ms && seq > top_seq))) {
            top_ms = ms;
            top_seq = seq;
        }
    }
    /* Decided once the batch is through, with the registry as it is
     * then: those another consumer wants go back, the rest are skipped. */
    size_t nkeep = 0, nskip = 0;
    for (size_t i = 0; i < nback; i++) {
        if (nobody_wants(s, bent[i], back[i], got_ns)) {
            skip[nskip++] = back[i];
        } else {
            back[nkeep] = back[i];
            bprev[nkeep++] = bprev[i];
        }
    }
    int arc = 0;
    if (nack > 3) {
        redisReply *rep = NULL;
        arc = cmd(c, nack, argv, NULL, &rep);
        if (arc == 0)
            keel__stripe_add(&keel__bus_counters(s->bus)->acked, (uint64_t)(nack - 3));
        if (rep)
            freeReplyObject(rep);
    }
    if (arc == 0 && nskip) {
        char since[24];
        since_ms(got_ns, since);
        arc = skip_ids(rd, c, since, skip, nskip);
    }
    if (arc == 0 && nkeep)
        arc = give_back(rd, c, back, bprev, nkeep, got_ns);
    keel__free(argv);
    keel__free(back);
    keel__free(bprev);
    keel__free(bent);
    if (top_ms) {
        pthread_mutex_lock(&rd->mu);
        if (top_ms > rd->done_ms || (top_ms == rd->done_ms && top_seq > rd->done_seq)) {
            rd->done_ms = top_ms;
            rd->done_seq = top_seq;
        }
        pthread_cond_broadcast(&rd->cv);
        pthread_mutex_unlock(&rd->mu);
    }
    return rc < 0 ? rc : arc;
}

/* ---- stuck entries ---- */

/* Moves entry `id` to the dead-letter stream and acknowledges it; one
 * trimmed away meanwhile is only acknowledged. The dead-letter stream may
 * live on another node: when it cannot take the entry, the entry stays
 * pending, to be tried again later, and 0 is returned, as this reader's
 * own connection is fine and must go on reading. */
static int bury(breader *rd, redisContext *c, const char *id)
{
    bstream *s = rd->s;
    const char *key = s->keys[rd->part];
    const char *rargv[] = {"XRANGE", key, id, id};
    redisReply *got = NULL, *rep = NULL;
    bool kept = false;
    int rc = cmd(c, 4, rargv, NULL, &got);
    const redisReply *e = rc == 0 && got->type == REDIS_REPLY_ARRAY && got->elements == 1 ? got->element[0] : NULL;
    const redisReply *f = e && e->type == REDIS_REPLY_ARRAY && e->elements == 2 &&
                                  e->element[1]->type == REDIS_REPLY_ARRAY
                              ? e->element[1]
                              : NULL;
    if (rc == 0 && f) {
        const char *head[] = {"XADD", s->dead, "MAXLEN", "~", s->maxlen, "*", "stream", key, "id", id, "group", s->group};
        enum { H = sizeof head / sizeof head[0] };
        size_t argc = H + f->elements;
        const char **argv = keel__malloc(argc * sizeof *argv);
        size_t *lens = keel__malloc(argc * sizeof *lens);
        if (!argv || !lens) {
            rc = KEEL_ENOMEM;
        } else {
            for (size_t i = 0; i < argc; i++) {
                const redisReply *x = i < H ? NULL : f->element[i - H];
                argv[i] = !x ? head[i] : x->str ? x->str : "";
                lens[i] = !x ? strlen(head[i]) : x->str ? x->len : 0;
            }
            rc = keel_redis_command(s->r, s->dead, strlen(s->dead), (int)argc, argv, lens, &rep);
            if (rep)
                freeReplyObject(rep);
            if ((kept = rc && rc != KEEL_ENOMEM))
                keel__log(KEEL_LOG_WARN, "bus", "%s: entry %s left pending: %s: %s", key, id, s->dead,
                          keel_strerror(rc));
        }
        keel__free(argv);
        keel__free(lens);
    }
    if (rc == 0) {
        const char *aargv[] = {"XACK", key, s->group, id};
        rc = cmd(c, 4, aargv, NULL, &rep);
        if (rep)
            freeReplyObject(rep);
    }
    if (rc == 0 && f) {
        keel__stripe_add(&keel__bus_counters(s->bus)->dead, 1);
        keel_bus_header hdr[64];
        keel_bus_msg v;
        parse_fields(f, id, &v, hdr);
        char xid[KEEL_BUS_ID_MAX];
        if (ext_id(s, rd->part, id, strlen(id), xid))
            v.id = xid;
        if (!v.subject)
            v.subject = "";
        keel__log(KEEL_LOG_WARN, "bus", "%s: entry %s delivered %u times: moved to %s", key, id,
                  s->max_deliveries, s->dead);
        keel__bus_error(s->bus, NULL, &v, KEEL_ELIMIT);
    }
    if (got)
        freeReplyObject(got);
    return kept ? 0 : rc;
}

/* Claims the entries named in argv[5..n-1] that are still idle, and
 * delivers them again; counts[i] is argv[5 + i]'s delivery count before. */
static int claim(breader *rd, redisContext *c, int n, const char **argv, const long long *counts)
{
    redisReply *rep = NULL;
    long long *prev = NULL;
    int rc = cmd(c, n, argv, NULL, &rep);
    uint64_t got_ns = mono_ns();
    if (rc == 0 && rep->type == REDIS_REPLY_ARRAY) {
        uint64_t got = 0; /* nil: deleted while pending */
        for (size_t i = 0; i < rep->elements; i++)
            got += rep->element[i]->type == REDIS_REPLY_ARRAY;
        keel__stripe_add(&keel__bus_counters(rd->s->bus)->claimed, got);
        /* the reply keeps the order of the IDs asked for, skipping some */
        if (!(prev = keel__malloc((rep->elements ? rep->elements : 1) * sizeof *prev)))
            rc = KEEL_ENOMEM;
        for (size_t i = 0, j = 5; rc == 0 && i < rep->elements; i++) {
            const char *id = entry_id(rep->element[i]);
            while (id && (int)j < n && strcmp(argv[j], id) != 0)
                j++;
            prev[i] = id && (int)j < n ? counts[j++ - 5] : -1;
        }
        if (rc == 0)
            rc = handle(rd, c, rep, NULL, prev, got_ns);
    }
    keel__free(prev);
    if (rep)
        freeReplyObject(rep);
    return rc;
}

/* Marks in keep[] which of the n entries named in ids a subscription here
 * matches (1), and which none of the group's live consumers subscribes
 * to (-1: to be skipped); their fields read with XRANGE, in one
 * pipeline: nothing claimed, no delivery counted. */
static int wanted_ids(breader *rd, redisContext *c, const char **ids, size_t n, signed char *keep)
{
    const char *key = rd->s->keys[rd->part];
    uint64_t asked_ns = mono_ns(); /* a registry read after this is after the entries' publish */
    keel__sigpipe sp;
    keel__sigpipe_block(&sp);
    int rc = 0;
    for (size_t i = 0; rc == 0 && i < n; i++) {
        const char *argv[] = {"XRANGE", key, ids[i], ids[i]};
        if (redisAppendCommandArgv(c, 4, argv, NULL) != REDIS_OK)
            rc = keel__redis_ctx_error(c);
    }
    /* every reply is read, whatever the others were: the connection
     * must be left in step */
    bool sent = rc == 0;
    for (size_t i = 0; sent && i < n; i++) {
        redisReply *rep = NULL;
        if (redisGetReply(c, (void **)&rep) != REDIS_OK || !rep) {
            rc = keel__redis_ctx_error(c);
            break;
        }
        int w = 0;
        bool skip = false;
        if (rep->type == REDIS_REPLY_ERROR) {
            keel__log(KEEL_LOG_ERROR, "bus", "XRANGE %s: %s", key, rep->str);
            w = KEEL_EBACKEND;
        } else if (rc == 0) {
            const redisReply *e = rep->type == REDIS_REPLY_ARRAY && rep->elements == 1 ? rep->element[0] : NULL;
            if ((w = wanted(rd->s, e)) == 0) /* so e is an entry with a valid subject */
                skip = nobody_wants(rd->s, e, ids[i], asked_ns);
        }
        if (w < 0 && rc == 0)
            rc = w;
        keep[i] = w > 0 ? 1 : skip ? -1 : 0;
        freeReplyObject(rep);
    }
    keel__sigpipe_restore(&sp, c);
    return rc;
}

/* Goes through the group's entries idle longer than min_idle (XPENDING,
 * page by page): buries those delivered too often, claims the others. */
static int reclaim(breader *rd, redisContext *c)
{
    bstream *s = rd->s;
    const char *key = s->keys[rd->part];
    char from[KEEL_BUS_ID_MAX + 1] = "-";
    const char **cargv = keel__malloc((5 + s->count) * sizeof *cargv);
    const char **skip = keel__malloc(s->count * sizeof *skip);
    long long *counts = keel__malloc(s->count * sizeof *counts);
    signed char *keep = keel__malloc(s->count * sizeof *keep);
    if (!cargv || !skip || !counts || !keep) {
        keel__free(cargv);
        keel__free(skip);
        keel__free(counts);
        keel__free(keep);
        return KEEL_ENOMEM;
    }
    int rc = 0;
    for (bool more = true; rc == 0 && more && !stopping(rd);) {
        const char *pargv[] = {"XPENDING", key, s->group, "IDLE", s->idle_s, from, "+", s->count_s};
        redisReply *rep = NULL;
        rc = cmd(c, 8, pargv, NULL, &rep);
        more = rc == 0 && rep->type == REDIS_REPLY_ARRAY && rep->elements == s->count;
        int n = 5;
        cargv[0] = "XCLAIM", cargv[1] = key, cargv[2] = s->group, cargv[3] = s->consumer, cargv[4] = s->idle_s;
        for (size_t i = 0; rc == 0 && rep->type == REDIS_REPLY_ARRAY && i < rep->elements; i++) {
            const redisReply *p = rep->element[i];
            if (p->type != REDIS_REPLY_ARRAY || p->elements != 4 || p->element[0]->type != REDIS_REPLY_STRING ||
                p->element[3]->type != REDIS_REPLY_INTEGER) {
                more = false;
                break;
            }
            snprintf(from, sizeof from, "(%s", p->element[0]->str); /* the next page starts after it */
            if (p->element[3]->integer >= (long long)s->max_deliveries)
                rc = bury(rd, c, p->element[0]->str);
            else
                counts[n - 5] = p->element[3]->integer, cargv[n++] = p->element[0]->str;
        }
        /* Only what a subscription here matches: another consumer's entry
         * that nothing here takes stays where it is, its count unbumped;
         * one no live consumer of the group wants is skipped. */
        int k = 5;
        size_t ns = 0;
        if (rc == 0 && n > 5 && !stopping(rd) && (rc = wanted_ids(rd, c, cargv + 5, (size_t)(n - 5), keep)) == 0)
            for (int i = 5; i < n; i++) {
                if (keep[i - 5] > 0)
                    counts[k - 5] = counts[i - 5], cargv[k++] = cargv[i];
                else if (keep[i - 5] < 0)
                    skip[ns++] = cargv[i];
            }
        if (rc == 0 && ns) /* only those still stuck: not claimed since XPENDING */
            rc = skip_ids(rd, c, s->idle_s, skip, ns);
        if (rc == 0 && k > 5 && !stopping(rd))
            rc = claim(rd, c, k, cargv, counts);
        if (rep)
            freeReplyObject(rep);
    }
    keel__free(cargv);
    keel__free(skip);
    keel__free(counts);
    keel__free(keep);
    return rc;
}

/* Marks in over[] the entries of a page of the consumer's own pending
 * list that this read delivered more than max_deliveries times. A
 * consumer restarted under its name reads them again, and Redis counts
 * each such read as a delivery: without this check every restart would
 * deliver a poison entry once more. */
static int count_own(breader *rd, redisContext *c, const redisReply *entries, bool *over, long long *prev)
{
    bstream *s = rd->s;
    size_t n = entries->elements;
    const char *id[2] = {entry_id(entries->element[0]), entry_id(entries->element[n - 1])};
    if (!id[0] || !id[1])
        return 0; /* handle() acknowledges such entries unread */
    char count[24];
    snprintf(count, sizeof count, "%zu", n);
    const char *argv[] = {"XPENDING", s->keys[rd->part], s->group, id[0], id[1], count, s->consumer};
    redisReply *rep = NULL;
    int rc = cmd(c, 7, argv, NULL, &rep);
    /* Both lists go up by ID, and the counts name a subset of the entries
     * (others may have claimed some since): match them walking forward. */
    for (size_t i = 0, j = 0; rc == 0 && rep->type == REDIS_REPLY_ARRAY && i < rep->elements; i++) {
        const redisReply *p = rep->element[i];
        if (p->type != REDIS_REPLY_ARRAY || p->elements != 4 || p->element[0]->type != REDIS_REPLY_STRING ||
            p->element[3]->type != REDIS_REPLY_INTEGER)
            break;
        for (const char *eid; j < n; j++)
            if ((eid = entry_id(entries->element[j])) != NULL && strcmp(eid, p->element[0]->str) == 0)
                break;
        if (j < n) {
            prev[j] = p->element[3]->integer - 1; /* this read counted one */
            over[j++] = p->element[3]->integer > (long long)s->max_deliveries;
        }
    }
    if (rep)
        freeReplyObject(rep);
    return rc;
}

/* ---- the reader ---- */

/* The reader's last read was answered: tells drain it can reach Redis. */
static void set_healthy(breader *rd)
{
    pthread_mutex_lock(&rd->mu);
    if (!rd->healthy) {
        rd->healthy = true;
        pthread_cond_broadcast(&rd->cv);
    }
    pthread_mutex_unlock(&rd->mu);
}

/* Reads and delivers until the connection fails or the reader stops. */
static int consume(breader *rd, redisContext *c)
{
    bstream *s = rd->s;
    char cursor[48] = "0"; /* own pending entries, then ">" */
    bool pending = true;
    uint64_t next_reclaim = 0;
    int rc = 0;
    while (rc == 0 && !stopping(rd)) {
        if (reg_due(s) && (rc = reg_put(s)) != 0) {
            /* tried again at the next turn; meanwhile the field lives
             * on, 3 x min_idle from its last writing */
            keel__log(KEEL_LOG_WARN, "bus", "%s: registering %s: %s", s->subs_key, s->consumer,
                      keel_strerror(rc));
            rc = 0;
        }
        if (!pending && mono_ns() >= next_reclaim) {
            /* An error reply here (an ACL, an old server) must not keep
             * the reader from new entries: logged, tried again later.
             * Only a lost connection ends the loop. */
            rc = reclaim(rd, c);
            if (rc == KEEL_EBACKEND) { /* cmd() logged the reply */
                rc = 0;
            } else if (rc) {
                break;
            }
            next_reclaim = mono_ns() + s->min_idle / 2;
        }
        pthread_mutex_lock(&rd->mu);
        uint64_t nr = ++rd->reads;
        pthread_mutex_unlock(&rd->mu);
        const char *argv[] = {"XREADGROUP", "GROUP", s->group, s->consumer, "COUNT", s->count_s,
                              "BLOCK", s->block_s, "STREAMS", s->keys[rd->part], pending ? cursor : ">"};
        redisReply *rep = NULL;
        if (pending) { /* no BLOCK: the pending list answers at once */
            memmove(&argv[6], &argv[8], 3 * sizeof argv[0]);
            rc = cmd(c, 9, argv, NULL, &rep);
        } else {
            set_waiting(rd, true);
            if (stopping(rd)) {
                set_waiting(rd, false);
                break;
            }
            rc = cmd(c, 11, argv, NULL, &rep);
            set_waiting(rd, false);
        }
        if (rc == KEEL_EBACKEND && reply_is(rep, "NOGROUP")) { /* the server lost it: a restart */
            freeReplyObject(rep);
            if ((rc = create_group(s, rd->part, c)) != 0)
                break;
            pending = true;
            snprintf(cursor, sizeof cursor, "0");
            continue;
        }
        uint64_t got_ns = mono_ns();
        if (rc == 0) /* Redis answered: so before handling what it gave, which may take long */
            set_healthy(rd);
        const redisReply *entries = NULL;
        if (rc == 0 && rep->type == REDIS_REPLY_ARRAY && rep->elements == 1 &&
            rep->element[0]->type == REDIS_REPLY_ARRAY && rep->element[0]->elements == 2 &&
            rep->element[0]->element[1]->type == REDIS_REPLY_ARRAY)
            entries = rep->element[0]->element[1];
        if (rc == 0 && entries && entries->elements) {
            const char *last = entry_id(entries->element[entries->elements - 1]);
            if (pending && last)
                snprintf(cursor, sizeof cursor, "%s", last);
            bool *over = pending ? keel__calloc(entries->elements, sizeof *over) : NULL;
            long long *prev = pending ? keel__malloc(entries->elements * sizeof *prev) : NULL;
            if (pending && (!over || !prev))
                rc = KEEL_ENOMEM;
            for (size_t i = 0; rc == 0 && prev && i < entries->elements; i++)
                prev[i] = -1; /* unknown: not given back */
            if (rc == 0 && over && (rc = count_own(rd, c, entries, over, prev)) == KEEL_EBACKEND)
                rc = 0; /* an error reply (an ACL), logged: they go uncounted */
            if (rc == 0)
                rc = handle(rd, c, entries, over, prev, got_ns);
            keel__free(over);
            keel__free(prev);
        } else if (rc == 0 && pending) {
            pending = false;
        } else if (rc == 0) {
            pthread_mutex_lock(&rd->mu);
            rd->empty_read = nr;
            pthread_cond_broadcast(&rd->cv);
            pthread_mutex_unlock(&rd->mu);
        }
        if (rep)
            freeReplyObject(rep);
    }
    return rc;
}

static void set_ctx(breader *rd, redisContext *c)
{
    pthread_mutex_lock(&rd->mu);
    rd->ctx = c;
    if (!c)
        rd->healthy = false;
    pthread_cond_broadcast(&rd->cv);
    pthread_mutex_unlock(&rd->mu);
}

static void *reader_main(void *arg)
{
    breader *rd = arg;
    bstream *s = rd->s;
    keel__bus_set_worker(s->bus);
    keel_backoff bo;
    keel_backoff_opts bopts = {KEEL_BACKOFF_FULL_JITTER, 50000000u, 2000000000u, NULL, NULL};
    keel_backoff_init(&bo, &bopts);
    while (!stopping(rd)) {
        redisContext *c = NULL;
        int rc = keel__redis_connect(rd->node, &c);
        if (rc == 0 && !stopping(rd)) {
            /* the socket waits for a blocking read plus a command's time
             * (saturated: a command timeout of UINT64_MAX must not wrap
             * round to less than the read) */
            redisSetTimeout(c, keel__tv(keel__sat_add(s->r->cmd_timeout, s->block_ns)));
            set_ctx(rd, c);
            set_waiting(rd, true); /* nothing to lose: stop may cut it short */
            rc = stopping(rd) ? KEEL_ESTATE : create_group(s, rd->part, c);
            set_waiting(rd, false);
            if (rc)
                set_ctx(rd, NULL);
        }
        if (rc == 0) {
            keel_backoff_reset(&bo);
            rc = consume(rd, c);
            set_ctx(rd, NULL);
            if (rc && !stopping(rd))
                keel__log(KEEL_LOG_WARN, "bus", "%s: reader: %s; reconnecting", s->keys[rd->part],
                          keel_strerror(rc));
        }
        if (c)
            redisFree(c);
        if (stopping(rd))
            break;
        uint64_t at = mono_ns() + keel_backoff_next(&bo);
        struct timespec ts = {(time_t)(at / 1000000000u), (long)(at % 1000000000u)};
        pthread_mutex_lock(&rd->mu);
        while (!stopping(rd) && pthread_cond_timedwait(&rd->cv, &rd->mu, &ts) == 0)
            ;
        pthread_mutex_unlock(&rd->mu);
    }
    return NULL;
}

/* ---- the transport's lifetime ---- */

int keel__bus_stream_create(keel_bus *bus, const keel_bus_opts *o, bstream **out)
{
    bstream *s = keel__calloc(1, sizeof *s);
    if (!s)
        return KEEL_ENOMEM;
    s->bus = bus;
    s->r = o->redis;
    pthread_mutex_init(&s->start_mu, NULL);
    pthread_mutex_init(&s->pat_mu, NULL);
    pthread_mutex_init(&s->reg_mu, NULL);
    s->parts = o->partitions ? o->partitions : 1;
    s->count = o->read_count ? o->read_count : 100;
    s->min_idle = o->min_idle_ns ? o->min_idle_ns : 30 * 1000000000ull;
    s->max_deliveries = o->max_deliveries ? o->max_deliveries : 5;
    s->block_ns = o->block_ns ? o->block_ns : 200000000u;
    snprintf(s->maxlen, sizeof s->maxlen, "%zu", o->maxlen ? o->maxlen : 1000000);
    snprintf(s->count_s, sizeof s->count_s, "%zu", s->count);
    snprintf(s->block_s, sizeof s->block_s, "%llu",
             (unsigned long long)(s->block_ns / 1000000u ? s->block_ns / 1000000u : 1));
    snprintf(s->idle_s, sizeof s->idle_s, "%llu",
             (unsigned long long)(s->min_idle / 1000000u ? s->min_idle / 1000000u : 1));
    s->prefix = keel__strdup(o->prefix ? o->prefix : "keel:bus:");
    s->consumer = o->consumer ? keel__strdup(o->consumer) : NULL; /* default: at start */
    s->group = o->service ? keel__strdup(o->service) : NULL;
    size_t sklen = s->prefix && s->group ? strlen(s->prefix) + strlen(s->group) + 6 : 0;
    if (sklen && (s->subs_key = keel__malloc(sklen)))
        snprintf(s->subs_key, sklen, "%ssubs:%s", s->prefix, s->group);
    int src = s->group ? keel_redis_script_create(s->r, reg_put_lua, sizeof reg_put_lua - 1, &s->reg_put_lua) : 0;
    if (src == 0 && s->group)
        src = keel_redis_script_create(s->r, reg_get_lua, sizeof reg_get_lua - 1, &s->reg_get_lua);
    if (!s->prefix || (o->consumer && !s->consumer) || (o->service && (!s->group || !s->subs_key)) || src) {
        keel__bus_stream_destroy(s);
        return KEEL_ENOMEM;
    }
    if (strlen(s->prefix) > KEY_MAX - 8) {
        keel__bus_stream_destroy(s);
        return KEEL_EINVAL;
    }
    for (size_t p = 0; p < s->parts; p++)
        snprintf(s->keys[p], KEY_MAX, "%s%zu", s->prefix, p);
    snprintf(s->dead, KEY_MAX, "%sdead", s->prefix);
    *out = s;
    return 0;
}

/* Stops and joins the first n readers. */
static void stop_readers(bstream *s, size_t n)
{
    for (size_t p = 0; p < n; p++) {
        breader *rd = &s->readers[p];
        pthread_mutex_lock(&rd->mu);
        atomic_store(&rd->stop, true);
        if (rd->ctx && rd->waiting) /* else it sees the flag itself, its acknowledgements sent */
            shutdown(rd->ctx->fd, SHUT_RDWR);
        pthread_cond_broadcast(&rd->cv);
        pthread_mutex_unlock(&rd->mu);
    }
    for (size_t p = 0; p < n; p++) {
        pthread_join(s->readers[p].th, NULL);
        pthread_mutex_destroy(&s->readers[p].mu);
        pthread_cond_destroy(&s->readers[p].cv);
    }
    keel__free(s->readers);
    s->readers = NULL;
}

/* Under start_mu for the whole start: two threads starting at once must
 * not both find it unstarted and each start a set of readers. A reader's
 * handler that starts its own bus is told at once, without the lock. */
static int start_locked(bstream *s)
{
    if (!s->group || s->started)
        return KEEL_ESTATE;
    if (!s->consumer) { /* here, not at create: a bus made before fork() */
        char host[256] = "", me[300];
        gethostname(host, sizeof host - 1);
        snprintf(me, sizeof me, "%s-%ld", host[0] ? host : "keel", (long)getpid());
        if (!(s->consumer = keel__strdup(me)))
            return KEEL_ENOMEM;
    }
    for (size_t p = 0; p < s->parts; p++) {
        int rc = create_group(s, p, NULL);
        if (rc)
            return rc;
    }
    /* registered before any reader reads: an entry published from now on
     * is not skipped by another consumer for want of this one */
    int rrc = reg_put(s);
    if (rrc)
        return rrc;
    if (!(s->readers = keel__calloc(s->parts, sizeof *s->readers))) {
        reg_del(s);
        return KEEL_ENOMEM;
    }
    size_t started = 0;
    for (; started < s->parts; started++) {
        breader *rd = &s->readers[started];
        rd->s = s;
        rd->part = started;
        rd->node = &s->r->nodes[keel__redis_route(s->r, s->keys[started], strlen(s->keys[started]))];
        pthread_mutex_init(&rd->mu, NULL);
        pthread_condattr_t ca;
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&rd->cv, &ca);
        pthread_condattr_destroy(&ca);
        if (pthread_create(&rd->th, NULL, reader_main, rd) != 0) {
            pthread_mutex_destroy(&rd->mu);
            pthread_cond_destroy(&rd->cv);
            stop_readers(s, started);
            reg_del(s);
            return KEEL_ENOMEM;
        }
    }
    s->started = true;
    return 0;
}

int keel__bus_stream_start(bstream *s)
{
    if (keel__bus_in_worker(s->bus))
        return KEEL_ESTATE; /* a reader: started already */
    pthread_mutex_lock(&s->start_mu);
    int rc = start_locked(s);
    pthread_mutex_unlock(&s->start_mu);
    return rc;
}

void keel__bus_stream_stop(bstream *s)
{
    if (s->started) {
        stop_readers(s, s->parts);
        reg_del(s);
    }
    s->started = false;
}

void keel__bus_stream_destroy(bstream *s)
{
    pthread_mutex_destroy(&s->start_mu);
    pthread_mutex_destroy(&s->pat_mu);
    pthread_mutex_destroy(&s->reg_mu);
    for (size_t i = 0; i < s->npats; i++)
        keel__free(s->pats[i].p);
    keel__free(s->pats);
    if (s->cache)
        freeReplyObject(s->cache);
    keel_redis_script_free(s->reg_put_lua);
    keel_redis_script_free(s->reg_get_lua);
    keel__free(s->subs_key);
    keel__free(s->prefix);
    keel__free(s->consumer);
    keel__free(s->group);
    keel__free(s);
}

/* ---- publish ---- */

/* The partition of a subject: its stream. */
static size_t part_of(const bstream *s, const char *subject)
{
    return (size_t)(keel__hash64(subject, strlen(subject), 0) % s->parts);
}

int keel__bus_stream_publish(bstream *s, keel_bus_pub *pubs, size_t n)
{
    size_t ncmd = 0, nargs = 0, hbytes = 0;
    for (size_t i = 0; i < n; i++)
        if (pubs[i].rc == 0) {
            ncmd++;
            nargs += 10 + 2 * pubs[i].nheaders;
            for (size_t h = 0; h < pubs[i].nheaders; h++)
                hbytes += strlen(pubs[i].headers[h].key) + 3;
        }
    if (!ncmd)
        return 0;
    keel_redis_cmd *cmds = keel__calloc(ncmd, sizeof *cmds);
    const char **argv = keel__malloc(nargs * sizeof *argv);
    size_t *lens = keel__malloc(nargs * sizeof *lens);
    char *arena = keel__malloc(hbytes + 1);
    if (!cmds || !argv || !lens || !arena) {
        keel__free(cmds);
        keel__free(argv);
        keel__free(lens);
        keel__free(arena);
        for (size_t i = 0; i < n; i++)
            if (pubs[i].rc == 0)
                pubs[i].rc = KEEL_ENOMEM;
        return KEEL_ENOMEM;
    }
    size_t a = 0, c = 0;
    char *h = arena;
    for (size_t i = 0; i < n; i++) {
        keel_bus_pub *p = &pubs[i];
        if (p->rc)
            continue;
        const char *key = s->keys[part_of(s, p->subject)];
        keel_redis_cmd *k = &cmds[c++];
        k->key = key;
        k->keylen = strlen(key);
        k->argv = argv + a;
        k->argvlen = lens + a;
        const char *head[] = {"XADD", key, "MAXLEN", "~", s->maxlen, "*", "s", p->subject, "d"};
        for (size_t j = 0; j < 9; j++) {
            argv[a] = head[j];
            lens[a++] = strlen(head[j]);
        }
        argv[a] = p->len ? p->data : "";
        lens[a++] = p->len;
        for (size_t j = 0; j < p->nheaders; j++) {
            size_t kl = strlen(p->headers[j].key);
            memcpy(h, "h:", 2);
            memcpy(h + 2, p->headers[j].key, kl + 1);
            argv[a] = h;
            lens[a++] = kl + 2;
            h += kl + 3;
            argv[a] = p->headers[j].value;
            lens[a++] = strlen(p->headers[j].value);
        }
        k->argc = (int)(a - (size_t)(k->argv - argv));
    }
    int prc = keel_redis_pipeline(s->r, cmds, ncmd);
    c = 0;
    uint64_t ok = 0;
    for (size_t i = 0; i < n; i++) {
        keel_bus_pub *p = &pubs[i];
        if (p->rc)
            continue;
        keel_redis_cmd *k = &cmds[c++];
        p->rc = k->rc;
        if (k->rc == 0 && k->reply && k->reply->type == REDIS_REPLY_STRING &&
            ext_id(s, part_of(s, p->subject), k->reply->str, k->reply->len, p->id)) {
            ok++;
        } else if (k->rc == 0) { /* no reply: the pipeline failed before it got there */
            p->rc = k->reply ? KEEL_EPROTO : prc ? prc : KEEL_EPROTO;
        }
        if (k->reply)
            freeReplyObject(k->reply);
    }
    keel__stripe_add(&keel__bus_counters(s->bus)->published, ok);
    keel__free(cmds);
    keel__free(argv);
    keel__free(lens);
    keel__free(arena);
    return 0;
}

/* ---- drain ---- */

/* Waits until each reader has handled its stream's last entry as of the
 * call, or found no new entry in a read begun after the call. */
int keel__bus_stream_drain(bstream *s)
{
    pthread_mutex_lock(&s->start_mu);
    bool started = s->started; /* then readers stay until destroy */
    pthread_mutex_unlock(&s->start_mu);
    if (!started)
        return 0;
    for (size_t p = 0; p < s->parts; p++) {
        breader *rd = &s->readers[p];
        pthread_mutex_lock(&rd->mu);
        uint64_t after = rd->reads;
        pthread_mutex_unlock(&rd->mu);
        const char *argv[] = {"XREVRANGE", s->keys[p], "+", "-", "COUNT", "1"};
        redisReply *rep = NULL;
        int rc = pooled(s, s->keys[p], 6, argv, &rep);
        uint64_t ms = 0, seq = 0;
        if (rc == 0 && rep->type == REDIS_REPLY_ARRAY && rep->elements == 1 &&
            rep->element[0]->type == REDIS_REPLY_ARRAY && rep->element[0]->elements == 2 &&
            rep->element[0]->element[0]->type == REDIS_REPLY_STRING)
            parse_id(rep->element[0]->element[0]->str, &ms, &seq);
        if (rep)
            freeReplyObject(rep);
        if (rc)
            return rc;
        /* A reader that cannot read gets a reconnect's time (counted from
         * when drain first finds it so), then drain reports it. */
        uint64_t down_until = 0;
        pthread_mutex_lock(&rd->mu);
        while (rc == 0 && rd->empty_read <= after &&
               (rd->done_ms < ms || (rd->done_ms == ms && rd->done_seq < seq))) {
            if (rd->healthy) {
                down_until = 0;
                pthread_cond_wait(&rd->cv, &rd->mu);
                continue;
            }
            if (!down_until)
                down_until = keel__sat_add(keel__sat_add(mono_ns(), s->r->connect_timeout),
                                           keel__sat_add(s->r->cmd_timeout, s->block_ns));
            struct timespec ts = {(time_t)(down_until / 1000000000u), (long)(down_until % 1000000000u)};
            if (pthread_cond_timedwait(&rd->cv, &rd->mu, &ts) != 0 && !rd->healthy)
                rc = KEEL_EUNAVAIL;
        }
        pthread_mutex_unlock(&rd->mu);
        if (rc)
            return rc;
    }
    return 0;
}
