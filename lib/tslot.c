/* lib/tslot.c — per-thread data tables (lib/tslot.h). */
#define _GNU_SOURCE
#include <pthread.h>
#include <string.h>

#include "tslot.h"

__thread keel__ttable *keel__tt __attribute__((tls_model("initial-exec")));
__thread keel__tlast keel__tl_last __attribute__((tls_model("initial-exec")));

static pthread_mutex_t reg_mu = PTHREAD_MUTEX_INITIALIZER;
static keel__towner **reg;
static size_t reg_cap, reg_live;
static uint64_t reg_gen;
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
static pthread_key_t exit_key;
static pthread_once_t exit_once = PTHREAD_ONCE_INIT;
static bool exit_key_ok;

static void thread_exit(void *arg)
{
    keel__ttable *t = arg;
    keel__tl_last = (keel__tlast){0};
    pthread_mutex_lock(&reg_mu);
    for (size_t i = 0; i < t->cap; i++) {
        keel__tentry *e = &t->e[i];
        if (!e->data)
            continue;
        keel__towner *o = i < reg_cap ? reg[i] : NULL;
        if (o && o->gen == e->gen)
            o->thread_exit(o, e->data);
        else
            e->free_fn(e->data);
    }
    pthread_mutex_unlock(&reg_mu);
    keel__free(t->e);
    keel__free(t);
    keel__tt = NULL;
}

static void exit_key_create(void) { exit_key_ok = pthread_key_create(&exit_key, thread_exit) == 0; }

static void table_free_if_empty(keel__ttable *t)
{
    if (t->used == 0) {
        pthread_setspecific(exit_key, NULL);
        keel__free(t->e);
        keel__free(t);
        keel__tt = NULL;
    }
}

int keel__tslot_set(keel__towner *o, void *data, void (*free_fn)(void *))
{
    keel__ttable *t = keel__tt;
    keel__tl_last = (keel__tlast){0};
    if (!t) {
        pthread_once(&exit_once, exit_key_create);
        if (!exit_key_ok || !(t = keel__calloc(1, sizeof *t)))
            return KEEL_ENOMEM;
        if (pthread_setspecific(exit_key, t) != 0) {
            keel__free(t);
            return KEEL_ENOMEM;
        }
        keel__tt = t;
    }
    if (o->id >= t->cap) {
        size_t ncap = t->cap ? t->cap : 8;
        while (ncap <= o->id)
            ncap *= 2;
        keel__tentry *n = keel__realloc(t->e, ncap * sizeof *n);
        if (!n) {
            table_free_if_empty(t);
            return KEEL_ENOMEM;
        }
        memset(n + t->cap, 0, (ncap - t->cap) * sizeof *n);
        t->e = n;
        t->cap = ncap;
    }
    keel__tentry *e = &t->e[o->id];
    if (e->data) /* stale: its owner died and the id was reused */
        e->free_fn(e->data);
    else
        t->used++;
    *e = (keel__tentry){data, o->gen, free_fn};
    return 0;
}

void keel__tslot_drop(keel__towner *o)
{
    keel__ttable *t = keel__tt;
    keel__tl_last = (keel__tlast){0};
    if (!t || o->id >= t->cap || !t->e[o->id].data || t->e[o->id].gen != o->gen)
        return;
    t->e[o->id].free_fn(t->e[o->id].data);
    t->e[o->id] = (keel__tentry){NULL, 0, NULL};
    t->used--;
    table_free_if_empty(t);
}

/* A fork while another thread exits (which holds reg_mu while it hands
 * its data back) would leave reg_mu held for good in the child, and the
 * child's first pool, batch or registry would wait for ever. Under reg_mu
 * only the owners' own locks are taken, none of them around a fork. */
static void before_fork(void) { pthread_mutex_lock(&reg_mu); }
static void after_fork(void) { pthread_mutex_unlock(&reg_mu); }
static void watch_forks(void) { pthread_atfork(before_fork, after_fork, after_fork); }

int keel__towner_register(keel__towner *o)
{
    pthread_once(&fork_once, watch_forks); /* nothing takes reg_mu before this */
    pthread_mutex_lock(&reg_mu);
    size_t id = 0;
    while (id < reg_cap && reg[id])
        id++;
    if (id == reg_cap) {
        size_t ncap = reg_cap ? reg_cap * 2 : 16;
        keel__towner **n = keel__realloc(reg, ncap * sizeof *n);
        if (!n) {
            pthread_mutex_unlock(&reg_mu);
            return KEEL_ENOMEM;
        }
        memset(n + reg_cap, 0, (ncap - reg_cap) * sizeof *n);
        reg = n;
        reg_cap = ncap;
    }
    reg[id] = o;
    reg_live++;
    o->id = id;
    o->gen = ++reg_gen;
    pthread_mutex_unlock(&reg_mu);
    return 0;
}

void keel__towner_unregister(keel__towner *o, void (*detach)(void *ud), void *ud)
{
    pthread_mutex_lock(&reg_mu);
    reg[o->id] = NULL;
    if (--reg_live == 0) { /* nothing global stays allocated */
        keel__free(reg);
        reg = NULL;
        reg_cap = 0;
    }
    if (detach)
        detach(ud);
    pthread_mutex_unlock(&reg_mu);
}
