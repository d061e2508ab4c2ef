//! Hubble's Observer API on a lab node, read by a Python grpcio client generated from the
//! project's protocol definitions (scripts/hubble-client.py), over the lab's TCP address and its
//! Unix socket: reflection lists the service; GetFlows filters (pod, verdict, protocol, HTTP
//! method, label), last-N and follow work on real star wars traffic; ServerStatus and GetNodes
//! report the ring; `porin observe` reads the same API. Root only; in CI (`CI=true`) always.

mod common;

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Lab, porin, privileged, repo};
use serde_json::{Value, json};

fn starwars(tag: &str) -> Lab {
    let text = std::fs::read_to_string(repo().join("config/labs/starwars.yaml")).unwrap();
    Lab::up(tag, &text.replace("../examples/", "@REPO@/config/examples/"))
}

fn client(addr: &str, args: &[&str]) -> Vec<Value> {
    let o = Command::new("python3").arg(repo().join("scripts/hubble-client.py")).arg(addr).args(args).output().unwrap();
    assert!(o.status.success(), "hubble-client {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn flows(addr: &str, request: &Value) -> Vec<Value> {
    client(addr, &["flows", &request.to_string()]).into_iter().filter_map(|r| r.get("flow").cloned()).collect()
}

#[test]
fn hubbles_own_client_reads_the_nodes_flows_privileged() {
    if !privileged() {
        return;
    }
    let lab = starwars("hub");
    let st = lab.status();
    let tcp = st["agent"]["hubble"].as_str().expect("the lab reports the node's Hubble TCP address").to_owned();
    let unix = st["agent"]["hubble_socket"].as_str().unwrap().to_owned();
    assert!(unix.starts_with("unix:"), "{unix}");

    // Reflection lists the service, so generic clients find it.
    let services =
        Command::new("python3").arg(repo().join("scripts/hubble-client.py")).args([&tcp, "services"]).output().unwrap();
    let services = String::from_utf8_lossy(&services.stdout);
    assert!(services.lines().any(|s| s == "observer.Observer"), "{services}");

    assert_eq!(lab.curl("tiefighter", "POST", "http://deathstar/v1/request-landing", 5).1, "Ship landed\n");
    assert_eq!(lab.curl("tiefighter", "PUT", "http://deathstar/v1/exhaust-port", 5).1, "Access denied\r\n");
    assert_eq!(lab.curl("xwing", "POST", "http://deathstar/v1/request-landing", 2).0, 28);

    // The tiefighter's HTTP flows: the allowed landing and the denied exhaust port, from the proxy.
    let tie = flows(
        &tcp,
        &json!({"number": 100, "whitelist": [{"source_pod": ["default/tiefighter"], "protocol": ["http"]}]}),
    );
    assert!(tie.iter().all(|f| f["source"]["pod_name"] == "tiefighter" && f["Type"] == "L7"), "{tie:#?}");
    let put = tie.iter().find(|f| f["l7"]["http"]["method"] == "PUT").expect("the PUT's record");
    assert_eq!(put["verdict"], "DROPPED");
    assert_eq!(put["drop_reason_desc"], "POLICY_DENIED");
    assert_eq!(put["node_name"], format!("porin-{}-node", lab.name));
    assert!(tie.iter().any(|f| f["l7"]["http"]["method"] == "POST" && f["verdict"] == "FORWARDED"), "{tie:#?}");
    // Its answers travel the other way: replies to the tiefighter.
    let replies = flows(
        &tcp,
        &json!({"number": 100, "whitelist": [{"destination_pod": ["default/tiefighter"], "reply": [true], "http_status_code": ["2+"]}]}),
    );
    assert!(replies.iter().any(|f| f["l7"]["http"]["code"] == 200 && f["l7"]["type"] == "RESPONSE"), "{replies:#?}");

    // The xwing's drop, from the kernel, by verdict and label (over the Unix socket).
    let xwing = flows(
        &unix,
        &json!({"number": 10, "whitelist": [{"verdict": ["DROPPED"], "source_label": ["k8s:org=alliance"]}]}),
    );
    assert!(!xwing.is_empty(), "no xwing drop");
    assert!(xwing.iter().all(|f| f["source"]["pod_name"] == "xwing" && f["Type"] == "L3_L4"), "{xwing:#?}");
    assert_eq!(xwing[0]["drop_reason_desc"], "POLICY_DENIED");

    // Last N, with a blacklist.
    let last2 = flows(&tcp, &json!({"number": 2, "blacklist": [{"source_pod": ["default/xwing"]}]}));
    assert_eq!(last2.len(), 2);
    assert!(last2.iter().all(|f| f["source"]["pod_name"] != "xwing"));

    // A bad filter is refused by name.
    let bad = Command::new("python3")
        .arg(repo().join("scripts/hubble-client.py"))
        .args([&tcp, "flows", &json!({"whitelist": [{"http_path": ["("]}]}).to_string()])
        .output()
        .unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("http_path"));

    // Follow: a GET made after the stream started arrives on it.
    let mut follower = Command::new("python3")
        .arg(repo().join("scripts/hubble-client.py"))
        .args([
            &tcp,
            "follow",
            &json!({"follow": true, "whitelist": [{"http_method": ["GET"]}]}).to_string(),
            "1",
            "20",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follower.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "following");
    // The stream is open once the client printed; give the server its first read.
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    lab.curl("tiefighter", "GET", "http://deathstar/v1", 5);
    let got: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(got["flow"]["l7"]["http"]["method"], "GET", "{got}");
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(follower.wait().unwrap().success());

    // ServerStatus and GetNodes report the ring.
    let status = &client(&tcp, &["status"])[0];
    assert_eq!(status["max_flows"], "4095", "{status}");
    let seen: u64 = status["seen_flows"].as_str().unwrap().parse().unwrap();
    assert!(seen >= 5, "{status}");
    assert_eq!(status["num_connected_nodes"], 1);
    let nodes = &client(&unix, &["nodes"])[0]["nodes"];
    assert_eq!(nodes[0]["name"], format!("porin-{}-node", lab.name));
    assert_eq!(nodes[0]["state"], "NODE_CONNECTED");

    // porin observe is a client of the same API: Hubble's JSON, Hubble's filters.
    let o = porin()
        .args(["observe", "--lab", &lab.name, "-o", "json", "--from-pod", "default/tiefighter", "--http-method", "PUT"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<Value> =
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(!lines.is_empty());
    assert!(
        lines.iter().all(|r| r["flow"]["l7"]["http"]["method"] == "PUT" && r["node_name"].is_string()),
        "{lines:#?}"
    );
}
