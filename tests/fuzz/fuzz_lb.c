/* tests/fuzz/fuzz_lb.c — keel_lb under a sequence of adds, picks, dones,
 * removes and set_downs, on a fake clock, against a model of its peers.
 *
 * Input: eight bytes of options [policy][max_fails][fail_timeout s][p2c
 * bias][eject_consecutive][eject_max_percent][unused][unused], then
 * operations [op][arg]; every operation first moves the clock on by
 * arg / 10 s. op % 8: 0 add a peer, followed by [arg % 24 name bytes]
 * [weight: 4 bytes little-endian][flags][max_fails][max_conns] (the name
 * is used when the weight's first byte is odd); 1, 2 pick (with the
 * request's tried set when arg is odd); 3 done (arg: which pick, success,
 * latency); 4 set_down (arg: which peer, down when >= 128); 5 remove twice;
 * 6 stats; 7 a new request (clear the tried set). The random numbers
 * P2C and PEAK_EWMA draw come from the input's bytes.
 *
 * Checks: create and add refuse exactly the bad options; a picked peer is
 * one in the lb and not down; pick answers a peer or KEEL_EUNAVAIL; a
 * second remove, and stats of a removed peer, are KEEL_ENOTFOUND; the
 * count always equals the model's. */
#include <keel/lb.h>

#include "fuzz.h"

#define MAX_PEERS 32
#define MAX_PICKS 64
#define SECOND_NS 1000000000ull

typedef struct peer {
    keel_lb_peer *p;
    bool in, down;
} peer;

typedef struct state {
    const uint8_t *d;
    size_t size, rand_i;
    uint64_t now;
    keel_lb *lb;
    peer peers[MAX_PEERS];
    size_t npeers;
    keel_lb_peer *picked[MAX_PICKS];
    size_t npicked;
    keel_lb_tried tried;
} state;

static uint64_t fake_clock(void *ud)
{
    return ((const state *)ud)->now;
}

static uint64_t input_rand(void *ud)
{
    state *st = ud;
    uint64_t v = 0x9e3779b97f4a7c15ull * (st->rand_i + 1);
    return v ^ st->d[st->rand_i++ % st->size] * 0x100000001b3ull;
}

static uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static keel_lb *lb_create(state *st)
{
    static const double biases[] = {0, 0.5, 1, 2, -1, 1e300};
    const uint8_t *d = st->d;
    keel_lb_opts o = {.policy = d[0] % 5, .max_fails = d[1] % 4u,
                      .fail_timeout_ns = (d[2] % 4u) * SECOND_NS, .p2c_bias = biases[d[3] % 6],
                      .eject_consecutive = d[4] % 4u, .eject_max_percent = d[5] % 120u,
                      .clock = fake_clock, .clock_ud = st, .rand = input_rand, .rand_ud = st};
    /* lib/lb.c also refuses a bias above 64, which lb.h does not say */
    bool bad = o.policy > KEEL_LB_PEAK_EWMA || !(o.p2c_bias >= 0) || o.p2c_bias > 64 ||
               o.eject_max_percent > 100;
    keel_lb *lb = NULL;
    int rc = keel_lb_create(&lb, &o);
    KF_CHECK((rc == 0) == !bad, "policy %d, bias %g, percent %u: create returned %d", (int)o.policy,
             o.p2c_bias, (unsigned)o.eject_max_percent, rc);
    return lb;
}

static peer *peer_of(state *st, const keel_lb_peer *p)
{
    for (size_t i = 0; i < st->npeers; i++)
        if (st->peers[i].in && st->peers[i].p == p)
            return &st->peers[i];
    return NULL;
}

static size_t peers_in(const state *st)
{
    size_t n = 0;
    for (size_t i = 0; i < st->npeers; i++)
        n += st->peers[i].in;
    return n;
}

