//! The lab's processes: the agent, the proxy and the pods' servers, started detached as `porin`
//! subcommands and stopped by pid (only ever one process: never a process group).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::bail;

use super::*;

/// Whether `pid` is a live porin process of this lab. The command line reads empty for a moment
/// while a process is inside `execve` (and for zombies): read it a few times before deciding.
pub(super) fn alive(pid: u32, tag: &str) -> bool {
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
pub(super) fn signal_target(pid: u32) -> Option<nix::unistd::Pid> {
    i32::try_from(pid).ok().filter(|p| *p > 0).map(nix::unistd::Pid::from_raw)
}

/// Stops a process of this lab and what it started (its process group: every lab process leads
/// its own, `setsid`): SIGTERM, then SIGKILL after 3 s.
pub(super) fn kill(pid: u32, tag: &str) {
    use nix::sys::signal::{Signal, killpg};
    let Some(p) = signal_target(pid) else { return };
    if !alive(pid, tag) {
        return;
    }
    // Gone already is fine: the point is that it is gone.
    let _ = killpg(p, Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(3);
    while alive(pid, tag) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = killpg(p, Signal::SIGKILL);
}

/// Spawns `porin ARGS` detached (own session), logging to `log`.
pub(super) fn spawn_porin(args: &[String], log: &Path) -> anyhow::Result<std::process::Child> {
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

/// Starts the agent of a lab's node (also used to restart it).
pub fn start_agent(st: &LabState, node: &str) -> anyhow::Result<u32> {
    let (name, settings) = (st.name.as_str(), &st.settings);
    let paths = LabPaths::node(name, node);
    let netns = format!("porin-{name}-{node}");
    let mut args: Vec<String> =
        vec!["agent".into(), "--netns".into(), netns.clone(), "--bpffs".into(), paths.bpffs().display().to_string()];
    if st.kubernetes.is_some() {
        args.extend([
            "--kubernetes".into(),
            "--kubeconfig".into(),
            paths.kubeconfig().display().to_string(),
            "--cni-state-dir".into(),
            paths.cni_state_dir().display().to_string(),
            "--cni-conf-dir".into(),
            paths.cni_conf_dir().display().to_string(),
        ]);
    } else {
        args.extend([
            "--policies".into(),
            paths.policies().display().to_string(),
            "--endpoints".into(),
            paths.endpoints().display().to_string(),
        ]);
    }
    // Kubernetes mode: ready once every pod of the node is an endpoint (read from the API and
    // the CNI records); from a file, the endpoints are all there at once.
    let pods = st.pods.iter().filter(|p| p.node == node && !p.external).count();
    let expected = if st.kubernetes.is_some() { pods } else { 0 };
    args.extend([
        "--control".into(),
        paths.control().display().to_string(),
        "--publish".into(),
        paths.snapshot().display().to_string(),
        // On the machine's loopback: reachable from outside the lab's namespaces.
        "--metrics".into(),
        "127.0.0.1:0".into(),
        "--hubble".into(),
        paths.hubble().display().to_string(),
        "--hubble-listen".into(),
        "127.0.0.1:0".into(),
        "--ui".into(),
        "127.0.0.1:0".into(),
        "--node-name".into(),
        netns,
        "--proxy-control".into(),
        paths.proxy_control().display().to_string(),
        "--cgroup".into(),
        super::node_cgroup(name, node)?.display().to_string(),
    ]);
    if let Some(s) = settings.ct_tcp_close_secs {
        args.extend(["--ct-tcp-close-secs".into(), s.to_string()]);
    }
    if let Some(s) = settings.ct_udp_secs {
        args.extend(["--ct-udp-secs".into(), s.to_string()]);
    }
    if settings.policy_audit_mode {
        args.push("--policy-audit-mode".into());
    }
    if let Some(mesh) = &settings.mesh {
        args.extend([
            "--mesh-dir".into(),
            paths.mesh_dir().display().to_string(),
            "--mesh-credentials".into(),
            paths.mesh_credentials().display().to_string(),
        ]);
        if let Some(ttl) = mesh.cert_ttl_secs {
            args.extend(["--mesh-cert-ttl-secs".into(), ttl.to_string()]);
        }
    }
    let _ = std::fs::remove_file(paths.control());
    let mut child = spawn_porin(&args, &paths.agent_log())?;
    let pid = child.id();
    // Ready when the control socket answers with every endpoint attached.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(status) = crate::agent::status_of(&paths.control()) {
            let eps = status["endpoints"].as_array().cloned().unwrap_or_default();
            if eps.len() >= expected && eps.iter().all(|e| e["attached"] == serde_json::Value::Bool(true)) {
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

/// Restarts the agent of a running lab's node (`None`: the first; after it was stopped or killed).
pub fn restart_agent(name: &str, node: Option<&str>) -> anyhow::Result<u32> {
    let mut st = load_state(name)?;
    let n = st.node(node)?.clone();
    if let Some(pid) = n.agent_pid {
        kill(pid, name);
    }
    let pid = start_agent(&st, &n.name)?;
    if let Some(x) = st.node_mut(&n.name) {
        x.agent_pid = Some(pid);
    }
    save_state(&st)?;
    Ok(pid)
}

/// The port of the lab proxy's transparent listeners (in the node namespace). Flows whose original
/// destination port is this one cannot be proxied (the listener refuses connections to itself).
pub const PROXY_PORT: u16 = 15001;
/// The port of the lab proxy's DNS listeners (UDP and TCP).
pub const DNS_PROXY_PORT: u16 = 15053;
/// The port of the lab proxy's Kafka listeners.
pub(super) const KAFKA_PROXY_PORT: u16 = 15092;
/// The port of the lab proxy's tunnel listeners' source side (flows the datapath hands to the
/// tunnel; a lab with a mesh).
pub(super) const TUNNEL_RELAY_PORT: u16 = 15002;

/// The URL of a lab proxy's metrics (bound on the machine's loopback before the proxy enters the
/// node namespace), from its ready file.
pub(super) fn metrics_url(paths: &LabPaths) -> Option<String> {
    let ready = std::fs::read_to_string(paths.node_dir.join("proxy.ready")).ok()?;
    let addrs: serde_json::Value = serde_json::from_str(&ready).ok()?;
    addrs["metrics"].as_str().map(|a| format!("http://{a}/metrics"))
}

/// Starts a lab node's L7 proxy in the node namespace (also used to restart it): transparent
/// listeners (IPv4 and IPv6; HTTP, DNS and Kafka) registered in the node's datapath, on the policy
/// the node's agent publishes.
pub fn start_proxy(name: &str, node: &str, settings: &LabSettings) -> anyhow::Result<u32> {
    let paths = LabPaths::node(name, node);
    let sockmap = paths.bpffs().join("maps").join(redirect_common::names::PROXY);
    let listener = |addr: &str, tag: &str, protocol: &str| {
        format!(
            "- {{name: {protocol}-{tag}, listen: \"{addr}\", transparent: {{sockmap: {}, protocol: {protocol}}}, source: socket, destination: socket}}\n",
            sockmap.display(),
        )
    };
    let mut config = format!(
        "snapshot: {}\ncontrol_socket: {}\nmetrics: \"127.0.0.1:0\"\nlisteners:\n{}{}{}{}{}{}",
        paths.snapshot().display(),
        paths.proxy_control().display(),
        listener(&format!("0.0.0.0:{PROXY_PORT}"), "v4", "http"),
        listener(&format!("[::]:{PROXY_PORT}"), "v6", "http"),
        listener(&format!("0.0.0.0:{DNS_PROXY_PORT}"), "v4", "dns"),
        listener(&format!("[::]:{DNS_PROXY_PORT}"), "v6", "dns"),
        listener(&format!("0.0.0.0:{KAFKA_PROXY_PORT}"), "v4", "kafka"),
        listener(&format!("[::]:{KAFKA_PROXY_PORT}"), "v6", "kafka"),
    );
    if settings.mesh.is_some() {
        config.push_str(&listener(&format!("0.0.0.0:{TUNNEL_RELAY_PORT}"), "v4", "tunnel"));
        config.push_str(&listener(&format!("[::]:{TUNNEL_RELAY_PORT}"), "v6", "tunnel"));
        config.push_str(&format!("tunnel: {{credentials: {}}}\n", paths.mesh_credentials().display()));
    }
    if let Some(limits) = &settings.proxy_limits {
        config.push_str(&serde_yaml::to_string(&serde_yaml::Mapping::from_iter([(
            "limits".into(),
            serde_yaml::to_value(limits)?,
        )]))?);
    }
    let mut dns = settings.proxy_dns.clone().unwrap_or_default();
    dns.cache_file.get_or_insert_with(|| paths.node_dir.join("fqdn-cache.json"));
    config.push_str(&serde_yaml::to_string(&serde_yaml::Mapping::from_iter([(
        "dns".into(),
        serde_yaml::to_value(&dns)?,
    )]))?);
    let config_path = paths.node_dir.join("proxy.yaml");
    std::fs::write(&config_path, config)?;
    let ready = paths.node_dir.join("proxy.ready");
    let _ = std::fs::remove_file(&ready);
    let mut args: Vec<String> = vec![
        "proxy".into(),
        "--netns".into(),
        format!("porin-{name}-{node}"),
        "--config".into(),
        config_path.display().to_string(),
        "--ready".into(),
        ready.display().to_string(),
    ];
    // Benchmarks compare proxies with the same number of worker threads.
    if let Ok(n) = std::env::var("PORIN_PROXY_THREADS") {
        args.extend(["--threads".into(), n]);
    }
    let log = paths.node_dir.join("proxy.log");
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

/// Waits until a lab node's proxy enforces policy version `version` (or a newer one); no-op when
/// that proxy is not running.
pub fn wait_proxy_version(name: &str, node: &str, version: u64) -> anyhow::Result<()> {
    let st = load_state(name)?;
    if !st.node(Some(node))?.proxy_pid.is_some_and(|p| alive(p, name)) {
        return Ok(());
    }
    let sock = LabPaths::node(name, node).proxy_control();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = crate::agent::status_of(&sock).ok().and_then(|s| s["snapshot"]["version"].as_u64());
        if v.is_some_and(|v| v >= version) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the proxy of node {node} did not take policy version {version} within 10 s (it has {v:?})");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `porin lab restart-proxy`: stops a node's proxy (if running) and starts it again.
pub fn restart_proxy(name: &str, node: Option<&str>) -> anyhow::Result<u32> {
    let mut st = load_state(name)?;
    let n = st.node(node)?.clone();
    if let Some(pid) = n.proxy_pid {
        kill(pid, name);
    }
    let pid = start_proxy(name, &n.name, &st.settings)?;
    if let Some(x) = st.node_mut(&n.name) {
        x.proxy_pid = Some(pid);
    }
    save_state(&st)?;
    Ok(pid)
}

/// `porin lab stop-proxy`: stops a node's proxy; its L7 flows are refused until it is back.
pub fn stop_proxy(name: &str, node: Option<&str>) -> anyhow::Result<()> {
    let mut st = load_state(name)?;
    let n = st.node(node)?.name.clone();
    if let Some(pid) = st.node_mut(&n).and_then(|x| x.proxy_pid.take()) {
        kill(pid, name);
    }
    save_state(&st)
}

/// Takes the datapath off every endpoint of a lab's nodes (benchmark baselines; `restart-agent`
/// re-attaches a node's).
pub fn detach(name: &str) -> anyhow::Result<()> {
    let st = load_state(name)?;
    for p in st.pods.iter().filter(|p| !p.external) {
        let control = LabPaths::node(name, &p.node).control();
        crate::agent::control(&control, &porin_flow::control::Request::Detach { ifname: p.ifname.clone() })?;
    }
    Ok(())
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
