/* tests/oom.h — what the out-of-memory sweeps share (tests/test_oom.c,
 * in process; tests/test_oom_servers.c, against the servers): an
 * allocator that fails the Nth allocation, the sweep that runs a scenario
 * with N = 1, 2, 3... and the CALL() macros that judge what each call
 * returned. See tests/test_oom.c for how a sweep goes. */
#ifndef KEEL_TEST_OOM_H
#define KEEL_TEST_OOM_H

#include <stdatomic.h>
#include <stdbool.h>

#include <keel/cache.h>
#include <keel/common.h>
#include <keel/cqrs.h>
#include <keel/metrics.h>

#include "harness.h"

/* ---- the failing allocator ---- */

extern atomic_long live;     /* blocks allocated and not yet freed */
extern atomic_long allocs;   /* malloc, calloc and realloc calls in this run */
extern atomic_long fail_at;  /* the call that fails (1-based); 0 = none */
extern atomic_long failures; /* injected failures in this run, in any thread */
extern __thread long failures_here; /* ... in the calling thread */
/* The second pass of a sweep: once allocation fail_at has failed in a
 * call made by CALL() below, every later allocation of that thread fails
 * too until the call returns, so that the paths that clean up after a
 * failure run without memory as well. */
extern bool persist;
extern __thread int in_call;  /* CALL()s under way in this thread */
extern __thread bool failing; /* this thread's call met the failure: persist */

/* Installs the allocator: before any other libkeel call (Check's forks
 * inherit it). Returns keel_set_allocator()'s result. */
int oom_install(void);

/* ---- the sweep ---- */

extern const char *scenario; /* for the messages */
extern long run_n;           /* the allocation failing in this run */

/* A check whose message names the scenario and the failing allocation. */
#define oom_assert(cond, ...)                                                                      \
    do {                                                                                           \
        if (!(cond))                                                                               \
            ck_abort_msg("%s, allocation %ld failing%s: %s", scenario, run_n,                      \
                         persist ? " (and every later one of its call)" : "", oom_msg(__VA_ARGS__)); \
    } while (0)

const char *oom_msg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* What a call returned, once it is known whether it met the failure: true
 * when the caller may go on; false when it met the failure and said so,
 * and is to be made again. A call that met the failure and returned
 * anything but KEEL_ENOMEM hid it; one that did not and returned
 * KEEL_ENOMEM invented it. */
bool settle(int line, const char *call, int rc, int want, bool met, bool copes, int attempt);

/* Makes a call that may meet the failure, and again when it said it did.
 * copes: the call may also do without the memory (a cache it could not
 * make) and succeed; only where the module documents it. after_fail: a
 * statement that checks what a failed call left, before the call is made
 * again. The failure counts as met when the calling thread met it, or
 * (`anywhere`) any thread did: for a call that waits for a thread of its
 * own to do the work, while no other thread allocates. */
#define CALL_IN(anywhere, copes, want, expr, after_fail)                                           \
    do {                                                                                           \
        for (int attempt_ = 0;; attempt_++) {                                                      \
            long seen_ = failures_here, all_ = atomic_load(&failures);                             \
            in_call++;                                                                             \
            int rc_ = (expr);                                                                      \
            if (--in_call == 0)                                                                    \
                failing = false;                                                                   \
            bool met_ = failures_here != seen_ || ((anywhere) && atomic_load(&failures) != all_);  \
            if (settle(__LINE__, #expr, rc_, (want), met_, (copes), attempt_))                     \
                break;                                                                             \
            after_fail;                                                                            \
        }                                                                                          \
    } while (0)
#define CALL_(copes, want, expr, after_fail) CALL_IN(false, copes, want, expr, after_fail)
#define CALL(want, expr) CALL_(false, want, expr, (void)0)
#define CALL_COPES(want, expr) CALL_(true, want, expr, (void)0)
#define CALL_THEN(want, expr, after_fail) CALL_(false, want, expr, after_fail)
/* For CALL(), a call that answers NULL when it cannot allocate. */
#define PTR_RC(ptr, expr) (((ptr) = (expr)) ? 0 : KEEL_ENOMEM)

/* Runs fn once without failures (it makes what lives as long as the
 * process: a thread's RCU reader slot), then with allocation 1, 2, 3...
 * failing until a run reaches none, then again with the failures
 * persisting in their calls. Each run must give back all it took. */
void sweep(const char *name, void (*fn)(void));

/* ---- what scenarios of both files use ---- */

/* A registry for the modules to report to, or none. */
keel_metrics *registry(bool with);

/* In a command, loads the stream "acct-<payload>": its name into stream,
 * its number of events into *n. Returns keel_cqrs_load()'s result. */
int oom_load_account(keel_cqrs_ctx *x, const void *payload, size_t len, char stream[64], size_t *n);

/* A command: opens the stream "acct-<payload>" with one event and
 * replies its name; KEEL_EEXIST when it is open already. It passes on
 * what the context calls return, as handlers should. */
int oom_open_account(keel_cqrs_ctx *x, const void *payload, size_t len, void *ud);

/* A loader: a key that ends in "absent" is absent; any other loads as
 * "loaded:<key>", tagged "loaded". */
int oom_cache_loader(const void *key, size_t klen, keel_cache_load *ld, void *ud);

/* A get, through CALL_COPES(): the value (NUL-terminated in buf), or the
 * error. Copes: a get may meet the failure where it only fills L1 (or a
 * tier above the one that answered) and do without; and a tier that
 * fails for want of memory is a miss there, as a tier that is down. */
int oom_cache_get(keel_cache *c, const char *key, char *buf, size_t cap);

#endif
