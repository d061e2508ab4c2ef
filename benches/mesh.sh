#!/usr/bin/env bash
# Mesh benchmark: cross-node pod -> service, one run, in a two-node lab (client on node1, three
# server pods on node2, each an HTTP server on 80 and a TCP echo on 5001). The bench service has
# one backend (server-1), so every row but the last talks to the same server process as "direct"
# and the ratios are the cost of the path alone. Configurations:
#   direct        no services, no policy: the client talks to server-1's pod address (the base)
#   lb-1          one Service (bench), balanced by Porin in the kernel at the socket
#   lb-1k         the same with 1,000 Services defined (the 999 others with three backends each:
#                 1,000 frontends per port, ~3,000 backend slots in the LB maps)
#   iptables-1k   the foil: no Porin services; kube-proxy-style iptables DNAT in node1 (the
#                 KUBE-SERVICES -> KUBE-SVC-* (statistic random) -> KUBE-SEP-* (DNAT) chains of
#                 kube-proxy's iptables mode) for 1,000 services, the bench one last in KUBE-SERVICES
#                 (the linear scan's worst case); conntrack de-NATs the replies
#   lb-1k-l4      lb-1k + L3/L4 policy: the backends admit the client on 80 and 5001, the client
#                 may reach only the backends on them (both nodes enforce: egress at node1,
#                 ingress at node2)
#   lb-1k-l7      lb-1k + L7 policy through the proxies: the client's egress and the backends'
#                 ingress allow only GET / on 80 (node1's proxy judges and balances each request
#                 over the backends, node2's proxy judges it again); 5001 stays L3/L4
#   lb-1k-3be     lb-1k, but to a service over all three server pods (bench3): the spread itself
#                 (on a 2-core machine three busy server processes cost more than one)
# Every configuration of every round runs in a fresh lab (TIME_WAIT sockets and conntrack entries of
# one would skew the next: a CRR run leaves tens of thousands). Loads from the client pod (in its cgroup, so the kernel LB sees its connects):
#   TCP RR   porin-rr, one connection, one-byte ping-pong on 5001 (not run where 5001 is what
#            lb-1k-l4 already measures)
#   TCP CRR  porin-rr, 4 loops of connect, one-byte request/response, close
#   HTTP RR  wrk -t1 -c1 (keep-alive), GET /
#   HTTP CRR wrk -t1 -c4 with Connection: close (a connection per request)
# Medians of ROUNDS interleaved rounds of SECS seconds; ratios to "direct". Goal: lb-1k within
# 5 % of direct (ratio >= 0.95) on every load. Needs root. SECS=5 ROUNDS=3 by default.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
setup_main
apt_install iptables wrk
SECS=${SECS:-5}
ROUNDS=${ROUNDS:-3}
SERVICES=${SERVICES:-1000}
work=$(mktemp -d /tmp/porin-mesh-bench.XXXXXX)
cargo build --release --locked -p porin -p porin-benches --bin porin --bin porin-rr >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
PORIN=$PWD/target/release/porin
RR=$PWD/target/release/porin-rr
lab="bench-mesh-$$"
node1="porin-$lab-node1"
cleanup() { "$PORIN" lab down --name "$lab" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

VIP=10.96.0.10     # the bench Service (Porin): server-1
VIP3=10.96.0.12    # bench3: the three servers
IPT_VIP=10.100.0.10 # the bench service (iptables)

cat > "$work/lab.yaml" <<'EOF'
version: 1
policies: []
nodes: [{name: node1}, {name: node2}]
pods:
  - {name: client, node: node1, labels: {app: client}}
  - {name: server-1, node: node2, labels: {app: server, bench: one}, server: {tcp_echo: 5001, http: {port: 80, routes: [{method: GET, path: /, body: "ok\n"}]}}}
  - {name: server-2, node: node2, labels: {app: server}, server: {tcp_echo: 5001, http: {port: 80, routes: [{method: GET, path: /, body: "ok\n"}]}}}
  - {name: server-3, node: node2, labels: {app: server}, server: {tcp_echo: 5001, http: {port: 80, routes: [{method: GET, path: /, body: "ok\n"}]}}}
EOF

service() { # $1 name, $2 cluster IP, $3 extra metadata lines, $4 selector (default: the servers)
    local selector=${4:-"{app: server}"}
    cat <<EOF
---
apiVersion: v1
kind: Service
metadata:
  name: $1
  namespace: default
$3
spec:
  clusterIP: $2
  selector: $selector
  ports:
  - {name: http, port: 80, targetPort: 80, protocol: TCP}
  - {name: echo, port: 5001, targetPort: 5001, protocol: TCP}
EOF
}
{
    service bench "$VIP" "" "{app: server, bench: one}"
    # bench3 opts in to per-request balancing in the proxy (used when its flows are proxied).
    service bench3 "$VIP3" "  annotations: {service.cilium.io/lb-l7: enabled}"
} > "$work/bench-svc.yaml"
for ((i = 2; i < SERVICES; i++)); do
    service "filler-$i" "10.96.$((1 + i / 250)).$((i % 250 + 1))" ""
done > "$work/fillers.yaml"
echo "# no policy, no services" > "$work/nothing.yaml"

policies() { # $1: the HTTP rule on port 80 ("": L3/L4 only). The backends admit the client and
    # the client may reach only the backends, on 80 and 5001 (5001 always L3/L4).
    local rules="" side name sel dir peer_key peer
    if [ -n "$1" ]; then rules=$'\n'"      rules: {http: [$1]}"; fi
    for side in "bench-backends server ingress fromEndpoints client" "bench-client client egress toEndpoints server"; do
        read -r name sel dir peer_key peer <<<"$side"
        cat <<EOF
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: $name}
spec:
  endpointSelector: {matchLabels: {app: $sel}}
  $dir:
  - $peer_key: [{matchLabels: {app: $peer}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]$rules
    - ports: [{port: "5001", protocol: TCP}]
EOF
    done
}
policies "" > "$work/l4.yaml"
policies '{method: GET, path: "/"}' > "$work/l7.yaml"

up() { # a fresh lab: no TIME_WAIT, conntrack or LB state carried from one configuration to the next
    "$PORIN" lab down --name "$lab" >/dev/null 2>&1 || true
    "$PORIN" lab up --name "$lab" "$work/lab.yaml" >/dev/null
    # Room for a CRR run's TIME_WAIT sockets in the client (a connect must not hunt for a port).
    "$PORIN" lab exec --name "$lab" client -- sysctl -qw net.ipv4.ip_local_port_range="1024 65535" net.ipv4.tcp_tw_reuse=1
}
up
addr() { "$PORIN" lab status --name "$lab" -o json | python3 -c "import json,sys; print([p for p in json.load(sys.stdin)['pods'] if p['name']=='$1'][0]['addresses'][0])"; }
S1=$(addr server-1); S2=$(addr server-2); S3=$(addr server-3)

# kube-proxy's iptables mode for SERVICES services of three endpoints each (ports 80 and 5001).
{
    echo "*nat"
    echo ":PREROUTING ACCEPT [0:0]"
    echo ":OUTPUT ACCEPT [0:0]"
    echo ":POSTROUTING ACCEPT [0:0]"
    echo ":KUBE-SERVICES - [0:0]"
    echo ":KUBE-MARK-MASQ - [0:0]"
    echo "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
    echo "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
    echo "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000"
    rules=$work/ipt-rules
    : > "$rules"
    for ((i = 1; i <= SERVICES; i++)); do
        # Fillers first, the bench service (i = SERVICES) last.
        if ((i == SERVICES)); then vip=$IPT_VIP; else vip="10.100.$((1 + i / 250)).$((i % 250 + 1))"; fi
        for port in 80 5001; do
            svc="KUBE-SVC-$(printf '%05d%05d' "$i" "$port")"
            echo ":$svc - [0:0]"
            echo "-A KUBE-SERVICES -d $vip/32 -p tcp -m comment --comment \"default/svc-$i:$port cluster IP\" -m tcp --dport $port -j $svc"
            n=0
            bes="$S1 $S2 $S3"
            if ((i == SERVICES)); then bes=$S1; fi
            for be in $bes; do
                n=$((n + 1))
                sep="KUBE-SEP-$(printf '%05d%05d%d' "$i" "$port" "$n")"
                echo ":$sep - [0:0]"
                case $((i == SERVICES ? 3 : n)) in
                    1) echo "-A $svc -m statistic --mode random --probability 0.33333333349 -j $sep" >> "$rules" ;;
                    2) echo "-A $svc -m statistic --mode random --probability 0.50000000000 -j $sep" >> "$rules" ;;
                    3) echo "-A $svc -j $sep" >> "$rules" ;;
                esac
                echo "-A $sep -s $be/32 -j KUBE-MARK-MASQ" >> "$rules"
                echo "-A $sep -p tcp -m tcp -j DNAT --to-destination $be:$port" >> "$rules"
            done
        done
    done
    cat "$rules"
    echo "COMMIT"
} > "$work/iptables.rules"

