/* keel/bus.h — an event bus: publish to subjects, subscribe with NATS
 * wildcards, synchronous or asynchronous delivery with per-subject order,
 * queue groups; and, with a keel_redis, Redis Streams with consumer groups
 * for at-least-once delivery across processes.
 *
 * Subjects are dot-separated tokens ("user.created", "order.eu.paid"): at
 * most 1024 bytes and 64 tokens, no empty token, no space or control
 * character. A subscription pattern may use NATS's wildcards as whole
 * tokens: `*` matches exactly one token, `>` one or more trailing tokens
 * and only as the last token ("foo.>" matches "foo.bar" and "foo.bar.baz",
 * not "foo"). A published subject has no wildcard token. Inside a longer
 * token a wildcard character is a literal ("foo*", in patterns and
 * subjects alike).
 *
 * Matching walks a token trie (literal children hashed), so a publish
 * costs what its matching subscriptions cost, not what all of them do. The
 * trie is read under RCU: publishers take no lock.
 *
 * In process (no redis): KEEL_BUS_SYNC subscribers run in the publisher's
 * thread, in the order they subscribed; KEEL_BUS_ASYNC subscribers run in
 * worker threads, and each receives the messages of one subject in the
 * order they were published (a subject always goes to the same worker).
 * Async messages wait in a bounded queue per worker, with keel_batch's
 * policies when full. Subscribers that share a queue group split the
 * messages: each message that matches members of a group goes to one
 * member (round robin). Members may mix sync and async; the one chosen
 * runs as its mode says. An async member unsubscribed with deliveries
 * still queued for it does not lose them for the group: each goes, when
 * the worker reaches it, to another member that matches its subject
 * (picked then, round robin; it may have joined after the publish) and
 * runs in that worker thread, whatever that member's mode: an async
 * member gets it where it stood in the queue, so in publish order with
 * the subject's other messages to it; a sync member gets it after those
 * it ran itself at their publish. With no member left the delivery is
 * dropped: counted as dropped and passed to on_error (sub NULL,
 * KEEL_ENOTFOUND). A group ends with its last member: a later subscriber
 * taking its name starts a new group, which gets none of those. A sync
 * member that a publish chose and that is unsubscribed before its call
 * (racing it) leaves the message to another member too, picked by that
 * publish: a sync one runs it in the publisher's thread, an async one
 * gets it queued like the publish's other async deliveries.
 *
 * With redis: publish appends to a Redis Stream (XADD, approximate MAXLEN
 * trimming); subjects are spread over `partitions` streams by hash, so one
 * subject's entries are stored in order. Two streams may give an entry
 * the same ID (the server's ms, then a sequence per stream), so with
 * several partitions a message's id is the ID, then "-" and the
 * partition. Ids are in time order within a partition, and across
 * partitions only as far as the clocks of the servers holding the
 * streams agree, and not within a millisecond. keel_bus_start() starts one
 * reader thread per partition, consuming through the consumer group
 * `service` as `consumer`: that consumer's own pending entries first (left
 * by a previous run: give a stable consumer name for this to apply), then
 * new ones. A new group starts at the beginning of what the stream holds.
 * An entry is acknowledged (XACK) only once every matching handler
 * returned 0. An entry matching no subscription of the process (or whose
 * matches were all unsubscribed before their calls, racing them) goes by
 * the group's registry, the hash prefix + "subs:" + service: field the
 * consumer, value the Redis server's time in ms at which the field
 * expires, then each pattern after a space. It is written by
 * keel_bus_start() before the readers begin, again each min_idle/2 and
 * before a reader's next read after a subscribe or unsubscribe, lives
 * 3 x min_idle_ns by the server's clock (a killed process's field
 * expires), and is removed by keel_bus_destroy(). If another live
 * consumer of `service` has a matching pattern, the entry is handed back
 * to the group for it: left pending, its delivery count put back and its
 * idle time set to min_idle_ns. Else it is acknowledged unread and
 * counted as skipped (unless another consumer claimed it meanwhile: it
 * stays that consumer's). The registry is read again when the reader's copy
 * is min_idle/2 old, and before skipping an entry less than a second
 * older than the copy unless the copy was read after the entry; one that
 * cannot be read means handing back, never skipping. A subscription made
 * while started may miss entries other consumers read before its reader
 * writes it (within one read, block_ns). Entries left pending longer
 * than min_idle_ns (a consumer that died, a handler that failed, or a
 * batch of read_count entries that took longer than that to handle: keep
 * it well below) and matching a subscription of the process (read with
 * XRANGE first, which counts no delivery; others are left untouched when
 * a live consumer of the registry wants them, else skipped) are
 * taken over with XCLAIM and delivered again, out of order; one delivered max_deliveries times goes
 * to the dead-letter stream (prefix + "dead") and is acknowledged, also
 * when its own consumer finds it pending after a restart. An
 * entry trimmed away while pending is acknowledged unread. Handlers run in
 * the reader threads, one entry at a time per partition, whatever their
 * mode; with several consumers in a group, each sees only its share.
 * Queue groups apply among the process's own subscriptions, one member an
 * entry. A member chosen for an entry and unsubscribed before its call
 * (by an earlier handler of the entry, or racing it) leaves the entry to
 * another member of its group, picked then as a publish picks and run in
 * the reader whatever its mode. With no member of the group left in the
 * process the entry is not acknowledged (logged; not counted as dropped or
 * failed, no on_error): it stays pending as after a failure, for any
 * consumer of `service` to claim after min_idle_ns (this one too: it is
 * then delivered again to every matching handler, a new member of the
 * group's name included), and goes to the dead-letter stream once
 * delivered max_deliveries times. A reader that runs out of memory acknowledges what it handled, then does
 * as after a lost connection: reconnects after a backoff (logged) and
 * reads its pending entries again, so delivery is only delayed.
 *
 * Handlers return 0 for success. A failure does not stop other handlers:
 * it is counted and passed to on_error.
 *
 * Thread safety: every function may be called from any thread, including
 * from inside a handler (keel_bus_destroy excepted). Once
 * keel_bus_unsubscribe() returns, that subscription's handler is never
 * called again, its ud may be freed, and the handle is invalid (but inside
 * a call of its handler: see keel_bus_unsubscribe()).
 */
