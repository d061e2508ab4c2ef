//! `porin proxy` (run the L7 proxy), `porin observe` (flow records from the agent and the proxy)
//! and `porin policy publish` (the proxy's policy inputs, without an agent).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use policy_engine::api::{LoadOptions, load_str};
use policy_engine::inputs::{PolicyInputs, PolicyText};
use porin_flow::control::{Reply, Request};
use porin_flow::flow::Flow;
use std::sync::Arc;

use proxy::config::ProxyConfig;
use proxy::transparent::Announce;

use crate::agent::{EndpointsFile, control, environment, publish as write_inputs};

/// `porin proxy` arguments.
#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// Configuration file (YAML; see docs/config.md).
    #[arg(long)]
    pub config: PathBuf,
    /// Enter this named network namespace (/run/netns/NAME) first.
    #[arg(long)]
    pub netns: Option<String>,
    /// Once serving, write the bound listener addresses here (JSON `{"name": "addr"}`).
    #[arg(long)]
    pub ready: Option<PathBuf>,
    /// Worker threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Runs the proxy until SIGTERM / SIGINT.
pub fn run(a: &ProxyArgs) -> anyhow::Result<()> {
    let cfg = ProxyConfig::load(&a.config)?;
    // Metrics are bound where porin was started, before it enters the namespace: a scraper on the
    // machine reaches a proxy that serves pods in a namespace of their own.
    let metrics_socket = match cfg.metrics {
        Some(addr) => Some(std::net::TcpListener::bind(addr).with_context(|| format!("metrics on {addr}"))?),
        None => None,
    };
    if let Some(ns) = &a.netns {
        crate::agent::enter_netns(ns)?;
    }
    raise_fd_limit();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = a.threads {
        rt.worker_threads(n.max(1));
    }
    let rt = rt.enable_all().build().context("start the runtime")?;
    // The DNS proxy writes the kernel's FQDN map, pinned beside the SOCKMAP.
    let fqdn: Option<Arc<dyn proxy::fqdn::FqdnDatapath>> = match cfg
        .listeners
        .iter()
        .filter_map(|l| l.transparent.as_ref())
        .find(|t| t.protocol == proxy::config::ListenerProtocol::Dns)
    {
        Some(t) => {
            let dir = t.sockmap.parent().unwrap_or(Path::new("."));
            Some(Arc::new(KernelFqdn(porin_datapath::fqdn::FqdnMaps::open(dir)?)))
        }
        None => None,
    };
    rt.block_on(async {
        let register: proxy::transparent::Register = Arc::new(|t, sock, v6| {
            let id = t.protocol.id();
            match sock {
                Announce::Tcp(s) => porin_datapath::sockmap::register(&t.sockmap, id, v6, s),
                Announce::Udp(s) => {
                    porin_datapath::sockmap::register(&t.map(redirect_common::names::PROXY_UDP), id, v6, s)
                }
            }
            .map_err(std::io::Error::other)
        });
        let proxy =
            proxy::Proxy::start_with(cfg, proxy::Hooks { register: Some(register), fqdn, metrics_socket }).await?;
        if let Some(ready) = &a.ready {
            let mut addrs: BTreeMap<String, String> =
                proxy.info.listeners.iter().map(|(l, addr)| (l.name.clone(), addr.to_string())).collect();
            if let Some(m) = proxy.info.metrics {
                addrs.insert("metrics".into(), m.to_string());
            }
            let tmp = ready.with_extension("tmp");
            std::fs::write(&tmp, serde_json::to_vec(&addrs)?)?;
            std::fs::rename(&tmp, ready)?;
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("proxy stopping");
        drop(proxy);
        anyhow::Ok(())
    })
}

/// The kernel's FQDN map and conntrack for the DNS proxy.
struct KernelFqdn(porin_datapath::fqdn::FqdnMaps);

impl proxy::fqdn::FqdnDatapath for KernelFqdn {
    fn set(&self, ip: std::net::IpAddr, selectors: &[u32]) -> std::io::Result<()> {
        self.0.set(ip, selectors)
    }
    fn entries(&self) -> std::io::Result<Vec<(std::net::IpAddr, Vec<u32>)>> {
        self.0.entries()
    }
    fn live_destinations(&self) -> std::io::Result<std::collections::BTreeSet<std::net::IpAddr>> {
        self.0.live_destinations()
    }
}

/// Raises the soft file-descriptor limit to the hard one: every client connection and every
/// upstream connection is a descriptor (the proxy sizes `max_connections` to what it gets).
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(soft, hard, error = %e, "Could not raise the file-descriptor limit");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "Could not read the file-descriptor limit"),
    }
}

