#!/bin/sh
# tests/fuzz/libfuzzer.sh — the two halves of `make fuzz` around its build.
#   libfuzzer.sh check TARGET ALL...  fails unless TARGET is one of ALL and
#                                     clang can link a libFuzzer program
#                                     (else prints the apt-get command)
#   libfuzzer.sh run TARGET SECONDS B runs B/fuzz/TARGET for SECONDS on
#                                     B/corpus/TARGET, a copy of the seeds
#                                     that grows with what libFuzzer finds
set -eu
here=$(cd "$(dirname "$0")" && pwd)

case "${1:-}" in
check)
    target=$2
    shift 2
    case " $* " in
    *" $target "*) ;;
    *) echo "make fuzz: FUZZ=<target> [FUZZ_TIME=<seconds>]; targets: $*" >&2; exit 2 ;;
    esac
    probe=$(mktemp -d)
    trap 'rm -rf "$probe"' EXIT
    printf '%s\n' '#include <stddef.h>' '#include <stdint.h>' \
        'int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n);' \
        'int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { (void)d; (void)n; return 0; }' \
        > "$probe/p.c"
    if ! clang -fsanitize=fuzzer,address,undefined "$probe/p.c" -o "$probe/p" >/dev/null 2>&1; then
        echo "make fuzz: needs clang with libFuzzer (Debian: clang and libclang-rt-dev)" >&2
        echo "make fuzz: run as root:  apt-get update && apt-get install -y clang libclang-rt-dev" >&2
        exit 1
    fi ;;
run)
    target=$2 secs=$3 b=$4
    corpus=$b/corpus/$target
    mkdir -p "$corpus" "$b/crashes/$target"
    cp "$here/seeds/$target"/* "$corpus"/
    dict=""
    [ -f "$here/dict/$target.dict" ] && dict="-dict=$here/dict/$target.dict"
    echo "make fuzz: $target for ${secs}s on $corpus; crashes go to $b/crashes/$target/"
    # shellcheck disable=SC2086
    "$b/fuzz/$target" "$corpus" $dict -max_total_time="$secs" -max_len=4096 -timeout=10 \
        -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$b/crashes/$target/" ||
        { echo "make fuzz: $target failed: the input is in $b/crashes/$target/; run it again with" \
            "$b/fuzz/$target <file>, and once fixed add it to tests/fuzz/seeds/$target/" >&2; exit 1; } ;;
*)
    echo "usage: $0 check TARGET ALL... | run TARGET SECONDS BUILD" >&2
    exit 2 ;;
esac
