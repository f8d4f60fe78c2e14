/* lib/pool.c — object pool: thread magazines over a shared depot, objects
 * carved from slabs.
 *
 * Three layers, as in Bonwick & Adams' magazine allocator:
 *
 *  - thread cache: two magazines (arrays of idle objects) per thread and
 *    pool. acquire pops from `loaded`, release pushes onto it; when it is
 *    empty (full) and `prev` is full (empty) the two are swapped. In front
 *    of them one `hot` object: a release parks its object there when the
 *    slot is free and an acquire takes it first, so that the commonest
 *    pattern (acquire, use, release) loads and stores one word. Every
 *    magazine has a spare round, so that a thread's hot object always fits
 *    onto its loaded magazine when the cache is emptied. No lock, no atomic
 *    read-modify-write, no shared cache line is written.
 *  - depot: magazines exchanged whole with the thread caches, under the
 *    pool mutex, plus the list of thread caches.
 *  - slabs: the memory; a slab holds many object slots and a stack of the
 *    slots that hold no constructed object.
 *
 * Taking idle objects back from other threads (for a bounded pool at
 * capacity, trim and destroy) uses an asymmetric handshake. The owner
 * brackets every fast-path operation with `in_op = 1 ... in_op = 0` and
 * checks the pool's `gate` in between, with only a compiler barrier (a
 * real fence on a kernel without membarrier, see op_begin()). A thief
 * raises `gate`, runs keel__heavy_fence() — a membarrier that puts a full
 * fence in every thread — and then waits for each owner's `in_op` to read
 * 0. After that point no owner is inside a
 * fast path and every later fast path sees the raised gate and goes to the
 * locked slow path, so the thief may move the owners' magazines.
 *
 * Per-thread state lives in lib/tslot.h's thread tables, which recognise a
 * thread that exits after its pool was destroyed, or a pool that reuses an
 * id, without touching freed memory.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <string.h>
#include <time.h>

#include <keel/metrics.h>
#include <keel/pool.h>

#include "internal.h"
#include "tslot.h"

#define LD(x) atomic_load_explicit(&(x), memory_order_relaxed)
#define ST(x, v) atomic_store_explicit(&(x), (v), memory_order_relaxed)

#define MAX_ALIGN 4096
#define SLAB_TARGET_BYTES (64 * 1024)
#define SLAB_LARGE_BYTES (1024 * 1024) /* eight large objects a slab, up to this */
#define MAG_DEFAULT 32
#define MAG_MAX 4096

/* gate: GATE_STEAL while a thief works, + GATE_WAITER per waiting acquire;
 * GATE_FENCE for good when the kernel has no membarrier, which makes the
 * fast paths run a real fence before they go on (see op_begin()). */
#define GATE_STEAL 1u
#define GATE_WAITER 2u
#define GATE_FENCE (1u << 31)
#define GATE_SHUT(g) (((g) & ~GATE_FENCE) != 0) /* fast paths closed */

enum { SLOT_FREE = 0, SLOT_IDLE = 1, SLOT_OUT = 2 }; /* debug states */

typedef struct mag {
    struct mag *next; /* in a depot list */
    atomic_size_t n;  /* rounds held; read by stats without the handshake */
    void *rounds[];
} mag;

typedef struct slab {
    char *base;           /* first object */
    size_t nobj;          /* slots */
    size_t nfree;         /* slots holding no constructed object */
    uint32_t *free_stack; /* indexes of those slots */
    unsigned char *state; /* debug mode only: SLOT_* per slot */
} slab;

/* One cache line of its own: two threads' caches never share one. */
typedef struct tcache {
    alignas(KEEL__CACHELINE) atomic_int in_op;
    _Atomic(mag *) loaded;
    _Atomic(mag *) prev;
    _Atomic(void *) hot;       /* an idle object, or NULL */
    atomic_uint_fast64_t hits; /* written by the owner only */
    struct tcache *next, *prevtc; /* the pool's list, under pool->mu */
} tcache;

struct keel_pool {
    /* read-mostly, shared by every fast path */
    keel__towner owner; /* per-thread caches */
    size_t stride, obj_size, align, capacity, mag_size;
    int (*init)(void *, void *);
    void (*reset)(void *, void *);
    void (*fini)(void *, void *);
    void *ud;
    int debug;
    keel_metrics *metrics;

    alignas(KEEL__CACHELINE) atomic_uint gate;

    alignas(KEEL__CACHELINE) pthread_mutex_t mu;
    pthread_cond_t cv;
    mag *full;   /* depot: magazines holding at least one object */
    mag *empty;  /* depot: empty magazines */
    size_t depot_objs;
    tcache *tcs; /* thread caches */
    slab **slabs; /* sorted by base address */
    size_t nslabs, slabs_cap;
    size_t slot_total; /* slots in all slabs */
    size_t created;    /* constructed objects, idle or out */
    uint64_t misses, waits, timeouts, steals, exited_hits;
};

