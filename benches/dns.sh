#!/usr/bin/env bash
# DNS through Porin's DNS proxy, side by side in one lab (release build), dnsperf from the client pod:
#   direct   the DNS server (nsd) reached directly (an L3/L4 allow on 53, no DNS rules)
#   porin    the DNS rules of config/examples/fqdn/lab-egress.yaml: every query through the
#            transparent DNS proxy (judged, forwarded, its answer's addresses learned)
#   dnsmasq  a forwarding dnsmasq pod (cache off) on the same path, with an L3/L4 allow
#   dnsdist  a dnsdist pod (PowerDNS's DNS load balancer, no packet cache): a forwarder built for
#            speed, for scale
# dnsperf -l SECS over 1,000 names, the same for all three. Prints queries/s and average latency,
# and porin/direct and porin/dnsmasq.
# Then the resolve-to-allowed latency: fresh names (each its own address under a toFQDNs selector,
# so every answer writes the kernel's FQDN map before it is released) at RATE queries/s for SECS;
# p50 and p99 from the proxy's response records (query received -> answer released, maps written).
# Needs root. SECS=10 RATE=1000 by default.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
setup_main
bench_tools
SECS=${SECS:-10}
RATE=${RATE:-1000}
FRESH=$((SECS * RATE))
cargo build --release --locked -p porin >/dev/null 2>&1 || cargo build --release --locked -p porin
PORIN=$PWD/target/release/porin
work=$(mktemp -d /tmp/porin-dns-bench.XXXXXX)
lab="bench-dns-$$"
cleanup() { "$PORIN" lab down --name "$lab" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

# Pods get 10.244.0.(10 + index): client .10, coredns .11, dnsmasq .12, dnsdist .13.
coredns=10.244.0.11
dnsmasq=10.244.0.12
dnsdist=10.244.0.13
printf 'setLocal("0.0.0.0:53")\nnewServer({address="%s:53"})\nsetSecurityPollSuffix("")\n' "$coredns" > "$work/dnsdist.conf"
{
    echo "version: 1"
    echo "policies: [$PWD/config/examples/fqdn/lab-egress.yaml]"
    echo "pods:"
    echo "  - {name: client, labels: {app: client}}"
    echo "  - name: coredns"
    echo "    namespace: kube-system"
    echo "    labels: {k8s-app: kube-dns}"
    echo "    server:"
    echo "      dns:"
    echo "        zones:"
    echo "          - name: example.com"
    echo "            ttl: 300"
    echo "            records:"
    for i in $(seq 0 999); do echo "              - {name: n$i, addresses: [198.18.$((i / 250)).$((i % 250 + 1))]}"; done
    for i in $(seq 0 $((FRESH - 1))); do echo "              - {name: f$i, addresses: [198.19.$((i / 250 % 256)).$((i % 250 + 1))]}"; done
    echo "  - name: dnsmasq"
    echo "    labels: {app: dnsmasq}"
    echo "    command: [dnsmasq, --no-daemon, --cache-size=0, --no-resolv, --server=$coredns, --listen-address=0.0.0.0, --bind-interfaces, --port=53, --user=root, --no-hosts]"
    echo "  - name: dnsdist"
    echo "    labels: {app: dnsdist}"
    echo "    command: [dnsdist, --supervised, --disable-syslog, -C, $work/dnsdist.conf]"
} > "$work/lab.yaml"
cat > "$work/direct.yaml" <<'EOF'
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: dns-l4}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEntities: [cluster]
    toPorts: [{ports: [{port: "53", protocol: UDP}]}]
EOF
cat > "$work/fresh.yaml" <<'EOF'
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: fresh}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s:k8s-app: kube-dns}}]
    toPorts: [{ports: [{port: "53", protocol: UDP}], rules: {dns: [{matchPattern: "*.example.com"}]}}]
  - toFQDNs: [{matchPattern: "f*.example.com"}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
EOF
for i in $(seq 0 999); do echo "n$i.example.com A"; done > "$work/names"
for i in $(seq 0 $((FRESH - 1))); do echo "f$i.example.com A"; done > "$work/fresh-names"

"$PORIN" lab up --name "$lab" "$work/lab.yaml" >/dev/null
apply() { "$PORIN" lab apply --name "$lab" "$1" >/dev/null; sleep 0.5; }
perf() {
    "$PORIN" lab exec --name "$lab" client -- dnsperf -s "$1" -d "$work/names" -l "$SECS" -c 4 -T 2 -q 200 2>&1
}

printf '%-8s %12s %12s %10s\n' config "queries/s" "avg ms" lost
declare -A QPS
for config in direct porin dnsmasq dnsdist; do
    case $config in
        direct) apply "$work/direct.yaml"; server=$coredns ;;
        porin) apply "$PWD/config/examples/fqdn/lab-egress.yaml"; server=$coredns ;;
        dnsmasq) apply "$work/direct.yaml"; server=$dnsmasq ;;
        dnsdist) apply "$work/direct.yaml"; server=$dnsdist ;;
    esac
    out=$(perf "$server")
    qps=$(awk '/Queries per second/ {print int($4)}' <<<"$out")
    avg=$(awk '/Average Latency/ {printf "%.3f", $4 * 1000}' <<<"$out")
    lost=$(awk '/Queries lost/ {print $3}' <<<"$out")
    QPS[$config]=$qps
    printf '%-8s %12s %12s %10s\n' "$config" "$qps" "$avg" "$lost"
done
echo
awk -v p="${QPS[porin]}" -v d="${QPS[direct]}" -v m="${QPS[dnsmasq]}" -v x="${QPS[dnsdist]}" \
    'BEGIN { printf "porin / direct %.2f (goal >= 0.5)   porin / dnsmasq %.2f (goal >= 1.5)   porin / dnsdist %.2f\n", p / d, p / m, p / x }'

echo
echo "== resolve-to-allowed latency: $FRESH fresh names at $RATE/s (each answer writes the FQDN map first)"
apply "$work/fresh.yaml"
"$PORIN" lab exec --name "$lab" client -- dnsperf -s "$coredns" -d "$work/fresh-names" -n 1 -Q "$RATE" -c 4 -T 2 -q 200 2>&1 \
    | awk '/Queries (sent|completed|lost)|Average Latency/'
"$PORIN" observe --lab "$lab" -o json --protocol dns --last 100000 2>/dev/null | python3 -c '
import json, sys
lat = sorted(f["l7"].get("latency_ns", 0) / 1e6 for f in map(json.loads, sys.stdin)
             if f.get("l7", {}).get("type") == "RESPONSE" and f["l7"]["dns"]["query"].startswith("f"))
if not lat:
    sys.exit("no response records")
pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
print(f"proxy response records: {len(lat)} (the backlog keeps the newest 8,192)")
print(f"query received -> answer released (maps written): p50 {pick(0.5):.3f} ms  p99 {pick(0.99):.3f} ms  max {lat[-1]:.3f} ms (goal p99 <= 2 ms)")
'
learned=$("$PORIN" fqdn cache list --lab "$lab" -o json | grep -c '"f' || true)
echo "names learned: $learned"