/// `porin fqdn cache list` arguments.
#[derive(Debug, Args)]
pub struct FqdnListArgs {
    /// Ask the proxy of this lab.
    #[cfg(feature = "lab")]
    #[arg(long)]
    pub lab: Option<String>,
    /// Proxy control socket (default /run/porin/proxy.sock).
    #[arg(long)]
    pub proxy: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: crate::cli::Output,
}

/// `porin fqdn cache list`: what the DNS proxy learned, like `cilium fqdn cache list`.
pub fn fqdn_cache_list(a: &FqdnListArgs) -> anyhow::Result<()> {
    #[cfg(feature = "lab")]
    let lab = a.lab.as_deref().map(|n| crate::lab::LabPaths::new(n).proxy_control());
    #[cfg(not(feature = "lab"))]
    let lab: Option<PathBuf> = None;
    let socket = lab.or_else(|| a.proxy.clone()).unwrap_or_else(|| PathBuf::from("/run/porin/proxy.sock"));
    let entries = match control(&socket, &Request::FqdnCache)? {
        Reply::FqdnCache { entries } => entries,
        Reply::Error { error } => bail!("{}: {error}", socket.display()),
        other => bail!("{}: unexpected reply {other:?}", socket.display()),
    };
    match a.output {
        crate::cli::Output::Json => {
            for e in &entries {
                println!("{}", serde_json::to_string(e)?);
            }
        }
        crate::cli::Output::Text => {
            println!("{:<32} {:<40} {:>8}  ENDPOINTS", "FQDN", "IP", "TTL");
            for e in &entries {
                let ttl = if e.zombie { "zombie".to_owned() } else { e.ttl_left.to_string() };
                println!("{:<32} {:<40} {:>8}  {}", e.name, e.ip, ttl, e.endpoints.join(","));
            }
        }
    }
    Ok(())
}

/// `porin policy publish`.
pub fn publish(endpoints: &Path, out: &Path, files: &[PathBuf]) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(endpoints).with_context(|| format!("read {}", endpoints.display()))?;
    let eps: EndpointsFile = serde_json::from_str(&text).with_context(|| format!("parse {}", endpoints.display()))?;
    let mut policies = Vec::new();
    let mut errors = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).with_context(|| format!("read {}", f.display()))?;
        let name = f.display().to_string();
        errors.extend(load_str(&name, &text, &LoadOptions::default()).errors.iter().map(ToString::to_string));
        policies.push(PolicyText { name, text });
    }
    if !errors.is_empty() {
        bail!("invalid policy, nothing published:\n  {}", errors.join("\n  "));
    }
    let version = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_secs());
    let inputs = PolicyInputs {
        version,
        policies,
        environment: environment(&eps),
        node_ips: eps.node_ips.clone(),
        identities: vec![],
        prefixes: vec![],
        fqdn: Default::default(),
    };
    let snap = inputs.resolve().map_err(|e| anyhow::anyhow!("{}", e.join("\n")))?;
    for e in &snap.errors {
        eprintln!("warning: {e}");
    }
    write_inputs(out, &inputs)?;
    eprintln!(
        "published version {version}: {} endpoints, {} policy files -> {}",
        snap.endpoints().len(),
        files.len(),
        out.display()
    );
    Ok(())
}

/// `porin observe` arguments.
#[derive(Debug, Args)]
pub struct ObserveArgs {
    /// Read the agent and proxy of this lab.
    #[cfg(feature = "lab")]
    #[arg(long)]
    pub lab: Option<String>,
    /// Agent control socket (default /run/porin/agent.sock).
    #[arg(long)]
    pub agent: Option<PathBuf>,
    /// Proxy control socket (default /run/porin/proxy.sock).
    #[arg(long)]
    pub proxy: Option<PathBuf>,
    /// Only these verdicts (FORWARDED, DROPPED, REDIRECTED, ERROR); repeatable.
    #[arg(long)]
    pub verdict: Vec<String>,
    /// Only flows from or to this pod (`namespace/name` or `name`); repeatable.
    #[arg(long)]
    pub pod: Vec<String>,
    /// Only this protocol (tcp, udp, icmp, http, http/1.1, http/2); repeatable.
    #[arg(long)]
    pub protocol: Vec<String>,
    /// Keep printing new records.
    #[arg(short, long)]
    pub follow: bool,
    /// Only the last N matching records (before following).
    #[arg(long)]
    pub last: Option<usize>,
    /// Output format: `text` lines, `json` (one Hubble-shaped flow per line), or a `table` that
    /// grows as flows happen (with `-f`).
    #[arg(short, long, value_enum, default_value_t)]
    pub output: ObserveOutput,
}

