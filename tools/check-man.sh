#!/bin/sh
# tools/check-man.sh — every function declared with KEEL_API in a public
# header is named in the NAME section of a man page, so that it gets its
# `man` link and its documentation.
set -eu
cd "$(dirname "$0")/.."
names=$(for p in man/man3/*.3; do awk '/^\.SH NAME/ {getline; print; exit}' "$p"; done |
    sed 's/ *\\-.*//; s/,/ /g')
missing=""
for f in $(grep -h 'KEEL_API' include/keel/*.h | grep -oE 'keel_[a-z0-9_]+ *\(' | tr -d ' (' | sort -u); do
    case " $(echo $names) " in *" $f "*) ;; *) missing="$missing $f" ;; esac
done
if [ -n "$missing" ]; then
    echo "check-man: functions not named in any man page NAME section:$missing" >&2
    exit 1
fi
echo "check-man: every public function has a man page"
