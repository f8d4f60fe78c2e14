/* tests/fuzz/fuzz_ring.c — keel_ring under a sequence of adds, removes,
 * lookups and bounded-load assignments, against a model of its members.
 *
 * Input: [algo][points_per_weight][maglev size][seed], then operations
 * [op][len][name: len % 65 bytes][weight], cut short at the end of the
 * input. op % 7: 0 add, 1 remove, 2 lookup, 3 lookup_n (weight % 9
 * nodes), 4 assign, 5 unassign the last assignment, 6 add_many of the name
 * and its first half. algo 4 is unknown; maglev sizes 1, 4 and 9 are not
 * prime (refused whatever the algo); the top bit of the size byte asks for
 * load epsilon 0.
 *
 * Checks: create refuses exactly the bad options; add, add_many and
 * remove succeed or fail as the model of members says; every node a lookup
 * or assignment returns is a member; lookup_n returns min(n, members)
 * distinct nodes; an empty ring is KEEL_EUNAVAIL; the count always equals
 * the model's; every member visited has a share within 0..1. */
#include <keel/ring.h>

#include "fuzz.h"

#define MAX_MODEL 64 /* names modelled; adds past them are skipped */
#define MAX_HELD 32  /* assignments held */

typedef struct member {
    uint8_t name[64];
    size_t len;
    bool in;
} member;

typedef struct model {
    member m[MAX_MODEL];
    size_t n;
} model;

static int model_find(const model *md, const void *name, size_t len)
{
    for (size_t i = 0; i < md->n; i++)
        if (md->m[i].in && md->m[i].len == len && memcmp(md->m[i].name, name, len) == 0)
            return (int)i;
    return -1;
}

static size_t model_live(const model *md)
{
    size_t live = 0;
    for (size_t i = 0; i < md->n; i++)
        live += md->m[i].in;
    return live;
}

/* Room for k more members (a slot of a removed one is reused). */
static bool model_room(const model *md, size_t k)
{
    return model_live(md) + k <= MAX_MODEL;
}

static void model_add(model *md, const void *name, size_t len)
{
    size_t i = 0;
    while (i < md->n && md->m[i].in)
        i++;
    if (i == md->n)
        md->n++;
    memcpy(md->m[i].name, name, len);
    md->m[i].len = len;
    md->m[i].in = true;
}

static void check_member(const model *md, const keel_ring_node *node, const char *what)
{
    KF_CHECK(model_find(md, node->name, node->name_len) >= 0, "%s returned a node not in the ring", what);
}

static void visit(const keel_ring_node *node, double share, void *ud)
{
    check_member(ud, node, "nodes");
    KF_CHECK(share >= 0 && share <= 1.0000001, "share %g", share);
}

static keel_ring *ring_create(const uint8_t *d)
{
    static const uint32_t sizes[] = {0, 7, 11, 13, 101, 65537, 4, 9, 100003, 1};
    keel_ring_opts o = {.algo = d[0] % 5, .points_per_weight = d[1] % 200u,
                        .maglev_size = sizes[d[2] % 10], .seed = d[3],
                        .load_epsilon = (d[2] & 0x80) ? 0.0 : 0.5};
    bool prime = o.maglev_size != 1 && o.maglev_size != 4 && o.maglev_size != 9;
    bool bad = o.algo > KEEL_RING_MAGLEV || !prime; /* the size is checked whatever the algo */
    keel_ring *r = NULL;
    int rc = keel_ring_create(&r, &o);
    KF_CHECK((rc == 0) == !bad, "algo %d, maglev size %u: create returned %d", (int)o.algo,
             (unsigned)o.maglev_size, rc);
    return r;
}

typedef struct state {
    keel_ring *r;
    model md;
    keel_ring_node held[MAX_HELD];
    size_t nheld;
} state;

static void op_add(state *st, const uint8_t *name, size_t len, uint32_t weight)
{
    if (!model_room(&st->md, 1))
        return;
    int rc = keel_ring_add(st->r, name, len, weight, NULL);
    bool known = model_find(&st->md, name, len) >= 0;
    KF_CHECK(rc != 0 || (!known && len > 0 && weight > 0), "added a member, an empty name or weight 0");
    KF_CHECK(rc != KEEL_EEXIST || known, "KEEL_EEXIST for a name not in the ring");
    if (rc == 0)
        model_add(&st->md, name, len);
}

