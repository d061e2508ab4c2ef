#!/usr/bin/env bash
# mTLS tunnel benchmark: cross-node L7, one run, in a two-node lab (client on node1, an HTTP server
# on node2 with L7 ingress rules: GET / on 80; a second server's 8080 L3/L4). Configurations:
#   plain-2   the client's egress and the server's ingress have L7 rules, no authentication: node1's
#             proxy judges each request and sends it on in plain, node2's proxy judges it again
#             (the cross-node proxied path, both proxies, without the tunnel)
#   mtls-2    the same with `authentication: {mode: required}` on the ingress rules: node1's
#             proxy sends each request over a stream of its pooled mTLS HTTP/2 connection to
#             node2's proxy, which judges it on the identity the client certificate names
#   plain-1   only the server's ingress has L7 rules: the flow crosses in plain, node2's proxy
#             alone judges it
#   mtls-1    the same with authentication: node1's proxy relays the flow (L3/L4) through the
#             tunnel, node2's proxy judges it (a proxy hop plain-1 does not have)
# Loads from the client pod:
#   HTTP RR    wrk -t1 -c1 (keep-alive), GET /: req/s and p99
#   HTTP c16   wrk -t2 -c16 (keep-alive): req/s and p99
#   HTTP CRR   wrk -t1 -c4, Connection: close (a new flow, so a new tunnel stream, per request)
# and, in the mtls configuration, new flows through the tunnel itself (porin-tunnel-rate in node1's
# namespace with node1's credentials, GET / on 8080 over each stream, 4 at a time) with the pool
# warm (one connection carries every stream) and cold (each flow its own connection: TCP, TLS 1.3
# with client certificate, HTTP/2).
# Medians of ROUNDS interleaved rounds (each configuration in a fresh lab) of SECS seconds; ratios
# mtls-N/plain-N. Goal: mtls-2 >= 0.85 of plain-2 on HTTP RR and c16 req/s (the same proxies, the
# tunnel's cost alone). Needs root. SECS=5 ROUNDS=3.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
setup_main
apt_install wrk
SECS=${SECS:-5}
ROUNDS=${ROUNDS:-3}
work=$(mktemp -d /tmp/porin-mtls-bench.XXXXXX)
cargo build --release --locked -p porin -p porin-benches --bin porin --bin porin-tunnel-rate >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
PORIN=$PWD/target/release/porin
RATE=$PWD/target/release/porin-tunnel-rate
lab="bench-mtls-$$"
cleanup() { "$PORIN" lab down --name "$lab" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

policy() { # $1: "" or the authentication line; $2: egress rules too (1) or not (0)
    local rules=$'\n      rules: {http: [{method: GET, path: "/"}]}'
    cat <<EOF
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bench-server, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]$1
    toPorts:
    - ports: [{port: "80", protocol: TCP}]$rules
    - ports: [{port: "8080", protocol: TCP}]
EOF
    [ "$2" = 1 ] || return 0
    cat <<EOF
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bench-client, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: server}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]$rules
    - ports: [{port: "8080", protocol: TCP}]
EOF
}
auth=$'\n    authentication: {mode: required}'
policy "" 1 > "$work/plain-2.yaml"
policy "$auth" 1 > "$work/mtls-2.yaml"
policy "" 0 > "$work/plain-1.yaml"
policy "$auth" 0 > "$work/mtls-1.yaml"

lab_file() { # $1 config
    cat <<EOF
version: 1
policies: ["$work/$1.yaml"]
settings: {mesh: {trust_domain: cluster.local}}
nodes: [{name: node1}, {name: node2}]
pods:
  - {name: client, node: node1, labels: {app: client}}
  - name: server
    node: node2
    labels: {app: server}
    server: {http: {port: 80, routes: [{method: GET, path: /, body: "ok\n"}, {method: GET, path: /admin, body: "admin\n"}]}}
  - name: status
    node: node2
    labels: {app: server}
    server: {http: {port: 8080, routes: [{method: GET, path: /, body: "ok\n"}]}}
EOF
}
CONFIGS=${CONFIGS:-plain-2 mtls-2 plain-1 mtls-1}
for c in $CONFIGS; do lab_file "$c" > "$work/lab-$c.yaml"; done