apply() { "$PORIN" lab apply --name "$lab" "$@" >/dev/null; sleep 0.5; }
in_client() { "$PORIN" lab exec --name "$lab" client -- "$@"; }
iptables_on() { ip netns exec "$node1" iptables-restore < "$work/iptables.rules"; }
target() { case $1 in direct) echo "$S1" ;; iptables-1k) echo "$IPT_VIP" ;; lb-1k-3be) echo "$VIP3" ;; *) echo "$VIP" ;; esac; }
setup() { # $1 config
    case $1 in
        direct) apply "$work/nothing.yaml" ;;
        lb-1) apply "$work/bench-svc.yaml" ;;
        lb-1k | lb-1k-3be) apply "$work/bench-svc.yaml" "$work/fillers.yaml" ;;
        iptables-1k) apply "$work/nothing.yaml"; iptables_on ;;
        lb-1k-l4) apply "$work/bench-svc.yaml" "$work/fillers.yaml" "$work/l4.yaml" ;;
        lb-1k-l7) apply "$work/bench-svc.yaml" "$work/fillers.yaml" "$work/l7.yaml" ;;
    esac
}
check() { # $1 config: GET / answers ok; under L7 policy another path is refused with 403
    local t got denied
    t=$(target "$1")
    for _ in $(seq 1 50); do
        got=$(in_client curl -s -m 3 "http://$t/" || true)
        [ "$got" = ok ] && break
        sleep 0.2
    done
    [ "$got" = ok ] || { echo "$1: GET http://$t/ answered '$got'" >&2; exit 1; }
    if [ "$1" = lb-1k-l7 ]; then
        denied=$(in_client curl -s -o /dev/null -w '%{http_code}' -m 3 "http://$t/admin")
        [ "$denied" = 403 ] || { echo "$1: GET /admin got $denied, not 403" >&2; exit 1; }
    fi
}
wrk_rps() { # wrk output on stdin: requests/s; fails on errors or non-2xx answers
    local out
    out=$(cat)
    if grep -qE "Non-2xx|Socket errors: connect [1-9]|read [1-9]|timeout [1-9]" <<<"$out"; then
        echo "wrk reported errors:" >&2; echo "$out" >&2; exit 1
    fi
    awk '/^Requests\/sec/ {printf "%.0f", $2}' <<<"$out"
}
loads() { # $1 config: prints "tcp_rr tcp_crr http_rr http_crr"
    local t trr tcrr hrr hcrr
    t=$(target "$1")
    if [ "$1" = lb-1k-l7 ]; then
        trr=-; tcrr=-
    else
        trr=$(in_client "$RR" rr "$t:5001" "$SECS" 1)
        tcrr=$(in_client "$RR" crr "$t:5001" "$SECS" 4)
    fi
    hrr=$(in_client wrk -t1 -c1 -d"${SECS}s" "http://$t/" | wrk_rps)
    hcrr=$(in_client wrk -t1 -c4 -d"${SECS}s" -H "Connection: close" "http://$t/" | wrk_rps)
    echo "$trr $tcrr $hrr $hcrr"
}
median() { python3 -c 'import sys,statistics; v=[float(x) for x in sys.argv[1:] if x not in ("-","nan")]; print(f"{statistics.median(v):.0f}" if v else "-")' "$@"; }
ratio() { python3 -c "import sys; a,b=sys.argv[1],sys.argv[2]; print(f'{float(a)/float(b):.3f}' if a!='-' and b not in ('-','0') else '-')" "$1" "$2"; }

