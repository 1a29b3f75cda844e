#!/usr/bin/env bash
# Runs test suites under AddressSanitizer and ThreadSanitizer, each in a build
# directory of its own (.build-address, .build-thread) so the normal build stays warm.
#
#   Scripts/sanitize.sh                       both sanitizers, FaultManagerTests and UserfaultfdTests
#   SANITIZERS=address Scripts/sanitize.sh    one sanitizer
#   SANITIZE_FILTER=. Scripts/sanitize.sh     the whole suite (slow: builds take ~10 min each here)
#
# Known: ThreadSanitizer does not see Synchronization.Mutex on Linux (it locks with
# futex calls TSan does not intercept), so it reports races between accesses that are
# both inside Mutex.withLock closures; those reports are false positives. ASan runs
# with detect_leaks=0 (the Swift runtime's process-lifetime allocations are reported
# as leaks), and its quarantine inflates RSS, which the soak test's RSS check sees.
set -euo pipefail
cd "$(dirname "$0")/.."
filter=${SANITIZE_FILTER:-FaultManagerTests|UserfaultfdTests}
status=0
for sanitizer in ${SANITIZERS:-address thread}; do
    scratch=.build-$sanitizer
    # Reuse the resolved dependencies: no network needed for a second build directory.
    mkdir -p "$scratch"
    for item in checkouts repositories workspace-state.json; do
        if [ -e ".build/$item" ] && [ ! -e "$scratch/$item" ]; then cp -r ".build/$item" "$scratch/"; fi
    done
    echo "== $sanitizer: building"
    swift build --build-tests --scratch-path "$scratch" --sanitize="$sanitizer"
    echo "== $sanitizer: swift test --filter '$filter'"
    log="$scratch/sanitize-test.log"
    # halt_on_error=0 for TSan: every report is listed, not only the first.
    if ! TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=0} ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0} \
        swift test --skip-build --scratch-path "$scratch" --sanitize="$sanitizer" --no-parallel --filter "$filter" >"$log" 2>&1; then
        status=1
    fi
    grep -E "^(SUMMARY|WARNING): (AddressSanitizer|ThreadSanitizer)|Test run with" "$log" | sort | uniq -c || true
    echo "== $sanitizer: full log in $log"
done
exit $status