up() { # $1 config: a fresh lab
    "$PORIN" lab down --name "$lab" >/dev/null 2>&1 || true
    "$PORIN" lab up --name "$lab" "$work/lab-$1.yaml" >/dev/null
    "$PORIN" lab exec --name "$lab" client -- sysctl -qw net.ipv4.ip_local_port_range="1024 65535" net.ipv4.tcp_tw_reuse=1
}
status() { "$PORIN" lab status --name "$lab" -o json; }
pod() { # $1 pod, $2 addr|identity
    status | python3 -c "import json,sys; p=[p for p in json.load(sys.stdin)['pods'] if p['name']=='$1'][0]; print(p['identity'] if '$2'=='identity' else p['addresses'][0])"
}
node_field() { # $1 node, $2 python expression over n (the node's status)
    status | python3 -c "import json,sys; n=[n for n in json.load(sys.stdin)['nodes'] if n['name']=='$1'][0]; print($2)"
}
streams_out() { node_field node1 "n['proxy']['status']['tunnel']['counters']['streams_out']"; }
in_client() { "$PORIN" lab exec --name "$lab" client -- "$@"; }
check() { # $1 config: GET / answers ok, /admin is refused; mtls: through the tunnel, plain: not
    local t got denied before after
    t=$(pod server addr)
    before=$(streams_out)
    for _ in $(seq 1 50); do
        got=$(in_client curl -s -m 3 "http://$t/" || true)
        [ "$got" = ok ] && break
        sleep 0.2
    done
    [ "$got" = ok ] || { echo "$1: GET http://$t/ answered '$got'" >&2; exit 1; }
    denied=$(in_client curl -s -o /dev/null -w '%{http_code}' -m 3 "http://$t/admin")
    [ "$denied" = 403 ] || { echo "$1: GET /admin got $denied, not 403" >&2; exit 1; }
    after=$(streams_out)
    case $1 in
        mtls-*) [ "$after" -gt "$before" ] || { echo "$1: the flows did not go through the tunnel" >&2; exit 1; } ;;
        plain-*) [ "$after" = "$before" ] || { echo "$1: the flows went through the tunnel" >&2; exit 1; } ;;
    esac
}
wrk_out() { # wrk output on stdin: "req/s p99_ms"; fails on errors or non-2xx answers
    local out
    out=$(cat)
    if grep -qE "Non-2xx|Socket errors: connect [1-9]|read [1-9]|timeout [1-9]" <<<"$out"; then
        echo "wrk reported errors:" >&2; echo "$out" >&2; exit 1
    fi
    python3 -c '
import re, sys
text = sys.stdin.read()
rps = float(re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M).group(1))
m = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
p99 = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)] if m else float("nan")
print(f"{rps:.0f} {p99:.3f}")' <<<"$out"
}
rate() { # $1 warm|cold: new flows/s through node1's tunnel
    local addr
    addr=$(node_field node2 "n['addresses'][0]")
    ip netns exec "porin-$lab-node1" "$RATE" "/run/porin/labs/$lab/nodes/node1/mesh-credentials.json" \
        "porin-$lab-node2" "$addr:15008" "$(pod client identity)" "$(pod client addr)" "$(pod status addr):8080" \
        "$SECS" 4 "$1"
}
median() { python3 -c 'import sys,statistics; v=[float(x) for x in sys.argv[1:] if x not in ("-","nan")]; print(f"{statistics.median(v):g}" if v else "-")' "$@"; }
ratio() { python3 -c "import sys; a,b=sys.argv[1],sys.argv[2]; print(f'{float(a)/float(b):.3f}' if a!='-' and b not in ('-','0') else '-')" "$1" "$2"; }

declare -A RR RRP C16 C16P CRR
WARM=""; COLD=""
for ((round = 1; round <= ROUNDS; round++)); do
    for c in $CONFIGS; do
        up "$c"
        check "$c"
        t=$(pod server addr)
        read -r a ap < <(in_client wrk -t1 -c1 -d"${SECS}s" --latency "http://$t/" | wrk_out)
        read -r b bp < <(in_client wrk -t2 -c16 -d"${SECS}s" --latency "http://$t/" | wrk_out)
        read -r d _ < <(in_client wrk -t1 -c4 -d"${SECS}s" -H "Connection: close" "http://$t/" | wrk_out)
        RR[$c]="${RR[$c]:-} $a"; RRP[$c]="${RRP[$c]:-} $ap"; C16[$c]="${C16[$c]:-} $b"; C16P[$c]="${C16P[$c]:-} $bp"; CRR[$c]="${CRR[$c]:-} $d"
        echo "round $round $c: HTTP RR $a/s (p99 $ap ms), c16 $b/s (p99 $bp ms), CRR $d/s" >&2
        if [ "$c" = mtls-1 ]; then
            w=$(rate warm); k=$(rate cold)
            WARM="$WARM $w"; COLD="$COLD $k"
            echo "round $round tunnel: new flows warm $w/s, cold $k/s" >&2
        fi
    done
done

row() { printf '%-8s %10s %8s %10s %8s %10s\n' "$@"; }
printf '\n'
row config "HTTP RR/s" "p99 ms" "c16 req/s" "p99 ms" "CRR/s"
for n in 2 1; do
    p=plain-$n; m=mtls-$n
    row "$p" "$(median ${RR[$p]})" "$(median ${RRP[$p]})" "$(median ${C16[$p]})" "$(median ${C16P[$p]})" "$(median ${CRR[$p]})"
    row "$m" "$(median ${RR[$m]})" "$(median ${RRP[$m]})" "$(median ${C16[$m]})" "$(median ${C16P[$m]})" "$(median ${CRR[$m]})"
    row "  ratio" "$(ratio "$(median ${RR[$m]})" "$(median ${RR[$p]})")" "$(ratio "$(median ${RRP[$m]})" "$(median ${RRP[$p]})")" \
        "$(ratio "$(median ${C16[$m]})" "$(median ${C16[$p]})")" "$(ratio "$(median ${C16P[$m]})" "$(median ${C16P[$p]})")" \
        "$(ratio "$(median ${CRR[$m]})" "$(median ${CRR[$p]})")"
done
w=$(median $WARM); k=$(median $COLD)
echo
echo "new flows through the tunnel (4 at a time, GET / over each): pool warm $w/s, cold $k/s (warm/cold $(ratio "$w" "$k"))"
echo "(medians of $ROUNDS interleaved rounds, ${SECS}s per load; client on node1, servers on node2;"
echo " goal: mtls-2 >= 0.85 of plain-2 on HTTP RR and c16 req/s)"
