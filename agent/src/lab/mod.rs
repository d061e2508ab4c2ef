//! `porin lab`: a local cluster of one or more nodes in network namespaces, with real traffic.
//!
//! `up` creates a namespace per node and one per pod joined to its node by a veth pair, addresses them
//! from private ranges (inside these namespaces only: every lab has its own nodes, so labs side by
//! side never collide), mounts a bpffs per node, starts each node's agent and proxy inside the node's
//! namespace and each pod's built-in server, and returns once everything is ready. `down` removes
//! everything the lab made, working from whatever is left after a crash. State lives in
//! `/run/porin/labs/<name>/` (a node's own files in `<name>/nodes/<node>/`; a lab without `nodes:`
//! has one node, `node`, whose files are the lab's own directory).
//!
//! Addressing: node `k` (in the order of `nodes:`) has the pod CIDRs `10.244.k.0/24` and
//! `fd00:244:k::/64`; pod `i` (in file order) on it gets `10.244.k.(10+i)/32` and
//! `fd00:244:k::(10+i)/128`, default routes via `169.254.1.1` / `fe80::1`, which the node side of
//! its veth owns. External pods (`external: true`, "the world") get `198.51.100.(10+i)` /
//! `2001:db8:1::(10+i)` and no policy. Node `k` itself is `10.244.255.(k+1)` / `fd00:244:k::ffff`
//! (identity `host` there, `remote-node` elsewhere). With several nodes, an underlay joins them: a
//! `fabric` namespace with a bridge, each node's `fabric` interface on it (`172.31.244.(k+1)/24`,
//! `fd00:31:244::(k+1)/64`), and native routes on every node for the other nodes' pod CIDRs (no
//! tunnel, no NAT: a pod's address is what the other node sees).

pub mod cli;
mod kubernetes;
mod net;
mod process;
pub mod servers;
mod services;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use serde::{Deserialize, Serialize};

pub use self::kubernetes::{ClusterCni, KubernetesLab, REFERENCE_PLUGINS};
use self::net::{ip, netns_list, setup};
use self::process::{alive, kill, signal_target};
use self::servers::ServerSpec;

pub use self::process::{
    DNS_PROXY_PORT, PROXY_PORT, detach, restart_agent, restart_proxy, start_agent, start_proxy, stop_proxy,
    wait_proxy_version,
};

/// Where labs keep their state.
pub const LABS_DIR: &str = "/run/porin/labs";
const NODE_GW_V4: &str = "169.254.1.1";
const NODE_GW_V6: &str = "fe80::1";
/// The one node of a lab without `nodes:`.
pub const SINGLE_NODE: &str = "node";

/// A lab file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabFile {
    /// Must be 1.
    pub version: u32,
    /// Policy files, relative to the lab file.
    #[serde(default)]
    pub policies: Vec<String>,
    /// Pods.
    pub pods: Vec<PodDef>,
    /// The pod every pod's resolver asks (`/etc/resolv.conf` in each pod): a pod with a `dns`
    /// server, like a cluster's kube-dns.
    #[serde(default)]
    pub resolver: Option<String>,
    /// Datapath settings.
    #[serde(default)]
    pub settings: LabSettings,
    /// Nodes (absent: one node, `node`); pods name theirs (`node:`, default the first).
    #[serde(default)]
    pub nodes: Vec<NodeDef>,
    /// Kubernetes mode: the node's agent reads an API server the lab runs; the pods are objects
    /// in it, wired by a CNI plugin with `porin-cni` chained; the policies are applied to it.
    #[serde(default)]
    pub kubernetes: Option<KubernetesLab>,
}

/// A node of a lab file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeDef {
    /// Name (`[a-z0-9-]`, unique among the lab's nodes and pods).
    pub name: String,
}

