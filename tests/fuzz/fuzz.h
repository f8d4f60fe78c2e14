/* tests/fuzz/fuzz.h — what the fuzz targets share. Each
 * tests/fuzz/fuzz_<name>.c defines LLVMFuzzerTestOneInput() and is linked
 * either with libFuzzer (`make fuzz`, clang) or with tests/fuzz/driver.c
 * (`make check-fuzz`, any compiler). A target returns 0 for every input;
 * a broken invariant aborts, which both report as a crash with its input. */
#ifndef KEEL_FUZZ_H
#define KEEL_FUZZ_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Aborts, saying where and what, unless cond holds. */
#define KF_CHECK(cond, ...) ((cond) ? (void)0 : kf_fail(__FILE__, __LINE__, #cond, __VA_ARGS__))

__attribute__((noreturn, format(printf, 4, 5), unused))
static void kf_fail(const char *file, int line, const char *cond, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "%s:%d: broken invariant: %s: ", file, line, cond);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    abort();
}

/* Memory a target or the driver cannot do without: aborts when there is
 * none, so that callers need no check of their own. */
__attribute__((unused))
static void *kf_realloc(void *p, size_t n)
{
    p = realloc(p, n ? n : 1);
    KF_CHECK(p != NULL, "out of memory (%zu bytes)", n);
    return p;
}

__attribute__((unused))
static void *kf_malloc(size_t n)
{
    return kf_realloc(NULL, n);
}

__attribute__((unused))
static void *kf_calloc(size_t n)
{
    return memset(kf_malloc(n), 0, n);
}

/* A copy of the input with a NUL after it, freed with free(): the C string
 * of the input up to its first NUL, and the fields after it for targets
 * that read NUL-separated fields. */
__attribute__((unused))
static char *kf_cstr(const uint8_t *data, size_t size)
{
    char *s = kf_malloc(size + 1);
    if (size)
        memcpy(s, data, size);
    s[size] = '\0';
    return s;
}

#endif /* KEEL_FUZZ_H */