#ifndef KEEL_BUS_H
#define KEEL_BUS_H

#include <keel/common.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct keel_bus keel_bus;
typedef struct keel_bus_sub keel_bus_sub;
struct keel_redis;

#define KEEL_BUS_SUBJECT_MAX 1024
#define KEEL_BUS_ID_MAX 48 /* an id's text, NUL included */

typedef struct keel_bus_header {
    const char *key;   /* C strings */
    const char *value;
} keel_bus_header;

/* A message as a handler sees it; valid during the call only. */
typedef struct keel_bus_msg {
    const char *subject; /* NUL-terminated */
    size_t subject_len;
    const void *data;
    size_t len;
    const keel_bus_header *headers;
    size_t nheaders;
    const char *id;      /* "ms-seq", time-ordered, unique in the process; with Redis, unique in
                            the streams of a prefix: the entry's ID, then "-" and the partition
                            when there are several ("ms-seq-p"; see the top) */
    uint64_t time_ns;    /* wall-clock time of the publish in whole milliseconds, the id's
                            (in id order it never goes back, but after the clock stepped
                            back); in process as of the kernel tick (1-10 ms:
                            CLOCK_REALTIME_COARSE) */
} keel_bus_msg;

typedef int (*keel_bus_handler)(const keel_bus_msg *msg, void *ud);

typedef enum keel_bus_mode { KEEL_BUS_SYNC = 0, KEEL_BUS_ASYNC = 1 } keel_bus_mode;

/* What an async publish does when a worker's queue is full (keel_batch's
 * policies). */
typedef enum keel_bus_full {
    KEEL_BUS_BLOCK = 0,      /* wait, at most block_timeout_ns a publish, then KEEL_ETIMEDOUT;
                                from a handler (a worker or reader thread), which
                                may be the one to make room: KEEL_EFULL at once */
    KEEL_BUS_REJECT = 1,     /* KEEL_EFULL at once */
    KEEL_BUS_DROP_OLDEST = 2 /* the oldest queued delivery goes to on_error (KEEL_EFULL): sub
                                NULL for a queue group's whose member left; one for another
                                subscription that left is only skipped, not counted */
} keel_bus_full;

