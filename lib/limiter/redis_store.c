/* lib/limiter/redis_store.c — keel_limiter's Redis store: one Lua script
 * per algorithm, run by EVALSHA, atomic, with the Redis server's TIME.
 *
 * Keys are prefix algo ":" policy ":{" key "}" (and, for the log, the
 * same with ":s" for its sum and totals; see policy_prefix()), the key
 * percent-encoded so that the hash tag is the whole of it (build_key()):
 * both keys of one limiter key share a node, and distinct keys spread.
 * Time is in microseconds (what TIME gives); Lua numbers are doubles,
 * exact below 2^53, which keel_limiter_create checks the policy stays
 * under. Numbers that Redis stores are formatted with string.format,
 * never with Lua's default 14 digits.
 *
 * Every script answers {allowed, remaining, reset_us, retry_us (-1:
 * never), now_us}, and writes nothing for a rejected request.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <keel/redis.h>

#include "../hash.h"
#include "limiter_int.h"

/* ARGV: op ("take", "peek", "refund"), cost, limit, window_us, burst. */
#define LUA_HEAD                                                                                   \
    "local op, cost, limit, w, burst = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]),"            \
    " tonumber(ARGV[4]), tonumber(ARGV[5])\n"                                                      \
    "local t = redis.call('TIME')\n"                                                               \
    "local now = tonumber(t[1]) * 1000000 + tonumber(t[2])\n"                                      \
    "local allowed, retry = 1, 0\n"

/* Each write keeps the key's time (field b, an exact integer) and how far
 * its arrival time runs ahead of it (field t), and a decision works on that
 * lead alone: the doubles compared stay within the burst's time, with ample
 * precision however long the key lives. Absolute microseconds near 2^51
 * are resolved only to 0.25 us, and times kept from a key's first use lose
 * as much once a client has kept it busy for days. */
static const char LUA_GCRA[] = LUA_HEAD
    "local T = w / limit\n"
    "local cap = burst * T\n"
    /* the doubles' rounding forgiven: a few thousand of their steps at the
     * burst's time, at least 1e-6 us, and always under half a unit */
    "local eps = math.min(math.max(1e-6, cap / 1099511627776), T / 2)\n"
    /* a lead not written by this policy (keys name their policy, so only
     * by hand) may pass the bound keel_limiter_create sets: its times are
     * capped at 2^62, which an integer reply holds and parse() saturates */
    "local big = 4611686018427387904\n"
    "local s = redis.call('HMGET', KEYS[1], 'b', 't')\n"
    "local d = 0\n"
    "if s[1] then d = math.max((tonumber(s[2]) or 0) - (now - tonumber(s[1])), 0) end\n"
    "if op == 'refund' then\n"
    "  d = math.max(d - cost * T, 0)\n"
    "else\n"
    "  local nxt = d + cost * T\n"
    "  if nxt > cap + eps then\n"
    "    allowed = 0\n"
    "    if cost > burst then retry = -1 else retry = math.min(math.max(math.ceil(nxt - cap - eps), 1), big) end\n"
    "  elseif op == 'take' then\n"
    "    d = nxt\n"
    "  end\n"
    "end\n"
    "if op ~= 'peek' and allowed == 1 then\n"
    "  if d > 0 then\n"
    "    redis.call('HSET', KEYS[1], 'b', string.format('%.0f', now), 't', string.format('%.17g', d))\n"
    "    redis.call('PEXPIRE', KEYS[1], string.format('%.0f', math.ceil(d / 1000) + 1))\n"
    "  else\n"
    "    redis.call('DEL', KEYS[1])\n"
    "  end\n"
    "end\n"
    /* the most units that would pass now, by the decision's own test */
    "local rem = math.max(math.floor((cap + eps - d) / T), 0)\n"
    "if rem > 0 and d + rem * T > cap + eps then rem = rem - 1 end\n"
    "if d + (rem + 1) * T <= cap + eps then rem = rem + 1 end\n"
    "return {allowed, rem, math.min(math.max(math.ceil(d - eps), 0), big), retry, now}\n";