/* ---- depot (caller holds p->mu) ---- */

static mag *mag_new(keel_pool *p)
{
    mag *m = keel__malloc(sizeof *m + (p->mag_size + 1) * sizeof(void *)); /* + tc_unhot()'s */
    if (m) {
        m->next = NULL;
        atomic_init(&m->n, 0);
    }
    return m;
}

static void mag_push(mag *m, void *obj)
{
    size_t n = LD(m->n);
    m->rounds[n] = obj;
    ST(m->n, n + 1);
}

static mag *depot_take_empty(keel_pool *p)
{
    mag *m = p->empty;
    if (m) {
        p->empty = m->next;
        return m;
    }
    return mag_new(p);
}

static void depot_put(keel_pool *p, mag *m)
{
    size_t n = LD(m->n);
    if (n) {
        m->next = p->full;
        p->full = m;
        p->depot_objs += n;
    } else {
        m->next = p->empty;
        p->empty = m;
    }
}

static mag *depot_take_full(keel_pool *p)
{
    mag *m = p->full;
    if (m) {
        p->full = m->next;
        p->depot_objs -= LD(m->n);
    }
    return m;
}

static void *depot_pop(keel_pool *p)
{
    mag *m = p->full;
    if (!m)
        return NULL;
    size_t n = LD(m->n) - 1;
    void *obj = m->rounds[n];
    ST(m->n, n);
    p->depot_objs--;
    if (n == 0) {
        p->full = m->next;
        m->next = p->empty;
        p->empty = m;
    }
    return obj;
}

static bool depot_push(keel_pool *p, void *obj)
{
    mag *m = p->full;
    if (!m || LD(m->n) >= p->mag_size) {
        if (!(m = depot_take_empty(p)))
            return false;
        m->next = p->full;
        p->full = m;
    }
    size_t n = LD(m->n);
    m->rounds[n] = obj;
    ST(m->n, n + 1);
    p->depot_objs++;
    return true;
}

/* ---- slabs (caller holds p->mu) ---- */

static size_t slab_find(keel_pool *p, const void *obj)
{
    size_t lo = 0, hi = p->nslabs;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if ((const char *)obj < p->slabs[mid]->base)
            hi = mid;
        else
            lo = mid + 1;
    }
    if (lo == 0)
        return SIZE_MAX;
    slab *s = p->slabs[lo - 1];
    size_t off = (size_t)((const char *)obj - s->base);
    if (off >= s->nobj * p->stride || off % p->stride)
        return SIZE_MAX;
    return lo - 1;
}

static slab *slab_new(keel_pool *p)
{
    size_t nobj = SLAB_TARGET_BYTES / p->stride;
    if (nobj < 8) { /* large objects: a few a slab, one if they are huge */
        nobj = SLAB_LARGE_BYTES / p->stride;
        nobj = nobj > 8 ? 8 : nobj ? nobj : 1;
    }
    if (nobj > UINT32_MAX)
        nobj = UINT32_MAX;
    if (p->capacity && nobj > p->capacity - p->slot_total)
        nobj = p->capacity - p->slot_total;
    size_t bytes;
    if (nobj == 0 || !keel__mul_ok(nobj, p->stride, &bytes))
        return NULL;
    if (p->nslabs == p->slabs_cap) {
        size_t ncap = p->slabs_cap ? p->slabs_cap * 2 : 8;
        slab **n = keel__realloc(p->slabs, ncap * sizeof *n);
        if (!n)
            return NULL;
        p->slabs = n;
        p->slabs_cap = ncap;
    }
    slab *s = keel__calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->nobj = nobj;
    s->base = keel__aligned_alloc(p->align, bytes);
    s->free_stack = keel__malloc(nobj * sizeof *s->free_stack);
    s->state = p->debug ? keel__calloc(nobj, 1) : NULL;
    if (!s->base || !s->free_stack || (p->debug && !s->state)) {
        keel__aligned_free(s->base);
        keel__free(s->free_stack);
        keel__free(s->state);
        keel__free(s);
        return NULL;
    }
    for (size_t i = 0; i < nobj; i++) /* lowest address handed out first */
        s->free_stack[i] = (uint32_t)(nobj - 1 - i);
    s->nfree = nobj;
    size_t at = 0;
    while (at < p->nslabs && p->slabs[at]->base < s->base)
        at++;
    memmove(p->slabs + at + 1, p->slabs + at, (p->nslabs - at) * sizeof *p->slabs);
    p->slabs[at] = s;
    p->nslabs++;
    p->slot_total += nobj;
    return s;
}

static void slab_free(keel_pool *p, size_t at)
{
    slab *s = p->slabs[at];
    p->slot_total -= s->nobj;
    memmove(p->slabs + at, p->slabs + at + 1, (p->nslabs - at - 1) * sizeof *p->slabs);
    p->nslabs--;
    keel__aligned_free(s->base);
    keel__free(s->free_stack);
    keel__free(s->state);
    keel__free(s);
}

