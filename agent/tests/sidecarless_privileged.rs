//! Sidecar-less L7 end to end: unmodified pods, the kernel hands their flows to the node's proxy
//! (`bpf_sk_assign`), the proxy enforces HTTP/gRPC rules and connects upstream as the client. Real
//! curl, grpcio and sockets in lab namespaces. Root only; in CI (`CI=true`) always.

mod common;

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Lab, porin, privileged, repo};
use serde_json::Value;

fn starwars(tag: &str) -> Lab {
    let text = std::fs::read_to_string(repo().join("config/labs/starwars.yaml")).unwrap();
    Lab::up(tag, &text.replace("../examples/", "@REPO@/config/examples/"))
}

/// Proxy flow records of the lab.
fn proxy_flows(lab: &Lab) -> Vec<Value> {
    let o = porin().args(["observe", "-o", "json", "--lab", &lab.name, "--protocol", "http"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["flow"].clone())
        .collect()
}

#[test]
fn starwars_through_the_kernel_and_the_proxy_privileged() {
    if !privileged() {
        return;
    }
    let lab = starwars("swl7");
    for host in ["deathstar", &format!("[{}]", lab.addr("deathstar", true))] {
        let (code, status, body) =
            lab.curl_status("tiefighter", &["-X", "POST"], &format!("http://{host}/v1/request-landing"));
        assert_eq!((code, status.as_str(), body.as_str()), (0, "200", "Ship landed\n"), "{host}");
        let (code, status, body) =
            lab.curl_status("tiefighter", &["-X", "PUT"], &format!("http://{host}/v1/exhaust-port"));
        assert_eq!((code, status.as_str(), body.as_str()), (0, "403", "Access denied\r\n"), "{host}");
    }
    // h2c from an unmodified client, judged per stream.
    let (_, status, body) =
        lab.curl_status("tiefighter", &["--http2-prior-knowledge", "-X", "PUT"], "http://deathstar/v1/exhaust-port");
    assert_eq!((status.as_str(), body.as_str()), ("403", "Access denied\r\n"));
    // The xwing never gets a connection: dropped in the kernel.
    let start = Instant::now();
    let (code, _, _) = lab.curl_status("xwing", &["-X", "POST"], "http://deathstar/v1/request-landing");
    assert_eq!(code, 28, "xwing times out");
    assert!(start.elapsed() >= Duration::from_secs(3));

    // The kernel recorded the redirect, the proxy the requests, both naming the rule.
    let redirect = lab.wait_event(0, |e| e["verdict"] == "REDIRECTED" && e["source"]["pod_name"] == "tiefighter");
    assert_eq!(redirect["policy"], "default/rule1 spec.ingress[0]");
    let flows = proxy_flows(&lab);
    let denied = flows.iter().find(|f| f["verdict"] == "DROPPED").expect("a denied request record");
    assert_eq!(denied["l7"]["http"]["method"], "PUT");
    assert_eq!(denied["source"]["pod_name"], "tiefighter");
    assert_eq!(denied["destination"]["pod_name"], "deathstar");
    // curl may pick the IPv6 address first: either of the client's own.
    let src = denied["IP"]["source"].as_str().unwrap().to_owned();
    assert!(src == lab.addr("tiefighter", false) || src == lab.addr("tiefighter", true), "{src}");
    assert_eq!(denied["source"]["identity"], lab.identity("tiefighter"));
    let c = lab.counters();
    assert!(c["redirected"].as_u64().unwrap() >= 5 && c["proxy_socket"].as_u64().unwrap() > 0, "{c}");
    assert!(c["proxy_upstream"].as_u64().unwrap() > 0, "{c}");
}

#[test]
fn upstream_keeps_the_client_address_and_egress_rules_apply_at_the_source_privileged() {
    if !privileged() {
        return;
    }
    let lab = Lab::up(
        "egl7",
        r#"
version: 1
policies: []
pods:
  - {name: api, labels: {app: api}, server: {http: {port: 8080, routes: [{method: GET, path: /whoami, body: "{client}\n"}, {method: POST, path: /write, body: "written\n"}]}}}
  - {name: client, labels: {app: client}}
"#,
    );
    lab.apply(&[r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-egress}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: api}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules:
        http: [{method: GET, path: /whoami}]
"#]);
    let v4 = lab.addr("api", false);
    let (_, status, body) = lab.curl_status("client", &[], &format!("http://{v4}:8080/whoami"));
    assert_eq!(status, "200");
    assert_eq!(body.trim(), lab.addr("client", false), "the server sees the client, not the proxy");
    let v6 = lab.addr("api", true);
    let (_, _, body) = lab.curl_status("client", &[], &format!("http://[{v6}]:8080/whoami"));
    assert_eq!(body.trim(), lab.addr("client", true));
    let (_, status, body) = lab.curl_status("client", &["-X", "POST"], "http://api:8080/write");
    assert_eq!((status.as_str(), body.as_str()), ("403", "Access denied\r\n"), "the egress rule of the source");
    let flows = proxy_flows(&lab);
    assert!(flows.iter().any(|f| f["verdict"] == "DROPPED" && f["traffic_direction"] == "EGRESS"), "{flows:#?}");
}

#[test]
fn grpc_through_the_redirect_privileged() {
    if !privileged() {
        return;
    }
    let door = repo().join("agent/tests/data/grpc_door.py");
    // The Cloud City policy from Cilium's gRPC guide, as transcribed in the conformance vectors.
    let vectors =
        std::env::var_os("PORIN_CONFORMANCE_DIR").map_or_else(|| repo().join("../shared/conformance"), Into::into);
    let policy = vectors.join("policies/http/cc-door-ingress-security.yaml");
    assert!(policy.exists(), "{} (set PORIN_CONFORMANCE_DIR)", policy.display());
    let lab = Lab::up(
        "grpc",
        &format!(
            r#"
version: 1
policies: ["{}"]
pods:
  - {{name: cc-door-mgr, labels: {{app: cc-door-mgr}}, command: [python3, "{}", "50051"]}}
  - {{name: terminal-87, labels: {{app: public-terminal}}}}
"#,
            policy.display(),
            door.display()
        ),
    );
    let client = repo().join("proxy/tests/grpc_client.py");
    let call = |method: &str| -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let o = lab.exec(
                "terminal-87",
                &[
                    "python3",
                    &client.display().to_string(),
                    "cc-door-mgr:50051",
                    &format!("/cloudcity.DoorManager/{method}"),
                    "1",
                ],
            );
            let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
            // The server may still be starting.
            if v["code"] != "UNAVAILABLE" || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let r = call("GetName");
    assert_eq!(r["code"], "OK", "{r}");
    assert!(r["response"].as_str().unwrap().starts_with("GetName: 1"), "{r}");
    assert_eq!(call("RequestMaintenance")["code"], "OK");
    for m in ["SetAccessCode", "GetStatus"] {
        let r = call(m);
        assert_eq!(r["code"], "PERMISSION_DENIED", "{m}: {r}");
        assert_eq!(r["details"], "Access denied\r\n");
    }
}

/// A client that sends one request per connection with `Connection: close` and reads the
/// answer to its end before it closes: the proxy closes first, so its side of every connection
/// waits in TIME_WAIT and the client's does not (curl may close as soon as it has the body, which
/// leaves the waiting to the client's side). Prints "status seconds" per request ("000": none).
const CLOSING_CLIENT: &str = r#"
import socket, sys, time
host, method, path, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
fam = socket.AF_INET6 if ':' in host else socket.AF_INET
req = f"{method} {path} HTTP/1.1\r\nHost: deathstar\r\nConnection: close\r\nContent-Length: 0\r\n\r\n".encode()
for _ in range(n):
    t = time.monotonic()
    code = "000"
    try:
        s = socket.socket(fam)
        s.settimeout(2)
        s.connect((host, 80))
        s.sendall(req)
        data = b""
        while True:
            b = s.recv(65536)
            if not b:
                break
            data += b
        s.close()
        if data.startswith(b"HTTP/"):
            code = data.split(b" ", 2)[1].decode()
    except OSError:
        pass
    print(code, f"{time.monotonic() - t:.3f}", flush=True)
"#;

/// `n` sequential requests from [`CLOSING_CLIENT`] in `pod`: the HTTP statuses, and how many took
/// more than half a second (a handshake that waited for a retransmission).
fn closing_requests(lab: &Lab, pod: &str, method: &str, (host, path): (&str, &str), n: usize) -> (Vec<String>, usize) {
    let n = n.to_string();
    let o = lab.exec(pod, &["python3", "-c", CLOSING_CLIENT, host, method, path, &n]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let mut codes = Vec::new();
    let mut slow = 0;
    for l in out.lines() {
        let (code, secs) = l.split_once(' ').unwrap_or((l, "0"));
        codes.push(code.to_owned());
        slow += usize::from(secs.parse::<f64>().unwrap_or(0.0) > 0.5);
    }
    (codes, slow)
}

fn time_wait_counters(lab: &Lab) -> (u64, u64) {
    let c = lab.counters();
    (c["time_wait_syn"].as_u64().unwrap(), c["time_wait_failed"].as_u64().unwrap())
}

/// The client reuses its ports while the proxy's sockets of its earlier connections on them are
/// in TIME_WAIT (the proxy closed first): each new connection's SYN is handed to the TIME_WAIT
/// socket and the kernel's TIME_WAIT path finds the proxy's listener (`sk_lookup`), so every
/// request is answered at once — over IPv4 and IPv6, with the agent killed (the link is pinned)
/// and after it restarted. With the proxy down such a SYN finds no listener and nothing else:
/// it never reaches the server. (Before: the handshake stalled on the TIME_WAIT socket.)
#[test]
fn reused_client_ports_meet_the_proxys_time_wait_privileged() {
    if !privileged() {
        return;
    }
    let lab = starwars("swtw");
    // 20 ports: every one of 60 connections after the first 20 meets a TIME_WAIT socket.
    let o = lab.exec("tiefighter", &["sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40019"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (ds4, ds6) = (lab.addr("deathstar", false), lab.addr("deathstar", true));
    let land = "/v1/request-landing";
    let round = |lab: &Lab, host: &str, what: &str| {
        let before = time_wait_counters(lab);
        let (codes, slow) = closing_requests(lab, "tiefighter", "POST", (host, land), 60);
        assert_eq!(codes.len(), 60, "{what}: {codes:?}");
        assert!(codes.iter().all(|c| c == "200"), "{what}: {codes:?}");
        assert_eq!(slow, 0, "{what}: no handshake waited for a retransmission");
        let after = time_wait_counters(lab);
        assert!(after.0 - before.0 >= 30, "{what}: SYNs met TIME_WAIT sockets: {before:?} -> {after:?}");
        assert_eq!(after.1, before.1, "{what}: every hand-over found the listener");
    };
    round(&lab, &ds4, "IPv4");
    round(&lab, &ds6, "IPv6");

    // Under load, allowed and denied requests from four clients at once on the same 20 ports: a
    // denied request's connection often meets the TIME_WAIT socket of an allowed one, and is
    // still judged by the proxy (403 comes only from it), never handed to the server.
    let before = time_wait_counters(&lab);
    let runs: Vec<(&str, Vec<String>, usize)> = std::thread::scope(|s| {
        let jobs: Vec<_> = [("POST", land), ("PUT", "/v1/exhaust-port"), ("POST", land), ("PUT", "/v1/exhaust-port")]
            .into_iter()
            .map(|(m, path)| {
                let (lab, host) = (&lab, ds4.as_str());
                s.spawn(move || {
                    let (codes, slow) = closing_requests(lab, "tiefighter", m, (host, path), 30);
                    (m, codes, slow)
                })
            })
            .collect();
        jobs.into_iter().map(|j| j.join().unwrap()).collect()
    });
    for (method, codes, slow) in &runs {
        let want = if *method == "POST" { "200" } else { "403" };
        assert_eq!(codes.len(), 30, "{method}: {codes:?}");
        assert!(codes.iter().all(|c| c == want), "{method} under load: {codes:?}");
        assert_eq!(*slow, 0, "{method} under load: no handshake waited for a retransmission");
    }
    let after = time_wait_counters(&lab);
    assert!(after.0 - before.0 >= 60, "under load: SYNs met TIME_WAIT sockets: {before:?} -> {after:?}");
    assert_eq!(after.1, before.1, "under load: every hand-over found the listener");

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(lab.agent_pid()), nix::sys::signal::Signal::SIGKILL).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let (codes, slow) = closing_requests(&lab, "tiefighter", "POST", (&ds4, land), 40);
    assert!(codes.iter().all(|c| c == "200") && slow == 0, "agent down: {codes:?}, {slow} slow");
    let o = porin().args(["lab", "restart-agent", "--name", &lab.name]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    round(&lab, &ds4, "agent restarted");
    let pins: Vec<_> = ["a", "b"]
        .iter()
        .map(|x| std::path::PathBuf::from(format!("/run/porin/labs/{}/bpf/links/netns_tw_lookup_{x}", lab.name)))
        .filter(|p| p.exists())
        .collect();
    assert_eq!(pins.len(), 1, "the restarted agent replaced the lookup's pinned link: {pins:?}");

    // The proxy killed: a SYN on a port whose TIME_WAIT socket is still there goes nowhere. The
    // port: one the proxy's side holds in TIME_WAIT and the client's side does not (who closed
    // first decides which sides wait).
    let pid = lab.status()["proxy"]["pid"].as_i64().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // The port of column `col` of `ss -Htan` lines (with a state filter ss leaves out the state).
    let ports = |o: std::process::Output, col: usize| -> std::collections::BTreeSet<u16> {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().nth(col)?.rsplit_once(':')?.1.parse().ok())
            .collect()
    };
    let node = format!("porin-{}-node", lab.name);
    let waiting = std::process::Command::new("ip")
        .args(["netns", "exec", &node, "ss", "-Htan", "state", "time-wait", "src", &format!("{ds4}:80")])
        .output()
        .unwrap();
    let client_side = lab.exec("tiefighter", &["ss", "-Htan"]);
    // Peers of the proxy's waiting sockets; the client's local ports.
    let (waiting, busy) = (ports(waiting, 3), ports(client_side, 3));
    let port = waiting.difference(&busy).next().copied().expect("a port only the proxy's side holds");
    let before = time_wait_counters(&lab);
    let url = format!("http://{ds4}{land}");
    let (code, _, _) = lab.curl_status("tiefighter", &["-X", "POST", "--local-port", &port.to_string()], &url);
    assert_eq!(code, 28, "nothing answers without the proxy (curl times out; port {port})");
    let after = time_wait_counters(&lab);
    assert!(after.1 > before.1, "the TIME_WAIT path found no listener and refused: {before:?} -> {after:?}");
}

/// One HTTP/1.1 request on an open connection; the status line.
fn ask(s: &mut std::net::TcpStream, path: &str) -> String {
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(format!("POST {path} HTTP/1.1\r\nHost: deathstar\r\nContent-Length: 0\r\n\r\n").as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or("").to_owned()
}

#[test]
fn proxy_and_agent_restarts_privileged() {
    if !privileged() {
        return;
    }
    let lab = starwars("rstl7");
    let ds: SocketAddr = format!("{}:80", lab.addr("deathstar", false)).parse().unwrap();
    let land = |lab: &Lab| lab.curl_status("tiefighter", &["-X", "POST"], "http://deathstar/v1/request-landing");

    // An established L7 connection survives an agent restart.
    let mut live = lab.tcp("tiefighter", ds).unwrap();
    assert_eq!(ask(&mut live, "/v1/request-landing"), "HTTP/1.1 200 OK");
    let o = porin().args(["lab", "restart-agent", "--name", &lab.name]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(ask(&mut live, "/v1/request-landing"), "HTTP/1.1 200 OK", "same connection after the agent restart");
    assert_eq!(ask(&mut live, "/v1/exhaust-port"), "HTTP/1.1 403 Forbidden");
    assert_eq!(land(&lab).1, "200", "new connections after the agent restart");

    // The proxy is killed: nothing gets through while it is down — neither new connections nor
    // the packets of the connection it held.
    let pid = lab.status()["proxy"]["pid"].as_i64().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let seq = lab.last_seq();
    let (code, _, _) = land(&lab);
    assert_eq!(code, 28, "refused while the proxy is down (curl times out)");
    assert!(ask(&mut live, "/v1/exhaust-port").is_empty(), "the held connection is gone, not rerouted to the server");
    let e = lab.wait_event(seq, |e| e["drop_reason_desc"] == "PROXY_UNAVAILABLE");
    assert_eq!(e["source"]["pod_name"], "tiefighter");
    // Back: new connections work again, with the same policy.
    let o = porin().args(["lab", "restart-proxy", "--name", &lab.name]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(land(&lab), (0, "200".into(), "Ship landed\n".into()));
    assert_eq!(lab.curl_status("tiefighter", &["-X", "PUT"], "http://deathstar/v1/exhaust-port").1, "403");
}

#[test]
fn policy_files_are_watched_privileged() {
    if !privileged() {
        return;
    }
    let lab = starwars("watch");
    let dir = std::path::PathBuf::from(format!("/run/porin/labs/{}/policies", lab.name));
    assert!(dir.is_dir(), "the lab's policy directory");
    // A new file, written in place (no reload command): enforced within a second.
    let open = std::fs::read_to_string(repo().join("config/examples/starwars/l3-l4-l7.yaml"))
        .unwrap()
        .replace("name: rule1", "name: rule2")
        .replace("method: POST", "method: PUT")
        .replace("path: /v1/request-landing", "path: /v1/exhaust-port");
    let start = Instant::now();
    std::fs::write(dir.join("zz-exhaust.yaml"), &open).unwrap();
    loop {
        if lab.curl_status("tiefighter", &["-X", "PUT"], "http://deathstar/v1/exhaust-port").1 == "200" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(2), "the new file was not enforced in time");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(start.elapsed() < Duration::from_millis(1500), "{:?}", start.elapsed());
    // An invalid edit of it: reported, and its last good version keeps enforcing.
    let seq = lab.last_seq();
    std::fs::write(dir.join("zz-exhaust.yaml"), open.replace("toPorts:", "toPortz:")).unwrap();
    let e = lab.wait_event(seq, |e| e["event_type"] == "policy-error");
    assert!(e["Summary"].as_str().unwrap().contains("zz-exhaust.yaml"), "{e}");
    assert_eq!(lab.curl_status("tiefighter", &["-X", "PUT"], "http://deathstar/v1/exhaust-port").1, "200");
    let st = lab.status();
    let files = st["agent"]["status"]["policy_files"].as_array().unwrap();
    assert!(
        files.iter().any(|f| f["ok"] == false && f["file"].as_str().unwrap().ends_with("zz-exhaust.yaml")),
        "{files:?}"
    );
}

#[test]
fn a_failed_publication_is_retried_until_the_proxy_follows_privileged() {
    if !privileged() {
        return;
    }
    let lab = starwars("publish");
    let labdir = std::path::PathBuf::from(format!("/run/porin/labs/{}", lab.name));
    let published = labdir.join("snapshot.json");
    let proxy_version = || lab.status()["proxy"]["status"]["snapshot"]["version"].as_u64().unwrap_or(0);
    let before = proxy_version();
    // The proxy's file can no longer be written: a directory stands where it goes.
    std::fs::remove_file(&published).unwrap();
    std::fs::create_dir(&published).unwrap();
    let open = std::fs::read_to_string(repo().join("config/examples/starwars/l3-l4-l7.yaml"))
        .unwrap()
        .replace("name: rule1", "name: rule2")
        .replace("method: POST", "method: PUT")
        .replace("path: /v1/request-landing", "path: /v1/exhaust-port");
    std::fs::write(labdir.join("policies/zz-exhaust.yaml"), &open).unwrap();
    // The kernel applies the new version at once; the publication waits.
    let deadline = Instant::now() + Duration::from_secs(5);
    let agent = loop {
        let st = lab.status()["agent"]["status"].clone();
        if st["publish"]["pending"].as_u64().is_some_and(|v| v > before) {
            break st;
        }
        assert!(Instant::now() < deadline, "no pending publication: {st}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let version = agent["version"].as_u64().unwrap();
    assert!(agent["publish"]["last_error"].as_str().is_some_and(|e| e.contains("snapshot.json")), "{agent}");
    assert_eq!(proxy_version(), before, "the proxy keeps its last good version");
    // The way clears: the retry lands and the proxy follows, without another reload.
    std::fs::remove_dir(&published).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy_version() < version {
        assert!(Instant::now() < deadline, "the proxy did not follow version {version}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(lab.curl_status("tiefighter", &["-X", "PUT"], "http://deathstar/v1/exhaust-port").1, "200");
    let st = lab.status()["agent"]["status"].clone();
    assert_eq!(st["publish"]["published_version"], version, "{st}");
    assert!(st["publish"]["pending"].is_null(), "{st}");
}

/// L7 ingress for clients outside the node: the uplink program hands their flows to the proxy (at
/// tc egress on the pod's veth a socket cannot be assigned; before it, such flows were dropped).
#[test]
fn clients_from_outside_get_l7_ingress_policy_through_the_uplink_privileged() {
    if !privileged() {
        return;
    }
    let lab = Lab::up(
        "wl7",
        r#"version: 1
pods:
  - name: deathstar
    labels: {org: empire, class: deathstar}
    server:
      http:
        port: 80
        routes:
          - {method: POST, path: /v1/request-landing, body: "Ship landed\n"}
          - {method: PUT, path: /v1/exhaust-port, body: "Panic: deathstar exploded\n"}
  - name: outsider
    external: true
"#,
    );
    lab.apply(&[r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: world-l7}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEntities: [world]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: POST, path: /v1/request-landing}]}
"#]);
    for host in [lab.addr("deathstar", false), format!("[{}]", lab.addr("deathstar", true))] {
        let land = lab.curl_status("outsider", &["-X", "POST"], &format!("http://{host}/v1/request-landing"));
        assert_eq!((land.1.as_str(), land.2.as_str()), ("200", "Ship landed\n"), "{host}");
        let boom = lab.curl_status("outsider", &["-X", "PUT"], &format!("http://{host}/v1/exhaust-port"));
        assert_eq!((boom.1.as_str(), boom.2.as_str()), ("403", "Access denied\r\n"), "{host}");
    }
    // The proxy judged them, as ingress of the deathstar from the world.
    let flows = proxy_flows(&lab);
    let denied = flows.iter().find(|f| f["verdict"] == "DROPPED").expect("a denied request recorded");
    assert_eq!(denied["traffic_direction"], "INGRESS");
    assert_eq!(denied["destination"]["pod_name"], "deathstar");
}
