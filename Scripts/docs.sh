#!/usr/bin/env bash
# Builds the DocC documentation of every library module and fails on any warning.
#   Scripts/docs.sh                 every module
#   Scripts/docs.sh Userfaultfd     only the named ones
set -euo pipefail
cd "$(dirname "$0")/.."

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(Userfaultfd UserfaultfdDiagnostics FaultEngine Postcopy FaultManager Snapshot PagedMemory FaultTrace)
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
failed=0
for target in "${targets[@]}"; do
    if ! swift package --disable-sandbox generate-documentation --target "$target" >"$log" 2>&1; then
        echo "docs: $target: generate-documentation failed"
        cat "$log"
        failed=1
        continue
    fi
    # DocC reports problems as "warning:" or "error:" lines; the compiler's own
    # warnings (deprecations in other modules) are not documentation problems.
    problems=$(grep -E "^(warning|error): " "$log" || true)
    if [ -n "$problems" ]; then
        echo "docs: $target: DocC reported problems:"
        grep -E -A8 "^(warning|error): " "$log"
        failed=1
    else
        echo "docs: $target: no warnings"
    fi
done
exit $failed
