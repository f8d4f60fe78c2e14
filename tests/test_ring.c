/* tests/test_ring.c — keel_ring: ketama against libmemcached itself,
 * balance, movement on change, replicas, bounded loads, concurrent changes
 * during lookups, bad input. */
#define _GNU_SOURCE
#include <libmemcached/memcached.h>
#include <math.h>
#include <md5.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <keel/ring.h>

#include "harness.h"
#include "hash.h" /* to count the continuum's shared points */

static keel_ring *ring_new(keel_ring_algo algo)
{
    keel_ring *r = NULL;
    keel_ring_opts o = {.algo = algo};
    ck_assert_int_eq(keel_ring_create(&r, &o), 0);
    return r;
}

static void add_nodes(keel_ring *r, int n, int first)
{
    for (int i = first; i < first + n; i++) {
        char name[32];
        int len = snprintf(name, sizeof name, "node-%d", i);
        ck_assert_int_eq(keel_ring_add(r, name, (size_t)len, 1, (void *)(intptr_t)i), 0);
    }
}

static int owner(keel_ring *r, int key)
{
    char k[32];
    int len = snprintf(k, sizeof k, "key:%d", key);
    keel_ring_node nd;
    ck_assert_int_eq(keel_ring_lookup(r, k, (size_t)len, &nd), 0);
    return (int)(intptr_t)nd.ud;
}

/* ---- KETAMA == libmemcached ---- */

typedef struct cluster {
    int nodes;
    int port; /* 0: a different port per node */
    int weighted; /* 0: all 1; 1: 1 to 10 in turn; 2: one in four 100, the rest 1 to 3 */
} cluster;

static void ketama_against_libmemcached(cluster c)
{
    memcached_st *m = memcached_create(NULL);
    ck_assert_ptr_nonnull(m);
    ck_assert_int_eq(memcached_behavior_set(m, MEMCACHED_BEHAVIOR_KETAMA_WEIGHTED, 1),
                     MEMCACHED_SUCCESS);
    keel_ring *r = ring_new(KEEL_RING_KETAMA);
    keel_ring_node_spec *specs = calloc((size_t)c.nodes, sizeof *specs);
    char(*names)[48] = calloc((size_t)c.nodes, sizeof *names);
    for (int i = 0; i < c.nodes; i++) {
        char host[32];
        snprintf(host, sizeof host, "10.%d.%d.%d", i / 65536, (i / 256) % 256, i % 256 + 1);
        int port = c.port ? c.port : 11000 + i;
        uint32_t w = c.weighted == 2 ? (i % 4 ? (uint32_t)(1 + i % 3) : 100)
                     : c.weighted   ? (uint32_t)(1 + (i * 7) % 10)
                                    : 1;
        ck_assert_int_eq(memcached_server_add_with_weight(m, host, (in_port_t)port, w),
                         MEMCACHED_SUCCESS);
        /* libmemcached's naming: "host" at 11211, "host:port" otherwise */
        int len = port == 11211 ? snprintf(names[i], sizeof names[i], "%s", host)
                                : snprintf(names[i], sizeof names[i], "%s:%d", host, port);
        specs[i] = (keel_ring_node_spec){names[i], (size_t)len, w, (void *)(intptr_t)i};
    }
    ck_assert_int_eq(keel_ring_add_many(r, specs, (size_t)c.nodes), 0);

    int mismatches = 0;
    for (int k = 0; k < 100000; k++) {
        char key[40];
        int len = snprintf(key, sizeof key, "user:%d:session", k * 7919);
        uint32_t want = memcached_generate_hash(m, key, (size_t)len);
        keel_ring_node nd;
        ck_assert_int_eq(keel_ring_lookup(r, key, (size_t)len, &nd), 0);
        mismatches += (uint32_t)(intptr_t)nd.ud != want;
    }
    ck_assert_msg(mismatches == 0, "%d nodes, port %d, weighted %d: %d of 100000 keys differ",
                  c.nodes, c.port, c.weighted, mismatches);
    keel_ring_destroy(r);
    memcached_free(m);
    free(specs);
    free(names);
}

static const cluster ketama_cases[] = {
    {10, 11211, 0}, {10, 0, 0}, {10, 11211, 1}, {10, 0, 1},
    {25, 11211, 0}, /* 156 points per node, not 160 */
    {50, 0, 0},     /* 156 too */
    {100, 11211, 0}, {100, 0, 1}, {3, 11211, 1}, {2, 0, 0},
    {7, 0, 2}, {40, 11211, 2}, /* weights far apart */
};

START_TEST(ketama_matches_libmemcached)
{
    ketama_against_libmemcached(ketama_cases[_i]);
}
END_TEST

START_TEST(ketama_matches_libmemcached_after_a_removal)
{
    /* libmemcached rebuilt with the remaining servers in the same order. */
    memcached_st *m = memcached_create(NULL);
    memcached_behavior_set(m, MEMCACHED_BEHAVIOR_KETAMA_WEIGHTED, 1);
    keel_ring *r = ring_new(KEEL_RING_KETAMA);
    for (int i = 0; i < 26; i++) {
        char host[32];
        snprintf(host, sizeof host, "cache%d.example", i);
        ck_assert_int_eq(keel_ring_add(r, host, strlen(host), 1, NULL), 0);
        if (i != 7)
            memcached_server_add_with_weight(m, host, 11211, 1);
    }
    ck_assert_int_eq(keel_ring_remove(r, "cache7.example", 14), 0); /* 25 left: 156 points */
    for (int k = 0; k < 20000; k++) {
        char key[32];
        int len = snprintf(key, sizeof key, "k%d", k);
        const memcached_instance_st *want =
            memcached_server_instance_by_position(m, memcached_generate_hash(m, key, (size_t)len));
        keel_ring_node nd;
        keel_ring_lookup(r, key, (size_t)len, &nd);
        ck_assert_int_eq((int)nd.name_len, (int)strlen(memcached_server_name(want)));
        ck_assert(memcmp(nd.name, memcached_server_name(want), nd.name_len) == 0);
    }
    keel_ring_destroy(r);
    memcached_free(m);
}
END_TEST

