#!/bin/sh
# tools/deps.sh install|check — the Debian packages libkeel builds and tests
# with. `install` installs the missing ones when run as root (apt-get) and
# otherwise prints the exact command and fails. `check` (before a plain
# build) asks pkg-config, so libraries built from source or another
# package providing them do too, and names the Debian packages only when
# pkg-config cannot find a library.
set -u
mode=${1:-check}

# Library build: headers and pkg-config files of the fixed dependencies.
BUILD="pkg-config libhiredis-dev libpq-dev libxxhash-dev libmd-dev"
# Tests, examples and benchmarks: Check, the servers, and the references
# the ring is compared against.
# promtool (Debian's prometheus) checks the exposition; libmicrohttpd
# serves it in examples/metrics.c.
TEST="check redis-server redis-tools postgresql libmemcached-dev prometheus libmicrohttpd-dev"

if [ "$mode" = check ]; then want=$BUILD; else want="$BUILD $TEST"; fi

found_all() {
    command -v pkg-config >/dev/null 2>&1 || return 1
    for pc in hiredis libpq libxxhash libmd; do
        pkg-config --exists "$pc" 2>/dev/null || return 1
    done
}
[ "$mode" = check ] && found_all && exit 0

if ! command -v dpkg-query >/dev/null 2>&1; then
    # Not Debian: say what is needed in terms any system understands.
    found_all && exit 0
    echo "deps: pkg-config cannot find all of hiredis, libpq, libxxhash, libmd; install their development packages" >&2
    exit 1
fi

missing=""
for p in $want; do
    st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)
    case "$st" in *" installed") ;; *) missing="$missing $p" ;; esac
done
[ -z "$missing" ] && exit 0

cmd="apt-get install -y$missing"
if [ "$mode" = install ] && [ "$(id -u)" = 0 ]; then
    echo "deps: installing$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq $missing >/dev/null || {
        echo "deps: '$cmd' failed" >&2
        exit 1
    }
    exit 0
fi
echo "deps: missing Debian packages:$missing" >&2
echo "deps: run as root:  apt-get update && $cmd" >&2
exit 1
