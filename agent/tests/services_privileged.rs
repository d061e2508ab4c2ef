//! Services balanced in the kernel at the socket, across two nodes: `config/labs/mesh.yaml` (the
//! deathstar a ClusterIP service with three backends over both nodes), real curl and Python
//! sockets in lab pods, real Service and EndpointSlice YAML applied while traffic runs. Root only;
//! in CI (`CI=true`) always.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Lab, porin, privileged, repo};

const VIP4: &str = "10.96.0.10";
const VIP6: &str = "fd00:96::10";

/// The mesh lab file, its policy paths made absolute.
fn mesh() -> String {
    std::fs::read_to_string(repo().join("config/labs/mesh.yaml"))
        .unwrap()
        .replace("../examples/", "@REPO@/config/examples/")
}

fn file(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap()
}

/// `n` landing requests from `pod` to `url`, each on its own connection (`Connection: close`):
/// the answers by backend, and how many requests got none.
fn landings(lab: &Lab, pod: &str, url: &str, n: usize) -> (BTreeMap<String, usize>, usize) {
    let urls: Vec<&str> = std::iter::repeat_n(url, n).collect();
    let mut args = vec!["curl", "-s", "-g", "-m", "20", "-XPOST", "-H", "Connection: close", "-w", "\n"];
    args.extend(urls);
    let o = lab.exec(pod, &args);
    let mut by = BTreeMap::new();
    let mut answered = 0;
    for l in String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.starts_with("Ship landed")) {
        let backend = l.trim_start_matches("Ship landed (").split(',').next().unwrap().to_owned();
        *by.entry(backend).or_insert(0) += 1;
        answered += 1;
    }
    (by, n - answered)
}

fn counter(lab: &Lab, node: &str, name: &str) -> u64 {
    lab.counters_of(Some(node))[name].as_u64().unwrap()
}

