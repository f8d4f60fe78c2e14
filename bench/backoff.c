/* bench/backoff.c — 100 clients retry against one overloaded server with
 * each backoff policy; prints the calls made and the time until every
 * client succeeded (Brooker's AWS simulation: jitter needs far fewer calls
 * than plain exponential backoff). Plain exponential is the baseline.
 *
 * The server takes at most 5 requests per millisecond; the rest of that
 * millisecond's requests fail. Time is simulated: no sleeping. */
#include <string.h>

#include <keel/backoff.h>

#include "bench.h"

#define CLIENTS 100
#define PER_MS 5
#define HORIZON_MS 600000

typedef struct result {
    uint64_t calls, done_ms;
} result;

static result simulate(keel_backoff_policy policy)
{
    keel_backoff b[CLIENTS];
    uint64_t next_ms[CLIENTS];
    int done[CLIENTS] = {0}, left = CLIENTS;
    keel_backoff_opts o = {policy, 1000000 /* 1 ms */, 1000000000 /* 1 s */, NULL, NULL};
    for (int i = 0; i < CLIENTS; i++) {
        keel_backoff_init(&b[i], &o);
        next_ms[i] = 0; /* everyone arrives at once */
    }
    static uint16_t load[HORIZON_MS];
    memset(load, 0, sizeof load);
    result r = {0, 0};
    for (uint64_t ms = 0; ms < HORIZON_MS && left; ms++) {
        int served = 0;
        for (int i = 0; i < CLIENTS; i++) {
            if (done[i] || next_ms[i] != ms)
                continue;
            r.calls++;
            if (served < PER_MS) {
                served++;
                done[i] = 1;
                left--;
                r.done_ms = ms;
            } else {
                uint64_t d = keel_backoff_next(&b[i]) / 1000000;
                next_ms[i] = ms + (d ? d : 1);
            }
        }
    }
    return r;
}

int main(void)
{
    const char *names[] = {"constant (1 ms)", "exponential", "full jitter", "equal jitter",
                           "decorrelated jitter"};
    bench_section("backoff: 100 clients, a server taking 5 per ms, base 1 ms, cap 1 s");
    int runs = getenv("SHORT") && *getenv("SHORT") != '0' ? 3 : 50;
    result avg[5];
    for (int p = 0; p < 5; p++) {
        uint64_t calls = 0, ms = 0;
        for (int r = 0; r < runs; r++) {
            result x = simulate((keel_backoff_policy)p);
            calls += x.calls;
            ms += x.done_ms;
        }
        avg[p] = (result){calls / (uint64_t)runs, ms / (uint64_t)runs};
    }
    result base = avg[KEEL_BACKOFF_EXPONENTIAL];
    for (int p = 0; p < 5; p++)
        printf("%-24s calls %6llu (%5.2fx exponential's)  all done after %6llu ms (%6.3fx)\n",
               names[p], (unsigned long long)avg[p].calls, (double)avg[p].calls / (double)base.calls,
               (unsigned long long)avg[p].done_ms,
               (double)avg[p].done_ms / (double)(base.done_ms ? base.done_ms : 1));
    return 0;
}
