/* tests/fuzz/driver.c — runs a fuzz target without libFuzzer, so that any
 * compiler builds it and `make check-fuzz` runs it in every CI build
 * (plain, ASan+UBSan, TSan).
 *
 *   build/fuzz/<target> SEEDS [RUNS]
 *
 * SEEDS is a folder of seed files (tests/fuzz/seeds/<target>) or one file.
 * Every seed runs once; then RUNS mutated seeds (RUNS from the argument,
 * else $KEEL_FUZZ_RUNS, else DEFAULT_RUNS for a folder and none for a
 * file, which is how a crash is run again): each a seed changed one to
 * four times by a bit flip, a byte set, bytes inserted or deleted, a run
 * duplicated, or a splice with another seed. The generator has a fixed
 * seed, so every run of the same seeds tries the same inputs, and a
 * failure found once is found again.
 *
 * Each input is passed in a buffer of exactly its size, so that the
 * sanitizers see a read past its end. When an input crashes (a broken
 * invariant's abort, a signal, a sanitizer's report) it is written to
 * <program>.crash, to run again with `<program> <program>.crash` and, once
 * fixed, to add to the seeds. A leak is reported by LeakSanitizer at exit,
 * with the allocation's stack but not the input (`make fuzz` finds that).
 * On success one line: "fuzz <target>: <n> seeds, <m> runs". */
#define _POSIX_C_SOURCE 200809L
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fuzz.h"

#define DEFAULT_RUNS 5000
#define MAX_LEN 4096 /* longest mutated input, as the libFuzzer runs used */

typedef struct blob {
    uint8_t *p;
    size_t len;
} blob;

typedef struct seeds {
    blob *v;
    size_t n, cap;
} seeds;

static const char *program, *crash_path;
static const uint8_t *running; /* the input being run, for the crash handlers */
static size_t running_len;

/* Set when the program is built with a sanitizer. */
void __sanitizer_set_death_callback(void (*callback)(void)) __attribute__((weak));
static uint64_t rng_state = 0x6b65656c2d66757aull; /* fixed: runs repeat */

static uint64_t rng(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull); /* splitmix64 */
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static size_t below(size_t n)
{
    return n ? (size_t)(rng() % n) : 0;
}

static void seed_load(seeds *s, const char *path)
{
    FILE *f = fopen(path, "rb");
    KF_CHECK(f != NULL, "%s: %s", path, strerror(errno));
    blob b = {kf_malloc(MAX_LEN), 0};
    b.len = fread(b.p, 1, MAX_LEN, f);
    KF_CHECK(!ferror(f) && fgetc(f) == EOF, "%s: unreadable or longer than %d bytes", path, MAX_LEN);
    fclose(f);
    if (s->n == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 16;
        s->v = kf_realloc(s->v, s->cap * sizeof *s->v);
    }
    s->v[s->n++] = b;
}

