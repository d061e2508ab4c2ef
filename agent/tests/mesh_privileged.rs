//! Authenticated identities between nodes: the mTLS tunnel between node proxies and
//! `authentication: {mode: required}`. Two nodes (the ships on node1, the deathstar on node2) and a
//! third with no pods (a stranger on the underlay); real curl, tcpdump and sockets in the lab's
//! namespaces. Root only; in CI (`CI=true`) always.

mod common;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Lab, privileged};
use serde_json::Value;

/// The deathstar's policy requires authentication on its HTTP port (L7 rules) and on its status
/// port (L3/L4 only).
const MTLS: &str = r#"
version: 1
policies: ["@REPO@/config/examples/mesh/deathstar-authenticated.yaml"]
settings: {mesh: {trust_domain: cluster.local}}
nodes: [{name: node1}, {name: node2}, {name: node3}]
pods:
  - name: deathstar
    node: node2
    labels: {org: empire, class: deathstar}
    server: {http: {port: 80, routes: [
      {method: POST, path: /v1/request-landing, body: "Ship landed for {client}\n"},
      {method: PUT, path: /v1/exhaust-port, body: "Panic: deathstar exploded\n"}]}}
  - name: deathstar-status
    node: node2
    labels: {org: empire, class: deathstar}
    server: {http: {port: 8080, routes: [{method: GET, path: /, body: "fully operational for {client}\n"}]}}
  - {name: tiefighter, node: node1, labels: {org: empire, class: tiefighter}}
  - {name: xwing, node: node1, labels: {org: alliance, class: xwing}}
"#;

fn node<'a>(st: &'a Value, name: &str) -> &'a Value {
    st["nodes"].as_array().unwrap().iter().find(|n| n["name"] == name).unwrap_or_else(|| panic!("no node {name}"))
}

/// A node's proxy's tunnel status.
fn tunnel(lab: &Lab, name: &str) -> Value {
    node(&lab.status(), name)["proxy"]["status"]["tunnel"].clone()
}

fn count(v: &Value, key: &str) -> u64 {
    v["counters"][key].as_u64().unwrap_or_else(|| panic!("no counter {key} in {v:#}"))
}

/// A node's underlay address (its first).
fn underlay(lab: &Lab, name: &str) -> String {
    node(&lab.status(), name)["addresses"][0].as_str().unwrap().to_owned()
}

fn netns(lab: &Lab, node: &str) -> String {
    format!("porin-{}-{node}", lab.name)
}

