/* tests/test_common.c — error codes, allocator hooks, clocks, logging,
 * version. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <keel.h>

#include "harness.h"
#include "internal.h"
#include "rcu.h"

START_TEST(every_error_code_has_a_name_and_a_message)
{
    int codes[] = {
#define CODE(name, val, msg) KEEL_##name,
        KEEL_ERRNO_MAP(CODE)
#undef CODE
    };
    size_t n = sizeof codes / sizeof codes[0];
    for (size_t i = 0; i < n; i++) {
        ck_assert_int_lt(codes[i], 0);
        ck_assert_str_ne(keel_strerror(codes[i]), "unknown error");
        ck_assert_str_ne(keel_err_name(codes[i]), "KEEL_EUNKNOWN");
        ck_assert(strncmp(keel_err_name(codes[i]), "KEEL_E", 6) == 0);
        for (size_t k = 0; k < i; k++) /* distinct values */
            ck_assert_int_ne(codes[i], codes[k]);
    }
    ck_assert_str_eq(keel_err_name(KEEL_EINVAL), "KEEL_EINVAL");
    ck_assert_str_eq(keel_strerror(KEEL_ETIMEDOUT), "timed out");
}
END_TEST

START_TEST(unknown_codes_still_get_static_strings)
{
    int odd[] = {0, 1, 12345, -9999, -1000000, INT32_MIN};
    for (size_t i = 0; i < sizeof odd / sizeof odd[0]; i++) {
        ck_assert_ptr_nonnull(keel_strerror(odd[i]));
        ck_assert_ptr_nonnull(keel_err_name(odd[i]));
    }
    ck_assert_str_eq(keel_strerror(0), "success");
    ck_assert_str_eq(keel_err_name(0), "KEEL_OK");
    ck_assert_str_eq(keel_strerror(-9999), "unknown error");
    ck_assert_str_eq(keel_err_name(-9999), "KEEL_EUNKNOWN");
}
END_TEST

START_TEST(version_matches_the_header)
{
    ck_assert_str_eq(keel_version(), KEEL_VERSION_STRING);
    ck_assert_uint_eq(keel_version_num(), KEEL_VERSION_NUM);
}
END_TEST

START_TEST(clocks_move_forward)
{
    uint64_t a = keel_now_ns(), b = keel_now_ns();
    ck_assert_uint_ge(b, a);
    /* after 2020-01-01 and before 2200 */
    ck_assert_uint_gt(keel_wall_ns(), 1577836800ull * KT_S);
    ck_assert_uint_lt(keel_wall_ns(), 7258118400ull * KT_S);
    kt_clock c = {0};
    kt_clock_advance(&c, 5 * KT_S);
    ck_assert_uint_eq(kt_clock_now(&c), 5 * KT_S);
}
END_TEST

static void *draw(void *arg)
{
    uint64_t *out = arg;
    for (int i = 0; i < 4; i++)
        out[i] = keel_rand_u64(NULL);
    return NULL;
}

START_TEST(random_numbers_differ_between_draws_and_threads)
{
    uint64_t a[4], b[4];
    pthread_t t;
    draw(a);
    pthread_create(&t, NULL, draw, b);
    pthread_join(t, NULL);
    for (int i = 0; i < 4; i++)
        for (int k = 0; k < 4; k++) {
            ck_assert(i == k || a[i] != a[k]);
            ck_assert(a[i] != b[k]); /* seeded apart per thread */
        }
    /* roughly uniform: each bit set about half the time */
    int ones = 0;
    for (int i = 0; i < 1000; i++)
        ones += __builtin_popcountll(keel_rand_u64(NULL));
    ck_assert_int_gt(ones, 30000);
    ck_assert_int_lt(ones, 34000);
}
END_TEST

/* ---- allocator hooks ---- */

static atomic_long n_malloc, n_free;
static void *cnt_malloc(size_t n) { atomic_fetch_add(&n_malloc, 1); return malloc(n); }
static void *cnt_calloc(size_t n, size_t s) { atomic_fetch_add(&n_malloc, 1); return calloc(n, s); }
static void *cnt_realloc(void *p, size_t n)
{
    if (!p)
        atomic_fetch_add(&n_malloc, 1);
    return realloc(p, n);
}
static void cnt_free(void *p)
{
    if (p)
        atomic_fetch_add(&n_free, 1);
    free(p);
}

