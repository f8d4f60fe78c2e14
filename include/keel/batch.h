/* keel/batch.h — a batch processor: items added by any number of threads
 * are handed to a handler in batches, flushed by count, bytes or linger;
 * a bounded queue with a policy when full; retries with backoff; a
 * dead-letter callback; and a close that loses nothing.
 *
 * The promise: every accepted item is accounted for. Once closed,
 *   accepted = handled + dead_lettered + dropped
 * exactly, and no item reaches the handler's success path twice.
 *
 * Flow. keel_batch_add() puts an item (an opaque pointer and its size in
 * bytes) into the calling thread's own queue: producers share no cache
 * line per item, take no lock and, once their queue has grown to what
 * they keep queued, allocate nothing. One batcher thread takes items from
 * the threads' queues in turn and closes a batch when it holds max_items,
 * or max_bytes, or when its oldest item has waited linger_ns (measured
 * from the add that opened the batch, or from when the batcher took items
 * that were waiting), or a flush or close asks.
 *
 * Order. Batches are formed in the order of the items: within a batch,
 * one thread's items come in the order that thread added them, and its
 * later items go into the same or a later batch. Items added by
 * different threads interleave in no promised order, even when one add
 * happens before the other (a thread that needs its items handled before
 * another thread's should flush first). With workers = 1 the batcher runs
 * the handler itself, one batch at a time, so one thread's items reach
 * the handler in the order it added them (first attempts: items a handler
 * marks failed are retried after the rest of their batch counted as
 * handled, before the next batch). With workers > 1, batches are queued
 * in the order they were formed and taken by that many threads, which
 * run the handler concurrently: handler calls for different batches may
 * start, as well as finish, in any order, so only the order within a
 * batch is kept; a batch being retried holds up only its own thread.
 *
 * Failures. The handler returns 0 for success. It may mark single items
 * failed with keel_batch_fail(); then only those are retried (and the
 * others count as handled). Without marks, a nonzero return fails the
 * whole batch. Failed items are retried after exponential backoff with
 * full jitter (keel_backoff), up to max_retries times, then handed to
 * dead_letter with the last attempt's nonzero return (KEEL_EBACKEND when
 * that attempt only marked items). With workers = 1 a retry holds up the batches
 * behind it: that is what keeps the order.
 *
 * Full queue (capacity items): KEEL_BATCH_BLOCK waits for room (at most
 * block_timeout_ns, then KEEL_ETIMEDOUT; 0 waits for ever);
 * KEEL_BATCH_REJECT returns KEEL_EFULL at once; KEEL_BATCH_DROP_OLDEST
 * takes the oldest item the adding thread has queued out (its own, not the
 * oldest of the whole queue: another thread's may be older; when it has
 * none queued, the oldest item of the first other thread's queue found
 * holding one, in no promised order of threads), accepts the new one in
 * its place, then hands the dropped one to dead_letter (err KEEL_EFULL,
 * in the adding thread) and counts it as dropped: one drop at most per
 * add, and none for an add that close turns away. A rejected or
 * timed-out item is not accepted: the caller still owns it. The bound is
 * exact: threads reserve room a step at a time (capacity / 64 places, at
 * least 1, at most 256, and at most capacity / (2 * threads that have
 * added)), but an add that finds no room left takes the other threads'
 * unused reserves back (waiting for an add in progress to finish) before
 * the policy applies, so each policy applies only while the queue holds
 * capacity items. Near full, that costs the taking add a fence across the
 * process's threads, and the others one lock each on their next add.
 *
 * Memory. Each thread that adds gets a queue of 4 KiB blocks, grown to
 * what it keeps queued and reused after; when a thread exits its queue
 * goes to the next new thread that adds (its items stay queued, in
 * order). So a batch holds about 16 bytes per item queued, a block per
 * thread that has added, and max_items pointers per batch in flight.
 *
 * Time. linger, backoff and the block timeout read the clock option; with
 * one given (a test's fake clock) the threads, and an add waiting for
 * room, look at it at least every millisecond. A batch full by max_bytes is noticed within a
 * millisecond (producers wake the batcher by count only), and so is one
 * full by count when several threads add. While batches keep filling up,
 * the batcher is not woken by producers at all: it looks every 50
 * microseconds, so that a busy stream of adds pays for no wake-ups.
 *
 * Thread safety: add, flush and stats may be called from any thread,
 * including from the handler (an add from a handler never blocks: with a
 * full queue it behaves as KEEL_BATCH_REJECT, since the batcher it would
 * wait for is the caller; flush and close from a handler give
 * KEEL_ESTATE; destroy from a callback is refused, logged). The same
 * holds wherever a callback of the batch is running in the calling thread,
 * also beneath a callback of another batch (a handler adding to a second
 * batch, whose drop runs its dead letter there). The handler
 * runs in the batch's threads, one batch at a time per thread; dead_letter
 * also runs in adding threads (KEEL_BATCH_DROP_OLDEST), concurrently with
 * the handler and with itself: it must be thread-safe. An add from that
 * dead letter, in the thread whose add dropped the item, returns
 * KEEL_EFULL at once (it would drop another item, for ever).
 */
#ifndef KEEL_BATCH_H
#define KEEL_BATCH_H

