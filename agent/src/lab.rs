//! `porin lab`: a local cluster node in network namespaces, with real traffic.
//!
//! `up` creates a node namespace and one namespace per pod joined to it by a veth pair, addresses them
//! from private ranges (inside these namespaces only: every lab has its own node, so labs side by side
//! never collide), mounts a lab-private bpffs, starts each pod's built-in server and the agent inside
//! the node namespace, and returns once everything is ready. `down` removes everything the lab made,
//! working from whatever is left after a crash. State lives in `/run/porin/labs/<name>/`.
//!
//! Addressing: pod `i` gets `10.244.0.(10+i)/32` and `fd00:244::(10+i)/128`, default routes via
//! `169.254.1.1` / `fe80::1`, which the node side of its veth owns. External pods (`external: true`,
//! "the world") get `198.51.100.(10+i)` / `2001:db8:1::(10+i)` and no policy. The node itself is
//! `10.244.255.1` / `fd00:244::ffff` (identity `host`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::agent::{EndpointSpec, EndpointsFile};
use crate::servers::ServerSpec;

/// Where labs keep their state.
pub const LABS_DIR: &str = "/run/porin/labs";
const NODE_GW_V4: &str = "169.254.1.1";
const NODE_GW_V6: &str = "fe80::1";
const NODE_IP_V4: &str = "10.244.255.1";
const NODE_IP_V6: &str = "fd00:244::ffff";

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
    /// Datapath settings.
    #[serde(default)]
    pub settings: LabSettings,
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
    /// Outside the cluster: not an endpoint, no policy (the world).
    #[serde(default)]
    pub external: bool,
    /// Built-in servers.
    #[serde(default)]
    pub server: Option<ServerSpec>,
    /// A command to run in the pod (in the background).
    #[serde(default)]
    pub command: Option<Vec<String>>,
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
}

/// A lab's recorded state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabState {
    /// Lab name.
    pub name: String,
    /// The lab file it came from.
    pub file: PathBuf,
    /// Node network namespace.
    pub node_netns: String,
    /// Pods.
    pub pods: Vec<Pod>,
    /// Agent process.
    pub agent_pid: Option<u32>,
    /// L7 proxy process.
    #[serde(default)]
    pub proxy_pid: Option<u32>,
    /// Datapath settings.
    pub settings: LabSettings,
}

/// Paths of a lab.
pub struct LabPaths {
    /// State directory.
    pub dir: PathBuf,
}

