#!/usr/bin/env bash
# L3/L4 datapath benchmark: pod -> node -> pod in a lab, one run, four configurations side by side:
#   none            the lab with Porin's programs detached (plain veth + routing)
#   porin           Porin's tc programs with >= 10,000 policy entries in the maps
#   iptables-nft    no Porin, 10,000 non-matching DROP rules in the node's FORWARD chain (nft backend)
#   iptables-legacy the same with the legacy (xtables) backend, where the kernel has it
# Loads: TCP_RR (sockperf ping-pong, one connection; and porin-rr with 1 connection) and TCP_CRR
# (porin-rr: connect, 1-byte request/response, close). Server pinned to CPU 0, client to CPU 1.
# Prints a table with ratios to "none". Needs root. SECS=10 by default.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
setup_main
apt_install sockperf iptables nftables util-linux
work=$(mktemp -d)
cargo build --release --locked -p porin -p porin-benches --bin porin --bin porin-rr >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
PORIN=$PWD/target/release/porin
RR=$PWD/target/release/porin-rr
SECS=${SECS:-10}
CIDRS=${CIDRS:-460}
lab="bench-$$"
cleanup() { "$PORIN" lab down --name "$lab" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

# A server policy whose maps hold >= 10,000 entries: the client on the benchmark ports, plus CIDR
# identities each allowed on one port (every one gets its own full per-protocol profile).
{
    echo "apiVersion: cilium.io/v2"
    echo "kind: CiliumNetworkPolicy"
    echo "metadata: {name: bench}"
    echo "spec:"
    echo "  endpointSelector: {matchLabels: {app: server}}"
    echo "  ingress:"
    echo "  - fromEndpoints: [{matchLabels: {app: client}}]"
    echo "    toPorts: [{ports: [{port: \"5001\", protocol: TCP}, {port: \"11111\", protocol: TCP}]}]"
    for ((i = 0; i < CIDRS; i++)); do
        echo "  - fromCIDR: [\"198.18.$((i / 250)).$((i % 250 + 1))/32\"]"
        echo "    toPorts: [{ports: [{port: \"$((8000 + i))\", protocol: TCP}]}]"
    done
} > "$work/policy-10k.yaml"

# 10,000 non-matching rules ahead of the accept, for iptables.
{
    echo "*filter"
    echo ":FORWARD ACCEPT [0:0]"
    for ((i = 0; i < 10000; i++)); do
        echo "-A FORWARD -s 198.19.$((i / 250)).$((i % 250 + 1))/32 -j DROP"
    done
    echo "COMMIT"
} > "$work/iptables-10k.rules"

lab_file() { # $1: policy file or empty
    cat <<EOF
version: 1
policies: [${1}]
pods:
  - name: server
    labels: {app: server}
    command: [sh, -c, "taskset -c 0 sockperf sr --tcp -p 11111 >/dev/null 2>&1 & exec taskset -c 0 $RR serve 5001"]
  - name: client
    labels: {app: client}
EOF
}

run_loads() { # prints: sockperf_latency_us rr_tps crr_tps
    local ip
    ip=$("$PORIN" lab status -o json --name "$lab" | python3 -c 'import json,sys; print([p["addresses"][0] for p in json.load(sys.stdin)["pods"] if p["name"]=="server"][0])')
    sleep 1
    local lat rr crr
    lat=$("$PORIN" lab exec --name "$lab" client -- taskset -c 1 sockperf pp --tcp -i "$ip" -p 11111 -t "$SECS" 2>&1 \
        | sed -n 's/.*avg-latency=\([0-9.]*\).*/\1/p' | tail -1)
    rr=$("$PORIN" lab exec --name "$lab" client -- taskset -c 1 "$RR" rr "$ip:5001" "$SECS" 1)
    crr=$("$PORIN" lab exec --name "$lab" client -- taskset -c 1 "$RR" crr "$ip:5001" "$SECS" 4)
    echo "${lat:-nan} $rr $crr"
}

median() { python3 -c 'import sys,statistics; v=[float(x) for x in sys.argv[1:] if x!="nan"]; print(f"{statistics.median(v):.1f}" if v else "nan")' "$@"; }

ROUNDS=${ROUNDS:-3}
CONFIGS="none porin iptables-nft iptables-legacy"
declare -A LAT RRS CRR WHAT
for ((round = 1; round <= ROUNDS; round++)); do
    for cfg in $CONFIGS; do
        case $cfg in
            porin) lab_file "$work/policy-10k.yaml" > "$work/lab.yaml" ;;
            *) lab_file "" > "$work/lab.yaml" ;;
        esac
        "$PORIN" lab up "$work/lab.yaml" --name "$lab" >/dev/null
        case $cfg in
            none) "$PORIN" lab detach --name "$lab"; WHAT[$cfg]="-" ;;
            porin)
                WHAT[$cfg]="$("$PORIN" lab status -o json --name "$lab" | python3 -c 'import json,sys; print(json.load(sys.stdin)["agent"]["status"]["last_apply"]["policy_entries"])') entries"
                ;;
            iptables-*)
                "$PORIN" lab detach --name "$lab"
                if ip netns exec "porin-$lab-node" "${cfg}-restore" < "$work/iptables-10k.rules" 2>"$work/ipt.err"; then
                    WHAT[$cfg]="$(ip netns exec "porin-$lab-node" "${cfg}-save" | grep -c '^-A FORWARD') rules"
                else
                    WHAT[$cfg]="unavailable: $(head -1 "$work/ipt.err")"
                    "$PORIN" lab down --name "$lab"
                    continue
                fi
                ;;
        esac
        read -r l r c < <(run_loads)
        LAT[$cfg]="${LAT[$cfg]:-} $l"; RRS[$cfg]="${RRS[$cfg]:-} $r"; CRR[$cfg]="${CRR[$cfg]:-} $c"
        "$PORIN" lab down --name "$lab"
        echo "round $round $cfg: sockperf ${l}us RR ${r}/s CRR ${c}/s" >&2
    done