/// Waits until the node's proxy has loaded mesh credentials.
fn wait_credentials(lab: &Lab, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tunnel(lab, name)["credentials"].is_null() {
        assert!(Instant::now() < deadline, "node {name}'s proxy never loaded credentials: {:#}", tunnel(lab, name));
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// tcpdump on the underlay's bridge, writing what it sees to a file.
struct Capture {
    child: Child,
    file: std::path::PathBuf,
}

impl Capture {
    fn start(lab: &Lab) -> Self {
        let file = lab.dir.join("underlay.pcap");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &format!("porin-{}-fabric", lab.name),
                "tcpdump",
                "-i",
                "br0",
                "-U",
                "-s",
                "0",
                "-w",
            ])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tcpdump (scripts/setup.sh installs it)");
        std::thread::sleep(Duration::from_millis(800));
        Self { child, file }
    }

    /// Stops and reads the capture: (packets to or from port `port`, the payload text of all).
    fn finish(mut self, filter: &str) -> (usize, String) {
        std::thread::sleep(Duration::from_millis(300));
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGINT)
            .unwrap();
        self.child.wait().unwrap();
        let o = Command::new("tcpdump").args(["-nn", "-A", "-r"]).arg(&self.file).arg(filter).output().unwrap();
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let packets = text.lines().filter(|l| l.contains(" IP ") || l.contains(" IP6 ")).count();
        (packets, text)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn authenticated_identities_between_nodes_privileged() {
    if !privileged() {
        return;
    }
    let lab = Lab::up("mtls", MTLS);
    wait_credentials(&lab, "node1");
    wait_credentials(&lab, "node2");
    let deathstar = lab.addr("deathstar", false);
    let status_ip = lab.addr("deathstar-status", false);
    let tiefighter = lab.addr("tiefighter", false);

    // Through the tunnel: the L7 rules are judged at node2 on the authenticated identity; the
    // deathstar sees tiefighter's own address.
    let capture = Capture::start(&lab);
    let (rc, code, body) =
        lab.curl_status("tiefighter", &["-m", "5", "-X", "POST"], &format!("http://{deathstar}/v1/request-landing"));
    assert_eq!((rc, code.as_str(), body.trim()), (0, "200", format!("Ship landed for {tiefighter}").as_str()));
    let (_, code, body) =
        lab.curl_status("tiefighter", &["-m", "5", "-X", "PUT"], &format!("http://{deathstar}/v1/exhaust-port"));
    assert_eq!((code.as_str(), body.as_str()), ("403", "Access denied\r\n"));
    // L3/L4 only, authenticated too.
    let (_, code, body) =
        lab.curl_status("tiefighter", &["-m", "5", "-X", "GET"], &format!("http://{status_ip}:8080/"));
    assert_eq!((code.as_str(), body.trim()), ("200", format!("fully operational for {tiefighter}").as_str()));
    // IPv6 through the same tunnel (the underlay is IPv4).
    let (_, code, _) = lab.curl_status(
        "tiefighter",
        &["-m", "5", "-X", "POST"],
        &format!("http://[{}]/v1/request-landing", lab.addr("deathstar", true)),
    );
    assert_eq!(code, "200");
    // What crossed the underlay: TLS to the tunnel port, no plaintext HTTP, nothing to the pods'
    // ports.
    let (tunnelled, text) = capture.finish("tcp port 15008");
    assert!(tunnelled > 10, "the flows crossed as tunnel traffic: {tunnelled} packets");
    for plain in ["request-landing", "exhaust-port", "Ship landed", "fully operational", "HTTP/1.1"] {
        assert!(!text.contains(plain), "{plain:?} crossed the underlay in plaintext");
    }
    let st1 = tunnel(&lab, "node1");
    let st2 = tunnel(&lab, "node2");
    assert!(count(&st1, "streams_out") >= 4 && count(&st2, "streams_in") >= 4, "{st1:#}\n{st2:#}");
    assert!(count(&st1, "connections_out") >= 1, "{st1:#}");
    let c1 = lab.counters_of(Some("node1"));
    assert!(c1["tunnelled"].as_u64().unwrap() >= 4, "node1's datapath handed the flows to the tunnel: {c1:#}");

    // The records at node2 say who the certificate named.
    let flows = porin_observe(&lab, "node2");
    let tunnelled_l4 = flows
        .iter()
        .find(|f| {
            f["Type"] == "L3_L4" && f["verdict"] == "FORWARDED" && f["destination"]["pod_name"] == "deathstar-status"
        })
        .unwrap_or_else(|| panic!("no record of the tunnelled L3/L4 flow: {flows:#?}"));
    assert_eq!(tunnelled_l4["auth_type"], "SPIRE");
    assert_eq!(tunnelled_l4["spiffe_id"], "spiffe://cluster.local/ns/default/sa/default");
    let landing = flows
        .iter()
        .find(|f| f["l7"]["http"]["url"].as_str().is_some_and(|u| u.ends_with("/v1/request-landing")))
        .unwrap_or_else(|| panic!("no record of the landing: {flows:#?}"));
    assert_eq!(
        (&landing["auth_type"], &landing["source"]["pod_name"]),
        (&Value::from("SPIRE"), &Value::from("tiefighter"))
    );

    // The xwing's flow is tunnelled too and refused at node2 by policy (recorded), never served.
    let (rc, _, body) = lab.curl_status("xwing", &["-m", "5", "-X", "GET"], &format!("http://{status_ip}:8080/"));
    assert!(rc != 0 && body.is_empty(), "xwing got through: rc {rc} {body:?}");
    let flows = porin_observe(&lab, "node2");
    assert!(
        flows.iter().any(|f| f["verdict"] == "DROPPED"
            && f["source"]["pod_name"] == "xwing"
            && f["drop_reason_desc"] == "POLICY_DENIED"),
        "node2 recorded the xwing's refused stream: {flows:#?}"
    );

    // A stranger on the underlay (node3) spoofing tiefighter's address: node2's datapath drops its
    // SYN (AUTH_REQUIRED), on both the L3/L4 and the L7 port; it never reaches a pod or a proxy.
    let ns3 = netns(&lab, "node3");
    ip(&["-n", &ns3, "addr", "add", &format!("{tiefighter}/32"), "dev", "lo"]);
    let drops = |lab: &Lab| lab.counters_of(Some("node2"))["drop_auth_required"].as_u64().unwrap();
    let before = drops(&lab);
    for url in [format!("http://{status_ip}:8080/"), format!("http://{deathstar}/v1/request-landing")] {
        let o = Command::new("ip")
            .args(["netns", "exec", &ns3, "curl", "-s", "-m", "2", "--interface", &tiefighter, "-XPOST", &url])
            .output()
            .unwrap();
        assert!(!o.status.success() && o.stdout.is_empty(), "the spoofer got an answer from {url}: {o:?}");
    }
    let dropped = drops(&lab) - before;
    assert!(dropped >= 2, "node2 dropped the spoofed SYNs with AUTH_REQUIRED: {dropped}");
    let events = node2_events(&lab);
    assert!(
        events.iter().any(|e| e["verdict"] == "DROPPED" && e["drop_reason_desc"] == "AUTH_REQUIRED"),
        "node2 recorded the AUTH_REQUIRED drop: {events:#?}"
    );

    // Bad clients of the tunnel port (garbage, a truncated TLS record, connections that never
    // finish a handshake) hold nothing up: tiefighter's flows go on, promptly.
    let node2_addr: SocketAddr = format!("{}:15008", underlay(&lab, "node2")).parse().unwrap();
    let refused_before = count(&tunnel(&lab, "node2"), "handshakes_refused");
    let held = in_netns(&netns(&lab, "node1"), move || {
        let mut held = Vec::new();
        // Garbage.
        let mut g = TcpStream::connect(node2_addr).unwrap();
        g.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        held.push(g);
        // A truncated ClientHello: a record header announcing more than is sent.
        let mut t = TcpStream::connect(node2_addr).unwrap();
        t.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]).unwrap();
        held.push(t);
        // Slowloris: connected, silent.
        for _ in 0..40 {
            held.push(TcpStream::connect(node2_addr).unwrap());
        }
        held
    });
    for _ in 0..5 {
        let t = Instant::now();
        let (_, code, _) = lab.curl_status(
            "tiefighter",
            &["-m", "5", "-X", "POST"],
            &format!("http://{deathstar}/v1/request-landing"),
        );
        assert_eq!(code, "200");
        assert!(t.elapsed() < Duration::from_secs(2), "a landing took {:?} beside the bad clients", t.elapsed());
    }
    // The garbage gets no answer but a closed connection.
    let mut garbage = held.into_iter().next().unwrap();
    garbage.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    let _ = garbage.read_to_end(&mut buf);
    assert!(!String::from_utf8_lossy(&buf).contains("HTTP/1.1 200"), "garbage was answered: {buf:?}");
    assert!(count(&tunnel(&lab, "node2"), "handshakes_refused") > refused_before);

    // A restarted destination proxy: flows fail while it is gone (never in plaintext: the
    // deathstar's datapath would drop them), and go through new tunnels once it is back.
    let o = common::porin().args(["lab", "stop-proxy", "--name", &lab.name, "--node", "node2"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (rc, code, _) =
        lab.curl_status("tiefighter", &["-m", "5", "-X", "POST"], &format!("http://{deathstar}/v1/request-landing"));
    assert!(rc != 0 && code != "200", "a landing got through without node2's proxy: {rc} {code}");
    let o = common::porin().args(["lab", "restart-proxy", "--name", &lab.name, "--node", "node2"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_credentials(&lab, "node2");
    let (_, code, _) =
        lab.curl_status("tiefighter", &["-m", "5", "-X", "POST"], &format!("http://{deathstar}/v1/request-landing"));
    assert_eq!(code, "200", "after node2's proxy restarted");
    assert!(count(&tunnel(&lab, "node2"), "streams_in") >= 1);
}

/// `porin observe` on a node's Hubble API (JSON, as `hubble observe -o json`).
fn porin_observe(lab: &Lab, node: &str) -> Vec<Value> {
    let server = format!("unix:/run/porin/labs/{}/nodes/{node}/hubble.sock", lab.name);
    let o = common::porin().args(["observe", "-o", "json", "--server", &server, "--last", "1000"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["flow"].clone())
        .collect()
}

fn node2_events(lab: &Lab) -> Vec<Value> {
    porin_observe(lab, "node2").into_iter().filter(|f| f["Type"] == "L3_L4").collect()
}

fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().unwrap();
    assert!(o.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr));
}

/// Runs `f` on a thread inside network namespace `ns` (sockets it opens stay there).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap();
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// What a bad client certificate gets.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// The stream opens and the destination answers.
    Served,
    /// The TLS handshake fails (the chain does not lead to the bundle, or is not valid now).
    Handshake,
    /// The connection is accepted, the stream refused (403) and recorded as `AUTH_REQUIRED`.
    Refused,
}

/// Certificates of another CA, expired ones, ones naming another identity or issued by another
/// node's CA: each refused by the destination's proxy, with node1's own certificate as the
/// control. The client is Porin's own tunnel client in node1's namespace, presenting each.
#[test]
fn certificates_that_do_not_name_the_client_are_refused_privileged() {
    use proxy::tunnel::client::Pool;
    use proxy::tunnel::credentials::{self, CredentialsFile, Tls, WorkloadCredential};
    use proxy::tunnel::identity::SpiffeId;
    use proxy::tunnel::target::Target;

    if !privileged() {
        return;
    }
    let lab = Lab::up("mtlscert", MTLS);
    wait_credentials(&lab, "node1");
    wait_credentials(&lab, "node2");
    let st = lab.status();
    let id_of = |pod: &str| {
        let p = st["pods"].as_array().unwrap().iter().find(|p| p["name"] == pod).unwrap();
        u32::try_from(p["identity"].as_u64().unwrap()).unwrap()
    };
    let (tie_id, xwing_id) = (id_of("tiefighter"), id_of("xwing"));
    let tiefighter: std::net::IpAddr = lab.addr("tiefighter", false).parse().unwrap();
    let status: SocketAddr = format!("{}:8080", lab.addr("deathstar-status", false)).parse().unwrap();
    let node2: SocketAddr = format!("{}:15008", underlay(&lab, "node2")).parse().unwrap();
    let (n1, n2) = (netns(&lab, "node1"), netns(&lab, "node2"));
    let nodes = std::path::PathBuf::from(format!("/run/porin/labs/{}/nodes", lab.name));
    let real: CredentialsFile = credentials::read(&nodes.join("node1/mesh-credentials.json")).unwrap();
    let node1_ca = porin::mesh::NodeIssuer::load(&nodes.join("node1/mesh"), &n1).unwrap();
    let node2_ca = porin::mesh::NodeIssuer::load(&nodes.join("node2/mesh"), &n2).unwrap();
    // Another cluster's root, with a node CA of node1's name.
    let other = lab.dir.join("other-ca");
    porin::mesh::init_root(&other.join("root"), "cluster.local").unwrap();
    porin::mesh::issue_node_ca(&other.join("root"), &n1, &other.join("node1")).unwrap();
    let other_ca = porin::mesh::NodeIssuer::load(&other.join("node1"), &n1).unwrap();
    let spiffe = SpiffeId::workload("cluster.local", "default", "default");
    let hour = Duration::from_secs(3600);
    let now = unix_now();
    let own = real.workloads.iter().find(|w| w.identity == tie_id).expect("node1 holds tiefighter's certificate");
    let cases = vec![
        ("node1's own certificate for tiefighter", own.cert.clone(), Expect::Served),
        ("another CA's", other_ca.workload_cert(tie_id, &spiffe, hour).unwrap(), Expect::Handshake),
        (
            "an expired one",
            node1_ca.workload_cert_between(tie_id, &spiffe, now - 7200, now - 3600).unwrap(),
            Expect::Handshake,
        ),
        (
            "one naming another identity (xwing's)",
            node1_ca.workload_cert(xwing_id, &spiffe, hour).unwrap(),
            Expect::Refused,
        ),
        (
            "one naming tiefighter issued by node2's CA",
            node2_ca.workload_cert(tie_id, &spiffe, hour).unwrap(),
            Expect::Refused,
        ),
    ];
    for (i, (what, cert, expect)) in cases.into_iter().enumerate() {
        // The bundle stays the real one (the client must still trust node2's certificate).
        let file = CredentialsFile {
            workloads: vec![WorkloadCredential { identity: tie_id, spiffe: spiffe.to_string(), cert }],
            ..real.clone()
        };
        let tls = Tls::build(&file, 1).unwrap();
        let before = tunnel(&lab, "node2");
        let client = SocketAddr::new(tiefighter, 41000 + u16::try_from(i).unwrap());
        let node = n2.clone();
        let result: Result<String, String> = in_netns(&n1, move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let pool = Pool::new(Duration::from_secs(3));
                let opened = std::sync::atomic::AtomicU64::new(0);
                get_status(&pool, &tls, &node, node2, tie_id, Target { destination: status, client }, &opened).await
            })
        });
        let after = tunnel(&lab, "node2");
        match expect {
            Expect::Served => {
                let text = result.unwrap_or_else(|e| panic!("{what}: {e}"));
                assert!(text.contains("fully operational"), "{what}: {text}");
            }
            Expect::Handshake => {
                assert!(result.is_err(), "{what} was accepted: {result:?}");
                assert!(
                    count(&after, "handshakes_refused") > count(&before, "handshakes_refused"),
                    "{what}: {after:#}"
                );
                assert_eq!(count(&after, "streams_in"), count(&before, "streams_in"), "{what}: a stream got through");
            }
            Expect::Refused => {
                let e = result.expect_err(what);
                assert!(e.contains("403"), "{what}: {e}");
                assert!(
                    count(&after, "streams_in_refused") > count(&before, "streams_in_refused"),
                    "{what}: {after:#}"
                );
                assert_eq!(count(&after, "streams_in"), count(&before, "streams_in"), "{what}: a stream got through");
            }
        }
    }
    // A certificate that expires while its connection is open: the next stream on the connection
    // is refused.
    let now = unix_now();
    let short = node1_ca.workload_cert_between(tie_id, &spiffe, now - 60, now + 3).unwrap();
    let file = CredentialsFile {
        workloads: vec![WorkloadCredential { identity: tie_id, spiffe: spiffe.to_string(), cert: short }],
        ..real.clone()
    };
    let tls = Tls::build(&file, 1).unwrap();
    let node = n2.clone();
    let (first, second, opened) = in_netns(&n1, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let pool = Pool::new(Duration::from_secs(3));
            let opened = std::sync::atomic::AtomicU64::new(0);
            let at = |port| Target { destination: status, client: SocketAddr::new(tiefighter, port) };
            let first = get_status(&pool, &tls, &node, node2, tie_id, at(41100), &opened).await;
            while unix_now() <= now + 3 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let second = get_status(&pool, &tls, &node, node2, tie_id, at(41101), &opened).await;
            (first, second, opened.into_inner())
        })
    });
    assert!(first.as_ref().is_ok_and(|t| t.contains("fully operational")), "before it expired: {first:?}");
    assert!(second.as_ref().is_err_and(|e| e.contains("403")), "after it expired: {second:?}");
    assert_eq!(opened, 1, "the second stream went over the same connection");
    let refused: Vec<Value> = porin_observe(&lab, "node2")
        .into_iter()
        .filter(|f| f["verdict"] == "DROPPED" && f["drop_reason_desc"] == "AUTH_REQUIRED" && f["Type"] == "L3_L4")
        .collect();
    assert!(refused.len() >= 3, "node2 recorded the refused streams: {refused:#?}");
    assert!(refused.iter().any(|f| f["Summary"].as_str().is_some_and(|s| s.contains("expired"))), "{refused:#?}");
    assert!(refused.iter().all(|f| f["auth_type"] == "SPIRE"), "{refused:#?}");
}

