//! The kernel datapath on real traffic: labs in network namespaces, the real eBPF programs, real curl,
//! ping and sockets. These need root; in CI (root, `CI=true`) they always run.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::{Lab, echo, privileged, repo};
use serde_json::Value;

fn starwars_lab(tag: &str) -> Lab {
    let text = std::fs::read_to_string(repo().join("config/labs/starwars-l3l4.yaml")).unwrap();
    Lab::up(tag, &text.replace("../examples/", "@REPO@/config/examples/"))
}

#[test]
fn starwars_l3l4_privileged() {
    if !privileged() {
        return;
    }
    let lab = starwars_lab("sw");
    let (code, body) = lab.curl("tiefighter", "POST", "http://deathstar/v1/request-landing", 5);
    assert_eq!((code, body.as_str()), (0, "Ship landed\n"));
    let (code, body) = lab.curl("tiefighter", "PUT", "http://deathstar/v1/exhaust-port", 5);
    assert_eq!((code, body.as_str()), (0, "Panic: deathstar exploded\n"), "L3/L4 only: the exhaust port is open");
    let v6 = lab.addr("deathstar", true);
    let (code, body) = lab.curl("tiefighter", "POST", &format!("http://[{v6}]/v1/request-landing"), 5);
    assert_eq!((code, body.as_str()), (0, "Ship landed\n"), "IPv6");

    let before = lab.counters();
    let seq = lab.last_seq();
    let start = Instant::now();
    let (code, _) = lab.curl("xwing", "POST", "http://deathstar/v1/request-landing", 2);
    assert_eq!(code, 28, "xwing's connection times out (curl exit 28)");
    assert!(start.elapsed() >= Duration::from_secs(2));

    // curl may try IPv6 first (glibc's address order): match the pod, not one address.
    let drop = lab.wait_event(seq, |e| e["verdict"] == "DROPPED" && e["source"]["pod_name"] == "xwing");
    assert_eq!(drop["drop_reason_desc"], "POLICY_DENIED");
    assert_eq!(drop["drop_reason"], 133);
    assert_eq!(drop["traffic_direction"], "INGRESS");
    assert_eq!(drop["policy"], "default/rule1 spec", "the rule that put the deathstar in default deny");
    assert_eq!(drop["destination"]["pod_name"], "deathstar");
    assert_eq!(drop["source"]["pod_name"], "xwing");
    assert_eq!(drop["l4"]["TCP"]["destination_port"], 80);
    assert_eq!(drop["source"]["identity"], lab.identity("xwing"));

    let after = lab.counters();
    let grew = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    assert!(grew("drop_policy_denied") >= 2, "the SYN and its retries: {after}");
    assert_eq!(grew("drop_policy_deny"), 0);
    assert!(after["ct_new"].as_u64().unwrap() >= 3 && after["ct_reply"].as_u64().unwrap() > 0, "{after}");

    // A verdict event for the allowed flow names the allowing element.
    let ok = lab.wait_event(0, |e| e["verdict"] == "FORWARDED" && e["source"]["pod_name"] == "tiefighter");
    assert_eq!(ok["policy"], "default/rule1 spec.ingress[0]");
    assert_eq!(ok["event_type"], "policy-verdict");
}

/// A lab with a database behind a deny rule, a DNS-like UDP service, and two hosts outside the
/// cluster: pod order fixes addresses (db .10, frontend .11, backend .12, dns .13, web1 .14, web2 .15).
fn edge_lab(tag: &str) -> Lab {
    Lab::up(
        tag,
        r#"
version: 1
settings: {ct_udp_secs: 2}
policies:
  - @REPO@/agent/tests/data/edge-policies.yaml
pods:
  - name: db
    labels: {app: db}
    server: {tcp_echo: 5432, http: {port: 80, routes: [{method: GET, path: /, body: "db\n"}]}}
  - name: frontend
    labels: {app: frontend}
  - name: backend
    labels: {app: backend}
  - name: dns
    labels: {app: dns}
    server: {udp_echo: 53}
  - name: web1
    external: true
    server: {http: {port: 80, routes: [{method: GET, path: /, body: "web1\n"}]}}
  - name: web2
    external: true
    server: {http: {port: 80, routes: [{method: GET, path: /, body: "web2\n"}]}}
"#,
    )
}

fn sock(lab: &Lab, pod: &str, port: u16, v6: bool) -> SocketAddr {
    SocketAddr::new(lab.addr(pod, v6).parse::<IpAddr>().unwrap(), port)
}

