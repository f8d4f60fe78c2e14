/* keel.h — the umbrella header: includes every libkeel module header.
 * Including a single module header (<keel/pool.h>) works as well. */
#ifndef KEEL_H
#define KEEL_H

#include <keel/version.h>
#include <keel/common.h>
#include <keel/pool.h>
#include <keel/ring.h>
#include <keel/backoff.h>
#include <keel/breaker.h>
#include <keel/lb.h>
#include <keel/metrics.h>
#include <keel/alert.h>
#include <keel/redis.h>
#include <keel/pg.h>
#include <keel/limiter.h>
#include <keel/batch.h>
#include <keel/bus.h>
#include <keel/cqrs.h>
#include <keel/cache.h>

#endif /* KEEL_H */
