#!/bin/sh
# tests/run.sh TEST... — runs the Check suites and sums up.
#   SAN=...      sanitizer build: stretch Check's timeouts, set sanitizer options;
#                under TSan, without the cases tagged model (single-threaded)
#   VALGRIND=1   run each suite under valgrind (Check's fork disabled),
#                without the cases tagged stress or slow
#   TESTS=a,b    only the suites test_a, test_b
set -u
case "${SAN:-}" in
*thread*)
    # Cases tagged model (one thread checked against a model, thousands of
    # random steps) have no race to find: plain and ASan runs check them.
    export CK_EXCLUDE_TAGS="${CK_EXCLUDE_TAGS:-model}"
    export CK_TIMEOUT_MULTIPLIER=${CK_TIMEOUT_MULTIPLIER:-10}
    export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 ${TSAN_OPTIONS:-}" ;;
*address*|*undefined*)
    export CK_TIMEOUT_MULTIPLIER=${CK_TIMEOUT_MULTIPLIER:-4}
    export ASAN_OPTIONS="detect_leaks=1 abort_on_error=1 ${ASAN_OPTIONS:-}"
    export UBSAN_OPTIONS="print_stacktrace=1 halt_on_error=1 ${UBSAN_OPTIONS:-}" ;;
esac
if [ -n "${VALGRIND:-}" ]; then
    # Cases tagged stress (hundreds of RCU grace periods, each a round of
    # valgrind's thread scheduler) or slow (millions of hashes) are left to
    # the sanitizer runs.
    export CK_FORK=no CK_TIMEOUT_MULTIPLIER=${CK_TIMEOUT_MULTIPLIER:-20}
    export CK_EXCLUDE_TAGS="stress slow"
    wrap="valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite,possible --show-leak-kinds=definite,possible"
else
    wrap=""
fi

pass=0; fail=0; failed=""
for t in "$@"; do
    name=$(basename "$t")
    if [ -n "${TESTS:-}" ]; then
        case ",$TESTS," in *",${name#test_},"*|*",$name,"*) ;; *) continue ;; esac
    fi
    echo "== $name"
    if $wrap "$t"; then pass=$((pass + 1)); else fail=$((fail + 1)); failed="$failed $name"; fi
done
echo "== $pass suites passed, $fail failed${failed:+:$failed}"
[ "$fail" -eq 0 ]
