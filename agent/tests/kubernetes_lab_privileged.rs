//! The Kubernetes-mode lab (`config/labs/kubernetes.yaml`), as the README runs it: `porin lab up`
//! starts the test API server in the node's namespace, wires the pods with the real reference CNI
//! plugin (`bridge`, and `ptp`) with `porin-cni` chained, creates the pods and applies the star wars
//! policy through the API, and runs the node's agent in Kubernetes mode. Real curl in the pods,
//! the real kubectl for an edit; `porin lab down` runs DEL through the list and removes everything.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Lab, porin, privileged, repo};

/// The test API server, built by `cargo test --workspace` (an example of `porin-tests`), beside
/// this test's `porin`.
fn apiserver() -> std::path::PathBuf {
    let porin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_porin"));
    let path = porin.parent().unwrap().join("examples/apiserver");
    assert!(
        path.exists(),
        "{} is missing: cargo build -p porin-tests --example apiserver (cargo test --workspace builds it)",
        path.display()
    );
    path
}

/// The lab file as committed, its relative paths made absolute (the API server: this build's).
fn lab_yaml(cni: &str) -> String {
    let yaml = std::fs::read_to_string(repo().join("config/labs/kubernetes.yaml")).unwrap();
    assert!(yaml.contains("cni: bridge\n") && yaml.contains("../../target/release/examples/apiserver"), "{yaml}");
    yaml.replace("../../target/release/examples/apiserver", &apiserver().display().to_string())
        .replace("../examples/", "@REPO@/config/examples/")
        .replace("cni: bridge\n", &format!("cni: {cni}\n"))
}

/// kubectl against the lab's API server (in the node's namespace), with a private cache.
fn kubectl(lab: &Lab, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &format!("porin-{}-node", lab.name), "kubectl", "--kubeconfig"])
        .arg(format!("/run/porin/labs/{}/kubeconfig", lab.name))
        .args(args)
        .env("HOME", &lab.dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl (scripts/setup.sh installs it)");
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        std::io::Write::write_all(&mut input, text.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

#[test]
fn the_kubernetes_lab_enforces_what_is_applied_through_the_api_on_a_bridge_privileged() {
    scenario("bridge");
}

#[test]
fn the_kubernetes_lab_enforces_what_is_applied_through_the_api_with_ptp_privileged() {
    scenario("ptp");
}

fn scenario(cni: &str) {
    if !privileged() {
        return;
    }
    let lab = Lab::up(&format!("k8s{}", &cni[..1]), &lab_yaml(cni));
    let node = format!("porin-{}-node", lab.name);
    // The wiring is the plugin's: with bridge, every pod's veth a port of cni0.
    let ports = Command::new("ip").args(["-n", &node, "-o", "link", "show", "master", "cni0"]).output().unwrap();
    let ports = String::from_utf8_lossy(&ports.stdout).lines().count();
    assert_eq!(ports, if cni == "bridge" { 3 } else { 0 }, "{cni}: bridge ports");
    // porin-cni recorded each pod it wired.
    let records = std::fs::read_dir(format!("/run/porin/labs/{}/cni-state", lab.name)).unwrap().count();
    assert_eq!(records, 3, "porin-cni's records");

    // The star wars L7 policy, applied through the API by `lab up`: over IPv4 and IPv6.
    for v6 in [false, true] {
        let deathstar = lab.addr("deathstar", v6);
        let url =
            |path: &str| if v6 { format!("http://[{deathstar}]{path}") } else { format!("http://{deathstar}{path}") };
        let landing = lab.curl_status("tiefighter", &["-X", "POST"], &url("/v1/request-landing"));
        assert_eq!(landing, (0, "200".into(), "Ship landed\n".into()), "v6={v6}");
        let exhaust = lab.curl_status("tiefighter", &["-X", "PUT"], &url("/v1/exhaust-port"));
        assert_eq!((exhaust.0, exhaust.1.as_str()), (0, "403"), "v6={v6}: the proxy refuses the exhaust port");
        let xwing = lab.curl_status("xwing", &["-m", "1", "-X", "POST"], &url("/v1/request-landing"));
        assert_eq!(xwing.0, 28, "v6={v6}: the alliance is dropped in the kernel");
    }
    // The node says so on the object.
    let nodes = kubectl(&lab, &["get", "cnp", "rule1", "-o", "jsonpath={.status.nodes}"], None);
    let nodes: serde_json::Value = serde_json::from_slice(&nodes.stdout).unwrap();
    assert_eq!(nodes[&node]["enforcing"], true, "{nodes}");

    // An edit with kubectl: the alliance may land, the empire not; in force within a second or so.
    let policy = std::fs::read_to_string(repo().join("config/examples/starwars/l3-l4-l7.yaml")).unwrap();
    let edited = policy.replace("        org: empire\n    toPorts", "        org: alliance\n    toPorts");
    assert_ne!(edited, policy);
    kubectl(&lab, &["apply", "-f", "-"], Some(&edited));
    let deathstar = lab.addr("deathstar", false);
    let url = format!("http://{deathstar}/v1/request-landing");
    let start = Instant::now();
    while lab.curl_status("xwing", &["-m", "1", "-X", "POST"], &url).1 != "200" {
        assert!(start.elapsed() < Duration::from_secs(5), "the edit is not in force");
    }
    eprintln!("{cni}: the edit in force {:?} after kubectl returned", start.elapsed());
    assert_eq!(lab.curl_status("tiefighter", &["-m", "1", "-X", "POST"], &url).0, 28, "the empire is dropped now");

    // Down: DEL through the list (no error), and nothing of the lab is left.
    let name = lab.name.clone();
    let out = porin().args(["lab", "down", "--name", &name]).output().unwrap();
    assert!(out.status.success() && out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    let left = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&left.stdout).contains(&format!("porin-{name}-")), "namespaces left");
    assert!(!std::path::Path::new("/run/porin/labs").join(&name).exists());
}
