/* tests/test_bus.c — keel_bus: the NATS wildcard table, checked against
 * the trie; sync order; async per-subject order with 2 workers; queue
 * groups; unsubscribe from inside a handler and from another thread while
 * publishing; failure isolation; drain and destroy losing nothing; the
 * full-queue policies; bad input. Redis Streams on real servers: sharing a
 * group across processes, a consumer killed mid-batch, a poison entry
 * reaching the dead-letter stream, a server restarted mid-run, and under
 * a steady stream of publishes, with its data saved or not. */
#define _GNU_SOURCE
#include <malloc.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <keel/bus.h>
#include <keel/metrics.h>
#include <keel/redis.h>

#include "harness.h"

#define MS KT_MS
#define S KT_S

#define nap kt_nap

/* A handler's log: which subscription saw what. */
typedef struct rec {
    pthread_mutex_t mu;
    int tag;
    size_t n;
    int fail;          /* return this */
    int order[4096];   /* tags in call order (shared logs) */
    size_t norder;
    struct rec *log;   /* a shared log to append the tag to */
} rec;

static int on_rec(const keel_bus_msg *m, void *ud)
{
    (void)m;
    rec *r = ud;
    pthread_mutex_lock(&r->mu);
    r->n++;
    pthread_mutex_unlock(&r->mu);
    if (r->log) {
        pthread_mutex_lock(&r->log->mu);
        if (r->log->norder < 4096)
            r->log->order[r->log->norder++] = r->tag;
        pthread_mutex_unlock(&r->log->mu);
    }
    return r->fail;
}

static rec *rec_new(int tag, rec *log)
{
    rec *r = calloc(1, sizeof *r);
    pthread_mutex_init(&r->mu, NULL);
    r->tag = tag;
    r->log = log;
    return r;
}

static keel_bus *bus_new(size_t workers, size_t capacity, keel_bus_full on_full)
{
    keel_bus *b;
    keel_bus_opts o = {.workers = workers, .capacity = capacity, .on_full = on_full};
    ck_assert_int_eq(keel_bus_create(&b, &o), 0);
    return b;
}

static keel_bus_sub *sub(keel_bus *b, const char *pattern, keel_bus_handler h, void *ud, keel_bus_mode mode,
                         const char *group)
{
    keel_bus_sub *s;
    keel_bus_sub_opts o = {.pattern = pattern, .handler = h, .ud = ud, .mode = mode, .group = group};
    ck_assert_int_eq(keel_bus_subscribe(b, &o, &s), 0);
    return s;
}

static int pub(keel_bus *b, const char *subject)
{
    return keel_bus_publish(b, subject, "x", 1, NULL, 0, NULL);
}

/* ---- wildcards ---- */

static const struct {
    const char *pattern, *subject;
    int want;
} cases[] = {
    {"foo", "foo", 1},
    {"foo", "bar", 0},
    {"foo.bar", "foo.bar", 1},
    {"foo.bar", "foo", 0},
    {"foo", "foo.bar", 0},
    {"*", "foo", 1},
    {"*", "foo.bar", 0},
    {">", "foo", 1},
    {">", "foo.bar.baz", 1},
    {"foo.*", "foo.bar", 1},
    {"foo.*", "foo", 0},             /* * is exactly one token */
    {"foo.*", "foo.bar.baz", 0},
    {"foo.>", "foo", 0},             /* > is one or more */
    {"foo.>", "foo.bar", 1},
    {"foo.>", "foo.bar.baz", 1},
    {"foo.*.baz", "foo.bar.baz", 1},
    {"foo.*.baz", "foo.bar.qux", 0},
    {"foo.*.baz", "foo.baz", 0},
    {"*.*", "a.b", 1},
    {"*.*", "a", 0},
    {"*.>", "a.b", 1},
    {"*.>", "a", 0},
    {"*.bar.>", "foo.bar.baz.q", 1},
    {"*.bar.>", "foo.baz.bar.q", 0},
    {"foo*", "foo*", 1},             /* a wildcard character inside a token is a literal */
    {"foo*", "foox", 0},
    {"f>", "f>", 1},
    {"FOO", "foo", 0},               /* case matters */
    {"order.eu.paid", "order.eu.paid", 1},
    {"order.*.paid", "order.us.paid", 1},
    {"order.*.paid", "order.us.refunded", 0},
    {"a.b.c.d.e.f", "a.b.c.d.e.f", 1},
    {"a.*.*.d.>", "a.b.c.d.e", 1},
    {"a.*.*.d.>", "a.b.c.d", 0},
    {"\xc3\xa9t\xc3\xa9.*", "\xc3\xa9t\xc3\xa9.x", 1}, /* UTF-8 bytes are literals */
};

static const char *bad_patterns[] = {
    "", ".", "foo.", ".foo", "foo..bar", "foo.>.bar", ">.foo", "foo bar", "foo\tbar", "foo.\x7f", "a.>.>",
};
static const char *bad_subjects[] = {
    "", ".", "foo.", "foo..bar", "foo.*", "*", ">", "foo.>", "a b", "a\nb",
};

START_TEST(the_wildcard_table)
{
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        ck_assert_msg(keel_bus_match(cases[i].pattern, cases[i].subject) == cases[i].want, "%s vs %s",
                      cases[i].pattern, cases[i].subject);
    for (size_t i = 0; i < sizeof bad_patterns / sizeof bad_patterns[0]; i++)
        ck_assert_int_eq(keel_bus_match(bad_patterns[i], "foo"), KEEL_EINVAL);
    for (size_t i = 0; i < sizeof bad_subjects / sizeof bad_subjects[0]; i++)
        ck_assert_int_eq(keel_bus_match(">", bad_subjects[i]), KEEL_EINVAL);
    char big[1100];
    memset(big, 'a', sizeof big);
    big[1024] = '\0';
    ck_assert_int_eq(keel_bus_match(">", big), 1); /* 1024 bytes is the limit */
    big[1024] = 'a';
    big[1025] = '\0';
    ck_assert_int_eq(keel_bus_match(">", big), KEEL_EINVAL);
    char toks[200] = "";
    for (int i = 0; i < 64; i++)
        strcat(toks, i ? ".a" : "a");
    ck_assert_int_eq(keel_bus_match(">", toks), 1); /* 64 tokens */
    strcat(toks, ".a");
    ck_assert_int_eq(keel_bus_match(">", toks), KEEL_EINVAL);
    ck_assert_int_eq(keel_bus_match(NULL, "a"), KEEL_EINVAL);
    ck_assert_int_eq(keel_bus_match("a", NULL), KEEL_EINVAL);
}
END_TEST

/* Every pattern of the table subscribed on one bus; every subject
 * published: the trie delivers exactly where keel_bus_match says. */
START_TEST(the_trie_agrees_with_the_table)
{
    enum { N = sizeof cases / sizeof cases[0] };
    keel_bus *b = bus_new(0, 0, KEEL_BUS_BLOCK);
    rec *r[N];
    keel_bus_sub *s[N];
    for (size_t i = 0; i < N; i++) {
        r[i] = rec_new((int)i, NULL);
        s[i] = sub(b, cases[i].pattern, on_rec, r[i], KEEL_BUS_SYNC, NULL);
    }
    for (int round = 0; round < 2; round++) {
        for (size_t j = 0; j < N; j++) {
            size_t before[N];
            for (size_t i = 0; i < N; i++)
                before[i] = r[i]->n;
            ck_assert_int_eq(pub(b, cases[j].subject), 0);
            for (size_t i = 0; i < N; i++) {
                if (!s[i])
                    continue;
                int want = keel_bus_match(cases[i].pattern, cases[j].subject);
                ck_assert_msg(r[i]->n - before[i] == (size_t)want, "%s got %s %zu times", cases[i].pattern,
                              cases[j].subject, r[i]->n - before[i]);
            }
        }
        /* half of them leave: the rest still match exactly */
        for (size_t i = 0; round == 0 && i < N; i += 2) {
            ck_assert_int_eq(keel_bus_unsubscribe(s[i]), 0);
            s[i] = NULL;
        }
    }
    keel_bus_stats st;
    keel_bus_stats_get(b, &st);
    ck_assert_uint_eq(st.subscriptions, N / 2);
    keel_bus_destroy(b);
    for (size_t i = 0; i < N; i++)
        free(r[i]);
}
END_TEST

/* ---- the trie against a brute-force model ---- */

/* NATS matching on token arrays, written from the rules, not from the
 * library's code. */
static int model_match(char **p, int np, char **s, int ns)
{
    if (np == 0)
        return ns == 0;
    if (strcmp(p[0], ">") == 0)
        return ns >= 1;
    if (ns == 0)
        return 0;
    if (strcmp(p[0], "*") != 0 && strcmp(p[0], s[0]) != 0)
        return 0;
    return model_match(p + 1, np - 1, s + 1, ns - 1);
}

static int model_split(char *buf, char **tok)
{
    int n = 0;
    for (char *t = strtok(buf, "."); t; t = strtok(NULL, "."))
        tok[n++] = t;
    return n;
}

static int model_matches(const char *pattern, const char *subject)
{
    char pb[128], sb[128], *pt[16], *st[16];
    snprintf(pb, sizeof pb, "%s", pattern);
    snprintf(sb, sizeof sb, "%s", subject);
    return model_match(pt, model_split(pb, pt), st, model_split(sb, st));
}

static uint64_t model_rand(uint64_t *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

/* A literal token: mostly from a few, sometimes from many (the tables of
 * children grow, and leave tombstones when they shrink). */
static void model_token(uint64_t *x, char *out, size_t n)
{
    unsigned r = (unsigned)(model_rand(x) % 100);
    snprintf(out, n, "%s%u", r < 80 ? "t" : "u", r < 80 ? r % 3 : r % 40);
}

enum { MODEL_SUBS = 48 };

typedef struct model_sub {
    keel_bus_sub *s;
    char pattern[96];
    int group;  /* -1: none */
    keel_bus_mode mode;
    size_t seq; /* its place in the order of subscriptions */
} model_sub;

typedef struct model_log {
    pthread_mutex_t mu;
    int calls[MODEL_SUBS];
    int sync_order[MODEL_SUBS * 2];
    size_t nsync;
} model_log;

static model_log mlog = {PTHREAD_MUTEX_INITIALIZER, {0}, {0}, 0};
static model_sub msubs[MODEL_SUBS];

static int on_model(const keel_bus_msg *m, void *ud)
{
    (void)m;
    int i = (int)(intptr_t)ud;
    pthread_mutex_lock(&mlog.mu);
    mlog.calls[i]++;
    if (msubs[i].mode == KEEL_BUS_SYNC && mlog.nsync < MODEL_SUBS * 2)
        mlog.sync_order[mlog.nsync++] = i;
    pthread_mutex_unlock(&mlog.mu);
    return 0;
}

/* Seeded random subscribes, unsubscribes and publishes: after each
 * publish, every subscription outside a group was called once if the
 * model says its pattern matches, else never; each group that has a
 * matching member had exactly one of those called; the sync calls came in
 * subscription order. */
START_TEST(the_trie_agrees_with_a_model_over_random_changes)
{
    keel_bus *b = bus_new(2, 0, KEEL_BUS_BLOCK);
    uint64_t x = 0x5eed0000u + (uint64_t)_i * 7919u;
    size_t next_seq = 0, live = 0, published = 0;
    memset(msubs, 0, sizeof msubs);
    for (int step = 0; step < 4000; step++) {
        unsigned op = (unsigned)(model_rand(&x) % 100);
        int slot = (int)(model_rand(&x) % MODEL_SUBS);
        if (op < 40 && !msubs[slot].s) {
            model_sub *m = &msubs[slot];
            int ntok = 1 + (int)(model_rand(&x) % 4);
            m->pattern[0] = '\0';
            for (int k = 0; k < ntok; k++) {
                char tok[8];
                unsigned r = (unsigned)(model_rand(&x) % 100);
                if (r < 20)
                    snprintf(tok, sizeof tok, "*");
                else if (r < 30 && k == ntok - 1)
                    snprintf(tok, sizeof tok, ">");
                else
                    model_token(&x, tok, sizeof tok);
                if (k)
                    strcat(m->pattern, ".");
                strcat(m->pattern, tok);
            }
            unsigned g = (unsigned)(model_rand(&x) % 8);
            m->group = g < 2 ? (int)g : -1;
            m->mode = model_rand(&x) % 4 == 0 ? KEEL_BUS_ASYNC : KEEL_BUS_SYNC;
            m->seq = next_seq++;
            m->s = sub(b, m->pattern, on_model, (void *)(intptr_t)slot, m->mode,
                       m->group < 0 ? NULL : m->group ? "g1" : "g0");
            live++;
        } else if (op < 65 && msubs[slot].s) {
            ck_assert_int_eq(keel_bus_unsubscribe(msubs[slot].s), 0);
            msubs[slot].s = NULL;
            live--;
        } else {
            char subject[96] = "";
            int ntok = 1 + (int)(model_rand(&x) % 5);
            for (int k = 0; k < ntok; k++) {
                char tok[8];
                model_token(&x, tok, sizeof tok);
                if (k)
                    strcat(subject, ".");
                strcat(subject, tok);
            }
            memset(mlog.calls, 0, sizeof mlog.calls);
            mlog.nsync = 0;
            ck_assert_int_eq(pub(b, subject), 0);
            ck_assert_int_eq(keel_bus_drain(b), 0);
            published++;
            int group_calls[2] = {0, 0}, group_matches[2] = {0, 0};
            for (int i = 0; i < MODEL_SUBS; i++) {
                model_sub *m = &msubs[i];
                int want = m->s ? model_matches(m->pattern, subject) : 0;
                if (m->s)
                    ck_assert_int_eq(keel_bus_match(m->pattern, subject), want);
                if (m->s && m->group >= 0) {
                    ck_assert_msg(mlog.calls[i] <= want, "step %d: %s got %s in a group", step, m->pattern,
                                  subject);
                    group_calls[m->group] += mlog.calls[i];
                    group_matches[m->group] += want;
                } else {
                    ck_assert_msg(mlog.calls[i] == want, "step %d: %s got %s %d times, want %d", step,
                                  m->pattern, subject, mlog.calls[i], want);
                }
            }
            for (int g = 0; g < 2; g++)
                ck_assert_msg(group_calls[g] == (group_matches[g] > 0), "step %d: group %d called %d times for %s",
                              step, g, group_calls[g], subject);
            for (size_t k = 1; k < mlog.nsync; k++)
                ck_assert_msg(msubs[mlog.sync_order[k - 1]].seq < msubs[mlog.sync_order[k]].seq,
                              "step %d: sync calls out of subscription order", step);
        }
        keel_bus_stats st;
        keel_bus_stats_get(b, &st);
        ck_assert_uint_eq(st.subscriptions, live);
    }
    ck_assert_uint_gt(published, 1000);
    keel_bus_destroy(b);
}
END_TEST

/* Publishers walk the trie while other threads keep changing it around
 * the same nodes (tables of children growing, tombstones, pruning): the
 * subscriptions that stay are called exactly once a matching publish. */
typedef struct trie_churner {
    keel_bus *b;
    int id;
    _Atomic int *stop;
} trie_churner;

static int on_bump(const keel_bus_msg *m, void *ud)
{
    (void)m;
    atomic_fetch_add((_Atomic size_t *)ud, 1);
    return 0;
}

static void *churn_trie(void *arg)
{
    trie_churner *c = arg;
    _Atomic size_t sink = 0;
    uint64_t x = 0x9e3779b97f4a7c15ull + (uint64_t)c->id;
    keel_bus_sub *held[32] = {0};
    while (!atomic_load(c->stop)) {
        int slot = (int)(model_rand(&x) % 32);
        if (held[slot]) {
            ck_assert_int_eq(keel_bus_unsubscribe(held[slot]), 0);
            held[slot] = NULL;
            continue;
        }
        char pat[64];
        unsigned r = (unsigned)(model_rand(&x) % 40);
        static const char *const shapes[] = {"s.u%u", "s.t0.u%u", "s.*.u%u", "s.u%u.>", "u%u.x", "s.t0.x.u%u"};
        snprintf(pat, sizeof pat, shapes[model_rand(&x) % 6], r);
        held[slot] = sub(c->b, pat, on_bump, &sink, KEEL_BUS_SYNC, NULL);
    }
    for (int i = 0; i < 32; i++)
        if (held[i])
            ck_assert_int_eq(keel_bus_unsubscribe(held[i]), 0);
    return NULL;
}

/* A thread publishing `subject` until told to stop, and at least `min`
 * times; n counts them. */
typedef struct pub_loop {
    keel_bus *b;
    _Atomic int *stop;
    const char *subject;
    size_t min, n;
} pub_loop;

static void *publish_until_stopped(void *arg)
{
    pub_loop *p = arg;
    while (!atomic_load(p->stop) || p->n < p->min) {
        ck_assert_int_eq(pub(p->b, p->subject), 0);
        p->n++;
    }
    return NULL;
}

START_TEST(publishers_miss_nothing_while_the_trie_changes)
{
    keel_bus *b = bus_new(0, 0, KEEL_BUS_BLOCK);
    static const char *const stable[] = {"s.t0.x", "s.*.x", "s.>", "*.t0.>", ">", "s.t0.*", "*.*.*"};
    enum { NS = sizeof stable / sizeof stable[0] };
    _Atomic size_t got[NS];
    for (int i = 0; i < NS; i++) {
        atomic_init(&got[i], 0);
        sub(b, stable[i], on_bump, &got[i], KEEL_BUS_SYNC, NULL);
    }
    _Atomic int stop = 0;
    trie_churner c[2] = {{b, 1, &stop}, {b, 2, &stop}};
    pub_loop p[2] = {{b, &stop, "s.t0.x", 1000, 0}, {b, &stop, "s.t0.x", 1000, 0}};
    pthread_t ct[2], pt[2];
    for (int i = 0; i < 2; i++) {
        pthread_create(&ct[i], NULL, churn_trie, &c[i]);
        pthread_create(&pt[i], NULL, publish_until_stopped, &p[i]);
    }
    nap(300 * MS);
    atomic_store(&stop, 1);
    for (int i = 0; i < 2; i++) {
        pthread_join(ct[i], NULL);
        pthread_join(pt[i], NULL);
    }
    for (int i = 0; i < NS; i++)
        ck_assert_msg(atomic_load(&got[i]) == p[0].n + p[1].n, "%s: %zu of %zu", stable[i],
                      (size_t)atomic_load(&got[i]), p[0].n + p[1].n);
    keel_bus_stats st;
    keel_bus_stats_get(b, &st);
    ck_assert_uint_eq(st.subscriptions, NS);
    keel_bus_destroy(b);
}
END_TEST

START_TEST(a_group_member_keeps_its_place_in_the_order)
{
    keel_bus *b = bus_new(0, 0, KEEL_BUS_BLOCK);
    rec *log = rec_new(0, NULL), *r[3];
    for (int i = 0; i < 3; i++)
        r[i] = rec_new(i, log);
    sub(b, "g", on_rec, r[0], KEEL_BUS_SYNC, "grp");
    sub(b, "g", on_rec, r[1], KEEL_BUS_SYNC, NULL);
    sub(b, "g", on_rec, r[2], KEEL_BUS_SYNC, "grp");
    for (int i = 0; i < 4; i++)
        ck_assert_int_eq(pub(b, "g"), 0);
    static const int want[8] = {0, 1, 1, 2, 0, 1, 1, 2};
    ck_assert_uint_eq(log->norder, 8);
    for (int i = 0; i < 8; i++)
        ck_assert_int_eq(log->order[i], want[i]);
    keel_bus_destroy(b);
    for (int i = 0; i < 3; i++)
        free(r[i]);
    free(log);
}
END_TEST

START_TEST(sync_handlers_run_in_subscription_order)
{
    keel_bus *b = bus_new(0, 0, KEEL_BUS_BLOCK);
    rec *log = rec_new(0, NULL);
    const char *pats[] = {"a.>", "a.b.c", "*.b.*", ">", "a.b.c", "a.*.c"};
    rec *r[6];
    for (int i = 0; i < 6; i++) {
        r[i] = rec_new(i, log);
        sub(b, pats[i], on_rec, r[i], KEEL_BUS_SYNC, NULL);
    }
    ck_assert_int_eq(pub(b, "a.b.c"), 0);
    ck_assert_uint_eq(log->norder, 6);
    for (int i = 0; i < 6; i++)
        ck_assert_int_eq(log->order[i], i);
    keel_bus_destroy(b);
    for (int i = 0; i < 6; i++)
        free(r[i]);
    free(log);
}
END_TEST

/* The message a handler sees: subject, data, headers, id, time. */
typedef struct look {
    char subject[64], data[16], hk[16], hv[16], id[KEEL_BUS_ID_MAX];
    size_t len, nheaders;
    uint64_t time_ns;
    int calls;
} look;

static int on_look(const keel_bus_msg *m, void *ud)
{
    look *l = ud;
    snprintf(l->subject, sizeof l->subject, "%s", m->subject);
    ck_assert_uint_eq(strlen(m->subject), m->subject_len);
    memcpy(l->data, m->data, m->len < 16 ? m->len : 16);
    l->len = m->len;
    l->nheaders = m->nheaders;
    if (m->nheaders) {
        snprintf(l->hk, sizeof l->hk, "%s", m->headers[m->nheaders - 1].key);
        snprintf(l->hv, sizeof l->hv, "%s", m->headers[m->nheaders - 1].value);
    }
    snprintf(l->id, sizeof l->id, "%s", m->id);
    l->time_ns = m->time_ns;
    l->calls++;
    return 0;
}

START_TEST(messages_carry_their_fields_and_ordered_ids)
{
    keel_bus *b = bus_new(1, 0, KEEL_BUS_BLOCK);
    look ls = {0}, la = {0};
    sub(b, "user.*", on_look, &ls, KEEL_BUS_SYNC, NULL);
    sub(b, "user.*", on_look, &la, KEEL_BUS_ASYNC, NULL);
    keel_bus_header h[2] = {{"trace", "abc"}, {"tenant", "t1"}};
    char id[KEEL_BUS_ID_MAX], prev[KEEL_BUS_ID_MAX] = "0-0";
    unsigned long long pms = 0, pseq = 0;
    for (int i = 0; i < 1000; i++) {
        ck_assert_int_eq(keel_bus_publish(b, "user.created", "a\0b", 3, h, 2, id), 0);
        unsigned long long ms, seq;
        ck_assert_int_eq(sscanf(id, "%llu-%llu", &ms, &seq), 2);
        ck_assert_msg(ms > pms || (ms == pms && seq > pseq), "%s after %s", id, prev);
        pms = ms, pseq = seq;
        snprintf(prev, sizeof prev, "%s", id);
    }
    ck_assert_int_eq(keel_bus_drain(b), 0);
    for (look *l = &ls; l; l = l == &ls ? &la : NULL) {
        ck_assert_int_eq(l->calls, 1000);
        ck_assert_str_eq(l->subject, "user.created");
        ck_assert_uint_eq(l->len, 3);
        ck_assert_int_eq(memcmp(l->data, "a\0b", 3), 0);
        ck_assert_uint_eq(l->nheaders, 2);
        ck_assert_str_eq(l->hk, "tenant");
        ck_assert_str_eq(l->hv, "t1");
        ck_assert_str_eq(l->id, id); /* the last one */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        uint64_t now = (uint64_t)ts.tv_sec * S + (uint64_t)ts.tv_nsec;
        ck_assert(l->time_ns <= now && l->time_ns + 60 * S > now);
        ck_assert_uint_eq(l->time_ns, strtoull(l->id, NULL, 10) * MS); /* the id's milliseconds */
    }
    keel_bus_destroy(b);
}
END_TEST

/* ---- async order ---- */

typedef struct order {
    uint32_t next[16];
    _Atomic size_t total, bad;
} order;

static int on_order(const keel_bus_msg *m, void *ud)
{
    order *o = ud;
    uint32_t subj = (uint32_t)(m->subject[4] - 'a'), seq;
    memcpy(&seq, m->data, 4);
    if (seq != o->next[subj])
        atomic_fetch_add(&o->bad, 1);
    o->next[subj] = seq + 1; /* one subject, one worker: no race */
    atomic_fetch_add(&o->total, 1);
    return 0;
}

START_TEST(async_keeps_each_subjects_order_over_two_workers)
{
    keel_bus *b = bus_new(2, 1024, KEEL_BUS_BLOCK);
    order *o1 = calloc(1, sizeof *o1), *o2 = calloc(1, sizeof *o2);
    sub(b, "ord.>", on_order, o1, KEEL_BUS_ASYNC, NULL);
    sub(b, "ord.*", on_order, o2, KEEL_BUS_ASYNC, NULL);
    enum { SUBJ = 12, PER = 5000 };
    char subj[SUBJ][8];
    for (int s = 0; s < SUBJ; s++)
        snprintf(subj[s], sizeof subj[s], "ord.%c", 'a' + s);
    for (uint32_t i = 0; i < PER; i++)
        for (int s = 0; s < SUBJ; s++)
            ck_assert_int_eq(keel_bus_publish(b, subj[s], &i, 4, NULL, 0, NULL), 0);
    ck_assert_int_eq(keel_bus_drain(b), 0);
    for (order *o = o1; o; o = o == o1 ? o2 : NULL) {
        ck_assert_uint_eq(atomic_load(&o->total), SUBJ * PER);
        ck_assert_uint_eq(atomic_load(&o->bad), 0);
    }
    keel_bus_stats st;
    keel_bus_stats_get(b, &st);
    ck_assert_uint_eq(st.published, SUBJ * PER);
    ck_assert_uint_eq(st.delivered, 2 * SUBJ * PER);
    ck_assert_uint_eq(st.queued, 0);
    keel_bus_destroy(b);
    free(o1);
    free(o2);
}
END_TEST

/* ---- queue groups ---- */

START_TEST(a_queue_group_splits_the_messages_each_to_one_member)
{
    for (int mode = 0; mode < 2; mode++) {
        keel_bus *b = bus_new(2, 0, KEEL_BUS_BLOCK);
        rec *m[3], *all = rec_new(9, NULL), *other[2];
        for (int i = 0; i < 3; i++)
            m[i] = rec_new(i, NULL);
        sub(b, "job.*", on_rec, m[0], (keel_bus_mode)mode, "workers");
        sub(b, "job.>", on_rec, m[1], (keel_bus_mode)mode, "workers");
        sub(b, "job.run", on_rec, m[2], (keel_bus_mode)mode, "workers");
        sub(b, ">", on_rec, all, (keel_bus_mode)mode, NULL);
        for (int i = 0; i < 2; i++) {
            other[i] = rec_new(20 + i, NULL);
            sub(b, "job.run", on_rec, other[i], (keel_bus_mode)mode, "audit");
        }
        for (int i = 0; i < 3000; i++)
            ck_assert_int_eq(pub(b, "job.run"), 0);
        ck_assert_int_eq(pub(b, "job.x.y"), 0); /* only m[1] matches */
        ck_assert_int_eq(keel_bus_drain(b), 0);
        size_t sum = 0;
        for (int i = 0; i < 3; i++) {
            ck_assert_uint_ge(m[i]->n, 800); /* evenly-ish: round robin */
            sum += m[i]->n;
        }
        ck_assert_uint_eq(sum, 3001); /* each message to exactly one member */
        ck_assert_uint_eq(all->n, 3001);
        ck_assert_uint_eq(other[0]->n + other[1]->n, 3000);
        ck_assert_uint_eq(other[0]->n, 1500);
        keel_bus_destroy(b);
        for (int i = 0; i < 3; i++)
            free(m[i]);
        free(all);
        free(other[0]);
        free(other[1]);
    }
}
END_TEST

/* ---- unsubscribe ---- */

typedef struct selfish {
    keel_bus_sub *me, *victim;
    int calls, limit;
    rec *victim_rec;
} selfish;

static int on_selfish(const keel_bus_msg *m, void *ud)
{
    (void)m;
    selfish *s = ud;
    if (++s->calls == s->limit) {
        ck_assert_int_eq(keel_bus_unsubscribe(s->me), 0); /* returns: its own call is in progress */
        ck_assert_int_eq(keel_bus_unsubscribe(s->me), KEEL_EINVAL); /* once only */
        if (s->victim)
            ck_assert_int_eq(keel_bus_unsubscribe(s->victim), 0);
        return -5; /* a failure after its unsubscribe: no on_error names it */
    }
    return 0;
}

static void count_error(keel_bus_sub *s, const keel_bus_msg *m, int err, void *ud)
{
    (void)s, (void)m, (void)err;
    ++*(int *)ud;
}

START_TEST(a_handler_can_unsubscribe_itself_and_others)
{
    for (int mode = 0; mode < 2; mode++) {
        int errors = 0;
        keel_bus *b;
        keel_bus_opts o = {.workers = 1, .on_error = count_error, .ud = &errors};
        ck_assert_int_eq(keel_bus_create(&b, &o), 0);
        selfish s = {.limit = 3};
        s.victim_rec = rec_new(1, NULL);
        s.me = sub(b, "t.*", on_selfish, &s, (keel_bus_mode)mode, NULL);
        s.victim = sub(b, "t.>", on_rec, s.victim_rec, (keel_bus_mode)mode, NULL);
        for (int i = 0; i < 10; i++)
            ck_assert_int_eq(pub(b, "t.x"), 0);
        ck_assert_int_eq(keel_bus_drain(b), 0);
        ck_assert_int_eq(s.calls, 3);
        /* the victim ran for the first two; the third publish's call to it
         * came after its unsubscribe and was skipped */
        ck_assert_uint_eq(s.victim_rec->n, 2);
        keel_bus_stats st;
        keel_bus_stats_get(b, &st);
        ck_assert_uint_eq(st.subscriptions, 0);
        ck_assert_uint_eq(st.failed, 1); /* counted, not reported */
        ck_assert_int_eq(errors, 0);
        keel_bus_destroy(b);
        free(s.victim_rec);
    }
}
END_TEST

/* Publishers run flat out while the main thread subscribes and
 * unsubscribes; each subscription's ud is freed (and poisoned) as soon as
 * unsubscribe returns, so a late call is a use after free (ASan) or a
 * poisoned counter (here). */
typedef struct churn_ud {
    _Atomic uint32_t magic;
    _Atomic size_t calls;
} churn_ud;

static int on_churn(const keel_bus_msg *m, void *ud)
{
    (void)m;
    churn_ud *c = ud;
    ck_assert_uint_eq(atomic_load(&c->magic), 0x600dcafe);
    atomic_fetch_add(&c->calls, 1);
    return 0;
}


START_TEST(unsubscribe_from_another_thread_while_publishing)
{
    keel_bus *b = bus_new(2, 1 << 12, KEEL_BUS_BLOCK);
    _Atomic int stop = 0;
    pub_loop p[2] = {{b, &stop, "churn.a.b", 0, 0}, {b, &stop, "churn.a.b", 0, 0}};
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&t[i], NULL, publish_until_stopped, &p[i]);
    const char *pats[] = {"churn.>", "churn.*.b", "churn.a.b", ">"};
    size_t seen = 0;
    for (int i = 0; i < 200; i++) {
        churn_ud *u[4];
        keel_bus_sub *s[4];
        for (int k = 0; k < 4; k++) {
            u[k] = calloc(1, sizeof *u[k]);
            atomic_store(&u[k]->magic, 0x600dcafe);
            s[k] = sub(b, pats[k], on_churn, u[k], k % 2 ? KEEL_BUS_ASYNC : KEEL_BUS_SYNC, k == 3 ? "g" : NULL);
        }
        nap(200 * 1000); /* let publishes reach them: a real-thread wait */
        for (int k = 0; k < 4; k++) {
            ck_assert_int_eq(keel_bus_unsubscribe(s[k]), 0);
            seen += atomic_load(&u[k]->calls);
            atomic_store(&u[k]->magic, 0xdeadbeef);
            free(u[k]);
        }
    }
    atomic_store(&stop, 1);
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
    ck_assert_uint_gt(seen, 0);
    ck_assert_uint_gt(p[0].n + p[1].n, 0);
    keel_bus_destroy(b);
}
END_TEST

