//! `porin cni` chained after the real Debian `containernetworking-plugins` (`ptp`, `bridge`, with
//! `host-local` addresses), run exactly as a container runtime runs a plugin list: each plugin by
//! its type from `CNI_PATH`, `CNI_*` in the environment, the network configuration on standard
//! input with the previous plugin's result as `prevResult`; DEL in reverse order. Everything
//! happens in a "node" network namespace the test makes (the host ends of the pods' veths go there)
//! and in pod namespaces inside it; all are removed on drop, also on panic.

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{Dir, privileged};
use serde_json::{Value, json};

/// Where Debian installs the reference plugins.
const PLUGINS: &str = "/usr/lib/cni";

/// A named network namespace, removed on drop.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Self {
        let ok = Command::new("ip").args(["netns", "add", &name]).status().unwrap().success();
        assert!(ok, "ip netns add {name}");
        Self(name)
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The runtime's side: runs one plugin of the list in the node namespace.
struct Runtime {
    node: Netns,
    /// `CNI_PATH`: the reference plugins and a `porin-cni` link to the binary under test.
    cni_path: String,
    dir: Dir,
}

impl Runtime {
    fn new(tag: &str) -> Self {
        let id = format!("{}-{}", std::process::id(), tag);
        let dir = Dir::new("cni");
        std::fs::create_dir_all(dir.0.join("bin")).unwrap();
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_porin"), dir.0.join("bin/porin-cni")).unwrap();
        let node = Netns::new(format!("pcni-node-{id}"));
        Command::new("ip").args(["netns", "exec", &node.0, "ip", "link", "set", "lo", "up"]).status().unwrap();
        let cni_path = format!("{PLUGINS}:{}", dir.0.join("bin").display());
        Self { node, cni_path, dir }
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.0.join("state")
    }

