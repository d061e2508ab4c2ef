#!/usr/bin/env bash
# Kafka through Porin's Kafka proxy vs direct to the broker, side by side in one lab (release
# build): a real broker (tansu, in memory) in the kafka pod, librdkafka (confluent-kafka) in the
# client pod.
#   direct   an L3/L4 allow on 9092: the client talks to the broker
#   porin    Kafka rules (role produce + role consume on the bench topics): every request through the
#            transparent Kafka proxy, judged, forwarded, recorded
#   tansu    tansu's own Kafka proxy (`tansu proxy`, no policy) in a pod of its own, the client
#            bootstrapped at it (it rewrites Metadata to point at itself): a Kafka-aware relay, for scale
# For each mode: produce COUNT 100-byte records and COUNT_BIG 10 KiB records (acks=1, linger 5 ms,
# batches up to 1 MB), consume them back (fetches up to 50 MB), and LAT single produce requests one at
# a time for the request round trip. Prints messages/s, MB/s, the ratios porin/direct, and the p99
# round trip of one produce request with the p99 Porin adds. Needs root.
# COUNT=200000 COUNT_BIG=100000 LAT=2000 by default.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
setup_main
kafka_tools
COUNT=${COUNT:-200000}
COUNT_BIG=${COUNT_BIG:-100000}
LAT=${LAT:-2000}
cargo build --release --locked -p porin >/dev/null 2>&1 || cargo build --release --locked -p porin
PORIN=$PWD/target/release/porin
CLIENT=$PWD/scripts/kafka-client.py
work=$(mktemp -d /tmp/porin-kafka-bench.XXXXXX)
lab="bench-kafka-$$"
cleanup() { [ -n "${KEEP:-}" ] || { "$PORIN" lab down --name "$lab" >/dev/null 2>&1 || true; rm -rf "$work"; }; }
trap cleanup EXIT

topics="small-direct, big-direct, lat-direct, small-porin, big-porin, lat-porin, small-tansu, big-tansu, lat-tansu"
TANSU=$(command -v tansu || echo "${CARGO_HOME:-$HOME/.cargo}/bin/tansu")
# Pods get 10.244.0.(10 + index): kafka .10, client .11, kproxy .12.
kafka=10.244.0.10
kproxy=10.244.0.12
cat > "$work/lab.yaml" <<LAB
version: 1
policies: [$work/direct.yaml]
pods:
  - name: kafka
    labels: {app: kafka}
    server:
      kafka: {port: 9092, topics: [$topics]}
  - {name: client, labels: {app: client}}
  - name: kproxy
    labels: {app: kproxy}
    command: [$TANSU, proxy, --listener-url, "tcp://0.0.0.0:9092", --advertised-listener-url, "tcp://$kproxy:9092", --origin-url, "tcp://$kafka:9092"]
LAB
cat > "$work/direct.yaml" <<'EOF2'
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: kafka-l4}
spec:
  endpointSelector: {matchLabels: {app: kafka}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}, {matchLabels: {app: kproxy}}]
    toPorts: [{ports: [{port: "9092", protocol: TCP}]}]
EOF2
cp "$work/direct.yaml" "$work/tansu.yaml"
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
run() { "$PORIN" lab exec --name "$lab" client -- python3 "$CLIENT" --bootstrap "$bootstrap" "$@"; }
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }

declare -A R
for mode in ${MODES:-direct porin tansu}; do
    bootstrap=$kafka:9092
    [ "$mode" = tansu ] && bootstrap=$kproxy:9092
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

# A mode left out (MODES) prints as 0.
val() { if [ -n "${R[$1]:-}" ]; then field "${R[$1]}" "$2"; else echo 0; fi; }
ratio() { python3 -c "print($1 / $2 if $2 else 0)"; }
printf '\n%-30s %12s %12s %12s %12s %12s\n' "" "direct" "porin" "tansu-proxy" "porin/direct" "tansu/direct"
for k in p100:"produce 100 B" p10k:"produce 10 KiB" c100:"consume 100 B" c10k:"consume 10 KiB"; do
    key=${k%%:*}; label=${k#*:}
    for unit in msgs_per_s mb_per_s; do
        d=$(val "direct.$key" $unit); p=$(val "porin.$key" $unit); t=$(val "tansu.$key" $unit)
        printf '%-30s %12.1f %12.1f %12.1f %12.2f %12.2f\n' "$label ($unit)" "$d" "$p" "$t" "$(ratio "$p" "$d")" "$(ratio "$t" "$d")"
    done
done
for q in p50 p99; do
    d=$(val direct.lat ${q}_ms); p=$(val porin.lat ${q}_ms); t=$(val tansu.lat ${q}_ms)
    printf '%-30s %9.3f ms %9.3f ms %9.3f ms   porin adds %.3f ms\n' "one produce request $q" "$d" "$p" "$t" \
        "$(python3 -c "print($p - $d)")"
done