/* Several threads subscribe and unsubscribe at once while others
 * publish: each unsubscribe must wait for its own grace period even when
 * another thread collected the garbage first. */
typedef struct churner {
    keel_bus *b;
    int rounds;
} churner;

static void *churn_subscriber(void *arg)
{
    churner *c = arg;
    for (int i = 0; i < c->rounds; i++) {
        churn_ud *u = calloc(1, sizeof *u);
        atomic_store(&u->magic, 0x600dcafe);
        keel_bus_sub *s = sub(c->b, i % 2 ? "churn.*.b" : "churn.a.>", on_churn, u, KEEL_BUS_SYNC, NULL);
        ck_assert_int_eq(keel_bus_unsubscribe(s), 0);
        atomic_store(&u->magic, 0xdeadbeef);
        free(u);
    }
    return NULL;
}

START_TEST(many_threads_unsubscribe_while_others_publish)
{
    keel_bus *b = bus_new(0, 0, KEEL_BUS_BLOCK);
    _Atomic int stop = 0;
    pub_loop p[2] = {{b, &stop, "churn.a.b", 0, 0}, {b, &stop, "churn.a.b", 0, 0}};
    pthread_t pt[2], st[3];
    for (int i = 0; i < 2; i++)
        pthread_create(&pt[i], NULL, publish_until_stopped, &p[i]);
    churner c = {b, 300};
    for (int i = 0; i < 3; i++)
        pthread_create(&st[i], NULL, churn_subscriber, &c);
    for (int i = 0; i < 3; i++)
        pthread_join(st[i], NULL);
    atomic_store(&stop, 1);
    for (int i = 0; i < 2; i++)
        pthread_join(pt[i], NULL);
    keel_bus_stats s;
    keel_bus_stats_get(b, &s);
    ck_assert_uint_eq(s.subscriptions, 0);
    keel_bus_destroy(b);
}
END_TEST

/* ---- failures ---- */

typedef struct errs {
    int n, last;
    keel_bus_sub *sub;
    char subject[32];
} errs;

static void on_error(keel_bus_sub *s, const keel_bus_msg *m, int err, void *ud)
{
    errs *e = ud;
    e->n++;
    e->last = err;
    e->sub = s;
    snprintf(e->subject, sizeof e->subject, "%s", m->subject);
}

START_TEST(a_failing_handler_does_not_stop_the_others)
{
    errs e = {0};
    keel_bus *b;
    keel_bus_opts o = {.workers = 1, .on_error = on_error, .ud = &e};
    ck_assert_int_eq(keel_bus_create(&b, &o), 0);
    rec *r[3];
    keel_bus_sub *s[3];
    for (int i = 0; i < 3; i++) {
        r[i] = rec_new(i, NULL);
        s[i] = sub(b, "f.x", on_rec, r[i], KEEL_BUS_SYNC, NULL);
    }
    r[1]->fail = -42;
    ck_assert_int_eq(pub(b, "f.x"), 0); /* a handler's failure is not the publisher's */
    for (int i = 0; i < 3; i++)
        ck_assert_uint_eq(r[i]->n, 1);
    ck_assert_int_eq(e.n, 1);
    ck_assert_int_eq(e.last, -42);
    ck_assert_ptr_eq(e.sub, s[1]);
    ck_assert_str_eq(e.subject, "f.x");
    keel_bus_stats st;
    keel_bus_stats_get(b, &st);
    ck_assert_uint_eq(st.delivered, 2);
    ck_assert_uint_eq(st.failed, 1);
    keel_bus_destroy(b);
    for (int i = 0; i < 3; i++)
        free(r[i]);
}
END_TEST

/* ---- drain, destroy, full queues ---- */

typedef struct gate {
    _Atomic int closed;
    _Atomic size_t entered, n;
} gate;

static int on_gate(const keel_bus_msg *m, void *ud)
{
    (void)m;
    gate *g = ud;
    atomic_fetch_add(&g->entered, 1);
    while (atomic_load(&g->closed))
        nap(100 * 1000); /* a real-thread wait: the test opens the gate */
    atomic_fetch_add(&g->n, 1);
    return 0;
}

START_TEST(drain_and_destroy_lose_nothing)
{
    gate *g = calloc(1, sizeof *g);
    keel_bus *b = bus_new(2, 100000, KEEL_BUS_BLOCK);
    sub(b, "d.>", on_gate, g, KEEL_BUS_ASYNC, NULL);
    char subj[16];
    for (int i = 0; i < 50000; i++) {
        snprintf(subj, sizeof subj, "d.%d", i % 7);
        ck_assert_int_eq(pub(b, subj), 0);
    }
    ck_assert_int_eq(keel_bus_drain(b), 0);
    ck_assert_uint_eq(atomic_load(&g->n), 50000);
    for (int i = 0; i < 20000; i++)
        ck_assert_int_eq(pub(b, "d.x"), 0);
    keel_bus_destroy(b); /* runs what is queued */
    ck_assert_uint_eq(atomic_load(&g->n), 70000);
    /* the smallest queue (capacity 1 is rounded up to 2) */
    b = bus_new(1, 1, KEEL_BUS_BLOCK);
    sub(b, "d", on_gate, g, KEEL_BUS_ASYNC, NULL);
    for (int i = 0; i < 1000; i++)
        ck_assert_int_eq(pub(b, "d"), 0);
    ck_assert_int_eq(keel_bus_drain(b), 0);
    ck_assert_uint_eq(atomic_load(&g->n), 71000);
    keel_bus_destroy(b);
    free(g);
}
END_TEST

/* Each handler publishes the next hop to another subject (and so,
 * likely, another worker) until the tenth: destroy runs them all. */
typedef struct hops {
    keel_bus *b;
    _Atomic int n;
} hops;

static int on_hop(const keel_bus_msg *m, void *ud)
{
    hops *h = ud;
    atomic_fetch_add(&h->n, 1);
    int k = atoi(m->subject + 4);
    if (k < 9) {
        char next[16];
        snprintf(next, sizeof next, "hop.%d", k + 1);
        ck_assert_int_eq(pub(h->b, next), 0);
    }
    return 0;
}

START_TEST(destroy_runs_what_handlers_queue_meanwhile)
{
    hops h = {bus_new(4, 0, KEEL_BUS_BLOCK), 0};
    sub(h.b, "hop.*", on_hop, &h, KEEL_BUS_ASYNC, NULL);
    for (int i = 0; i < 20; i++)
        ck_assert_int_eq(pub(h.b, "hop.0"), 0);
    keel_bus_destroy(h.b);
    ck_assert_int_eq(atomic_load(&h.n), 200);
}
END_TEST

START_TEST(each_full_queue_policy)
{
    for (int pol = 0; pol < 3; pol++) {
        gate *g = calloc(1, sizeof *g);
        atomic_store(&g->closed, 1);
        errs e = {0};
        keel_bus *b;
        keel_bus_opts o = {.workers = 1, .capacity = 4, .on_full = (keel_bus_full)pol,
                           .block_timeout_ns = 20 * MS, .on_error = on_error, .ud = &e};
        ck_assert_int_eq(keel_bus_create(&b, &o), 0);
        keel_bus_sub *s = sub(b, "q", on_gate, g, KEEL_BUS_ASYNC, NULL);
        ck_assert_int_eq(pub(b, "q"), 0);
        while (atomic_load(&g->entered) == 0) /* the worker holds the first one */
            nap(100 * 1000);
        for (int i = 0; i < 4; i++)
            ck_assert_int_eq(pub(b, "q"), 0);
        uint64_t t0 = keel_now_ns();
        int rc = pub(b, "q");
        uint64_t waited = keel_now_ns() - t0;
        keel_bus_stats st;
        keel_bus_stats_get(b, &st);
        ck_assert_uint_eq(st.queued, 4);
        if (pol == KEEL_BUS_BLOCK) {
            ck_assert_int_eq(rc, KEEL_ETIMEDOUT);
            ck_assert_uint_ge(waited, 19 * MS); /* it did wait its timeout */
            ck_assert_uint_eq(st.rejected, 1);
        } else if (pol == KEEL_BUS_REJECT) {
            ck_assert_int_eq(rc, KEEL_EFULL);
            ck_assert_uint_eq(st.rejected, 1);
        } else {
            ck_assert_int_eq(rc, 0);
            ck_assert_uint_eq(st.dropped, 1);
            ck_assert_int_eq(e.n, 1); /* the oldest, reported */
            ck_assert_int_eq(e.last, KEEL_EFULL);
            ck_assert_ptr_eq(e.sub, s);
        }
        atomic_store(&g->closed, 0);
        ck_assert_int_eq(keel_bus_drain(b), 0);
        ck_assert_uint_eq(atomic_load(&g->n), 5);
        keel_bus_destroy(b);
        free(g);
    }
}
END_TEST

/* A publisher blocked on a full queue gets through once the worker makes
 * room (no timeout). */
typedef struct blocked {
    keel_bus *b;
    int rc;
} blocked;

static void *blocked_pub(void *arg)
{
    blocked *x = arg;
    x->rc = pub(x->b, "q");
    return NULL;
}

START_TEST(a_blocked_publisher_goes_on_when_room_is_made)
{
    gate *g = calloc(1, sizeof *g);
    atomic_store(&g->closed, 1);
    keel_bus *b = bus_new(1, 2, KEEL_BUS_BLOCK);
    sub(b, "q", on_gate, g, KEEL_BUS_ASYNC, NULL);
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(pub(b, "q"), 0);
    while (atomic_load(&g->entered) == 0)
        nap(100 * 1000);
    blocked x = {b, 99};
    pthread_t t;
    pthread_create(&t, NULL, blocked_pub, &x);
    nap(20 * MS); /* settle: it must still be waiting */
    ck_assert_uint_eq(atomic_load(&g->n), 0);
    atomic_store(&g->closed, 0);
    pthread_join(t, NULL);
    ck_assert_int_eq(x.rc, 0);
    ck_assert_int_eq(keel_bus_drain(b), 0);
    ck_assert_uint_eq(atomic_load(&g->n), 4);
    keel_bus_destroy(b);
    free(g);
}
END_TEST

