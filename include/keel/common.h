/* keel/common.h — what every libkeel module shares: error codes, allocator
 * hooks, the clock, and the logging hook.
 *
 * Conventions that hold for the whole library (see keel(7)):
 *  - a function that can fail returns int: 0 on success, a negative KEEL_E*
 *    code otherwise; keel_strerror() and keel_err_name() describe a code;
 *  - handles are opaque and safe to use from many threads at once unless the
 *    module's header says otherwise;
 *  - options structs are zero-initialised by the caller; zero selects the
 *    documented default;
 *  - keys and values are bytes (pointer + length), never NUL-terminated by
 *    assumption.
 */
#ifndef KEEL_COMMON_H
#define KEEL_COMMON_H

#include <stddef.h>
#include <stdint.h>

#include <keel/version.h> /* KEEL_API */

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Error codes -------------------------------------------------------
 *
 * One list generates the enum, the messages and the names. The numbers are
 * part of the ABI: new codes are appended, never renumbered.
 */
#define KEEL_ERRNO_MAP(XX)                                                     \
    XX(EINVAL, -1, "invalid argument")                                         \
    XX(ENOMEM, -2, "out of memory")                                            \
    XX(ETIMEDOUT, -3, "timed out")                                             \
    XX(EUNAVAIL, -4, "service unavailable")                                    \
    XX(EBACKEND, -5, "backend error")                                          \
    XX(EEXIST, -6, "already exists")                                           \
    XX(ENOTFOUND, -7, "not found")                                             \
    XX(EFULL, -8, "queue or pool full")                                        \
    XX(ECLOSED, -9, "handle closed")                                           \
    XX(ECONFLICT, -10, "concurrent modification conflict")                    \
    XX(EBUSY, -11, "resource busy")                                            \
    XX(ERANGE, -12, "value out of range or buffer too small")                 \
    XX(ENOTSUP, -13, "operation not supported")                                \
    XX(EPROTO, -14, "protocol error")                                          \
    XX(ESTATE, -15, "operation not allowed in the current state")              \
    XX(ELIMIT, -16, "limit reached")                                           \
    XX(EABORTED, -17, "aborted with its batch")

typedef enum keel_err {
    KEEL_OK = 0,
#define KEEL__ERR_ENUM(name, code, msg) KEEL_##name = (code),
    KEEL_ERRNO_MAP(KEEL__ERR_ENUM)
#undef KEEL__ERR_ENUM
} keel_err;

/* A human-readable message for an error code ("invalid argument").
 * Returns a static string for every input, including 0 ("success") and
 * codes it does not know ("unknown error"). Thread-safe. */
KEEL_API const char *keel_strerror(int code);

/* The symbolic name of an error code ("KEEL_EINVAL"). Returns a static
 * string for every input: "KEEL_OK" for 0, "KEEL_EUNKNOWN" for codes it
 * does not know. Thread-safe. */
KEEL_API const char *keel_err_name(int code);

/* ---- Allocator hooks ---------------------------------------------------
 *
 * Every byte libkeel allocates goes through these four functions (the
 * backends' own libraries, hiredis and libpq, keep their own allocators).
 * They behave like malloc, calloc, realloc and free, must be thread-safe,
 * and must return memory aligned for any object (alignof(max_align_t)).
 */
typedef struct keel_allocator {
    void *(*malloc_fn)(size_t size);
    void *(*calloc_fn)(size_t n, size_t size);
    void *(*realloc_fn)(void *ptr, size_t size);
    void (*free_fn)(void *ptr);
} keel_allocator;

/* Frees memory that a libkeel function returned for the caller to free
 * (its page says so), through the current allocator. NULL is a no-op. */
KEEL_API void keel_free(void *ptr);

/* Replaces the allocator. Call once, before any other libkeel call: memory
 * allocated before the switch would be freed by the new free_fn. NULL
 * restores malloc/calloc/realloc/free. Returns 0, or KEEL_EINVAL when one
 * of the four functions is NULL. Not thread-safe. */
KEEL_API int keel_set_allocator(const keel_allocator *a);

/* ---- Clock -------------------------------------------------------------
 *
 * Modules read time from a clock their options can replace, so TTLs,
 * windows and timeouts are testable without sleeping. A clock returns
 * monotonic nanoseconds (any fixed origin) and must never go backwards.
 * It may be called from many threads at once.
 */
typedef uint64_t (*keel_clock_fn)(void *ud);

/* CLOCK_MONOTONIC in nanoseconds: the default clock. Thread-safe. */
KEEL_API uint64_t keel_now_ns(void);

/* Wall-clock time (CLOCK_REALTIME) in nanoseconds since the Unix epoch, for
 * values that leave the process (timestamps, HTTP headers). Thread-safe. */
KEEL_API uint64_t keel_wall_ns(void);

/* ---- Metrics ----------------------------------------------------------
 *
 * Every module's options take an optional registry (keel/metrics.h) and a
 * name for the instance; given one, the module reports its statistics
 * there as Prometheus series labelled with that name. The registry must
 * outlive the module.
 */
typedef struct keel_metrics keel_metrics;

/* ---- Random numbers ----------------------------------------------------
 *
 * Jitter, random peer choice and sampling take their numbers from a source
 * the options can replace, so tests can script them. A source returns 64
 * uniformly random bits and may be called from many threads at once.
 */
typedef uint64_t (*keel_rand_fn)(void *ud);

/* The default source: a per-thread xoshiro256** generator seeded from the
 * kernel (getrandom) on first use in each thread, and again in a forked
 * child (which would otherwise repeat its parent's numbers). Not for
 * cryptography. Thread-safe, lock-free. ud is ignored. */
KEEL_API uint64_t keel_rand_u64(void *ud);

/* ---- Logging -----------------------------------------------------------
 *
 * libkeel prints nothing on its own. Messages from backends (a Redis error
 * reply, a PostgreSQL notice, a node marked down) and from debug checks
 * (a double release in a debug pool) go to one process-wide hook.
 */
typedef enum keel_log_level {
    KEEL_LOG_ERROR = 0,
    KEEL_LOG_WARN = 1,
    KEEL_LOG_INFO = 2,
    KEEL_LOG_DEBUG = 3
} keel_log_level;

/* module: "pool", "redis", ...; msg: one line without a newline. Both are
 * valid only during the call. The hook may be called from any thread,
 * including libkeel's own background threads, and must not call back into
 * the module that logged. */
typedef void (*keel_log_fn)(keel_log_level level, const char *module,
                            const char *msg, void *ud);

/* Installs the hook and the most verbose level passed to it. NULL silences
 * logging (the default). Thread-safe, but a message already being delivered
 * may still reach the previous hook. */
KEEL_API void keel_set_log(keel_log_fn fn, keel_log_level max_level, void *ud);

/* A ready-made hook that writes "keel[module] LEVEL: msg" lines to stderr. */
KEEL_API void keel_log_stderr(keel_log_level level, const char *module,
                              const char *msg, void *ud);

/* The name of a level ("error", "warn", "info", "debug"); static string. */
KEEL_API const char *keel_log_level_name(keel_log_level level);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_COMMON_H */
