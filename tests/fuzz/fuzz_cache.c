/* tests/fuzz/fuzz_cache.c — keel_cache's L1 (no Redis, no PostgreSQL)
 * under a sequence of sets, gets, deletes, tag and prefix invalidations
 * and clock steps, on a fake clock, against a model of its entries.
 *
 * Input: four bytes of options, then operations [op][args...], cut short
 * at the end of the input.
 *   [0] bits 0-1 max_key (0 = default 1024, 8, 3, 1024); bits 2-3
 *       max_value (0 = default 1 MiB, 16, 300, 4096); bit 4 eviction mode
 *       (l1_max_bytes 64 KiB, l1_max_items 32: one entry a shard); bits
 *       5-7 from 4 on, one bad option: max_key 1025, max_value 512 MiB + 1,
 *       l1_max_bytes 64 KiB - 1, xfetch_beta -1.
 *   [1] l1_max_ttl_ns: 0 when a multiple of 4, else that many ms.
 *   [2] default_ttl_ns: 0 (one hour) or that many times 10 ms.
 *   [3] the clock's start, in seconds.
 * op % 8: 0, 1 set [key][value][ttl][tags][tag indexes]; 2 get [key][cap];
 * 3 del [key]; 4 invalidate_tag [tag]; 5 invalidate_prefix [key][length];
 * 6 clock step [step]; 7 get_many [key][key][key][cap].
 *   key: low nibble 0-7 fixed keys ("a", "ab", "abc", "b", "b\0c",
 *     "user:1", "user:2", "\xff"), 8 max_key bytes, 9 max_key + 1 bytes,
 *     10 empty, 11 NULL, 12-15 the next (high nibble + 1) input bytes.
 *   value: top two bits 0: (low 6 bits) bytes; 1: max_value bytes (63
 *     for the default's 1 MiB); 2: max_value + 1; 3: NULL, of length 0
 *     (odd) or 5.
 *   ttl: 0 the default; else top two bits: low 6 bits of ns, ms, s, or
 *     UINT64_MAX minus them.
 *   tags: bits 0-1 how many, bit 6 NULL array, bit 7 seventeen tags; the
 *     indexes byte gives three 3-bit indexes into "t1", "t2", "users", 200
 *     T's (good) and "x\x1fy", "", 201 T's, NULL (bad).
 *   cap: bits 0-1 0 (buf NULL), the value's length - 1, its length, 64
 *     more; bits 2-4 = 1: buf NULL with cap 5; = 2: len NULL.
 *   step: top two bits: low 6 bits of ns, ms, s; 3: to an entry's expiry
 *     (bit 5: exactly it, else 1 ns before).
 *
 * Checks: create refuses exactly the bad options; every call refuses
 * exactly the arguments cache.h calls bad with KEEL_EINVAL; a get finds
 * the exact bytes last set for the key while the injected clock is before
 * its expiry (exact: an injected clock is read as it is, no coarse tick)
 * and no tag of it was invalidated, and nothing otherwise; KEEL_ERANGE
 * with the length needed for a buffer too small; nothing is written past
 * cap. In eviction mode a live entry may also be missing (evicted, or too
 * large for a shard), but a get never returns another value.
 */
#include <keel/cache.h>

#include "fuzz.h"

#define MS 1000000ull
#define SECOND_NS 1000000000ull
#define MIB ((size_t)1 << 20)
#define MAX_ENTRIES 256 /* distinct keys modelled; sets past them are skipped */
#define CANARY 16

typedef struct entry {
    uint8_t *key, *val;
    size_t klen, vlen;
    uint64_t expires;
    size_t ntags;
    uint8_t tag[16];
    uint64_t version[16];
} entry;

typedef struct state {
    const uint8_t *d;
    size_t size, i;
    uint64_t now;
    keel_cache *c;
    size_t max_key, max_value;
    uint64_t max_ttl, default_ttl;
    bool evicting;
    entry e[MAX_ENTRIES];
    size_t n;
    uint64_t tag_version[8];
    uint8_t counter;
    uint8_t *kbuf; /* max_key + 1 'k's */
} state;

static uint8_t vbuf[MIB + 1]; /* values, up to the largest max_value + 1 */

typedef struct key {
    const uint8_t *p;
    size_t len;
} key;

