/* examples/ring.c — shards keys over cache nodes, removes one, and counts
 * how many keys moved. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <keel/ring.h>

#define KEYS 100000

static const char *nodes[] = {"cache-a:6379", "cache-b:6379", "cache-c:6379", "cache-d:6379",
                              "cache-e:6379"};

static int shard(keel_ring *r, int key)
{
    char k[32];
    int len = snprintf(k, sizeof k, "user:%d", key);
    keel_ring_node n;
    if (keel_ring_lookup(r, k, (size_t)len, &n) != 0)
        return -1;
    return (int)(intptr_t)n.ud;
}

static void show(const keel_ring_node *n, double share, void *ud)
{
    int *count = ud;
    printf("  %-14.*s weight %u  owns %5.1f%% of the hash space, %6d keys\n", (int)n->name_len,
           (const char *)n->name, n->weight, 100 * share, count[(intptr_t)n->ud]);
}

static void demo(keel_ring_algo algo, const char *title)
{
    keel_ring *r;
    keel_ring_opts opts = {.algo = algo};
    if (keel_ring_create(&r, &opts) != 0)
        return;
    for (int i = 0; i < 5; i++) /* cache-e gets twice the share */
        if (keel_ring_add(r, nodes[i], strlen(nodes[i]), i == 4 ? 2 : 1, (void *)(intptr_t)i) != 0) {
            keel_ring_destroy(r);
            return;
        }

    static int before[KEYS];
    int count[5] = {0};
    for (int k = 0; k < KEYS; k++)
        count[before[k] = shard(r, k)]++;
    printf("%s: %d keys over %zu nodes\n", title, KEYS, keel_ring_count(r));
    keel_ring_nodes(r, show, count);

    keel_ring_remove(r, "cache-c:6379", 12);
    int moved = 0, moved_elsewhere = 0;
    for (int k = 0; k < KEYS; k++) {
        int now = shard(r, k);
        moved += now != before[k];
        moved_elsewhere += now != before[k] && before[k] != 2;
    }
    printf("  removed cache-c: %d keys moved (%.1f%%), %d of them from nodes that stayed\n",
           moved, 100.0 * moved / KEYS, moved_elsewhere);

    keel_ring_node rep[3];
    size_t found;
    keel_ring_lookup_n(r, "user:42", 7, 3, rep, &found);
    printf("  replicas of user:42:");
    for (size_t i = 0; i < found; i++)
        printf(" %.*s", (int)rep[i].name_len, (const char *)rep[i].name);
    printf("\n\n");
    keel_ring_destroy(r);
}

int main(void)
{
    demo(KEEL_RING_CONTINUUM, "continuum (the default)");
    demo(KEEL_RING_KETAMA, "ketama (libmemcached-compatible: points depend on the node count)");
    demo(KEEL_RING_MAGLEV, "maglev");

    /* Bounded loads: a hot key spills over instead of overloading a node. */
    keel_ring *r;
    keel_ring_opts opts = {.load_epsilon = 0.25};
    if (keel_ring_create(&r, &opts) != 0)
        return 1;
    for (int i = 0; i < 5; i++)
        if (keel_ring_add(r, nodes[i], strlen(nodes[i]), 1, (void *)(intptr_t)i) != 0) {
            keel_ring_destroy(r);
            return 1;
        }
    keel_ring_node held[100];
    for (int i = 0; i < 100; i++)
        if (keel_ring_assign(r, "hot-key", 7, &held[i]) != 0) {
            keel_ring_destroy(r);
            return 1;
        }
    printf("bounded loads (epsilon 0.25): 100 requests for one hot key land as");
    for (int i = 0; i < 5; i++) {
        keel_ring_node n = {.id = 0};
        for (int k = 0; k < 100; k++)
            if ((intptr_t)held[k].ud == i)
                n = held[k];
        printf(" %llu", (unsigned long long)(n.id ? keel_ring_load(r, &n) : 0));
    }
    printf(" (cap %d per node)\n", 25);
    for (int i = 0; i < 100; i++)
        keel_ring_unassign(r, &held[i]);
    keel_ring_destroy(r);
    return 0;
}