static const char LUA_WINDOW[] = LUA_HEAD
    "local k = math.floor(now / w)\n"
    "local f = now - k * w\n"
    "local s = redis.call('HMGET', KEYS[1], 'k', 'p', 'c')\n"
    "local sk, p, c = tonumber(s[1]), tonumber(s[2]) or 0, tonumber(s[3]) or 0\n"
    "if sk == nil then p, c = 0, 0\n"
    "elseif sk > k then k, f = sk, 0\n"
    "elseif sk == k - 1 then p, c = c, 0\n"
    "elseif sk ~= k then p, c = 0, 0 end\n"
    "if op == 'refund' then\n"
    "  c = math.max(c - cost, 0)\n"
    "elseif p * (w - f) + (c + cost) * w > limit * w then\n"
    "  allowed = 0\n"
    "  if cost > limit then retry = -1\n"
    "  elseif c + cost <= limit then retry = w - math.floor((limit - c - cost) * w / p) - f\n"
    "  else\n"
    "    local g = 0\n"
    "    if c > 0 then\n"
    "      local x = math.floor((limit - cost) * w / c)\n"
    "      if x < w then g = w - x end\n"
    "    end\n"
    "    retry = (w - f) + g\n"
    "  end\n"
    "elseif op == 'take' then\n"
    "  c = c + cost\n"
    "end\n"
    /* no counts is a fresh key's state: a refund stores no empty key;
     * the counts weigh until window k + 1 ends, which is the deadline
     * (not 2 windows from now: k may be ahead of a clock stepped back) */
    "if op ~= 'peek' and allowed == 1 then\n"
    "  if p == 0 and c == 0 then\n"
    "    redis.call('DEL', KEYS[1])\n"
    "  else\n"
    "    redis.call('HSET', KEYS[1], 'k', string.format('%.0f', k), 'p', string.format('%.0f', p),"
    " 'c', string.format('%.0f', c))\n"
    "    redis.call('PEXPIREAT', KEYS[1], string.format('%.0f', math.ceil((k + 2) * w / 1000) + 1))\n"
    "  end\n"
    "end\n"
    "local used, rem, reset = p * (w - f) + c * w, 0, 0\n"
    "if used < limit * w then rem = math.floor((limit * w - used) / w) end\n"
    "if c > 0 then reset = 2 * w - f elseif p > 0 then reset = w - f end\n"
    "return {allowed, rem, reset, retry, now}\n";

/* One member per admission, named "total:units": total, the running sum
 * of units admitted through it (16 digits, zero-padded, so that members
 * of one instant sort in order), is unique, so requests in the same
 * microsecond all count, and lets a rejection find the entries it waits
 * for by bisection. KEYS[2] holds the total through the newest entry
 * ('tot') and the units in the log ('sum'). A take costs O(log n), as a
 * rejection does, plus the entries that expired since the last call
 * (removed by Redis, not read). An entry's score is never below the
 * newest's (a clock stepped back joins it), so the totals rise with the
 * ranks. */