/* A publisher whose wait for room times out tries once more, and that try
 * may find room: then the delivery is queued exactly once and the publish
 * returns 0. Publishers with a 1 ns limit race a worker that empties a
 * queue of two: every publish that returned 0 is delivered once, and no
 * other. */
static int count_call(const keel_bus_msg *m, void *ud)
{
    (void)m;
    atomic_fetch_add((atomic_int *)ud, 1);
    return 0;
}

typedef struct racer {
    keel_bus *b;
    size_t ok, timedout;
} racer;

static void *race_full_queue(void *arg)
{
    racer *x = arg;
    for (int i = 0; i < 20000; i++) {
        int rc = pub(x->b, "q");
        ck_assert(rc == 0 || rc == KEEL_ETIMEDOUT);
        if (rc == 0)
            x->ok++;
        else
            x->timedout++;
    }
    return NULL;
}

START_TEST(a_timed_out_wait_that_finds_room_queues_once)
{
    keel_bus *b;
    keel_bus_opts o = {.workers = 1, .capacity = 2, .on_full = KEEL_BUS_BLOCK, .block_timeout_ns = 1};
    ck_assert_int_eq(keel_bus_create(&b, &o), 0);
    atomic_int calls = 0;
    sub(b, "q", count_call, &calls, KEEL_BUS_ASYNC, NULL);
    racer x[3] = {{b, 0, 0}, {b, 0, 0}, {b, 0, 0}};
    pthread_t t[3];
    for (int i = 0; i < 3; i++)
        pthread_create(&t[i], NULL, race_full_queue, &x[i]);
    for (int i = 0; i < 3; i++)
        pthread_join(t[i], NULL);
    ck_assert_int_eq(keel_bus_drain(b), 0);
    size_t ok = x[0].ok + x[1].ok + x[2].ok, timedout = x[0].timedout + x[1].timedout + x[2].timedout;
    keel_bus_stats st;
    keel_bus_stats_get(b, &st);
    ck_assert_uint_eq(st.rejected, timedout);
    ck_assert_uint_eq((size_t)atomic_load(&calls), ok);
    keel_bus_destroy(b);
}
END_TEST

/* block_timeout_ns bounds a publish's wait, however many of its async
 * deliveries find a full queue: eight subscriptions on one full queue
 * once made a publish wait eight times the limit. */
START_TEST(a_blocked_publish_waits_its_timeout_once)
{
    gate *g = calloc(1, sizeof *g);
    atomic_store(&g->closed, 1);
    keel_bus *b;
    keel_bus_opts o = {.workers = 1, .capacity = 2, .on_full = KEEL_BUS_BLOCK, .block_timeout_ns = 25 * MS};
    ck_assert_int_eq(keel_bus_create(&b, &o), 0);
    sub(b, "hold", on_gate, g, KEEL_BUS_ASYNC, NULL);
    atomic_int calls = 0;
    for (int i = 0; i < 8; i++)
        sub(b, "q", count_call, &calls, KEEL_BUS_ASYNC, NULL);
    ck_assert_int_eq(pub(b, "hold"), 0);
    while (atomic_load(&g->entered) == 0) /* the worker holds it: the queue stays full */
        nap(100 * 1000);
    uint64_t t0 = keel_now_ns();
    ck_assert_int_eq(pub(b, "q"), KEEL_ETIMEDOUT); /* two queued, six refused */
    uint64_t waited = keel_now_ns() - t0;
    ck_assert_uint_ge(waited, 24 * MS);
    ck_assert_msg(waited < 100 * MS, "a publish waited %llu ms for a limit of 25",
                  (unsigned long long)(waited / MS));
    keel_bus_stats st;
    keel_bus_stats_get(b, &st);
    ck_assert_uint_eq(st.rejected, 6);
    atomic_store(&g->closed, 0);
    ck_assert_int_eq(keel_bus_drain(b), 0);
    ck_assert_int_eq(atomic_load(&calls), 2);
    keel_bus_destroy(b);
    free(g);
}
END_TEST

/* Handlers that call back into the bus: publish (sync and async), drain. */
typedef struct reent {
    keel_bus *b;
    int drain_rc, depth;
    _Atomic int echoes;
} reent;

static int on_reent(const keel_bus_msg *m, void *ud)
{
    reent *r = ud;
    if (strcmp(m->subject, "re.in") == 0) {
        r->drain_rc = keel_bus_drain(r->b);
        ck_assert_int_eq(pub(r->b, "re.echo"), 0);
    } else {
        atomic_fetch_add(&r->echoes, 1);
    }
    return 0;
}

START_TEST(handlers_may_publish_but_a_worker_may_not_drain)
{
    keel_bus *b = bus_new(2, 0, KEEL_BUS_BLOCK);
    reent r = {.b = b, .drain_rc = 99};
    sub(b, "re.*", on_reent, &r, KEEL_BUS_ASYNC, NULL);
    ck_assert_int_eq(pub(b, "re.in"), 0);
    ck_assert_int_eq(keel_bus_drain(b), 0);
    ck_assert_int_eq(keel_bus_drain(b), 0); /* the echo was queued by the first */
    ck_assert_int_eq(r.drain_rc, KEEL_ESTATE);
    ck_assert_int_eq(atomic_load(&r.echoes), 1);
    keel_bus_destroy(b);
}
END_TEST

/* on_error, told of a delivery dropped from a full queue, drains: the
 * publisher's thread is no worker, so drain waits for the queue to be run,
 * and the dropped delivery, already gone, must not hold it (it once waited
 * for itself forever). */
typedef struct drainer {
    keel_bus *b;
    gate *g;
    _Atomic int entered, rc, done;
} drainer;

static void on_drop_drain(keel_bus_sub *s, const keel_bus_msg *m, int err, void *ud)
{
    (void)s, (void)m;
    drainer *d = ud;
    if (err != KEEL_EFULL || atomic_exchange(&d->entered, 1))
        return;
    atomic_store(&d->rc, keel_bus_drain(d->b));
}

static void *publish_past_full(void *arg)
{
    drainer *d = arg;
    ck_assert_int_eq(pub(d->b, "q"), 0);
    atomic_store(&d->done, 1);
    return NULL;
}

START_TEST(on_error_of_a_dropped_delivery_may_drain)
{
    gate *g = calloc(1, sizeof *g);
    atomic_store(&g->closed, 1);
    drainer *d = calloc(1, sizeof *d);
    atomic_store(&d->rc, 99);
    keel_bus_opts o = {.workers = 1, .capacity = 2, .on_full = KEEL_BUS_DROP_OLDEST, .on_error = on_drop_drain,
                       .ud = d};
    ck_assert_int_eq(keel_bus_create(&d->b, &o), 0);
    sub(d->b, "q", on_gate, g, KEEL_BUS_ASYNC, NULL);
    ck_assert_int_eq(pub(d->b, "q"), 0);
    while (atomic_load(&g->entered) == 0) /* the worker holds the first one */
        nap(100 * 1000);
    for (int i = 0; i < 2; i++)
        ck_assert_int_eq(pub(d->b, "q"), 0);
    pthread_t t;
    pthread_create(&t, NULL, publish_past_full, d);
    while (!atomic_load(&d->entered))
        nap(100 * 1000);
    atomic_store(&g->closed, 0); /* the queue can be run now */
    uint64_t deadline = keel_now_ns() + 5 * S;
    while (!atomic_load(&d->done) && keel_now_ns() < deadline)
        nap(MS);
    ck_assert_msg(atomic_load(&d->done), "drain from on_error waits for the dropped delivery forever");
    pthread_join(t, NULL);
    ck_assert_int_eq(atomic_load(&d->rc), 0);
    ck_assert_int_eq(keel_bus_drain(d->b), 0);
    ck_assert_uint_eq(atomic_load(&g->n), 3); /* the first, one queued, the last */
    keel_bus_destroy(d->b);
    free(d);
    free(g);
}
END_TEST

/* ---- more promises, checked ---- */

/* An async handler of one subscription unsubscribes another, whose
 * deliveries run meanwhile on the other worker, and frees its ud at once:
 * a later call is a use after free (ASan) or a poisoned magic (here). */
typedef struct killer {
    keel_bus_sub *victim;
    churn_ud *victim_ud;
    _Atomic int done;
} killer;

static int on_kill(const keel_bus_msg *m, void *ud)
{
    (void)m;
    killer *k = ud;
    if (atomic_load(&k->done))
        return 0;
    ck_assert_int_eq(keel_bus_unsubscribe(k->victim), 0);
    atomic_store(&k->victim_ud->magic, 0xdeadbeef);
    free(k->victim_ud);
    atomic_store(&k->done, 1);
    return 0;
}

START_TEST(a_handler_unsubscribes_another_running_elsewhere_and_frees_its_ud)
{
    for (int round = 0; round < 20; round++) {
        keel_bus *b = bus_new(2, 1 << 12, KEEL_BUS_BLOCK);
        killer k = {0};
        k.victim_ud = calloc(1, sizeof *k.victim_ud);
        atomic_store(&k.victim_ud->magic, 0x600dcafe);
        k.victim = sub(b, "v.>", on_churn, k.victim_ud, round % 2 ? KEEL_BUS_ASYNC : KEEL_BUS_SYNC, NULL);
        sub(b, "v.kill", on_kill, &k, KEEL_BUS_ASYNC, NULL);
        char subj[16];
        for (int i = 0; i < 3000; i++) {
            snprintf(subj, sizeof subj, "v.%d", i % 13);
            ck_assert_int_eq(pub(b, i == 1500 ? "v.kill" : subj), 0);
        }
        ck_assert_int_eq(keel_bus_drain(b), 0);
        ck_assert_int_eq(atomic_load(&k.done), 1);
        keel_bus_destroy(b);
    }
}
END_TEST

/* A handler running on both workers unsubscribes itself on one of them
 * and frees its ud before returning: the call in the other worker was
 * waited for, and none follows. */
typedef struct self_free {
    keel_bus_sub *me;
    _Atomic uint32_t magic;
    _Atomic int calls;
} self_free;

static _Atomic int self_freed;

static int on_self_free(const keel_bus_msg *m, void *ud)
{
    (void)m;
    self_free *s = ud;
    ck_assert_uint_eq(atomic_load(&s->magic), 0x600dcafe);
    if (atomic_fetch_add(&s->calls, 1) == 500) {
        if (keel_bus_unsubscribe(s->me) == 0) {
            atomic_store(&s->magic, 0xdeadbeef);
            free(s);
            atomic_store(&self_freed, 1);
        }
        return 0;
    }
    nap(1000); /* overlap with the other worker */
    ck_assert_uint_eq(atomic_load(&s->magic), 0x600dcafe);
    return 0;
}

START_TEST(a_handler_may_free_its_ud_after_unsubscribing_itself)
{
    keel_bus *b = bus_new(2, 1 << 12, KEEL_BUS_BLOCK);
    self_free *s = calloc(1, sizeof *s);
    atomic_store(&s->magic, 0x600dcafe);
    atomic_store(&self_freed, 0);
    s->me = sub(b, "sf.*", on_self_free, s, KEEL_BUS_ASYNC, NULL);
    char subj[16];
    for (int i = 0; i < 2000; i++) {
        snprintf(subj, sizeof subj, "sf.%d", i % 5);
        ck_assert_int_eq(pub(b, subj), 0);
    }
    ck_assert_int_eq(keel_bus_drain(b), 0);
    ck_assert_int_eq(atomic_load(&self_freed), 1);
    keel_bus_destroy(b);
}
END_TEST

/* Ids from several threads at once: all different, and each thread's in
 * increasing order. */
typedef struct idrun {
    keel_bus *b;
    char (*ids)[KEEL_BUS_ID_MAX];
} idrun;

static void *publish_ids(void *arg)
{
    idrun *r = arg;
    for (int i = 0; i < 20000; i++)
        ck_assert_int_eq(keel_bus_publish(r->b, "id.x", "x", 1, NULL, 0, r->ids[i]), 0);
    return NULL;
}

/* Counts messages whose time is not their id's millisecond. */
static int on_id_time(const keel_bus_msg *m, void *ud)
{
    if (m->time_ns != strtoull(m->id, NULL, 10) * MS)
        atomic_fetch_add((_Atomic size_t *)ud, 1);
    return 0;
}

static int cmp_id(const void *a, const void *b)
{
    unsigned long long am, as, bm, bs;
    sscanf(a, "%llu-%llu", &am, &as);
    sscanf(b, "%llu-%llu", &bm, &bs);
    return am != bm ? (am > bm) - (am < bm) : (as > bs) - (as < bs);
}

START_TEST(ids_are_unique_and_ordered_across_threads)
{
    keel_bus *b = bus_new(0, 0, KEEL_BUS_BLOCK);
    keel_bus *b2 = bus_new(0, 0, KEEL_BUS_BLOCK);
    enum { T = 4, N = 20000 };
    char (*ids)[KEEL_BUS_ID_MAX] = calloc(T * N, KEEL_BUS_ID_MAX);
    _Atomic size_t off = 0; /* time and id agree, whichever thread moved the id on */
    sub(b, "id.x", on_id_time, &off, KEEL_BUS_SYNC, NULL);
    sub(b2, "id.x", on_id_time, &off, KEEL_BUS_SYNC, NULL);
    idrun r[T];
    pthread_t t[T];
    for (int i = 0; i < T; i++) {
        r[i] = (idrun){i % 2 ? b2 : b, ids + i * N};
        pthread_create(&t[i], NULL, publish_ids, &r[i]);
    }
    for (int i = 0; i < T; i++)
        pthread_join(t[i], NULL);
    for (int i = 0; i < T; i++)
        for (int k = 1; k < N; k++)
            ck_assert_msg(cmp_id(ids[i * N + k - 1], ids[i * N + k]) < 0, "%s then %s", ids[i * N + k - 1],
                          ids[i * N + k]);
    qsort(ids, T * N, KEEL_BUS_ID_MAX, cmp_id);
    for (int k = 1; k < T * N; k++)
        ck_assert_msg(cmp_id(ids[k - 1], ids[k]) != 0, "%s twice", ids[k]);
    ck_assert_uint_eq(atomic_load(&off), 0);
    free(ids);
    keel_bus_destroy(b);
    keel_bus_destroy(b2);
}
END_TEST

/* Async deliveries see copies: the publisher's buffers may change at once. */
START_TEST(async_deliveries_see_copies_of_data_and_headers)
{
    gate *g = calloc(1, sizeof *g);
    atomic_store(&g->closed, 1);
    keel_bus *b = bus_new(1, 0, KEEL_BUS_BLOCK);
    look la = {0};
    sub(b, "c", on_gate, g, KEEL_BUS_ASYNC, NULL); /* holds the worker */
    sub(b, "c.*", on_look, &la, KEEL_BUS_ASYNC, NULL);
    ck_assert_int_eq(pub(b, "c"), 0);
    while (atomic_load(&g->entered) == 0)
        nap(100 * 1000);
    char subject[16] = "c.orig", data[8] = "payload", k[8] = "key", v[8] = "value";
    keel_bus_header h[1] = {{k, v}};
    ck_assert_int_eq(keel_bus_publish(b, subject, data, 7, h, 1, NULL), 0);
    strcpy(subject, "c.XXXX");
    memset(data, 'Z', sizeof data);
    strcpy(k, "KKK");
    strcpy(v, "VVVVV");
    h[0].key = "other";
    atomic_store(&g->closed, 0);
    ck_assert_int_eq(keel_bus_drain(b), 0);
    ck_assert_int_eq(la.calls, 1);
    ck_assert_str_eq(la.subject, "c.orig");
    ck_assert_int_eq(memcmp(la.data, "payload", 7), 0);
    ck_assert_str_eq(la.hk, "key");
    ck_assert_str_eq(la.hv, "value");
    keel_bus_destroy(b);
    free(g);
}
END_TEST

/* DROP_OLDEST drops the oldest queued delivery: on_error sees it. */
typedef struct dropped_log {
    char data[16][4];
    int n;
} dropped_log;

static void on_drop_log(keel_bus_sub *s, const keel_bus_msg *m, int err, void *ud)
{
    (void)s;
    dropped_log *d = ud;
    ck_assert_int_eq(err, KEEL_EFULL);
    if (d->n < 16)
        snprintf(d->data[d->n++], 4, "%.*s", (int)m->len, (const char *)m->data);
}

START_TEST(drop_oldest_drops_the_oldest)
{
    gate *g = calloc(1, sizeof *g);
    atomic_store(&g->closed, 1);
    dropped_log d = {0};
    keel_bus *b;
    keel_bus_opts o = {.workers = 1, .capacity = 4, .on_full = KEEL_BUS_DROP_OLDEST, .on_error = on_drop_log,
                       .ud = &d};
    ck_assert_int_eq(keel_bus_create(&b, &o), 0);
    sub(b, "q", on_gate, g, KEEL_BUS_ASYNC, NULL);
    ck_assert_int_eq(keel_bus_publish(b, "q", "0", 1, NULL, 0, NULL), 0);
    while (atomic_load(&g->entered) == 0)
        nap(100 * 1000);
    char s[4];
    for (int i = 1; i <= 7; i++) {
        snprintf(s, sizeof s, "%d", i);
        ck_assert_int_eq(keel_bus_publish(b, "q", s, strlen(s), NULL, 0, NULL), 0);
    }
    ck_assert_int_eq(d.n, 3);
    ck_assert_str_eq(d.data[0], "1");
    ck_assert_str_eq(d.data[1], "2");
    ck_assert_str_eq(d.data[2], "3");
    keel_bus_stats st;
    keel_bus_stats_get(b, &st);
    ck_assert_uint_eq(st.dropped, 3);
    atomic_store(&g->closed, 0);
    ck_assert_int_eq(keel_bus_drain(b), 0);
    ck_assert_uint_eq(atomic_load(&g->n), 5);
    keel_bus_destroy(b);
    free(g);
}
END_TEST

/* DROP_OLDEST and a delivery queued for a subscription that left: a
 * queue group's goes to on_error with no subscription (its member is
 * gone, none other takes it); another's is skipped as the worker would
 * have skipped it, neither counted nor reported. */
typedef struct drop_who {
    keel_bus_sub *sub[8];
    char data[8][4];
    int n;
} drop_who;

static void on_drop_who(keel_bus_sub *s, const keel_bus_msg *m, int err, void *ud)
{
    drop_who *d = ud;
    ck_assert_int_eq(err, KEEL_EFULL);
    ck_assert_int_lt(d->n, 8);
    d->sub[d->n] = s;
    snprintf(d->data[d->n++], 4, "%.*s", (int)m->len, (const char *)m->data);
}

START_TEST(drop_oldest_reports_a_left_members_delivery_with_no_subscription)
{
    gate *g = calloc(1, sizeof *g);
    atomic_store(&g->closed, 1);
    drop_who d = {0};
    keel_bus *b;
    keel_bus_opts o = {.workers = 1, .capacity = 2, .on_full = KEEL_BUS_DROP_OLDEST, .on_error = on_drop_who,
                       .ud = &d};
    ck_assert_int_eq(keel_bus_create(&b, &o), 0);
    sub(b, "block", on_gate, g, KEEL_BUS_ASYNC, NULL);
    rec *ra = rec_new(0, NULL), *rb = rec_new(1, NULL), *rc = rec_new(2, NULL);
    keel_bus_sub *a = sub(b, "g.x", on_rec, ra, KEEL_BUS_ASYNC, "g");
    keel_bus_sub *m = sub(b, "g.x", on_rec, rb, KEEL_BUS_ASYNC, "g");
    keel_bus_sub *c = sub(b, "c.x", on_rec, rc, KEEL_BUS_ASYNC, NULL);
    ck_assert_int_eq(pub(b, "block"), 0);
    while (atomic_load(&g->entered) == 0)
        nap(100 * 1000);
    ck_assert_int_eq(keel_bus_publish(b, "g.x", "1", 1, NULL, 0, NULL), 0); /* a's turn */
    ck_assert_int_eq(keel_bus_publish(b, "g.x", "2", 1, NULL, 0, NULL), 0); /* m's */
    ck_assert_int_eq(keel_bus_unsubscribe(a), 0);
    ck_assert_int_eq(keel_bus_publish(b, "g.x", "3", 1, NULL, 0, NULL), 0); /* drops 1: a's, gone */
    ck_assert_int_eq(keel_bus_publish(b, "c.x", "4", 1, NULL, 0, NULL), 0); /* drops 2 */
    ck_assert_int_eq(keel_bus_unsubscribe(c), 0);
    ck_assert_int_eq(keel_bus_publish(b, "g.x", "5", 1, NULL, 0, NULL), 0); /* drops 3 */
    ck_assert_int_eq(keel_bus_publish(b, "g.x", "6", 1, NULL, 0, NULL), 0); /* drops 4: c's, gone */
    ck_assert_int_eq(d.n, 3);
    ck_assert_ptr_null(d.sub[0]);
    ck_assert_str_eq(d.data[0], "1");
    ck_assert_ptr_eq(d.sub[1], m);
    ck_assert_str_eq(d.data[1], "2");
    ck_assert_ptr_eq(d.sub[2], m);
    ck_assert_str_eq(d.data[2], "3");
    keel_bus_stats st;
    keel_bus_stats_get(b, &st);
    ck_assert_uint_eq(st.dropped, 3);
    atomic_store(&g->closed, 0);
    ck_assert_int_eq(keel_bus_drain(b), 0);
    ck_assert_uint_eq(rb->n, 2); /* 5 and 6 */
    ck_assert_uint_eq(ra->n + rc->n, 0);
    keel_bus_destroy(b);
    free(ra);
    free(rb);
    free(rc);
    free(g);
}
END_TEST