START_TEST(ketama_matches_libmemcached_with_port_0_a_unix_socket_and_weight_0)
{
    /* named and weighted as keel_ring(3) says: port 0 is 11211, a socket
     * is "path:0", weight 0 is 1 */
    memcached_st *m = memcached_create(NULL);
    memcached_behavior_set(m, MEMCACHED_BEHAVIOR_KETAMA_WEIGHTED, 1);
    ck_assert_int_eq(memcached_server_add_with_weight(m, "a.example", 0, 1), MEMCACHED_SUCCESS);
    ck_assert_int_eq(memcached_server_add_unix_socket_with_weight(m, "/tmp/mc.sock", 2),
                     MEMCACHED_SUCCESS);
    ck_assert_int_eq(memcached_server_add_with_weight(m, "b.example", 11212, 0), MEMCACHED_SUCCESS);
    keel_ring *r = ring_new(KEEL_RING_KETAMA);
    static const char *const names[] = {"a.example", "/tmp/mc.sock:0", "b.example:11212"};
    static const uint32_t weights[] = {1, 2, 1};
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(
            keel_ring_add(r, names[i], strlen(names[i]), weights[i], (void *)(intptr_t)i), 0);
    for (int k = 0; k < 20000; k++) {
        char key[32];
        int len = snprintf(key, sizeof key, "k%d", k);
        keel_ring_node nd;
        ck_assert_int_eq(keel_ring_lookup(r, key, (size_t)len, &nd), 0);
        ck_assert_uint_eq((uint32_t)(intptr_t)nd.ud, memcached_generate_hash(m, key, (size_t)len));
    }
    keel_ring_destroy(r);
    memcached_free(m);
}
END_TEST

/* The value of every point of a ketama node named `name` (libmemcached's
 * "<name>-<n>" MD5 words); returns how many. */
static int ketama_point_values(const char *name, int points, uint32_t *v)
{
    for (int q = 0; q < points / 4; q++) {
        char b[96];
        int l = snprintf(b, sizeof b, "%s-%d", name, q);
        uint8_t d[MD5_DIGEST_LENGTH];
        MD5_CTX c;
        MD5Init(&c);
        MD5Update(&c, (const uint8_t *)b, (size_t)l);
        MD5Final(d, &c);
        for (int w = 0; w < 4; w++)
            v[4 * q + w] = (uint32_t)d[4 * w] | (uint32_t)d[4 * w + 1] << 8 |
                           (uint32_t)d[4 * w + 2] << 16 | (uint32_t)d[4 * w + 3] << 24;
    }
    return points / 4 * 4;
}

START_TEST(ketama_keeps_a_returning_nodes_place_as_libmemcached)
{
    /* Of these 100 servers, c23-43 and c23-86 share a point, which goes
     * to the one added first. libmemcached keeps an ejected server's
     * place in its list, so when c23-43 comes back it wins the tie again;
     * so must keel after a remove and an add of the same name. */
    memcached_st *m = memcached_create(NULL);
    memcached_behavior_set(m, MEMCACHED_BEHAVIOR_KETAMA_WEIGHTED, 1);
    keel_ring *r = ring_new(KEEL_RING_KETAMA);
    for (int i = 0; i < 100; i++) {
        char host[32];
        snprintf(host, sizeof host, "c23-%d.example", i);
        ck_assert_int_eq(memcached_server_add_with_weight(m, host, 11211, 1), MEMCACHED_SUCCESS);
        ck_assert_int_eq(keel_ring_add(r, host, strlen(host), 1, (void *)(intptr_t)i), 0);
    }
    uint32_t a[156], b[156]; /* 156 points each at 100 nodes */
    int shared = 0;
    for (int i = 0, n = ketama_point_values("c23-43.example", 156, a); i < n; i++)
        for (int j = 0, k = ketama_point_values("c23-86.example", 156, b); j < k; j++)
            shared += a[i] == b[j];
    ck_assert_int_eq(shared, 1);
    ck_assert_int_eq(keel_ring_remove(r, "c23-43.example", 14), 0);
    ck_assert_int_eq(keel_ring_add(r, "c23-43.example", 14, 1, (void *)43), 0);
    /* keys on the shared point (found by search), then ordinary keys */
    static const char *const on_it[] = {"k212177", "k486425", "k671665", "k856859",
                                        "k891710", "k896539", "k989495", "k1092408"};
    for (int k = 0; k < 8 + 20000; k++) {
        char key[32];
        int len = k < 8 ? snprintf(key, sizeof key, "%s", on_it[k])
                        : snprintf(key, sizeof key, "user:%d", k);
        uint32_t want = memcached_generate_hash(m, key, (size_t)len);
        if (k < 8)
            ck_assert_uint_eq(want, 43);
        keel_ring_node nd;
        ck_assert_int_eq(keel_ring_lookup(r, key, (size_t)len, &nd), 0);
        ck_assert_msg((uint32_t)(intptr_t)nd.ud == want, "%s: keel %d, libmemcached %u", key,
                      (int)(intptr_t)nd.ud, want);
    }
    keel_ring_destroy(r);
    memcached_free(m);
}
END_TEST

START_TEST(ketama_matches_libmemcached_with_the_longest_host_names)
{
    /* libmemcached takes host names up to 1024 bytes on any port, so a
     * server's name, "host:port", reaches 1030 bytes. */
    memcached_st *m = memcached_create(NULL);
    memcached_behavior_set(m, MEMCACHED_BEHAVIOR_KETAMA_WEIGHTED, 1);
    keel_ring *r = ring_new(KEEL_RING_KETAMA);
    static const int ports[] = {11211, 11212, 65535};
    for (int i = 0; i < 3; i++) {
        char host[1025], name[1040];
        memset(host, 'a' + i, 1024);
        host[1024] = '\0';
        ck_assert_int_eq(memcached_server_add_with_weight(m, host, (in_port_t)ports[i], 1),
                         MEMCACHED_SUCCESS);
        int len = ports[i] == 11211 ? snprintf(name, sizeof name, "%s", host)
                                    : snprintf(name, sizeof name, "%s:%d", host, ports[i]);
        ck_assert_int_eq(keel_ring_add(r, name, (size_t)len, 1, (void *)(intptr_t)i), 0);
    }
    for (int k = 0; k < 20000; k++) {
        char key[32];
        int len = snprintf(key, sizeof key, "k%d", k);
        keel_ring_node nd;
        ck_assert_int_eq(keel_ring_lookup(r, key, (size_t)len, &nd), 0);
        ck_assert_uint_eq((uint32_t)(intptr_t)nd.ud, memcached_generate_hash(m, key, (size_t)len));
    }
    keel_ring_destroy(r);
    memcached_free(m);
}
END_TEST

