#!/usr/bin/env bash
# L7 proxy benchmark, one run, side by side on this box (same backend, same client, same 100-rule
# allow-list, every proxy with one worker thread):
#   direct   wrk -> nginx backend
#   porin    wrk -> porin proxy (100 HTTP rules of a CiliumNetworkPolicy) -> nginx
#   haproxy  wrk -> HAProxy (100 path_reg ACLs, as ../shared/peers/proxy-haproxy.cfg) -> nginx
#   envoy    wrk -> Envoy (RBAC with 100 policies, as ../shared/peers/proxy-envoy.yaml) -> nginx
# HTTP/1.1: wrk -t2 -c50, ROUNDS rounds of SECS seconds, interleaved; h2c: h2load -c50 -m10.
# Prints req/s, p99, ratios, the p99 Porin adds, and the proxy's RSS idle and after load.
# Runs on 127.0.0.1 only; ports are picked free at start. SECS=10 ROUNDS=2 by default.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
. benches/peers.sh
rust_components
peers_install
SECS=${SECS:-10}
ROUNDS=${ROUNDS:-2}
bench_start l7
B1=$(free_port); B2=$(free_port); PP=$(free_port); PP2=$(free_port); HP=$(free_port); EP=$(free_port); EA=$(free_port)
RULES=100
PATH_HIT=/api/v1/svc$((RULES - 1))/item

# Backend: the peers' nginx (one worker), on our ports.
sed -e "s|@SCRATCH@|$work|g" -e "s|127.0.0.1:18080|127.0.0.1:$B1|" -e "s|127.0.0.1:18081|127.0.0.1:$B2|" \
    "$PEERS/backend-nginx.conf" > "$work/backend.conf"
nginx -c "$work/backend.conf" -g 'daemon off;' 2>"$work/logs/nginx.log" & pids+=($!)

allow_list_policy "$RULES" backend 80 > "$work/policy.yaml"
echo '{"endpoints": [{"id": 1, "name": "backend", "namespace": "default", "labels": {"app": "backend"}, "ips": ["10.0.0.1"], "ifname": "none"}]}' > "$work/endpoints.json"
"$PORIN" policy publish --endpoints "$work/endpoints.json" -o "$work/snapshot.json" "$work/policy.yaml" 2>/dev/null
cat > "$work/porin.yaml" <<EOF
snapshot: $work/snapshot.json
listeners:
- {name: h1, listen: "127.0.0.1:$PP", upstream: "127.0.0.1:$B1", source: {identity: 2}, destination: {pod: default/backend}, port: 80}
- {name: h2, listen: "127.0.0.1:$PP2", upstream: "127.0.0.1:$B2", source: {identity: 2}, destination: {pod: default/backend}, port: 80}
EOF
"$PORIN" proxy --config "$work/porin.yaml" --threads 1 --ready "$work/porin.ready" 2>"$work/logs/porin.log" & porin_pid=$!; pids+=($porin_pid)

# HAProxy and Envoy: the peers' configs with the same 100 rules (benches/peers.sh).
haproxy_cfg "$work" "127.0.0.1:$HP" "127.0.0.1:$B1" "$RULES" > "$work/haproxy.cfg"
haproxy -f "$work/haproxy.cfg" -db 2>"$work/logs/haproxy.log" & pids+=($!)

envoy_cfg "$work/envoy.json" 127.0.0.1 "$EP" "$EA" 127.0.0.1 "$B1" "$RULES"
"$VENV/bin/envoy" -c "$work/envoy.json" --concurrency 1 --log-level error --base-id $$ 2>"$work/logs/envoy.log" & pids+=($!)

wait_http "http://127.0.0.1:$B1/" 200
for p in $PP $HP $EP; do
    wait_http "http://127.0.0.1:$p$PATH_HIT" 200
    wait_http "http://127.0.0.1:$p/denied" 403
done
RSS_IDLE=$(rss_kb "$porin_pid")