/* A free slot for a new object, counted in `created`; NULL when the pool
 * is at capacity or memory ran out (*err says which). */
static void *slot_reserve(keel_pool *p, int *err)
{
    if (p->capacity && p->created >= p->capacity) {
        *err = KEEL_ETIMEDOUT;
        return NULL;
    }
    slab *s = NULL;
    for (size_t i = p->nslabs; i-- > 0;) /* newest slabs are rarely full */
        if (p->slabs[i]->nfree) {
            s = p->slabs[i];
            break;
        }
    if (!s && !(s = slab_new(p))) {
        *err = KEEL_ENOMEM;
        return NULL;
    }
    uint32_t idx = s->free_stack[--s->nfree];
    if (s->state)
        s->state[idx] = SLOT_OUT;
    p->created++;
    return s->base + (size_t)idx * p->stride;
}

/* Returns a slot whose object was finalised (or never initialised). */
static void slot_unreserve(keel_pool *p, void *obj)
{
    size_t at = slab_find(p, obj);
    slab *s = p->slabs[at];
    size_t idx = (size_t)((char *)obj - s->base) / p->stride;
    if (s->state)
        s->state[idx] = SLOT_FREE;
    s->free_stack[s->nfree++] = (uint32_t)idx;
    p->created--;
    if (s->nfree == s->nobj)
        slab_free(p, at);
}

/* ---- thread caches ---- */

static void tc_link(keel_pool *p, tcache *tc)
{
    tc->prevtc = NULL;
    tc->next = p->tcs;
    if (p->tcs)
        p->tcs->prevtc = tc;
    p->tcs = tc;
}

static void tc_unlink(keel_pool *p, tcache *tc)
{
    if (tc->prevtc)
        tc->prevtc->next = tc->next;
    else
        p->tcs = tc->next;
    if (tc->next)
        tc->next->prevtc = tc->prevtc;
}

/* Moves a cache's hot object onto its loaded magazine, which holds up to
 * mag_size + 1 rounds for this. The owner is not in a fast path, and the
 * caller moves that magazine to the depot before the owner's next one,
 * whose pushes see it full. */
static void tc_unhot(tcache *tc)
{
    void *obj = LD(tc->hot);
    if (obj) {
        ST(tc->hot, NULL);
        mag_push(LD(tc->loaded), obj);
    }
}

/* Moves a cache's idle objects to the depot, replacing its non-empty
 * magazines with empty ones the caller made sure are there. Caller holds
 * p->mu and knows the owner is not in a fast path (it is the owner, or the
 * handshake ran). */
static size_t tc_drain(keel_pool *p, tcache *tc)
{
    size_t moved = 0;
    tc_unhot(tc);
    _Atomic(mag *) *slots[2] = {&tc->loaded, &tc->prev};
    for (int i = 0; i < 2; i++) {
        mag *m = LD(*slots[i]), *e = p->empty;
        if (LD(m->n) == 0)
            continue;
        p->empty = e->next;
        moved += LD(m->n);
        depot_put(p, m);
        ST(*slots[i], e);
    }
    return moved;
}

/* Whether any thread cache seems to hold idle objects. Relaxed reads, so a
 * release in flight may be missed: that release is then concurrent with
 * the caller, who may linearise before it. Caller holds p->mu. */
static bool caches_look_idle(keel_pool *p)
{
    for (tcache *tc = p->tcs; tc; tc = tc->next)
        if (LD(tc->hot) || LD(LD(tc->loaded)->n) || LD(LD(tc->prev)->n))
            return true;
    return false;
}

/* Takes the idle objects of every thread cache into the depot and counts
 * them in *moved. Caller holds p->mu. Returns 0, or KEEL_ENOMEM when the
 * empty magazines the exchange needs cannot be allocated (the objects then
 * stay where they are, and nothing is half done). */
static int steal_all(keel_pool *p, size_t *moved_out)
{
    size_t need = 0, have = 0;
    *moved_out = 0;
    for (tcache *tc = p->tcs; tc; tc = tc->next)
        need += 2;
    for (mag *m = p->empty; m && have < need; m = m->next)
        have++;
    for (; have < need; have++) {
        mag *m = mag_new(p);
        if (!m)
            return KEEL_ENOMEM;
        m->next = p->empty;
        p->empty = m;
    }
    if (!p->tcs)
        return 0;
    atomic_fetch_add(&p->gate, GATE_STEAL);
    keel__heavy_fence();
    size_t moved = 0;
    for (tcache *tc = p->tcs; tc; tc = tc->next) {
        while (atomic_load_explicit(&tc->in_op, memory_order_acquire))
            sched_yield();
        moved += tc_drain(p, tc);
    }
    atomic_fetch_sub_explicit(&p->gate, GATE_STEAL, memory_order_release);
    if (moved)
        p->steals++;
    *moved_out = moved;
    return 0;
}

