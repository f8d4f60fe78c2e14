/* lib/tslot.h — per-thread data of an object (a pool's magazines, a metrics
 * registry's counters), found by its owning thread in O(1) and without a
 * lock, and handed back to the object when the thread exits. Private.
 *
 * An owner registers to get an id and a generation. Each thread keeps a
 * table indexed by id; an entry counts only when its generation matches
 * the owner's, so a destroyed owner whose id was reused is recognised
 * without touching freed memory. A process-wide registry (one mutex) says
 * which owners are alive, so that a thread exiting after its owner was
 * destroyed frees its entry instead of handing it to nobody.
 */
#ifndef KEEL_TSLOT_H
#define KEEL_TSLOT_H

#include <stddef.h>
#include <stdint.h>

#include "internal.h"

typedef struct keel__towner keel__towner;
struct keel__towner {
    size_t id;
    uint64_t gen;
    /* A thread that holds data for this owner is exiting: take the data
     * back and free it. Called from that thread with the registry mutex
     * held (so never concurrently with unregister). */
    void (*thread_exit)(keel__towner *o, void *data);
};

typedef struct keel__tentry {
    void *data;
    uint64_t gen;
    void (*free_fn)(void *data); /* frees data when its owner is gone */
} keel__tentry;

typedef struct keel__ttable {
    size_t cap, used;
    keel__tentry *e; /* by owner id */
} keel__ttable;

extern KEEL__HIDDEN __thread keel__ttable *keel__tt __attribute__((tls_model("initial-exec")));

/* The last entry found, so that a thread working with one owner at a time
 * skips the table; any change to the thread's table clears it. Generations
 * are never reused, so the generation alone names the owner. */
typedef struct keel__tlast {
    uint64_t gen; /* 0: none */
    void *data;
} keel__tlast;
extern KEEL__HIDDEN __thread keel__tlast keel__tl_last __attribute__((tls_model("initial-exec")));

/* The calling thread's data for o, or NULL. Lock-free. */
static inline __attribute__((always_inline)) void *keel__tslot_get(const keel__towner *o)
{
    keel__tlast *l = &keel__tl_last;
    if (KEEL__LIKELY(l->gen == o->gen)) {
        if (!l->data) /* never: entries hold data */
            __builtin_unreachable();
        return l->data;
    }
    keel__ttable *t = keel__tt;
    if (KEEL__LIKELY(t && o->id < t->cap && t->e[o->id].gen == o->gen)) {
        *l = (keel__tlast){o->gen, t->e[o->id].data};
        return l->data;
    }
    return NULL;
}

/* Stores the calling thread's data (not NULL) for o (replacing a stale entry of a
 * dead owner with the same id, which is freed). Returns 0 or KEEL_ENOMEM. */
int keel__tslot_set(keel__towner *o, void *data, void (*free_fn)(void *data));

/* Frees the calling thread's entry for o, if any. */
void keel__tslot_drop(keel__towner *o);

/* Gives o an id and a generation. Returns 0 or KEEL_ENOMEM. */
int keel__towner_register(keel__towner *o);

/* Unregisters o; `detach(ud)` runs under the registry mutex right after, so
 * that no thread exit can hand data to o any more while the owner takes
 * back what its threads hold (their entries are freed by the threads). */
void keel__towner_unregister(keel__towner *o, void (*detach)(void *ud), void *ud);

#endif