CONFIGS=${CONFIGS:-"direct lb-1 lb-1k iptables-1k lb-1k-l4 lb-1k-l7 lb-1k-3be"} # "direct" is the base: keep it first
declare -A TRR TCRR HRR HCRR
for ((round = 1; round <= ROUNDS; round++)); do
    for c in $CONFIGS; do
        up
        [ "$(addr server-1) $(addr server-2) $(addr server-3)" = "$S1 $S2 $S3" ] || { echo "backend addresses changed" >&2; exit 1; }
        setup "$c"
        check "$c"
        read -r a b d e < <(loads "$c")
        TRR[$c]="${TRR[$c]:-} $a"; TCRR[$c]="${TCRR[$c]:-} $b"; HRR[$c]="${HRR[$c]:-} $d"; HCRR[$c]="${HCRR[$c]:-} $e"
        echo "round $round $c: TCP RR $a/s, TCP CRR $b/s, HTTP RR $d/s, HTTP CRR $e/s" >&2
    done
done

# The kernel LB did translate (and found a backend every time): node1's counters after the last
# lb-1k-l7 run.
counters=$("$PORIN" lab counters --name "$lab" --node node1)
translated=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["lb_translated"])' <<<"$counters")
no_backend=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["lb_no_backend"])' <<<"$counters")
frontends=$("$PORIN" lab status --name "$lab" -o json | python3 -c '
import json, sys
st = json.load(sys.stdin)
node = [n for n in st["nodes"] if n["name"] == "node1"][0]
print(len(node["agent"]["status"]["services"]))')

b_trr=$(median ${TRR[direct]}); b_tcrr=$(median ${TCRR[direct]}); b_hrr=$(median ${HRR[direct]}); b_hcrr=$(median ${HCRR[direct]})
printf '\n%-12s %9s %6s %9s %6s %9s %6s %9s %6s\n' config "TCP RR/s" ratio "TCP CRR/s" ratio "HTTP RR/s" ratio "HTTPCRR/s" ratio
for c in $CONFIGS; do
    trr=$(median ${TRR[$c]}); tcrr=$(median ${TCRR[$c]}); hrr=$(median ${HRR[$c]}); hcrr=$(median ${HCRR[$c]})
    printf '%-12s %9s %6s %9s %6s %9s %6s %9s %6s\n' "$c" "$trr" "$(ratio "$trr" "$b_trr")" "$tcrr" "$(ratio "$tcrr" "$b_tcrr")" \
        "$hrr" "$(ratio "$hrr" "$b_hrr")" "$hcrr" "$(ratio "$hcrr" "$b_hcrr")"
done
echo "(medians of $ROUNDS interleaved rounds, ${SECS}s per load; client on node1, 3 backends on node2;"
echo " goal: lb-1k >= 0.95 of direct on every load; node1's kernel LB: $translated connects translated,"
echo " $no_backend without a backend; services known to node1's agent: $frontends)"
