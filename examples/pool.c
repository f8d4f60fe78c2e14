/* examples/pool.c — worker threads sharing a bounded pool of 4 KiB buffers.
 *
 * Each worker takes a buffer for every job, fills it, checksums it and gives
 * it back. The pool is smaller than the number of buffers the workers would
 * like to hold at once, so some acquires wait for a release; `init` runs
 * only for the buffers actually created, `reset` on every release. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <keel/pool.h>

#define WORKERS 4
#define JOBS 200000
#define BUF 4096

static int buf_init(void *obj, void *ud)
{
    (void)ud;
    memset(obj, 0, BUF); /* pretend this is expensive */
    return 0;
}

static void buf_reset(void *obj, void *ud)
{
    (void)ud;
    ((unsigned char *)obj)[0] = 0; /* cheap: mark the buffer empty */
}

typedef struct worker {
    keel_pool *pool;
    int id;
    uint64_t checksum;
} worker;

static void *work(void *arg)
{
    worker *w = arg;
    for (int job = 0; job < JOBS; job++) {
        void *held[2];
        int n = 1 + (job & 1); /* every other job needs two buffers */
        for (int i = 0; i < n; i++) {
            int rc = keel_pool_acquire_timeout(w->pool, KEEL_POOL_WAIT_FOREVER, &held[i]);
            if (rc != 0) {
                fprintf(stderr, "worker %d: %s\n", w->id, keel_strerror(rc));
                return NULL;
            }
            unsigned char *b = held[i];
            b[0] = (unsigned char)(job + i);
            b[BUF - 1] = (unsigned char)w->id;
            w->checksum += b[0] + b[BUF - 1];
        }
        for (int i = 0; i < n; i++)
            keel_pool_release(w->pool, held[i]);
    }
    return NULL;
}

int main(void)
{
    keel_pool *pool;
    keel_pool_opts opts = {
        .obj_size = BUF,
        .align = 64,
        .capacity = 6, /* four workers wanting up to two each share six */
        .init = buf_init,
        .reset = buf_reset,
    };
    int rc = keel_pool_create(&pool, &opts);
    if (rc != 0) {
        fprintf(stderr, "keel_pool_create: %s\n", keel_strerror(rc));
        return 1;
    }

    pthread_t t[WORKERS];
    worker w[WORKERS];
    for (int i = 0; i < WORKERS; i++) {
        w[i] = (worker){pool, i, 0};
        pthread_create(&t[i], NULL, work, &w[i]);
    }
    uint64_t sum = 0;
    for (int i = 0; i < WORKERS; i++) {
        pthread_join(t[i], NULL);
        sum += w[i].checksum;
    }

    keel_pool_stats st;
    keel_pool_stats_get(pool, &st);
    printf("%d workers ran %d jobs each (checksum %llu)\n", WORKERS, JOBS,
           (unsigned long long)sum);
    printf("buffers created: %llu (capacity %zu), live now: %llu\n",
           (unsigned long long)st.created, opts.capacity, (unsigned long long)st.live);
    printf("acquires from the thread's own magazines: %llu, from the depot: %llu\n",
           (unsigned long long)st.hits, (unsigned long long)st.misses);
    printf("acquires that waited for a release: %llu, idle buffers taken back "
           "from other threads: %llu times\n",
           (unsigned long long)st.waits, (unsigned long long)st.steals);
    printf("slab memory: %llu bytes in %llu slab(s)\n",
           (unsigned long long)st.slab_bytes, (unsigned long long)st.slabs);
    keel_pool_destroy(pool);
    return 0;
}
