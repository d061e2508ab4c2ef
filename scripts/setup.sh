#!/usr/bin/env bash
# Installs what Porin's build and tests need and is not yet on this machine. Idempotent: every step
# checks first. Sourced by scripts/run.sh and scripts/test.sh; safe to run on its own.
set -euo pipefail

log() { printf '[setup] %s\n' "$*" >&2; }

apt_install() {
    # Installs the Debian packages that are missing (no-op when all are present).
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        if [ "$(id -u)" -ne 0 ]; then
            log "need root to install ${missing[*]}"; return 1
        fi
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

rust_components() {
    command -v cargo >/dev/null || { log "cargo not found: install Rust stable (rustup) first"; return 1; }
    for c in rustfmt clippy; do
        rustup component list --installed 2>/dev/null | grep -q "^$c" || { log "adding rustup component $c"; rustup component add "$c"; }
    done
}

setup_main() {
    rust_components
}

setup_tests() {
    rust_components
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    setup_main
    setup_tests
    log "done"
fi