/* A forked child does not repeat its parent's numbers. */
static int draw_in_child(void *arg)
{
    int *fds = arg;
    uint64_t mine[4];
    for (int i = 0; i < 4; i++)
        mine[i] = keel_rand_u64(NULL);
    return write(fds[1], mine, sizeof mine) == (ssize_t)sizeof mine ? 0 : 1;
}

START_TEST(a_forked_child_draws_other_numbers)
{
    keel_rand_u64(NULL); /* seeded before the fork */
    int fds[2];
    ck_assert_int_eq(pipe(fds), 0);
    ck_assert(kt_in_child(draw_in_child, fds, 5));
    uint64_t ours[4], theirs[4];
    for (int i = 0; i < 4; i++)
        ours[i] = keel_rand_u64(NULL);
    ck_assert_int_eq(read(fds[0], theirs, sizeof theirs), (ssize_t)sizeof theirs);
    ck_assert_msg(memcmp(ours, theirs, sizeof ours) != 0, "the child drew the parent's numbers");
    close(fds[0]);
    close(fds[1]);
}
END_TEST

START_TEST(all_memory_goes_through_the_allocator_hooks)
{
    keel_allocator bad = {cnt_malloc, NULL, cnt_realloc, cnt_free};
    ck_assert_int_eq(keel_set_allocator(&bad), KEEL_EINVAL);
    keel_allocator a = {cnt_malloc, cnt_calloc, cnt_realloc, cnt_free};
    ck_assert_int_eq(keel_set_allocator(&a), 0);

    keel_pool *p;
    keel_pool_opts o = {.obj_size = 200, .align = 256, .prealloc = 10};
    ck_assert_int_eq(keel_pool_create(&p, &o), 0);
    void *objs[500];
    for (int i = 0; i < 500; i++)
        objs[i] = keel_pool_acquire(p);
    for (int i = 0; i < 500; i++)
        keel_pool_release(p, objs[i]);
    keel_pool_destroy(p);
    ck_assert_int_gt(atomic_load(&n_malloc), 2);
    ck_assert_int_eq(atomic_load(&n_malloc), atomic_load(&n_free));
    ck_assert_int_eq(keel_set_allocator(NULL), 0);
}
END_TEST

/* ---- logging ---- */

static int log_calls;
static keel_log_level log_level;
static char log_module[32], log_msg[256];
static void *log_ud;
static void capture(keel_log_level lv, const char *mod, const char *msg, void *ud)
{
    log_calls++;
    log_level = lv;
    log_ud = ud;
    strncpy(log_module, mod, sizeof log_module - 1);
    strncpy(log_msg, msg, sizeof log_msg - 1);
}

START_TEST(the_log_hook_gets_messages_up_to_its_level)
{
    int token;
    keel_set_log(capture, KEEL_LOG_ERROR, &token);
    keel_pool *p;
    keel_pool_opts o = {.obj_size = 8, .debug = 1};
    ck_assert_int_eq(keel_pool_create(&p, &o), 0);
    int x;
    ck_assert_int_eq(keel_pool_release(p, &x), KEEL_EINVAL);
    ck_assert_int_eq(log_calls, 1);
    ck_assert_int_eq(log_level, KEEL_LOG_ERROR);
    ck_assert_str_eq(log_module, "pool");
    ck_assert_ptr_eq(log_ud, &token);
    ck_assert_ptr_null(strchr(log_msg, '\n'));

    keel_set_log(NULL, KEEL_LOG_DEBUG, NULL); /* silenced */
    ck_assert_int_eq(keel_pool_release(p, &x), KEEL_EINVAL);
    ck_assert_int_eq(log_calls, 1);
    keel_pool_destroy(p);
    ck_assert_str_eq(keel_log_level_name(KEEL_LOG_WARN), "warn");
    ck_assert_str_eq(keel_log_level_name((keel_log_level)42), "unknown");
}
END_TEST

/* A hook installed at one level never gets a message above it, even from
 * a thread that was already logging when the hook changed. */