/// Datapath settings of a lab.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LabSettings {
    /// TCP timeout before the reply and while closing, seconds.
    #[serde(default)]
    pub ct_tcp_close_secs: Option<u64>,
    /// UDP idle timeout, seconds.
    #[serde(default)]
    pub ct_udp_secs: Option<u64>,
    /// The proxy's limits (`limits:` of its configuration; docs/config.md).
    #[serde(default)]
    pub proxy_limits: Option<proxy::config::Limits>,
    /// The DNS proxy's settings (`dns:` of the proxy's configuration; the cache file defaults to
    /// the lab's directory).
    #[serde(default)]
    pub proxy_dns: Option<proxy::config::DnsSettings>,
    /// Every pod's policy in audit mode (the agent's `--policy-audit-mode`).
    #[serde(default)]
    pub policy_audit_mode: bool,
    /// The mTLS tunnel between the nodes' proxies (a lab with `nodes:`): a cluster root CA in
    /// the lab's directory, a CA per node, certificates kept by each node's agent.
    #[serde(default)]
    pub mesh: Option<MeshLab>,
}

/// The mesh settings of a lab.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MeshLab {
    /// The trust domain (SPIFFE IDs `spiffe://<trust domain>/ns/<ns>/sa/<sa>`).
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Lifetime of the certificates the agents issue, seconds (renewed at half; default 3600).
    #[serde(default)]
    pub cert_ttl_secs: Option<u64>,
    /// `required`: every flow between pods on different nodes must come through the tunnel
    /// (the cluster state's mesh-wide `authentication`), whatever the policies say.
    #[serde(default)]
    pub authentication: Option<String>,
}

fn default_trust_domain() -> String {
    "cluster.local".into()
}

/// A pod of a lab file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodDef {
    /// Name (`[a-z0-9-]`, resolvable from every pod).
    pub name: String,
    /// Kubernetes namespace (labels, policy scope).
    #[serde(default = "default_ns")]
    pub namespace: String,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Annotations (`policy.cilium.io/proxy-visibility: "<Ingress/80/TCP/HTTP>"`: L7 visibility
    /// without enforcement).
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// This pod's policy in audit mode.
    #[serde(default)]
    pub policy_audit_mode: bool,
    /// Outside the cluster: not an endpoint, no policy (the world).
    #[serde(default)]
    pub external: bool,
    /// Built-in servers.
    #[serde(default)]
    pub server: Option<ServerSpec>,
    /// A command to run in the pod (in the background).
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// The node it runs on (default: the first).
    #[serde(default)]
    pub node: Option<String>,
}

fn default_ns() -> String {
    "default".into()
}

/// A pod as set up.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pod {
    /// Name.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Its policy in audit mode.
    #[serde(default)]
    pub policy_audit_mode: bool,
    /// Network namespace.
    pub netns: String,
    /// Node-side interface.
    pub ifname: String,
    /// IPv4 address.
    pub ipv4: IpAddr,
    /// IPv6 address.
    pub ipv6: IpAddr,
    /// Endpoint id (0 for external pods).
    pub endpoint: u32,
    /// Not an endpoint.
    pub external: bool,
    /// Server / command process.
    pub pid: Option<u32>,
    /// The node it runs on.
    pub node: String,
    /// Kubernetes mode: the result of its CNI configuration list (for DEL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni_result: Option<serde_json::Value>,
}

/// A node as set up.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabNode {
    /// Name.
    pub name: String,
    /// Network namespace (also the agent's node name).
    pub netns: String,
    /// Its own addresses (on its loopback, and on the underlay when there is one).
    pub addresses: Vec<IpAddr>,
    /// Agent process.
    pub agent_pid: Option<u32>,
    /// L7 proxy process.
    pub proxy_pid: Option<u32>,
}

/// A lab's recorded state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabState {
    /// Lab name.
    pub name: String,
    /// The lab file it came from.
    pub file: PathBuf,
    /// Nodes.
    pub nodes: Vec<LabNode>,
    /// Pods.
    pub pods: Vec<Pod>,
    /// Datapath settings.
    pub settings: LabSettings,
    /// Kubernetes mode.
    #[serde(default)]
    pub kubernetes: Option<KubernetesLab>,
}

