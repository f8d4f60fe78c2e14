/* lib/rcu.h — read-copy-update for libkeel's lock-free readers. Private.
 *
 * Readers bracket their use of a published pointer with
 * keel__rcu_read_lock()/unlock(): two plain stores to the thread's own slot
 * and a compiler barrier, no lock, no atomic read-modify-write, never
 * blocking. A writer publishes a new version (atomic store, release), calls
 * keel__rcu_synchronize(), which waits until every reader that might still
 * see the old version has left its read section, and then frees the old
 * version. The asymmetric fences of internal.h make this cheap for readers
 * (the membarrier is paid by the writer).
 *
 * A read section never runs user code (callbacks are called after it) and
 * never waits for a lock, so a writer may wait for a grace period while
 * holding its own mutex: no reader can be waiting for that mutex.
 *
 * One process-wide domain. Reader slots are registered lock-free on a
 * thread's first read section and recycled when the thread exits; the list
 * of slots only grows (a few dozen bytes per thread that ever read), from
 * a static reserve when allocation fails.
 */
#ifndef KEEL_RCU_H
#define KEEL_RCU_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "internal.h"

typedef struct keel__rcu_slot {
    _Atomic uint64_t ctr; /* 0: not reading; else the grace period seen */
    atomic_int in_use;    /* claimed by a live thread */
    unsigned nest;        /* owner only: nesting depth */
    struct keel__rcu_slot *next;
} keel__rcu_slot;

extern KEEL__HIDDEN _Atomic uint64_t keel__rcu_gp;
extern KEEL__HIDDEN __thread keel__rcu_slot *keel__rcu_self
    __attribute__((tls_model("initial-exec")));

/* Slots that need no allocation: a thread whose first read section finds
 * no memory for a slot takes one of these, so that lookups keep working
 * when memory runs out; only with all of them held is it KEEL_ENOMEM. */
#define KEEL__RCU_RESERVE 32

/* Claims or creates the calling thread's slot; KEEL_ENOMEM if it cannot. */
int keel__rcu_register(void);

/* Enters a read section; sections nest. Returns 0, or KEEL_ENOMEM when the
 * thread's first section cannot allocate its slot (then do not unlock). */
static inline int keel__rcu_read_lock(void)
{
    keel__rcu_slot *s = keel__rcu_self;
    if (KEEL__UNLIKELY(!s)) {
        int rc = keel__rcu_register();
        if (rc)
            return rc;
        s = keel__rcu_self;
    }
    if (s->nest++ == 0) {
        atomic_store_explicit(&s->ctr, atomic_load_explicit(&keel__rcu_gp, memory_order_acquire),
                              memory_order_relaxed);
        keel__light_fence();
    }
    return 0;
}

static inline void keel__rcu_read_unlock(void)
{
    keel__rcu_slot *s = keel__rcu_self;
    if (--s->nest == 0)
        atomic_store_explicit(&s->ctr, 0, memory_order_release);
}

/* Whether the calling thread is inside a read section: a writer that would
 * synchronize must refuse then (KEEL_ESTATE), or it waits for itself. */
static inline bool keel__rcu_in_read(void) { return keel__rcu_self && keel__rcu_self->nest; }

/* Waits until every read section that began before the call has ended.
 * Must not be called from inside a read section. Blocks; thread-safe. */
void keel__rcu_synchronize(void);

#endif