/* A queue group of sync and async members: each message to exactly one. */
START_TEST(a_group_may_mix_sync_and_async_members)
{
    keel_bus *b = bus_new(2, 0, KEEL_BUS_BLOCK);
    rec *m[4];
    for (int i = 0; i < 4; i++) {
        m[i] = rec_new(i, NULL);
        sub(b, i % 2 ? "mix.*" : "mix.>", on_rec, m[i], i % 2 ? KEEL_BUS_ASYNC : KEEL_BUS_SYNC, "g");
    }
    for (int i = 0; i < 4000; i++)
        ck_assert_int_eq(pub(b, i % 2 ? "mix.a" : "mix.b"), 0);
    ck_assert_int_eq(keel_bus_drain(b), 0);
    size_t sum = 0;
    for (int i = 0; i < 4; i++) {
        ck_assert_uint_ge(m[i]->n, 500);
        sum += m[i]->n;
    }
    ck_assert_uint_eq(sum, 4000);
    keel_bus_destroy(b);
    for (int i = 0; i < 4; i++)
        free(m[i]);
}
END_TEST

/* ---- a queue group member that leaves with deliveries queued ---- */

/* A member for the tests below: a message's data is its number, and
 * seen[number] counts the calls it got in its group. While `hold` is set
 * a call raises `held` and waits: the worker stops there and the group's
 * later deliveries pile up in its queue. */
typedef struct member {
    pthread_mutex_t mu;
    _Atomic int *seen;
    _Atomic int hold, held;
    pthread_t home;   /* the thread that publishes */
    int calls, away;  /* away: calls run in another thread */
    int last[2];      /* the last number run at home, away */
    bool ordered;     /* in each of the two, the numbers increased */
} member;

static member *member_new(_Atomic int *seen, int hold)
{
    member *mb = calloc(1, sizeof *mb);
    pthread_mutex_init(&mb->mu, NULL);
    mb->seen = seen;
    atomic_store(&mb->hold, hold);
    mb->home = pthread_self();
    mb->last[0] = mb->last[1] = -1;
    mb->ordered = true;
    return mb;
}

static int msg_number(const keel_bus_msg *m)
{
    char s[16];
    snprintf(s, sizeof s, "%.*s", (int)m->len, (const char *)m->data);
    return atoi(s);
}

static int on_member(const keel_bus_msg *m, void *ud)
{
    member *mb = ud;
    int k = msg_number(m);
    atomic_fetch_add(&mb->seen[k], 1);
    pthread_mutex_lock(&mb->mu);
    int away = !pthread_equal(pthread_self(), mb->home);
    mb->calls++;
    mb->away += away;
    mb->ordered &= k > mb->last[away];
    mb->last[away] = k;
    pthread_mutex_unlock(&mb->mu);
    if (atomic_load(&mb->hold)) {
        atomic_store(&mb->held, 1);
        while (atomic_load(&mb->hold))
            nap(100 * 1000); /* a real-thread wait: the test lets go */
    }
    return 0;
}

static int pub_number(keel_bus *b, const char *subject, int k)
{
    char s[16];
    snprintf(s, sizeof s, "%d", k);
    return keel_bus_publish(b, subject, s, strlen(s), NULL, 0, NULL);
}

static void *unsubscribe_in_thread(void *arg)
{
    ck_assert_int_eq(keel_bus_unsubscribe(arg), 0);
    return NULL;
}

/* Starts unsubscribing s, whose handler mb is held in a call, from
 * another thread (which waits for that call), and returns once s is
 * unsubscribed (the bus counts `left` subscriptions): let go of mb, then
 * join *t. */
static void leave_while_held(keel_bus *b, keel_bus_sub *s, member *mb, uint64_t left, pthread_t *t)
{
    while (!atomic_load(&mb->held))
        nap(100 * 1000);
    pthread_create(t, NULL, unsubscribe_in_thread, s);
    for (keel_bus_stats st;;) {
        keel_bus_stats_get(b, &st);
        if (st.subscriptions == left)
            break;
        nap(100 * 1000);
    }
}

/* A group of an async member, which holds its first message, and one of
 * `mode`, splits n messages (the async one takes the even ones); the first
 * leaves with the rest of its share queued. Checks that every message ran
 * once, in order on the other member, and returns the drained bus. */
static keel_bus *one_of_two_leaves(_Atomic int *seen, int n, keel_bus_mode mode, member **left, member **other)
{
    keel_bus *b = bus_new(2, 0, KEEL_BUS_BLOCK);
    member *a = *left = member_new(seen, 1), *o = *other = member_new(seen, 0);
    keel_bus_sub *sa = sub(b, "grp.x", on_member, a, KEEL_BUS_ASYNC, "g");
    sub(b, "grp.x", on_member, o, mode, "g");
    for (int k = 0; k < n; k++)
        ck_assert_int_eq(pub_number(b, "grp.x", k), 0);
    pthread_t t;
    leave_while_held(b, sa, a, 1, &t);
    atomic_store(&a->hold, 0);
    pthread_join(t, NULL);
    ck_assert_int_eq(keel_bus_drain(b), 0);
    for (int k = 0; k < n; k++)
        ck_assert_msg(atomic_load(&seen[k]) == 1, "message %d delivered %d times", k, atomic_load(&seen[k]));
    ck_assert_int_eq(a->calls, 1);
    ck_assert_int_eq(o->calls, n - 1);
    ck_assert(o->ordered);
    return b;
}

/* Two async members split 1000 messages; the first holds its first one
 * and leaves with the rest of its share queued (once 499 messages that
 * reached nobody): the other member gets them, where they stood in the
 * queue, so in publish order. */
START_TEST(a_leaving_group_member_hands_its_queued_messages_to_the_others)
{
    enum { N = 1000 };
    _Atomic int *seen = calloc(N, sizeof *seen);
    member *a, *c;
    keel_bus *b = one_of_two_leaves(seen, N, KEEL_BUS_ASYNC, &a, &c);
    keel_bus_stats st;
    keel_bus_stats_get(b, &st);
    ck_assert_uint_eq(st.delivered, N);
    ck_assert_uint_eq(st.dropped, 0);
    keel_bus_destroy(b);
    free(a);
    free(c);
    free(seen);
}
END_TEST

typedef struct lost {
    int n, numbers[16];
    bool named;    /* an on_error call named a subscription */
    int other;     /* calls with another err */
} lost;

static void on_lost(keel_bus_sub *s, const keel_bus_msg *m, int err, void *ud)
{
    lost *l = ud;
    l->named |= s != NULL;
    if (err != KEEL_ENOTFOUND)
        l->other++;
    else if (l->n < 16)
        l->numbers[l->n++] = msg_number(m);
}

/* The last member of a group leaves with 9 deliveries queued: they are
 * dropped, counted and reported (with no subscription: it is gone). A
 * subscriber that takes the group's name meanwhile starts a new group,
 * which they do not reach; the deliveries queued for a subscription
 * outside any group that left are skipped without a word. */
START_TEST(a_group_whose_last_member_leaves_drops_and_reports_its_queue)
{
    lost l = {0};
    keel_bus *b;
    keel_bus_opts o = {.workers = 1, .on_error = on_lost, .ud = &l};
    ck_assert_int_eq(keel_bus_create(&b, &o), 0);
    _Atomic int seen[3][10] = {{0}};
    member *a = member_new(seen[0], 1), *c = member_new(seen[1], 0), *late = member_new(seen[2], 0);
    keel_bus_sub *sa = sub(b, "grp.x", on_member, a, KEEL_BUS_ASYNC, "g");
    keel_bus_sub *sc = sub(b, "grp.x", on_member, c, KEEL_BUS_ASYNC, NULL);
    for (int k = 0; k < 10; k++)
        ck_assert_int_eq(pub_number(b, "grp.x", k), 0);
    while (!atomic_load(&a->held))
        nap(100 * 1000);
    ck_assert_int_eq(keel_bus_unsubscribe(sc), 0);
    pthread_t t;
    leave_while_held(b, sa, a, 0, &t);
    sub(b, "grp.x", on_member, late, KEEL_BUS_ASYNC, "g");
    atomic_store(&a->hold, 0);
    pthread_join(t, NULL);
    ck_assert_int_eq(keel_bus_drain(b), 0);
    ck_assert_int_eq(a->calls, 1);
    ck_assert_int_eq(c->calls, 0);
    ck_assert_int_eq(late->calls, 0);
    ck_assert_int_eq(l.n, 9);
    for (int k = 1; k < 10; k++)
        ck_assert_int_eq(l.numbers[k - 1], k);
    ck_assert(!l.named);
    ck_assert_int_eq(l.other, 0);
    keel_bus_stats st;
    keel_bus_stats_get(b, &st);
    ck_assert_uint_eq(st.dropped, 9);
    ck_assert_uint_eq(st.rejected, 0);
    keel_bus_destroy(b);
    free(a);
    free(c);
    free(late);
}
END_TEST

/* An async member leaves a group whose other member is sync: its queued
 * deliveries run that member's handler in the worker thread, in the order
 * they were published. */
START_TEST(a_sync_group_member_takes_deliveries_queued_for_one_that_left)
{
    enum { N = 100 };
    _Atomic int seen[N] = {0};
    member *a, *s;
    keel_bus *b = one_of_two_leaves(seen, N, KEEL_BUS_SYNC, &a, &s); /* s ran the odd ones at their publish */
    ck_assert_int_eq(s->away, N / 2 - 1); /* 2, 4, ... 98, in the worker */
    keel_bus_stats st;
    keel_bus_stats_get(b, &st);
    ck_assert_uint_eq(st.dropped, 0);
    keel_bus_destroy(b);
    free(a);
    free(s);
}
END_TEST

/* A publish chose a sync group member that an earlier handler of the same
 * publish unsubscribes: the message goes to the group's other member (a
 * sync one runs it in the publisher, an async one gets it queued), or is
 * dropped and reported when there is none. */
static int on_evict(const keel_bus_msg *m, void *ud)
{
    (void)m;
    keel_bus_sub **victim = ud;
    if (*victim)
        ck_assert_int_eq(keel_bus_unsubscribe(*victim), 0);
    *victim = NULL;
    return 0;
}

START_TEST(a_sync_group_member_gone_before_its_call_leaves_the_message_to_the_others)
{
    for (int other = 0; other < 3; other++) { /* sync, async, none */
        lost l = {0};
        keel_bus *b;
        keel_bus_opts o = {.workers = 1, .on_error = on_lost, .ud = &l};
        ck_assert_int_eq(keel_bus_create(&b, &o), 0);
        _Atomic int seen[1] = {0};
        member *v = member_new(seen, 0), *w = member_new(seen, 0);
        keel_bus_sub *victim = NULL;
        sub(b, "grp.x", on_evict, &victim, KEEL_BUS_SYNC, NULL);
        victim = sub(b, "grp.x", on_member, v, KEEL_BUS_SYNC, "g");
        if (other < 2)
            sub(b, "grp.x", on_member, w, (keel_bus_mode)other, "g");
        ck_assert_int_eq(pub_number(b, "grp.x", 0), 0); /* chooses victim, then evicts it */
        ck_assert_int_eq(keel_bus_drain(b), 0);
        ck_assert_ptr_null(victim);
        ck_assert_int_eq(v->calls, 0);
        keel_bus_stats st;
        keel_bus_stats_get(b, &st);
        if (other < 2) {
            ck_assert_int_eq(w->calls, 1);
            ck_assert_int_eq(w->away, other); /* async: in the worker */
            ck_assert_uint_eq(st.dropped, 0);
            ck_assert_int_eq(l.n, 0);
        } else {
            ck_assert_uint_eq(st.dropped, 1);
            ck_assert_int_eq(l.n, 1);
            ck_assert(!l.named);
        }
        ck_assert_int_eq(l.other, 0);
        keel_bus_destroy(b);
        free(v);
        free(w);
    }
}
END_TEST

START_TEST(many_subscriptions_come_and_go)
{
    keel_bus *b = bus_new(0, 0, KEEL_BUS_BLOCK);
    enum { N = 5000 };
    keel_bus_sub **s = calloc(N, sizeof *s);
    rec *hit = rec_new(0, NULL);
    char pat[32];
    for (int i = 0; i < N; i++) {
        snprintf(pat, sizeof pat, "svc%d.%s", i, i % 3 == 0 ? "*" : i % 3 == 1 ? ">" : "evt");
        s[i] = sub(b, pat, on_rec, hit, KEEL_BUS_SYNC, NULL);
    }
    for (int i = 0; i < N; i++) {
        snprintf(pat, sizeof pat, "svc%d.evt", i);
        ck_assert_int_eq(pub(b, pat), 0);
    }
    ck_assert_uint_eq(hit->n, N);
    for (int i = 0; i < N; i += 2)
        ck_assert_int_eq(keel_bus_unsubscribe(s[i]), 0);
    for (int i = 0; i < N; i++) {
        snprintf(pat, sizeof pat, "svc%d.evt", i);
        ck_assert_int_eq(pub(b, pat), 0);
    }
    ck_assert_uint_eq(hit->n, N + N / 2);
    keel_bus_destroy(b); /* frees the rest */
    free(hit);
    free(s);
}
END_TEST

START_TEST(metrics_report_the_counters)
{
    keel_metrics *m;
    keel_metrics_opts mo = {0};
    ck_assert_int_eq(keel_metrics_create(&m, &mo), 0);
    keel_bus *b;
    keel_bus_opts o = {.metrics = m, .metrics_name = "events"};
    ck_assert_int_eq(keel_bus_create(&b, &o), 0);
    rec *r = rec_new(0, NULL);
    sub(b, "m", on_rec, r, KEEL_BUS_SYNC, NULL);
    ck_assert_int_eq(pub(b, "m"), 0);
    char *text;
    size_t len;
    ck_assert_int_eq(keel_metrics_render_buf(m, KEEL_METRICS_PROMETHEUS, &text, &len), 0);
    ck_assert_ptr_nonnull(strstr(text, "keel_bus_published_total{bus=\"events\"} 1\n"));
    ck_assert_ptr_nonnull(strstr(text, "keel_bus_delivered_total{bus=\"events\"} 1\n"));
    ck_assert_ptr_nonnull(strstr(text, "keel_bus_subscriptions{bus=\"events\"} 1\n"));
    keel_free(text);
    keel_bus_destroy(b);
    keel_metrics_destroy(m);
    free(r);
}
END_TEST

