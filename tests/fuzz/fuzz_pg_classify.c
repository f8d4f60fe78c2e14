/* tests/fuzz/fuzz_pg_classify.c — keel_pg_classify(), the read/write
 * classifier of SQL text (comments, quoting of every kind, dollar quotes,
 * CTEs, EXPLAIN, several statements).
 *
 * Input: the SQL text, up to its first NUL.
 *
 * Checks: every text is classified READ or WRITE, never out of bounds
 * (AddressSanitizer), and the same way twice (no state between calls). */
#include <keel/pg.h>

#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *sql = kf_cstr(data, size);
    keel_pg_mode mode = keel_pg_classify(sql);
    KF_CHECK(mode == KEEL_PG_READ || mode == KEEL_PG_WRITE, "mode %d", (int)mode);
    keel_pg_mode again = keel_pg_classify(sql);
    KF_CHECK(again == mode, "classified %d, then %d", (int)mode, (int)again);
    free(sql);
    return 0;
}
