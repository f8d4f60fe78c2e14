/* tests/test_lb.c — keel_lb: nginx's exact round robin, least_conn and
 * passive health; P2C, peak EWMA; outlier ejection; concurrency. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <keel/lb.h>
#include <keel/metrics.h>

#include "harness.h"

#define S KT_S
#define MS KT_MS

typedef struct fixture {
    kt_clock clock;
    keel_lb *lb;
    keel_lb_peer *p[8];
} fixture;

static void setup(fixture *f, keel_lb_opts o, const uint32_t *weights, int n, const char *names)
{
    memset(&f->clock, 0, sizeof f->clock);
    kt_clock_advance(&f->clock, 1000 * S); /* not at zero: times compare with 0 */
    o.clock = kt_clock_now;
    o.clock_ud = &f->clock;
    ck_assert_int_eq(keel_lb_create(&f->lb, &o), 0);
    for (int i = 0; i < n; i++) {
        char name[2] = {names[i], 0};
        keel_lb_peer_opts po = {.name = name, .weight = weights[i], .ud = (void *)(intptr_t)names[i]};
        ck_assert_int_eq(keel_lb_add(f->lb, &po, &f->p[i]), 0);
    }
}

/* Picks n times, each ended at once with `ok`; returns the letters. */
static void picks(fixture *f, int n, int ok, char *out)
{
    for (int i = 0; i < n; i++) {
        keel_lb_peer *p;
        ck_assert_int_eq(keel_lb_pick(f->lb, NULL, &p), 0);
        out[i] = (char)(intptr_t)keel_lb_peer_ud(p);
        keel_lb_done(f->lb, p, ok, 0);
    }
    out[n] = 0;
}

START_TEST(smooth_round_robin_matches_nginx)
{
    struct {
        uint32_t w[3];
        int n;
        const char *want;
    } v[] = {
        {{5, 1, 1}, 3, "aabacaa"}, {{4, 2, 1}, 3, "abacaba"}, {{3, 2, 0}, 2, "ababa"},
        {{1, 1, 1}, 3, "abc"},
    };
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
        fixture f;
        setup(&f, (keel_lb_opts){.policy = KEEL_LB_ROUND_ROBIN}, v[i].w, v[i].n, "abc");
        char got[64];
        int len = (int)strlen(v[i].want);
        picks(&f, 2 * len, 1, got); /* two cycles: the pattern repeats */
        ck_assert_msg(strncmp(got, v[i].want, (size_t)len) == 0 &&
                          strncmp(got + len, v[i].want, (size_t)len) == 0,
                      "weights %u,%u,%u: got %s, want %s twice", v[i].w[0], v[i].w[1], v[i].w[2], got,
                      v[i].want);
        keel_lb_destroy(f.lb);
    }
}
END_TEST

START_TEST(a_failure_lowers_effective_weight_which_grows_back_per_pick)
{
    fixture f;
    setup(&f, (keel_lb_opts){.policy = KEEL_LB_ROUND_ROBIN, .max_fails = 5}, (uint32_t[]){5, 1, 1}, 3,
          "abc");
    keel_lb_peer *p;
    keel_lb_peer_stats st;
    ck_assert_int_eq(keel_lb_pick(f.lb, NULL, &p), 0);
    ck_assert_ptr_eq(p, f.p[0]);
    keel_lb_done(f.lb, p, 0, 0); /* effective 5 - 5/5 = 4 */
    keel_lb_peer_stats_get(f.lb, f.p[0], &st);
    ck_assert_int_eq(st.effective_weight, 4);
    ck_assert_uint_eq(st.fails, 1);
    ck_assert_int_eq(st.available, 1); /* 1 fail of 5: still in */
    char got[8];
    picks(&f, 1, 1, got); /* a is considered: +1 */
    keel_lb_peer_stats_get(f.lb, f.p[0], &st);
    ck_assert_int_eq(st.effective_weight, 5);
    /* two failures in a row take 2 (5 -> 4 -> 3) and need two picks back */
    for (int i = 0; i < 2; i++) {
        while (keel_lb_pick(f.lb, NULL, &p) == 0 && p != f.p[0])
            keel_lb_done(f.lb, p, 1, 0);
        keel_lb_done(f.lb, p, 0, 0);
    }
    keel_lb_peer_stats_get(f.lb, f.p[0], &st);
    ck_assert_int_le(st.effective_weight, 4);
    keel_lb_destroy(f.lb);
}
END_TEST

START_TEST(a_failed_peer_gets_exactly_one_probe_per_fail_timeout)
{
    fixture f;
    setup(&f, (keel_lb_opts){.policy = KEEL_LB_ROUND_ROBIN, .max_fails = 1, .fail_timeout_ns = 10 * S},
          (uint32_t[]){1, 1}, 2, "ab");
    keel_lb_peer *p;
    keel_lb_pick(f.lb, NULL, &p);
    ck_assert_ptr_eq(p, f.p[0]);
    keel_lb_done(f.lb, p, 0, 0); /* a fails: out for 10 s */
    uint64_t last = kt_clock_now(&f.clock);
    int probes = 0;
    /* 1000 picks, 100 ms apart: every probe of a fails again */
    for (int i = 0; i < 1000; i++) {
        kt_clock_advance(&f.clock, 100 * MS);
        ck_assert_int_eq(keel_lb_pick(f.lb, NULL, &p), 0);
        if (p == f.p[0]) {
            uint64_t now = kt_clock_now(&f.clock);
            ck_assert_uint_gt(now - last, 10 * S); /* never twice in a window */
            ck_assert_uint_le(now - last, 10 * S + 300 * MS); /* and soon after it */
            last = now;
            probes++;
        }
        keel_lb_done(f.lb, p, p != f.p[0], 0);
    }
    ck_assert_int_ge(probes, 9); /* 100 s: one probe per 10 s */
    ck_assert_int_le(probes, 10);
    keel_lb_destroy(f.lb);
}
END_TEST

START_TEST(a_success_inside_the_window_keeps_the_count)
{
    fixture f;
    setup(&f, (keel_lb_opts){.policy = KEEL_LB_ROUND_ROBIN, .max_fails = 2, .fail_timeout_ns = 10 * S},
          (uint32_t[]){1, 1}, 2, "ab");
    keel_lb_peer_stats st;
    keel_lb_peer *p;
    keel_lb_pick(f.lb, NULL, &p); /* a */
    keel_lb_done(f.lb, p, 0, 0);  /* fails = 1 */
    kt_clock_advance(&f.clock, 1 * S);
    keel_lb_pick(f.lb, NULL, &p); /* b */
    keel_lb_done(f.lb, p, 1, 0);
    keel_lb_pick(f.lb, NULL, &p); /* a, inside the window */
    ck_assert_ptr_eq(p, f.p[0]);
    keel_lb_done(f.lb, p, 1, 0);
    keel_lb_peer_stats_get(f.lb, f.p[0], &st);
    ck_assert_uint_eq(st.fails, 1); /* the success did not reset it */
    /* after fail_timeout, a pick moves `checked`, and its success resets */
    kt_clock_advance(&f.clock, 11 * S);
    for (int i = 0; i < 2; i++) {
        keel_lb_pick(f.lb, NULL, &p);
        keel_lb_done(f.lb, p, 1, 0);
    }
    keel_lb_peer_stats_get(f.lb, f.p[0], &st);
    ck_assert_uint_eq(st.fails, 0);
    keel_lb_destroy(f.lb);
}
END_TEST

START_TEST(backups_serve_only_when_every_primary_is_down)
{
    keel_lb *lb;
    kt_clock clk = {0};
    kt_clock_advance(&clk, 1000 * S);
    keel_lb_opts o = {.policy = KEEL_LB_ROUND_ROBIN, .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_lb_create(&lb, &o), 0);
    keel_lb_peer *a, *b, *c, *p;
    keel_lb_add(lb, &(keel_lb_peer_opts){.name = "a"}, &a);
    keel_lb_add(lb, &(keel_lb_peer_opts){.name = "c", .flags = KEEL_LB_BACKUP}, &c);
    keel_lb_add(lb, &(keel_lb_peer_opts){.name = "b"}, &b);
    for (int i = 0; i < 20; i++) {
        ck_assert_int_eq(keel_lb_pick(lb, NULL, &p), 0);
        ck_assert_ptr_ne(p, c);
        keel_lb_done(lb, p, 1, 0);
    }
    keel_lb_set_down(lb, a, 1);
    keel_lb_pick(lb, NULL, &p); /* b fails: max_fails 1 takes it out */
    ck_assert_ptr_eq(p, b);
    keel_lb_done(lb, p, 0, 0);
    ck_assert_int_eq(keel_lb_pick(lb, NULL, &p), 0);
    ck_assert_ptr_eq(p, c);
    keel_lb_done(lb, p, 0, 0); /* the backup fails too */
    ck_assert_int_eq(keel_lb_pick(lb, NULL, &p), KEEL_EUNAVAIL);
    ck_assert_ptr_null(p);
    keel_lb_set_down(lb, a, 0);
    ck_assert_int_eq(keel_lb_pick(lb, NULL, &p), 0);
    ck_assert_ptr_eq(p, a);
    keel_lb_done(lb, p, 1, 0);
    keel_lb_destroy(lb);
}
END_TEST

START_TEST(one_primary_with_a_backup_is_failed_out_like_any_other)
{
    keel_lb *lb;
    kt_clock clk = {0};
    kt_clock_advance(&clk, 1000 * S);
    keel_lb_opts o = {.policy = KEEL_LB_ROUND_ROBIN, .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_lb_create(&lb, &o), 0);
    keel_lb_peer *a, *b, *p;
    keel_lb_add(lb, &(keel_lb_peer_opts){.name = "a"}, &a);
    keel_lb_add(lb, &(keel_lb_peer_opts){.name = "b", .flags = KEEL_LB_BACKUP}, &b);
    keel_lb_pick(lb, NULL, &p);
    ck_assert_ptr_eq(p, a);
    keel_lb_done(lb, p, 0, 0); /* nginx: not "single" when backups exist */
    keel_lb_pick(lb, NULL, &p);
    ck_assert_ptr_eq(p, b);
    keel_lb_done(lb, p, 1, 0);
    ck_assert_int_eq(keel_lb_done(lb, p, 1, 0), KEEL_ESTATE); /* done twice */
    keel_lb_destroy(lb);
}
END_TEST

