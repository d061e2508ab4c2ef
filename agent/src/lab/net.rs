//! The lab's network: the node and pod namespaces, veth pairs, addresses and routes, the node's
//! local routing for packets marked for the proxy, and `/etc/hosts` so pod names resolve.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::process::spawn_porin;
use super::*;
use crate::agent::{EndpointSpec, EndpointsFile};

/// Runs `ip ARGS`, failing with its stderr.
pub(super) fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output().context("run ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

pub(super) fn sysctl_in(netns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    ip(&["netns", "exec", netns, "sysctl", "-qw", &format!("{key}={value}")])
}

pub(super) fn netns_list() -> Vec<String> {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

pub(super) fn hosts_file(pods: &[Pod]) -> String {
    let mut s = String::from("127.0.0.1 localhost\n::1 localhost ip6-localhost\n");
    for p in pods {
        let _ = writeln!(
            s,
            "{} {} {}.{} {}.{}.svc.cluster.local",
            p.ipv4, p.name, p.name, p.namespace, p.name, p.namespace
        );
    }
    for p in pods {
        let _ = writeln!(
            s,
            "{} {} {}.{} {}.{}.svc.cluster.local",
            p.ipv6, p.name, p.name, p.namespace, p.name, p.namespace
        );
    }
    s
}

/// A server spec with its DNS records' `pod:` references turned into the pods' addresses, and the
/// Kafka broker advertising its own pod's address.
fn with_pod_addresses(server: &ServerSpec, own: &Pod, pods: &[Pod]) -> anyhow::Result<ServerSpec> {
    let mut s = server.clone();
    if let Some(k) = &mut s.kafka {
        k.advertise.get_or_insert(own.ipv4);
    }
    if let Some(dns) = &mut s.dns {
        for z in &mut dns.zones {
            for r in &mut z.records {
                if let Some(name) = r.pod.take() {
                    let p = pods
                        .iter()
                        .find(|p| p.name == name)
                        .ok_or_else(|| anyhow::anyhow!("dns zone {}: record {}: no pod {name:?}", z.name, r.name))?;
                    r.addresses.extend([p.ipv4, p.ipv6]);
                }
            }
        }
    }
    Ok(s)
}

pub(super) fn setup(lab: &LabFile, name: &str, file: &Path, paths: &LabPaths) -> anyhow::Result<LabState> {
    let node = format!("porin-{name}-node");
    ip(&["netns", "add", &node])?;
    ip(&["-n", &node, "link", "set", "lo", "up"])?;
    for (k, v) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv6.conf.all.forwarding", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
    ] {
        sysctl_in(&node, k, v)?;
    }
    ip(&["-n", &node, "addr", "add", &format!("{NODE_IP_V4}/32"), "dev", "lo"])?;
    ip(&["-n", &node, "-6", "addr", "add", &format!("{NODE_IP_V6}/128"), "dev", "lo"])?;
    // Packets the datapath assigned to a proxy socket (mark TO_PROXY) are delivered locally.
    let fwmark = format!("{:#x}/{:#x}", redirect_common::mark::TO_PROXY, redirect_common::mark::MASK);
    for v6 in [false, true] {
        let fam = if v6 { "-6" } else { "-4" };
        ip(&["-n", &node, fam, "rule", "add", "fwmark", &fwmark, "lookup", "100", "pref", "100"])?;
        ip(&[
            "-n",
            &node,
            fam,
            "route",
            "add",
            "local",
            if v6 { "::/0" } else { "0.0.0.0/0" },
            "dev",
            "lo",
            "table",
            "100",
        ])?;
    }

    let mut pods = Vec::new();
    let mut next_ep = 1u32;
    for (i, def) in lab.pods.iter().enumerate() {
        if def.name.is_empty() || !def.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
            bail!("pod name {:?}: use [a-z0-9-]", def.name);
        }
        let n = 10 + i;
        let (ipv4, ipv6): (IpAddr, IpAddr) = if def.external {
            (format!("198.51.100.{n}").parse()?, format!("2001:db8:1::{n:x}").parse()?)
        } else {
            (format!("10.244.0.{n}").parse()?, format!("fd00:244::{n:x}").parse()?)
        };
        let netns = format!("porin-{name}-{}", def.name);
        let ifname = format!("pod{i}");
        ip(&["netns", "add", &netns])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&["-n", &node, "link", "add", &ifname, "type", "veth", "peer", "name", "eth0", "netns", &netns])?;
        ip(&["-n", &node, "link", "set", &ifname, "up"])?;
        ip(&["-n", &node, "addr", "add", &format!("{NODE_GW_V4}/32"), "dev", &ifname])?;
        ip(&["-n", &node, "-6", "addr", "add", &format!("{NODE_GW_V6}/64"), "dev", &ifname, "nodad"])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &netns, "addr", "add", &format!("{ipv4}/32"), "dev", "eth0"])?;
        ip(&["-n", &netns, "-6", "addr", "add", &format!("{ipv6}/128"), "dev", "eth0", "nodad"])?;
        ip(&["-n", &netns, "route", "add", NODE_GW_V4, "dev", "eth0", "scope", "link"])?;
        ip(&["-n", &netns, "route", "add", "default", "via", NODE_GW_V4, "dev", "eth0"])?;
        ip(&["-n", &netns, "-6", "route", "add", "default", "via", NODE_GW_V6, "dev", "eth0"])?;
        ip(&["-n", &node, "route", "add", &format!("{ipv4}/32"), "dev", &ifname, "src", NODE_IP_V4])?;
        ip(&["-n", &node, "-6", "route", "add", &format!("{ipv6}/128"), "dev", &ifname, "src", NODE_IP_V6])?;
        let endpoint = if def.external {
            0
        } else {
            next_ep += 1;
            next_ep - 1
        };
        pods.push(Pod {
            name: def.name.clone(),
            namespace: def.namespace.clone(),
            labels: def.labels.clone(),
            annotations: def.annotations.clone(),
            policy_audit_mode: def.policy_audit_mode,
            netns,
            ifname,
            ipv4,
            ipv6,
            endpoint,
            external: def.external,
            pid: None,
        });
    }
    let hosts = hosts_file(&pods);
    let resolv = match &lab.resolver {
        Some(name) => {
            let r =
                pods.iter().find(|p| &p.name == name).ok_or_else(|| anyhow::anyhow!("resolver: no pod {name:?}"))?;
            Some(format!("nameserver {}\noptions timeout:2 attempts:2\n", r.ipv4))
        }
        None => None,
    };
    for p in &pods {
        let dir = Path::new("/etc/netns").join(&p.netns);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("hosts"), &hosts)?;
        if let Some(r) = &resolv {
            std::fs::write(dir.join("resolv.conf"), r)?;
        }
    }

    porin_datapath::loader::ensure_bpffs(&paths.bpffs())?;
    let endpoints = EndpointsFile {
        cluster: None,
        node_ips: vec![NODE_IP_V4.parse()?, NODE_IP_V6.parse()?, NODE_GW_V4.parse()?],
        namespaces: BTreeMap::new(),
        namespace_annotations: BTreeMap::new(),
        policy_audit_mode: false,
        endpoints: pods
            .iter()
            .filter(|p| !p.external)
            .map(|p| EndpointSpec {
                id: p.endpoint,
                name: p.name.clone(),
                namespace: p.namespace.clone(),
                labels: p.labels.clone(),
                ips: vec![p.ipv4, p.ipv6],
                ifname: p.ifname.clone(),
                named_ports: vec![],
                service_account: None,
                annotations: p.annotations.clone(),
                policy_audit_mode: p.policy_audit_mode,
            })
            .collect(),
        // External pods are the world: their veths are the node's uplinks.
        uplinks: pods.iter().filter(|p| p.external).map(|p| p.ifname.clone()).collect(),
    };
    std::fs::write(paths.endpoints(), serde_json::to_string_pretty(&endpoints)?)?;
    let mut st = LabState {
        name: name.to_owned(),
        file: file.to_path_buf(),
        node_netns: node,
        pods: pods.clone(),
        agent_pid: None,
        proxy_pid: None,
        settings: lab.settings.clone(),
    };
    save_state(&st)?;
    st.agent_pid = Some(start_agent(name, &lab.settings)?);
    save_state(&st)?;
    st.proxy_pid = Some(start_proxy(name, &lab.settings)?);
    save_state(&st)?;

    // Servers and commands, then wait for the servers to listen.
    let mut ready_files = Vec::new();
    for (def, pod) in lab.pods.iter().zip(st.pods.iter_mut()) {
        let log = paths.dir.join(format!("{}.log", pod.name));
        if let Some(server) = &def.server {
            let spec = paths.dir.join(format!("{}.server.json", pod.name));
            std::fs::write(&spec, serde_json::to_string(&with_pod_addresses(server, pod, &pods)?)?)?;
            let ready = paths.dir.join(format!("{}.ready", pod.name));
            let args = vec![
                "lab".into(),
                "serve".into(),
                "--netns".into(),
                pod.netns.clone(),
                "--spec".into(),
                spec.display().to_string(),
                "--ready".into(),
                ready.display().to_string(),
            ];
            pod.pid = Some(spawn_porin(&args, &log)?.id());
            ready_files.push(ready);
        } else if let Some(cmd) = &def.command {
            let mut args = vec!["lab".into(), "run-in".into(), "--netns".into(), pod.netns.clone(), "--".into()];
            args.extend(cmd.iter().cloned());
            pod.pid = Some(spawn_porin(&args, &log)?.id());
        }
    }
    save_state(&st)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready_files.iter().all(|r| r.exists()) {
        if Instant::now() > deadline {
            bail!("pod servers did not start in 20 s (logs in {})", paths.dir.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(st)
}