START_TEST(bad_input_is_refused)
{
    keel_bus *b;
    keel_bus_opts bad[] = {{.workers = 2000}, {.partitions = 65}, {.on_full = (keel_bus_full)7},
                           {.service = "a b"}, {.consumer = ""}, {.prefix = ""}, {.read_count = 100001}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        ck_assert_int_eq(keel_bus_create(&b, &bad[i]), KEEL_EINVAL);
    ck_assert_int_eq(keel_bus_create(NULL, NULL), KEEL_EINVAL);
    ck_assert_int_eq(keel_bus_create(&b, NULL), 0);
    ck_assert_int_eq(keel_bus_start(b), KEEL_ESTATE); /* no redis */
    ck_assert_int_eq(keel_bus_start(NULL), KEEL_EINVAL);
    rec *r = rec_new(0, NULL);
    keel_bus_sub *s = NULL;
    for (size_t i = 0; i < sizeof bad_patterns / sizeof bad_patterns[0]; i++) {
        keel_bus_sub_opts so = {.pattern = bad_patterns[i], .handler = on_rec, .ud = r};
        ck_assert_int_eq(keel_bus_subscribe(b, &so, &s), KEEL_EINVAL);
    }
    keel_bus_sub_opts so = {.pattern = "a", .handler = NULL};
    ck_assert_int_eq(keel_bus_subscribe(b, &so, &s), KEEL_EINVAL);
    so = (keel_bus_sub_opts){.pattern = NULL, .handler = on_rec};
    ck_assert_int_eq(keel_bus_subscribe(b, &so, &s), KEEL_EINVAL);
    so = (keel_bus_sub_opts){.pattern = "a", .handler = on_rec, .mode = (keel_bus_mode)5};
    ck_assert_int_eq(keel_bus_subscribe(b, &so, &s), KEEL_EINVAL);
    so = (keel_bus_sub_opts){.pattern = "a", .handler = on_rec, .group = ""};
    ck_assert_int_eq(keel_bus_subscribe(b, &so, &s), KEEL_EINVAL);
    ck_assert_int_eq(keel_bus_subscribe(NULL, &so, &s), KEEL_EINVAL);
    ck_assert_ptr_null(s);
    for (size_t i = 0; i < sizeof bad_subjects / sizeof bad_subjects[0]; i++)
        ck_assert_int_eq(pub(b, bad_subjects[i]), KEEL_EINVAL);
    ck_assert_int_eq(pub(b, NULL), KEEL_EINVAL);
    /* the limits: 1024 bytes and 64 tokens, for subjects and patterns alike */
    char big[1100];
    memset(big, 'a', sizeof big);
    big[1024] = '\0';
    ck_assert_int_eq(pub(b, big), 0);
    so = (keel_bus_sub_opts){.pattern = big, .handler = on_rec, .ud = r};
    ck_assert_int_eq(keel_bus_subscribe(b, &so, &s), 0);
    ck_assert_int_eq(pub(b, big), 0);
    ck_assert_uint_eq(r->n, 1);
    ck_assert_int_eq(keel_bus_unsubscribe(s), 0);
    s = NULL;
    big[1024] = 'a';
    big[1025] = '\0';
    ck_assert_int_eq(pub(b, big), KEEL_EINVAL);
    ck_assert_int_eq(keel_bus_subscribe(b, &so, &s), KEEL_EINVAL);
    char toks[200] = "";
    for (int i = 0; i < 63; i++)
        strcat(toks, i ? ".a" : "a");
    strcat(toks, ".>");
    so.pattern = toks;
    ck_assert_int_eq(keel_bus_subscribe(b, &so, &s), 0); /* 64 tokens */
    toks[strlen(toks) - 1] = 'a';
    ck_assert_int_eq(pub(b, toks), 0);
    ck_assert_uint_eq(r->n, 2);
    ck_assert_int_eq(keel_bus_unsubscribe(s), 0);
    s = NULL;
    strcat(toks, ".a");
    ck_assert_int_eq(pub(b, toks), KEEL_EINVAL);
    toks[strlen(toks) - 1] = '>';
    ck_assert_int_eq(keel_bus_subscribe(b, &so, &s), KEEL_EINVAL);
    ck_assert_ptr_null(s);
    ck_assert_int_eq(keel_bus_publish(b, "a", NULL, 3, NULL, 0, NULL), KEEL_EINVAL);
    ck_assert_int_eq(keel_bus_publish(b, "a", NULL, 0, NULL, 0, NULL), 0); /* empty payload */
    keel_bus_header h[65] = {{NULL, "v"}};
    ck_assert_int_eq(keel_bus_publish(b, "a", "x", 1, h, 1, NULL), KEEL_EINVAL);
    h[0] = (keel_bus_header){"", "v"};
    ck_assert_int_eq(keel_bus_publish(b, "a", "x", 1, h, 1, NULL), KEEL_EINVAL);
    for (int i = 0; i < 65; i++)
        h[i] = (keel_bus_header){"k", "v"};
    ck_assert_int_eq(keel_bus_publish(b, "a", "x", 1, h, 65, NULL), KEEL_EINVAL);
    ck_assert_int_eq(keel_bus_publish(b, "a", "x", 1, NULL, 1, NULL), KEEL_EINVAL);
    ck_assert_int_eq(keel_bus_publish(NULL, "a", "x", 1, NULL, 0, NULL), KEEL_EINVAL);
    keel_bus_pub many[3] = {{.subject = "ok"}, {.subject = "bad..one"}, {.subject = "ok.too"}};
    ck_assert_int_eq(keel_bus_publish_many(b, many, 3), KEEL_EINVAL);
    ck_assert_int_eq(many[0].rc, 0);
    ck_assert_int_eq(many[1].rc, KEEL_EINVAL);
    ck_assert_int_eq(many[2].rc, 0);
    ck_assert_int_ne(many[2].id[0], '\0');
    /* A length no copy for async deliveries can hold is refused before any
     * delivery, not wrapped to a small copy (once a heap overrun). */
    so = (keel_bus_sub_opts){.pattern = "big", .handler = on_rec, .ud = r, .mode = KEEL_BUS_ASYNC};
    ck_assert_int_eq(keel_bus_subscribe(b, &so, &s), 0);
    ck_assert_int_eq(keel_bus_publish(b, "big", "x", SIZE_MAX - 8, NULL, 0, NULL), KEEL_ENOMEM);
    ck_assert_int_eq(keel_bus_publish(b, "big", "x", SIZE_MAX, h, 1, NULL), KEEL_ENOMEM);
    ck_assert_int_eq(keel_bus_unsubscribe(s), 0);
    ck_assert_int_eq(keel_bus_unsubscribe(NULL), KEEL_EINVAL);
    ck_assert_int_eq(keel_bus_drain(NULL), KEEL_EINVAL);
    keel_bus_stats st;
    keel_bus_stats_get(NULL, &st);
    ck_assert_uint_eq(st.published, 0);
    keel_bus_destroy(b);
    keel_bus_destroy(NULL);
    free(r);
}
END_TEST

/* Allocations of fail_size bytes fail; while quarantining, freed blocks
 * are filled with a pattern and kept, so that a write after free shows. */
static atomic_size_t fail_size;
static atomic_int quarantining;
static void *kept[256];
static atomic_size_t nkept;

static void *q_malloc(size_t n) { return n == atomic_load(&fail_size) ? NULL : malloc(n); }

static void q_free(void *p)
{
    size_t i = atomic_load(&quarantining) ? atomic_fetch_add(&nkept, 1) : SIZE_MAX;
    if (i >= sizeof kept / sizeof kept[0]) {
        free(p);
        return;
    }
    memset(p, 0xdb, malloc_usable_size(p));
    kept[i] = p;
}

static bool quarantine_intact(void)
{
    size_t n = atomic_load(&nkept);
    for (size_t i = 0; i < n && i < sizeof kept / sizeof kept[0]; i++)
        for (size_t k = 0; k < malloc_usable_size(kept[i]); k++)
            if (((unsigned char *)kept[i])[k] != 0xdb)
                return false;
    return true;
}

START_TEST(a_group_outlives_a_member_left_in_the_trie_by_a_failed_unsubscribe)
{
    keel_allocator a = {q_malloc, calloc, realloc, q_free};
    ck_assert_int_eq(keel_set_allocator(&a), 0);
    keel_bus *b = bus_new(1, 0, KEEL_BUS_BLOCK);
    atomic_int na = 0, ng = 0;
    sub(b, "x", count_call, &na, KEEL_BUS_SYNC, NULL);
    keel_bus_sub *g = sub(b, "x", count_call, &ng, KEEL_BUS_SYNC, "g");
    /* the array of the one subscription left is 24 bytes: no memory for it */
    atomic_store(&quarantining, 1);
    atomic_store(&fail_size, 16 + sizeof(void *));
    ck_assert_int_eq(keel_bus_unsubscribe(g), 0);
    atomic_store(&fail_size, 0);
    for (int i = 0; i < 4; i++)
        ck_assert_int_eq(pub(b, "x"), 0); /* the dead member, left in the trie, is skipped; its group stays valid */
    atomic_store(&quarantining, 0);
    ck_assert_msg(quarantine_intact(), "freed memory written");
    ck_assert_int_eq(atomic_load(&na), 4);
    ck_assert_int_eq(atomic_load(&ng), 0);
    keel_bus_destroy(b);
    keel_set_allocator(NULL);
    for (size_t i = 0; i < atomic_load(&nkept) && i < sizeof kept / sizeof kept[0]; i++)
        free(kept[i]);
}
END_TEST

/* ---- Redis Streams ---- */

static keel_redis *redis_nodes(int n) { return kt_redis_open(n, 1000 * MS); }

/* A command of C strings. */
static int rcmd(keel_redis *r, const char *key, int argc, const char **argv, redisReply **rep)
{
    size_t lens[8];
    for (int i = 0; i < argc; i++)
        lens[i] = strlen(argv[i]);
    return keel_redis_command(r, key, strlen(key), argc, argv, lens, rep);
}

/* A bus over redis; service NULL for a publisher only. */
static keel_bus *rbus(keel_redis *r, const char *prefix, const char *service, const char *consumer,
                      size_t parts, uint64_t min_idle, void (*err)(keel_bus_sub *, const keel_bus_msg *, int, void *),
                      void *ud)
{
    keel_bus *b;
    keel_bus_opts o = {.redis = r, .prefix = prefix, .service = service, .consumer = consumer,
                       .partitions = parts, .min_idle_ns = min_idle, .max_deliveries = 3,
                       .block_ns = 50 * MS, .read_count = 20, .on_error = err, .ud = ud};
    ck_assert_int_eq(keel_bus_create(&b, &o), 0);
    return b;
}

static void unique_prefix(char *p, size_t n, const char *what)
{
    snprintf(p, n, "kt:bus:%d:%s:%llu:", getpid(), what, (unsigned long long)keel_now_ns());
}

/* Per subject, the sequence numbers seen (single process). */
typedef struct rseen {
    pthread_mutex_t mu;
    uint32_t next[8];
    size_t n, bad, hdr_ok;
} rseen;

static int on_rseen(const keel_bus_msg *m, void *ud)
{
    rseen *r = ud;
    uint32_t seq, subj = (uint32_t)(m->subject[2] - '0');
    ck_assert_uint_eq(m->len, 5);
    memcpy(&seq, m->data, 4);
    ck_assert_int_eq(((const char *)m->data)[4], '\0');
    pthread_mutex_lock(&r->mu);
    if (seq != r->next[subj])
        r->bad++;
    r->next[subj] = seq + 1;
    r->n++;
    r->hdr_ok += m->nheaders == 1 && strcmp(m->headers[0].key, "k") == 0 && strcmp(m->headers[0].value, "v") == 0;
    pthread_mutex_unlock(&r->mu);
    return 0;
}

START_TEST(streams_deliver_in_subject_order_across_partitions_and_nodes)
{
    keel_redis *r = redis_nodes(3);
    char prefix[96];
    unique_prefix(prefix, sizeof prefix, "order");
    keel_bus *p = rbus(r, prefix, NULL, NULL, 4, 0, NULL, NULL);
    keel_bus *c = rbus(r, prefix, "svc", "c1", 4, 0, NULL, NULL);
    rseen *seen = calloc(1, sizeof *seen);
    pthread_mutex_init(&seen->mu, NULL);
    sub(c, "s.*", on_rseen, seen, KEEL_BUS_ASYNC, NULL); /* runs in the readers whatever the mode */
    ck_assert_int_eq(keel_bus_start(c), 0);
    ck_assert_int_eq(keel_bus_start(c), KEEL_ESTATE);
    ck_assert_int_eq(keel_bus_start(p), KEEL_ESTATE); /* no service */
    keel_bus_header h = {"k", "v"};
    enum { PER = 250, SUBJ = 8 };
    keel_bus_pub batch[SUBJ];
    char subj[SUBJ][8];
    char data[SUBJ][5];
    for (uint32_t i = 0; i < PER; i++) {
        for (int s = 0; s < SUBJ; s++) {
            snprintf(subj[s], sizeof subj[s], "s.%d", s);
            memcpy(data[s], &i, 4);
            data[s][4] = '\0';
            batch[s] = (keel_bus_pub){.subject = subj[s], .data = data[s], .len = 5, .headers = &h, .nheaders = 1};
        }
        ck_assert_int_eq(keel_bus_publish_many(p, batch, SUBJ), 0);
        for (int s = 0; s < SUBJ; s++)
            ck_assert_int_ne(batch[s].id[0], '\0');
    }
    ck_assert_int_eq(keel_bus_publish(p, "nobody.listens", "x", 1, NULL, 0, NULL), 0);
    ck_assert_int_eq(keel_bus_drain(c), 0);
    pthread_mutex_lock(&seen->mu);
    ck_assert_uint_eq(seen->n, PER * SUBJ);
    ck_assert_uint_eq(seen->bad, 0);
    ck_assert_uint_eq(seen->hdr_ok, PER * SUBJ);
    pthread_mutex_unlock(&seen->mu);
    keel_bus_stats st;
    keel_bus_stats_get(c, &st);
    ck_assert_uint_eq(st.acked, PER * SUBJ + 1);
    ck_assert_uint_eq(st.skipped, 1); /* the unmatched one: no consumer of the group wants it */
    keel_bus_stats_get(p, &st);
    ck_assert_uint_eq(st.published, PER * SUBJ + 1);
    keel_bus_destroy(c);
    keel_bus_destroy(p);
    keel_redis_destroy(r);
    free(seen);
}
END_TEST

typedef struct starter {
    keel_bus *b;
    pthread_barrier_t *go;
    int rc;
} starter;

static void *start_at_once(void *arg)
{
    starter *st = arg;
    pthread_barrier_wait(st->go);
    st->rc = keel_bus_start(st->b);
    return NULL;
}

START_TEST(two_threads_starting_at_once_start_one_set_of_readers)
{
    keel_redis *r = redis_nodes(1);
    char prefix[96];
    unique_prefix(prefix, sizeof prefix, "start2");
    keel_bus *p = rbus(r, prefix, NULL, NULL, 8, 0, NULL, NULL);
    keel_bus *c = rbus(r, prefix, "svc", "c1", 8, 0, NULL, NULL);
    atomic_int got = 0;
    sub(c, "s.*", count_call, &got, KEEL_BUS_SYNC, NULL);
    pthread_barrier_t go;
    pthread_barrier_init(&go, NULL, 2);
    starter st[2] = {{c, &go, -1}, {c, &go, -1}};
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&t[i], NULL, start_at_once, &st[i]);
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
    pthread_barrier_destroy(&go);
    /* the start of eight partitions takes eight round trips: the second
     * caller comes while the first is under way */
    ck_assert_int_eq(st[0].rc == 0 ? st[1].rc : st[0].rc, KEEL_ESTATE);
    ck_assert_int_eq(st[0].rc == 0 || st[1].rc == 0, 1);
    for (int i = 0; i < 40; i++) {
        char subj[8];
        snprintf(subj, sizeof subj, "s.%d", i % 8);
        ck_assert_int_eq(keel_bus_publish(p, subj, "x", 1, NULL, 0, NULL), 0);
    }
    ck_assert_int_eq(keel_bus_drain(c), 0);
    ck_assert_int_eq(atomic_load(&got), 40);
    keel_bus_destroy(c);
    keel_bus_destroy(p);
    keel_redis_destroy(r);
}
END_TEST

/* A child consumer: reports each handled message's number on `out`, with
 * the top bit set by consumer "c2", until `ctl` reaches end of file. A
 * victim blocks forever in its first call. */
#define FROM_C2 0x80000000u
typedef struct child_ctx {
    int out;
    bool victim;
    uint32_t tag;
} child_ctx;

static int on_child(const keel_bus_msg *m, void *ud)
{
    child_ctx *c = ud;
    uint32_t n;
    memcpy(&n, m->data, 4);
    n |= c->tag;
    if (write(c->out, &n, 4) != 4)
        _exit(3);
    while (c->victim)
        pause(); /* killed here */
    return 0;
}

static pid_t child(const char *prefix, const char *consumer, bool victim, const int out[2], const int ctl[2])
{
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid)
        return pid;
    close(out[0]);
    close(ctl[1]); /* so that the parent's close is an end of file */
    keel_redis *r = redis_nodes(1);
    keel_bus *b = rbus(r, prefix, "grp", consumer, 1, 30 * S, NULL, NULL);
    child_ctx c = {out[1], victim, strcmp(consumer, "c2") == 0 ? FROM_C2 : 0};
    keel_bus_sub *s;
    keel_bus_sub_opts so = {.pattern = "work.>", .handler = on_child, .ud = &c};
    if (keel_bus_subscribe(b, &so, &s) || keel_bus_start(b))
        _exit(2);
    char x;
    while (read(ctl[0], &x, 1) > 0)
        ;
    keel_bus_destroy(b);
    keel_redis_destroy(r);
    _exit(0);
}

/* Reads message numbers from fd until each of 0..n-1 was seen or the
 * deadline; `distinct` of them were seen before; returns how many now.
 * by_c2 counts the reports of consumer "c2". */
static size_t collect_seen(int fd, uint8_t *seen, size_t n, size_t distinct, uint64_t deadline_ns, size_t *by_c2)
{
    while (distinct < n && keel_now_ns() < deadline_ns) {
        struct pollfd pf = {fd, POLLIN, 0};
        if (poll(&pf, 1, 100) <= 0)
            continue;
        uint32_t v;
        if (read(fd, &v, 4) != 4)
            break;
        *by_c2 += (v & FROM_C2) != 0;
        v &= ~FROM_C2;
        ck_assert_uint_lt(v, n);
        distinct += seen[v]++ == 0;
    }
    return distinct;
}

static void publish_numbers(keel_bus *p, uint32_t from, uint32_t to)
{
    for (uint32_t i = from; i < to; i++) {
        char subj[32];
        snprintf(subj, sizeof subj, "work.%u", i % 5);
        ck_assert_int_eq(keel_bus_publish(p, subj, &i, 4, NULL, 0, NULL), 0);
    }
}

START_TEST(two_processes_share_a_group_and_miss_nothing)
{
    char prefix[96];
    unique_prefix(prefix, sizeof prefix, "share");
    int out[2], ctl[2];
    ck_assert_int_eq(pipe(out), 0);
    ck_assert_int_eq(pipe(ctl), 0);
    pid_t a = child(prefix, "c1", false, out, ctl);
    pid_t b = child(prefix, "c2", false, out, ctl);
    close(ctl[0]);
    keel_redis *r = redis_nodes(1);
    keel_bus *p = rbus(r, prefix, NULL, NULL, 1, 0, NULL, NULL);
    enum { N = 2000 };
    uint8_t *seen = calloc(N, 1);
    size_t got = 0, by_c2 = 0, reports = 0;
    for (uint32_t i = 0; i < N; i += 100) { /* in waves, so both readers get work */
        publish_numbers(p, i, i + 100);
        got = collect_seen(out[0], seen, N, got, keel_now_ns() + 20 * MS, &by_c2);
    }
    got = collect_seen(out[0], seen, N, got, keel_now_ns() + 30 * S, &by_c2);
    close(ctl[1]);
    int st;
    waitpid(a, &st, 0);
    ck_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    waitpid(b, &st, 0);
    ck_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    size_t distinct = 0;
    for (size_t i = 0; i < N; i++) {
        distinct += seen[i] > 0;
        reports += seen[i];
    }
    ck_assert_uint_eq(distinct, N); /* at least once */
    ck_assert_uint_eq(got, N);
    /* and shared: each consumer handled some, and the group knows both */
    ck_assert_uint_gt(by_c2, 0);
    ck_assert_uint_lt(by_c2, reports);
    const char *argv[] = {"XINFO", "CONSUMERS", NULL, "grp"};
    char key[128];
    snprintf(key, sizeof key, "%s0", prefix);
    argv[2] = key;
    redisReply *rep;
    ck_assert_int_eq(rcmd(r, key, 4, argv, &rep), 0);
    ck_assert_uint_eq(rep->elements, 2);
    freeReplyObject(rep);
    keel_bus_destroy(p);
    keel_redis_destroy(r);
    free(seen);
    close(out[0]);
    close(out[1]);
}
END_TEST

typedef struct count {
    pthread_mutex_t mu;
    uint8_t seen[64];
    size_t n;
} count;

static int on_count(const keel_bus_msg *m, void *ud)
{
    count *c = ud;
    uint32_t v;
    memcpy(&v, m->data, 4);
    pthread_mutex_lock(&c->mu);
    if (v < 64 && c->seen[v]++ == 0)
        c->n++;
    pthread_mutex_unlock(&c->mu);
    return 0;
}

static size_t count_n(count *c)
{
    pthread_mutex_lock(&c->mu);
    size_t n = c->n;
    pthread_mutex_unlock(&c->mu);
    return n;
}

/* A consumer named `name` reads entries 0..14 of the prefix's stream (p
 * publishes them first) and is killed in its first handler call: all 15
 * delivered to it, none acknowledged. */
static void kill_mid_batch(const char *prefix, keel_bus *p, const char *name)
{
    publish_numbers(p, 0, 15); /* before it starts: it reads them all at once */
    int out[2], ctl[2];
    ck_assert_int_eq(pipe(out), 0);
    ck_assert_int_eq(pipe(ctl), 0);
    pid_t v = child(prefix, name, true, out, ctl);
    uint32_t first;
    struct pollfd pf = {out[0], POLLIN, 0};
    ck_assert_int_eq(poll(&pf, 1, 10000), 1);
    ck_assert_int_eq(read(out[0], &first, 4), 4);
    kill(v, SIGKILL);
    int st;
    waitpid(v, &st, 0);
    for (int i = 0; i < 2; i++) {
        close(out[i]);
        close(ctl[i]);
    }
}

/* Starts a consumer named `name` counting into a new `count`, then waits
 * (real time: Redis measures idleness on its own clock) until it has
 * seen n distinct entries or 20 s passed; returns its claims. */
static uint64_t consume_until(keel_redis *r, const char *prefix, const char *name, uint64_t min_idle, keel_bus *p,
                              size_t n)
{
    count *c = calloc(1, sizeof *c);
    pthread_mutex_init(&c->mu, NULL);
    keel_bus *b = rbus(r, prefix, "grp", name, 1, min_idle, NULL, NULL);
    sub(b, "work.>", on_count, c, KEEL_BUS_SYNC, NULL);
    ck_assert_int_eq(keel_bus_start(b), 0);
    publish_numbers(p, 15, (uint32_t)n); /* new ones go straight to it */
    uint64_t deadline = keel_now_ns() + 20 * S;
    while (count_n(c) < n && keel_now_ns() < deadline)
        nap(20 * MS);
    ck_assert_uint_eq(count_n(c), n);
    keel_bus_stats s;
    keel_bus_stats_get(b, &s);
    keel_bus_destroy(b);
    free(c);
    return s.claimed;
}

/* A handler that fails once, then holds the reader until drain has
 * returned (at most 1.5 s, real time: what drain allows an unreachable
 * reader is counted on the real clock). */
typedef struct holder {
    _Atomic int calls, entered, drained;
} holder;

static int on_hold(const keel_bus_msg *m, void *ud)
{
    (void)m;
    holder *h = ud;
    if (atomic_fetch_add(&h->calls, 1) == 0)
        return -1;
    atomic_store(&h->entered, 1);
    uint64_t deadline = keel_now_ns() + 1500 * MS;
    while (!atomic_load(&h->drained) && keel_now_ns() < deadline)
        nap(10 * MS);
    return 0;
}

/* Consumer "same" of group "grp" fails the entry p publishes (on_hold's
 * first call), so that it stays pending, and starts again under the same
 * name: the consumer returned reads its pending list first. */
static keel_bus *restart_with_one_pending(keel_redis *r, const char *prefix, keel_bus *p, holder *h)
{
    keel_bus *c = rbus(r, prefix, "grp", "same", 1, 3600 * S, NULL, NULL);
    sub(c, "work.>", on_hold, h, KEEL_BUS_SYNC, NULL);
    ck_assert_int_eq(keel_bus_start(c), 0);
    ck_assert_int_eq(keel_bus_publish(p, "work.x", "x", 1, NULL, 0, NULL), 0);
    ck_assert_int_eq(keel_bus_drain(c), 0);
    ck_assert_int_eq(atomic_load(&h->calls), 1); /* failed: pending on "same" */
    keel_bus_destroy(c);
    c = rbus(r, prefix, "grp", "same", 1, 3600 * S, NULL, NULL);
    sub(c, "work.>", on_hold, h, KEEL_BUS_SYNC, NULL);
    ck_assert_int_eq(keel_bus_start(c), 0);
    return c;
}

/* A reader busy with its pending entries after a (re)start has reached
 * Redis: drain waits for it rather than report it unreachable once an
 * unreachable reader's allowance (connect + command timeouts + block_ns,
 * 450 ms here) has passed. */
START_TEST(drain_waits_for_a_reader_busy_with_its_pending_entries)
{
    char prefix[96];
    unique_prefix(prefix, sizeof prefix, "busy");
    keel_redis *r = kt_redis_open(1, 100 * MS);
    keel_bus *p = rbus(r, prefix, NULL, NULL, 1, 0, NULL, NULL);
    holder *h = calloc(1, sizeof *h);
    keel_bus *c = restart_with_one_pending(r, prefix, p, h);
    while (!atomic_load(&h->entered)) /* its pending list gave the entry back */
        nap(MS);
    ck_assert_int_eq(keel_bus_drain(c), 0);
    atomic_store(&h->drained, 1);
    ck_assert_int_eq(atomic_load(&h->calls), 2);
    keel_bus_destroy(c);
    keel_bus_destroy(p);
    keel_redis_destroy(r);
    free(h);
}
END_TEST