START_TEST(a_removed_peers_late_failure_counts_against_nothing)
{
    fixture f;
    setup(&f, (keel_lb_opts){.policy = KEEL_LB_ROUND_ROBIN, .eject_consecutive = 1,
                             .eject_max_percent = 50},
          (uint32_t[]){1, 1, 1, 1}, 4, "abcd");
    keel_lb_peer *p;
    keel_lb_pick(f.lb, NULL, &p);
    ck_assert_int_eq(keel_lb_remove(f.lb, p), 0);
    keel_lb_done(f.lb, p, 0, 0); /* it fails after it was removed */
    /* another peer that fails can still be ejected: the removed one did
     * not take the slot of the percentage */
    keel_lb_peer *q;
    do {
        keel_lb_pick(f.lb, NULL, &q);
        keel_lb_done(f.lb, q, q != f.p[1], 0);
    } while (q != f.p[1]);
    keel_lb_peer_stats st;
    keel_lb_peer_stats_get(f.lb, f.p[1], &st);
    ck_assert_int_eq(st.ejected, 1);
    keel_lb_destroy(f.lb);
}
END_TEST

START_TEST(a_group_of_one_is_never_marked_down)
{
    fixture f;
    setup(&f, (keel_lb_opts){.policy = KEEL_LB_ROUND_ROBIN}, (uint32_t[]){1}, 1, "a");
    for (int i = 0; i < 10; i++) {
        keel_lb_peer *p;
        ck_assert_int_eq(keel_lb_pick(f.lb, NULL, &p), 0);
        keel_lb_done(f.lb, p, 0, 0);
    }
    keel_lb_destroy(f.lb);
}
END_TEST

/* The lb's only peer is a backup (its primaries removed): it is as lone
 * as a lone primary, so failures never take it out. */
START_TEST(a_lone_backup_is_never_failed_out)
{
    keel_lb *lb;
    kt_clock clk = {0};
    kt_clock_advance(&clk, 1000 * S);
    keel_lb_opts o = {.policy = (keel_lb_policy)_i, .clock = kt_clock_now, .clock_ud = &clk};
    ck_assert_int_eq(keel_lb_create(&lb, &o), 0);
    keel_lb_peer *a, *b, *p;
    keel_lb_add(lb, &(keel_lb_peer_opts){.name = "a"}, &a);
    keel_lb_add(lb, &(keel_lb_peer_opts){.name = "b", .flags = KEEL_LB_BACKUP}, &b);
    ck_assert_int_eq(keel_lb_remove(lb, a), 0);
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(keel_lb_pick(lb, NULL, &p), 0);
        ck_assert_ptr_eq(p, b);
        keel_lb_done(lb, p, 0, 0); /* max_fails 1 */
        kt_clock_advance(&clk, 1);
    }
    keel_lb_peer_stats st;
    keel_lb_peer_stats_get(lb, b, &st);
    ck_assert_uint_eq(st.fails, 0); /* nginx keeps no accounting for it */
    ck_assert_int_eq(st.available, 1);
    keel_lb_destroy(lb);
}
END_TEST

START_TEST(a_peer_left_alone_with_failures_is_available)
{
    fixture f;
    setup(&f, (keel_lb_opts){.policy = KEEL_LB_ROUND_ROBIN, .max_fails = 1}, (uint32_t[]){1, 1}, 2, "ab");
    keel_lb_peer *p;
    keel_lb_pick(f.lb, NULL, &p);
    ck_assert_ptr_eq(p, f.p[0]);
    keel_lb_done(f.lb, p, 0, 0); /* a is out for fail_timeout */
    ck_assert_int_eq(keel_lb_remove(f.lb, f.p[1]), 0);
    /* alone now: never failed out, so a pick takes it, and stats say so */
    keel_lb_peer_stats st;
    keel_lb_peer_stats_get(f.lb, f.p[0], &st);
    ck_assert_uint_eq(st.fails, 1);
    ck_assert_int_eq(st.available, 1);
    ck_assert_int_eq(keel_lb_pick(f.lb, NULL, &p), 0);
    ck_assert_ptr_eq(p, f.p[0]);
    keel_lb_done(f.lb, p, 1, 0);
    keel_lb_destroy(f.lb);
}
END_TEST

START_TEST(a_lone_peers_effective_weight_grows_back_per_pick)
{
    fixture f;
    setup(&f, (keel_lb_opts){.policy = KEEL_LB_ROUND_ROBIN, .max_fails = 3}, (uint32_t[]){3, 1}, 2, "ab");
    keel_lb_peer *p;
    keel_lb_pick(f.lb, NULL, &p);
    ck_assert_ptr_eq(p, f.p[0]);
    keel_lb_done(f.lb, p, 0, 0); /* effective 3 - 3/3 = 2, fails 1 of 3 */
    ck_assert_int_eq(keel_lb_remove(f.lb, f.p[1]), 0);
    keel_lb_peer_stats st;
    keel_lb_peer_stats_get(f.lb, f.p[0], &st);
    ck_assert_int_eq(st.effective_weight, 2);
    /* a pick of it, with its failure still on record, as without one */
    ck_assert_int_eq(keel_lb_pick(f.lb, NULL, &p), 0);
    keel_lb_done(f.lb, p, 1, 0);
    keel_lb_peer_stats_get(f.lb, f.p[0], &st);
    ck_assert_uint_eq(st.fails, 1);
    ck_assert_int_eq(st.effective_weight, 3);
    keel_lb_destroy(f.lb);
}
END_TEST

START_TEST(stats_count_picks_and_failures)
{
    fixture f;
    setup(&f, (keel_lb_opts){.policy = KEEL_LB_ROUND_ROBIN, .max_fails = KEEL_LB_NO_MAX_FAILS},
          (uint32_t[]){1, 1}, 2, "ab");
    char got[8];
    picks(&f, 6, 1, got); /* three each */
    keel_lb_peer *p;
    ck_assert_int_eq(keel_lb_pick(f.lb, NULL, &p), 0); /* a, still in flight */
    ck_assert_ptr_eq(p, f.p[0]);
    keel_lb_peer_stats st;
    keel_lb_peer_stats_get(f.lb, f.p[0], &st);
    ck_assert_uint_eq(st.picks, 4);
    ck_assert_uint_eq(st.conns, 1);
    keel_lb_done(f.lb, p, 0, 0);
    keel_lb_peer_stats_get(f.lb, f.p[0], &st);
    ck_assert_uint_eq(st.picks, 4);
    ck_assert_uint_eq(st.failures, 1);
    keel_lb_peer_stats_get(f.lb, f.p[1], &st);
    ck_assert_uint_eq(st.picks, 3);
    ck_assert_uint_eq(st.failures, 0);
    keel_lb_destroy(f.lb);
}
END_TEST

START_TEST(tried_peers_are_skipped_by_retries)
{
    fixture f;
    setup(&f, (keel_lb_opts){.policy = KEEL_LB_ROUND_ROBIN}, (uint32_t[]){1, 1, 1}, 3, "abc");
    keel_lb_tried tried = {0};
    keel_lb_peer *seen[3], *p;
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(keel_lb_pick(f.lb, &tried, &seen[i]), 0);
        for (int k = 0; k < i; k++)
            ck_assert_ptr_ne(seen[i], seen[k]);
    }
    ck_assert_int_eq(keel_lb_pick(f.lb, &tried, &p), KEEL_EUNAVAIL);
    for (int i = 0; i < 3; i++)
        keel_lb_done(f.lb, seen[i], 1, 0);
    keel_lb_destroy(f.lb);
}
END_TEST

START_TEST(least_conn_prefers_idle_and_rotates_ties)
{
    fixture f;
    setup(&f, (keel_lb_opts){.policy = KEEL_LB_LEAST_CONN}, (uint32_t[]){1, 1, 1}, 3, "abc");
    char got[8], got14[16];
    picks(&f, 6, 1, got); /* all idle: round robin among the tie */
    ck_assert_str_eq(got, "abcabc");
    keel_lb_peer *held, *p;
    keel_lb_pick(f.lb, NULL, &held); /* one busy peer */
    for (int i = 0; i < 10; i++) {
        keel_lb_pick(f.lb, NULL, &p);
        ck_assert_ptr_ne(p, held);
        keel_lb_done(f.lb, p, 1, 0);
    }
    keel_lb_done(f.lb, held, 1, 0);
    keel_lb_destroy(f.lb);
    /* weights: 2 conns on weight 2 equals 1 conn on weight 1 */
    setup(&f, (keel_lb_opts){.policy = KEEL_LB_LEAST_CONN}, (uint32_t[]){2, 1}, 2, "ab");
    keel_lb_peer *h[3];
    for (int i = 0; i < 3; i++)
        keel_lb_pick(f.lb, NULL, &h[i]);
    keel_lb_peer_stats sa, sb;
    keel_lb_peer_stats_get(f.lb, f.p[0], &sa);
    keel_lb_peer_stats_get(f.lb, f.p[1], &sb);
    ck_assert_uint_eq(sa.conns, 2);
    ck_assert_uint_eq(sb.conns, 1);
    for (int i = 0; i < 3; i++)
        keel_lb_done(f.lb, h[i], 1, 0);
    keel_lb_destroy(f.lb);
    /* a tie of weighted peers goes by smooth weighted round robin among
     * them, as nginx's least_conn does: 5, 1, 1 give nginx's aabacaa */
    setup(&f, (keel_lb_opts){.policy = KEEL_LB_LEAST_CONN}, (uint32_t[]){5, 1, 1}, 3, "abc");
    picks(&f, 14, 1, got14);
    ck_assert_str_eq(got14, "aabacaaaabacaa");
    keel_lb_destroy(f.lb);
}
END_TEST