#[test]
fn deny_beats_allow_privileged() {
    if !privileged() {
        return;
    }
    let lab = edge_lab("deny");
    let mut ok =
        lab.tcp("backend", sock(&lab, "db", 5432, false)).expect("backend reaches the database (cluster allow)");
    assert!(echo(&mut ok, "select 1\n"));
    let seq = lab.last_seq();
    assert!(lab.tcp("frontend", sock(&lab, "db", 5432, false)).is_err(), "deny beats the cluster allow");
    let e = lab.wait_event(seq, |e| e["verdict"] == "DROPPED" && e["source"]["pod_name"] == "frontend");
    assert_eq!(e["drop_reason_desc"], "POLICY_DENY");
    assert_eq!(e["drop_reason"], 181);
    assert_eq!(e["policy"], "default/protect-db spec.ingressDeny[0]");
    assert!(lab.counters()["drop_policy_deny"].as_u64().unwrap() >= 1);
    // The deny covers one port only.
    assert_eq!(lab.curl("frontend", "GET", "http://db/", 5), (0, "db\n".into()));
    // IPv6 is judged the same way.
    assert!(lab.tcp("frontend", sock(&lab, "db", 5432, true)).is_err());
    assert!(lab.tcp("backend", sock(&lab, "db", 5432, true)).is_ok());
}