static atomic_int too_verbose, quiet_calls;
static atomic_bool logging_stop;
static void quiet_hook(keel_log_level lv, const char *mod, const char *msg, void *ud)
{
    (void)mod, (void)msg, (void)ud;
    atomic_fetch_add(&quiet_calls, 1);
    if (lv > KEEL_LOG_ERROR)
        atomic_fetch_add(&too_verbose, 1);
}
static void chatty_hook(keel_log_level lv, const char *mod, const char *msg, void *ud)
{
    (void)lv, (void)mod, (void)msg, (void)ud;
}

static void *log_debug_lines(void *arg)
{
    (void)arg;
    for (int i = 0; !atomic_load(&logging_stop) && !atomic_load(&too_verbose); i++)
        keel__log(i % 2 ? KEEL_LOG_DEBUG : KEEL_LOG_ERROR, "test", "line %d of %s", i, "a debug run");
    return NULL;
}

START_TEST(a_new_hook_gets_nothing_above_its_level)
{
    pthread_t t;
    keel_set_log(chatty_hook, KEEL_LOG_DEBUG, NULL);
    ck_assert_int_eq(pthread_create(&t, NULL, log_debug_lines, NULL), 0);
    /* until the quiet hook has had its share of the lines */
    for (int i = 0; i < 100000 || atomic_load(&quiet_calls) < 1000; i++) {
        keel_set_log(chatty_hook, KEEL_LOG_DEBUG, NULL);
        keel_set_log(quiet_hook, KEEL_LOG_ERROR, NULL);
    }
    atomic_store(&logging_stop, true);
    ck_assert_int_eq(pthread_join(t, NULL), 0);
    keel_set_log(NULL, KEEL_LOG_ERROR, NULL);
    ck_assert_int_gt((int)atomic_load(&quiet_calls), 0);
    ck_assert_msg(atomic_load(&too_verbose) == 0, "a hook at KEEL_LOG_ERROR got %d debug lines",
                  (int)atomic_load(&too_verbose));
}
END_TEST

#if !defined(__SANITIZE_THREAD__) /* see main() */
/* A fork while another thread is inside keel__log: the child's first
 * message must not wait for a lock that thread took into the fork. */
static atomic_long fork_log_lines;
static void counting_hook(keel_log_level lv, const char *mod, const char *msg, void *ud)
{
    (void)lv, (void)mod, (void)msg, (void)ud;
    atomic_fetch_add(&fork_log_lines, 1);
}

static void *log_until_stopped(void *arg)
{
    atomic_bool *stop = arg;
    while (!atomic_load(stop))
        keel__log(KEEL_LOG_ERROR, "test", "x");
    return NULL;
}

static int log_a_line(void *arg)
{
    (void)arg;
    keel__log(KEEL_LOG_ERROR, "child", "one line");
    return 0;
}

START_TEST(a_child_forked_while_another_thread_logs_can_log)
{
    keel_set_log(counting_hook, KEEL_LOG_ERROR, NULL);
    atomic_bool stop = false;
    pthread_t t;
    ck_assert_int_eq(pthread_create(&t, NULL, log_until_stopped, &stop), 0);
    bool ok = true;
    for (int i = 0; i < 300 && ok; i++)
        ok = kt_in_child(log_a_line, NULL, 5);
    atomic_store(&stop, true);
    ck_assert_int_eq(pthread_join(t, NULL), 0);
    keel_set_log(NULL, KEEL_LOG_ERROR, NULL);
    ck_assert_msg(ok, "a forked child hung in its first keel__log");
    ck_assert_int_gt(atomic_load(&fork_log_lines), 0);
}
END_TEST
#endif

/* ---- RCU (lib/rcu.h) ----
 * A writer swaps the published node, waits for a grace period, marks the
 * old node dead and frees it; readers check, inside their sections, that
 * the node they loaded is alive at the start and at the end. A grace period
 * that ended under a reader shows as a dead node (or, under a sanitizer,
 * as a use after free). */

#define NODE_ALIVE 0xa11c0de
#define NODE_DEAD 0xdead

typedef struct rnode {
    _Atomic uint64_t magic;
} rnode;

typedef struct rcu_run {
    _Atomic(rnode *) cur;
    atomic_bool stop;
    atomic_long bad, sections;
    atomic_int running; /* reader threads that have read */
    int writes;  /* grace periods the writer waits for */
    bool churn;  /* readers are short-lived threads, some exiting inside */
} rcu_run;