static const char LUA_LOG[] = LUA_HEAD
    "local function total(m) return tonumber(string.match(m, '^(%d+):')) end\n"
    "local function member(c, u) return string.format('%016.0f', c) .. ':' .. string.format('%.0f', u) end\n"
    /* both keys live a window past their newest entry (or now, if later;
     * an entry ahead of now was written before the clock stepped back):
     * together, since the sum must never outlive the entries it counts,
     * nor they it; at one deadline, as two PEXPIREs each read the clock
     * and a millisecond may tick between them */
    "local function keep(t)\n"
    "  local at = string.format('%.0f', math.floor(t / 1000) + math.ceil(w / 1000) + 1)\n"
    "  redis.call('PEXPIREAT', KEYS[1], at)\n"
    "  redis.call('PEXPIREAT', KEYS[2], at)\n"
    "end\n"
    "local h = redis.call('HMGET', KEYS[2], 'tot', 'sum')\n"
    "local tot, n, wrote = tonumber(h[1] or '0'), tonumber(h[2] or '0'), false\n"
    "local edge = string.format('%.0f', now - w)\n"
    "local gone = redis.call('ZREVRANGEBYSCORE', KEYS[1], edge, '-inf', 'LIMIT', 0, 1)\n"
    "if #gone > 0 then\n"
    "  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', edge)\n"
    "  n = tot - total(gone[1])\n"
    "  redis.call('HSET', KEYS[2], 'sum', string.format('%.0f', n))\n"
    "end\n"
    "if op == 'refund' then\n"
    "  local left = math.min(cost, n)\n"
    "  if left > 0 then\n"
    "    n, tot = n - left, tot - left\n"
    "    while left > 0 do\n"
    "      local e = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')\n"
    "      local c, u = string.match(e[1], '^(%d+):(%d+)$')\n"
    "      c, u = tonumber(c), tonumber(u)\n"
    "      redis.call('ZREM', KEYS[1], e[1])\n"
    "      if u > left then\n"
    "        redis.call('ZADD', KEYS[1], e[2], member(c - left, u - left))\n"
    "        u = left\n"
    "      end\n"
    "      left = left - u\n"
    "    end\n"
    "    redis.call('HSET', KEYS[2], 'sum', string.format('%.0f', n), 'tot', string.format('%.0f', tot))\n"
    /* the ZREM of a last member deletes the set and the ZADD makes a new
     * one, without expiry */
    "    wrote = true\n"
    "  end\n"
    "elseif n + cost > limit then\n"
    "  allowed = 0\n"
    "  if cost > limit then retry = -1\n"
    "  else\n"
    /* the oldest entry whose total reaches tot + cost - limit: once it
     * and those before it expire, the request fits */
    "    local want, lo, hi = tot + cost - limit, 0, redis.call('ZCARD', KEYS[1]) - 1\n"
    "    while lo < hi do\n"
    "      local mid = math.floor((lo + hi) / 2)\n"
    "      if total(redis.call('ZRANGE', KEYS[1], mid, mid)[1]) >= want then hi = mid else lo = mid + 1 end\n"
    "    end\n"
    "    local e = redis.call('ZRANGE', KEYS[1], lo, lo, 'WITHSCORES')\n"
    "    if e[2] then retry = tonumber(e[2]) + w - now else retry = w end\n"
    "  end\n"
    "elseif op == 'take' then\n"
    /* totals stay exact in doubles: past 2^52, numbered again from the
     * oldest entry's (rare: at least 2^20 admissions apart) */
    "  if tot + cost > 4503599627370496 then\n"
    "    local base, all = tot - n, redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')\n"
    "    redis.call('DEL', KEYS[1])\n"
    "    for k = 1, #all, 2 do\n"
    "      local c, u = string.match(all[k], '^(%d+):(%d+)$')\n"
    "      redis.call('ZADD', KEYS[1], all[k + 1], member(tonumber(c) - base, tonumber(u)))\n"
    "    end\n"
    "    tot = n\n"
    "  end\n"
    "  local at, e = now, redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')\n"
    "  if e[2] and tonumber(e[2]) > now then at = tonumber(e[2]) end\n"
    "  tot, n = tot + cost, n + cost\n"
    "  redis.call('ZADD', KEYS[1], string.format('%.0f', at), member(tot, cost))\n"
    "  redis.call('HSET', KEYS[2], 'sum', string.format('%.0f', n), 'tot', string.format('%.0f', tot))\n"
    "  wrote = true\n"
    "end\n"
    "local reset, newest = 0, now\n"
    "if n > 0 then\n"
    "  local e = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')\n"
    "  reset, newest = tonumber(e[2]) + w - now, math.max(now, tonumber(e[2]))\n"
    "end\n"
    /* last: a script that ran past the deadline (a long trim, a busy
     * machine) has Redis drop both keys here, at once; their entries have
     * all expired by then, but nothing may read them after */
    "if wrote then keep(newest) end\n"
    "return {allowed, limit - n, reset, retry, now}\n";

struct rstore {
    lcfg cfg;
    keel_redis *r;
    keel_redis_script *script;
    char *prefix;
    size_t plen;
    int nkeys;
    char limit_s[24], window_s[24], burst_s[24];
};

/* prefix, the algorithm and the policy's hash: limiters of distinct
 * policies on one Redis never read each other's records (another
 * algorithm's is another type, or fields that mean something else), while
 * every instance of one policy, in any process, shares them. */
static char *policy_prefix(const lcfg *cfg, const char *prefix, const char *name)
{
    static const char *const algos[] = {"log", "window", "gcra"};
    char text[128];
    int n = snprintf(text, sizeof text, "%llu %llu %llu %s", (unsigned long long)cfg->limit,
                     (unsigned long long)cfg->window, (unsigned long long)cfg->burst, name);
    uint64_t h = keel__hash64(text, (size_t)n, 0);
    size_t size = strlen(prefix) + 32;
    char *p = keel__malloc(size);
    if (p)
        snprintf(p, size, "%s%s:%08llx:", prefix, algos[cfg->algo], (unsigned long long)(h >> 32));
    return p;
}