static uint64_t fake_clock(void *ud)
{
    return ((const state *)ud)->now;
}

static bool next(state *st, uint8_t *b)
{
    if (st->i >= st->size)
        return false;
    *b = st->d[st->i++];
    return true;
}

/* The key a selector byte names; false when the input ends first. */
static bool key_of(state *st, uint8_t sel, key *k)
{
    static const char *const fixed[] = {"a", "ab", "abc", "b", "b\0c", "user:1", "user:2", "\xff"};
    static const size_t fixed_len[] = {1, 2, 3, 1, 3, 6, 6, 1};
    unsigned i = sel & 15;
    if (i < 8)
        *k = (key){(const uint8_t *)fixed[i], fixed_len[i]};
    else if (i == 8 || i == 9)
        *k = (key){st->kbuf, st->max_key + (i == 9)};
    else if (i == 10)
        *k = (key){(const uint8_t *)"", 0};
    else if (i == 11)
        *k = (key){NULL, 3};
    else {
        size_t len = (size_t)(sel >> 4) + 1;
        if (st->i + len > st->size)
            return false;
        *k = (key){st->d + st->i, len};
        st->i += len;
    }
    return true;
}

/* A selector byte and its key; at the end of the input, false (and the
 * input is done). */
static bool next_key(state *st, key *k)
{
    uint8_t sel;
    if (next(st, &sel) && key_of(st, sel, k))
        return true;
    st->i = st->size;
    return false;
}

static bool key_ok(const state *st, key k)
{
    return k.p && k.len && k.len <= st->max_key;
}

static entry *find(state *st, key k)
{
    for (size_t i = 0; i < st->n; i++)
        if (st->e[i].klen == k.len && memcmp(st->e[i].key, k.p, k.len) == 0)
            return &st->e[i];
    return NULL;
}

static void forget(state *st, entry *e)
{
    free(e->key);
    free(e->val);
    *e = st->e[--st->n];
}

/* Whether the model holds a value for k that a get must return. */
static entry *live(state *st, key k)
{
    entry *e = key_ok(st, k) ? find(st, k) : NULL;
    if (!e || e->expires <= st->now)
        return NULL;
    for (size_t t = 0; t < e->ntags; t++)
        if (st->tag_version[e->tag[t]] != e->version[t])
            return NULL;
    return e;
}

static const char *tag_name(unsigned i)
{
    static char good200[201], bad201[202];
    if (!good200[0]) {
        memset(good200, 'T', 200);
        memset(bad201, 'T', 201);
    }
    static const char *const names[] = {"t1", "t2", "users", good200, "x\x1fy", "", bad201, NULL};
    return names[i & 7];
}

static keel_cache *cache_create(state *st)
{
    const uint8_t *d = st->d;
    static const size_t keys[] = {0, 8, 3, 1024}, values[] = {0, 16, 300, 4096};
    keel_cache_opts o = {.max_key = keys[d[0] & 3], .max_value = values[(d[0] >> 2) & 3],
                         .l1_max_ttl_ns = d[1] % 4 ? d[1] * MS : 0, .default_ttl_ns = d[2] * 10 * MS,
                         .clock = fake_clock, .clock_ud = st};
    st->evicting = d[0] & 0x10;
    if (st->evicting) {
        o.l1_max_bytes = (size_t)64 << 10;
        o.l1_max_items = 32;
    }
    int bad = d[0] >> 5;
    if (bad == 4)
        o.max_key = 1025;
    else if (bad == 5)
        o.max_value = ((size_t)512 << 20) + 1;
    else if (bad == 6)
        o.l1_max_bytes = ((size_t)64 << 10) - 1;
    else if (bad == 7)
        o.xfetch_beta = -1;
    keel_cache *c = NULL;
    int rc = keel_cache_create(&c, &o);
    KF_CHECK((rc == 0) == (bad < 4), "bad option %d: create returned %d", bad, rc);
    KF_CHECK(keel_cache_create(NULL, &o) == KEEL_EINVAL, "create without out");
    st->max_key = o.max_key ? o.max_key : 1024;
    st->max_value = o.max_value ? o.max_value : MIB;
    st->max_ttl = o.l1_max_ttl_ns;
    st->default_ttl = o.default_ttl_ns ? o.default_ttl_ns : 3600 * SECOND_NS;
    return c;
}

