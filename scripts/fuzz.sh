#!/usr/bin/env bash
# Runs every fuzz target of proxy/fuzz (cargo fuzz, nightly) for FUZZ_SECS seconds each (default
# 20), starting from its corpus under proxy/fuzz/corpus/. A crash fails the run and leaves the
# input under proxy/fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/../proxy/fuzz"
secs=${FUZZ_SECS:-20}
log=$(mktemp /tmp/porin-fuzz.XXXXXX)
trap 'rm -f "$log"' EXIT
for target in $(cargo +nightly fuzz list); do
    mkdir -p "corpus/$target"
    echo "== fuzz $target (${secs} s)"
    if ! cargo +nightly fuzz run "$target" "corpus/$target" -- -max_total_time="$secs" -rss_limit_mb=2048 >"$log" 2>&1; then
        tail -40 "$log"
        echo "fuzz target $target failed (input in proxy/fuzz/artifacts/$target)"
        exit 1
    fi
    grep -E '^#[0-9]+ +DONE|^Done' "$log" | tail -1
done