int keel__rstore_create(rstore **out, const lcfg *cfg, keel_redis *redis, const char *prefix, const char *name)
{
    rstore *s = keel__calloc(1, sizeof *s);
    if (!s || !(s->prefix = policy_prefix(cfg, prefix, name))) {
        keel__free(s);
        return KEEL_ENOMEM;
    }
    s->cfg = *cfg;
    s->r = redis;
    s->plen = strlen(s->prefix);
    s->nkeys = cfg->algo == KEEL_LIMIT_SLIDING_LOG ? 2 : 1;
    snprintf(s->limit_s, sizeof s->limit_s, "%llu", (unsigned long long)cfg->limit);
    /* whole microseconds, rounded up: an entry counts at least a window,
     * as limiter.h promises (truncated, 999 ns short) */
    snprintf(s->window_s, sizeof s->window_s, "%llu", (unsigned long long)((cfg->window + 999) / 1000));
    snprintf(s->burst_s, sizeof s->burst_s, "%llu", (unsigned long long)cfg->burst);
    const char *lua = cfg->algo == KEEL_LIMIT_GCRA              ? LUA_GCRA
                      : cfg->algo == KEEL_LIMIT_SLIDING_WINDOW ? LUA_WINDOW
                                                               : LUA_LOG;
    int rc = keel_redis_script_create(redis, lua, strlen(lua), &s->script);
    if (rc) {
        keel__rstore_destroy(s);
        return rc;
    }
    *out = s;
    return 0;
}

void keel__rstore_destroy(rstore *s)
{
    if (s) {
        keel_redis_script_free(s->script);
        keel__free(s->prefix);
        keel__free(s);
    }
}

/* The most bytes a key takes in a Redis name: '%' and '}' become 3. */
#define ENC_MAX(len) (3 * (len))

/* prefix "{" key "}" [":s"] into buf (s->plen + ENC_MAX(len) + 4 bytes);
 * returns its length. '}' would end the hash tag within the key (every
 * key that begins with one had the tag "#", on one node), so the key is
 * percent-encoded: '%' as "%25", '}' as "%7D", nothing else; the tag is
 * the whole key, never empty, and distinct keys keep distinct names. */
static size_t build_key(const rstore *s, const void *key, size_t len, bool seq, char *buf)
{
    char *p = buf;
    const unsigned char *k = key;
    memcpy(p, s->prefix, s->plen);
    p += s->plen;
    *p++ = '{';
    for (size_t i = 0; i < len; i++) {
        if (k[i] == '%' || k[i] == '}') {
            *p++ = '%';
            *p++ = k[i] == '%' ? '2' : '7';
            *p++ = k[i] == '%' ? '5' : 'D';
        } else {
            *p++ = (char)k[i];
        }
    }
    *p++ = '}';
    if (seq) {
        *p++ = ':';
        *p++ = 's';
    }
    return (size_t)(p - buf);
}

/* Microseconds from a script into nanoseconds, saturated as the
 * in-process store's times are. */
static uint64_t us_to_ns(long long us)
{
    if (us <= 0)
        return 0;
    return keel__sat_mul((uint64_t)us, 1000u);
}

/* The script's answer into a result. */
static int parse(const rstore *s, const redisReply *rep, uint64_t cost, keel_limit_result *r)
{
    if (!rep || rep->type != REDIS_REPLY_ARRAY || rep->elements != 5)
        return KEEL_EPROTO;
    for (size_t i = 0; i < 5; i++)
        if (rep->element[i]->type != REDIS_REPLY_INTEGER)
            return KEEL_EPROTO;
    long long v[5];
    for (size_t i = 0; i < 5; i++)
        v[i] = rep->element[i]->integer;
    memset(r, 0, sizeof *r);
    r->allowed = v[0] == 1;
    r->source = KEEL_LIMIT_SRC_REDIS;
    r->limit = s->cfg.algo == KEEL_LIMIT_GCRA ? s->cfg.burst : s->cfg.limit;
    r->remaining = v[1] > 0 ? (uint64_t)v[1] : 0;
    r->reset_ns = us_to_ns(v[2]);
    r->retry_after_ns = r->allowed ? 0 : v[3] < 0 ? UINT64_MAX : us_to_ns(v[3]);
    r->now_ns = us_to_ns(v[4]);
    return cost > r->limit && !r->allowed ? KEEL_ERANGE : 0;
}

