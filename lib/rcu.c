/* lib/rcu.c — grace periods for lib/rcu.h. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>

#include "rcu.h"

_Atomic uint64_t keel__rcu_gp = 1;
__thread keel__rcu_slot *keel__rcu_self __attribute__((tls_model("initial-exec")));

static _Atomic(keel__rcu_slot *) slots;
static keel__rcu_slot reserve[KEEL__RCU_RESERVE];
static atomic_uint reserved; /* reserve slots taken (they are recycled as any) */
static pthread_mutex_t sync_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_key_t exit_key;
static pthread_once_t exit_once = PTHREAD_ONCE_INIT;

static void slot_release(void *arg)
{
    keel__rcu_slot *s = arg;
    s->nest = 0;
    atomic_store_explicit(&s->ctr, 0, memory_order_release);
    atomic_store_explicit(&s->in_use, 0, memory_order_release);
    keel__rcu_self = NULL;
}

static bool exit_key_ok;

/* In a child of fork() only the forking thread lives on: the slots of the
 * others would hold grace periods back forever, and so would a writer's
 * hold on sync_mu, which the fork waits for (no read section forks). */
static void before_fork(void) { pthread_mutex_lock(&sync_mu); }
static void after_fork_parent(void) { pthread_mutex_unlock(&sync_mu); }

static void after_fork_child(void)
{
    for (keel__rcu_slot *s = atomic_load(&slots); s; s = s->next)
        if (s != keel__rcu_self) {
            atomic_store(&s->ctr, 0);
            atomic_store(&s->in_use, 0);
        }
    pthread_mutex_unlock(&sync_mu);
}

static void exit_key_create(void)
{
    exit_key_ok = pthread_key_create(&exit_key, slot_release) == 0;
    pthread_atfork(before_fork, after_fork_parent, after_fork_child);
    keel__fences_init();
}

/* A slot for the list: allocated, else one of the reserve's. */
static keel__rcu_slot *new_slot(void)
{
    keel__rcu_slot *s = keel__calloc(1, sizeof *s);
    if (s)
        return s;
    unsigned i = atomic_load(&reserved);
    do
        if (i == KEEL__RCU_RESERVE)
            return NULL;
    while (!atomic_compare_exchange_weak(&reserved, &i, i + 1));
    return &reserve[i];
}

int keel__rcu_register(void)
{
    pthread_once(&exit_once, exit_key_create);
    if (!exit_key_ok) /* without the key a slot would never come back */
        return KEEL_ENOMEM;
    keel__rcu_slot *s;
    /* A slot left by an exited thread first. */
    for (s = atomic_load_explicit(&slots, memory_order_acquire); s; s = s->next) {
        int free_slot = 0;
        if (atomic_load_explicit(&s->in_use, memory_order_relaxed) == 0 &&
            atomic_compare_exchange_strong(&s->in_use, &free_slot, 1))
            break;
    }
    if (!s) {
        if (!(s = new_slot()))
            return KEEL_ENOMEM;
        atomic_init(&s->in_use, 1);
        keel__rcu_slot *head = atomic_load_explicit(&slots, memory_order_relaxed);
        do
            s->next = head;
        while (!atomic_compare_exchange_weak_explicit(&slots, &head, s, memory_order_release,
                                                      memory_order_relaxed));
    }
    s->nest = 0;
    if (pthread_setspecific(exit_key, s) != 0) {
        atomic_store(&s->in_use, 0);
        return KEEL_ENOMEM;
    }
    keel__rcu_self = s;
    return 0;
}

void keel__rcu_synchronize(void)
{
    pthread_once(&exit_once, exit_key_create); /* the fences, the fork handlers */
    pthread_mutex_lock(&sync_mu);
    /* Readers that entered before this increment hold an older number. */
    uint64_t gp = atomic_fetch_add(&keel__rcu_gp, 1) + 1;
    keel__heavy_fence();
    for (keel__rcu_slot *s = atomic_load_explicit(&slots, memory_order_acquire); s; s = s->next) {
        for (;;) {
            uint64_t c = atomic_load_explicit(&s->ctr, memory_order_acquire);
            if (c == 0 || c >= gp)
                break;
            sched_yield();
        }
    }
    pthread_mutex_unlock(&sync_mu);
}
