/* lib/bus/bus_int.h — what the files of keel_bus share. Private. */
#ifndef KEEL_BUS_INT_H
#define KEEL_BUS_INT_H

#include <pthread.h>
#include <stdatomic.h>

#include <keel/bus.h>

#include "../internal.h"

#define BUS_MAX_TOKENS 64

/* A subject or pattern cut into tokens (pointers into the string). */
typedef struct btoks {
    size_t n;
    const char *s[BUS_MAX_TOKENS];
    size_t len[BUS_MAX_TOKENS];
    uint64_t h[BUS_MAX_TOKENS];
} btoks;

/* Cuts a subject (wildcards refused) or a pattern: 0 or KEEL_EINVAL. */
int keel__bus_tokens(const char *s, size_t len, bool pattern, btoks *t);

/* A line for what publishers and workers only read, one for the
 * references (every publish and every delivery run writes them), one for
 * the calls in progress (the workers'): a publisher reading `group` must
 * not wait for a line a worker has just written. Allocated aligned. */
struct keel_bus_sub {
    keel_bus *bus;
    uint64_t seq;           /* subscription order */
    char *pattern;
    keel_bus_handler handler;
    void *ud;
    keel_bus_mode mode;
    struct bgroup *group;   /* read only while this is in the trie: a group goes with its last member */
    uint64_t group_id;      /* the group's id, kept for re-routing once this has left */
    _Atomic int dead;
    struct keel_bus_sub *next_dead; /* the bus's list of subscriptions to free */
    _Atomic uint64_t refs __attribute__((aligned(KEEL__CACHELINE))); /* the trie's, queued deliveries', publishes in progress */
    _Atomic uint64_t calls __attribute__((aligned(KEEL__CACHELINE))); /* handler calls in progress */
};

/* A queue group: the subscriptions of a bus that share a name. */
typedef struct bgroup {
    char *name;
    uint64_t id; /* unique in the bus (from 1): a name taken again once its
                    last member left is a new group */
    _Atomic uint64_t rr;
    size_t members; /* under the bus's writer lock */
    struct bgroup *next;
} bgroup;

/* Matches: the subscriptions a message goes to, in subscription order,
 * one member per queue group. Each holds a reference. */
typedef struct bmatch {
    keel_bus_sub **subs;
    size_t n, cap;
    keel_bus_sub *local[16];
} bmatch;

int keel__bus_match(keel_bus *bus, const btoks *t, bmatch *m);
void keel__bus_match_free(bmatch *m);
/* Whether a subscription matches: 1, 0 or KEEL_ENOMEM; unlike
 * keel__bus_match, it picks no queue group member, so takes no turn of
 * a group's round robin. */
int keel__bus_matches(keel_bus *bus, const btoks *t);

/* Calls a subscription's handler, msg's subject cut into t, unless it has
 * been unsubscribed; counts, reports a failure. A queue group's member
 * that has left is replaced by another member, picked as a publish picks
 * and called here whatever its mode. Returns 1 when a handler ran, its
 * result in *rc; 0 when none did, the subscription having left (not a
 * group's member), *rc 0; -1 when the group has no member left to take
 * msg (*rc KEEL_ENOTFOUND, or KEEL_ENOMEM: no memory to look), with
 * nothing counted or reported. */
int keel__bus_call(keel_bus_sub *sub, const btoks *t, const keel_bus_msg *msg, int *rc);

void keel__bus_sub_unref(keel_bus_sub *sub);
void keel__bus_error(keel_bus *bus, keel_bus_sub *sub, const keel_bus_msg *msg, int err);

/* ---- the Redis transport (stream.c) ---- */

typedef struct bstream bstream;

int keel__bus_stream_create(keel_bus *bus, const keel_bus_opts *o, bstream **out);
int keel__bus_stream_start(bstream *s);
void keel__bus_stream_stop(bstream *s);   /* joins the readers */
void keel__bus_stream_destroy(bstream *s);
int keel__bus_stream_publish(bstream *s, keel_bus_pub *pubs, size_t n);
int keel__bus_stream_drain(bstream *s);
/* A subscription's pattern added or removed, for the group's registry:
 * 0 or KEEL_ENOMEM (add only). */
int keel__bus_stream_pattern(bstream *s, const char *pattern, bool add);

/* ---- counters (bus.c) ---- */

typedef struct bcounters { /* one stripe of them (internal.h) */
    _Atomic uint64_t published, delivered, failed, dropped, rejected, acked, claimed, dead, skipped;
} __attribute__((aligned(KEEL__CACHELINE))) bcounters;

/* The calling thread's stripe of the counters. */
bcounters *keel__bus_counters(keel_bus *bus);

/* Whether the calling thread is one of bus's workers or readers, which
 * must not wait for themselves (drain) or for a full queue; set by each
 * such thread at its start. */
bool keel__bus_in_worker(keel_bus *bus);
void keel__bus_set_worker(keel_bus *bus);

#endif