/// Certificates that live 10 s are renewed every 5 s: under wrk's keep-alive HTTP/1.1 load,
/// h2load's HTTP/2 (h2c) load and a stream of new connections (HTTP through L7 rules, L3/L4 to the status port), across several rotations
/// on both nodes, no request fails and no stream is refused.
#[test]
fn credentials_rotate_under_load_privileged() {
    if !privileged() {
        return;
    }
    let yaml = MTLS
        .replace("{mesh: {trust_domain: cluster.local}}", "{mesh: {trust_domain: cluster.local, cert_ttl_secs: 10}}")
        .replace(", {name: node3}", "");
    let lab = Lab::up("mtlsrot", &yaml);
    wait_credentials(&lab, "node1");
    wait_credentials(&lab, "node2");
    let generation = |n: &str| tunnel(&lab, n)["credentials"]["generation"].as_u64().unwrap();
    let (before1, before2) = (tunnel(&lab, "node1"), tunnel(&lab, "node2"));
    let deathstar = lab.addr("deathstar", false);
    let status = format!("http://{}:8080/", lab.addr("deathstar-status", false));
    let secs = 20;
    let (load, attempts, failures) = std::thread::scope(|s| {
        let wrk = s.spawn(|| lab.wrk("tiefighter", &format!("http://{deathstar}"), 20, secs));
        let h2 = s.spawn(|| lab.h2load("tiefighter", &format!("http://{deathstar}/v1/request-landing"), 4, 10, secs));
        let deadline = Instant::now() + Duration::from_secs(u64::from(secs));
        let (mut attempts, mut failures) = (0, Vec::new());
        while Instant::now() < deadline {
            for (args, url) in [
                (&["-X", "POST"][..], format!("http://{deathstar}/v1/request-landing")),
                (&["-X", "GET"][..], status.clone()),
            ] {
                attempts += 1;
                let (rc, code, body) = lab.curl_status("tiefighter", args, &url);
                if rc != 0 || code != "200" {
                    failures.push(format!("{url}: exit {rc}, status {code}, {body:?}"));
                }
            }
        }
        ((wrk.join().unwrap(), h2.join().unwrap()), attempts, failures)
    });
    let (load, h2) = load;
    let (after1, after2) = (tunnel(&lab, "node1"), tunnel(&lab, "node2"));
    eprintln!(
        "wrk: {} requests; h2load: {} requests; {attempts} new connections; generations node1 {} → {}, node2 {} → {}",
        load.requests,
        h2.succeeded,
        before1["credentials"]["generation"],
        generation("node1"),
        before2["credentials"]["generation"],
        generation("node2")
    );
    assert!(failures.is_empty(), "{} of {attempts} new connections failed: {failures:#?}", failures.len());
    assert!(attempts >= 20, "only {attempts} new connections in {secs} s");
    assert!(load.requests > 1000, "{}", load.output);
    assert_eq!((load.connect_errors, load.other_errors, load.non_2xx), (0, 0, 0), "{}", load.output);
    assert!(h2.succeeded > 1000, "{}", h2.output);
    assert_eq!((h2.failed, h2.not_2xx), (0, 0), "{}", h2.output);
    for (name, before, after) in [("node1", &before1, &after1), ("node2", &before2, &after2)] {
        let rotated = after["credentials"]["generation"].as_u64().unwrap()
            - before["credentials"]["generation"].as_u64().unwrap();
        assert!(rotated >= 3, "{name}'s credentials rotated only {rotated} times: {after:#}");
    }
    let delta = |key: &str, before: &Value, after: &Value| count(after, key) - count(before, key);
    assert_eq!(delta("streams_out_failed", &before1, &after1), 0, "{after1:#}");
    assert_eq!(delta("streams_in_refused", &before2, &after2), 0, "{after2:#}");
    assert_eq!(delta("handshakes_refused", &before2, &after2), 0, "{after2:#}");
    assert!(delta("connections_out", &before1, &after1) >= 3, "new credentials open new connections: {after1:#}");
    // Connections of older credentials are let go once their streams end.
    assert!(after1["connections_pooled"].as_u64().unwrap() <= 2, "{after1:#}");
}

