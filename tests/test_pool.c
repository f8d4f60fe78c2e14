/* tests/test_pool.c — keel_pool: ownership, capacity, hooks, waits, thread
 * exit, debug checks, bad input. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <keel/pool.h>

#include "harness.h"
#include "internal.h"

/* ---- hook counters ---- */

typedef struct counts {
    atomic_int init, reset, fini;
    int fail_init_at; /* the n-th init fails (1-based); 0 = never */
    int fail_rc;      /* with this code; 0 = KEEL_EBACKEND */
} counts;

static int count_init(void *obj, void *ud)
{
    counts *c = ud;
    int n = atomic_fetch_add(&c->init, 1) + 1;
    if (c->fail_init_at && n == c->fail_init_at)
        return c->fail_rc ? c->fail_rc : KEEL_EBACKEND;
    memset(obj, 0xAB, 8);
    return 0;
}
static void count_reset(void *obj, void *ud) { (void)obj; atomic_fetch_add(&((counts *)ud)->reset, 1); }
static void count_fini(void *obj, void *ud) { (void)obj; atomic_fetch_add(&((counts *)ud)->fini, 1); }

static keel_pool *counted_pool(counts *c, size_t capacity, size_t prealloc)
{
    keel_pool *p = NULL;
    keel_pool_opts o = {.obj_size = 64, .capacity = capacity, .prealloc = prealloc,
                        .init = count_init, .reset = count_reset, .fini = count_fini, .ud = c};
    ck_assert_int_eq(keel_pool_create(&p, &o), 0);
    return p;
}

static keel_pool_stats stats(keel_pool *p)
{
    keel_pool_stats st;
    keel_pool_stats_get(p, &st);
    return st;
}

/* ---- bad input ---- */

