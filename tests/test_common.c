/* tests/test_common.c — error codes, allocator hooks, clocks, logging,
 * version. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <keel.h>

#include "harness.h"
#include "internal.h"

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
START_TEST(a_forked_child_draws_other_numbers)
{
    keel_rand_u64(NULL); /* seeded before the fork */
    int fds[2];
    ck_assert_int_eq(pipe(fds), 0);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        uint64_t mine[4];
        for (int i = 0; i < 4; i++)
            mine[i] = keel_rand_u64(NULL);
        _exit(write(fds[1], mine, sizeof mine) == (ssize_t)sizeof mine ? 0 : 1);
    }
    uint64_t ours[4], theirs[4];
    for (int i = 0; i < 4; i++)
        ours[i] = keel_rand_u64(NULL);
    ck_assert_int_eq(read(fds[0], theirs, sizeof theirs), (ssize_t)sizeof theirs);
    int status;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
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
static atomic_bool logging_done;
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
    for (int i = 0; i < 200000 && !atomic_load(&too_verbose); i++)
        keel__log(i % 2 ? KEEL_LOG_DEBUG : KEEL_LOG_ERROR, "test", "line %d of %s", i, "a debug run");
    atomic_store(&logging_done, true);
    return NULL;
}

START_TEST(a_new_hook_gets_nothing_above_its_level)
{
    pthread_t t;
    keel_set_log(chatty_hook, KEEL_LOG_DEBUG, NULL);
    ck_assert_int_eq(pthread_create(&t, NULL, log_debug_lines, NULL), 0);
    while (!atomic_load(&logging_done)) {
        keel_set_log(chatty_hook, KEEL_LOG_DEBUG, NULL);
        keel_set_log(quiet_hook, KEEL_LOG_ERROR, NULL);
    }
    ck_assert_int_eq(pthread_join(t, NULL), 0);
    keel_set_log(NULL, KEEL_LOG_ERROR, NULL);
    ck_assert_int_gt((int)atomic_load(&quiet_calls), 0);
    ck_assert_msg(atomic_load(&too_verbose) == 0, "a hook at KEEL_LOG_ERROR got %d debug lines",
                  (int)atomic_load(&too_verbose));
}
END_TEST

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
    tcase_add_test(tc, a_new_hook_gets_nothing_above_its_level);
    suite_add_tcase(s, tc);
    return kt_run(s);
}
