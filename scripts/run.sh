#!/usr/bin/env bash
# The main job: builds Porin, then
#   1. validates, tests and traces the example policies offline (porin policy ...);
#   2. brings up the star wars lab (config/labs/starwars-l3l4.yaml) in network namespaces with the
#      eBPF datapath enforcing the L3/L4 policy, sends real requests from tiefighter and xwing, and
#      prints each verdict with the datapath's own flow records; then takes the lab down.
# Needs root for step 2 (network namespaces, eBPF); without it, step 2 is skipped with a message.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
setup_main

cargo build --release --locked -p porin 2>&1 | grep -vE '^warning: porin@|^\s+(Compiling|Finished|Downloaded|Downloading)' || true
bin=$PWD/target/release/porin
[ -x "$bin" ] || { echo "build failed"; exit 1; }

echo "== porin policy validate config/examples"
find config/examples -name '*.yaml' ! -name '*.test.yaml' -print0 | sort -z | xargs -0 "$bin" policy validate
echo
echo "== porin policy test config/examples"
find config/examples -name '*.test.yaml' -print0 | sort -z | xargs -0 "$bin" policy test | tail -1
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
trap '"$bin" lab down --name "$lab" >/dev/null 2>&1 || true' EXIT
echo "== porin lab up config/labs/starwars-l3l4.yaml"
"$bin" lab up config/labs/starwars-l3l4.yaml --name "$lab"
echo
request() { # pod method path
    local out code
    out=$("$bin" lab exec --name "$lab" "$1" -- curl -s -m 3 -X "$2" "http://deathstar$3") && code=0 || code=$?
    if [ "$code" -eq 0 ]; then
        printf '%-11s %-5s %-22s -> %s\n' "$1" "$2" "$3" "$(echo "$out" | head -c 60)"
    else
        printf '%-11s %-5s %-22s -> no answer (curl exit %s: dropped by the datapath)\n' "$1" "$2" "$3" "$code"
    fi
}
request tiefighter POST /v1/request-landing
request tiefighter PUT /v1/exhaust-port
request xwing POST /v1/request-landing
echo
echo "== flow records (porin lab events)"
"$bin" lab events --name "$lab"
echo
echo "== datapath counters"
"$bin" lab counters --name "$lab"