/* A thread with a cache for p exits: its magazines go to the depot. */
static void thread_exit(keel__towner *o, void *data)
{
    keel_pool *p = (keel_pool *)((char *)o - offsetof(keel_pool, owner));
    tcache *tc = data;
    pthread_mutex_lock(&p->mu);
    tc_unhot(tc);
    size_t moved = LD(LD(tc->loaded)->n) + LD(LD(tc->prev)->n);
    depot_put(p, LD(tc->loaded));
    depot_put(p, LD(tc->prev));
    p->exited_hits += LD(tc->hits);
    tc_unlink(p, tc);
    if (moved)
        pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    keel__aligned_free(tc);
}

static void tc_free(void *tc) { keel__aligned_free(tc); } /* its pool is gone */

/* The calling thread's cache for p, created on first use; NULL when memory
 * runs out (the caller then goes through the depot). Never called for a
 * debug pool: the fast paths take "this thread has a cache" to mean "not
 * in debug mode". */
static tcache *tc_create(keel_pool *p)
{
    tcache *tc = keel__aligned_alloc(KEEL__CACHELINE, sizeof *tc);
    if (!tc)
        return NULL;
    memset(tc, 0, sizeof *tc);
    pthread_mutex_lock(&p->mu);
    mag *a = depot_take_empty(p), *b = depot_take_empty(p);
    if (!a || !b) {
        if (a)
            depot_put(p, a);
        if (b)
            depot_put(p, b);
        pthread_mutex_unlock(&p->mu);
        keel__aligned_free(tc);
        return NULL;
    }
    atomic_init(&tc->loaded, a);
    atomic_init(&tc->prev, b);
    tc_link(p, tc);
    pthread_mutex_unlock(&p->mu);
    if (keel__tslot_set(&p->owner, tc, tc_free) != 0) {
        pthread_mutex_lock(&p->mu);
        tc_unlink(p, tc);
        depot_put(p, a);
        depot_put(p, b);
        pthread_mutex_unlock(&p->mu);
        keel__aligned_free(tc);
        return NULL;
    }
    return tc;
}

static inline __attribute__((always_inline)) tcache *tc_get(keel_pool *p)
{
    tcache *tc = keel__tslot_get(&p->owner);
    return KEEL__LIKELY(tc != NULL) ? tc : tc_create(p);
}

/* ---- debug checks (caller holds p->mu) ---- */

static int debug_mark(keel_pool *p, void *obj, int from, int to)
{
    size_t at = slab_find(p, obj);
    if (at == SIZE_MAX) {
        keel__log(KEEL_LOG_ERROR, "pool",
                  "release of %p: not an object of pool %p", obj, (void *)p);
        return KEEL_EINVAL;
    }
    slab *s = p->slabs[at];
    size_t idx = (size_t)((char *)obj - s->base) / p->stride;
    if (s->state[idx] != from) {
        keel__log(KEEL_LOG_ERROR, "pool", "release of %p: %s", obj,
                  s->state[idx] == SLOT_IDLE ? "double release (object is idle)"
                                             : "object was never handed out");
        return KEEL_EINVAL;
    }
    s->state[idx] = (unsigned char)to;
    return 0;
}

/* ---- acquire ---- */

/* Runs init on a new object. Callers of the library test for failure
 * with `rc < 0`, so a positive return (an errno, a 1) is a failure too,
 * reported as a backend error rather than passed on as a success. */
static int run_init(keel_pool *p, void *obj)
{
    int rc = p->init ? p->init(obj, p->ud) : 0;
    return rc > 0 ? KEEL_EBACKEND : rc;
}

/* An idle object for the caller, from its own cache or the depot. Caller
 * holds p->mu; tc may be NULL. */
static void *take_idle(keel_pool *p, tcache *tc)
{
    if (tc) {
        void *obj = LD(tc->hot);
        if (obj) {
            ST(tc->hot, NULL);
            return obj;
        }
        for (int i = 0; i < 2; i++) {
            mag *m = i ? LD(tc->prev) : LD(tc->loaded);
            size_t n = LD(m->n);
            if (n) {
                ST(m->n, n - 1);
                return m->rounds[n - 1];
            }
        }
        /* Both empty: swap a depot magazine in, Bonwick style, unless
         * someone is waiting (then objects stay in the depot for them). */
        if (p->full && !GATE_SHUT(LD(p->gate))) {
            mag *full = depot_take_full(p);
            depot_put(p, LD(tc->prev));
            ST(tc->prev, LD(tc->loaded));
            ST(tc->loaded, full);
            size_t n = LD(full->n) - 1;
            ST(full->n, n);
            return full->rounds[n];
        }
    }
    return depot_pop(p);
}