impl LabState {
    /// A node by name; `None` picks the first.
    pub fn node(&self, node: Option<&str>) -> anyhow::Result<&LabNode> {
        let found = match node {
            Some(n) => self.nodes.iter().find(|x| x.name == n),
            None => self.nodes.first(),
        };
        found.ok_or_else(|| {
            let names: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
            anyhow!("lab {:?} has no node {:?} (nodes: {})", self.name, node.unwrap_or(""), names.join(", "))
        })
    }

    fn node_mut(&mut self, node: &str) -> Option<&mut LabNode> {
        self.nodes.iter_mut().find(|n| n.name == node)
    }
}

/// Paths of a lab and of one of its nodes.
pub struct LabPaths {
    /// State directory.
    pub dir: PathBuf,
    /// The node's own files.
    pub node_dir: PathBuf,
}

impl LabPaths {
    /// Paths of lab `name` and its single node (a lab without `nodes:`).
    pub fn new(name: &str) -> Self {
        Self::node(name, SINGLE_NODE)
    }
    /// Paths of lab `name` and its node `node` (a named node's files are in `nodes/<node>/`).
    pub fn node(name: &str, node: &str) -> Self {
        let dir = Path::new(LABS_DIR).join(name);
        let node_dir = if node == SINGLE_NODE { dir.clone() } else { dir.join("nodes").join(node) };
        Self { dir, node_dir }
    }
    /// Paths of lab `name` and its node `node` (`None`: the first), from the lab's state.
    pub fn of(name: &str, node: Option<&str>) -> anyhow::Result<Self> {
        let st = load_state(name)?;
        Ok(Self::node(name, &st.node(node)?.name))
    }
    /// The cluster's root CA (a lab with a mesh).
    pub fn mesh_root(&self) -> PathBuf {
        self.dir.join("mesh-ca")
    }
    /// The node's CA directory (`--mesh-dir`).
    pub fn mesh_dir(&self) -> PathBuf {
        self.node_dir.join("mesh")
    }
    /// The node's credentials file (the agent writes, the proxy reads).
    pub fn mesh_credentials(&self) -> PathBuf {
        self.node_dir.join("mesh-credentials.json")
    }
    /// `lab.json`.
    pub fn state(&self) -> PathBuf {
        self.dir.join("lab.json")
    }
    /// Policy directory the agent watches.
    pub fn policies(&self) -> PathBuf {
        self.dir.join("policies")
    }
    /// Endpoints file: the cluster's state, every node's agent reads it.
    pub fn endpoints(&self) -> PathBuf {
        self.dir.join("endpoints.json")
    }
    /// The lab's bpffs.
    pub fn bpffs(&self) -> PathBuf {
        self.node_dir.join("bpf")
    }
    /// Agent control socket.
    pub fn control(&self) -> PathBuf {
        self.node_dir.join("agent.sock")
    }
    /// Agent log.
    pub fn agent_log(&self) -> PathBuf {
        self.node_dir.join("agent.log")
    }
    /// The policy inputs the agent publishes for the proxy.
    pub fn snapshot(&self) -> PathBuf {
        self.node_dir.join("snapshot.json")
    }
    /// The proxy's control socket.
    pub fn proxy_control(&self) -> PathBuf {
        self.node_dir.join("proxy.sock")
    }
    /// The node's Hubble API (the agent serves it).
    pub fn hubble(&self) -> PathBuf {
        self.node_dir.join("hubble.sock")
    }
}

fn check_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name.len() > 24
        || !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        bail!("lab name {name:?}: use 1-24 characters of [a-z0-9-]");
    }
    Ok(())
}