START_TEST(a_consumer_killed_mid_batch_is_taken_over)
{
    char prefix[96];
    unique_prefix(prefix, sizeof prefix, "kill");
    keel_redis *r = redis_nodes(1);
    keel_bus *p = rbus(r, prefix, NULL, NULL, 1, 0, NULL, NULL);
    kill_mid_batch(prefix, p, "victim");
    ck_assert_uint_ge(consume_until(r, prefix, "survivor", 300 * MS, p, 20), 15);
    keel_bus_destroy(p);
    keel_redis_destroy(r);
}
END_TEST

START_TEST(a_consumer_restarted_under_its_name_reads_its_pending_first)
{
    char prefix[96];
    unique_prefix(prefix, sizeof prefix, "restart");
    keel_redis *r = redis_nodes(1);
    keel_bus *p = rbus(r, prefix, NULL, NULL, 1, 0, NULL, NULL);
    kill_mid_batch(prefix, p, "same");
    /* The same name again, with a claim idleness no test waits out: only
     * its own pending list (read from ID 0) can give it the 15 back. */
    ck_assert_uint_eq(consume_until(r, prefix, "same", 3600 * S, p, 15), 0);
    keel_bus_destroy(p);
    keel_redis_destroy(r);
}
END_TEST

/* Waits (real time: the reader's thread) until *n reaches want or 20 s. */
static void wait_for(_Atomic int *n, int want)
{
    uint64_t deadline = keel_now_ns() + 20 * S;
    while (atomic_load(n) < want && keel_now_ns() < deadline)
        nap(20 * MS);
    int got = atomic_load(n);
    ck_assert_int_eq(got, want);
}

typedef struct poison {
    _Atomic int bad_calls, ok_calls, buried;
    char buried_subject[32];
} poison;

static int on_poison(const keel_bus_msg *m, void *ud)
{
    poison *p = ud;
    if (strcmp(m->subject, "p.bad") == 0) {
        atomic_fetch_add(&p->bad_calls, 1);
        return -7;
    }
    atomic_fetch_add(&p->ok_calls, 1);
    return 0;
}

static void on_buried(keel_bus_sub *s, const keel_bus_msg *m, int err, void *ud)
{
    poison *p = ud;
    if (!s && err == KEEL_ELIMIT) {
        snprintf(p->buried_subject, sizeof p->buried_subject, "%s", m->subject);
        atomic_fetch_add(&p->buried, 1);
    }
}

START_TEST(a_poison_message_reaches_the_dead_letter_stream)
{
    char prefix[96];
    unique_prefix(prefix, sizeof prefix, "poison");
    keel_redis *r = redis_nodes(1);
    poison *ps = calloc(1, sizeof *ps);
    keel_bus *b = rbus(r, prefix, "grp", "c1", 1, 100 * MS, on_buried, ps);
    sub(b, "p.*", on_poison, ps, KEEL_BUS_SYNC, NULL);
    ck_assert_int_eq(keel_bus_start(b), 0);
    ck_assert_int_eq(keel_bus_publish(b, "p.bad", "boom", 4, NULL, 0, NULL), 0);
    ck_assert_int_eq(keel_bus_publish(b, "p.ok", "fine", 4, NULL, 0, NULL), 0);
    wait_for(&ps->buried, 1);
    ck_assert_str_eq(ps->buried_subject, "p.bad");
    ck_assert_int_eq(atomic_load(&ps->bad_calls), 3); /* max_deliveries */
    ck_assert_int_eq(atomic_load(&ps->ok_calls), 1);
    char dead[128], key[128];
    snprintf(dead, sizeof dead, "%sdead", prefix);
    snprintf(key, sizeof key, "%s0", prefix);
    const char *argv[] = {"XRANGE", dead, "-", "+"};
    redisReply *rep;
    ck_assert_int_eq(rcmd(r, dead, 4, argv, &rep), 0);
    ck_assert_uint_eq(rep->elements, 1);
    redisReply *f = rep->element[0]->element[1];
    bool subject = false, data = false;
    for (size_t i = 0; i + 1 < f->elements; i += 2) {
        subject |= strcmp(f->element[i]->str, "s") == 0 && strcmp(f->element[i + 1]->str, "p.bad") == 0;
        data |= strcmp(f->element[i]->str, "d") == 0 && strcmp(f->element[i + 1]->str, "boom") == 0;
    }
    ck_assert(subject && data);
    freeReplyObject(rep);
    const char *pargv[] = {"XPENDING", key, "grp"};
    ck_assert_int_eq(rcmd(r, key, 3, pargv, &rep), 0);
    ck_assert_int_eq(rep->element[0]->integer, 0); /* nothing left pending */
    freeReplyObject(rep);
    keel_bus_stats st;
    keel_bus_stats_get(b, &st);
    ck_assert_uint_eq(st.dead_lettered, 1);
    ck_assert_uint_eq(st.failed, 3);
    keel_bus_destroy(b);
    keel_redis_destroy(r);
    free(ps);
}
END_TEST

START_TEST(restarts_do_not_deliver_a_poison_message_again)
{
    char prefix[96];
    unique_prefix(prefix, sizeof prefix, "relive");
    keel_redis *r = redis_nodes(1);
    poison *ps = calloc(1, sizeof *ps);
    keel_bus *p = rbus(r, prefix, NULL, NULL, 1, 0, NULL, NULL);
    ck_assert_int_eq(keel_bus_publish(p, "p.bad", "boom", 4, NULL, 0, NULL), 0);
    /* Each life of "same" fails the entry once; no claim idleness a test
     * waits out, so only its own pending list gives the entry back. Redis
     * counts each re-read: after max_deliveries (3) lives the fourth must
     * bury it without calling the handler. */
    for (int life = 1; life <= 4; life++) {
        keel_bus *b = rbus(r, prefix, "grp", "same", 1, 3600 * S, on_buried, ps);
        sub(b, "p.*", on_poison, ps, KEEL_BUS_SYNC, NULL);
        ck_assert_int_eq(keel_bus_start(b), 0);
        wait_for(life < 4 ? &ps->bad_calls : &ps->buried, life < 4 ? life : 1);
        keel_bus_destroy(b);
    }
    ck_assert_int_eq(atomic_load(&ps->bad_calls), 3);
    ck_assert_str_eq(ps->buried_subject, "p.bad");
    char key[128];
    snprintf(key, sizeof key, "%s0", prefix);
    const char *pargv[] = {"XPENDING", key, "grp"};
    redisReply *rep;
    ck_assert_int_eq(rcmd(r, key, 3, pargv, &rep), 0);
    ck_assert_int_eq(rep->element[0]->integer, 0);
    freeReplyObject(rep);
    keel_bus_destroy(p);
    keel_redis_destroy(r);
    free(ps);
}
END_TEST

/* The dead-letter stream lives on another node than the partition, and
 * that node is down: burying fails there, not on the reader's connection.
 * The entry stays pending and is tried again later; the reader goes on
 * with new entries (it once reconnected for ever, re-reading its pending
 * list and never reaching them), and buries the entry once the node is
 * back. */
START_TEST(a_dead_letter_node_down_does_not_stop_new_entries)
{
    char prefix[96], key[128], dead[128];
    keel_redis *r = kt_redis_open(3, 300 * MS);
    for (int i = 0;; i++) {
        unique_prefix(prefix, sizeof prefix, "deadnode");
        snprintf(prefix + strlen(prefix), sizeof prefix - strlen(prefix), "%d:", i);
        snprintf(key, sizeof key, "%s0", prefix);
        snprintf(dead, sizeof dead, "%sdead", prefix);
        if (keel_redis_node_of(r, key, strlen(key)) != keel_redis_node_of(r, dead, strlen(dead)))
            break;
    }
    char node[16];
    snprintf(node, sizeof node, "redis%zu", keel_redis_node_of(r, dead, strlen(dead)) + 1);
    poison *ps = calloc(1, sizeof *ps);
    keel_bus *p = rbus(r, prefix, NULL, NULL, 1, 0, NULL, NULL);
    keel_bus *b = rbus(r, prefix, "grp", "c1", 1, 100 * MS, on_buried, ps);
    sub(b, "p.*", on_poison, ps, KEEL_BUS_SYNC, NULL);
    ck_assert_int_eq(keel_bus_start(b), 0);
    kt_server("stop-one", node);
    ck_assert_int_eq(keel_bus_publish(p, "p.bad", "boom", 4, NULL, 0, NULL), 0);
    wait_for(&ps->bad_calls, 3);
    nap(1 * S); /* a real wait: the reader's tries at burying it fail meanwhile */
    int buried = atomic_load(&ps->buried);
    int prc = keel_bus_publish(p, "p.ok", "fine", 4, NULL, 0, NULL);
    uint64_t deadline = keel_now_ns() + 5 * S;
    while (atomic_load(&ps->ok_calls) < 1 && keel_now_ns() < deadline)
        nap(20 * MS);
    int ok_calls = atomic_load(&ps->ok_calls);
    kt_server("start-one", node); /* before any assertion: the other tests need it */
    ck_assert_int_eq(buried, 0);
    ck_assert_int_eq(prc, 0);
    ck_assert_int_eq(ok_calls, 1);
    wait_for(&ps->buried, 1); /* tried again, now that the node is back */
    ck_assert_int_eq(atomic_load(&ps->bad_calls), 3);
    keel_bus_destroy(b);
    keel_bus_destroy(p);
    keel_redis_destroy(r);
    free(ps);
}
END_TEST

static int on_count_ok(const keel_bus_msg *m, void *ud)
{
    (void)m;
    atomic_fetch_add((_Atomic int *)ud, 1);
    return 0;
}

/* Warnings the bus logs about its readers. */
static _Atomic int reader_warnings;

static void on_bus_log(keel_log_level level, const char *module, const char *msg, void *ud)
{
    (void)level, (void)ud;
    if (strcmp(module, "bus") == 0 && strstr(msg, "reader:"))
        atomic_fetch_add(&reader_warnings, 1);
}

/* Commands that never time out (command_timeout_ns UINT64_MAX): the
 * reader's socket waits for that plus a blocking read, a sum that once
 * wrapped round to just under the read's own wait, so that every read that
 * found nothing timed out and reconnected. */
START_TEST(a_reader_whose_commands_never_time_out_waits_out_its_reads)
{
    char prefix[96];
    unique_prefix(prefix, sizeof prefix, "forever");
    keel_redis *r;
    keel_redis_opts ro = {.nodes = kt_redis_urls(1), .nnodes = 1, .connect_timeout_ns = 300 * MS,
                          .command_timeout_ns = UINT64_MAX};
    ck_assert_int_eq(keel_redis_create(&r, &ro), 0);
    keel_set_log(on_bus_log, KEEL_LOG_WARN, NULL);
    keel_bus *p = rbus(r, prefix, NULL, NULL, 1, 0, NULL, NULL);
    keel_bus *b = rbus(r, prefix, "grp", "c1", 1, 0, NULL, NULL); /* 50 ms reads */
    _Atomic int got = 0;
    sub(b, "x.>", on_count_ok, &got, KEEL_BUS_SYNC, NULL);
    ck_assert_int_eq(keel_bus_start(b), 0);
    for (int i = 1; i <= 3; i++) {
        nap(300 * MS); /* a real wait: reads that find nothing come and go */
        ck_assert_int_eq(keel_bus_publish(p, "x.y", "x", 1, NULL, 0, NULL), 0);
        wait_for(&got, i);
    }
    keel_bus_destroy(b);
    keel_bus_destroy(p);
    keel_set_log(NULL, KEEL_LOG_WARN, NULL);
    keel_redis_destroy(r);
    int warnings = atomic_load(&reader_warnings);
    ck_assert_int_eq(warnings, 0); /* no read timed out */
}
END_TEST

/* A user whose ACL refuses XPENDING: the consumer cannot count the
 * deliveries of its own pending entries. That is an error reply while
 * looking after stuck entries, logged and not fatal: a consumer restarted
 * under its name delivers them uncounted and goes on with new entries (it
 * once reconnected for ever on the refusal, delivering nothing). */
START_TEST(an_acl_refusing_xpending_does_not_stop_a_restarted_consumer)
{
    char prefix[96], user[64], url[160], host[64];
    int port;
    unique_prefix(prefix, sizeof prefix, "acl");
    snprintf(user, sizeof user, "kt-bus-%d", getpid());
    keel_redis *admin = redis_nodes(1);
    const char *acl[] = {"ACL", "SETUSER", user, "on", ">pw", "~*", "&*", "+@all", "-xpending"};
    size_t lens[9];
    for (int i = 0; i < 9; i++)
        lens[i] = strlen(acl[i]);
    redisReply *rep;
    ck_assert_int_eq(keel_redis_command(admin, NULL, 0, 9, acl, lens, &rep), 0);
    freeReplyObject(rep);
    kt_redis_node(0, host, sizeof host, &port);
    snprintf(url, sizeof url, "redis://%s:pw@%s:%d", user, host, port);
    const char *nodes[] = {url};
    keel_redis *r;
    keel_redis_opts ro = {.nodes = nodes, .nnodes = 1, .connect_timeout_ns = 300 * MS,
                          .command_timeout_ns = 1000 * MS, .fail_timeout_ns = 1};
    ck_assert_int_eq(keel_redis_create(&r, &ro), 0);
    keel_bus *p = rbus(admin, prefix, NULL, NULL, 1, 0, NULL, NULL);
    holder *h = calloc(1, sizeof *h);
    atomic_store(&h->drained, 1); /* on_hold: fail the first call, pass the others */
    keel_bus *c = restart_with_one_pending(r, prefix, p, h);
    ck_assert_int_eq(keel_bus_publish(p, "work.y", "y", 1, NULL, 0, NULL), 0);
    uint64_t deadline = keel_now_ns() + 5 * S;
    while (atomic_load(&h->calls) < 3 && keel_now_ns() < deadline)
        nap(20 * MS);
    int calls = atomic_load(&h->calls);
    keel_bus_destroy(c);
    keel_redis_destroy(r);
    const char *del[] = {"ACL", "DELUSER", user};
    for (int i = 0; i < 3; i++)
        lens[i] = strlen(del[i]);
    ck_assert_int_eq(keel_redis_command(admin, NULL, 0, 3, del, lens, &rep), 0);
    freeReplyObject(rep);
    ck_assert_int_eq(calls, 3); /* the pending one again, and the new one */
    keel_bus_destroy(p);
    keel_redis_destroy(admin);
    free(h);
}
END_TEST

static int on_slow(const keel_bus_msg *m, void *ud)
{
    nap(20 * MS); /* a slow handler, so that destroy comes mid-batch */
    return on_count(m, ud);
}

START_TEST(stopping_mid_batch_acknowledges_what_was_handled)
{
    char prefix[96], key[128];
    unique_prefix(prefix, sizeof prefix, "stop");
    snprintf(key, sizeof key, "%s0", prefix);
    keel_redis *r = redis_nodes(1);
    keel_bus *p = rbus(r, prefix, NULL, NULL, 1, 0, NULL, NULL);
    publish_numbers(p, 0, 20);
    count *c = calloc(1, sizeof *c);
    pthread_mutex_init(&c->mu, NULL);
    keel_bus *b = rbus(r, prefix, "grp", "c1", 1, 30 * S, NULL, NULL);
    sub(b, "work.>", on_slow, c, KEEL_BUS_SYNC, NULL);
    ck_assert_int_eq(keel_bus_start(b), 0);
    while (count_n(c) < 3)
        nap(5 * MS);
    keel_bus_destroy(b); /* mid-batch: the reader read all 20 at once */
    size_t handled = count_n(c);
    ck_assert_uint_lt(handled, 20);
    const char *pargv[] = {"XPENDING", key, "grp"};
    redisReply *rep;
    ck_assert_int_eq(rcmd(r, key, 3, pargv, &rep), 0);
    ck_assert_int_eq(rep->element[0]->integer, 20 - (long long)handled); /* the handled ones were acked */
    freeReplyObject(rep);
    keel_bus_destroy(p);
    keel_redis_destroy(r);
    free(c);
}
END_TEST

/* Each partition is a stream of its own, whose IDs may equal another's:
 * with several partitions an id names the partition too, so that ids stay
 * unique; publishers and handlers see the same one. Here every stream
 * holds an entry from an hour ahead, so each next entry of every stream
 * gets the same ID, <that ms>-1, -2... With one partition the id is the
 * entry's ID. */
typedef struct pids {
    pthread_mutex_t mu;
    char id[16][KEEL_BUS_ID_MAX];
    uint64_t time_ns[16];
    int n;
} pids;

static int on_pid(const keel_bus_msg *m, void *ud)
{
    pids *p = ud;
    int i = m->subject[2] - 'a';
    pthread_mutex_lock(&p->mu);
    snprintf(p->id[i], KEEL_BUS_ID_MAX, "%s", m->id);
    p->time_ns[i] = m->time_ns;
    p->n++;
    pthread_mutex_unlock(&p->mu);
    return 0;
}

START_TEST(ids_are_unique_across_partitions)
{
    keel_redis *r = redis_nodes(3);
    char prefix[96], key[128], ahead[48];
    unique_prefix(prefix, sizeof prefix, "pids");
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now); /* as the server's clock, near enough: an hour ahead of both */
    unsigned long long t = (unsigned long long)now.tv_sec * 1000 + 3600 * 1000;
    snprintf(ahead, sizeof ahead, "%llu-0", t);
    enum { PARTS = 4, N = 16 };
    for (int i = 0; i < PARTS; i++) {
        snprintf(key, sizeof key, "%s%d", prefix, i);
        const char *argv[] = {"XADD", key, ahead, "s", "ahead", "d", ""};
        redisReply *rep;
        ck_assert_int_eq(rcmd(r, key, 7, argv, &rep), 0);
        freeReplyObject(rep);
    }
    keel_bus *c = rbus(r, prefix, "svc", "c1", PARTS, 0, NULL, NULL);
    pids *got = calloc(1, sizeof *got);
    pthread_mutex_init(&got->mu, NULL);
    sub(c, "t.*", on_pid, got, KEEL_BUS_SYNC, NULL);
    ck_assert_int_eq(keel_bus_start(c), 0);
    keel_bus *p = rbus(r, prefix, NULL, NULL, PARTS, 0, NULL, NULL);
    keel_bus_pub pubs[N];
    char subj[N][8];
    for (int i = 0; i < N; i++) {
        snprintf(subj[i], sizeof subj[i], "t.%c", 'a' + i);
        pubs[i] = (keel_bus_pub){.subject = subj[i], .data = "x", .len = 1};
    }
    ck_assert_int_eq(keel_bus_publish_many(p, pubs, N), 0);
    bool parts[PARTS] = {false};
    for (int i = 0; i < N; i++) {
        unsigned long long ms, seq;
        unsigned part;
        int end = 0;
        ck_assert_int_eq(sscanf(pubs[i].id, "%llu-%llu-%u%n", &ms, &seq, &part, &end), 3);
        ck_assert_int_eq(pubs[i].id[end], '\0');
        ck_assert_uint_eq(ms, t);
        ck_assert_uint_lt(part, PARTS);
        parts[part] = true;
        for (int k = 0; k < i; k++)
            ck_assert_msg(strcmp(pubs[i].id, pubs[k].id) != 0, "%s twice", pubs[i].id);
    }
    int used = 0;
    for (int i = 0; i < PARTS; i++)
        used += parts[i];
    ck_assert_int_ge(used, 2); /* so some IDs of different streams were equal */
    ck_assert_int_eq(keel_bus_drain(c), 0);
    ck_assert_int_eq(got->n, N);
    for (int i = 0; i < N; i++) {
        ck_assert_str_eq(got->id[i], pubs[i].id);
        ck_assert_uint_eq(got->time_ns[i], t * MS);
    }
    keel_bus_destroy(p);
    /* one partition: the entry's ID as it is */
    unique_prefix(prefix, sizeof prefix, "pid1");
    snprintf(key, sizeof key, "%s0", prefix);
    p = rbus(r, prefix, NULL, NULL, 1, 0, NULL, NULL);
    char id[KEEL_BUS_ID_MAX];
    ck_assert_int_eq(keel_bus_publish(p, "t.a", "x", 1, NULL, 0, id), 0);
    const char *argv[] = {"XREVRANGE", key, "+", "-", "COUNT", "1"};
    redisReply *rep;
    ck_assert_int_eq(rcmd(r, key, 6, argv, &rep), 0);
    ck_assert_str_eq(id, rep->element[0]->element[0]->str);
    freeReplyObject(rep);
    keel_bus_destroy(p);
    keel_bus_destroy(c);
    free(got);
    keel_redis_destroy(r);
}
END_TEST

/* A reader matched an entry to a queue group's member that an earlier
 * handler of the same entry unsubscribes: the group's other member takes
 * it in the reader (sync or async alike) and it is acknowledged. With no
 * member left here it stays pending, neither dropped nor reported, for
 * another consumer of the service to claim: here one with a member. */
static long long pending_count(keel_redis *r, const char *key)
{
    const char *argv[] = {"XPENDING", key, "grp"};
    redisReply *rep;
    ck_assert_int_eq(rcmd(r, key, 3, argv, &rep), 0);
    long long n = rep->element[0]->integer;
    freeReplyObject(rep);
    return n;
}