static uint64_t ttl_of(uint8_t t)
{
    static const uint64_t unit[] = {1, MS, SECOND_NS};
    if (t == 0)
        return 0;
    if (t >> 6 == 3)
        return UINT64_MAX - (t & 63);
    return (t & 63) * unit[t >> 6];
}

/* The value a selector byte asks for: its bytes (NULL possible) and length. */
static const uint8_t *value_of(state *st, uint8_t v, size_t *vlen)
{
    switch (v >> 6) {
    case 0:
        *vlen = v & 63;
        break;
    case 1: /* not the default's 1 MiB: copies that large make TSan slow */
        *vlen = st->max_value == MIB ? 63 : st->max_value;
        break;
    case 2:
        *vlen = st->max_value + 1;
        break;
    default:
        *vlen = (v & 1) ? 0 : 5;
        return NULL;
    }
    uint8_t seed = ++st->counter;
    for (size_t i = 0; i < *vlen && i < 4096; i++)
        vbuf[i] = (uint8_t)(seed + i * 31);
    if (*vlen > 4096) /* tell large values apart by their ends too */
        vbuf[*vlen - 1] = seed;
    return vbuf;
}

static void model_set(state *st, key k, const uint8_t *val, size_t vlen, uint64_t ttl, const uint8_t *tags,
                      size_t ntags)
{
    entry *e = find(st, k);
    if (!e) {
        if (st->n == MAX_ENTRIES) /* not modelled: take it out again */
            KF_CHECK(keel_cache_del(st->c, k.p, k.len) == 0, "del of a key just set");
        if (st->n == MAX_ENTRIES)
            return;
        e = &st->e[st->n++];
        memset(e, 0, sizeof *e);
        e->key = kf_malloc(k.len);
        memcpy(e->key, k.p, k.len);
        e->klen = k.len;
    }
    free(e->val);
    e->val = kf_malloc(vlen);
    if (vlen)
        memcpy(e->val, val, vlen);
    e->vlen = vlen;
    ttl = ttl ? ttl : st->default_ttl;
    if (st->max_ttl && ttl > st->max_ttl)
        ttl = st->max_ttl;
    e->expires = ttl > UINT64_MAX - st->now ? UINT64_MAX : st->now + ttl;
    e->ntags = ntags;
    for (size_t t = 0; t < ntags; t++) {
        e->tag[t] = tags[t];
        e->version[t] = st->tag_version[tags[t]];
    }
}

static void op_set(state *st)
{
    uint8_t vs, ts, tg, ix;
    key k;
    if (!next_key(st, &k) || !next(st, &vs) || !next(st, &ts) || !next(st, &tg) || !next(st, &ix))
        return;
    size_t vlen;
    const uint8_t *val = value_of(st, vs, &vlen);
    uint8_t idx[17] = {(uint8_t)(ix & 7), (uint8_t)((ix >> 3) & 7), (uint8_t)((ix >> 5) & 7)};
    size_t ntags = tg & 3;
    bool tags_bad = false;
    for (size_t t = 0; t < ntags; t++)
        tags_bad |= idx[t] >= 4;
    if (tg & 0x80) { /* seventeen good tags: one too many */
        ntags = 17;
        memset(idx, 0, sizeof idx);
        tags_bad = true;
    }
    const char *names[17];
    for (size_t t = 0; t < ntags; t++)
        names[t] = tag_name(idx[t]);
    bool null_tags = ntags && (tg & 0x40);
    tags_bad |= null_tags;
    bool bad = !key_ok(st, k) || (vlen && !val) || vlen > st->max_value || tags_bad;
    uint64_t ttl = ttl_of(ts);
    int rc = keel_cache_set(st->c, k.p, k.len, val, vlen, ttl, null_tags ? NULL : names, ntags);
    KF_CHECK(rc == (bad ? KEEL_EINVAL : 0), "set of %zu bytes under a %zu-byte key, %zu tags: %d", vlen,
             k.len, ntags, rc);
    if (!bad)
        model_set(st, k, val, vlen, ttl, idx, ntags);
}