declare -A RPS P99
run_wrk() { # $1 name, $2 port
    local out rps p99
    out=$(wrk -t2 -c50 -d"${SECS}s" --latency "http://127.0.0.1:$2$PATH_HIT")
    rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    if grep -q "Non-2xx" <<<"$out"; then echo "$1: non-2xx answers during the run" >&2; echo "$out" >&2; exit 1; fi
    RPS[$1]="${RPS[$1]:-} $rps"
    P99[$1]="${P99[$1]:-} $(to_us "$p99")"
    printf '  %-8s %10.0f req/s  p99 %s\n' "$1" "$rps" "$p99"
}
echo "HTTP/1.1: wrk -t2 -c50 -d${SECS}s GET $PATH_HIT (rule $RULES of $RULES), $ROUNDS rounds"
for ((r = 1; r <= ROUNDS; r++)); do
    echo " round $r"
    run_wrk direct "$B1"
    run_wrk porin "$PP"
    run_wrk haproxy "$HP"
    run_wrk envoy "$EP"
done
RSS_LOADED=$(rss_kb "$porin_pid")
d=$(mean "${RPS[direct]}"); p=$(mean "${RPS[porin]}"); h=$(mean "${RPS[haproxy]}"); e=$(mean "${RPS[envoy]}")
dp99=$(mean "${P99[direct]}"); pp99=$(mean "${P99[porin]}")
echo
echo "HTTP/1.1 summary (mean of $ROUNDS rounds)"
printf '  %-8s %10.0f req/s   p99 %8.0f us\n' direct "$d" "$dp99" porin "$p" "$pp99" haproxy "$h" "$(mean "${P99[haproxy]}")" envoy "$e" "$(mean "${P99[envoy]}")"
awk -v d="$d" -v p="$p" -v h="$h" -v e="$e" 'BEGIN {
    printf "  porin / direct  = %.2f   (target >= 0.75)\n", p / d
    printf "  porin / haproxy = %.2f   (target >= 1.20)\n", p / h
    printf "  porin / envoy   = %.2f   (target >= 3.00)\n", p / e
}'
# At saturation p99 is queueing, not the hop: measure the added latency one request at a time.
echo
echo "Latency, one request at a time: wrk -t1 -c1 -d${SECS}s"
declare -A L50 L99
for n in direct porin haproxy envoy; do
    case $n in direct) port=$B1 ;; porin) port=$PP ;; haproxy) port=$HP ;; envoy) port=$EP ;; esac
    out=$(wrk -t1 -c1 -d"${SECS}s" --latency "http://127.0.0.1:$port$PATH_HIT")
    L50[$n]=$(to_us "$(awk '$1 == "50%" {print $2}' <<<"$out")")
    L99[$n]=$(to_us "$(awk '$1 == "99%" {print $2}' <<<"$out")")
    printf '  %-8s p50 %6.0f us   p99 %6.0f us\n' "$n" "${L50[$n]}" "${L99[$n]}"
done
awk -v dp="${L99[direct]}" -v pp="${L99[porin]}" -v d5="${L50[direct]}" -v p5="${L50[porin]}" \
    'BEGIN { printf "  added by porin: p50 %.0f us, p99 %.0f us (target p99 <= 500 us)\n", p5 - d5, pp - dp }'

echo
echo "h2c: h2load -c50 -m10 -D ${SECS}s"
h2() { # $1 name, $2 port: prints the req/s
    local out
    out=$(h2load -c50 -m10 -D "$SECS" "http://127.0.0.1:$2$PATH_HIT")
    grep -q "0 failed, 0 errored" <<<"$out" || { echo "$1: h2load saw failures" >&2; echo "$out" >&2; exit 1; }
    awk '/^finished in/ {print $4}' <<<"$out"
}
hd=$(h2 direct "$B2"); printf '  %-8s %10.0f req/s\n' direct "$hd"
hp=$(h2 porin "$PP2"); printf '  %-8s %10.0f req/s\n' porin "$hp"
he=$(h2 envoy "$EP"); printf '  %-8s %10.0f req/s\n' envoy "$he"
awk -v d="$hd" -v p="$hp" -v e="$he" 'BEGIN { printf "  porin / direct = %.2f, porin / envoy = %.2f\n", p / d, p / e }'
echo
echo "porin RSS: idle $((RSS_IDLE / 1024)) MiB, after the HTTP/1.1 runs $((RSS_LOADED / 1024)) MiB, at the end $(($(rss_kb "$porin_pid") / 1024)) MiB (target < 30 MiB idle)"
