/* bench/ring.c — lookup ns at 10, 100 and 1000 nodes for each algorithm,
 * against libmemcached's memcached_generate_hash on the same nodes and keys
 * in the same run, and the time to build a 1000-node ring.
 * Goals (issue 3): KETAMA no slower than libmemcached; CONTINUUM at least
 * 3x faster than libmemcached and under 50 ns at 1000 nodes; build of 1000
 * nodes under 10 ms; MAGLEV under 20 ns with max/mean under 1.01.
 *
 * libmemcached 1.1.4 (Debian) asserts and aborts above 100 servers
 * (MEMCACHED_CONTINUUM_SIZE), so at 1000 nodes the baseline is keel's own
 * KETAMA mode, which computes the same continuum bit for bit. */
#include <libmemcached/memcached.h>
#include <string.h>

#include <keel/ring.h>

#include "bench.h"

#define NKEYS 4096

static char keys[NKEYS][24];
static size_t keylen[NKEYS];
static volatile uint64_t sink;

static void make_nodes(int n, keel_ring_node_spec *specs, char (*names)[32], memcached_st *m)
{
    for (int i = 0; i < n; i++) {
        char host[24];
        snprintf(host, sizeof host, "10.1.%d.%d", i / 250, i % 250 + 1);
        size_t len = (size_t)snprintf(names[i], 32, "%s:11311", host);
        specs[i] = (keel_ring_node_spec){names[i], len, 1, (void *)(intptr_t)i};
        if (m)
            memcached_server_add_with_weight(m, host, 11311, 1);
    }
}

static double ns_per_lookup(keel_ring *r, uint64_t iters)
{
    keel_ring_node nd;
    uint64_t t0 = bench_ns();
    for (uint64_t i = 0; i < iters; i++) {
        keel_ring_lookup(r, keys[i % NKEYS], keylen[i % NKEYS], &nd);
        sink += nd.id;
    }
    return (double)(bench_ns() - t0) / (double)iters;
}

static double ns_per_memcached(memcached_st *m, uint64_t iters)
{
    uint64_t t0 = bench_ns();
    for (uint64_t i = 0; i < iters; i++)
        sink += memcached_generate_hash(m, keys[i % NKEYS], keylen[i % NKEYS]);
    return (double)(bench_ns() - t0) / (double)iters;
}

static void share_max(const keel_ring_node *n, double share, void *ud)
{
    (void)n;
    double *mx = ud;
    if (share > *mx)
        *mx = share;
}

int main(void)
{
    uint64_t iters = bench_iters(4000000);
    for (int i = 0; i < NKEYS; i++)
        keylen[i] = (size_t)snprintf(keys[i], sizeof keys[i], "user:%08d:profile", i * 7919);
    static keel_ring_node_spec specs[1000];
    static char names[1000][32];
    const char *algo_name[] = {"continuum", "ketama", "jump", "maglev"};

    bench_section("ring: lookup vs libmemcached memcached_generate_hash (weighted ketama)");
    int sizes[] = {10, 100, 1000};
    for (int s = 0; s < 3; s++) {
        int n = sizes[s];
        memcached_st *m = NULL;
        if (n <= 100) {
            m = memcached_create(NULL);
            memcached_behavior_set(m, MEMCACHED_BEHAVIOR_KETAMA_WEIGHTED, 1);
        }
        make_nodes(n, specs, names, m);
        double base = 1e30;
        const char *base_name = m ? "libmemcached" : "keel ketama ";
        for (int rep = 0; m && rep < 3; rep++) {
            double t = ns_per_memcached(m, iters);
            base = t < base ? t : base;
        }
        /* ketama first, so that at 1000 nodes it can stand in as baseline */
        int order[4] = {KEEL_RING_KETAMA, KEEL_RING_CONTINUUM, KEEL_RING_JUMP, KEEL_RING_MAGLEV};
        for (int k = 0; k < 4; k++) {
            int a = order[k];
            keel_ring *r;
            keel_ring_opts o = {.algo = (keel_ring_algo)a};
            if (a == KEEL_RING_MAGLEV && n == 1000)
                o.maglev_size = 100003; /* > 100 x nodes, as the man page says */
            keel_ring_create(&r, &o);
            keel_ring_add_many(r, specs, (size_t)n);
            double best = 1e30;
            for (int rep = 0; rep < 3; rep++) {
                double t = ns_per_lookup(r, iters);
                best = t < best ? t : best;
            }
            if (!m && a == KEEL_RING_KETAMA)
                base = best; /* the stand-in baseline at 1000 nodes */
            char what[64];
            snprintf(what, sizeof what, "%s lookup, %d nodes", algo_name[a], n);
            /* printed as speed (1/ns) so that the ratio reads "x faster" */
            const char *goal = a == KEEL_RING_KETAMA      ? ">= 1x"
                               : a == KEEL_RING_CONTINUUM ? (n == 1000 ? ">= 3x, < 50 ns" : ">= 3x")
                               : a == KEEL_RING_MAGLEV    ? "< 20 ns"
                                                          : "-";
            printf("%-44s %8.1f ns  | %s %8.1f ns  | %6.2fx faster | goal: %s\n", what,
                   best, base_name, base, base / best, goal);
            if (a == KEEL_RING_MAGLEV) {
                double mx = 0;
                keel_ring_nodes(r, share_max, &mx);
                printf("%-44s %8.5f    (table entries of the fullest node / average; goal < 1.01)\n",
                       "  maglev max/mean share", mx * n);
            }
            keel_ring_destroy(r);
        }
        if (m)
            memcached_free(m);
    }

    bench_section("ring: build time, 1000 nodes (one add_many); libmemcached at its 100-server limit");
    make_nodes(1000, specs, names, NULL);
    for (int a = 0; a < 4; a++) {
        double best = 1e30;
        for (int rep = 0; rep < 3; rep++) {
            keel_ring *r;
            keel_ring_opts o = {.algo = (keel_ring_algo)a, .maglev_size = a == 3 ? 100003 : 0};
            keel_ring_create(&r, &o);
            uint64_t t0 = bench_ns();
            keel_ring_add_many(r, specs, 1000);
            double ms = (double)(bench_ns() - t0) / 1e6;
            best = ms < best ? ms : best;
            keel_ring_destroy(r);
        }
        double base = 0;
        if (a == KEEL_RING_KETAMA) { /* libmemcached building the same continuum */
            memcached_st *m = memcached_create(NULL);
            memcached_behavior_set(m, MEMCACHED_BEHAVIOR_KETAMA_WEIGHTED, 1);
            memcached_server_st *list = NULL;
            memcached_return_t rc;
            for (int i = 0; i < 100; i++) {
                char host[24];
                snprintf(host, sizeof host, "10.1.%d.%d", i / 250, i % 250 + 1);
                list = memcached_server_list_append_with_weight(list, host, 11311, 1, &rc);
            }
            uint64_t t0 = bench_ns();
            memcached_server_push(m, list);
            base = (double)(bench_ns() - t0) / 1e6;
            memcached_server_list_free(list);
            memcached_free(m);
        }
        char what[64];
        snprintf(what, sizeof what, "%s build, 1000 nodes", algo_name[a]);
        if (base > 0)
            printf("%-44s %8.2f ms  | libmemcached, 100 nodes %6.2f ms | goal: < 10 ms\n", what,
                   best, base);
        else
            printf("%-44s %8.2f ms  | goal: < 10 ms\n", what, best);
    }
    return 0;
}
