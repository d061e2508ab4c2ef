//! More than one node: each node a namespace with its own agent, proxy and bpffs, joined by an
//! underlay with native routing; every node knows the others' pods by address and identity from the
//! cluster state the lab writes. Real curl and sockets in lab namespaces. Root only; in CI
//! (`CI=true`) always.

mod common;

use std::path::PathBuf;

use common::{Lab, porin, privileged};
use serde_json::Value;

/// The star wars pods over two nodes (the ships on node1, the deathstar on node2); the landing
/// answer names the address the deathstar saw.
const STARWARS: &str = r#"
version: 1
policies: ["@REPO@/config/examples/starwars/l3-l4-l7.yaml"]
nodes: [{name: node1}, {name: node2}]
pods:
  - name: deathstar
    node: node2
    labels: {org: empire, class: deathstar}
    server: {http: {port: 80, routes: [
      {method: POST, path: /v1/request-landing, body: "Ship landed for {client}\n"},
      {method: PUT, path: /v1/exhaust-port, body: "Panic: deathstar exploded\n"}]}}
  - {name: tiefighter, node: node1, labels: {org: empire, class: tiefighter}}
  - {name: xwing, node: node1, labels: {org: alliance, class: xwing}}
"#;

/// A node's Hubble socket.
fn hubble(lab: &Lab, node: &str) -> PathBuf {
    PathBuf::from(format!("/run/porin/labs/{}/nodes/{node}/hubble.sock", lab.name))
}

/// The flows a node's Hubble API has (JSON, as `hubble observe -o json`), with extra flags.
fn flows(lab: &Lab, node: &str, flags: &[&str]) -> Vec<Value> {
    let server = format!("unix:{}", hubble(lab, node).display());
    let o =
        porin().args(["observe", "-o", "json", "--server", &server, "--last", "1000"]).args(flags).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["flow"].clone())
        .collect()
}

fn node_of<'a>(st: &'a Value, name: &str) -> &'a Value {
    st["nodes"].as_array().unwrap().iter().find(|n| n["name"] == name).unwrap_or_else(|| panic!("no node {name}"))
}

#[test]
fn starwars_across_nodes_privileged() {
    if !privileged() {
        return;
    }
    let lab = Lab::up("nodes", STARWARS);
    let st = lab.status();
    // Each node runs its own agent and proxy and attaches only its own pods.
    for (node, pods) in [("node1", vec!["tiefighter", "xwing"]), ("node2", vec!["deathstar"])] {
        let n = node_of(&st, node);
        assert_eq!(n["agent"]["running"], true, "{node}");
        assert_eq!(n["proxy"]["running"], true, "{node}");
        let attached: Vec<&str> = n["agent"]["status"]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["attached"] == true)
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert_eq!(attached, pods, "{node}");
        assert_eq!(n["agent"]["status"]["errors"], serde_json::json!([]), "{node}");
    }
    let tie_v4 = lab.addr("tiefighter", false);
    assert!(tie_v4.starts_with("10.244.0."), "node1's pod CIDR: {tie_v4}");
    assert!(lab.addr("deathstar", false).starts_with("10.244.1."), "node2's pod CIDR");

    for v6 in [false, true] {
        let host = if v6 { format!("[{}]", lab.addr("deathstar", true)) } else { "deathstar".to_owned() };
        let tie = lab.addr("tiefighter", v6);
        // Allowed at L7 by node2's proxy; the deathstar sees the tiefighter's own address.
        // By name, curl would race both families (happy eyeballs): ask for the one under test.
        let family = if v6 { "-6" } else { "-4" };
        let (code, status, body) =
            lab.curl_status("tiefighter", &[family, "-X", "POST"], &format!("http://{host}/v1/request-landing"));
        assert_eq!((code, status.as_str(), body), (0, "200", format!("Ship landed for {tie}\n")), "{host}");
        let (code, status, body) =
            lab.curl_status("tiefighter", &[family, "-X", "PUT"], &format!("http://{host}/v1/exhaust-port"));
        assert_eq!((code, status.as_str(), body.as_str()), (0, "403", "Access denied\r\n"), "{host}");
        // The xwing's SYN crosses the underlay and is dropped at the deathstar's node.
        let (code, _, _) =
            lab.curl_status("xwing", &[family, "-X", "POST"], &format!("http://{host}/v1/request-landing"));
        assert_eq!(code, 28, "xwing times out ({host})");
    }

    // Identities agree: node2 judged the ships by the numbers node1 gives them.
    let tiefighter = lab.identity("tiefighter");
    let xwing = lab.identity("xwing");
    let deathstar = lab.identity("deathstar");
    assert!(tiefighter >= 256 && xwing >= 256 && deathstar >= 256 && tiefighter != xwing);
    let at2 = flows(&lab, "node2", &[]);
    let denied_put = at2
        .iter()
        .find(|f| f["l7"]["http"]["method"] == "PUT" && f["verdict"] == "DROPPED")
        .unwrap_or_else(|| panic!("node2 recorded the denied PUT: {at2:#?}"));
    assert_eq!(denied_put["source"]["identity"], tiefighter);
    assert_eq!(denied_put["source"]["pod_name"], "tiefighter");
    assert_eq!(denied_put["destination"]["identity"], deathstar);
    assert_eq!(denied_put["node_name"], node_of(&st, "node2")["netns"]);
    let xwing_drop = at2
        .iter()
        .find(|f| f["verdict"] == "DROPPED" && f["source"]["pod_name"] == "xwing")
        .unwrap_or_else(|| panic!("node2 recorded the xwing's drop: {at2:#?}"));
    assert_eq!(xwing_drop["source"]["identity"], xwing);
    assert_eq!(xwing_drop["drop_reason_desc"], "POLICY_DENIED");
    // Node1 has no policy for its pods: it let them out; nothing of the deathstar's is judged there.
    let dropped1 = flows(&lab, "node1", &["--verdict", "DROPPED"]);
    assert!(dropped1.is_empty(), "node1 dropped nothing: {dropped1:#?}");

    // `porin observe --lab` merges every node's flows in time order, as Hubble Relay does.
    let at1 = flows(&lab, "node1", &[]);
    let at2 = flows(&lab, "node2", &[]);
    let o = porin().args(["observe", "-o", "json", "--lab", &lab.name, "--last", "1000"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let merged: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["flow"].clone())
        .collect();
    assert!(merged.len() >= at1.len() + at2.len(), "{} merged of {} + {}", merged.len(), at1.len(), at2.len());
    let nodes: std::collections::BTreeSet<&str> = merged.iter().map(|f| f["node_name"].as_str().unwrap()).collect();
    assert_eq!(nodes.len(), 2, "both nodes' flows: {nodes:?}");
    // RFC 3339 in UTC, the fraction as long as it needs: compared with it padded to nanoseconds.
    let time = |f: &Value| {
        let t = f["time"].as_str().unwrap().trim_end_matches('Z');
        let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
        format!("{whole}.{frac:0<9}")
    };
    let times: Vec<String> = merged.iter().map(time).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "in time order: {times:?}");
    // `--last N` is of the merged flows; `--node` picks one node's.
    let o = porin().args(["observe", "-o", "json", "--lab", &lab.name, "--last", "3"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 3);
    let o = porin()
        .args(["observe", "-o", "json", "--lab", &lab.name, "--node", "node2", "--last", "1000"])
        .output()
        .unwrap();
    let only2 = String::from_utf8_lossy(&o.stdout).lines().count();
    assert!(only2 >= at2.len() && only2 < merged.len(), "node2 alone: {only2}");
}