fn unix_now() -> i64 {
    i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()).unwrap()
}

/// `GET /` of the deathstar's status port over a tunnel stream from `pool`: the answer, or why
/// there was none.
async fn get_status(
    pool: &proxy::tunnel::client::Pool,
    tls: &proxy::tunnel::credentials::Tls,
    node: &str,
    addr: SocketAddr,
    identity: u32,
    target: proxy::tunnel::target::Target,
    opened: &std::sync::atomic::AtomicU64,
) -> Result<String, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let up = pool.open(tls, node, addr, identity, target, opened).await.map_err(|e| e.to_string())?;
    let mut io = up;
    io.write_all(b"GET / HTTP/1.1\r\nHost: deathstar-status\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), io.read_to_end(&mut answer))
        .await
        .map_err(|_| "no answer in 5 s".to_owned())?
        .map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// The tiefighter's own egress L7 rules: only landings at the deathstar.
const TIEFIGHTER_EGRESS: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: tiefighter-egress, namespace: default}
spec:
  endpointSelector: {matchLabels: {class: tiefighter}}
  egress:
  - toEndpoints: [{matchLabels: {class: deathstar}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{method: POST, path: /v1/request-landing}]
"#;

/// A flow the source's own egress L7 rules bring to its proxy, to a destination on another node
/// that wants its clients authenticated: judged at the source, then carried by the tunnel (the
/// proxy's upstream connections are tunnel streams) and judged again at the destination.
#[test]
fn egress_l7_rules_reach_authenticated_destinations_through_the_tunnel_privileged() {
    if !privileged() {
        return;
    }
    let lab = Lab::up("mtlsegress", &MTLS.replace(", {name: node3}", ""));
    wait_credentials(&lab, "node1");
    wait_credentials(&lab, "node2");
    let deathstar_policy =
        std::fs::read_to_string(common::repo().join("config/examples/mesh/deathstar-authenticated.yaml")).unwrap();
    lab.apply(&[&deathstar_policy, TIEFIGHTER_EGRESS]);
    let before = tunnel(&lab, "node1");
    let deathstar = lab.addr("deathstar", false);
    let land = format!("http://{deathstar}/v1/request-landing");
    for _ in 0..3 {
        let (rc, code, body) = lab.curl_status("tiefighter", &["-m", "5", "-X", "POST"], &land);
        assert_eq!((rc, code.as_str()), (0, "200"), "{body}");
        assert!(body.starts_with("Ship landed for"), "{body}");
    }
    let v6 = format!("http://[{}]/v1/request-landing", lab.addr("deathstar", true));
    let (_, code, body) = lab.curl_status("tiefighter", &["-m", "5", "-X", "POST"], &v6);
    assert_eq!(code, "200", "over IPv6: {body}");
    // Denied by the source's egress rules: it never leaves node1.
    let (_, code, _) =
        lab.curl_status("tiefighter", &["-m", "5", "-X", "PUT"], &format!("http://{deathstar}/v1/exhaust-port"));
    assert_eq!(code, "403");
    let after = tunnel(&lab, "node1");
    let out = count(&after, "streams_out") - count(&before, "streams_out");
    assert!(out >= 2, "the source's upstream connections went through the tunnel (one per family): {after:#}");
    assert_eq!(count(&after, "streams_out_failed"), count(&before, "streams_out_failed"), "{after:#}");
    // The destination judged the landings as from tiefighter, authenticated.
    let landed: Vec<Value> = porin_observe(&lab, "node2")
        .into_iter()
        .filter(|f| f["Type"] == "L7" && f["verdict"] == "FORWARDED" && f["l7"]["type"] == "REQUEST")
        .collect();
    assert!(landed.len() >= 4, "{landed:#?}");
    for f in &landed {
        assert_eq!(f["auth_type"], "SPIRE", "{f:#}");
        assert!(f["source"]["labels"].as_array().unwrap().iter().any(|l| l == "k8s:class=tiefighter"), "{f:#}");
    }
    // The exhaust port was refused at the source: node2 never saw it.
    let node1_denied = porin_observe(&lab, "node1")
        .into_iter()
        .any(|f| f["verdict"] == "DROPPED" && f["l7"]["http"]["method"] == "PUT");
    assert!(node1_denied, "node1 recorded the denied PUT");
    assert!(!porin_observe(&lab, "node2").iter().any(|f| f["l7"]["http"]["method"] == "PUT"), "the PUT reached node2");
}

/// The Kafka lab over two nodes, its rules requiring authentication: the producer's requests go
/// through the tunnel and node2's proxy judges each on the authenticated identity.
const KAFKA_MTLS: &str = r#"
version: 1
policies: ["@DIR@/kafka-authenticated.yaml"]
settings: {mesh: {trust_domain: cluster.local}}
nodes: [{name: node1}, {name: node2}]
pods:
  - {name: kafka, node: node2, labels: {app: kafka}, server: {kafka: {port: 9092, topics: [orders, payments]}}}
  - {name: producer, node: node1, labels: {app: producer}}
"#;

#[test]
fn kafka_rules_judge_tunnelled_flows_privileged() {
    if !privileged() {
        return;
    }
    // The Kafka lab's policy, each rule requiring authentication.
    let policy = std::fs::read_to_string(common::repo().join("config/examples/kafka/lab-topics.yaml"))
        .unwrap()
        .replace("  - fromEndpoints:\n", "  - authentication: {mode: required}\n    fromEndpoints:\n");
    assert_eq!(policy.matches("authentication").count(), 2, "{policy}");
    let dir = std::env::temp_dir().join(format!("porin-test-kafka-mtls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("kafka-authenticated.yaml"), policy).unwrap();
    let lab = Lab::up("mtlskafka", &KAFKA_MTLS.replace("@DIR@", &dir.display().to_string()));
    std::fs::remove_dir_all(&dir).unwrap();
    wait_credentials(&lab, "node1");
    wait_credentials(&lab, "node2");
    let before = tunnel(&lab, "node2");
    let script = common::repo().join("scripts/kafka-client.py");
    let produce = |topic: &str| {
        let o = lab.exec(
            "producer",
            &["python3", script.to_str().unwrap(), "produce", "--topic", topic, "--count", "3", "--value", "hi"],
        );
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(o.status.success(), "{out}{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_str::<Value>(out.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {out}"))
    };
    let orders = produce("orders");
    assert_eq!(orders["delivered"], 3, "{orders}");
    let payments = produce("payments");
    assert_eq!(payments["delivered"], 0, "{payments}");
    assert!(payments["errors"].as_array().unwrap().iter().any(|e| e["code"] == 29), "{payments}");
    let after = tunnel(&lab, "node2");
    assert!(count(&after, "streams_in") > count(&before, "streams_in"), "through the tunnel: {after:#}");
    let kafka: Vec<Value> = porin_observe(&lab, "node2").into_iter().filter(|f| !f["l7"]["kafka"].is_null()).collect();
    assert!(!kafka.is_empty(), "node2 recorded Kafka requests");
    assert!(kafka.iter().all(|f| f["auth_type"] == "SPIRE"), "{kafka:#?}");
    assert!(
        kafka.iter().any(|f| f["verdict"] == "DROPPED" && f["l7"]["kafka"]["topic"] == "payments"),
        "the payments produce was judged and denied at node2: {kafka:#?}"
    );
}