/// Python in a pod, its output.
fn python(lab: &Lab, pod: &str, code: &str) -> String {
    let o = lab.exec(pod, &["python3", "-c", code]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn mesh_services_across_nodes_privileged() {
    if !privileged() {
        return;
    }
    let lab = Lab::up("mesh", &mesh());
    let tie4 = lab.addr("tiefighter", false);
    for (vip, v6) in [(VIP4, false), (VIP6, true)] {
        let url = if v6 { format!("http://[{vip}]/v1") } else { format!("http://{vip}/v1") };
        // Landing through the VIP; the exhaust port is refused at L7 (at the backend's node); the
        // xwing is dropped at L3/L4 there.
        let (code, body) = lab.curl("tiefighter", "POST", &format!("{url}/request-landing"), 5);
        assert_eq!(code, 0, "{vip}: {body}");
        assert!(body.starts_with("Ship landed (deathstar-"), "{vip}: {body}");
        let (_, body) = lab.curl("tiefighter", "PUT", &format!("{url}/exhaust-port"), 5);
        assert_eq!(body.trim(), "Access denied", "{vip}");
        let (code, _) = lab.curl("xwing", "POST", &format!("{url}/request-landing"), 2);
        assert_ne!(code, 0, "{vip}: the xwing lands");

        // 300 requests spread over the three backends (20-45 % each); the backends on node2 see
        // the tiefighter's own address (no NAT on the way).
        let (by, lost) = landings(&lab, "tiefighter", &format!("{url}/request-landing"), 300);
        assert_eq!(lost, 0, "{vip}: {by:?}");
        assert_eq!(by.len(), 3, "{vip}: {by:?}");
        for (b, n) in &by {
            assert!((60..=135).contains(n), "{vip}: {b} got {n} of 300: {by:?}");
        }
    }
    // The backends on node2 see the tiefighter's own address: nothing translates on the way.
    let o = lab.exec(
        "tiefighter",
        &["curl", "-s", "-m", "20", "-XPOST", "-H", "Connection: close"]
            .into_iter()
            .chain(std::iter::repeat_n(format!("http://{VIP4}/v1/request-landing").leak() as &str, 30))
            .collect::<Vec<_>>(),
    );
    let answers = String::from_utf8_lossy(&o.stdout).into_owned();
    let on_node2: Vec<&str> =
        answers.lines().filter(|l| l.contains("deathstar-2") || l.contains("deathstar-3")).collect();
    assert!(!on_node2.is_empty(), "no request reached node2: {answers}");
    assert!(on_node2.iter().all(|l| l.ends_with(&format!("from {tie4})"))), "{answers}");
    // The service's name resolves in every pod, to its cluster IPs.
    let hosts = String::from_utf8_lossy(&lab.exec("xwing", &["getent", "ahosts", "deathstar"]).stdout).into_owned();
    assert!(hosts.contains(VIP4) && hosts.contains(VIP6), "{hosts}");

    // What the socket reads back is the service: getpeername for TCP, the source of UDP answers
    // (connected and not). UDP 7 needs a policy of its own.
    let out = python(
        &lab,
        "tiefighter",
        &format!(
            "import socket\nfor vip in ('{VIP4}', '{VIP6}'):\n  s = socket.create_connection((vip, 80), timeout=3)\n  print(s.getpeername()[0])"
        ),
    );
    assert_eq!(out.lines().collect::<Vec<_>>(), [VIP4, VIP6]);
    let echo = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: echo}\nspec:\n  endpointSelector: {matchLabels: {class: deathstar}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {org: empire}}]\n    toPorts: [{ports: [{port: '7', protocol: UDP}]}]\n";
    lab.apply(&[
        &file("config/examples/starwars/l3-l4-l7.yaml"),
        &file("config/examples/mesh/deathstar-service.yaml"),
        echo,
    ]);
    let out = python(
        &lab,
        "tiefighter",
        &format!(
            "import socket\nfor fam, vip in ((socket.AF_INET, '{VIP4}'), (socket.AF_INET6, '{VIP6}')):\n  s = socket.socket(fam, socket.SOCK_DGRAM)\n  s.settimeout(3)\n  for i in range(5):\n    s.sendto(b'hi', (vip, 7))\n    print(s.recvfrom(10)[1][0])\n  c = socket.socket(fam, socket.SOCK_DGRAM)\n  c.settimeout(3)\n  c.connect((vip, 7))\n  c.send(b'x')\n  print(c.recvfrom(10)[1][0], c.getpeername()[0])"
        ),
    );
    let want: Vec<String> =
        [VIP4, VIP6].iter().flat_map(|v| std::iter::repeat_n(v.to_string(), 5).chain([format!("{v} {v}")])).collect();
    assert_eq!(out.lines().collect::<Vec<_>>(), want);

    // A restarted agent swaps its programs in without a gap: requests go on throughout.
    let before = counter(&lab, "node1", "lb_translated");
    let restart = std::thread::spawn({
        let name = lab.name.clone();
        move || porin().args(["lab", "restart-agent", "--name", &name, "--node", "node1"]).output().unwrap()
    });
    let mut lost = 0;
    while !restart.is_finished() {
        lost += landings(&lab, "tiefighter", &format!("http://{VIP4}/v1/request-landing"), 20).1;
    }
    assert!(restart.join().unwrap().status.success());
    lost += landings(&lab, "tiefighter", &format!("http://{VIP4}/v1/request-landing"), 20).1;
    assert_eq!(lost, 0, "requests lost while the agent restarted");
    assert!(counter(&lab, "node1", "lb_translated") > before);
}

/// A Service without a selector and its EndpointSlice, written as a user would (addresses of
/// `backends`), with `extra` lines in the Service's spec.
fn manual_service(backends: &[&str], extra: &str) -> String {
    let endpoints: String = backends.iter().map(|b| format!("- addresses: [{b}]\n")).collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: deathstar}}\nspec:\n  clusterIP: {VIP4}\n  ports: [{{name: http, port: 80}}]\n{extra}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: deathstar-manual, labels: {{kubernetes.io/service-name: deathstar}}}}\naddressType: IPv4\nports: [{{name: http, port: 80}}]\nendpoints:\n{endpoints}"
    )
}