/* ---- balance ---- */

static double max_over_mean(keel_ring *r, int nodes, int keys)
{
    int *count = calloc((size_t)nodes, sizeof *count);
    for (int k = 0; k < keys; k++)
        count[owner(r, k)]++;
    int max = 0;
    for (int i = 0; i < nodes; i++)
        max = count[i] > max ? count[i] : max;
    free(count);
    return (double)max / ((double)keys / nodes);
}

START_TEST(every_algorithm_balances_within_its_bound)
{
    struct {
        keel_ring_algo algo;
        const char *name;
        double bound10, bound100;
    } cases[] = {
        /* 160 points per node: shares vary by about 1/sqrt(160) = 8%, so
         * the fullest of 10 (100) nodes sits within 4 (5.5) of those */
        {KEEL_RING_CONTINUUM, "continuum", 1.32, 1.45},
        {KEEL_RING_KETAMA, "ketama", 1.32, 1.45},
        /* perfect in theory; what remains is the noise of 1M keys */
        {KEEL_RING_JUMP, "jump", 1.02, 1.05},
        {KEEL_RING_MAGLEV, "maglev", 1.02, 1.06},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        keel_ring *r10 = ring_new(cases[c].algo), *r100 = ring_new(cases[c].algo);
        add_nodes(r10, 10, 0);
        add_nodes(r100, 100, 0);
        double b10 = max_over_mean(r10, 10, 1000000), b100 = max_over_mean(r100, 100, 1000000);
        printf("ring balance %-9s max/mean over 1M keys: %.3f at 10 nodes, %.3f at 100\n",
               cases[c].name, b10, b100);
        ck_assert_msg(b10 <= cases[c].bound10, "%s at 10 nodes: %.3f", cases[c].name, b10);
        ck_assert_msg(b100 <= cases[c].bound100, "%s at 100 nodes: %.3f", cases[c].name, b100);
        keel_ring_destroy(r10);
        keel_ring_destroy(r100);
    }
}
END_TEST

static void share_sum(const keel_ring_node *n, double share, void *ud)
{
    double *acc = ud;
    acc[0] += share;
    acc[1 + (intptr_t)n->ud] = share;
    acc[1000]++;
}

START_TEST(shares_sum_to_one_and_follow_weights)
{
    keel_ring_algo algos[] = {KEEL_RING_CONTINUUM, KEEL_RING_JUMP, KEEL_RING_MAGLEV};
    for (int a = 0; a < 3; a++) {
        keel_ring *r = ring_new(algos[a]);
        ck_assert_int_eq(keel_ring_add(r, "light", 5, 1, (void *)0), 0);
        ck_assert_int_eq(keel_ring_add(r, "heavy", 5, 3, (void *)1), 0);
        ck_assert_int_eq(keel_ring_add(r, "other", 5, 1, (void *)2), 0);
        double acc[1001] = {0};
        ck_assert_int_eq(keel_ring_nodes(r, share_sum, acc), 0);
        ck_assert_int_eq((int)acc[1000], 3);
        ck_assert_double_eq_tol(acc[0], 1.0, 1e-9);
        ck_assert_double_eq_tol(acc[2] / acc[1], 3.0, algos[a] == KEEL_RING_CONTINUUM ? 0.6 : 0.01);
        ck_assert_uint_eq(keel_ring_count(r), 3);
        keel_ring_destroy(r);
    }
}
END_TEST

/* ---- movement ---- */

#define MOVE_KEYS 200000

/* Removes node 13 of 20: every key it held moves (and there were enough
 * of them); returns how many of the other nodes' keys moved too. */
static int removal_moves_between_survivors(keel_ring_algo algo, int *survivors)
{
    keel_ring *r = ring_new(algo);
    add_nodes(r, 20, 0);
    int *before = malloc(MOVE_KEYS * sizeof *before);
    for (int k = 0; k < MOVE_KEYS; k++)
        before[k] = owner(r, k);
    ck_assert_int_eq(keel_ring_remove(r, "node-13", 7), 0);
    int moved = 0, between = 0;
    *survivors = 0;
    for (int k = 0; k < MOVE_KEYS; k++) {
        int now = owner(r, k);
        ck_assert_int_ne(now, 13);
        if (before[k] == 13)
            moved++;
        else
            ++*survivors, between += now != before[k];
    }
    ck_assert_int_gt(moved, MOVE_KEYS / 20 / 2);
    free(before);
    keel_ring_destroy(r);
    return between;
}

START_TEST(continuum_removal_moves_only_the_removed_nodes_keys)
{
    int survivors;
    ck_assert_int_eq(removal_moves_between_survivors(KEEL_RING_CONTINUUM, &survivors), 0); /* nobody else's */
}
END_TEST

