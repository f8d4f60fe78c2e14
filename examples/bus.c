/* examples/bus.c — an event bus in one process: subjects with wildcards,
 * a sync audit log, async indexers that split the work as a queue group,
 * a failing handler that does not stop the others, and a drain.
 *
 * No server needed. */
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include <keel/bus.h>

static int audit(const keel_bus_msg *m, void *ud)
{
    (void)ud;
    printf("  audit    %-16s %.*s (id %s)\n", m->subject, (int)m->len, (const char *)m->data, m->id);
    return 0;
}

typedef struct indexer {
    const char *name;
    atomic_int done;
} indexer;

/* Runs in a worker thread; the two indexers share the group "index", so
 * each message reaches one of them. */
static int index_it(const keel_bus_msg *m, void *ud)
{
    (void)m;
    indexer *ix = ud;
    atomic_fetch_add(&ix->done, 1);
    return 0;
}

static int flaky(const keel_bus_msg *m, void *ud)
{
    (void)ud;
    return strstr(m->subject, ".eu.") ? KEEL_EBACKEND : 0; /* pretend the EU mailer is down */
}

static void on_error(keel_bus_sub *sub, const keel_bus_msg *m, int err, void *ud)
{
    (void)sub;
    (void)ud;
    printf("  error    %-16s %s\n", m->subject, keel_err_name(err));
}

int main(void)
{
    keel_bus *bus;
    keel_bus_opts o = {.workers = 2, .on_error = on_error};
    int rc = keel_bus_create(&bus, &o);
    if (rc) {
        fprintf(stderr, "keel_bus_create: %s\n", keel_strerror(rc));
        return 1;
    }
    indexer a = {"a", 0}, b = {"b", 0};
    keel_bus_sub *s;
    keel_bus_sub_opts subs[] = {
        {.pattern = "order.>", .handler = audit},
        {.pattern = "order.*.paid", .handler = flaky},
        {.pattern = ">", .handler = index_it, .ud = &a, .mode = KEEL_BUS_ASYNC, .group = "index"},
        {.pattern = ">", .handler = index_it, .ud = &b, .mode = KEEL_BUS_ASYNC, .group = "index"},
    };
    for (size_t i = 0; i < sizeof subs / sizeof subs[0]; i++)
        if ((rc = keel_bus_subscribe(bus, &subs[i], &s)) != 0) {
            fprintf(stderr, "keel_bus_subscribe %s: %s\n", subs[i].pattern, keel_strerror(rc));
            return 1;
        }

    printf("patterns: order.* matches order.eu? %d; order.> matches order? %d\n",
           keel_bus_match("order.*", "order.eu"), keel_bus_match("order.>", "order"));
    keel_bus_header h[] = {{"trace-id", "4bf92f35"}};
    const char *subjects[] = {"order.us.paid", "order.eu.paid", "order.eu.shipped", "user.created"};
    for (size_t i = 0; i < 4; i++)
        keel_bus_publish(bus, subjects[i], "{...}", 5, h, 1, NULL);
    for (int i = 0; i < 1000; i++)
        keel_bus_publish(bus, "user.login", "u", 1, NULL, 0, NULL);
    printf("  publish  order.*.x: %s (a wildcard is for patterns)\n",
           keel_err_name(keel_bus_publish(bus, "order.*.x", "", 0, NULL, 0, NULL)));

    keel_bus_drain(bus); /* every async delivery queued so far has run */
    keel_bus_stats st;
    keel_bus_stats_get(bus, &st);
    printf("indexers: a %d + b %d = %d of %llu published (one each)\n", atomic_load(&a.done),
           atomic_load(&b.done), atomic_load(&a.done) + atomic_load(&b.done),
           (unsigned long long)st.published);
    printf("stats: delivered %llu, failed %llu\n", (unsigned long long)st.delivered,
           (unsigned long long)st.failed);
    keel_bus_destroy(bus);
    return 0;
}
