#!/usr/bin/env bash
# Kafka through Porin's Kafka proxy vs direct to the broker, side by side in one lab (release
# build): a real broker (tansu, in memory) in the kafka pod, librdkafka (confluent-kafka) in the
# client pod.
#   direct   an L3/L4 allow on 9092: the client talks to the broker
#   porin    Kafka rules (role produce + role consume on the bench topics): every request through the
#            transparent Kafka proxy, judged, forwarded, recorded
# For each mode: produce COUNT 100-byte records and COUNT_BIG 10 KiB records (acks=1, linger 5 ms,
# batches up to 1 MB), consume them back (fetches up to 50 MB), and LAT single produce requests one at
# a time for the request round trip. Prints messages/s, MB/s, the ratios porin/direct, and the p99
# round trip of one produce request with the p99 Porin adds. Needs root.
# COUNT=200000 COUNT_BIG=20000 LAT=2000 by default.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
setup_main
kafka_tools
COUNT=${COUNT:-200000}
COUNT_BIG=${COUNT_BIG:-20000}
LAT=${LAT:-2000}
cargo build --release --locked -p porin >/dev/null 2>&1 || cargo build --release --locked -p porin
PORIN=$PWD/target/release/porin
CLIENT=$PWD/scripts/kafka-client.py
work=$(mktemp -d /tmp/porin-kafka-bench.XXXXXX)
lab="bench-kafka-$$"
cleanup() { "$PORIN" lab down --name "$lab" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

topics="small-direct, big-direct, lat-direct, small-porin, big-porin, lat-porin"
cat > "$work/lab.yaml" <<LAB
version: 1
policies: [$work/direct.yaml]
pods:
  - name: kafka
    labels: {app: kafka}
    server:
      kafka: {port: 9092, topics: [$topics]}
  - {name: client, labels: {app: client}}
LAB
cat > "$work/direct.yaml" <<'EOF2'
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: kafka-l4}
spec:
  endpointSelector: {matchLabels: {app: kafka}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "9092", protocol: TCP}]}]
EOF2
{
    cat <<'EOF2'
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: kafka-l7}
spec:
  endpointSelector: {matchLabels: {app: kafka}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "9092", protocol: TCP}]
      rules:
        kafka:
EOF2
    for t in small-porin big-porin lat-porin; do
        printf '        - {role: produce, topic: %s}\n        - {role: consume, topic: %s}\n' "$t" "$t"
    done
} > "$work/porin.yaml"

"$PORIN" lab up "$work/lab.yaml" --name "$lab" >/dev/null
run() { "$PORIN" lab exec --name "$lab" client -- python3 "$CLIENT" "$@"; }
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }

declare -A R
for mode in direct porin; do
    "$PORIN" lab apply --name "$lab" "$work/$mode.yaml" >/dev/null
    sleep 1
    R[$mode.p100]=$(run bench-produce --topic "small-$mode" --count "$COUNT" --size 100)
    R[$mode.p10k]=$(run bench-produce --topic "big-$mode" --count "$COUNT_BIG" --size 10240)
    R[$mode.c100]=$(run bench-consume --topic "small-$mode" --count "$COUNT" --group "g-$mode" --timeout 120)
    R[$mode.c10k]=$(run bench-consume --topic "big-$mode" --count "$COUNT_BIG" --group "g-$mode" --timeout 120)
    R[$mode.lat]=$(run bench-latency --topic "lat-$mode" --count "$LAT" --size 100)
    for k in p100 p10k c100 c10k; do
        errs=$(python3 -c "import json,sys; print(json.loads(sys.argv[1]).get('errors', 0))" "${R[$mode.$k]}")
        n=$(field "${R[$mode.$k]}" messages)
        want=$COUNT; [[ $k == *10k ]] && want=$COUNT_BIG
        if [ "$errs" != 0 ] || [ "$n" != "$want" ]; then
            echo "$mode $k: $n of $want messages, $errs errors: ${R[$mode.$k]}" >&2; exit 1
        fi
    done
done

printf '\n%-34s %14s %14s %8s\n' "" "direct" "porin" "ratio"
for k in p100:"produce 100 B" p10k:"produce 10 KiB" c100:"consume 100 B" c10k:"consume 10 KiB"; do
    key=${k%%:*}; label=${k#*:}
    for unit in msgs_per_s mb_per_s; do
        d=$(field "${R[direct.$key]}" $unit); p=$(field "${R[porin.$key]}" $unit)
        printf '%-34s %14.1f %14.1f %8.2f\n' "$label ($unit)" "$d" "$p" "$(python3 -c "print($p / $d)")"
    done
done
d50=$(field "${R[direct.lat]}" p50_ms); d99=$(field "${R[direct.lat]}" p99_ms)
p50=$(field "${R[porin.lat]}" p50_ms); p99=$(field "${R[porin.lat]}" p99_ms)
printf '%-34s %11.3f ms %11.3f ms\n' "one produce request p50" "$d50" "$p50"
printf '%-34s %11.3f ms %11.3f ms   added p99: %.3f ms\n' "one produce request p99" "$d99" "$p99" "$(python3 -c "print($p99 - $d99)")"
