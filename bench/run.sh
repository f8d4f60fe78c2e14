#!/bin/sh
# bench/run.sh BENCH... — runs every benchmark; they print their figures
# beside the baselines measured in the same run. Benchmarks never fail the
# build: a crash is reported, a missed goal is only printed.
echo "# libkeel benchmarks$( [ -n "${SHORT:-}" ] && echo ' (SHORT: a quick pass, figures are not meaningful)')"
echo "# $(nproc) cores, $(uname -m), $(date -u +%Y-%m-%dT%H:%MZ)"
status=0
for b in "$@"; do
    "$b" || { echo "bench: $(basename "$b") exited with status $?"; status=1; }
done
exit $status
