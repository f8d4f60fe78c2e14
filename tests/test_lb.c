/* tests/test_lb.c — keel_lb: nginx's exact round robin, least_conn and
 * passive health; P2C, peak EWMA; outlier ejection; concurrency. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
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
    chooser ch = {2, 0, 1, 0}; /* always the pair (a, b) */
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

START_TEST(weighted_p2c_among_backups_alone_still_weighs)
{
    keel_lb *lb;
    chooser ch = {2, 0, 1, 0}; /* always the pair (a, b) */
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
    /* and one fast answer brings its estimate near b's (200 ms x 1% + 2 ms x 99%) */
    keel_lb_peer_stats_get(f.lb, f.p[0], &st);
    ck_assert(st.ewma_ns > 2e6 && st.ewma_ns < 5e6);
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
    tcase_add_test(tc, a_lone_peers_effective_weight_grows_back_per_pick);
    tcase_add_test(tc, least_conn_prefers_idle_and_rotates_ties);
    suite_add_tcase(s, tc);
    tc = tcase_create("p2c");
    tcase_add_test(tc, p2c_never_picks_the_busier_of_two);
    tcase_add_test(tc, weighted_p2c_compares_weight_over_load);
    tcase_add_test(tc, weighted_p2c_among_backups_alone_still_weighs);
    tcase_add_test(tc, peak_ewma_moves_away_from_a_slow_peer_and_back);
    suite_add_tcase(s, tc);
    tc = tcase_create("ejection");
    tcase_add_test(tc, ejection_time_grows_with_each_ejection_and_caps);
    tcase_add_test(tc, ejection_never_passes_the_percentage_but_one_is_allowed);
    tcase_add_test(tc, bad_input_is_refused);
    tcase_add_test(tc, a_peer_removed_while_it_is_added_leaves_no_series);
    suite_add_tcase(s, tc);
    tc = tcase_create("threads");
    tcase_set_tags(tc, "stress"); /* hundreds of grace periods: not under valgrind */
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, picks_survive_peers_coming_and_going, KEEL_LB_ROUND_ROBIN, KEEL_LB_PEAK_EWMA + 1);
    suite_add_tcase(s, tc);
    return kt_run(s);
}