impl LabPaths {
    /// Paths of lab `name`.
    pub fn new(name: &str) -> Self {
        Self { dir: Path::new(LABS_DIR).join(name) }
    }
    /// `lab.json`.
    pub fn state(&self) -> PathBuf {
        self.dir.join("lab.json")
    }
    /// Policy directory the agent watches.
    pub fn policies(&self) -> PathBuf {
        self.dir.join("policies")
    }
    /// Endpoints file.
    pub fn endpoints(&self) -> PathBuf {
        self.dir.join("endpoints.json")
    }
    /// The lab's bpffs.
    pub fn bpffs(&self) -> PathBuf {
        self.dir.join("bpf")
    }
    /// Agent control socket.
    pub fn control(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }
    /// Agent log.
    pub fn agent_log(&self) -> PathBuf {
        self.dir.join("agent.log")
    }
    /// The policy inputs the agent publishes for the proxy.
    pub fn snapshot(&self) -> PathBuf {
        self.dir.join("snapshot.json")
    }
    /// The proxy's control socket.
    pub fn proxy_control(&self) -> PathBuf {
        self.dir.join("proxy.sock")
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

/// Runs `ip ARGS`, failing with its stderr.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output().context("run ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn sysctl_in(netns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    ip(&["netns", "exec", netns, "sysctl", "-qw", &format!("{key}={value}")])
}

fn netns_list() -> Vec<String> {
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

/// Whether `pid` is a live porin process of this lab. The command line reads empty for a moment
/// while a process is inside `execve` (and for zombies): read it a few times before deciding.
fn alive(pid: u32, tag: &str) -> bool {
    for _ in 0..20 {
        match std::fs::read(format!("/proc/{pid}/cmdline")) {
            Err(_) => return false,
            Ok(c) if c.is_empty() => {
                let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|st| st.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
                    .unwrap_or(true);
                if zombie {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(c) => {
                let c = String::from_utf8_lossy(&c);
                return c.contains("porin") && c.contains(tag);
            }
        }
    }
    false
}

/// The process a pid names, if it names exactly one: 0 and values past `i32::MAX` would become
/// `kill(0, ..)` / `kill(-n, ..)`, which signal whole process groups (this command's included).
fn signal_target(pid: u32) -> Option<nix::unistd::Pid> {
    i32::try_from(pid).ok().filter(|p| *p > 0).map(nix::unistd::Pid::from_raw)
}

/// Stops a process of this lab: SIGTERM, then SIGKILL after 3 s.
fn kill(pid: u32, tag: &str) {
    use nix::sys::signal::{Signal, kill as send};
    let Some(p) = signal_target(pid) else { return };
    if !alive(pid, tag) {
        return;
    }
    let _ = send(p, Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(3);
    while alive(pid, tag) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if alive(pid, tag) {
        let _ = send(p, Signal::SIGKILL);
    }
}

/// Spawns `porin ARGS` detached (own session), logging to `log`.
fn spawn_porin(args: &[String], log: &Path) -> anyhow::Result<std::process::Child> {
    let exe = std::env::current_exe().context("locate the porin binary")?;
    let out = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let err = out.try_clone()?;
    let child = Command::new("setsid")
        .arg(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .context("start a background porin process")?;
    Ok(child)
}

fn hosts_file(pods: &[Pod]) -> String {
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

/// Starts the agent of a lab (also used to restart it).
pub fn start_agent(name: &str, settings: &LabSettings) -> anyhow::Result<u32> {
    let paths = LabPaths::new(name);
    let mut args: Vec<String> = vec![
        "agent".into(),
        "--netns".into(),
        format!("porin-{name}-node"),
        "--bpffs".into(),
        paths.bpffs().display().to_string(),
        "--policies".into(),
        paths.policies().display().to_string(),
        "--endpoints".into(),
        paths.endpoints().display().to_string(),
        "--control".into(),
        paths.control().display().to_string(),
        "--publish".into(),
        paths.snapshot().display().to_string(),
    ];
    if let Some(s) = settings.ct_tcp_close_secs {
        args.extend(["--ct-tcp-close-secs".into(), s.to_string()]);
    }
    if let Some(s) = settings.ct_udp_secs {
        args.extend(["--ct-udp-secs".into(), s.to_string()]);
    }
    let _ = std::fs::remove_file(paths.control());
    let mut child = spawn_porin(&args, &paths.agent_log())?;
    let pid = child.id();
    // Ready when the control socket answers with every endpoint attached.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(status) = crate::agent::status_of(&paths.control()) {
            let eps = status["endpoints"].as_array().cloned().unwrap_or_default();
            if eps.iter().all(|e| e["attached"] == serde_json::Value::Bool(true)) {
                return Ok(pid);
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(paths.agent_log()).unwrap_or_default();
            bail!("the agent exited during start-up ({status}):\n{log}");
        }
        if Instant::now() > deadline {
            bail!("the agent did not become ready in 60 s (log: {})", paths.agent_log().display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads a lab's state.
pub fn load_state(name: &str) -> anyhow::Result<LabState> {
    let p = LabPaths::new(name).state();
    let text = std::fs::read_to_string(&p).with_context(|| format!("lab {name:?} is not up ({})", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parse {}", p.display()))
}

fn save_state(st: &LabState) -> anyhow::Result<()> {
    let p = LabPaths::new(&st.name).state();
    std::fs::write(&p, serde_json::to_string_pretty(st)?).with_context(|| format!("write {}", p.display()))
}

/// Copies policy files into the lab's policy directory, replacing what was there.
pub fn install_policies(name: &str, files: &[PathBuf]) -> anyhow::Result<()> {
    let dir = LabPaths::new(name).policies();
    std::fs::create_dir_all(&dir)?;
    for e in std::fs::read_dir(&dir)? {
        let p = e?.path();
        if p.is_file() {
            std::fs::remove_file(&p)?;
        }
    }
    for (i, f) in files.iter().enumerate() {
        let base = f.file_name().and_then(|n| n.to_str()).unwrap_or("policy.yaml");
        let dest = dir.join(format!("{i:02}-{base}"));
        std::fs::copy(f, &dest).with_context(|| format!("copy {} to {}", f.display(), dest.display()))?;
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
        && st.agent_pid.is_some_and(|p| alive(p, name))
    {
        bail!("lab {name:?} is already up (porin lab down --name {name})");
    }
    down(name)?;
    std::fs::create_dir_all(&paths.dir)?;
    let base = file.parent().unwrap_or(Path::new("."));
    let policy_files: Vec<PathBuf> = lab.policies.iter().map(|p| base.join(p)).collect();
    install_policies(name, &policy_files)?;
    match setup(&lab, name, file, &paths) {
        Ok(st) => Ok(st),
        Err(e) => {
            let log = std::fs::read_to_string(paths.agent_log()).unwrap_or_default();
            let _ = down(name);
            Err(e.context(if log.is_empty() { String::new() } else { format!("agent log:\n{log}") }))
        }
    }
}

fn setup(lab: &LabFile, name: &str, file: &Path, paths: &LabPaths) -> anyhow::Result<LabState> {
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
    for p in &pods {
        let dir = Path::new("/etc/netns").join(&p.netns);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("hosts"), &hosts)?;
    }

    porin_datapath::loader::ensure_bpffs(&paths.bpffs())?;
    let endpoints = EndpointsFile {
        cluster: None,
        node_ips: vec![NODE_IP_V4.parse()?, NODE_IP_V6.parse()?, NODE_GW_V4.parse()?],
        namespaces: BTreeMap::new(),
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
            })
            .collect(),
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
            std::fs::write(&spec, serde_json::to_string(server)?)?;
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

/// `porin lab down`: removes everything lab `name` made; fine to run on a half-made or crashed lab.
pub fn down(name: &str) -> anyhow::Result<()> {
    check_name(name)?;
    let paths = LabPaths::new(name);
    if let Ok(st) = load_state(name) {
        for pid in st.pods.iter().filter_map(|p| p.pid).chain(st.agent_pid).chain(st.proxy_pid) {
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
    if porin_datapath::loader::is_bpffs(&paths.bpffs()) {
        nix::mount::umount2(&paths.bpffs(), nix::mount::MntFlags::MNT_DETACH).context("unmount the lab's bpffs")?;
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
    let netns = netns_of(name, pod)?;
    let status = Command::new("ip").args(["netns", "exec", &netns]).args(cmd).status().context("run ip netns exec")?;
    Ok(status.code().unwrap_or(128))
}

/// `porin lab status`.
pub fn status(name: &str) -> anyhow::Result<serde_json::Value> {
    let st = load_state(name)?;
    let paths = LabPaths::new(name);
    let running = st.agent_pid.is_some_and(|p| alive(p, name));
    let agent = if running { crate::agent::status_of(&paths.control()).ok() } else { None };
    let identity_of = |pod: &Pod| -> Option<u64> {
        agent.as_ref()?["endpoints"].as_array()?.iter().find(|e| e["name"] == pod.name.as_str())?["identity"].as_u64()
    };
    let pods: Vec<serde_json::Value> = st
        .pods
        .iter()
        .map(|p| {
            serde_json::json!({
                "name": p.name, "namespace": p.namespace, "labels": p.labels,
                "addresses": [p.ipv4, p.ipv6], "netns": p.netns, "external": p.external,
                "endpoint": (p.endpoint != 0).then_some(p.endpoint), "identity": identity_of(p),
            })
        })
        .collect();
    Ok(serde_json::json!({
        "name": st.name,
        "node_netns": st.node_netns,
        "agent": {"pid": st.agent_pid, "running": running, "status": agent},
        "proxy": {
            "pid": st.proxy_pid,
            "running": st.proxy_pid.is_some_and(|p| alive(p, name)),
            "status": crate::agent::status_of(&paths.proxy_control()).ok(),
        },
        "pods": pods,
    }))
}

/// Restarts the agent of a running lab (after it was stopped or killed).
pub fn restart_agent(name: &str) -> anyhow::Result<u32> {
    let mut st = load_state(name)?;
    if let Some(pid) = st.agent_pid {
        kill(pid, name);
    }
    let pid = start_agent(name, &st.settings)?;
    st.agent_pid = Some(pid);
    save_state(&st)?;
    Ok(pid)
}

/// The port of the lab proxy's transparent listeners (in the node namespace). Flows whose original
/// destination port is this one cannot be proxied (the listener refuses connections to itself).
pub const PROXY_PORT: u16 = 15001;

/// Starts the lab's L7 proxy in the node namespace (also used to restart it): transparent HTTP
/// listeners (IPv4 and IPv6) registered in the lab's datapath, on the policy the agent publishes.
pub fn start_proxy(name: &str, settings: &LabSettings) -> anyhow::Result<u32> {
    let paths = LabPaths::new(name);
    let sockmap = paths.bpffs().join("maps").join(redirect_common::names::PROXY);
    let listener = |addr: &str, tag: &str| {
        format!(
            "- {{name: http-{tag}, listen: \"{addr}\", transparent: {{sockmap: {}, protocol: http}}, source: socket, destination: socket}}\n",
            sockmap.display(),
        )
    };
    let mut config = format!(
        "snapshot: {}\ncontrol_socket: {}\nlisteners:\n{}{}",
        paths.snapshot().display(),
        paths.proxy_control().display(),
        listener(&format!("0.0.0.0:{PROXY_PORT}"), "v4"),
        listener(&format!("[::]:{PROXY_PORT}"), "v6"),
    );
    if let Some(limits) = &settings.proxy_limits {
        config.push_str(&serde_yaml::to_string(&serde_yaml::Mapping::from_iter([(
            "limits".into(),
            serde_yaml::to_value(limits)?,
        )]))?);
    }
    let config_path = paths.dir.join("proxy.yaml");
    std::fs::write(&config_path, config)?;
    let ready = paths.dir.join("proxy.ready");
    let _ = std::fs::remove_file(&ready);
    let mut args: Vec<String> = vec![
        "proxy".into(),
        "--netns".into(),
        format!("porin-{name}-node"),
        "--config".into(),
        config_path.display().to_string(),
        "--ready".into(),
        ready.display().to_string(),
    ];
    // Benchmarks compare proxies with the same number of worker threads.
    if let Ok(n) = std::env::var("PORIN_PROXY_THREADS") {
        args.extend(["--threads".into(), n]);
    }
    let log = paths.dir.join("proxy.log");
    let mut child = spawn_porin(&args, &log)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "the proxy exited during start-up ({status}):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            bail!("the proxy did not become ready in 20 s (log: {})", log.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child.id())
}

/// Waits until the lab's proxy enforces policy version `version` (or a newer one); no-op when the
/// lab's proxy is not running.
pub fn wait_proxy_version(name: &str, version: u64) -> anyhow::Result<()> {
    let st = load_state(name)?;
    if !st.proxy_pid.is_some_and(|p| alive(p, name)) {
        return Ok(());
    }
    let sock = LabPaths::new(name).proxy_control();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = crate::agent::status_of(&sock).ok().and_then(|s| s["snapshot"]["version"].as_u64());
        if v.is_some_and(|v| v >= version) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the proxy did not take policy version {version} within 10 s (it has {v:?})");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `porin lab restart-proxy`: stops the lab's proxy (if running) and starts it again.
pub fn restart_proxy(name: &str) -> anyhow::Result<u32> {
    let mut st = load_state(name)?;
    if let Some(pid) = st.proxy_pid {
        kill(pid, name);
    }
    let pid = start_proxy(name, &st.settings)?;
    st.proxy_pid = Some(pid);
    save_state(&st)?;
    Ok(pid)
}

/// `porin lab stop-proxy`: stops the lab's proxy; L7 flows are refused until it is back.
pub fn stop_proxy(name: &str) -> anyhow::Result<()> {
    let mut st = load_state(name)?;
    if let Some(pid) = st.proxy_pid.take() {
        kill(pid, name);
    }
    save_state(&st)
}

/// Takes the datapath off every endpoint of a lab (benchmark baselines); `restart-agent` re-attaches.
pub fn detach(name: &str) -> anyhow::Result<()> {
    let st = load_state(name)?;
    let control = LabPaths::new(name).control();
    for p in st.pods.iter().filter(|p| !p.external) {
        crate::agent::control(&control, &porin_flow::control::Request::Detach { ifname: p.ifname.clone() })?;
    }
    Ok(())
}

/// Renders the pods of a lab as a table.
pub fn table(st: &LabState) -> String {
    let mut s = format!("lab {} is up (node namespace {})\n", st.name, st.node_netns);
    let _ = writeln!(s, "{:<14} {:<12} {:<16} {:<22} labels", "POD", "NAMESPACE", "IPV4", "IPV6");
    for p in &st.pods {
        let labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let ns = if p.external { "(external)".to_owned() } else { p.namespace.clone() };
        let _ = writeln!(s, "{:<14} {:<12} {:<16} {:<22} {}", p.name, ns, p.ipv4, p.ipv6, labels.join(","));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_single_process_is_ever_signalled() {
        assert_eq!(signal_target(0), None);
        assert_eq!(signal_target(u32::MAX), None);
        assert_eq!(signal_target(1 << 31), None);
        assert_eq!(signal_target(42), Some(nix::unistd::Pid::from_raw(42)));
    }
}