START_TEST(create_rejects_bad_input)
{
    keel_pool *p = (keel_pool *)0x1;
    keel_pool_opts o = {.obj_size = 64};
    ck_assert_int_eq(keel_pool_create(NULL, &o), KEEL_EINVAL);
    ck_assert_int_eq(keel_pool_create(&p, NULL), KEEL_EINVAL);

    keel_pool_opts bad[] = {
        {.obj_size = 0},
        {.obj_size = 8, .align = 3},
        {.obj_size = 8, .align = 8192},
        {.obj_size = SIZE_MAX},
        {.obj_size = SIZE_MAX / 2, .capacity = 4},
        {.obj_size = SIZE_MAX / 4, .prealloc = 8},
        {.obj_size = 8, .capacity = 4, .prealloc = 5},
        {.obj_size = 8, .magazine_size = (size_t)1 << 40},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        ck_assert_msg(keel_pool_create(&p, &bad[i]) == KEEL_EINVAL, "case %zu accepted", i);
    ck_assert_ptr_eq(p, (keel_pool *)0x1); /* untouched on failure */
}
END_TEST

START_TEST(null_arguments_are_refused)
{
    keel_pool *p;
    void *obj;
    keel_pool_opts o = {.obj_size = 16};
    ck_assert_int_eq(keel_pool_create(&p, &o), 0);
    ck_assert_ptr_null(keel_pool_acquire(NULL));
    ck_assert_int_eq(keel_pool_acquire_timeout(NULL, 0, &obj), KEEL_EINVAL);
    ck_assert_int_eq(keel_pool_acquire_timeout(p, 0, NULL), KEEL_EINVAL);
    ck_assert_int_eq(keel_pool_release(NULL, &obj), KEEL_EINVAL);
    ck_assert_int_eq(keel_pool_release(p, NULL), KEEL_EINVAL);
    ck_assert_uint_eq(keel_pool_trim(NULL), 0);
    keel_pool_stats_get(NULL, NULL);
    keel_pool_stats_get(p, NULL);
    keel_pool_destroy(NULL);
    keel_pool_destroy(p);
}
END_TEST

/* ---- basics ---- */

START_TEST(objects_are_distinct_aligned_and_usable)
{
    size_t aligns[] = {0, 1, 8, 64, 4096};
    for (size_t a = 0; a < sizeof aligns / sizeof aligns[0]; a++) {
        keel_pool *p;
        keel_pool_opts o = {.obj_size = 100, .align = aligns[a]};
        ck_assert_int_eq(keel_pool_create(&p, &o), 0);
        size_t want = aligns[a] ? aligns[a] : _Alignof(max_align_t);
        void *objs[300];
        for (int i = 0; i < 300; i++) {
            objs[i] = keel_pool_acquire(p);
            ck_assert_ptr_nonnull(objs[i]);
            ck_assert_uint_eq((uintptr_t)objs[i] % want, 0);
            memset(objs[i], i & 0xff, 100);
        }
        for (int i = 0; i < 300; i++) { /* no two overlap */
            const unsigned char *b = objs[i];
            for (int k = 0; k < 100; k++)
                ck_assert_uint_eq(b[k], (unsigned)(i & 0xff));
        }
        for (int i = 0; i < 300; i++)
            ck_assert_int_eq(keel_pool_release(p, objs[i]), 0);
        keel_pool_stats st = stats(p);
        ck_assert_uint_eq(st.created, 300);
        ck_assert_uint_eq(st.live, 0);
        ck_assert_uint_eq(st.idle_cached + st.idle_depot, 300);
        keel_pool_destroy(p);
    }
}
END_TEST

START_TEST(hooks_run_exactly_once_per_event)
{
    counts c = {0};
    keel_pool *p = counted_pool(&c, 0, 0);
    void *objs[100];
    for (int round = 0; round < 3; round++) {
        for (int i = 0; i < 100; i++)
            objs[i] = keel_pool_acquire(p);
        for (int i = 0; i < 100; i++)
            keel_pool_release(p, objs[i]);
    }
    ck_assert_int_eq(atomic_load(&c.init), 100); /* reused, not re-created */
    ck_assert_int_eq(atomic_load(&c.reset), 300);
    ck_assert_int_eq(atomic_load(&c.fini), 0);
    keel_pool_destroy(p);
    ck_assert_int_eq(atomic_load(&c.fini), 100);
}
END_TEST

START_TEST(failing_init_fails_the_acquire_and_loses_nothing)
{
    counts c = {.fail_init_at = 3};
    keel_pool *p = counted_pool(&c, 4, 0);
    void *a, *b, *x;
    ck_assert_int_eq(keel_pool_acquire_timeout(p, 0, &a), 0);
    ck_assert_int_eq(keel_pool_acquire_timeout(p, 0, &b), 0);
    ck_assert_int_eq(keel_pool_acquire_timeout(p, 0, &x), KEEL_EBACKEND);
    ck_assert_ptr_null(x);
    ck_assert_uint_eq(stats(p).created, 2); /* the failed slot went back */
    void *more[2];
    for (int i = 0; i < 2; i++) /* capacity 4 is still reachable */
        ck_assert_int_eq(keel_pool_acquire_timeout(p, 0, &more[i]), 0);
    ck_assert_ptr_null(keel_pool_acquire(p));
    keel_pool_release(p, a);
    keel_pool_release(p, b);
    keel_pool_release(p, more[0]);
    keel_pool_release(p, more[1]);
    keel_pool_destroy(p);
    ck_assert_int_eq(atomic_load(&c.fini), 4); /* never for the failed one */
}
END_TEST

/* Every call of the library fails with a negative code: an init that
 * returns a positive number (an errno, a 1) must not make an acquire or a
 * create look successful to a caller testing `rc < 0`. */
START_TEST(an_init_returning_a_positive_number_fails_with_a_negative_code)
{
    counts c = {.fail_init_at = 1, .fail_rc = 111 /* ECONNREFUSED */};
    keel_pool *p = counted_pool(&c, 4, 0);
    void *x = (void *)1;
    ck_assert_int_eq(keel_pool_acquire_timeout(p, 0, &x), KEEL_EBACKEND);
    ck_assert_ptr_null(x);
    ck_assert_uint_eq(stats(p).created, 0);
    keel_pool_destroy(p);

    counts f = {.fail_init_at = 2, .fail_rc = 1};
    keel_pool *q = (keel_pool *)0x1;
    keel_pool_opts o = {.obj_size = 64, .prealloc = 4, .init = count_init,
                        .fini = count_fini, .ud = &f};
    ck_assert_int_eq(keel_pool_create(&q, &o), KEEL_EBACKEND);
    ck_assert_ptr_eq(q, (keel_pool *)0x1);
    ck_assert_int_eq(atomic_load(&f.fini), 1);
}
END_TEST

START_TEST(prealloc_creates_up_front_and_failure_cleans_up)
{
    counts c = {0};
    keel_pool *p = counted_pool(&c, 10, 6);
    ck_assert_int_eq(atomic_load(&c.init), 6);
    ck_assert_uint_eq(stats(p).idle_depot, 6);
    void *objs[6];
    for (int i = 0; i < 6; i++)
        objs[i] = keel_pool_acquire(p);
    ck_assert_int_eq(atomic_load(&c.init), 6); /* served from the prealloc */
    for (int i = 0; i < 6; i++)
        keel_pool_release(p, objs[i]);
    keel_pool_destroy(p);

    counts f = {.fail_init_at = 4};
    keel_pool *q = NULL;
    keel_pool_opts o = {.obj_size = 64, .prealloc = 8, .init = count_init,
                        .fini = count_fini, .ud = &f};
    ck_assert_int_eq(keel_pool_create(&q, &o), KEEL_EBACKEND);
    ck_assert_ptr_null(q);
    ck_assert_int_eq(atomic_load(&f.fini), 3);
}
END_TEST

START_TEST(capacity_is_a_hard_bound)
{
    counts c = {0};
    keel_pool *p = counted_pool(&c, 5, 0);
    void *objs[5], *x = (void *)1;
    for (int i = 0; i < 5; i++)
        ck_assert_ptr_nonnull(objs[i] = keel_pool_acquire(p));
    ck_assert_ptr_null(keel_pool_acquire(p));
    ck_assert_int_eq(keel_pool_acquire_timeout(p, 0, &x), KEEL_ETIMEDOUT);
    ck_assert_ptr_null(x);
    keel_pool_stats st = stats(p);
    ck_assert_uint_eq(st.live, 5);
    ck_assert_uint_eq(st.timeouts, 2);
    keel_pool_release(p, objs[0]);
    ck_assert_ptr_eq(keel_pool_acquire(p), objs[0]);
    for (int i = 0; i < 5; i++)
        keel_pool_release(p, objs[i]);
    keel_pool_destroy(p);
    ck_assert_int_eq(atomic_load(&c.init), 5);
}
END_TEST

START_TEST(a_discarded_object_is_finalised_and_its_capacity_reused)
{
    counts c = {0};
    keel_pool *p = counted_pool(&c, 2, 0);
    void *a = keel_pool_acquire(p), *b = keel_pool_acquire(p);
    ck_assert_ptr_null(keel_pool_acquire(p));
    ck_assert_int_eq(keel_pool_discard(p, a), 0);
    ck_assert_int_eq(atomic_load(&c.fini), 1);
    ck_assert_int_eq(atomic_load(&c.reset), 0); /* not reset: finalised */
    void *n = keel_pool_acquire(p);               /* a new one in its place */
    ck_assert_ptr_nonnull(n);
    ck_assert_int_eq(atomic_load(&c.init), 3);
    ck_assert_int_eq(keel_pool_discard(p, NULL), KEEL_EINVAL);
    keel_pool_release(p, b);
    keel_pool_release(p, n);
    keel_pool_destroy(p);
    ck_assert_int_eq(atomic_load(&c.init), atomic_load(&c.fini));
}
END_TEST

START_TEST(trim_finalises_idle_objects_and_frees_slabs)
{
    counts c = {0};
    keel_pool *p = counted_pool(&c, 0, 0);
    void *objs[2000];
    for (int i = 0; i < 2000; i++)
        objs[i] = keel_pool_acquire(p);
    for (int i = 0; i < 1500; i++)
        keel_pool_release(p, objs[i]);
    ck_assert_uint_eq(keel_pool_trim(p), 1500);
    ck_assert_int_eq(atomic_load(&c.fini), 1500);
    keel_pool_stats st = stats(p);
    ck_assert_uint_eq(st.created, 500);
    ck_assert_uint_eq(st.live, 500);
    ck_assert_uint_eq(st.idle_cached + st.idle_depot, 0);
    for (int i = 1500; i < 2000; i++)
        keel_pool_release(p, objs[i]);
    ck_assert_uint_eq(keel_pool_trim(p), 500);
    st = stats(p);
    ck_assert_uint_eq(st.slabs, 0);
    ck_assert_uint_eq(st.slab_bytes, 0);
    void *again = keel_pool_acquire(p); /* still usable */
    ck_assert_ptr_nonnull(again);
    keel_pool_release(p, again);
    keel_pool_destroy(p);
    ck_assert_int_eq(atomic_load(&c.init), atomic_load(&c.fini));
}
END_TEST

/* magazines of 4 rounds (and the spare one) are 56-byte allocations: make
 * exactly those fail */
static void *no_magazines(size_t n) { return n == 16 + 5 * sizeof(void *) ? NULL : malloc(n); }

START_TEST(preallocation_out_of_memory_finalises_what_it_initialised)
{
    keel_allocator a = {no_magazines, calloc, realloc, free};
    ck_assert_int_eq(keel_set_allocator(&a), 0);
    counts c = {0};
    keel_pool *p = NULL;
    keel_pool_opts o = {.obj_size = 64, .prealloc = 3, .magazine_size = 4,
                        .init = count_init, .fini = count_fini, .ud = &c};
    ck_assert_int_eq(keel_pool_create(&p, &o), KEEL_ENOMEM);
    ck_assert_ptr_null(p);
    keel_set_allocator(NULL);
    ck_assert_int_ge(atomic_load(&c.init), 1);
    ck_assert_int_eq(atomic_load(&c.init), atomic_load(&c.fini));
}
END_TEST

/* A fini that uses another pool: hooks run outside the pool's lock. */
static void fini_with_pool(void *obj, void *ud)
{
    (void)obj;
    keel_pool *q;
    keel_pool_opts o = {.obj_size = 8};
    if (keel_pool_create(&q, &o) == 0) {
        keel_pool_release(q, keel_pool_acquire(q));
        keel_pool_destroy(q);
        atomic_fetch_add(&((counts *)ud)->fini, 1);
    }
}

static void *use_and_exit(void *arg)
{
    keel_pool *p = arg;
    for (int i = 0; i < 100; i++)
        keel_pool_release(p, keel_pool_acquire(p));
    return NULL;
}

START_TEST(hooks_may_use_other_pools_while_threads_exit)
{
    counts c = {0};
    keel_pool *p;
    keel_pool_opts o = {.obj_size = 32, .fini = fini_with_pool, .ud = &c};
    ck_assert_int_eq(keel_pool_create(&p, &o), 0);
    for (int round = 0; round < 50; round++) {
        pthread_t t;
        pthread_create(&t, NULL, use_and_exit, p); /* exits while we trim */
        void *objs[8];
        for (int i = 0; i < 8; i++)
            objs[i] = keel_pool_acquire(p);
        for (int i = 0; i < 8; i++)
            keel_pool_release(p, objs[i]);
        keel_pool_trim(p);
        pthread_join(t, NULL);
    }
    keel_pool_destroy(p);
    ck_assert_int_gt(atomic_load(&c.fini), 0);
}
END_TEST

/* ---- threads ---- */

typedef struct parked {
    keel_pool *p;
    int n;
    void **objs;
    pthread_barrier_t ready, go;
    int acquire_more; /* after `go`: acquire and release once more */
} parked;

/* Acquires n objects, releases them (so they sit in this thread's
 * magazines), then waits until the test lets it go. */
static void *park_objects(void *arg)
{
    parked *pk = arg;
    for (int i = 0; i < pk->n; i++)
        pk->objs[i] = keel_pool_acquire(pk->p);
    for (int i = 0; i < pk->n; i++)
        keel_pool_release(pk->p, pk->objs[i]);
    pthread_barrier_wait(&pk->ready);
    pthread_barrier_wait(&pk->go);
    if (pk->acquire_more) {
        void *o = keel_pool_acquire(pk->p);
        if (o)
            keel_pool_release(pk->p, o);
    }
    return NULL;
}

static void park_start(parked *pk, pthread_t *t, keel_pool *p, int n)
{
    pk->p = p;
    pk->n = n;
    pk->objs = calloc((size_t)n, sizeof(void *));
    pthread_barrier_init(&pk->ready, NULL, 2);
    pthread_barrier_init(&pk->go, NULL, 2);
    ck_assert_int_eq(pthread_create(t, NULL, park_objects, pk), 0);
    pthread_barrier_wait(&pk->ready);
}

static void park_finish(parked *pk, pthread_t t)
{
    pthread_barrier_wait(&pk->go);
    pthread_join(t, NULL);
    pthread_barrier_destroy(&pk->ready);
    pthread_barrier_destroy(&pk->go);
    free(pk->objs);
}

START_TEST(idle_objects_in_another_thread_are_not_lost_capacity)
{
    counts c = {0};
    keel_pool *p;
    keel_pool_opts o = {.obj_size = 64, .capacity = 64, .magazine_size = 16,
                        .init = count_init, .ud = &c};
    ck_assert_int_eq(keel_pool_create(&p, &o), 0);
    parked pk = {0};
    pthread_t t;
    park_start(&pk, &t, p, 20); /* 20 idle, most of them in its magazines */
    ck_assert_uint_gt(stats(p).idle_cached, 0);

    void *objs[64];
    for (int i = 0; i < 64; i++)
        ck_assert_msg((objs[i] = keel_pool_acquire(p)) != NULL, "acquire %d failed", i);
    ck_assert_ptr_null(keel_pool_acquire(p));
    ck_assert_int_eq(atomic_load(&c.init), 64);
    ck_assert_uint_ge(stats(p).steals, 1);
    for (int i = 0; i < 64; i++)
        keel_pool_release(p, objs[i]);
    park_finish(&pk, t);
    keel_pool_destroy(p);
}
END_TEST

/* A timed acquire served by a steal never waited: `waits` says so. */
START_TEST(an_acquire_served_by_a_steal_is_not_a_wait)
{
    keel_pool *p;
    keel_pool_opts o = {.obj_size = 64, .capacity = 4, .magazine_size = 4};
    ck_assert_int_eq(keel_pool_create(&p, &o), 0);
    parked pk = {0};
    pthread_t t;
    park_start(&pk, &t, p, 4); /* at capacity, all 4 idle over there */
    void *x = NULL;
    ck_assert_int_eq(keel_pool_acquire_timeout(p, KEEL_POOL_WAIT_FOREVER, &x), 0);
    keel_pool_stats st = stats(p);
    ck_assert_uint_ge(st.steals, 1);
    ck_assert_uint_eq(st.waits, 0);
    keel_pool_release(p, x);
    park_finish(&pk, t);
    keel_pool_destroy(p);
}
END_TEST

START_TEST(an_acquire_that_cannot_steal_for_memory_says_so)
{
    keel_pool *p;
    keel_pool_opts o = {.obj_size = 64, .capacity = 4, .magazine_size = 4};
    ck_assert_int_eq(keel_pool_create(&p, &o), 0);
    void *mine = keel_pool_acquire(p); /* this thread's cache exists */
    ck_assert_ptr_nonnull(mine);
    parked pk = {0};
    pthread_t t;
    park_start(&pk, &t, p, 3); /* the other 3 idle in its magazines */
    /* At capacity: the idle 3 need a steal, whose spare magazines (56
     * bytes each) cannot be had. */
    keel_allocator a = {no_magazines, calloc, realloc, free};
    ck_assert_int_eq(keel_set_allocator(&a), 0);
    void *x = (void *)1;
    int rc = keel_pool_acquire_timeout(p, 0, &x);
    keel_set_allocator(NULL);
    ck_assert_int_eq(rc, KEEL_ENOMEM); /* not "full": objects are idle */
    ck_assert_ptr_null(x);
    ck_assert_int_eq(keel_pool_acquire_timeout(p, 0, &x), 0); /* with memory again */
    keel_pool_release(p, x);
    keel_pool_release(p, mine);
    park_finish(&pk, t);
    keel_pool_destroy(p);
}
END_TEST

/* An init that fails with KEEL_ETIMEDOUT (a connect that timed out) is
 * the init's failure, not the pool's: its code comes back as it is, even
 * after a steal that found no memory, and the pool counts no timeout. */
static void *wait_forever(void *arg)
{
    void **args = arg;
    *(int *)args[1] = keel_pool_acquire_timeout(args[0], KEEL_POOL_WAIT_FOREVER, &args[2]);
    return NULL;
}

START_TEST(an_init_that_times_out_is_not_a_pool_timeout)
{
    counts c = {.fail_init_at = 3, .fail_rc = KEEL_ETIMEDOUT};
    keel_pool *p;
    keel_pool_opts o = {.obj_size = 64, .capacity = 2, .magazine_size = 4,
                        .init = count_init, .fini = count_fini, .ud = &c};
    ck_assert_int_eq(keel_pool_create(&p, &o), 0);
    void *mine = keel_pool_acquire(p);
    ck_assert_ptr_nonnull(mine);
    parked pk = {0};
    pthread_t t, w;
    park_start(&pk, &t, p, 1); /* at capacity, one idle over there */
    /* The waiter's steal cannot have its magazines: it waits instead. */
    keel_allocator a = {no_magazines, calloc, realloc, free};
    ck_assert_int_eq(keel_set_allocator(&a), 0);
    int rc = 1;
    void *args[3] = {p, &rc, (void *)1};
    ck_assert_int_eq(pthread_create(&w, NULL, wait_forever, args), 0);
    while (stats(p).waits == 0)
        sched_yield();
    ck_assert_int_eq(keel_pool_discard(p, mine), 0); /* room: the waiter creates */
    pthread_join(w, NULL);
    keel_set_allocator(NULL);
    ck_assert_int_eq(atomic_load(&c.init), 3);
    ck_assert_int_eq(rc, KEEL_ETIMEDOUT); /* init's code, not ENOMEM */
    ck_assert_ptr_null(args[2]);
    ck_assert_uint_eq(stats(p).timeouts, 0);

    void *x = (void *)1; /* and without a steal in the way */
    c.fail_init_at = 4;
    ck_assert_int_eq(keel_pool_acquire_timeout(p, 0, &x), KEEL_ETIMEDOUT);
    ck_assert_ptr_null(x);
    ck_assert_uint_eq(stats(p).timeouts, 0);
    park_finish(&pk, t);
    keel_pool_destroy(p);
}
END_TEST

/* A slab holds many small objects, but large ones are not allocated eight
 * at a time: the first acquire of a 4 MiB object takes 4 MiB. */
START_TEST(large_objects_are_not_allocated_in_eights)
{
    keel_pool *p;
    keel_pool_opts o = {.obj_size = (size_t)4 << 20};
    ck_assert_int_eq(keel_pool_create(&p, &o), 0);
    void *obj = keel_pool_acquire(p);
    ck_assert_ptr_nonnull(obj);
    keel_pool_stats st;
    keel_pool_stats_get(p, &st);
    ck_assert_uint_eq(st.slab_bytes, (uint64_t)4 << 20);
    ck_assert_int_eq(keel_pool_release(p, obj), 0);
    keel_pool_destroy(p);
}
END_TEST

START_TEST(stats_count_every_idle_object_and_hit)
{
    counts c = {0};
    keel_pool *p = counted_pool(&c, 0, 0);
    void *a = keel_pool_acquire(p); /* a miss: created */
    keel_pool_release(p, a);        /* parked in the thread's hot slot */
    keel_pool_stats st = stats(p);
    ck_assert_uint_eq(st.idle_cached, 1);
    ck_assert_uint_eq(st.live, 0);
    ck_assert_ptr_eq(keel_pool_acquire(p), a);
    void *b = keel_pool_acquire(p); /* nothing idle: a second miss */
    keel_pool_release(p, a);        /* hot slot */
    keel_pool_release(p, b);        /* magazine */
    st = stats(p);
    ck_assert_uint_eq(st.hits, 1);
    ck_assert_uint_eq(st.misses, 2);
    ck_assert_uint_eq(st.idle_cached, 2);
    ck_assert_uint_eq(keel_pool_trim(p), 2); /* both found and finalised */
    ck_assert_int_eq(atomic_load(&c.fini), 2);
    keel_pool_destroy(p);
}
END_TEST

START_TEST(exiting_thread_gives_its_magazines_back)
{
    counts c = {0};
    keel_pool *p = counted_pool(&c, 0, 0);
    parked pk = {0};
    pthread_t t;
    park_start(&pk, &t, p, 40);
    ck_assert_uint_gt(stats(p).idle_cached, 0);
    park_finish(&pk, t);
    keel_pool_stats st = stats(p);
    ck_assert_uint_eq(st.idle_cached, 0); /* that thread's cache is gone */
    ck_assert_uint_eq(st.idle_depot, 40);
    ck_assert_uint_eq(st.live, 0);
    void *objs[40];
    for (int i = 0; i < 40; i++)
        objs[i] = keel_pool_acquire(p);
    ck_assert_int_eq(atomic_load(&c.init), 40); /* all reused */
    for (int i = 0; i < 40; i++)
        keel_pool_release(p, objs[i]);
    keel_pool_destroy(p);
}
END_TEST

START_TEST(destroy_finalises_objects_idle_in_other_threads)
{
    counts c = {0};
    keel_pool *p = counted_pool(&c, 0, 0);
    parked pk = {.acquire_more = 0};
    pthread_t t;
    park_start(&pk, &t, p, 10);
    keel_pool_destroy(p); /* the thread is parked, not inside a pool call */
    ck_assert_int_eq(atomic_load(&c.fini), 10);
    park_finish(&pk, t); /* and exits after its pool is gone */
}
END_TEST

START_TEST(a_reused_pool_id_does_not_confuse_a_live_thread)
{
    counts c1 = {0}, c2 = {0};
    keel_pool *p1 = counted_pool(&c1, 0, 0);
    parked pk = {.acquire_more = 1};
    pthread_t t;
    park_start(&pk, &t, p1, 5);
    keel_pool_destroy(p1);
    keel_pool *p2 = counted_pool(&c2, 0, 0); /* likely the same id */
    pk.p = p2;
    park_finish(&pk, t); /* acquires from p2 with a stale p1 cache around */
    ck_assert_int_eq(atomic_load(&c2.init), 1);
    ck_assert_int_eq(atomic_load(&c2.reset), 1);
    keel_pool_destroy(p2);
    ck_assert_int_eq(atomic_load(&c2.fini), 1);
}
END_TEST

typedef struct waiter {
    keel_pool *p;
    uint64_t timeout;
    void *obj;
    int rc;
} waiter;

static void *wait_for_object(void *arg)
{
    waiter *w = arg;
    w->rc = keel_pool_acquire_timeout(w->p, w->timeout, &w->obj);
    return NULL;
}

START_TEST(a_waiting_acquire_wakes_on_release)
{
    counts c = {0};
    keel_pool *p = counted_pool(&c, 1, 0);
    void *held = keel_pool_acquire(p);
    ck_assert_ptr_nonnull(held);
    waiter w = {.p = p, .timeout = KEEL_POOL_WAIT_FOREVER};
    pthread_t t;
    pthread_create(&t, NULL, wait_for_object, &w);
    while (stats(p).waits == 0) /* until it is really waiting */
        sched_yield();
    ck_assert_int_eq(keel_pool_release(p, held), 0);
    pthread_join(t, NULL);
    ck_assert_int_eq(w.rc, 0);
    ck_assert_ptr_eq(w.obj, held);
    keel_pool_release(p, w.obj);
    keel_pool_destroy(p);
}
END_TEST

START_TEST(a_waiting_acquire_times_out)
{
    keel_pool *p;
    keel_pool_opts o = {.obj_size = 32, .capacity = 1};
    ck_assert_int_eq(keel_pool_create(&p, &o), 0);
    void *held = keel_pool_acquire(p), *x = (void *)1;
    uint64_t t0 = keel_now_ns();
    ck_assert_int_eq(keel_pool_acquire_timeout(p, 20 * KT_MS, &x), KEEL_ETIMEDOUT);
    ck_assert_uint_ge(keel_now_ns() - t0, 20 * KT_MS); /* it did wait */
    ck_assert_ptr_null(x);
    keel_pool_stats st = stats(p);
    ck_assert_uint_eq(st.waits, 1);
    ck_assert_uint_eq(st.timeouts, 1);
    keel_pool_release(p, held);
    keel_pool_destroy(p);
}
END_TEST

/* Every object carries an owner marker; two owners at once fail. */
typedef struct marked {
    atomic_long owner;
    long payload[7];
} marked;

typedef struct hammer {
    keel_pool *p;
    long id;
    int iters;
    int blocking;
    atomic_int *live, *max_live, *errors;
} hammer;

static void *hammer_run(void *arg)
{
    hammer *h = arg;
    marked *mine[3];
    for (int i = 0; i < h->iters; i++) {
        int k = 1 + i % 3, got = 0;
        for (; got < k; got++) {
            void *o = NULL;
            if (h->blocking) {
                if (keel_pool_acquire_timeout(h->p, KEEL_POOL_WAIT_FOREVER, &o) != 0)
                    atomic_fetch_add(h->errors, 1);
            } else {
                o = keel_pool_acquire(h->p);
            }
            if (!o)
                break;
            mine[got] = o;
            if (mine[got]->payload[6] != 0x5eed) /* init ran for it */
                atomic_fetch_add(h->errors, 1);
            long prev = atomic_exchange(&mine[got]->owner, h->id);
            if (prev != 0)
                atomic_fetch_add(h->errors, 1);
            int l = atomic_fetch_add(h->live, 1) + 1, m = atomic_load(h->max_live);
            while (l > m && !atomic_compare_exchange_weak(h->max_live, &m, l))
                ;
        }
        for (int j = 0; j < got; j++) {
            mine[j]->payload[0] += h->id;
            atomic_fetch_sub(h->live, 1);
            if (atomic_exchange(&mine[j]->owner, 0) != h->id)
                atomic_fetch_add(h->errors, 1);
            keel_pool_release(h->p, mine[j]);
        }
    }
    return NULL;
}

static int unowned(void *obj, void *ud)
{
    (void)ud;
    marked *m = obj;
    atomic_init(&m->owner, 0);
    memset(m->payload, 0, sizeof m->payload);
    m->payload[6] = 0x5eed;
    return 0;
}

static void hammer_pool(size_t capacity, int blocking, int threads)
{
    keel_pool *p;
    keel_pool_opts o = {.obj_size = sizeof(marked), .capacity = capacity, .magazine_size = 4,
                        .init = unowned};
    ck_assert_int_eq(keel_pool_create(&p, &o), 0);
    atomic_int live = 0, max_live = 0, errors = 0;
    hammer h[8];
    pthread_t t[8];
    for (int i = 0; i < threads; i++) {
        h[i] = (hammer){p, i + 1, 20000, blocking, &live, &max_live, &errors};
        pthread_create(&t[i], NULL, hammer_run, &h[i]);
    }
    for (int i = 0; i < threads; i++)
        pthread_join(t[i], NULL);
    ck_assert_int_eq(atomic_load(&errors), 0);
    if (capacity)
        ck_assert_int_le(atomic_load(&max_live), (int)capacity);
    keel_pool_stats st = stats(p);
    ck_assert_uint_eq(st.live, 0);
    if (capacity)
        ck_assert_uint_le(st.created, capacity);
    keel_pool_destroy(p);
}

START_TEST(no_object_has_two_owners_unbounded)
{
    hammer_pool(0, 0, 4);
}
END_TEST

START_TEST(no_object_has_two_owners_and_capacity_holds)
{
    hammer_pool(6, 0, 4);
}
END_TEST

START_TEST(blocking_acquires_share_a_small_pool)
{
    /* 4 threads wanting up to 3 each from 9: they must wait for each other,
     * and since 4 x 2 held + 1 <= 9 someone can always finish. */
    hammer_pool(9, 1, 4);
}
END_TEST

START_TEST(without_membarrier_the_fast_paths_fence_themselves)
{
    /* As on a kernel without membarrier: pools created now put the fence
     * on both sides. Steals and waits must still keep every promise. */
    bool had = keel__membarrier_ok;
    keel__membarrier_ok = false;
    hammer_pool(6, 0, 4);
    hammer_pool(9, 1, 4);
    keel__membarrier_ok = had;
}
END_TEST

/* ---- debug mode ---- */

static atomic_int log_count;
static char log_last[256];
static void capture_log(keel_log_level lv, const char *mod, const char *msg, void *ud)
{
    (void)lv;
    (void)ud;
    if (strcmp(mod, "pool") == 0) {
        snprintf(log_last, sizeof log_last, "%s", msg);
        atomic_fetch_add(&log_count, 1);
    }
}

START_TEST(debug_mode_refuses_double_and_foreign_releases)
{
    keel_set_log(capture_log, KEEL_LOG_ERROR, NULL);
    counts c = {0};
    keel_pool *p;
    keel_pool_opts o = {.obj_size = 48, .debug = 1, .reset = count_reset, .ud = &c};
    ck_assert_int_eq(keel_pool_create(&p, &o), 0);
    char *a = keel_pool_acquire(p), *b = keel_pool_acquire(p);
    ck_assert_int_eq(keel_pool_release(p, a), 0);
    ck_assert_int_eq(keel_pool_release(p, a), KEEL_EINVAL);
    ck_assert_ptr_nonnull(strstr(log_last, "double release"));
    int stack_obj;
    ck_assert_int_eq(keel_pool_release(p, &stack_obj), KEEL_EINVAL);
    ck_assert_ptr_nonnull(strstr(log_last, "not an object"));
    ck_assert_int_eq(keel_pool_release(p, b + 1), KEEL_EINVAL); /* interior */
    ck_assert_int_eq(atomic_load(&log_count), 3);
    ck_assert_int_eq(atomic_load(&c.reset), 1); /* refused ones never reset */
    /* a's object trimmed away (b keeps their slab): its slot is the
     * pool's, but no object there was handed out */
    ck_assert_uint_eq(keel_pool_trim(p), 1);
    ck_assert_int_eq(keel_pool_release(p, a), KEEL_EINVAL);
    ck_assert_ptr_nonnull(strstr(log_last, "never handed out"));
    ck_assert_int_eq(atomic_load(&log_count), 4);
    /* The pool is intact: b comes back, and a's slot holds a new object. */
    ck_assert_int_eq(keel_pool_release(p, b), 0);
    char *x = keel_pool_acquire(p), *y = keel_pool_acquire(p);
    ck_assert((x == a && y == b) || (x == b && y == a));
    keel_pool_stats st = stats(p);
    ck_assert_uint_eq(st.created, 2);
    ck_assert_uint_eq(st.live, 2);
    keel_pool_release(p, x);
    keel_pool_release(p, y);
    keel_pool_destroy(p);
    keel_set_log(NULL, KEEL_LOG_ERROR, NULL);
}
END_TEST

#if !defined(__SANITIZE_THREAD__) /* see pool_suite() */
/* A fork while another thread exits with a cache of a pool: the child's
 * first pool must not wait for the lock that exit took into the fork. */
enum { FORK_POOLS = 64 }; /* an exit hands back 64 caches: a wide window */

static void *use_all_and_exit(void *arg)
{
    keel_pool **p = arg;
    for (int i = 0; i < FORK_POOLS; i++)
        keel_pool_release(p[i], keel_pool_acquire(p[i]));
    return NULL;
}

static void *exit_threads_until_stopped(void *arg)
{
    void **a = arg;
    while (!atomic_load((atomic_bool *)a[1])) {
        pthread_t t;
        if (pthread_create(&t, NULL, use_all_and_exit, a[0]) == 0)
            pthread_join(t, NULL);
    }
    return NULL;
}

static int make_a_pool(void *arg)
{
    (void)arg;
    keel_pool *q;
    if (keel_pool_create(&q, &(keel_pool_opts){.obj_size = 8}) != 0)
        return 2;
    keel_pool_destroy(q);
    return 0;
}

START_TEST(a_child_forked_while_a_thread_exits_can_make_a_pool)
{
    keel_pool *p[FORK_POOLS];
    for (int i = 0; i < FORK_POOLS; i++)
        ck_assert_int_eq(keel_pool_create(&p[i], &(keel_pool_opts){.obj_size = 64}), 0);
    atomic_bool stop = false;
    void *arg[2] = {p, &stop};
    pthread_t t;
    ck_assert_int_eq(pthread_create(&t, NULL, exit_threads_until_stopped, arg), 0);
    bool ok = true;
    for (int i = 0; i < 300 && ok; i++)
        ok = kt_in_child(make_a_pool, NULL, 5);
    atomic_store(&stop, true);
    ck_assert_int_eq(pthread_join(t, NULL), 0);
    for (int i = 0; i < FORK_POOLS; i++)
        keel_pool_destroy(p[i]);
    ck_assert_msg(ok, "a forked child could not make a pool");
}
END_TEST
#endif

static Suite *pool_suite(void)
{
    Suite *s = suite_create("pool");
    TCase *tc = tcase_create("basics");
    tcase_add_test(tc, create_rejects_bad_input);
    tcase_add_test(tc, null_arguments_are_refused);
    tcase_add_test(tc, objects_are_distinct_aligned_and_usable);
    tcase_add_test(tc, hooks_run_exactly_once_per_event);
    tcase_add_test(tc, failing_init_fails_the_acquire_and_loses_nothing);
    tcase_add_test(tc, an_init_returning_a_positive_number_fails_with_a_negative_code);
    tcase_add_test(tc, prealloc_creates_up_front_and_failure_cleans_up);
    tcase_add_test(tc, capacity_is_a_hard_bound);
    tcase_add_test(tc, trim_finalises_idle_objects_and_frees_slabs);
    tcase_add_test(tc, a_discarded_object_is_finalised_and_its_capacity_reused);
    tcase_add_test(tc, debug_mode_refuses_double_and_foreign_releases);
    tcase_add_test(tc, preallocation_out_of_memory_finalises_what_it_initialised);
    suite_add_tcase(s, tc);

    tc = tcase_create("threads");
    tcase_set_timeout(tc, 20);
    tcase_add_test(tc, idle_objects_in_another_thread_are_not_lost_capacity);
    tcase_add_test(tc, an_acquire_served_by_a_steal_is_not_a_wait);
    tcase_add_test(tc, an_acquire_that_cannot_steal_for_memory_says_so);
    tcase_add_test(tc, an_init_that_times_out_is_not_a_pool_timeout);
    tcase_add_test(tc, stats_count_every_idle_object_and_hit);
    tcase_add_test(tc, large_objects_are_not_allocated_in_eights);
    tcase_add_test(tc, exiting_thread_gives_its_magazines_back);
    tcase_add_test(tc, destroy_finalises_objects_idle_in_other_threads);
    tcase_add_test(tc, a_reused_pool_id_does_not_confuse_a_live_thread);
    tcase_add_test(tc, a_waiting_acquire_wakes_on_release);
    tcase_add_test(tc, a_waiting_acquire_times_out);
    tcase_add_test(tc, no_object_has_two_owners_unbounded);
    tcase_add_test(tc, no_object_has_two_owners_and_capacity_holds);
    tcase_add_test(tc, blocking_acquires_share_a_small_pool);
    tcase_add_test(tc, without_membarrier_the_fast_paths_fence_themselves);
    tcase_add_test(tc, hooks_may_use_other_pools_while_threads_exit);
    suite_add_tcase(s, tc);

#if !defined(__SANITIZE_THREAD__)
    /* ThreadSanitizer supports no fork of a threaded process */
    tc = tcase_create("fork");
    tcase_set_tags(tc, "stress"); /* threads racing a fork: not under valgrind */
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, a_child_forked_while_a_thread_exits_can_make_a_pool);
    suite_add_tcase(s, tc);
#endif
    return s;
}

int main(void) { return kt_run(pool_suite()); }
