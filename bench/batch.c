/* bench/batch.c — items per second through keel_batch_add with a trivial
 * handler, 1 and 2 producers, against a mutex + condition variable queue
 * doing the same batching in the same run; and the delay from add to the
 * handler under a linger of 1 ms.
 * Goals (issue 6): at least 20 million items/s with one producer; at least
 * 5x the mutex queue with 2 producers. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#include <keel/batch.h>

#include "bench.h"

#define MAX_ITEMS 256

static _Atomic uint64_t handled;

static int count(void *const *items, size_t n, keel_batch_ctx *ctx, void *ud)
{
    (void)items, (void)ctx, (void)ud;
    atomic_fetch_add_explicit(&handled, n, memory_order_relaxed);
    return 0;
}

/* ---- the baseline: one mutex, two condition variables ----
 * Batches of up to MAX_ITEMS, like keel_batch's, but taken as soon as
 * anything is queued (no linger, no count to wait for): the consumer never
 * waits with items queued, which can only flatter the baseline. */

typedef struct mq {
    pthread_mutex_t mu;
    pthread_cond_t nonempty, nonfull;
    void **buf;
    size_t cap, head, n;
    int closed;
} mq;

static void mq_add(mq *q, void *item)
{
    pthread_mutex_lock(&q->mu);
    while (q->n == q->cap)
        pthread_cond_wait(&q->nonfull, &q->mu);
    q->buf[(q->head + q->n++) % q->cap] = item;
    if (q->n == 1 || q->n == MAX_ITEMS)
        pthread_cond_signal(&q->nonempty);
    pthread_mutex_unlock(&q->mu);
}

static void *mq_consumer(void *arg)
{
    mq *q = arg;
    void *batch[MAX_ITEMS];
    for (;;) {
        pthread_mutex_lock(&q->mu);
        while (q->n == 0 && !q->closed)
            pthread_cond_wait(&q->nonempty, &q->mu);
        if (q->n == 0) {
            pthread_mutex_unlock(&q->mu);
            return NULL;
        }
        size_t k = q->n < MAX_ITEMS ? q->n : MAX_ITEMS;
        for (size_t i = 0; i < k; i++)
            batch[i] = q->buf[(q->head + i) % q->cap];
        q->head = (q->head + k) % q->cap;
        q->n -= k;
        pthread_cond_broadcast(&q->nonfull);
        pthread_mutex_unlock(&q->mu);
        count(batch, k, NULL, NULL);
    }
}

/* ---- producers ---- */

typedef struct job {
    keel_batch *b;
    mq *q;
    uint64_t n;
} job;

static void *produce(void *arg)
{
    job *j = arg;
    for (uint64_t i = 1; i <= j->n; i++) {
        if (j->b)
            keel_batch_add(j->b, (void *)(uintptr_t)i, 8);
        else
            mq_add(j->q, (void *)(uintptr_t)i);
    }
    return NULL;
}

static double keel_rate(int producers, uint64_t per)
{
    keel_batch *b;
    keel_batch_opts o = {.handler = count, .max_items = MAX_ITEMS, .linger_ns = 1000000,
                         .capacity = 65536};
    if (keel_batch_create(&b, &o) != 0)
        return 0;
    job jobs[2] = {{b, NULL, per}, {b, NULL, per}};
    uint64_t t0 = bench_ns();
    bench_threads(producers, produce, jobs, sizeof(job));
    keel_batch_close(b);
    uint64_t ns = bench_ns() - t0;
    keel_batch_destroy(b);
    return (double)(per * (uint64_t)producers) / ((double)ns / 1e9);
}

static double mutex_rate(int producers, uint64_t per)
{
    mq q = {.cap = 65536};
    q.buf = malloc(q.cap * sizeof *q.buf);
    pthread_mutex_init(&q.mu, NULL);
    pthread_cond_init(&q.nonempty, NULL);
    pthread_cond_init(&q.nonfull, NULL);
    pthread_t consumer;
    uint64_t t0 = bench_ns();
    pthread_create(&consumer, NULL, mq_consumer, &q);
    job jobs[2] = {{NULL, &q, per}, {NULL, &q, per}};
    bench_threads(producers, produce, jobs, sizeof(job));
    pthread_mutex_lock(&q.mu);
    q.closed = 1;
    pthread_cond_signal(&q.nonempty);
    pthread_mutex_unlock(&q.mu);
    pthread_join(consumer, NULL);
    uint64_t ns = bench_ns() - t0;
    free(q.buf);
    return (double)(per * (uint64_t)producers) / ((double)ns / 1e9);
}

/* ---- delay under linger ---- */

static uint64_t *delays;
static _Atomic size_t ndelays;

static int measure(void *const *items, size_t n, keel_batch_ctx *ctx, void *ud)
{
    (void)ctx, (void)ud;
    uint64_t now = bench_ns();
    for (size_t i = 0; i < n; i++)
        delays[atomic_fetch_add(&ndelays, 1)] = now - *(const uint64_t *)items[i];
    return 0;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static void linger_delays(uint64_t n)
{
    keel_batch *b;
    keel_batch_opts o = {.handler = measure, .max_items = MAX_ITEMS, .linger_ns = 1000000};
    uint64_t *stamps = malloc(n * sizeof *stamps);
    delays = malloc(n * sizeof *delays);
    if (!stamps || !delays || keel_batch_create(&b, &o) != 0)
        return;
    for (uint64_t i = 0; i < n; i++) { /* 20,000 items/s: batches close by linger */
        stamps[i] = bench_ns();
        keel_batch_add(b, &stamps[i], 8);
        uint64_t next = stamps[i] + 50000;
        while (bench_ns() < next)
            ;
    }
    keel_batch_close(b);
    keel_batch_destroy(b);
    size_t m = atomic_load(&ndelays);
    qsort(delays, m, sizeof *delays, cmp_u64);
    printf("%-44s p50 %8.3f ms   p99 %8.3f ms   (%zu items at 20k/s; linger 1 ms)\n",
           "delay from add to the handler", (double)delays[m / 2] / 1e6,
           (double)delays[m * 99 / 100] / 1e6, m);
    free(stamps);
    free(delays);
}

int main(void)
{
    uint64_t per = bench_iters(20000000);
    bench_section("batch: items per second through add, trivial handler, vs a mutex+condvar queue");
    for (int p = 1; p <= 2; p++) {
        double base = mutex_rate(p, per / (uint64_t)p);
        double rate = keel_rate(p, per / (uint64_t)p);
        char what[64];
        snprintf(what, sizeof what, "keel_batch, %d producer%s", p, p > 1 ? "s" : "");
        bench_row(what, rate / 1e6, "M/s", "mutex queue", base / 1e6,
                  p == 1 ? ">= 20 M/s" : ">= 5x the mutex queue");
    }
    linger_delays(bench_iters(40000) < 400 ? 400 : bench_iters(40000));
    return 0;
}