static int by_name(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The regular files of dir, in name order (readdir's order is not fixed). */
static void seeds_load_dir(seeds *s, const char *dir)
{
    DIR *d = opendir(dir);
    KF_CHECK(d != NULL, "%s: %s", dir, strerror(errno));
    char **names = NULL;
    size_t n = 0;
    for (struct dirent *e; (e = readdir(d)) != NULL;) {
        if (e->d_name[0] == '.')
            continue;
        names = kf_realloc(names, (n + 1) * sizeof *names);
        size_t len = strlen(dir) + strlen(e->d_name) + 2;
        names[n] = kf_malloc(len);
        snprintf(names[n++], len, "%s/%s", dir, e->d_name);
    }
    closedir(d);
    qsort(names, n, sizeof *names, by_name);
    for (size_t i = 0; i < n; i++) {
        struct stat st;
        if (stat(names[i], &st) == 0 && S_ISREG(st.st_mode))
            seed_load(s, names[i]);
        free(names[i]);
    }
    free(names);
}

static void say(const char *text)
{
    ssize_t w = write(2, text, strlen(text));
    (void)w;
}

/* Writes the running input to crash_path and says so; only
 * async-signal-safe calls. */
static void crash_save(void)
{
    if (!running)
        return;
    int fd = open(crash_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        return;
    ssize_t w = write(fd, running, running_len);
    close(fd);
    running = NULL;
    if (w != (ssize_t)running_len)
        return;
    say("fuzz: the input that crashed is in ");
    say(crash_path);
    say("; run it alone with: ");
    say(program);
    say(" ");
    say(crash_path);
    say("\n");
}

static void crash_signal(int sig)
{
    crash_save();
    signal(sig, SIG_DFL);
    raise(sig);
}

/* abort() (a broken invariant) always; the faults only without a
 * sanitizer, whose own handler reports them and then calls crash_save. */
static void crash_handlers(void)
{
    signal(SIGABRT, crash_signal);
    if (__sanitizer_set_death_callback) {
        __sanitizer_set_death_callback(crash_save);
        return;
    }
    signal(SIGSEGV, crash_signal);
    signal(SIGBUS, crash_signal);
    signal(SIGFPE, crash_signal);
    signal(SIGILL, crash_signal);
}

static void run(const uint8_t *p, size_t len)
{
    uint8_t *exact = kf_malloc(len);
    if (len)
        memcpy(exact, p, len);
    running = exact;
    running_len = len;
    LLVMFuzzerTestOneInput(exact, len);
    running = NULL;
    free(exact);
}

/* One change to b (capacity MAX_LEN), drawing on the other seeds. */
static void mutate_once(blob *b, const seeds *s)
{
    static const uint8_t special[] = {0, 0xff, 0x7f, 0x80, '.', '*', '>', '{', '}', '"', '\\', '\n', '[', '='};
    size_t at = below(b->len + 1);
    size_t room = MAX_LEN - b->len;
    switch (below(6)) {
    case 0: /* flip a bit */
        if (b->len)
            b->p[below(b->len)] ^= (uint8_t)(1u << below(8));
        break;
    case 1: /* set a byte, often to one parsers care about */
        if (b->len)
            b->p[below(b->len)] = below(2) ? special[below(sizeof special)] : (uint8_t)rng();
        break;
    case 2: { /* insert random bytes */
        size_t n = 1 + below(4);
        if (n > room)
            break;
        memmove(b->p + at + n, b->p + at, b->len - at);
        for (size_t i = 0; i < n; i++)
            b->p[at + i] = (uint8_t)rng();
        b->len += n;
        break;
    }
    case 3: { /* delete a run */
        size_t n = 1 + below(8);
        if (at + n > b->len)
            n = b->len - at;
        memmove(b->p + at, b->p + at + n, b->len - at - n);
        b->len -= n;
        break;
    }
    case 4: { /* duplicate a run at another place */
        if (!b->len)
            break;
        size_t from = below(b->len);
        size_t n = 1 + below(b->len - from < 16 ? b->len - from : 16);
        if (n > room)
            break;
        uint8_t run[16];
        memcpy(run, b->p + from, n);
        memmove(b->p + at + n, b->p + at, b->len - at);
        memcpy(b->p + at, run, n);
        b->len += n;
        break;
    }
    default: { /* splice: keep the head, take another seed's tail */
        const blob *o = &s->v[below(s->n)];
        size_t from = below(o->len + 1);
        size_t n = o->len - from < MAX_LEN - at ? o->len - from : MAX_LEN - at;
        memcpy(b->p + at, o->p + from, n);
        b->len = at + n;
        break;
    }
    }
}

/* Runs n seeds, each changed one to four times. */
static void run_mutations(const seeds *s, size_t n)
{
    blob b = {kf_malloc(MAX_LEN), 0};
    for (size_t i = 0; i < n; i++) {
        const blob *from = &s->v[below(s->n)];
        memcpy(b.p, from->p, from->len);
        b.len = from->len;
        for (size_t k = 1 + below(4); k > 0; k--)
            mutate_once(&b, s);
        run(b.p, b.len);
    }
    free(b.p);
}

static size_t runs_wanted(int argc, char **argv, bool folder)
{
    const char *v = argc > 2 ? argv[2] : getenv("KEEL_FUZZ_RUNS");
    if (!v || !*v)
        return folder ? DEFAULT_RUNS : 0;
    char *end;
    unsigned long long n = strtoull(v, &end, 10);
    KF_CHECK(*end == '\0' && v[0] != '-', "RUNS is a count, not %s", v);
    return (size_t)n;
}

int main(int argc, char **argv)
{
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: %s SEED_FOLDER|FILE [RUNS]\n", argv[0]);
        return 2;
    }
    size_t plen = strlen(argv[0]) + sizeof ".crash";
    char *path = kf_malloc(plen);
    snprintf(path, plen, "%s.crash", argv[0]);
    program = argv[0];
    crash_path = path;

    seeds s = {0};
    struct stat st;
    KF_CHECK(stat(argv[1], &st) == 0, "%s: %s", argv[1], strerror(errno));
    if (S_ISDIR(st.st_mode))
        seeds_load_dir(&s, argv[1]);
    else
        seed_load(&s, argv[1]);
    KF_CHECK(s.n > 0, "%s: no seeds", argv[1]);
    size_t runs = runs_wanted(argc, argv, S_ISDIR(st.st_mode));
    if (strcmp(argv[1], crash_path) != 0)
        unlink(crash_path); /* from an earlier run */

    crash_handlers();
    for (size_t i = 0; i < s.n; i++)
        run(s.v[i].p, s.v[i].len);
    run_mutations(&s, runs);

    const char *name = strrchr(argv[0], '/');
    printf("fuzz %s: %zu seeds, %zu runs\n", name ? name + 1 : argv[0], s.n, s.n + runs);
    for (size_t i = 0; i < s.n; i++)
        free(s.v[i].p);
    free(s.v);
    free(path);
    return 0;
}