done

ratio() { python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print(f'{a/b:.3f}' if b else 'n/a')" "$1" "$2"; }
# sockperf reports one-way latency: a transaction is a round trip.
sock_tps() { python3 -c "import sys; v=float(sys.argv[1]); print(f'{1e6/(2*v):.0f}' if v==v and v>0 else 'nan')" "$1"; }
base_rr=$(median ${RRS[none]}); base_crr=$(median ${CRR[none]}); base_sp=$(sock_tps "$(median ${LAT[none]})")
printf '\n%-16s %-16s %10s %10s %7s %10s %7s %10s %7s\n' config policy "sp lat us" "sp RR/s" ratio "RR/s" ratio "CRR/s" ratio
for cfg in $CONFIGS; do
    if [ -z "${RRS[$cfg]:-}" ]; then
        printf '%-16s %s\n' "$cfg" "${WHAT[$cfg]:-}"
        continue
    fi
    lat=$(median ${LAT[$cfg]}); sp=$(sock_tps "$lat"); rr=$(median ${RRS[$cfg]}); crr=$(median ${CRR[$cfg]})
    printf '%-16s %-16s %10s %10s %7s %10s %7s %10s %7s\n' "$cfg" "${WHAT[$cfg]}" "$lat" "$sp" "$(ratio "$sp" "$base_sp")" \
        "$rr" "$(ratio "$rr" "$base_rr")" "$crr" "$(ratio "$crr" "$base_crr")"
done
echo "(medians of $ROUNDS interleaved rounds, ${SECS}s per load; sp = sockperf ping-pong, RR = porin-rr 1 connection,"
echo " CRR = porin-rr 4 connect loops; server on CPU 0, client on CPU 1)"