/* A source whose values pick peer indexes i, then j, then i again for any
 * further draw, of n peers. */
typedef struct chooser {
    uint64_t n, i, j, k;
} chooser;

static uint64_t choose(void *ud)
{
    chooser *c = ud;
    uint64_t idx = c->k++ == 1 ? c->j : c->i;
    return (uint64_t)(((unsigned __int128)idx << 64) / c->n) + 1; /* lands in bucket idx */
}

/* A pick that can only land on peer k: every other peer is in `tried`. */
static keel_lb_peer *pick_only(fixture *f, int n, int k)
{
    keel_lb_tried t = {0};
    for (int i = 0; i < n; i++)
        if (i != k)
            t.ids[t.n++] = (uint32_t)i + 1; /* ids are given in order from 1 */
    keel_lb_peer *p;
    ck_assert_int_eq(keel_lb_pick(f->lb, &t, &p), 0);
    ck_assert_ptr_eq(p, f->p[k]);
    return p;
}

START_TEST(p2c_never_picks_the_busier_of_two)
{
    fixture f;
    chooser ch = {4, 0, 0, 0};
    keel_lb_opts o = {.policy = KEEL_LB_P2C, .rand = choose, .rand_ud = &ch};
    setup(&f, o, (uint32_t[]){1, 1, 1, 1}, 4, "abcd");
    keel_lb_peer *busy[6];
    int load[6] = {0, 0, 0, 1, 1, 2}; /* a=3, b=2, c=1, d=0 in flight */
    for (int i = 0; i < 6; i++)
        busy[i] = pick_only(&f, 4, load[i]);
    for (uint64_t i = 0; i < 4; i++)
        for (uint64_t j = 0; j < 4; j++) {
            if (i == j)
                continue;
            ch = (chooser){4, i, j, 0};
            keel_lb_peer *p;
            ck_assert_int_eq(keel_lb_pick(f.lb, NULL, &p), 0);
            /* the less busy is the later letter here */
            ck_assert_ptr_eq(p, f.p[i > j ? i : j]);
            keel_lb_done(f.lb, p, 1, 0);
        }
    for (int i = 0; i < 6; i++)
        keel_lb_done(f.lb, busy[i], 1, 0);
    keel_lb_destroy(f.lb);
}
END_TEST

START_TEST(weighted_p2c_compares_weight_over_load)
{
    fixture f;
    chooser ch = {10, 0, 9, 0}; /* always the pair (a, b): draws go by weight */
    setup(&f, (keel_lb_opts){.policy = KEEL_LB_P2C, .rand = choose, .rand_ud = &ch},
          (uint32_t[]){4, 1}, 2, "ab");
    /* a: 4/(c+1) against b: 1/1 — a wins until it has 4 in flight */
    keel_lb_peer *held[8];
    int a = 0;
    for (int i = 0; i < 4; i++) {
        ch.k = 0;
        keel_lb_pick(f.lb, NULL, &held[i]);
        a += held[i] == f.p[0];
    }
    ck_assert_int_eq(a, 4); /* 4/1, 4/2, 4/3, 4/4 >= 1/1 ... ties go to the first */
    ch.k = 0;
    keel_lb_pick(f.lb, NULL, &held[4]);
    ck_assert_ptr_eq(held[4], f.p[1]); /* 4/5 < 1/1 */
    for (int i = 0; i < 5; i++)
        keel_lb_done(f.lb, held[i], 1, 0);
    keel_lb_destroy(f.lb);
}
END_TEST

static uint64_t rng_next(void *ud) { return kt_rng_next(ud); }

/* At rest (nothing in flight) a weighted P2C spreads picks by weight, as
 * Envoy's weighted least request does: {100,1,1} gives 98.04% / 0.98% /
 * 0.98%, not the 67/17/17 of two uniform candidates. 100k picks with a
 * seeded source: the bounds are about 7 standard deviations wide. */
START_TEST(weighted_p2c_spreads_picks_by_weight_at_rest)
{
    static const struct {
        uint32_t w[3];
        int n;
        int lo[3], hi[3];
    } cases[] = {
        {{100, 1, 1}, 3, {97740, 830, 830}, {98340, 1130, 1130}},
        {{2, 1}, 2, {65900, 32600}, {67400, 34100}},
        {{1, 3, 2}, 3, {15550, 49300, 32600}, {17750, 50700, 34100}},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        fixture f;
        kt_rng g = kt_rng_seed(42 + c);
        setup(&f, (keel_lb_opts){.policy = KEEL_LB_P2C, .rand = rng_next, .rand_ud = &g},
              cases[c].w, cases[c].n, "abc");
        int got[3] = {0, 0, 0};
        for (int i = 0; i < 100000; i++) {
            keel_lb_peer *p;
            ck_assert_int_eq(keel_lb_pick(f.lb, NULL, &p), 0);
            got[(char)(intptr_t)keel_lb_peer_ud(p) - 'a']++;
            keel_lb_done(f.lb, p, 1, 0);
        }
        for (int k = 0; k < cases[c].n; k++) {
            ck_assert_msg(got[k] >= cases[c].lo[k] && got[k] <= cases[c].hi[k],
                          "case %zu: peer %d got %d picks of 100000", c, k, got[k]);
        }
        keel_lb_destroy(f.lb);
    }
}
END_TEST

/* A DOWN peer has no share: the others split its part by their weights,
 * {4,2,1} with the 2 down going 80/20 (redrawing a draw that lands on it
 * would give 73/27). Bounds about 7 standard deviations wide. */
START_TEST(weighted_p2c_leaves_a_down_peer_out_of_the_shares)
{
    fixture f;
    kt_rng g = kt_rng_seed(7);
    setup(&f, (keel_lb_opts){.policy = KEEL_LB_P2C, .rand = rng_next, .rand_ud = &g},
          (uint32_t[]){4, 2, 1}, 3, "abc");
    ck_assert_int_eq(keel_lb_set_down(f.lb, f.p[1], 1), 0);
    int got[3] = {0, 0, 0};
    for (int i = 0; i < 100000; i++) {
        keel_lb_peer *p;
        ck_assert_int_eq(keel_lb_pick(f.lb, NULL, &p), 0);
        got[(char)(intptr_t)keel_lb_peer_ud(p) - 'a']++;
        keel_lb_done(f.lb, p, 1, 0);
    }
    ck_assert_int_eq(got[1], 0);
    ck_assert_msg(got[0] >= 79100 && got[0] <= 80900, "a got %d of 100000", got[0]);
    keel_lb_destroy(f.lb);
}
END_TEST

/* {100,5,5} with the 100 failed out and b busy: when the draws find b
 * alone (here: a, b, then a for ever), a second available peer is looked
 * for and the two compared, so the idle c is picked, not b unseen. */
START_TEST(weighted_p2c_compares_when_the_draws_find_one_peer)
{
    fixture f;
    chooser ch = {3, 0, 0, 0};
    setup(&f, (keel_lb_opts){.policy = KEEL_LB_P2C, .rand = choose, .rand_ud = &ch},
          (uint32_t[]){100, 5, 5}, 3, "abc");
    keel_lb_peer *p = pick_only(&f, 3, 0);
    keel_lb_done(f.lb, p, 0, 0); /* a out for fail_timeout (max_fails 1) */
    keel_lb_peer *held[3];
    for (int i = 0; i < 3; i++)
        held[i] = pick_only(&f, 3, 1);
    for (int i = 0; i < 10; i++) {
        ch = (chooser){3, 0, 1, 0};
        ck_assert_int_eq(keel_lb_pick(f.lb, NULL, &p), 0);
        ck_assert_ptr_eq(p, f.p[2]);
        keel_lb_done(f.lb, p, 1, 0);
    }
    for (int i = 0; i < 3; i++)
        keel_lb_done(f.lb, held[i], 1, 0);
    keel_lb_destroy(f.lb);
}
END_TEST

/* With the 100 of {100,5,5} DOWN the others weigh the same: P2C between
 * two distinct peers, so the busy b is never picked over the idle c (the
 * weighted draws, the same peer twice being a pick of it, gave b 25%). */
START_TEST(p2c_weights_are_equal_when_only_a_down_peer_differs)
{
    fixture f;
    kt_rng g = kt_rng_seed(11);
    setup(&f, (keel_lb_opts){.policy = KEEL_LB_P2C, .rand = rng_next, .rand_ud = &g},
          (uint32_t[]){100, 5, 5}, 3, "abc");
    ck_assert_int_eq(keel_lb_set_down(f.lb, f.p[0], 1), 0);
    keel_lb_peer *held = pick_only(&f, 3, 1), *p;
    for (int i = 0; i < 1000; i++) {
        ck_assert_int_eq(keel_lb_pick(f.lb, NULL, &p), 0);
        ck_assert_ptr_eq(p, f.p[2]);
        keel_lb_done(f.lb, p, 1, 0);
    }
    keel_lb_done(f.lb, held, 1, 0);
    keel_lb_destroy(f.lb);
}
END_TEST