#[test]
fn cidr_and_world_privileged() {
    if !privileged() {
        return;
    }
    let lab = edge_lab("cidr");
    // Entity world: hosts outside the cluster reach the database's port 80 only, over both families.
    assert_eq!(lab.curl("web1", "GET", "http://db/", 5), (0, "db\n".into()));
    let v6 = lab.addr("db", true);
    assert_eq!(lab.curl("web1", "GET", &format!("http://[{v6}]/"), 5), (0, "db\n".into()), "world-ipv6");
    assert!(lab.tcp("web1", sock(&lab, "db", 5432, false)).is_err(), "world only on 80");
    // toCIDRSet with except.
    assert_eq!(lab.curl("backend", "GET", "http://web1/", 5), (0, "web1\n".into()));
    let seq = lab.last_seq();
    assert_eq!(lab.curl("backend", "GET", "http://web2/", 1).0, 28, "the except range is dropped");
    let e = lab.wait_event(seq, |e| {
        e["verdict"] == "DROPPED" && e["source"]["pod_name"] == "backend" && e["IP"]["ipVersion"] == "IPv4"
    });
    assert_eq!(
        (e["traffic_direction"].as_str(), e["drop_reason_desc"].as_str()),
        (Some("EGRESS"), Some("POLICY_DENIED"))
    );
    let labels: Vec<&str> = e["destination"]["labels"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(labels.contains(&"reserved:world") && labels.contains(&"cidr:198.51.100.15/32"), "{labels:?}");
    let w1v6 = lab.addr("web1", true);
    assert_eq!(lab.curl("backend", "GET", &format!("http://[{w1v6}]/"), 1).0, 28, "an IPv4 CIDR does not allow IPv6");
}

#[test]
fn udp_icmp_and_conntrack_expiry_privileged() {
    if !privileged() {
        return;
    }
    let lab = edge_lab("udp");
    let dns = sock(&lab, "dns", 53, false);
    let mut buf = [0u8; 64];
    let other = lab.udp("frontend", false);
    other.set_read_timeout(Some(Duration::from_millis(800))).unwrap();
    other.send_to(b"query", dns).unwrap();
    assert!(other.recv_from(&mut buf).is_err(), "frontend may not query");
    let client = lab.udp("backend", false);
    client.set_read_timeout(Some(Duration::from_millis(800))).unwrap();
    client.send_to(b"query", dns).unwrap();
    let (n, from) = client.recv_from(&mut buf).expect("UDP echo from the allowed client");
    assert_eq!((&buf[..n], from), (&b"query"[..], dns));

    // Conntrack expiry: with the allow removed, the live flow keeps passing until it idles out (2 s),
    // then its next packet is a new flow and is judged (and dropped).
    let without_dns = std::fs::read_to_string(repo().join("agent/tests/data/edge-policies.yaml"))
        .unwrap()
        .replace("port: \"53\"", "port: \"54\"");
    lab.apply(&[&without_dns]);
    client.send_to(b"again", dns).unwrap();
    assert!(client.recv_from(&mut buf).is_ok(), "established: still passes");
    std::thread::sleep(Duration::from_millis(2600));
    client.send_to(b"late", dns).unwrap();
    assert!(client.recv_from(&mut buf).is_err(), "expired, re-judged, dropped");

    // ICMP echo: allowed from backend (v4 and v6), not from frontend.
    assert!(lab.ping("backend", "db", false));
    assert!(lab.ping("backend", &lab.addr("db", true), true));
    assert!(!lab.ping("frontend", "db", false));
}

#[test]
fn policy_update_privileged() {
    if !privileged() {
        return;
    }
    let lab = Lab::up(
        "upd",
        r#"
version: 1
settings: {ct_tcp_close_secs: 1}
policies: ["@REPO@/agent/tests/data/empire-9000.yaml"]
pods:
  - {name: deathstar, labels: {org: empire, class: deathstar}, server: {tcp_echo: 9000, http: {port: 80, routes: [{method: GET, path: /, body: "ok\n"}]}}}
  - {name: tiefighter, labels: {org: empire, class: tiefighter}}
  - {name: xwing, labels: {org: alliance, class: xwing}}
"#,
    );
    let ds = sock(&lab, "deathstar", 9000, false);
    let mut live = lab.tcp("tiefighter", ds).expect("allowed under the first policy");
    assert!(echo(&mut live, "hello\n"));
    assert!(lab.tcp("xwing", sock(&lab, "deathstar", 80, false)).is_err());

    // New policy: port 9000 closed to everyone, port 80 open to the alliance too.
    let next = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: next}\nspec:\n  endpointSelector: {matchLabels: {class: deathstar}}\n  ingress:\n  - toPorts: [{ports: [{port: \"80\", protocol: TCP}]}]\n";
    // `lab apply` returns once the agent has the new version in the kernel: the very first
    // connection after it sees the update. (How long an apply takes is a figure, not a test:
    // `porin_policy_apply_seconds` and `status.last_apply`; a wall-clock bound here failed on a
    // loaded 2-core CI box at 174 ms, process start included.)
    lab.apply(&[next]);
    let xwing = lab.tcp("xwing", sock(&lab, "deathstar", 80, false));
    assert!(xwing.is_ok(), "a newly allowed flow passes right after the update");
    assert!(lab.tcp("tiefighter", ds).is_err(), "new flows to 9000 are now dropped");
    assert!(echo(&mut live, "still here\n"), "the established allowed connection stays up");

    // FIN in both directions is tracked: the entry is marked closing in the conntrack map.
    let local = live.local_addr().unwrap();
    live.shutdown(std::net::Shutdown::Both).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let ct: aya::maps::HashMap<_, redirect_common::CtKey, redirect_common::CtValue> = aya::maps::HashMap::try_from(
        aya::maps::Map::LruHashMap(aya::maps::MapData::from_pin(lab.pinned_map("PORIN_CT")).unwrap()),
    )
    .unwrap();
    let entry = ct
        .iter()
        .filter_map(Result::ok)
        .find(|(k, _)| u16::from_be_bytes(k.sport) == local.port() && u16::from_be_bytes(k.dport) == 9000)
        .map(|(_, v)| v)
        .expect("the connection's conntrack entry");
    use redirect_common::ct_flag;
    assert_eq!(entry.flags & (ct_flag::FIN_FWD | ct_flag::FIN_REV), ct_flag::FIN_FWD | ct_flag::FIN_REV, "{entry:?}");
    assert_ne!(entry.flags & ct_flag::SEEN_REPLY, 0);
}

fn map_ids(lab: &Lab) -> Vec<u32> {
    ["PORIN_IPCACHE", "PORIN_POLICY", "PORIN_CT", "PORIN_IFACES", "PORIN_CONFIG"]
        .iter()
        .map(|m| aya::maps::MapData::from_pin(lab.pinned_map(m)).unwrap().info().unwrap().id())
        .collect()
}

#[test]
fn agent_killed_and_restarted_privileged() {
    if !privileged() {
        return;
    }
    let lab = Lab::up(
        "rst",
        r#"
version: 1
policies: ["@REPO@/agent/tests/data/empire-9000.yaml"]
pods:
  - {name: deathstar, labels: {org: empire, class: deathstar}, server: {tcp_echo: 9000, http: {port: 80, routes: [{method: GET, path: /, body: "ok\n"}]}}}
  - {name: tiefighter, labels: {org: empire, class: tiefighter}}
  - {name: xwing, labels: {org: alliance, class: xwing}}
"#,
    );
    let ds = sock(&lab, "deathstar", 9000, false);
    let mut live = lab.tcp("tiefighter", ds).unwrap();
    assert!(echo(&mut live, "before\n"));
    let ids = map_ids(&lab);
    let generation = lab.status()["agent"]["status"]["generation"].as_u64().unwrap();

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(lab.agent_pid()), nix::sys::signal::Signal::SIGKILL).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let st = lab.status();
    assert_eq!(st["agent"]["running"], false, "{st}");
    // Enforcement continues without the agent.
    assert!(echo(&mut live, "agent down\n"), "established connection survives the agent");
    assert!(lab.tcp("tiefighter", ds).is_ok(), "allowed new flows still pass");
    assert!(lab.tcp("xwing", ds).is_err(), "denied flows are still dropped");

    let out = common::porin().args(["lab", "restart-agent", "--name", &lab.name]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let st: Value = lab.status();
    assert_eq!(st["agent"]["running"], true);
    assert_eq!(map_ids(&lab), ids, "the restarted agent reuses the pinned maps");
    assert_ne!(
        st["agent"]["status"]["generation"].as_u64().unwrap(),
        generation,
        "it applied its snapshot with a flip"
    );
    assert!(echo(&mut live, "agent back\n"), "no established connection dropped");
    assert!(lab.tcp("tiefighter", ds).is_ok());
    assert!(lab.tcp("xwing", ds).is_err());
    let eps = st["agent"]["status"]["endpoints"].as_array().unwrap().clone();
    assert!(eps.iter().all(|e| e["attached"] == true), "{eps:?}");
}

/// Sends one raw IP packet of protocol `proto` from `from` to `to` and says whether `to` got it.
fn raw_ip_delivered(lab: &Lab, from: &str, to: &str, proto: u8) -> bool {
    let dst = lab.addr(to, false);
    let listen = format!(
        "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_RAW, {proto}); s.settimeout(2)\n\
         try:\n  print('got' if s.recv(100) else '')\nexcept socket.timeout:\n  print('none')"
    );
    let receiver = std::thread::spawn({
        let (name, to) = (lab.name.clone(), to.to_owned());
        move || {
            let o = common::porin()
                .args(["lab", "exec", "--name", &name, &to, "--", "python3", "-c", &listen])
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).trim() == "got"
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let send = format!(
        "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_RAW, {proto}); s.sendto(b'porin-ip-test', ('{dst}', 0))"
    );
    assert!(lab.exec(from, &["python3", "-c", &send]).status.success());
    receiver.join().unwrap()
}

#[test]
fn extended_ip_protocols_are_enforced_in_the_kernel_privileged() {
    if !privileged() {
        return;
    }
    let policy = |protocols: &str| {
        format!(
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: routers}}
spec:
  endpointSelector: {{matchLabels: {{role: router}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{role: router}}}}]
    toPorts: [{{ports: [{protocols}]}}]
"#
        )
    };
    let dir = std::env::temp_dir().join(format!("porin-vrrp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("vrrp.yaml"), policy(r#"{protocol: VRRP}, {protocol: IGMP, port: "0"}"#)).unwrap();
    let lab = Lab::up(
        "vrrp",
        &format!(
            "version: 1\npolicies: [{}]\npods:\n  - {{name: r1, labels: {{role: router}}}}\n  - {{name: r2, labels: {{role: router}}}}\n",
            dir.join("vrrp.yaml").display()
        ),
    );
    // VRRP (112) and IGMP (2) pass between the routers; GRE (47) is not allowed.
    assert!(raw_ip_delivered(&lab, "r1", "r2", 112), "VRRP allowed");
    assert!(raw_ip_delivered(&lab, "r1", "r2", 2), "IGMP allowed");
    let seq = lab.last_seq();
    assert!(!raw_ip_delivered(&lab, "r1", "r2", 47), "GRE dropped");
    let drop = lab.wait_event(seq, |e| e["verdict"] == "DROPPED" && e["destination"]["pod_name"] == "r2");
    assert_eq!(drop["drop_reason_desc"], "POLICY_DENIED");
    // Only TCP allowed now: VRRP is dropped too, and recorded as VRRP.
    lab.apply(&[&policy(r#"{port: "80", protocol: TCP}"#)]);
    let seq = lab.last_seq();
    assert!(!raw_ip_delivered(&lab, "r1", "r2", 112), "VRRP dropped once the policy no longer names it");
    let drop = lab.wait_event(seq, |e| e["verdict"] == "DROPPED" && e["l4"].get("VRRP").is_some());
    assert_eq!(drop["destination"]["pod_name"], "r2");
    std::fs::remove_dir_all(&dir).unwrap();
}