START_TEST(adding_a_node_moves_about_one_in_n_plus_one_all_to_it)
{
    keel_ring_algo algos[] = {KEEL_RING_CONTINUUM, KEEL_RING_JUMP, KEEL_RING_MAGLEV,
                              KEEL_RING_KETAMA};
    for (int a = 0; a < 4; a++) {
        keel_ring *r = ring_new(algos[a]);
        add_nodes(r, 19, 0);
        int *before = malloc(MOVE_KEYS * sizeof *before);
        for (int k = 0; k < MOVE_KEYS; k++)
            before[k] = owner(r, k);
        add_nodes(r, 1, 19);
        int to_new = 0, elsewhere = 0;
        for (int k = 0; k < MOVE_KEYS; k++) {
            int now = owner(r, k);
            if (now == 19)
                to_new++;
            else if (now != before[k])
                elsewhere++;
        }
        double share = (double)to_new / MOVE_KEYS;
        printf("ring add 20th node, algo %d: %.2f%% of keys moved to it, %.2f%% between others\n",
               (int)algos[a], 100 * share, 100.0 * elsewhere / MOVE_KEYS);
        ck_assert_msg(share > 0.5 / 20 && share < 1.6 / 20, "algo %d: %.3f", (int)algos[a], share);
        if (algos[a] == KEEL_RING_CONTINUUM || algos[a] == KEEL_RING_JUMP)
            ck_assert_int_eq(elsewhere, 0);
        else /* maglev and ketama reshuffle a little, by design */
            ck_assert_msg(elsewhere < MOVE_KEYS / 20, "algo %d: %d moved elsewhere",
                          (int)algos[a], elsewhere);
        free(before);
        keel_ring_destroy(r);
    }
}
END_TEST

START_TEST(ketama_removal_also_moves_keys_between_survivors)
{
    /* The libmemcached quirk, reproduced: points depend on the node count. */
    keel_ring *r = ring_new(KEEL_RING_KETAMA);
    add_nodes(r, 100, 0);
    int *before = malloc(MOVE_KEYS * sizeof *before);
    for (int k = 0; k < MOVE_KEYS; k++)
        before[k] = owner(r, k);
    ck_assert_int_eq(keel_ring_remove(r, "node-42", 7), 0);
    int between = 0;
    for (int k = 0; k < MOVE_KEYS; k++) {
        int now = owner(r, k);
        ck_assert_int_ne(now, 42);
        between += before[k] != 42 && now != before[k];
    }
    double pct = 100.0 * between / MOVE_KEYS;
    printf("ring ketama: removing 1 of 100 moved %.2f%% of keys between survivors\n", pct);
    ck_assert(pct > 0.5 && pct < 5.0);
    free(before);
    keel_ring_destroy(r);
}
END_TEST

/* Maglev is not minimally disruptive: the table is refilled from every
 * node's permutation, so a survivor can lose entries to another survivor
 * (the NSDI 2016 paper trades this for balance and measures it as the
 * table's resilience to backend changes). Removing each one of 20 nodes
 * in turn moved 0.31-0.43% of the survivors' keys here (0.70% at 160 nodes); the bound
 * leaves room for a change of hash but not for a real reshuffle. */
#define MAGLEV_BETWEEN_PCT 1.5

#define ORDER_NODES 1000
#define ORDER_PPW 10000 /* 10M continuum points: thousands of shared values */

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Continuum points whose value a point of another node also has, computed
 * as lib/ring.c computes them (a splitmix64 sequence seeded by the hash of
 * the name): the places where the add order could break a tie. */
static size_t shared_points(const keel_ring_node_spec *specs, size_t n, unsigned ppw)
{
    uint64_t *v = malloc(n * ppw * sizeof *v);
    ck_assert_ptr_nonnull(v);
    for (size_t i = 0; i < n; i++) {
        uint64_t h = keel__hash64(specs[i].name, specs[i].name_len, 0);
        for (size_t p = 0; p < ppw; p++)
            v[i * ppw + p] = (keel__mix64(h + p * 0x9e3779b97f4a7c15ull) >> 32) << 32 | i;
    }
    qsort(v, n * ppw, sizeof *v, cmp_u64);
    size_t shared = 0;
    for (size_t k = 1; k < n * ppw; k++)
        shared += v[k] >> 32 == v[k - 1] >> 32;
    free(v);
    return shared;
}

/* Two processes that learned the same nodes in different orders must agree
 * on every key, where two nodes' points collide too: CONTINUUM and MAGLEV
 * (JUMP's buckets are its order; KETAMA keeps libmemcached's order of
 * addition, see ketama_keeps_a_returning_nodes_place_as_libmemcached). */
START_TEST(the_order_nodes_were_added_in_does_not_move_keys)
{
    static char names[ORDER_NODES][24];
    static keel_ring_node_spec specs[3][ORDER_NODES]; /* forward, reverse, shuffled */
    keel_ring_algo algos[] = {KEEL_RING_CONTINUUM, KEEL_RING_MAGLEV};
    uint64_t x = 88172645463325252ull; /* xorshift64, fixed: a repeatable shuffle */
    for (int a = 0; a < 2; a++) {
        for (int i = 0; i < ORDER_NODES; i++) {
            int len = snprintf(names[i], sizeof names[i], "10.0.%d.%d:6379", i / 250, i % 250);
            /* maglev: weights apart, so that quotas tie too */
            uint32_t w = algos[a] == KEEL_RING_MAGLEV ? (uint32_t)(1 + i % 3) : 1;
            specs[0][i] = (keel_ring_node_spec){names[i], (size_t)len, w, (void *)(intptr_t)i};
            specs[1][ORDER_NODES - 1 - i] = specs[0][i];
            specs[2][i] = specs[0][i];
        }
        for (int i = ORDER_NODES - 1; i > 0; i--) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            int j = (int)(x % (uint64_t)(i + 1));
            keel_ring_node_spec t = specs[2][i];
            specs[2][i] = specs[2][j];
            specs[2][j] = t;
        }
        if (algos[a] == KEEL_RING_CONTINUUM) {
            size_t shared = shared_points(specs[0], ORDER_NODES, ORDER_PPW);
            printf("ring continuum: %zu of %d points share their value\n", shared,
                   ORDER_NODES * ORDER_PPW);
            ck_assert_uint_gt(shared, 1000);
        }
        int *want = malloc(MOVE_KEYS * sizeof *want);
        for (int o = 0; o < 3; o++) {
            keel_ring *r = NULL;
            keel_ring_opts opts = {.algo = algos[a], .points_per_weight = ORDER_PPW};
            ck_assert_int_eq(keel_ring_create(&r, &opts), 0);
            ck_assert_int_eq(keel_ring_add_many(r, specs[o], ORDER_NODES), 0);
            int differ = 0;
            for (int k = 0; k < MOVE_KEYS; k++) {
                if (o == 0)
                    want[k] = owner(r, k);
                else
                    differ += owner(r, k) != want[k];
            }
            ck_assert_msg(differ == 0, "algorithm %d, order %d: %d of %d keys differ",
                          (int)algos[a], o, differ, MOVE_KEYS);
            keel_ring_destroy(r);
        }
        free(want);
    }
}
END_TEST

