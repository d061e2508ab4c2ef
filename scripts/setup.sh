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

ebpf_toolchain() {
    # Verified set (notes/ebpf-toolchain.md): LLVM 22 for bpf-linker 0.13, nightly + rust-src for
    # build-std=core, bpffs tools. bpf-linker must link against LLVM 22, not /usr/bin/llvm-config (14).
    apt_install llvm-22-dev libpolly-22-dev libzstd-dev
    rustup toolchain list | grep -q '^nightly' || { log "installing the nightly toolchain"; rustup toolchain install nightly --profile minimal; }
    rustup component list --installed --toolchain nightly 2>/dev/null | grep -q '^rust-src' \
        || { log "adding rust-src to nightly"; rustup component add rust-src --toolchain nightly; }
    if ! bpf-linker --version 2>/dev/null | grep -q '0.13'; then
        log "building bpf-linker 0.13 (LLVM 22), about a minute"
        PATH=/usr/lib/llvm-22/bin:$PATH cargo install bpf-linker@0.13.0 --locked --no-default-features --features llvm-22
    fi
}

lab_tools() {
    # What the lab and its tests drive: iproute2 (namespaces, veth), real clients (curl, ping);
    # tcpdump (what crosses the mesh's underlay), openssl (bad clients of the mTLS tunnel),
    # bpftool (pinned maps of another layout, for the loader's upgrade test).
    apt_install iproute2 curl iputils-ping procps tcpdump openssl bpftool
}

l7_clients() {
    # Real HTTP/2 and gRPC clients for the proxy tests: h2load (nghttp2-client), grpcio; wrk for
    # the load tests.
    apt_install nghttp2-client wrk
    python3 -c 'import grpc' 2>/dev/null || { log "installing grpcio (pip)"; python3 -m pip install -q --disable-pip-version-check grpcio; }
}

dns_tools() {
    # The DNS lab and its tests: a real authoritative server (nsd), real clients (dig).
    apt_install nsd bind9-dnsutils
}

kafka_tools() {
    # The Kafka lab and its tests: a real broker (tansu, built once per machine into ~/.cargo/bin:
    # ~12 min or more on two cores, then reused) and real clients (confluent-kafka with the
    # librdkafka its wheel ships, kafka-python).
    local tansu=${CARGO_HOME:-$HOME/.cargo}/bin/tansu
    if ! [ -x "$tansu" ] && ! command -v tansu >/dev/null; then
        log "building the tansu Kafka broker (once per machine, ~12+ min)"
        cargo install tansu@0.6.0 --locked --features dynostore
    fi
    python3 -c 'import confluent_kafka, kafka' 2>/dev/null || {
        log "installing confluent-kafka and kafka-python (pip)"
        python3 -m pip install -q --disable-pip-version-check confluent-kafka kafka-python
    }
}

observability_tools() {
    # Prometheus itself (scrapes the metrics in a test) and promtool (checks the exposition);
    # grpcio-tools and grpcio-reflection for the Python Hubble client the tests drive
    # (scripts/hubble-client.py generates its stubs from agent/hubble/proto).
    apt_install prometheus
    # Headless Chromium loads the service map in a test.
    apt_install chromium
    python3 -c 'import grpc_tools, grpc_reflection' 2>/dev/null || {
        log "installing grpcio-tools and grpcio-reflection (pip)"
        python3 -m pip install -q --disable-pip-version-check grpcio-tools grpcio-reflection
    }
}

kubernetes_tools() {
    # Kubernetes mode's tests: the reference CNI plugins (ptp, bridge, host-local) that porin-cni
    # is chained after, run as a container runtime runs them.
    apt_install containernetworking-plugins
    # kube-proxy's netfilter rules (conntrack, INVALID dropped), which the end-to-end test installs
    # on its node: the proxy's connections must pass them.
    apt_install iptables
    # The real kubectl, which the test API server is proven against and the end-to-end test
    # applies policies with (Debian package `kubectl` from the machine's package sources).
    command -v kubectl >/dev/null || apt_install kubectl
    # The image (config/kubernetes/Containerfile, FROM scratch) is built by its test with buildah.
    apt_install buildah
}

fuzz_tools() {
    # cargo-fuzz, installed once per machine (~2 min to build) and reused.
    command -v cargo-fuzz >/dev/null || { log "installing cargo-fuzz (once per machine)"; cargo install cargo-fuzz --locked; }
}

bench_tools() {
    # Load generators for benches/ (not needed by the tests).
    apt_install wrk nghttp2-client dnsperf dnsmasq-base dnsdist
}

setup_main() {
    rust_components
    ebpf_toolchain
    lab_tools
    l7_clients
    dns_tools
}

setup_tests() {
    rust_components
    ebpf_toolchain
    lab_tools
    l7_clients
    dns_tools
    kafka_tools
    observability_tools
    kubernetes_tools
    fuzz_tools
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    setup_main
    setup_tests
    log "done"
fi