static int acquire_slow(keel_pool *p, tcache *tc, uint64_t timeout_ns, void **out)
{
    int err = 0;
    bool stolen = false, waiting = false, slept = false, timed_out = false;
    bool init_failed = false; /* err is init's: not the pool's to recount */
    bool steal_nomem = false; /* idle objects may sit where the steal could not reach */
    struct timespec deadline;

    *out = NULL;
    pthread_mutex_lock(&p->mu);
    p->misses++;
    for (;;) {
        void *obj = take_idle(p, tc);
        if (obj) {
            if (p->debug)
                debug_mark(p, obj, SLOT_IDLE, SLOT_OUT);
            *out = obj;
            break;
        }
        obj = slot_reserve(p, &err);
        if (obj) {
            pthread_mutex_unlock(&p->mu);
            err = run_init(p, obj);
            pthread_mutex_lock(&p->mu);
            if (err == 0) {
                *out = obj;
                break;
            }
            slot_unreserve(p, obj); /* capacity freed: let a waiter retry */
            pthread_cond_broadcast(&p->cv);
            init_failed = true;
            break;
        }
        /* At capacity (ETIMEDOUT) or out of memory for a slab (ENOMEM):
         * idle objects in other threads' magazines may still serve. */
        if (timed_out || (err != KEEL_ETIMEDOUT && stolen))
            break;
        /* A waiter raises the gate before stealing, so every release that
         * the steal misses sees it and feeds the depot. */
        if (timeout_ns && !waiting && err == KEEL_ETIMEDOUT) {
            atomic_fetch_add(&p->gate, GATE_WAITER);
            waiting = true;
            keel__abstime_in(timeout_ns, &deadline);
            stolen = false;
        }
        if (!stolen) {
            stolen = true;
            /* Without a waiter's gate, skip the membarrier when no cache
             * seems to hold anything (a polling caller must not flood every
             * CPU with interrupts). */
            size_t moved = 0;
            if (waiting || caches_look_idle(p))
                steal_nomem = steal_all(p, &moved) != 0;
            if (moved)
                continue;
        }
        if (!waiting)
            break;
        if (!slept) { /* a steal that served was no wait */
            p->waits++;
            slept = true;
        }
        int rc = timeout_ns == KEEL_POOL_WAIT_FOREVER
                     ? pthread_cond_wait(&p->cv, &p->mu)
                     : pthread_cond_timedwait(&p->cv, &p->mu, &deadline);
        timed_out = rc != 0; /* one more look at idle objects and capacity */
    }
    /* An init that fails with KEEL_ETIMEDOUT (a connect that timed out)
     * is neither "at capacity" nor a timeout of the pool's. */
    if (!*out && !init_failed && err == KEEL_ETIMEDOUT && steal_nomem)
        err = KEEL_ENOMEM; /* not "at capacity": it could not look */
    if (!*out && !init_failed && err == KEEL_ETIMEDOUT)
        p->timeouts++;
    if (waiting)
        atomic_fetch_sub(&p->gate, GATE_WAITER);
    pthread_mutex_unlock(&p->mu);
    return *out ? 0 : err;
}

/* Without membarrier the thief's heavy fence is an ordinary one, so the
 * owner must fence for real between its in_op store and its gate load. */
static inline __attribute__((always_inline)) bool op_begin_fenced(keel_pool *p)
{
    KEEL__FULL_FENCE();
    return atomic_load_explicit(&p->gate, memory_order_acquire) == GATE_FENCE;
}

/* Starts a fast-path operation: false when the gate is shut. The flag that
 * says whether membarrier works lives in the gate, so that the fast path
 * loads and tests one word. */
static inline __attribute__((always_inline)) bool op_begin(keel_pool *p, tcache *tc)
{
    ST(tc->in_op, 1);
    atomic_signal_fence(memory_order_seq_cst);
    unsigned g = atomic_load_explicit(&p->gate, memory_order_acquire);
    return KEEL__LIKELY(g == 0) || (KEEL__UNLIKELY(g == GATE_FENCE) && op_begin_fenced(p));
}

static inline void op_end(tcache *tc)
{
    atomic_store_explicit(&tc->in_op, 0, memory_order_release);
}

/* The lock-free path: an object from the thread's magazines, or NULL. */
static inline __attribute__((always_inline)) void *acquire_fast(keel_pool *p, tcache *tc)
{
    void *obj = NULL;
    if (KEEL__LIKELY(op_begin(p, tc))) {
        if (KEEL__LIKELY((obj = LD(tc->hot)) != NULL)) {
            ST(tc->hot, NULL);
        } else {
            mag *m = LD(tc->loaded);
            size_t n = LD(m->n);
            if (KEEL__UNLIKELY(n == 0)) {
                mag *pm = LD(tc->prev);
                if ((n = LD(pm->n)) == 0)
                    goto out;
                ST(tc->prev, m);
                ST(tc->loaded, pm);
                m = pm;
            }
            obj = m->rounds[--n];
            ST(m->n, n);
        }
        if (!obj) /* never: tells the callers' tests that a pop succeeds */
            __builtin_unreachable();
        ST(tc->hits, LD(tc->hits) + 1);
    }
out:
    op_end(tc);
    return obj;
}

/* Everything but a hit in the thread's cache: tc, when there is one, has
 * just missed; without one, a debug pool (which never has one) or a first
 * call on this thread, whose new magazines start empty. */
