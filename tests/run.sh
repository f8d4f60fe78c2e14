#!/bin/sh
# tests/run.sh TEST... — runs the Check suites and sums up.
#   SAN=...      sanitizer build: stretch Check's timeouts, set sanitizer options;
#                without the cases tagged slow, and under TSan without those
#                tagged model either
#   VALGRIND=1   run each suite under valgrind (Check's fork disabled),
#                without the cases tagged stress, slow or model
#   TESTS=a,b    only the suites test_a, test_b
#
# Tags say what a case costs and which run finds something in it:
#   slow    one thread, millions of steps over paths other cases cover:
#           the plain run only
#   model   one thread, thousands of random steps checked against a model:
#           plain and ASan runs (no race for TSan to find)
#   stress  threads racing: plain and sanitizer runs (valgrind runs one
#           thread at a time, so a race there crawls and proves little)
set -u
case "${SAN:-}" in
*thread*)
    export CK_EXCLUDE_TAGS="${CK_EXCLUDE_TAGS:-slow model}"
    export CK_TIMEOUT_MULTIPLIER=${CK_TIMEOUT_MULTIPLIER:-10}
    export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 ${TSAN_OPTIONS:-}" ;;
*address*|*undefined*)
    export CK_EXCLUDE_TAGS="${CK_EXCLUDE_TAGS:-slow}"
    export CK_TIMEOUT_MULTIPLIER=${CK_TIMEOUT_MULTIPLIER:-4}
    export ASAN_OPTIONS="detect_leaks=1 abort_on_error=1 ${ASAN_OPTIONS:-}"
    export UBSAN_OPTIONS="print_stacktrace=1 halt_on_error=1 ${UBSAN_OPTIONS:-}" ;;
esac
if [ -n "${VALGRIND:-}" ]; then
    export CK_FORK=no CK_TIMEOUT_MULTIPLIER=${CK_TIMEOUT_MULTIPLIER:-20}
    export CK_EXCLUDE_TAGS="${CK_EXCLUDE_TAGS:-stress slow model}"
    # Check's own timeouts need its fork, so a whole suite has one here: a
    # case that crawls under valgrind's one-thread-at-a-time scheduler
    # fails the run instead of stalling it.
    wrap="timeout -k 10 ${VALGRIND_TIMEOUT:-600} valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite,possible --show-leak-kinds=definite,possible"
else
    wrap=""
fi

# A name in TESTS that no suite has is a typo: fail rather than pass
# having run nothing.
for w in $(echo "${TESTS:-}" | tr ',' ' '); do
    found=""
    for t in "$@"; do
        name=$(basename "$t")
        if [ "${name#test_}" = "$w" ] || [ "$name" = "$w" ]; then found=1; fi
    done
    [ -n "$found" ] || { echo "run.sh: TESTS names '$w', which is not one of the suites run here" >&2; exit 2; }
done

pass=0; fail=0; failed=""
for t in "$@"; do
    name=$(basename "$t")
    if [ -n "${TESTS:-}" ]; then
        case ",$TESTS," in *",${name#test_},"*|*",$name,"*) ;; *) continue ;; esac
    fi
    echo "== $name"
    t0=$(date +%s)
    if $wrap "$t"; then
        pass=$((pass + 1))
    else
        [ $? -ne 124 ] || [ -z "$wrap" ] || echo "== $name: stopped after ${VALGRIND_TIMEOUT:-600} s"
        fail=$((fail + 1)); failed="$failed $name"
    fi
    echo "== $name: $(( $(date +%s) - t0 )) s"
done
echo "== $pass suites passed, $fail failed${failed:+:$failed}"
[ "$fail" -eq 0 ]