START_TEST(a_stream_group_member_gone_before_its_call_leaves_the_entry_to_the_others)
{
    keel_redis *r = redis_nodes(1);
    for (int other = 0; other < 3; other++) { /* sync, async, none */
        char prefix[96], key[128];
        unique_prefix(prefix, sizeof prefix, "regroup");
        snprintf(key, sizeof key, "%s0", prefix);
        lost l = {0};
        keel_bus *b = rbus(r, prefix, "grp", "c1", 1, 3600 * S, on_lost, &l);
        _Atomic int seen[1] = {0};
        member *v = member_new(seen, 0), *w = member_new(seen, 0);
        keel_bus_sub *victim = NULL;
        sub(b, "grp.x", on_evict, &victim, KEEL_BUS_SYNC, NULL);
        victim = sub(b, "grp.x", on_member, v, KEEL_BUS_SYNC, "g");
        if (other < 2)
            sub(b, "grp.x", on_member, w, (keel_bus_mode)other, "g");
        ck_assert_int_eq(keel_bus_start(b), 0);
        ck_assert_int_eq(pub_number(b, "grp.x", 0), 0); /* matched to victim, which is evicted */
        ck_assert_int_eq(keel_bus_drain(b), 0);
        ck_assert_ptr_null(victim);
        ck_assert_int_eq(v->calls, 0);
        keel_bus_stats st;
        keel_bus_stats_get(b, &st);
        ck_assert_uint_eq(st.dropped, 0);
        ck_assert_uint_eq(st.failed, 0);
        ck_assert_int_eq(l.n, 0);
        ck_assert_int_eq(l.other, 0);
        if (other < 2) {
            ck_assert_int_eq(w->calls, 1);
            ck_assert_int_eq(w->away, 1); /* in the reader */
            ck_assert_uint_eq(st.acked, 1);
            ck_assert_int_eq(pending_count(r, key), 0);
        } else {
            ck_assert_uint_eq(st.acked, 0);
            ck_assert_int_eq(pending_count(r, key), 1);
            /* Another consumer with a member claims it once idle (real
             * time: Redis's clock), delivers and acknowledges it. */
            keel_bus *b2 = rbus(r, prefix, "grp", "c2", 1, 100 * MS, NULL, NULL);
            sub(b2, "grp.x", on_member, w, KEEL_BUS_SYNC, "g");
            ck_assert_int_eq(keel_bus_start(b2), 0);
            wait_for(&seen[0], 1);
            ck_assert_int_eq(keel_bus_drain(b2), 0);
            keel_bus_stats_get(b2, &st);
            ck_assert_uint_eq(st.claimed, 1);
            ck_assert_uint_eq(st.acked, 1);
            ck_assert_int_eq(pending_count(r, key), 0);
            keel_bus_destroy(b2);
        }
        ck_assert_int_eq(atomic_load(&seen[0]), 1);
        keel_bus_destroy(b);
        free(v);
        free(w);
    }
    keel_redis_destroy(r);
}
END_TEST

/* Counts values 0..63 (pub_number's text), failing the first call of
 * each value from fail_from up, as a transient failure would. */
typedef struct picky {
    pthread_mutex_t mu;
    uint8_t calls[64], done[64];
    _Atomic int distinct; /* values handled */
    int fail_from;
} picky;

static picky *picky_new(int fail_from)
{
    picky *p = calloc(1, sizeof *p);
    pthread_mutex_init(&p->mu, NULL);
    p->fail_from = fail_from;
    return p;
}

static void picky_free(picky *p)
{
    pthread_mutex_destroy(&p->mu);
    free(p);
}

static int on_picky(const keel_bus_msg *m, void *ud)
{
    picky *p = ud;
    int v = msg_number(m);
    ck_assert(v >= 0 && v < 64);
    pthread_mutex_lock(&p->mu);
    bool fail = p->calls[v]++ == 0 && v >= p->fail_from, first = !fail && !p->done[v];
    p->done[v] |= !fail;
    pthread_mutex_unlock(&p->mu);
    if (first)
        atomic_fetch_add(&p->distinct, 1);
    return fail ? -1 : 0;
}

/* Writes consumer `name`'s field of group grp's registry as a consumer's
 * start does: the server's time plus ttl_ms, then its patterns. */
static void register_consumer(keel_redis *r, const char *prefix, const char *name, const char *patterns,
                              long long ttl_ms)
{
    char key[160];
    snprintf(key, sizeof key, "%ssubs:grp", prefix);
    const char *argv[] = {"TIME"};
    redisReply *rep;
    ck_assert_int_eq(rcmd(r, key, 1, argv, &rep), 0);
    long long now = atoll(rep->element[0]->str) * 1000 + atoll(rep->element[1]->str) / 1000;
    freeReplyObject(rep);
    char v[256];
    snprintf(v, sizeof v, "%lld %s", now + ttl_ms, patterns);
    const char *hargv[] = {"HSET", key, name, v};
    ck_assert_int_eq(rcmd(r, key, 4, hargv, &rep), 0);
    freeReplyObject(rep);
}

/* Every subscription an entry matched is unsubscribed before its call:
 * no handler ran, so the entry goes by the registry as one that matched
 * nothing, and another live consumer that wants it gets it handed back,
 * not acknowledged. The reader is held inside its match (at the
 * allocation of a 17th match) until all 17 are unsubscribed. */
static keel_bus *window_bus;
static _Atomic int window_armed;
static __thread bool window_mine; /* the test's own threads pass */

static void *window_malloc(size_t n)
{
    if (!window_mine && n == 32 * sizeof(void *) && atomic_exchange(&window_armed, 0)) {
        keel_bus_stats st;
        for (keel_bus_stats_get(window_bus, &st); st.subscriptions; keel_bus_stats_get(window_bus, &st))
            nap(100 * 1000); /* real threads: the unsubscribers */
    }
    return malloc(n);
}

static void *unsubscribe_one(void *arg)
{
    window_mine = true;
    ck_assert_int_eq(keel_bus_unsubscribe(arg), 0);
    return NULL;
}

START_TEST(an_entry_whose_matches_all_left_before_their_calls_goes_by_the_registry)
{
    window_mine = true;
    keel_allocator a = {window_malloc, calloc, realloc, free};
    ck_assert_int_eq(keel_set_allocator(&a), 0);
    char prefix[96], key[128];
    unique_prefix(prefix, sizeof prefix, "window");
    snprintf(key, sizeof key, "%s0", prefix);
    keel_redis *r = redis_nodes(1);
    register_consumer(r, prefix, "other", "t.>", 3600 * 1000);
    keel_bus *b = window_bus = rbus(r, prefix, "grp", "c1", 1, 3600 * S, NULL, NULL);
    enum { N = 17 };
    rec *h = rec_new(0, NULL);
    keel_bus_sub *subs[N];
    for (int i = 0; i < N; i++)
        subs[i] = sub(b, "t.x", on_rec, h, KEEL_BUS_SYNC, NULL);
    ck_assert_int_eq(keel_bus_start(b), 0);
    atomic_store(&window_armed, 1);
    ck_assert_int_eq(pub(b, "t.x"), 0);
    while (atomic_load(&window_armed))
        nap(100 * 1000);
    pthread_t th[N];
    for (int i = 0; i < N; i++)
        pthread_create(&th[i], NULL, unsubscribe_one, subs[i]);
    for (int i = 0; i < N; i++)
        pthread_join(th[i], NULL);
    ck_assert_int_eq(keel_bus_drain(b), 0);
    keel_bus_stats st;
    keel_bus_stats_get(b, &st);
    ck_assert_uint_eq(h->n, 0);
    ck_assert_uint_eq(st.acked, 0);
    ck_assert_int_eq(pending_count(r, key), 1); /* handed back for "other" */
    keel_bus_destroy(b);
    keel_redis_destroy(r);
    keel_set_allocator(NULL);
    free(h);
}
END_TEST

START_TEST(a_consumer_without_a_subscriber_leaves_entries_to_one_with_it)
{
    char prefix[96], key[128];
    unique_prefix(prefix, sizeof prefix, "elsewhere");
    snprintf(key, sizeof key, "%s0", prefix);
    keel_redis *r = redis_nodes(1);
    lost la = {0}, lb = {0};
    picky *pk = picky_new(10);
    _Atomic int none[1] = {0};
    member *other = member_new(none, 0);
    /* a reads first (nothing else is reading yet) and has no subscriber
     * for "work.*": each of those entries is b's to handle. b is in the
     * group's registry already (as between its start's registration and
     * its readers' first read), so a hands them back rather than
     * acknowledging them as wanted by nobody. */
    register_consumer(r, prefix, "c2", "work.*", 3600 * 1000);
    keel_bus *a = rbus(r, prefix, "grp", "c1", 1, 100 * MS, on_lost, &la);
    sub(a, "other.x", on_member, other, KEEL_BUS_SYNC, NULL);
    ck_assert_int_eq(keel_bus_start(a), 0);
    for (int i = 0; i < 10; i++)
        ck_assert_int_eq(pub_number(a, "work.x", i), 0);
    ck_assert_int_eq(keel_bus_drain(a), 0);
    keel_bus *b = rbus(r, prefix, "grp", "c2", 1, 100 * MS, on_lost, &lb);
    sub(b, "work.*", on_picky, pk, KEEL_BUS_SYNC, NULL);
    ck_assert_int_eq(keel_bus_start(b), 0);
    wait_for(&pk->distinct, 10);
    /* b fails each of these once: pending with b, which retries them
     * after min_idle; a, idle entries in view, must not take them */
    for (int i = 10; i < 40; i++)
        ck_assert_int_eq(pub_number(a, "work.x", i), 0);
    wait_for(&pk->distinct, 40);
    ck_assert_int_eq(keel_bus_drain(a), 0);
    ck_assert_int_eq(keel_bus_drain(b), 0);
    for (int i = 0; i < 40; i++)
        ck_assert_int_le(pk->calls[i], i < 10 ? 2 : 3); /* max_deliveries 3: never buried */
    keel_bus_stats st;
    keel_bus_stats_get(a, &st);
    ck_assert_uint_eq(st.acked, 0);
    ck_assert_uint_eq(st.claimed, 0);
    ck_assert_uint_eq(st.dead_lettered, 0);
    keel_bus_stats_get(b, &st);
    ck_assert_uint_eq(st.dead_lettered, 0);
    ck_assert_uint_eq(st.skipped, 0);
    ck_assert_int_eq(la.n + la.other + lb.n, 0);
    ck_assert_int_eq(lb.other, 30); /* b's failures, no dead letter */
    ck_assert_int_eq(pending_count(r, key), 0);
    ck_assert_int_eq(other->calls, 0);
    keel_bus_destroy(b);
    keel_bus_destroy(a);
    keel_redis_destroy(r);
    picky_free(pk);
    free(other);
}
END_TEST

/* A handler that holds its reader until b's handler ran once. */
typedef struct slowpoke {
    _Atomic int in, b_calls;
} slowpoke;

static int on_slowpoke(const keel_bus_msg *m, void *ud)
{
    (void)m;
    slowpoke *sp = ud;
    atomic_store(&sp->in, 1);
    uint64_t deadline = keel_now_ns() + 10 * S;
    while (atomic_load(&sp->b_calls) < 1 && keel_now_ns() < deadline)
        nap(5 * MS);
    return 0;
}

static int on_b_fails(const keel_bus_msg *m, void *ud)
{
    (void)m;
    atomic_fetch_add(&((slowpoke *)ud)->b_calls, 1);
    return -1;
}

/* a reads an entry it has no subscriber for in a batch it takes longer
 * than min_idle over (a_handler holds it until b's handler ran once); b
 * claims the entry meanwhile and fails it. Whatever a decides for the
 * entry then must leave it b's: b's retries (up to max_deliveries) and
 * dead letter go on. */
static void b_claims_while_a_decides(keel_bus_handler a_handler, void *a_ud, slowpoke *sp, keel_redis *r,
                                     const char *prefix)
{
    lost la = {0}, lb = {0};
    keel_bus *a = rbus(r, prefix, "grp", "c1", 1, 100 * MS, on_lost, &la);
    sub(a, "other.x", a_handler, a_ud, KEEL_BUS_SYNC, NULL);
    ck_assert_int_eq(pub_number(a, "work.x", 0), 0); /* one batch for a: both */
    ck_assert_int_eq(pub_number(a, "other.x", 1), 0);
    ck_assert_int_eq(keel_bus_start(a), 0);
    wait_for(&sp->in, 1);
    keel_bus *b = rbus(r, prefix, "grp", "c2", 1, 100 * MS, on_lost, &lb);
    sub(b, "work.*", on_b_fails, sp, KEEL_BUS_SYNC, NULL);
    ck_assert_int_eq(keel_bus_start(b), 0);
    keel_bus_stats st = {0};
    for (uint64_t deadline = keel_now_ns() + 60 * S; keel_now_ns() < deadline; nap(20 * MS)) {
        keel_bus_stats_get(b, &st);
        if (st.dead_lettered)
            break;
    }
    ck_assert_uint_eq(st.dead_lettered, 1);
    ck_assert_int_le(atomic_load(&sp->b_calls), 3); /* max_deliveries */
    keel_bus_destroy(b);
    keel_bus_destroy(a);
}

/* a hands the entry back at the end of its batch: the hand-back must not
 * take it from b and put its delivery count back to 0 (b would then be
 * given it more than max_deliveries times). */
START_TEST(a_late_hand_back_leaves_an_entry_another_consumer_claimed)
{
    char prefix[96];
    unique_prefix(prefix, sizeof prefix, "lateback");
    keel_redis *r = redis_nodes(1);
    slowpoke sp = {0};
    b_claims_while_a_decides(on_slowpoke, &sp, &sp, r, prefix);
    keel_redis_destroy(r);
}
END_TEST

/* As above, but when a decides, b's registry field reads as out of date
 * (b slow to write it again, on a loaded machine), so a takes the entry
 * for nobody's. It must not acknowledge it: b has claimed it. */
typedef struct staler {
    slowpoke sp;
    keel_redis *r;
    const char *prefix;
} staler;

static int on_slowpoke_staling(const keel_bus_msg *m, void *ud)
{
    staler *st = ud;
    on_slowpoke(m, &st->sp);
    register_consumer(st->r, st->prefix, "c2", "work.*", -1000); /* expired a second ago */
    return 0;
}

START_TEST(a_skip_leaves_an_entry_another_consumer_claimed)
{
    char prefix[96];
    unique_prefix(prefix, sizeof prefix, "lateskip");
    keel_redis *r = redis_nodes(1);
    staler st = {.r = r, .prefix = prefix};
    b_claims_while_a_decides(on_slowpoke_staling, &st, &st.sp, r, prefix);
    keel_redis_destroy(r);
}
END_TEST

/* The group's only consumer subscribes to "order.>"; most entries are
 * another service's: each is acknowledged and counted as skipped, none
 * left pending for every reader to look at again. */
START_TEST(entries_no_consumer_of_the_group_subscribes_to_are_skipped)
{
    char prefix[96], key[128];
    unique_prefix(prefix, sizeof prefix, "skip");
    snprintf(key, sizeof key, "%s0", prefix);
    keel_redis *r = redis_nodes(1);
    _Atomic int got = 0;
    keel_bus *a = rbus(r, prefix, "grp", "c1", 1, 100 * MS, NULL, NULL);
    sub(a, "order.>", on_count_ok, &got, KEEL_BUS_SYNC, NULL);
    enum { N = 200 };
    int orders = 0;
    for (int i = 0; i < N; i++) { /* some before the start, most after */
        if (i == 50)
            ck_assert_int_eq(keel_bus_start(a), 0);
        bool order = i % 10 == 3;
        orders += order;
        ck_assert_int_eq(pub_number(a, order ? "order.eu.paid" : "user.created", i), 0);
    }
    ck_assert_int_eq(keel_bus_drain(a), 0);
    ck_assert_int_eq(atomic_load(&got), orders);
    keel_bus_stats st;
    keel_bus_stats_get(a, &st);
    ck_assert_uint_eq(st.skipped, N - orders);
    ck_assert_uint_eq(st.acked, N);
    ck_assert_uint_eq(st.claimed, 0);
    ck_assert_int_eq(pending_count(r, key), 0);
    keel_bus_destroy(a);
    keel_redis_destroy(r);
}
END_TEST

/* Two live consumers, each subscribing to what the other does not: a
 * hands b's entries back, b handles every one, nothing is skipped. */
START_TEST(an_entry_another_live_consumer_wants_is_handed_back_not_skipped)
{
    char prefix[96], key[128];
    unique_prefix(prefix, sizeof prefix, "handback");
    snprintf(key, sizeof key, "%s0", prefix);
    keel_redis *r = redis_nodes(1);
    _Atomic int seen[40] = {0}; /* on_member counts by message number */
    member *other = member_new(seen, 0);
    picky *pk = picky_new(64); /* none fails */
    keel_bus *a = rbus(r, prefix, "grp", "c1", 1, 100 * MS, NULL, NULL);
    keel_bus *b = rbus(r, prefix, "grp", "c2", 1, 100 * MS, NULL, NULL);
    sub(a, "other.x", on_member, other, KEEL_BUS_SYNC, NULL);
    sub(b, "work.*", on_picky, pk, KEEL_BUS_SYNC, NULL);
    ck_assert_int_eq(keel_bus_start(a), 0);
    ck_assert_int_eq(keel_bus_start(b), 0);
    for (int i = 0; i < 40; i++)
        ck_assert_int_eq(pub_number(a, i % 4 ? "work.x" : "other.x", i), 0);
    wait_for(&pk->distinct, 30);
    ck_assert_int_eq(keel_bus_drain(a), 0);
    ck_assert_int_eq(keel_bus_drain(b), 0);
    for (int i = 0; i < 40; i++)
        ck_assert_int_eq(pk->calls[i], i % 4 ? 1 : 0);
    pthread_mutex_lock(&other->mu);
    ck_assert_int_eq(other->calls, 10);
    pthread_mutex_unlock(&other->mu);
    keel_bus_stats sa, sb;
    keel_bus_stats_get(a, &sa);
    keel_bus_stats_get(b, &sb);
    ck_assert_uint_eq(sa.skipped + sb.skipped, 0);
    ck_assert_uint_eq(sa.dead_lettered + sb.dead_lettered, 0);
    ck_assert_int_eq(pending_count(r, key), 0);
    keel_bus_destroy(b);
    keel_bus_destroy(a);
    keel_redis_destroy(r);
    picky_free(pk);
    free(other);
}
END_TEST

/* b leaves cleanly: its registration goes with it, and a skips the
 * entries only b wanted. A registration left by a consumer that died
 * counts until its time runs out, then no longer. */
START_TEST(a_consumer_gone_leaves_its_subjects_to_be_skipped)
{
    char prefix[96], key[128];
    unique_prefix(prefix, sizeof prefix, "gone");
    snprintf(key, sizeof key, "%s0", prefix);
    keel_redis *r = redis_nodes(1);
    _Atomic int got = 0, gotb = 0;
    keel_bus *a = rbus(r, prefix, "grp", "c1", 1, 100 * MS, NULL, NULL);
    keel_bus *b = rbus(r, prefix, "grp", "c2", 1, 100 * MS, NULL, NULL);
    sub(a, "other.x", on_count_ok, &got, KEEL_BUS_SYNC, NULL);
    sub(b, "work.*", on_count_ok, &gotb, KEEL_BUS_SYNC, NULL);
    ck_assert_int_eq(keel_bus_start(a), 0);
    ck_assert_int_eq(keel_bus_start(b), 0);
    keel_bus_destroy(b);
    for (int i = 0; i < 10; i++)
        ck_assert_int_eq(pub_number(a, "work.x", i), 0);
    ck_assert_int_eq(pub_number(a, "other.x", 10), 0);
    ck_assert_int_eq(keel_bus_drain(a), 0);
    keel_bus_stats st;
    keel_bus_stats_get(a, &st);
    ck_assert_uint_eq(st.skipped, 10);
    ck_assert_int_eq(atomic_load(&got), 1);
    ck_assert_int_eq(pending_count(r, key), 0);
    /* a dead consumer's registration, alive for a few more seconds: its
     * entries are handed back to it, and once its time is up a's look at
     * stuck entries acknowledges them */
    register_consumer(r, prefix, "dead", "late.*", 1500);
    for (int i = 0; i < 5; i++)
        ck_assert_int_eq(pub_number(a, "late.x", i), 0);
    ck_assert_int_eq(keel_bus_drain(a), 0);
    keel_bus_stats_get(a, &st);
    ck_assert_uint_eq(st.skipped, 10);
    ck_assert_int_eq(pending_count(r, key), 5);
    for (uint64_t deadline = keel_now_ns() + 20 * S; keel_now_ns() < deadline && pending_count(r, key);)
        nap(20 * MS);
    keel_bus_stats_get(a, &st);
    ck_assert_uint_eq(st.skipped, 15);
    ck_assert_int_eq(pending_count(r, key), 0);
    ck_assert_int_eq(atomic_load(&gotb), 0);
    keel_bus_destroy(a);
    keel_redis_destroy(r);
}
END_TEST