static KEEL__COLD void *acquire_miss(keel_pool *p, tcache *tc)
{
    void *obj = NULL;
    if (!p)
        return NULL;
    if (!tc && !p->debug)
        tc = tc_create(p);
    acquire_slow(p, tc, 0, &obj);
    return obj;
}

KEEL_API void *keel_pool_acquire(keel_pool *p)
{
    tcache *tc = NULL;
    void *obj;
    if (KEEL__LIKELY(p != NULL) && KEEL__LIKELY((tc = keel__tslot_get(&p->owner)) != NULL) &&
        KEEL__LIKELY((obj = acquire_fast(p, tc)) != NULL))
        return obj;
    return acquire_miss(p, tc);
}

KEEL_API int keel_pool_acquire_timeout(keel_pool *p, uint64_t timeout_ns, void **obj)
{
    tcache *tc = NULL;
    if (!p || !obj)
        return KEEL_EINVAL;
    *obj = NULL;
    if (!p->debug && (tc = tc_get(p)) && (*obj = acquire_fast(p, tc)))
        return 0;
    return acquire_slow(p, tc, timeout_ns, obj);
}

/* ---- release ---- */

/* Finalises an object whose slot is reserved but not in any magazine:
 * `fini` runs outside p->mu (it may use other pools), then the slot goes
 * back and waiters learn that capacity is free. Caller holds p->mu. */
static void retire_locked(keel_pool *p, void *obj)
{
    if (p->fini) {
        pthread_mutex_unlock(&p->mu);
        p->fini(obj, p->ud);
        pthread_mutex_lock(&p->mu);
    }
    slot_unreserve(p, obj);
    pthread_cond_broadcast(&p->cv);
}

static void release_slow(keel_pool *p, tcache *tc, void *obj)
{
    pthread_mutex_lock(&p->mu);
    if (tc && !GATE_SHUT(LD(p->gate))) {
        /* The gate may have dropped since the fast path: look again. */
        mag *l = LD(tc->loaded), *pv = LD(tc->prev), *e;
        if (LD(l->n) < p->mag_size) {
            mag_push(l, obj);
            pthread_mutex_unlock(&p->mu);
            return;
        }
        if (LD(pv->n) == 0 || (e = depot_take_empty(p)) != NULL) {
            if (LD(pv->n)) /* loaded is full and prev too: prev goes */
                depot_put(p, pv);
            else
                e = pv;
            ST(tc->prev, l);
            ST(tc->loaded, e);
            mag_push(e, obj);
            pthread_mutex_unlock(&p->mu);
            return;
        }
    }
    if (depot_push(p, obj))
        pthread_cond_signal(&p->cv);
    else /* no memory for a magazine: retire the object rather than lose it */
        retire_locked(p, obj);
    pthread_mutex_unlock(&p->mu);
}

/* The lock-free path: obj onto the thread's magazines, or false. */
static inline __attribute__((always_inline)) bool release_fast(keel_pool *p, tcache *tc, void *obj)
{
    bool done = false;
    if (KEEL__LIKELY(op_begin(p, tc))) {
        if (KEEL__LIKELY(LD(tc->hot) == NULL)) {
            ST(tc->hot, obj);
        } else {
            mag *m = LD(tc->loaded);
            size_t n = LD(m->n);
            if (KEEL__UNLIKELY(n >= p->mag_size)) {
                mag *pm = LD(tc->prev);
                if (LD(pm->n) != 0)
                    goto out;
                ST(tc->prev, m);
                ST(tc->loaded, pm);
                m = pm;
                n = 0;
            }
            m->rounds[n] = obj;
            ST(m->n, n + 1);
        }
        done = true;
    }
out:
    op_end(tc);
    return done;
}

/* Everything but a plain push onto the thread's cache: bad arguments, a
 * debug pool, a reset hook, a first call, or (tc given: the push failed
 * on it) full magazines. */
static KEEL__COLD int release_miss(keel_pool *p, void *obj, tcache *tc)
{
    if (!p || !obj)
        return KEEL_EINVAL;
    if (p->debug) {
        pthread_mutex_lock(&p->mu);
        int rc = debug_mark(p, obj, SLOT_OUT, SLOT_IDLE);
        pthread_mutex_unlock(&p->mu);
        if (rc)
            return rc;
        if (p->reset)
            p->reset(obj, p->ud);
        release_slow(p, NULL, obj);
        return 0;
    }
    if (p->reset)
        p->reset(obj, p->ud);
    bool tried = tc != NULL;
    if (!tc)
        tc = tc_get(p);
    if (!tc || tried || !release_fast(p, tc, obj))
        release_slow(p, tc, obj);
    return 0;
}

KEEL_API int keel_pool_release(keel_pool *p, void *obj)
{
    tcache *tc = NULL;
    if (KEEL__LIKELY(p != NULL) && KEEL__LIKELY(obj != NULL) && KEEL__LIKELY(p->reset == NULL) &&
        KEEL__LIKELY((tc = keel__tslot_get(&p->owner)) != NULL) && KEEL__LIKELY(release_fast(p, tc, obj)))
        return 0;
    return release_miss(p, obj, tc);
}