/// Reads a lab's state.
pub fn load_state(name: &str) -> anyhow::Result<LabState> {
    let p = LabPaths::new(name).state();
    let text = std::fs::read_to_string(&p).with_context(|| format!("lab {name:?} is not up ({})", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parse {}", p.display()))
}

/// Writes the lab's state whole (a temporary file, then renamed over it): a `lab exec` or `lab
/// status` reading it while a restart saves it sees the old state or the new, never half a file.
fn save_state(st: &LabState) -> anyhow::Result<()> {
    let p = LabPaths::new(&st.name).state();
    let tmp = p.with_extension(format!("json.tmp.{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_string_pretty(st)?).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, &p).with_context(|| format!("rename {} to {}", tmp.display(), p.display()))
}

/// Copies policy files (policies, Services, EndpointSlices) into the lab's policy directory,
/// replacing what was there, then writes the EndpointSlices of the services with a selector and
/// the services' names into the pods' `/etc/hosts` (the lab's slices stay in place meanwhile:
/// an agent reading the directory halfway sees the old backends, never none).
pub fn install_policies(name: &str, files: &[PathBuf]) -> anyhow::Result<()> {
    let dir = LabPaths::new(name).policies();
    std::fs::create_dir_all(&dir)?;
    for e in std::fs::read_dir(&dir)? {
        let p = e?.path();
        if p.is_file() && !services::is_generated(&p) {
            std::fs::remove_file(&p)?;
        }
    }
    for (i, f) in files.iter().enumerate() {
        let base = f.file_name().and_then(|n| n.to_str()).unwrap_or("policy.yaml");
        let dest = dir.join(format!("{i:02}-{base}"));
        std::fs::copy(f, &dest).with_context(|| format!("copy {} to {}", f.display(), dest.display()))?;
    }
    // A lab being set up has no pods yet: `up` writes the slices once it has.
    if let Ok(st) = load_state(name) {
        services::refresh(&st)?;
    }
    Ok(())
}

/// The cgroup (v2) of a lab's node: its agent balances services for the processes in it.
pub fn node_cgroup(name: &str, node: &str) -> anyhow::Result<PathBuf> {
    Ok(labs_cgroup()?.join(name).join(node))
}

/// A pod's cgroup (in its node's): its processes run there.
pub fn pod_cgroup(name: &str, pod: &Pod) -> anyhow::Result<PathBuf> {
    Ok(node_cgroup(name, &pod.node)?.join(&pod.name))
}

/// Where every lab's cgroups are.
fn labs_cgroup() -> anyhow::Result<PathBuf> {
    Ok(crate::agent::cgroup2_root()?.join("porin-labs"))
}

/// Moves this process into `cgroup` (what it starts then runs there too).
pub fn join_cgroup(cgroup: &Path) -> anyhow::Result<()> {
    let procs = cgroup.join("cgroup.procs");
    std::fs::write(&procs, std::process::id().to_string()).with_context(|| format!("join {}", cgroup.display()))
}

/// Kills whatever runs in a lab's cgroups and removes them (deepest first; a cgroup is removable
/// once its processes are reaped).
fn remove_cgroups(name: &str) -> anyhow::Result<()> {
    let root = labs_cgroup()?.join(name);
    if !root.exists() {
        return Ok(());
    }
    let mut dirs = vec![root.clone()];
    let mut i = 0;
    while let Some(d) = dirs.get(i).cloned() {
        dirs.extend(
            std::fs::read_dir(&d).into_iter().flatten().filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_dir()),
        );
        i += 1;
    }
    // This process may be one of them (`lab down` from a `lab exec` shell): out first.
    let me = std::process::id();
    for d in &dirs {
        let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
        if procs.split_whitespace().any(|p| p.parse::<u32>().ok() == Some(me)) {
            let parent = labs_cgroup()?.parent().map(Path::to_path_buf).unwrap_or_default();
            std::fs::write(parent.join("cgroup.procs"), me.to_string()).context("leave the lab's cgroup")?;
        }
    }
    // `cgroup.kill` kills every process below, also those forked meanwhile.
    std::fs::write(root.join("cgroup.kill"), "1").with_context(|| format!("kill {}", root.display()))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    for d in dirs.iter().rev() {
        loop {
            match std::fs::remove_dir(d) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if Instant::now() > deadline => {
                    return Err(e).with_context(|| format!("remove cgroup {}", d.display()));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
    Ok(())
}

/// `porin lab up`.
pub fn up(file: &Path, name: &str) -> anyhow::Result<LabState> {
    check_name(name)?;
    if !nix::unistd::Uid::effective().is_root() {
        bail!("porin lab needs root (network namespaces, eBPF)");
    }
    let text = std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
    let lab: LabFile = serde_yaml::from_str(&text).with_context(|| format!("parse lab file {}", file.display()))?;
    if lab.version != 1 {
        bail!("{}: version {} is not supported (expected 1)", file.display(), lab.version);
    }
    let paths = LabPaths::new(name);
    if let Ok(st) = load_state(name)
        && st.nodes.iter().any(|n| n.agent_pid.is_some_and(|p| alive(p, name)))
    {
        bail!("lab {name:?} is already up (porin lab down --name {name})");
    }
    if let Some(k) = &lab.kubernetes {
        kubernetes::check(&lab, k).with_context(|| file.display().to_string())?;
    }
    down(name)?;
    std::fs::create_dir_all(&paths.dir)?;
    let base = file.parent().unwrap_or(Path::new("."));
    let policy_files: Vec<PathBuf> = lab.policies.iter().map(|p| base.join(p)).collect();
    // Kubernetes mode: the policies go to the API server instead.
    install_policies(name, if lab.kubernetes.is_some() { &[] } else { &policy_files })?;
    match setup(&lab, name, file, &paths) {
        Ok(st) => Ok(st),
        Err(e) => {
            // Every node's agent log there is (the lab's own directory's, its named nodes').
            let mut logs = vec![paths.agent_log()];
            if let Ok(dirs) = std::fs::read_dir(paths.dir.join("nodes")) {
                logs.extend(dirs.filter_map(Result::ok).map(|d| d.path().join("agent.log")));
            }
            let log: String = logs
                .iter()
                .filter_map(|p| Some(format!("{}:\n{}", p.display(), std::fs::read_to_string(p).ok()?)))
                .collect();
            let _ = down(name);
            Err(if log.is_empty() { e } else { e.context(format!("agent log:\n{log}")) })
        }
    }
}

/// `porin lab down`: removes everything lab `name` made; fine to run on a half-made or crashed lab.
pub fn down(name: &str) -> anyhow::Result<()> {
    check_name(name)?;
    let paths = LabPaths::new(name);
    let state = load_state(name).ok();
    // Kubernetes mode: DEL through the CNI list while the node's namespace is there (a failure
    // is reported; the rest goes anyway).
    if let Some(st) = state.as_ref().filter(|s| s.kubernetes.is_some())
        && let Some(node) = st.nodes.first()
        && let Err(e) = kubernetes::unwire_pods(name, &node.netns, &st.pods)
    {
        eprintln!("porin lab down: {e:#}");
    }
    if let Some(st) = &state {
        let nodes = st.nodes.iter().flat_map(|n| [n.agent_pid, n.proxy_pid]).flatten();
        for pid in st.pods.iter().filter_map(|p| p.pid).chain(nodes) {
            kill(pid, name);
        }
    }
    // Every process still in the lab's namespaces belongs to the lab (they are its own): pod commands,
    // and anything a crash left without state.
    let prefix = format!("porin-{name}-");
    for ns in netns_list().into_iter().filter(|n| n.starts_with(&prefix)) {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &ns]).output() {
            let listed = String::from_utf8_lossy(&out.stdout).into_owned();
            for pid in listed.split_whitespace().filter_map(|p| p.parse::<u32>().ok()).filter_map(signal_target) {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
        let _ = ip(&["netns", "del", &ns]);
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&ns));
    }
    remove_cgroups(name)?;
    // Every node's bpffs: the lab's own (a single node's) and its named nodes'.
    let mut bpffs = vec![paths.bpffs()];
    if let Ok(dirs) = std::fs::read_dir(paths.dir.join("nodes")) {
        bpffs.extend(dirs.filter_map(Result::ok).map(|e| e.path().join("bpf")));
    }
    for b in bpffs.into_iter().filter(|b| porin_datapath::loader::is_bpffs(b)) {
        nix::mount::umount2(&b, nix::mount::MntFlags::MNT_DETACH)
            .with_context(|| format!("unmount the lab's bpffs {}", b.display()))?;
    }
    if paths.dir.exists() {
        std::fs::remove_dir_all(&paths.dir).with_context(|| format!("remove {}", paths.dir.display()))?;
    }
    Ok(())
}

/// Enters a pod's network namespace by lab and pod name, for tests and tools.
pub fn netns_of(name: &str, pod: &str) -> anyhow::Result<String> {
    let st = load_state(name)?;
    st.pods
        .iter()
        .find(|p| p.name == pod)
        .map(|p| p.netns.clone())
        .ok_or_else(|| anyhow!("lab {name:?} has no pod {pod:?}"))
}

/// `porin lab exec`: runs a command in a pod (names of all pods resolve). Returns its exit code.
pub fn exec(name: &str, pod: &str, cmd: &[String]) -> anyhow::Result<i32> {
    let st = load_state(name)?;
    let p = st.pods.iter().find(|p| p.name == pod).ok_or_else(|| anyhow!("lab {name:?} has no pod {pod:?}"))?;
    // The pod's cgroup, so its node balances the command's connections to services.
    join_cgroup(&pod_cgroup(name, p)?)?;
    let netns = p.netns.clone();
    let status = Command::new("ip").args(["netns", "exec", &netns]).args(cmd).status().context("run ip netns exec")?;
    Ok(status.code().unwrap_or(128))
}

/// `porin lab status`: the pods, and each node's agent and proxy (`agent` and `proxy` at the top
/// are the first node's).
pub fn status(name: &str) -> anyhow::Result<serde_json::Value> {
    let st = load_state(name)?;
    let nodes: Vec<serde_json::Value> = st.nodes.iter().map(|n| node_status(&st, n)).collect();
    let endpoint_of = |pod: &Pod| -> Option<serde_json::Value> {
        let node = nodes.iter().find(|n| n["name"] == pod.node.as_str())?;
        node["agent"]["status"]["endpoints"].as_array()?.iter().find(|e| e["name"] == pod.name.as_str()).cloned()
    };
    let pods: Vec<serde_json::Value> = st
        .pods
        .iter()
        .map(|p| {
            let ep = endpoint_of(p);
            let ep = ep.as_ref();
            serde_json::json!({
                "name": p.name, "namespace": p.namespace, "labels": p.labels, "annotations": p.annotations,
                "addresses": [p.ipv4, p.ipv6], "netns": p.netns, "ifname": p.ifname, "external": p.external,
                "node": p.node,
                "endpoint": (p.endpoint != 0).then_some(p.endpoint), "identity": ep.and_then(|e| e["identity"].as_u64()),
                // What the agent has in force for it.
                "policy_audit_mode": ep.and_then(|e| e["policy_audit_mode"].as_bool()),
                "visibility": ep.map(|e| e["visibility"].clone()),
            })
        })
        .collect();
    let first = nodes.first().cloned().unwrap_or_default();
    Ok(serde_json::json!({
        "name": st.name,
        "node_netns": first["netns"],
        "agent": first["agent"],
        "proxy": first["proxy"],
        "nodes": nodes,
        "pods": pods,
    }))
}

/// One node's agent and proxy, as `status` shows them.
fn node_status(st: &LabState, node: &LabNode) -> serde_json::Value {
    let paths = LabPaths::node(&st.name, &node.name);
    let running = node.agent_pid.is_some_and(|p| alive(p, &st.name));
    let agent = if running { crate::agent::status_of(&paths.control()).ok() } else { None };
    serde_json::json!({
        "name": node.name,
        "netns": node.netns,
        "addresses": node.addresses,
        "agent": {
            "pid": node.agent_pid,
            "running": running,
            "metrics": agent.as_ref().and_then(|a| a["metrics"].as_str()).map(|a| format!("http://{a}/metrics")),
            "hubble": hubble_tcp(agent.as_ref()),
            "hubble_socket": format!("unix:{}", paths.hubble().display()),
            "ui": ui_url(agent.as_ref()),
            "policy_audit_mode": agent.as_ref().and_then(|a| a["policy_audit_mode"].as_bool()),
            "status": agent,
        },
        "proxy": {
            "pid": node.proxy_pid,
            "running": node.proxy_pid.is_some_and(|p| alive(p, &st.name)),
            "status": crate::agent::status_of(&paths.proxy_control()).ok(),
            "metrics": process::metrics_url(&paths),
        },
    })
}

/// The TCP address of the node's Hubble API, from the agent's status.
fn hubble_tcp(agent: Option<&serde_json::Value>) -> Option<String> {
    let at = agent?["hubble"].as_array()?;
    at.iter().filter_map(|a| a.as_str()).find(|a| !a.starts_with("unix:")).map(str::to_owned)
}

/// The service map's URL, from the agent's status.
fn ui_url(agent: Option<&serde_json::Value>) -> Option<String> {
    agent?["ui"].as_str().map(|a| format!("http://{a}/"))
}

/// Renders the pods of a lab as a table.
pub fn table(st: &LabState) -> String {
    let mut s = match st.nodes.as_slice() {
        [one] => format!("lab {} is up (node namespace {})\n", st.name, one.netns),
        nodes => format!("lab {} is up: {} nodes\n", st.name, nodes.len()),
    };
    if let (Some(k), Some(node)) = (&st.kubernetes, st.nodes.first()) {
        let paths = LabPaths::new(&st.name);
        let cni = serde_json::to_value(k.cni).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        let _ =
            writeln!(s, "kubernetes mode: pods wired by {cni} + porin-cni; the API server in the node's namespace:");
        let _ =
            writeln!(s, "  ip netns exec {} kubectl --kubeconfig {} get cnp", node.netns, paths.kubeconfig().display());
    }
    for n in &st.nodes {
        let paths = LabPaths::node(&st.name, &n.name);
        let agent = crate::agent::status_of(&paths.control()).ok();
        let on = if st.nodes.len() > 1 {
            let addrs: Vec<String> = n.addresses.iter().map(ToString::to_string).collect();
            let _ = writeln!(s, "node {} (namespace {}, addresses {})", n.name, n.netns, addrs.join(" "));
            format!(" ({})", n.name)
        } else {
            String::new()
        };
        if let Some(a) = agent.as_ref().and_then(|a| a["metrics"].as_str()) {
            let _ = writeln!(s, "agent metrics{on}: http://{a}/metrics");
        }
        if let Some(h) = hubble_tcp(agent.as_ref()) {
            let _ = writeln!(s, "hubble api{on}: {h} (and unix:{})", paths.hubble().display());
        }
        if let Some(url) = process::metrics_url(&paths) {
            let _ = writeln!(s, "proxy metrics{on}: {url}");
        }
        if let Some(url) = ui_url(agent.as_ref()) {
            let _ = writeln!(s, "service map{on}: {url}");
        }
        if agent.as_ref().and_then(|a| a["policy_audit_mode"].as_bool()) == Some(true) {
            let _ = writeln!(s, "policy audit mode{on}: on (what policy would drop is recorded AUDIT and let through)");
        }
    }
    let multi = st.nodes.len() > 1;
    let node_col = if multi { format!("{:<10} ", "NODE") } else { String::new() };
    let _ = writeln!(s, "{:<14} {node_col}{:<12} {:<16} {:<22} labels", "POD", "NAMESPACE", "IPV4", "IPV6");
    for p in &st.pods {
        let labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let ns = if p.external { "(external)".to_owned() } else { p.namespace.clone() };
        let node = if multi { format!("{:<10} ", p.node) } else { String::new() };
        let _ = writeln!(s, "{:<14} {node}{:<12} {:<16} {:<22} {}", p.name, ns, p.ipv4, p.ipv6, labels.join(","));
    }
    s
}