static rnode *rnode_new(void)
{
    rnode *n = malloc(sizeof *n);
    ck_assert_ptr_nonnull(n);
    atomic_init(&n->magic, NODE_ALIVE);
    return n;
}

/* One read section, nested once every few; true to leave it open. */
static void read_once(rcu_run *r, unsigned i, bool leave_open)
{
    ck_assert_int_eq(keel__rcu_read_lock(), 0);
    rnode *n = atomic_load_explicit(&r->cur, memory_order_acquire);
    if (atomic_load_explicit(&n->magic, memory_order_relaxed) != NODE_ALIVE)
        atomic_fetch_add(&r->bad, 1);
    if (i % 4 == 0) { /* a nested section leaves the outer one open */
        ck_assert_int_eq(keel__rcu_read_lock(), 0);
        rnode *m = atomic_load_explicit(&r->cur, memory_order_acquire);
        if (atomic_load_explicit(&m->magic, memory_order_relaxed) != NODE_ALIVE)
            atomic_fetch_add(&r->bad, 1);
        keel__rcu_read_unlock();
    }
    for (unsigned k = 0; k < i % 64; k++) /* a section of some length */
        keel__cpu_relax();
    if (i % 16 == 0)
        sched_yield(); /* and one that loses the CPU inside */
    if (atomic_load_explicit(&n->magic, memory_order_relaxed) != NODE_ALIVE)
        atomic_fetch_add(&r->bad, 1);
    atomic_fetch_add_explicit(&r->sections, 1, memory_order_relaxed);
    if (!leave_open) {
        keel__rcu_read_unlock();
        ck_assert(!keel__rcu_in_read());
    }
}

static void *rcu_reader(void *arg)
{
    rcu_run *r = arg;
    read_once(r, 0, false);
    atomic_fetch_add(&r->running, 1);
    for (unsigned i = 1; !atomic_load(&r->stop); i++)
        read_once(r, i, false);
    return NULL;
}

/* Short-lived readers: each thread reads a few times and exits, one in
 * three inside a read section; their slots are recycled while the writer
 * scans them. */
static void *rcu_short_reader(void *arg)
{
    rcu_run *r = arg;
    static atomic_uint seq;
    unsigned me = atomic_fetch_add(&seq, 1);
    for (unsigned i = 1; i <= 8; i++)
        read_once(r, me + i, i == 8 && me % 3 == 0);
    return NULL;
}

static void *rcu_churner(void *arg)
{
    rcu_run *r = arg;
    atomic_fetch_add(&r->running, 1);
    while (!atomic_load(&r->stop)) {
        pthread_t t;
        ck_assert_int_eq(pthread_create(&t, NULL, rcu_short_reader, r), 0);
        ck_assert_int_eq(pthread_join(t, NULL), 0);
    }
    return NULL;
}

/* A writer that never read: its first call is a synchronize. */
static void *rcu_writer(void *arg)
{
    rcu_run *r = arg;
    for (int i = 0; i < r->writes; i++) {
        rnode *old = atomic_exchange_explicit(&r->cur, rnode_new(), memory_order_acq_rel);
        keel__rcu_synchronize();
        atomic_store_explicit(&old->magic, NODE_DEAD, memory_order_relaxed);
        free(old);
    }
    atomic_store(&r->stop, true);
    return NULL;
}

static void rcu_hammer(int readers, int churners, int writers, int writes)
{
    rcu_run r = {.writes = writes};
    atomic_init(&r.cur, rnode_new());
    pthread_t t[16];
    int n = 0;
    for (int i = 0; i < readers; i++)
        ck_assert_int_eq(pthread_create(&t[n++], NULL, rcu_reader, &r), 0);
    for (int i = 0; i < churners; i++)
        ck_assert_int_eq(pthread_create(&t[n++], NULL, rcu_churner, &r), 0);
    while (atomic_load(&r.running) < n) /* the writers start among readers */
        sched_yield();
    pthread_t w[4];
    for (int i = 0; i < writers; i++)
        ck_assert_int_eq(pthread_create(&w[i], NULL, rcu_writer, &r), 0);
    for (int i = 0; i < writers; i++)
        ck_assert_int_eq(pthread_join(w[i], NULL), 0);
    for (int i = 0; i < n; i++)
        ck_assert_int_eq(pthread_join(t[i], NULL), 0);
    ck_assert_int_gt(atomic_load(&r.sections), 0);
    ck_assert_msg(atomic_load(&r.bad) == 0, "%ld reads of a node freed under its reader",
                  (long)atomic_load(&r.bad));
    free(atomic_load(&r.cur));
}