#include <keel/common.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct keel_batch keel_batch;
typedef struct keel_batch_ctx keel_batch_ctx;

/* Handles n >= 1 items; returns 0 for success. Called from a batch thread. */
typedef int (*keel_batch_handler)(void *const *items, size_t n, keel_batch_ctx *ctx, void *ud);

/* Receives items that will not be handled: retries spent (err: the
 * handler's last return) or dropped from a full queue (err KEEL_EFULL).
 * The items are the callback's to free. */
typedef void (*keel_batch_dead_letter)(void *const *items, size_t n, int err, void *ud);

typedef enum keel_batch_full {
    KEEL_BATCH_BLOCK = 0,
    KEEL_BATCH_REJECT = 1,
    KEEL_BATCH_DROP_OLDEST = 2
} keel_batch_full;

typedef struct keel_batch_opts {
    keel_batch_handler handler;   /* required */
    keel_batch_dead_letter dead_letter; /* NULL: such items are logged, counted, and dropped */
    void *ud;                     /* for both callbacks */
    size_t max_items;             /* per batch; 0 = 100, or capacity if smaller */
    size_t max_bytes;             /* per batch; 0 = no limit (a bigger item goes alone) */
    uint64_t linger_ns;           /* 0 = 5 ms */
    size_t capacity;              /* queued items, at most; 0 = 65536; up to 2^40 */
    keel_batch_full on_full;
    uint64_t block_timeout_ns;    /* KEEL_BATCH_BLOCK, by the clock option: 0 = no limit */
    size_t workers;               /* handler threads; 0 = 1 (order kept) */
    uint32_t max_retries;         /* retries after the first attempt; 0 = none */
    uint64_t retry_base_ns;       /* 0 = 100 ms */
    uint64_t retry_max_ns;        /* 0 = 10 s */
    keel_clock_fn clock;          /* NULL = keel_now_ns */
    void *clock_ud;
    keel_rand_fn rand;            /* backoff jitter; NULL = keel_rand_u64 */
    void *rand_ud;
    keel_metrics *metrics;        /* keel_batch_* series; may be NULL */
    const char *metrics_name; /* "default" if NULL; taken twice in one registry: KEEL_EEXIST */
} keel_batch_opts;

/* Starts the batcher (and worker) threads. Returns 0, KEEL_EINVAL (no
 * handler, an unknown policy, more than 1024 workers, a capacity over
 * 2^40 or max_items over capacity) or KEEL_ENOMEM (also when the first batch, max_items
 * pointers, cannot be allocated). */
KEEL_API int keel_batch_create(keel_batch **out, const keel_batch_opts *opts);

/* Accepts an item: 0; KEEL_EFULL, KEEL_ETIMEDOUT (full queue, by policy;
 * KEEL_EFULL also from a drop's dead letter, see above); KEEL_ECLOSED
 * once close has begun, whatever else would stand in the way;
 * KEEL_EINVAL for NULL b or item; KEEL_ENOMEM when the thread's queue
 * cannot grow (its first add, or a new block). */
KEEL_API int keel_batch_add(keel_batch *b, void *item, size_t bytes);

/* Returns once every item accepted before the call has been handled,
 * dead-lettered or dropped (batches are closed at once, whatever their
 * linger). 0, or KEEL_ESTATE from a handler or dead-letter callback,
 * KEEL_EINVAL for NULL. */
KEEL_API int keel_batch_flush(keel_batch *b);

/* Refuses new items, flushes everything (retries included), stops the
 * threads. Returns 0, KEEL_ESTATE from a handler or dead-letter callback,
 * KEEL_EINVAL for NULL; closing twice is fine. */
KEEL_API int keel_batch_close(keel_batch *b);

/* Closes if needed and frees. NULL is a no-op; from one of the batch's own
 * callbacks it only logs an error (freeing would pull its thread's floor
 * away). */
KEEL_API void keel_batch_destroy(keel_batch *b);

/* From the handler: item `index` (of this call's items) failed and is to
 * be retried; the others of the batch succeeded. Returns 0 or KEEL_EINVAL
 * for an index out of range. */
KEEL_API int keel_batch_fail(keel_batch_ctx *ctx, size_t index);

/* From the handler: 0 on the first attempt at these items, then 1, 2... */
KEEL_API uint32_t keel_batch_attempt(const keel_batch_ctx *ctx);

/* Distributions as log2 buckets: bucket i counts values v with
 * 2^(i-1) < v <= 2^i (bucket 0: v <= 1). */
#define KEEL_BATCH_BUCKETS 48

typedef struct keel_batch_stats {
    uint64_t accepted, handled, retried, dead_lettered, dropped, batches;
    uint64_t queued;      /* in the queue now */
    uint64_t size[KEEL_BATCH_BUCKETS]; /* items per batch (first attempts) */
    /* ns from a batch's opening to its first handler call, by the clock
     * option. A batch opens at the add of its first item, or, when items
     * were already waiting as the batch before it closed (a full batch, a
     * busy handler), at that close: the time those items spent queued
     * before it is not counted, so under backlog this understates how long
     * items waited since their add. */
    uint64_t wait[KEEL_BATCH_BUCKETS];
} keel_batch_stats;

KEEL_API void keel_batch_stats_get(keel_batch *b, keel_batch_stats *st);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_BATCH_H */