START_TEST(weighted_p2c_among_backups_alone_still_weighs)
{
    keel_lb *lb;
    chooser ch = {10, 0, 9, 0}; /* always the pair (a, b): draws go by weight */
    keel_lb_opts o = {.policy = KEEL_LB_P2C, .rand = choose, .rand_ud = &ch};
    ck_assert_int_eq(keel_lb_create(&lb, &o), 0);
    keel_lb_peer *a, *b, *held[5];
    /* no primary (all removed, say): the backups are all there is */
    keel_lb_add(lb, &(keel_lb_peer_opts){.name = "a", .weight = 4, .flags = KEEL_LB_BACKUP}, &a);
    keel_lb_add(lb, &(keel_lb_peer_opts){.name = "b", .weight = 1, .flags = KEEL_LB_BACKUP}, &b);
    for (int i = 0; i < 4; i++) {
        ch.k = 0;
        ck_assert_int_eq(keel_lb_pick(lb, NULL, &held[i]), 0);
        ck_assert_ptr_eq(held[i], a); /* 4/(c+1) >= 1/1 */
    }
    ch.k = 0;
    ck_assert_int_eq(keel_lb_pick(lb, NULL, &held[4]), 0);
    ck_assert_ptr_eq(held[4], b); /* 4/5 < 1/1 */
    for (int i = 0; i < 5; i++)
        keel_lb_done(lb, held[i], 1, 0);
    keel_lb_destroy(lb);
}
END_TEST

START_TEST(peak_ewma_moves_away_from_a_slow_peer_and_back)
{
    fixture f;
    setup(&f, (keel_lb_opts){.policy = KEEL_LB_PEAK_EWMA, .ewma_tau_ns = 10 * S}, (uint32_t[]){1, 1}, 2,
          "ab");
    keel_lb_peer *p;
    /* a answers in 200 ms, b in 2 ms */
    for (int i = 0; i < 20; i++) {
        keel_lb_pick(f.lb, NULL, &p);
        keel_lb_done(f.lb, p, 1, p == f.p[0] ? 200 * MS : 2 * MS);
    }
    keel_lb_peer_stats st;
    keel_lb_peer_stats_get(f.lb, f.p[0], &st);
    ck_assert(st.ewma_ns > 100e6);
    /* Now a is healthy again, but it only learns that when picked. b's
     * estimate stays at 2 ms with its traffic; a's decays from 200 ms with
     * tau = 10 s and crosses 2 ms after 10 s * ln(100), about 46 s. */
    uint64_t start = kt_clock_now(&f.clock), first_a = 0;
    for (int i = 0; i < 700 && !first_a; i++) {
        kt_clock_advance(&f.clock, 100 * MS);
        keel_lb_pick(f.lb, NULL, &p);
        if (p == f.p[0])
            first_a = kt_clock_now(&f.clock) - start;
        keel_lb_done(f.lb, p, 1, 2 * MS);
    }
    ck_assert_uint_gt(first_a, 40 * S);
    ck_assert_uint_lt(first_a, 52 * S);
    /* and one fast answer brings its estimate to b's: the pick stored its
     * decay to just under b's 2 ms, and a higher result replaces that */
    keel_lb_peer_stats_get(f.lb, f.p[0], &st);
    ck_assert_msg(st.ewma_ns == 2e6, "ewma %.0f", st.ewma_ns);
    keel_lb_destroy(f.lb);
}
END_TEST

/* Finagle's PeakEwma: a pick's look at a peer's cost stores its decay
 * (observe(0)), and a later result is compared with that. After 100 ms and
 * 30 s idle (tau 10 s) the cost is 100 ms x e^-3 = 4.98 ms; a 50 ms result
 * then sets it to 50 ms, not the 52.49 ms of a blend with the old peak. */
START_TEST(peak_ewma_compares_a_result_with_the_decayed_estimate)
{
    fixture f;
    setup(&f, (keel_lb_opts){.policy = KEEL_LB_PEAK_EWMA, .ewma_tau_ns = 10 * S}, (uint32_t[]){1, 1}, 2,
          "ab");
    keel_lb_peer *p = pick_only(&f, 2, 0);
    keel_lb_done(f.lb, p, 1, 100 * MS);
    p = pick_only(&f, 2, 1); /* b slower, so that the look below picks a */
    keel_lb_done(f.lb, p, 1, 200 * MS);
    kt_clock_advance(&f.clock, 30 * S);
    keel_lb_peer_stats st;
    keel_lb_peer_stats_get(f.lb, f.p[0], &st);
    ck_assert_msg(st.ewma_ns > 4.978e6 && st.ewma_ns < 4.979e6, "ewma %.0f", st.ewma_ns);
    ck_assert_int_eq(keel_lb_pick(f.lb, NULL, &p), 0); /* compares a and b */
    ck_assert_ptr_eq(p, f.p[0]);
    keel_lb_done(f.lb, p, 1, 50 * MS);
    keel_lb_peer_stats_get(f.lb, f.p[0], &st);
    ck_assert_msg(st.ewma_ns == 50e6, "ewma %.0f, Finagle's is 50000000", st.ewma_ns);
    /* a lower result blends in by the time since the last look: 10 s
     * later, 10 ms gives 50 ms x e^-1 + 10 ms x (1 - e^-1) = 24.715 ms */
    p = pick_only(&f, 2, 0); /* no comparison, so no look */
    kt_clock_advance(&f.clock, 10 * S);
    keel_lb_done(f.lb, p, 1, 10 * MS);
    keel_lb_peer_stats_get(f.lb, f.p[0], &st);
    ck_assert_msg(st.ewma_ns > 24.714e6 && st.ewma_ns < 24.716e6, "ewma %.0f", st.ewma_ns);
    keel_lb_destroy(f.lb);
}
END_TEST

static void fail_n(fixture *f, keel_lb_peer *target, int n)
{
    /* P2C over two peers with a scripted source: always (target, other) */
    for (int i = 0; i < n; i++) {
        keel_lb_peer *p;
        keel_lb_tried t = {0};
        do {
            ck_assert_int_eq(keel_lb_pick(f->lb, &t, &p), 0);
            if (p != target)
                keel_lb_done(f->lb, p, 1, 0);
        } while (p != target);
        keel_lb_done(f->lb, p, 0, 0);
    }
}

START_TEST(ejection_time_grows_with_each_ejection_and_caps)
{
    fixture f;
    setup(&f, (keel_lb_opts){.policy = KEEL_LB_ROUND_ROBIN, .max_fails = KEEL_LB_NO_MAX_FAILS,
                             .eject_consecutive = 3, .eject_base_ns = 10 * S,
                             .eject_max_ns = 25 * S, .eject_max_percent = 50,
                             .eject_decay_ns = 100 * S},
          (uint32_t[]){1, 1}, 2, "ab");
    uint64_t spans[] = {10 * S, 20 * S, 25 * S, 25 * S};
    keel_lb_peer_stats st;
    for (int k = 0; k < 4; k++) {
        fail_n(&f, f.p[0], 3);
        keel_lb_peer_stats_get(f.lb, f.p[0], &st);
        ck_assert_int_eq(st.ejected, 1);
        ck_assert_uint_eq(st.ejections, (uint32_t)k + 1);
        kt_clock_advance(&f.clock, spans[k] - 1);
        keel_lb_peer_stats_get(f.lb, f.p[0], &st);
        ck_assert_int_eq(st.ejected, 1); /* not a nanosecond early */
        kt_clock_advance(&f.clock, 1);
        keel_lb_peer_stats_get(f.lb, f.p[0], &st);
        ck_assert_int_eq(st.ejected, 0);
    }
    /* healthy for 250 s: the multiplier decays by 2, so the next is 20 s */
    kt_clock_advance(&f.clock, 250 * S);
    fail_n(&f, f.p[0], 3);
    keel_lb_peer_stats_get(f.lb, f.p[0], &st);
    ck_assert_uint_eq(st.ejections, 3);
    kt_clock_advance(&f.clock, 25 * S);
    keel_lb_peer_stats_get(f.lb, f.p[0], &st);
    ck_assert_int_eq(st.ejected, 0);
    keel_lb_destroy(f.lb);
}
END_TEST

START_TEST(ejection_never_passes_the_percentage_but_one_is_allowed)
{
    fixture f;
    setup(&f, (keel_lb_opts){.policy = KEEL_LB_ROUND_ROBIN, .max_fails = KEEL_LB_NO_MAX_FAILS,
                             .eject_consecutive = 2, .eject_max_percent = 10},
          (uint32_t[]){1, 1, 1, 1}, 4, "abcd");
    fail_n(&f, f.p[0], 2);
    fail_n(&f, f.p[1], 2);
    keel_lb_peer_stats sa, sb;
    keel_lb_peer_stats_get(f.lb, f.p[0], &sa);
    keel_lb_peer_stats_get(f.lb, f.p[1], &sb);
    ck_assert_int_eq(sa.ejected, 1); /* 10% of 4 is 0.4: still one */
    ck_assert_int_eq(sb.ejected, 0); /* a second would be 50% */
    keel_lb_destroy(f.lb);
}
END_TEST

/* Envoy's ejectHost(): the multiplier grows only while base x multiplier <
 * max + base, so it stops at max / base + 1 (11 here) and a peer that
 * recovers decays from there, not from its whole history. */
START_TEST(the_ejection_multiplier_stops_where_envoys_does)
{
    fixture f;
    setup(&f, (keel_lb_opts){.policy = KEEL_LB_ROUND_ROBIN, .max_fails = KEEL_LB_NO_MAX_FAILS,
                             .eject_consecutive = 1, .eject_base_ns = 30 * S,
                             .eject_max_ns = 300 * S, .eject_max_percent = 50,
                             .eject_decay_ns = 10 * S},
          (uint32_t[]){1, 1}, 2, "ab");
    keel_lb_peer_stats st;
    for (uint64_t k = 1; k <= 100; k++) { /* back to back: each at the end of the last */
        fail_n(&f, f.p[0], 1);
        keel_lb_peer_stats_get(f.lb, f.p[0], &st);
        ck_assert_int_eq(st.ejected, 1);
        kt_clock_advance(&f.clock, (k < 10 ? k : 10) * 30 * S);
    }
    keel_lb_peer_stats_get(f.lb, f.p[0], &st);
    ck_assert_int_eq(st.ejected, 0);
    ck_assert_uint_eq(st.ejections, 11);
    /* healthy for 100 s: 11 - 10 = 1, so the next ejection is the
     * second's, 60 s (uncapped: 100 - 10 + 1 = 91, and 300 s) */
    kt_clock_advance(&f.clock, 100 * S);
    fail_n(&f, f.p[0], 1);
    keel_lb_peer_stats_get(f.lb, f.p[0], &st);
    ck_assert_uint_eq(st.ejections, 2);
    kt_clock_advance(&f.clock, 60 * S - 1);
    keel_lb_peer_stats_get(f.lb, f.p[0], &st);
    ck_assert_int_eq(st.ejected, 1);
    kt_clock_advance(&f.clock, 1);
    keel_lb_peer_stats_get(f.lb, f.p[0], &st);
    ck_assert_int_eq(st.ejected, 0);
    keel_lb_destroy(f.lb);
}
END_TEST