START_TEST(maglev_removal_moves_the_removed_nodes_keys_and_few_others)
{
    int survivors;
    double pct = 100.0 * removal_moves_between_survivors(KEEL_RING_MAGLEV, &survivors) / survivors;
    printf("ring maglev: removing 1 of 20 moved %.2f%% of the survivors' keys\n", pct);
    ck_assert_msg(pct < MAGLEV_BETWEEN_PCT, "%.2f%% of the survivors' keys moved", pct);
}
END_TEST

START_TEST(jump_removes_only_its_last_node)
{
    keel_ring *r = ring_new(KEEL_RING_JUMP);
    add_nodes(r, 10, 0);
    ck_assert_int_eq(keel_ring_remove(r, "node-3", 6), KEEL_EINVAL);
    int *before = malloc(MOVE_KEYS * sizeof *before);
    for (int k = 0; k < MOVE_KEYS; k++)
        before[k] = owner(r, k);
    ck_assert_int_eq(keel_ring_remove(r, "node-9", 6), 0);
    for (int k = 0; k < MOVE_KEYS; k++)
        if (before[k] != 9)
            ck_assert_int_eq(owner(r, k), before[k]);
    ck_assert_int_eq(keel_ring_remove(r, "node-8", 6), 0); /* now the last */
    free(before);
    keel_ring_destroy(r);
}
END_TEST

/* ---- replicas ---- */

START_TEST(replicas_are_distinct_stable_and_start_with_the_owner)
{
    keel_ring_algo algos[] = {KEEL_RING_CONTINUUM, KEEL_RING_KETAMA, KEEL_RING_JUMP,
                              KEEL_RING_MAGLEV};
    for (int a = 0; a < 4; a++) {
        keel_ring *r = ring_new(algos[a]);
        add_nodes(r, 8, 0);
        for (int k = 0; k < 2000; k++) {
            char key[16];
            int len = snprintf(key, sizeof key, "r%d", k);
            keel_ring_node rep[3], again[3], one;
            size_t found;
            ck_assert_int_eq(keel_ring_lookup_n(r, key, (size_t)len, 3, rep, &found), 0);
            ck_assert_uint_eq(found, 3);
            ck_assert_int_eq(keel_ring_lookup(r, key, (size_t)len, &one), 0);
            ck_assert_uint_eq(rep[0].id, one.id);
            ck_assert(rep[0].id != rep[1].id && rep[1].id != rep[2].id && rep[0].id != rep[2].id);
            keel_ring_lookup_n(r, key, (size_t)len, 3, again, &found);
            for (int i = 0; i < 3; i++)
                ck_assert_uint_eq(rep[i].id, again[i].id);
        }
        keel_ring_node all[20];
        size_t found;
        ck_assert_int_eq(keel_ring_lookup_n(r, "x", 1, 20, all, &found), 0);
        ck_assert_uint_eq(found, 8); /* no more than there are */
        keel_ring_destroy(r);
    }
}
END_TEST

START_TEST(continuum_replica_set_survives_an_unrelated_removal)
{
    keel_ring *r = ring_new(KEEL_RING_CONTINUUM);
    add_nodes(r, 12, 0);
    int same = 0, checked = 0;
    for (int k = 0; k < 3000; k++) {
        char key[16];
        int len = snprintf(key, sizeof key, "s%d", k);
        keel_ring_node rep[2];
        size_t found;
        keel_ring_lookup_n(r, key, (size_t)len, 2, rep, &found);
        if ((intptr_t)rep[0].ud == 5 || (intptr_t)rep[1].ud == 5)
            continue;
        keel_ring_node tmp[2];
        ck_assert_int_eq(keel_ring_remove(r, "node-5", 6), 0);
        keel_ring_lookup_n(r, key, (size_t)len, 2, tmp, &found);
        same += tmp[0].ud == rep[0].ud && tmp[1].ud == rep[1].ud;
        checked++;
        ck_assert_int_eq(keel_ring_add(r, "node-5", 6, 1, (void *)5), 0);
        if (checked == 200)
            break;
    }
    ck_assert_int_eq(same, checked);
    keel_ring_destroy(r);
}
END_TEST

/* ---- bounded loads ---- */

START_TEST(bounded_loads_never_exceed_the_cap_under_skew)
{
    keel_ring_algo algos[] = {KEEL_RING_CONTINUUM, KEEL_RING_JUMP, KEEL_RING_MAGLEV};
    for (int a = 0; a < 3; a++) {
        keel_ring *r = NULL;
        keel_ring_opts o = {.algo = algos[a], .load_epsilon = 0.25};
        ck_assert_int_eq(keel_ring_create(&r, &o), 0);
        add_nodes(r, 10, 0);
        keel_ring_node *held = malloc(5000 * sizeof *held);
        for (int m = 1; m <= 5000; m++) {
            /* half the stream is one hot key */
            char key[16];
            int len = m % 2 ? snprintf(key, sizeof key, "hot") : snprintf(key, sizeof key, "k%d", m);
            ck_assert_int_eq(keel_ring_assign(r, key, (size_t)len, &held[m - 1]), 0);
            uint64_t cap = (uint64_t)ceil(1.25 * m / 10.0);
            ck_assert_uint_le(keel_ring_load(r, &held[m - 1]), cap);
        }
        uint64_t sum = 0;
        keel_ring_node nodes[10];
        size_t found;
        keel_ring_lookup_n(r, "any", 3, 10, nodes, &found);
        for (size_t i = 0; i < found; i++) {
            ck_assert_uint_le(keel_ring_load(r, &nodes[i]), (uint64_t)ceil(1.25 * 5000 / 10.0));
            sum += keel_ring_load(r, &nodes[i]);
        }
        ck_assert_uint_eq(sum, 5000);
        for (int i = 0; i < 5000; i++)
            ck_assert_int_eq(keel_ring_unassign(r, &held[i]), 0);
        for (size_t i = 0; i < found; i++)
            ck_assert_uint_eq(keel_ring_load(r, &nodes[i]), 0);
        ck_assert_int_eq(keel_ring_unassign(r, &held[0]), KEEL_EINVAL); /* none left */
        free(held);
        keel_ring_destroy(r);
    }
}
END_TEST