    /// Runs plugin `ty` with `command` for container `id` (interface eth0 in `netns`): its exit
    /// status and what it printed.
    fn plugin(&self, ty: &str, command: &str, id: &str, netns: &str, pod: &str, conf: &Value) -> (bool, Value) {
        let bin = self
            .cni_path
            .split(':')
            .map(|d| Path::new(d).join(ty))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("no {ty} plugin in {} (Debian: containernetworking-plugins)", self.cni_path));
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node.0])
            .arg(bin)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &self.cni_path)
            .env(
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={id}"),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let json = if stdout.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{ty} {command} printed {stdout:?}: {e}"))
        };
        (out.status.success(), json)
    }

    /// The list's configurations: the cluster's plugin (`ptp` or `bridge`, host-local addresses
    /// kept in the test's directory), then porin-cni.
    fn list(&self, main: &str) -> (Value, Value) {
        let ipam = json!({"type": "host-local", "subnet": "10.99.0.0/24", "dataDir": self.dir.0.join("ipam")});
        let first = match main {
            "bridge" => {
                json!({"cniVersion": "1.0.0", "name": "podnet", "type": "bridge", "bridge": "cni-test0", "isGateway": true, "ipam": ipam})
            }
            _ => json!({"cniVersion": "1.0.0", "name": "podnet", "type": "ptp", "ipam": ipam}),
        };
        let porin = json!({"cniVersion": "1.0.0", "name": "podnet", "type": "porin-cni", "stateDir": self.state_dir()});
        (first, porin)
    }

    /// ADD through the list, as a runtime does: the result of each plugin is the next one's
    /// `prevResult`; returns (the cluster plugin's result, porin-cni's).
    fn add(&self, main: &str, id: &str, pod: &Netns, name: &str) -> (Value, Value) {
        let (mut first, mut porin) = self.list(main);
        let (ok, result) = self.plugin(main, "ADD", id, &pod.path(), name, &first);
        assert!(ok, "{main} ADD: {result}");
        porin["prevResult"] = result.clone();
        let (ok, chained) = self.plugin("porin-cni", "ADD", id, &pod.path(), name, &porin);
        assert!(ok, "porin-cni ADD: {chained}");
        first["prevResult"] = chained.clone();
        (result, chained)
    }

    fn del(&self, main: &str, id: &str, pod: &str, name: &str, prev: &Value) {
        let (mut first, mut porin) = self.list(main);
        porin["prevResult"] = prev.clone();
        let (ok, out) = self.plugin("porin-cni", "DEL", id, pod, name, &porin);
        assert!(ok, "porin-cni DEL: {out}");
        first["prevResult"] = prev.clone();
        let (ok, out) = self.plugin(main, "DEL", id, pod, name, &first);
        assert!(ok, "{main} DEL: {out}");
    }

    fn record(&self, id: &str) -> Option<Value> {
        std::fs::read(self.state_dir().join(format!("{id}.eth0.json")))
            .ok()
            .map(|b| serde_json::from_slice(&b).unwrap())
    }

    fn in_node(&self, args: &[&str]) -> String {
        let out = Command::new("ip").args(["netns", "exec", &self.node.0]).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn chained_after(main: &str, tag: &str) {
    let rt = Runtime::new(tag);
    let pod = Netns::new(format!("pcni-pod-{}-{tag}", std::process::id()));
    let id = format!("c0ffee{tag}");
    let (result, chained) = rt.add(main, &id, &pod, "deathstar-1");

    // A chained plugin passes the result on as it came.
    assert_eq!(chained, result, "porin-cni changed the result it passes on");

    // The attachment names the host end of the pod's veth (not the bridge), the pod's address
    // and the pod.
    let rec = rt.record(&id).expect("ADD recorded the attachment");
    let host = rec["host_ifname"].as_str().unwrap().to_owned();
    assert_ne!(host, "cni-test0", "the bridge is not the pod's interface");
    let pod_ip = result["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().to_owned();
    assert_eq!(rec["ips"], json!([pod_ip]));
    assert_eq!((rec["pod_namespace"].as_str(), rec["pod_name"].as_str()), (Some("default"), Some("deathstar-1")));
    assert_eq!(rec["netns"].as_str(), Some(pod.path().as_str()));
    // That interface is the host end of the veth whose other end is the pod's eth0.
    let link = rt.in_node(&["ip", "-j", "link", "show", "dev", &host]);
    let link: Value = serde_json::from_str(&link).unwrap();
    assert_eq!(link[0]["link_type"].as_str(), Some("ether"), "{link}");
    let peer =
        Command::new("ip").args(["netns", "exec", &pod.0, "cat", "/sys/class/net/eth0/iflink"]).output().unwrap();
    let peer: u64 = String::from_utf8_lossy(&peer.stdout).trim().parse().unwrap();
    assert_eq!(link[0]["ifindex"].as_u64(), Some(peer), "the recorded interface is the pod's veth peer");

    // CHECK passes with the same prevResult; with another pod's addresses it fails, by the
    // spec's rules (non-zero exit, an error object on stdout).
    let (_, mut porin) = rt.list(main);
    porin["prevResult"] = chained.clone();
    let (ok, out) = rt.plugin("porin-cni", "CHECK", &id, &pod.path(), "deathstar-1", &porin);
    assert!(ok, "CHECK: {out}");
    let mut other = chained.clone();
    other["ips"][0]["address"] = json!("10.99.0.250/24");
    porin["prevResult"] = other;
    let (ok, out) = rt.plugin("porin-cni", "CHECK", &id, &pod.path(), "deathstar-1", &porin);
    assert!(!ok && out["code"].as_u64() == Some(100), "CHECK against other addresses: {out}");

    // Not chained: refused with the spec's error, nothing recorded.
    let (_, alone) = rt.list(main);
    let (ok, out) = rt.plugin("porin-cni", "ADD", "lonely", &pod.path(), "x", &alone);
    assert!(!ok && out["code"].as_u64() == Some(7) && out["cniVersion"] == "1.0.0", "{out}");
    assert!(rt.record("lonely").is_none());

    // VERSION, as runtimes ask it.
    let (ok, out) = rt.plugin("porin-cni", "VERSION", "", "", "", &json!({"cniVersion": "1.0.0"}));
    assert!(ok && out["supportedVersions"].as_array().unwrap().contains(&json!("1.0.0")), "{out}");

    // DEL through the list in reverse: forgotten, the veth gone; a second DEL (runtimes repeat
    // them) and a DEL after the namespace is gone succeed.
    rt.del(main, &id, &pod.path(), "deathstar-1", &chained);
    assert!(rt.record(&id).is_none(), "DEL forgot the attachment");
    assert!(!rt.in_node(&["ip", "-o", "link"]).contains(&host), "the veth outlived DEL");
    rt.del(main, &id, &pod.path(), "deathstar-1", &chained);
    drop(pod);
    rt.del(main, &id, "", "deathstar-1", &chained);
}

#[test]
fn chained_after_ptp_it_records_the_pods_veth_and_forgets_it() {
    if !privileged() {
        return;
    }
    chained_after("ptp", "ptp");
}

#[test]
fn chained_after_bridge_it_records_the_pods_veth_not_the_bridge() {
    if !privileged() {
        return;
    }
    chained_after("bridge", "br");
}