KEEL_API int keel_pool_discard(keel_pool *p, void *obj)
{
    if (!p || !obj)
        return KEEL_EINVAL;
    pthread_mutex_lock(&p->mu);
    int rc = p->debug ? debug_mark(p, obj, SLOT_OUT, SLOT_IDLE) : 0;
    if (rc == 0)
        retire_locked(p, obj); /* fini unlocked, slot back, waiters told */
    pthread_mutex_unlock(&p->mu);
    return rc;
}

/* ---- create, trim, stats, destroy ---- */

/* Takes every magazine with objects out of the depot, finalises the
 * objects with p->mu released (fini may use other pools), gives their
 * slots back and frees the magazines. Caller holds p->mu. */
static size_t finalise_depot(keel_pool *p)
{
    mag *full = p->full;
    p->full = NULL;
    p->depot_objs = 0;
    if (!full)
        return 0;
    size_t n = 0;
    if (p->fini) {
        pthread_mutex_unlock(&p->mu);
        for (mag *m = full; m; m = m->next)
            for (size_t i = 0; i < LD(m->n); i++)
                p->fini(m->rounds[i], p->ud);
        pthread_mutex_lock(&p->mu);
    }
    for (mag *m = full, *next; m; m = next) {
        next = m->next;
        for (size_t i = 0; i < LD(m->n); i++, n++)
            slot_unreserve(p, m->rounds[i]);
        keel__free(m);
    }
    return n;
}

KEEL_API size_t keel_pool_trim(keel_pool *p)
{
    if (!p)
        return 0;
    pthread_mutex_lock(&p->mu);
    size_t stolen;
    steal_all(p, &stolen); /* without memory, the caches keep theirs */
    size_t n = finalise_depot(p);
    while (p->empty) { /* the caches keep theirs; spare magazines go */
        mag *m = p->empty;
        p->empty = m->next;
        keel__free(m);
    }
    if (n)
        pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    return n;
}

KEEL_API void keel_pool_stats_get(keel_pool *p, keel_pool_stats *st)
{
    if (!p || !st)
        return;
    memset(st, 0, sizeof *st);
    pthread_mutex_lock(&p->mu);
    uint64_t cached = 0, hits = p->exited_hits;
    for (tcache *tc = p->tcs; tc; tc = tc->next) {
        cached += (LD(tc->hot) != NULL) + LD(LD(tc->loaded)->n) + LD(LD(tc->prev)->n);
        hits += LD(tc->hits);
    }
    st->created = p->created;
    st->idle_cached = cached;
    st->idle_depot = p->depot_objs;
    st->live = p->created >= cached + p->depot_objs ? p->created - cached - p->depot_objs : 0;
    st->hits = hits;
    st->misses = p->misses;
    st->waits = p->waits;
    st->timeouts = p->timeouts;
    st->steals = p->steals;
    st->slabs = p->nslabs;
    st->slab_bytes = (uint64_t)p->slot_total * p->stride;
    pthread_mutex_unlock(&p->mu);
}

/* ---- metrics: computed from the statistics when a registry renders ---- */

#define POOL_STAT(fn, expr)                                                                        \
    static double fn(void *ud)                                                                     \
    {                                                                                              \
        keel_pool_stats st = {0};                                                                  \
        keel_pool_stats_get(ud, &st);                                                              \
        return (double)(expr);                                                                     \
    }
POOL_STAT(m_live, st.live)
POOL_STAT(m_cached, st.idle_cached)
POOL_STAT(m_depot, st.idle_depot)
POOL_STAT(m_hits, st.hits)
POOL_STAT(m_misses, st.misses)
POOL_STAT(m_waits, st.waits)
POOL_STAT(m_timeouts, st.timeouts)
POOL_STAT(m_steals, st.steals)
POOL_STAT(m_bytes, st.slab_bytes)
#undef POOL_STAT

static const keel__mfunc pool_metrics[] = {
    {1, "keel_pool_objects", "Objects of the pool by state.", "state", "live", m_live},
    {1, "keel_pool_objects", NULL, "state", "idle_cached", m_cached},
    {1, "keel_pool_objects", NULL, "state", "idle_depot", m_depot},
    {0, "keel_pool_acquires_total", "Acquires, by where the object came from.", "result", "hit", m_hits},
    {0, "keel_pool_acquires_total", NULL, "result", "miss", m_misses},
    {0, "keel_pool_waits_total", "Acquires that waited for a release.", NULL, NULL, m_waits},
    {0, "keel_pool_timeouts_total", "Acquires that gave up.", NULL, NULL, m_timeouts},
    {0, "keel_pool_steals_total", "Times idle objects were taken back from threads.", NULL, NULL, m_steals},
    {1, "keel_pool_slab_bytes", "Memory held in slabs.", NULL, NULL, m_bytes},
};

