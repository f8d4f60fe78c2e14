/* examples/lb.c — requests spread over weighted upstreams, one of which
 * fails for a while: passive health takes it out, probes find it back.
 *
 * Time is simulated (an injected clock) so the run takes milliseconds: a
 * request every 10 ms for 60 s; upstream "c" fails every request from 10 s
 * to 30 s. Each line shows five seconds of traffic. */
#include <stdint.h>
#include <stdio.h>

#include <keel/breaker.h>
#include <keel/lb.h>

#define MS 1000000ull
#define S 1000000000ull

static uint64_t now_ns = 1;
static uint64_t fake_clock(void *ud)
{
    (void)ud;
    return now_ns;
}

int main(void)
{
    keel_lb *lb;
    keel_lb_opts opts = {
        .policy = KEEL_LB_ROUND_ROBIN,
        .max_fails = 3, .fail_timeout_ns = 5 * S,  /* nginx passive health */
        .eject_consecutive = 5, .eject_base_ns = 8 * S, /* Envoy ejection */
        .eject_max_percent = 50,
        .clock = fake_clock,
    };
    if (keel_lb_create(&lb, &opts) != 0)
        return 1;
    const char *names[] = {"a", "b", "c"};
    uint32_t weights[] = {5, 3, 2};
    keel_lb_peer *peer[3];
    for (int i = 0; i < 3; i++) {
        keel_lb_peer_opts po = {.name = names[i], .weight = weights[i], .ud = (void *)(intptr_t)i};
        if (keel_lb_add(lb, &po, &peer[i]) != 0) {
            keel_lb_destroy(lb);
            return 1;
        }
    }

    printf("weights a=5 b=3 c=2; c fails from 10 s to 30 s\n");
    printf("   time    a     b     c   c: fails  ejected  failures so far\n");
    int count[3] = {0}, unavailable = 0;
    for (int tick = 1; tick <= 6000; tick++) {
        now_ns += 10 * MS;
        keel_lb_tried tried = {0};
        keel_lb_peer *p;
        /* one request, retried on another upstream if it fails (nginx's
         * proxy_next_upstream) */
        for (int attempt = 0; attempt < 2; attempt++) {
            if (keel_lb_pick(lb, &tried, &p) != 0) {
                unavailable++;
                break;
            }
            int i = (int)(intptr_t)keel_lb_peer_ud(p);
            int failing = i == 2 && now_ns > 10 * S && now_ns <= 30 * S;
            count[i]++;
            keel_lb_done(lb, p, !failing, 20 * MS);
            if (!failing)
                break;
        }
        if (tick % 500 == 0) {
            keel_lb_peer_stats st;
            keel_lb_peer_stats_get(lb, peer[2], &st);
            printf("%5.0f s %5d %5d %5d   %8u  %7s  %llu\n", (double)now_ns / S, count[0], count[1],
                   count[2], st.fails, st.ejected ? "yes" : "no", (unsigned long long)st.failures);
            count[0] = count[1] = count[2] = 0;
        }
    }
    printf("requests with no upstream available: %d\n", unavailable);
    keel_lb_destroy(lb);

    /* The same idea one level up: a circuit breaker in front of a
     * dependency stops calling it while it fails, and probes it again. */
    keel_breaker *br;
    keel_breaker_opts bo = {.window_size = 20, .minimum_calls = 10, .wait_open_ns = 5 * S,
                            .permitted_in_half_open = 3};
    if (keel_breaker_create(&br, &bo) != 0)
        return 1;
    printf("\nbreaker in front of c (5 s open wait, 3 trial calls):\n");
    keel_breaker_state last = KEEL_BREAKER_CLOSED;
    int refused = 0;
    for (uint64_t t = 0; t <= 60 * S; t += 100 * MS) {
        if (keel_breaker_try_acquire(br, t) != 0) {
            refused++;
        } else {
            int failing = t > 10 * S && t <= 30 * S;
            keel_breaker_on_result(br, t, 20 * MS, failing);
        }
        keel_breaker_state s = keel_breaker_state_get(br);
        if (s != last)
            printf("  %5.1f s  %-9s -> %s\n", (double)t / S, keel_breaker_state_name(last),
                   keel_breaker_state_name(s));
        last = s;
    }
    printf("  calls refused while open: %d of 601\n", refused);
    keel_breaker_destroy(br);
    return 0;
}
