#!/usr/bin/env bash
# What flow records cost, one run, side by side on this box (same nginx backend, same wrk, same
# 100-rule allow-list, each proxy with one worker thread):
#   records on   porin proxy keeping records (backlog, Hubble metrics scraped every second, a
#                follower taking every record off its record stream: `porin observe --proxy SOCK
#                -f $FOLLOW`; by default it shows the drops, of which the run has none, so it
#                decodes and judges every record and prints none; FOLLOW="-o json" prints them all)
#   records off  the same proxy with `flow_records: false`
# wrk -t2 -c50, ROUNDS rounds of SECS seconds (each round both, in alternating order). Prints
# req/s, the CPU each request cost the proxy (its worker and stream threads) and the follower, the
# ratio on/off (target >= 0.95) of the means and the median of each round's, and the memory a full
# record backlog takes (RSS on - off after load; the backlog holds the last 8,192
# records), and the memory of a full node flow ring (the agent's: 4,095 flows by default) filled
# as the agent fills it (porin-ring-memory).
# Runs on 127.0.0.1 only; ports are picked free at start. SECS=5 ROUNDS=8 by default.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
. benches/peers.sh
rust_components
peers_install
SECS=${SECS:-5}
# What the follower shows: by default the drops (the run has none) — it still takes every record
# off the stream and judges it; FOLLOW="-o json" prints every record as `hubble observe -o json`.
FOLLOW=${FOLLOW:---verdict DROPPED -o json}
ROUNDS=${ROUNDS:-8}
bench_start obs
cargo build --release --locked -p porin-benches --bin porin-ring-memory >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
B1=$(free_port); B2=$(free_port); ON=$(free_port); OFF=$(free_port); MP=$(free_port)
RULES=100
PATH_HIT=/api/v1/svc$((RULES - 1))/item

sed -e "s|@SCRATCH@|$work|g" -e "s|127.0.0.1:18080|127.0.0.1:$B1|" -e "s|127.0.0.1:18081|127.0.0.1:$B2|" \
    "$PEERS/backend-nginx.conf" > "$work/backend.conf"
nginx -c "$work/backend.conf" -g 'daemon off;' 2>"$work/logs/nginx.log" & pids+=($!)

allow_list_policy "$RULES" backend 80 > "$work/policy.yaml"
echo '{"endpoints": [{"id": 1, "name": "backend", "namespace": "default", "labels": {"app": "backend"}, "ips": ["10.0.0.1"], "ifname": "none"}]}' > "$work/endpoints.json"
"$PORIN" policy publish --endpoints "$work/endpoints.json" -o "$work/snapshot.json" "$work/policy.yaml" 2>/dev/null
proxy_config() { # $1 name, $2 port, $3 flow_records, $4 extra line
    cat <<EOF
snapshot: $work/snapshot.json
control_socket: $work/$1.sock
flow_records: $3
$4
listeners:
- {name: h1, listen: "127.0.0.1:$2", upstream: "127.0.0.1:$B1", source: {identity: 2}, destination: {pod: default/backend}, port: 80}
EOF
}
proxy_config on "$ON" true "metrics: \"127.0.0.1:$MP\"" > "$work/on.yaml"
proxy_config off "$OFF" false "" > "$work/off.yaml"
"$PORIN" proxy --config "$work/on.yaml" --threads "${THREADS:-1}" 2>"$work/logs/on.log" & on_pid=$!; pids+=($on_pid)
"$PORIN" proxy --config "$work/off.yaml" --threads "${THREADS:-1}" 2>"$work/logs/off.log" & off_pid=$!; pids+=($off_pid)

wait_http "http://127.0.0.1:$B1/" 200
for p in $ON $OFF; do wait_http "http://127.0.0.1:$p$PATH_HIT" 200; done
wait_http "http://127.0.0.1:$MP/metrics" 200

# The records-on proxy's readers: a follower streaming every record, a scraper every second.
# FOLLOWER=0: no follower (what the records cost the proxy alone).
follower=
if [ "${FOLLOWER:-1}" != 0 ]; then
    "$PORIN" observe --proxy "$work/on.sock" -f $FOLLOW > "$work/followed.jsonl" 2>"$work/logs/follower.log" & follower=$!
    pids+=($follower)
else
    : > "$work/followed.jsonl"
fi
(while sleep 1; do curl -s -o /dev/null "http://127.0.0.1:$MP/metrics" || true; done) & pids+=($!)

