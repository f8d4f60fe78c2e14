#!/bin/sh
# examples/tour.sh EXAMPLE... — runs each example with a heading taken from
# the first comment line of its source. `make demo` runs it with the
# throwaway servers of tests/servers.sh, whose addresses the examples read
# from KEEL_TEST_* (each example also runs without them, in-process).
set -u
top=$(cd "$(dirname "$0")/.." && pwd)
fail=0
for bin in "$@"; do
    name=$(basename "$bin")
    # the comment's first paragraph, on one line
    title=$(awk 'NR == 1 { sub(/^\/\* *examples\/[^ ]* — /, "") }
                 NR > 1 { if ($0 ~ /^ \*\/? *$/) exit; sub(/^ \* ?/, "") }
                 { end = sub(/ *\*\/.*$/, ""); printf "%s%s", (NR > 1 ? " " : ""), $0; if (end) exit }' \
        "$top/examples/$name.c")
    printf '\n==== %s: %s\n' "$name" "$title"
    if ! "$bin"; then
        echo "==== $name FAILED"
        fail=1
    fi
done
[ $fail -eq 0 ] && printf '\n==== tour done: %d example(s) ran\n' $#
exit $fail