/* Checks one get's answer (rc, *len, buf) against the model. */
static void check_get(state *st, key k, const uint8_t *buf, size_t cap, int rc, size_t len)
{
    entry *e = live(st, k);
    if (!e || (st->evicting && rc == KEEL_ENOTFOUND)) {
        KF_CHECK(rc == KEEL_ENOTFOUND, "get of a %zu-byte key the model has not: %d", k.len, rc);
        return;
    }
    KF_CHECK(rc == (e->vlen > cap ? KEEL_ERANGE : 0), "get of %zu bytes into %zu: %d", e->vlen, cap, rc);
    KF_CHECK(len == e->vlen, "get said %zu bytes, the model %zu", len, e->vlen);
    KF_CHECK(rc != 0 || e->vlen == 0 || memcmp(buf, e->val, e->vlen) == 0, "get of %zu bytes: other bytes",
             e->vlen);
}

/* The buffer a get passes: NULL with cap 0, as cache.h allows (an empty
 * value into no buffer once reached memcpy(NULL, p, 0) in L1: UBSan). */
static void *buf_arg(uint8_t *b, size_t cap)
{
    return cap ? b : NULL;
}

/* A buffer for a get: cap bytes and a canary after them. */
static uint8_t *buf_new(size_t cap)
{
    uint8_t *b = kf_malloc(cap + CANARY);
    memset(b + cap, 0xa5, CANARY);
    return b;
}

static void buf_check(const uint8_t *b, size_t cap)
{
    for (size_t i = 0; i < CANARY; i++)
        KF_CHECK(b[cap + i] == 0xa5, "get wrote past cap %zu", cap);
}

static size_t cap_of(state *st, key k, uint8_t cs)
{
    entry *e = key_ok(st, k) ? find(st, k) : NULL;
    size_t vlen = e ? e->vlen : 3;
    switch (cs & 3) {
    case 0: return 0;
    case 1: return vlen ? vlen - 1 : 0;
    case 2: return vlen;
    default: return vlen + 64;
    }
}

static void op_get(state *st)
{
    uint8_t cs;
    key k;
    if (!next_key(st, &k) || !next(st, &cs))
        return;
    size_t cap = cap_of(st, k, cs), len = 12345;
    int misuse = (cs >> 2) & 7;
    uint8_t *b = buf_new(cap);
    int rc;
    if (misuse == 1) /* a buffer of 5 bytes that is not there */
        rc = keel_cache_get(st->c, k.p, k.len, NULL, 5, &len);
    else if (misuse == 2)
        rc = keel_cache_get(st->c, k.p, k.len, b, cap, NULL);
    else
        rc = keel_cache_get(st->c, k.p, k.len, buf_arg(b, cap), cap, &len);
    if (misuse == 1 || misuse == 2 || !key_ok(st, k))
        KF_CHECK(rc == KEEL_EINVAL, "get with bad arguments (%d, %zu-byte key): %d", misuse, k.len, rc);
    else
        check_get(st, k, b, cap, rc, len);
    buf_check(b, cap);
    free(b);
}

static void op_get_many(state *st)
{
    keel_cache_item it[3];
    key k[3];
    uint8_t *bufs[3];
    uint8_t cs;
    if (!next_key(st, &k[0]) || !next_key(st, &k[1]) || !next_key(st, &k[2]) || !next(st, &cs))
        return;
    for (size_t j = 0; j < 3; j++) {
        size_t cap = cap_of(st, k[j], (uint8_t)(cs >> (2 * j)));
        it[j] = (keel_cache_item){.key = k[j].p, .klen = k[j].len, .buf = buf_new(cap), .cap = cap};
        bufs[j] = it[j].buf;
        it[j].buf = buf_arg(bufs[j], cap);
    }
    int rc = keel_cache_get_many(st->c, it, 3), first = 0;
    for (size_t j = 0; j < 3; j++) {
        if (key_ok(st, k[j]))
            check_get(st, k[j], it[j].buf, it[j].cap, it[j].rc, it[j].len);
        else
            KF_CHECK(it[j].rc == KEEL_EINVAL, "get_many of a bad key: %d", it[j].rc);
        if (!first)
            first = it[j].rc;
        buf_check(bufs[j], it[j].cap);
        free(bufs[j]);
    }
    KF_CHECK(rc == first, "get_many returned %d, its first error is %d", rc, first);
}

