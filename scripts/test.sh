#!/usr/bin/env bash
# The whole test suite: formatting, lints as errors, and every test. Privileged tests (network
# namespaces, eBPF) run when root; with CI=true a missing capability is a failure, never a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
setup_tests

cargo fmt --all --check
# The eBPF crate only builds for the BPF target (it is built by the agent's build.rs); lint it there.
cargo clippy --workspace --exclude redirect-ebpf --all-targets --locked -- -D warnings
cargo +nightly clippy -p redirect-ebpf --target bpfel-unknown-none -Z build-std=core --release --locked -- -D warnings
cargo test --workspace --exclude redirect-ebpf --locked
# Every parser of untrusted bytes, fuzzed for a bounded time (FUZZ_SECS each, default 20).
scripts/fuzz.sh