static void op_add_many(state *st, const uint8_t *name, size_t len, uint32_t weight)
{
    keel_ring_node_spec specs[2] = {{name, len, weight, NULL}, {name, len / 2, weight + 1, NULL}};
    if (!model_room(&st->md, 2))
        return;
    if (keel_ring_add_many(st->r, specs, 2) != 0)
        return;
    KF_CHECK(len / 2 != len, "the same name twice in one add_many");
    model_add(&st->md, specs[0].name, specs[0].name_len);
    model_add(&st->md, specs[1].name, specs[1].name_len);
}

static void op_remove(state *st, const uint8_t *name, size_t len)
{
    int i = model_find(&st->md, name, len);
    int rc = keel_ring_remove(st->r, name, len);
    KF_CHECK(rc != 0 || i >= 0, "removed a name not in the ring");
    KF_CHECK(rc != KEEL_ENOTFOUND || i < 0, "KEEL_ENOTFOUND for a member");
    if (rc == 0) {
        st->md.m[i].in = false;
        st->nheld = 0; /* its assignments ended with it; forget the others */
    }
}

static void op_lookup(state *st, const uint8_t *key, size_t len)
{
    keel_ring_node node;
    int rc = keel_ring_lookup(st->r, key, len, &node);
    if (rc == 0)
        check_member(&st->md, &node, "lookup");
    KF_CHECK(rc != KEEL_EUNAVAIL || model_live(&st->md) == 0, "KEEL_EUNAVAIL with members");
}

static void op_lookup_n(state *st, const uint8_t *key, size_t len, size_t want)
{
    keel_ring_node nodes[8];
    size_t found = 99;
    if (keel_ring_lookup_n(st->r, key, len, want, nodes, &found) != 0)
        return;
    size_t live = model_live(&st->md);
    KF_CHECK(found == (want < live ? want : live), "found %zu of %zu with %zu members", found, want, live);
    for (size_t a = 0; a < found; a++) {
        check_member(&st->md, &nodes[a], "lookup_n");
        for (size_t b = 0; b < a; b++)
            KF_CHECK(nodes[a].id != nodes[b].id, "node %zu returned twice", (size_t)nodes[a].id);
    }
}

static void op_assign(state *st, const uint8_t *key, size_t len)
{
    if (st->nheld == MAX_HELD)
        return;
    if (keel_ring_assign(st->r, key, len, &st->held[st->nheld]) != 0)
        return;
    check_member(&st->md, &st->held[st->nheld], "assign");
    st->nheld++;
}

static void op_unassign(state *st)
{
    if (st->nheld == 0)
        return;
    int rc = keel_ring_unassign(st->r, &st->held[--st->nheld]);
    KF_CHECK(rc == 0, "unassign of a member's assignment returned %d", rc);
}

int LLVMFuzzerTestOneInput(const uint8_t *d, size_t size)
{
    if (size < 4)
        return 0;
    keel_ring *r = ring_create(d);
    if (!r)
        return 0;
    state *st = kf_calloc(sizeof *st);
    st->r = r;
    for (size_t i = 4; i + 2 <= size;) {
        int op = d[i] % 7;
        size_t len = d[i + 1] % 65u;
        i += 2;
        if (len + 1 > size - i) /* leave a byte for the weight when there is one */
            len = size > i ? size - i - 1 : 0;
        const uint8_t *name = d + i;
        i += len;
        uint32_t weight = i < size ? d[i++] % 40u : 1;
        if (op == 0)
            op_add(st, name, len, weight);
        else if (op == 1)
            op_remove(st, name, len);
        else if (op == 2)
            op_lookup(st, name, len);
        else if (op == 3)
            op_lookup_n(st, name, len, weight % 9);
        else if (op == 4)
            op_assign(st, name, len);
        else if (op == 5)
            op_unassign(st);
        else
            op_add_many(st, name, len, weight);
        size_t count = keel_ring_count(st->r);
        KF_CHECK(count == model_live(&st->md), "count %zu, members %zu", count, model_live(&st->md));
    }
    KF_CHECK(keel_ring_nodes(r, visit, &st->md) == 0, "nodes");
    while (st->nheld)
        op_unassign(st);
    keel_ring_destroy(r);
    free(st);
    return 0;
}