START_TEST(rcu_grace_periods_wait_for_every_reader)
{
    rcu_hammer(3, 0, 2, 3000);
}
END_TEST

START_TEST(rcu_recycles_slots_of_exited_threads_during_grace_periods)
{
    rcu_hammer(1, 2, 1, 3000);
}
END_TEST

START_TEST(rcu_without_membarrier_the_readers_fence_themselves)
{
    /* As on a kernel without membarrier (the flag is settled before any
     * thread reads: a reader and a writer disagreeing on it is not a state
     * the library can be in). */
    keel__fences_init();
    bool had = keel__membarrier_ok;
    keel__membarrier_ok = false;
    rcu_hammer(2, 1, 1, 3000);
    keel__membarrier_ok = had;
}
END_TEST

/* A reader that stays in its section while a writer waits. */
typedef struct rcu_hold {
    atomic_int in, writer_started, writer_done, leave;
    bool nested;
} rcu_hold;

static void *rcu_hold_reader(void *arg)
{
    rcu_hold *h = arg;
    ck_assert_int_eq(keel__rcu_read_lock(), 0);
    if (h->nested) { /* an inner section opened and closed: still inside */
        ck_assert_int_eq(keel__rcu_read_lock(), 0);
        keel__rcu_read_unlock();
        ck_assert(keel__rcu_in_read());
    }
    atomic_store(&h->in, 1);
    while (!atomic_load(&h->writer_started))
        sched_yield();
    /* The writer is in (or about to be in) its grace period; it must not
     * end while this thread is inside, however long that is. */
    for (int i = 0; i < 2000; i++) {
        ck_assert_msg(!atomic_load(&h->writer_done), "a grace period ended under a reader");
        sched_yield();
    }
    while (!atomic_load(&h->leave))
        sched_yield();
    keel__rcu_read_unlock();
    return NULL;
}

static void *rcu_hold_writer(void *arg)
{
    rcu_hold *h = arg;
    atomic_store(&h->writer_started, 1);
    keel__rcu_synchronize();
    atomic_store(&h->writer_done, 1);
    return NULL;
}

static void rcu_hold_run(bool nested)
{
    rcu_hold h = {.nested = nested};
    pthread_t r, w;
    ck_assert_int_eq(pthread_create(&r, NULL, rcu_hold_reader, &h), 0);
    while (!atomic_load(&h.in))
        sched_yield();
    ck_assert_int_eq(pthread_create(&w, NULL, rcu_hold_writer, &h), 0);
    while (!atomic_load(&h.writer_started))
        sched_yield();
    atomic_store(&h.leave, 1);
    ck_assert_int_eq(pthread_join(r, NULL), 0);
    ck_assert_int_eq(pthread_join(w, NULL), 0);
    ck_assert(atomic_load(&h.writer_done));
}

START_TEST(rcu_a_grace_period_outlasts_a_section_begun_before_it)
{
    rcu_hold_run(false);
    rcu_hold_run(true);
}
END_TEST

static void *read_and_exit_inside(void *arg)
{
    (void)arg;
    ck_assert_int_eq(keel__rcu_read_lock(), 0);
    ck_assert_int_eq(keel__rcu_read_lock(), 0);
    return NULL; /* two sections deep */
}

static void *read_once_and_tell(void *arg)
{
    ck_assert_int_eq(keel__rcu_read_lock(), 0);
    ck_assert_int_eq(keel__rcu_in_read(), true);
    keel__rcu_read_unlock();
    *(bool *)arg = keel__rcu_in_read();
    return NULL;
}

