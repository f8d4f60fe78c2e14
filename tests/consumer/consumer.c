/* An outside program: built by tests/install.sh against an installed
 * libkeel with nothing but `pkg-config keel`. */
#include <stdio.h>
#include <string.h>

#include <keel.h>

int main(void)
{
    if (strcmp(keel_version(), KEEL_VERSION_STRING) != 0) {
        fprintf(stderr, "header %s, library %s\n", KEEL_VERSION_STRING, keel_version());
        return 1;
    }
    keel_pool *p;
    keel_pool_opts o = {.obj_size = 32, .capacity = 2};
    if (keel_pool_create(&p, &o) != 0)
        return 1;
    void *a = keel_pool_acquire(p), *b = keel_pool_acquire(p);
    int full = keel_pool_acquire(p) == NULL;
    keel_pool_release(p, a);
    keel_pool_release(p, b);
    keel_pool_destroy(p);
    printf("libkeel %s: pool ok, %s\n", keel_version(), keel_err_name(KEEL_EFULL));
    return full ? 0 : 1;
}
