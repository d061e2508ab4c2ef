#!/usr/bin/env bash
# The whole test suite: formatting, lints as errors, and every test (privileged ones included when
# run as root; with CI=true a missing capability is a failure, never a skip).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
setup_tests

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