static int opts_check(const keel_pool_opts *o, size_t *stride, size_t *align)
{
    size_t a = o->align ? o->align : alignof(max_align_t);
    if (o->obj_size == 0 || (a & (a - 1)) || a > MAX_ALIGN)
        return KEEL_EINVAL;
    if (o->obj_size > SIZE_MAX - a)
        return KEEL_EINVAL;
    size_t s = (o->obj_size + a - 1) & ~(a - 1);
    size_t bytes;
    /* Every object the pool may hold must be addressable. */
    if (o->capacity && !keel__mul_ok(o->capacity, s, &bytes))
        return KEEL_EINVAL;
    if (!keel__mul_ok(o->prealloc, s, &bytes))
        return KEEL_EINVAL;
    if (o->capacity && o->prealloc > o->capacity)
        return KEEL_EINVAL;
    if (o->magazine_size > MAG_MAX)
        return KEEL_EINVAL;
    *stride = s;
    *align = a;
    return 0;
}

KEEL_API int keel_pool_create(keel_pool **out, const keel_pool_opts *opts)
{
    size_t stride, align;
    if (!out || !opts)
        return KEEL_EINVAL;
    int rc = opts_check(opts, &stride, &align);
    if (rc)
        return rc;
    keel_pool *p = keel__aligned_alloc(KEEL__CACHELINE, sizeof *p);
    if (!p)
        return KEEL_ENOMEM;
    memset(p, 0, sizeof *p);
    p->obj_size = opts->obj_size;
    p->stride = stride;
    p->align = align;
    p->capacity = opts->capacity;
    p->mag_size = opts->magazine_size;
    if (!p->mag_size) {
        p->mag_size = MAG_DEFAULT;
        if (p->capacity && p->capacity / 16 < MAG_DEFAULT)
            p->mag_size = p->capacity / 16 ? p->capacity / 16 : 1;
    }
    p->init = opts->init;
    p->reset = opts->reset;
    p->fini = opts->fini;
    p->ud = opts->ud;
    p->debug = opts->debug;
    p->owner.thread_exit = thread_exit;
    keel__fences_init();
    atomic_init(&p->gate, __atomic_load_n(&keel__membarrier_ok, __ATOMIC_RELAXED) ? 0 : GATE_FENCE);

    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, &ca);
    pthread_condattr_destroy(&ca);
    if ((rc = keel__towner_register(&p->owner)) != 0) {
        pthread_mutex_destroy(&p->mu);
        pthread_cond_destroy(&p->cv);
        keel__aligned_free(p);
        return rc;
    }

    for (size_t i = 0; i < opts->prealloc && rc == 0; i++) {
        pthread_mutex_lock(&p->mu);
        void *obj = slot_reserve(p, &rc);
        pthread_mutex_unlock(&p->mu);
        if (!obj)
            break;
        rc = run_init(p, obj);
        pthread_mutex_lock(&p->mu);
        if (rc) {
            slot_unreserve(p, obj);
        } else {
            if (p->debug)
                debug_mark(p, obj, SLOT_OUT, SLOT_IDLE);
            if (!depot_push(p, obj)) {
                rc = KEEL_ENOMEM;
                retire_locked(p, obj); /* initialised: fini it */
            }
        }
        pthread_mutex_unlock(&p->mu);
    }
    if (rc == 0 && (rc = keel__metrics_funcs(opts->metrics, "pool", opts->metrics_name, pool_metrics,
                                             sizeof pool_metrics / sizeof pool_metrics[0], p)) == 0)
        p->metrics = opts->metrics;
    if (rc) {
        keel_pool_destroy(p);
        return rc;
    }
    *out = p;
    return 0;
}

static void detach_caches(void *ud)
{
    keel_pool *p = ud;
    for (tcache *tc = p->tcs; tc; tc = tc->next) {
        tc_unhot(tc);
        depot_put(p, LD(tc->loaded));
        depot_put(p, LD(tc->prev));
        ST(tc->loaded, NULL);
        ST(tc->prev, NULL);
    }
    p->tcs = NULL;
}

KEEL_API void keel_pool_destroy(keel_pool *p)
{
    if (!p)
        return;
    if (p->metrics)
        keel_metrics_func_remove(p->metrics, p);
    /* Once unregistered no exiting thread hands its cache back: take the
     * magazines of every cache (their threads free the husks). */
    keel__towner_unregister(&p->owner, detach_caches, p);
    keel__tslot_drop(&p->owner); /* the calling thread's own, at once */

    pthread_mutex_lock(&p->mu);
    finalise_depot(p);
    pthread_mutex_unlock(&p->mu);
    for (mag *m = p->empty, *next; m; m = next) {
        next = m->next;
        keel__free(m);
    }
    while (p->nslabs) /* objects still out go with their slabs */
        slab_free(p, p->nslabs - 1);
    keel__free(p->slabs);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    keel__aligned_free(p);
}
