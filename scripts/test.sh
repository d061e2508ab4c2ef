#!/usr/bin/env bash
# The whole test suite: formatting, lints as errors, and every test. Privileged tests (network
# namespaces, eBPF) run when root; with CI=true a missing capability is a failure, never a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
setup_tests

# A cold build of the workspace, its tests and the fuzz targets needs several GB; say so up front
# rather than as a linker's "No space left on device" half-way through.
free_kib=$(df -Pk . | awk 'NR == 2 { print $4 }')
echo "test.sh: $((free_kib / 1024 / 1024)) GiB free on $(df -P . | awk 'NR == 2 { print $6 }')"
if [ "$free_kib" -lt $((8 * 1024 * 1024)) ]; then
    echo "test.sh: warning: under 8 GiB free; a cold build may run out of space" >&2
fi

cargo fmt --all --check
# The eBPF crate only builds for the BPF target (it is built by the agent's build.rs); lint it there.
cargo clippy --workspace --exclude redirect-ebpf --all-targets --locked -- -D warnings
cargo +nightly clippy -p redirect-ebpf --target bpfel-unknown-none -Z build-std=core --release --locked -- -D warnings
cargo test --workspace --exclude redirect-ebpf --locked
# Every parser of untrusted bytes, fuzzed for a bounded time (FUZZ_SECS each, default 20).
scripts/fuzz.sh
