//! The lab's network: the node and pod namespaces, veth pairs, addresses and routes, the node's
//! local routing for packets marked for the proxy, and `/etc/hosts` so pod names resolve.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::process::spawn_porin;
use super::*;
use crate::agent::{EndpointSpec, EndpointsFile, NodeSpec};

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

pub(super) fn hosts_file(pods: &[Pod], services: &[policy_engine::services::Service]) -> String {
    let mut s = String::from("127.0.0.1 localhost\n::1 localhost ip6-localhost\n");
    // Services first: a name both a service and a pod has resolves to the service.
    for svc in services {
        for ip in &svc.cluster_ips {
            let (n, ns) = (&svc.name, &svc.namespace);
            let _ = writeln!(s, "{ip} {n} {n}.{ns} {n}.{ns}.svc.cluster.local");
        }
    }
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

/// The nodes of a lab file: its `nodes:`, or the single node.
fn node_names(lab: &LabFile) -> anyhow::Result<Vec<String>> {
    if lab.nodes.is_empty() {
        return Ok(vec![SINGLE_NODE.to_owned()]);
    }
    let mut names: Vec<String> = Vec::new();
    for n in &lab.nodes {
        if !valid_name(&n.name) || n.name.len() > 24 || n.name == "fabric" {
            bail!("node name {:?}: use 1-24 characters of [a-z0-9-], not \"fabric\"", n.name);
        }
        if names.contains(&n.name) {
            bail!("node {:?} is declared twice", n.name);
        }
        names.push(n.name.clone());
    }
    if names.len() > 200 {
        bail!("{} nodes: a lab has at most 200", names.len());
    }
    Ok(names)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Node `k`'s own addresses: on its loopback, then on the underlay (with several nodes).
fn node_addresses(k: usize, underlay: bool) -> Vec<IpAddr> {
    let mut a: Vec<IpAddr> =
        vec![IpAddr::from([10, 244, 255, (k + 1) as u8]), format!("fd00:244:{k:x}::ffff").parse().expect("address")];
    if underlay {
        a.push(IpAddr::from([172, 31, 244, (k + 1) as u8]));
        a.push(format!("fd00:31:244::{:x}", k + 1).parse().expect("address"));
    }
    a
}

/// Creates node `k`'s namespace: forwarding, its loopback addresses (the node's agent adds the
/// policy routing that delivers what the datapath marks for the proxy).
fn node_namespace(netns: &str, own: &[IpAddr]) -> anyhow::Result<()> {
    ip(&["netns", "add", netns])?;
    ip(&["-n", netns, "link", "set", "lo", "up"])?;
    for (k, v) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv6.conf.all.forwarding", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
    ] {
        sysctl_in(netns, k, v)?;
    }
    ip(&["-n", netns, "addr", "add", &format!("{}/32", own[0]), "dev", "lo"])?;
    ip(&["-n", netns, "-6", "addr", "add", &format!("{}/128", own[1]), "dev", "lo"])?;
    Ok(())
}

/// The underlay: a `fabric` namespace with a bridge, each node's `fabric` interface on it, and on
/// every node a route for each other node's pod CIDRs, its own addresses and its external pods.
fn underlay(name: &str, nodes: &[LabNode], pods: &[Pod]) -> anyhow::Result<()> {
    let fabric = format!("porin-{name}-fabric");
    ip(&["netns", "add", &fabric])?;
    ip(&["-n", &fabric, "link", "set", "lo", "up"])?;
    ip(&["-n", &fabric, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", &fabric, "link", "set", "br0", "up"])?;
    for (k, n) in nodes.iter().enumerate() {
        let port = format!("n{k}");
        ip(&["-n", &fabric, "link", "add", &port, "type", "veth", "peer", "name", "fabric", "netns", &n.netns])?;
        ip(&["-n", &fabric, "link", "set", &port, "master", "br0", "up"])?;
        ip(&["-n", &n.netns, "link", "set", "fabric", "up"])?;
        ip(&["-n", &n.netns, "addr", "add", &format!("{}/24", n.addresses[2]), "dev", "fabric"])?;
        ip(&["-n", &n.netns, "-6", "addr", "add", &format!("{}/64", n.addresses[3]), "dev", "fabric", "nodad"])?;
    }
    for (k, n) in nodes.iter().enumerate() {
        for (j, other) in nodes.iter().enumerate().filter(|(j, _)| *j != k) {
            let (via4, via6) = (other.addresses[2].to_string(), other.addresses[3].to_string());
            let mut v4 = vec![format!("10.244.{j}.0/24"), format!("{}/32", other.addresses[0])];
            let mut v6 = vec![format!("fd00:244:{j:x}::/64")];
            for p in pods.iter().filter(|p| p.external && p.node == other.name) {
                v4.push(format!("{}/32", p.ipv4));
                v6.push(format!("{}/128", p.ipv6));
            }
            for dst in &v4 {
                ip(&["-n", &n.netns, "route", "add", dst, "via", &via4, "dev", "fabric"])?;
            }
            for dst in &v6 {
                ip(&["-n", &n.netns, "-6", "route", "add", dst, "via", &via6, "dev", "fabric"])?;
            }
        }
    }
    Ok(())
}

/// The identities of a cluster's endpoints, handed out once for every node (as the agent would
/// from scratch: label sets in order, from 256).
fn cluster_identities(eps: &EndpointsFile) -> Vec<policy_engine::identity::LabelAssignment> {
    let mut alloc = policy_engine::identity::IdentityAllocator::new();
    for l in crate::agent::environment(eps, "").identity_label_sets() {
        alloc.endpoint(&l);
    }
    alloc.assignments().0
}

pub(super) fn setup(lab: &LabFile, name: &str, file: &Path, paths: &LabPaths) -> anyhow::Result<LabState> {
    let names = node_names(lab)?;
    let multi = names.len() > 1;
    let mut nodes = Vec::new();
    for (k, n) in names.iter().enumerate() {
        let node = LabNode {
            name: n.clone(),
            netns: format!("porin-{name}-{n}"),
            addresses: node_addresses(k, multi),
            agent_pid: None,
            proxy_pid: None,
        };
        node_namespace(&node.netns, &node.addresses)?;
        nodes.push(node);
    }

    let base = file.parent().unwrap_or(Path::new("."));
    let pods = match &lab.kubernetes {
        Some(k) => {
            super::kubernetes::start_apiserver(k, base, &nodes[0].netns, paths)?;
            super::kubernetes::wire_pods(lab, k, name, &nodes[0], paths)?
        }
        None => veth_pods(lab, name, &names, &nodes)?,
    };
    if multi {
        underlay(name, &nodes, &pods)?;
    }
    let hosts = hosts_file(&pods, &[]);
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

    if lab.kubernetes.is_none() {
        cluster_state(lab, name, paths, &nodes, &pods)?;
    }
    let mut st = LabState {
        name: name.to_owned(),
        file: file.to_path_buf(),
        nodes: nodes.clone(),
        pods: pods.clone(),
        settings: lab.settings.clone(),
        kubernetes: lab.kubernetes.clone(),
    };
    save_state(&st)?;
    // Every node's cgroup (its agent balances services for the processes in it) and each pod's.
    for p in &st.pods {
        let cg = pod_cgroup(name, p)?;
        std::fs::create_dir_all(&cg).with_context(|| format!("create cgroup {}", cg.display()))?;
    }
    for n in &nodes {
        let cg = node_cgroup(name, &n.name)?;
        std::fs::create_dir_all(&cg).with_context(|| format!("create cgroup {}", cg.display()))?;
    }
    match &lab.kubernetes {
        // The API server holds the cluster's objects: the pods, then the lab's policies.
        Some(_) => {
            let policies: Vec<PathBuf> = lab.policies.iter().map(|p| base.join(p)).collect();
            let node = &nodes[0].netns;
            super::kubernetes::populate(paths, node, node, &st.pods, &policies)?;
        }
        None => super::services::refresh(&st)?,
    }
    for n in &nodes {
        let node_paths = LabPaths::node(name, &n.name);
        std::fs::create_dir_all(&node_paths.node_dir)?;
        porin_datapath::loader::ensure_bpffs(&node_paths.bpffs())?;
        let pid = start_agent(&st, &n.name)?;
        if let Some(x) = st.node_mut(&n.name) {
            x.agent_pid = Some(pid);
        }
        save_state(&st)?;
        let pid = start_proxy(name, &n.name, &lab.settings)?;
        if let Some(x) = st.node_mut(&n.name) {
            x.proxy_pid = Some(pid);
        }
        save_state(&st)?;
    }

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
                "--cgroup".into(),
                pod_cgroup(name, pod)?.display().to_string(),
                "--spec".into(),
                spec.display().to_string(),
                "--ready".into(),
                ready.display().to_string(),
            ];
            pod.pid = Some(spawn_porin(&args, &log)?.id());
            ready_files.push(ready);
        } else if let Some(cmd) = &def.command {
            let mut args = vec![
                "lab".into(),
                "run-in".into(),
                "--netns".into(),
                pod.netns.clone(),
                "--cgroup".into(),
                pod_cgroup(name, pod)?.display().to_string(),
                "--".into(),
            ];
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

/// The pods of a lab from files: each joined to its node by a veth pair the lab makes, addressed
/// and routed as the module says.
fn veth_pods(lab: &LabFile, name: &str, names: &[String], nodes: &[LabNode]) -> anyhow::Result<Vec<Pod>> {
    let mut pods = Vec::new();
    let mut next_ep = 1u32;
    for (i, def) in lab.pods.iter().enumerate() {
        if !valid_name(&def.name) {
            bail!("pod name {:?}: use [a-z0-9-]", def.name);
        }
        if names.contains(&def.name) || def.name == "fabric" {
            bail!("pod name {:?}: a node's name (pods and nodes share the lab's namespace names)", def.name);
        }
        let k = match &def.node {
            None => 0,
            Some(n) => names
                .iter()
                .position(|x| x == n)
                .ok_or_else(|| anyhow::anyhow!("pod {}: no node {n:?} (nodes: {})", def.name, names.join(", ")))?,
        };
        let node = &nodes[k];
        let n = 10 + i;
        if n > 250 {
            bail!("{} pods: a lab has at most 240", lab.pods.len());
        }
        let (ipv4, ipv6): (IpAddr, IpAddr) = if def.external {
            (format!("198.51.100.{n}").parse()?, format!("2001:db8:1::{n:x}").parse()?)
        } else {
            (format!("10.244.{k}.{n}").parse()?, format!("fd00:244:{k:x}::{n:x}").parse()?)
        };
        let netns = format!("porin-{name}-{}", def.name);
        let ifname = format!("pod{i}");
        let (node_v4, node_v6) = (node.addresses[0].to_string(), node.addresses[1].to_string());
        let nn = node.netns.as_str();
        ip(&["netns", "add", &netns])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&["-n", nn, "link", "add", &ifname, "type", "veth", "peer", "name", "eth0", "netns", &netns])?;
        ip(&["-n", nn, "link", "set", &ifname, "up"])?;
        ip(&["-n", nn, "addr", "add", &format!("{NODE_GW_V4}/32"), "dev", &ifname])?;
        ip(&["-n", nn, "-6", "addr", "add", &format!("{NODE_GW_V6}/64"), "dev", &ifname, "nodad"])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &netns, "addr", "add", &format!("{ipv4}/32"), "dev", "eth0"])?;
        ip(&["-n", &netns, "-6", "addr", "add", &format!("{ipv6}/128"), "dev", "eth0", "nodad"])?;
        ip(&["-n", &netns, "route", "add", NODE_GW_V4, "dev", "eth0", "scope", "link"])?;
        ip(&["-n", &netns, "route", "add", "default", "via", NODE_GW_V4, "dev", "eth0"])?;
        ip(&["-n", &netns, "-6", "route", "add", "default", "via", NODE_GW_V6, "dev", "eth0"])?;
        ip(&["-n", nn, "route", "add", &format!("{ipv4}/32"), "dev", &ifname, "src", &node_v4])?;
        ip(&["-n", nn, "-6", "route", "add", &format!("{ipv6}/128"), "dev", &ifname, "src", &node_v6])?;
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
            node: node.name.clone(),
            cni_result: None,
        });
    }
    Ok(pods)
}