/* Adds the peer at d[*i]; false when the input is too short for it. */
static bool op_add(state *st, uint8_t arg, size_t *i)
{
    const uint8_t *d = st->d;
    size_t len = arg % 24u;
    if (*i + len + 7 > st->size)
        return false;
    char name[32];
    memcpy(name, d + *i, len);
    name[len] = '\0';
    *i += len;
    const uint8_t *o = d + *i;
    keel_lb_peer_opts po = {.name = (o[0] & 1) ? name : NULL, .weight = le32(o) % 1000003u,
                            .flags = o[4] % 5u, .max_fails = o[5] % 3u, .max_conns = o[6] % 3u};
    *i += 7;
    bool bad = po.weight > 1000000 || po.flags > (KEEL_LB_BACKUP | KEEL_LB_DOWN);
    keel_lb_peer *p = NULL;
    int rc = keel_lb_add(st->lb, &po, &p);
    KF_CHECK((rc == 0) == !bad, "weight %u, flags %u: add returned %d", po.weight, po.flags, rc);
    if (rc != 0)
        return true;
    KF_CHECK(!po.name || strcmp(keel_lb_peer_name(p), name) == 0, "name %s", keel_lb_peer_name(p));
    if (st->npeers == MAX_PEERS) {
        KF_CHECK(keel_lb_remove(st->lb, p) == 0, "remove of a peer just added");
        return true;
    }
    st->peers[st->npeers++] = (peer){p, true, (po.flags & KEEL_LB_DOWN) != 0};
    return true;
}

static void op_pick(state *st, uint8_t arg)
{
    if (st->npicked == MAX_PICKS)
        return;
    keel_lb_peer *p = NULL;
    int rc = keel_lb_pick(st->lb, (arg & 1) ? &st->tried : NULL, &p);
    KF_CHECK(rc == 0 || rc == KEEL_EUNAVAIL, "pick returned %d", rc);
    if (rc != 0)
        return;
    const peer *pe = peer_of(st, p);
    KF_CHECK(pe != NULL, "picked a peer not in the lb");
    KF_CHECK(!pe->down, "picked a peer that is down");
    st->picked[st->npicked++] = p;
}

static void op_done(state *st, uint8_t arg)
{
    if (st->npicked == 0)
        return;
    size_t k = arg % st->npicked;
    int rc = keel_lb_done(st->lb, st->picked[k], arg & 1, (uint64_t)arg * 1000000);
    KF_CHECK(rc == 0, "done returned %d", rc);
    st->picked[k] = st->picked[--st->npicked];
}

/* set_down (op 4), remove twice (5) or stats (6) on a handle of the
 * table, live or removed. The lb checks handles by address, and a removed
 * peer's memory may hold a peer added since: what counts is whether a live
 * peer is at that address. */
static void op_on_peer(state *st, int op, uint8_t arg)
{
    if (st->npeers == 0)
        return;
    keel_lb_peer *p = st->peers[arg % st->npeers].p;
    peer *live = peer_of(st, p);
    int want = live ? 0 : KEEL_ENOTFOUND;
    int rc;
    if (op == 4) {
        int down = (arg & 0x80) ? 1 : 0;
        rc = keel_lb_set_down(st->lb, p, down);
        KF_CHECK(!live || rc == 0, "set_down returned %d", rc);
        if (live)
            live->down = down;
    } else if (op == 5) {
        rc = keel_lb_remove(st->lb, p);
        KF_CHECK(rc == want, "remove returned %d", rc);
        rc = keel_lb_remove(st->lb, p);
        KF_CHECK(rc == KEEL_ENOTFOUND, "a second remove returned %d", rc);
        if (live)
            live->in = false;
    } else {
        keel_lb_peer_stats ps;
        rc = keel_lb_peer_stats_get(st->lb, p, &ps);
        KF_CHECK(rc == want, "stats returned %d", rc);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *d, size_t size)
{
    if (size < 8)
        return 0;
    state *st = kf_calloc(sizeof *st);
    st->d = d;
    st->size = size;
    st->now = SECOND_NS;
    st->lb = lb_create(st);
    for (size_t i = 8; st->lb && i + 2 <= size;) {
        int op = d[i] % 8;
        uint8_t arg = d[i + 1];
        i += 2;
        st->now += arg * (SECOND_NS / 10);
        switch (op) {
        case 0:
            if (!op_add(st, arg, &i))
                i = size;
            break;
        case 1:
        case 2:
            op_pick(st, arg);
            break;
        case 3:
            op_done(st, arg);
            break;
        case 4:
        case 5:
        case 6:
            op_on_peer(st, op, arg);
            break;
        default:
            memset(&st->tried, 0, sizeof st->tried);
            break;
        }
        size_t count = keel_lb_count(st->lb);
        KF_CHECK(count == peers_in(st), "count %zu, peers %zu", count, peers_in(st));
    }
    while (st->npicked)
        KF_CHECK(keel_lb_done(st->lb, st->picked[--st->npicked], 1, 0) == 0, "done");
    keel_lb_destroy(st->lb);
    free(st);
    return 0;
}