static bool error_is(int rc, const redisReply *rep, const char *prefix)
{
    return rc == KEEL_EBACKEND && rep && rep->type == REDIS_REPLY_ERROR &&
           strncmp(rep->str, prefix, strlen(prefix)) == 0;
}

/* Whether an error reply says the key holds another type: in Redis 7's
 * form, or inside Redis 6's wrap of an error a script's command met ("ERR
 * Error running script (...): @user_script: 47: -WRONGTYPE ..."). */
static bool wrong_type(const redisReply *rep)
{
    const char *code = rep->str;
    static const char wrap[] = "ERR Error running script";
    if (strncmp(code, wrap, sizeof wrap - 1) == 0) {
        const char *inner = strstr(code, ": -");
        if (!inner)
            return false; /* a Lua error: no code of Redis's */
        code = inner + 3;
    }
    return strncmp(code, "WRONGTYPE", 9) == 0 && (code[9] == ' ' || code[9] == '\0');
}

/* A key of another type refuses every request there, whatever the
 * server's health: that is an answer (KEEL_EBACKEND, a rejection). Any
 * other error reply (BUSY, LOADING, OOM, MISCONF, NOPERM, "ERR max number
 * of clients reached", a Lua error on a record we cannot read...) says
 * the server cannot serve this request now, which the policy is for. */
bool keel__rstore_failure(int rc, const redisReply *rep)
{
    if (rc == KEEL_EBACKEND)
        return !(rep && rep->type == REDIS_REPLY_ERROR && rep->str && wrong_type(rep));
    return rc == KEEL_EUNAVAIL || rc == KEEL_ETIMEDOUT || rc == KEEL_EPROTO || rc == KEEL_ENOMEM;
}

/* Requests a server refused with NOSCRIPT (a restart, SCRIPT FLUSH): the
 * first of them runs with EVAL, which loads the script on its node, and
 * the others go again in one pipeline, in order; repeated while some
 * remain (another node that lost it too). Each turn ends at least one
 * (EVAL never says NOSCRIPT). Without memory for a turn's pipeline, they
 * go one at a time. */
static void reload(rstore *s, keel_redis_cmd *cmds, size_t n)
{
    for (;;) {
        size_t first = n, left = 0;
        for (size_t i = 0; i < n; i++)
            if (error_is(cmds[i].rc, cmds[i].reply, "NOSCRIPT")) {
                first = first == n ? i : first;
                left++;
            }
        if (first == n)
            return;
        keel_redis_cmd *c = &cmds[first];
        int k = s->nkeys;
        const void *keys[2] = {c->argv[3], k == 2 ? c->argv[4] : NULL};
        size_t keylens[2] = {c->argvlen[3], k == 2 ? c->argvlen[4] : 0};
        freeReplyObject(c->reply);
        c->reply = NULL;
        c->rc = keel_redis_eval(s->r, s->script, (size_t)k, keys, keylens, 5, c->argv + 3 + k, c->argvlen + 3 + k,
                                NULL, 0, &c->reply);
        if (--left == 0)
            continue;
        keel_redis_cmd *again = keel__malloc(left * sizeof *again);
        size_t *at = keel__malloc(left * sizeof *at);
        size_t m = 0;
        for (size_t i = first + 1; again && at && i < n; i++)
            if (error_is(cmds[i].rc, cmds[i].reply, "NOSCRIPT")) {
                freeReplyObject(cmds[i].reply);
                again[m] = cmds[i];
                again[m].reply = NULL;
                at[m++] = i;
            }
        if (m) {
            keel_redis_pipeline(s->r, again, m);
            for (size_t j = 0; j < m; j++) {
                cmds[at[j]].rc = again[j].rc;
                cmds[at[j]].reply = again[j].reply;
            }
        }
        keel__free(again);
        keel__free(at);
    }
}

