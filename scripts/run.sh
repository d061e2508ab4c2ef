#!/usr/bin/env bash
# The main job: builds Porin, then
#   1. validates, tests and traces the example policies offline (porin policy ...);
#   2. brings up the star wars lab (config/labs/starwars-l3l4.yaml) in network namespaces with the
#      eBPF datapath enforcing the L3/L4 policy, sends real requests from tiefighter and xwing, and
#      prints each verdict with the datapath's own flow records;
#   3. applies the L7 policy: the agent publishes it, and `porin proxy` (started in the lab's node
#      namespace with a listener that names tiefighter -> deathstar, until the transparent redirect
#      lands) enforces it per request over HTTP/1.1 and h2c; prints `porin observe`. Then takes the
#      lab down.
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

echo
echo "== the L7 policy: porin lab apply config/examples/starwars/l3-l4-l7.yaml"
"$bin" lab apply --name "$lab" config/examples/starwars/l3-l4-l7.yaml | head -c 300; echo
node="porin-$lab-node"
labdir="/run/porin/labs/$lab"
work=$(mktemp -d)
trap '"$bin" lab down --name "$lab" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
# A copy of the deathstar's HTTP server in the node namespace behind the proxy (the transparent
# redirect that hands pod flows to the proxy is the next issue; the lab down stops both processes).
cat > "$work/deathstar.json" <<'JSON'
{"http": {"port": 18080, "routes": [
  {"method": "POST", "path": "/v1/request-landing", "body": "Ship landed\n"},
  {"method": "PUT", "path": "/v1/exhaust-port", "body": "Panic: deathstar exploded\n"}]}}
JSON
cat > "$work/proxy.yaml" <<YAML
snapshot: $labdir/snapshot.json
control_socket: $labdir/proxy.sock
listeners:
- {name: tiefighter-to-deathstar, listen: "127.0.0.1:15001", upstream: "127.0.0.1:18080",
   source: {pod: default/tiefighter}, destination: {pod: default/deathstar}, port: 80}
YAML
"$bin" lab serve --netns "$node" --spec "$work/deathstar.json" --ready "$work/server.ready" & disown
"$bin" proxy --netns "$node" --config "$work/proxy.yaml" --ready "$work/proxy.ready" 2>"$work/proxy.log" & disown
for _ in $(seq 1 100); do [ -e "$work/proxy.ready" ] && [ -e "$work/server.ready" ] && break; sleep 0.1; done
l7() { # method path [curl flags]
    local out
    out=$("$bin" lab run-in --netns "$node" -- curl -s -m 3 -w ' [%{http_code}]' "${@:3}" -X "$1" "http://127.0.0.1:15001$2" | tr -d '\r\n')
    printf 'tiefighter %-5s %-48s %-25s -> %s\n' "$1" "$2" "${3:-HTTP/1.1}" "$out"
}
echo "== requests through porin proxy (tiefighter -> deathstar)"
l7 POST /v1/request-landing
l7 PUT /v1/exhaust-port
l7 PUT /v1/exhaust-port --http2-prior-knowledge
l7 POST /v1/request-landing/../../v1/request-landing --path-as-is
l7 POST /v1/request-landing%2f.. --path-as-is
echo
echo "== porin observe --lab $lab --protocol http"
"$bin" observe --lab "$lab" --protocol http
