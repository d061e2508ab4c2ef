#!/usr/bin/env bash
# Pod -> pod L7 benchmark over the sidecar-less path, one run, in a lab (node + two pods):
#   none     client pod -> server pod (nginx), an L3/L4 allow-all policy, no L7
#   porin    the same pods; the 100-rule allow-list of benches/peers.sh on the server: the kernel
#            hands every flow to the node's proxy (bpf_sk_assign), which judges each request
#   haproxy  client -> HAProxy in the node namespace (explicit proxy, same 100 rules) -> server
#   envoy    client -> Envoy in the node namespace (explicit proxy, same 100 rules) -> server
# Every proxy with one worker thread. wrk -t2 -c50 from the client pod, ROUNDS interleaved rounds of
# SECS seconds; latency one request at a time (wrk -t1 -c1). Prints the table and the ratios.
# Needs root. SECS=10 ROUNDS=2 by default.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
. benches/peers.sh
setup_main
peers_install
SECS=${SECS:-10}
ROUNDS=${ROUNDS:-2}
RULES=100
PATH_HIT=/api/v1/svc$((RULES - 1))/item
cargo build --release --locked -p porin >/dev/null 2>&1 || cargo build --release --locked -p porin
PORIN=$PWD/target/release/porin
work=$(mktemp -d /tmp/porin-sidecarless-bench.XXXXXX)
mkdir -p "$work/tmp" "$work/logs"
lab="bench-l7-$$"
cleanup() { "$PORIN" lab down --name "$lab" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

# The server pod runs the peers' nginx backend (one worker) on 8080; its namespace is private.
sed -e "s|@SCRATCH@|$work|g" -e "s|listen 127.0.0.1:18080;|listen 8080;|" -e "s|listen 127.0.0.1:18081 http2;|listen 8081 http2;|" \
    "$PEERS/backend-nginx.conf" > "$work/backend.conf"
cat > "$work/lab.yaml" <<EOF
version: 1
policies: []
pods:
  - {name: server, labels: {app: server}, command: [nginx, -c, "$work/backend.conf", -g, "daemon off;"]}
  - {name: client, labels: {app: client}}
EOF
allow_list_policy "$RULES" server 8080 > "$work/l7.yaml"
cat > "$work/l4.yaml" <<'EOF'
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bench-l4-allow-all}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEntities: [all]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
EOF
PORIN_PROXY_THREADS=1 "$PORIN" lab up --name "$lab" "$work/lab.yaml" >/dev/null
node="porin-$lab-node"
server=$("$PORIN" lab status --name "$lab" -o json | python3 -c 'import json,sys; print([p for p in json.load(sys.stdin)["pods"] if p["name"]=="server"][0]["addresses"][0])')
NODE_IP=10.244.255.1
HP=10001; EP=10000; EA=9901
haproxy_cfg "$work" "$NODE_IP:$HP" "$server:8080" "$RULES" > "$work/haproxy.cfg"
envoy_cfg "$work/envoy.json" "$NODE_IP" "$EP" "$EA" "$server" 8080 "$RULES"
"$PORIN" lab run-in --netns "$node" -- haproxy -f "$work/haproxy.cfg" -db >"$work/logs/haproxy.log" 2>&1 & disown
"$PORIN" lab run-in --netns "$node" -- "$VENV/bin/envoy" -c "$work/envoy.json" --concurrency 1 --log-level error --base-id $$ >"$work/logs/envoy.log" 2>&1 & disown

apply() { "$PORIN" lab apply --name "$lab" "$1" >/dev/null; sleep 0.3; }
in_client() { "$PORIN" lab exec --name "$lab" client -- "$@"; }
url() { case $1 in none | porin) echo "http://$server:8080$PATH_HIT" ;; haproxy) echo "http://$NODE_IP:$HP$PATH_HIT" ;; envoy) echo "http://$NODE_IP:$EP$PATH_HIT" ;; esac; }
policy_for() { if [ "$1" = porin ]; then echo "$work/l7.yaml"; else echo "$work/l4.yaml"; fi; }
check() { # $1 config: the allowed request answers 200; through a proxy a denied one gets 403
    local ok denied
    ok=$(in_client curl -s -o /dev/null -w '%{http_code}' -m 3 "$(url "$1")")
    denied=$(in_client curl -s -o /dev/null -w '%{http_code}' -m 3 "$(url "$1" | sed 's|/api/v1/svc[0-9]*/item|/admin|')")
    [ "$ok" = 200 ] || { echo "$1: allowed request got $ok" >&2; cat "$work"/logs/*.log >&2; exit 1; }
    if [ "$1" != none ] && [ "$denied" != 403 ]; then echo "$1: denied request got $denied" >&2; exit 1; fi
}
for c in none haproxy envoy porin; do apply "$(policy_for $c)"; for _ in $(seq 1 50); do check "$c" 2>/dev/null && break; sleep 0.1; done; check "$c"; done

declare -A RPS L50 L99
echo "Pod -> pod: wrk -t2 -c50 -d${SECS}s GET $PATH_HIT from the client pod, $ROUNDS rounds"
for ((r = 1; r <= ROUNDS; r++)); do
    echo " round $r"
    for c in none porin haproxy envoy; do
        apply "$(policy_for $c)"
        out=$(in_client wrk -t2 -c50 -d"${SECS}s" "$(url $c)")
        grep -q "Non-2xx" <<<"$out" && { echo "$c: non-2xx answers" >&2; echo "$out" >&2; exit 1; }
        rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
        RPS[$c]="${RPS[$c]:-} $rps"
        printf '  %-8s %10.0f req/s\n' "$c" "$rps"
    done
done
echo
echo "Latency, one request at a time (wrk -t1 -c1 -d${SECS}s)"
for c in none porin haproxy envoy; do
    apply "$(policy_for $c)"
    out=$(in_client wrk -t1 -c1 -d"${SECS}s" --latency "$(url $c)")
    L50[$c]=$(to_us "$(awk '$1 == "50%" {print $2}' <<<"$out")")
    L99[$c]=$(to_us "$(awk '$1 == "99%" {print $2}' <<<"$out")")
    printf '  %-8s p50 %6.0f us   p99 %6.0f us\n' "$c" "${L50[$c]}" "${L99[$c]}"
done
n=$(mean "${RPS[none]}"); p=$(mean "${RPS[porin]}"); h=$(mean "${RPS[haproxy]}"); e=$(mean "${RPS[envoy]}")
echo
echo "Summary (mean of $ROUNDS rounds)"
printf '  %-8s %10.0f req/s\n' none "$n" porin "$p" haproxy "$h" envoy "$e"
awk -v n="$n" -v p="$p" -v h="$h" -v e="$e" -v n99="${L99[none]}" -v p99="${L99[porin]}" -v n50="${L50[none]}" -v p50="${L50[porin]}" 'BEGIN {
    printf "  porin / none    = %.2f   (target >= 0.75)\n", p / n
    printf "  porin / haproxy = %.2f   (target >= 1.20)\n", p / h
    printf "  porin / envoy   = %.2f   (target >= 3.00)\n", p / e
    printf "  added by porin: p50 %.0f us, p99 %.0f us (target p99 <= 500 us)\n", p50 - n50, p99 - n99
}'