declare -A RPS PCPU FCPU
run_wrk() { # $1 name, $2 port, $3 the proxy's pid, $4 the follower's (if any)
    local out rps reqs name=$1 port=$2 p0 p1 f0=0 f1=0
    p0=$(cpu_s "$3"); [ -n "${4:-}" ] && f0=$(cpu_s "$4")
    out=$(wrk -t2 -c50 -d"${SECS}s" "http://127.0.0.1:$port$PATH_HIT")
    p1=$(cpu_s "$3"); [ -n "${4:-}" ] && f1=$(cpu_s "$4")
    rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
    reqs=$(awk '/requests in/ {print $1}' <<<"$out")
    if grep -q "Non-2xx" <<<"$out"; then echo "$name: non-2xx answers during the run" >&2; echo "$out" >&2; exit 1; fi
    local pc fc
    pc=$(echo "($p1 - $p0) * 1000000 / $reqs" | bc -l); fc=$(echo "($f1 - $f0) * 1000000 / $reqs" | bc -l)
    RPS[$name]="${RPS[$name]:-} $rps"; PCPU[$name]="${PCPU[$name]:-} $pc"; FCPU[$name]="${FCPU[$name]:-} $fc"
    printf '  %-12s %10.0f req/s   CPU per request: proxy %5.2f us, follower %5.2f us\n' "$name" "$rps" "$pc" "$fc"
}
# Both warmed first (connections to the backend, the allocator's and the backlog's memory): the
# first run after start is slower, whichever goes first, and round 1 would count that.
for p in $ON $OFF; do wrk -t2 -c50 -d2s "http://127.0.0.1:$p$PATH_HIT" > /dev/null; done
echo "wrk -t2 -c50 -d${SECS}s GET $PATH_HIT (rule $RULES of $RULES), $ROUNDS rounds (after 2 s of each to warm up)"
# Each round runs both, in turns (on first in odd rounds, off first in even ones): the box's load
# drifts by more than the difference measured, so each round's on/off pair is a ratio of its own
# and the summary gives their median beside the ratio of the means.
RATIOS=()
for ((r = 1; r <= ROUNDS; r++)); do
    echo " round $r"
    if ((r % 2)); then
        run_wrk "records-on" "$ON" "$on_pid" "$follower"
        run_wrk "records-off" "$OFF" "$off_pid"
    else
        run_wrk "records-off" "$OFF" "$off_pid"
        run_wrk "records-on" "$ON" "$on_pid" "$follower"
    fi
    RATIOS+=("$(awk -v a="${RPS[records-on]##* }" -v b="${RPS[records-off]##* }" 'BEGIN { printf "%.3f", a / b }')")
    echo "  on / off    ${RATIOS[-1]}"
done
on=$(mean "${RPS[records-on]}"); off=$(mean "${RPS[records-off]}")
followed=$(wc -l < "$work/followed.jsonl")
echo
echo "summary (mean of $ROUNDS rounds)"
printf '  %-12s %10.0f req/s   CPU per request: proxy %5.2f us, follower %5.2f us (it printed %d records)\n' \
    records-on "$on" "$(mean "${PCPU[records-on]}")" "$(mean "${FCPU[records-on]}")" "$followed"
printf '  %-12s %10.0f req/s   CPU per request: proxy %5.2f us\n' records-off "$off" "$(mean "${PCPU[records-off]}")"
awk -v a="$on" -v b="$off" -v m="$(python3 -c 'import statistics, sys; print(statistics.median(map(float, sys.argv[1:])))' "${RATIOS[@]}")" \
    'BEGIN { printf "  records on / off = %.3f (means), %.3f (median of the rounds\x27 ratios)   (target >= 0.95)\n", a / b, m }'
rss_on=$(rss_kb "$on_pid"); rss_off=$(rss_kb "$off_pid")
backlog=$(echo '{"cmd": "status"}' | python3 -c '
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(sys.stdin.buffer.read())
print(json.loads(s.makefile().readline()).get("records", {}))' "$work/on.sock" 2>/dev/null || echo '?')
echo "  RSS after load: records on $((rss_on / 1024)) MiB, off $((rss_off / 1024)) MiB;" \
    "a full backlog costs ~$(((rss_on - rss_off) / 1024)) MiB (backlog: $backlog)"
# The node's flow ring (the agent's, what Hubble's GetFlows serves) full of HTTP flows, at its
# default size and at Hubble's largest.
for capacity in 4095 65535; do echo "  $(target/release/porin-ring-memory "$capacity")"; done