/* Capacities follow weight, as HAProxy's hash-balance-factor scales each
 * server's: a node of weight 1 beside one of 9 holds at most
 * ceil((1 + eps) x m / 10) assignments, not (1 + eps) x m / 2. */
START_TEST(bounded_loads_follow_weights)
{
    keel_ring_algo algos[] = {KEEL_RING_CONTINUUM, KEEL_RING_KETAMA, KEEL_RING_JUMP, KEEL_RING_MAGLEV};
    for (int a = 0; a < 4; a++) {
        keel_ring *r = NULL;
        keel_ring_opts o = {.algo = algos[a], .load_epsilon = 0.25};
        ck_assert_int_eq(keel_ring_create(&r, &o), 0);
        ck_assert_int_eq(keel_ring_add(r, "big", 3, 9, (void *)(intptr_t)9), 0);
        ck_assert_int_eq(keel_ring_add(r, "small", 5, 1, (void *)(intptr_t)1), 0);
        keel_ring_node nd, big = {0}, small = {0};
        for (int m = 1; m <= 10000; m++) {
            char key[16];
            int len = snprintf(key, sizeof key, "k%d", m);
            ck_assert_int_eq(keel_ring_assign(r, key, (size_t)len, &nd), 0);
            *((intptr_t)nd.ud == 9 ? &big : &small) = nd;
            uint64_t cap = (uint64_t)ceil(1.25 * m * (double)(intptr_t)nd.ud / 10.0);
            ck_assert_uint_le(keel_ring_load(r, &nd), cap < 1 ? 1 : cap);
        }
        ck_assert_uint_le(keel_ring_load(r, &small), 1250);
        ck_assert_uint_ge(keel_ring_load(r, &big), 8750);
        keel_ring_destroy(r);
    }
}
END_TEST

START_TEST(assignments_end_with_a_removed_node)
{
    keel_ring *r = ring_new(KEEL_RING_CONTINUUM);
    add_nodes(r, 3, 0);
    keel_ring_node a[30];
    for (int i = 0; i < 30; i++) {
        char key[8];
        int len = snprintf(key, sizeof key, "%d", i);
        ck_assert_int_eq(keel_ring_assign(r, key, (size_t)len, &a[i]), 0);
    }
    ck_assert_int_eq(keel_ring_remove(r, "node-1", 6), 0);
    for (int i = 0; i < 30; i++)
        ck_assert_int_eq(keel_ring_unassign(r, &a[i]), (intptr_t)a[i].ud == 1 ? KEEL_ENOTFOUND : 0);
    keel_ring_destroy(r);
}
END_TEST

/* ---- concurrency ---- */

typedef struct reader {
    keel_ring *r;
    atomic_int *stop, *started;
    long lookups, bad;
} reader;

static void *read_loop(void *arg)
{
    reader *rd = arg;
    char key[16];
    for (long i = 0; !atomic_load(rd->stop); i++) {
        int len = snprintf(key, sizeof key, "c%ld", i % 5000);
        keel_ring_node nd, rep[2];
        size_t found;
        int rc = keel_ring_lookup(rd->r, key, (size_t)len, &nd);
        if (rc == 0) {
            intptr_t id = (intptr_t)nd.ud;
            char expect[16];
            int el = snprintf(expect, sizeof expect, "node-%d", (int)id);
            /* a node from one version, whole: its name matches its ud */
            if (id < 0 || id >= 40 || (size_t)el != nd.name_len || memcmp(expect, nd.name, nd.name_len))
                rd->bad++;
        } else if (rc != KEEL_EUNAVAIL) {
            rd->bad++;
        }
        if (keel_ring_lookup_n(rd->r, key, (size_t)len, 2, rep, &found) == 0 && found == 2 &&
            rep[0].id == rep[1].id)
            rd->bad++;
        if (rd->lookups++ == 100)
            atomic_fetch_add(rd->started, 1);
    }
    return NULL;
}

static void lookups_during_changes(keel_ring_algo algo)
{
    keel_ring *r = ring_new(algo);
    add_nodes(r, 10, 0);
    atomic_int stop = 0, started = 0;
    reader rd[2] = {{r, &stop, &started, 0, 0}, {r, &stop, &started, 0, 0}};
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&t[i], NULL, read_loop, &rd[i]);
    while (atomic_load(&started) < 2) /* both readers are running */
        sched_yield();
    int member[40] = {0};
    for (int round = 0; round < 150; round++) {
        /* jump: add and drop the last; others: toggle nodes in any order */
        int id = algo == KEEL_RING_JUMP ? 10 : 10 + (round * 7) % 30;
        char name[16];
        int len = snprintf(name, sizeof name, "node-%d", id);
        if (!member[id]) {
            ck_assert_int_eq(keel_ring_add(r, name, (size_t)len, 1 + round % 3, (void *)(intptr_t)id), 0);
            member[id] = 1;
        }
        if (algo == KEEL_RING_JUMP || round % 3 == 0) {
            ck_assert_int_eq(keel_ring_remove(r, name, (size_t)len), 0);
            member[id] = 0;
        }
    }
    atomic_store(&stop, 1);
    for (int i = 0; i < 2; i++) {
        pthread_join(t[i], NULL);
        ck_assert_int_eq(rd[i].bad, 0);
        ck_assert_int_gt(rd[i].lookups, 0);
    }
    keel_ring_destroy(r);
}

START_TEST(lookups_never_see_a_half_built_ring)
{
    lookups_during_changes((keel_ring_algo)_i);
}
END_TEST