typedef struct keel_bus_opts {
    size_t workers;                 /* async workers; 0 = 2 */
    size_t capacity;                /* queued async deliveries per worker; 0 = 65536, up to 2^32;
                                       rounded up to a power of two, at least 2;
                                       32 bytes each, from the first async subscription;
                                       a worker also holds up to 64 it has taken to run,
                                       which neither count here nor can be dropped */
    keel_bus_full on_full;
    uint64_t block_timeout_ns;      /* KEEL_BUS_BLOCK: 0 = no limit */
    /* A handler failed (err: its return), or a delivery was dropped
     * (KEEL_EFULL); sub is NULL for a queue group's delivery whose member
     * left and that no other member could take (in process: err
     * KEEL_ENOTFOUND, or KEEL_ENOMEM: no memory to re-route it; a stream
     * entry stays pending instead) or that KEEL_BUS_DROP_OLDEST dropped
     * (KEEL_EFULL), and for an entry moved to
     * the dead-letter stream (err KEEL_ELIMIT). Runs where the event
     * happened. */
    void (*on_error)(keel_bus_sub *sub, const keel_bus_msg *msg, int err, void *ud);
    void *ud;
    /* Redis Streams */
    struct keel_redis *redis;       /* NULL: in process */
    const char *service;            /* the consumer group; required to consume */
    const char *consumer;           /* NULL = "<hostname>-<pid>"; a stable name lets a
                                       restarted process read its own pending
                                       entries at once, not after min_idle */
    const char *prefix;             /* stream names; NULL = "keel:bus:"; up to 292 bytes */
    size_t partitions;              /* streams; 0 = 1, at most 64 */
    size_t maxlen;                  /* approximate trimming; 0 = 1,000,000 */
    uint64_t min_idle_ns;           /* before a pending entry is taken over; 0 = 30 s */
    uint32_t max_deliveries;        /* before the dead-letter stream; 0 = 5 */
    uint64_t block_ns;              /* a read's wait for new entries; 0 = 200 ms
                                       (also how long a stop may wait) */
    size_t read_count;              /* entries per read; 0 = 100, at most 100,000 */
    keel_metrics *metrics;          /* keel_bus_* series; may be NULL */
    const char *metrics_name; /* "default" if NULL; taken twice in one registry: KEEL_EEXIST */
} keel_bus_opts;

/* opts may be NULL (in process, the defaults). Returns 0, KEEL_EINVAL
 * (more than 1024 workers or 64 partitions, an unknown policy, a consumer
 * or service empty or with spaces, an empty prefix, with redis a prefix
 * over 292 bytes (in process it is not used), a read_count over 100,000)
 * or KEEL_ENOMEM. */
KEEL_API int keel_bus_create(keel_bus **out, const keel_bus_opts *opts);

/* Redis: starts consuming (creates the group if needed, MKSTREAM) and
 * registers the subscriptions' patterns in the group's registry. Add the
 * subscriptions first: entries matching none are handed back to the
 * group, or skipped when no consumer of it wants them (see the top).
 * Returns 0, KEEL_ESTATE (no redis or service, or started),
 * KEEL_EUNAVAIL, KEEL_ETIMEDOUT, KEEL_EBACKEND (Redis refused the group or
 * the registry, e.g. the key holds another type), KEEL_EPROTO or
 * KEEL_ENOMEM. */
KEEL_API int keel_bus_start(keel_bus *bus);

typedef struct keel_bus_sub_opts {
    const char *pattern;     /* required */
    keel_bus_handler handler; /* required */
    void *ud;
    keel_bus_mode mode;
    const char *group;       /* a queue group; NULL: none */
} keel_bus_sub_opts;

/* Returns 0, KEEL_EINVAL (NULL arguments, a bad pattern or mode, no
 * handler, an empty group name) or KEEL_ENOMEM. */
KEEL_API int keel_bus_subscribe(keel_bus *bus, const keel_bus_sub_opts *opts, keel_bus_sub **out);