/* Envoy resets the consecutive count after ejectHost() whether or not the
 * percentage let the ejection happen: one more failure is not enough. */
START_TEST(a_refused_ejection_resets_the_consecutive_count)
{
    fixture f;
    setup(&f, (keel_lb_opts){.policy = KEEL_LB_ROUND_ROBIN, .max_fails = KEEL_LB_NO_MAX_FAILS,
                             .eject_consecutive = 2, .eject_max_percent = 10},
          (uint32_t[]){1, 1, 1, 1}, 4, "abcd");
    fail_n(&f, f.p[0], 2);
    fail_n(&f, f.p[1], 2); /* refused: a second would be 50% */
    keel_lb_peer_stats st;
    keel_lb_peer_stats_get(f.lb, f.p[1], &st);
    ck_assert_int_eq(st.ejected, 0);
    ck_assert_uint_eq(st.consecutive_failures, 0);
    kt_clock_advance(&f.clock, 30 * S); /* a is back: room for one */
    fail_n(&f, f.p[1], 1);
    keel_lb_peer_stats_get(f.lb, f.p[1], &st);
    ck_assert_int_eq(st.ejected, 0);
    ck_assert_uint_eq(st.consecutive_failures, 1);
    fail_n(&f, f.p[1], 1);
    keel_lb_peer_stats_get(f.lb, f.p[1], &st);
    ck_assert_int_eq(st.ejected, 1);
    keel_lb_destroy(f.lb);
}
END_TEST

/* Envoy resets the count when an ejection ends too: failures of picks that
 * were in flight while the peer was out do not count towards the next. */
START_TEST(the_consecutive_count_starts_over_when_an_ejection_ends)
{
    fixture f;
    setup(&f, (keel_lb_opts){.policy = KEEL_LB_ROUND_ROBIN, .max_fails = KEEL_LB_NO_MAX_FAILS,
                             .eject_consecutive = 2, .eject_max_percent = 50},
          (uint32_t[]){1, 1}, 2, "ab");
    keel_lb_peer *held[3];
    for (int i = 0; i < 3; i++) {
        keel_lb_tried t = {.n = 1, .ids = {2}};
        ck_assert_int_eq(keel_lb_pick(f.lb, &t, &held[i]), 0);
        ck_assert_ptr_eq(held[i], f.p[0]);
    }
    keel_lb_done(f.lb, held[0], 0, 0);
    keel_lb_done(f.lb, held[1], 0, 0); /* ejected */
    keel_lb_done(f.lb, held[2], 0, 0); /* late, while out */
    keel_lb_peer_stats st;
    keel_lb_peer_stats_get(f.lb, f.p[0], &st);
    ck_assert_int_eq(st.ejected, 1);
    kt_clock_advance(&f.clock, 30 * S);
    keel_lb_peer_stats_get(f.lb, f.p[0], &st);
    ck_assert_int_eq(st.ejected, 0);
    ck_assert_uint_eq(st.consecutive_failures, 0);
    fail_n(&f, f.p[0], 1);
    keel_lb_peer_stats_get(f.lb, f.p[0], &st);
    ck_assert_int_eq(st.ejected, 0);
    keel_lb_destroy(f.lb);
}
END_TEST

/* Envoy's panic routing at zero healthy, nginx's lone peer: ejection alone
 * never leaves a pick with nothing to choose. */
START_TEST(a_lone_peer_is_never_ejected)
{
    fixture f;
    setup(&f, (keel_lb_opts){.policy = (keel_lb_policy)_i, .eject_consecutive = 2},
          (uint32_t[]){1}, 1, "a");
    for (int i = 0; i < 10; i++) {
        keel_lb_peer *p;
        ck_assert_int_eq(keel_lb_pick(f.lb, NULL, &p), 0);
        keel_lb_done(f.lb, p, 0, 0);
    }
    keel_lb_peer_stats st;
    keel_lb_peer_stats_get(f.lb, f.p[0], &st);
    ck_assert_int_eq(st.ejected, 0);
    ck_assert_int_eq(st.available, 1);
    keel_lb_destroy(f.lb);
}
END_TEST

/* An ejection that began while the peer had company ends on time when
 * it is left alone: the gauge drops and picks leave the slow path. */
START_TEST(a_lone_peers_ejection_still_ends)
{
    keel_metrics *m;
    ck_assert_int_eq(keel_metrics_create(&m, NULL), 0);
    fixture f;
    setup(&f, (keel_lb_opts){.policy = (keel_lb_policy)_i, .max_fails = KEEL_LB_NO_MAX_FAILS,
                             .eject_consecutive = 1, .eject_max_percent = 50, .metrics = m},
          (uint32_t[]){1, 1}, 2, "ab");
    keel_lb_tried t = {.n = 1, .ids = {2}};
    keel_lb_peer *p;
    ck_assert_int_eq(keel_lb_pick(f.lb, &t, &p), 0);
    ck_assert_ptr_eq(p, f.p[0]);
    keel_lb_done(f.lb, p, 0, 0); /* a is ejected */
    ck_assert_int_eq(keel_lb_remove(f.lb, f.p[1]), 0);
    kt_clock_advance(&f.clock, 3600 * S);
    for (int i = 0; i < 10; i++) {
        ck_assert_int_eq(keel_lb_pick(f.lb, NULL, &p), 0);
        keel_lb_done(f.lb, p, 1, 0);
    }
    char *text;
    ck_assert_int_eq(keel_metrics_render_buf(m, KEEL_METRICS_PROMETHEUS, &text, NULL), 0);
    ck_assert_msg(strstr(text, "keel_lb_peer_ejected{lb=\"default\",peer=\"a\"} 0\n"), "%s", text);
    keel_free(text);
    keel_lb_destroy(f.lb);
    keel_metrics_destroy(m);
}
END_TEST

START_TEST(every_peer_ejected_still_leaves_them_to_pick)
{
    fixture f;
    setup(&f, (keel_lb_opts){.policy = (keel_lb_policy)_i, .max_fails = KEEL_LB_NO_MAX_FAILS,
                             .eject_consecutive = 1, .eject_max_percent = 100},
          (uint32_t[]){1, 1}, 2, "ab");
    keel_lb_peer_stats sa, sb;
    for (int k = 0; k < 2; k++) {
        keel_lb_tried t = {0};
        t.ids[t.n++] = (uint32_t)(2 - k); /* the other one (ids from 1): only p[k] can be picked */
        keel_lb_peer *p;
        ck_assert_int_eq(keel_lb_pick(f.lb, &t, &p), 0);
        ck_assert_ptr_eq(p, f.p[k]);
        keel_lb_done(f.lb, p, 0, 0);
    }
    keel_lb_peer_stats_get(f.lb, f.p[0], &sa);
    keel_lb_peer_stats_get(f.lb, f.p[1], &sb);
    ck_assert_int_eq(sa.ejected, 1);
    ck_assert_int_eq(sb.ejected, 1);
    /* both out for 30 s, yet picks go on, to both */
    bool seen[2] = {false, false};
    for (int i = 0; i < 64; i++) {
        keel_lb_peer *p;
        ck_assert_int_eq(keel_lb_pick(f.lb, NULL, &p), 0);
        seen[p == f.p[1]] = true;
        keel_lb_done(f.lb, p, 1, 0);
    }
    ck_assert(seen[0] && seen[1]);
    /* a DOWN peer stays out even so */
    ck_assert_int_eq(keel_lb_set_down(f.lb, f.p[0], 1), 0);
    for (int i = 0; i < 8; i++) {
        keel_lb_peer *p;
        ck_assert_int_eq(keel_lb_pick(f.lb, NULL, &p), 0);
        ck_assert_ptr_eq(p, f.p[1]);
        keel_lb_done(f.lb, p, 1, 0);
    }
    keel_lb_destroy(f.lb);
}
END_TEST

START_TEST(ejected_primaries_go_to_a_backup_first)
{
    fixture f;
    setup(&f, (keel_lb_opts){.policy = KEEL_LB_ROUND_ROBIN, .max_fails = KEEL_LB_NO_MAX_FAILS,
                             .eject_consecutive = 1, .eject_max_percent = 100},
          (uint32_t[]){1}, 1, "a");
    keel_lb_peer *b, *p;
    ck_assert_int_eq(keel_lb_add(f.lb, &(keel_lb_peer_opts){.name = "b", .flags = KEEL_LB_BACKUP}, &b), 0);
    ck_assert_int_eq(keel_lb_pick(f.lb, NULL, &p), 0);
    ck_assert_ptr_eq(p, f.p[0]);
    keel_lb_done(f.lb, p, 0, 0); /* a ejected: not alone, it has a backup */
    ck_assert_int_eq(keel_lb_pick(f.lb, NULL, &p), 0);
    ck_assert_ptr_eq(p, b);
    keel_lb_done(f.lb, p, 0, 0); /* and now b too */
    ck_assert_int_eq(keel_lb_pick(f.lb, NULL, &p), 0);
    ck_assert_ptr_eq(p, f.p[0]); /* the primaries first, as if none were ejected */
    keel_lb_done(f.lb, p, 1, 0);
    keel_lb_destroy(f.lb);
}
END_TEST

