#!/usr/bin/env bash
# Many concurrent clients through the sidecar-less path, in the star wars lab (release build):
#   none   the deathstar reached directly (an L3/L4 allow, no proxy)
#   porin  the L3/L4/L7 policy: every request through the node's proxy
# For each concurrency in CONNS (default "1000 4000 10000"): wrk -t2 -cN -dSECS keep-alive
# POST /v1/request-landing from the tiefighter pod. Prints req/s, errors (socket errors + non-2xx
# + the proxy's refused connections and upstream errors), p99 latency, the proxy's RSS idle (after
# a few requests) /
# during / AFTER seconds after the load, TIME-WAIT sockets in the node namespace, and porin/none.
# Needs root. SECS=10 AFTER=30 by default.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
setup_main
apt_install wrk
SECS=${SECS:-10}
AFTER=${AFTER:-30}
CONNS=${CONNS:-"1000 4000 10000"}
cargo build --release --locked -p porin >/dev/null 2>&1 || cargo build --release --locked -p porin
PORIN=$PWD/target/release/porin
work=$(mktemp -d /tmp/porin-load-bench.XXXXXX)
lab="bench-load-$$"
cleanup() { "$PORIN" lab down --name "$lab" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

# One pod may hold all 10,000 connections in this benchmark.
sed "s|\.\./examples/|$PWD/config/examples/|" config/labs/starwars.yaml > "$work/lab.yaml"
printf 'settings:\n  proxy_limits: {max_connections_per_source: 12000}\n' >> "$work/lab.yaml"
cat > "$work/l4.yaml" <<'EOF'
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: load-l4}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
EOF
echo 'wrk.method = "POST"' > "$work/post.lua"
"$PORIN" lab up --name "$lab" "$work/lab.yaml" >/dev/null
node="porin-$lab-node"
proxy_pid() { "$PORIN" lab status --name "$lab" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["proxy"]["pid"])'; }
rss() { awk '/VmRSS/ {print int($2/1024)}' "/proc/$(proxy_pid)/status"; }
proxy_counter() { "$PORIN" lab status --name "$lab" -o json | python3 -c "import json,sys; print(json.load(sys.stdin)['proxy']['status']['counters']['$1'])"; }
time_wait() { ip netns exec "$node" ss -tan state time-wait | tail -n +2 | wc -l; }
apply() { "$PORIN" lab apply --name "$lab" "$1" >/dev/null; sleep 0.3; }

printf '%-6s %6s %10s %8s %9s %9s %9s %9s %9s\n' config conns "req/s" errors "p99" "RSS idle" "RSS load" "RSS aft" TIME-WAIT
declare -A RPS
for c in $CONNS; do
    for config in none porin; do
        if [ "$config" = none ]; then apply "$work/l4.yaml"; else apply "$PWD/config/examples/starwars/l3-l4-l7.yaml"; fi
        "$PORIN" lab restart-proxy --name "$lab" >/dev/null
        sleep 1
        # Idle after a few requests (code paged in, as a proxy that has served anything).
        "$PORIN" lab exec --name "$lab" tiefighter -- bash -c \
            'for i in $(seq 20); do curl -s -o /dev/null -XPOST http://deathstar/v1/request-landing; done'
        sleep 1
        idle=$(rss)
        refused0=$(proxy_counter connections_refused); uperr0=$(proxy_counter upstream_errors)
        ( sleep $((SECS / 2)); rss > "$work/during" ) &
        out=$("$PORIN" lab exec --name "$lab" tiefighter -- bash -c \
            "ulimit -n 20000; wrk -t2 -c$c -d${SECS}s --timeout 30s --latency -s $work/post.lua http://deathstar/v1/request-landing")
        wait
        during=$(cat "$work/during")
        tw=$(time_wait)
        sleep "$AFTER"
        after=$(rss)
        rps=$(awk '/Requests\/sec/ {print int($2)}' <<<"$out")
        p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
        sock=$(awk '/Socket errors/ {gsub(",", ""); print $4 + $6 + $8 + $10}' <<<"$out"); sock=${sock:-0}
        non2xx=$(awk '/Non-2xx/ {print $5}' <<<"$out"); non2xx=${non2xx:-0}
        errors=$((sock + non2xx + $(proxy_counter connections_refused) - refused0 + $(proxy_counter upstream_errors) - uperr0))
        RPS[$config-$c]=$rps
        printf '%-6s %6s %10s %8s %9s %8sM %8sM %8sM %9s\n' "$config" "$c" "$rps" "$errors" "$p99" "$idle" "$during" "$after" "$tw"
    done
done
echo
echo "porin / none req/s:"
for c in $CONNS; do
    python3 -c "print(f'  {$c:>6} connections: {${RPS[porin-$c]} / max(${RPS[none-$c]}, 1):.2f}')"
done
echo "(RSS is the proxy's; with config none it stands idle. RSS aft: $AFTER s after the load ended.)"
