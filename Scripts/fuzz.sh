#!/usr/bin/env bash
# Builds uffd-fuzz with -sanitize=fuzzer (in .build-fuzz) and runs each of its targets.
#
#   Scripts/fuzz.sh                      20 s per target (CI)
#   FUZZ_SECONDS=3600 Scripts/fuzz.sh    longer runs
#   FUZZ_CORPUS=DIR                      keep the corpus there (default: a fresh temporary one)
# A crash leaves its input as .build-fuzz/crash-<target>-*; replay it with
# `UFFD_FUZZ_TARGET=<target> .build-fuzz/x86_64-unknown-linux-gnu/debug/uffd-fuzz FILE`.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-20}
scratch=.build-fuzz
mkdir -p "$scratch"
# Reuse the resolved dependencies: no network needed for a second build directory.
for item in checkouts repositories workspace-state.json; do
    if [ -e ".build/$item" ] && [ ! -e "$scratch/$item" ]; then cp -r ".build/$item" "$scratch/"; fi
done
corpus_root=${FUZZ_CORPUS:-$(mktemp -d /tmp/uffd-fuzz-XXXXXX)}

seed_handshake() {
    printf '%s' '[{"base_host_virt_addr":140180235575296,"size":134217728,"offset":0,"page_size":4096,"page_size_kib":4096}]' >"$1/firecracker"
    printf '%s' '{"backing":"memoryFile","features":0,"name":"vm","protocol":"swift-userfaultfd-manager","regions":[{"backingOffset":0,"length":65536,"pageSize":4096,"start":1073741824}],"version":1}' >"$1/native"
}

seed_migration_frame() {
    # A PAGES frame header (magic "UFPC", version 1, type 3, one 4 KiB page) and a hello payload.
    printf 'UFPC\001\003\000\000\000\020\000\000\001\000\000\000\000\000\000\000\000\000\000\000\000\000\000\000\000\000\000\000' >"$1/pages-header"
    printf '\004\000\000\000\000\020\000\000\001\000\000\000\000\000\000\000\001\000\000\000\000\000\000\000\000\000\020\000\000\000\000\000abcd' >"$1/hello"
}

echo "== building uffd-fuzz"
swift build --scratch-path "$scratch" --product uffd-fuzz -Xswiftc -sanitize=fuzzer -Xswiftc -DFUZZING
status=0
for target in handshake migration-frame; do
    corpus="$corpus_root/$target"
    mkdir -p "$corpus"
    case $target in
        handshake) seed_handshake "$corpus" ;;
        migration-frame) seed_migration_frame "$corpus" ;;
    esac
    echo "== $target: fuzzing for $seconds s (corpus $corpus)"
    # The Swift runtime's backtracer would take the crash before libFuzzer can save its input.
    if ! SWIFT_BACKTRACE=enable=no UFFD_FUZZ_TARGET=$target "$scratch/x86_64-unknown-linux-gnu/debug/uffd-fuzz" -max_total_time="$seconds" -max_len=65536 \
        -artifact_prefix="$scratch/crash-$target-" -print_final_stats=1 "$corpus" >"$scratch/log-$target" 2>&1; then
        grep -E -A3 '^(==[0-9]+==|SUMMARY|MS:)|ERROR' "$scratch/log-$target" | head -40 || true
        grep -E '^ +#[0-9]+ .* in .*(uffd|Fault|Postcopy|Userfaultfd)' "$scratch/log-$target" | head -15 || true
        for crash in "$scratch"/crash-"$target"-*; do
            [ -e "$crash" ] && echo "== input $crash: $(head -c 400 "$crash" | od -An -c | tr -s ' ' | head -8)"
        done
        echo "== $target: FAILED (crash input under $scratch/crash-$target-*)"
        status=1
    else
        grep -E '^(Done|stat::)' "$scratch/log-$target" || true
    fi
done
exit $status