START_TEST(a_peer_left_alone_while_ejected_is_picked)
{
    fixture f;
    setup(&f, (keel_lb_opts){.policy = (keel_lb_policy)_i, .max_fails = KEEL_LB_NO_MAX_FAILS,
                             .eject_consecutive = 1, .eject_max_percent = 50},
          (uint32_t[]){1, 1}, 2, "ab");
    keel_lb_tried t = {.n = 1, .ids = {2}};
    keel_lb_peer *p;
    ck_assert_int_eq(keel_lb_pick(f.lb, &t, &p), 0);
    ck_assert_ptr_eq(p, f.p[0]);
    keel_lb_done(f.lb, p, 0, 0);
    ck_assert_int_eq(keel_lb_remove(f.lb, f.p[1]), 0);
    keel_lb_peer_stats st;
    keel_lb_peer_stats_get(f.lb, f.p[0], &st);
    ck_assert_int_eq(st.available, 1);
    ck_assert_int_eq(keel_lb_pick(f.lb, NULL, &p), 0);
    ck_assert_ptr_eq(p, f.p[0]);
    keel_lb_done(f.lb, p, 1, 0);
    keel_lb_destroy(f.lb);
}
END_TEST

/* ---- model-based: seeded random sequences against nginx ----
 *
 * Each run draws an lb (ROUND_ROBIN or LEAST_CONN, max_fails and
 * fail_timeout defaults) and drives it with picks (alone, or as retries of
 * one request with its tried set), done() with successes and failures,
 * clock steps (1 ns, a second, a fail_timeout exactly and 1 ns past it),
 * adds of peers of any weight, flags, max_fails, fail_timeout and
 * max_conns, removes and set_down. A model written from nginx's
 * ngx_http_upstream_get_peer(), ngx_http_upstream_get_least_conn_peer()
 * and ngx_http_upstream_free_round_robin_peer() gives every pick's answer,
 * and after every step each peer's effective and current weight, fails,
 * conns and availability, which the lb's must equal. A failure names its
 * seed and step; KT_LB_SEED=n (with CK_RUN_CASE=model) replays that run
 * alone, KT_LB_RUNS=n runs n seeds instead of the test's few. */

#define M_PEERS 48 /* peers added in one run, at most */
#define M_PICKS 24 /* picks in flight, at most */

typedef struct mpeer {
    keel_lb_peer *h;
    uint32_t id; /* the lb gives ids in order from 1 */
    bool in, down, backup;
    uint32_t weight, max_fails, max_conns;
    uint64_t fail_timeout;
    int64_t cur, eff; /* nginx's current_weight, effective_weight */
    uint32_t fails, conns;
    uint64_t accessed, checked;
} mpeer;

typedef struct mlb {
    kt_rng g;
    uint64_t seed;
    int step;
    keel_lb_policy policy;
    uint32_t max_fails;
    uint64_t fail_timeout;
    kt_clock clock;
    keel_lb *lb;
    mpeer peers[M_PEERS];
    size_t n;
    mpeer *picked[M_PICKS];
    size_t npicked;
    keel_lb_tried tried;
} mlb;

static bool m_tried(const keel_lb_tried *t, uint32_t id)
{
    for (uint32_t i = 0; t && i < t->n; i++)
        if (t->ids[i] == id)
            return true;
    return false;
}

/* nginx's tests in ngx_http_upstream_get_peer(), in its order. */
static bool m_eligible(const mpeer *p, uint64_t now, const keel_lb_tried *t)
{
    if (!p->in || p->down || m_tried(t, p->id))
        return false;
    if (p->max_fails != KEEL_LB_NO_MAX_FAILS && p->fails >= p->max_fails &&
        now - p->checked <= p->fail_timeout)
        return false;
    return !(p->max_conns && p->conns >= p->max_conns);
}

/* The lone peer of nginx's peers->single (no other peer, no backup), or
 * a backup left alone: never failed out either. */
static mpeer *m_single(mlb *m)
{
    mpeer *one = NULL;
    size_t in = 0;
    for (size_t i = 0; i < m->n; i++)
        if (m->peers[i].in) {
            in++;
            one = &m->peers[i];
        }
    return in == 1 ? one : NULL;
}

/* Smooth weighted round robin over the peers of the group marked in ok:
 * each adds its effective weight, which then grows back by one; the
 * highest current weight (the first on a tie) wins and loses the total. */
static mpeer *m_rr(mlb *m, const bool *ok)
{
    mpeer *best = NULL;
    int64_t total = 0;
    for (size_t i = 0; i < m->n; i++) {
        mpeer *p = &m->peers[i];
        if (!ok[i])
            continue;
        p->cur += p->eff;
        total += p->eff;
        if (p->eff < (int64_t)p->weight)
            p->eff++;
        if (!best || p->cur > best->cur)
            best = p;
    }
    if (best)
        best->cur -= total;
    return best;
}

/* One group (primaries or backups), as nginx's round robin or least_conn. */
static mpeer *m_group(mlb *m, bool backup, uint64_t now, const keel_lb_tried *t)
{
    bool ok[M_PEERS];
    for (size_t i = 0; i < m->n; i++)
        ok[i] = m->peers[i].backup == backup && m_eligible(&m->peers[i], now, t);
    if (m->policy == KEEL_LB_ROUND_ROBIN)
        return m_rr(m, ok);
    /* least_conn: the fewest conns per weight, cross-multiplied; several
     * alike go by round robin among them, from the first of them on */
    mpeer *best = NULL;
    bool many = false;
    for (size_t i = 0; i < m->n; i++) {
        mpeer *p = &m->peers[i];
        if (!ok[i])
            continue;
        uint64_t a = (uint64_t)p->conns * (best ? best->weight : 0);
        uint64_t b = best ? (uint64_t)best->conns * p->weight : 0;
        if (!best || a < b) {
            best = p;
            many = false;
        } else if (a == b) {
            many = true;
        }
    }
    if (!best || !many)
        return best;
    for (size_t i = 0; i < m->n; i++)
        ok[i] = ok[i] && &m->peers[i] >= best &&
                (uint64_t)m->peers[i].conns * best->weight == (uint64_t)best->conns * m->peers[i].weight;
    return m_rr(m, ok);
}

static mpeer *m_pick(mlb *m, keel_lb_tried *t)
{
    uint64_t now = kt_clock_now(&m->clock);
    mpeer *p = m_single(m);
    if (p) { /* nginx: a single peer is never failed out */
        if (p->down || m_tried(t, p->id) || (p->max_conns && p->conns >= p->max_conns))
            return NULL;
        /* lb.h: its effective weight, lowered while it had company, grows
         * back by one per round robin pick (its current weight gains and
         * loses it); least_conn moves it only in rounds among equals */
        if (m->policy == KEEL_LB_ROUND_ROBIN && p->eff < (int64_t)p->weight)
            p->eff++;
    } else if (!(p = m_group(m, false, now, t))) {
        p = m_group(m, true, now, t); /* every primary unavailable */
    }
    if (!p)
        return NULL;
    if (now - p->checked > p->fail_timeout)
        p->checked = now;
    p->conns++;
    if (t && t->n < 16)
        t->ids[t->n++] = p->id;
    return p;
}

/* ngx_http_upstream_free_round_robin_peer(). */
static void m_done(mlb *m, mpeer *p, bool ok)
{
    uint64_t now = kt_clock_now(&m->clock);
    if (!p->in || p->max_fails == KEEL_LB_NO_MAX_FAILS) {
        /* a removed peer's result counts against nothing */
    } else if (!ok) {
        if (m_single(m) != p) { /* nginx counts no failure of a single peer */
            p->fails++;
            p->accessed = p->checked = now;
            p->eff -= p->weight / p->max_fails;
            if (p->eff < 0)
                p->eff = 0;
        }
    } else if (p->accessed < p->checked) {
        /* "mark peer live if check passed"; also a peer left alone with
         * the count of its group (nginx's groups never change) */
        p->fails = 0;
    }
    p->conns--;
}

#define M_CHECK(m, cond, ...)                                                                      \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            char what_[256];                                                                       \
            snprintf(what_, sizeof what_, __VA_ARGS__);                                            \
            ck_abort_msg("seed %llu, step %d (%s): %s", (unsigned long long)(m)->seed, (m)->step, \
                         (m)->policy == KEEL_LB_ROUND_ROBIN ? "round robin" : "least_conn",        \
                         what_);                                                                   \
        }                                                                                          \
    } while (0)

static void m_compare(mlb *m)
{
    uint64_t now = kt_clock_now(&m->clock);
    size_t in = 0;
    mpeer *single = m_single(m);
    for (size_t i = 0; i < m->n; i++) {
        mpeer *p = &m->peers[i];
        if (!p->in)
            continue;
        in++;
        keel_lb_peer_stats st;
        M_CHECK(m, keel_lb_peer_stats_get(m->lb, p->h, &st) == 0, "stats of peer %u", p->id);
        bool avail = p == single ? !p->down && !(p->max_conns && p->conns >= p->max_conns)
                                 : m_eligible(p, now, NULL);
        M_CHECK(m, st.effective_weight == p->eff && st.current_weight == p->cur,
                "peer %u: effective %lld, current %lld; nginx %lld, %lld", p->id,
                (long long)st.effective_weight, (long long)st.current_weight, (long long)p->eff,
                (long long)p->cur);
        M_CHECK(m, st.fails == p->fails && st.conns == p->conns, "peer %u: fails %u, conns %u; nginx %u, %u",
                p->id, st.fails, st.conns, p->fails, p->conns);
        M_CHECK(m, st.available == avail, "peer %u: available %d; nginx %d", p->id, st.available, avail);
    }
    M_CHECK(m, keel_lb_count(m->lb) == in, "count %zu, model %zu", keel_lb_count(m->lb), in);
}

