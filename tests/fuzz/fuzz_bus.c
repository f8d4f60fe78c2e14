/* tests/fuzz/fuzz_bus.c — subject and pattern validation and NATS
 * wildcard matching of the in-process bus.
 *
 * Input: pattern NUL subject [NUL group], e.g. `a.*\0a.b\0g`; a missing
 * field is empty, an empty group is none.
 *
 * A fresh bus holds five fixed SYNC subscriptions ("a.>" in queue group
 * "g"); the input's pattern is subscribed (in its group) and its subject
 * published once. Checks: keel_bus_match() answers 1, 0 or KEEL_EINVAL;
 * subscribe accepts exactly the patterns keel_bus_match() accepts, publish
 * exactly the subjects; the subscription receives the message once if
 * keel_bus_match() says the subject matches, else never — unless it shares
 * group "g" with "a.>", which may take the message instead
 * (seeds/bus/queue-group-shared: the check once said so wrongly). */
#include <keel/bus.h>

#include "fuzz.h"

static int count_message(const keel_bus_msg *msg, void *ud)
{
    (void)msg;
    ++*(int *)ud;
    return 0;
}

static keel_bus *bus_with_fixed_subscriptions(int *hits)
{
    static const char *const fixed[] = {"a.*", "a.>", ">", "*.b.c", "foo.bar"};
    keel_bus *bus = NULL;
    KF_CHECK(keel_bus_create(&bus, NULL) == 0, "bus");
    for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++) {
        keel_bus_sub_opts so = {.pattern = fixed[i], .handler = count_message, .ud = hits,
                                .group = i == 1 ? "g" : NULL};
        keel_bus_sub *sub = NULL;
        KF_CHECK(keel_bus_subscribe(bus, &so, &sub) == 0, "fixed pattern %s", fixed[i]);
    }
    return bus;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *buf = kf_cstr(data, size);
    const char *pattern = buf;
    size_t plen = strlen(pattern);
    const char *subject = plen < size ? buf + plen + 1 : buf + plen;
    size_t subject_end = (size_t)(subject - buf) + strlen(subject);
    const char *group = subject_end < size && buf[subject_end + 1] ? buf + subject_end + 1 : NULL;

    int matched = keel_bus_match(pattern, subject);
    KF_CHECK(matched == 0 || matched == 1 || matched == KEEL_EINVAL, "match returned %d", matched);
    int pattern_ok = keel_bus_match(pattern, "x") != KEEL_EINVAL;
    int subject_ok = keel_bus_match(">", subject) != KEEL_EINVAL;

    int fixed_hits = 0;
    int hits = 0;
    keel_bus *bus = bus_with_fixed_subscriptions(&fixed_hits);
    keel_bus_sub_opts so = {.pattern = pattern, .handler = count_message, .ud = &hits, .group = group};
    keel_bus_sub *sub = NULL;
    int subscribed = keel_bus_subscribe(bus, &so, &sub);
    KF_CHECK((subscribed == 0) == pattern_ok, "subscribe returned %d, match %d", subscribed, pattern_ok);

    const keel_bus_header header = {"k", pattern};
    char id[KEEL_BUS_ID_MAX];
    int published = keel_bus_publish(bus, subject, "d", 1, &header, 1, id);
    KF_CHECK((published == 0) == subject_ok, "publish returned %d, match %d", published, subject_ok);

    int shares_group = group && strcmp(group, "g") == 0;
    if (subscribed == 0 && published == 0 && !shares_group)
        KF_CHECK(hits == (matched == 1), "match says %d, delivered %d times", matched, hits);
    if (sub)
        KF_CHECK(keel_bus_unsubscribe(sub) == 0, "unsubscribe");
    keel_bus_destroy(bus);
    free(buf);
    return 0;
}