START_TEST(rcu_a_thread_that_exits_inside_a_section_holds_nothing_back)
{
    for (int i = 0; i < 50; i++) {
        pthread_t t;
        ck_assert_int_eq(pthread_create(&t, NULL, read_and_exit_inside, NULL), 0);
        ck_assert_int_eq(pthread_join(t, NULL), 0);
        keel__rcu_synchronize(); /* returns: that slot is free again */
        bool inside = true;
        ck_assert_int_eq(pthread_create(&t, NULL, read_once_and_tell, &inside), 0);
        ck_assert_int_eq(pthread_join(t, NULL), 0);
        ck_assert(!inside); /* the recycled slot starts at depth 0 */
    }
    ck_assert(!keel__rcu_in_read());
}
END_TEST

#if !defined(__SANITIZE_THREAD__) /* see main() */
/* A fork while another thread waits for a grace period: that thread does
 * not exist in the child, and neither may its hold on the grace periods. */
static void *rcu_fork_reader(void *arg)
{
    rcu_hold *h = arg;
    ck_assert_int_eq(keel__rcu_read_lock(), 0);
    atomic_store(&h->in, 1);
    while (!atomic_load(&h->writer_started))
        sched_yield();
    for (int i = 0; i < 2000; i++) /* the writer waits meanwhile */
        sched_yield();
    keel__rcu_read_unlock();
    return NULL;
}

static int rcu_in_child(void *arg)
{
    (void)arg;
    if (keel__rcu_read_lock() != 0)
        return 1;
    keel__rcu_read_unlock();
    keel__rcu_synchronize();
    return 0;
}

START_TEST(rcu_a_forked_child_has_grace_periods)
{
    rcu_hold h = {0};
    pthread_t r, w;
    ck_assert_int_eq(pthread_create(&r, NULL, rcu_fork_reader, &h), 0);
    while (!atomic_load(&h.in))
        sched_yield();
    ck_assert_int_eq(pthread_create(&w, NULL, rcu_hold_writer, &h), 0);
    while (!atomic_load(&h.writer_started))
        sched_yield();
    for (int i = 0; i < 50; i++) /* into its synchronize */
        sched_yield();
    ck_assert_msg(kt_in_child(rcu_in_child, NULL, 20), "the child's grace period never ended");
    ck_assert_int_eq(pthread_join(r, NULL), 0);
    ck_assert_int_eq(pthread_join(w, NULL), 0);
}
END_TEST
#endif

int main(void)
{
    Suite *s = suite_create("common");
    TCase *tc = tcase_create("common");
    tcase_add_test(tc, every_error_code_has_a_name_and_a_message);
    tcase_add_test(tc, unknown_codes_still_get_static_strings);
    tcase_add_test(tc, version_matches_the_header);
    tcase_add_test(tc, clocks_move_forward);
    tcase_add_test(tc, random_numbers_differ_between_draws_and_threads);
    tcase_add_test(tc, a_forked_child_draws_other_numbers);
    tcase_add_test(tc, all_memory_goes_through_the_allocator_hooks);
    tcase_add_test(tc, the_log_hook_gets_messages_up_to_its_level);
    suite_add_tcase(s, tc);
    tc = tcase_create("log-race");
    tcase_set_tags(tc, "stress");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, a_new_hook_gets_nothing_above_its_level);
#if !defined(__SANITIZE_THREAD__)
    tcase_add_test(tc, a_child_forked_while_another_thread_logs_can_log); /* see below */
#endif
    suite_add_tcase(s, tc);
    tc = tcase_create("rcu");
    tcase_set_tags(tc, "stress");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, rcu_a_grace_period_outlasts_a_section_begun_before_it);
    tcase_add_test(tc, rcu_a_thread_that_exits_inside_a_section_holds_nothing_back);
    tcase_add_test(tc, rcu_grace_periods_wait_for_every_reader);
    tcase_add_test(tc, rcu_recycles_slots_of_exited_threads_during_grace_periods);
    tcase_add_test(tc, rcu_without_membarrier_the_readers_fence_themselves);
#if !defined(__SANITIZE_THREAD__)
    /* ThreadSanitizer supports no fork of a threaded process: its child
     * now and then dies of a report about the threads it does not have */
    tcase_add_test(tc, rcu_a_forked_child_has_grace_periods);
#endif
    suite_add_tcase(s, tc);
    return kt_run(s);
}
