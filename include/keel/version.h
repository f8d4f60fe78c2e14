/* keel/version.h — the library version, in one place.
 *
 * The Makefile reads the three macros below to name the shared library
 * (libkeel.so.MAJOR.MINOR.PATCH, soname libkeel.so.MAJOR) and keel.pc.
 * The major number changes when the ABI breaks.
 */
#ifndef KEEL_VERSION_H
#define KEEL_VERSION_H

/* KEEL_API marks what libkeel exports; everything else is hidden
 * (the library is built with -fvisibility=hidden). It lives here, in the
 * header every other one includes first, and is documented in common.h. */
#ifndef KEEL_API
#if defined(__GNUC__) || defined(__clang__)
#define KEEL_API __attribute__((visibility("default")))
#else
#define KEEL_API
#endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define KEEL_VERSION_MAJOR 0
#define KEEL_VERSION_MINOR 1
#define KEEL_VERSION_PATCH 0

/* One integer that compares in release order: 0x00MMmmpp. */
#define KEEL_VERSION_NUM \
    ((KEEL_VERSION_MAJOR << 16) | (KEEL_VERSION_MINOR << 8) | KEEL_VERSION_PATCH)

#define KEEL__STR2(x) #x
#define KEEL__STR(x) KEEL__STR2(x)
#define KEEL_VERSION_STRING                                                    \
    KEEL__STR(KEEL_VERSION_MAJOR) "." KEEL__STR(KEEL_VERSION_MINOR) "."       \
    KEEL__STR(KEEL_VERSION_PATCH)

/* The version of the library actually linked, as "M.m.p" (static string).
 * Compare with KEEL_VERSION_STRING to catch a header/library mismatch. */
KEEL_API const char *keel_version(void);
/* The same as KEEL_VERSION_NUM, for the library actually linked. */
KEEL_API unsigned keel_version_num(void);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_VERSION_H */