static void op_del(state *st)
{
    key k;
    if (!next_key(st, &k))
        return;
    int rc = keel_cache_del(st->c, k.p, k.len);
    KF_CHECK(rc == (key_ok(st, k) ? 0 : KEEL_EINVAL), "del of a %zu-byte key: %d", k.len, rc);
    entry *e = rc == 0 ? find(st, k) : NULL;
    if (e)
        forget(st, e);
}

static void op_invalidate_tag(state *st, uint8_t arg)
{
    unsigned i = arg & 7;
    int rc = keel_cache_invalidate_tag(st->c, tag_name(i));
    KF_CHECK(rc == (i < 4 ? 0 : KEEL_EINVAL), "invalidate tag %u: %d", i, rc);
    if (rc == 0)
        st->tag_version[i]++;
}

static void op_invalidate_prefix(state *st)
{
    uint8_t n;
    key k;
    if (!next_key(st, &k) || !next(st, &n))
        return;
    size_t len = n == 0xff ? 0 : n < k.len ? n : k.len;
    bool bad = (len && !k.p) || len > st->max_key;
    int rc = keel_cache_invalidate_prefix(st->c, k.p, len);
    KF_CHECK(rc == (bad ? KEEL_EINVAL : 0), "invalidate a %zu-byte prefix: %d", len, rc);
    for (size_t i = 0; !bad && i < st->n;)
        if (st->e[i].klen >= len && (!len || memcmp(st->e[i].key, k.p, len) == 0))
            forget(st, &st->e[i]);
        else
            i++;
}

static void op_step(state *st, uint8_t a)
{
    static const uint64_t unit[] = {1, MS, SECOND_NS};
    if (a >> 6 != 3) {
        st->now += (a & 63) * unit[a >> 6];
        return;
    }
    if (!st->n)
        return;
    uint64_t exp = st->e[a % st->n].expires - !(a & 32);
    if (exp > st->now && exp < UINT64_MAX / 2)
        st->now = exp;
}

/* The calls cache.h says refuse NULL, once an input. */
static void check_null_arguments(keel_cache *c)
{
    size_t len;
    char b[4];
    KF_CHECK(keel_cache_get(NULL, "a", 1, b, sizeof b, &len) == KEEL_EINVAL, "get of no cache");
    KF_CHECK(keel_cache_set(NULL, "a", 1, "v", 1, 0, NULL, 0) == KEEL_EINVAL, "set of no cache");
    KF_CHECK(keel_cache_del(NULL, "a", 1) == KEEL_EINVAL, "del of no cache");
    KF_CHECK(keel_cache_invalidate_tag(NULL, "t1") == KEEL_EINVAL, "invalidate of no cache");
    KF_CHECK(keel_cache_invalidate_prefix(c, NULL, 1) == KEEL_EINVAL, "invalidate of a NULL prefix");
    KF_CHECK(keel_cache_get_many(c, NULL, 1) == KEEL_EINVAL, "get_many of no items");
    keel_cache_destroy(NULL);
}

static void run_ops(state *st)
{
    uint8_t op, arg;
    while (next(st, &op)) {
        switch (op % 8) {
        case 0:
        case 1: op_set(st); break;
        case 2: op_get(st); break;
        case 3: op_del(st); break;
        case 4:
            if (next(st, &arg))
                op_invalidate_tag(st, arg);
            break;
        case 5: op_invalidate_prefix(st); break;
        case 6:
            if (next(st, &arg))
                op_step(st, arg);
            break;
        default: op_get_many(st); break;
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *d, size_t size)
{
    if (size < 4)
        return 0;
    state *st = kf_calloc(sizeof *st);
    st->d = d;
    st->size = size;
    st->i = 4;
    st->now = d[3] * SECOND_NS;
    st->c = cache_create(st);
    if (st->c) {
        st->kbuf = kf_malloc(st->max_key + 1);
        memset(st->kbuf, 'k', st->max_key + 1);
        check_null_arguments(st->c);
        run_ops(st);
        keel_cache_stats cs;
        keel_cache_stats_get(st->c, &cs);
        KF_CHECK(st->evicting || cs.l1_items <= st->n, "L1 holds %llu entries, the model %zu",
                 (unsigned long long)cs.l1_items, st->n);
    }
    while (st->n)
        forget(st, &st->e[0]);
    keel_cache_destroy(st->c);
    free(st->kbuf);
    free(st);
    return 0;
}