/// Packets a node sent onto the underlay so far (its port on the fabric bridge received them).
fn underlay_packets(lab: &Lab, port: &str) -> u64 {
    let o = std::process::Command::new("ip")
        .args(["-n", &format!("porin-{}-fabric", lab.name), "-s", "-j", "link", "show", port])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v[0]["stats64"]["rx"]["packets"].as_u64().unwrap()
}

const EGRESS_ALLOWED: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-out, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: sink}}]
    toPorts: [{ports: [{port: "9000", protocol: UDP}]}]
"#;

const EGRESS_DENIED: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-out, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEntities: [world]
  egressDeny:
  - toEndpoints: [{matchLabels: {app: sink}}]
"#;

#[test]
fn egress_denied_at_the_source_never_reaches_the_underlay_privileged() {
    if !privileged() {
        return;
    }
    let lab = Lab::up(
        "nodeseg",
        r#"
version: 1
nodes: [{name: node1}, {name: node2}]
pods:
  - {name: client, node: node1, labels: {app: client}}
  - {name: sink, node: node2, labels: {app: sink}, server: {udp_echo: 9000}}
"#,
    );
    const N: u64 = 300;
    let sink: std::net::SocketAddr = format!("{}:9000", lab.addr("sink", false)).parse().unwrap();
    // A fresh socket (a flow of its own) each time: a flow keeps the verdict it was opened with.
    let send = || {
        let sock = lab.udp("client", false);
        for i in 0..N {
            sock.send_to(format!("datagram {i}").as_bytes(), sink).unwrap();
            if i % 50 == 49 {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    };

    // Allowed: the datagrams cross the underlay (the control: the counter sees them).
    lab.apply(&[EGRESS_ALLOWED]);
    let before = underlay_packets(&lab, "n0");
    send();
    let crossed = underlay_packets(&lab, "n0") - before;
    assert!(crossed >= N, "allowed datagrams cross the underlay: {crossed} of {N}");

    // Denied at the source node: dropped by node1's datapath, counted there, never on the underlay.
    lab.apply(&[EGRESS_DENIED]);
    let drops = |c: &Value| c["drop_policy_deny"].as_u64().unwrap();
    let (drops_before, before) = (drops(&lab.counters_of(Some("node1"))), underlay_packets(&lab, "n0"));
    send();
    let crossed = underlay_packets(&lab, "n0") - before;
    let dropped = drops(&lab.counters_of(Some("node1"))) - drops_before;
    assert!(dropped >= N, "node1 dropped the denied datagrams: {dropped} of {N}");
    // A few packets of the nodes' own (neighbour discovery) may cross meanwhile; the datagrams do not.
    assert!(crossed < 20, "denied datagrams stayed off the underlay: {crossed} packets crossed");
    let at1 = lab.events(0);
    assert!(
        at1.iter().any(|e| e["verdict"] == "DROPPED"
            && e["drop_reason_desc"] == "POLICY_DENY"
            && e["traffic_direction"] == "EGRESS"),
        "node1 recorded the egress deny: {at1:#?}"
    );
}