static void m_add(mlb *m)
{
    if (m->n == M_PEERS)
        return;
    static const uint32_t weights[] = {0, 1, 1, 2, 3, 5, 7, 1000000};
    static const uint32_t fails[] = {0, 0, 1, 2, 3, KEEL_LB_NO_MAX_FAILS};
    kt_rng *g = &m->g;
    keel_lb_peer_opts o = {.weight = weights[kt_rng_below(g, 8)],
                           .flags = (kt_rng_below(g, 5) == 0 ? KEEL_LB_BACKUP : 0) |
                                    (kt_rng_below(g, 8) == 0 ? KEEL_LB_DOWN : 0),
                           .max_fails = fails[kt_rng_below(g, 6)],
                           .fail_timeout_ns = kt_rng_below(g, 2) ? 0 : (1 + kt_rng_below(g, 3)) * S,
                           .max_conns = kt_rng_below(g, 4) ? 0 : (uint32_t)kt_rng_below(g, 3) + 1};
    mpeer *p = &m->peers[m->n];
    M_CHECK(m, keel_lb_add(m->lb, &o, &p->h) == 0, "add");
    p->id = (uint32_t)++m->n;
    p->in = true;
    p->down = o.flags & KEEL_LB_DOWN;
    p->backup = o.flags & KEEL_LB_BACKUP;
    p->weight = o.weight ? o.weight : 1;
    p->max_fails = o.max_fails ? o.max_fails : m->max_fails;
    p->fail_timeout = o.fail_timeout_ns ? o.fail_timeout_ns : m->fail_timeout;
    p->max_conns = o.max_conns;
    p->eff = p->weight;
}

/* A peer of the lb now, at random; NULL if none. */
static mpeer *m_any(mlb *m)
{
    size_t in = 0;
    for (size_t i = 0; i < m->n; i++)
        in += m->peers[i].in;
    if (in == 0)
        return NULL;
    size_t k = kt_rng_below(&m->g, in);
    for (size_t i = 0; i < m->n; i++)
        if (m->peers[i].in && k-- == 0)
            return &m->peers[i];
    return NULL;
}

/* The id of the peer of the lb with handle h, or 0. */
static uint32_t m_id_of(const mlb *m, const keel_lb_peer *h)
{
    for (size_t i = 0; i < m->n; i++)
        if (m->peers[i].in && m->peers[i].h == h)
            return m->peers[i].id;
    return 0;
}

static void m_step_pick(mlb *m)
{
    if (m->npicked == M_PICKS)
        return;
    bool retry = kt_rng_below(&m->g, 5) < 2;
    keel_lb_tried want_t = m->tried;
    keel_lb_peer *h = NULL;
    int rc = keel_lb_pick(m->lb, retry ? &m->tried : NULL, &h);
    mpeer *want = m_pick(m, retry ? &want_t : NULL);
    M_CHECK(m, rc == (want ? 0 : KEEL_EUNAVAIL) && (rc == 0) == (h != NULL),
            "pick%s returned %d, peer %u; nginx peer %u", retry ? " (retry)" : "", rc, m_id_of(m, h),
            want ? want->id : 0);
    M_CHECK(m, !want || h == want->h, "pick%s: peer %u, nginx peer %u", retry ? " (retry)" : "",
            m_id_of(m, h), want->id);
    M_CHECK(m, memcmp(&want_t, &m->tried, sizeof want_t) == 0, "the tried set differs");
    if (want)
        m->picked[m->npicked++] = want;
}

static void m_step_done(mlb *m)
{
    if (m->npicked == 0)
        return;
    size_t k = kt_rng_below(&m->g, m->npicked);
    mpeer *p = m->picked[k];
    bool ok = kt_rng_below(&m->g, 100) >= 30;
    M_CHECK(m, keel_lb_done(m->lb, p->h, ok, 0) == 0, "done of peer %u", p->id);
    m_done(m, p, ok);
    m->picked[k] = m->picked[--m->npicked];
}

static void m_step_clock(mlb *m)
{
    mpeer *p = m_any(m);
    uint64_t ft = p ? p->fail_timeout : m->fail_timeout, d;
    switch (kt_rng_below(&m->g, 6)) {
    case 0: d = 1; break;
    case 1: d = S; break;
    case 2: d = ft; break;
    case 3: d = ft + 1; break;
    case 4: /* to the end of a peer's window exactly, or 1 ns past it */
        d = p && p->checked + ft > kt_clock_now(&m->clock)
                ? p->checked + ft - kt_clock_now(&m->clock) + kt_rng_below(&m->g, 2)
                : 1;
        break;
    default: d = kt_rng_below(&m->g, 3 * S); break;
    }
    kt_clock_advance(&m->clock, d);
}

/* remove, or set_down; never on a removed peer's handle, whose memory a
 * later peer may reuse (fuzz_lb.c covers that). */
static void m_step_peer(mlb *m, bool remove)
{
    mpeer *p = m_any(m);
    if (!p)
        return;
    if (remove) {
        M_CHECK(m, keel_lb_remove(m->lb, p->h) == 0, "remove of peer %u", p->id);
        p->in = false;
    } else {
        bool down = kt_rng_below(&m->g, 2);
        M_CHECK(m, keel_lb_set_down(m->lb, p->h, down) == 0, "set_down of peer %u", p->id);
        p->down = down;
    }
}

static void m_run(keel_lb_policy policy, uint64_t seed, int steps)
{
    static const uint32_t fails[] = {0, 1, 2, 3, KEEL_LB_NO_MAX_FAILS};
    mlb *m = calloc(1, sizeof *m);
    ck_assert_ptr_nonnull(m);
    m->g = kt_rng_seed(seed);
    m->seed = seed;
    m->policy = policy;
    kt_clock_advance(&m->clock, 1000 * S);
    keel_lb_opts o = {.policy = policy, .max_fails = fails[kt_rng_below(&m->g, 5)],
                      .fail_timeout_ns = kt_rng_below(&m->g, 3) ? (1 + kt_rng_below(&m->g, 4)) * S : 0,
                      .clock = kt_clock_now, .clock_ud = &m->clock};
    m->max_fails = o.max_fails ? o.max_fails : 1;
    m->fail_timeout = o.fail_timeout_ns ? o.fail_timeout_ns : 10 * S;
    M_CHECK(m, keel_lb_create(&m->lb, &o) == 0, "create");
    for (int i = (int)kt_rng_below(&m->g, 6); i >= 0; i--)
        m_add(m);
    m_compare(m);
    for (m->step = 1; m->step <= steps; m->step++) {
        uint64_t op = kt_rng_below(&m->g, 100);
        if (op < 36)
            m_step_pick(m);
        else if (op < 66)
            m_step_done(m);
        else if (op < 80)
            m_step_clock(m);
        else if (op < 85)
            m_add(m);
        else if (op < 88)
            m_step_peer(m, true);
        else if (op < 94)
            m_step_peer(m, false);
        else
            memset(&m->tried, 0, sizeof m->tried); /* a new request */
        m_compare(m);
    }
    while (m->npicked)
        keel_lb_done(m->lb, m->picked[--m->npicked]->h, 1, 0);
    keel_lb_destroy(m->lb);
    free(m);
}

START_TEST(every_pick_is_the_one_nginx_makes)
{
    int n = kt_runs("KT_LB_RUNS", 300);
    for (int i = 0; i < n; i++)
        m_run((keel_lb_policy)_i, kt_seed("KT_LB_SEED", 1000 * (uint64_t)(_i + 1), i, &n), 400);
}
END_TEST

/* ---- threads ---- */

typedef struct picker {
    keel_lb *lb;
    atomic_int *stop;
    long picks, bad;
} picker;

static void *pick_loop(void *arg)
{
    picker *pk = arg;
    while (!atomic_load(pk->stop)) {
        keel_lb_peer *p;
        keel_lb_tried t = {0};
        int rc = keel_lb_pick(pk->lb, &t, &p);
        if (rc == 0) {
            const char *name = keel_lb_peer_name(p);
            if (strncmp(name, "peer", 4) != 0)
                pk->bad++;
            keel_lb_done(pk->lb, p, pk->picks % 5 != 0, (uint64_t)(pk->picks % 7) * MS);
            pk->picks++;
        } else if (rc != KEEL_EUNAVAIL) {
            pk->bad++;
        }
    }
    return NULL;
}

static void picks_during_changes(keel_lb_policy pol)
{
    keel_lb *lb;
    keel_lb_opts o = {.policy = pol, .max_fails = 3, .eject_consecutive = 4};
    ck_assert_int_eq(keel_lb_create(&lb, &o), 0);
    keel_lb_peer *peers[16] = {0};
    for (int i = 0; i < 4; i++) {
        char name[16];
        snprintf(name, sizeof name, "peer%d", i);
        keel_lb_add(lb, &(keel_lb_peer_opts){.name = name, .weight = (uint32_t)(1 + i)}, &peers[i]);
    }
    atomic_int stop = 0;
    picker pk[2] = {{lb, &stop, 0, 0}, {lb, &stop, 0, 0}};
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&t[i], NULL, pick_loop, &pk[i]);
    for (int round = 0; round < 200; round++) {
        int i = 4 + round % 12;
        if (peers[i]) {
            ck_assert_int_eq(keel_lb_remove(lb, peers[i]), 0);
            peers[i] = NULL;
        } else {
            char name[16];
            snprintf(name, sizeof name, "peer%d", i);
            ck_assert_int_eq(keel_lb_add(lb, &(keel_lb_peer_opts){.name = name, .weight = 2}, &peers[i]), 0);
        }
        keel_lb_set_down(lb, peers[round % 4], round % 3 == 0);
    }
    atomic_store(&stop, 1);
    for (int i = 0; i < 2; i++) {
        pthread_join(t[i], NULL);
        ck_assert_int_eq(pk[i].bad, 0);
    }
    keel_lb_destroy(lb);
}

