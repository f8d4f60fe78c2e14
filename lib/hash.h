/* lib/hash.h — the hash functions libkeel uses internally. Private.
 * XXH3 is compiled inline (XXH_INLINE_ALL): for the short keys of lookups
 * the call into libxxhash would cost as much as the hash itself. */
#ifndef KEEL_HASH_H
#define KEEL_HASH_H

#include <stddef.h>
#include <stdint.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

static inline uint64_t keel__hash64(const void *data, size_t len, uint64_t seed)
{
    return XXH3_64bits_withSeed(data, len, seed);
}

/* A 64-bit mix of one integer (splitmix64's finaliser): for rehashing a
 * hash into a sequence of further independent-looking values. */
static inline uint64_t keel__mix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

#endif