#[test]
fn service_changes_affinity_and_to_services_privileged() {
    if !privileged() {
        return;
    }
    let lab = Lab::up("svc", &mesh());
    let policy = file("config/examples/starwars/l3-l4-l7.yaml");
    let ds: Vec<String> = (1..=3).map(|i| lab.addr(&format!("deathstar-{i}"), false)).collect();
    let all: Vec<&str> = ds.iter().map(String::as_str).collect();
    let url = format!("http://{VIP4}/v1/request-landing");

    // ClientIP affinity: one backend for the tiefighter, request after request.
    lab.apply(&[&policy, &manual_service(&all, "  sessionAffinity: ClientIP\n")]);
    let (by, lost) = landings(&lab, "tiefighter", &url, 40);
    assert_eq!((by.len(), lost), (1, 0), "{by:?}");

    // A connection held open to one backend; that backend leaves the slice: new connections never
    // reach it, the established one goes on.
    lab.apply(&[&policy, &manual_service(&all, "")]);
    let script = format!(
        "import http.client, sys\nc = http.client.HTTPConnection('{VIP4}', 80, timeout=10)\nfor i in range(2):\n  c.request('POST', '/v1/request-landing')\n  print(c.getresponse().read().decode().strip(), flush=True)\n  sys.stdin.readline()\n"
    );
    let mut held = porin()
        .args(["lab", "exec", "--name", &lab.name, "tiefighter", "--", "python3", "-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(held.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    let gone = first.trim_start_matches("Ship landed (").split(',').next().unwrap().to_owned();
    assert!(gone.starts_with("deathstar-"), "{first}");
    let index: usize = gone.trim_start_matches("deathstar-").parse::<usize>().unwrap() - 1;
    let rest: Vec<&str> = all.iter().enumerate().filter(|(i, _)| *i != index).map(|(_, a)| *a).collect();
    lab.apply(&[&policy, &manual_service(&rest, "")]);
    let (by, lost) = landings(&lab, "tiefighter", &url, 60);
    assert_eq!(lost, 0, "{by:?}");
    assert!(!by.contains_key(&gone), "{gone} left the slice and still gets new connections: {by:?}");
    assert_eq!(by.len(), 2, "{by:?}");
    let mut stdin = held.stdin.take().unwrap();
    stdin.write_all(b"\n").unwrap();
    let mut second = String::new();
    out.read_line(&mut second).unwrap();
    assert!(second.starts_with(&format!("Ship landed ({gone},")), "established connection: {second:?}");
    stdin.write_all(b"\n").unwrap();
    assert!(held.wait().unwrap().success());

    // No backend at all: connects are refused at once, and counted.
    let before = counter(&lab, "node1", "lb_no_backend");
    lab.apply(&[&policy, &manual_service(&[], "")]);
    let start = Instant::now();
    let (code, _) = lab.curl("tiefighter", "POST", &url, 5);
    assert_eq!(code, 7, "curl: couldn't connect");
    assert!(start.elapsed() < Duration::from_secs(2), "refused, not timed out: {:?}", start.elapsed());
    assert!(counter(&lab, "node1", "lb_no_backend") > before);

    // toServices with toPorts: the tiefighter's egress reaches the service's backends on port 80,
    // and nothing else (policy judges the backend the kernel chose).
    let egress = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: tie-egress}\nspec:\n  endpointSelector: {matchLabels: {class: tiefighter}}\n  egress:\n  - toServices: [{k8sService: {serviceName: deathstar, namespace: default}}]\n    toPorts: [{ports: [{port: '80', protocol: TCP}]}]\n";
    lab.apply(&[&policy, &file("config/examples/mesh/deathstar-service.yaml"), egress]);
    let (by, lost) = landings(&lab, "tiefighter", &url, 30);
    assert_eq!((by.len(), lost), (3, 0), "{by:?}");
    let (code, _) = lab.curl("tiefighter", "POST", &format!("http://{}/v1/request-landing", ds[0]), 5);
    assert_eq!(code, 0, "a backend's own address is the same peer");
    let xwing = lab.addr("xwing", false);
    assert!(!lab.ping("tiefighter", &xwing, false), "egress beyond the service is denied");
}

/// The tiefighter's egress to the deathstars goes through its node's proxy (L7 rules); the
/// deathstars' own ingress is L3/L4 only, so the proxy that balances talks to the backends itself.
const EGRESS_L7: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: tiefighter-l7}\nspec:\n  endpointSelector: {matchLabels: {class: tiefighter}}\n  egress:\n  - toEndpoints: [{matchLabels: {class: deathstar}}]\n    toPorts:\n    - ports: [{port: '80', protocol: TCP}]\n      rules:\n        http:\n        - {method: POST, path: /v1/request-landing}\n        - {method: GET, path: '/v1([?].*)?'}\n";

/// Node1's HTTP flow records (its Hubble API) of requests to `/v1` and their responses.
fn node1_http_flows(lab: &Lab) -> Vec<serde_json::Value> {
    let server = format!("unix:/run/porin/labs/{}/nodes/node1/hubble.sock", lab.name);
    let o = porin()
        .args(["observe", "-o", "json", "--server", &server, "--last", "5000", "--protocol", "http"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["flow"].clone())
        .filter(|f| f["l7"]["http"]["url"].as_str().is_some_and(|u| u.ends_with("/v1")))
        .collect()
}

/// What node1's proxy says of its balancing.
fn balancing(lab: &Lab) -> serde_json::Value {
    let st = lab.status();
    let node = st["nodes"].as_array().unwrap().iter().find(|n| n["name"] == "node1").unwrap().clone();
    node["proxy"]["status"]["balancing"].clone()
}

fn backend_count(body: &str) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    for l in body.lines().filter(|l| l.starts_with("deathstar-") || l.starts_with("Ship landed (deathstar-")) {
        let name = l.trim_start_matches("Ship landed (").split(',').next().unwrap().trim().to_owned();
        *by.entry(name).or_insert(0) += 1;
    }
    by
}

#[test]
fn l7_balancing_per_request_privileged() {
    if !privileged() {
        return;
    }
    let lab = Lab::up("l7lb", &mesh());
    lab.apply(&[
        &file("config/examples/starwars/l3-l4.yaml"),
        &file("config/examples/mesh/deathstar-service.yaml"),
        EGRESS_L7,
    ]);

    // One HTTP/1.1 connection, 300 requests: each picks a backend (every one is tried).
    let mut args = vec!["curl", "-s", "-m", "30", "-w", "%{num_connects}\n"];
    let url = format!("http://{VIP4}/v1");
    args.extend(std::iter::repeat_n(url.as_str(), 300));
    let out = String::from_utf8_lossy(&lab.exec("tiefighter", &args).stdout).into_owned();
    let connects: usize = out.lines().filter_map(|l| l.parse::<usize>().ok()).sum();
    let by = backend_count(&out);
    assert_eq!(connects, 1, "one connection: {out}");
    assert_eq!(by.values().sum::<usize>(), 300, "{by:?}");
    assert_eq!(by.len(), 3, "{by:?}");
    // Node1's records name the backend each request went to (not the connection's).
    let flows = node1_http_flows(&lab);
    let (requests, responses): (Vec<_>, Vec<_>) = flows.iter().partition(|f| f["is_reply"] != true);
    let named = |fs: &[&serde_json::Value], end: &str| {
        let mut m = BTreeMap::new();
        for f in fs {
            *m.entry(f[end]["pod_name"].as_str().unwrap_or("?").to_owned()).or_insert(0) += 1;
        }
        m
    };
    assert_eq!(named(&requests, "destination"), by, "request records");
    assert_eq!(named(&responses, "source"), by, "response records");

    // A connection to a backend's own address asked for that pod, not the service: its requests
    // stay there (the socket balancer did not translate it), over IPv4 and IPv6.
    for v6 in [false, true] {
        let pod = lab.addr("deathstar-2", v6);
        let url = if v6 { format!("http://[{pod}]/v1") } else { format!("http://{pod}/v1") };
        let mut args = vec!["curl", "-s", "-g", "-m", "30"];
        args.extend(std::iter::repeat_n(url.as_str(), 30));
        let out = String::from_utf8_lossy(&lab.exec("tiefighter", &args).stdout).into_owned();
        assert_eq!(backend_count(&out), BTreeMap::from([("deathstar-2".to_owned(), 30)]), "{url}");
    }
    // The record of translated connections (the first connection above was one) forgets each
    // one when it closes.
    let pin = format!("/run/porin/labs/{}/nodes/node1/bpf/maps/PORIN_LB_CONN", lab.name);
    let conns = aya::maps::HashMap::<_, redirect_common::CtKey, redirect_common::lb::Addr>::try_from(
        aya::maps::Map::LruHashMap(aya::maps::MapData::from_pin(&pin).unwrap()),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while conns.keys().count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(conns.keys().count(), 0, "no closed connection left in the record");

    // One h2c connection, 300 streams at once: spread over the three backends.
    let urls: Vec<String> = (0..300).map(|i| format!("http://{VIP4}/v1?i={i}")).collect();
    let mut args = vec!["nghttp"];
    args.extend(urls.iter().map(String::as_str));
    let out = String::from_utf8_lossy(&lab.exec("tiefighter", &args).stdout).into_owned();
    let by = backend_count(&out);
    assert_eq!(by.values().sum::<usize>(), 300, "{by:?}");
    for (b, n) in &by {
        assert!(*n >= 15, "{b} got {n} of 300 streams: {by:?}");
    }
    assert_eq!(by.len(), 3, "{by:?}");
    let b = balancing(&lab);
    let svc = b["services"].as_array().unwrap().iter().find(|s| s["service"] == "default/deathstar").unwrap().clone();
    assert!(svc["requests"].as_u64().unwrap() >= 600, "{b}");

    // A backend killed mid-run: at most one request fails, then none (retried elsewhere, ejected).
    // The client's answers are read as they come (line-buffered); once 100 are in, the backend
    // that answered last is killed: one in use, the kill mid-run however slow the machine. (Which
    // backends are in use depends on their latency so far: the burst above may have left one
    // costly for a while, as peak-EWMA means it to.)
    let mut args = vec!["stdbuf".to_owned(), "-oL".into(), "curl".into(), "-s".into(), "-m".into(), "60".into()];
    args.extend(["-w".to_owned(), "\n".into()]);
    args.extend(std::iter::repeat_n(format!("http://{VIP4}/v1"), 3000));
    let mut client = porin()
        .args(["lab", "exec", "--name", &lab.name, "tiefighter", "--"])
        .args(&args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(client.stdout.take().unwrap()).lines();
    let mut answers: Vec<String> = Vec::new();
    for l in lines.by_ref() {
        let l = l.unwrap();
        if !l.is_empty() {
            answers.push(l);
        }
        if answers.len() >= 100 {
            break;
        }
    }
    let killed_at = answers.len();
    let target = answers.last().cloned().unwrap_or_default();
    assert!(target.starts_with("deathstar-"), "{answers:?}");
    let victim = format!("porin-{}-{target}", lab.name);
    let pids = std::process::Command::new("ip").args(["netns", "pids", &victim]).output().unwrap();
    let pids = String::from_utf8_lossy(&pids.stdout).into_owned();
    assert!(!pids.trim().is_empty(), "{target} runs nothing");
    for pid in pids.split_whitespace() {
        assert!(std::process::Command::new("kill").args(["-9", pid]).status().unwrap().success());
    }
    answers.extend(lines.map(Result::unwrap).filter(|l| !l.is_empty()));
    client.wait().unwrap();
    let failed: Vec<&String> = answers.iter().filter(|l| !l.starts_with("deathstar-")).collect();
    assert!(failed.len() <= 1, "{} requests failed: {failed:?}", failed.len());
    assert!(answers.len() >= 2999, "{} answers", answers.len());
    // Nothing from the victim once the requests in flight at the kill are through.
    assert!(
        answers.iter().skip(killed_at + 300).all(|l| *l != target),
        "{target} answered after it was killed (at answer {killed_at})"
    );
    // ... and the proxy met it dead (its ejection), so the requests went on while it was.
    let b = balancing(&lab);
    let dead = lab.addr(&target, false);
    let dead = b["backends"].as_array().unwrap().iter().find(|x| x["address"] == format!("{dead}:80")).unwrap().clone();
    assert!(dead["ejections"].as_u64().unwrap() >= 1, "{b}");
}

/// A backend that reads a request and resets the connection, answering nothing.
const RESETTER: &str = "import socket, struct\ns = socket.socket(socket.AF_INET6)\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\ns.bind(('::', 80))\ns.listen(64)\nwhile True:\n    c, _ = s.accept()\n    c.recv(65536)\n    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))\n    c.close()\n";

#[test]
fn idempotent_requests_are_retried_after_a_reset_privileged() {
    if !privileged() {
        return;
    }
    let lab_file = [
        "version: 1",
        "policies: []",
        "nodes: [{name: node1}, {name: node2}]",
        "pods:",
        "  - name: deathstar-1",
        "    node: node2",
        "    labels: {org: empire, class: deathstar}",
        "    server:",
        "      http:",
        "        port: 80",
        "        routes:",
        "          - {method: GET, path: /v1, body: \"deathstar-1\\n\"}",
        "          - {method: POST, path: /v1/request-landing, body: \"Ship landed (deathstar-1, from {client})\\n\"}",
        "  - name: deathstar-2",
        "    node: node2",
        "    labels: {org: empire, class: deathstar}",
        &format!("    command: [python3, -c, {}]", serde_json::to_string(RESETTER).unwrap()),
        "  - name: tiefighter",
        "    node: node1",
        "    labels: {org: empire, class: tiefighter}",
        "",
    ]
    .join("\n");
    let lab = Lab::up("retry", &lab_file);
    lab.apply(&[
        &file("config/examples/starwars/l3-l4.yaml"),
        &file("config/examples/mesh/deathstar-service.yaml"),
        EGRESS_L7,
    ]);
    // The resetter listens (asked inside its own namespace, not through the proxy under test).
    let ns = format!("porin-{}-deathstar-2", lab.name);
    let probe = "import socket; socket.create_connection(('127.0.0.1', 80), timeout=1)";
    let start = Instant::now();
    while !std::process::Command::new("ip")
        .args(["netns", "exec", &ns, "python3", "-c", probe])
        .status()
        .unwrap()
        .success()
    {
        assert!(start.elapsed() < Duration::from_secs(20), "the resetter never listened");
        std::thread::sleep(Duration::from_millis(100));
    }
    let service = |b: &serde_json::Value| {
        b["services"].as_array().unwrap().iter().find(|s| s["service"] == "default/deathstar").cloned().unwrap()
    };

    // GETs (idempotent, no body) over one connection: every one answered, those that met the
    // resetter sent once more to the other backend; the resetter ejected after its failures.
    let mut args = vec!["curl", "-s", "-m", "30", "-w", "\n"];
    let url = format!("http://{VIP4}/v1");
    args.extend(std::iter::repeat_n(url.as_str(), 60));
    let out = String::from_utf8_lossy(&lab.exec("tiefighter", &args).stdout).into_owned();
    let answers: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(answers, vec!["deathstar-1"; 60], "{out}");
    let b = balancing(&lab);
    let svc = service(&b);
    let retries = svc["retries"].as_u64().unwrap();
    assert!(retries >= 1, "{b}");
    assert_eq!(svc["failed"].as_u64().unwrap(), 0, "{b}");
    let resetter = format!("{}:80", lab.addr("deathstar-2", false));
    let bad = b["backends"].as_array().unwrap().iter().find(|x| x["address"] == resetter).unwrap().clone();
    assert!(bad["failures"].as_u64().unwrap() >= 1 && bad["ejections"].as_u64().unwrap() >= 1, "{b}");

    // Node1's flow records name the service: requests go to it, responses come from it — every
    // answer from the good backend, retried ones too.
    let flows = node1_http_flows(&lab);
    let deathstar = serde_json::json!({"name": "deathstar", "namespace": "default"});
    let (requests, responses): (Vec<_>, Vec<_>) = flows.iter().partition(|f| f["is_reply"] != true);
    assert!(requests.len() >= 60 && responses.len() >= 60, "{flows:#?}");
    assert!(
        requests.iter().all(|f| f["destination_service"] == deathstar && f["source_service"].is_null()),
        "{requests:#?}"
    );
    assert!(responses.iter().all(|f| f["source_service"] == deathstar), "{responses:#?}");
    assert!(
        responses.iter().all(|f| f["source"]["pod_name"] == "deathstar-1" && f["l7"]["http"]["code"] == 200),
        "{responses:#?}"
    );

    // Once its ejection is over, POSTs with a body: never sent twice, so those that meet the
    // resetter fail (502) and the retry count stays.
    std::thread::sleep(proxy::balance::EJECTION + Duration::from_millis(500));
    let url = format!("http://{VIP4}/v1/request-landing");
    let mut args = vec!["curl", "-s", "-m", "30", "-w", "%{http_code}\n", "-d", "x"];
    for _ in 0..10 {
        args.extend(["-o", "/dev/null", url.as_str()]);
    }
    let out = String::from_utf8_lossy(&lab.exec("tiefighter", &args).stdout).into_owned();
    let codes: Vec<&str> = out.lines().collect();
    assert_eq!(codes.len(), 10, "{out}");
    assert!(codes.contains(&"502"), "{codes:?}");
    assert!(codes.iter().all(|c| *c == "200" || *c == "502"), "{codes:?}");
    let b = balancing(&lab);
    assert_eq!(service(&b)["retries"].as_u64().unwrap(), retries, "a POST was sent again: {b}");
    assert!(service(&b)["failed"].as_u64().unwrap() >= 1, "{b}");
}