/// The cluster's state of a lab from files (its endpoints file; the mesh's CAs).
fn cluster_state(lab: &LabFile, name: &str, paths: &LabPaths, nodes: &[LabNode], pods: &[Pod]) -> anyhow::Result<()> {
    let multi = nodes.len() > 1;
    // The cluster's state, one file every node's agent reads: each takes its own endpoints and
    // uplinks; the rest are known by address and identity.
    let mut endpoints = EndpointsFile {
        node_ips: vec![NODE_GW_V4.parse()?],
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
                node: multi.then(|| nodes.iter().find(|n| n.name == p.node).map(|n| n.netns.clone())).flatten(),
            })
            .collect(),
        ..EndpointsFile::default()
    };
    // External pods are the world: their veths are their node's uplinks, as is the underlay.
    let uplinks = |node: &str| -> Vec<String> {
        pods.iter().filter(|p| p.external && p.node == node).map(|p| p.ifname.clone()).collect()
    };
    if multi {
        for n in nodes {
            let mut u = uplinks(&n.name);
            u.push("fabric".into());
            endpoints.node_uplinks.insert(n.netns.clone(), u);
            endpoints.nodes.push(NodeSpec { name: n.netns.clone(), ips: n.addresses.clone() });
        }
    } else {
        endpoints.node_ips.extend(&nodes[0].addresses);
        endpoints.uplinks = uplinks(&nodes[0].name);
    }
    endpoints.identities = cluster_identities(&endpoints);
    if let Some(mesh) = &lab.settings.mesh {
        if !multi {
            bail!("settings.mesh: the tunnel is between nodes: a lab with mesh names its nodes");
        }
        endpoints.authentication =
            mesh.authentication.clone().map(|mode| policy_engine::api::types::Authentication { mode: Some(mode) });
        // The cluster's root CA stays in the lab's directory; each node gets its own CA.
        crate::mesh::init_root(&paths.mesh_root(), &mesh.trust_domain).context("the mesh's root CA")?;
        for n in nodes {
            let node_paths = LabPaths::node(name, &n.name);
            crate::mesh::issue_node_ca(&paths.mesh_root(), &n.netns, &node_paths.mesh_dir())
                .with_context(|| format!("node {}'s CA", n.name))?;
        }
    }
    std::fs::write(paths.endpoints(), serde_json::to_string_pretty(&endpoints)?)?;
    Ok(())
}
