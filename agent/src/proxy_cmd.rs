//! `porin proxy` (run the L7 proxy), `porin fqdn cache list` and `porin policy publish` (the
//! proxy's policy inputs, without an agent).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Args;
use policy_engine::api::{LoadOptions, load_str};
use policy_engine::inputs::{PolicyInputs, PolicyText};
use porin_flow::control::{Reply, Request};
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
    // The L7 balancer asks the socket balancer's record of translated connections, pinned beside
    // the SOCKMAP too (the agent creates it with the other maps).
    let translations: Option<Arc<dyn proxy::balance::Translations>> =
        match cfg.listeners.iter().find_map(|l| l.transparent.as_ref()) {
            Some(t) => {
                let dir = t.sockmap.parent().unwrap_or(Path::new("."));
                Some(Arc::new(KernelTranslations(porin_datapath::translations::Translations::open(dir)?)))
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
        let proxy = proxy::Proxy::start_with(
            cfg,
            proxy::Hooks { register: Some(register), fqdn, translations, metrics_socket },
        )
        .await?;
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

/// The kernel's socket load balancer's translated connections, for the L7 one.
struct KernelTranslations(porin_datapath::translations::Translations);

impl proxy::balance::Translations for KernelTranslations {
    fn frontend(
        &self,
        client: std::net::SocketAddr,
        backend: std::net::SocketAddr,
    ) -> std::io::Result<Option<std::net::SocketAddr>> {
        self.0.frontend(client, backend)
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
    let lab = a.lab.as_deref().map(|n| crate::lab::LabPaths::of(n, None)).transpose()?.map(|p| p.proxy_control());
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
        // Published for no node in particular: every node listed is `remote-node`.
        environment: environment(&eps, ""),
        node_ips: eps.node_ips.clone(),
        identities: eps.identities.clone(),
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

#[cfg(test)]
mod tests {
    #[test]
    fn the_proxys_listener_ids_are_the_datapaths() {
        use policy_engine::model::L7Parser;
        assert_eq!(proxy::config::ListenerProtocol::Http.id(), porin_datapath::mapstate::listener_of(L7Parser::Http));
    }
}