START_TEST(a_ketama_node_without_points_still_serves_as_a_replica)
{
    /* weight 1 against 1000: libmemcached gives it no point at all */
    keel_ring *r;
    keel_ring_opts o = {.algo = KEEL_RING_KETAMA, .load_epsilon = 1e-9};
    ck_assert_int_eq(keel_ring_create(&r, &o), 0);
    ck_assert_int_eq(keel_ring_add(r, "big", 3, 1000, (void *)0), 0);
    ck_assert_int_eq(keel_ring_add(r, "small", 5, 1, (void *)1), 0);
    keel_ring_node rep[2], a;
    size_t found;
    ck_assert_int_eq(keel_ring_lookup_n(r, "k", 1, 2, rep, &found), 0);
    ck_assert_uint_eq(found, 2);
    ck_assert_ptr_eq(rep[1].ud, (void *)1);
    /* big's capacity, ceil(m x 1000 / 1001) (epsilon all but 0), first
     * falls short of m at the 1002nd: that one spills to small */
    int m = 0;
    do
        ck_assert_int_eq(keel_ring_assign(r, "k", 1, &a), 0);
    while (++m < 2000 && a.ud == (void *)0);
    ck_assert_int_eq(m, 1002);
    ck_assert_ptr_eq(a.ud, (void *)1);
    keel_ring_destroy(r);
}
END_TEST

typedef struct visit {
    keel_ring *r;
    int calls;
} visit;

static void add_from_inside(const keel_ring_node *n, double share, void *ud)
{
    (void)n;
    (void)share;
    visit *v = ud;
    char name[8];
    snprintf(name, sizeof name, "x%d", v->calls++);
    ck_assert_int_eq(keel_ring_add(v->r, name, strlen(name), 1, NULL), 0); /* the ring being visited */
}

START_TEST(changes_from_inside_a_visit_work)
{
    keel_ring *r = ring_new(KEEL_RING_CONTINUUM);
    add_nodes(r, 2, 0);
    visit v = {r, 0};
    ck_assert_int_eq(keel_ring_nodes(r, add_from_inside, &v), 0);
    ck_assert_int_eq(v.calls, 2); /* the version taken before the first call */
    ck_assert_uint_eq(keel_ring_count(r), 4);
    ck_assert_int_eq(keel_ring_remove(r, "x0", 2), 0);
    ck_assert_uint_eq(keel_ring_count(r), 3);
    keel_ring_destroy(r);
}
END_TEST

START_TEST(a_failed_add_changes_nothing_and_names_come_back)
{
    keel_ring *r = ring_new(KEEL_RING_CONTINUUM);
    ck_assert_int_eq(keel_ring_add(r, "a", 1, 1, (void *)1), 0);
    keel_ring_node before;
    keel_ring_lookup(r, "k", 1, &before);
    keel_ring_node_spec specs[2] = {{"b", 1, 1, NULL}, {"a", 1, 1, NULL}};
    ck_assert_int_eq(keel_ring_add_many(r, specs, 2), KEEL_EEXIST);
    ck_assert_uint_eq(keel_ring_count(r), 1);
    ck_assert_int_eq(keel_ring_add(r, "b", 1, 1, (void *)2), 0); /* b was not kept */
    /* a removed name's bytes stay readable and the record returns on re-add */
    const void *name = before.name;
    ck_assert_int_eq(keel_ring_remove(r, "a", 1), 0);
    ck_assert(memcmp(name, "a", 1) == 0);
    ck_assert_int_eq(keel_ring_add(r, "a", 1, 3, (void *)3), 0);
    keel_ring_node again = {0};
    keel_ring_node all[2];
    size_t found;
    keel_ring_lookup_n(r, "k", 1, 2, all, &found);
    for (size_t i = 0; i < found; i++)
        if (all[i].ud == (void *)3)
            again = all[i];
    ck_assert_ptr_eq(again.name, name);
    ck_assert_uint_gt(again.id, before.id); /* a new id for the new membership */
    ck_assert_uint_eq(again.weight, 3);
    keel_ring_destroy(r);
}
END_TEST

/* ---- bad input ---- */

