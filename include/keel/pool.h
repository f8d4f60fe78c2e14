/* keel/pool.h — fixed-size object pool with thread-local magazines.
 *
 * A pool hands out objects of one size and takes them back, so hot paths
 * stop paying for malloc and for re-initialising expensive objects. Each
 * thread keeps two small magazines of idle objects (Bonwick & Adams, USENIX
 * 2001); acquire and release touch only them, with no lock and no shared
 * cache line, until a magazine runs empty or full and is exchanged with the
 * shared depot. Objects are carved from slabs of many objects each (64 KiB
 * or eight objects; past 128 KiB an object, as many as fit in 1 MiB, one
 * at least).
 *
 * Capacity: a bounded pool never has more than `capacity` objects
 * constructed, so never more than `capacity` live. An idle object kept in
 * another thread's magazine is still available: an acquire that finds the
 * pool exhausted takes idle objects back from every thread's magazines
 * before it reports the pool full or starts to wait.
 *
 * Thread safety: every function may be called from any thread at once,
 * except keel_pool_destroy(), which must not run concurrently with any other
 * call on the same pool. Apart from the user's hooks (`init`, which runs in
 * an acquire, may block to connect; `fini` runs in discard, trim, destroy
 * and a release short of memory), only keel_pool_acquire_timeout() blocks,
 * and only for as long as its timeout.
 */
#ifndef KEEL_POOL_H
#define KEEL_POOL_H

#include <keel/common.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct keel_pool keel_pool;

typedef struct keel_pool_opts {
    size_t obj_size;  /* bytes per object; required, > 0 */
    size_t align;     /* power of two <= 4096; 0 = alignof(max_align_t) */
    size_t capacity;  /* most objects in existence; 0 = unbounded */
    size_t prealloc;  /* objects created (and initialised) up front */
    size_t magazine_size; /* objects per thread magazine, <= 4096; 0 =
                             automatic (32, capacity/16 for small bounded
                             pools) */
    /* Called once when an object is created, from the acquiring thread.
     * Returns 0, or a negative error code that the acquire fails with (the
     * slot is returned to the pool, nothing leaks); a positive return fails
     * it with KEEL_EBACKEND. May block: it runs outside every pool lock. */
    int (*init)(void *obj, void *ud);
    /* Called on every release, in the releasing thread, before the object
     * becomes available to others. Must not fail. */
    void (*reset)(void *obj, void *ud);
    /* Called once when an object is given up: an idle one by
     * keel_pool_trim() and keel_pool_destroy(), one given back by
     * keel_pool_discard(), and one released when no memory is left to
     * keep it (after its `reset`). */
    void (*fini)(void *obj, void *ud);
    void *ud;         /* passed to the three hooks, which must not call
                         functions of the same pool */
    /* Debug mode: every release is checked, and a double release or a
     * pointer this pool never handed out is refused with KEEL_EINVAL and
     * logged (module "pool") instead of corrupting the pool. Costs a lock
     * per acquire and release. */
    int debug;
    /* Optional: report the statistics below as keel_pool_* series labelled
     * pool=metrics_name (default "default") in this registry. */
    keel_metrics *metrics;
    const char *metrics_name; /* "default" if NULL; taken twice in one registry: KEEL_EEXIST */
} keel_pool_opts;

typedef struct keel_pool_stats {
    uint64_t created;     /* objects constructed and not yet finalised */
    uint64_t live;        /* objects handed out and not yet released */
    uint64_t idle_cached; /* idle objects in threads' caches */
    uint64_t idle_depot;  /* idle objects in the shared depot */
    uint64_t hits;        /* acquires served from the thread's cache */
    uint64_t misses;      /* acquires that went to the depot or created */
    uint64_t waits;       /* acquires that had to wait for a release */
    uint64_t timeouts;    /* acquires that gave up (timeout or at capacity) */
    uint64_t steals;      /* times idle objects were taken back from threads */
    uint64_t slabs;       /* slabs allocated now */
    uint64_t slab_bytes;  /* bytes in those slabs */
} keel_pool_stats;

/* Waits without a time limit in keel_pool_acquire_timeout(). */
#define KEEL_POOL_WAIT_FOREVER UINT64_MAX

/* Creates a pool and its `prealloc` objects. Returns 0; KEEL_EINVAL for a
 * NULL argument, a zero obj_size, an alignment that is not a power of two
 * or exceeds 4096, a magazine_size over 4096, prealloc > capacity of a
 * bounded pool, or sizes whose product overflows; KEEL_ENOMEM; KEEL_EEXIST when the metrics registry
 * already has a pool of that metrics_name; or the code of a failing `init`
 * during preallocation. On failure *out is left untouched and nothing
 * leaks. */
KEEL_API int keel_pool_create(keel_pool **out, const keel_pool_opts *opts);

/* An object, or NULL when the pool is at capacity with nothing idle, when
 * memory runs out, or when `init` fails (use keel_pool_acquire_timeout()
 * with a zero timeout to learn which). Never blocks. The object holds
 * whatever the last `reset` left in it (or `init` for a new one). */
KEEL_API void *keel_pool_acquire(keel_pool *p);

/* Like keel_pool_acquire(), but waits up to timeout_ns nanoseconds of
 * CLOCK_MONOTONIC time for a release when the pool is at capacity (0 = do
 * not wait; KEEL_POOL_WAIT_FOREVER = no limit). Returns 0 and sets *obj;
 * KEEL_ETIMEDOUT when the time is up (at once for a zero timeout);
 * KEEL_EINVAL; KEEL_ENOMEM; or the code of a failing `init`. */
KEEL_API int keel_pool_acquire_timeout(keel_pool *p, uint64_t timeout_ns,
                                       void **obj);

/* Gives an object back: calls `reset`, then keeps it for the next acquire
 * (when no memory is left for the magazine that would hold it, the object
 * is finalised instead, freeing its capacity). Returns 0, or KEEL_EINVAL
 * for NULL arguments. In debug mode also
 * KEEL_EINVAL, with a log message, for an object that is not out (a double
 * release) or that this pool never handed out; the pool is left unchanged.
 * Without debug mode such misuse is undefined behaviour. Never blocks. */
KEEL_API int keel_pool_release(keel_pool *p, void *obj);

/* Gives an object back as broken (a connection that saw an error): calls
 * `fini` instead of `reset`, and frees its slot, so that capacity is free
 * for a new object and a waiting acquire may create one. Returns 0, or
 * KEEL_EINVAL as keel_pool_release(). Never blocks beyond `fini`. */
KEEL_API int keel_pool_discard(keel_pool *p, void *obj);

/* Takes every idle object back from the threads' magazines and the depot,
 * calls `fini` on each, and frees the slabs left empty. Live objects are
 * untouched. Returns the number of objects finalised. Taking objects from
 * the threads needs two spare magazines per thread: without the memory for
 * them the threads keep theirs and only the depot is finalised. */
KEEL_API size_t keel_pool_trim(keel_pool *p);

/* Fills *st. Counters are summed without stopping other threads, so they
 * are exact only when no other thread is using the pool. */
KEEL_API void keel_pool_stats_get(keel_pool *p, keel_pool_stats *st);

/* Calls `fini` on every idle object (including those in other threads'
 * magazines) and frees all memory. Objects still out are not finalised and
 * their memory is freed with the pool: finish with them first. NULL is a
 * no-op. Must not run concurrently with any other call on this pool; threads
 * that used the pool may exit before or after. */
KEEL_API void keel_pool_destroy(keel_pool *p);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_POOL_H */