/* Waits (real time: the reader's thread writes it) until consumer
 * name's field in group grp's registry does (or does not) hold pattern. */
static void wait_registered(keel_redis *r, const char *prefix, const char *name, const char *pattern, bool in)
{
    char key[160], word[64];
    snprintf(key, sizeof key, "%ssubs:grp", prefix);
    snprintf(word, sizeof word, " %s", pattern);
    bool found = !in;
    for (uint64_t deadline = keel_now_ns() + 20 * S; keel_now_ns() < deadline; nap(10 * MS)) {
        const char *argv[] = {"HGET", key, name};
        redisReply *rep;
        ck_assert_int_eq(rcmd(r, key, 3, argv, &rep), 0);
        found = rep->type == REDIS_REPLY_STRING && strstr(rep->str, word) != NULL;
        freeReplyObject(rep);
        if (found == in)
            break;
    }
    ck_assert_int_eq(found, in);
}

/* b subscribes while started: once its reader wrote the registry, a hands
 * b's entries back; once b unsubscribed, a skips them. */
START_TEST(subscriptions_made_while_started_reach_the_registry)
{
    char prefix[96], key[128];
    unique_prefix(prefix, sizeof prefix, "resub");
    snprintf(key, sizeof key, "%s0", prefix);
    keel_redis *r = redis_nodes(1);
    _Atomic int got = 0, gotb = 0;
    keel_bus *a = rbus(r, prefix, "grp", "c1", 1, 100 * MS, NULL, NULL);
    keel_bus *b = rbus(r, prefix, "grp", "c2", 1, 100 * MS, NULL, NULL);
    sub(a, "other.x", on_count_ok, &got, KEEL_BUS_SYNC, NULL);
    sub(b, "idle.x", on_count_ok, &gotb, KEEL_BUS_SYNC, NULL);
    ck_assert_int_eq(keel_bus_start(a), 0);
    ck_assert_int_eq(keel_bus_start(b), 0);
    keel_bus_sub *w = sub(b, "work.*", on_count_ok, &gotb, KEEL_BUS_SYNC, NULL);
    wait_registered(r, prefix, "c2", "work.*", true);
    for (int i = 0; i < 20; i++)
        ck_assert_int_eq(pub_number(a, "work.x", i), 0);
    wait_for(&gotb, 20);
    ck_assert_int_eq(keel_bus_drain(a), 0);
    ck_assert_int_eq(keel_bus_drain(b), 0);
    keel_bus_stats st;
    keel_bus_stats_get(a, &st);
    ck_assert_uint_eq(st.skipped, 0);
    ck_assert_int_eq(pending_count(r, key), 0);
    ck_assert_int_eq(keel_bus_unsubscribe(w), 0);
    wait_registered(r, prefix, "c2", "work.*", false);
    wait_registered(r, prefix, "c2", "idle.x", true); /* its other pattern stays */
    for (int i = 0; i < 20; i++)
        ck_assert_int_eq(pub_number(a, "work.x", i), 0);
    ck_assert_int_eq(keel_bus_drain(a), 0);
    ck_assert_int_eq(keel_bus_drain(b), 0);
    for (uint64_t deadline = keel_now_ns() + 20 * S; keel_now_ns() < deadline && pending_count(r, key);)
        nap(20 * MS);
    ck_assert_int_eq(pending_count(r, key), 0);
    keel_bus_stats sb;
    keel_bus_stats_get(a, &st);
    keel_bus_stats_get(b, &sb);
    ck_assert_uint_eq(st.skipped + sb.skipped, 20);
    ck_assert_int_eq(atomic_load(&gotb), 20);
    keel_bus_destroy(b);
    keel_bus_destroy(a);
    keel_redis_destroy(r);
}
END_TEST

/* A queue group's member fails an entry: the retry goes round robin, so
 * to the other member, as it did before the stuck-entry pass looked at
 * the entry's subject; the look must not take a turn of the group. */
START_TEST(a_stream_retry_goes_to_the_next_member_of_a_queue_group)
{
    char prefix[96];
    unique_prefix(prefix, sizeof prefix, "rrretry");
    keel_redis *r = redis_nodes(1);
    lost lb = {0};
    slowpoke sp = {0};
    _Atomic int ok = 0;
    keel_bus *b = rbus(r, prefix, "grp", "c1", 1, 100 * MS, on_lost, &lb);
    sub(b, "work.*", on_b_fails, &sp, KEEL_BUS_SYNC, "g"); /* picked first */
    sub(b, "work.*", on_count_ok, &ok, KEEL_BUS_SYNC, "g");
    ck_assert_int_eq(pub_number(b, "work.x", 0), 0);
    ck_assert_int_eq(keel_bus_start(b), 0);
    keel_bus_stats st = {0};
    for (uint64_t deadline = keel_now_ns() + 20 * S; keel_now_ns() < deadline; nap(20 * MS)) {
        keel_bus_stats_get(b, &st);
        if (st.dead_lettered || atomic_load(&ok))
            break;
    }
    ck_assert_uint_eq(st.dead_lettered, 0);
    int calls = atomic_load(&sp.b_calls), got = atomic_load(&ok);
    ck_assert_int_eq(calls, 1);
    ck_assert_int_eq(got, 1);
    keel_bus_destroy(b);
    keel_redis_destroy(r);
}
END_TEST

START_TEST(a_redis_restart_fails_publishes_then_consumers_resume)
{
    char prefix[96];
    unique_prefix(prefix, sizeof prefix, "restart");
    keel_redis *r = redis_nodes(1);
    keel_bus *p = rbus(r, prefix, NULL, NULL, 1, 0, NULL, NULL);
    count *c = calloc(1, sizeof *c);
    pthread_mutex_init(&c->mu, NULL);
    keel_bus *b = rbus(r, prefix, "grp", "c1", 1, 30 * S, NULL, NULL);
    sub(b, "work.>", on_count, c, KEEL_BUS_SYNC, NULL);
    ck_assert_int_eq(keel_bus_start(b), 0);
    publish_numbers(p, 0, 10);
    ck_assert_int_eq(keel_bus_drain(b), 0);
    ck_assert_uint_eq(count_n(c), 10);
    kt_server("stop-one", "redis1");
    uint32_t n = 10;
    for (int i = 0; i < 5; i++) {
        char id[KEEL_BUS_ID_MAX] = "unchanged";
        ck_assert_int_eq(keel_bus_publish(p, "work.x", &n, 4, NULL, 0, id), KEEL_EUNAVAIL);
        ck_assert_str_eq(id, ""); /* nothing reported accepted */
    }
    ck_assert_int_eq(keel_bus_drain(b), KEEL_EUNAVAIL);
    kt_server("start-one", "redis1"); /* empty: no persistence, the group is gone */
    int rc = KEEL_EUNAVAIL;
    for (int i = 0; i < 5 && rc; i++)
        rc = keel_bus_publish(p, "work.x", &n, 4, NULL, 0, NULL);
    ck_assert_int_eq(rc, 0);
    for (n = 11; n < 20; n++)
        ck_assert_int_eq(keel_bus_publish(p, "work.x", &n, 4, NULL, 0, NULL), 0);
    uint64_t deadline = keel_now_ns() + 20 * S;
    while (count_n(c) < 20 && keel_now_ns() < deadline)
        nap(20 * MS);
    ck_assert_uint_eq(count_n(c), 20);
    keel_bus_destroy(b);
    keel_bus_destroy(p);
    keel_redis_destroy(r);
    free(c);
}
END_TEST

/* ---- a steady stream through a Redis restart ---- */

enum { FLOW_N = 20000 };

typedef struct tally {
    pthread_mutex_t mu;
    uint16_t got[FLOW_N]; /* deliveries of each message */
    int rc[FLOW_N];       /* its publish's result */
    keel_bus *p;
    _Atomic int sent, end; /* end: where the publisher stops */
} tally;

static int on_tally(const keel_bus_msg *m, void *ud)
{
    tally *t = ud;
    uint32_t v;
    ck_assert_uint_eq(m->len, 4);
    memcpy(&v, m->data, 4);
    ck_assert_uint_lt(v, FLOW_N);
    pthread_mutex_lock(&t->mu);
    t->got[v]++;
    pthread_mutex_unlock(&t->mu);
    nap(2 * MS); /* slower than the publisher: a backlog, some of it pending */
    return 0;
}

static void *publish_flow(void *arg)
{
    tally *t = arg;
    for (uint32_t i = 0; i < (uint32_t)atomic_load(&t->end); i++) {
        char subj[32];
        snprintf(subj, sizeof subj, "work.%u", i % 5);
        t->rc[i] = keel_bus_publish(t->p, subj, &i, 4, NULL, 0, NULL);
        atomic_store(&t->sent, (int)i + 1);
        nap(1 * MS); /* a steady stream */
    }
    return NULL;
}

/* Messages published from `from` on that were accepted and not yet
 * delivered. */
static int undelivered(tally *t, int from)
{
    int n = 0, sent = atomic_load(&t->sent);
    pthread_mutex_lock(&t->mu);
    for (int i = from; i < sent; i++)
        n += t->rc[i] == 0 && t->got[i] == 0;
    pthread_mutex_unlock(&t->mu);
    return n;
}

/* Publishes messages from a thread while redis1 stops and starts (saving
 * its data on the way when `persist`), and 200 more after, a consumer
 * group reading. Returns the index of the first publish begun after the
 * restart. */
static int restart_mid_flow(tally *t, bool persist)
{
    char prefix[96];
    unique_prefix(prefix, sizeof prefix, persist ? "saved" : "unsaved");
    keel_redis *r = kt_redis_open(1, 300 * MS);
    pthread_mutex_init(&t->mu, NULL);
    atomic_store(&t->end, FLOW_N);
    t->p = rbus(r, prefix, NULL, NULL, 2, 0, NULL, NULL);
    keel_bus *b = rbus(r, prefix, "grp", "c1", 2, 1 * S, NULL, NULL);
    sub(b, "work.>", on_tally, t, KEEL_BUS_SYNC, NULL);
    ck_assert_int_eq(keel_bus_start(b), 0);
    pthread_t th;
    pthread_create(&th, NULL, publish_flow, t);
    while (atomic_load(&t->sent) < 200)
        nap(1 * MS);
    if (persist) { /* the test servers save nothing: this shutdown saves */
        const char *argv[] = {"CONFIG", "SET", "save", "3600 1"};
        redisReply *rep;
        ck_assert_int_eq(rcmd(r, "x", 4, argv, &rep), 0);
        freeReplyObject(rep);
    }
    kt_server("stop-one", "redis1");
    nap(200 * MS);
    kt_server("start-one", "redis1");
    int after = atomic_load(&t->sent) + 1;
    atomic_store(&t->end, after + 200);
    if (persist) {
        char dump[600];
        snprintf(dump, sizeof dump, "%s/redis1/dump.rdb", kt_env("KEEL_TEST_DIR"));
        ck_assert_int_eq(unlink(dump), 0); /* the next restart starts empty again */
    }
    pthread_join(th, NULL);
    uint64_t deadline = keel_now_ns() + 20 * S;
    while (undelivered(t, after) && keel_now_ns() < deadline)
        nap(20 * MS);
    int rc = KEEL_EUNAVAIL;
    for (int i = 0; i < 50 && rc; i++)
        rc = keel_bus_drain(b);
    ck_assert_int_eq(rc, 0);
    keel_bus_destroy(b);
    keel_bus_destroy(t->p);
    keel_redis_destroy(r);
    int failed = 0;
    ck_assert_int_lt(after + 200, FLOW_N);
    for (int i = 0; i < after + 200; i++) {
        ck_assert_msg(t->rc[i] == 0 || t->rc[i] == KEEL_EUNAVAIL || t->rc[i] == KEEL_ETIMEDOUT ||
                          t->rc[i] == KEEL_EPROTO || t->rc[i] == KEEL_EBACKEND /* LOADING */,
                      "publish %d: %s", i, keel_strerror(t->rc[i]));
        failed += t->rc[i] != 0;
    }
    ck_assert_int_gt(failed, 0); /* the outage was felt */
    return after;
}

/* With the data saved across the restart, every accepted message is
 * delivered, at least once. */
START_TEST(a_saved_redis_restart_loses_no_accepted_message)
{
    tally *t = calloc(1, sizeof *t);
    restart_mid_flow(t, true);
    ck_assert_int_eq(undelivered(t, 0), 0);
    free(t);
}
END_TEST

/* Without persistence the restart loses the streams (entries accepted
 * but not yet read go with them: Redis's durability, not the bus's); the
 * consumer group is made again and every message accepted after the
 * restart is delivered. */
START_TEST(an_unsaved_redis_restart_delivers_everything_accepted_after_it)
{
    tally *t = calloc(1, sizeof *t);
    int after = restart_mid_flow(t, false);
    ck_assert_int_eq(undelivered(t, after), 0);
    free(t);
}
END_TEST

/* A publish to a frozen server times out, but the server still has the
 * XADD in its socket and runs it when it wakes up: KEEL_ETIMEDOUT leaves
 * the outcome unknown, and the message may well be delivered. */
START_TEST(a_publish_timed_out_on_a_frozen_server_may_still_be_delivered)
{
    char prefix[96];
    unique_prefix(prefix, sizeof prefix, "frozen");
    keel_redis *r = kt_redis_open(1, 300 * MS);
    count *c = calloc(1, sizeof *c);
    pthread_mutex_init(&c->mu, NULL);
    keel_bus *p = rbus(r, prefix, NULL, NULL, 1, 0, NULL, NULL);
    keel_bus *b = rbus(r, prefix, "grp", "c1", 1, 30 * S, NULL, NULL);
    sub(b, "work.>", on_count, c, KEEL_BUS_SYNC, NULL);
    ck_assert_int_eq(keel_bus_start(b), 0);
    kt_server("pause-one", "redis1");
    uint32_t n = 7;
    char id[KEEL_BUS_ID_MAX];
    int rc = keel_bus_publish(p, "work.x", &n, 4, NULL, 0, id);
    kt_server("resume-one", "redis1");
    ck_assert_int_eq(rc, KEEL_ETIMEDOUT);
    uint64_t deadline = keel_now_ns() + 10 * S;
    while (count_n(c) < 1 && keel_now_ns() < deadline)
        nap(20 * MS);
    ck_assert_uint_eq(count_n(c), 1);
    ck_assert_int_eq(c->seen[7], 1);
    keel_bus_destroy(b);
    keel_bus_destroy(p);
    keel_redis_destroy(r);
    free(c);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("bus");
    TCase *tc = tcase_create("local");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, the_wildcard_table);
    tcase_add_test(tc, the_trie_agrees_with_the_table);
    tcase_add_test(tc, sync_handlers_run_in_subscription_order);
    tcase_add_test(tc, a_group_member_keeps_its_place_in_the_order);
    tcase_add_test(tc, messages_carry_their_fields_and_ordered_ids);
    tcase_add_test(tc, async_keeps_each_subjects_order_over_two_workers);
    tcase_add_test(tc, a_queue_group_splits_the_messages_each_to_one_member);
    tcase_add_test(tc, a_handler_can_unsubscribe_itself_and_others);
    tcase_add_test(tc, a_failing_handler_does_not_stop_the_others);
    tcase_add_test(tc, drain_and_destroy_lose_nothing);
    tcase_add_test(tc, each_full_queue_policy);
    tcase_add_test(tc, destroy_runs_what_handlers_queue_meanwhile);
    tcase_add_test(tc, a_blocked_publisher_goes_on_when_room_is_made);
    tcase_add_test(tc, a_blocked_publish_waits_its_timeout_once);
    tcase_add_test(tc, handlers_may_publish_but_a_worker_may_not_drain);
    tcase_add_test(tc, on_error_of_a_dropped_delivery_may_drain);
    tcase_add_test(tc, many_subscriptions_come_and_go);
    tcase_add_test(tc, a_handler_unsubscribes_another_running_elsewhere_and_frees_its_ud);
    tcase_add_test(tc, a_handler_may_free_its_ud_after_unsubscribing_itself);
    tcase_add_test(tc, async_deliveries_see_copies_of_data_and_headers);
    tcase_add_test(tc, drop_oldest_drops_the_oldest);
    tcase_add_test(tc, drop_oldest_reports_a_left_members_delivery_with_no_subscription);
    tcase_add_test(tc, a_group_may_mix_sync_and_async_members);
    tcase_add_test(tc, a_leaving_group_member_hands_its_queued_messages_to_the_others);
    tcase_add_test(tc, a_group_whose_last_member_leaves_drops_and_reports_its_queue);
    tcase_add_test(tc, a_sync_group_member_takes_deliveries_queued_for_one_that_left);
    tcase_add_test(tc, a_sync_group_member_gone_before_its_call_leaves_the_message_to_the_others);
    tcase_add_test(tc, metrics_report_the_counters);
    tcase_add_test(tc, bad_input_is_refused);
    tcase_add_test(tc, a_group_outlives_a_member_left_in_the_trie_by_a_failed_unsubscribe);
    suite_add_tcase(s, tc);
    TCase *th = tcase_create("threads");
    tcase_set_tags(th, "stress"); /* threads racing: not under valgrind */
    tcase_set_timeout(th, 60);
    tcase_add_test(th, publishers_miss_nothing_while_the_trie_changes);
    tcase_add_test(th, unsubscribe_from_another_thread_while_publishing);
    tcase_add_test(th, many_threads_unsubscribe_while_others_publish);
    tcase_add_test(th, ids_are_unique_and_ordered_across_threads);
    tcase_add_test(th, a_timed_out_wait_that_finds_room_queues_once);
    suite_add_tcase(s, th);
    TCase *mo = tcase_create("model");
    tcase_set_tags(mo, "model"); /* one thread, random steps: not under TSan or valgrind */
    tcase_set_timeout(mo, 60);
    tcase_add_loop_test(mo, the_trie_agrees_with_a_model_over_random_changes, 0, 4);
    suite_add_tcase(s, mo);
    TCase *rd = tcase_create("redis");
    tcase_set_timeout(rd, 90);
    tcase_add_test(rd, streams_deliver_in_subject_order_across_partitions_and_nodes);
    tcase_add_test(rd, ids_are_unique_across_partitions);
    tcase_add_test(rd, two_threads_starting_at_once_start_one_set_of_readers);
    tcase_add_test(rd, two_processes_share_a_group_and_miss_nothing);
    tcase_add_test(rd, a_consumer_killed_mid_batch_is_taken_over);
    tcase_add_test(rd, a_consumer_restarted_under_its_name_reads_its_pending_first);
    tcase_add_test(rd, drain_waits_for_a_reader_busy_with_its_pending_entries);
    tcase_add_test(rd, restarts_do_not_deliver_a_poison_message_again);
    tcase_add_test(rd, a_poison_message_reaches_the_dead_letter_stream);
    tcase_add_test(rd, a_dead_letter_node_down_does_not_stop_new_entries);
    tcase_add_test(rd, an_acl_refusing_xpending_does_not_stop_a_restarted_consumer);
    tcase_add_test(rd, a_reader_whose_commands_never_time_out_waits_out_its_reads);
    tcase_add_test(rd, stopping_mid_batch_acknowledges_what_was_handled);
    tcase_add_test(rd, a_stream_group_member_gone_before_its_call_leaves_the_entry_to_the_others);
    tcase_add_test(rd, a_consumer_without_a_subscriber_leaves_entries_to_one_with_it);
    tcase_add_test(rd, an_entry_whose_matches_all_left_before_their_calls_goes_by_the_registry);
    tcase_add_test(rd, entries_no_consumer_of_the_group_subscribes_to_are_skipped);
    tcase_add_test(rd, an_entry_another_live_consumer_wants_is_handed_back_not_skipped);
    tcase_add_test(rd, a_consumer_gone_leaves_its_subjects_to_be_skipped);
    tcase_add_test(rd, subscriptions_made_while_started_reach_the_registry);
    tcase_add_test(rd, a_stream_retry_goes_to_the_next_member_of_a_queue_group);
    tcase_add_test(rd, a_redis_restart_fails_publishes_then_consumers_resume);
    suite_add_tcase(s, rd);
    /* Two consumers racing on real time (a batch outlasting min_idle):
     * valgrind's one-thread-at-a-time scheduler stretches the race past
     * what the case waits for. */
    TCase *race = tcase_create("redis_race");
    tcase_set_tags(race, "stress");
    tcase_set_timeout(race, 90);
    tcase_add_test(race, a_late_hand_back_leaves_an_entry_another_consumer_claimed);
    tcase_add_test(race, a_skip_leaves_an_entry_another_consumer_claimed);
    suite_add_tcase(s, race);
    TCase *down = tcase_create("redis_restart"); /* a steady stream meets a stopped server */
    tcase_set_timeout(down, 90);
    tcase_add_test(down, a_saved_redis_restart_loses_no_accepted_message);
    tcase_add_test(down, an_unsaved_redis_restart_delivers_everything_accepted_after_it);
    tcase_add_test(down, a_publish_timed_out_on_a_frozen_server_may_still_be_delivered);
    suite_add_tcase(s, down);
    return kt_run(s);
}