START_TEST(bad_input_is_refused)
{
    keel_ring *r = (keel_ring *)0x1;
    keel_ring_opts bad[] = {
        {.algo = (keel_ring_algo)7},
        {.points_per_weight = 10001},
        {.algo = KEEL_RING_MAGLEV, .maglev_size = 65536},
        {.algo = KEEL_RING_MAGLEV, .maglev_size = 5},
        {.load_epsilon = -0.5},
        {.load_epsilon = NAN},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        ck_assert_msg(keel_ring_create(&r, &bad[i]) == KEEL_EINVAL, "opts %zu accepted", i);
    ck_assert_ptr_eq(r, (keel_ring *)0x1);
    ck_assert_int_eq(keel_ring_create(NULL, &bad[0]), KEEL_EINVAL);
    ck_assert_int_eq(keel_ring_create(&r, NULL), 0); /* the defaults */
    ck_assert_int_eq(keel_ring_add(r, "a", 1, 1, NULL), 0);
    ck_assert_uint_eq(keel_ring_count(r), 1);
    keel_ring_destroy(r);

    r = ring_new(KEEL_RING_CONTINUUM);
    keel_ring_node nd;
    size_t found = 9;
    ck_assert_int_eq(keel_ring_lookup(r, "k", 1, &nd), KEEL_EUNAVAIL);
    ck_assert_int_eq(keel_ring_lookup_n(r, "k", 1, 2, &nd, &found), KEEL_EUNAVAIL);
    ck_assert_uint_eq(found, 0);
    ck_assert_int_eq(keel_ring_assign(r, "k", 1, &nd), KEEL_EUNAVAIL);
    ck_assert_int_eq(keel_ring_add(r, "a", 1, 0, NULL), KEEL_EINVAL);
    ck_assert_int_eq(keel_ring_add(r, "", 0, 1, NULL), KEEL_EINVAL);
    ck_assert_int_eq(keel_ring_add(r, NULL, 1, 1, NULL), KEEL_EINVAL);
    char longname[1031];
    memset(longname, 'x', sizeof longname);
    ck_assert_int_eq(keel_ring_add(r, longname, sizeof longname, 1, NULL), KEEL_EINVAL);
    ck_assert_int_eq(keel_ring_add(r, "a\0b", 3, 1, NULL), 0); /* names are bytes */
    ck_assert_int_eq(keel_ring_add(r, "a\0b", 3, 1, NULL), KEEL_EEXIST);
    ck_assert_int_eq(keel_ring_add(r, "a", 1, 1, NULL), 0);
    ck_assert_int_eq(keel_ring_add(r, "big", 3, 200000, NULL), KEEL_EINVAL); /* 32M points */
    keel_ring_node_spec dup[2] = {{"z", 1, 1, NULL}, {"z", 1, 1, NULL}};
    ck_assert_int_eq(keel_ring_add_many(r, dup, 2), KEEL_EEXIST);
    ck_assert_uint_eq(keel_ring_count(r), 2); /* all or nothing */
    ck_assert_int_eq(keel_ring_remove(r, "nope", 4), KEEL_ENOTFOUND);
    ck_assert_int_eq(keel_ring_remove(r, NULL, 4), KEEL_EINVAL);
    ck_assert_int_eq(keel_ring_lookup(r, NULL, 3, &nd), KEEL_EINVAL);
    ck_assert_int_eq(keel_ring_lookup(r, NULL, 0, &nd), 0); /* the empty key */
    ck_assert_int_eq(keel_ring_lookup(r, "k", 1, NULL), KEEL_EINVAL);
    ck_assert_int_eq(keel_ring_unassign(r, NULL), KEEL_EINVAL);
    ck_assert_int_eq(keel_ring_nodes(r, NULL, NULL), KEEL_EINVAL);
    keel_ring_destroy(r);
    keel_ring_destroy(NULL);

    keel_ring_opts mo = {.algo = KEEL_RING_MAGLEV, .maglev_size = 7};
    ck_assert_int_eq(keel_ring_create(&r, &mo), 0);
    add_nodes(r, 7, 0);
    ck_assert_int_eq(keel_ring_add(r, "eighth", 6, 1, NULL), KEEL_EINVAL); /* 8 > 7 entries */
    keel_ring_destroy(r);
}
END_TEST

/* The point count is summed over every node of an add_many: enough huge
 * weights must not wrap the sum back under the limit (2^19 nodes of weight
 * 2^32 - 1 at 8192 points a unit make 2^64 + 8192 points). */
START_TEST(a_point_count_past_the_limit_is_refused_even_when_its_sum_wraps)
{
    keel_ring *r = NULL;
    keel_ring_opts o = {.points_per_weight = 8192};
    ck_assert_int_eq(keel_ring_create(&r, &o), 0);
    size_t n = ((size_t)1 << 19) + 1;
    keel_ring_node_spec *specs = calloc(n, sizeof *specs);
    uint32_t *names = calloc(n, sizeof *names);
    ck_assert(specs && names);
    for (size_t i = 0; i < n; i++) {
        names[i] = (uint32_t)i;
        specs[i] = (keel_ring_node_spec){&names[i], sizeof names[i], UINT32_MAX, NULL};
    }
    specs[n - 1].weight = (uint32_t)n; /* the sum of weights: 2^51 + 1 */
    ck_assert_int_eq(keel_ring_add_many(r, specs, n), KEEL_EINVAL);
    ck_assert_uint_eq(keel_ring_count(r), 0);
    free(specs);
    free(names);
    keel_ring_destroy(r);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("ring");
    TCase *tc = tcase_create("ketama");
    tcase_set_tags(tc, "slow"); /* a million MD5s: not under valgrind */
    tcase_set_timeout(tc, 30);
    tcase_add_loop_test(tc, ketama_matches_libmemcached, 0,
                        (int)(sizeof ketama_cases / sizeof ketama_cases[0]));
    suite_add_tcase(s, tc);

    tc = tcase_create("ketama-edges");
    tcase_add_test(tc, ketama_matches_libmemcached_after_a_removal);
    tcase_add_test(tc, ketama_matches_libmemcached_with_the_longest_host_names);
    tcase_add_test(tc, ketama_keeps_a_returning_nodes_place_as_libmemcached);
    tcase_add_test(tc, ketama_matches_libmemcached_with_port_0_a_unix_socket_and_weight_0);
    suite_add_tcase(s, tc);

    tc = tcase_create("large");
    tcase_set_tags(tc, "slow"); /* millions of lookups: not under valgrind */
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, every_algorithm_balances_within_its_bound);
    tcase_add_test(tc, continuum_removal_moves_only_the_removed_nodes_keys);
    tcase_add_test(tc, adding_a_node_moves_about_one_in_n_plus_one_all_to_it);
    tcase_add_test(tc, ketama_removal_also_moves_keys_between_survivors);
    tcase_add_test(tc, maglev_removal_moves_the_removed_nodes_keys_and_few_others);
    tcase_add_test(tc, the_order_nodes_were_added_in_does_not_move_keys);
    suite_add_tcase(s, tc);

    tc = tcase_create("distribution");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, shares_sum_to_one_and_follow_weights);
    tcase_add_test(tc, jump_removes_only_its_last_node);
    tcase_add_test(tc, replicas_are_distinct_stable_and_start_with_the_owner);
    tcase_add_test(tc, continuum_replica_set_survives_an_unrelated_removal);
    tcase_add_test(tc, bounded_loads_never_exceed_the_cap_under_skew);
    tcase_add_test(tc, bounded_loads_follow_weights);
    tcase_add_test(tc, assignments_end_with_a_removed_node);
    tcase_add_test(tc, bad_input_is_refused);
    tcase_add_test(tc, a_ketama_node_without_points_still_serves_as_a_replica);
    tcase_add_test(tc, changes_from_inside_a_visit_work);
    tcase_add_test(tc, a_failed_add_changes_nothing_and_names_come_back);
    tcase_add_test(tc, a_point_count_past_the_limit_is_refused_even_when_its_sum_wraps);
    suite_add_tcase(s, tc);

    tc = tcase_create("concurrency");
    tcase_set_tags(tc, "stress"); /* hundreds of grace periods: not under valgrind */
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, lookups_never_see_a_half_built_ring, KEEL_RING_CONTINUUM,
                        KEEL_RING_MAGLEV + 1);
    suite_add_tcase(s, tc);
    return kt_run(s);
}