void keel__rstore_decide(rstore *s, keel_limit_req *reqs, size_t n, lop op)
{
    static const char *const ops[] = {"take", "peek", "refund"};
    enum { ARGS = 10 };
    /* one allocation: commands, argument vectors, then each request's two
     * keys and its cost as text, sized by its key */
    size_t fixed = sizeof(keel_redis_cmd) + ARGS * (sizeof(char *) + sizeof(size_t)), text_len = 0;
    for (size_t i = 0; i < n; i++)
        text_len += 2 * (s->plen + ENC_MAX(reqs[i].len) + 8) + 24; /* keys are <= 4096 bytes: no overflow */
    size_t total;
    char *mem = keel__mul_ok(n, fixed, &total) && total <= SIZE_MAX - text_len
                    ? keel__malloc(total + text_len)
                    : NULL;
    if (!mem) {
        for (size_t i = 0; i < n; i++)
            reqs[i].rc = KEEL_ENOMEM;
        return;
    }
    keel_redis_cmd *cmds = (keel_redis_cmd *)mem;
    const char **argv = (const char **)(cmds + n);
    size_t *lens = (size_t *)(argv + n * ARGS);
    char *text = (char *)(lens + n * ARGS);
    for (size_t i = 0; i < n; i++) {
        keel_limit_req *q = &reqs[i];
        const char **a = argv + i * ARGS;
        size_t *l = lens + i * ARGS;
        char *k1 = text, *k2 = k1 + s->plen + ENC_MAX(q->len) + 8, *cost = k2 + s->plen + ENC_MAX(q->len) + 8;
        text = cost + 24;
        int c = 0;
        a[c] = "EVALSHA", l[c++] = 7;
        a[c] = keel_redis_script_sha(s->script), l[c++] = 40;
        a[c] = s->nkeys == 2 ? "2" : "1", l[c++] = 1;
        a[c] = k1, l[c++] = build_key(s, q->key, q->len, false, k1);
        if (s->nkeys == 2)
            a[c] = k2, l[c++] = build_key(s, q->key, q->len, true, k2);
        a[c] = ops[op], l[c++] = strlen(ops[op]);
        l[c] = (size_t)snprintf(cost, 24, "%llu", (unsigned long long)q->cost), a[c++] = cost;
        a[c] = s->limit_s, l[c++] = strlen(s->limit_s);
        a[c] = s->window_s, l[c++] = strlen(s->window_s);
        a[c] = s->burst_s, l[c++] = strlen(s->burst_s);
        cmds[i] = (keel_redis_cmd){.key = k1, .keylen = l[3], .argc = c, .argv = a, .argvlen = l};
    }
    keel_redis_pipeline(s->r, cmds, n);
    reload(s, cmds, n);
    for (size_t i = 0; i < n; i++) {
        keel_limit_req *q = &reqs[i];
        redisReply *rep = cmds[i].reply;
        int rc = cmds[i].rc;
        if (rc == KEEL_EBACKEND && keel__rstore_failure(rc, rep))
            rc = KEEL_EUNAVAIL;
        q->rc = rc ? rc : parse(s, rep, q->cost, &q->result);
        if (q->rc == KEEL_EBACKEND) { /* another type: a rejection, and the text logged */
            keel__log(KEEL_LOG_ERROR, "limiter", "redis refused the script: %s",
                      rep && rep->type == REDIS_REPLY_ERROR ? rep->str : "?");
            memset(&q->result, 0, sizeof q->result);
            q->result.source = KEEL_LIMIT_SRC_REDIS;
            q->result.limit = s->cfg.algo == KEEL_LIMIT_GCRA ? s->cfg.burst : s->cfg.limit;
            /* the state is unknown: a window to wait, as fail-closed */
            q->result.retry_after_ns = q->result.reset_ns = s->cfg.window;
        }
        if (rep)
            freeReplyObject(rep);
    }
    keel__free(mem);
}

const char *keel__rstore_sha(const rstore *s)
{
    return keel_redis_script_sha(s->script);
}

int keel__rstore_reset(rstore *s, const void *key, size_t len)
{
    size_t keymax = s->plen + ENC_MAX(LIM_MAX_KEY) + 8;
    char *buf = keel__malloc(2 * keymax);
    if (!buf)
        return KEEL_ENOMEM;
    const char *argv[3] = {"DEL", buf, buf + keymax};
    size_t lens[3] = {3, build_key(s, key, len, false, buf), build_key(s, key, len, true, buf + keymax)};
    const void *keys[2] = {argv[1], argv[2]};
    size_t keylens[2] = {lens[1], lens[2]};
    redisReply *rep;
    int rc = keel_redis_command_keys(s->r, keys, keylens, 2, 3, argv, lens, &rep);
    if (rep)
        freeReplyObject(rep);
    keel__free(buf);
    return rc;
}