START_TEST(picks_survive_peers_coming_and_going)
{
    picks_during_changes((keel_lb_policy)_i);
}
END_TEST

START_TEST(bad_input_is_refused)
{
    keel_lb *lb = (keel_lb *)0x1;
    keel_lb_opts bad[] = {{.policy = (keel_lb_policy)8}, {.eject_max_percent = 101}, {.p2c_bias = -1}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        ck_assert_int_eq(keel_lb_create(&lb, &bad[i]), KEEL_EINVAL);
    ck_assert_ptr_eq(lb, (keel_lb *)0x1);
    keel_lb_opts ok = {0};
    ck_assert_int_eq(keel_lb_create(&lb, &ok), 0);
    keel_lb_peer *p = NULL, *other = NULL;
    ck_assert_int_eq(keel_lb_pick(lb, NULL, &p), KEEL_EUNAVAIL); /* empty */
    ck_assert_int_eq(keel_lb_add(lb, &(keel_lb_peer_opts){.weight = 2000000}, &p), KEEL_EINVAL);
    ck_assert_int_eq(keel_lb_add(lb, &(keel_lb_peer_opts){.flags = 64}, &p), KEEL_EINVAL);
    ck_assert_int_eq(keel_lb_add(lb, NULL, &p), KEEL_EINVAL);
    ck_assert_int_eq(keel_lb_add(lb, &(keel_lb_peer_opts){0}, &p), 0);
    ck_assert_int_eq(keel_lb_remove(lb, p), 0);
    ck_assert_int_eq(keel_lb_remove(lb, p), KEEL_ENOTFOUND);
    ck_assert_int_eq(keel_lb_pick(NULL, NULL, &p), KEEL_EINVAL);
    ck_assert_int_eq(keel_lb_pick(lb, NULL, NULL), KEEL_EINVAL);
    ck_assert_int_eq(keel_lb_done(lb, NULL, 1, 0), KEEL_EINVAL);
    keel_lb *lb2;
    ck_assert_int_eq(keel_lb_create(&lb2, &ok), 0);
    keel_lb_add(lb2, &(keel_lb_peer_opts){0}, &other);
    ck_assert_int_eq(keel_lb_done(lb, other, 1, 0), KEEL_EINVAL); /* another lb's peer */
    ck_assert_int_eq(keel_lb_remove(lb, other), KEEL_ENOTFOUND);
    ck_assert_str_eq(keel_lb_peer_name(other), "");
    ck_assert_uint_eq(keel_lb_count(lb), 0);
    keel_lb_destroy(lb2);
    keel_lb_destroy(lb);
    keel_lb_destroy(NULL);
}
END_TEST

/* An allocator that, once armed, picks the lb's only peer and removes it
 * from inside the first allocation made after that peer is published, as
 * another thread holding a pick could: keel_lb_add() is then between
 * publishing the peer and returning. */
static struct {
    keel_lb *lb;
    atomic_int armed, removed;
} midway;

static void remove_midway(void)
{
    if (!atomic_exchange(&midway.armed, 0)) /* also keeps our own allocations out */
        return;
    if (keel_lb_count(midway.lb) != 1) {
        atomic_store(&midway.armed, 1);
        return;
    }
    keel_lb_peer *p;
    if (keel_lb_pick(midway.lb, NULL, &p) == 0) {
        keel_lb_done(midway.lb, p, 1, 0);
        if (keel_lb_remove(midway.lb, p) == 0)
            atomic_store(&midway.removed, 1);
    }
}

static void *malloc_midway(size_t n)
{
    remove_midway();
    return malloc(n);
}

static void *calloc_midway(size_t n, size_t size)
{
    remove_midway();
    return calloc(n, size);
}

START_TEST(a_peer_removed_while_it_is_added_leaves_no_series)
{
    keel_allocator a = {malloc_midway, calloc_midway, realloc, free};
    ck_assert_int_eq(keel_set_allocator(&a), 0);
    keel_metrics *m;
    ck_assert_int_eq(keel_metrics_create(&m, NULL), 0);
    keel_lb_opts o = {.metrics = m};
    ck_assert_int_eq(keel_lb_create(&midway.lb, &o), 0);
    keel_lb_peer *p;
    atomic_store(&midway.armed, 1);
    int rc = keel_lb_add(midway.lb, &(keel_lb_peer_opts){.name = "backend-1"}, &p);
    atomic_store(&midway.armed, 0);
    if (!atomic_load(&midway.removed)) { /* not caught midway: removed now */
        ck_assert_int_eq(rc, 0);
        ck_assert_int_eq(keel_lb_pick(midway.lb, NULL, &p), 0);
        keel_lb_done(midway.lb, p, 1, 0);
        ck_assert_int_eq(keel_lb_remove(midway.lb, p), 0);
    }
    ck_assert_uint_eq(keel_lb_count(midway.lb), 0);
    char *text;
    ck_assert_int_eq(keel_metrics_render_buf(m, KEEL_METRICS_PROMETHEUS, &text, NULL), 0);
    ck_assert_msg(!strstr(text, "keel_lb_peer_in_flight{"), "series of a removed peer:\n%s", text);
    keel_free(text);
    keel_lb_destroy(midway.lb);
    keel_metrics_destroy(m);
    keel_set_allocator(NULL);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("lb");
    TCase *tc = tcase_create("nginx");
    tcase_add_test(tc, smooth_round_robin_matches_nginx);
    tcase_add_test(tc, a_failure_lowers_effective_weight_which_grows_back_per_pick);
    tcase_add_test(tc, a_failed_peer_gets_exactly_one_probe_per_fail_timeout);
    tcase_add_test(tc, a_success_inside_the_window_keeps_the_count);
    tcase_add_test(tc, backups_serve_only_when_every_primary_is_down);
    tcase_add_test(tc, a_group_of_one_is_never_marked_down);
    tcase_add_test(tc, one_primary_with_a_backup_is_failed_out_like_any_other);
    tcase_add_test(tc, a_removed_peers_late_failure_counts_against_nothing);
    tcase_add_test(tc, tried_peers_are_skipped_by_retries);
    tcase_add_test(tc, stats_count_picks_and_failures);
    tcase_add_test(tc, a_peer_left_alone_with_failures_is_available);
    tcase_add_loop_test(tc, a_lone_backup_is_never_failed_out, KEEL_LB_ROUND_ROBIN, KEEL_LB_PEAK_EWMA + 1);
    tcase_add_test(tc, a_lone_peers_effective_weight_grows_back_per_pick);
    tcase_add_test(tc, least_conn_prefers_idle_and_rotates_ties);
    suite_add_tcase(s, tc);
    tc = tcase_create("p2c");
    tcase_add_test(tc, p2c_never_picks_the_busier_of_two);
    tcase_add_test(tc, weighted_p2c_compares_weight_over_load);
    tcase_add_test(tc, weighted_p2c_leaves_a_down_peer_out_of_the_shares);
    tcase_add_test(tc, weighted_p2c_among_backups_alone_still_weighs);
    tcase_add_test(tc, weighted_p2c_compares_when_the_draws_find_one_peer);
    tcase_add_test(tc, p2c_weights_are_equal_when_only_a_down_peer_differs);
    tcase_add_test(tc, weighted_p2c_spreads_picks_by_weight_at_rest);
    tcase_add_test(tc, peak_ewma_moves_away_from_a_slow_peer_and_back);
    tcase_add_test(tc, peak_ewma_compares_a_result_with_the_decayed_estimate);
    suite_add_tcase(s, tc);
    tc = tcase_create("ejection");
    tcase_add_test(tc, ejection_time_grows_with_each_ejection_and_caps);
    tcase_add_test(tc, ejection_never_passes_the_percentage_but_one_is_allowed);
    tcase_add_test(tc, the_ejection_multiplier_stops_where_envoys_does);
    tcase_add_test(tc, a_refused_ejection_resets_the_consecutive_count);
    tcase_add_test(tc, the_consecutive_count_starts_over_when_an_ejection_ends);
    tcase_add_loop_test(tc, a_lone_peer_is_never_ejected, KEEL_LB_ROUND_ROBIN, KEEL_LB_PEAK_EWMA + 1);
    tcase_add_loop_test(tc, a_lone_peers_ejection_still_ends, KEEL_LB_ROUND_ROBIN, KEEL_LB_PEAK_EWMA + 1);
    tcase_add_loop_test(tc, every_peer_ejected_still_leaves_them_to_pick, KEEL_LB_ROUND_ROBIN,
                        KEEL_LB_PEAK_EWMA + 1);
    tcase_add_test(tc, ejected_primaries_go_to_a_backup_first);
    tcase_add_loop_test(tc, a_peer_left_alone_while_ejected_is_picked, KEEL_LB_ROUND_ROBIN,
                        KEEL_LB_PEAK_EWMA + 1);
    tcase_add_test(tc, bad_input_is_refused);
    tcase_add_test(tc, a_peer_removed_while_it_is_added_leaves_no_series);
    suite_add_tcase(s, tc);
    tc = tcase_create("model");
    tcase_set_tags(tc, "model");
    tcase_add_loop_test(tc, every_pick_is_the_one_nginx_makes, KEEL_LB_ROUND_ROBIN, KEEL_LB_LEAST_CONN + 1);
    suite_add_tcase(s, tc);
    tc = tcase_create("threads");
    tcase_set_tags(tc, "stress"); /* hundreds of grace periods: not under valgrind */
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, picks_survive_peers_coming_and_going, KEEL_LB_ROUND_ROBIN, KEEL_LB_PEAK_EWMA + 1);
    suite_add_tcase(s, tc);
    return kt_run(s);
}