/* Ends a subscription: waits for calls of its handler in other threads to
 * return (not for the caller's own, when called from that handler); its
 * queued async deliveries are skipped (a queue group member's go to the
 * others: see the top). Then the handler is never called
 * again and no on_error names it. Two handlers that unsubscribe each other
 * from two threads at once wait for each other forever. Returns 0,
 * KEEL_EINVAL (NULL, or a subscription already unsubscribed, asked from
 * inside a call of its own handler, which keeps the handle alive until it
 * returns) or KEEL_ESTATE (inside a libkeel read section, where it would
 * wait for itself). Elsewhere the handle is invalid once the first call
 * returns, like a pointer after free(): a second call, or one racing the
 * first from another thread, is a use after free, not KEEL_EINVAL. */
KEEL_API int keel_bus_unsubscribe(keel_bus_sub *sub);

/* Publishes. In process: runs the sync handlers, queues the async ones;
 * returns 0, KEEL_EFULL or KEEL_ETIMEDOUT (an async queue was full; the
 * other deliveries were made), KEEL_ENOMEM (no delivery was made, so the
 * message may be published again). With Redis: appends; 0 only
 * once the entry is in the stream, else KEEL_EUNAVAIL, KEEL_ETIMEDOUT,
 * KEEL_EBACKEND, KEEL_EPROTO or KEEL_ENOMEM. An error does not say that
 * nothing was appended: KEEL_ETIMEDOUT, or a connection lost after the
 * XADD went out (a server stopping: KEEL_EUNAVAIL, KEEL_EPROTO), leaves
 * the outcome unknown, and the entry may be in the stream and be
 * delivered; publishing again is at-least-once. An accepted entry lasts
 * as long as Redis keeps it: a server restarted without persistence
 * loses the entries not yet read. Bad subject or headers (more than 64
 * of them too): KEEL_EINVAL. id (may be NULL) receives the message's id. */
KEEL_API int keel_bus_publish(keel_bus *bus, const char *subject, const void *data, size_t len,
                              const keel_bus_header *headers, size_t nheaders,
                              char id[KEEL_BUS_ID_MAX]);

/* One message of a batch of publishes. */
typedef struct keel_bus_pub {
    const char *subject;
    const void *data;
    size_t len;
    const keel_bus_header *headers;
    size_t nheaders;
    int rc;                     /* out */
    char id[KEEL_BUS_ID_MAX];   /* out */
} keel_bus_pub;

/* Publishes n messages; with Redis in one pipeline. Returns 0 when all
 * went through, else the first failure (see each rc). In process each
 * message is a publish of its own: under KEEL_BUS_BLOCK each may wait
 * block_timeout_ns. */
KEEL_API int keel_bus_publish_many(keel_bus *bus, keel_bus_pub *pubs, size_t n);

/* Waits until every async delivery queued before the call has run (or
 * was dropped), on another group member for one whose member left; with Redis, until each reader has handled its stream's
 * last entry as of the call, or found no new entry in a read begun after
 * it. Returns 0, KEEL_ESTATE from a worker or reader thread, KEEL_EINVAL;
 * with Redis also KEEL_EUNAVAIL (a reader cannot reach it) or the error of
 * asking Redis for the last entry. */
KEEL_API int keel_bus_drain(keel_bus *bus);

/* Stops the readers, runs the queued async deliveries (and those their
 * handlers queue), stops the workers, and frees the bus and its
 * subscriptions. Not from a handler, nor concurrently with other calls.
 * NULL is a no-op. */
KEEL_API void keel_bus_destroy(keel_bus *bus);

typedef struct keel_bus_stats {
    uint64_t published, delivered, failed, dropped, rejected, queued;
    uint64_t acked, claimed, dead_lettered; /* Redis */
    uint64_t skipped; /* Redis: of the acked, entries no consumer of the group subscribes to */
    uint64_t subscriptions;
} keel_bus_stats;

KEEL_API void keel_bus_stats_get(keel_bus *bus, keel_bus_stats *st);

/* Whether subject matches pattern (NATS rules); for tests and tools.
 * Returns 1, 0, or KEEL_EINVAL for an invalid subject or pattern. */
KEEL_API int keel_bus_match(const char *pattern, const char *subject);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_BUS_H */
