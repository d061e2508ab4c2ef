#!/usr/bin/env bash
# The main job: builds Porin, then
#   1. validates, tests and traces the example policies offline (porin policy ...);
#   2. brings up the star wars lab (config/labs/starwars.yaml): a node and three pods in network
#      namespaces; the eBPF datapath enforces L3/L4 and hands the deathstar's HTTP flows to the node's
#      proxy (bpf_sk_assign), which enforces the L7 rules. Unmodified curl in the pods makes the
#      documented requests while `porin observe -f -o table` prints every verdict as it happens
#      (kernel and proxy); then the lab is taken down.
# Needs root for step 2 (network namespaces, eBPF); without it, step 2 is skipped with a message.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
setup_main

cargo build --release --locked -p porin 2>&1 | grep -vE '^warning: porin@|^\s+(Compiling|Finished|Downloaded|Downloading)' || true
bin=$PWD/target/release/porin
[ -x "$bin" ] || { echo "build failed"; exit 1; }

# config/examples/manifests holds a Deployment and a Service next to its policy: they are listed as
# skipped, the policies validated.
echo "== porin policy validate --skip-other-kinds config/examples"
"$bin" policy validate --skip-other-kinds config/examples
echo
echo "== porin policy test --skip-other-kinds config/examples"
"$bin" policy test --skip-other-kinds config/examples 2>/dev/null | tail -1
echo
echo "== porin policy trace: why is the exhaust port refused under the L7 policy?"
"$bin" policy trace config/examples/starwars/l3-l4-l7.test.yaml \
    --from tiefighter --to deathstar --port 80 --http-method PUT --http-path /v1/exhaust-port | tail -1
echo

if [ "$(id -u)" -ne 0 ]; then
    echo "== skipping the lab: it needs root (network namespaces, eBPF)"
    exit 0
fi
lab="demo-$$"
observer=
cleanup() {
    if [ -n "$observer" ]; then kill "$observer" 2>/dev/null || true; fi
    "$bin" lab down --name "$lab" >/dev/null 2>&1 || true
}
trap cleanup EXIT
echo "== porin lab up config/labs/starwars.yaml   (node + 3 pods; L3/L4 in the kernel, L7 in the node's proxy)"
"$bin" lab up config/labs/starwars.yaml --name "$lab"
echo
echo "== live verdicts (porin observe --lab $lab -f -o table) while the pods make their requests"
"$bin" observe --lab "$lab" -f -o table & observer=$!
sleep 0.5
request() { # pod method path [curl flags...]: runs curl in the pod, unmodified (no proxy settings)
    local pod=$1 method=$2 path=$3 out code
    shift 3
    out=$("$bin" lab exec --name "$lab" "$pod" -- curl -s -m 3 -w ' [HTTP %{http_code}]' "$@" -X "$method" "http://deathstar$path" | tr -d '\r\n') && code=0 || code=$?
    [ "$code" -eq 0 ] || out="no answer: curl exit $code (dropped in the kernel)"
    printf '\n>>> %-10s %s %s %s\n<<< %s\n' "$pod" "$method" "$path" "$*" "$out"
    sleep 0.4
}
request tiefighter POST /v1/request-landing
request tiefighter PUT /v1/exhaust-port
request tiefighter PUT /v1/exhaust-port --http2-prior-knowledge
request tiefighter POST /v1/request-landing/../../v1/exhaust-port --path-as-is
request xwing POST /v1/request-landing
sleep 0.5
kill "$observer" 2>/dev/null || true
wait "$observer" 2>/dev/null || true
observer=
echo
echo "== datapath counters"
"$bin" lab counters --name "$lab"