/// `porin observe -o`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum ObserveOutput {
    /// One line per record.
    #[default]
    Text,
    /// JSON Lines (Hubble's field names).
    Json,
    /// Aligned columns: time, source, destination, request, verdict, why.
    Table,
}

/// A source of records: the agent's or the proxy's control socket.
struct Source {
    socket: PathBuf,
    after: u64,
    required: bool,
}

impl Source {
    /// New records, or `None` when the source is not there.
    fn poll(&mut self) -> anyhow::Result<Option<Vec<Flow>>> {
        let r = match control(&self.socket, &Request::Flows { after: self.after, limit: None }) {
            Ok(r) => r,
            Err(e) if self.required => return Err(e.context(format!("read {}", self.socket.display()))),
            Err(_) => return Ok(None),
        };
        let Reply::Flows { last, missed, flows } = r else {
            bail!("{}: not a flows reply: {r:?}", self.socket.display());
        };
        if missed > 0 {
            eprintln!(
                "porin observe: {missed} records from {} were let go before they were read",
                self.socket.display()
            );
        }
        self.after = last;
        Ok(Some(flows))
    }
}

fn matches(a: &ObserveArgs, f: &Flow) -> bool {
    (a.verdict.is_empty() || a.verdict.iter().any(|v| v.eq_ignore_ascii_case(f.verdict.name())))
        && (a.pod.is_empty() || a.pod.iter().any(|p| f.involves_pod(p)))
        && (a.protocol.is_empty() || a.protocol.iter().any(|p| f.has_protocol(p)))
}

/// `porin observe`.
pub fn observe(a: &ObserveArgs) -> anyhow::Result<ExitCode> {
    let explicit = a.agent.is_some() || a.proxy.is_some();
    #[cfg(feature = "lab")]
    let lab = a.lab.as_deref().map(crate::lab::LabPaths::new).map(|p| (Some(p.control()), Some(p.proxy_control())));
    #[cfg(not(feature = "lab"))]
    let lab = None;
    let (agent, proxy) = match lab {
        Some(sockets) => sockets,
        None if explicit => (a.agent.clone(), a.proxy.clone()),
        None => (Some(PathBuf::from("/run/porin/agent.sock")), Some(PathBuf::from("/run/porin/proxy.sock"))),
    };
    let mut sources = Vec::new();
    if let Some(s) = agent {
        sources.push(Source { socket: s, after: 0, required: explicit && a.agent.is_some() });
    }
    if let Some(s) = proxy {
        sources.push(Source { socket: s, after: 0, required: explicit && a.proxy.is_some() });
    }
    let mut first = true;
    if a.output == ObserveOutput::Table {
        println!("{}", crate::render::TABLE_HEADER);
    }
    loop {
        let mut batch = Vec::new();
        let mut reachable = 0;
        for s in &mut sources {
            if let Some(flows) = s.poll()? {
                reachable += 1;
                batch.extend(flows.into_iter().filter(|f| matches(a, f)));
            }
        }
        if first && reachable == 0 {
            let names: Vec<String> = sources.iter().map(|s| s.socket.display().to_string()).collect();
            bail!("neither the agent nor the proxy answers ({})", names.join(", "));
        }
        // RFC 3339 in UTC with fixed width sorts as time.
        batch.sort_by(|x, y| x.time.cmp(&y.time));
        if first && let Some(n) = a.last {
            let skip = batch.len().saturating_sub(n);
            batch.drain(..skip);
        }
        for f in &batch {
            match a.output {
                ObserveOutput::Json => println!("{}", serde_json::to_string(f)?),
                ObserveOutput::Text => println!("{} {}", f.time, crate::render::text(f)),
                ObserveOutput::Table => println!("{}", crate::render::row(f)),
            }
        }
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        first = false;
        if !a.follow {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_proxys_listener_ids_are_the_datapaths() {
        use policy_engine::model::L7Parser;
        assert_eq!(proxy::config::ListenerProtocol::Http.id(), porin_datapath::mapstate::listener_of(L7Parser::Http));
    }
}
