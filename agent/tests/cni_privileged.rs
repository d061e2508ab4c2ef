//! `porin cni` chained after the real Debian `containernetworking-plugins` (`ptp`, `bridge`, with
//! `host-local` addresses), run exactly as a container runtime runs a plugin list: each plugin by
//! its type from `CNI_PATH`, `CNI_*` in the environment, the network configuration on standard
//! input with the previous plugin's result as `prevResult`; DEL in reverse order. Everything
//! happens in a "node" network namespace the test makes (the host ends of the pods' veths go there)
//! and in pod namespaces inside it; all are removed on drop, also on panic.

mod common;

use std::process::Command;

use common::cni::{Netns, Runtime};
use common::privileged;
use serde_json::{Value, json};

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
