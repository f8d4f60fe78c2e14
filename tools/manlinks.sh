#!/bin/sh
# tools/manlinks.sh list PAGE... — prints "page.3 name" for every name in a
# page's NAME section other than the page itself: the per-function links
# that `make install` creates (so that `man keel_pool_acquire` works).
set -eu
[ "${1:-}" = list ] || { echo "usage: $0 list PAGE..." >&2; exit 2; }
shift
for page in "$@"; do
    base=$(basename "$page")
    awk '/^\.SH NAME/ {getline; print; exit}' "$page" |
        sed 's/ *\\-.*//; s/,/ /g' | tr ' ' '\n' | sed '/^$/d' |
        while read -r name; do
            [ "$name.3" = "$base" ] || echo "$base $name"
        done
done
