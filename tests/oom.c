/* tests/oom.c — the failing allocator and the sweep of tests/oom.h. */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "oom.h"

/* ---- the failing allocator ---- */

atomic_long live, allocs, fail_at, failures;
__thread long failures_here;
bool persist;
__thread int in_call;
__thread bool failing;

static bool fail_now(void)
{
    long n = atomic_fetch_add(&allocs, 1) + 1;
    if (n == atomic_load(&fail_at))
        failing = persist && in_call;
    else if (!failing)
        return false;
    atomic_fetch_add(&failures, 1);
    failures_here++;
    return true;
}

static void *oom_malloc(size_t n)
{
    void *p = fail_now() ? NULL : malloc(n);
    if (p)
        atomic_fetch_add(&live, 1);
    return p;
}

static void *oom_calloc(size_t n, size_t size)
{
    void *p = fail_now() ? NULL : calloc(n, size);
    if (p)
        atomic_fetch_add(&live, 1);
    return p;
}

/* A failing realloc leaves the old block alone, as realloc does. */
static void *oom_realloc(void *old, size_t n)
{
    void *p = fail_now() ? NULL : realloc(old, n);
    if (p && !old)
        atomic_fetch_add(&live, 1);
    return p;
}

static void oom_free(void *p)
{
    if (p)
        atomic_fetch_sub(&live, 1);
    free(p);
}

int oom_install(void)
{
    static const keel_allocator a = {oom_malloc, oom_calloc, oom_realloc, oom_free};
    return keel_set_allocator(&a);
}

/* ---- the sweep ---- */

const char *scenario;
long run_n;

const char *oom_msg(const char *fmt, ...)
{
    static __thread char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

bool settle(int line, const char *call, int rc, int want, bool met, bool copes, int attempt)
{
    if (met && copes && rc == want)
        return true;
    if (met) {
        oom_assert(rc == KEEL_ENOMEM, "line %d: %s met the failure and returned %s, not KEEL_ENOMEM",
                   line, call, keel_err_name(rc));
        oom_assert(attempt == 0, "line %d: %s failed twice", line, call);
        return false;
    }
    oom_assert(rc == want, "line %d: %s returned %s, not %s", line, call, keel_err_name(rc),
               keel_err_name(want));
    return true;
}

/* Runs fn with allocation 1, 2, 3... failing, until a run reaches none;
 * each run must give back all it took. */
static void sweep_pass(const char *name, void (*fn)(void))
{
    for (long n = 1;; n++) {
        long before = atomic_load(&live);
        run_n = n;
        atomic_store(&allocs, 0);
        atomic_store(&failures, 0);
        atomic_store(&fail_at, n);
        fn();
        atomic_store(&fail_at, 0);
        long leaked = atomic_load(&live) - before;
        oom_assert(leaked == 0, "%ld blocks leaked", leaked);
        if (atomic_load(&failures) == 0) {
            if (getenv("OOM_DEBUG")) /* how long each sweep is, for keeping them short */
                fprintf(stderr, "%s%s: %ld runs\n", name, persist ? " (persisting)" : "", n);
            break;
        }
        oom_assert(n < 100000, "the sweep does not end");
    }
}

void sweep(const char *name, void (*fn)(void))
{
    scenario = name;
    run_n = 0;
    persist = false;
    atomic_store(&fail_at, 0);
    fn();
    sweep_pass(name, fn);
    persist = true;
    sweep_pass(name, fn);
}

keel_metrics *registry(bool with)
{
    keel_metrics *m = NULL;
    if (with)
        CALL(0, keel_metrics_create(&m, NULL));
    return m;
}

int oom_load_account(keel_cqrs_ctx *x, const void *payload, size_t len, char stream[64], size_t *n)
{
    snprintf(stream, 64, "acct-%.*s", (int)len, (const char *)payload);
    const keel_cqrs_event *evs;
    return keel_cqrs_load(x, stream, &evs, n);
}

int oom_open_account(keel_cqrs_ctx *x, const void *payload, size_t len, void *ud)
{
    (void)ud;
    char stream[64];
    size_t n;
    int rc = oom_load_account(x, payload, len, stream, &n);
    if (rc)
        return rc;
    if (n)
        return KEEL_EEXIST;
    if ((rc = keel_cqrs_emit(x, stream, "account.opened", payload, len, "m", 1)))
        return rc;
    return keel_cqrs_reply(x, stream, strlen(stream));
}

int oom_cache_loader(const void *key, size_t klen, keel_cache_load *ld, void *ud)
{
    (void)ud;
    if (klen >= 6 && memcmp((const char *)key + klen - 6, "absent", 6) == 0)
        return KEEL_ENOTFOUND;
    char v[80];
    int n = snprintf(v, sizeof v, "loaded:%.*s", (int)klen, (const char *)key);
    return keel_cache_load_set(ld, v, (size_t)n, 0, (const char *[]){"loaded"}, 1);
}

int oom_cache_get(keel_cache *c, const char *key, char *buf, size_t cap)
{
    size_t len = 0;
    int rc;
    CALL_COPES(0, (rc = keel_cache_get(c, key, strlen(key), buf, cap - 1, &len)) == KEEL_ENOTFOUND ? 0 : rc);
    buf[rc ? 0 : len] = '\0';
    return rc;
}
